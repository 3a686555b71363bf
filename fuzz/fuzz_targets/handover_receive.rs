//! Live upgrade: what a new backend process receives from the old one
//! (`outboard_vhost_user::handover::receive_handover`). The old process served a hostile
//! frontend and may be compromised, so everything it sends is untrusted.
//!
//! The input is a script of what the old process sends after the new one's HELLO: the first
//! byte says how many descriptors of which kinds ride the FDS frame (listening socket,
//! connected socket, eventfd, pipe, memfd), the second how the metadata frame's header lies
//! (its kind, its announced length), and the rest is the metadata. Besides never panicking: a
//! handover that is accepted named exactly the descriptors that came, each of the kind its
//! place requires.
#![no_main]

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use outboard_fuzz::input::Input;
use outboard_vhost_user::handover::{self, Hello};

const FRAME_MAGIC: &[u8; 4] = b"OBUP";
const HANDOVER: u16 = 3;
const FDS: u16 = 4;

fn header(kind: u16, fds: u16, len: u32) -> Vec<u8> {
    let mut h = FRAME_MAGIC.to_vec();
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&fds.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

/// One descriptor of kind `k`.
fn descriptor(k: u8, listener: &UnixListener) -> OwnedFd {
    match k % 5 {
        0 => listener.as_fd().try_clone_to_owned().expect("dup"),
        1 => UnixStream::pair().expect("socketpair").0.into(),
        2 => {
            let e = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
            // SAFETY: `into_raw_fd` hands over sole ownership of the eventfd's descriptor.
            unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
        }
        3 => nix::unistd::pipe().expect("pipe").0,
        _ => nix::sys::memfd::memfd_create(c"fuzz", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let fd_spec = input.u8();
    let frame_spec = input.u8();
    let metadata = input.rest();
    let dir = std::env::temp_dir().join(format!("outboard-fuzz-handover-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let listener = UnixListener::bind(&dir).expect("bind");
    let _ = std::fs::remove_file(&dir);
    let count = usize::from(fd_spec & 7);
    let fds: Vec<OwnedFd> = (0..count)
        .map(|i| descriptor(fd_spec.rotate_right(i as u32 + 3), &listener))
        .collect();
    let (new, old) = UnixStream::pair().expect("socketpair");
    // What the old process sends, queued before the new one reads (the socket buffer holds
    // every input the fuzzer makes).
    let kind = if frame_spec & 1 == 0 {
        HANDOVER
    } else {
        u16::from(frame_spec >> 4)
    };
    let len = if frame_spec & 2 == 0 {
        metadata.len() as u32
    } else {
        (metadata.len() as u32).wrapping_add(u32::from(frame_spec >> 2))
    };
    let mut bytes = header(kind, 0, len);
    bytes.extend_from_slice(metadata);
    if (&old).write_all(&bytes).is_err() {
        return;
    }
    if !fds.is_empty() {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let head = header(FDS, raw.len() as u16, 0);
        let iov = [std::io::IoSlice::new(&head)];
        let rights = [ControlMessage::ScmRights(&raw)];
        if sendmsg::<()>(old.as_raw_fd(), &iov, &rights, MsgFlags::empty(), None).is_err() {
            return;
        }
    }
    drop(fds);
    // No more: a frame cut short ends in end-of-file, not in a wait.
    let _ = old.shutdown(std::net::Shutdown::Write);
    let hello = Hello {
        protocol: handover::PROTOCOL_VERSION,
        device_type: 2,
        num_queues: 2,
        compat_version: 2,
        accepted_compat: vec![1, 2],
        state_formats: vec![outboard_virtio::state::FORMAT_VERSION],
    };
    if let Ok(received) = handover::receive_handover(new, &hello) {
        // Accepted: the upgrade socket is a listening socket, as its place requires.
        let listening = nix::sys::socket::getsockopt(
            &received.sockets.control.listener,
            nix::sys::socket::sockopt::AcceptConn,
        );
        assert_eq!(listening.ok(), Some(true));
        if let Some(session) = &received.session {
            let listening = nix::sys::socket::getsockopt(
                &session.connection,
                nix::sys::socket::sockopt::AcceptConn,
            );
            assert_eq!(listening.ok(), Some(false));
        }
    }
});
