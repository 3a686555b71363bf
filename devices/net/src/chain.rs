//! Descriptor chains at the trust boundary: a chain the driver made becomes a list of
//! device-readable and device-writable buffers, every one inside guest memory, before any
//! packet or command is read from it.
//!
//! virtio-queue stops iterating a chain that loops, leaves the descriptor table or an indirect
//! table, or grows past 4 GiB; such a chain ends with a descriptor that still points to a next
//! one, and is refused here as broken.

use outboard_virtio::chain::DescriptorWalk;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use outboard_virtio::GuestMemoryMmap;

/// The most descriptors a chain may have (a queue of the largest size, or an indirect table as
/// long).
const MAX_DESCRIPTORS: usize = 1024;

/// One guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A walked chain.
#[derive(Debug, Default)]
pub(crate) struct ChainBuffers {
    /// The device-readable buffers, in order.
    pub readable: Vec<Buffer>,
    /// The device-writable buffers, in order.
    pub writable: Vec<Buffer>,
}

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain loops, leaves its table, or is longer than 4 GiB.
    #[error("the descriptor chain is broken (a loop, a bad index or longer than 4 GiB)")]
    Broken,
    /// A device-readable descriptor after a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// More descriptors than the device accepts.
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    /// A buffer outside guest memory.
    #[error("the buffer of {len} bytes at {addr:#x} is not in guest memory")]
    OutsideMemory {
        /// Its guest-physical address.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

impl ChainBuffers {
    /// Walks `chain`, checking its structure and that each buffer is in `mem`.
    pub fn walk<C: DescriptorWalk>(chain: C, mem: &GuestMemoryMmap) -> Result<Self, ChainError> {
        let mut out = ChainBuffers::default();
        out.walk_into(chain, mem)?;
        Ok(out)
    }

    /// [`ChainBuffers::walk`] into `self`, reusing its allocations (the workers walk a chain
    /// per packet). On error `self` holds part of the chain.
    pub fn walk_into<C: DescriptorWalk>(
        &mut self,
        chain: C,
        mem: &GuestMemoryMmap,
    ) -> Result<(), ChainError> {
        self.readable.clear();
        self.writable.clear();
        let out = self;
        let mut last_has_next = false;
        let mut count = 0usize;
        for desc in chain {
            count += 1;
            if count > MAX_DESCRIPTORS {
                return Err(ChainError::TooLong);
            }
            last_has_next = desc.has_next();
            let buffer = Buffer {
                addr: desc.addr(),
                len: desc.len(),
            };
            let access = if desc.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if buffer.len > 0 && !mem.check_range(buffer.addr, buffer.len as usize, access) {
                return Err(ChainError::OutsideMemory {
                    addr: buffer.addr.0,
                    len: buffer.len,
                });
            }
            if desc.is_write_only() {
                out.writable.push(buffer);
            } else if !out.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            } else {
                out.readable.push(buffer);
            }
        }
        if last_has_next || count == 0 {
            return Err(ChainError::Broken);
        }
        Ok(())
    }

    /// The total length of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.len)).sum()
    }

    /// The total length of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.len)).sum()
    }
}

/// Copies guest memory at `addr` into `dst`. A buffer lies in one region (the driver allocates
/// it so), and one `VolatileSlice` copies it with a plain `memcpy`; vm-memory's `read_slice`
/// walks regions generically, which cost more than the copy for small frames. A range across
/// regions takes that walk.
fn read_guest(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    dst: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    match vm_memory::GuestMemoryBackend::get_slice(mem, addr, dst.len()) {
        Ok(slice) if slice.len() == dst.len() => {
            slice.copy_to(dst);
            Ok(())
        }
        _ => mem.read_slice(dst, addr),
    }
}

/// Copies `src` into guest memory at `addr`, as [`read_guest`] reads; the slice's bitmap marks
/// the pages dirty as vm-memory's own writes do.
fn write_guest(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    src: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    match vm_memory::GuestMemoryBackend::get_slice(mem, addr, src.len()) {
        Ok(slice) if slice.len() == src.len() => {
            slice.copy_from(src);
            Ok(())
        }
        _ => mem.write_slice(src, addr),
    }
}

/// Copies the device-readable bytes of `buffers` into `out` (cleared first).
pub(crate) fn read_all(
    mem: &GuestMemoryMmap,
    buffers: &[Buffer],
    out: &mut Vec<u8>,
) -> Result<(), vm_memory::GuestMemoryError> {
    out.clear();
    for b in buffers {
        let start = out.len();
        out.resize(start + b.len as usize, 0);
        read_guest(mem, b.addr, &mut out[start..])?;
    }
    Ok(())
}

/// Writes `data` across `buffers` from the start; returns the bytes written (all of `data`, or
/// what fits).
pub(crate) fn write_across(
    mem: &GuestMemoryMmap,
    buffers: &[Buffer],
    mut data: &[u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut written = 0;
    for b in buffers {
        if data.is_empty() {
            break;
        }
        let n = data.len().min(b.len as usize);
        write_guest(mem, b.addr, &data[..n])?;
        data = &data[n..];
        written += n;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::QueueOwnedT;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn walk_raw(descs: &[(u64, u32, u16, u16)]) -> Result<ChainBuffers, ChainError> {
        let mem = memory();
        let mut d = MockDriver::new(&mem, 1);
        d.push_raw(0, descs);
        let mut q = d.queue(0);
        let chain = q.queue_mut().iter(&mem).unwrap().next().unwrap();
        ChainBuffers::walk(chain, &mem)
    }

    #[test]
    fn readable_then_writable_buffers_are_collected() {
        let c = walk_raw(&[
            (0x10_0000, 12, NEXT, 1),
            (0x10_1000, 100, NEXT, 2),
            (0x10_2000, 1, WRITE, 0),
        ])
        .unwrap();
        assert_eq!(c.readable.len(), 2);
        assert_eq!(c.readable_len(), 112);
        assert_eq!(c.writable_len(), 1);
    }

    #[test]
    fn malformed_chains_are_refused() {
        assert_eq!(
            walk_raw(&[(0x10_0000, 1, WRITE | NEXT, 1), (0x10_1000, 1, 0, 0)]).unwrap_err(),
            ChainError::ReadableAfterWritable
        );
        assert_eq!(
            walk_raw(&[(0x10_0000, 1, NEXT, 0)]).unwrap_err(),
            ChainError::Broken,
            "a loop"
        );
        assert!(matches!(
            walk_raw(&[(MEM_SIZE as u64 - 4, 8, 0, 0)]).unwrap_err(),
            ChainError::OutsideMemory { .. }
        ));
    }

    #[test]
    fn copies_work_within_one_region_and_across_two() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let data: Vec<u8> = (0..64u8).collect();
        let buffers = [
            Buffer {
                addr: GuestAddress(0x100),
                len: 16,
            },
            Buffer {
                addr: GuestAddress(0xff0),
                len: 32,
            },
            Buffer {
                addr: GuestAddress(0x1800),
                len: 64,
            },
        ];
        assert_eq!(write_across(&mem, &buffers, &data).unwrap(), 64);
        let mut across = [0u8; 32];
        mem.read_slice(&mut across, GuestAddress(0xff0)).unwrap();
        assert_eq!(&across[..], &data[16..48], "the buffer across the regions");
        let mut out = Vec::new();
        read_all(&mem, &buffers[..2], &mut out).unwrap();
        assert_eq!(out, &data[..48]);
        let outside = [Buffer {
            addr: GuestAddress(0x1ff0),
            len: 32,
        }];
        assert!(read_all(&mem, &outside, &mut out).is_err());
        assert!(write_across(&mem, &outside, &data).is_err());
    }
}
