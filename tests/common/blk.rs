//! Helpers of the `vhost-user-blk` tests: the real binary on a disk image with known contents,
//! frontends with short timeouts, deterministic test data, and raw vhost-user payloads for the
//! messages a hostile frontend malforms.

use std::path::PathBuf;
use std::time::Duration;

use outboard_frontend::raw::{MsgHeader, RawMessage, FLAG_NEED_REPLY, VERSION};
use outboard_frontend::{BlkDriver, BlkOptions, BlkStatus, Connection, SessionBuilder};

use super::{Backend, TempDir};

/// The virtio-blk sector.
pub const SECTOR: usize = 512;
/// How long a frontend waits for any reply or completion the test expects.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Deterministic test data: a different byte pattern per `seed` (xorshift).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Asserts two byte strings are equal, reporting the first difference instead of dumping both.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x} (sector {}): got {:#04x}, want {:#04x}",
            i / SECTOR,
            got[i],
            want[i]
        );
    }
}

/// A `vhost-user-blk` process serving a disk image in its own temporary directory.
#[derive(Debug)]
pub struct BlkBackend {
    // Declared first so that the process is killed before its directory is removed.
    pub backend: Backend,
    pub dir: TempDir,
    pub disk: PathBuf,
    pub socket: PathBuf,
}

impl BlkBackend {
    /// Starts `vhost-user-blk --blk-file` on a new image holding `contents`, with `extra`
    /// options (`--num-queues`, `--read-only`, …).
    pub fn start(tag: &str, contents: &[u8], extra: &[&str]) -> BlkBackend {
        let dir = TempDir::new(tag);
        let disk = dir.path("disk.img");
        std::fs::write(&disk, contents).unwrap();
        let mut args = vec!["--blk-file".to_string(), disk.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with(dir, disk, args)
    }

    /// Starts `vhost-user-blk --null-size size` with `extra` options.
    pub fn start_null(tag: &str, size: u64, extra: &[&str]) -> BlkBackend {
        let dir = TempDir::new(tag);
        let disk = dir.path("no-disk");
        let mut args = vec!["--null-size".to_string(), size.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with(dir, disk, args)
    }

    fn start_with(dir: TempDir, disk: PathBuf, mut args: Vec<String>) -> BlkBackend {
        let socket = dir.path("blk.sock");
        args.splice(
            0..0,
            ["--socket-path".to_string(), socket.display().to_string()],
        );
        let backend = Backend::start("vhost-user-blk", &socket, &args, dir.path("backend.log"));
        BlkBackend {
            backend,
            dir,
            disk,
            socket,
        }
    }

    /// A session builder for this backend with short timeouts.
    pub fn builder(&self) -> SessionBuilder {
        SessionBuilder::new(&self.socket)
            .io_timeout(Some(IO_TIMEOUT))
            .connect_timeout(IO_TIMEOUT)
    }

    /// A virtio-blk driver on one queue with the default options.
    pub fn connect(&self) -> BlkDriver {
        self.connect_with(self.builder())
    }

    /// A virtio-blk driver set up from `builder`, with completions waited for up to
    /// [`IO_TIMEOUT`].
    pub fn connect_with(&self, builder: SessionBuilder) -> BlkDriver {
        let opts = BlkOptions {
            wait: outboard_frontend::WaitMode::Block(IO_TIMEOUT),
            ..BlkOptions::default()
        };
        BlkDriver::connect_with(builder, opts).unwrap_or_else(|e| {
            panic!(
                "cannot set up a frontend: {:#}\n--- backend log ---\n{}",
                ErrorChain(&e),
                self.backend.log_text()
            )
        })
    }

    /// The image file as it is on disk now.
    pub fn disk_contents(&self) -> Vec<u8> {
        std::fs::read(&self.disk).unwrap()
    }

    /// The log so far, for failure messages.
    pub fn log(&self) -> String {
        self.backend.log_text()
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        // A failing test shows what the backend said.
        if std::thread::panicking() {
            eprintln!("--- backend log ---\n{}", self.backend.log_text());
        }
    }
}

/// Formats an error with its whole `source` chain.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Writes `data` at `sector` on `queue` of `blk`, reads it back on `check_queue` and asserts both
/// succeed with the same bytes.
#[track_caller]
pub fn verified_io(blk: &mut BlkDriver, queue: u16, check_queue: u16, sector: u64, data: &[u8]) {
    assert_eq!(blk.queue(queue).write(sector, data).unwrap(), BlkStatus::Ok);
    let mut back = vec![0u8; data.len()];
    assert_eq!(
        blk.queue(check_queue).read(sector, &mut back).unwrap(),
        BlkStatus::Ok
    );
    assert_bytes_eq(&back, data, "data read back");
}

/// Sends a request with NEED_REPLY and returns its REPLY_ACK status (0 = success). Panics if
/// the reply is not a REPLY_ACK for `code`.
#[track_caller]
pub fn reply_ack(conn: &mut Connection, code: u32, payload: &[u8], fds: &[i32]) -> u64 {
    let reply = conn
        .raw_request(code, VERSION | FLAG_NEED_REPLY, payload, fds)
        .unwrap_or_else(|e| panic!("request {code}: no REPLY_ACK: {e}"))
        .expect("NEED_REPLY asks for a reply");
    ack_status(code, &reply)
}

/// The status of a REPLY_ACK for `code`.
#[track_caller]
pub fn ack_status(code: u32, reply: &RawMessage) -> u64 {
    assert_eq!(reply.header.request, code, "reply to the request sent");
    assert!(reply.header.is_reply(), "REPLY flag: {:?}", reply.header);
    reply
        .payload_u64()
        .unwrap_or_else(|| panic!("a REPLY_ACK has a u64 payload: {:?}", reply.payload))
}

/// Asserts the backend refuses the request with a failed REPLY_ACK.
#[track_caller]
pub fn assert_refused(conn: &mut Connection, code: u32, payload: &[u8], fds: &[i32], what: &str) {
    let status = reply_ack(conn, code, payload, fds);
    assert_ne!(
        status, 0,
        "{what}: must be refused with a failure REPLY_ACK"
    );
}

/// Asserts the backend accepts the request with a successful REPLY_ACK.
#[track_caller]
pub fn assert_accepted(conn: &mut Connection, code: u32, payload: &[u8], fds: &[i32], what: &str) {
    let status = reply_ack(conn, code, payload, fds);
    assert_eq!(status, 0, "{what}: must be accepted");
}

/// Asserts the backend closes the connection within a few seconds.
#[track_caller]
pub fn assert_disconnects(conn: &Connection, what: &str) {
    assert!(
        conn.peer_closed(Duration::from_secs(5)).unwrap(),
        "{what}: the backend must close the connection"
    );
}

/// A raw header, for hand-made byte streams.
pub fn header(code: u32, flags: u32, size: u32) -> [u8; 12] {
    MsgHeader::new(code, flags, size).to_bytes()
}

/// `VhostUserVringState`: index and number.
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_ne_bytes(), num.to_ne_bytes()].concat()
}

/// One `VhostUserMemoryRegion`: GPA, size, frontend address, mmap offset.
pub fn region(gpa: u64, size: u64, uaddr: u64, offset: u64) -> Vec<u8> {
    [gpa, size, uaddr, offset]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

/// SET_MEM_TABLE's payload: the region count, padding, the regions.
pub fn mem_table(regions: &[Vec<u8>]) -> Vec<u8> {
    let mut p = (regions.len() as u32).to_ne_bytes().to_vec();
    p.extend_from_slice(&0u32.to_ne_bytes());
    for r in regions {
        p.extend_from_slice(r);
    }
    p
}

/// ADD_MEM_REG/REM_MEM_REG's payload: padding, then one region.
pub fn single_region(region: &[u8]) -> Vec<u8> {
    let mut p = 0u64.to_ne_bytes().to_vec();
    p.extend_from_slice(region);
    p
}

/// `VhostUserVringAddr`: index, flags, descriptor table, used ring, available ring, log.
pub fn vring_addr(index: u32, flags: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut p = [index.to_ne_bytes(), flags.to_ne_bytes()].concat();
    for v in [desc, used, avail, 0] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    p
}

/// GET/SET_CONFIG's payload: offset, size, flags, then `data`.
pub fn config_msg(offset: u32, size: u32, data: &[u8]) -> Vec<u8> {
    let mut p = [offset.to_ne_bytes(), size.to_ne_bytes(), 0u32.to_ne_bytes()].concat();
    p.extend_from_slice(data);
    p
}
