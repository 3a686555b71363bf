//! Packet backends: where transmitted frames go and received frames come from.
//!
//! A [`PacketBackend`] is a set of [`PacketQueue`]s, one per queue pair. Each queue is moved to
//! the worker thread of its pair while the device runs. Packets cross the trait as byte vectors:
//! the 12-byte `virtio_net_hdr` (VERSION_1 layout, `num_buffers` unused), then the Ethernet
//! frame, so that offload information (partial checksums, GSO) travels with the frame. The
//! device validates every header on both sides and performs what the driver did not negotiate
//! itself; a backend only carries packets.
//!
//! Two backends exist: [`tap::Tap`] (the host kernel's TAP driver, one file descriptor per
//! queue pair) and [`switch::Switch`] (an in-process L2 switch between the devices one process
//! serves).

pub mod switch;
pub mod tap;

use std::fmt::Debug;
use std::os::fd::RawFd;

use vmm_sys_util::eventfd::EventFd;

use crate::config::Offloads;

/// Errors of packet backends.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A system call on the backend failed.
    #[error("{operation} on {what} failed")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// What it was done on.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The backend cannot be used as configured.
    #[error("{what}: {reason}")]
    Unusable {
        /// What.
        what: String,
        /// Why.
        reason: String,
    },
}

/// The most packets a device hands to [`PacketQueue::send`] at once. A queue that is not
/// [`PacketQueue::congested`] has room for that many.
pub const SEND_BATCH: usize = 64;

/// Buffers a device keeps for reuse ([`PacketQueue::reclaim`]).
pub const MAX_SPARES: usize = 2 * SEND_BATCH;

/// The packet I/O of one queue pair.
pub trait PacketQueue: Send + Debug {
    /// A file descriptor that is readable (level-triggered) while [`PacketQueue::recv`] may
    /// return a packet.
    fn ready_fd(&self) -> RawFd;

    /// Takes the next received packet (header, then frame) into `packet`, replacing its
    /// contents (the backend may keep `packet`'s old buffer for reuse and put another one in
    /// its place). Returns false when none is waiting.
    fn recv(&mut self, packet: &mut Vec<u8>) -> Result<bool, BackendError>;

    /// Sends every packet of `batch` (header, then frame; at most [`SEND_BATCH`]), emptying it.
    /// Returns how many the backend dropped.
    fn send(&mut self, batch: &mut Vec<Vec<u8>>) -> usize;

    /// Moves empty buffers (length 0, their capacity kept) that the queue no longer needs into
    /// `spares`, until it holds [`MAX_SPARES`]: the device fills them with the next packets it
    /// sends instead of allocating (a sent packet's buffer comes back from where it went).
    fn reclaim(&mut self, spares: &mut Vec<Vec<u8>>);

    /// Whether a packet sent now would certainly be dropped (every place it could go is full).
    /// A queue that says so writes the eventfd given to [`PacketQueue::set_space_waker`] once
    /// there is room again: meanwhile the device leaves transmitted packets in the driver's
    /// ring (backpressure) instead of copying them out only for the backend to drop them.
    fn congested(&mut self) -> bool;

    /// The eventfd to write when room frees up after [`PacketQueue::congested`] said there was
    /// none. Without one a queue never reports congestion.
    fn set_space_waker(&mut self, waker: EventFd);

    /// The offloads the driver negotiated for received packets: the backend may deliver
    /// packets that use them (the device completes anything else itself).
    fn set_offloads(&mut self, guest: Offloads) -> Result<(), BackendError>;

    /// Whether this queue pair is in use. A backend that spreads received packets over queues
    /// stops steering to a disabled one.
    fn set_enabled(&mut self, enabled: bool) -> Result<(), BackendError>;
}

/// A source and sink of packets with one queue per queue pair.
pub trait PacketBackend: Send + Debug {
    /// A name for logs (`tap tap0`, `switch port 1`).
    fn name(&self) -> String;

    /// Whether packets carry offload information (partial checksums, GSO) both ways. The device
    /// offers the checksum and segmentation features only if so.
    fn offloads(&self) -> bool;

    /// The queues, one per queue pair, in order. Called once.
    fn into_queues(self: Box<Self>) -> Vec<Box<dyn PacketQueue>>;
}
