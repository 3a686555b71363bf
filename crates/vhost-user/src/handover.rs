//! Live upgrade: handing a running device to a new backend process without the frontend seeing
//! a disconnect.
//!
//! The old process listens on a control socket (`--upgrade-socket`). A new process connects
//! to it and the two speak this protocol, in frames (a magic, a kind, an fd count and a length,
//! then the payload; file descriptors ride SCM_RIGHTS with a frame's first bytes):
//!
//! ```text
//! new -> old   HELLO     protocol version, device type, queue count, and what state it reads:
//!                        its accepted compat versions and state formats
//! old -> new   REFUSED   why (incompatible, a state transfer under way, ...); the old one
//!                        serves on as if nothing had happened
//!          or  HANDOVER  the metadata (below), then FDS frames carrying every descriptor it
//!                        names, by index
//! new -> old   TAKEN     the new process has rebuilt the session and commits to running it
//! ```
//!
//! Before HANDOVER the old process quiesces the device exactly as GET_VRING_BASE does (every
//! request taken from a ring completes; nothing is half done) and saves its state. The
//! metadata carries the listening socket, the frontend connection, every memory region (with
//! its GPA, size, frontend address and mmap offset), the dirty log and whether LOG_ALL is on,
//! each ring (size, addresses, next available index, enable bit, kick/call/err eventfds), the
//! backend channel, the negotiated features and protocol features, the device status, the
//! owner flag, the saved state blob, and the control socket itself, so that the new process can
//! be upgraded in turn. The files the socket paths are removed by (the sandbox's reaper pipes)
//! move too: the socket files outlive the old process and go with the last one.
//!
//! TAKEN is the commit point. The new process sends it only once everything is rebuilt and
//! checked, and starts the device only after the send succeeded; the old one exits on it
//! without writing a byte on the frontend connection (the new process holds duplicates of
//! every descriptor, so the frontend sees no hang-up, and messages queued in the socket are
//! read by the new process). If no TAKEN comes in time (the new process refused the state,
//! died, or hangs), the old process shuts the control connection down for reading and looks
//! once more: the kernel either queued TAKEN before the shutdown (the new process runs the
//! device and the old one exits) or fails the new process's send with EPIPE (the new process
//! gives up without touching the device and the old one resumes its queues). Exactly one
//! process runs the rings.
//!
//! Everything received is untrusted, as from a frontend: the metadata is parsed with
//! length-checked readers, every fd index must name exactly one received descriptor, every
//! descriptor is checked for its kind (listening or connected socket, eventfd, pipe), and the
//! regions, log, rings and state go through the same validation as the messages that first
//! set them up.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use outboard_memory::dirty::DirtyLog;
use outboard_memory::{GuestMemoryHandle, RegionDescriptor};
use outboard_virtio::state::{StateReader, StateWriter, FORMAT_VERSION, MAX_STATE_SIZE};
use outboard_virtio::status::DEVICE_NEEDS_RESET;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::EventFd;

use super::{borrow_eventfd, eventfd, supported_protocol_features, VhostUserBackend};
use crate::inflight::{InflightRegion, InflightShape};

/// The version of this protocol.
pub const PROTOCOL_VERSION: u16 = 1;
/// How long the old process waits for a connected peer's HELLO. The frontend's messages wait
/// meanwhile, so this is short.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the old process waits for TAKEN once its device is quiesced and handed over.
pub const TAKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new process waits for the handover once it has said HELLO (the old one may be
/// quiescing slow requests).
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"OBUP");
const METADATA_MAGIC: [u8; 8] = *b"OBHANDOV";
const FRAME_HEADER: usize = 12;
/// The state blob and everything around it.
const MAX_FRAME: usize = MAX_STATE_SIZE + (64 << 10);
/// Descriptors per FDS frame (Linux passes at most 253 per message).
const FDS_PER_FRAME: usize = 200;
/// The most descriptors one handover may carry.
const MAX_HANDOVER_FDS: usize = 4096;
/// The kernel's SCM_MAX_FD: room for this many is made when receiving, so that none leaks.
const SCM_MAX_FD: usize = 253;
const NO_FD: u32 = u32::MAX;
const MAX_PATH: usize = 4096;
const MAX_REGIONS: usize = 512;
const MAX_QUEUES: usize = 1024;
const MAX_LIST: usize = 64;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Hello = 1,
    Refused = 2,
    Handover = 3,
    Fds = 4,
    Taken = 5,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Refused,
            3 => Kind::Handover,
            4 => Kind::Fds,
            5 => Kind::Taken,
            _ => return None,
        })
    }
}

/// Why a handover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The control socket failed.
    #[error("control socket: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the control connection.
    #[error("the peer closed the control connection ({while_})")]
    Closed {
        /// What was awaited.
        while_: &'static str,
    },
    /// The peer did not answer in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// A frame or the metadata is malformed.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The descriptors do not match what the metadata names.
    #[error("expected {want} file descriptors, got {got}")]
    FdCount {
        /// What the metadata names.
        want: usize,
        /// What arrived.
        got: usize,
    },
    /// A descriptor is not of the kind the metadata says.
    #[error("descriptor for {what} is not {expected}")]
    FdKind {
        /// What it should be.
        what: &'static str,
        /// The kind it must have.
        expected: &'static str,
    },
    /// The other process refused (its reason).
    #[error("the other process refused the upgrade: {reason}")]
    Refused {
        /// Its reason.
        reason: String,
    },
    /// The two processes cannot hand over (this side's reason).
    #[error("{0}")]
    Incompatible(String),
    /// The peer is not allowed to take the device.
    #[error("peer process (uid {uid}) is not this backend's user (uid {ours})")]
    Peer {
        /// The peer's uid.
        uid: u32,
        /// Ours.
        ours: u32,
    },
    /// The session could not be rebuilt from the metadata.
    #[error("cannot rebuild the session: {0}")]
    Rebuild(String),
    /// Shutdown was requested during the handover.
    #[error("shutdown requested")]
    Cancelled,
}

impl From<outboard_virtio::state::StateError> for HandoverError {
    fn from(e: outboard_virtio::state::StateError) -> Self {
        HandoverError::Malformed {
            what: "handover metadata",
            detail: e.to_string(),
        }
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> HandoverError {
    move |source| HandoverError::Io { what, source }
}

/// What a new process says about itself: enough for the old one to tell whether it can read
/// the state it would be given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the new process.
    pub protocol: u16,
    /// Its device type (virtio id).
    pub device_type: u32,
    /// Its number of queues.
    pub num_queues: u32,
    /// The compat version it presents.
    pub compat_version: u16,
    /// The compat versions whose state it loads.
    pub accepted_compat: Vec<u16>,
    /// The state blob formats it reads.
    pub state_formats: Vec<u16>,
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let mut w = StateWriter::new();
        w.u16(self.protocol)
            .u32(self.device_type)
            .u32(self.num_queues)
            .u16(self.compat_version);
        write_list(&mut w, &self.accepted_compat);
        write_list(&mut w, &self.state_formats);
        w.finish()
    }

    fn decode(payload: &[u8]) -> Result<Hello, HandoverError> {
        let mut r = StateReader::new(payload);
        let hello = Hello {
            protocol: r.u16("protocol")?,
            device_type: r.u32("device type")?,
            num_queues: r.u32("queue count")?,
            compat_version: r.u16("compat version")?,
            accepted_compat: read_list(&mut r, "accepted compat versions")?,
            state_formats: read_list(&mut r, "state formats")?,
        };
        r.finish()?;
        Ok(hello)
    }
}

fn write_list(w: &mut StateWriter, list: &[u16]) {
    w.u32(list.len() as u32);
    for v in list {
        w.u16(*v);
    }
}

fn read_list(r: &mut StateReader<'_>, what: &'static str) -> Result<Vec<u16>, HandoverError> {
    let n = r.u32(what)? as usize;
    if n > MAX_LIST {
        return Err(HandoverError::Malformed {
            what,
            detail: format!("{n} entries (at most {MAX_LIST})"),
        });
    }
    (0..n).map(|_| Ok(r.u16(what)?)).collect()
}

/// Who removes a socket's file when the process serving it ends.
#[derive(Debug, Default)]
pub struct SocketFileHandover {
    /// The socket's path, if the program created it.
    pub path: Option<PathBuf>,
    /// The write end of the pipe a sandbox reaper waits on to remove the file; whoever holds
    /// it keeps the file in place.
    pub reaper: Option<OwnedFd>,
}

/// A listening socket that moves with a handover.
#[derive(Debug)]
pub struct ListenerHandover {
    /// The socket.
    pub listener: UnixListener,
    /// Its file.
    pub file: SocketFileHandover,
}

/// Where a backend listens for upgrade requests, and the program's sockets that move to the
/// process that takes the device.
#[derive(Debug)]
pub struct UpgradePoint {
    /// The control socket (handed on too, so that the next process can be upgraded in turn).
    pub control: ListenerHandover,
    /// The vhost-user listening socket, if the program serves one.
    pub listener: Option<ListenerHandover>,
}

/// A handover as the new process received it: checked, typed, not yet applied.
#[derive(Debug)]
pub struct Received {
    /// The control connection, for TAKEN.
    pub control: UnixStream,
    /// The upgrade socket and the vhost-user listener.
    pub sockets: UpgradePoint,
    /// The frontend connection and its session, if a frontend was connected.
    pub session: Option<SessionHandover>,
}

/// A ring as the driver left it.
#[derive(Debug)]
pub struct QueueHandover {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    addressed: bool,
    enabled: bool,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    err: Option<EventFd>,
    reset_base: Option<u16>,
}

/// One memory region.
#[derive(Debug)]
struct RegionHandover {
    desc: RegionDescriptor,
    adds: u32,
    file: std::fs::File,
}

/// The session with a connected frontend.
#[derive(Debug)]
pub struct SessionHandover {
    /// The frontend connection.
    pub connection: UnixStream,
    owned: bool,
    protocol: u64,
    acked: Option<u64>,
    log_all: bool,
    status: u8,
    regions: Vec<RegionHandover>,
    log: Option<(std::fs::File, u64, u64)>,
    /// The inflight region: its file, offset, queue count and queue size.
    inflight: Option<(std::fs::File, u64, u16, u16)>,
    channel: Option<UnixStream>,
    queues: Vec<QueueHandover>,
    state: Vec<u8>,
}

// ---------------------------------------------------------------------------------------------
// Frames.

struct Frame {
    kind: Kind,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
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

fn send_frame(
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
fn recv_frame(
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

fn expect_kind(frame: &Frame, want: Kind) -> Result<(), HandoverError> {
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

// ---------------------------------------------------------------------------------------------
// Descriptors by index.

/// Descriptors to send, each named in the metadata by its index.
#[derive(Default)]
struct Outgoing {
    fds: Vec<OwnedFd>,
}

impl Outgoing {
    fn push(&mut self, fd: Option<OwnedFd>) -> u32 {
        match fd {
            Some(fd) => {
                self.fds.push(fd);
                (self.fds.len() - 1) as u32
            }
            None => NO_FD,
        }
    }

    fn dup(&mut self, fd: Option<BorrowedFd<'_>>) -> Result<u32, HandoverError> {
        let owned = fd
            .map(|f| f.try_clone_to_owned())
            .transpose()
            .map_err(io("duplicating a descriptor"))?;
        Ok(self.push(owned))
    }
}

/// Received descriptors; each must be named exactly once.
struct Incoming {
    fds: Vec<Option<OwnedFd>>,
}

impl Incoming {
    fn take(&mut self, index: u32, what: &'static str) -> Result<Option<OwnedFd>, HandoverError> {
        if index == NO_FD {
            return Ok(None);
        }
        let count = self.fds.len();
        let slot = self
            .fds
            .get_mut(index as usize)
            .ok_or_else(|| HandoverError::Malformed {
                what: "handover metadata",
                detail: format!("{what}: descriptor {index} of {count}"),
            })?;
        slot.take()
            .map(Some)
            .ok_or_else(|| HandoverError::Malformed {
                what: "handover metadata",
                detail: format!("{what}: descriptor {index} is named twice"),
            })
    }

    fn take_required(&mut self, index: u32, what: &'static str) -> Result<OwnedFd, HandoverError> {
        self.take(index, what)?
            .ok_or_else(|| HandoverError::Malformed {
                what: "handover metadata",
                detail: format!("{what} is missing"),
            })
    }

    fn finish(self) -> Result<(), HandoverError> {
        match self.fds.iter().position(Option::is_some) {
            None => Ok(()),
            Some(i) => Err(HandoverError::Malformed {
                what: "handover metadata",
                detail: format!("descriptor {i} is not named"),
            }),
        }
    }
}

fn socket_kind(fd: &OwnedFd) -> Option<(bool, nix::sys::socket::SockType)> {
    let listening = getsockopt(fd, sockopt::AcceptConn).ok()?;
    let ty = getsockopt(fd, sockopt::SockType).ok()?;
    Some((listening, ty))
}

fn listener_fd(fd: OwnedFd, what: &'static str) -> Result<UnixListener, HandoverError> {
    match socket_kind(&fd) {
        Some((true, nix::sys::socket::SockType::Stream)) => Ok(UnixListener::from(fd)),
        _ => Err(HandoverError::FdKind {
            what,
            expected: "a listening stream socket",
        }),
    }
}

fn stream_fd(fd: OwnedFd, what: &'static str) -> Result<UnixStream, HandoverError> {
    match socket_kind(&fd) {
        Some((false, nix::sys::socket::SockType::Stream)) => Ok(UnixStream::from(fd)),
        _ => Err(HandoverError::FdKind {
            what,
            expected: "a connected stream socket",
        }),
    }
}

fn pipe_fd(fd: OwnedFd, what: &'static str) -> Result<OwnedFd, HandoverError> {
    let file = std::fs::File::from(fd);
    match file.metadata() {
        Ok(m) if m.file_type().is_fifo() => Ok(file.into()),
        _ => Err(HandoverError::FdKind {
            what,
            expected: "a pipe",
        }),
    }
}

fn event_fd(fd: Option<OwnedFd>, what: &'static str) -> Result<Option<EventFd>, HandoverError> {
    fd.map(|fd| {
        eventfd(fd).map_err(|_| HandoverError::FdKind {
            what,
            expected: "an eventfd",
        })
    })
    .transpose()
}

// ---------------------------------------------------------------------------------------------
// Metadata.

fn write_file(
    w: &mut StateWriter,
    out: &mut Outgoing,
    file: &SocketFileHandover,
) -> Result<(), HandoverError> {
    let path = file
        .path
        .as_ref()
        .map(|p| p.as_os_str().as_encoded_bytes().to_vec())
        .unwrap_or_default();
    w.bytes(&path);
    let reaper = out.dup(file.reaper.as_ref().map(AsFd::as_fd))?;
    w.u32(reaper);
    Ok(())
}

fn read_file(
    r: &mut StateReader<'_>,
    fds: &mut Incoming,
) -> Result<SocketFileHandover, HandoverError> {
    let path = r.bytes("socket path", MAX_PATH)?;
    let path = if path.is_empty() {
        None
    } else {
        let s = std::str::from_utf8(path).map_err(|_| HandoverError::Malformed {
            what: "handover metadata",
            detail: "a socket path is not UTF-8".into(),
        })?;
        Some(PathBuf::from(s))
    };
    let reaper = fds
        .take(r.u32("reaper pipe")?, "reaper pipe")?
        .map(|fd| pipe_fd(fd, "the reaper pipe"))
        .transpose()?;
    Ok(SocketFileHandover { path, reaper })
}

fn write_listener(
    w: &mut StateWriter,
    out: &mut Outgoing,
    l: Option<&ListenerHandover>,
) -> Result<(), HandoverError> {
    w.bool(l.is_some());
    if let Some(l) = l {
        w.u32(out.dup(Some(l.listener.as_fd()))?);
        write_file(w, out, &l.file)?;
    }
    Ok(())
}

fn read_listener(
    r: &mut StateReader<'_>,
    fds: &mut Incoming,
    what: &'static str,
) -> Result<Option<ListenerHandover>, HandoverError> {
    if !r.bool(what)? {
        return Ok(None);
    }
    let fd = fds.take_required(r.u32(what)?, what)?;
    let listener = listener_fd(fd, what)?;
    let file = read_file(r, fds)?;
    Ok(Some(ListenerHandover { listener, file }))
}

fn write_opt_u64(w: &mut StateWriter, v: Option<u64>) {
    w.bool(v.is_some()).u64(v.unwrap_or(0));
}

fn read_opt_u64(r: &mut StateReader<'_>, what: &'static str) -> Result<Option<u64>, HandoverError> {
    let present = r.bool(what)?;
    let v = r.u64(what)?;
    Ok(present.then_some(v))
}

/// Parses the metadata and takes every descriptor it names from `fds` (all must be named).
fn decode_metadata(
    payload: &[u8],
    fds: Vec<OwnedFd>,
    num_queues: usize,
    control: UnixStream,
) -> Result<Received, HandoverError> {
    let mut r = StateReader::new(payload);
    let mut magic = [0u8; 8];
    for b in &mut magic {
        *b = r.u8("magic")?;
    }
    if magic != METADATA_MAGIC {
        return Err(HandoverError::Malformed {
            what: "handover metadata",
            detail: "bad magic".into(),
        });
    }
    let version = r.u16("version")?;
    if version != PROTOCOL_VERSION {
        return Err(HandoverError::Malformed {
            what: "handover metadata",
            detail: format!("version {version} (this build reads {PROTOCOL_VERSION})"),
        });
    }
    let count = r.u32("descriptor count")? as usize;
    if count != fds.len() {
        return Err(HandoverError::FdCount {
            want: count,
            got: fds.len(),
        });
    }
    let mut fds = Incoming {
        fds: fds.into_iter().map(Some).collect(),
    };
    let upgrade = read_listener(&mut r, &mut fds, "the upgrade socket")?.ok_or_else(|| {
        HandoverError::Malformed {
            what: "handover metadata",
            detail: "no upgrade socket".into(),
        }
    })?;
    let listener = read_listener(&mut r, &mut fds, "the vhost-user socket")?;
    let session = if r.bool("session")? {
        Some(decode_session(&mut r, &mut fds, num_queues)?)
    } else {
        None
    };
    r.finish()?;
    fds.finish()?;
    Ok(Received {
        control,
        sockets: UpgradePoint {
            control: upgrade,
            listener,
        },
        session,
    })
}

fn decode_session(
    r: &mut StateReader<'_>,
    fds: &mut Incoming,
    num_queues: usize,
) -> Result<SessionHandover, HandoverError> {
    let connection = fds.take_required(r.u32("connection")?, "the frontend connection")?;
    let connection = stream_fd(connection, "the frontend connection")?;
    let owned = r.bool("owner")?;
    let protocol = r.u64("protocol features")?;
    let acked = read_opt_u64(r, "acked features")?;
    let log_all = r.bool("LOG_ALL")?;
    let status = r.u8("status")?;
    let nregions = r.u32("region count")? as usize;
    if nregions > MAX_REGIONS {
        return Err(HandoverError::Malformed {
            what: "handover metadata",
            detail: format!("{nregions} memory regions (at most {MAX_REGIONS})"),
        });
    }
    let mut regions = Vec::with_capacity(nregions);
    for _ in 0..nregions {
        let desc = RegionDescriptor {
            guest_phys_addr: r.u64("region GPA")?,
            memory_size: r.u64("region size")?,
            user_addr: r.u64("region user address")?,
            mmap_offset: r.u64("region mmap offset")?,
        };
        let adds = r.u32("region add count")?;
        if adds == 0 {
            return Err(HandoverError::Malformed {
                what: "handover metadata",
                detail: "a region added zero times".into(),
            });
        }
        let file = fds.take_required(r.u32("region fd")?, "a memory region")?;
        regions.push(RegionHandover {
            desc,
            adds,
            file: file.into(),
        });
    }
    let log = if r.bool("dirty log")? {
        let fd = fds.take_required(r.u32("dirty log fd")?, "the dirty log")?;
        let offset = r.u64("dirty log offset")?;
        let size = r.u64("dirty log size")?;
        Some((std::fs::File::from(fd), offset, size))
    } else {
        None
    };
    let inflight = if r.bool("inflight region")? {
        let fd = fds.take_required(r.u32("inflight fd")?, "the inflight region")?;
        let offset = r.u64("inflight offset")?;
        let num_queues = r.u16("inflight queue count")?;
        let queue_size = r.u16("inflight queue size")?;
        Some((std::fs::File::from(fd), offset, num_queues, queue_size))
    } else {
        None
    };
    let channel = fds
        .take(r.u32("backend channel")?, "the backend channel")?
        .map(|fd| stream_fd(fd, "the backend channel"))
        .transpose()?;
    let nqueues = r.u32("queue count")? as usize;
    if nqueues > MAX_QUEUES || nqueues != num_queues {
        return Err(HandoverError::Malformed {
            what: "handover metadata",
            detail: format!("{nqueues} queues, this device has {num_queues}"),
        });
    }
    let mut queues = Vec::with_capacity(nqueues);
    for _ in 0..nqueues {
        let size = r.u16("queue size")?;
        let desc = r.u64("descriptor table")?;
        let avail = r.u64("available ring")?;
        let used = r.u64("used ring")?;
        let next_avail = r.u16("next available index")?;
        let addressed = r.bool("addressed")?;
        let enabled = r.bool("enabled")?;
        let kick = event_fd(fds.take(r.u32("kick")?, "a kick eventfd")?, "a kick")?;
        let call = event_fd(fds.take(r.u32("call")?, "a call eventfd")?, "a call")?;
        let err = event_fd(fds.take(r.u32("err")?, "an error eventfd")?, "an error fd")?;
        let reset_base = read_opt_u64(r, "reset base")?
            .map(|b| {
                u16::try_from(b).map_err(|_| HandoverError::Malformed {
                    what: "handover metadata",
                    detail: format!("reset base {b}"),
                })
            })
            .transpose()?;
        queues.push(QueueHandover {
            size,
            desc,
            avail,
            used,
            next_avail,
            addressed,
            enabled,
            kick,
            call,
            err,
            reset_base,
        });
    }
    let state = r.bytes("state", MAX_STATE_SIZE)?.to_vec();
    Ok(SessionHandover {
        connection,
        owned,
        protocol,
        acked,
        log_all,
        status,
        regions,
        log,
        inflight,
        channel,
        queues,
        state,
    })
}

// ---------------------------------------------------------------------------------------------
// The old process.

impl VhostUserBackend {
    /// Listens for upgrade requests at `point`: from now on, a new process that connects to its
    /// control socket can take the device over (see the module documentation).
    pub fn set_upgrade_point(&mut self, point: UpgradePoint) {
        self.upgrade = Some(point);
    }

    /// Stops listening for upgrade requests and gives back what [`Self::set_upgrade_point`]
    /// was given (the program drops it before it waits for its socket reapers: the point
    /// holds duplicates of their pipes).
    pub fn take_upgrade_point(&mut self) -> Option<UpgradePoint> {
        self.upgrade.take()
    }

    /// The control socket, for the loops' poll sets.
    pub(super) fn upgrade_fd(&self) -> Option<BorrowedFd<'_>> {
        self.upgrade.as_ref().map(|u| u.control.listener.as_fd())
    }

    /// Serves one upgrade request on the control socket, at a message boundary of the session
    /// on `connection` (if a frontend is connected). Returns true if the device now belongs to
    /// the new process: the caller must then leave without touching the session.
    pub(super) fn serve_upgrade(
        &mut self,
        connection: Option<&UnixStream>,
        shutdown: &EventFd,
    ) -> bool {
        let Some(point) = self.upgrade.take() else {
            return false;
        };
        let accepted = point.control.listener.accept();
        let sock = match accepted {
            Ok((sock, _)) => sock,
            Err(e) => {
                log::warn!("upgrade: cannot accept on the control socket: {e}");
                self.upgrade = Some(point);
                return false;
            }
        };
        let start = Instant::now();
        let result = self.hand_over(&sock, &point, connection, shutdown);
        match result {
            Ok(()) => {
                log::info!(
                    "upgrade: the device belongs to the new process ({} µs from the request)",
                    start.elapsed().as_micros()
                );
                // The sockets stay open until this process exits; their files are the new
                // process's to keep.
                self.upgrade = Some(point);
                true
            }
            Err(e) => {
                log::warn!("upgrade refused: {e}; serving on");
                self.upgrade = Some(point);
                false
            }
        }
    }

    fn hand_over(
        &mut self,
        sock: &UnixStream,
        point: &UpgradePoint,
        connection: Option<&UnixStream>,
        shutdown: &EventFd,
    ) -> Result<(), HandoverError> {
        check_peer(sock)?;
        let hello = recv_frame(
            sock,
            Instant::now() + HELLO_TIMEOUT,
            Some(borrow_eventfd(shutdown)),
            "HELLO",
        )
        .and_then(|f| {
            expect_kind(&f, Kind::Hello)?;
            Hello::decode(&f.payload)
        })?;
        if let Err(reason) = self.can_hand_over(&hello, connection.is_some()) {
            let _ = send_frame(
                sock,
                Kind::Refused,
                reason.as_bytes(),
                &[],
                Instant::now() + HELLO_TIMEOUT,
            );
            return Err(HandoverError::Incompatible(reason));
        }
        // Quiesce: every request taken from a ring completes, as for GET_VRING_BASE. Taking
        // the memory away keeps the device stopped until it is given back.
        let paused = connection.is_some() && self.memory.is_some();
        if paused {
            self.framework.set_memory(None);
        }
        let result = self.send_handover(sock, point, connection, shutdown);
        if result.is_err() && paused {
            log::info!("upgrade: resuming the device");
            self.framework.set_memory(self.memory.clone());
        }
        result
    }

    fn can_hand_over(&self, hello: &Hello, connected: bool) -> Result<(), String> {
        if hello.protocol != PROTOCOL_VERSION {
            return Err(format!(
                "handover protocol {} is not this backend's ({PROTOCOL_VERSION})",
                hello.protocol
            ));
        }
        let device_type = self.framework.device_type().id();
        if hello.device_type != device_type {
            return Err(format!(
                "the new backend is device type {}, this one is type {device_type}",
                hello.device_type
            ));
        }
        let queues = self.framework.num_queues();
        if hello.num_queues as usize != queues {
            return Err(format!(
                "the new backend has {} queues, this one has {queues}",
                hello.num_queues
            ));
        }
        if !hello.state_formats.contains(&FORMAT_VERSION) {
            return Err(format!(
                "the new backend reads state formats {:?}, this one writes format {FORMAT_VERSION}",
                hello.state_formats
            ));
        }
        let compat = self.config.compat_version;
        if !hello.accepted_compat.contains(&compat) {
            return Err(format!(
                "state compat version {compat} cannot be loaded by the new backend (it accepts {:?})",
                hello.accepted_compat
            ));
        }
        if !connected {
            return Ok(());
        }
        if self.transfer.is_some() {
            return Err("a device state transfer (SET_DEVICE_STATE_FD) is under way".into());
        }
        if self.framework.status() & DEVICE_NEEDS_RESET != 0 {
            return Err("the device needs a reset; upgrade once the driver has reset it".into());
        }
        Ok(())
    }

    fn send_handover(
        &mut self,
        sock: &UnixStream,
        point: &UpgradePoint,
        connection: Option<&UnixStream>,
        shutdown: &EventFd,
    ) -> Result<(), HandoverError> {
        let (metadata, fds) = self
            .encode_metadata(point, connection)
            .map_err(|e| HandoverError::Rebuild(format!("cannot describe the session: {e}")))?;
        let deadline = Instant::now() + TAKEN_TIMEOUT;
        send_frame(sock, Kind::Handover, &metadata, &[], deadline)?;
        let raw: Vec<RawFd> = fds.fds.iter().map(AsRawFd::as_raw_fd).collect();
        for chunk in raw.chunks(FDS_PER_FRAME) {
            send_frame(sock, Kind::Fds, &[], chunk, deadline)?;
        }
        drop(fds);
        let answer = recv_frame(sock, deadline, Some(borrow_eventfd(shutdown)), "TAKEN");
        match answer {
            Ok(f) => expect_kind(&f, Kind::Taken),
            Err(e) => {
                // Commit or abort, decided by the kernel: after this shutdown the new process
                // can no longer send TAKEN, and one it sent before is still queued.
                let _ = sock.shutdown(std::net::Shutdown::Read);
                match recv_frame(
                    sock,
                    Instant::now() + Duration::from_millis(1),
                    None,
                    "TAKEN",
                ) {
                    Ok(f) if f.kind == Kind::Taken => Ok(()),
                    _ => Err(e),
                }
            }
        }
    }

    fn encode_metadata(
        &mut self,
        point: &UpgradePoint,
        connection: Option<&UnixStream>,
    ) -> Result<(Vec<u8>, Outgoing), HandoverError> {
        let mut out = Outgoing::default();
        let mut w = StateWriter::new();
        for b in METADATA_MAGIC {
            w.u8(b);
        }
        w.u16(PROTOCOL_VERSION);
        let mut body = StateWriter::new();
        write_listener(&mut body, &mut out, Some(&point.control))?;
        write_listener(&mut body, &mut out, point.listener.as_ref())?;
        body.bool(connection.is_some());
        if let Some(conn) = connection {
            self.encode_session(&mut body, &mut out, conn)?;
        }
        w.u32(out.fds.len() as u32);
        let mut bytes = w.finish();
        bytes.extend_from_slice(&body.finish());
        Ok((bytes, out))
    }

    fn encode_session(
        &mut self,
        w: &mut StateWriter,
        out: &mut Outgoing,
        connection: &UnixStream,
    ) -> Result<(), HandoverError> {
        // The device is paused and has no memory: saving does not start it again.
        let state = self
            .framework
            .save_state(self.config.compat_version)
            .and_then(|s| Ok(s.encode()?))
            .map_err(|e| HandoverError::Rebuild(format!("cannot save the device state: {e}")))?;
        let fw = &self.framework;
        w.u32(out.dup(Some(connection.as_fd()))?);
        w.bool(self.owned).u64(self.protocol.bits());
        write_opt_u64(w, fw.acked_features());
        w.bool(self.log_all).u8(fw.status() & !DEVICE_NEEDS_RESET);
        let regions: Vec<_> = self.table.region_files().collect();
        w.u32(regions.len() as u32);
        for (desc, file, adds) in regions {
            w.u64(desc.guest_phys_addr)
                .u64(desc.memory_size)
                .u64(desc.user_addr)
                .u64(desc.mmap_offset)
                .u32(adds);
            w.u32(out.dup(Some(file.as_fd()))?);
        }
        let log = self.log.as_ref().and_then(|l| Some((l.file()?, l.len())));
        w.bool(log.is_some());
        if let Some(((file, offset), len)) = log {
            w.u32(out.dup(Some(file.as_fd()))?)
                .u64(offset)
                .u64(len as u64);
        }
        w.bool(self.inflight.is_some());
        if let Some(region) = &self.inflight {
            let shape = region.shape();
            w.u32(out.dup(Some(region.file().as_fd()))?)
                .u64(region.offset())
                .u16(shape.num_queues)
                .u16(shape.queue_size);
        }
        let channel = self
            .interrupt
            .dup_channel()
            .map_err(io("duplicating the backend channel"))?;
        w.u32(out.push(channel.map(OwnedFd::from)));
        w.u32(fw.num_queues() as u32);
        for i in 0..fw.num_queues() {
            let q = fw.queue_setup(i).expect("index below the queue count");
            let c = q.config;
            w.u16(c.size)
                .u64(c.desc_table)
                .u64(c.avail_ring)
                .u64(c.used_ring)
                .u16(c.next_avail)
                .bool(q.addressed)
                .bool(q.enabled);
            w.u32(out.dup(q.kick.map(|k| borrow_eventfd(k)))?);
            let (call, err) = self
                .interrupt
                .dup_queue_fds(i)
                .map_err(io("duplicating call/error eventfds"))?;
            w.u32(out.push(call.map(eventfd_owned)));
            w.u32(out.push(err.map(eventfd_owned)));
            let reset_base = self.reset_bases.get(i).copied().flatten();
            write_opt_u64(w, reset_base.map(u64::from));
        }
        w.bytes(&state);
        Ok(())
    }
}

fn eventfd_owned(e: EventFd) -> OwnedFd {
    use std::os::fd::IntoRawFd;
    // SAFETY: `into_raw_fd` hands over sole ownership of the eventfd's open descriptor.
    unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
}

/// Only a process of this backend's user may take its device.
fn check_peer(sock: &UnixStream) -> Result<(), HandoverError> {
    let cred = getsockopt(sock, sockopt::PeerCredentials)
        .map_err(|e| io("reading the peer's credentials")(e.into()))?;
    let ours = nix::unistd::geteuid().as_raw();
    let uid = cred.uid();
    if uid == ours {
        Ok(())
    } else {
        Err(HandoverError::Peer { uid, ours })
    }
}

// ---------------------------------------------------------------------------------------------
// The new process.

/// Connects to the running backend's control socket at `path`, says `hello`, and receives the
/// device (checked, not yet applied). Call before entering the sandbox; then
/// [`VhostUserBackend::adopt`], [`confirm_taken`] and [`VhostUserBackend::start_adopted`].
pub fn request_handover(path: &std::path::Path, hello: &Hello) -> Result<Received, HandoverError> {
    let sock = UnixStream::connect(path).map_err(io("connecting to the running backend"))?;
    receive_handover(sock, hello)
}

/// As [`request_handover`], on an already connected control socket.
pub fn receive_handover(sock: UnixStream, hello: &Hello) -> Result<Received, HandoverError> {
    let deadline = Instant::now() + HANDOVER_TIMEOUT;
    send_frame(&sock, Kind::Hello, &hello.encode(), &[], deadline)?;
    let frame = recv_frame(&sock, deadline, None, "the handover")?;
    expect_kind(&frame, Kind::Handover)?;
    let metadata = frame.payload;
    let want = metadata_fd_count(&metadata)?;
    if want > MAX_HANDOVER_FDS {
        return Err(HandoverError::FdCount { want, got: 0 });
    }
    let mut fds = Vec::with_capacity(want);
    while fds.len() < want {
        let f = recv_frame(&sock, deadline, None, "the handover's descriptors")?;
        expect_kind(&f, Kind::Fds)?;
        if f.fds.is_empty() || fds.len() + f.fds.len() > want {
            return Err(HandoverError::FdCount {
                want,
                got: fds.len() + f.fds.len(),
            });
        }
        fds.extend(f.fds);
    }
    decode_metadata(&metadata, fds, hello.num_queues as usize, sock)
}

fn metadata_fd_count(metadata: &[u8]) -> Result<usize, HandoverError> {
    let mut r = StateReader::new(metadata);
    for _ in 0..METADATA_MAGIC.len() {
        r.u8("magic")?;
    }
    r.u16("version")?;
    Ok(r.u32("descriptor count")? as usize)
}

/// Tells the old process the device is taken. Only if this succeeds may the device start:
/// an error means the old process gave up waiting and runs the device again.
pub fn confirm_taken(control: &UnixStream) -> Result<(), HandoverError> {
    send_frame(
        control,
        Kind::Taken,
        &[],
        &[],
        Instant::now() + Duration::from_secs(1),
    )
}

/// Tells the old process why this one cannot take the device; it logs the reason and serves
/// on.
pub fn report_failure(control: &UnixStream, reason: &str) {
    let deadline = Instant::now() + Duration::from_secs(1);
    let _ = send_frame(control, Kind::Refused, reason.as_bytes(), &[], deadline);
}

impl VhostUserBackend {
    /// What this backend tells a running one it takes the device from.
    pub fn handover_hello(&self) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            device_type: self.framework.device_type().id(),
            num_queues: self.framework.num_queues() as u32,
            compat_version: self.config.compat_version,
            accepted_compat: self.config.accepted_compat.clone(),
            state_formats: vec![FORMAT_VERSION],
        }
    }

    /// Rebuilds the session described by `session` (everything but the frontend connection,
    /// which the caller serves next), checking it as the messages that first set it up were
    /// checked. The device does not run yet: [`VhostUserBackend::start_adopted`] starts it once
    /// [`confirm_taken`] has succeeded. On error this backend must not be used.
    pub fn adopt(&mut self, session: SessionHandover) -> Result<UnixStream, HandoverError> {
        let fail =
            |what: &str, e: &dyn std::fmt::Display| HandoverError::Rebuild(format!("{what}: {e}"));
        let s = session;
        let supported = supported_protocol_features().bits();
        if s.protocol & !supported != 0 {
            return Err(HandoverError::Rebuild(format!(
                "protocol features {:#x} were negotiated but this backend does not implement them",
                s.protocol & !supported
            )));
        }
        self.owned = s.owned;
        self.protocol = VhostUserProtocolFeatures::from_bits_truncate(s.protocol);
        self.framework
            .set_start_on_driver_ok(self.protocol.contains(VhostUserProtocolFeatures::STATUS));
        let mut first = Vec::new();
        let mut again = Vec::new();
        for region in s.regions {
            for _ in 1..region.adds {
                let dup = region
                    .file
                    .try_clone()
                    .map_err(|e| fail("duplicating a region's file", &e))?;
                again.push((region.desc, dup));
            }
            first.push((region.desc, region.file));
        }
        self.table
            .replace(first)
            .map_err(|e| fail("memory table", &e))?;
        for (desc, file) in again {
            self.table
                .add(desc, file)
                .map_err(|e| fail("memory table", &e))?;
        }
        if !self.table.is_empty() {
            let snapshot = self
                .table
                .snapshot()
                .map_err(|e| fail("memory table", &e))?;
            // Given to the framework only by `start_adopted`: until then the device cannot run.
            self.memory = Some(GuestMemoryHandle::new(snapshot));
        }
        if let Some(acked) = s.acked {
            self.framework
                .set_features(acked)
                .map_err(|e| fail("features", &e))?;
        }
        self.log_all = s.log_all;
        if let Some((file, offset, size)) = s.log {
            let log = DirtyLog::new(file, offset, size).map_err(|e| fail("dirty log", &e))?;
            self.log = Some(Arc::new(log));
        }
        self.update_logging();
        if let Some((file, offset, num_queues, queue_size)) = s.inflight {
            let region = InflightShape::new(num_queues, queue_size, self.framework.num_queues())
                .and_then(|shape| InflightRegion::open(file, offset, shape.size(), shape))
                .map_err(|e| fail("inflight region", &e))?;
            self.set_inflight(region);
        }
        let mut reset_bases = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.into_iter().enumerate() {
            let index = i as u32;
            let queue = |e: &dyn std::fmt::Display| fail(&format!("queue {i}"), e);
            self.framework
                .set_queue_size(index, u32::from(q.size))
                .map_err(|e| queue(&e))?;
            if q.addressed {
                self.framework
                    .set_queue_addresses(index, q.desc, q.avail, q.used)
                    .map_err(|e| queue(&e))?;
            }
            self.framework
                .set_queue_base(index, q.next_avail)
                .map_err(|e| queue(&e))?;
            self.framework
                .set_queue_enabled(index, q.enabled)
                .map_err(|e| queue(&e))?;
            if let Some(kick) = q.kick {
                self.framework
                    .start_queue(index, kick)
                    .map_err(|e| queue(&e))?;
            }
            self.interrupt.set_call(i, q.call);
            self.interrupt.set_err(i, q.err);
            reset_bases.push(q.reset_base);
        }
        self.reset_bases = reset_bases;
        self.interrupt.set_channel(s.channel);
        if !s.state.is_empty() {
            self.apply_state(&s.state)
                .map_err(|e| fail("device state", &e))?;
        }
        let status = s.status;
        if status != 0 {
            self.framework
                .set_status(status)
                .map_err(|e| fail("device status", &e))?;
        }
        Ok(s.connection)
    }

    /// Starts the adopted device (after [`confirm_taken`]).
    pub fn start_adopted(&mut self) {
        if self.memory.is_some() {
            self.framework.set_memory(self.memory.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            device_type: 2,
            num_queues: 1,
            compat_version: 2,
            accepted_compat: vec![1, 2],
            state_formats: vec![FORMAT_VERSION],
        }
    }

    /// Plays the old process: reads HELLO, then sends `metadata` and `fds` as it would.
    fn old_side(metadata: Vec<u8>, fds: Vec<OwnedFd>, chunks: usize) -> UnixStream {
        let (new, old) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            let f = recv_frame(&old, deadline, None, "HELLO").unwrap();
            assert_eq!(f.kind, Kind::Hello);
            send_frame(&old, Kind::Handover, &metadata, &[], deadline).unwrap();
            let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            for chunk in raw.chunks(chunks.max(1)) {
                send_frame(&old, Kind::Fds, &[], chunk, deadline).unwrap();
            }
            // Keep the socket open until the receiver is done.
            let _ = recv_frame(&old, deadline, None, "the end");
        });
        new
    }

    fn listener() -> (UnixListener, TempPath) {
        let path = TempPath::new();
        (UnixListener::bind(&path.0).unwrap(), path)
    }

    struct TempPath(PathBuf);
    impl TempPath {
        fn new() -> TempPath {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            TempPath(
                std::env::temp_dir()
                    .join(format!("outboard-handover-{}-{n}.sock", std::process::id())),
            )
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Metadata naming an upgrade socket and no session.
    fn minimal(fd_count: u32) -> Vec<u8> {
        let mut w = StateWriter::new();
        for b in METADATA_MAGIC {
            w.u8(b);
        }
        w.u16(PROTOCOL_VERSION).u32(fd_count);
        w.bool(true).u32(0).bytes(b"").u32(NO_FD);
        w.bool(false);
        w.bool(false);
        w.finish()
    }

    #[test]
    fn a_well_formed_handover_without_a_session_is_received() {
        let (l, _p) = listener();
        let sock = old_side(minimal(1), vec![l.as_fd().try_clone_to_owned().unwrap()], 1);
        let r = receive_handover(sock, &hello()).unwrap();
        assert!(r.session.is_none());
        assert!(r.sockets.listener.is_none());
        assert!(r.sockets.control.file.path.is_none());
    }

    #[test]
    fn truncated_metadata_is_refused() {
        let (l, _p) = listener();
        let mut m = minimal(1);
        m.pop();
        let sock = old_side(m, vec![l.as_fd().try_clone_to_owned().unwrap()], 1);
        let e = receive_handover(sock, &hello()).unwrap_err();
        assert!(
            matches!(e, HandoverError::Malformed { .. }),
            "truncated metadata: {e}"
        );
        // Trailing bytes are refused too.
        let (l, _p) = listener();
        let mut m = minimal(1);
        m.push(0);
        let sock = old_side(m, vec![l.as_fd().try_clone_to_owned().unwrap()], 1);
        let e = receive_handover(sock, &hello()).unwrap_err();
        assert!(e.to_string().contains("trailing"), "{e}");
    }

    #[test]
    fn a_wrong_descriptor_count_is_refused() {
        let (l, _p) = listener();
        // The metadata announces two descriptors, one is sent and named: the second never
        // comes, so the count check fails when the frame after it is not FDS.
        let extra = l.as_fd().try_clone_to_owned().unwrap();
        let sock = old_side(
            minimal(1),
            vec![l.as_fd().try_clone_to_owned().unwrap(), extra],
            2,
        );
        let e = receive_handover(sock, &hello()).unwrap_err();
        assert!(
            matches!(e, HandoverError::FdCount { want: 1, got: 2 }),
            "{e}"
        );
        // Announced and sent, but one is never named.
        let (l, _p) = listener();
        let m = minimal(2);
        let sock = old_side(
            m,
            vec![
                l.as_fd().try_clone_to_owned().unwrap(),
                l.as_fd().try_clone_to_owned().unwrap(),
            ],
            1,
        );
        let e = receive_handover(sock, &hello()).unwrap_err();
        assert!(e.to_string().contains("descriptor 1 is not named"), "{e}");
    }

    #[test]
    fn a_descriptor_of_the_wrong_kind_is_refused() {
        // A pipe where the upgrade socket belongs.
        let (rd, _wr) = nix::unistd::pipe().unwrap();
        let sock = old_side(minimal(1), vec![rd], 1);
        let e = receive_handover(sock, &hello()).unwrap_err();
        assert!(matches!(e, HandoverError::FdKind { .. }), "{e}");
    }

    #[test]
    fn an_index_out_of_range_or_named_twice_is_refused() {
        let (l, _p) = listener();
        let mut w = StateWriter::new();
        for b in METADATA_MAGIC {
            w.u8(b);
        }
        w.u16(PROTOCOL_VERSION).u32(1);
        w.bool(true).u32(0).bytes(b"").u32(0); // the socket's fd again as its reaper pipe
        w.bool(false).bool(false);
        let sock = old_side(w.finish(), vec![l.as_fd().try_clone_to_owned().unwrap()], 1);
        let e = receive_handover(sock, &hello()).unwrap_err();
        assert!(e.to_string().contains("named twice"), "{e}");
        let mut m = minimal(1);
        // The upgrade socket's index (after magic, version, count and the presence byte).
        m[15..19].copy_from_slice(&7u32.to_le_bytes());
        let (l, _p) = listener();
        let sock = old_side(m, vec![l.as_fd().try_clone_to_owned().unwrap()], 1);
        let e = receive_handover(sock, &hello()).unwrap_err();
        assert!(e.to_string().contains("descriptor 7 of 1"), "{e}");
    }

    #[test]
    fn garbage_frames_are_refused() {
        let (new, mut old) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut hello = [0u8; 256];
            let _ = std::io::Read::read(&mut old, &mut hello);
            old.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            std::thread::sleep(Duration::from_millis(100));
        });
        let e = receive_handover(new, &hello()).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
        t.join().unwrap();
        // An oversized frame is refused before anything is allocated for it.
        let (new, old) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            let _ = recv_frame(&old, deadline, None, "HELLO");
            let mut h = [0u8; FRAME_HEADER];
            h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
            h[4..6].copy_from_slice(&(Kind::Handover as u16).to_le_bytes());
            h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
            (&old).write_all(&h).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        });
        let e = receive_handover(new, &hello()).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn a_refusal_carries_the_old_processes_reason() {
        let (new, old) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            let f = recv_frame(&old, deadline, None, "HELLO").unwrap();
            let h = Hello::decode(&f.payload).unwrap();
            assert_eq!(h, hello());
            send_frame(&old, Kind::Refused, b"no thanks", &[], deadline).unwrap();
        });
        let e = receive_handover(new, &hello()).unwrap_err();
        assert!(
            matches!(&e, HandoverError::Refused { reason } if reason == "no thanks"),
            "{e}"
        );
        t.join().unwrap();
    }

    #[test]
    fn taken_sent_after_the_old_side_gave_up_fails() {
        let (new, old) = UnixStream::pair().unwrap();
        old.shutdown(std::net::Shutdown::Read).unwrap();
        assert!(
            confirm_taken(&new).is_err(),
            "EPIPE: the new side must not start"
        );
        // One sent before the shutdown is still read.
        let (new, old) = UnixStream::pair().unwrap();
        confirm_taken(&new).unwrap();
        old.shutdown(std::net::Shutdown::Read).unwrap();
        let f = recv_frame(&old, Instant::now() + Duration::from_secs(1), None, "TAKEN").unwrap();
        assert_eq!(f.kind, Kind::Taken);
    }

    #[test]
    fn hello_round_trips_and_rejects_long_lists() {
        let h = hello();
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut w = StateWriter::new();
        w.u16(1).u32(2).u32(1).u16(2).u32(1_000_000);
        assert!(Hello::decode(&w.finish()).is_err());
    }
}
