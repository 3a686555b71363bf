//! The Linux TUN/TAP driver's ioctls (`include/uapi/linux/if_tun.h`), each a small safe
//! function over one `unsafe` call.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::raw::{c_int, c_short, c_ulong};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// The clone device.
pub(crate) const TUN_DEVICE: &str = "/dev/net/tun";
/// `IFNAMSIZ`: interface names are at most 15 bytes and a NUL.
pub(crate) const IFNAMSIZ: usize = 16;

pub(crate) const IFF_TAP: c_short = libc::IFF_TAP as c_short;
pub(crate) const IFF_NO_PI: c_short = libc::IFF_NO_PI as c_short;
pub(crate) const IFF_VNET_HDR: c_short = libc::IFF_VNET_HDR as c_short;
pub(crate) const IFF_MULTI_QUEUE: c_short = libc::IFF_MULTI_QUEUE as c_short;
const IFF_ATTACH_QUEUE: c_short = libc::IFF_ATTACH_QUEUE as c_short;
const IFF_DETACH_QUEUE: c_short = libc::IFF_DETACH_QUEUE as c_short;

pub(crate) const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
pub(crate) const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
pub(crate) const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
pub(crate) const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;

/// `struct ifreq` with the `ifr_flags` member of its union (40 bytes on every 64-bit Linux).
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

impl IfReq {
    fn new(name: &str, flags: c_short) -> io::Result<Self> {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        let bytes = name.as_bytes();
        if bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {name:?} is longer than 15 bytes or contains NUL"),
            ));
        }
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn check(ret: c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens the clone device, non-blocking and close-on-exec.
pub(crate) fn open_tun() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_DEVICE)
}

/// TUNSETIFF: attaches `file` to the interface `name` (created if it does not exist and the
/// caller may), with `flags`. Returns the interface's name.
pub(crate) fn set_iff(file: &File, name: &str, flags: c_short) -> io::Result<String> {
    let req = IfReq::new(name, flags)?;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is one (size checked at
    // compile time) and lives for the call. The kernel writes only inside it.
    check(unsafe { ioctl_with_ref(file, libc::TUNSETIFF as c_ulong, &req) })?;
    Ok(req.name())
}

/// TUNGETIFF: the interface name and flags of an attached TUN/TAP file descriptor.
pub(crate) fn get_iff(fd: BorrowedFd<'_>) -> io::Result<(String, c_short)> {
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`, which is one and is exclusively
    // borrowed for the call. On any other kind of file the call fails without writing.
    check(unsafe { ioctl_with_mut_ref(&fd, libc::TUNGETIFF as c_ulong, &mut req) })?;
    Ok((req.name(), req.flags))
}

/// TUNSETVNETHDRSZ: the size of the virtio header in front of every packet.
pub(crate) fn set_vnet_hdr_size(file: &File, size: c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer; `size` is one and outlives
    // the call.
    check(unsafe { ioctl_with_ref(file, libc::TUNSETVNETHDRSZ as c_ulong, &size) })
}

/// TUNSETOFFLOAD: which offloads the kernel may leave to us in received packets.
pub(crate) fn set_offload(file: &File, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is shared with the kernel.
    check(unsafe { ioctl_with_val(file, libc::TUNSETOFFLOAD as c_ulong, c_ulong::from(flags)) })
}

/// TUNSETQUEUE: attaches a queue of a multi-queue interface to it again, or detaches it.
pub(crate) fn set_queue(file: &File, attach: bool) -> io::Result<()> {
    let flags = if attach {
        IFF_ATTACH_QUEUE
    } else {
        IFF_DETACH_QUEUE
    };
    let req = IfReq::new("", flags)?;
    // SAFETY: TUNSETQUEUE reads one `struct ifreq`; `req` is one and lives for the call.
    check(unsafe { ioctl_with_ref(file, libc::TUNSETQUEUE as c_ulong, &req) })
}

/// Sets `O_NONBLOCK` on a descriptor the process was handed.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on a valid descriptor (borrowed, so open) only returns flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL changes the file status flags of the open descriptor; no memory is
    // involved.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert_eq!(IfReq::new("tap0", 0).unwrap().name(), "tap0");
        assert!(IfReq::new("a-name-that-is-16", 0).is_err());
        assert!(IfReq::new("nul\0", 0).is_err());
        assert_eq!(
            IfReq::new("exactly15bytes!", 0).unwrap().name(),
            "exactly15bytes!"
        );
    }

    #[test]
    fn a_file_that_is_not_a_tap_is_refused() {
        let f = File::open("/dev/null").unwrap();
        assert!(get_iff(std::os::fd::AsFd::as_fd(&f)).is_err());
    }
}
