//! Escape hatches for hostile tests: raw descriptors, heads and ring fields.

use std::sync::atomic::Ordering;

use super::{DriverQueue, HeadState, QueueError, RawDescriptor, DESC_SIZE};

impl DriverQueue {
    /// Takes `n` descriptors off the free list for the caller to fill with
    /// [`DriverQueue::write_desc`]; they stay reserved until [`DriverQueue::release_descs`].
    pub fn alloc_descs(&mut self, n: usize) -> Result<Vec<u16>, QueueError> {
        if n > self.free.len() {
            return Err(QueueError::NoDescriptors {
                needed: n,
                free: self.free.len(),
            });
        }
        let mut v = self.free.split_off(self.free.len() - n);
        v.reverse();
        Ok(v)
    }

    /// Returns descriptors taken with [`DriverQueue::alloc_descs`].
    pub fn release_descs(&mut self, descs: &[u16]) {
        self.free.extend(descs.iter().rev());
    }

    /// Writes any descriptor at `index` of the table.
    pub fn write_desc(&mut self, index: u16, desc: RawDescriptor) -> Result<(), QueueError> {
        if index >= self.cfg.size {
            return Err(QueueError::DescIndex {
                index,
                size: self.cfg.size,
            });
        }
        self.write_desc_at(index, &desc);
        Ok(())
    }

    /// Reads the descriptor at `index` of the table.
    pub fn read_desc(&self, index: u16) -> Result<RawDescriptor, QueueError> {
        if index >= self.cfg.size {
            return Err(QueueError::DescIndex {
                index,
                size: self.cfg.size,
            });
        }
        let mut b = [0u8; DESC_SIZE];
        self.ring.read_at(usize::from(index) * DESC_SIZE, &mut b);
        Ok(RawDescriptor::from_bytes(&b))
    }

    /// Puts any `head` (even out of range) in the next avail slot, without publishing. A
    /// completion for an in-range head is reported by `poll_used` without freeing anything.
    pub fn push_avail(&mut self, head: u16) {
        if let Some(h) = self.heads.get_mut(usize::from(head)) {
            if *h == HeadState::Free {
                *h = HeadState::Raw;
            }
        }
        self.push_avail_slot(head);
    }

    /// Stores any value in avail.idx (Release) and makes it the driver's position.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.ring
            .store_u16(self.layout.avail_idx(), idx.to_le(), Ordering::Release);
        self.avail_idx = idx;
        self.published = idx;
    }

    /// Writes avail.flags.
    pub fn set_avail_flags(&mut self, flags: u16) {
        self.ring
            .store_u16(self.layout.avail_flags(), flags.to_le(), Ordering::Release);
    }

    /// Writes `used_event` (meaningful with EVENT_IDX); the next reap rewrites it.
    pub fn set_used_event(&mut self, ev: u16) {
        self.ring
            .store_u16(self.layout.used_event(), ev.to_le(), Ordering::Release);
    }
}
