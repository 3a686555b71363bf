//! The layers every Outboard vhost-user backend shares. A device's layer is declared by its
//! program (`bins/vhost-user-blk` declares virtio-blk's), so that a device crate needs no
//! seccomp knowledge and this crate names no device.

mod common;
mod transport;

pub use common::common;
pub use transport::{program, vhost_user, virtio, ProgramOptions};

use crate::policy::{Layer, Policy, PolicyError};

/// The policy of a vhost-user backend process: the common runtime, the program conventions,
/// the VIRTIO framework, the vhost-user transport and `device`'s layer.
pub fn vhost_user_backend(options: ProgramOptions, device: Layer) -> Result<Policy, PolicyError> {
    Policy::new(vec![
        common(std::process::id()),
        program(options),
        virtio(),
        vhost_user(),
        device,
    ])
}
