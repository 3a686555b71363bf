//! The generic VIRTIO machinery every device gets: feature negotiation, the status state
//! machine, queue configuration, and when to activate, quiesce and reset the device.
//!
//! A transport translates its messages into calls on a [`Framework`]; the framework decides when
//! the device runs. The rule is one and simple: the device runs with exactly the queues that are
//! started (have a kick), enabled, given their addresses and valid, once guest memory and features
//! are set (and, where the transport says so, once the driver has set DRIVER_OK). Any change to a
//! queue the device is using goes through quiesce → change → activate, so a device never sees a
//! queue change under it and no request is ever half done when the change happens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use crate::features::{self, FeatureError, VIRTIO_F_RING_EVENT_IDX};
use crate::inflight::InflightSource;
use crate::queue::QueueConfig;
use crate::state::{FrameworkState, QueueState, SavedState, StateError};
use crate::status::{self, StatusChange, StatusError};
use crate::VirtioDevice;
use crate::{Activation, ActiveQueue, DeviceError, DeviceType, GuestMemoryHandle, Interrupt};

/// Why a queue setting was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueConfigError {
    /// The size is zero, not a power of two, or larger than the device allows.
    #[error("queue size {size} is invalid (maximum {max}, must be a power of two)")]
    InvalidSize {
        /// The size asked for.
        size: u32,
        /// The device's maximum.
        max: u16,
    },
    /// The queue index is beyond the device's queues.
    #[error("queue {index} does not exist (the device has {count})")]
    NoSuchQueue {
        /// The index asked for.
        index: u32,
        /// How many queues there are.
        count: usize,
    },
}

/// Errors of the framework, reported to the transport.
#[derive(Debug, thiserror::Error)]
pub enum FrameworkError {
    /// Feature negotiation failed.
    #[error(transparent)]
    Features(#[from] FeatureError),
    /// Features may not change once the driver has set FEATURES_OK or DRIVER_OK.
    #[error("features cannot change after FEATURES_OK (status {status:#x})")]
    FeaturesLocked {
        /// The current status.
        status: u8,
    },
    /// The status write was refused.
    #[error(transparent)]
    Status(#[from] StatusError),
    /// FEATURES_OK or DRIVER_OK before the driver set any features.
    #[error("status {status:#x} needs features, and none were set")]
    NoFeatures {
        /// The status written.
        status: u8,
    },
    /// A queue setting was refused.
    #[error(transparent)]
    Queue(#[from] QueueConfigError),
    /// A configuration-space access outside the device's configuration space.
    #[error("configuration access of {len} bytes at offset {offset} is outside the {size}-byte configuration space")]
    ConfigRange {
        /// The offset.
        offset: usize,
        /// The length.
        len: usize,
        /// The size of the configuration space.
        size: usize,
    },
    /// The device refused.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A saved state was refused.
    #[error(transparent)]
    State(#[from] StateError),
}

#[derive(Debug)]
struct QueueSlot {
    config: QueueConfig,
    kick: Option<EventFd>,
    enabled: bool,
    /// The driver has set the ring addresses. Until it has, the addresses in `config` are the
    /// reset value 0, which is a valid GPA: a queue started then would read the driver's memory
    /// at GPA 0 as rings and write a used ring there.
    addressed: bool,
}

impl QueueSlot {
    fn new(max_size: u16) -> Self {
        QueueSlot {
            config: QueueConfig::new(max_size),
            kick: None,
            enabled: false,
            addressed: false,
        }
    }
}

/// One queue as the driver left it (see [`Framework::queue_setup`]).
#[derive(Clone, Copy, Debug)]
pub struct QueueSetup<'a> {
    /// Size, ring addresses and position.
    pub config: &'a QueueConfig,
    /// The driver's doorbell, once the queue is started.
    pub kick: Option<&'a EventFd>,
    /// Whether the queue is enabled.
    pub enabled: bool,
    /// Whether the driver has set the ring addresses.
    pub addressed: bool,
}

/// Wraps the transport's interrupt sink to record DEVICE_NEEDS_RESET.
#[derive(Debug)]
struct FrameworkInterrupt {
    inner: Arc<dyn Interrupt>,
    needs_reset: AtomicBool,
}

impl Interrupt for FrameworkInterrupt {
    fn signal_queue(&self, index: u16) {
        self.inner.signal_queue(index)
    }

    fn signal_config(&self) {
        self.inner.signal_config()
    }

    fn signal_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            log::warn!("device needs reset");
            self.inner.signal_needs_reset();
        }
    }
}

/// A device and the generic VIRTIO state around it.
pub struct Framework {
    device: Box<dyn VirtioDevice>,
    offered: u64,
    acked: Option<u64>,
    status: u8,
    queues: Vec<QueueSlot>,
    memory: Option<GuestMemoryHandle>,
    interrupt: Arc<FrameworkInterrupt>,
    running: bool,
    start_on_driver_ok: bool,
    inflight: Option<Arc<dyn InflightSource>>,
}

impl std::fmt::Debug for Framework {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framework")
            .field("device_type", &self.device.device_type())
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("acked", &self.acked)
            .field("status", &self.status)
            .field("queues", &self.queues)
            .field("running", &self.running)
            .finish()
    }
}

impl Framework {
    /// Wraps `device`; `interrupt` is the transport's sink, handed to the device at activation.
    pub fn new(device: Box<dyn VirtioDevice>, interrupt: Arc<dyn Interrupt>) -> Self {
        let offered = device.device_features() | features::FRAMEWORK_FEATURES;
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueSlot::new(m))
            .collect();
        Framework {
            device,
            offered,
            acked: None,
            status: 0,
            queues,
            memory: None,
            interrupt: Arc::new(FrameworkInterrupt {
                inner: interrupt,
                needs_reset: AtomicBool::new(false),
            }),
            running: false,
            start_on_driver_ok: false,
            inflight: None,
        }
    }

    /// Sets (or removes) where queues record their chains in flight. Queues that run now keep
    /// what they had; the record is picked up by every queue started from now on (the transport
    /// sets it before it starts queues: vhost-user's SET_INFLIGHT_FD precedes the kicks).
    pub fn set_inflight(&mut self, source: Option<Arc<dyn InflightSource>>) {
        self.inflight = source;
    }

    /// Whether queues record their chains in flight.
    pub fn has_inflight(&self) -> bool {
        self.inflight.is_some()
    }

    /// Whether the device waits for DRIVER_OK before it runs (the transport carries the status
    /// byte), or runs as soon as its queues are started (a transport without status).
    pub fn set_start_on_driver_ok(&mut self, on: bool) {
        self.start_on_driver_ok = on;
        self.refresh();
    }

    /// The device type.
    pub fn device_type(&self) -> DeviceType {
        self.device.device_type()
    }

    /// The number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The largest size of the biggest queue.
    pub fn max_queue_size(&self) -> u16 {
        self.queues
            .iter()
            .map(|q| q.config.max_size)
            .max()
            .unwrap_or(0)
    }

    /// The features offered to the driver.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The features the driver acknowledged, once it has.
    pub fn acked_features(&self) -> Option<u64> {
        self.acked
    }

    /// Whether the device is running.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The device status byte, including DEVICE_NEEDS_RESET when the device raised it.
    pub fn status(&self) -> u8 {
        let needs_reset = if self.interrupt.needs_reset.load(Ordering::Acquire) {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        };
        self.status | needs_reset
    }

    /// The driver acknowledges `acked` features.
    pub fn set_features(&mut self, acked: u64) -> Result<(), FrameworkError> {
        if self.status & (status::FEATURES_OK | status::DRIVER_OK) != 0 && self.acked != Some(acked)
        {
            return Err(FrameworkError::FeaturesLocked {
                status: self.status,
            });
        }
        let acked = features::negotiate(self.offered, acked)?;
        if self.acked == Some(acked) {
            return Ok(());
        }
        if let Err(e) = self.device.check_features(acked) {
            // No features stand: FEATURES_OK and DRIVER_OK are refused until the driver
            // offers a set the device takes.
            self.pause();
            self.acked = None;
            return Err(e.into());
        }
        self.pause();
        self.device.ack_features(acked);
        self.acked = Some(acked);
        self.refresh();
        Ok(())
    }

    /// The driver writes the status byte.
    pub fn set_status(&mut self, new: u8) -> Result<(), FrameworkError> {
        let change = status::transition(self.status, new, self.acked.is_some())?;
        match change {
            StatusChange::Reset => {
                self.reset();
                return Ok(());
            }
            StatusChange::FeaturesOk | StatusChange::DriverOk if self.acked.is_none() => {
                return Err(FrameworkError::NoFeatures { status: new });
            }
            StatusChange::Failed => {
                self.pause();
            }
            _ => {}
        }
        self.status = new;
        self.refresh();
        Ok(())
    }

    /// Reads device configuration space.
    pub fn read_config(&self, offset: usize, data: &mut [u8]) -> Result<(), FrameworkError> {
        self.check_config_range(offset, data.len())?;
        self.device.read_config(offset, data);
        Ok(())
    }

    /// Writes device configuration space.
    pub fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), FrameworkError> {
        self.check_config_range(offset, data.len())?;
        self.device.write_config(offset, data)?;
        Ok(())
    }

    fn check_config_range(&self, offset: usize, len: usize) -> Result<(), FrameworkError> {
        let size = self.device.config_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(FrameworkError::ConfigRange { offset, len, size }),
        }
    }

    /// Guest memory became available (or was withdrawn). Later changes to the regions are made
    /// through the handle itself and need no call here.
    pub fn set_memory(&mut self, memory: Option<GuestMemoryHandle>) {
        self.pause();
        self.memory = memory;
        self.refresh();
    }

    fn slot(&mut self, index: u32) -> Result<&mut QueueSlot, QueueConfigError> {
        let count = self.queues.len();
        self.queues
            .get_mut(index as usize)
            .ok_or(QueueConfigError::NoSuchQueue { index, count })
    }

    fn check_index(&self, index: u32) -> Result<(), QueueConfigError> {
        if (index as usize) < self.queues.len() {
            Ok(())
        } else {
            Err(QueueConfigError::NoSuchQueue {
                index,
                count: self.queues.len(),
            })
        }
    }

    /// Applies `change` to queue `index` with the device quiesced.
    fn change_queue<T>(
        &mut self,
        index: u32,
        change: impl FnOnce(&mut QueueSlot) -> Result<T, QueueConfigError>,
    ) -> Result<T, QueueConfigError> {
        self.check_index(index)?;
        self.pause();
        let result = change(self.slot(index)?);
        self.refresh();
        result
    }

    /// Sets the size of queue `index`.
    pub fn set_queue_size(&mut self, index: u32, size: u32) -> Result<(), QueueConfigError> {
        self.change_queue(index, |slot| {
            let max = slot.config.max_size;
            if size == 0 || size > u32::from(max) || !size.is_power_of_two() {
                return Err(QueueConfigError::InvalidSize { size, max });
            }
            slot.config.size = size as u16;
            Ok(())
        })
    }

    /// Sets the guest-physical addresses of queue `index`'s rings. They are checked against
    /// guest memory when the queue starts.
    pub fn set_queue_addresses(
        &mut self,
        index: u32,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), QueueConfigError> {
        self.change_queue(index, |slot| {
            slot.config.desc_table = desc_table;
            slot.config.avail_ring = avail_ring;
            slot.config.used_ring = used_ring;
            slot.addressed = true;
            Ok(())
        })
    }

    /// Sets where queue `index` resumes reading the available ring.
    pub fn set_queue_base(&mut self, index: u32, next_avail: u16) -> Result<(), QueueConfigError> {
        self.change_queue(index, |slot| {
            slot.config.next_avail = next_avail;
            Ok(())
        })
    }

    /// Starts queue `index` with the driver's doorbell.
    pub fn start_queue(&mut self, index: u32, kick: EventFd) -> Result<(), QueueConfigError> {
        self.change_queue(index, |slot| {
            slot.kick = Some(kick);
            Ok(())
        })
    }

    /// Enables or disables queue `index`.
    pub fn set_queue_enabled(&mut self, index: u32, enabled: bool) -> Result<(), QueueConfigError> {
        // Enabling an enabled queue changes nothing: no need to pause the device (which waits
        // for every request in flight; frontends enable each ring after starting it).
        if self.slot(index)?.enabled == enabled {
            return Ok(());
        }
        self.change_queue(index, |slot| {
            slot.enabled = enabled;
            Ok(())
        })
    }

    /// Enables every queue (a transport without per-queue enabling).
    pub fn enable_all_queues(&mut self) {
        self.pause();
        for slot in &mut self.queues {
            slot.enabled = true;
        }
        self.refresh();
    }

    /// Stops queue `index` after every request taken from it is complete, and returns the index
    /// of the next available entry the device would have read.
    pub fn stop_queue(&mut self, index: u32) -> Result<u16, QueueConfigError> {
        self.change_queue(index, |slot| {
            slot.kick = None;
            Ok(slot.config.next_avail)
        })
    }

    /// Stops queue `index` like [`Framework::stop_queue`], but the device does not wait for
    /// work it can cancel: cancelled requests stay in the inflight records and are resubmitted
    /// when the queues start again (vhost-user's GET_VRING_BASE_SKIP_DRAIN). Like every queue
    /// change it pauses the whole device, so the other running queues are suspended too and
    /// resubmit their cancelled requests as they restart. Without an inflight record nothing
    /// could bring a cancelled request back, and the queue is drained as `stop_queue` does.
    pub fn suspend_queue(&mut self, index: u32) -> Result<u16, QueueConfigError> {
        self.check_index(index)?;
        if self.inflight.is_some() {
            self.pause_with(true);
        }
        self.stop_queue(index)
    }

    /// Quiesces the device (every request in flight completes) without changing anything else;
    /// the device runs again at the next change that allows it. Used before saving state.
    pub fn quiesce(&mut self) {
        self.pause();
    }

    /// Resumes the device after [`Framework::quiesce`] if its queues allow it.
    pub fn resume(&mut self) {
        self.refresh();
    }

    /// Resets the device and all generic state (status, features, queues). Guest memory stays.
    pub fn reset(&mut self) {
        self.pause();
        self.status = 0;
        self.acked = None;
        self.interrupt.needs_reset.store(false, Ordering::Release);
        for slot in &mut self.queues {
            *slot = QueueSlot::new(slot.config.max_size);
        }
        if let Err(e) = self.device.reset() {
            log::error!("device reset failed: {e}");
            self.interrupt.needs_reset.store(true, Ordering::Release);
        }
    }

    /// Saves the whole state (framework facts and the device's own), with the device quiesced
    /// so that no request is half done; the device runs again afterwards if it may.
    pub fn save_state(&mut self, compat_version: u16) -> Result<SavedState, FrameworkError> {
        self.pause();
        let device = self.device.save_state();
        self.refresh();
        Ok(SavedState {
            device_type: self.device.device_type().id(),
            compat_version,
            framework: FrameworkState {
                acked_features: self.acked.unwrap_or(0),
                status: self.status,
                queues: self
                    .queues
                    .iter()
                    .map(|s| QueueState {
                        size: s.config.size,
                        next_avail: s.config.next_avail,
                        enabled: s.enabled,
                    })
                    .collect(),
            },
            device: device?,
        })
    }

    /// Loads a saved state after checking it against this device: the same device type, an
    /// accepted compat version, the same number of queues, queue sizes this device allows, and
    /// features it offers (and, if the driver here already chose features, the same ones). A
    /// refused state changes nothing. The frontend restores ring positions and status itself;
    /// the saved ones are checked, not applied.
    pub fn load_state(
        &mut self,
        state: &SavedState,
        accepted_compat: &[u16],
    ) -> Result<(), FrameworkError> {
        let expected = self.device.device_type().id();
        if state.device_type != expected {
            return Err(StateError::DeviceType {
                found: state.device_type,
                expected,
            }
            .into());
        }
        if !accepted_compat.contains(&state.compat_version) {
            return Err(StateError::CompatVersion {
                found: state.compat_version,
                accepted: accepted_compat.to_vec(),
            }
            .into());
        }
        let fw = &state.framework;
        if fw.queues.len() != self.queues.len() {
            return Err(StateError::field(
                "queues",
                format!(
                    "the state has {} queues, this device has {}",
                    fw.queues.len(),
                    self.queues.len()
                ),
            )
            .into());
        }
        for (i, (q, slot)) in fw.queues.iter().zip(&self.queues).enumerate() {
            if q.size == 0 || q.size > slot.config.max_size || !q.size.is_power_of_two() {
                return Err(StateError::field(
                    "queue size",
                    format!(
                        "queue {i}: size {} (maximum here {})",
                        q.size, slot.config.max_size
                    ),
                )
                .into());
            }
        }
        let acked = if fw.status & status::FEATURES_OK != 0 || fw.acked_features != 0 {
            let acked = features::negotiate(self.offered, fw.acked_features).map_err(|e| {
                StateError::field("acked features", format!("not offered here: {e}"))
            })?;
            self.device
                .check_features(acked)
                .map_err(|e| StateError::field("acked features", e.to_string()))?;
            if let Some(current) = self.acked {
                if current != acked {
                    return Err(StateError::field(
                        "acked features",
                        format!("saved {acked:#x}, negotiated here {current:#x}"),
                    )
                    .into());
                }
            }
            Some(acked)
        } else {
            None
        };
        self.pause();
        // The device validates its own payload before anything is applied.
        let result = self.device.load_state(&state.device);
        if result.is_ok() {
            if let (Some(acked), None) = (acked, self.acked) {
                self.device.ack_features(acked);
                self.acked = Some(acked);
            }
        }
        self.refresh();
        result.map_err(FrameworkError::from)
    }

    /// The queue configurations (for state saving and diagnostics).
    pub fn queue_configs(&self) -> impl Iterator<Item = &QueueConfig> {
        self.queues.iter().map(|s| &s.config)
    }

    /// How the driver left queue `index`: what another process needs to run it on (live
    /// upgrade). The configuration's `next_avail` is current only while the device is paused.
    pub fn queue_setup(&self, index: usize) -> Option<QueueSetup<'_>> {
        self.queues.get(index).map(|s| QueueSetup {
            config: &s.config,
            kick: s.kick.as_ref(),
            enabled: s.enabled,
            addressed: s.addressed,
        })
    }

    fn pause(&mut self) {
        self.pause_with(false);
    }

    /// Pauses the device: with `suspend`, cancellable work is left to the inflight records.
    fn pause_with(&mut self, suspend: bool) {
        if !self.running {
            return;
        }
        self.running = false;
        let queues = if suspend {
            self.device.suspend()
        } else {
            self.device.quiesce()
        };
        for q in queues {
            let (index, queue, _kick) = q.into_parts();
            if let Some(slot) = self.queues.get_mut(index as usize) {
                slot.config.next_avail = virtio_queue::QueueT::next_avail(&queue);
            }
        }
    }

    fn may_run(&self) -> bool {
        let blocked = status::FAILED | status::DEVICE_NEEDS_RESET;
        self.memory.is_some()
            && self.acked.is_some()
            && self.status() & blocked == 0
            && (!self.start_on_driver_ok || self.status & status::DRIVER_OK != 0)
    }

    /// Activates the device with the queues that are ready, if it may run.
    fn refresh(&mut self) {
        if self.running || !self.may_run() {
            return;
        }
        let (Some(memory), Some(acked)) = (self.memory.clone(), self.acked) else {
            return;
        };
        let event_idx = acked & features::bit(VIRTIO_F_RING_EVENT_IDX) != 0;
        let mem = memory.memory();
        let mut queues = Vec::new();
        for (i, slot) in self.queues.iter().enumerate() {
            // A queue runs once it has a kick, is enabled and has its addresses.
            let (Some(kick), true, true) = (&slot.kick, slot.enabled, slot.addressed) else {
                continue;
            };
            let queue = match slot.config.build(&mem, event_idx) {
                Ok(q) => q,
                Err(e) => {
                    log::error!("queue {i} cannot start: {e} ({:?})", slot.config);
                    self.interrupt.signal_needs_reset();
                    return;
                }
            };
            let kick = match kick.try_clone() {
                Ok(k) => k,
                Err(e) => {
                    log::error!("queue {i}: cannot duplicate the kick eventfd: {e}");
                    self.interrupt.signal_needs_reset();
                    return;
                }
            };
            let index = i as u16;
            let log = self
                .inflight
                .as_ref()
                .and_then(|source| source.queue(index, slot.config.size));
            let active = match log {
                None => ActiveQueue::new(index, queue, kick),
                Some(log) => match ActiveQueue::with_inflight(index, queue, kick, log, &mem) {
                    Ok(q) => q,
                    Err(e) => {
                        log::error!("queue {i}: cannot read the used ring: {e}");
                        self.interrupt.signal_needs_reset();
                        return;
                    }
                },
            };
            queues.push(active);
        }
        drop(mem);
        if queues.is_empty() {
            return;
        }
        let recovered: Vec<u16> = queues
            .iter()
            .filter(|q| q.recovered())
            .map(ActiveQueue::index)
            .collect();
        let activation = Activation {
            features: acked,
            memory,
            queues,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.running = true;
                // A process that died between publishing used entries and signalling them
                // left the driver waiting: one interrupt per recovered queue (a spurious one
                // is harmless).
                for index in recovered {
                    self.interrupt.signal_queue(index);
                }
            }
            Err(e) => {
                log::error!("device activation failed: {e}");
                self.interrupt.signal_needs_reset();
            }
        }
    }
}

impl Drop for Framework {
    fn drop(&mut self) {
        self.pause();
    }
}
