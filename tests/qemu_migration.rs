//! Real QEMU live migration of a guest on `vhost-user-blk`: two QEMU 7.2 instances (TCG) on this
//! host, each with its own `vhost-user-blk` process serving the same disk image (shared storage).
//! The guest runs `fio --verify` on the disk while the source is paused and resumed once, then
//! migrated over TCP; the source QEMU quits, its backend is terminated, and the guest finishes on
//! the destination: fio's verdict, data written before the migration read back, page-cache
//! contents the backend filled during the migration (the dirty-log check), fresh I/O
//! (`tests/guest/run-migrate-blk.sh`, `tests/guest/migrate-blk-guest.sh`).
//!
//! QEMU 7.2 migrates a vhost-user-blk device through its own virtio state and the vring bases
//! (GET_VRING_BASE on the source, SET_VRING_BASE on the destination); it has no vhost-user
//! device-state transfer (SET_DEVICE_STATE_FD). The backend's part is dirty logging
//! (SET_LOG_BASE + LOG_ALL) and reporting the right ring positions when QEMU stops it.
//!
//! The assets come from `tests/guest/setup.sh`, which `scripts/test.sh` runs first.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::blk::{pattern, verified_io, BlkBackend};
use common::{binary, Backend, TempDir};
use vhost::VhostBackend;

// Device status bits (virtio 1.x, 2.1).
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const FEATURES_OK: u8 = 8;

/// The whole guest run is bounded by the script (each QEMU under `timeout`); this is the
/// test's own limit on top, after which the script is stopped (it takes its QEMUs along).
const RUN_LIMIT: Duration = Duration::from_secs(270);

fn assets_ready() -> Result<(), String> {
    let dir = std::env::var("OUTBOARD_GUEST_DIR").unwrap_or("/var/cache/outboard-guest".into());
    if !Path::new(&dir).join("env.sh").exists() {
        return Err(format!(
            "no guest assets in {dir}: run tests/guest/setup.sh (as root) first"
        ));
    }
    Ok(())
}

/// Starts `vhost-user-blk` on `disk` with debug logging (the log records every vhost-user
/// message, which is what the checks below read) and waits until it listens.
fn start_backend(dir: &TempDir, side: &str, disk: &Path, queues: u16) -> Backend {
    let sock = dir.path(&format!("{side}.sock"));
    let log = dir.path(&format!("{side}-backend.log"));
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new(binary("vhost-user-blk"))
        .args(["--socket-path", &sock.display().to_string()])
        .args(["--blk-file", &disk.display().to_string()])
        .args(["--num-queues", &queues.to_string()])
        .args(["--serial", "outboard-migrate"])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start vhost-user-blk");
    let mut backend = Backend {
        child,
        socket: sock.clone(),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        backend.assert_alive();
        assert!(
            Instant::now() < deadline,
            "{side} backend did not listen:\n{}",
            backend.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    backend
}

/// Runs `script` with `args` and `envs`, killing it (SIGTERM, then SIGKILL) after `limit`.
/// Returns (exit status or None if it had to be killed, stdout, stderr).
fn run_bounded(
    script: &str,
    args: &[String],
    envs: &[(&str, String)],
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let mut child = Command::new("bash")
        .arg(script)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the migration script");
    // Drain both pipes on threads so a chatty script never blocks.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let grace = Instant::now() + Duration::from_secs(15);
            while child.try_wait().unwrap().is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    (status, out_t.join().unwrap(), err_t.join().unwrap())
}

/// The script's stderr and both backend logs, for failure messages.
fn both_logs(stderr: &str, src: &Backend, dst: &Backend) -> String {
    format!(
        "{stderr}\n--- source backend log ---\n{}\n--- destination backend log ---\n{}",
        src.log_text(),
        dst.log_text()
    )
}

/// The `MIGRATION key value` lines of the script's output.
fn migration_facts(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("MIGRATION "))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The vhost-user requests in a backend's debug log, in order (`GET_VRING_BASE`, ...).
fn requests(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once("request Some(").map(|(_, r)| r))
        .filter_map(|r| r.split_once(')').map(|(name, _)| name.to_string()))
        .collect()
}

/// The request names from the first `from` on, as one line (for the test output).
fn sequence_from(reqs: &[String], from: &str) -> String {
    match reqs.iter().position(|r| r == from) {
        Some(i) => reqs[i..].join(" "),
        None => format!("(no {from})"),
    }
}

#[test]
fn qemu_live_migration_with_fio_verify_on_vhost_user_blk() {
    if let Err(reason) = assets_ready() {
        eprintln!("SKIP qemu migration test: {reason}");
        return;
    }
    const QUEUES: u16 = 2;
    let dir = TempDir::new("qemu-migration");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let mut src = start_backend(&dir, "src", &disk, QUEUES);
    let mut dst = start_backend(&dir, "dst", &disk, QUEUES);

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/guest/run-migrate-blk.sh"
    );
    let guest_out: PathBuf = dir.path("guest");
    let started = Instant::now();
    let (status, stdout, stderr) = run_bounded(
        script,
        &[
            src.socket.display().to_string(),
            dst.socket.display().to_string(),
            QUEUES.to_string(),
        ],
        &[
            ("OUTBOARD_SRC_BACKEND_PID", src.child.id().to_string()),
            ("OUTBOARD_DST_BACKEND_PID", dst.child.id().to_string()),
            ("OUTBOARD_GUEST_OUT", guest_out.display().to_string()),
            ("OUTBOARD_GUEST_TIMEOUT", "200".into()),
        ],
        RUN_LIMIT,
    );
    let elapsed = started.elapsed();
    println!("{stdout}");
    let status = status.unwrap_or_else(|| {
        panic!(
            "the migration run did not end within {RUN_LIMIT:?}:\n{stdout}\n{}",
            both_logs(&stderr, &src, &dst)
        )
    });
    assert!(
        status.success() && stdout.contains("run-migrate-blk: PASS"),
        "guest migration failed ({status}) after {elapsed:?}:\n{stdout}\n{}",
        both_logs(&stderr, &src, &dst)
    );

    let facts = migration_facts(&stdout);
    let fact = |k: &str| {
        facts
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no MIGRATION {k} in the output:\n{stdout}"))
    };
    let downtime: u64 = fact("downtime-ms").parse().unwrap();
    let total: u64 = fact("total-time-ms").parse().unwrap();
    println!(
        "migration: total {total} ms, downtime {downtime} ms, {} bytes of RAM sent, {} dirty syncs; whole run {elapsed:.1?}",
        fact("ram-transferred"),
        fact("ram-dirty-sync-count")
    );

    // The source backend: dirty logging was turned on for the migration, and the rings were
    // stopped (GET_VRING_BASE) after it. The script SIGTERMed it after the source QEMU quit.
    let src_status = src.wait_exit(Duration::from_secs(10));
    assert!(
        src_status.success(),
        "source backend exited with {src_status}:\n{}",
        src.log_text()
    );
    let src_log = src.log_text();
    assert!(
        src_log.contains("dirty log set"),
        "no SET_LOG_BASE:\n{src_log}"
    );
    assert!(
        src_log.contains("dirty logging on"),
        "dirty logging never on:\n{src_log}"
    );
    let src_reqs = requests(&src_log);
    let log_base = src_reqs
        .iter()
        .position(|r| r == "SET_LOG_BASE")
        .expect("SET_LOG_BASE in the source log");
    let stops = src_reqs[log_base..]
        .iter()
        .filter(|r| *r == "GET_VRING_BASE")
        .count();
    assert_eq!(
        stops,
        usize::from(QUEUES),
        "one GET_VRING_BASE per ring after logging started: {:?}",
        &src_reqs[log_base..]
    );
    println!(
        "source backend, from SET_LOG_BASE on: {}",
        sequence_from(&src_reqs, "SET_LOG_BASE")
    );

    // The destination backend took over the rings (SET_VRING_BASE) and is still serving.
    dst.assert_alive();
    let dst_log = dst.log_text();
    let dst_reqs = requests(&dst_log);
    assert!(
        dst_reqs.iter().filter(|r| *r == "SET_VRING_BASE").count() >= usize::from(QUEUES),
        "the destination never started its rings: {dst_reqs:?}"
    );
    assert!(
        !dst_log.contains("dirty logging on"),
        "the destination logged dirty pages:\n{dst_log}"
    );

    // Device state: QEMU 7.2 does not send SET_DEVICE_STATE_FD for vhost-user-blk. Should a
    // QEMU do so, the state must have gone through both ends.
    let transferred = src_reqs.iter().any(|r| r == "SET_DEVICE_STATE_FD");
    if transferred {
        assert!(src_log.contains("saving "), "{src_log}");
        assert!(dst_log.contains("loaded "), "{dst_log}");
        assert!(
            !src_log.contains("device state transfer failed")
                && !dst_log.contains("device state transfer failed"),
            "{}",
            both_logs(&stderr, &src, &dst)
        );
        println!("device state transferred with SET_DEVICE_STATE_FD");
    } else {
        assert!(
            !dst_reqs.iter().any(|r| r == "SET_DEVICE_STATE_FD"),
            "{dst_reqs:?}"
        );
        println!(
            "no SET_DEVICE_STATE_FD: QEMU 7.2 migrates vhost-user-blk through its own virtio state \
             and the vring bases"
        );
    }
    let dst_status = dst.terminate();
    assert!(
        dst_status.success(),
        "destination backend exited with {dst_status} on SIGTERM:\n{}",
        dst.log_text()
    );
}

/// QEMU 7.2 and 8.0 stop a vhost-user device (`vhost_dev_stop`: VM stop, migration, guest
/// reset) with SET_STATUS 0, SET_VRING_ENABLE 0 and only then GET_VRING_BASE, and start it
/// again with SET_VRING_BASE of the index that GET_VRING_BASE reported. The reset must not make
/// GET_VRING_BASE forget where the rings stood: QEMU would restart them at 0 (old requests
/// replayed after `stop`/`cont`; the migration destination refusing the rings).
#[test]
fn qemu_7_2_stop_sequence_reports_the_ring_position_and_restarts_there() {
    let b = BlkBackend::start("qemu72-stop", &vec![0u8; 4 << 20], &[]);
    let mut blk = b.connect();
    for i in 0..3u64 {
        // A write and a read each: 6 requests.
        verified_io(&mut blk, 0, 0, i * 8, &pattern(500 + i, 4096));
    }
    let s = blk.session();
    s.set_status(0).unwrap();
    s.enable_queue(0, false).unwrap();
    assert_eq!(
        s.stop_queue(0).unwrap(),
        6,
        "GET_VRING_BASE after SET_STATUS 0"
    );
    assert_eq!(s.stop_queue(0).unwrap(), 6, "GET_VRING_BASE again");
    // Started again as QEMU 7.2 does after `cont`: status walk and SET_FEATURES, the ring from
    // the index GET_VRING_BASE reported, DRIVER_OK. The driver's ring is left as it was.
    let acked = s.negotiated().features_acked;
    s.set_status(ACKNOWLEDGE).unwrap();
    s.set_status(ACKNOWLEDGE | DRIVER).unwrap();
    s.connection().frontend().set_features(acked).unwrap();
    s.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK).unwrap();
    s.start_queue(0, 6).unwrap();
    s.driver_ok().unwrap();
    // The device went on from 6: nothing replayed, nothing skipped.
    verified_io(&mut blk, 0, 0, 64, &pattern(510, 4096));
    let q = blk.queue(0);
    assert_eq!(
        q.driver_queue().used_idx(),
        8,
        "used index after two more requests"
    );
    let s = blk.session();
    assert_eq!(
        s.stop_queue(0).unwrap(),
        8,
        "a ring set up again answers for itself"
    );
}
