//! The vhost-user transport as a hostile frontend sees it: a `VhostUserBackend` serving a real
//! device (virtio-blk on null storage, or virtio-net on a switch port) on its own thread, over
//! a socket pair, while this thread plays the script the input decodes into
//! (`outboard_fuzz::session`): messages with any code, flags, payload and file descriptors
//! (guest RAM memfds, eventfds, blob memfds, sockets), raw bytes, kicks, guest RAM writes and
//! memfd truncation. Replies are drained by a third thread.
//!
//! The backend must never panic, must end the session within a bounded time once the frontend
//! hangs up (it then listens again in the real program), and must leave the device stopped.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // The real program's Rust runtime ignores SIGPIPE; libFuzzer's main does not. A peer
        // that closed a state pipe or a backend channel must be an EPIPE, as in the program.
        // SAFETY: setting a signal to SIG_IGN installs no handler; nothing else here changes
        // SIGPIPE's disposition.
        unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigIgn,
            )
            .expect("ignoring SIGPIPE");
        }
    },
    |data: &[u8]| outboard_fuzz::session::play(data)
);
