//! The vhost-user wire format: message headers, payloads and file descriptors on a Unix socket.
//!
//! The vhost crate's payload structs are reused; its header type is private, so the header is
//! parsed here. Everything read from the socket is untrusted: sizes are capped before anything is
//! allocated, and file descriptors arrive as owned handles that close themselves when a message is
//! refused.
//!
//! The backend reads and writes with a cancel fd (its shutdown eventfd): a frontend that stops in
//! the middle of a message, or stops reading replies, cannot keep it from shutting down.

use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use vm_memory::ByteValued;

/// The largest payload a message may carry (the spec's and QEMU's limit).
pub const MAX_PAYLOAD: usize = 0x1000;
/// The most file descriptors one message may carry.
pub const MAX_FDS: usize = 32;
/// The most file descriptors the kernel passes in one message (Linux's SCM_MAX_FD). Room for
/// this many is made when receiving: on a truncated control message the kernel has installed
/// the fds that fit, which could then not be collected (nix refuses to parse it) and would leak.
const SCM_MAX_FD: usize = 253;

const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const KNOWN_FLAGS: u32 = VERSION_MASK | REPLY | NEED_REPLY;

/// Errors reading or writing messages.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection between messages.
    #[error("the frontend closed the connection")]
    Disconnected,
    /// The peer closed the connection in the middle of a message.
    #[error("the connection closed in the middle of a message ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// The header is not a version-1 request.
    #[error("bad message header: flags {flags:#x}")]
    BadHeader {
        /// The flags field.
        flags: u32,
    },
    /// The payload is larger than any message may be.
    #[error("message {request} announces a {size}-byte payload (limit {MAX_PAYLOAD})")]
    Oversized {
        /// The request code.
        request: u32,
        /// The announced size.
        size: u32,
    },
    /// More file descriptors than a message may carry were sent.
    #[error("the frontend sent more than {MAX_FDS} file descriptors")]
    TooManyFds,
    /// The cancel fd became readable while a message was awaited or could not be sent.
    #[error("cancelled while waiting for the peer")]
    Cancelled,
    /// A socket error.
    #[error("socket error")]
    Io(#[source] std::io::Error),
}

impl From<nix::Error> for WireError {
    fn from(e: nix::Error) -> Self {
        WireError::Io(e.into())
    }
}

/// A message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The request code.
    pub request: u32,
    /// The flags field.
    pub flags: u32,
    /// The payload size.
    pub size: u32,
}

impl Header {
    const SIZE: usize = 12;

    fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8; 12]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// Whether the sender asked for a reply (REPLY_ACK).
    pub fn need_reply(&self) -> bool {
        self.flags & NEED_REPLY != 0
    }
}

/// A received message: header, payload and the file descriptors that came with it.
#[derive(Debug)]
pub struct Message {
    /// The header.
    pub header: Header,
    /// The payload (exactly `header.size` bytes).
    pub payload: Vec<u8>,
    /// The file descriptors, owned.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// The payload as a `T`, if it is exactly the size of one.
    pub fn payload_as<T: ByteValued + Default>(&self) -> Option<T> {
        parse(&self.payload)
    }
}

/// Reads a `T` from `bytes`, which must be exactly its size.
pub fn parse<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    let mut v = T::default();
    let dst = v.as_mut_slice();
    if dst.len() != bytes.len() {
        return None;
    }
    dst.copy_from_slice(bytes);
    Some(v)
}

/// Reads a `T` from the start of `bytes`, which must hold at least its size.
pub fn parse_prefix<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    parse(bytes.get(..std::mem::size_of::<T>())?)
}

/// Receives one message. File descriptors are accepted only with the first bytes of the header,
/// as the spec says a frontend sends them.
pub fn recv_message(sock: &UnixStream) -> Result<Message, WireError> {
    recv_message_until(sock, None)
}

/// As [`recv_message`], but fails with [`WireError::Cancelled`] once `cancel` is readable while
/// the message is awaited.
pub fn recv_message_until(
    sock: &UnixStream,
    cancel: Option<BorrowedFd<'_>>,
) -> Result<Message, WireError> {
    wait_ready(sock, PollFlags::POLLIN, cancel)?;
    let mut hdr = [0u8; Header::SIZE];
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let (got, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut hdr)];
        let msg = loop {
            match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::Error::EINTR) => continue,
                r => break r?,
            }
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel has just installed `fd` in this process for us with
                    // SCM_RIGHTS; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_CTRUNC))
    };
    // Any fds received are owned by `fds` and closed when it drops.
    if truncated || fds.len() > MAX_FDS {
        return Err(WireError::TooManyFds);
    }
    if got == 0 {
        return Err(WireError::Disconnected);
    }
    let mut filled = got;
    read_rest(sock, &mut hdr, &mut filled, cancel)?;
    let header = Header::from_bytes(&hdr);
    if header.flags & VERSION_MASK != VERSION
        || header.flags & REPLY != 0
        || header.flags & !KNOWN_FLAGS != 0
    {
        return Err(WireError::BadHeader {
            flags: header.flags,
        });
    }
    if header.size as usize > MAX_PAYLOAD {
        return Err(WireError::Oversized {
            request: header.request,
            size: header.size,
        });
    }
    let mut payload = vec![0u8; header.size as usize];
    let mut filled = 0;
    read_rest(sock, &mut payload, &mut filled, cancel)?;
    Ok(Message {
        header,
        payload,
        fds,
    })
}

fn read_rest(
    mut sock: &UnixStream,
    buf: &mut [u8],
    filled: &mut usize,
    cancel: Option<BorrowedFd<'_>>,
) -> Result<(), WireError> {
    while *filled < buf.len() {
        wait_ready(sock, PollFlags::POLLIN, cancel)?;
        match sock.read(&mut buf[*filled..]) {
            Ok(0) => {
                return Err(WireError::Truncated {
                    got: *filled,
                    expected: buf.len(),
                })
            }
            Ok(n) => *filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

/// Waits until `sock` is ready for `events`, or fails with [`WireError::Cancelled`] once `cancel`
/// is readable. Without a cancel fd it returns at once: the I/O that follows blocks instead.
fn wait_ready(
    sock: &UnixStream,
    events: PollFlags,
    cancel: Option<BorrowedFd<'_>>,
) -> Result<(), WireError> {
    let Some(cancel) = cancel else {
        return Ok(());
    };
    loop {
        let mut fds = [
            PollFd::new(sock.as_fd(), events),
            PollFd::new(cancel, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[1]) {
            return Err(WireError::Cancelled);
        }
        if ready(&fds[0]) {
            return Ok(());
        }
    }
}

/// Sends a reply without file descriptors, failing with [`WireError::Cancelled`] once `cancel`
/// is readable while the socket has no room for it.
pub fn send_reply_until(
    sock: &UnixStream,
    request: u32,
    payload: &[u8],
    cancel: BorrowedFd<'_>,
) -> Result<(), WireError> {
    let header = Header {
        request,
        flags: VERSION | REPLY,
        size: payload.len() as u32,
    };
    send(sock, header, payload, &[], Some(cancel))
}

/// Sends a reply with file descriptors, failing with [`WireError::Cancelled`] once `cancel` is
/// readable while the socket has no room for it.
pub fn send_reply_fds_until(
    sock: &UnixStream,
    request: u32,
    payload: &[u8],
    fds: &[RawFd],
    cancel: BorrowedFd<'_>,
) -> Result<(), WireError> {
    let header = Header {
        request,
        flags: VERSION | REPLY,
        size: payload.len() as u32,
    };
    send(sock, header, payload, fds, Some(cancel))
}

/// Sends a message (a reply when `reply` is set) with optional file descriptors.
pub fn send_message(
    sock: &UnixStream,
    request: u32,
    reply: bool,
    need_reply: bool,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), WireError> {
    let mut flags = VERSION;
    if reply {
        flags |= REPLY;
    }
    if need_reply {
        flags |= NEED_REPLY;
    }
    let header = Header {
        request,
        flags,
        size: payload.len() as u32,
    };
    send(sock, header, payload, fds, None)
}

fn send(
    sock: &UnixStream,
    header: Header,
    payload: &[u8],
    fds: &[RawFd],
    cancel: Option<BorrowedFd<'_>>,
) -> Result<(), WireError> {
    let header = header.to_bytes();
    let total = header.len() + payload.len();
    // With a cancel fd, the socket is waited for with poll and written without blocking.
    let flags = if cancel.is_some() {
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT
    } else {
        MsgFlags::MSG_NOSIGNAL
    };
    let mut sent = 0;
    while sent < total {
        wait_ready(sock, PollFlags::POLLOUT, cancel)?;
        let (h, p) = if sent < header.len() {
            (&header[sent..], payload)
        } else {
            (&header[..0], &payload[sent - header.len()..])
        };
        let iov = [IoSlice::new(h), IoSlice::new(p)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) => sent += n,
            Err(nix::Error::EINTR) => {}
            Err(nix::Error::EAGAIN) if cancel.is_some() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn header_round_trip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        send_message(&a, 5, false, true, &[1, 2, 3, 4], &[f.as_raw_fd()]).unwrap();
        let m = recv_message(&b).unwrap();
        assert_eq!(m.header.request, 5);
        assert!(m.header.need_reply());
        assert_eq!(m.payload, vec![1, 2, 3, 4]);
        assert_eq!(m.fds.len(), 1);
    }

    #[test]
    fn malformed_headers_are_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        // A reply where a request belongs.
        a.write_all(
            &Header {
                request: 1,
                flags: VERSION | REPLY,
                size: 0,
            }
            .to_bytes(),
        )
        .unwrap();
        assert!(matches!(recv_message(&b), Err(WireError::BadHeader { .. })));
        a.write_all(
            &Header {
                request: 1,
                flags: VERSION,
                size: 0x1001,
            }
            .to_bytes(),
        )
        .unwrap();
        assert!(matches!(recv_message(&b), Err(WireError::Oversized { .. })));
        // A header cut short by a disconnect.
        a.write_all(&[1, 0, 0]).unwrap();
        drop(a);
        assert!(matches!(recv_message(&b), Err(WireError::Truncated { .. })));
        assert!(matches!(recv_message(&b), Err(WireError::Disconnected)));
    }

    #[test]
    fn more_fds_than_a_message_may_carry_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let fds = vec![f.as_raw_fd(); MAX_FDS + 1];
        send_message(&a, 3, false, false, &[], &fds).unwrap();
        assert!(matches!(recv_message(&b), Err(WireError::TooManyFds)));
    }

    /// Makes `cancel`'s peer readable after a while, from another thread.
    fn cancel_later() -> (UnixStream, std::thread::JoinHandle<()>) {
        let (cancel, trigger) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            (&trigger).write_all(&[1]).unwrap();
        });
        (cancel, t)
    }

    #[test]
    fn a_cancel_fd_ends_the_wait_for_a_stalled_message() {
        let (a, b) = UnixStream::pair().unwrap();
        // Half a header, and nothing more.
        (&a).write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
        let (cancel, t) = cancel_later();
        let r = recv_message_until(&b, Some(cancel.as_fd()));
        assert!(matches!(r, Err(WireError::Cancelled)), "{r:?}");
        t.join().unwrap();
    }

    #[test]
    fn a_cancel_fd_ends_the_wait_for_room_to_reply() {
        let (_a, b) = UnixStream::pair().unwrap();
        // The peer never reads: fill the socket.
        b.set_nonblocking(true).unwrap();
        while (&b).write(&[0; 4096]).is_ok() {}
        b.set_nonblocking(false).unwrap();
        let (cancel, t) = cancel_later();
        let r = send_reply_until(&b, 1, &[0; 8], cancel.as_fd());
        assert!(matches!(r, Err(WireError::Cancelled)), "{r:?}");
        t.join().unwrap();
    }

    #[test]
    fn parse_requires_exact_sizes() {
        assert_eq!(parse::<u64>(&[1, 0, 0, 0, 0, 0, 0, 0]), Some(1));
        assert_eq!(parse::<u64>(&[1, 0, 0, 0]), None);
        assert_eq!(parse_prefix::<u32>(&[2, 0, 0, 0, 9]), Some(2));
    }
}
