//! Helpers shared by the integration tests: starting the real backend binaries and checking
//! that they stay up.
#![allow(dead_code)]

pub mod blk;
pub mod hostile;
pub mod proc;

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The path of a workspace binary built for the profile these tests run under
/// (`target/debug` or `target/release`). The test command (`scripts/test.sh`) builds every
/// binary before the tests run; a missing one is a loud failure, not a skip.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, as scripts/test.sh does)",
        path.display()
    );
    path
}

/// A fresh temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::temp_dir().join(format!(
            "outboard-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&base).unwrap();
        TempDir(base)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A backend process, killed on drop.
#[derive(Debug)]
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Backend {
    /// Starts `program` with `args` and waits until it listens on `socket`.
    pub fn start(program: &str, socket: &Path, args: &[String], log: PathBuf) -> Backend {
        let _ = std::fs::remove_file(socket);
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary(program))
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start backend");
        let mut b = Backend {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(status) = b.child.try_wait().unwrap() {
                panic!(
                    "{program} exited with {status} before listening:\n{}",
                    b.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not listen:\n{}",
                b.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        b
    }

    /// Starts `program` with `args` and the descriptor `fd` of this process left open in the
    /// child under the same number (for `--fd`). Does not wait for anything: the socket exists
    /// already. `socket` is only recorded.
    pub fn spawn_with_fd(
        program: &str,
        fd: RawFd,
        args: &[String],
        socket: PathBuf,
        log: PathBuf,
    ) -> Backend {
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(binary(program));
        cmd.args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which
        // is async-signal-safe; it allocates nothing and touches no lock. Clearing FD_CLOEXEC on
        // `fd` in the child alone keeps the parent's descriptor out of every other child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start backend");
        Backend { child, socket, log }
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "backend did not exit within {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("backend exited with {status}:\n{}", self.log_text());
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "backend ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `outboard-migrate` with `args` (a JSON report and a work directory in `dir`); returns
/// its output and its report (`Null` if it wrote none).
pub fn outboard_migrate(dir: &TempDir, args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let json = dir.path("report.json");
    let out = Command::new(binary("outboard-migrate"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--workdir")
        .arg(dir.path("work"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("start outboard-migrate");
    let report = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    (out, report)
}

/// Runs `outboard-migrate` and returns its report, failing loudly with its readable output
/// unless it passed.
#[track_caller]
pub fn outboard_migrate_passing(dir: &TempDir, args: &[&str]) -> serde_json::Value {
    let (out, report) = outboard_migrate(dir, args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "outboard-migrate failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["verdict"], "pass", "{text}");
    report
}
