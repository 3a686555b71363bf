//! Session setup: the frontend's side of bringing a vhost-user device up, QEMU-style.
//!
//! [`SessionBuilder::connect`] runs the whole flow: connect (retrying while the backend starts),
//! GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
//! SET_BACKEND_REQ_FD, the status walk (with STATUS), SET_FEATURES, SET_MEM_TABLE, then per
//! queue SET_VRING_NUM/ADDR/BASE/CALL/KICK and SET_VRING_ENABLE, and DRIVER_OK.
//! [`SessionBuilder::handshake`] stops after SET_MEM_TABLE so a test can take over from there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::fd::AsRawFd;

use log::debug;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::backend_channel::BackendChannel;
use crate::connection::{Connection, ConnectionError, VhostResultExt, DEFAULT_IO_TIMEOUT};
use crate::queue::{DriverQueue, NotifyMode, QueueConfig, QueueError, RingAddressing, VringSetup};
use crate::ram::{GuestRam, RamError, RegionId};

/// Errors of session setup and control.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Guest RAM could not be set up.
    #[error("guest RAM")]
    Ram(#[from] RamError),
    /// A driver queue could not be set up.
    #[error("driver queue")]
    Queue(#[from] QueueError),
    /// A vhost-user request failed.
    #[error("vhost-user request")]
    Connection(#[from] ConnectionError),
    /// The backend supports fewer queues than requested.
    #[error("requested {requested} queues but the backend supports {max}")]
    TooManyQueues {
        /// Queues requested.
        requested: u16,
        /// GET_QUEUE_NUM answer.
        max: u64,
    },
    /// FEATURES_OK did not stick in the device status.
    #[error("the device rejected the features: status {status:#x} after FEATURES_OK")]
    FeaturesRejected {
        /// Status read back with GET_STATUS.
        status: u8,
    },
    /// The operation needs a protocol feature that was not negotiated.
    #[error("{operation} needs protocol feature {feature:?}")]
    NotNegotiated {
        /// What was attempted.
        operation: &'static str,
        /// Missing feature (any of these would do).
        feature: VhostUserProtocolFeatures,
    },
    /// No queue with this index was set up.
    #[error("queue {0} does not exist")]
    NoQueue(u16),
    /// After a reconnect the backend acked different features than before, so the existing
    /// rings (laid out for the old features) cannot be reused.
    #[error("features changed across reconnect: {before:#x} before, {after:#x} now")]
    FeaturesChanged {
        /// Features acked on the previous connection.
        before: u64,
        /// Features acked now.
        after: u64,
    },
}

const ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
const DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Virtio feature bits every session asks for unless told otherwise.
pub const DEFAULT_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC;

/// Protocol features asked for by default (each only if offered).
pub fn default_protocol_features() -> VhostUserProtocolFeatures {
    use VhostUserProtocolFeatures as P;
    P::MQ
        | P::REPLY_ACK
        | P::CONFIG
        | P::CONFIGURE_MEM_SLOTS
        | P::RESET_DEVICE
        | P::BACKEND_REQ
        | P::STATUS
}

/// Options of a session; see the setters for defaults.
#[derive(Clone, Debug)]
pub struct SessionBuilder {
    path: PathBuf,
    connect_timeout: Duration,
    io_timeout: Option<Duration>,
    ram_size: usize,
    num_queues: u16,
    queue_size: u16,
    features: Option<u64>,
    protocol: VhostUserProtocolFeatures,
    need_reply: bool,
    backend_channel: bool,
    status_walk: bool,
    notify: NotifyMode,
    indirect_max: u16,
    addressing: RingAddressing,
}

impl SessionBuilder {
    /// A session with the backend listening on `path`: 1 queue of 256, 64 MiB of RAM,
    /// [`DEFAULT_FEATURES`], [`default_protocol_features`], interrupt-driven completions.
    pub fn new(path: impl AsRef<Path>) -> Self {
        SessionBuilder {
            path: path.as_ref().into(),
            connect_timeout: Duration::from_secs(10),
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            ram_size: 64 << 20,
            num_queues: 1,
            queue_size: 256,
            features: None,
            protocol: default_protocol_features(),
            need_reply: false,
            backend_channel: true,
            status_walk: true,
            notify: NotifyMode::Interrupt,
            indirect_max: 0,
            addressing: RingAddressing::UserAddress,
        }
    }

    /// Number of queues to set up.
    pub fn queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }

    /// Descriptors per queue (power of two).
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = n;
        self
    }

    /// Size of the boot RAM region.
    pub fn ram_size(mut self, bytes: usize) -> Self {
        self.ram_size = bytes;
        self
    }

    /// Virtio features wanted (acked = offered ∩ wanted, plus bit 30 when offered).
    pub fn features(mut self, wanted: u64) -> Self {
        self.features = Some(wanted);
        self
    }

    /// The wanted features if set, else `default`.
    pub fn features_or(&self, default: u64) -> u64 {
        self.features.unwrap_or(default)
    }

    /// Protocol features wanted (acked = offered ∩ wanted).
    pub fn protocol_features(mut self, wanted: VhostUserProtocolFeatures) -> Self {
        self.protocol = wanted;
        self
    }

    /// Sets NEED_REPLY on every message after protocol negotiation (needs REPLY_ACK).
    pub fn need_reply(mut self, on: bool) -> Self {
        self.need_reply = on;
        self
    }

    /// Whether to open the backend channel when BACKEND_REQ is negotiated (default: yes).
    pub fn backend_channel(mut self, on: bool) -> Self {
        self.backend_channel = on;
        self
    }

    /// Whether to walk the status byte with SET_STATUS when STATUS is negotiated (default: yes).
    pub fn status_walk(mut self, on: bool) -> Self {
        self.status_walk = on;
        self
    }

    /// How queues are told about completions (default: interrupts).
    pub fn notify(mut self, mode: NotifyMode) -> Self {
        self.notify = mode;
        self
    }

    /// Indirect table size per chain (used when VIRTIO_RING_F_INDIRECT_DESC is acked); 0: none.
    pub fn indirect(mut self, max_segments: u16) -> Self {
        self.indirect_max = max_segments;
        self
    }

    /// Which addresses SET_VRING_ADDR carries (default: our mapping addresses, as QEMU).
    pub fn addressing(mut self, a: RingAddressing) -> Self {
        self.addressing = a;
        self
    }

    /// How long to retry connecting while the backend starts (default 10 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// How long any request waits for the backend (default 30 s; `None`: forever).
    pub fn io_timeout(mut self, t: Option<Duration>) -> Self {
        self.io_timeout = t;
        self
    }

    /// The backend's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of queues requested.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Connects and negotiates up to SET_MEM_TABLE; no queue is set up yet.
    pub fn handshake(self) -> Result<Session, SessionError> {
        let ram = GuestRam::new(self.ram_size)?;
        let conn = self.open()?;
        let mut s = Session {
            conn,
            ram,
            opts: self,
            negotiated: Negotiated::default(),
            vrings: Vec::new(),
            queues: Vec::new(),
            started: Vec::new(),
            backend: None,
            status: 0,
            inflight: None,
        };
        s.handshake()?;
        Ok(s)
    }

    /// Runs the whole setup: handshake, all queues started and enabled, DRIVER_OK.
    pub fn connect(self) -> Result<Session, SessionError> {
        let mut s = self.handshake()?;
        s.setup_queues()?;
        s.driver_ok()?;
        Ok(s)
    }

    fn open(&self) -> Result<Connection, SessionError> {
        let conn = Connection::connect(&self.path, self.num_queues.into(), self.connect_timeout)?;
        conn.set_timeout(self.io_timeout)
            .map_err(|source| ConnectionError::Io {
                request: "set socket timeout",
                source,
            })?;
        Ok(conn)
    }
}

/// What was offered and acked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// GET_FEATURES answer.
    pub features_offered: u64,
    /// Sent with SET_FEATURES.
    pub features_acked: u64,
    /// GET_PROTOCOL_FEATURES answer (empty without bit 30).
    pub protocol_offered: VhostUserProtocolFeatures,
    /// Sent with SET_PROTOCOL_FEATURES.
    pub protocol_acked: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM answer (with MQ).
    pub max_queues: Option<u64>,
    /// GET_MAX_MEM_SLOTS answer (with CONFIGURE_MEM_SLOTS).
    pub max_mem_slots: Option<u64>,
}

impl Default for Negotiated {
    fn default() -> Self {
        Negotiated {
            features_offered: 0,
            features_acked: 0,
            protocol_offered: VhostUserProtocolFeatures::empty(),
            protocol_acked: VhostUserProtocolFeatures::empty(),
            max_queues: None,
            max_mem_slots: None,
        }
    }
}

impl Negotiated {
    /// Whether virtio feature `bit` was acked.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.features_acked & (1 << bit) != 0
    }

    /// Whether protocol feature `f` was acked.
    pub fn has_protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.protocol_acked.contains(f)
    }
}

/// A negotiated vhost-user session with its guest RAM and queues.
#[derive(Debug)]
pub struct Session {
    conn: Connection,
    ram: GuestRam,
    opts: SessionBuilder,
    negotiated: Negotiated,
    vrings: Vec<Option<VringSetup>>,
    queues: Vec<Option<DriverQueue>>,
    started: Vec<bool>,
    backend: Option<BackendChannel>,
    status: u8,
    /// The inflight region the backend gave (GET_INFLIGHT_FD), kept across reconnects.
    inflight: Option<Inflight>,
}

/// The inflight region a backend handed out, as the frontend keeps it.
#[derive(Debug)]
struct Inflight {
    mmap_size: u64,
    mmap_offset: u64,
    num_queues: u16,
    queue_size: u16,
    file: std::fs::File,
}

impl Session {
    /// GET_INFLIGHT_FD once per session, then SET_INFLIGHT_FD on every connection: a
    /// restarted backend finds what its predecessor had in flight.
    fn set_inflight(&mut self) -> Result<(), SessionError> {
        if self.inflight.is_none() {
            let ask = VhostUserInflight::new(0, 0, self.opts.num_queues, self.opts.queue_size);
            let (given, file) = self
                .conn
                .frontend()
                .get_inflight_fd(&ask)
                .ctx("GET_INFLIGHT_FD")?;
            self.inflight = Some(Inflight {
                mmap_size: given.mmap_size,
                mmap_offset: given.mmap_offset,
                num_queues: given.num_queues,
                queue_size: given.queue_size,
                file,
            });
        }
        if let Some(i) = &self.inflight {
            let given =
                VhostUserInflight::new(i.mmap_size, i.mmap_offset, i.num_queues, i.queue_size);
            self.conn
                .frontend()
                .set_inflight_fd(&given, i.file.as_raw_fd())
                .ctx("SET_INFLIGHT_FD")?;
        }
        Ok(())
    }

    /// Whether the backend keeps an inflight region for this session.
    pub fn has_inflight(&self) -> bool {
        self.inflight.is_some()
    }

    fn handshake(&mut self) -> Result<(), SessionError> {
        let fe = self.conn.frontend();
        let offered = fe.get_features().ctx("GET_FEATURES")?;
        let mut n = Negotiated {
            features_offered: offered,
            ..Negotiated::default()
        };
        if offered & PROTOCOL_FEATURES != 0 {
            n.protocol_offered = fe.get_protocol_features().ctx("GET_PROTOCOL_FEATURES")?;
            if self.opts.protocol.bits() & !VhostUserProtocolFeatures::all().bits() != 0 {
                // Bits newer than the vhost crate (which drops them): asked again, raw.
                n.protocol_offered = self.conn.get_protocol_features_all()?;
            }
            n.protocol_acked = n.protocol_offered & self.opts.protocol;
            self.conn.set_protocol_features(n.protocol_acked)?;
        }
        self.conn.frontend().set_owner().ctx("SET_OWNER")?;
        if self.opts.need_reply {
            self.conn.set_need_reply(true)?;
        }
        use VhostUserProtocolFeatures as P;
        if n.has_protocol(P::MQ) {
            let max = self.conn.frontend().get_queue_num().ctx("GET_QUEUE_NUM")?;
            n.max_queues = Some(max);
            if u64::from(self.opts.num_queues) > max {
                return Err(SessionError::TooManyQueues {
                    requested: self.opts.num_queues,
                    max,
                });
            }
        }
        if n.has_protocol(P::CONFIGURE_MEM_SLOTS) {
            n.max_mem_slots = Some(
                self.conn
                    .frontend()
                    .get_max_mem_slots()
                    .ctx("GET_MAX_MEM_SLOTS")?,
            );
        }
        if n.has_protocol(P::BACKEND_REQ) && self.opts.backend_channel {
            self.backend = Some(self.conn.open_backend_channel()?);
        }
        n.features_acked =
            offered & self.opts.features_or(DEFAULT_FEATURES) | offered & PROTOCOL_FEATURES;
        self.negotiated = n;
        self.set_features()?;
        self.conn
            .frontend()
            .set_mem_table(&self.ram.regions_info())
            .ctx("SET_MEM_TABLE")?;
        if self.negotiated.has_protocol(P::INFLIGHT_SHMFD) {
            self.set_inflight()?;
        }
        debug!("vhost-user handshake done: {:?}", self.negotiated);
        Ok(())
    }

    fn walks_status(&self) -> bool {
        self.opts.status_walk
            && self
                .negotiated
                .has_protocol(VhostUserProtocolFeatures::STATUS)
    }

    /// The status walk around SET_FEATURES: ACKNOWLEDGE, DRIVER, SET_FEATURES, FEATURES_OK
    /// (checked with GET_STATUS).
    fn set_features(&mut self) -> Result<(), SessionError> {
        if self.walks_status() {
            self.set_status(ACKNOWLEDGE)?;
            self.set_status(ACKNOWLEDGE | DRIVER)?;
        }
        self.conn
            .frontend()
            .set_features(self.negotiated.features_acked)
            .ctx("SET_FEATURES")?;
        if self.walks_status() {
            self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)?;
            let status = self.conn.get_status()?;
            if status & FEATURES_OK == 0 {
                return Err(SessionError::FeaturesRejected { status });
            }
        }
        Ok(())
    }

    /// Creates the driver queues of the session's options and starts every one of them.
    pub fn setup_queues(&mut self) -> Result<(), SessionError> {
        let cfg = QueueConfig {
            size: self.opts.queue_size,
            event_idx: self.negotiated.has_feature(VIRTIO_RING_F_EVENT_IDX),
            indirect_max: if self.negotiated.has_feature(VIRTIO_RING_F_INDIRECT_DESC) {
                self.opts.indirect_max
            } else {
                0
            },
            notify: self.opts.notify,
        };
        for i in 0..self.opts.num_queues {
            let q = DriverQueue::new(&mut self.ram, i, cfg)?;
            self.add_queue(q)?;
        }
        for i in 0..self.opts.num_queues {
            self.start_queue(i, 0)?;
        }
        Ok(())
    }

    /// Registers a queue built by the caller (its index is `q.index()`, replacing any queue
    /// with that index). It is not started.
    pub fn add_queue(&mut self, q: DriverQueue) -> Result<(), SessionError> {
        let i = usize::from(q.index());
        let setup = q.vring_setup(self.opts.addressing)?;
        while self.vrings.len() <= i {
            self.vrings.push(None);
            self.queues.push(None);
            self.started.push(false);
        }
        self.vrings[i] = Some(setup);
        self.queues[i] = Some(q);
        Ok(())
    }

    fn vring(&self, index: u16) -> Result<&VringSetup, SessionError> {
        self.vrings
            .get(usize::from(index))
            .and_then(Option::as_ref)
            .ok_or(SessionError::NoQueue(index))
    }

    /// Indices of the registered queues.
    pub fn queue_indices(&self) -> Vec<u16> {
        (0..self.vrings.len() as u16)
            .filter(|&i| self.vrings[usize::from(i)].is_some())
            .collect()
    }

    /// Starts queue `index` on the backend: SET_VRING_NUM, ADDR, BASE (`base`), CALL, KICK,
    /// SET_VRING_ENABLE(1) when protocol features are on, then one kick (the spec says a
    /// frontend SHOULD kick after SET_VRING_KICK).
    pub fn start_queue(&mut self, index: u16, base: u16) -> Result<(), SessionError> {
        let i = usize::from(index);
        let v = self
            .vrings
            .get(i)
            .and_then(Option::as_ref)
            .ok_or(SessionError::NoQueue(index))?;
        let fe = self.conn.frontend();
        fe.set_vring_num(i, v.size).ctx("SET_VRING_NUM")?;
        fe.set_vring_addr(i, &v.config()).ctx("SET_VRING_ADDR")?;
        fe.set_vring_base(i, base).ctx("SET_VRING_BASE")?;
        fe.set_vring_call(i, &v.call).ctx("SET_VRING_CALL")?;
        fe.set_vring_kick(i, &v.kick).ctx("SET_VRING_KICK")?;
        if self.negotiated.features_acked & PROTOCOL_FEATURES != 0 {
            fe.set_vring_enable(i, true).ctx("SET_VRING_ENABLE")?;
        }
        v.kick.write(1).map_err(|source| QueueError::EventFd {
            queue: index,
            op: "kick after SET_VRING_KICK",
            source,
        })?;
        self.started[i] = true;
        Ok(())
    }

    /// Stops queue `index` with GET_VRING_BASE and returns the backend's next avail index.
    pub fn stop_queue(&mut self, index: u16) -> Result<u32, SessionError> {
        let i = usize::from(index);
        self.vring(index)?;
        let base = self
            .conn
            .frontend()
            .get_vring_base(i)
            .ctx("GET_VRING_BASE")?;
        self.started[i] = false;
        Ok(base)
    }

    /// Stops queue `index` with GET_VRING_BASE_SKIP_DRAIN (protocol feature 23): the backend
    /// does not wait for requests it can cancel, and leaves them in the inflight record instead,
    /// for whichever backend starts the queue next. Returns the backend's next avail index.
    pub fn suspend_queue(&mut self, index: u16) -> Result<u32, SessionError> {
        self.vring(index)?;
        let base = self.conn.get_vring_base_skip_drain(u32::from(index))?;
        self.started[usize::from(index)] = false;
        Ok(base)
    }

    /// SET_VRING_ENABLE for one queue.
    pub fn enable_queue(&mut self, index: u16, enable: bool) -> Result<(), SessionError> {
        self.conn
            .frontend()
            .set_vring_enable(usize::from(index), enable)
            .ctx("SET_VRING_ENABLE")?;
        Ok(())
    }

    /// Sets DRIVER_OK (with STATUS; otherwise a no-op, as the device is live once rings are).
    pub fn driver_ok(&mut self) -> Result<(), SessionError> {
        if self.walks_status() {
            self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)?;
        }
        Ok(())
    }

    /// SET_STATUS (needs STATUS).
    pub fn set_status(&mut self, status: u8) -> Result<(), SessionError> {
        self.conn.set_status(status)?;
        self.status = status;
        Ok(())
    }

    /// GET_STATUS (needs STATUS).
    pub fn get_status(&mut self) -> Result<u8, SessionError> {
        Ok(self.conn.get_status()?)
    }

    /// GET_CONFIG of `len` bytes at `offset` of the device config space.
    pub fn get_config(&mut self, offset: u32, len: usize) -> Result<Vec<u8>, SessionError> {
        let (_, data) = self
            .conn
            .frontend()
            .get_config(
                offset,
                len as u32,
                VhostUserConfigFlags::empty(),
                &vec![0; len],
            )
            .ctx("GET_CONFIG")?;
        Ok(data)
    }

    /// SET_CONFIG of `data` at `offset` with `flags` (QEMU sends 0 for driver writes).
    pub fn set_config(
        &mut self,
        offset: u32,
        data: &[u8],
        flags: VhostUserConfigFlags,
    ) -> Result<(), SessionError> {
        self.conn
            .frontend()
            .set_config(offset, flags, data)
            .ctx("SET_CONFIG")?;
        Ok(())
    }

    /// GET_QUEUE_NUM (needs MQ).
    pub fn get_queue_num(&mut self) -> Result<u64, SessionError> {
        Ok(self.conn.frontend().get_queue_num().ctx("GET_QUEUE_NUM")?)
    }

    /// Resets the device: RESET_DEVICE if negotiated, else SET_STATUS(0) with STATUS. Every
    /// queue is stopped; queues the session still owns are reset driver-side too (taken queues
    /// must be reset by their owner). Restart with [`Session::reinitialize`].
    pub fn reset_device(&mut self) -> Result<(), SessionError> {
        use VhostUserProtocolFeatures as P;
        if self.negotiated.has_protocol(P::RESET_DEVICE) {
            self.conn.frontend().reset_device().ctx("RESET_DEVICE")?;
        } else if self.negotiated.has_protocol(P::STATUS) {
            self.set_status(0)?;
        } else {
            return Err(SessionError::NotNegotiated {
                operation: "device reset",
                feature: P::RESET_DEVICE | P::STATUS,
            });
        }
        self.status = 0;
        self.started.fill(false);
        for q in self.queues.iter_mut().flatten() {
            q.reset();
        }
        Ok(())
    }

    /// After a reset: status walk, SET_FEATURES, SET_MEM_TABLE, every registered queue
    /// started from index 0, DRIVER_OK.
    pub fn reinitialize(&mut self) -> Result<(), SessionError> {
        self.set_features()?;
        self.set_mem_table()?;
        for i in self.queue_indices() {
            self.start_queue(i, 0)?;
        }
        self.driver_ok()
    }

    /// Drops the connection and replays the whole setup on a new one to the same path, with
    /// the same RAM and rings: what a VMM does when its backend crashed and was restarted.
    /// With an inflight region (INFLIGHT_SHMFD negotiated) each ring restarts at its used
    /// index, as QEMU does, and the backend resubmits from its region what was in flight: any
    /// number of requests may be outstanding. Without one, each ring restarts at the avail
    /// index the driver published, so queues must be quiescent (nothing in flight): a backend
    /// cannot recover requests it had popped.
    pub fn reconnect(&mut self) -> Result<(), SessionError> {
        self.conn.shutdown();
        self.backend = None;
        self.conn = self.opts.open()?;
        self.started.fill(false);
        let before = self.negotiated.features_acked;
        self.handshake()?;
        let after = self.negotiated.features_acked;
        if after != before {
            return Err(SessionError::FeaturesChanged { before, after });
        }
        for i in self.queue_indices() {
            let v = self.vring(i)?;
            let base = if self.inflight.is_some() {
                v.published_used_idx()
            } else {
                v.published_avail_idx()
            };
            self.start_queue(i, base)?;
        }
        self.driver_ok()
    }

    /// Connects to the backend listening on `path` with this session's timeouts, for
    /// [`Session::switch_backend`].
    pub fn connect_to(&self, path: &Path) -> Result<Connection, SessionError> {
        let mut opts = self.opts.clone();
        opts.path = path.into();
        opts.open()
    }

    /// Moves the session to the backend listening on `path` (over `conn`, a connection to it
    /// from [`Session::connect_to`], or a new one), keeping guest RAM and the rings: runs the
    /// handshake asking for exactly the features acked so far, calls `prepare` (e.g. to load
    /// device state), checks the new backend acked the same features, starts each queue in
    /// `bases` at its base, and sets DRIVER_OK. Every queue must be stopped before (see
    /// [`Session::stop_queue`]).
    ///
    /// On success the previous connection is returned, for the caller to close. On an error
    /// before the first ring starts, the session is back on the previous connection as it was,
    /// with its queues still stopped, and the new connection is shut down; an error after it
    /// leaves the session on the new backend (the previous connection is shut down), since the
    /// new backend may already have taken requests.
    pub fn switch_backend<E: From<SessionError>>(
        &mut self,
        path: &Path,
        conn: Option<Connection>,
        bases: &[(u16, u16)],
        prepare: impl FnOnce(&mut Session) -> Result<(), E>,
    ) -> Result<Connection, E> {
        let mut opts = self.opts.clone();
        opts.path = path.into();
        opts.features = Some(self.negotiated.features_acked);
        let conn = match conn {
            Some(c) => c,
            None => opts.open()?,
        };
        let saved = (
            std::mem::replace(&mut self.conn, conn),
            std::mem::replace(&mut self.opts, opts),
            self.negotiated,
            self.backend.take(),
            self.status,
            self.started.clone(),
        );
        let before = saved.2.features_acked;
        let result = (|| {
            self.handshake()?;
            prepare(self)?;
            let after = self.negotiated.features_acked;
            if after != before {
                return Err(SessionError::FeaturesChanged { before, after }.into());
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.conn.shutdown();
            self.conn = saved.0;
            self.opts = saved.1;
            self.negotiated = saved.2;
            self.backend = saved.3;
            self.status = saved.4;
            self.started = saved.5;
            return Err(e);
        }
        // From the first ring on, the new backend may have taken requests: going back would run
        // them twice. A failure now leaves the session on the new backend; the old one is closed.
        let started = bases
            .iter()
            .try_for_each(|&(index, base)| self.start_queue(index, base))
            .and_then(|()| self.driver_ok());
        match started {
            Ok(()) => Ok(saved.0),
            Err(e) => {
                saved.0.shutdown();
                Err(e.into())
            }
        }
    }

    /// SET_MEM_TABLE with every active region.
    pub fn set_mem_table(&mut self) -> Result<(), SessionError> {
        self.conn
            .frontend()
            .set_mem_table(&self.ram.regions_info())
            .ctx("SET_MEM_TABLE")?;
        Ok(())
    }

    /// Creates a region of `size` bytes and announces it with ADD_MEM_REG (needs
    /// CONFIGURE_MEM_SLOTS).
    pub fn add_mem_region(&mut self, size: usize) -> Result<RegionId, SessionError> {
        let id = self.ram.add_region(size)?;
        let info = self.ram.region_info(id)?;
        if let Err(e) = self
            .conn
            .frontend()
            .add_mem_region(&info)
            .ctx("ADD_MEM_REG")
        {
            self.ram.remove_region(id)?;
            return Err(e.into());
        }
        Ok(id)
    }

    /// REM_MEM_REG for a region, then removes it from the RAM (needs CONFIGURE_MEM_SLOTS).
    pub fn remove_mem_region(&mut self, id: RegionId) -> Result<(), SessionError> {
        let info = self.ram.region_info(id)?;
        self.conn
            .frontend()
            .remove_mem_region(&info)
            .ctx("REM_MEM_REG")?;
        self.ram.remove_region(id)?;
        Ok(())
    }

    /// Stops every started queue with GET_VRING_BASE, then closes the socket. Returns each
    /// queue's base (`None` for queues that were not started).
    pub fn disconnect(mut self) -> Result<Vec<Option<u32>>, SessionError> {
        let mut bases = vec![None; self.vrings.len()];
        for (i, base) in bases.iter_mut().enumerate() {
            if self.started[i] {
                *base = Some(self.stop_queue(i as u16)?);
            }
        }
        self.conn.shutdown();
        Ok(bases)
    }

    /// The connection, for messages this type has no method for.
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM, to allocate buffers or regions.
    pub fn ram_mut(&mut self) -> &mut GuestRam {
        &mut self.ram
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The last status set with SET_STATUS.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The backend channel, if open.
    pub fn backend_channel(&mut self) -> Option<&mut BackendChannel> {
        self.backend.as_mut()
    }

    /// Takes the backend channel (e.g. to serve it from another thread).
    pub fn take_backend_channel(&mut self) -> Option<BackendChannel> {
        self.backend.take()
    }

    /// Number of queues registered.
    pub fn num_queues(&self) -> u16 {
        self.vrings.iter().flatten().count() as u16
    }

    /// Whether queue `index` is started (set up and not stopped).
    pub fn is_started(&self, index: u16) -> bool {
        self.started
            .get(usize::from(index))
            .copied()
            .unwrap_or(false)
    }

    /// Queue `index`, if the session still owns it.
    pub fn queue(&mut self, index: u16) -> Option<&mut DriverQueue> {
        self.queues.get_mut(usize::from(index))?.as_mut()
    }

    /// Takes queue `index` out of the session (the session keeps what it needs to restart it).
    pub fn take_queue(&mut self, index: u16) -> Option<DriverQueue> {
        self.queues.get_mut(usize::from(index))?.take()
    }

    /// The options this session was built with.
    pub fn options(&self) -> &SessionBuilder {
        &self.opts
    }
}
