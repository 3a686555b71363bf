//! Driver-side split virtqueues.
//!
//! A [`DriverQueue`] lays out a descriptor table, avail ring and used ring in guest RAM and plays
//! the driver: it keeps a free-descriptor list, adds chains of buffers, publishes the avail index
//! with Release ordering, notifies the device through the kick eventfd (honouring
//! `VRING_USED_F_NO_NOTIFY`, or `avail_event` with EVENT_IDX) and reaps the used ring by busy
//! polling or by waiting on the call eventfd.
//!
//! Batching is explicit: [`DriverQueue::add_chain`] only fills descriptors and an avail slot;
//! [`DriverQueue::kick`] publishes everything added so far with one index store and at most one
//! notification.
//!
//! Hostile tests get escape hatches: [`DriverQueue::write_desc`] writes any descriptor,
//! [`DriverQueue::push_avail`] publishes any head, [`DriverQueue::set_avail_idx`] writes any avail
//! index, so loops, out-of-memory addresses and overlong chains are a few lines.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use log::trace;
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ram::{GuestBuf, GuestRam, RamError};
use crate::raw::wait_readable_fd;

mod hostile;
#[cfg(test)]
mod tests;
mod types;

pub use types::{
    NotifyMode, QueueConfig, QueueStats, RawDescriptor, RingAddressing, Segment, Used, VringSetup,
};

/// Size of one split-ring descriptor.
pub const DESC_SIZE: usize = 16;
/// Largest split queue size the spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors of driver-side queue operations.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Allocating ring memory failed.
    #[error("cannot allocate ring memory")]
    Ram(#[from] RamError),
    /// Queue size not a power of two in 1..=32768.
    #[error("invalid queue size {0} (must be a power of two up to 32768)")]
    BadSize(u16),
    /// A chain needs at least one segment.
    #[error("a descriptor chain needs at least one segment")]
    EmptyChain,
    /// Not enough free descriptors for the chain.
    #[error("chain needs {needed} descriptors but only {free} are free")]
    NoDescriptors {
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// The queue has no indirect tables or the chain is longer than one table.
    #[error("indirect chain of {segments} segments does not fit (max {max})")]
    IndirectTooLong {
        /// Segments requested.
        segments: usize,
        /// Table size configured (0 = indirect disabled).
        max: u16,
    },
    /// A descriptor index outside the table.
    #[error("descriptor index {index} out of range for queue size {size}")]
    DescIndex {
        /// Index given.
        index: u16,
        /// Queue size.
        size: u16,
    },
    /// The device put an id in the used ring that is not an in-flight head.
    #[error("queue {queue}: device returned id {id} that is not in flight (used slot {slot})")]
    BadUsedId {
        /// Queue index.
        queue: u16,
        /// Id from the used element.
        id: u32,
        /// Used index of the element.
        slot: u16,
    },
    /// The device moved used.idx more than a queue size past what the driver has seen.
    #[error("queue {queue}: used.idx {used_idx} is more than the queue size past {last_used}")]
    UsedIdxRunaway {
        /// Queue index.
        queue: u16,
        /// used.idx read from the ring.
        used_idx: u16,
        /// Last used index the driver processed.
        last_used: u16,
    },
    /// No completion arrived in time.
    #[error("queue {queue}: no completion within {waited:?} ({in_flight} in flight)")]
    Timeout {
        /// Queue index.
        queue: u16,
        /// Time waited.
        waited: Duration,
        /// Chains in flight.
        in_flight: usize,
    },
    /// An eventfd operation failed.
    #[error("queue {queue}: {op} failed")]
    EventFd {
        /// Queue index.
        queue: u16,
        /// Operation.
        op: &'static str,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeadState {
    Free,
    /// A direct chain of `ndesc` descriptors linked through `DriverQueue::next`.
    Chain {
        ndesc: u16,
    },
    /// One descriptor pointing at this head's indirect table.
    Indirect,
    /// Published with `push_avail`; the test owns the descriptors.
    Raw,
}

/// Offsets of the ring parts inside the ring allocation.
#[derive(Clone, Copy, Debug)]
struct Layout {
    size: u16,
    avail: usize,
    used: usize,
    total: usize,
}

impl Layout {
    fn new(size: u16) -> Self {
        let n = usize::from(size);
        let avail = DESC_SIZE * n;
        // flags, idx, ring[n], used_event
        let avail_len = 4 + 2 * n + 2;
        // Keep the used ring (written by the device) off the avail ring's cache lines.
        let used = (avail + avail_len).next_multiple_of(64);
        // flags, idx, ring[n] of {id u32, len u32}, avail_event
        let used_len = 4 + 8 * n + 2;
        Layout {
            size,
            avail,
            used,
            total: used + used_len,
        }
    }
    fn avail_flags(&self) -> usize {
        self.avail
    }
    fn avail_idx(&self) -> usize {
        self.avail + 2
    }
    fn avail_ring(&self, slot: u16) -> usize {
        self.avail + 4 + 2 * usize::from(slot % self.size)
    }
    fn used_event(&self) -> usize {
        self.avail + 4 + 2 * usize::from(self.size)
    }
    fn used_flags(&self) -> usize {
        self.used
    }
    fn used_idx(&self) -> usize {
        self.used + 2
    }
    fn used_elem(&self, slot: u16) -> usize {
        self.used + 4 + 8 * usize::from(slot % self.size)
    }
    fn avail_event(&self) -> usize {
        self.used + 4 + 8 * usize::from(self.size)
    }
}

/// `vring_need_event` from the spec: whether moving an index from `old` to `new` crosses
/// `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct DriverQueue {
    index: u16,
    cfg: QueueConfig,
    layout: Layout,
    ring: GuestBuf,
    indirect: Option<GuestBuf>,
    kick: EventFd,
    call: EventFd,
    /// Stack of free descriptor indices.
    free: Vec<u16>,
    /// Driver's copy of each descriptor's `next`, for freeing chains without reading guest
    /// memory the device could have scribbled on.
    next: Vec<u16>,
    heads: Vec<HeadState>,
    /// Next avail index to fill (may be ahead of `published`).
    avail_idx: u16,
    /// Value last stored into avail.idx.
    published: u16,
    /// Avail index at the last notification decision.
    notified: u16,
    last_used: u16,
    in_flight: usize,
    stats: QueueStats,
}

impl DriverQueue {
    /// Lays out a queue in `ram` and creates its kick and call eventfds.
    pub fn new(ram: &mut GuestRam, index: u16, cfg: QueueConfig) -> Result<Self, QueueError> {
        if !cfg.size.is_power_of_two() || cfg.size > MAX_QUEUE_SIZE {
            return Err(QueueError::BadSize(cfg.size));
        }
        let layout = Layout::new(cfg.size);
        let ring = ram.alloc(layout.total, 4096)?;
        let indirect = match cfg.indirect_max {
            0 => None,
            max => Some(ram.alloc(
                usize::from(cfg.size) * usize::from(max) * DESC_SIZE,
                DESC_SIZE,
            )?),
        };
        let evt = |op| {
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| QueueError::EventFd {
                queue: index,
                op,
                source,
            })
        };
        let mut q = DriverQueue {
            index,
            cfg,
            layout,
            ring,
            indirect,
            kick: evt("create kick eventfd")?,
            call: evt("create call eventfd")?,
            free: Vec::new(),
            next: vec![0; usize::from(cfg.size)],
            heads: vec![HeadState::Free; usize::from(cfg.size)],
            avail_idx: 0,
            published: 0,
            notified: 0,
            last_used: 0,
            in_flight: 0,
            stats: QueueStats::default(),
        };
        q.reset();
        Ok(q)
    }

    /// Forgets all driver state and zeroes the rings, as after a device reset. Chains in
    /// flight are dropped.
    pub fn reset(&mut self) {
        self.ring.fill(0, self.ring.len(), 0);
        self.free = (0..self.cfg.size).rev().collect();
        self.heads.fill(HeadState::Free);
        self.avail_idx = 0;
        self.published = 0;
        self.notified = 0;
        self.last_used = 0;
        self.in_flight = 0;
        self.apply_notify_mode();
    }

    /// Queue index on the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.cfg.size
    }

    /// The configuration this queue was built with.
    pub fn config(&self) -> QueueConfig {
        self.cfg
    }

    /// Chains published or pending and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The kick eventfd (sent with SET_VRING_KICK).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The call eventfd (sent with SET_VRING_CALL).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The whole ring allocation (descriptor table at offset 0), for tests that poke it.
    pub fn ring(&self) -> &GuestBuf {
        &self.ring
    }

    /// Guest physical address of the descriptor table.
    pub fn desc_table_gpa(&self) -> u64 {
        self.ring.gpa()
    }

    /// Guest physical address of the avail ring.
    pub fn avail_ring_gpa(&self) -> u64 {
        self.ring.gpa() + self.layout.avail as u64
    }

    /// Guest physical address of the used ring.
    pub fn used_ring_gpa(&self) -> u64 {
        self.ring.gpa() + self.layout.used as u64
    }

    /// What SET_VRING_NUM/ADDR/CALL/KICK need, with addresses of the chosen kind.
    pub fn vring_setup(&self, addressing: RingAddressing) -> Result<VringSetup, QueueError> {
        let base = match addressing {
            RingAddressing::UserAddress => self.ring.user_addr(),
            RingAddressing::GuestPhysical => self.ring.gpa(),
        };
        let dup = |fd: &EventFd, op| {
            fd.try_clone().map_err(|source| QueueError::EventFd {
                queue: self.index,
                op,
                source,
            })
        };
        Ok(VringSetup {
            index: self.index,
            size: self.cfg.size,
            desc_addr: base,
            avail_addr: base + self.layout.avail as u64,
            used_addr: base + self.layout.used as u64,
            kick: dup(&self.kick, "dup kick eventfd")?,
            call: dup(&self.call, "dup call eventfd")?,
            avail_idx: self.ring.slice(self.layout.avail_idx(), 2),
            used_idx: self.ring.slice(self.layout.used_idx(), 2),
        })
    }

    /// Switches between interrupt-driven and polled completion.
    pub fn set_notify_mode(&mut self, mode: NotifyMode) {
        self.cfg.notify = mode;
        self.apply_notify_mode();
    }

    fn apply_notify_mode(&self) {
        self.write_notify_state(self.cfg.notify);
    }

    fn write_notify_state(&self, mode: NotifyMode) {
        if self.cfg.event_idx {
            let ev = match mode {
                NotifyMode::Interrupt => self.last_used,
                // The device can be at most a ring ahead of `last_used`, so an event half the
                // index space away is never crossed.
                NotifyMode::Poll => self.last_used.wrapping_add(0x8000),
            };
            self.ring
                .store_u16(self.layout.used_event(), ev.to_le(), Ordering::Relaxed);
        } else {
            let flags = match mode {
                NotifyMode::Interrupt => 0,
                NotifyMode::Poll => VRING_AVAIL_F_NO_INTERRUPT as u16,
            };
            self.ring
                .store_u16(self.layout.avail_flags(), flags.to_le(), Ordering::Relaxed);
        }
    }

    fn write_desc_at(&self, index: u16, d: &RawDescriptor) {
        self.ring
            .write_at(usize::from(index) * DESC_SIZE, &d.to_bytes());
    }

    fn push_avail_slot(&mut self, head: u16) {
        self.ring.store_u16(
            self.layout.avail_ring(self.avail_idx),
            head.to_le(),
            Ordering::Relaxed,
        );
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
        self.stats.chains_added += 1;
    }

    /// Adds a direct chain (one descriptor per segment) and fills an avail slot, without
    /// publishing it. Returns the head index, which the completion will carry.
    pub fn add_chain(&mut self, segments: &[Segment]) -> Result<u16, QueueError> {
        let n = segments.len();
        if n == 0 {
            return Err(QueueError::EmptyChain);
        }
        if n > self.free.len() {
            return Err(QueueError::NoDescriptors {
                needed: n,
                free: self.free.len(),
            });
        }
        let descs = self.free.split_off(self.free.len() - n);
        // `split_off` keeps stack order: take from the end so the lowest index heads the chain.
        for (i, seg) in segments.iter().enumerate() {
            let idx = descs[n - 1 - i];
            let next = if i + 1 < n { descs[n - 2 - i] } else { 0 };
            let mut flags = if seg.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc_at(
                idx,
                &RawDescriptor {
                    addr: seg.gpa,
                    len: seg.len,
                    flags,
                    next,
                },
            );
            self.next[usize::from(idx)] = next;
        }
        let head = descs[n - 1];
        self.heads[usize::from(head)] = HeadState::Chain { ndesc: n as u16 };
        self.push_avail_slot(head);
        Ok(head)
    }

    /// Adds a chain through one indirect descriptor (the queue must have been configured with
    /// `indirect_max` ≥ the number of segments), without publishing it.
    pub fn add_indirect_chain(&mut self, segments: &[Segment]) -> Result<u16, QueueError> {
        let n = segments.len();
        let max = self.cfg.indirect_max;
        if n == 0 {
            return Err(QueueError::EmptyChain);
        }
        let Some(tables) = self.indirect.as_ref().filter(|_| n <= usize::from(max)) else {
            return Err(QueueError::IndirectTooLong { segments: n, max });
        };
        let Some(head) = self.free.pop() else {
            return Err(QueueError::NoDescriptors { needed: 1, free: 0 });
        };
        let table = tables.slice(
            usize::from(head) * usize::from(max) * DESC_SIZE,
            n * DESC_SIZE,
        );
        for (i, seg) in segments.iter().enumerate() {
            let mut flags = if seg.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            let mut next = 0;
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT as u16;
                next = (i + 1) as u16;
            }
            let d = RawDescriptor {
                addr: seg.gpa,
                len: seg.len,
                flags,
                next,
            };
            table.write_at(i * DESC_SIZE, &d.to_bytes());
        }
        self.write_desc_at(
            head,
            &RawDescriptor {
                addr: table.gpa(),
                len: table.len() as u32,
                flags: VRING_DESC_F_INDIRECT as u16,
                next: 0,
            },
        );
        self.heads[usize::from(head)] = HeadState::Indirect;
        self.push_avail_slot(head);
        Ok(head)
    }

    /// Stores the avail index for everything added so far (Release: descriptors and avail
    /// slots become visible before the index).
    pub fn publish(&mut self) {
        if self.published != self.avail_idx {
            self.ring.store_u16(
                self.layout.avail_idx(),
                self.avail_idx.to_le(),
                Ordering::Release,
            );
            self.published = self.avail_idx;
        }
    }

    /// Notifies the device about chains published since the last notification, unless it
    /// suppressed notifications. Returns whether the kick eventfd was written.
    pub fn notify(&mut self) -> Result<bool, QueueError> {
        if self.notified == self.published {
            return Ok(false);
        }
        // The avail idx store must be visible before we read the device's suppression state.
        fence(Ordering::SeqCst);
        let needed = if self.cfg.event_idx {
            let ev = u16::from_le(
                self.ring
                    .load_u16(self.layout.avail_event(), Ordering::Relaxed),
            );
            need_event(ev, self.published, self.notified)
        } else {
            let flags = u16::from_le(
                self.ring
                    .load_u16(self.layout.used_flags(), Ordering::Relaxed),
            );
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        self.notified = self.published;
        if needed {
            self.force_kick()?;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        Ok(needed)
    }

    /// Publishes everything added and notifies the device if needed: one index store and at
    /// most one eventfd write for a whole batch.
    pub fn kick(&mut self) -> Result<bool, QueueError> {
        self.publish();
        self.notify()
    }

    /// Writes the kick eventfd unconditionally.
    pub fn force_kick(&mut self) -> Result<(), QueueError> {
        self.stats.kicks += 1;
        self.kick.write(1).map_err(|source| QueueError::EventFd {
            queue: self.index,
            op: "kick",
            source,
        })
    }

    /// Adds one chain, publishes and notifies.
    pub fn submit(&mut self, segments: &[Segment]) -> Result<u16, QueueError> {
        let head = self.add_chain(segments)?;
        self.kick()?;
        Ok(head)
    }

    /// The device's used index (Acquire).
    pub fn used_idx(&self) -> u16 {
        u16::from_le(
            self.ring
                .load_u16(self.layout.used_idx(), Ordering::Acquire),
        )
    }

    /// The used index up to which completions were reaped.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// The next avail index the driver will fill (published or not).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The device's `used.flags`.
    pub fn used_flags(&self) -> u16 {
        u16::from_le(
            self.ring
                .load_u16(self.layout.used_flags(), Ordering::Acquire),
        )
    }

    /// The device's `avail_event` (meaningful with EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        u16::from_le(
            self.ring
                .load_u16(self.layout.avail_event(), Ordering::Acquire),
        )
    }

    /// Whether completions are waiting in the used ring.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    fn complete(&mut self, id: u32, slot: u16) -> Result<(), QueueError> {
        let bad = QueueError::BadUsedId {
            queue: self.index,
            id,
            slot,
        };
        let Some(state) = self.heads.get(id as usize).copied() else {
            return Err(bad);
        };
        let head = id as u16;
        match state {
            HeadState::Free => return Err(bad),
            HeadState::Chain { ndesc } => {
                let mut d = head;
                for _ in 0..ndesc {
                    self.free.push(d);
                    d = self.next[usize::from(d)];
                }
            }
            HeadState::Indirect => self.free.push(head),
            HeadState::Raw => {}
        }
        self.heads[usize::from(head)] = HeadState::Free;
        self.in_flight -= 1;
        self.stats.completions += 1;
        Ok(())
    }

    /// Reaps every completion in the used ring without blocking, appending them to `out`.
    /// Returns how many were reaped.
    ///
    /// An id that is not in flight is an error; the element is consumed, so the next call
    /// continues after it.
    pub fn poll_used(&mut self, out: &mut Vec<Used>) -> Result<usize, QueueError> {
        let used_idx = self.used_idx();
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(0);
        }
        if pending > self.cfg.size {
            return Err(QueueError::UsedIdxRunaway {
                queue: self.index,
                used_idx,
                last_used: self.last_used,
            });
        }
        for _ in 0..pending {
            let slot = self.last_used;
            let off = self.layout.used_elem(slot);
            let id = u32::from_le(self.ring.load_u32(off, Ordering::Relaxed));
            let len = u32::from_le(self.ring.load_u32(off + 4, Ordering::Relaxed));
            self.last_used = slot.wrapping_add(1);
            self.complete(id, slot)?;
            out.push(Used { id, len });
        }
        if self.cfg.event_idx {
            self.apply_notify_mode();
        }
        trace!("queue {}: reaped {pending} completions", self.index);
        Ok(usize::from(pending))
    }

    /// Busy-polls the used ring until at least one completion arrives or `timeout` passes.
    pub fn spin_used(
        &mut self,
        timeout: Duration,
        out: &mut Vec<Used>,
    ) -> Result<usize, QueueError> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let n = self.poll_used(out)?;
            if n > 0 {
                return Ok(n);
            }
            self.stats.empty_polls += 1;
            spins = spins.wrapping_add(1);
            if spins & 1023 == 0 && start.elapsed() >= timeout {
                return Err(self.timeout(start.elapsed()));
            }
            std::hint::spin_loop();
        }
    }

    /// Waits on the call eventfd until at least one completion arrives or `timeout` passes.
    /// In [`NotifyMode::Poll`], notifications are enabled for the duration of the wait.
    pub fn wait_used(
        &mut self,
        timeout: Duration,
        out: &mut Vec<Used>,
    ) -> Result<usize, QueueError> {
        let start = Instant::now();
        loop {
            let n = self.poll_used(out)?;
            if n > 0 {
                return Ok(n);
            }
            self.write_notify_state(NotifyMode::Interrupt);
            // Publish the re-enabled notification before re-checking the used index, or a
            // completion that raced with it could be missed.
            fence(Ordering::SeqCst);
            if self.has_used() {
                self.apply_notify_mode();
                continue;
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                self.apply_notify_mode();
                return Err(self.timeout(start.elapsed()));
            }
            self.stats.interrupt_waits += 1;
            let io = |source| QueueError::EventFd {
                queue: self.index,
                op: "wait for call",
                source,
            };
            let woke = wait_readable_fd(&self.call, Some(left)).map_err(io)?;
            if woke {
                // Non-blocking read resets the counter; EAGAIN means someone else took it.
                let _ = self.call.read();
            }
            self.apply_notify_mode();
        }
    }

    fn timeout(&self, waited: Duration) -> QueueError {
        QueueError::Timeout {
            queue: self.index,
            waited,
            in_flight: self.in_flight,
        }
    }
}
