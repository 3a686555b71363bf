//! Outboard: VIRTIO devices outside the VMM.
//!
//! This facade re-exports the library layers so that a VMM author can depend on one crate. The
//! layers themselves live in `crates/` and `devices/`; see `ARCHITECTURE.md`.
#![forbid(unsafe_code)]

pub use outboard_blk as blk;
pub use outboard_frontend as frontend;
pub use outboard_memory as memory;
pub use outboard_vhost_user as vhost_user;
pub use outboard_virtio as virtio;
