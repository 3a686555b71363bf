//! Handover frames on the control socket: a magic, a kind, a descriptor count and a payload
//! length, then the payload; descriptors ride SCM_RIGHTS with a frame's first bytes. Every
//! wait has a deadline, and a frame is checked (magic, kind, size cap, descriptor count)
//! before its payload is read.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::{io, HandoverError, Kind, FRAME_HEADER, FRAME_MAGIC, MAX_FRAME, SCM_MAX_FD};

/// One frame: its kind, payload and the descriptors that came with its first bytes.
pub(super) struct Frame {
    pub(super) kind: Kind,
    pub(super) payload: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
}

/// Waits until `sock` is ready for `events`, or the deadline passes, or `cancel` is readable.
fn wait(
    sock: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Instant,
    cancel: Option<BorrowedFd<'_>>,
    what: &'static str,
) -> Result<(), HandoverError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandoverError::Timeout {
                what,
                after: Duration::ZERO,
            });
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = vec![PollFd::new(sock, events)];
        if let Some(c) = cancel {
            fds.push(PollFd::new(c, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(io("waiting for the peer")(e.into())),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        if fds.get(1).is_some_and(ready) {
            return Err(HandoverError::Cancelled);
        }
        if ready(&fds[0]) {
            return Ok(());
        }
    }
}

pub(super) fn send_frame(
    sock: &UnixStream,
    kind: Kind,
    payload: &[u8],
    fds: &[RawFd],
    deadline: Instant,
) -> Result<(), HandoverError> {
    let mut header = [0u8; FRAME_HEADER];
    header[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    header[6..8].copy_from_slice(&(fds.len() as u16).to_le_bytes());
    header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let total = FRAME_HEADER + payload.len();
    let mut sent = 0;
    while sent < total {
        wait(
            sock.as_fd(),
            PollFlags::POLLOUT,
            deadline,
            None,
            "room on the control socket",
        )?;
        let (h, p) = if sent < FRAME_HEADER {
            (&header[sent..], payload)
        } else {
            (&header[..0], &payload[sent - FRAME_HEADER..])
        };
        let iov = [std::io::IoSlice::new(h), std::io::IoSlice::new(p)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) => sent += n,
            Err(nix::Error::EINTR | nix::Error::EAGAIN) => {}
            Err(e) => return Err(io("sending a frame")(e.into())),
        }
    }
    Ok(())
}

/// Receives one frame, its descriptors only with its first bytes.
pub(super) fn recv_frame(
    sock: &UnixStream,
    deadline: Instant,
    cancel: Option<BorrowedFd<'_>>,
    what: &'static str,
) -> Result<Frame, HandoverError> {
    let started = Instant::now();
    let timeout = |e| match e {
        HandoverError::Timeout { .. } => HandoverError::Timeout {
            what,
            after: started.elapsed(),
        },
        e => e,
    };
    wait(sock.as_fd(), PollFlags::POLLIN, deadline, cancel, what).map_err(timeout)?;
    let mut header = [0u8; FRAME_HEADER];
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let (got, fds, truncated) = {
        let mut iov = [std::io::IoSliceMut::new(&mut header)];
        let msg = loop {
            match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            ) {
                Err(nix::Error::EINTR) => continue,
                r => break r.map_err(|e| io("receiving a frame")(e.into()))?,
            }
        };
        let mut fds = Vec::new();
        let cmsgs = msg
            .cmsgs()
            .map_err(|e| io("receiving a frame's descriptors")(e.into()))?;
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel has just installed `fd` in this process with
                    // SCM_RIGHTS; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_CTRUNC))
    };
    if got == 0 {
        return Err(HandoverError::Closed { while_: what });
    }
    if truncated {
        return Err(HandoverError::Malformed {
            what: "frame",
            detail: "its descriptors were truncated".into(),
        });
    }
    let mut filled = got;
    read_exact(sock, &mut header, &mut filled, deadline, what).map_err(timeout)?;
    let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let kind = u16::from_le_bytes([header[4], header[5]]);
    let nfds = u16::from_le_bytes([header[6], header[7]]) as usize;
    let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    if magic != FRAME_MAGIC {
        return Err(HandoverError::Malformed {
            what: "frame",
            detail: format!("bad magic {magic:#x}"),
        });
    }
    let kind = Kind::from_u16(kind).ok_or_else(|| HandoverError::Malformed {
        what: "frame",
        detail: format!("unknown kind {kind}"),
    })?;
    if len > MAX_FRAME {
        return Err(HandoverError::Malformed {
            what: "frame",
            detail: format!("{len}-byte payload exceeds {MAX_FRAME}"),
        });
    }
    if nfds != fds.len() {
        return Err(HandoverError::FdCount {
            want: nfds,
            got: fds.len(),
        });
    }
    let mut payload = vec![0u8; len];
    let mut filled = 0;
    read_exact(sock, &mut payload, &mut filled, deadline, what).map_err(timeout)?;
    Ok(Frame { kind, payload, fds })
}

fn read_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    filled: &mut usize,
    deadline: Instant,
    what: &'static str,
) -> Result<(), HandoverError> {
    use std::io::Read;
    while *filled < buf.len() {
        wait(sock.as_fd(), PollFlags::POLLIN, deadline, None, what)?;
        match (&mut &*sock).read(&mut buf[*filled..]) {
            Ok(0) => {
                return Err(HandoverError::Malformed {
                    what: "frame",
                    detail: format!("cut short after {} of {} bytes", *filled, buf.len()),
                })
            }
            Ok(n) => *filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(io("reading a frame")(e)),
        }
    }
    Ok(())
}

pub(super) fn expect_kind(frame: &Frame, want: Kind) -> Result<(), HandoverError> {
    if frame.kind == Kind::Refused {
        return Err(HandoverError::Refused {
            reason: String::from_utf8_lossy(&frame.payload).into_owned(),
        });
    }
    if frame.kind != want {
        return Err(HandoverError::Malformed {
            what: "frame",
            detail: format!("expected {want:?}, got {:?}", frame.kind),
        });
    }
    Ok(())
}
