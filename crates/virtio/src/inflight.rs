//! Inflight tracking: what a queue has taken from the driver and not yet answered, recorded
//! where it survives the device process.
//!
//! The transport provides the record (vhost-user keeps it in a memfd the frontend holds across
//! a backend crash, `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`); [`ActiveQueue`](crate::ActiveQueue)
//! writes it, so every device gets crash recovery without code of its own: a chain is marked
//! before the device sees it and cleared when its used entry is published. When a queue starts
//! over a record that a previous process left behind, the record is repaired and the chains it
//! still holds are handed to the device again, oldest first, before anything new.

use std::fmt::Debug;

/// What a queue's record says when the queue starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads taken by an earlier process and never answered, in the order they were taken.
    pub resubmit: Vec<u16>,
    /// Where the queue continues in the available ring, if the record knows better than the
    /// transport's configuration (after a crash the frontend only knows the used index).
    pub next_avail: Option<u16>,
}

/// One queue's inflight record.
///
/// Calls follow the request path: [`InflightLog::taken`] before the device acts on a chain,
/// [`InflightLog::completing`] just before its used entry is written, [`InflightLog::completed`]
/// once the used index has moved. The record may be shared with a frontend the backend does not
/// trust: an implementation bounds everything it reads back.
pub trait InflightLog: Send + Debug {
    /// Brings the record in line with a used ring whose index is `used_idx`, and says what to
    /// resubmit. Called once when the queue starts.
    fn recover(&mut self, used_idx: u16) -> Recovery;

    /// `head` was taken from the available ring.
    fn taken(&mut self, head: u16);

    /// `head` was put back before the device acted on it.
    fn untaken(&mut self, head: u16);

    /// The used entry for `head` is about to be written.
    fn completing(&mut self, head: u16);

    /// The used index now stands at `used_idx`: every chain announced by `completing` is done.
    fn completed(&mut self, used_idx: u16);
}

/// Where a transport keeps the records of a device's queues.
pub trait InflightSource: Send + Sync + Debug {
    /// The record of queue `index` with `size` entries, or `None` if there is none (or it does
    /// not fit that size).
    fn queue(&self, index: u16, size: u16) -> Option<Box<dyn InflightLog>>;
}
