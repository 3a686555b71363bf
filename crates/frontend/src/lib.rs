//! A userspace vhost-user frontend: a test VMM without a VM.
//!
//! It plays QEMU's role against a vhost-user backend: it owns guest RAM ([`GuestRam`], memfd
//! regions mapped here and shared with the backend), drives split virtqueues as the driver
//! ([`DriverQueue`]), negotiates and sets up a session ([`SessionBuilder`], [`Session`]) and
//! speaks virtio-blk on top ([`BlkDriver`]). Low-level hatches ([`Connection::raw_request`],
//! [`DriverQueue::write_desc`], …) let hostile tests send what no well-behaved frontend would.
//!
//! ```no_run
//! use outboard_frontend::{BlkDriver, BlkStatus, SessionBuilder};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut blk = BlkDriver::connect(SessionBuilder::new("/tmp/blk.sock").queues(2))?;
//! let q = blk.queue(0);
//! assert_eq!(q.write(0, &[0xab; 4096])?, BlkStatus::Ok);
//! let mut buf = vec![0; 4096];
//! assert_eq!(q.read(0, &mut buf)?, BlkStatus::Ok);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod backend_channel;
pub mod blk;
pub mod connection;
pub mod device;
pub mod migration;
pub mod net;
pub mod queue;
pub mod ram;
pub mod raw;

pub use backend_channel::BackendChannel;
pub use blk::{
    BlkCompletion, BlkConfig, BlkDriver, BlkError, BlkOp, BlkOptions, BlkQueue, BlkRange,
    BlkRequest, BlkStatus, WaitMode,
};
pub use connection::{Connection, ConnectionError};
pub use device::{Negotiated, Session, SessionBuilder, SessionError};
pub use migration::{DirtyBitmap, DirtyLog, Migrated, MigrationError};
pub use net::{
    CtrlAck, NetConfig, NetCtrlQueue, NetDriver, NetError, NetHdr, NetOptions, NetRxQueue,
    NetTxQueue, RxMode, RxPacket,
};
pub use queue::{
    DriverQueue, NotifyMode, QueueConfig, QueueError, QueueStats, RawDescriptor, RingAddressing,
    Segment, Used, VringSetup,
};
pub use ram::{GuestBuf, GuestRam, RamError, RegionId};

#[cfg(test)]
mod tests {
    /// Queues move to worker threads in benchmarks; sessions move to test threads.
    #[test]
    fn queues_and_sessions_are_send() {
        fn send<T: Send>() {}
        send::<crate::DriverQueue>();
        send::<crate::BlkQueue>();
        send::<crate::BlkDriver>();
        send::<crate::BackendChannel>();
        send::<crate::GuestBuf>();
    }
}
