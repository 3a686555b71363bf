//! The shape of a descriptor chain: its buffers by direction, where its status byte is, and
//! helpers that read bytes and carve data segments out of it.

use outboard_virtio::chain::DescriptorWalk;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{RequestError, Segment, KEEP_DESCRIPTORS};
use outboard_virtio::GuestMemoryMmap;

/// The shape of a chain: its buffers by direction, as the driver laid them out.
#[derive(Debug, Default)]
pub(super) struct ChainLayout {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    pub readable_count: usize,
    pub writable_count: usize,
    pub readable_len: u64,
    pub writable_len: u64,
    pub last_writable: Option<Segment>,
    pub misordered: Option<usize>,
    pub descriptors: usize,
    pub broken: bool,
}

impl ChainLayout {
    pub fn walk<C: DescriptorWalk>(chain: C) -> Self {
        let mut l = ChainLayout::default();
        let mut points_on = false;
        for (index, desc) in chain.enumerate() {
            l.descriptors += 1;
            points_on = desc.has_next();
            if desc.len() == 0 {
                continue;
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                l.writable_count += 1;
                l.writable_len += u64::from(seg.len);
                l.last_writable = Some(seg);
                if l.writable.len() < KEEP_DESCRIPTORS {
                    l.writable.push(seg);
                }
            } else {
                if l.writable_count > 0 && l.misordered.is_none() {
                    l.misordered = Some(index);
                }
                l.readable_count += 1;
                l.readable_len += u64::from(seg.len);
                if l.readable.len() < KEEP_DESCRIPTORS {
                    l.readable.push(seg);
                }
            }
        }
        l.broken = points_on;
        l
    }

    /// The status byte: the last byte of the last device-writable descriptor, if it is in
    /// guest memory.
    pub fn status(&self, mem: &GuestMemoryMmap) -> Result<GuestAddress, RequestError> {
        let last = self.last_writable.ok_or(RequestError::NoStatus)?;
        let addr = last
            .addr
            .0
            .checked_add(u64::from(last.len) - 1)
            .ok_or(RequestError::StatusOutOfMemory { addr: u64::MAX })?;
        if !mem.address_in_range(GuestAddress(addr)) {
            return Err(RequestError::StatusOutOfMemory { addr });
        }
        Ok(GuestAddress(addr))
    }
}

/// The segments of `segs` after skipping `skip` bytes.
pub(super) fn skip_front(segs: &[Segment], mut skip: u64) -> Result<Vec<Segment>, RequestError> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let addr = s
            .addr
            .0
            .checked_add(skip)
            .ok_or(RequestError::OutOfMemory {
                addr: s.addr.0,
                len,
            })?;
        out.push(Segment {
            addr: GuestAddress(addr),
            // `skip < len`, which is a u32.
            len: (len - skip) as u32,
        });
        skip = 0;
    }
    Ok(out)
}

/// The device-writable segments without the status byte.
pub(super) fn without_status(segs: &[Segment]) -> Vec<Segment> {
    let mut out = segs.to_vec();
    if let Some(last) = out.last_mut() {
        last.len -= 1;
        if last.len == 0 {
            out.pop();
        }
    }
    out
}

/// Copies `out.len()` bytes that start `skip` bytes into `segs` out of guest memory.
pub(super) fn read_bytes(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    skip: u64,
    out: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0;
    for s in skip_front(segs, skip)? {
        if done == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], s.addr)
            .map_err(|source| RequestError::GuestMemory {
                addr: s.addr.0,
                source,
            })?;
        done += n;
    }
    if done < out.len() {
        return Err(RequestError::ShortHeader {
            readable: skip + done as u64,
        });
    }
    Ok(())
}

pub(super) fn sum_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

pub(super) fn check_in_memory(mem: &GuestMemoryMmap, segs: &[Segment]) -> Result<(), RequestError> {
    for s in segs {
        if !mem.check_range(s.addr, s.len as usize) {
            return Err(RequestError::OutOfMemory {
                addr: s.addr.0,
                len: u64::from(s.len),
            });
        }
    }
    Ok(())
}

/// Where the answer to `chain` goes: the last byte of its last device-writable descriptor, if
/// that is in guest memory. `None` means the request cannot be answered except by a used entry
/// of length zero.
pub fn locate_status<C: DescriptorWalk>(chain: C, mem: &GuestMemoryMmap) -> Option<GuestAddress> {
    ChainLayout::walk(chain).status(mem).ok()
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::request::tests::{header, memory, parse, LIMITS, W};
    use crate::request::BlkRequest;

    #[test]
    fn a_request_without_a_status_byte_cannot_be_answered() {
        let mem = memory();
        header(&mem, 0x1_0000, VIRTIO_BLK_T_FLUSH, 0);
        let e = parse(&mem, &[(0x1_0000, 16, 0)]).unwrap_err();
        assert!(matches!(e, RequestError::NoStatus), "{e}");
        let e = parse(&mem, &[(0x1_0000, 16, 0), (0x20_0000, 1, W)]).unwrap_err();
        assert!(
            matches!(e, RequestError::StatusOutOfMemory { addr: 0x20_0000 }),
            "{e}"
        );
        let e = parse(&mem, &[(0x1_0000, 16, 0), (u64::MAX, 2, W)]).unwrap_err();
        assert!(matches!(e, RequestError::StatusOutOfMemory { .. }), "{e}");
    }

    #[test]
    fn a_chain_that_loops_is_broken_but_its_status_is_found() {
        let mem = memory();
        header(&mem, 0x1_0000, VIRTIO_BLK_T_FLUSH, 0);
        let q = MockSplitQueue::new(&mem, 16);
        let next = VRING_DESC_F_NEXT as u16;
        let raw = [
            RawDescriptor::from(SplitDescriptor::new(0x1_0000, 16, next, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x3_0000, 1, next | W, 1)),
        ];
        let chain = q.build_multiple_desc_chains(&raw).unwrap();
        assert_eq!(
            locate_status(chain.clone(), &mem),
            Some(GuestAddress(0x3_0000))
        );
        let e = BlkRequest::parse(chain, &mem, &LIMITS).unwrap_err();
        assert!(
            matches!(e, RequestError::BrokenChain { descriptors: 16 }),
            "{e}"
        );
    }
}
