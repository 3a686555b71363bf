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

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};
use outboard_memory::dirty::DirtyLog;
use outboard_memory::{GuestMemoryHandle, RegionDescriptor};
use outboard_virtio::state::{StateReader, StateWriter, FORMAT_VERSION, MAX_STATE_SIZE};
use outboard_virtio::status::DEVICE_NEEDS_RESET;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::EventFd;

use super::{borrow_eventfd, supported_protocol_features, VhostUserBackend};
use crate::inflight::{InflightRegion, InflightShape};
use frame::{expect_kind, recv_frame, send_frame};
use metadata::{decode_metadata, metadata_fd_count};

#[path = "handover/frame.rs"]
mod frame;
#[path = "handover/metadata.rs"]
mod metadata;

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
        let start = Instant::now();
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
        let hello_at = start.elapsed();
        let paused = connection.is_some() && self.memory.is_some();
        if paused {
            self.framework.set_memory(None);
        }
        let quiesced_at = start.elapsed();
        let result = self.send_handover(sock, point, connection, shutdown);
        match &result {
            Ok(()) => log::info!(
                "upgrade: HELLO after {} µs, quiesced after {} µs, confirmed after {} µs",
                hello_at.as_micros(),
                quiesced_at.as_micros(),
                start.elapsed().as_micros()
            ),
            Err(_) if paused => {
                log::info!("upgrade: resuming the device");
                self.framework.set_memory(self.memory.clone());
            }
            Err(_) => {}
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
        self.protocol = VhostUserProtocolFeatures::from_bits_retain(s.protocol);
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
#[path = "handover/tests.rs"]
mod tests;
