//! Queues: the driver's configuration of a queue, and a running queue a device owns.
//!
//! The two are different types. [`QueueConfig`] is plain data that the transport fills in while the
//! driver sets a queue up; it cannot touch memory. [`ActiveQueue`] exists only between activation
//! and quiesce, owns its kick eventfd and the `virtio_queue::Queue` that walks the rings.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::{GuestMemoryMmap, Interrupt};

/// A queue as the driver configures it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// The largest size the device accepts.
    pub max_size: u16,
    /// The size the driver chose (a power of two, at most `max_size`).
    pub size: u16,
    /// GPA of the descriptor table.
    pub desc_table: u64,
    /// GPA of the available ring.
    pub avail_ring: u64,
    /// GPA of the used ring.
    pub used_ring: u64,
    /// Index of the next available entry the device will read.
    pub next_avail: u16,
}

impl QueueConfig {
    /// A queue of `max_size` with nothing configured yet.
    pub fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            next_avail: 0,
        }
    }

    /// Builds the running queue, checking size and alignment, that the rings lie in `mem`, and
    /// reading the used index the driver last saw from guest memory.
    pub fn build(
        &self,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(self.max_size)?;
        q.try_set_size(self.size)?;
        q.try_set_desc_table_address(GuestAddress(self.desc_table))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))?;
        q.try_set_used_ring_address(GuestAddress(self.used_ring))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(virtio_queue::Error::InvalidSize);
        }
        q.set_next_avail(self.next_avail);
        let used = q.used_idx(mem, std::sync::atomic::Ordering::Acquire)?;
        q.set_next_used(used.0);
        Ok(q)
    }
}

/// A running queue: the rings, the driver's doorbell, and the queue's index.
#[derive(Debug)]
pub struct ActiveQueue {
    index: u16,
    queue: Queue,
    kick: EventFd,
}

impl ActiveQueue {
    /// Assembles a running queue (done by the framework at activation).
    pub fn new(index: u16, queue: Queue, kick: EventFd) -> Self {
        ActiveQueue { index, queue, kick }
    }

    /// The queue's index in the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The ring state.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The ring state, mutably.
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// The driver's doorbell.
    pub fn kick(&self) -> &EventFd {
        &self.kick
    }

    /// Takes the queue apart again.
    pub fn into_parts(self) -> (u16, Queue, EventFd) {
        (self.index, self.queue, self.kick)
    }

    /// Whether the driver has made buffers available that the device has not taken.
    pub fn has_available(&self, mem: &GuestMemoryMmap) -> Result<bool, virtio_queue::Error> {
        let avail = self
            .queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
        Ok(avail.0 != self.queue.next_avail())
    }

    /// Takes every available descriptor chain and hands it to `handle`, with notification
    /// suppression: driver notifications are off while the queue is being emptied and the queue
    /// is checked again after they are turned back on, so no buffer is missed. Returns how many
    /// chains were taken. An error (a corrupt available ring) leaves the queue as it was.
    pub fn take_available<'m, F>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        mut handle: F,
    ) -> Result<usize, virtio_queue::Error>
    where
        F: FnMut(&mut Self, DescriptorChain<&'m GuestMemoryMmap>),
    {
        let mut taken = 0;
        loop {
            self.queue.disable_notification(mem)?;
            while let Some(chain) = self.queue.iter(mem)?.next() {
                taken += 1;
                handle(self, chain);
            }
            if !self.queue.enable_notification(mem)? {
                return Ok(taken);
            }
        }
    }

    /// Publishes a used entry.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        self.queue.add_used(mem, head, len)
    }

    /// Signals the driver if it asked to be told (EVENT_IDX aware).
    pub fn notify(&mut self, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt) {
        match self.queue.needs_notification(mem) {
            Ok(true) => interrupt.signal_queue(self.index),
            Ok(false) => {}
            Err(e) => {
                log::error!("queue {}: cannot read the used event: {e}", self.index);
                interrupt.signal_needs_reset();
            }
        }
    }
}
