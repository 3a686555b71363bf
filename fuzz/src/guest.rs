//! A small guest for the queue-level targets: guest memory with a hole in it, split rings laid
//! out at fixed places, memory filled from the fuzz input, and an interrupt sink that counts.
//!
//! Memory is two regions, `[0, 64 KiB)` and `[68 KiB, 72 KiB)`, so that descriptors can point
//! into a hole, across a region boundary, and past the end. Queue `k` has its descriptor table
//! at `k * 4 KiB`, its avail ring right after it and its used ring after that (4-byte aligned);
//! queues are at most [`MAX_QUEUE_SIZE`] entries so that this fits in 4 KiB.
//!
//! The input writes memory as a list of patches: `offset: u16, len: u8, bytes`, each into the
//! first region.

use std::sync::atomic::{AtomicU64, Ordering};

use outboard_virtio::queue::QueueConfig;
use outboard_virtio::{GuestMemoryMmap, Interrupt};
use vm_memory::{Bytes, GuestAddress};

use crate::input::{Input, Output};

/// The first region's size.
pub const RAM_SIZE: u64 = 0x1_0000;
/// Where the second region starts (after a 4 KiB hole).
pub const HIGH_START: u64 = 0x1_1000;
/// The second region's size.
pub const HIGH_SIZE: u64 = 0x1000;
/// The largest queue the layout has room for.
pub const MAX_QUEUE_SIZE: u16 = 128;
/// Where the data area starts for seeds: after the rings of eight queues.
pub const DATA_START: u64 = 0x8000;

/// The guest memory of a target.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), RAM_SIZE as usize),
        (GuestAddress(HIGH_START), HIGH_SIZE as usize),
    ])
    .expect("the layout is valid")
}

/// Where the rings of queue `index` (of `size` entries) lie: descriptor table, avail ring,
/// used ring.
pub fn ring_layout(index: u16, size: u16) -> (u64, u64, u64) {
    let desc = u64::from(index) * 0x1000;
    let avail = desc + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    (desc, avail, used)
}

/// A queue size from one byte: a power of two from 1 to [`MAX_QUEUE_SIZE`].
pub fn queue_size(b: u8) -> u16 {
    1 << (b % 8)
}

/// The configuration of queue `index` with the layout of [`ring_layout`].
pub fn queue_config(index: u16, max_size: u16, size: u16, next_avail: u16) -> QueueConfig {
    let (desc_table, avail_ring, used_ring) = ring_layout(index, size);
    QueueConfig {
        max_size,
        size,
        desc_table,
        avail_ring,
        used_ring,
        next_avail,
    }
}

/// Applies up to `max` memory patches from `input` (see the module documentation).
pub fn patch(mem: &GuestMemoryMmap, input: &mut Input, max: usize) {
    for _ in 0..max {
        if input.is_empty() {
            return;
        }
        let offset = u64::from(input.u16());
        let len = usize::from(input.u8());
        let bytes = input.bytes(len);
        let end = (offset + bytes.len() as u64).min(RAM_SIZE);
        let n = (end - offset) as usize;
        // Inside the first region by construction.
        mem.write_slice(&bytes[..n], GuestAddress(offset))
            .expect("the patch lies in the first region");
    }
}

/// Writes a patch for [`patch`].
pub fn write_patch(out: &mut Output, offset: u16, bytes: &[u8]) {
    for (i, chunk) in bytes.chunks(255).enumerate() {
        out.u16(offset + (i * 255) as u16)
            .u8(chunk.len() as u8)
            .bytes(chunk);
    }
}

/// Seeds: the bytes of one split descriptor.
pub fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// Seeds: patches that make `chains` (each a list of `(addr, len, flags)`; NEXT is added)
/// available on queue `index` of `size` entries.
pub fn write_chains(out: &mut Output, index: u16, size: u16, chains: &[&[(u64, u32, u16)]]) {
    let (desc, avail, _) = ring_layout(index, size);
    let mut table = Vec::new();
    let mut ring = Vec::new();
    let mut next = 0u16;
    for chain in chains {
        ring.extend_from_slice(&next.to_le_bytes());
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let flags = if last { flags } else { flags | 1 };
            table.extend_from_slice(&descriptor(addr, len, flags, next + 1));
            next += 1;
        }
    }
    write_patch(out, desc as u16, &table);
    let mut avail_bytes = vec![0u8, 0];
    avail_bytes.extend_from_slice(&(chains.len() as u16).to_le_bytes());
    avail_bytes.extend_from_slice(&ring);
    write_patch(out, avail as u16, &avail_bytes);
}

/// An interrupt sink that only counts.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    /// Queue signals.
    pub queue: AtomicU64,
    /// Config-change signals.
    pub config: AtomicU64,
    /// DEVICE_NEEDS_RESET signals.
    pub needs_reset: AtomicU64,
}

impl Interrupt for CountingInterrupt {
    fn signal_queue(&self, _index: u16) {
        self.queue.fetch_add(1, Ordering::Relaxed);
    }

    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::Relaxed);
    }

    fn signal_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::Relaxed);
    }
}
