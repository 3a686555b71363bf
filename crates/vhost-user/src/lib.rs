//! vhost-user as a full VIRTIO transport.
//!
//! [`VhostUserBackend`] serves any [`outboard_virtio::VirtioDevice`] to a vhost-user frontend
//! (QEMU, Cloud Hypervisor, crosvm, DPDK's virtio-user, Outboard's own test frontend). It owns the
//! message loop rather than sitting on the vhost crate's dispatcher, so that it can implement the
//! whole VIRTIO transport — device status (SET/GET_STATUS), config space and config-change
//! notifications, RESET_DEVICE, memory hot-plug — and so that a message it refuses is answered
//! with an error instead of tearing the session down. The vhost crate's payload structs are
//! reused; the header and the socket I/O are in [`wire`].
//!
//! Threads: the thread that calls [`VhostUserBackend::serve_listener`] is the control thread. It
//! handles every message in order. Queue processing happens on the device's own workers; the
//! control thread reaches them only through the framework (quiesce → change → activate) and the
//! interrupt sink.

mod backend;
pub mod inflight;
mod interrupt;
pub mod wire;

pub use backend::handover;
pub use backend::{supported_protocol_features, BackendConfig, SessionEnd, VhostUserBackend};
pub use interrupt::VhostUserInterrupt;

use outboard_virtio::{FrameworkError, QueueConfigError};
use vhost::vhost_user::message::FrontendReq;

/// Why one message was refused. The session goes on (see [`VhostUserBackend`]).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A request code this transport does not know.
    #[error("unknown request {request}")]
    Unknown {
        /// The code.
        request: u32,
    },
    /// A request this transport does not implement (and whose feature it does not offer).
    #[error("unsupported request {request:?}")]
    Unsupported {
        /// The request.
        request: FrontendReq,
    },
    /// A request whose protocol feature was not negotiated.
    #[error("request {request:?} needs a protocol feature that was not negotiated")]
    NotNegotiated {
        /// The request.
        request: FrontendReq,
    },
    /// The payload has the wrong size for the request.
    #[error("payload of {got} bytes has the wrong size")]
    PayloadSize {
        /// Its size.
        got: usize,
    },
    /// The wrong number of file descriptors came with the request.
    #[error("expected {want} file descriptor(s), got {got}")]
    FdCount {
        /// How many the request needs.
        want: usize,
        /// How many came.
        got: usize,
    },
    /// SET_OWNER on an owned session.
    #[error("the session already has an owner")]
    AlreadyOwned,
    /// GET_VRING_BASE_SKIP_DRAIN (protocol feature 23) asked for without the features it
    /// needs (GET_VRING_BASE_INFLIGHT and INFLIGHT_SHMFD).
    #[error(
        "protocol feature GET_VRING_BASE_SKIP_DRAIN needs GET_VRING_BASE_INFLIGHT and INFLIGHT_SHMFD"
    )]
    SkipDrainPrerequisites,
    /// GET_VRING_BASE_SKIP_DRAIN (message 45) without its protocol feature.
    #[error("GET_VRING_BASE_SKIP_DRAIN needs its protocol feature, which was not negotiated")]
    SkipDrainNotNegotiated,
    /// Protocol features that are not offered.
    #[error("protocol features {unsupported:#x} are not supported")]
    ProtocolFeatures {
        /// The offending bits.
        unsupported: u64,
    },
    /// SET_MEM_TABLE with no regions or too many.
    #[error("memory table with {count} regions (1..=8 allowed)")]
    RegionCount {
        /// The count in the message.
        count: usize,
    },
    /// A memory region was refused.
    #[error(transparent)]
    Memory(#[from] outboard_memory::MemoryError),
    /// An inflight region was refused.
    #[error(transparent)]
    Inflight(#[from] crate::inflight::InflightError),
    /// SET_VRING_BASE beyond a split ring's index range.
    #[error("vring base {num} is out of range")]
    VringBase {
        /// The value.
        num: u32,
    },
    /// SET_VRING_ENABLE with a value other than 0 or 1.
    #[error("vring enable value {num} is neither 0 nor 1")]
    VringEnable {
        /// The value.
        num: u32,
    },
    /// SET_VRING_ADDR with unknown flags.
    #[error("vring address flags {flags:#x} are not supported")]
    VringFlags {
        /// The flags.
        flags: u32,
    },
    /// SET_VRING_KICK/CALL/ERR with reserved bits set.
    #[error("vring fd payload {value:#x} has reserved bits set")]
    VringFdPayload {
        /// The payload.
        value: u64,
    },
    /// SET_VRING_KICK without an fd: polling mode is not supported.
    #[error("queue {index}: kick without an eventfd (polling mode) is not supported")]
    PollingUnsupported {
        /// The queue.
        index: u32,
    },
    /// An fd that should be an eventfd is something else.
    #[error("expected an eventfd, got {what}")]
    NotAnEventFd {
        /// What the fd is.
        what: String,
    },
    /// GET/SET_CONFIG with a size of zero or too large.
    #[error("config access of {size} bytes is not allowed")]
    ConfigSize {
        /// The size.
        size: u32,
    },
    /// SET_STATUS with a value that is not a status byte.
    #[error("status value {value:#x} does not fit in a byte")]
    Status {
        /// The value.
        value: u64,
    },
    /// The framework refused.
    #[error(transparent)]
    Framework(#[from] FrameworkError),
}

impl From<QueueConfigError> for RequestError {
    fn from(e: QueueConfigError) -> Self {
        RequestError::Framework(e.into())
    }
}

/// Errors that stop a backend from serving at all.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Accepting a connection failed.
    #[error("cannot accept a connection")]
    Accept(#[source] std::io::Error),
    /// Waiting for the socket failed.
    #[error("cannot wait for the socket")]
    Poll(#[source] std::io::Error),
}
