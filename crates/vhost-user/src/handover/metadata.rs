//! The handover metadata: the session, the sockets and the descriptors they name, in the
//! `StateWriter`/`StateReader` codec with its own magic and version. Decoding treats the old
//! process as untrusted: every read is length-checked, lists are capped, each descriptor index
//! must name exactly one received descriptor and every descriptor must be named, and each
//! descriptor's kind is checked.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use nix::sys::socket::{getsockopt, sockopt};
use outboard_memory::RegionDescriptor;
use outboard_virtio::state::{StateReader, StateWriter, MAX_STATE_SIZE};
use outboard_virtio::status::DEVICE_NEEDS_RESET;
use vmm_sys_util::eventfd::EventFd;

use super::super::{borrow_eventfd, eventfd, VhostUserBackend};
use super::{
    io, HandoverError, ListenerHandover, QueueHandover, Received, RegionHandover, SessionHandover,
    SocketFileHandover, UpgradePoint, MAX_PATH, MAX_QUEUES, MAX_REGIONS, METADATA_MAGIC, NO_FD,
    PROTOCOL_VERSION,
};

/// Descriptors to send, each named in the metadata by its index.
#[derive(Default)]
pub(super) struct Outgoing {
    pub(super) fds: Vec<OwnedFd>,
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
pub(super) fn decode_metadata(
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

/// The descriptor count a metadata payload announces.
pub(super) fn metadata_fd_count(metadata: &[u8]) -> Result<usize, HandoverError> {
    let mut r = StateReader::new(metadata);
    for _ in 0..METADATA_MAGIC.len() {
        r.u8("magic")?;
    }
    r.u16("version")?;
    Ok(r.u32("descriptor count")? as usize)
}

impl VhostUserBackend {
    /// The metadata describing the session on `connection` (if any) and the sockets of
    /// `point`, and the descriptors it names.
    pub(super) fn encode_metadata(
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
