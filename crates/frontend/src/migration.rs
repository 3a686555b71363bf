//! Live migration from the frontend's side: dirty logging, device-state transfer, and moving a
//! running device from one backend process to another.
//!
//! The test VMM migrates locally: guest RAM is a memfd shared with every backend, so moving a
//! device needs no memory copy. A migration is
//!
//! 1. stop every ring on the source (GET_VRING_BASE; the backend completes every request it took
//!    before it answers) and remember the bases;
//! 2. save the device state (SET_DEVICE_STATE_FD(SAVE, STOPPED) with a pipe, read to EOF,
//!    CHECK_DEVICE_STATE), if both backends have DEVICE_STATE;
//! 3. connect to the destination, negotiate the same features, load the state
//!    (SET_DEVICE_STATE_FD(LOAD), write, close, CHECK_DEVICE_STATE), and start the rings at the
//!    saved bases with the same addresses;
//! 4. on any refusal, restart the rings on the source, which keeps serving.
//!
//! [`Session::migrate`] does all four; the steps are public for tools that check each one
//! (`outboard-migrate`). [`DirtyLog`] is the frontend's side of LOG_SHMFD dirty logging: a
//! memfd bitmap of one bit per 4 KiB page of guest-physical space, handed over with
//! SET_LOG_BASE and switched on and off with the LOG_ALL feature bit.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::memfd::{memfd_create, MFdFlags};
use vhost::vhost_user::message::{
    FrontendReq, VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use crate::connection::{Connection, ConnectionError, VhostResultExt, DEFAULT_IO_TIMEOUT};
use crate::device::{default_protocol_features, Session, SessionError};
use crate::raw::VERSION;
use crate::GuestRam;

/// The page size of the dirty log.
pub const LOG_PAGE_SIZE: u64 = 0x1000;
/// The largest device state this frontend accepts from a backend.
pub const MAX_STATE_SIZE: usize = 16 << 20;
/// `VHOST_F_LOG_ALL`: the virtio feature bit that switches dirty logging on.
pub const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// The protocol features a migrating session asks for: the defaults plus dirty logging and
/// device state (each only if the backend offers it).
pub fn migration_protocol_features() -> VhostUserProtocolFeatures {
    default_protocol_features()
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// Which way a device state moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the backend to the frontend.
    Save,
    /// From the frontend to the backend.
    Load,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Save => "save",
            Direction::Load => "load",
        })
    }
}

/// Errors of migration steps.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A session operation failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The backend lacks a protocol feature the step needs.
    #[error(
        "{operation} needs the {feature:?} protocol feature, which the backend did not negotiate"
    )]
    NotNegotiated {
        /// What was attempted.
        operation: &'static str,
        /// The missing feature.
        feature: VhostUserProtocolFeatures,
    },
    /// Creating or mapping the dirty log failed.
    #[error("dirty log of {size} bytes")]
    Log {
        /// Its size.
        size: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// SET_LOG_BASE got an unexpected answer.
    #[error("SET_LOG_BASE: {detail}")]
    LogBase {
        /// What was wrong.
        detail: String,
    },
    /// Moving the state bytes through the pipe failed.
    #[error("device state {direction}: {op}")]
    StateIo {
        /// Save or load.
        direction: Direction,
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state is larger than [`MAX_STATE_SIZE`].
    #[error("the backend's device state exceeds {MAX_STATE_SIZE} bytes")]
    StateTooLarge,
    /// The backend reported that the transfer failed (SET_DEVICE_STATE_FD or
    /// CHECK_DEVICE_STATE answered with an error): for a load, it refused the state.
    #[error("the backend refused the device state {direction} ({request} failed)")]
    Refused {
        /// Save or load.
        direction: Direction,
        /// The request that failed.
        request: &'static str,
        /// The error from vhost.
        #[source]
        source: vhost::Error,
    },
    /// The destination does not offer every feature the driver acked on the source.
    #[error("the destination lacks acked features {missing:#x}")]
    FeaturesMissing {
        /// The acked feature bits the destination does not offer.
        missing: u64,
    },
}

impl MigrationError {
    /// Whether the destination refused the migration (the state, the features or the
    /// configuration) rather than something failing along the way.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            MigrationError::Refused {
                direction: Direction::Load,
                ..
            } | MigrationError::FeaturesMissing { .. }
                | MigrationError::Session(SessionError::FeaturesChanged { .. })
                | MigrationError::Session(SessionError::TooManyQueues { .. })
        )
    }
}

/// The frontend's dirty-page log: a memfd bitmap covering guest-physical addresses from 0 to the
/// end of the highest RAM region, one bit per [`LOG_PAGE_SIZE`] page
/// (`log[page / 8] |= 1 << (page % 8)`), mapped here and shared with the backend.
#[derive(Debug)]
pub struct DirtyLog {
    file: File,
    map: MmapRegion<()>,
    pages: u64,
}

impl DirtyLog {
    /// A cleared log large enough for every region of `ram`.
    pub fn for_ram(ram: &GuestRam) -> Result<Self, MigrationError> {
        let end = ram
            .regions_info()
            .iter()
            .map(|r| r.guest_phys_addr + r.memory_size)
            .max()
            .unwrap_or(0);
        Self::new(end)
    }

    /// A cleared log covering guest-physical addresses `0..gpa_end`. Its size is rounded up to
    /// whole 64-bit words.
    pub fn new(gpa_end: u64) -> Result<Self, MigrationError> {
        let pages = gpa_end.div_ceil(LOG_PAGE_SIZE).max(1);
        let size = (pages.div_ceil(64) * 8) as usize;
        let err = |source| MigrationError::Log { size, source };
        let fd = memfd_create(c"outboard-dirty-log", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| err(e.into()))?;
        let file = File::from(fd);
        file.set_len(size as u64).map_err(err)?;
        let map = MmapRegion::from_file(FileOffset::new(file.try_clone().map_err(err)?, 0), size)
            .map_err(|e| err(std::io::Error::other(e)))?;
        Ok(DirtyLog {
            file,
            map,
            pages: size as u64 * 8,
        })
    }

    /// The log's size in bytes.
    pub fn size(&self) -> usize {
        self.map.size()
    }

    /// The number of pages the log covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Reads and clears the whole log atomically word by word, so that no mark made while it
    /// is read is lost: it is either in the returned bitmap or still in the log.
    pub fn take(&self) -> DirtyBitmap {
        let slice = self.map.as_volatile_slice();
        let words = (0..self.size() / 8)
            .map(|i| {
                let w = slice
                    .get_atomic_ref::<AtomicU64>(i * 8)
                    .expect("the log is a whole number of page-aligned words");
                u64::from_le(w.swap(0, Ordering::SeqCst))
            })
            .collect();
        DirtyBitmap { words }
    }

    /// Clears the log.
    pub fn clear(&self) {
        drop(self.take());
    }

    fn send(&self, conn: &mut Connection) -> Result<(), MigrationError> {
        let code = FrontendReq::SET_LOG_BASE as u32;
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&(self.size() as u64).to_ne_bytes());
        // mmap_offset = 0.
        let io = |source| ConnectionError::Io {
            request: "SET_LOG_BASE",
            source,
        };
        let reply = conn
            .raw_request(code, VERSION, &payload, &[self.file.as_raw_fd()])
            .map_err(io)
            .map_err(SessionError::from)?;
        let Some(reply) = reply else {
            return Err(MigrationError::LogBase {
                detail: "no reply".into(),
            });
        };
        // The spec asks for a reply but says nothing of its payload, and backends differ:
        // Outboard sends a u64 0, libvhost-user (qemu-storage-daemon) a u64 that still holds the
        // request's first 8 bytes, rust-vmm's vhost-user-backend echoes the 16-byte request,
        // DPDK sends none. Like QEMU, take any reply as success.
        if reply.header.request != code || !reply.header.is_reply() {
            return Err(MigrationError::LogBase {
                detail: format!("unexpected reply {:?}", reply.header),
            });
        }
        Ok(())
    }
}

/// A copy of the dirty log taken by [`DirtyLog::take`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// Whether the page holding `gpa` was marked.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE_SIZE;
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// The number of marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// A destination backend connected ahead of the migration, as a VMM connects to its
/// backends when it starts, so that the device's pause does not include the backend's start-up.
#[derive(Debug)]
pub struct Destination {
    path: PathBuf,
    conn: Connection,
}

impl Destination {
    /// The destination's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The result of [`Session::migrate`].
#[derive(Debug)]
pub struct Migrated {
    /// Each stopped queue and the avail index it restarted at.
    pub bases: Vec<(u16, u16)>,
    /// The device state moved, in bytes (`None`: a backend lacks DEVICE_STATE, so none was).
    pub state_len: Option<usize>,
    /// From the first GET_VRING_BASE to DRIVER_OK on the destination: the time the device did
    /// not run.
    pub pause: Duration,
}

impl Session {
    /// Whether the backend negotiated protocol feature `f`.
    fn has_protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.negotiated().has_protocol(f)
    }

    fn require(
        &self,
        feature: VhostUserProtocolFeatures,
        operation: &'static str,
    ) -> Result<(), MigrationError> {
        if self.has_protocol(feature) {
            Ok(())
        } else {
            Err(MigrationError::NotNegotiated { operation, feature })
        }
    }

    /// Whether the session talks to the backend listening on `path`.
    pub fn is_on(&self, path: &Path) -> bool {
        self.options().path() == path
    }

    /// Whether the backend can log dirty pages (LOG_SHMFD and LOG_ALL).
    pub fn supports_dirty_log(&self) -> bool {
        self.has_protocol(VhostUserProtocolFeatures::LOG_SHMFD)
            && self.negotiated().features_offered & LOG_ALL != 0
    }

    /// Whether the backend can save and load its state (DEVICE_STATE).
    pub fn supports_device_state(&self) -> bool {
        self.has_protocol(VhostUserProtocolFeatures::DEVICE_STATE)
    }

    /// Hands `log` to the backend (SET_LOG_BASE) and switches logging on (SET_FEATURES with
    /// LOG_ALL). From the reply on, every write the device makes to guest memory is marked.
    pub fn start_dirty_log(&mut self, log: &DirtyLog) -> Result<(), MigrationError> {
        self.require(VhostUserProtocolFeatures::LOG_SHMFD, "dirty logging")?;
        log.send(self.connection())?;
        self.set_log_all(true)
    }

    /// Switches logging off (SET_FEATURES without LOG_ALL).
    pub fn stop_dirty_log(&mut self) -> Result<(), MigrationError> {
        self.set_log_all(false)
    }

    /// SET_FEATURES with or without LOG_ALL, and a round trip: SET_FEATURES has no reply of
    /// its own, and the device may be running, so without one the frontend could not know from
    /// which write on the log is complete (QEMU waits the same way).
    fn set_log_all(&mut self, on: bool) -> Result<(), MigrationError> {
        let acked = self.negotiated().features_acked;
        let features = if on { acked | LOG_ALL } else { acked };
        let fe = self.connection().frontend();
        fe.set_features(features)
            .ctx("SET_FEATURES")
            .map_err(SessionError::from)?;
        // Messages are handled in order: the answer comes after SET_FEATURES took effect.
        fe.get_features()
            .ctx("GET_FEATURES")
            .map_err(SessionError::from)?;
        Ok(())
    }

    /// Stops every started queue (GET_VRING_BASE) and returns each one's index and base. When
    /// a queue's reply arrives, every request the backend took from it is complete.
    pub fn stop_rings(&mut self) -> Result<Vec<(u16, u16)>, SessionError> {
        let mut bases = Vec::new();
        for i in self.queue_indices() {
            if self.is_started(i) {
                // A split ring's base is the 16-bit avail index; the upper bits are for packed
                // rings.
                let base = self.stop_queue(i)? as u16;
                bases.push((i, base));
            }
        }
        Ok(bases)
    }

    /// Restarts stopped queues at their bases on the current backend (after a refused
    /// migration), with DRIVER_OK again.
    pub fn resume_rings(&mut self, bases: &[(u16, u16)]) -> Result<(), SessionError> {
        for &(index, base) in bases {
            self.start_queue(index, base)?;
        }
        self.driver_ok()
    }

    /// Saves the stopped device's state: SET_DEVICE_STATE_FD(SAVE, STOPPED) with a pipe (or the
    /// backend's own fd), read to EOF, then CHECK_DEVICE_STATE.
    pub fn save_device_state(&mut self) -> Result<Vec<u8>, MigrationError> {
        const D: Direction = Direction::Save;
        self.require(
            VhostUserProtocolFeatures::DEVICE_STATE,
            "saving device state",
        )?;
        let (read_end, write_end) = pipe(D)?;
        let theirs = self
            .connection()
            .frontend()
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                write_end,
            )
            .map_err(|source| refused(D, "SET_DEVICE_STATE_FD", source))?;
        let source = match theirs {
            Some(file) => file,
            None => File::from(read_end),
        };
        let blob = read_to_eof(source, Some(DEFAULT_IO_TIMEOUT))?;
        self.check_device_state(D)?;
        Ok(blob)
    }

    /// Loads `state` into the device before its rings start: SET_DEVICE_STATE_FD(LOAD,
    /// STOPPED), write, close, CHECK_DEVICE_STATE. A backend that refuses the state answers the
    /// check with an error ([`MigrationError::Refused`]).
    pub fn load_device_state(&mut self, state: &[u8]) -> Result<(), MigrationError> {
        const D: Direction = Direction::Load;
        self.require(
            VhostUserProtocolFeatures::DEVICE_STATE,
            "loading device state",
        )?;
        let (read_end, write_end) = pipe(D)?;
        let theirs = self
            .connection()
            .frontend()
            .set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                read_end,
            )
            .map_err(|source| refused(D, "SET_DEVICE_STATE_FD", source))?;
        let mut sink = match theirs {
            Some(file) => file,
            None => File::from(write_end),
        };
        let written = sink.write_all(state);
        // Closing the write end is the end of the state.
        drop(sink);
        // A backend that stopped reading early (a state it refused) closed its end: the check
        // says why.
        self.check_device_state(D)?;
        written.map_err(|source| MigrationError::StateIo {
            direction: D,
            op: "writing the state",
            source,
        })
    }

    fn check_device_state(&mut self, direction: Direction) -> Result<(), MigrationError> {
        self.connection()
            .frontend()
            .check_device_state()
            .map_err(|source| refused(direction, "CHECK_DEVICE_STATE", source))
    }

    /// Connects to the destination backend listening on `path` and waits until it answers
    /// (GET_FEATURES), while the device still runs on the source.
    pub fn connect_destination(&mut self, path: &Path) -> Result<Destination, MigrationError> {
        let mut conn = self.connect_to(path)?;
        conn.frontend()
            .get_features()
            .ctx("GET_FEATURES")
            .map_err(SessionError::from)?;
        Ok(Destination {
            path: path.into(),
            conn,
        })
    }

    /// Moves the device to `dest` after its rings were stopped at `bases`: negotiates the same
    /// features there, loads `state` if given, switches dirty logging into `log` on (if given
    /// and the destination can), and starts the rings. On success the previous connection is
    /// returned (close it). On a failure before the destination's rings start (every refusal)
    /// the session is still on the source with its rings stopped (see
    /// [`Session::resume_rings`]); after, it is on the destination ([`Session::is_on`] tells).
    pub fn move_to(
        &mut self,
        dest: Destination,
        bases: &[(u16, u16)],
        state: Option<&[u8]>,
        log: Option<&DirtyLog>,
    ) -> Result<Connection, MigrationError> {
        let before = self.negotiated().features_acked;
        self.switch_backend(&dest.path, Some(dest.conn), bases, |s| {
            let offered = s.negotiated().features_offered;
            if let Some(state) = state {
                // The backend checks the state against what it is: its type, compat version,
                // configuration, and the features it offers.
                s.load_device_state(state)?;
            }
            let missing = before & !offered & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
            if missing != 0 {
                return Err(MigrationError::FeaturesMissing { missing });
            }
            // Before the rings start, so that the destination's first write is logged.
            if let Some(log) = log.filter(|_| s.supports_dirty_log()) {
                s.start_dirty_log(log)?;
            }
            Ok(())
        })
    }

    /// Migrates the device to the backend listening on `dest`: connects to it, stops the rings,
    /// saves the state
    /// (when the source has DEVICE_STATE), moves to `dest` and loads it there. If the
    /// destination refuses, the rings restart on the source, which keeps serving, and the error
    /// is returned. The source connection is closed on success. With `log`, the destination
    /// logs dirty pages into it from its first write.
    pub fn migrate(
        &mut self,
        dest: &Path,
        log: Option<&DirtyLog>,
    ) -> Result<Migrated, MigrationError> {
        let source = self.options().path().to_path_buf();
        let dest = self.connect_destination(dest)?;
        let start = Instant::now();
        let bases = self.stop_rings()?;
        let state = if self.supports_device_state() {
            match self.save_device_state() {
                Ok(s) => Some(s),
                Err(e) => {
                    self.resume_rings(&bases)?;
                    return Err(e);
                }
            }
        } else {
            None
        };
        match self.move_to(dest, &bases, state.as_deref(), log) {
            Ok(old) => {
                old.shutdown();
                Ok(Migrated {
                    bases,
                    state_len: state.map(|s| s.len()),
                    pause: start.elapsed(),
                })
            }
            Err(e) => {
                if self.is_on(&source) {
                    self.resume_rings(&bases)?;
                }
                Err(e)
            }
        }
    }
}

fn refused(direction: Direction, request: &'static str, source: vhost::Error) -> MigrationError {
    MigrationError::Refused {
        direction,
        request,
        source,
    }
}

fn pipe(direction: Direction) -> Result<(OwnedFd, OwnedFd), MigrationError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| MigrationError::StateIo {
        direction,
        op: "creating a pipe",
        source: e.into(),
    })
}

/// Reads `file` to EOF, waiting at most `timeout` for each chunk and at most
/// [`MAX_STATE_SIZE`] bytes in all.
fn read_to_eof(mut file: File, timeout: Option<Duration>) -> Result<Vec<u8>, MigrationError> {
    let io = |op, source| MigrationError::StateIo {
        direction: Direction::Save,
        op,
        source,
    };
    let wait = match timeout {
        Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    };
    let mut blob = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(0) => {
                return Err(io(
                    "waiting for the state",
                    std::io::ErrorKind::TimedOut.into(),
                ))
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io("waiting for the state", e.into())),
        }
        match file.read(&mut buf) {
            Ok(0) => return Ok(blob),
            Ok(n) => {
                if blob.len() + n > MAX_STATE_SIZE {
                    return Err(MigrationError::StateTooLarge);
                }
                blob.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("reading the state", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_covers_all_of_ram_in_whole_words() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let log = DirtyLog::for_ram(&ram).unwrap();
        // 2048 pages: 256 bytes.
        assert_eq!((log.size(), log.pages()), (256, 2048));
        let odd = DirtyLog::new(65 * LOG_PAGE_SIZE + 1).unwrap();
        assert_eq!(odd.size(), 16);
    }

    #[test]
    fn take_reads_the_spec_layout_and_clears() {
        let log = DirtyLog::new(1 << 20).unwrap();
        // What a backend does: byte page/8, bit page%8.
        let view = MmapRegion::<()>::from_file(
            FileOffset::new(log.file.try_clone().unwrap(), 0),
            log.size(),
        )
        .unwrap();
        let slice = view.as_volatile_slice();
        let mark = |page: u64| {
            let b = slice
                .get_atomic_ref::<std::sync::atomic::AtomicU8>((page / 8) as usize)
                .unwrap();
            b.fetch_or(1 << (page % 8), Ordering::SeqCst);
        };
        mark(0);
        mark(9);
        mark(255);
        let bitmap = log.take();
        assert_eq!(bitmap.count(), 3);
        assert!(bitmap.is_dirty(9 * LOG_PAGE_SIZE + 4095));
        assert!(bitmap.is_dirty(255 * LOG_PAGE_SIZE));
        assert!(!bitmap.is_dirty(10 * LOG_PAGE_SIZE));
        assert!(!bitmap.is_dirty(u64::MAX));
        assert_eq!(log.take().count(), 0, "take clears");
    }

    #[test]
    fn refusals_are_told_apart_from_failures() {
        let e = MigrationError::FeaturesMissing { missing: 1 << 13 };
        assert!(e.is_refusal());
        assert!(!MigrationError::StateTooLarge.is_refusal());
    }
}
