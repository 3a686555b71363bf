//! The worker of one queue pair: transmits what the driver puts in the transmit queue and
//! delivers what the packet backend receives into the receive queue.
//!
//! Transmit chains are parsed at the trust boundary (chain structure, size, `virtio_net_hdr`)
//! and copied out whole before their used entry is published, so a quiesce never finds one half
//! done. Received packets are validated, filtered, fixed up for the offloads the driver did not
//! negotiate, and placed all or nothing.
//!
//! The worker's completion fd is a small epoll set of the handler's own, holding a wake-up
//! eventfd and, while the driver has receive buffers, the backend's ready fd: when the buffers
//! run out the backend fd is taken out of the set (the worker stops polling the TAP) until the
//! driver kicks the receive queue.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use outboard_virtio::worker::QueueHandler;
use outboard_virtio::{ActiveQueue, Chain, GuestMemoryMmap, Interrupt};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{PacketQueue, MAX_SPARES, SEND_BATCH};
use crate::chain::{read_all, ChainBuffers};
use crate::config::{Negotiated, Offloads, ETH_HLEN, MAX_GSO_PAYLOAD, VLAN_HLEN};
use crate::filter::RxFilter;
use crate::hdr::{GsoKind, NetHdr, VirtioNetHdr, HDR_LEN};
use crate::offload::{complete_checksum, segment};
use crate::rx::{place, PlaceScratch, Placement};
use crate::shared::Shared;
use crate::stats::{add, inc};

/// Where a pair's backend queue lives while no worker runs it.
pub(crate) type QueueSlot = Arc<Mutex<Option<Box<dyn PacketQueue>>>>;

/// Packets delivered per call before the worker looks at its other events again.
const RX_BATCH: usize = 256;
/// Transmitted packets handed to the backend at once.
const TX_BATCH: usize = SEND_BATCH;
/// Transmit chains taken per turn. A driver that transmits as fast as the worker takes would
/// otherwise keep it in the transmit queue for good, and the pair would receive nothing: past
/// the budget the worker receives a batch first and then comes back for the rest.
#[cfg(not(test))]
const TX_BUDGET: usize = 256;
/// Small enough for the mock driver's rings (at most 128 two-descriptor chains) to hold several
/// turns' worth.
#[cfg(test)]
const TX_BUDGET: usize = 32;
/// Receive batches delivered at most while the pair stops (see `drain`).
const DRAIN_ROUNDS: usize = 16;
/// The largest frame with GSO: a 64 KiB IP packet behind an Ethernet header and a VLAN tag.
const MAX_GSO_FRAME: usize = ETH_HLEN + VLAN_HLEN + MAX_GSO_PAYLOAD;
/// Every offload a backend may hand over; what the driver did not negotiate is undone here.
const ANY_OFFLOAD: Offloads = Offloads {
    csum: true,
    tso4: true,
    tso6: true,
    ecn: true,
};

const TOKEN_WAKE: u64 = 0;
const TOKEN_BACKEND: u64 = 1;

/// What a pair worker is given.
#[derive(Debug)]
pub(crate) struct PairSetup {
    pub pair: u16,
    pub shared: Arc<Shared>,
    pub negotiated: Negotiated,
    /// The largest frame without GSO.
    pub max_frame: usize,
    pub queue: Box<dyn PacketQueue>,
    pub home: QueueSlot,
    /// The handler's epoll set, holding `wake` already.
    pub poller: Epoll,
    pub wake: EventFd,
    /// Whether the backend queue is enabled now.
    pub enabled: bool,
    /// Whether the receive queue is among the worker's queues.
    pub has_rx: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct PairHandler {
    pair: u16,
    shared: Arc<Shared>,
    negotiated: Negotiated,
    max_frame: usize,
    queue: Option<Box<dyn PacketQueue>>,
    home: QueueSlot,
    poller: Epoll,
    wake: EventFd,
    has_rx: bool,
    enabled: bool,
    armed: bool,
    /// The driver had no receive buffers; set until it kicks the receive queue.
    starved: bool,
    /// The backend failed to receive; set until the next receive kick.
    backend_failed: bool,
    /// The receive ring is corrupt; the device needs a reset.
    rx_broken: bool,
    /// The transmit queue had more than [`TX_BUDGET`] chains at the last turn: the rest is taken
    /// at the next wake-up, with the driver's notifications still off.
    tx_backlog: bool,
    /// The backlog waits for room in the backend, which wakes the worker then.
    tx_blocked: bool,
    /// Received packets ready for the driver (more than one only after segmentation).
    pending: VecDeque<Vec<u8>>,
    incoming: Vec<u8>,
    segments: Vec<Vec<u8>>,
    tx_batch: Vec<Vec<u8>>,
    /// The heads of the transmit chains taken since the last completion, answered once their
    /// frames went to the backend.
    tx_heads: Vec<u16>,
    /// Empty buffers for the next transmitted packets (from [`PacketQueue::reclaim`]).
    tx_spares: Vec<Vec<u8>>,
    /// The buffers of the transmit chain being read.
    tx_walk: ChainBuffers,
    rx_scratch: PlaceScratch,
}

/// The epoll set of a pair handler, with `wake` in it.
pub(crate) fn handler_poller(wake: &EventFd) -> std::io::Result<Epoll> {
    let poller = Epoll::new()?;
    poller.ctl(
        ControlOperation::Add,
        wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_WAKE),
    )?;
    Ok(poller)
}

impl PairHandler {
    pub fn new(mut setup: PairSetup) -> Self {
        // The backend wakes the worker through its own eventfd when there is room again.
        match setup.wake.try_clone() {
            Ok(w) => setup.queue.set_space_waker(w),
            Err(e) => log::warn!(
                "virtio-net: pair {}: no backpressure (cannot clone the wake-up eventfd: {e})",
                setup.pair
            ),
        }
        PairHandler {
            pair: setup.pair,
            shared: setup.shared,
            negotiated: setup.negotiated,
            max_frame: setup.max_frame,
            queue: Some(setup.queue),
            home: setup.home,
            poller: setup.poller,
            wake: setup.wake,
            has_rx: setup.has_rx,
            enabled: setup.enabled,
            armed: false,
            starved: false,
            backend_failed: false,
            rx_broken: false,
            tx_backlog: false,
            tx_blocked: false,
            pending: VecDeque::new(),
            incoming: Vec::new(),
            segments: Vec::new(),
            tx_batch: Vec::new(),
            tx_heads: Vec::new(),
            tx_spares: Vec::new(),
            tx_walk: ChainBuffers::default(),
            rx_scratch: PlaceScratch::default(),
        }
    }

    fn rx_index(&self) -> u16 {
        self.pair * 2
    }

    fn tx_index(&self) -> u16 {
        self.pair * 2 + 1
    }

    fn wake_up(&self) {
        if let Err(e) = self.wake.write(1) {
            log::error!(
                "virtio-net: pair {}: cannot wake the worker: {e}",
                self.pair
            );
        }
    }

    fn backend(&mut self) -> &mut dyn PacketQueue {
        self.queue
            .as_deref_mut()
            .expect("the backend queue is present while the worker runs")
    }

    /// Polls the backend's ready fd exactly while the pair receives and the driver has buffers.
    fn update_arm(&mut self) {
        let want =
            self.has_rx && self.enabled && !self.starved && !self.backend_failed && !self.rx_broken;
        if want == self.armed {
            return;
        }
        let fd = self.backend().ready_fd();
        let result = if want {
            self.poller.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_BACKEND),
            )
        } else {
            self.poller
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        match result {
            Ok(()) => self.armed = want,
            Err(e) => log::error!(
                "virtio-net: pair {}: cannot (un)watch the backend: {e}",
                self.pair
            ),
        }
    }

    /// Follows the receive state: enables or disables the backend queue.
    fn sync_enabled(&mut self, serves: bool) {
        if serves == self.enabled {
            return;
        }
        if let Err(e) = self.backend().set_enabled(serves) {
            log::error!("virtio-net: pair {}: {e}", self.pair);
        }
        self.enabled = serves;
        if !serves {
            self.drop_pending();
        }
    }

    fn drop_pending(&mut self) {
        add(&self.shared.stats.rx_dropped, self.pending.len() as u64);
        self.pending.clear();
    }

    /// Reads one packet from the backend and queues what the driver should get of it.
    /// Returns false when the backend had nothing (or failed).
    fn fetch(&mut self, filter: &RxFilter) -> bool {
        let mut incoming = std::mem::take(&mut self.incoming);
        let got = self.backend().recv(&mut incoming);
        let result = match got {
            Ok(true) => {
                self.ingest(incoming, filter);
                true
            }
            Ok(false) => {
                self.incoming = incoming;
                false
            }
            Err(e) => {
                self.incoming = incoming;
                inc(&self.shared.stats.rx_backend_errors);
                log::warn!(
                    "virtio-net: pair {}: {e}; receiving again after the next kick",
                    self.pair
                );
                self.backend_failed = true;
                false
            }
        };
        self.update_arm();
        result
    }

    /// Validates a received packet, and completes the offloads the driver did not negotiate.
    fn ingest(&mut self, mut packet: Vec<u8>, filter: &RxFilter) {
        let stats = &self.shared.stats;
        if packet.len() < HDR_LEN + ETH_HLEN {
            inc(&stats.rx_malformed);
            return;
        }
        let (head, frame) = packet.split_at_mut(HDR_LEN);
        let mut raw = [0u8; HDR_LEN];
        raw.copy_from_slice(head);
        let mut hdr = match NetHdr::parse(
            &VirtioNetHdr::from_bytes(&raw),
            frame.len(),
            ANY_OFFLOAD,
            true,
        ) {
            Ok(h) => h,
            Err(e) => {
                log::debug!(
                    "virtio-net: pair {}: received packet refused: {e}",
                    self.pair
                );
                inc(&stats.rx_malformed);
                return;
            }
        };
        if !filter.accepts(frame) {
            inc(&stats.rx_filtered);
            return;
        }
        let guest = self.negotiated.guest;
        if let Some(gso) = hdr.gso {
            let supported = match gso.kind {
                GsoKind::Tcp4 => guest.tso4,
                GsoKind::Tcp6 => guest.tso6,
            };
            if !supported || (gso.ecn && !guest.ecn) {
                match segment(frame, gso, &mut self.segments) {
                    Ok(()) => {
                        inc(&stats.rx_segmented);
                        self.pending.extend(self.segments.drain(..));
                    }
                    Err(e) => {
                        log::debug!("virtio-net: pair {}: cannot segment: {e}", self.pair);
                        inc(&stats.rx_malformed);
                    }
                }
                return;
            }
        }
        if !guest.csum {
            if let Some(csum) = hdr.csum.take() {
                complete_checksum(frame, csum);
            }
            hdr.data_valid = false;
        }
        packet[..HDR_LEN].copy_from_slice(&hdr.to_wire(0).to_bytes());
        self.pending.push_back(packet);
    }

    /// Delivers received packets while the driver has buffers.
    fn receive(
        &mut self,
        rx: &mut ActiveQueue,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
    ) -> Result<(), virtio_queue::Error> {
        if self.rx_broken {
            return Ok(());
        }
        let shared = self.shared.clone();
        let state = shared.rx();
        self.sync_enabled(state.serves(self.pair));
        if !self.enabled {
            self.update_arm();
            return Ok(());
        }
        if !self.starved {
            rx.queue_mut().disable_notification(mem)?;
        }
        let mut used = 0usize;
        let mut result = Ok(());
        let stats = &shared.stats;
        for _ in 0..RX_BATCH {
            if self.pending.is_empty() {
                if self.starved || !self.fetch(&state.filter) {
                    break;
                }
                continue;
            }
            let Some(packet) = self.pending.front_mut() else {
                break;
            };
            if !state.filter.accepts(&packet[HDR_LEN..]) {
                inc(&stats.rx_filtered);
                self.pending.pop_front();
                continue;
            }
            let frame_len = (packet.len() - HDR_LEN) as u64;
            match place(
                rx,
                mem,
                packet,
                self.negotiated.mrg_rxbuf,
                &mut self.rx_scratch,
            ) {
                Ok(Placement::Placed(_)) => {
                    inc(&stats.rx_packets);
                    add(&stats.rx_bytes, frame_len);
                    // The buffer carries the next packet from the backend (which may hand it
                    // on to a sender).
                    if let Some(spent) = self.pending.pop_front() {
                        if self.incoming.capacity() == 0 {
                            self.incoming = spent;
                        }
                    }
                    used += 1;
                }
                Ok(Placement::NoBuffers) => match rx.queue_mut().enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.starved = true;
                        break;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                },
                Ok(Placement::TooBig) => {
                    inc(&stats.rx_too_big);
                    self.pending.pop_front();
                }
                Ok(Placement::BadBuffers(n)) => {
                    add(&stats.rx_bad_buffers, n.into());
                    self.pending.pop_front();
                    used += 1;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(state);
        if used > 0 {
            rx.notify(mem, interrupt);
        }
        if result.is_err() {
            self.rx_broken = true;
        }
        self.update_arm();
        if !self.starved && !self.pending.is_empty() {
            // More is ready than one batch: come back after the other events.
            self.wake_up();
        }
        result
    }

    /// Reads one transmit chain into a packet for the backend, or drops it (counted).
    fn read_packet(&mut self, chain: Chain<'_>, mem: &GuestMemoryMmap) -> Option<Vec<u8>> {
        let stats = &self.shared.stats;
        let buffers = &mut self.tx_walk;
        if let Err(e) = buffers.walk_into(chain, mem) {
            log::debug!(
                "virtio-net: pair {}: transmit chain refused: {e}",
                self.pair
            );
            inc(&stats.tx_malformed);
            return None;
        }
        let len = buffers.readable_len();
        if len > (HDR_LEN + MAX_GSO_FRAME) as u64 {
            inc(&stats.tx_oversize);
            return None;
        }
        if len < (HDR_LEN + ETH_HLEN) as u64 {
            inc(&stats.tx_malformed);
            return None;
        }
        let mut packet = self.tx_spares.pop().unwrap_or_default();
        if let Err(e) = read_all(mem, &buffers.readable, &mut packet) {
            log::error!(
                "virtio-net: pair {}: cannot read a transmit chain: {e}",
                self.pair
            );
            inc(&stats.tx_malformed);
            self.tx_spares.push(packet);
            return None;
        }
        let mut raw = [0u8; HDR_LEN];
        raw.copy_from_slice(&packet[..HDR_LEN]);
        let frame_len = packet.len() - HDR_LEN;
        let hdr = match NetHdr::parse(
            &VirtioNetHdr::from_bytes(&raw),
            frame_len,
            self.negotiated.host,
            false,
        ) {
            Ok(h) => h,
            Err(e) => {
                log::debug!(
                    "virtio-net: pair {}: transmitted header refused: {e}",
                    self.pair
                );
                inc(&stats.tx_malformed);
                self.tx_spares.push(packet);
                return None;
            }
        };
        if hdr.gso.is_none() && frame_len > self.max_frame {
            inc(&stats.tx_oversize);
            self.tx_spares.push(packet);
            return None;
        }
        packet[..HDR_LEN].copy_from_slice(&hdr.to_wire(0).to_bytes());
        Some(packet)
    }

    /// Hands the batch to the backend, then answers its chains: a chain is answered only once
    /// its frame has left the device (so a crash in between resubmits it instead of losing it).
    fn complete_tx(
        &mut self,
        tx: &mut ActiveQueue,
        mem: &GuestMemoryMmap,
    ) -> Result<(), virtio_queue::Error> {
        self.flush_tx();
        let mut result = Ok(());
        for head in self.tx_heads.drain(..) {
            if let Err(e) = tx.add_used(mem, head, 0) {
                result = result.and(Err(e));
            }
        }
        result
    }

    fn flush_tx(&mut self) {
        if self.tx_batch.is_empty() {
            return;
        }
        let stats = &self.shared.stats;
        add(&stats.tx_packets, self.tx_batch.len() as u64);
        let bytes: usize = self.tx_batch.iter().map(|p| p.len() - HDR_LEN).sum();
        add(&stats.tx_bytes, bytes as u64);
        let mut batch = std::mem::take(&mut self.tx_batch);
        let dropped = self.backend().send(&mut batch);
        self.tx_batch = batch;
        add(&self.shared.stats.tx_backend_dropped, dropped as u64);
        if self.tx_spares.len() < MAX_SPARES {
            let queue = self
                .queue
                .as_deref_mut()
                .expect("the backend queue is present while the worker runs");
            queue.reclaim(&mut self.tx_spares);
        }
    }

    /// Takes up to [`TX_BUDGET`] transmit chains. With more left, the driver's notifications stay
    /// off and the worker wakes itself to go on after a receive batch.
    fn transmit(
        &mut self,
        tx: &mut ActiveQueue,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
    ) -> Result<(), virtio_queue::Error> {
        let mut taken = 0usize;
        let mut result = Ok(());
        self.tx_backlog = false;
        self.tx_blocked = false;
        'turn: loop {
            tx.queue_mut().disable_notification(mem)?;
            loop {
                if taken == TX_BUDGET {
                    self.tx_backlog = true;
                    break 'turn;
                }
                if self.tx_batch.is_empty() && self.backend().congested() {
                    // Nowhere to go: the chains stay in the ring (notifications off) until the
                    // backend has room and wakes the worker, instead of being copied out only
                    // to be dropped.
                    self.tx_backlog = true;
                    self.tx_blocked = true;
                    break 'turn;
                }
                let Some(chain) = tx.pop(mem)? else {
                    break;
                };
                taken += 1;
                self.tx_heads.push(chain.head_index());
                if let Some(packet) = self.read_packet(chain, mem) {
                    self.tx_batch.push(packet);
                }
                if self.tx_heads.len() >= TX_BATCH {
                    if let Err(e) = self.complete_tx(tx, mem) {
                        result = Err(e);
                        break 'turn;
                    }
                }
            }
            if !tx.queue_mut().enable_notification(mem)? {
                break;
            }
        }
        let completed = self.complete_tx(tx, mem);
        result?;
        completed?;
        if taken > 0 {
            tx.notify(mem, interrupt);
        }
        if self.tx_backlog && !self.tx_blocked {
            self.wake_up();
        }
        Ok(())
    }
}

impl QueueHandler for PairHandler {
    fn process_queue(
        &mut self,
        queue: &mut ActiveQueue,
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) -> Result<(), virtio_queue::Error> {
        if queue.index() == self.rx_index() {
            // The driver added receive buffers (or the worker started): receive again.
            self.starved = false;
            self.backend_failed = false;
            self.receive(queue, mem, interrupt)
        } else {
            self.transmit(queue, mem, interrupt)
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.poller.as_raw_fd())
    }

    fn process_completions(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) -> bool {
        // Reading resets the counter; a failure only means no wake-up was pending.
        let _ = self.wake.read();
        if self.tx_backlog {
            let tx_index = self.tx_index();
            if let Some(tx) = queues.iter_mut().find(|q| q.index() == tx_index) {
                if let Err(e) = self.transmit(tx, mem, interrupt) {
                    log::error!("virtio-net: transmit queue {tx_index}: {e}; the queue is stopped until reset");
                    interrupt.signal_needs_reset();
                }
            } else {
                self.tx_backlog = false;
            }
        }
        let rx_index = self.rx_index();
        match queues.iter_mut().find(|q| q.index() == rx_index) {
            Some(rx) => {
                if let Err(e) = self.receive(rx, mem, interrupt) {
                    log::error!("virtio-net: receive queue {rx_index}: {e}; the queue is stopped until reset");
                    interrupt.signal_needs_reset();
                }
            }
            None => {
                let serves = self.shared.rx().serves(self.pair);
                self.sync_enabled(serves);
            }
        }
        true
    }

    fn drain(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) {
        // Transmit chains complete before `process_queue` returns. Packets the backend holds
        // for this pair were accepted by a sender (a switch port's transmit ring): they go into
        // the receive buffers the driver posted before the queue stops, so that a stop (a
        // migration) loses none the driver had room for. What is left when the buffers run out
        // is dropped, as it would be without the stop.
        let rx_index = self.rx_index();
        if let Some(rx) = queues.iter_mut().find(|q| q.index() == rx_index) {
            // The driver may have posted buffers whose kick the stop overtook: look again.
            self.starved = false;
            // Bounded: a backend that never runs dry (a busy TAP) cannot hold the stop up.
            for _ in 0..DRAIN_ROUNDS {
                if let Err(e) = self.receive(rx, mem, interrupt) {
                    log::error!("virtio-net: receive queue {rx_index} while stopping: {e}");
                    break;
                }
                if self.starved || self.rx_broken || !self.enabled {
                    break;
                }
                if self.pending.is_empty() {
                    let shared = self.shared.clone();
                    let state = shared.rx();
                    if !self.fetch(&state.filter) {
                        break;
                    }
                }
            }
        }
        self.drop_pending();
    }
}

impl Drop for PairHandler {
    fn drop(&mut self) {
        let mut home = self.home.lock().unwrap_or_else(PoisonError::into_inner);
        *home = self.queue.take();
    }
}
