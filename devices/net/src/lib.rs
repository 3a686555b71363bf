//! A virtio-net device (VIRTIO 1.2, section 5.1) for the `outboard-virtio` device API.
//!
//! [`Net::new`] takes a [`NetConfig`] and a packet backend ([`backend::PacketBackend`]: a TAP
//! interface or a port of the in-process [`backend::switch::Switch`]). Queues are laid out as
//! the spec says: `receiveq1, transmitq1, …, receiveqN, transmitqN, controlq`. At activation
//! each queue pair present runs on its own worker thread
//! ([`outboard_virtio::worker::QueueWorker`]) with its backend queue, and the control queue on
//! one more.
//!
//! Everything the driver sends is parsed at the trust boundary: transmit chains and their
//! `virtio_net_hdr` ([`hdr`]), control commands ([`ctrl`]). Receive filtering (the receive
//! modes, MAC and VLAN tables) and the offloads the driver did not negotiate (partial checksums,
//! TCP segmentation, in [`offload`]) are applied in the device, so they hold whatever the
//! backend. Counters ([`NetStatsSnapshot`]) record every packet dropped and why.
//!
//! The device never names a transport.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
mod chain;
mod config;
pub mod ctrl;
pub mod filter;
mod handler;
pub mod hdr;
pub mod offload;
mod rx;
mod shared;
mod state;
mod stats;
mod sys;
#[cfg(test)]
mod testing;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use outboard_virtio::worker::{QueueWorker, WorkerContext};
use outboard_virtio::{Activation, ActiveQueue, DeviceError, DeviceType, VirtioDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use backend::{BackendError, PacketBackend, PacketQueue};
pub use chain::ChainError;
pub use config::{
    MacAddress, MacParseError, Negotiated, NetConfig, Offloads, DEFAULT_MAC, MAX_QUEUE_PAIRS,
    MIN_MTU,
};
pub use state::{NetState, StateError};
pub use stats::NetStatsSnapshot;

use config::{ConfigSpace, DeviceSpec, CONFIG_SIZE, STATUS_ANNOUNCE, STATUS_LINK_UP};
use ctrl::handler::CtrlHandler;
use handler::{handler_poller, PairHandler, PairSetup, QueueSlot};
use shared::{RxState, Shared};

/// Why a device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A configuration field is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The packet backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A virtio-net device. See the crate documentation.
#[derive(Debug)]
pub struct Net {
    spec: DeviceSpec,
    backend_name: String,
    shared: Arc<Shared>,
    /// One backend queue per pair, in its slot while no worker runs it.
    slots: Vec<QueueSlot>,
    queue_sizes: Vec<u16>,
    negotiated: Negotiated,
    workers: Vec<QueueWorker>,
    /// State was loaded: ask the driver to announce itself once it runs.
    announce_pending: bool,
    /// How long queue-pair workers busy-poll ([`NetConfig::poll`]).
    poll: Duration,
}

/// A handle on a device's link and counters that stays usable while the transport owns the
/// device.
#[derive(Clone, Debug)]
pub struct NetControl {
    shared: Arc<Shared>,
}

impl NetControl {
    /// Sets the link up or down (`VIRTIO_NET_S_LINK_UP`), telling the driver.
    pub fn set_link_up(&self, up: bool) {
        if up {
            self.shared.update_status(STATUS_LINK_UP, 0);
        } else {
            self.shared.update_status(0, STATUS_LINK_UP);
        }
    }

    /// Asks the driver to announce itself (gratuitous ARP and the like; `VIRTIO_NET_S_ANNOUNCE`),
    /// e.g. after the guest moved. The driver acknowledges with `VIRTIO_NET_CTRL_ANNOUNCE_ACK`.
    pub fn announce(&self) {
        self.shared.request_announce();
    }

    /// The counters.
    pub fn stats(&self) -> NetStatsSnapshot {
        self.shared.stats()
    }
}

impl Net {
    /// Validates `config` against `backend` (which must have one queue per queue pair) and
    /// makes the device.
    pub fn new(config: NetConfig, backend: Box<dyn PacketBackend>) -> Result<Self, NetError> {
        let backend_name = backend.name();
        let offloads = backend.offloads();
        let queues = backend.into_queues();
        let spec = DeviceSpec::new(&config, queues.len() as u16, offloads)?;
        let slots = queues
            .into_iter()
            .map(|q| Arc::new(Mutex::new(Some(q))))
            .collect();
        log::info!(
            "virtio-net on {backend_name}: MAC {}, {} queue pair(s) of {}, MTU {}{}",
            spec.mac,
            spec.pairs,
            spec.queue_size,
            spec.mtu,
            if offloads { ", offloads" } else { "" }
        );
        Ok(Net {
            queue_sizes: vec![spec.queue_size; spec.num_queues()],
            shared: Arc::new(Shared::new(&spec)),
            spec,
            backend_name,
            slots,
            negotiated: Negotiated::default(),
            workers: Vec::new(),
            announce_pending: false,
            poll: config.poll,
        })
    }

    /// A handle on the link and counters.
    pub fn control(&self) -> NetControl {
        NetControl {
            shared: self.shared.clone(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> NetStatsSnapshot {
        self.shared.stats()
    }

    /// The state `save_state` would write.
    pub fn state(&self) -> NetState {
        let rx = self.shared.rx();
        NetState {
            config_mac: self.spec.mac,
            mtu: self.spec.mtu,
            max_pairs: self.spec.pairs,
            mac: rx.filter.mac,
            status: self.shared.status(),
            mode: rx.filter.mode,
            pairs: rx.pairs,
            table: rx.filter.table.clone(),
            vlans: rx.filter.vlans.clone(),
        }
    }

    fn config_space(&self) -> ConfigSpace {
        ConfigSpace {
            mac: self.shared.rx().filter.mac,
            status: self.shared.status(),
            max_virtqueue_pairs: self.spec.pairs,
            mtu: self.spec.mtu,
        }
    }

    fn slot_queue(&self, pair: usize) -> Option<Box<dyn PacketQueue>> {
        self.slots[pair]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn spawn_pair(
        &mut self,
        pair: usize,
        group: Vec<ActiveQueue>,
        negotiated: Negotiated,
        serves: bool,
        ctx: &WorkerContext,
    ) -> Result<Option<EventFd>, DeviceError> {
        let io = |context: String| move |source| DeviceError::Io { context, source };
        // Everything that can fail is made before the backend queue leaves its slot.
        let wake = EventFd::new(EFD_NONBLOCK).map_err(io(format!("eventfd for pair {pair}")))?;
        let waker = wake
            .try_clone()
            .map_err(io(format!("eventfd for pair {pair}")))?;
        let poller = handler_poller(&wake).map_err(io(format!("epoll for pair {pair}")))?;
        let Some(mut queue) = self.slot_queue(pair) else {
            return Err(DeviceError::Activate {
                reason: format!("the backend queue of pair {pair} was lost"),
            });
        };
        let serves = serves && !group.is_empty();
        let configured = queue
            .set_offloads(negotiated.guest)
            .and_then(|()| queue.set_enabled(serves));
        if let Err(e) = configured {
            *self.slots[pair]
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(queue);
            return Err(DeviceError::Activate {
                reason: format!("queue pair {pair}: {e}"),
            });
        }
        if group.is_empty() {
            *self.slots[pair]
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(queue);
            return Ok(None);
        }
        let has_rx = group.iter().any(|q| q.index() == pair as u16 * 2);
        // From here the handler owns the backend queue and gives it back when dropped, also
        // when the worker cannot start.
        let handler = PairHandler::new(PairSetup {
            pair: pair as u16,
            shared: self.shared.clone(),
            negotiated,
            max_frame: self.spec.max_frame(),
            queue,
            home: self.slots[pair].clone(),
            poller,
            wake,
            enabled: serves,
            has_rx,
        });
        let worker = QueueWorker::spawn(format!("net-pair-{pair}"), group, handler, ctx.clone())
            .map_err(io(format!("starting the worker of pair {pair}")))?;
        self.workers.push(worker);
        Ok(Some(waker))
    }

    fn start(&mut self, activation: Activation) -> Result<(), DeviceError> {
        let Activation {
            features,
            memory,
            queues,
            interrupt,
        } = activation;
        let negotiated = Negotiated::from_features(features);
        let ctrl_index = self.spec.ctrl_queue();
        let mut pairs: Vec<Vec<ActiveQueue>> = (0..self.spec.pairs).map(|_| Vec::new()).collect();
        let mut ctrl = None;
        for q in queues {
            match q.index() {
                i if i == ctrl_index => ctrl = Some(q),
                i => pairs[usize::from(i / 2)].push(q),
            }
        }
        let serving: Vec<bool> = {
            let mut rx = self.shared.rx_mut();
            rx.limit_pairs = negotiated.mq && ctrl.is_some();
            rx.filter.vlan_filtering = negotiated.ctrl_vlan;
            (0..self.spec.pairs).map(|p| rx.serves(p)).collect()
        };
        let ctx = WorkerContext {
            memory,
            interrupt: interrupt.clone(),
            poll: self.poll,
        };
        let mut wakers = Vec::new();
        for (pair, group) in pairs.into_iter().enumerate() {
            if let Some(w) = self.spawn_pair(pair, group, negotiated, serving[pair], &ctx)? {
                wakers.push(w);
            }
        }
        if let Some(q) = ctrl {
            // Control commands are rare: that worker sleeps between them.
            let ctx = WorkerContext {
                poll: Duration::ZERO,
                ..ctx
            };
            let handler = CtrlHandler::new(self.shared.clone(), negotiated, self.spec.pairs);
            let worker =
                QueueWorker::spawn("net-ctrl".into(), vec![q], handler, ctx).map_err(|source| {
                    DeviceError::Io {
                        context: "starting the control queue worker".into(),
                        source,
                    }
                })?;
            self.workers.push(worker);
        }
        self.shared.set_wakers(wakers);
        self.shared.set_interrupt(Some(interrupt));
        if std::mem::take(&mut self.announce_pending) && negotiated.announce {
            self.shared.request_announce();
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> DeviceType {
        DeviceType::Net
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.spec.features()
    }

    fn check_features(&self, features: u64) -> Result<(), DeviceError> {
        match config::feature_dependency_violation(features) {
            None => Ok(()),
            Some(reason) => Err(DeviceError::FeaturesRefused { reason }),
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.negotiated = Negotiated::from_features(features);
        self.shared.rx_mut().filter.vlan_filtering = self.negotiated.ctrl_vlan;
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let space = self.config_space().to_bytes();
        let bytes = offset
            .checked_add(data.len())
            .and_then(|end| space.get(offset..end));
        match bytes {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), DeviceError> {
        // Every field is read-only for a VERSION_1 driver.
        Err(DeviceError::ConfigWrite {
            offset,
            len: data.len(),
        })
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        if !self.workers.is_empty() {
            return Err(DeviceError::Activate {
                reason: "the device is already running".into(),
            });
        }
        let result = self.start(activation);
        if result.is_err() {
            drop(self.quiesce());
        }
        result
    }

    fn quiesce(&mut self) -> Vec<ActiveQueue> {
        let mut queues: Vec<ActiveQueue> =
            self.workers.drain(..).flat_map(QueueWorker::stop).collect();
        self.shared.set_wakers(Vec::new());
        self.shared.set_interrupt(None);
        queues.sort_by_key(ActiveQueue::index);
        queues
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        drop(self.quiesce());
        *self.shared.rx_mut() = RxState::new(&self.spec);
        self.shared
            .set_status(self.shared.status() & !STATUS_ANNOUNCE);
        self.negotiated = Negotiated::default();
        self.announce_pending = false;
        for slot in &self.slots {
            if let Some(q) = slot.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
                if let Err(e) = q.set_enabled(false) {
                    log::warn!("virtio-net on {}: {e}", self.backend_name);
                }
            }
        }
        let stats = self.shared.stats();
        if stats != NetStatsSnapshot::default() {
            log::info!(
                "virtio-net on {}: reset; counters: {stats}",
                self.backend_name
            );
        }
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        Ok(self.state().encode())
    }

    fn load_state(&mut self, blob: &[u8]) -> Result<(), DeviceError> {
        let refused = |e: StateError| DeviceError::State {
            reason: e.to_string(),
        };
        let saved = NetState::decode(blob).map_err(refused)?;
        saved.check_matches(&self.state()).map_err(refused)?;
        {
            let mut rx = self.shared.rx_mut();
            rx.filter.mac = saved.mac;
            rx.filter.mode = saved.mode;
            rx.filter.table = saved.table;
            rx.filter.vlans = saved.vlans;
            rx.pairs = saved.pairs;
        }
        self.shared.set_status(saved.status & !STATUS_ANNOUNCE);
        self.announce_pending = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
