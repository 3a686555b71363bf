//! The TAP backend: the host kernel's TUN/TAP driver in TAP mode with a virtio header on every
//! packet (`IFF_VNET_HDR`, header size 12) and one file descriptor per queue pair
//! (`IFF_MULTI_QUEUE`).
//!
//! The interface is opened by name (created if it does not exist, which needs `CAP_NET_ADMIN`)
//! or handed over as already-open descriptors, which lets an unprivileged backend use a TAP
//! that a privileged manager created. Received packets may use exactly the offloads the driver
//! negotiated: the device mirrors them into `TUNSETOFFLOAD`. A queue pair the driver does not
//! use is detached from a multi-queue interface so that the kernel steers nothing to it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::raw::c_short;

use vmm_sys_util::eventfd::EventFd;

use super::{BackendError, PacketBackend, PacketQueue, MAX_SPARES};
use crate::config::{Offloads, ETH_HLEN, MAX_GSO_PAYLOAD, VLAN_HLEN};
use crate::hdr::HDR_LEN;
use crate::sys::tap as sys;

/// The largest packet the kernel hands over: a 64 KiB GSO frame, its headers and the virtio
/// header.
const MAX_PACKET: usize = HDR_LEN + ETH_HLEN + VLAN_HLEN + MAX_GSO_PAYLOAD;

/// A TAP interface with one file descriptor per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    files: Vec<File>,
    multi_queue: bool,
}

fn io_error<'a>(
    operation: &'static str,
    what: &'a str,
) -> impl FnOnce(io::Error) -> BackendError + 'a {
    move |source| BackendError::Io {
        operation,
        what: what.to_string(),
        source,
    }
}

impl Tap {
    /// Opens the TAP interface `name` with `queues` queues, creating it if it does not exist.
    /// A single queue also works with an existing interface that is not multi-queue.
    pub fn open(name: &str, queues: u16) -> Result<Self, BackendError> {
        let what = format!("TAP {name}");
        let flags = sys::IFF_TAP | sys::IFF_NO_PI | sys::IFF_VNET_HDR;
        let first = sys::open_tun().map_err(io_error("opening /dev/net/tun", &what))?;
        let (actual, multi_queue) = match sys::set_iff(&first, name, flags | sys::IFF_MULTI_QUEUE) {
            Ok(actual) => (actual, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && queues == 1 => {
                let actual =
                    sys::set_iff(&first, name, flags).map_err(io_error("TUNSETIFF", &what))?;
                (actual, false)
            }
            Err(e) => return Err(io_error("TUNSETIFF", &what)(e)),
        };
        let mut files = vec![first];
        for _ in 1..queues {
            let f = sys::open_tun().map_err(io_error("opening /dev/net/tun", &what))?;
            sys::set_iff(&f, &actual, flags | sys::IFF_MULTI_QUEUE)
                .map_err(io_error("TUNSETIFF (another queue)", &what))?;
            files.push(f);
        }
        Self::finish(actual, files, multi_queue)
    }

    /// Uses descriptors already attached to one TAP interface (opened with `IFF_TAP`,
    /// `IFF_NO_PI` and `IFF_VNET_HDR`, and `IFF_MULTI_QUEUE` if there are several), one per
    /// queue pair.
    pub fn from_fds(fds: Vec<OwnedFd>) -> Result<Self, BackendError> {
        let mut name: Option<String> = None;
        let mut multi_queue = false;
        let mut files = Vec::with_capacity(fds.len());
        let unusable = |what: String, reason: String| BackendError::Unusable { what, reason };
        for fd in fds {
            let what = format!("TAP file descriptor {}", fd.as_raw_fd());
            let (ifname, flags) = sys::get_iff(fd.as_fd()).map_err(io_error("TUNGETIFF", &what))?;
            let need: c_short = sys::IFF_TAP | sys::IFF_NO_PI | sys::IFF_VNET_HDR;
            if flags & need != need {
                return Err(unusable(
                    what,
                    format!("{ifname} was not opened with IFF_TAP, IFF_NO_PI and IFF_VNET_HDR (flags {flags:#x})"),
                ));
            }
            match &name {
                Some(n) if *n != ifname => {
                    return Err(unusable(what, format!("belongs to {ifname}, not {n}")))
                }
                _ => name = Some(ifname),
            }
            multi_queue = flags & sys::IFF_MULTI_QUEUE != 0;
            sys::set_nonblocking(fd.as_fd()).map_err(io_error("setting O_NONBLOCK", &what))?;
            files.push(File::from(fd));
        }
        let Some(name) = name else {
            return Err(unusable("TAP".into(), "no file descriptor given".into()));
        };
        if files.len() > 1 && !multi_queue {
            return Err(unusable(
                format!("TAP {name}"),
                "several descriptors need an IFF_MULTI_QUEUE interface".into(),
            ));
        }
        Self::finish(name, files, multi_queue)
    }

    fn finish(name: String, files: Vec<File>, multi_queue: bool) -> Result<Self, BackendError> {
        let what = format!("TAP {name}");
        for f in &files {
            sys::set_vnet_hdr_size(f, HDR_LEN as i32)
                .map_err(io_error("TUNSETVNETHDRSZ", &what))?;
            sys::set_offload(f, 0).map_err(io_error("TUNSETOFFLOAD", &what))?;
        }
        log::info!(
            "TAP {name}: {} queue(s){}",
            files.len(),
            if multi_queue { ", multi-queue" } else { "" }
        );
        Ok(Tap {
            name,
            files,
            multi_queue,
        })
    }

    /// The interface's name.
    pub fn interface(&self) -> &str {
        &self.name
    }

    /// The number of queues.
    pub fn queues(&self) -> u16 {
        self.files.len() as u16
    }
}

impl PacketBackend for Tap {
    fn name(&self) -> String {
        format!("tap {}", self.name)
    }

    fn offloads(&self) -> bool {
        true
    }

    fn into_queues(self: Box<Self>) -> Vec<Box<dyn PacketQueue>> {
        let Tap {
            name,
            files,
            multi_queue,
        } = *self;
        files
            .into_iter()
            .enumerate()
            .map(|(index, file)| {
                Box::new(TapQueue {
                    file,
                    name: name.clone(),
                    index,
                    multi_queue,
                    attached: true,
                    scratch: vec![0; MAX_PACKET].into_boxed_slice(),
                    errors: 0,
                    spares: Vec::new(),
                }) as Box<dyn PacketQueue>
            })
            .collect()
    }
}

/// One queue of a TAP interface.
struct TapQueue {
    file: File,
    name: String,
    index: usize,
    multi_queue: bool,
    attached: bool,
    scratch: Box<[u8]>,
    errors: u64,
    /// Buffers of sent packets, for [`PacketQueue::reclaim`].
    spares: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TapQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapQueue")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("fd", &self.file.as_raw_fd())
            .field("attached", &self.attached)
            .finish()
    }
}

impl TapQueue {
    fn what(&self) -> String {
        format!("TAP {} queue {}", self.name, self.index)
    }

    /// Logs the first write error and then one in a thousand.
    fn log_send_error(&mut self, e: &io::Error) {
        if self.errors % 1000 == 0 {
            log::warn!(
                "{}: cannot send a packet: {e} ({} so far)",
                self.what(),
                self.errors + 1
            );
        }
        self.errors += 1;
    }
}

impl PacketQueue for TapQueue {
    fn ready_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn recv(&mut self, packet: &mut Vec<u8>) -> Result<bool, BackendError> {
        loop {
            match self.file.read(&mut self.scratch) {
                Ok(n) => {
                    packet.clear();
                    packet.extend_from_slice(&self.scratch[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(BackendError::Io {
                        operation: "read",
                        what: self.what(),
                        source,
                    })
                }
            }
        }
    }

    fn send(&mut self, batch: &mut Vec<Vec<u8>>) -> usize {
        let mut dropped = 0;
        for mut packet in batch.drain(..) {
            let result = loop {
                match self.file.write(&packet) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            match result {
                Ok(n) if n == packet.len() => {}
                Ok(n) => {
                    dropped += 1;
                    let e =
                        io::Error::other(format!("short write of {n} of {} bytes", packet.len()));
                    self.log_send_error(&e);
                }
                Err(e) => {
                    dropped += 1;
                    self.log_send_error(&e);
                }
            }
            if self.spares.len() < MAX_SPARES {
                packet.clear();
                self.spares.push(packet);
            }
        }
        dropped
    }

    fn reclaim(&mut self, spares: &mut Vec<Vec<u8>>) {
        let n = MAX_SPARES
            .saturating_sub(spares.len())
            .min(self.spares.len());
        spares.extend(self.spares.drain(..n));
    }

    fn congested(&mut self) -> bool {
        // The kernel queues (and drops) behind the descriptor; a write never waits.
        false
    }

    fn set_space_waker(&mut self, _waker: EventFd) {
        // Never congested: nothing to wake.
    }

    fn set_offloads(&mut self, guest: Offloads) -> Result<(), BackendError> {
        let mut flags = 0;
        if guest.csum {
            flags |= sys::TUN_F_CSUM;
            if guest.tso4 {
                flags |= sys::TUN_F_TSO4;
            }
            if guest.tso6 {
                flags |= sys::TUN_F_TSO6;
            }
            if guest.ecn && (guest.tso4 || guest.tso6) {
                flags |= sys::TUN_F_TSO_ECN;
            }
        }
        sys::set_offload(&self.file, flags).map_err(|source| BackendError::Io {
            operation: "TUNSETOFFLOAD",
            what: self.what(),
            source,
        })
    }

    fn set_enabled(&mut self, enabled: bool) -> Result<(), BackendError> {
        // The first queue stays attached: a multi-queue interface without queues has no
        // carrier, and the kernel keeps up to its transmit queue length for the driver.
        if !self.multi_queue || self.index == 0 || self.attached == enabled {
            return Ok(());
        }
        sys::set_queue(&self.file, enabled).map_err(|source| BackendError::Io {
            operation: if enabled {
                "attaching the queue"
            } else {
                "detaching the queue"
            },
            what: self.what(),
            source,
        })?;
        self.attached = enabled;
        Ok(())
    }
}
