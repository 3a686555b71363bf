//! Guest buffers as iovecs for the kernel.
//!
//! The data of a read or write is handed to the kernel as iovecs that point straight into guest
//! memory, so the host never copies it. The pointers stay valid because an [`IoBuffers`] owns a
//! snapshot of guest memory (an `Arc` of the mapping): a memory-table change that removes the
//! region leaves it mapped until the operation is done. When `O_DIRECT` needs an alignment the
//! guest buffers lack (or a request has more pieces than one vectored call takes), the data goes
//! through an aligned bounce buffer instead.
#![allow(unsafe_code)]

use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::StorageError;
use crate::request::Segment;
use outboard_virtio::GuestMemoryMmap;

/// The most iovecs one vectored system call or io_uring operation takes (`UIO_MAXIOV`).
const MAX_IOVECS: usize = libc::UIO_MAXIOV as usize;

/// Which way the data goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Storage → guest (a read).
    ToGuest,
    /// Guest → storage (a write).
    FromGuest,
}

#[derive(Debug)]
struct Bounce {
    buf: Vec<u8>,
    offset: usize,
}

/// The buffers of one read or write, as iovecs, with what keeps them valid.
#[derive(Debug)]
pub(crate) struct IoBuffers {
    mem: Arc<GuestMemoryMmap>,
    segments: Vec<Segment>,
    direction: Direction,
    iovecs: Vec<libc::iovec>,
    /// The first iovec not yet fully transferred.
    start: usize,
    done: usize,
    len: usize,
    bounce: Option<Bounce>,
}

// SAFETY: the raw pointers in `iovecs` point into guest memory mapped by `mem` (an `Arc` this
// value owns) or into `bounce` (a heap buffer it owns). Neither is tied to the thread that made
// them, and an `IoBuffers` is used by one thread at a time (it has no shared references).
unsafe impl Send for IoBuffers {}

impl IoBuffers {
    /// The buffers of `segments` in the snapshot `mem`. With `align > 1` (`O_DIRECT`), buffers
    /// whose address or length is not a multiple of `align` go through a bounce buffer.
    pub fn new(
        mem: &Arc<GuestMemoryMmap>,
        segments: Vec<Segment>,
        direction: Direction,
        align: usize,
    ) -> Result<Self, StorageError> {
        let mut iovecs = Vec::with_capacity(segments.len());
        let mut aligned = true;
        let mut len = 0;
        for seg in &segments {
            for slice in mem.get_slices(seg.addr, seg.len as usize) {
                let slice = slice.map_err(|source| StorageError::GuestMemory {
                    addr: seg.addr.0,
                    source,
                })?;
                let ptr = slice.ptr_guard_mut().as_ptr();
                aligned &= (ptr as usize) % align == 0 && slice.len() % align == 0;
                len += slice.len();
                iovecs.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: slice.len(),
                });
            }
        }
        let mut bufs = IoBuffers {
            mem: mem.clone(),
            segments,
            direction,
            iovecs,
            start: 0,
            done: 0,
            len,
            bounce: None,
        };
        if !aligned || bufs.iovecs.len() > MAX_IOVECS {
            bufs.use_bounce(align.max(512))?;
        }
        Ok(bufs)
    }

    /// Replaces the guest iovecs by one aligned bounce buffer (filled from the guest for a
    /// write).
    fn use_bounce(&mut self, align: usize) -> Result<(), StorageError> {
        let mut buf = vec![0u8; self.len + align];
        let offset = buf.as_ptr().align_offset(align);
        let view = &mut buf[offset..offset + self.len];
        if self.direction == Direction::FromGuest {
            let mut at = 0;
            for seg in &self.segments {
                let n = seg.len as usize;
                self.mem
                    .read_slice(&mut view[at..at + n], seg.addr)
                    .map_err(|source| StorageError::GuestMemory {
                        addr: seg.addr.0,
                        source,
                    })?;
                at += n;
            }
        }
        self.iovecs = vec![libc::iovec {
            iov_base: view.as_mut_ptr().cast(),
            iov_len: self.len,
        }];
        self.bounce = Some(Bounce { buf, offset });
        Ok(())
    }

    /// Whether the data goes through a bounce buffer.
    #[cfg(test)]
    pub fn is_bounced(&self) -> bool {
        self.bounce.is_some()
    }

    /// The iovecs still to transfer.
    pub fn pending(&self) -> &[libc::iovec] {
        &self.iovecs[self.start..]
    }

    /// Bytes transferred so far.
    pub fn done(&self) -> usize {
        self.done
    }

    /// Bytes still to transfer.
    pub fn remaining(&self) -> usize {
        self.len - self.done
    }

    /// Records that the next `n` bytes were transferred (a short read or write is resumed from
    /// [`IoBuffers::pending`]). Must not be called while the kernel uses the iovecs.
    pub fn advance(&mut self, n: usize) {
        let mut n = n.min(self.remaining());
        self.done += n;
        while n > 0 {
            let Some(iov) = self.iovecs.get_mut(self.start) else {
                return;
            };
            if n >= iov.iov_len {
                n -= iov.iov_len;
                self.start += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }

    /// Finishes a successful transfer: copies a read's bounce buffer to the guest.
    pub fn finish(&self) -> Result<(), StorageError> {
        let Some(bounce) = &self.bounce else {
            return Ok(());
        };
        if self.direction == Direction::FromGuest {
            return Ok(());
        }
        let view = &bounce.buf[bounce.offset..bounce.offset + self.len];
        let mut at = 0;
        for seg in &self.segments {
            let n = seg.len as usize;
            self.mem
                .write_slice(&view[at..at + n], seg.addr)
                .map_err(|source| StorageError::GuestMemory {
                    addr: seg.addr.0,
                    source,
                })?;
            at += n;
        }
        Ok(())
    }

    /// Fills the guest buffers with zeros (a read of the null device).
    pub fn zero_guest(&self) -> Result<(), StorageError> {
        const ZEROS: [u8; 4096] = [0; 4096];
        for seg in &self.segments {
            let mut at = 0;
            while at < seg.len {
                let n = (seg.len - at).min(ZEROS.len() as u32);
                // Inside a segment that was checked to lie in guest memory: no overflow.
                let addr = GuestAddress(seg.addr.0.wrapping_add(u64::from(at)));
                self.mem
                    .write_slice(&ZEROS[..n as usize], addr)
                    .map_err(|source| StorageError::GuestMemory {
                        addr: addr.0,
                        source,
                    })?;
                at += n;
            }
        }
        Ok(())
    }
}

impl Drop for IoBuffers {
    /// The kernel wrote straight into guest memory, past vm-memory's dirty tracking: mark the
    /// pages now that it is done with them (success or not), so that a migration sends them
    /// again. Bounced reads were copied in through vm-memory, which marked them.
    fn drop(&mut self) {
        if self.direction != Direction::ToGuest || self.bounce.is_some() {
            return;
        }
        for seg in &self.segments {
            for slice in self.mem.get_slices(seg.addr, seg.len as usize).flatten() {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Arc<GuestMemoryMmap> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10000),
                (GuestAddress(0x10000), 0x10000),
            ])
            .unwrap(),
        )
    }

    #[test]
    fn a_segment_across_two_regions_becomes_two_iovecs() {
        let mem = mem();
        let seg = Segment {
            addr: GuestAddress(0xf000),
            len: 0x2000,
        };
        let mut b = IoBuffers::new(&mem, vec![seg], Direction::ToGuest, 1).unwrap();
        assert_eq!(b.pending().len(), 2);
        assert!(!b.is_bounced());
        b.advance(0x1800);
        assert_eq!(b.pending().len(), 1);
        assert_eq!(b.pending()[0].iov_len, 0x800);
        assert_eq!((b.done(), b.remaining()), (0x1800, 0x800));
    }

    #[test]
    fn unaligned_direct_buffers_are_bounced_both_ways() {
        let mem = mem();
        mem.write_slice(&[7u8; 512], GuestAddress(0x101)).unwrap();
        let seg = Segment {
            addr: GuestAddress(0x101),
            len: 512,
        };
        let w = IoBuffers::new(&mem, vec![seg], Direction::FromGuest, 512).unwrap();
        assert!(w.is_bounced());
        let iov = w.pending()[0];
        assert_eq!(iov.iov_base as usize % 512, 0);
        assert_eq!(iov.iov_len, 512);
        let r = IoBuffers::new(&mem, vec![seg], Direction::ToGuest, 512).unwrap();
        r.finish().unwrap();
        let mut back = [1u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x101)).unwrap();
        assert_eq!(
            back, [0u8; 512],
            "the read's (zeroed) bounce buffer reached the guest"
        );
    }

    #[test]
    fn buffers_outside_guest_memory_are_refused() {
        let mem = mem();
        let seg = Segment {
            addr: GuestAddress(0x1f000),
            len: 0x2000,
        };
        let e = IoBuffers::new(&mem, vec![seg], Direction::ToGuest, 1);
        assert!(matches!(e, Err(StorageError::GuestMemory { .. })), "{e:?}");
    }
}
