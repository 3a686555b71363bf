//! Descriptor chains, walked from any head.
//!
//! `virtio_queue` builds its `DescriptorChain` only from the available ring; a chain cannot be
//! made from a head index alone. Resubmitting requests after a crash needs exactly that (the
//! heads come from the inflight region, their available-ring slots may have been reused), so
//! devices see this crate's [`Chain`]: an iterator over the descriptors of one chain, built on
//! `virtio_queue`'s public [`Descriptor`] type, with the same checks as the driver-facing path
//! and a few more the specification asks for.
//!
//! The walk is bounded: a chain yields at most as many descriptors as its table has entries
//! (a loop ends there), an indirect table may not contain another one nor be chained to, its
//! length must be a non-zero multiple of 16, and the bytes a chain describes may not overflow a
//! `u32`. Any violation ends the iteration early; a device that sees the last descriptor still
//! pointing on (`has_next`) knows the chain was broken.

use std::mem::size_of;

pub use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::GuestMemoryMmap;

/// VIRTQ_DESC_F_INDIRECT.
const DESC_F_INDIRECT: u16 = 0x4;
/// VIRTQ_DESC_F_NEXT.
const DESC_F_NEXT: u16 = 0x1;
/// The size of one descriptor in a table.
const DESC_SIZE: u64 = size_of::<Descriptor>() as u64;

/// One descriptor chain of a split virtqueue, starting at its head.
#[derive(Clone, Debug)]
pub struct Chain<'m> {
    mem: &'m GuestMemoryMmap,
    table: GuestAddress,
    table_len: u16,
    head: u16,
    next: u16,
    /// Descriptors the current table may still yield (a loop ends when it runs out).
    ttl: u16,
    indirect: bool,
    bytes: u32,
    done: bool,
}

impl<'m> Chain<'m> {
    /// The chain whose head descriptor is entry `head` of the descriptor table at `desc_table`
    /// (`queue_size` entries). Nothing is read until the chain is iterated.
    pub fn new(
        mem: &'m GuestMemoryMmap,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Self {
        Chain {
            mem,
            table: desc_table,
            table_len: queue_size,
            head,
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
            done: false,
        }
    }

    /// The index of the head descriptor: what the used entry names.
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// The guest memory the chain's buffers are in.
    pub fn memory(&self) -> &'m GuestMemoryMmap {
        self.mem
    }

    fn read(&self, index: u16) -> Option<Descriptor> {
        let addr = self
            .table
            .checked_add(u64::from(index).checked_mul(DESC_SIZE)?)?;
        self.mem.read_obj::<Descriptor>(addr).ok()
    }

    fn step(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.table_len {
            return None;
        }
        let desc = self.read(self.next)?;
        if desc.flags() & DESC_F_INDIRECT != 0 {
            // An indirect table may not nest, and a descriptor that points at one may not also
            // point on (VIRTIO 1.2, 2.7.5.3.1).
            if self.indirect || desc.flags() & DESC_F_NEXT != 0 {
                return None;
            }
            let len = desc.len();
            if len == 0 || u64::from(len) % DESC_SIZE != 0 {
                return None;
            }
            let entries = u16::try_from(u64::from(len) / DESC_SIZE).ok()?;
            self.table = desc.addr();
            self.table_len = entries;
            self.ttl = entries;
            self.next = 0;
            self.indirect = true;
            return self.step();
        }
        self.bytes = self.bytes.checked_add(desc.len())?;
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

impl Iterator for Chain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.done {
            return None;
        }
        let d = self.step();
        if d.is_none() {
            self.done = true;
        }
        d
    }
}

/// A walk over one chain's descriptors that knows its head: this crate's [`Chain`], and
/// `virtio_queue`'s own chain (which tests build with its mock queue). Device code that parses
/// chains takes any of them.
pub trait DescriptorWalk: Iterator<Item = Descriptor> {
    /// The index of the head descriptor.
    fn head_index(&self) -> u16;
}

impl DescriptorWalk for Chain<'_> {
    fn head_index(&self) -> u16 {
        self.head
    }
}

impl<M> DescriptorWalk for virtio_queue::DescriptorChain<M>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    fn head_index(&self) -> u16 {
        virtio_queue::DescriptorChain::head_index(self)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    const TABLE: u64 = 0x1000;
    const W: u16 = 0x2;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, table: u64, index: u16, d: (u64, u32, u16, u16)) {
        let desc = Descriptor::new(d.0, d.1, d.2, d.3);
        mem.write_obj(desc, GuestAddress(table + u64::from(index) * 16))
            .unwrap();
    }

    fn walk(mem: &GuestMemoryMmap, head: u16) -> Vec<(u64, u32, bool)> {
        Chain::new(mem, GuestAddress(TABLE), 8, head)
            .map(|d| (d.addr().0, d.len(), d.has_next()))
            .collect()
    }

    #[test]
    fn a_chain_follows_next_from_any_head() {
        let mem = memory();
        put(&mem, TABLE, 5, (0x8000, 16, DESC_F_NEXT, 2));
        put(&mem, TABLE, 2, (0x9000, 512, DESC_F_NEXT | W, 7));
        put(&mem, TABLE, 7, (0xa000, 1, W, 0));
        let c = Chain::new(&mem, GuestAddress(TABLE), 8, 5);
        assert_eq!(c.head_index(), 5);
        let d: Vec<_> = c.collect();
        assert_eq!(d.len(), 3);
        assert!(!d[0].is_write_only() && d[1].is_write_only() && d[2].is_write_only());
        assert_eq!(d[2].addr(), GuestAddress(0xa000));
    }

    #[test]
    fn a_loop_ends_after_as_many_descriptors_as_the_table_has() {
        let mem = memory();
        put(&mem, TABLE, 0, (0x8000, 16, DESC_F_NEXT, 1));
        put(&mem, TABLE, 1, (0x8000, 16, DESC_F_NEXT, 0));
        let d = walk(&mem, 0);
        assert_eq!(d.len(), 8);
        assert!(d.last().unwrap().2, "still points on: broken");
    }

    #[test]
    fn next_outside_the_table_and_heads_outside_it_end_the_walk() {
        let mem = memory();
        put(&mem, TABLE, 0, (0x8000, 16, DESC_F_NEXT, 9));
        let d = walk(&mem, 0);
        assert_eq!(d.len(), 1);
        assert!(d[0].2);
        assert!(walk(&mem, 8).is_empty());
        let far = Chain::new(&mem, GuestAddress(u64::MAX - 8), 8, 0).count();
        assert_eq!(far, 0, "a table outside memory yields nothing");
    }

    #[test]
    fn indirect_tables_are_walked_and_checked() {
        let mem = memory();
        let ind = 0x4000;
        put(&mem, TABLE, 3, (ind, 48, DESC_F_INDIRECT, 0));
        put(&mem, ind, 0, (0x8000, 16, DESC_F_NEXT, 1));
        put(&mem, ind, 1, (0x9000, 100, DESC_F_NEXT | W, 2));
        put(&mem, ind, 2, (0xa000, 1, W, 0));
        assert_eq!(walk(&mem, 3).len(), 3);
        // Nested indirect, indirect with NEXT, and bad lengths are refused.
        put(&mem, ind, 1, (ind, 16, DESC_F_INDIRECT, 0));
        assert_eq!(walk(&mem, 3).len(), 1);
        put(&mem, TABLE, 3, (ind, 48, DESC_F_INDIRECT | DESC_F_NEXT, 4));
        assert!(walk(&mem, 3).is_empty());
        put(&mem, TABLE, 3, (ind, 40, DESC_F_INDIRECT, 0));
        assert!(walk(&mem, 3).is_empty());
        put(&mem, TABLE, 3, (ind, 0, DESC_F_INDIRECT, 0));
        assert!(walk(&mem, 3).is_empty());
    }

    #[test]
    fn the_bytes_of_a_chain_may_not_overflow() {
        let mem = memory();
        put(&mem, TABLE, 0, (0x8000, u32::MAX, DESC_F_NEXT, 1));
        put(&mem, TABLE, 1, (0x8000, 2, 0, 0));
        let d = walk(&mem, 0);
        assert_eq!(d.len(), 1);
        assert!(d[0].2);
    }
}
