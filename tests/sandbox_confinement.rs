//! The sandbox of a serving `vhost-user-blk`, seen from outside: every thread (control, signal,
//! and the queue workers a frontend's activation starts) runs under a seccomp filter, the
//! process keeps no capability and cannot gain any, each engine and option serves I/O under the
//! default (kill) filter, the namespace sandbox leaves an empty root and no network, and the
//! socket file is removed at exit even when the backend is killed.

mod common;

use std::path::Path;
use std::time::Duration;

use common::blk::{pattern, verified_io, BlkBackend};
use common::proc::{is_root, threads};
use common::{Backend, TempDir};
use outboard_frontend::{BlkRange, BlkStatus};

/// Writes, reads back, flushes, discards, zeroes and asks the serial on every queue.
fn exercise(b: &BlkBackend, queues: u16, read_only: bool) {
    let mut blk = b.connect_with(b.builder().queues(queues));
    for q in 0..queues {
        let sector = 8 * u64::from(q);
        if read_only {
            let mut buf = vec![0u8; 4096];
            assert_eq!(blk.queue(q).read(sector, &mut buf).unwrap(), BlkStatus::Ok);
            assert_eq!(blk.queue(q).write(sector, &buf).unwrap(), BlkStatus::IoErr);
            continue;
        }
        verified_io(&mut blk, q, q, sector, &pattern(u64::from(q) + 1, 4096));
        assert_eq!(blk.queue(q).flush().unwrap(), BlkStatus::Ok);
        let range = [BlkRange {
            sector: 64 + sector,
            num_sectors: 8,
        }];
        assert_eq!(blk.queue(q).discard(&range).unwrap(), BlkStatus::Ok);
        assert_eq!(
            blk.queue(q).write_zeroes(&range, true).unwrap(),
            BlkStatus::Ok
        );
        let mut back = vec![0xffu8; 4096];
        assert_eq!(
            blk.queue(q).read(64 + sector, &mut back).unwrap(),
            BlkStatus::Ok
        );
        assert!(back.iter().all(|&x| x == 0), "zeroed range reads zeros");
        blk.queue(q).get_id().unwrap();
    }
    blk.disconnect().unwrap();
}

#[test]
fn every_thread_of_a_serving_backend_runs_under_a_seccomp_filter() {
    let b = BlkBackend::start("sbx-threads", &vec![0u8; 4 << 20], &["--num-queues", "2"]);
    let pid = b.backend.child.id();
    let mut blk = b.connect_with(b.builder().queues(2));
    verified_io(&mut blk, 0, 1, 0, &pattern(1, 4096));
    verified_io(&mut blk, 1, 0, 8, &pattern(2, 4096));
    // The device is active: control, signals and one worker per queue.
    let ts = threads(pid);
    let names: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
    for name in ["vhost-user-blk", "signals", "blk-worker-0", "blk-worker-1"] {
        assert!(names.contains(&name), "no {name} thread in {names:?}");
    }
    for t in &ts {
        assert_eq!(t.seccomp, 2, "{t:?} runs without a seccomp filter");
        assert_eq!(t.no_new_privs, 1, "{t:?}");
    }
    let control = ts.iter().find(|t| t.name == "vhost-user-blk").unwrap();
    let signals = ts.iter().find(|t| t.name == "signals").unwrap();
    // Each role installs two programs, its refusals (clone3 -> ENOSYS, openat -> EACCES, ...)
    // and its allow-list; the signal thread started before the control thread installed its
    // own, so it has only its role's.
    assert_eq!(control.filters, 2, "{control:?}");
    assert_eq!(signals.filters, 2, "{signals:?}");
    for t in ts.iter().filter(|t| t.name.starts_with("blk-worker")) {
        // A worker inherits the control thread's filters and adds its own two at start through
        // the VIRTIO framework's thread-start hook.
        assert_eq!(t.filters, control.filters + 2, "{t:?}");
    }
    blk.disconnect().unwrap();
}

#[test]
fn a_root_backend_keeps_no_capabilities() {
    let b = BlkBackend::start_null("sbx-caps", 1 << 20, &[]);
    // The socket is bound before the sandbox is entered; a served frontend proves it is on.
    exercise_null(&b);
    for t in threads(b.backend.child.id()) {
        assert_eq!((t.cap_eff, t.cap_prm), (0, 0), "{t:?}");
        if is_root() {
            assert_eq!(t.cap_bnd, 0, "{t:?}: root empties the bounding set too");
        }
    }
    assert!(
        b.log().contains("capabilities dropped"),
        "the sandbox reports what it did:\n{}",
        b.log()
    );
}

#[test]
fn every_engine_and_option_serves_io_under_the_kill_filter() {
    let cases: &[(&[&str], u16)] = &[
        (&[], 1),
        (&["--num-queues", "2"], 2),
        (&["--engine", "sync", "--num-queues", "2"], 2),
        (&["--num-queues", "2", "--threads", "1"], 2),
        (&["--poll-us", "0"], 1),
        (&["--poll-us", "100"], 1),
        (&["--engine", "sync", "--poll-us", "100"], 1),
        (&["--direct"], 1),
    ];
    for (args, queues) in cases {
        let mut b = BlkBackend::start("sbx-matrix", &vec![0u8; 4 << 20], args);
        exercise(&b, *queues, false);
        // A second frontend after the first left, then a clean exit.
        exercise(&b, *queues, false);
        b.backend.assert_alive();
        let status = b.backend.terminate();
        assert!(status.success(), "{args:?}: {status}\n{}", b.log());
        assert!(
            !b.socket.exists(),
            "{args:?}: the socket file is removed at exit"
        );
    }
    let mut b = BlkBackend::start("sbx-ro", &vec![0u8; 1 << 20], &["--read-only"]);
    exercise(&b, 1, true);
    assert!(b.backend.terminate().success(), "{}", b.log());
    let mut b = BlkBackend::start_null("sbx-null", 4 << 20, &["--num-queues", "2"]);
    let mut blk = b.connect_with(b.builder().queues(2));
    let mut buf = vec![0xaau8; 4096];
    assert_eq!(blk.queue(1).read(0, &mut buf).unwrap(), BlkStatus::Ok);
    assert!(buf.iter().all(|&x| x == 0));
    blk.disconnect().unwrap();
    assert!(b.backend.terminate().success(), "{}", b.log());
}

#[test]
fn the_namespace_sandbox_leaves_an_empty_root_and_no_network() {
    let max_user_ns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces");
    if max_user_ns.is_ok_and(|n| n.trim() == "0") {
        eprintln!("SKIP: this kernel allows no user namespaces (user.max_user_namespaces = 0)");
        return;
    }
    let mut b = BlkBackend::start(
        "sbx-ns",
        &vec![0u8; 4 << 20],
        &["--sandbox", "namespace", "--num-queues", "2"],
    );
    let pid = b.backend.child.id();
    exercise(&b, 2, false);
    let root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(root, ["proc"], "the backend's root holds only /proc");
    for ns in ["user", "mnt", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the backend has its own {ns} namespace");
    }
    let status = b.backend.terminate();
    assert!(status.success(), "{status}\n{}", b.log());
    assert!(!b.socket.exists(), "the socket file is removed at exit");
}

#[test]
fn without_a_sandbox_nothing_is_confined() {
    let mut b = BlkBackend::start_null(
        "sbx-none",
        1 << 20,
        &["--sandbox", "none", "--seccomp", "none"],
    );
    exercise_null(&b);
    for t in threads(b.backend.child.id()) {
        assert_eq!(t.seccomp, 0, "{t:?}");
    }
    assert!(b.backend.terminate().success());
    assert!(
        !b.socket.exists(),
        "the program removes its own socket file"
    );
}

fn exercise_null(b: &BlkBackend) {
    let mut blk = b.connect();
    let mut buf = vec![1u8; 512];
    assert_eq!(blk.queue(0).read(0, &mut buf).unwrap(), BlkStatus::Ok);
    blk.disconnect().unwrap();
}

#[test]
fn the_socket_file_is_removed_even_when_the_backend_is_killed() {
    let mut b = BlkBackend::start_null("sbx-kill9", 1 << 20, &[]);
    exercise_null(&b);
    b.backend.child.kill().unwrap();
    b.backend.child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while b.socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the socket reaper did not remove {}",
            b.socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!Path::new(&b.socket).exists());
}

#[test]
fn a_killed_backends_reaper_leaves_a_restarted_backends_socket_alone() {
    // A supervisor restarting a killed backend at once binds a new socket at the same path
    // while the old one's reaper wakes up; the file system may give it the same inode number.
    let dir = TempDir::new("sbx-restart");
    let sock = dir.path("blk.sock");
    let args = |log: &str| -> (Vec<String>, std::path::PathBuf) {
        let a = ["--socket-path", sock.to_str().unwrap(), "--null-size", "1M"];
        (a.iter().map(|s| s.to_string()).collect(), dir.path(log))
    };
    for round in 0..5 {
        let (a_args, a_log) = args("a.log");
        let mut a = Backend::start("vhost-user-blk", &sock, &a_args, a_log);
        a.child.kill().unwrap();
        a.child.wait().unwrap();
        let (b_args, b_log) = args("b.log");
        let mut b = Backend::start("vhost-user-blk", &sock, &b_args, b_log);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            sock.exists(),
            "round {round}: the old reaper removed the new socket"
        );
        std::os::unix::net::UnixStream::connect(&sock)
            .unwrap_or_else(|e| panic!("round {round}: cannot connect to the new backend: {e}"));
        b.assert_alive();
    }
}
