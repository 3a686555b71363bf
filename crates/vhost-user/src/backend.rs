//! One vhost-user backend: a device behind the framework, served to one frontend at a time.
//!
//! [`VhostUserBackend`] owns the message loop. Each message is parsed into validated values
//! before anything acts on it, then turned into calls on the [`Framework`], the [`MemoryTable`]
//! or the interrupt sink. A refused message is answered with an error where the protocol has a way
//! to say so (REPLY_ACK, a zero-sized config reply); otherwise the connection is closed in an
//! orderly way. Either way the backend keeps running and the next frontend can connect.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use outboard_memory::dirty::DirtyLog;
use outboard_memory::{GuestMemoryHandle, MemoryTable, RegionDescriptor};
use outboard_virtio::inflight::InflightSource;
use outboard_virtio::state::{SavedState, MAX_STATE_SIZE};
use outboard_virtio::{Framework, VirtioDevice};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserLog, VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion, VhostUserTransferDeviceState, VhostUserVringAddr,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use crate::inflight::{InflightRegion, InflightShape};
use crate::interrupt::VhostUserInterrupt;

#[path = "handover.rs"]
pub mod handover;
use crate::wire::{self, Message, WireError};
use crate::{RequestError, TransportError};

/// SET_MEM_TABLE carries at most this many regions (the spec's baseline).
const MEM_TABLE_MAX_REGIONS: usize = 8;
/// The largest config-space access a message may make (the vhost-user limit, 0x1000 - 0x100).
const MAX_CONFIG_SIZE: u32 = 0xf00;
/// The vring index bits of SET_VRING_KICK/CALL/ERR.
const VRING_INDEX_MASK: u64 = 0xff;
/// "No file descriptor" in SET_VRING_KICK/CALL/ERR.
const VRING_NOFD_FLAG: u64 = 0x100;

/// VHOST_USER_GET_VRING_BASE_SKIP_DRAIN: GET_VRING_BASE without waiting for requests in
/// flight (they are cancelled and left to the inflight record). Newer than the vhost crate's
/// request enumeration.
pub const GET_VRING_BASE_SKIP_DRAIN: u32 = 45;
/// VHOST_USER_PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN (bit 23), newer than the vhost crate's
/// protocol feature flags: the frontend may send [`GET_VRING_BASE_SKIP_DRAIN`]. Only with
/// GET_VRING_BASE_INFLIGHT (bit 20) and INFLIGHT_SHMFD.
pub const PROTOCOL_F_SKIP_DRAIN: u64 = 1 << 23;

/// The protocol features this transport implements.
pub fn supported_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::from_bits_retain(PROTOCOL_F_SKIP_DRAIN)
        | VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Virtio feature bits that belong to vhost-user, not to the device.
fn transport_feature_bits() -> u64 {
    VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// SET_DEVICE_STATE_FD/CHECK_DEVICE_STATE reply: the backend did not return an fd of its own.
const STATE_NO_FD: u64 = 0x100;
/// The error code in a state-transfer reply.
const STATE_FAILED: u64 = 0x1;

/// Settings of a backend.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// How many memory regions the frontend may hot-add (GET_MAX_MEM_SLOTS).
    pub max_mem_slots: usize,
    /// The compat version written into saved state.
    pub compat_version: u16,
    /// The compat versions whose state this backend loads.
    pub accepted_compat: Vec<u16>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            max_mem_slots: 32,
            compat_version: 1,
            accepted_compat: vec![1],
        }
    }
}

/// A device-state transfer running on its own thread, so the control thread keeps answering.
#[derive(Debug)]
enum Transfer {
    /// Writing a saved state to the frontend's fd.
    Save(std::thread::JoinHandle<std::io::Result<()>>),
    /// Reading a state from the frontend's fd.
    Load(std::thread::JoinHandle<std::io::Result<Vec<u8>>>),
    /// The transfer could not even start; CHECK_DEVICE_STATE reports it.
    Failed(String),
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The frontend went away (or was sent away after a message that could not be answered).
    Disconnected,
    /// Shutdown was requested.
    Shutdown,
    /// The device was handed to a new process (live upgrade): the connection and everything
    /// it set up belong to that process now, and this one must leave without touching them.
    HandedOver,
}

/// What a handled message asks the loop to send back.
enum Outcome {
    /// No reply of its own (a REPLY_ACK follows if the frontend asked for one).
    Done,
    /// The message's own reply payload.
    Reply(Vec<u8>),
    /// A reply payload with a file descriptor.
    ReplyFd(Vec<u8>, std::fs::File),
}

/// A device served over vhost-user.
#[derive(Debug)]
pub struct VhostUserBackend {
    framework: Framework,
    interrupt: Arc<VhostUserInterrupt>,
    table: MemoryTable,
    memory: Option<GuestMemoryHandle>,
    protocol: VhostUserProtocolFeatures,
    owned: bool,
    config: BackendConfig,
    /// LOG_ALL was acknowledged: writes are logged once a log base is set.
    log_all: bool,
    /// The log from SET_LOG_BASE.
    log: Option<Arc<DirtyLog>>,
    transfer: Option<Transfer>,
    /// Written to make the running transfer thread give up (a frontend that neither drains nor
    /// closes its end must not keep a thread forever).
    transfer_cancel: Option<EventFd>,
    /// A duplicate of the frontend's socket, to notice a hang-up while waiting for a transfer.
    peer: Option<UnixStream>,
    /// Where each ring stood when a SET_STATUS 0 reset the device, for the GET_VRING_BASE that
    /// QEMU 7.2/8.0 send after it (see the SET_STATUS handler). Indexed by queue; an entry is
    /// dropped once its ring is set up again.
    reset_bases: Vec<Option<u16>>,
    /// The inflight region (GET_INFLIGHT_FD/SET_INFLIGHT_FD), where queues record what they
    /// have taken and not answered.
    inflight: Option<Arc<InflightRegion>>,
    /// Where upgrade requests arrive (live upgrade, see `handover.rs`).
    upgrade: Option<handover::UpgradePoint>,
}

impl VhostUserBackend {
    /// Wraps `device` in the VIRTIO framework and this transport.
    pub fn new(device: Box<dyn VirtioDevice>, config: BackendConfig) -> Self {
        let queues = device.queue_max_sizes().len();
        let interrupt = Arc::new(VhostUserInterrupt::new(queues));
        VhostUserBackend {
            framework: Framework::new(device, interrupt.clone()),
            interrupt,
            table: MemoryTable::new(config.max_mem_slots),
            memory: None,
            protocol: VhostUserProtocolFeatures::empty(),
            owned: false,
            config,
            log_all: false,
            log: None,
            transfer: None,
            transfer_cancel: None,
            peer: None,
            reset_bases: Vec::new(),
            inflight: None,
            upgrade: None,
        }
    }

    /// The framework (for status and diagnostics).
    pub fn framework(&self) -> &Framework {
        &self.framework
    }

    /// Serves frontends that connect to `listener`, one at a time, until `shutdown` is readable
    /// (or the device is handed to a new process).
    pub fn serve_listener(
        &mut self,
        listener: &UnixListener,
        shutdown: &EventFd,
    ) -> Result<SessionEnd, TransportError> {
        loop {
            match wait_readable(listener.as_fd(), shutdown, self.upgrade_fd())? {
                Ready::Shutdown => return Ok(SessionEnd::Shutdown),
                Ready::Upgrade if self.serve_upgrade(None, shutdown) => {
                    return Ok(SessionEnd::HandedOver)
                }
                Ready::Upgrade => continue,
                Ready::Socket => {}
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(TransportError::Accept(e)),
            };
            log::info!("frontend connected");
            match self.serve_stream(stream, shutdown)? {
                SessionEnd::Disconnected => {}
                end => return Ok(end),
            }
            log::info!("frontend disconnected; listening again");
        }
    }

    /// Serves one connected frontend until it disconnects or `shutdown` is readable. The device
    /// is reset and guest memory dropped when the session ends.
    pub fn serve_stream(
        &mut self,
        stream: UnixStream,
        shutdown: &EventFd,
    ) -> Result<SessionEnd, TransportError> {
        let end = self.session_loop(&stream, shutdown);
        if !matches!(end, Ok(SessionEnd::HandedOver)) {
            self.end_session();
        }
        end
    }

    fn session_loop(
        &mut self,
        stream: &UnixStream,
        shutdown: &EventFd,
    ) -> Result<SessionEnd, TransportError> {
        self.peer = stream.try_clone().ok();
        loop {
            match wait_readable(stream.as_fd(), shutdown, self.upgrade_fd())? {
                Ready::Shutdown => return Ok(SessionEnd::Shutdown),
                // At a message boundary: what the frontend sent since stays queued in the
                // socket for the new process.
                Ready::Upgrade if self.serve_upgrade(Some(stream), shutdown) => {
                    return Ok(SessionEnd::HandedOver)
                }
                Ready::Upgrade => continue,
                Ready::Socket => {}
            }
            let msg = match wire::recv_message_until(stream, Some(borrow_eventfd(shutdown))) {
                Ok(m) => m,
                Err(WireError::Disconnected) => return Ok(SessionEnd::Disconnected),
                Err(WireError::Cancelled) => return Ok(SessionEnd::Shutdown),
                Err(e) => {
                    log::warn!("closing the connection: {e}");
                    return Ok(SessionEnd::Disconnected);
                }
            };
            if !self.dispatch(stream, msg, shutdown) {
                return Ok(SessionEnd::Disconnected);
            }
        }
    }

    fn end_session(&mut self) {
        self.framework.reset();
        self.framework.set_memory(None);
        self.interrupt.clear();
        self.table.clear();
        self.memory = None;
        self.protocol = VhostUserProtocolFeatures::empty();
        self.owned = false;
        self.log_all = false;
        self.log = None;
        self.cancel_transfer();
        self.peer = None;
        self.reset_bases.clear();
        self.inflight = None;
        self.framework.set_inflight(None);
    }

    /// Handles one message and sends what it calls for. Returns false to close the connection.
    fn dispatch(&mut self, stream: &UnixStream, msg: Message, shutdown: &EventFd) -> bool {
        let header = msg.header;
        let request = FrontendReq::try_from(header.request).ok();
        log::debug!(
            "request {:?} ({}) flags {:#x} size {} fds {}",
            request,
            header.request,
            header.flags,
            header.size,
            msg.fds.len()
        );
        let result = match request {
            Some(req) => self.handle(req, msg, shutdown),
            None if header.request == GET_VRING_BASE_SKIP_DRAIN => {
                if self.protocol.bits() & PROTOCOL_F_SKIP_DRAIN == 0 {
                    Err(RequestError::SkipDrainNotNegotiated)
                } else {
                    self.get_vring_base(&msg, true)
                }
            }
            None => Err(RequestError::Unknown {
                request: header.request,
            }),
        };
        let reply_ack =
            header.need_reply() && self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        // A frontend that does not read its replies cannot keep the backend from shutting down.
        let send = |payload: &[u8]| match wire::send_reply_until(
            stream,
            header.request,
            payload,
            borrow_eventfd(shutdown),
        ) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("cannot reply to request {}: {e}", header.request);
                false
            }
        };
        match result {
            Ok(Outcome::Reply(payload)) => send(&payload),
            Ok(Outcome::ReplyFd(payload, file)) => match wire::send_reply_fds_until(
                stream,
                header.request,
                &payload,
                &[file.as_raw_fd()],
                borrow_eventfd(shutdown),
            ) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("cannot reply to request {}: {e}", header.request);
                    false
                }
            },
            Ok(Outcome::Done) if reply_ack => send(&0u64.to_ne_bytes()),
            Ok(Outcome::Done) => true,
            Err(e) => {
                log::warn!("request {:?} ({}) refused: {e}", request, header.request);
                if request == Some(FrontendReq::GET_CONFIG) {
                    // A config reply with no data is how the protocol says "error".
                    return send(VhostUserConfig::default().as_slice());
                }
                if request.is_some_and(has_own_reply) || header.request == GET_VRING_BASE_SKIP_DRAIN
                {
                    log::warn!("the request needs a reply that cannot be given; disconnecting");
                    return false;
                }
                if reply_ack {
                    return send(&1u64.to_ne_bytes());
                }
                // Without REPLY_ACK the protocol has no way to report the failure: an unknown
                // request may await a reply we cannot form, so the connection closes; a known
                // one is logged and the session goes on.
                !matches!(
                    e,
                    RequestError::Unknown { .. } | RequestError::Unsupported { .. }
                )
            }
        }
    }

    fn handle(
        &mut self,
        req: FrontendReq,
        mut msg: Message,
        shutdown: &EventFd,
    ) -> Result<Outcome, RequestError> {
        use FrontendReq as R;
        let fds = msg.fds.len();
        let expect_fds = |want: usize| {
            if fds == want {
                Ok(())
            } else {
                Err(RequestError::FdCount { want, got: fds })
            }
        };
        match req {
            R::GET_FEATURES => {
                expect_fds(0)?;
                no_payload(&msg)?;
                Ok(reply_u64(
                    self.framework.offered_features() | transport_feature_bits(),
                ))
            }
            R::SET_FEATURES => {
                expect_fds(0)?;
                let v = u64_payload(&msg)?;
                let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
                self.framework.set_features(v & !transport_feature_bits())?;
                self.log_all = v & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
                self.update_logging();
                if v & protocol_bit == 0 {
                    // Without protocol features there is no SET_VRING_ENABLE: rings run as soon
                    // as they start.
                    self.framework.enable_all_queues();
                }
                Ok(Outcome::Done)
            }
            R::SET_OWNER => {
                expect_fds(0)?;
                no_payload(&msg)?;
                if self.owned {
                    return Err(RequestError::AlreadyOwned);
                }
                self.owned = true;
                Ok(Outcome::Done)
            }
            R::RESET_OWNER => {
                expect_fds(0)?;
                no_payload(&msg)?;
                self.framework.reset();
                self.owned = false;
                Ok(Outcome::Done)
            }
            R::GET_PROTOCOL_FEATURES => {
                expect_fds(0)?;
                no_payload(&msg)?;
                Ok(reply_u64(supported_protocol_features().bits()))
            }
            R::SET_PROTOCOL_FEATURES => {
                expect_fds(0)?;
                let v = u64_payload(&msg)?;
                let supported = supported_protocol_features().bits();
                if v & !supported != 0 {
                    return Err(RequestError::ProtocolFeatures {
                        unsupported: v & !supported,
                    });
                }
                let needed = VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT.bits()
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
                if v & PROTOCOL_F_SKIP_DRAIN != 0 && v & needed != needed {
                    return Err(RequestError::SkipDrainPrerequisites);
                }
                self.protocol = VhostUserProtocolFeatures::from_bits_retain(v);
                self.framework.set_start_on_driver_ok(
                    self.protocol.contains(VhostUserProtocolFeatures::STATUS),
                );
                Ok(Outcome::Done)
            }
            R::GET_QUEUE_NUM => {
                expect_fds(0)?;
                no_payload(&msg)?;
                Ok(reply_u64(self.framework.num_queues() as u64))
            }
            R::GET_MAX_MEM_SLOTS => {
                expect_fds(0)?;
                no_payload(&msg)?;
                Ok(reply_u64(self.table.max_slots() as u64))
            }
            R::SET_MEM_TABLE => self.set_mem_table(msg),
            R::ADD_MEM_REG => {
                expect_fds(1)?;
                let desc = single_region(&msg)?;
                let fd = msg.fds.remove(0);
                self.table.add(desc, fd.into())?;
                self.publish_memory()?;
                Ok(Outcome::Done)
            }
            R::REM_MEM_REG => {
                // A stray fd may come along; it is closed when `msg` drops.
                if fds > 1 {
                    return Err(RequestError::FdCount { want: 0, got: fds });
                }
                let desc = single_region(&msg)?;
                self.table.remove(&desc)?;
                self.publish_memory()?;
                Ok(Outcome::Done)
            }
            R::SET_VRING_NUM => {
                expect_fds(0)?;
                let s = vring_state(&msg)?;
                self.framework.set_queue_size(s.index, s.num)?;
                Ok(Outcome::Done)
            }
            R::SET_VRING_ADDR => {
                expect_fds(0)?;
                self.set_vring_addr(&msg)?;
                Ok(Outcome::Done)
            }
            R::SET_VRING_BASE => {
                expect_fds(0)?;
                let s = vring_state(&msg)?;
                let base =
                    u16::try_from(s.num).map_err(|_| RequestError::VringBase { num: s.num })?;
                self.framework.set_queue_base(s.index, base)?;
                self.forget_reset_base(s.index);
                Ok(Outcome::Done)
            }
            R::GET_VRING_BASE => self.get_vring_base(&msg, false),
            R::SET_VRING_KICK => {
                let (index, fd) = self.vring_fd(&mut msg)?;
                let fd = fd.ok_or(RequestError::PollingUnsupported { index })?;
                self.framework.start_queue(index, fd)?;
                self.forget_reset_base(index);
                Ok(Outcome::Done)
            }
            R::SET_VRING_CALL => {
                let (index, fd) = self.vring_fd(&mut msg)?;
                self.interrupt.set_call(index as usize, fd);
                Ok(Outcome::Done)
            }
            R::SET_VRING_ERR => {
                let (index, fd) = self.vring_fd(&mut msg)?;
                self.interrupt.set_err(index as usize, fd);
                Ok(Outcome::Done)
            }
            R::SET_VRING_ENABLE => {
                expect_fds(0)?;
                let s = vring_state(&msg)?;
                let enable = match s.num {
                    0 => false,
                    1 => true,
                    num => return Err(RequestError::VringEnable { num }),
                };
                self.framework.set_queue_enabled(s.index, enable)?;
                Ok(Outcome::Done)
            }
            R::GET_CONFIG => {
                expect_fds(0)?;
                let (hdr, data_len) = config_header(&msg)?;
                let mut data = vec![0u8; data_len];
                self.framework.read_config(hdr.offset as usize, &mut data)?;
                let mut reply = hdr.as_slice().to_vec();
                reply.extend_from_slice(&data);
                Ok(Outcome::Reply(reply))
            }
            R::SET_CONFIG => {
                expect_fds(0)?;
                let (hdr, _) = config_header(&msg)?;
                let data = &msg.payload[std::mem::size_of::<VhostUserConfig>()..];
                self.framework.write_config(hdr.offset as usize, data)?;
                Ok(Outcome::Done)
            }
            R::SET_BACKEND_REQ_FD => {
                expect_fds(1)?;
                no_payload_or_u64(&msg)?;
                let fd = msg.fds.remove(0);
                let sock = UnixStream::from(fd);
                self.interrupt.set_channel(Some(sock));
                Ok(Outcome::Done)
            }
            R::SET_STATUS => {
                expect_fds(0)?;
                self.require(VhostUserProtocolFeatures::STATUS, req)?;
                let v = u64_payload(&msg)?;
                let status = u8::try_from(v).map_err(|_| RequestError::Status { value: v })?;
                if status == 0 {
                    // QEMU 7.2 and 8.0 stop a vhost-user device with SET_STATUS 0 *before*
                    // GET_VRING_BASE (vhost_dev_stop; QEMU 8.1 swapped the two: "vhost-user: send
                    // SET_STATUS 0 after GET_VRING_BASE"). The reset forgets where the rings
                    // stood, so GET_VRING_BASE would answer 0: the migrated rings are then refused
                    // by the destination ("Guest index ... inconsistent with Host index 0x0"), and
                    // after stop/cont the device would replay old requests. Quiesce first (every
                    // request in flight completes), note each ring's position for the
                    // GET_VRING_BASE to come, then reset as asked.
                    self.framework.quiesce();
                    let bases = self.framework.queue_configs().map(|c| Some(c.next_avail));
                    self.reset_bases = bases.collect();
                }
                self.framework.set_status(status)?;
                Ok(Outcome::Done)
            }
            R::GET_STATUS => {
                expect_fds(0)?;
                self.require(VhostUserProtocolFeatures::STATUS, req)?;
                no_payload(&msg)?;
                Ok(reply_u64(u64::from(self.framework.status())))
            }
            R::RESET_DEVICE => {
                expect_fds(0)?;
                no_payload(&msg)?;
                self.framework.reset();
                Ok(Outcome::Done)
            }
            R::SET_LOG_BASE => {
                self.require(VhostUserProtocolFeatures::LOG_SHMFD, req)?;
                expect_fds(1)?;
                let l: VhostUserLog = msg.payload_as().ok_or(RequestError::PayloadSize {
                    got: msg.payload.len(),
                })?;
                let (size, offset) = (l.mmap_size, l.mmap_offset);
                let file = std::fs::File::from(msg.fds.remove(0));
                let log = DirtyLog::new(file, offset, size)?;
                log::info!("dirty log set: {size} bytes");
                self.log = Some(Arc::new(log));
                self.update_logging();
                // SET_LOG_BASE always has a reply with LOG_SHMFD.
                Ok(reply_u64(0))
            }
            R::SET_LOG_FD => {
                // An eventfd the frontend may want signalled when the log changes; QEMU does not
                // require it. Accepted and closed.
                expect_fds(1)?;
                no_payload(&msg)?;
                Ok(Outcome::Done)
            }
            R::SET_DEVICE_STATE_FD => {
                self.require(VhostUserProtocolFeatures::DEVICE_STATE, req)?;
                expect_fds(1)?;
                let t: VhostUserTransferDeviceState =
                    msg.payload_as().ok_or(RequestError::PayloadSize {
                        got: msg.payload.len(),
                    })?;
                let fd = msg.fds.remove(0);
                Ok(reply_u64(self.start_transfer(t.direction, t.phase, fd)))
            }
            R::CHECK_DEVICE_STATE => {
                self.require(VhostUserProtocolFeatures::DEVICE_STATE, req)?;
                expect_fds(0)?;
                no_payload(&msg)?;
                if !self.wait_for_transfer(shutdown) {
                    // The frontend keeps the transfer from finishing (a pipe it neither closes
                    // nor drains) and the backend is shutting down: the transfer failed.
                    return Ok(reply_u64(STATE_FAILED));
                }
                Ok(reply_u64(self.finish_transfer()))
            }
            R::GET_INFLIGHT_FD => {
                self.require(VhostUserProtocolFeatures::INFLIGHT_SHMFD, req)?;
                expect_fds(0)?;
                let asked = inflight_payload(&msg)?;
                let shape = InflightShape::new(
                    asked.num_queues,
                    asked.queue_size,
                    self.framework.num_queues(),
                )?;
                let region = InflightRegion::create(shape)?;
                let file = region.file().try_clone().map_err(|source| {
                    crate::inflight::InflightError::Io {
                        what: "dup",
                        source,
                    }
                })?;
                let reply =
                    VhostUserInflight::new(shape.size(), 0, shape.num_queues, shape.queue_size);
                self.set_inflight(region);
                Ok(Outcome::ReplyFd(reply.as_slice().to_vec(), file))
            }
            R::SET_INFLIGHT_FD => {
                self.require(VhostUserProtocolFeatures::INFLIGHT_SHMFD, req)?;
                expect_fds(1)?;
                let given = inflight_payload(&msg)?;
                let shape = InflightShape::new(
                    given.num_queues,
                    given.queue_size,
                    self.framework.num_queues(),
                )?;
                let file = std::fs::File::from(msg.fds.remove(0));
                let region = InflightRegion::open(file, given.mmap_offset, given.mmap_size, shape)?;
                self.set_inflight(region);
                Ok(Outcome::Done)
            }
            other => Err(RequestError::Unsupported { request: other }),
        }
    }

    /// Makes `region` the record every queue started from now on keeps.
    fn set_inflight(&mut self, region: InflightRegion) {
        log::info!("inflight region: {:?}", region.shape());
        let region = Arc::new(region);
        self.framework
            .set_inflight(Some(region.clone() as Arc<dyn InflightSource>));
        self.inflight = Some(region);
    }

    /// The inflight region, if the frontend set one up.
    pub fn inflight_region(&self) -> Option<&Arc<InflightRegion>> {
        self.inflight.as_ref()
    }

    /// Ring `index` is being set up again: a position kept from a reset no longer applies.
    fn forget_reset_base(&mut self, index: u32) {
        if let Some(base) = self.reset_bases.get_mut(index as usize) {
            *base = None;
        }
    }

    /// Attaches the log to the memory table while LOG_ALL is on and a log is set.
    fn update_logging(&mut self) {
        let log = if self.log_all { self.log.clone() } else { None };
        if log.is_some() != self.table.dirty_log_active() {
            log::info!("dirty logging {}", if log.is_some() { "on" } else { "off" });
        }
        self.table.set_dirty_log(log);
    }

    /// SET_DEVICE_STATE_FD: starts a save or a load on its own thread; returns the reply value.
    fn start_transfer(&mut self, direction: u32, phase: u32, fd: OwnedFd) -> u64 {
        const SAVE: u32 = 0;
        const LOAD: u32 = 1;
        const STOPPED: u32 = 0;
        if self.transfer.is_some() {
            log::warn!("a new state transfer replaces one that was never checked");
            self.cancel_transfer();
        }
        if phase != STOPPED {
            log::warn!("state transfer phase {phase} is not supported");
            return STATE_NO_FD | STATE_FAILED;
        }
        let file = std::fs::File::from(fd);
        let cancel = match EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
            .and_then(|e| Ok((e.try_clone()?, e)))
        {
            Ok((mine, theirs)) => {
                self.transfer_cancel = Some(mine);
                theirs
            }
            Err(e) => {
                log::warn!("device state transfer cannot start: no cancel eventfd: {e}");
                self.transfer = Some(Transfer::Failed(format!("no cancel eventfd: {e}")));
                return STATE_NO_FD;
            }
        };
        let transfer = match direction {
            SAVE => match self.framework.save_state(self.config.compat_version) {
                Ok(state) => match state.encode() {
                    Ok(blob) => {
                        log::info!("saving {} bytes of device state", blob.len());
                        spawn_transfer("state-save", move || write_state(file, &blob, &cancel))
                            .map(Transfer::Save)
                    }
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            },
            LOAD => {
                spawn_transfer("state-load", move || read_state(file, &cancel)).map(Transfer::Load)
            }
            other => Err(format!("unknown transfer direction {other}")),
        };
        self.transfer = Some(transfer.unwrap_or_else(|e| {
            log::warn!("device state transfer cannot start: {e}");
            Transfer::Failed(e)
        }));
        STATE_NO_FD
    }

    /// CHECK_DEVICE_STATE: waits for the transfer and, for a load, applies the state.
    /// Waits until the transfer thread has finished (true), or until `shutdown` is readable
    /// (false): a transfer waits on the frontend, which must not keep the backend from exiting.
    fn wait_for_transfer(&self, shutdown: &EventFd) -> bool {
        let finished = |transfer: &Option<Transfer>| match transfer {
            Some(Transfer::Save(t)) => t.is_finished(),
            Some(Transfer::Load(t)) => t.is_finished(),
            Some(Transfer::Failed(_)) | None => true,
        };
        // The device is stopped while the frontend waits for this reply, so every millisecond
        // here is migration downtime. A transfer thread usually ends within microseconds of the
        // frontend's last read or close: look again at once for a little while, then sleep
        // briefly between looks.
        let start = std::time::Instant::now();
        while !finished(&self.transfer) {
            if start.elapsed() < std::time::Duration::from_micros(500) {
                std::thread::yield_now();
                continue;
            }
            let mut fds = vec![PollFd::new(borrow_eventfd(shutdown), PollFlags::POLLIN)];
            if let Some(peer) = &self.peer {
                fds.push(PollFd::new(
                    peer.as_fd(),
                    PollFlags::from_bits_retain(libc::POLLRDHUP),
                ));
            }
            if let Ok(n) = poll(&mut fds, PollTimeout::from(1u8)) {
                if n > 0 {
                    if fds.len() > 1 && fds[0].revents().is_none_or(|r| r.is_empty()) {
                        log::warn!("the frontend hung up while a device state transfer waited");
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Makes the running transfer thread (if any) give up, and waits for it.
    fn cancel_transfer(&mut self) {
        if let Some(c) = self.transfer_cancel.take() {
            if let Err(e) = c.write(1) {
                log::error!("cannot cancel the device state transfer: {e}");
            }
        }
        let outcome = match self.transfer.take() {
            Some(Transfer::Save(t)) => t.join().map(|r| r.err()),
            Some(Transfer::Load(t)) => t.join().map(|r| r.err()),
            Some(Transfer::Failed(_)) | None => Ok(None),
        };
        match outcome {
            Ok(Some(e)) => log::info!("device state transfer abandoned: {e}"),
            Ok(None) => {}
            Err(_) => log::error!("the device state transfer thread panicked"),
        }
    }

    fn finish_transfer(&mut self) -> u64 {
        let result = match self.transfer.take() {
            None => Err("no state transfer to check".to_string()),
            Some(Transfer::Failed(e)) => Err(e),
            Some(Transfer::Save(t)) => match t.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("writing the state failed: {e}")),
                Err(_) => Err("the state writer panicked".into()),
            },
            Some(Transfer::Load(t)) => match t.join() {
                Ok(Ok(blob)) => self.apply_state(&blob),
                Ok(Err(e)) => Err(format!("reading the state failed: {e}")),
                Err(_) => Err("the state reader panicked".into()),
            },
        };
        match result {
            Ok(()) => {
                log::info!("device state transfer checked: OK");
                0
            }
            Err(e) => {
                log::error!("device state transfer failed: {e}");
                STATE_FAILED
            }
        }
    }

    fn apply_state(&mut self, blob: &[u8]) -> Result<(), String> {
        let state = SavedState::decode(blob).map_err(|e| e.to_string())?;
        self.framework
            .load_state(&state, &self.config.accepted_compat)
            .map_err(|e| e.to_string())?;
        log::info!("loaded {} bytes of device state", blob.len());
        Ok(())
    }

    /// GET_VRING_BASE, and with `skip_drain` GET_VRING_BASE_SKIP_DRAIN: stops the ring and
    /// answers where it stands. Skipping the drain, requests the device can cancel are left
    /// unanswered in the inflight record (the frontend keeps it, and hands it to whichever
    /// backend starts the ring again) instead of being waited for.
    fn get_vring_base(&mut self, msg: &Message, skip_drain: bool) -> Result<Outcome, RequestError> {
        if !msg.fds.is_empty() {
            return Err(RequestError::FdCount {
                want: 0,
                got: msg.fds.len(),
            });
        }
        let s = vring_state(msg)?;
        let next_avail = if skip_drain && self.inflight.is_some() {
            self.framework.suspend_queue(s.index)?
        } else {
            self.framework.stop_queue(s.index)?
        };
        // A ring stopped by a SET_STATUS 0 reset reports where it stood then.
        let next_avail = self
            .reset_bases
            .get(s.index as usize)
            .copied()
            .flatten()
            .unwrap_or(next_avail);
        let reply = VhostUserVringState::new(s.index, u32::from(next_avail));
        Ok(Outcome::Reply(reply.as_slice().to_vec()))
    }

    fn require(
        &self,
        feature: VhostUserProtocolFeatures,
        request: FrontendReq,
    ) -> Result<(), RequestError> {
        if self.protocol.contains(feature) {
            Ok(())
        } else {
            Err(RequestError::NotNegotiated { request })
        }
    }

    fn set_mem_table(&mut self, msg: Message) -> Result<Outcome, RequestError> {
        const HDR: usize = 8;
        let region_size = std::mem::size_of::<VhostUserMemoryRegion>();
        let count: u32 = wire::parse_prefix(&msg.payload).ok_or(RequestError::PayloadSize {
            got: msg.payload.len(),
        })?;
        let count = count as usize;
        if count == 0 || count > MEM_TABLE_MAX_REGIONS {
            return Err(RequestError::RegionCount { count });
        }
        if msg.payload.len() != HDR + count * region_size {
            return Err(RequestError::PayloadSize {
                got: msg.payload.len(),
            });
        }
        if msg.fds.len() != count {
            return Err(RequestError::FdCount {
                want: count,
                got: msg.fds.len(),
            });
        }
        let regions = msg.payload[HDR..]
            .chunks_exact(region_size)
            .zip(msg.fds)
            .map(|(raw, fd)| {
                let r: VhostUserMemoryRegion = wire::parse(raw).expect("chunk has the region size");
                (region_descriptor(&r), std::fs::File::from(fd))
            })
            .collect();
        self.table.replace(regions)?;
        self.publish_memory()?;
        Ok(Outcome::Done)
    }

    /// Gives devices a snapshot of the current table.
    /// With no region left (REM_MEM_REG of the last one), the device has no memory and pauses
    /// until a region is added again.
    fn publish_memory(&mut self) -> Result<(), RequestError> {
        if self.table.is_empty() {
            self.memory = None;
            self.framework.set_memory(None);
            return Ok(());
        }
        let snapshot = self.table.snapshot()?;
        match &self.memory {
            Some(handle) => handle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(snapshot),
            None => {
                let handle = GuestMemoryHandle::new(snapshot);
                self.memory = Some(handle.clone());
                self.framework.set_memory(Some(handle));
            }
        }
        Ok(())
    }

    fn set_vring_addr(&mut self, msg: &Message) -> Result<(), RequestError> {
        let a: VhostUserVringAddr = msg.payload_as().ok_or(RequestError::PayloadSize {
            got: msg.payload.len(),
        })?;
        let (index, flags) = (a.index, a.flags);
        if flags & !VhostUserVringAddrFlags::all().bits() != 0 {
            return Err(RequestError::VringFlags { flags });
        }
        let size = self
            .framework
            .queue_configs()
            .nth(index as usize)
            .map(|c| u64::from(c.size))
            .ok_or(outboard_virtio::QueueConfigError::NoSuchQueue {
                index,
                count: self.framework.num_queues(),
            })?;
        let (desc, avail, used) = (a.descriptor, a.available, a.used);
        let desc = self.table.va_to_gpa(desc, 16 * size)?;
        let avail = self.table.va_to_gpa(avail, 6 + 2 * size)?;
        let used = self.table.va_to_gpa(used, 6 + 8 * size)?;
        self.framework
            .set_queue_addresses(index, desc.0, avail.0, used.0)?;
        Ok(())
    }

    /// Parses SET_VRING_KICK/CALL/ERR: the ring index and its eventfd, if one was sent.
    fn vring_fd(&self, msg: &mut Message) -> Result<(u32, Option<EventFd>), RequestError> {
        let v = u64_payload(msg)?;
        if v & !(VRING_INDEX_MASK | VRING_NOFD_FLAG) != 0 {
            return Err(RequestError::VringFdPayload { value: v });
        }
        let index = (v & VRING_INDEX_MASK) as u32;
        if index as usize >= self.framework.num_queues() {
            return Err(outboard_virtio::QueueConfigError::NoSuchQueue {
                index,
                count: self.framework.num_queues(),
            }
            .into());
        }
        let want = if v & VRING_NOFD_FLAG != 0 { 0 } else { 1 };
        if msg.fds.len() != want {
            return Err(RequestError::FdCount {
                want,
                got: msg.fds.len(),
            });
        }
        let fd = msg.fds.pop().map(eventfd).transpose()?;
        Ok((index, fd))
    }
}

fn spawn_transfer<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<std::io::Result<T>>, String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| format!("cannot start the {name} thread: {e}"))
}

/// Waits until `file` is ready for `events` or `cancel` is written (an error then).
fn wait_transfer_fd(
    file: &std::fs::File,
    events: PollFlags,
    cancel: &EventFd,
) -> std::io::Result<()> {
    loop {
        let mut fds = [
            PollFd::new(file.as_fd(), events),
            PollFd::new(borrow_eventfd(cancel), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "the transfer was cancelled",
            ));
        }
        // Ready, or an error or hang-up that the read or write reports.
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(());
        }
    }
}

/// Writes `blob` to the frontend's fd a page at a time, each write after the fd said it has
/// room (a pipe then takes a page without blocking), so that `cancel` is always heard.
fn write_state(mut file: std::fs::File, blob: &[u8], cancel: &EventFd) -> std::io::Result<()> {
    use std::io::Write;
    let mut rest = blob;
    while !rest.is_empty() {
        wait_transfer_fd(&file, PollFlags::POLLOUT, cancel)?;
        let n = file.write(&rest[..rest.len().min(4096)])?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        rest = &rest[n..];
    }
    Ok(())
    // Closing the fd tells the frontend the state is complete.
}

/// Reads the state from the frontend's fd until end of file, each read after the fd said it
/// has data, so that `cancel` is always heard.
fn read_state(mut file: std::fs::File, cancel: &EventFd) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut blob = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        wait_transfer_fd(&file, PollFlags::POLLIN, cancel)?;
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(blob);
        }
        // One byte past the cap tells an oversized state apart from one exactly at it.
        if blob.len() + n > MAX_STATE_SIZE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the state exceeds {MAX_STATE_SIZE} bytes"),
            ));
        }
        blob.extend_from_slice(&buf[..n]);
    }
}

/// Requests whose reply is their own (not a REPLY_ACK).
fn has_own_reply(req: FrontendReq) -> bool {
    matches!(
        req,
        FrontendReq::GET_FEATURES
            | FrontendReq::GET_PROTOCOL_FEATURES
            | FrontendReq::GET_VRING_BASE
            | FrontendReq::GET_QUEUE_NUM
            | FrontendReq::GET_CONFIG
            | FrontendReq::GET_MAX_MEM_SLOTS
            | FrontendReq::GET_STATUS
            | FrontendReq::GET_INFLIGHT_FD
            | FrontendReq::GET_SHARED_OBJECT
            | FrontendReq::SET_LOG_BASE
            | FrontendReq::SET_DEVICE_STATE_FD
            | FrontendReq::CHECK_DEVICE_STATE
            | FrontendReq::GET_SHMEM_CONFIG
            | FrontendReq::POSTCOPY_ADVISE
    )
}

/// Checks the fd is an eventfd and wraps it.
fn eventfd(fd: OwnedFd) -> Result<EventFd, RequestError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    match link {
        Ok(target) if target.as_os_str() == "anon_inode:[eventfd]" => {}
        Ok(target) => {
            return Err(RequestError::NotAnEventFd {
                what: target.to_string_lossy().into_owned(),
            })
        }
        // Without /proc (a sandbox may hide it) the check cannot be made; epoll will refuse a
        // file it cannot wait on.
        Err(_) => {}
    }
    // SAFETY: `into_raw_fd` hands over sole ownership of a valid fd, which EventFd takes.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

fn region_descriptor(r: &VhostUserMemoryRegion) -> RegionDescriptor {
    RegionDescriptor {
        guest_phys_addr: r.guest_phys_addr,
        memory_size: r.memory_size,
        user_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

fn single_region(msg: &Message) -> Result<RegionDescriptor, RequestError> {
    let r: VhostUserSingleMemoryRegion = msg.payload_as().ok_or(RequestError::PayloadSize {
        got: msg.payload.len(),
    })?;
    Ok(region_descriptor(&r))
}

/// The payload of GET_INFLIGHT_FD/SET_INFLIGHT_FD.
fn inflight_payload(msg: &Message) -> Result<VhostUserInflight, RequestError> {
    if msg.payload.len() != std::mem::size_of::<VhostUserInflight>() {
        return Err(RequestError::PayloadSize {
            got: msg.payload.len(),
        });
    }
    msg.payload_as().ok_or(RequestError::PayloadSize {
        got: msg.payload.len(),
    })
}

fn reply_u64(v: u64) -> Outcome {
    Outcome::Reply(v.to_ne_bytes().to_vec())
}

fn u64_payload(msg: &Message) -> Result<u64, RequestError> {
    msg.payload_as::<u64>().ok_or(RequestError::PayloadSize {
        got: msg.payload.len(),
    })
}

fn no_payload(msg: &Message) -> Result<(), RequestError> {
    if msg.payload.is_empty() {
        Ok(())
    } else {
        Err(RequestError::PayloadSize {
            got: msg.payload.len(),
        })
    }
}

/// QEMU sends SET_BACKEND_REQ_FD with no payload; some frontends add a u64.
fn no_payload_or_u64(msg: &Message) -> Result<(), RequestError> {
    match msg.payload.len() {
        0 | 8 => Ok(()),
        got => Err(RequestError::PayloadSize { got }),
    }
}

fn vring_state(msg: &Message) -> Result<VhostUserVringState, RequestError> {
    msg.payload_as().ok_or(RequestError::PayloadSize {
        got: msg.payload.len(),
    })
}

/// Parses the config header and checks the payload holds exactly `size` bytes after it (for
/// GET_CONFIG the frontend sends a buffer of that size too).
fn config_header(msg: &Message) -> Result<(VhostUserConfig, usize), RequestError> {
    let hdr: VhostUserConfig =
        wire::parse_prefix(&msg.payload).ok_or(RequestError::PayloadSize {
            got: msg.payload.len(),
        })?;
    let size = hdr.size;
    if size == 0 || size > MAX_CONFIG_SIZE {
        return Err(RequestError::ConfigSize { size });
    }
    let want = std::mem::size_of::<VhostUserConfig>() + size as usize;
    if msg.payload.len() != want {
        return Err(RequestError::PayloadSize {
            got: msg.payload.len(),
        });
    }
    Ok((hdr, size as usize))
}

/// The fd of an eventfd, borrowed for as long as the eventfd.
fn borrow_eventfd(e: &EventFd) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the fd belongs to `e`, which outlives the returned borrow, so it stays open.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// What [`wait_readable`] found.
enum Ready {
    /// The socket is readable.
    Socket,
    /// Shutdown was requested.
    Shutdown,
    /// A new process is at the upgrade socket.
    Upgrade,
}

/// Waits until `fd`, `shutdown` or the upgrade socket is readable.
fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    shutdown: &EventFd,
    upgrade: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<Ready, TransportError> {
    let shutdown_fd = borrow_eventfd(shutdown);
    loop {
        let mut fds = vec![
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(shutdown_fd, PollFlags::POLLIN),
        ];
        fds.extend(upgrade.map(|u| PollFd::new(u, PollFlags::POLLIN)));
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(TransportError::Poll(e.into())),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[1]) {
            return Ok(Ready::Shutdown);
        }
        if fds.get(2).is_some_and(ready) {
            return Ok(Ready::Upgrade);
        }
        if ready(&fds[0]) {
            return Ok(Ready::Socket);
        }
    }
}
