//! The vhost-user session target: the script it plays as the frontend (what an input decodes
//! into) and [`play`], which plays it against a backend.
//!
//! An input is one byte of setup (which device, how many queues) and then up to [`MAX_OPS`]
//! operations. Most are messages — any request code, flags, payload and file descriptors — but
//! a hostile frontend can do more than send well-formed messages, and so can the script: write
//! raw bytes that desynchronise the stream, kick an eventfd it sent, write guest RAM (rings,
//! descriptors, requests) and shrink a memfd it shared.
//!
//! File descriptors are made fresh for each message, of one kind per message:
//! - [`FdKind::Ram`]: the session's guest RAM, a 64 KiB sealable memfd (every RAM fd is the same
//!   file, as with QEMU's one memory backend);
//! - [`FdKind::EventFd`]: a new eventfd, kept so that [`Op::Kick`] can signal it;
//! - [`FdKind::Blob`]: a new sealable memfd holding exactly the bytes of the last [`Op::Blob`]
//!   (a device state to load, a dirty log);
//! - [`FdKind::Socket`]: one end of a new socket pair (a backend channel, a state pipe), whose
//!   other end the frontend keeps until the session ends.

use crate::input::{Input, Output};

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::memfd::{memfd_create, MFdFlags};
use outboard_blk::{Blk, BlkConfig};
use outboard_net::backend::switch::{Switch, SwitchConfig};
use outboard_net::{Net, NetConfig, DEFAULT_MAC};
use outboard_vhost_user::{wire, BackendConfig, VhostUserBackend};
use outboard_virtio::VirtioDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The most operations one input plays: each costs a round trip, and an iteration must stay
/// well under 10 ms.
pub const MAX_OPS: usize = 64;
/// Guest RAM size.
pub const RAM_SIZE: u64 = 0x1_0000;
/// The largest blob.
pub const BLOB_SIZE: u64 = 0x1000;
/// The largest payload a message op carries (a little more than the protocol allows, so that
/// the size limit is exercised too).
pub const MAX_PAYLOAD: usize = 0x1010;

/// Kinds of file descriptors a message carries (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    /// The guest RAM memfd.
    Ram,
    /// A fresh eventfd.
    EventFd,
    /// A fresh memfd with the blob.
    Blob,
    /// One end of a fresh socket pair.
    Socket,
}

impl FdKind {
    fn from_bits(b: u8) -> Self {
        match b & 3 {
            0 => FdKind::Ram,
            1 => FdKind::EventFd,
            2 => FdKind::Blob,
            _ => FdKind::Socket,
        }
    }

    fn bits(self) -> u8 {
        match self {
            FdKind::Ram => 0,
            FdKind::EventFd => 1,
            FdKind::Blob => 2,
            FdKind::Socket => 3,
        }
    }
}

/// One thing the frontend does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Sends a message.
    Message {
        /// The request code.
        request: u32,
        /// Set NEED_REPLY.
        need_reply: bool,
        /// Set REPLY (a malformed request).
        reply: bool,
        /// The kind of the file descriptors.
        fd_kind: FdKind,
        /// How many (0 to 7).
        fd_count: u8,
        /// The payload.
        payload: Vec<u8>,
    },
    /// Writes bytes to the socket as they are.
    Raw(Vec<u8>),
    /// Signals the `n`th eventfd sent so far (modulo their number).
    Kick(u8),
    /// Writes guest RAM.
    Ram {
        /// Where.
        offset: u16,
        /// What.
        bytes: Vec<u8>,
    },
    /// Sets the bytes the next blob memfds hold.
    Blob(Vec<u8>),
    /// Shrinks (or grows) the `fd`th memfd sent so far (RAM or blob, modulo their number).
    Truncate {
        /// Which.
        fd: u8,
        /// The new size.
        size: u16,
    },
}

impl Op {
    /// Reads one operation.
    pub fn decode(input: &mut Input) -> Op {
        let op = input.u8();
        match op % 8 {
            0..=2 => {
                // Request codes past 0xff are all unknown: one byte of code is enough, with
                // 0xff standing for a full 32-bit one.
                let request = match input.u8() {
                    0xff => input.u32(),
                    r => u32::from(r),
                };
                let flags = input.u8();
                let len = usize::from(input.u16()) % (MAX_PAYLOAD + 1);
                Op::Message {
                    request,
                    need_reply: flags & 1 != 0,
                    reply: flags & 2 != 0,
                    fd_kind: FdKind::from_bits(flags >> 2),
                    fd_count: (flags >> 4) & 7,
                    payload: input.bytes(len).to_vec(),
                }
            }
            3 => {
                let len = usize::from(input.u8());
                Op::Raw(input.bytes(len).to_vec())
            }
            4 => Op::Kick(input.u8()),
            5 => {
                let offset = input.u16();
                let len = usize::from(input.u8());
                Op::Ram {
                    offset,
                    bytes: input.bytes(len).to_vec(),
                }
            }
            6 => {
                let len = usize::from(input.u16()) % (BLOB_SIZE as usize + 1);
                Op::Blob(input.bytes(len).to_vec())
            }
            _ => Op::Truncate {
                fd: input.u8(),
                size: input.u16(),
            },
        }
    }

    /// Writes the operation so that [`Op::decode`] reads it back.
    pub fn encode(&self, out: &mut Output) {
        match self {
            Op::Message {
                request,
                need_reply,
                reply,
                fd_kind,
                fd_count,
                payload,
            } => {
                out.u8(0);
                match u8::try_from(*request) {
                    Ok(r) if r != 0xff => out.u8(r),
                    _ => out.u8(0xff).u32(*request),
                };
                let flags = u8::from(*need_reply)
                    | u8::from(*reply) << 1
                    | fd_kind.bits() << 2
                    | (fd_count & 7) << 4;
                out.u8(flags).u16(payload.len() as u16).bytes(payload);
            }
            Op::Raw(bytes) => {
                out.u8(3).u8(bytes.len() as u8).bytes(bytes);
            }
            Op::Kick(n) => {
                out.u8(4).u8(*n);
            }
            Op::Ram { offset, bytes } => {
                for (i, chunk) in bytes.chunks(255).enumerate() {
                    out.u8(5)
                        .u16(offset + (i * 255) as u16)
                        .u8(chunk.len() as u8)
                        .bytes(chunk);
                }
            }
            Op::Blob(bytes) => {
                out.u8(6).u16(bytes.len() as u16).bytes(bytes);
            }
            Op::Truncate { fd, size } => {
                out.u8(7).u8(*fd).u16(*size);
            }
        }
    }
}

/// The device a session serves, from the setup byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup {
    /// virtio-net on a switch port instead of virtio-blk on null storage.
    pub net: bool,
    /// Two request queues (blk) or queue pairs (net) instead of one.
    pub two: bool,
    /// The backend accepts compat version 1 only (else 1 and 2).
    pub old: bool,
}

impl Setup {
    /// Reads the setup byte.
    pub fn decode(input: &mut Input) -> Setup {
        let b = input.u8();
        Setup {
            net: b & 1 != 0,
            two: b & 2 != 0,
            old: b & 4 != 0,
        }
    }

    /// Writes the setup byte.
    pub fn encode(&self, out: &mut Output) {
        out.u8(u8::from(self.net) | u8::from(self.two) << 1 | u8::from(self.old) << 2);
    }
}

/// How long the backend may take to end a session after the frontend hung up.
const HANGUP_DEADLINE: Duration = Duration::from_secs(5);
/// How long a barrier waits for its reply.
const BARRIER_TIMEOUT: Duration = Duration::from_millis(50);
/// How long threads the session started (device-state transfers, which the backend detaches
/// when a session ends) may take to finish once the frontend closed every fd it kept.
const THREAD_DEADLINE: Duration = Duration::from_secs(2);

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("listing this process's threads")
        .count()
}

fn memfd(name: &str, size: u64) -> File {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .expect("memfd_create");
    let file = File::from(fd);
    file.set_len(size).expect("sizing a memfd");
    file
}

fn device(setup: Setup) -> Box<dyn VirtioDevice> {
    if setup.net {
        let pairs = if setup.two { 2 } else { 1 };
        let mut config = NetConfig::new(DEFAULT_MAC);
        config.queue_pairs = pairs;
        config.queue_size = 64;
        let switch = Switch::new(2, pairs, SwitchConfig::default()).expect("a valid switch");
        Box::new(Net::new(config, Box::new(switch.port(0))).expect("a valid net device"))
    } else {
        let mut config = BlkConfig::null(1 << 20);
        config.num_queues = if setup.two { 2 } else { 1 };
        config.queue_size = 64;
        Box::new(Blk::new(config).expect("a valid blk device"))
    }
}

/// What the frontend keeps while the session runs.
struct Frontend {
    sock: UnixStream,
    ram: File,
    blob: Vec<u8>,
    /// Eventfds sent, for kicks.
    eventfds: Vec<EventFd>,
    /// Memfds sent (RAM and blobs), for truncation.
    memfds: Vec<File>,
    /// The frontend's ends of socket pairs whose other end was sent.
    peers: Vec<UnixStream>,
    /// The request code of each reply, as the drainer reads them.
    replies: mpsc::Receiver<u32>,
}

impl Frontend {
    /// Makes `count` fds of `kind`, kept open by the returned handles until they are sent.
    fn make_fds(&mut self, kind: FdKind, count: u8) -> Vec<Box<dyn AsRawFd>> {
        (0..count)
            .map(|_| -> Box<dyn AsRawFd> {
                match kind {
                    FdKind::Ram => {
                        self.memfds.push(self.ram.try_clone().expect("dup"));
                        Box::new(self.ram.try_clone().expect("dup"))
                    }
                    FdKind::EventFd => {
                        let e = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                        let sent = e.try_clone().expect("dup");
                        self.eventfds.push(e);
                        Box::new(sent)
                    }
                    FdKind::Blob => {
                        // A state reader reads to the end: the file is exactly the blob.
                        let f = memfd("outboard-fuzz-blob", 0);
                        f.write_all_at(&self.blob, 0).expect("writing a blob");
                        self.memfds.push(f.try_clone().expect("dup"));
                        Box::new(f)
                    }
                    FdKind::Socket => {
                        let (ours, theirs) = UnixStream::pair().expect("socketpair");
                        self.peers.push(ours);
                        Box::new(theirs)
                    }
                }
            })
            .collect()
    }

    /// Waits until the backend has handled every message sent so far: sends
    /// GET_PROTOCOL_FEATURES (which changes nothing) and waits for its reply, for at most
    /// [`BARRIER_TIMEOUT`] (raw bytes may have left the stream in the middle of a message, which
    /// then swallows this one). False once the backend has closed the connection.
    fn barrier(&mut self) -> bool {
        const GET_PROTOCOL_FEATURES: u32 = 15;
        while self.replies.try_recv().is_ok() {}
        if wire::send_message(&self.sock, GET_PROTOCOL_FEATURES, false, false, &[], &[]).is_err() {
            return false;
        }
        let deadline = std::time::Instant::now() + BARRIER_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(GET_PROTOCOL_FEATURES) => return true,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => return true,
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Plays one operation; false once the backend has closed the connection.
    fn play(&mut self, op: Op) -> bool {
        match op {
            Op::Message {
                request,
                need_reply,
                reply,
                fd_kind,
                fd_count,
                payload,
            } => {
                let fds = self.make_fds(fd_kind, fd_count);
                let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                wire::send_message(&self.sock, request, reply, need_reply, &payload, &raw).is_ok()
            }
            Op::Raw(bytes) => (&self.sock).write_all(&bytes).is_ok(),
            Op::Kick(n) => {
                if !self.eventfds.is_empty() {
                    let e = &self.eventfds[usize::from(n) % self.eventfds.len()];
                    e.write(1).expect("kicking an eventfd");
                }
                true
            }
            Op::Ram { offset, bytes } => {
                let end = (u64::from(offset) + bytes.len() as u64).min(RAM_SIZE);
                let n = end.saturating_sub(u64::from(offset)) as usize;
                self.ram
                    .write_all_at(&bytes[..n], u64::from(offset))
                    .expect("writing guest RAM");
                true
            }
            Op::Blob(bytes) => {
                self.blob = bytes;
                true
            }
            Op::Truncate { fd, size } => {
                // What was sent before the truncation must have been handled before it, as
                // for a frontend that waits for replies.
                if !self.barrier() {
                    return false;
                }
                if !self.memfds.is_empty() {
                    let f = &self.memfds[usize::from(fd) % self.memfds.len()];
                    // Refused (EPERM) once the backend has sealed it.
                    let _ = f.set_len(u64::from(size));
                }
                true
            }
        }
    }
}

/// Plays the script `data` against a backend on its own thread, then checks that the backend
/// ended the session, stopped the device and left no thread behind. Panics otherwise.
pub fn play(data: &[u8]) {
    let mut input = Input::new(data);
    let threads = thread_count();
    let setup = Setup::decode(&mut input);
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let shutdown = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let backend_shutdown = shutdown.try_clone().expect("dup");
    let (done_tx, done_rx) = mpsc::channel();
    let backend = std::thread::spawn(move || {
        let config = BackendConfig {
            max_mem_slots: 8,
            compat_version: if setup.old { 1 } else { 2 },
            accepted_compat: if setup.old { vec![1] } else { vec![1, 2] },
        };
        let mut backend = VhostUserBackend::new(device(setup), config);
        let end = backend.serve_stream(theirs, &backend_shutdown);
        let _ = done_tx.send(());
        assert!(end.is_ok(), "serving failed: {end:?}");
        assert!(
            !backend.framework().is_running(),
            "the device runs after the session ended"
        );
        assert_eq!(backend.framework().status(), 0, "the device was reset");
    });
    let mut reader = ours.try_clone().expect("dup");
    let (replies_tx, replies) = mpsc::channel();
    let drainer = std::thread::spawn(move || {
        // Replies are a header (request, flags, size) and a payload; the codes go to barriers.
        let mut header = [0u8; 12];
        let mut payload = vec![0u8; 0x1000];
        while reader.read_exact(&mut header).is_ok() {
            let word = |i: usize| u32::from_ne_bytes(header[i..i + 4].try_into().expect("4"));
            let size = (word(8) as usize).min(payload.len());
            if reader.read_exact(&mut payload[..size]).is_err() {
                break;
            }
            let _ = replies_tx.send(word(0));
        }
        // Whatever else comes (nothing, from a well-behaved backend) is drained.
        while matches!(reader.read(&mut payload), Ok(n) if n > 0) {}
    });
    let mut frontend = Frontend {
        sock: ours,
        ram: memfd("outboard-fuzz-ram", RAM_SIZE),
        blob: Vec::new(),
        eventfds: Vec::new(),
        memfds: Vec::new(),
        peers: Vec::new(),
        replies,
    };
    for _ in 0..MAX_OPS {
        if input.is_empty() || !frontend.play(Op::decode(&mut input)) {
            break;
        }
    }
    // Hang up: the backend must notice and end the session.
    let _ = frontend.sock.shutdown(Shutdown::Write);
    frontend.peers.clear();
    if done_rx.recv_timeout(HANGUP_DEADLINE).is_err() {
        shutdown.write(1).expect("signalling shutdown");
        let _ = backend.join();
        panic!(
            "the backend did not end the session within {HANGUP_DEADLINE:?} of the frontend \
             hanging up"
        );
    }
    if let Err(p) = backend.join() {
        std::panic::resume_unwind(p);
    }
    drop(frontend);
    drainer.join().expect("the drainer never panics");
    // Nothing the session started may outlive it for long (and a thread still running when
    // this input ends would be reported as a leak).
    let start = std::time::Instant::now();
    while thread_count() > threads {
        assert!(
            start.elapsed() < THREAD_DEADLINE,
            "a thread the session started still runs {THREAD_DEADLINE:?} after it ended"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip() {
        let ops = [
            Op::Message {
                request: 5,
                need_reply: true,
                reply: false,
                fd_kind: FdKind::Socket,
                fd_count: 3,
                payload: vec![1, 2, 3],
            },
            Op::Message {
                request: 0x1234,
                need_reply: false,
                reply: true,
                fd_kind: FdKind::Blob,
                fd_count: 0,
                payload: vec![],
            },
            Op::Raw(vec![9; 20]),
            Op::Kick(2),
            Op::Ram {
                offset: 0x100,
                bytes: vec![7; 200],
            },
            Op::Blob(vec![1; 300]),
            Op::Truncate { fd: 1, size: 10 },
        ];
        let mut out = Output::new();
        for op in &ops {
            op.encode(&mut out);
        }
        let buf = out.finish();
        let mut input = Input::new(&buf);
        for op in &ops {
            assert_eq!(&Op::decode(&mut input), op);
        }
        assert!(input.is_empty());
    }
}
