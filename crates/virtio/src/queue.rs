//! Queues: the driver's configuration of a queue, and a running queue a device owns.
//!
//! The two are different types. [`QueueConfig`] is plain data that the transport fills in while the
//! driver sets a queue up; it cannot touch memory. [`ActiveQueue`] exists only between activation
//! and quiesce, owns its kick eventfd and the `virtio_queue::Queue` that walks the rings.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::chain::Chain;
use crate::fault::{self, FaultPoint};
use crate::inflight::InflightLog;
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
///
/// Devices take chains with [`ActiveQueue::pop`] (or [`ActiveQueue::take_available`]) and answer
/// them with [`ActiveQueue::add_used`]; both keep the queue's inflight record, if the transport
/// gave one, so that a restarted device can take again what a crashed one had not answered.
/// [`ActiveQueue::queue_mut`] is for notification control and diagnostics: chains taken through
/// it bypass the record.
#[derive(Debug)]
pub struct ActiveQueue {
    index: u16,
    queue: Queue,
    kick: EventFd,
    inflight: Option<Box<dyn InflightLog>>,
    /// Heads an earlier process took and never answered, to be taken first.
    resubmit: VecDeque<u16>,
    /// The queue started over a record an earlier process left: the driver may have missed
    /// the interrupt for used entries that process published just before it died.
    recovered: bool,
    /// Where the latest chains came from, newest last, for [`ActiveQueue::put_back`] (at
    /// most a ring's worth).
    recent: VecDeque<Taken>,
}

/// Where a chain came from.
#[derive(Clone, Copy, Debug)]
enum Taken {
    Avail(u16),
    Resubmit(u16),
}

impl ActiveQueue {
    /// Assembles a running queue (done by the framework at activation).
    pub fn new(index: u16, queue: Queue, kick: EventFd) -> Self {
        ActiveQueue {
            index,
            queue,
            kick,
            inflight: None,
            resubmit: VecDeque::new(),
            recovered: false,
            recent: VecDeque::new(),
        }
    }

    /// Assembles a running queue that keeps `log`, repairing the record against the used ring
    /// and queueing what it says an earlier process left unanswered.
    pub fn with_inflight(
        index: u16,
        mut queue: Queue,
        kick: EventFd,
        mut log: Box<dyn InflightLog>,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, virtio_queue::Error> {
        let used = queue.used_idx(mem, Ordering::Acquire)?;
        let recovery = log.recover(used.0);
        if let Some(next) = recovery.next_avail {
            if next != queue.next_avail() {
                log::info!(
                    "queue {index}: continuing at available index {next} (configured {}), {} \
                     chain(s) to resubmit",
                    queue.next_avail(),
                    recovery.resubmit.len()
                );
            }
            queue.set_next_avail(next);
        }
        if !recovery.resubmit.is_empty() {
            log::info!(
                "queue {index}: resubmitting {} chain(s) an earlier process left in flight",
                recovery.resubmit.len()
            );
        }
        Ok(ActiveQueue {
            index,
            queue,
            kick,
            inflight: Some(log),
            resubmit: recovery.resubmit.into(),
            recovered: recovery.next_avail.is_some(),
            recent: VecDeque::new(),
        })
    }

    /// Whether the queue took over from an earlier process's inflight record (its driver is
    /// owed an interrupt: the process may have died between publishing and signalling).
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// Whether the queue keeps an inflight record (what it drops unanswered comes back).
    pub fn has_inflight(&self) -> bool {
        self.inflight.is_some()
    }

    /// The queue's index in the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The ring state.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The ring state, mutably (notification control; chains taken here bypass the inflight
    /// record).
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// The driver's doorbell.
    pub fn kick(&self) -> &EventFd {
        &self.kick
    }

    /// Takes the queue apart again. Resubmissions not yet taken stay in the inflight record
    /// (and are found again when the queue next starts).
    pub fn into_parts(self) -> (u16, Queue, EventFd) {
        (self.index, self.queue, self.kick)
    }

    /// Whether the driver has made buffers available that the device has not taken (or an
    /// earlier process left some to resubmit).
    pub fn has_available(&self, mem: &GuestMemoryMmap) -> Result<bool, virtio_queue::Error> {
        if !self.resubmit.is_empty() {
            return Ok(true);
        }
        let avail = self.queue.avail_idx(mem, Ordering::Acquire)?;
        Ok(avail.0 != self.queue.next_avail())
    }

    /// Takes the next chain: first what an earlier process left in flight, then the available
    /// ring. The chain is in the inflight record before it is returned.
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Option<Chain<'m>>, virtio_queue::Error> {
        let table = GuestAddress(self.queue.desc_table());
        let size = self.queue.size();
        let taken = if let Some(head) = self.resubmit.pop_front() {
            Taken::Resubmit(head)
        } else {
            let Some(head) = self.queue.iter(mem)?.next().map(|c| c.head_index()) else {
                return Ok(None);
            };
            if let Some(log) = self.inflight.as_mut() {
                log.taken(head);
                fault::hit(FaultPoint::AfterInflightMark);
            }
            Taken::Avail(head)
        };
        if self.recent.len() >= usize::from(size.max(1)) {
            self.recent.pop_front();
        }
        self.recent.push_back(taken);
        let (Taken::Avail(head) | Taken::Resubmit(head)) = taken;
        Ok(Some(Chain::new(mem, table, size, head)))
    }

    /// Puts the newest chain [`ActiveQueue::pop`] returned (and not yet put back) back,
    /// untouched: the next `pop` returns it again. Called repeatedly, it puts chains back
    /// newest first. The device must not have answered the chain. Does nothing if there is no
    /// such chain.
    pub fn put_back(&mut self) {
        match self.recent.pop_back() {
            Some(Taken::Avail(head)) => {
                self.queue.go_to_previous_position();
                if let Some(log) = self.inflight.as_mut() {
                    log.untaken(head);
                }
            }
            Some(Taken::Resubmit(head)) => self.resubmit.push_front(head),
            None => {}
        }
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
        F: FnMut(&mut Self, Chain<'m>),
    {
        let mut taken = 0;
        loop {
            self.queue.disable_notification(mem)?;
            while let Some(chain) = self.pop(mem)? {
                taken += 1;
                handle(self, chain);
            }
            if !self.queue.enable_notification(mem)? {
                return Ok(taken);
            }
        }
    }

    /// Publishes a used entry (and records that `head` is answered).
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        let Some(log) = self.inflight.as_mut() else {
            return self.queue.add_used(mem, head, len);
        };
        log.completing(head);
        fault::hit(FaultPoint::BeforeUsedUpdate);
        self.queue.add_used(mem, head, len)?;
        fault::hit(FaultPoint::AfterUsedUpdate);
        log.completed(self.queue.next_used());
        Ok(())
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
