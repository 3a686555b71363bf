//! What happens when a sandboxed `vhost-user-blk` does what its policy forbids, proved with the
//! test-only trigger `OUTBOARD_SANDBOX_SELFTEST` (an environment variable only the launcher can
//! set; it runs once the sandbox is on, before any frontend is served):
//!
//! - a system call no role may make (`socket(AF_INET)`) kills the process with SIGSYS by
//!   default, is reported with its name and the thread's role under `--seccomp trap`, and only
//!   logged by the kernel under `--seccomp log`;
//! - Landlock refuses to open a path (EACCES) even without a seccomp filter, which
//!   `--sandbox none --seccomp none` allows.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::blk::BlkBackend;
use common::{binary, TempDir};
use outboard_frontend::BlkStatus;

/// A backend started with a self-test, on a null disk.
struct SelfTestRun {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
    _dir: TempDir,
}

impl SelfTestRun {
    fn start(test: &str, extra: &[&str]) -> SelfTestRun {
        let dir = TempDir::new("sbx-selftest");
        let log = dir.path("backend.log");
        let socket = dir.path("blk.sock");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary("vhost-user-blk"))
            .args([
                "--socket-path",
                socket.to_str().unwrap(),
                "--null-size",
                "1M",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("OUTBOARD_SANDBOX_SELFTEST", test)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start vhost-user-blk");
        SelfTestRun {
            child,
            log,
            socket,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the backend survived its self-test:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the log has a line containing `text`.
    fn wait_log(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the backend exited with {status} before logging {text:?}:\n{log}");
            }
            assert!(Instant::now() < deadline, "no {text:?} in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for SelfTestRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_forbidden_syscall_kills_the_backend_with_sigsys() {
    let mut run = SelfTestRun::start("forbidden-syscall", &[]);
    let status = run.wait_exit();
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "exit {status}:\n{}",
        run.log()
    );
    assert!(!status.core_dumped(), "no core dump (RLIMIT_CORE 0)");
    let log = run.log();
    assert!(
        log.contains("calling socket(AF_INET) on a control thread"),
        "{log}"
    );
    assert!(!log.contains("went through"), "{log}");
}

#[test]
fn trap_reports_the_syscall_and_the_control_role() {
    let mut run = SelfTestRun::start("forbidden-syscall", &["--seccomp", "trap"]);
    let status = run.wait_exit();
    let log = run.log();
    assert_eq!(status.code(), Some(128 + libc::SIGSYS), "{status}:\n{log}");
    let report = log
        .lines()
        .find(|l| l.starts_with("outboard-sandbox: seccomp violation"))
        .unwrap_or_else(|| panic!("no violation report:\n{log}"));
    let nr = libc::SYS_socket;
    assert!(
        report.contains(&format!("system call {nr} (socket)")),
        "{report}"
    );
    assert!(report.contains("\"main\" (role control)"), "{report}");
}

#[test]
fn trap_reports_the_syscall_and_the_worker_role() {
    let mut run = SelfTestRun::start("forbidden-syscall-worker", &["--seccomp", "trap"]);
    let status = run.wait_exit();
    let log = run.log();
    assert_eq!(status.code(), Some(128 + libc::SIGSYS), "{status}:\n{log}");
    let report = log
        .lines()
        .find(|l| l.starts_with("outboard-sandbox: seccomp violation"))
        .unwrap_or_else(|| panic!("no violation report:\n{log}"));
    assert!(report.contains("(socket)"), "{report}");
    assert!(
        report.contains("\"selftest-worker\" (role worker)"),
        "{report}"
    );
}

#[test]
fn log_mode_lets_the_call_through_and_the_kernel_records_it() {
    let mut run = SelfTestRun::start("forbidden-syscall", &["--seccomp", "log"]);
    run.wait_log("socket(AF_INET) went through");
    // Still serving.
    let mut blk = outboard_frontend::BlkDriver::connect(
        outboard_frontend::SessionBuilder::new(&run.socket)
            .io_timeout(Some(Duration::from_secs(10)))
            .connect_timeout(Duration::from_secs(10)),
    )
    .unwrap();
    let mut buf = vec![1u8; 512];
    assert_eq!(blk.queue(0).read(0, &mut buf).unwrap(), BlkStatus::Ok);
    let pid = run.child.id();
    // The record is in the kernel log (audit type 1326) where this test may read it.
    match Command::new("dmesg").output() {
        Ok(out) if out.status.success() => {
            let kernel = String::from_utf8_lossy(&out.stdout);
            let record = format!("pid={pid} comm=\"vhost-user-blk\"");
            let found = kernel.lines().any(|l| {
                l.contains("type=1326")
                    && l.contains(&record)
                    && l.contains(&format!("syscall={}", libc::SYS_socket))
            });
            assert!(
                found,
                "no seccomp audit record for pid {pid} in the kernel log"
            );
        }
        _ => eprintln!("SKIP kernel log check: dmesg is not readable here (needs CAP_SYSLOG)"),
    }
}

#[test]
fn landlock_refuses_to_open_a_path() {
    // Landlock alone (no seccomp filter), then with seccomp, which refuses openat with the same
    // errno, then the control case without either.
    for args in [&["--seccomp", "none"][..], &[]] {
        let mut run = SelfTestRun::start("open-file", args);
        let log = run.wait_log("sandbox self-test: open");
        assert!(
            log.contains("opening / failed: Permission denied (os error 13)"),
            "{args:?}: {log}"
        );
    }
    let mut run = SelfTestRun::start("open-file", &["--sandbox", "none", "--seccomp", "none"]);
    let log = run.wait_log("sandbox self-test: open");
    assert!(
        log.contains("opened / (the file system is not confined)"),
        "{log}"
    );
}

#[test]
fn the_selftest_trigger_refuses_unknown_values() {
    let mut run = SelfTestRun::start("everything", &[]);
    let status = run.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", run.log());
    assert!(
        run.log().contains("OUTBOARD_SANDBOX_SELFTEST"),
        "{}",
        run.log()
    );
}

#[test]
fn a_served_backend_without_selftest_is_unaffected() {
    // The control case of the tests above: the same binary and options serve normally.
    let b = BlkBackend::start_null("sbx-noselftest", 1 << 20, &["--seccomp", "trap"]);
    let mut blk = b.connect();
    let mut buf = vec![1u8; 512];
    assert_eq!(blk.queue(0).read(0, &mut buf).unwrap(), BlkStatus::Ok);
    assert!(!b.log().contains("seccomp violation"), "{}", b.log());
}
