//! One vhost-user session on a Unix stream socket.
//!
//! Standard messages go through vhost 0.18's [`Frontend`]; SET_STATUS/GET_STATUS and raw
//! (possibly malformed) messages go through this crate's codec ([`crate::raw`]) on a `dup` of
//! the same socket. Every call is synchronous and takes `&mut self`, so the two never
//! interleave on the wire.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};

use crate::backend_channel::BackendChannel;
use crate::raw::{self, MsgHeader, RawMessage, FLAG_NEED_REPLY, FLAG_REPLY, VERSION};

/// Default timeout for a reply from the backend.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of a vhost-user connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Connecting to the backend's socket failed (after retries).
    #[error("cannot connect to {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Last connect error.
        #[source]
        source: io::Error,
    },
    /// A request sent through vhost's `Frontend` failed.
    #[error("{request} failed")]
    Vhost {
        /// Request name.
        request: &'static str,
        /// The error from vhost.
        #[source]
        source: vhost::Error,
    },
    /// Socket I/O for a request sent by this crate's codec failed.
    #[error("{request}: socket I/O failed")]
    Io {
        /// Request name.
        request: &'static str,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The backend answered with the wrong request code, flags or size.
    #[error("{request}: unexpected reply {reply:?} with {payload_len} payload bytes")]
    BadReply {
        /// Request name.
        request: &'static str,
        /// The reply header as received.
        reply: MsgHeader,
        /// Payload length received.
        payload_len: usize,
    },
    /// The backend acknowledged a request with a non-zero status.
    #[error("{request}: backend replied with failure status {status:#x}")]
    Nack {
        /// Request name.
        request: &'static str,
        /// The u64 status from the REPLY_ACK.
        status: u64,
    },
    /// The request needs a protocol feature that was not negotiated.
    #[error("{request} needs protocol feature {feature:?}, which was not negotiated")]
    NotNegotiated {
        /// Request name.
        request: &'static str,
        /// The missing feature.
        feature: VhostUserProtocolFeatures,
    },
}

/// Adds the request name to a vhost error.
pub(crate) trait VhostResultExt<T> {
    /// Maps the error to [`ConnectionError::Vhost`].
    fn ctx(self, request: &'static str) -> Result<T, ConnectionError>;
}

impl<T> VhostResultExt<T> for vhost::Result<T> {
    fn ctx(self, request: &'static str) -> Result<T, ConnectionError> {
        self.map_err(|source| ConnectionError::Vhost { request, source })
    }
}

/// VHOST_USER_GET_VRING_BASE_SKIP_DRAIN: newer than the vhost crate's request enumeration.
pub const GET_VRING_BASE_SKIP_DRAIN: u32 = 45;
/// VHOST_USER_PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN (bit 23): newer than the vhost crate's
/// protocol feature flags (build it with `VhostUserProtocolFeatures::from_bits_retain`).
pub const PROTOCOL_F_SKIP_DRAIN: u64 = 1 << 23;

/// Requests whose backend always sends a reply (independent of NEED_REPLY).
fn always_replies(code: u32, protocol: VhostUserProtocolFeatures) -> bool {
    use FrontendReq as R;
    [
        R::GET_FEATURES,
        R::GET_VRING_BASE,
        R::GET_PROTOCOL_FEATURES,
        R::GET_QUEUE_NUM,
        R::GET_CONFIG,
        R::POSTCOPY_ADVISE,
        R::POSTCOPY_END,
        R::GET_INFLIGHT_FD,
        R::GET_MAX_MEM_SLOTS,
        R::GET_STATUS,
        R::GET_SHARED_OBJECT,
        R::SET_DEVICE_STATE_FD,
        R::CHECK_DEVICE_STATE,
        R::GET_SHMEM_CONFIG,
    ]
    .iter()
    .any(|r| *r as u32 == code)
        || code == GET_VRING_BASE_SKIP_DRAIN
        || (code == R::SET_LOG_BASE as u32
            && protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD))
}

/// One vhost-user session: the frontend side of a connected Unix stream socket.
pub struct Connection {
    frontend: Frontend,
    /// A dup of the frontend's socket, for this crate's own codec.
    sock: UnixStream,
    protocol_acked: VhostUserProtocolFeatures,
    need_reply: bool,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("fd", &self.sock.as_raw_fd())
            .field("protocol_acked", &self.protocol_acked)
            .field("need_reply", &self.need_reply)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Connection {
    /// Connects to a backend listening on `path`, retrying while the socket does not exist yet
    /// or refuses connections (the backend is still starting), for up to `retry_for`.
    ///
    /// `max_queues` bounds the vring indices vhost's `Frontend` accepts until GET_QUEUE_NUM.
    pub fn connect(
        path: &Path,
        max_queues: u64,
        retry_for: Duration,
    ) -> Result<Self, ConnectionError> {
        let deadline = Instant::now() + retry_for;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    return Self::from_stream(s, max_queues).map_err(|source| {
                        ConnectionError::Connect {
                            path: path.into(),
                            source,
                        }
                    })
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(ConnectionError::Connect {
                        path: path.into(),
                        source,
                    })
                }
            }
        }
    }

    /// Wraps an already connected socket (e.g. one end of a `socketpair` given to a backend
    /// started with `--fd`). Sets the default I/O timeout.
    pub fn from_stream(stream: UnixStream, max_queues: u64) -> io::Result<Self> {
        let sock = stream.try_clone()?;
        let conn = Connection {
            frontend: Frontend::from_stream(stream, max_queues),
            sock,
            protocol_acked: VhostUserProtocolFeatures::empty(),
            need_reply: false,
            timeout: Some(DEFAULT_IO_TIMEOUT),
        };
        conn.set_timeout(Some(DEFAULT_IO_TIMEOUT))?;
        Ok(conn)
    }

    /// vhost's frontend, for the standard messages.
    ///
    /// Use [`Connection::set_protocol_features`] rather than the frontend's own method, so this
    /// connection knows what was acked.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// The socket (a dup of the one vhost's frontend uses).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Sets how long any request waits for the backend (`None`: forever). A backend that hangs
    /// then fails the request instead of the test.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        // SO_RCVTIMEO/SO_SNDTIMEO belong to the socket, so this covers vhost's dup too.
        self.sock.set_read_timeout(timeout)?;
        self.sock.set_write_timeout(timeout)
    }

    /// Sends SET_PROTOCOL_FEATURES and remembers what was acked.
    pub fn set_protocol_features(
        &mut self,
        features: VhostUserProtocolFeatures,
    ) -> Result<(), ConnectionError> {
        self.frontend
            .set_protocol_features(features)
            .ctx("SET_PROTOCOL_FEATURES")?;
        self.protocol_acked = features;
        Ok(())
    }

    /// The protocol features acked with [`Connection::set_protocol_features`].
    pub fn protocol_acked(&self) -> VhostUserProtocolFeatures {
        self.protocol_acked
    }

    /// Selects whether every following message asks for a REPLY_ACK (NEED_REPLY), through
    /// vhost's frontend and this crate's codec alike. Needs REPLY_ACK to be negotiated.
    pub fn set_need_reply(&mut self, on: bool) -> Result<(), ConnectionError> {
        if on {
            self.require(VhostUserProtocolFeatures::REPLY_ACK, "NEED_REPLY")?;
        }
        self.need_reply = on;
        self.frontend.set_hdr_flags(if on {
            VhostUserHeaderFlag::NEED_REPLY
        } else {
            VhostUserHeaderFlag::empty()
        });
        Ok(())
    }

    /// Whether NEED_REPLY is set on every message.
    pub fn need_reply(&self) -> bool {
        self.need_reply
    }

    fn require(
        &self,
        feature: VhostUserProtocolFeatures,
        request: &'static str,
    ) -> Result<(), ConnectionError> {
        if self.protocol_acked.contains(feature) {
            Ok(())
        } else {
            Err(ConnectionError::NotNegotiated { request, feature })
        }
    }

    /// SET_STATUS: sends the VIRTIO device status byte (needs the STATUS protocol feature).
    pub fn set_status(&mut self, status: u8) -> Result<(), ConnectionError> {
        const REQ: &str = "SET_STATUS";
        self.require(VhostUserProtocolFeatures::STATUS, REQ)?;
        let code = FrontendReq::SET_STATUS as u32;
        let flags = VERSION | if self.need_reply { FLAG_NEED_REPLY } else { 0 };
        let io = |source| ConnectionError::Io {
            request: REQ,
            source,
        };
        raw::send_message(
            &self.sock,
            &MsgHeader::new(code, flags, 8),
            &u64::from(status).to_ne_bytes(),
            &[],
        )
        .map_err(io)?;
        if self.need_reply {
            let status = self.recv_u64_reply(code, REQ)?;
            if status != 0 {
                return Err(ConnectionError::Nack {
                    request: REQ,
                    status,
                });
            }
        }
        Ok(())
    }

    /// GET_STATUS: reads the VIRTIO device status byte (needs the STATUS protocol feature).
    pub fn get_status(&mut self) -> Result<u8, ConnectionError> {
        const REQ: &str = "GET_STATUS";
        self.require(VhostUserProtocolFeatures::STATUS, REQ)?;
        let code = FrontendReq::GET_STATUS as u32;
        raw::send_message(&self.sock, &MsgHeader::new(code, VERSION, 0), &[], &[]).map_err(
            |source| ConnectionError::Io {
                request: REQ,
                source,
            },
        )?;
        let v = self.recv_u64_reply(code, REQ)?;
        Ok(v as u8)
    }

    /// GET_PROTOCOL_FEATURES through this crate's codec: every bit the backend sets, also
    /// those newer than the vhost crate (whose `Frontend` drops them).
    pub fn get_protocol_features_all(
        &mut self,
    ) -> Result<VhostUserProtocolFeatures, ConnectionError> {
        const REQ: &str = "GET_PROTOCOL_FEATURES";
        let code = FrontendReq::GET_PROTOCOL_FEATURES as u32;
        self.send_own(code, &[], REQ)?;
        let v = self.recv_u64_reply(code, REQ)?;
        Ok(VhostUserProtocolFeatures::from_bits_retain(v))
    }

    /// GET_VRING_BASE_SKIP_DRAIN (needs protocol feature 23): stops ring `index` without
    /// waiting for the requests the backend can cancel; returns its next avail index.
    pub fn get_vring_base_skip_drain(&mut self, index: u32) -> Result<u32, ConnectionError> {
        const REQ: &str = "GET_VRING_BASE_SKIP_DRAIN";
        self.require(
            VhostUserProtocolFeatures::from_bits_retain(PROTOCOL_F_SKIP_DRAIN),
            REQ,
        )?;
        let code = GET_VRING_BASE_SKIP_DRAIN;
        let payload = [index.to_ne_bytes(), 0u32.to_ne_bytes()].concat();
        self.send_own(code, &payload, REQ)?;
        let msg = self.recv_reply(code, REQ)?;
        match msg.payload.get(..8) {
            Some(p) if p[..4] == payload[..4] => {
                Ok(u32::from_ne_bytes(p[4..8].try_into().expect("4 bytes")))
            }
            _ => Err(ConnectionError::BadReply {
                request: REQ,
                reply: msg.header,
                payload_len: msg.payload.len(),
            }),
        }
    }

    /// Sends a request of this crate's codec (no NEED_REPLY: it has a reply of its own).
    fn send_own(
        &mut self,
        code: u32,
        payload: &[u8],
        request: &'static str,
    ) -> Result<(), ConnectionError> {
        let hdr = MsgHeader::new(code, VERSION, payload.len() as u32);
        raw::send_message(&self.sock, &hdr, payload, &[])
            .map_err(|source| ConnectionError::Io { request, source })
    }

    /// Receives the reply to `code`: a reply of that request with no fds.
    fn recv_reply(
        &mut self,
        code: u32,
        request: &'static str,
    ) -> Result<RawMessage, ConnectionError> {
        let msg = self
            .recv_raw(self.timeout)
            .and_then(|m| m.ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no reply")))
            .map_err(|source| ConnectionError::Io { request, source })?;
        if msg.header.request == code && msg.header.is_reply() && msg.fds.is_empty() {
            Ok(msg)
        } else {
            Err(ConnectionError::BadReply {
                request,
                reply: msg.header,
                payload_len: msg.payload.len(),
            })
        }
    }

    fn recv_u64_reply(&mut self, code: u32, request: &'static str) -> Result<u64, ConnectionError> {
        let msg = self.recv_reply(code, request)?;
        match msg.payload_u64() {
            Some(v) => Ok(v),
            None => Err(ConnectionError::BadReply {
                request,
                reply: msg.header,
                payload_len: msg.payload.len(),
            }),
        }
    }

    /// Sends a well-framed message with any request code, flags, payload and fds, and returns
    /// the reply if one is expected: when `flags` has NEED_REPLY, or the request is one the
    /// protocol always answers (GET_*, SET_DEVICE_STATE_FD, …). `Ok(None)` means no reply was
    /// expected. A missing reply is a `TimedOut` error after the connection's timeout.
    ///
    /// `flags` is sent as given: pass [`raw::VERSION`] (plus [`raw::FLAG_NEED_REPLY`]) for a
    /// normal message. The reply is returned as received, without validation.
    pub fn raw_request(
        &mut self,
        code: u32,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<Option<RawMessage>> {
        self.send_raw(code, flags, payload, fds)?;
        if flags & FLAG_NEED_REPLY != 0 || always_replies(code, self.protocol_acked) {
            match self.recv_raw(self.timeout)? {
                Some(m) => Ok(Some(m)),
                None => Err(io::Error::new(io::ErrorKind::TimedOut, "no reply")),
            }
        } else {
            Ok(None)
        }
    }

    /// Sends a header built from `code`, `flags` and `payload.len()`, then the payload.
    pub fn send_raw(
        &mut self,
        code: u32,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        let hdr = MsgHeader::new(code, flags, payload.len() as u32);
        raw::send_message(&self.sock, &hdr, payload, fds)
    }

    /// Sends arbitrary bytes (a truncated header, a lying size field, …) with `fds` attached.
    pub fn send_raw_bytes(&mut self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        raw::send_bytes(&self.sock, bytes, fds)
    }

    /// Receives one message, waiting up to `timeout` (`Ok(None)` on timeout).
    pub fn recv_raw(&mut self, timeout: Option<Duration>) -> io::Result<Option<RawMessage>> {
        raw::recv_message(&self.sock, timeout)
    }

    /// Whether the backend has closed (or reset) the connection within `timeout`. Pending
    /// unread data counts as "not closed" and is left in the socket.
    pub fn peer_closed(&self, timeout: Duration) -> io::Result<bool> {
        if !raw::wait_readable(self.sock.as_fd(), Some(timeout))? {
            return Ok(false);
        }
        let mut b = [0u8; 1];
        match recv(
            self.sock.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(Errno::ECONNRESET) => Ok(true),
            Err(Errno::EAGAIN) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the backend channel: a socketpair whose other end is sent with
    /// SET_BACKEND_REQ_FD (needs BACKEND_REQ). The backend may then send requests such as
    /// CONFIG_CHANGE_MSG, which [`BackendChannel`] receives and acknowledges.
    pub fn open_backend_channel(&mut self) -> Result<BackendChannel, ConnectionError> {
        const REQ: &str = "SET_BACKEND_REQ_FD";
        self.require(VhostUserProtocolFeatures::BACKEND_REQ, REQ)?;
        let (ours, theirs) = UnixStream::pair().map_err(|source| ConnectionError::Io {
            request: REQ,
            source,
        })?;
        self.frontend.set_backend_request_fd(&theirs).ctx(REQ)?;
        Ok(BackendChannel::new(ours))
    }

    /// Shuts the socket down in both directions; the backend sees a disconnect.
    pub fn shutdown(&self) {
        // Ignore errors: the peer may already be gone.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Builds a REPLY header flag set, for tests that answer the backend by hand.
    pub fn reply_flags() -> u32 {
        VERSION | FLAG_REPLY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_retries_until_the_socket_appears() {
        let dir = std::env::temp_dir().join(format!("outboard-fe-conn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let _ = std::fs::remove_file(&path);
        let p2 = path.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let l = std::os::unix::net::UnixListener::bind(&p2).unwrap();
            l.accept().unwrap().0
        });
        let conn = Connection::connect(&path, 1, Duration::from_secs(5)).unwrap();
        let peer = t.join().unwrap();
        drop(peer);
        assert!(conn.peer_closed(Duration::from_secs(5)).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn status_messages_are_framed_as_the_spec_says() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut conn = Connection::from_stream(a, 1).unwrap();
        assert!(matches!(
            conn.set_status(1),
            Err(ConnectionError::NotNegotiated { .. })
        ));
        conn.protocol_acked = VhostUserProtocolFeatures::STATUS;
        let peer = std::thread::spawn(move || {
            let m = raw::recv_message(&b, None).unwrap().unwrap();
            assert_eq!(m.header, MsgHeader::new(39, VERSION, 8));
            assert_eq!(m.payload_u64(), Some(0xf));
            let m = raw::recv_message(&b, None).unwrap().unwrap();
            assert_eq!(m.header, MsgHeader::new(40, VERSION, 0));
            let hdr = MsgHeader::new(40, VERSION | FLAG_REPLY, 8);
            raw::send_message(&b, &hdr, &0xfu64.to_ne_bytes(), &[]).unwrap();
        });
        conn.set_status(0xf).unwrap();
        assert_eq!(conn.get_status().unwrap(), 0xf);
        peer.join().unwrap();
    }
}
