//! What the control thread, the control-queue worker and the queue-pair workers of one device
//! share: the receive state (filter and active pairs) behind a reader-writer lock, the link
//! status, the interrupt sink while the device runs, and the counters.
//!
//! The receive state is read-locked by a pair worker for each batch of received packets and
//! write-locked by the control queue to change it, so that once a command's ack is in the used
//! ring no packet is delivered under the old filter or to a queue pair that is no longer active.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use outboard_virtio::Interrupt;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DeviceSpec, STATUS_ANNOUNCE, STATUS_LINK_UP};
use crate::filter::RxFilter;
use crate::stats::{NetStats, NetStatsSnapshot};

/// The receive side's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RxState {
    /// What the driver wants to receive.
    pub filter: RxFilter,
    /// The queue pairs chosen with `VQ_PAIRS_SET` (1 after a reset).
    pub pairs: u16,
    /// Whether `pairs` applies: the driver negotiated MQ and runs the control queue in this
    /// device. A frontend that keeps the control queue to itself (QEMU, DPDK) chooses pairs by
    /// enabling their rings, and every pair it started is served.
    pub limit_pairs: bool,
}

impl RxState {
    pub fn new(spec: &DeviceSpec) -> Self {
        RxState {
            filter: RxFilter::new(spec.mac),
            pairs: 1,
            limit_pairs: false,
        }
    }

    /// Whether queue pair `pair` may receive.
    pub fn serves(&self, pair: u16) -> bool {
        !self.limit_pairs || pair < self.pairs
    }
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Shared {
    rx: RwLock<RxState>,
    /// The configuration space's status field.
    status: AtomicU16,
    /// The interrupt sink while the device runs.
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    /// The configuration changed while no interrupt sink was there to say so.
    config_dirty: AtomicBool,
    /// Wakes each running pair worker to look at the receive state again.
    wakers: Mutex<Vec<EventFd>>,
    /// The counters.
    pub stats: NetStats,
}

impl Shared {
    pub fn new(spec: &DeviceSpec) -> Self {
        Shared {
            rx: RwLock::new(RxState::new(spec)),
            status: AtomicU16::new(if spec.link_up { STATUS_LINK_UP } else { 0 }),
            interrupt: Mutex::new(None),
            config_dirty: AtomicBool::new(false),
            wakers: Mutex::new(Vec::new()),
            stats: NetStats::default(),
        }
    }

    /// Reads the receive state (a lock poisoned by a panicking worker still holds valid data:
    /// every change is a single assignment).
    pub fn rx(&self) -> RwLockReadGuard<'_, RxState> {
        self.rx.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the receive state.
    pub fn rx_mut(&self) -> RwLockWriteGuard<'_, RxState> {
        self.rx.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The status field.
    pub fn status(&self) -> u16 {
        self.status.load(Ordering::Acquire)
    }

    /// Sets or clears status bits and tells the driver if the field changed.
    pub fn update_status(&self, set: u16, clear: u16) {
        let mut current = self.status();
        loop {
            let new = (current | set) & !clear;
            if new == current {
                return;
            }
            match self
                .status
                .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.signal_config();
    }

    /// Restores the status field (loading state); no notification.
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Release);
    }

    /// Asks the driver to announce itself (`VIRTIO_NET_S_ANNOUNCE`).
    pub fn request_announce(&self) {
        self.update_status(STATUS_ANNOUNCE, 0);
    }

    /// Tells the driver the configuration changed, now if the device runs, else at activation.
    pub fn signal_config(&self) {
        let interrupt = self
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match interrupt.as_ref() {
            Some(i) => i.signal_config(),
            None => self.config_dirty.store(true, Ordering::Release),
        }
    }

    /// The device starts with `interrupt` (or stops, with `None`). A configuration change that
    /// happened while it was stopped is signalled now.
    pub fn set_interrupt(&self, interrupt: Option<Arc<dyn Interrupt>>) {
        let mut slot = self
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *slot = interrupt;
        if let Some(i) = slot.as_ref() {
            if self.config_dirty.swap(false, Ordering::AcqRel) {
                i.signal_config();
            }
        }
    }

    /// Replaces the pair workers' wake-up eventfds.
    pub fn set_wakers(&self, wakers: Vec<EventFd>) {
        *self.wakers.lock().unwrap_or_else(PoisonError::into_inner) = wakers;
    }

    /// Wakes every pair worker to look at the receive state again.
    pub fn wake_workers(&self) {
        for w in self
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            if let Err(e) = w.write(1) {
                log::error!("virtio-net: cannot wake a queue worker: {e}");
            }
        }
    }

    /// The counters now.
    pub fn stats(&self) -> NetStatsSnapshot {
        self.stats.snapshot()
    }
}
