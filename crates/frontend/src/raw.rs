//! A minimal vhost-user wire codec for what vhost 0.18's `Frontend` cannot send.
//!
//! A message is a 12-byte header (three native-endian `u32`s: request, flags, size) followed by
//! `size` payload bytes. File descriptors travel as `SCM_RIGHTS` on the `sendmsg` that carries
//! the first header byte. This codec is deliberately permissive: it sends whatever it is given
//! (truncated, oversized, wrong flags, any number of fds) so hostile tests can use it.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Protocol version carried in bits 0–1 of the header flags.
pub const VERSION: u32 = 0x1;
/// Header flag: this message is a reply.
pub const FLAG_REPLY: u32 = 1 << 2;
/// Header flag: the sender asks for a REPLY_ACK (needs the REPLY_ACK protocol feature).
pub const FLAG_NEED_REPLY: u32 = 1 << 3;
/// Size of the message header.
pub const HEADER_SIZE: usize = 12;
/// The largest payload [`recv_message`] accepts; larger sizes are reported as invalid data.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Maximum number of fds received with one message (the protocol allows 32).
const MAX_FDS: usize = 32;

/// A vhost-user message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgHeader {
    /// Request code (`FrontendReq` or `BackendReq` value).
    pub request: u32,
    /// Flags: version, REPLY, NEED_REPLY.
    pub flags: u32,
    /// Payload size in bytes.
    pub size: u32,
}

impl MsgHeader {
    /// A header for `request` with `flags` and a payload of `size` bytes.
    pub fn new(request: u32, flags: u32, size: u32) -> Self {
        MsgHeader {
            request,
            flags,
            size,
        }
    }

    /// Encodes the header as it goes on the wire.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    /// Decodes a header.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        MsgHeader {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// Whether the REPLY flag is set.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// Whether the NEED_REPLY flag is set.
    pub fn needs_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// The protocol version in the flags.
    pub fn version(&self) -> u32 {
        self.flags & 0x3
    }
}

/// A received message with its payload and any attached fds.
#[derive(Debug)]
pub struct RawMessage {
    /// The header as received.
    pub header: MsgHeader,
    /// Exactly `header.size` bytes.
    pub payload: Vec<u8>,
    /// File descriptors received with the message.
    pub fds: Vec<OwnedFd>,
}

impl RawMessage {
    /// The payload as a `u64`, if it is exactly 8 bytes (REPLY_ACK, GET_* replies).
    pub fn payload_u64(&self) -> Option<u64> {
        let b: [u8; 8] = self.payload.as_slice().try_into().ok()?;
        Some(u64::from_ne_bytes(b))
    }
}

/// Sends a header and payload with `fds` attached to the first byte.
pub fn send_message(
    sock: &UnixStream,
    header: &MsgHeader,
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let hdr = header.to_bytes();
    send_vectored(sock, &[&hdr, payload], fds)
}

/// Sends arbitrary bytes (e.g. a truncated header) with `fds` attached to the first `sendmsg`.
pub fn send_bytes(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    send_vectored(sock, &[bytes], fds)
}

fn send_vectored(sock: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0usize;
    let mut first = true;
    while sent < total || first {
        // Rebuild the iovecs past what was already sent.
        let mut skip = sent;
        let mut iov = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            iov.push(IoSlice::new(&p[skip..]));
            skip = 0;
        }
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if first && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => {
                sent += n;
                first = false;
                if total == 0 {
                    break;
                }
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Waits up to `timeout` (forever if `None`) for `fd` to become readable or hung up.
/// Returns false on timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let remaining = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so a sub-millisecond remainder does not spin.
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut pfd, remaining) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
            }
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// [`wait_readable`] for an fd owner without `AsFd` (vmm-sys-util's `EventFd`).
pub fn wait_readable_fd(owner: &impl AsRawFd, timeout: Option<Duration>) -> io::Result<bool> {
    // SAFETY: `owner` owns the fd and is borrowed for the whole call, so the fd stays open.
    let fd = unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) };
    wait_readable(fd, timeout)
}

/// Receives into `buf` until it is full, collecting any fds that arrive.
/// EOF before the first byte is `UnexpectedEof` as well: the caller asked for a message.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "timed out waiting for the peer",
                ))
            }
            Err(e) => return Err(e.into()),
        };
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel just installed this fd in our table for this
                        // message; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        if msg.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection",
            ));
        }
        got += msg.bytes;
    }
    Ok(())
}

/// Receives one message. Returns `Ok(None)` if nothing arrives within `timeout` (`None` waits
/// forever); a closed peer is `UnexpectedEof`; a payload larger than [`MAX_PAYLOAD`] is
/// `InvalidData` (the stream is then out of sync).
pub fn recv_message(
    sock: &UnixStream,
    timeout: Option<Duration>,
) -> io::Result<Option<RawMessage>> {
    if !wait_readable(sock.as_fd(), timeout)? {
        return Ok(None);
    }
    let mut fds = Vec::new();
    let mut hdr = [0u8; HEADER_SIZE];
    recv_exact(sock, &mut hdr, &mut fds)?;
    let header = MsgHeader::from_bytes(&hdr);
    let size = header.size as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "peer announced a {size}-byte payload (request {})",
                header.request
            ),
        ));
    }
    let mut payload = vec![0u8; size];
    recv_exact(sock, &mut payload, &mut fds)?;
    Ok(Some(RawMessage {
        header,
        payload,
        fds,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn header_round_trips() {
        let h = MsgHeader::new(39, VERSION | FLAG_NEED_REPLY, 8);
        assert_eq!(MsgHeader::from_bytes(&h.to_bytes()), h);
        assert!(h.needs_reply() && !h.is_reply());
        assert_eq!(h.version(), 1);
    }

    #[test]
    fn message_with_fds_round_trips_and_timeouts_report_none() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(recv_message(&b, Some(Duration::from_millis(10)))
            .unwrap()
            .is_none());
        let (r, w) = nix::unistd::pipe().unwrap();
        let hdr = MsgHeader::new(21, VERSION, 8);
        send_message(&a, &hdr, &7u64.to_ne_bytes(), &[r.as_raw_fd()]).unwrap();
        let m = recv_message(&b, Some(Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        assert_eq!(m.header, hdr);
        assert_eq!(m.payload_u64(), Some(7));
        assert_eq!(m.fds.len(), 1);
        // The received fd is the pipe's read end.
        nix::unistd::write(&w, b"x").unwrap();
        let mut byte = [0u8; 1];
        nix::unistd::read(&m.fds[0], &mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }

    #[test]
    fn truncated_message_and_eof_are_errors() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&MsgHeader::new(1, VERSION, 8).to_bytes())
            .unwrap();
        a.write_all(&[1, 2, 3]).unwrap();
        drop(a);
        let err = recv_message(&b, Some(Duration::from_secs(5))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
