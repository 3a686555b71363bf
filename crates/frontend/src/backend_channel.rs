//! The frontend's end of the backend channel (SET_BACKEND_REQ_FD).
//!
//! The backend sends requests (CONFIG_CHANGE_MSG, SHMEM_MAP, …) on this socket and, when it
//! sets NEED_REPLY, waits for a u64 REPLY_ACK. The channel is independent of the main
//! connection, so a test may move it to another thread.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::BackendReq;

use crate::raw::{self, MsgHeader, RawMessage, FLAG_REPLY, VERSION};

/// Status sent back for requests this channel does not implement (non-zero means failure).
const UNSUPPORTED: u64 = 1;

/// The frontend's end of the backend request channel.
#[derive(Debug)]
pub struct BackendChannel {
    sock: UnixStream,
    /// Whether NEED_REPLY requests are answered at all (tests may turn this off to see how a
    /// backend copes with a frontend that never acks).
    reply_acks: bool,
    /// Requests other than CONFIG_CHANGE_MSG seen by [`BackendChannel::recv_config_change`].
    others: Vec<MsgHeader>,
    config_changes: u64,
}

impl BackendChannel {
    pub(crate) fn new(sock: UnixStream) -> Self {
        BackendChannel {
            sock,
            reply_acks: true,
            others: Vec::new(),
            config_changes: 0,
        }
    }

    /// Selects whether requests with NEED_REPLY get a REPLY_ACK (default: yes).
    pub fn set_reply_acks(&mut self, on: bool) {
        self.reply_acks = on;
    }

    /// Receives the next backend request, waiting up to `timeout` (`Ok(None)` on timeout).
    /// The caller must answer NEED_REPLY requests with [`BackendChannel::ack`].
    pub fn recv(&self, timeout: Option<Duration>) -> io::Result<Option<RawMessage>> {
        raw::recv_message(&self.sock, timeout)
    }

    /// Sends a REPLY_ACK with `status` (0 = success) for `request`.
    pub fn ack(&self, request: &MsgHeader, status: u64) -> io::Result<()> {
        let hdr = MsgHeader::new(request.request, VERSION | FLAG_REPLY, 8);
        raw::send_message(&self.sock, &hdr, &status.to_ne_bytes(), &[])
    }

    /// Waits up to `timeout` for a CONFIG_CHANGE_MSG and acknowledges it (status 0) if it has
    /// NEED_REPLY. Other requests are answered "unsupported" when they ask for a reply and
    /// recorded in [`BackendChannel::others`]. Returns false on timeout.
    pub fn recv_config_change(&mut self, timeout: Duration) -> io::Result<bool> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Some(msg) = self.recv(Some(left))? else {
                return Ok(false);
            };
            let is_config = msg.header.request == BackendReq::CONFIG_CHANGE_MSG as u32;
            if msg.header.needs_reply() && self.reply_acks {
                self.ack(&msg.header, if is_config { 0 } else { UNSUPPORTED })?;
            }
            if is_config {
                self.config_changes += 1;
                return Ok(true);
            }
            self.others.push(msg.header);
        }
    }

    /// Headers of the requests other than CONFIG_CHANGE_MSG received so far.
    pub fn others(&self) -> &[MsgHeader] {
        &self.others
    }

    /// How many CONFIG_CHANGE_MSGs were received.
    pub fn config_changes(&self) -> u64 {
        self.config_changes
    }

    /// The socket, for tests that speak the channel by hand.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }
}

impl AsRawFd for BackendChannel {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::FLAG_NEED_REPLY;

    #[test]
    fn config_change_is_acked_and_other_requests_are_refused() {
        let (ours, backend) = UnixStream::pair().unwrap();
        let mut ch = BackendChannel::new(ours);
        assert!(!ch.recv_config_change(Duration::from_millis(10)).unwrap());
        let shmem_map = MsgHeader::new(BackendReq::SHMEM_MAP as u32, VERSION | FLAG_NEED_REPLY, 0);
        raw::send_message(&backend, &shmem_map, &[], &[]).unwrap();
        let change = MsgHeader::new(
            BackendReq::CONFIG_CHANGE_MSG as u32,
            VERSION | FLAG_NEED_REPLY,
            0,
        );
        raw::send_message(&backend, &change, &[], &[]).unwrap();
        assert!(ch.recv_config_change(Duration::from_secs(5)).unwrap());
        assert_eq!(ch.others(), &[shmem_map]);
        let nack = raw::recv_message(&backend, None).unwrap().unwrap();
        assert_eq!(nack.payload_u64(), Some(UNSUPPORTED));
        let ack = raw::recv_message(&backend, None).unwrap().unwrap();
        assert_eq!(ack.header.request, BackendReq::CONFIG_CHANGE_MSG as u32);
        assert!(ack.header.is_reply());
        assert_eq!(ack.payload_u64(), Some(0));
    }
}
