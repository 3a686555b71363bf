//! The `vhost-user-blk` program's conventions (the vhost-user "backend program conventions"):
//! `--print-capabilities`, one-line usage errors with exit code 2, exit code 1 for storage that
//! cannot be opened, a clean exit on SIGTERM with a frontend connected, and `--fd` with an
//! inherited listening socket (served frontend after frontend) or a connected one (served once).

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use common::blk::{assert_bytes_eq, pattern, verified_io, BlkBackend, ErrorChain, IO_TIMEOUT};
use common::{binary, Backend, TempDir};
use outboard_frontend::queue::{DriverQueue, QueueConfig, RingAddressing};
use outboard_frontend::{
    BlkDriver, BlkRequest, BlkStatus, Connection, GuestRam, NotifyMode, Segment,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const DISK: usize = 8 << 20;

// virtio-blk request types (VIRTIO 1.2, 5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;

fn zeros() -> Vec<u8> {
    vec![0; DISK]
}

fn read_back(blk: &mut BlkDriver, queue: u16, sector: u64, len: usize) -> Vec<u8> {
    let mut back = vec![0u8; len];
    assert_eq!(
        blk.queue(queue).read(sector, &mut back).unwrap(),
        BlkStatus::Ok
    );
    back
}

/// Runs the program with `args` and returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary("vhost-user-blk"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn print_capabilities_prints_the_exact_json_and_ignores_other_options() {
    // The members the vhost-user spec defines for a block device, and Outboard's own (what
    // device state this binary writes and loads, for choosing migration partners).
    let want = serde_json::json!({
        "type": "block",
        "features": ["read-only", "blk-file"],
        "outboard": {
            "compat-versions": outboard_blk::COMPAT_VERSIONS,
            "default-compat-version": outboard_blk::DEFAULT_COMPAT_VERSION,
            "state-format": outboard_virtio::state::FORMAT_VERSION,
        },
    });
    for args in [
        &["--print-capabilities"][..],
        &["--bogus", "--print-capabilities", "--queue-size", "3"][..],
    ] {
        let (status, stdout, stderr) = run(args);
        assert_eq!(status, Some(0), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
        assert!(
            stdout.ends_with('\n') && stdout.lines().count() == 1,
            "{stdout:?}"
        );
        let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(got, want, "{args:?}");
        assert_eq!(stdout.trim_end(), want.to_string(), "compact, one line");
    }
}

#[test]
fn bad_options_exit_with_code_2_and_one_line_on_stderr() {
    let dir = TempDir::new("cli");
    let sock = dir.path("never.sock");
    let sock = sock.to_str().unwrap();
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0; 4096]).unwrap();
    let disk = disk.to_str().unwrap();
    let s = ["--socket-path", sock];
    let null = ["--null-size", "1M"];
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--bogus"],
        [&s[..], &["--bogus"]].concat(),
        s.to_vec(),
        [&s[..], &["--fd", "3"], &null].concat(),
        [&null[..], &["--fd", "-1"]].concat(),
        [&null[..], &["--fd", "x"]].concat(),
        [&s[..], &["--null-size", "1000"]].concat(),
        [&s[..], &["--null-size", "0"]].concat(),
        [&s[..], &["--null-size", "99999999999999T"]].concat(),
        [&s[..], &["--blk-file", disk], &null].concat(),
        [&s[..], &null, &["--queue-size", "100"]].concat(),
        [&s[..], &null, &["--queue-size", "0"]].concat(),
        [&s[..], &null, &["--num-queues", "0"]].concat(),
        [&s[..], &null, &["--num-queues", "65"]].concat(),
        [&s[..], &null, &["--threads", "3", "--num-queues", "2"]].concat(),
        [&s[..], &null, &["--serial", "123456789012345678901"]].concat(),
        [&s[..], &null, &["--engine", "aio"]].concat(),
        [&s[..], &null, &["--poll-us", "soon"]].concat(),
        [&s[..], &null, &["--read-only=yes"]].concat(),
    ];
    for args in cases {
        let (status, stdout, stderr) = run(&args);
        assert_eq!(status, Some(2), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert!(
            stderr.ends_with('\n') && stderr.lines().count() == 1,
            "{args:?}: not one line: {stderr:?}"
        );
        assert!(
            stderr.starts_with("vhost-user-blk: "),
            "{args:?}: {stderr:?}"
        );
        assert!(!std::path::Path::new(sock).exists(), "{args:?} listened");
    }
}

#[test]
fn storage_that_cannot_be_opened_exits_with_code_1() {
    let dir = TempDir::new("cli-fail");
    let sock = dir.path("never.sock");
    let odd = dir.path("odd.img");
    std::fs::write(&odd, vec![0; 1000]).unwrap();
    let missing = dir.path("missing.img");
    for (disk, says) in [
        (&missing, missing.display().to_string()),
        (&odd, "512".to_string()),
    ] {
        let (status, _, stderr) = run(&[
            "--socket-path",
            sock.to_str().unwrap(),
            "--blk-file",
            disk.to_str().unwrap(),
        ]);
        assert_eq!(status, Some(1), "{}: {stderr}", disk.display());
        assert!(stderr.contains(&says), "{stderr}");
        assert!(!sock.exists());
    }
}

#[test]
fn sigterm_ends_the_program_cleanly_while_a_frontend_is_connected() {
    let mut b = BlkBackend::start("sigterm", &zeros(), &[]);
    let mut blk = b.connect();
    verified_io(&mut blk, 0, 0, 0, &pattern(33, 4096));
    // A request in flight at the signal does not stop a clean exit either.
    let q = blk.queue(0);
    q.submit(0, BlkRequest::write(64, 4096)).unwrap();
    q.kick().unwrap();
    let status = b.backend.terminate();
    assert!(status.success(), "exit status {status}:\n{}", b.log());
    assert!(!b.socket.exists(), "the socket file is removed at exit");
    assert!(
        blk.session()
            .connection()
            .peer_closed(Duration::from_secs(5))
            .unwrap(),
        "the connection is closed"
    );
}

/// Starts `vhost-user-blk --fd fd` on a zeroed disk.
fn start_with_fd(dir: &TempDir, fd: RawFd, socket: std::path::PathBuf) -> Backend {
    let disk = dir.path("disk.img");
    std::fs::write(&disk, zeros()).unwrap();
    let args = vec![
        "--fd".to_string(),
        fd.to_string(),
        "--blk-file".to_string(),
        disk.display().to_string(),
    ];
    Backend::spawn_with_fd("vhost-user-blk", fd, &args, socket, dir.path("backend.log"))
}

#[test]
fn inherited_listening_socket_serves_frontend_after_frontend() {
    let dir = TempDir::new("fd-listen");
    let path = dir.path("inherited.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut backend = start_with_fd(&dir, listener.as_raw_fd(), path.clone());
    drop(listener);
    let builder = || {
        outboard_frontend::SessionBuilder::new(&path)
            .io_timeout(Some(IO_TIMEOUT))
            .connect_timeout(IO_TIMEOUT)
    };
    let connect = || {
        BlkDriver::connect(builder()).unwrap_or_else(|e| {
            panic!("{}\n{}", ErrorChain(&e), backend.log_text());
        })
    };
    let data = pattern(34, 8192);
    let mut first = connect();
    verified_io(&mut first, 0, 0, 10, &data);
    drop(first);
    let mut second = connect();
    assert_bytes_eq(&read_back(&mut second, 0, 10, data.len()), &data, "second");
    backend.assert_alive();
    let status = backend.terminate();
    assert!(status.success(), "{status}");
}

/// Speaks to a backend on an already connected socket: negotiation without the STATUS feature
/// (rings start when kicked), one queue, then a write and a read through raw chains.
fn serve_over_connected_socket(ours: UnixStream) {
    let mut conn = Connection::from_stream(ours, 1).unwrap();
    let mut ram = GuestRam::new(4 << 20).unwrap();
    let fe = conn.frontend();
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & (1 << 30), 0, "PROTOCOL_FEATURES offered");
    let protocol = fe.get_protocol_features().unwrap();
    conn.set_protocol_features(protocol & (P::REPLY_ACK | P::CONFIG))
        .unwrap();
    let fe = conn.frontend();
    fe.set_owner().unwrap();
    fe.set_features(1 << 32 | 1 << 30).unwrap();
    fe.set_mem_table(&ram.regions_info()).unwrap();
    let cfg = QueueConfig {
        size: 64,
        event_idx: false,
        indirect_max: 0,
        notify: NotifyMode::Interrupt,
    };
    let mut dq = DriverQueue::new(&mut ram, 0, cfg).unwrap();
    let v = dq.vring_setup(RingAddressing::UserAddress).unwrap();
    fe.set_vring_num(0, v.size).unwrap();
    fe.set_vring_addr(0, &v.config()).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_call(0, &v.call).unwrap();
    fe.set_vring_kick(0, &v.kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    let hdr = ram.alloc(32, 32).unwrap();
    let data = ram.alloc(4096, 4096).unwrap();
    for (request_type, seed) in [(VIRTIO_BLK_T_OUT, 35), (VIRTIO_BLK_T_IN, 0)] {
        hdr.write_at(0, &request_type.to_le_bytes());
        hdr.write_u64(8, 24);
        hdr.write_at(16, &[0xff]);
        if seed != 0 {
            data.write_at(0, &pattern(seed, 4096));
        } else {
            data.fill(0, 4096, 0);
        }
        let seg = Segment {
            gpa: data.gpa(),
            len: 4096,
            writable: request_type == VIRTIO_BLK_T_IN,
        };
        dq.submit(&[
            Segment::readable_part(&hdr, 0, 16),
            seg,
            Segment::writable_part(&hdr, 16, 1),
        ])
        .unwrap();
        let mut used = Vec::new();
        dq.wait_used(IO_TIMEOUT, &mut used).unwrap();
        assert_eq!(hdr.read_u8(16), 0, "status of request type {request_type}");
    }
    let mut got = vec![0; 4096];
    data.read_at(0, &mut got);
    assert_bytes_eq(
        &got,
        &pattern(35, 4096),
        "read back over the connected socket",
    );
}

#[test]
fn inherited_connected_socket_is_served_once_then_the_program_exits() {
    let dir = TempDir::new("fd-connected");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut backend = start_with_fd(&dir, theirs.as_raw_fd(), dir.path("none"));
    drop(theirs);
    serve_over_connected_socket(ours);
    // The frontend hung up (the connection was dropped): the program is done.
    let status = backend.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}:\n{}", backend.log_text());
}
