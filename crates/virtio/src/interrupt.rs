//! The interrupt sink a device signals through.

use std::fmt::Debug;

/// Where a running device signals the driver. The transport implements it (an eventfd per queue
/// and a config-change message for vhost-user); a device receives it at activation and drops it
/// when it gives its queues back.
pub trait Interrupt: Send + Sync + Debug {
    /// Used buffers were published on queue `index` and the driver wants to know.
    fn signal_queue(&self, index: u16);

    /// The device configuration space changed.
    fn signal_config(&self);

    /// The device hit an error it cannot recover from (a corrupt ring, a broken backend): the
    /// framework sets DEVICE_NEEDS_RESET and tells the driver.
    fn signal_needs_reset(&self);
}
