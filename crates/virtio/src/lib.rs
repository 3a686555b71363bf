//! The bus-level VIRTIO device API.
//!
//! A device author implements [`VirtioDevice`]: what the device is (type, queues, features,
//! config space), what it does once the driver has set it up ([`VirtioDevice::activate`] hands it
//! the running queues, the guest memory and the interrupt sink, which it owns until
//! [`VirtioDevice::quiesce`] or [`VirtioDevice::reset`]), and how its state is saved and loaded.
//! Nothing here names a transport: the same device runs behind vhost-user (the
//! `outboard-vhost-user` crate) or any other transport that drives a [`Framework`].
//!
//! The generic VIRTIO machinery lives once, in this crate: feature negotiation
//! ([`features`]), the device-status state machine ([`status`]), queue configuration versus a
//! running queue ([`queue`]), and the [`Framework`] that ties them to a device. Request processing
//! helpers ([`worker`]) run a device's queues on owned threads with notification suppression and
//! optional busy polling.
#![forbid(unsafe_code)]

pub mod chain;
pub mod fault;
pub mod features;
mod framework;
pub mod inflight;
pub mod interrupt;
pub mod queue;
pub mod state;
pub mod status;
pub mod worker;

use std::sync::Arc;

pub use chain::Chain;
pub use framework::{Framework, FrameworkError, QueueConfigError, QueueSetup};
pub use interrupt::Interrupt;
pub use outboard_memory::{GuestMemoryHandle, GuestMemoryMmap};
pub use queue::ActiveQueue;

/// VIRTIO device types (VIRTIO 1.2, section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceType {
    /// Network card.
    Net,
    /// Block device.
    Block,
}

impl DeviceType {
    /// The device ID the spec assigns.
    pub fn id(self) -> u32 {
        match self {
            DeviceType::Net => 1,
            DeviceType::Block => 2,
        }
    }

    /// The name the vhost-user capability schema uses (`"net"`, `"block"`).
    pub fn vhost_user_name(self) -> &'static str {
        match self {
            DeviceType::Net => "net",
            DeviceType::Block => "block",
        }
    }
}

/// What a device is handed when the driver sets DRIVER_OK: everything it needs to run, owned
/// until it is asked to give the queues back.
#[derive(Debug)]
pub struct Activation {
    /// The features the driver acknowledged (a subset of those offered).
    pub features: u64,
    /// Guest memory; take one snapshot per batch of requests.
    pub memory: GuestMemoryHandle,
    /// The queues the driver made ready, in index order. A device may be activated with fewer
    /// queues than it offers (a driver that uses only some of them).
    pub queues: Vec<ActiveQueue>,
    /// Where to signal used buffers, configuration changes and device errors.
    pub interrupt: Arc<dyn Interrupt>,
}

/// Errors a device reports to the framework.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A driver write to a read-only or nonexistent configuration field.
    #[error("configuration write of {len} bytes at offset {offset} is not allowed")]
    ConfigWrite {
        /// Offset into the device-specific configuration space.
        offset: usize,
        /// Length of the write.
        len: usize,
    },
    /// The driver's features do not go together (see `VirtioDevice::check_features`).
    #[error("features refused: {reason}")]
    FeaturesRefused {
        /// What was wrong.
        reason: String,
    },
    /// The device could not start with what it was given.
    #[error("cannot activate the device: {reason}")]
    Activate {
        /// What was wrong.
        reason: String,
    },
    /// A saved state blob was refused.
    #[error("device state refused: {reason}")]
    State {
        /// What was wrong.
        reason: String,
    },
    /// An I/O error in the device's own resources (its storage, its threads).
    #[error("device I/O error: {context}")]
    Io {
        /// What the device was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A VIRTIO device, seen from the bus: the trait a device author implements.
///
/// The framework calls these methods from one thread (the transport's control thread); a device
/// processes its queues on threads of its own (see [`worker`]). Lifecycle:
/// `ack_features` → `activate` → (`quiesce` → `activate`)* → `reset`, and `reset` may come at any
/// point. Between `quiesce` and the next `activate` the device must not touch guest memory.
pub trait VirtioDevice: Send {
    /// The device type.
    fn device_type(&self) -> DeviceType;

    /// The maximum size of each queue; the length of the slice is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The device-specific feature bits offered to the driver. The framework adds the transport
    /// features it implements (VERSION_1, RING_EVENT_IDX, INDIRECT_DESC, …).
    fn device_features(&self) -> u64;

    /// Whether the device accepts the driver's choice of features (a subset of those offered):
    /// a set the device cannot work with (a feature without one it depends on) is refused, and
    /// the driver sees FEATURES_OK fail to stick, as the VIRTIO specification has it. The
    /// default accepts every subset.
    fn check_features(&self, features: u64) -> Result<(), DeviceError> {
        let _ = features;
        Ok(())
    }

    /// The driver's choice of features (always a subset of those offered, and accepted by
    /// `check_features`). Called before `activate`, and again after a reset.
    fn ack_features(&mut self, features: u64);

    /// The size of the device-specific configuration space in bytes.
    fn config_size(&self) -> usize;

    /// Reads configuration space. The framework guarantees `offset + data.len() <= config_size()`.
    fn read_config(&self, offset: usize, data: &mut [u8]);

    /// A driver write to configuration space. The framework guarantees the range is inside
    /// `config_size()`; the device refuses writes to fields the driver may not write.
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), DeviceError>;

    /// Starts the device with the running queues, memory and interrupt sink.
    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError>;

    /// Stops processing and gives the queues back. Every request the device has taken from a
    /// queue is completed (its used entry published) before this returns; afterwards the device
    /// does not touch guest memory or signal interrupts until it is activated again.
    fn quiesce(&mut self) -> Vec<ActiveQueue>;

    /// Stops processing like [`VirtioDevice::quiesce`], but without waiting for work it can
    /// cancel (slow storage I/O): such requests are dropped unanswered and stay in the queues'
    /// inflight records, which hand them to the device again when the queues next start, in
    /// this process or the next. Nothing writes guest memory for them once this returns. The
    /// framework calls it only when every queue has an inflight record. The default cancels
    /// nothing and completes every request, as `quiesce` does (always allowed: a suspended
    /// request may also be one that finished).
    fn suspend(&mut self) -> Vec<ActiveQueue> {
        self.quiesce()
    }

    /// Returns the device to its initial state (the queues, if any, are dropped). A device that
    /// cannot reset returns an error and the framework reports DEVICE_NEEDS_RESET to the driver.
    fn reset(&mut self) -> Result<(), DeviceError>;

    /// Serialises the device-specific state (spec-level facts only). Called while quiesced.
    fn save_state(&self) -> Result<Vec<u8>, DeviceError>;

    /// Restores state written by `save_state`, validating every field again and refusing a state
    /// that does not match this device's configuration. Called before activation.
    fn load_state(&mut self, state: &[u8]) -> Result<(), DeviceError>;
}
