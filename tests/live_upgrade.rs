//! Live upgrade of `vhost-user-blk`: a new process takes the running device over from the old
//! one (`--upgrade-socket` / `--upgrade-from`) while `outboard-frontend` drives a verifying
//! workload on two queues, and the frontend never sees a disconnect.
//!
//! The workload is the migration runner's (`bins/outboard-migrate/src/workload.rs`): every
//! write is a self-describing, checksummed 4 KiB record with a growing sequence number, at most
//! one request per block is in flight, reads are checked against an exact model, and every
//! request must complete exactly once.

mod common;

#[allow(dead_code)] // The runner's workload, shared as is; this test uses part of it.
#[path = "../bins/outboard-migrate/src/workload.rs"]
mod workload;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, Backend, TempDir};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use outboard_frontend::{BlkDriver, SessionBuilder, WaitMode};
use workload::Workload;

/// A 2 MiB disk: 512 blocks of 4 KiB, all in the working set.
const DISK: u64 = 2 << 20;
const QUEUES: u16 = 2;
const DEPTH: u16 = 16;
/// Upgrades in the main test: the issue asks for 100 in CI. Each costs a process start (about
/// 10 ms) and a pause of a few milliseconds; the whole test takes a few seconds.
const UPGRADES: usize = 300;

struct Setup {
    dir: TempDir,
    disk: PathBuf,
    socket: PathBuf,
    upgrade: PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let dir = TempDir::new(tag);
        let disk = dir.path("disk.img");
        std::fs::File::create(&disk).unwrap().set_len(DISK).unwrap();
        Setup {
            socket: dir.path("vhost.sock"),
            upgrade: dir.path("upgrade.sock"),
            disk,
            dir,
        }
    }

    fn device_args(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "--blk-file",
            self.disk.to_str().unwrap(),
            "--num-queues",
            &QUEUES.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// The first backend, with an upgrade socket.
    fn start(&self, extra: &[&str]) -> Backend {
        let mut args = vec![
            "--socket-path".to_string(),
            self.socket.to_str().unwrap().to_string(),
            "--upgrade-socket".to_string(),
            self.upgrade.to_str().unwrap().to_string(),
        ];
        args.extend(self.device_args(extra));
        let b = Backend::start(
            "vhost-user-blk",
            &self.socket,
            &args,
            self.dir.path("b0.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.upgrade.exists() {
            assert!(Instant::now() < deadline, "no upgrade socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        b
    }

    /// A new backend that takes the device over from the one at the upgrade socket.
    fn upgrade_from(&self, n: usize, extra: &[&str]) -> (Child, PathBuf) {
        let log = self.dir.path(&format!("b{n}.log"));
        let mut args = vec![
            "--upgrade-from".to_string(),
            self.upgrade.to_str().unwrap().to_string(),
        ];
        args.extend(self.device_args(extra));
        let child = Command::new(binary("vhost-user-blk"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the new backend");
        (child, log)
    }
}

fn connect(socket: &Path) -> Workload {
    let driver = BlkDriver::connect(SessionBuilder::new(socket).queues(QUEUES)).expect("connect");
    Workload::new(driver, DISK / 4096, DEPTH, 0x5eed).expect("workload")
}

/// Fails if the frontend's connection has anything to read: the backend never writes on it
/// unasked, so a readable socket means a hang-up (EOF) or a stray message.
fn assert_connection_quiet(w: &mut Workload) {
    let sock = w.driver.session().connection().socket();
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap();
    let revents = fds[0].revents().unwrap();
    assert!(
        revents.is_empty(),
        "the frontend's connection reported {revents:?} (a disconnect)"
    );
}

fn wait_exit(child: &mut Child, what: &str, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} did not exit");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs the workload until `done` is set, noting when completions arrive and doing a
/// vhost-user round trip (GET_CONFIG) every `config_every` rounds.
fn drive(
    w: &mut Workload,
    done: &std::sync::atomic::AtomicBool,
    config_every: u64,
) -> (Vec<Instant>, u64) {
    let mut seen = Vec::new();
    let mut round_trips = 0;
    let mut round = 0u64;
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        w.fill().expect("submit");
        let before = w.counts.completed;
        w.reap(WaitMode::Block(Duration::from_secs(10)))
            .expect("reap");
        assert!(
            w.counts.completed > before || w.in_flight() == 0,
            "no request completed within 10 s: {:?}",
            w.counts
        );
        seen.push(Instant::now());
        round += 1;
        if round % config_every == 0 {
            // A message the frontend sends whenever it likes: some arrive while a handover is
            // under way and are answered by the new process from the socket's queue.
            w.driver.refresh_config().expect("GET_CONFIG round trip");
            round_trips += 1;
        }
        assert_connection_quiet(w);
    }
    (seen, round_trips)
}

/// The longest stretch without completions that overlaps `[from, to]`.
fn pause_in(seen: &[Instant], from: Instant, to: Instant) -> Duration {
    seen.windows(2)
        .filter(|p| p[1] >= from && p[0] <= to)
        .map(|p| p[1] - p[0])
        .max()
        .unwrap_or_default()
}

fn finish(mut w: Workload) {
    w.drain(Duration::from_secs(10)).expect("drain");
    assert_eq!(w.violations, Vec::<String>::new(), "{:?}", w.counts);
    assert_eq!(w.counts.submitted, w.counts.completed, "every request once");
    let (blocks, bad) = w.read_back().expect("read back");
    assert_eq!(blocks, DISK / 4096);
    assert_eq!(bad, Vec::<String>::new(), "lost or corrupted writes");
    assert_connection_quiet(&mut w);
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    wait_exit(child, "a backend after SIGTERM", Duration::from_secs(10))
}

#[test]
fn hundred_live_upgrades_under_load_lose_no_write_and_never_disconnect() {
    let s = Setup::new("upgrade-100");
    let mut first = s.start(&[]);
    let mut w = connect(&s.socket);
    let done = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let mut windows = Vec::new();
    let mut old: Option<Child> = None;
    let (seen, round_trips) = std::thread::scope(|scope| {
        let driver = scope.spawn(|| drive(&mut w, &done, 7));
        // Let the workload get going.
        std::thread::sleep(Duration::from_millis(50));
        for n in 1..=UPGRADES {
            let t0 = Instant::now();
            let (mut new, log) = s.upgrade_from(n, &[]);
            let status = match old.as_mut() {
                Some(o) => wait_exit(o, "the old backend", Duration::from_secs(20)),
                None => first.wait_exit(Duration::from_secs(20)),
            };
            let t1 = Instant::now();
            assert!(status.success(), "old backend before upgrade {n}: {status}");
            if let Some(st) = new.try_wait().unwrap() {
                panic!(
                    "upgrade {n}: the new backend exited ({st}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            windows.push((t0, t1));
            old = Some(new);
            // Some load between upgrades.
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        done.store(true, std::sync::atomic::Ordering::Release);
        driver.join().unwrap()
    });
    let elapsed = started.elapsed();
    let mut pauses: Vec<Duration> = windows
        .iter()
        .map(|&(a, b)| pause_in(&seen, a, b))
        .collect();
    pauses.sort();
    let median = pauses[pauses.len() / 2];
    let max = *pauses.last().unwrap();
    println!(
        "{UPGRADES} live upgrades in {elapsed:.2?}: {} requests, {} writes, {round_trips} GET_CONFIG round trips; pause seen by the frontend: median {median:.2?}, max {max:.2?}",
        w.counts.completed, w.counts.writes
    );
    assert!(w.counts.writes > 1000, "{:?}", w.counts);
    assert!(max < Duration::from_secs(2), "a pause of {max:?}");
    // The last backend serves the read-back, then ends; the socket files go with it.
    finish(w);
    let mut last = old.unwrap();
    assert!(terminate(&mut last).success());
    assert!(
        !s.socket.exists() && !s.upgrade.exists(),
        "socket files left behind"
    );
}
