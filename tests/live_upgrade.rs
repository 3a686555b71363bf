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
/// Upgrades in the main test. The issue asks for 100 in CI; each costs a process start (about
/// 10 ms) and a pause of about 2 ms, so 300 take about 3 s and CI runs 300.
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

    /// The device options: this disk, [`QUEUES`] queues unless `extra` says otherwise.
    fn device_args(&self, extra: &[&str]) -> Vec<String> {
        let mut a = vec!["--blk-file".to_string(), self.disk.to_str().unwrap().into()];
        if !extra.contains(&"--num-queues") {
            a.extend(["--num-queues".to_string(), QUEUES.to_string()]);
        }
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
    fn upgrade_from(&self, n: usize, extra: &[&str]) -> (Proc, PathBuf) {
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
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the new backend");
        (Proc(child), log)
    }
}

/// A backend process started by a test, killed if the test ends while it runs (a failed
/// assertion must not leave backends behind).
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
        if round.is_multiple_of(config_every) {
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
fn three_hundred_live_upgrades_under_load_lose_no_write_and_never_disconnect() {
    let s = Setup::new("upgrade-300");
    let mut first = s.start(&[]);
    let mut w = connect(&s.socket);
    let done = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let mut windows = Vec::new();
    let mut old: Option<Proc> = None;
    let (seen, round_trips) = std::thread::scope(|scope| {
        let driver = scope.spawn(|| drive(&mut w, &done, 7));
        let stop = StopOnDrop(&done);
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
        drop(stop);
        driver.join().unwrap()
    });
    let elapsed = started.elapsed();
    // What each old process measured: from accepting the new one to its TAKEN.
    let mut handover_us: Vec<u64> = (0..UPGRADES)
        .filter_map(|n| {
            let log = std::fs::read_to_string(s.dir.path(&format!("b{n}.log"))).ok()?;
            let line = log
                .lines()
                .find(|l| l.contains("the device belongs to the new process"))?;
            line.split('(').nth(1)?.split(' ').next()?.parse().ok()
        })
        .collect();
    assert_eq!(
        handover_us.len(),
        UPGRADES,
        "every old backend logged its handover"
    );
    handover_us.sort();
    // Where it goes: until the quiesce is done, and until TAKEN (the new process's part).
    let mut quiesced_us: Vec<u64> = (0..UPGRADES)
        .filter_map(|n| {
            let log = std::fs::read_to_string(s.dir.path(&format!("b{n}.log"))).ok()?;
            let line = log.lines().find(|l| l.contains("quiesced after"))?;
            let after = line.split("quiesced after ").nth(1)?;
            after.split(' ').next()?.parse().ok()
        })
        .collect();
    quiesced_us.sort();
    let mut pauses: Vec<Duration> = windows
        .iter()
        .map(|&(a, b)| pause_in(&seen, a, b))
        .collect();
    pauses.sort();
    let median = pauses[pauses.len() / 2];
    let max = *pauses.last().unwrap();
    println!(
        "{UPGRADES} live upgrades in {elapsed:.2?}: {} requests, {} writes, {round_trips} GET_CONFIG round trips; pause seen by the frontend: median {median:.2?}, max {max:.2?}; handover in the old process (request to TAKEN): median {} µs, max {} µs, of which until quiesced: median {} µs",
        w.counts.completed,
        w.counts.writes,
        handover_us[UPGRADES / 2],
        handover_us[UPGRADES - 1],
        quiesced_us.get(quiesced_us.len() / 2).copied().unwrap_or_default()
    );
    assert!(w.counts.writes > 1000, "{:?}", w.counts);
    // Typically a few milliseconds; on a 2-CPU machine loaded by other test suites (load
    // average 15) single pauses reached 0.9 s, so only a stall is a failure here.
    assert!(max < Duration::from_secs(5), "a pause of {max:?}");
    // The last backend serves the read-back, then ends; the socket files go with it.
    finish(w);
    let mut last = old.unwrap();
    assert!(terminate(&mut last).success());
    // The first process's reapers (orphans now) remove them once the last holder of their
    // pipes is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.socket.exists() || s.upgrade.exists() {
        assert!(Instant::now() < deadline, "socket files left behind");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sets the flag when dropped, also when a test fails, so that the driving thread stops.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Runs the workload on another thread while `f` runs on this one.
fn under_load<R>(w: &mut Workload, f: impl FnOnce() -> R) -> R {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let driver = scope.spawn(|| drive(w, &done, 5));
        let stop = StopOnDrop(&done);
        std::thread::sleep(Duration::from_millis(30));
        let r = f();
        std::thread::sleep(Duration::from_millis(30));
        drop(stop);
        let (_, _) = driver.join().unwrap();
        r
    })
}

/// Starts a new backend with `extra` options and expects the running one to keep the device:
/// the new one exits with failure, and its log says `why`.
fn expect_refusal(s: &Setup, n: usize, extra: &[&str], why: &str) -> String {
    let (mut new, log) = s.upgrade_from(n, extra);
    let status = wait_exit(&mut new, "the refused backend", Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{extra:?}: {status}\n{text}");
    assert!(
        text.contains(why),
        "{extra:?}: expected {why:?} in:\n{text}"
    );
    text
}

#[test]
fn an_incompatible_new_binary_is_refused_and_the_old_one_keeps_serving() {
    let s = Setup::new("upgrade-refused");
    // The running backend writes compat version 2 state (the default).
    let mut old = s.start(&[]);
    let mut w = connect(&s.socket);
    let before = w.counts.completed;
    under_load(&mut w, || {
        // A binary started as compat version 1 reads only version 1 state: the old one
        // refuses before it stops anything.
        expect_refusal(&s, 1, &["--compat-version", "1"], "compat version 2");
        // Another device shape.
        expect_refusal(&s, 2, &["--num-queues", "1"], "queues");
        // Accepted by the old one, then refused by the new one while it rebuilds the session
        // (the frontend's rings are larger than it allows): it says why and exits, and the
        // old one resumes its queues.
        expect_refusal(&s, 3, &["--queue-size", "16"], "queue 0");
        old.assert_alive();
    });
    let after_refusals = w.counts.completed;
    assert!(after_refusals > before, "the old backend served under load");
    let log = old.log_text();
    assert!(log.contains("upgrade refused"), "{log}");
    assert!(log.contains("resuming the device"), "{log}");
    // The old backend still serves and can still be upgraded by a compatible binary.
    let mut next = None;
    under_load(&mut w, || {
        let (new, _) = s.upgrade_from(4, &[]);
        assert!(old.wait_exit(Duration::from_secs(20)).success());
        next = Some(new);
    });
    assert!(w.counts.completed > after_refusals);
    finish(w);
    let mut next = next.unwrap();
    assert!(terminate(&mut next).success());
}

#[test]
fn the_old_backend_resumes_when_the_new_one_vanishes_or_talks_nonsense() {
    use outboard_vhost_user::handover;
    let s = Setup::new("upgrade-vanish");
    let mut old = s.start(&[]);
    let mut w = connect(&s.socket);
    let hello = handover::Hello {
        protocol: handover::PROTOCOL_VERSION,
        device_type: 2,
        num_queues: u32::from(QUEUES),
        compat_version: 2,
        accepted_compat: vec![1, 2],
        state_formats: vec![outboard_virtio::state::FORMAT_VERSION],
    };
    let mut progress = Vec::new();
    for round in 0..5 {
        under_load(&mut w, || {
            // This test plays a new process that receives the whole device and then dies
            // without confirming: every descriptor of the session came here and is dropped.
            let received = handover::request_handover(&s.upgrade, &hello).expect("handover");
            assert!(received.session.is_some(), "a frontend is connected");
            assert!(received.sockets.listener.is_some());
            drop(received);
            // Nonsense on the upgrade socket is refused without stopping anything.
            let mut junk = std::os::unix::net::UnixStream::connect(&s.upgrade).unwrap();
            std::io::Write::write_all(&mut junk, &[0xff; 64]).unwrap();
            drop(junk);
            // A peer that connects and says nothing is given up on after a while.
            if round == 0 {
                let _silent = std::os::unix::net::UnixStream::connect(&s.upgrade).unwrap();
                std::thread::sleep(handover::HELLO_TIMEOUT + Duration::from_millis(200));
            }
            old.assert_alive();
        });
        // The old backend runs the device again: requests complete.
        let before = w.counts.completed;
        w.run(100, Duration::from_secs(10))
            .expect("the old backend serves after an abandoned handover");
        assert!(w.counts.completed >= before + 100);
        progress.push(w.counts.completed);
    }
    assert!(
        progress.windows(2).all(|p| p[1] > p[0]),
        "requests completed after every abandoned handover: {progress:?}"
    );
    let log = old.log_text();
    assert!(log.matches("resuming the device").count() >= 5, "{log}");
    finish(w);
    assert!(old.terminate().success());
}

#[test]
fn an_upgraded_backend_keeps_the_dirty_log_and_the_inflight_record() {
    use outboard_frontend::migration::migration_protocol_features;
    use outboard_frontend::DirtyLog;
    use vhost::vhost_user::VhostUserProtocolFeatures;
    let s = Setup::new("upgrade-log");
    let mut first = s.start(&[]);
    let builder = SessionBuilder::new(&s.socket)
        .queues(QUEUES)
        .protocol_features(
            migration_protocol_features() | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        );
    let driver = BlkDriver::connect(builder).expect("connect");
    let mut w = Workload::new(driver, DISK / 4096, DEPTH, 0x10c).expect("workload");
    assert!(
        w.driver.session().has_inflight(),
        "INFLIGHT_SHMFD negotiated"
    );
    let log = DirtyLog::for_ram(w.driver.session().ram()).unwrap();
    w.driver.session().start_dirty_log(&log).unwrap();
    log.clear();
    w.take_device_pages();
    // Twenty upgrades while the frontend migrates (logging on) and keeps an inflight record.
    let mut old: Option<Proc> = None;
    under_load(&mut w, || {
        for n in 1..=20 {
            let (new, _) = s.upgrade_from(n, &[]);
            match old.as_mut() {
                Some(o) => assert!(wait_exit(o, "old", Duration::from_secs(20)).success()),
                None => assert!(first.wait_exit(Duration::from_secs(20)).success()),
            }
            old = Some(new);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    // Every page the devices wrote (read data, status bytes), whichever process wrote it, is
    // in the frontend's log; then the same for the last process alone, which was handed the
    // log by a process that was handed it in turn.
    for phase in ["twenty upgrades", "the last process alone"] {
        if phase == "the last process alone" {
            w.drain(Duration::from_secs(10)).unwrap();
            log.clear();
            w.take_device_pages();
            w.run(500, Duration::from_secs(10)).unwrap();
        }
        let pages = w.take_device_pages();
        let dirty = log.take();
        // The slots' buffers and status bytes, reused by every request.
        assert!(
            pages.len() >= usize::from(QUEUES),
            "{phase}: {} pages",
            pages.len()
        );
        let missing: Vec<_> = pages
            .iter()
            .filter(|(p, _)| !dirty.is_dirty(*p * 4096))
            .collect();
        assert!(
            missing.is_empty(),
            "{phase}: pages written but not logged: {missing:?}"
        );
    }
    // An upgraded process records what it takes in the region it was handed: one more
    // upgrade, to a process that stops its worker once a request's data is on the disk but not
    // yet answered, is killed there; a fresh backend resubmits from the record.
    w.drain(Duration::from_secs(10)).unwrap();
    let (mut last, last_log) = s.upgrade_from(21, &["--fault-point", "after-storage-write@1:stop"]);
    assert!(wait_exit(old.as_mut().unwrap(), "old", Duration::from_secs(20)).success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&last_log)
        .unwrap_or_default()
        .contains("after-storage-write reached")
    {
        assert!(Instant::now() < deadline, "the fault point was not reached");
        w.fill().unwrap();
        w.reap(WaitMode::Block(Duration::from_millis(2))).unwrap();
    }
    assert!(w.in_flight() > 0);
    last.kill().unwrap();
    last.wait().unwrap();
    let mut fresh = Backend::start(
        "vhost-user-blk",
        &s.socket,
        &[
            vec![
                "--socket-path".to_string(),
                s.socket.to_str().unwrap().into(),
            ],
            s.device_args(&[]),
        ]
        .concat(),
        s.dir.path("fresh.log"),
    );
    w.driver.session().reconnect().expect("reconnect");
    w.drain(Duration::from_secs(10))
        .expect("requests in flight at the kill complete");
    let text = fresh.log_text();
    assert!(
        text.contains("an earlier process left in flight"),
        "the fresh backend found nothing in the record:\n{text}"
    );
    w.run(2000, Duration::from_secs(10)).unwrap();
    finish(w);
    assert!(fresh.terminate().success());
}

#[test]
fn upgrades_cross_sandbox_levels_and_the_socket_files_follow() {
    let s = Setup::new("upgrade-levels");
    // An unconfined backend removes its socket files itself; it hands their paths on, and a
    // confined successor starts its own reapers for them. The namespace level's successor
    // receives everything before it enters its namespaces.
    let mut first = s.start(&["--sandbox", "none", "--seccomp", "none"]);
    let mut w = connect(&s.socket);
    let levels: [&[&str]; 3] = [
        &["--sandbox", "namespace"],
        &["--sandbox", "landlock", "--seccomp", "trap"],
        &["--sandbox", "none", "--seccomp", "none"],
    ];
    let mut old: Option<Proc> = None;
    let mut logs = Vec::new();
    under_load(&mut w, || {
        for (n, extra) in levels.iter().enumerate() {
            let (new, log) = s.upgrade_from(n + 1, extra);
            let status = match old.as_mut() {
                Some(o) => wait_exit(o, "old", Duration::from_secs(20)),
                None => first.wait_exit(Duration::from_secs(20)),
            };
            assert!(status.success(), "{extra:?}: {status}");
            assert!(s.socket.exists() && s.upgrade.exists(), "{extra:?}");
            old = Some(new);
            logs.push(log);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    assert!(text.contains("sandbox namespace"), "{text}");
    finish(w);
    let mut last = old.unwrap();
    assert!(terminate(&mut last).success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.socket.exists() || s.upgrade.exists() {
        assert!(Instant::now() < deadline, "socket files left behind");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_backend_serving_an_inherited_connection_hands_it_over() {
    use outboard_frontend::queue::{DriverQueue, QueueConfig, RingAddressing};
    use outboard_frontend::{Connection, GuestRam, NotifyMode, Segment};
    use std::os::fd::AsRawFd;
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;

    const TYPE_OUT: u32 = 1; // VIRTIO_BLK_T_OUT
    const TYPE_IN: u32 = 0; // VIRTIO_BLK_T_IN
    let s = Setup::new("upgrade-fd");
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut args = vec![
        "--fd".to_string(),
        fd.to_string(),
        "--upgrade-socket".to_string(),
        s.upgrade.to_str().unwrap().into(),
    ];
    args.extend(s.device_args(&["--num-queues", "1"]));
    let mut old = Backend::spawn_with_fd(
        "vhost-user-blk",
        fd,
        &args,
        s.socket.clone(),
        s.dir.path("b0.log"),
    );
    drop(theirs);
    // A frontend without STATUS: one ring, started when kicked.
    let mut conn = Connection::from_stream(ours, 1).unwrap();
    let mut ram = GuestRam::new(4 << 20).unwrap();
    let offered = conn.frontend().get_features().unwrap();
    assert_ne!(offered & (1 << 30), 0, "PROTOCOL_FEATURES offered");
    let protocol = conn.frontend().get_protocol_features().unwrap();
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
    let request = |dq: &mut DriverQueue, kind: u32, sector: u64, fill: Option<u8>| {
        hdr.write_at(0, &kind.to_le_bytes());
        hdr.write_u64(8, sector);
        hdr.write_at(16, &[0xff]);
        match fill {
            Some(b) => data.fill(0, 4096, b),
            None => data.fill(0, 4096, 0),
        }
        let seg = Segment {
            gpa: data.gpa(),
            len: 4096,
            writable: kind == TYPE_IN,
        };
        dq.submit(&[
            Segment::readable_part(&hdr, 0, 16),
            seg,
            Segment::writable_part(&hdr, 16, 1),
        ])
        .unwrap();
        let mut used = Vec::new();
        dq.wait_used(Duration::from_secs(10), &mut used).unwrap();
        assert_eq!(hdr.read_u8(16), 0, "status of request type {kind}");
        let mut got = vec![0; 4096];
        data.read_at(0, &mut got);
        got
    };
    request(&mut dq, TYPE_OUT, 0, Some(0xa1));
    // The upgrade: the new process gets the connection (no listener: the old one served
    // this connection only).
    let (mut new, log) = s.upgrade_from(1, &["--num-queues", "1"]);
    assert!(old.wait_exit(Duration::from_secs(20)).success());
    assert_eq!(request(&mut dq, TYPE_IN, 0, None), vec![0xa1; 4096]);
    request(&mut dq, TYPE_OUT, 8, Some(0xb2));
    assert_eq!(request(&mut dq, TYPE_IN, 8, None), vec![0xb2; 4096]);
    // The new process answers messages on the same connection.
    let offered = conn.frontend().get_features().unwrap();
    assert_ne!(offered & (1 << 30), 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("a frontend is connected"), "{text}");
    // The frontend hangs up: the connection was served once, the program is done, and the
    // upgrade socket's file goes with it.
    drop(conn);
    assert!(wait_exit(&mut new, "the new backend", Duration::from_secs(10)).success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.upgrade.exists() {
        assert!(Instant::now() < deadline, "upgrade socket file left behind");
        std::thread::sleep(Duration::from_millis(5));
    }
}
