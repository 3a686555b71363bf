//! Real QEMU crash recovery and live upgrade of `vhost-user-blk`: a QEMU 7.2 guest (TCG) on
//! `-chardev socket,...,reconnect=1` runs `fio --verify` while this test kills the backend with
//! SIGKILL five times and restarts it on the same socket path, then live-upgrades it once
//! (`--upgrade-from`). QEMU reconnects by itself; the guest must see at most a pause: fio
//! reports no error and its verify passes, data written before the crashes reads back, the
//! kernel log is clean (`tests/guest/run-crash-blk.sh`, `tests/guest/crash-blk-guest.sh`).
//!
//! The kills: three at random moments, and two at fault points of the armed process
//! (`--fault-point`), so that at least one kill finds a request whose data is written but not
//! answered (`after-storage-write`: the restarted backend must resubmit it) and one finds a
//! used entry published but not yet recorded in the inflight region (`after-used-update`: the
//! restarted backend must repair the record, not answer twice).
//!
//! What QEMU 7.2 does: on the disconnect it stops the device (GET_VRING_BASE fails, so it
//! takes the used index as the next available one), keeps the inflight region it got with
//! GET_INFLIGHT_FD, and when the socket accepts again (it retries once a second) replays the
//! setup with SET_INFLIGHT_FD before the rings; the backend continues from the region.
//!
//! The pause per restart is measured twice: by the host (from the kill to the restarted
//! backend's queue workers starting) and by the guest (fio's slowest request in the 100 ms
//! windows around the kill, `write_lat_log` with `log_max_value`).
//!
//! `OUTBOARD_CRASH_SEED` repeats a run's random choices; `OUTBOARD_CRASH_KEEP=1` keeps the
//! backend logs and the guest's files.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{binary, TempDir};

const QUEUES: u16 = 2;
/// Seconds fio runs in the guest; every event must fall inside.
const FIO_RUNTIME: u64 = 60;
/// The script bounds QEMU (`timeout`); this bounds the whole test on top.
const RUN_LIMIT: Duration = Duration::from_secs(230);
/// The guest boots and starts fio within this (a loaded 2-core machine boots in ~35 s).
const FIO_START_LIMIT: Duration = Duration::from_secs(90);
/// A restarted backend gets its device running within this (QEMU retries once a second).
const RECONNECT_LIMIT: Duration = Duration::from_secs(20);
/// A log line appears within this after the event that causes it.
const LOG_LIMIT: Duration = Duration::from_secs(20);
/// A measured pause longer than this is a failure, not a pause.
const PAUSE_LIMIT: Duration = Duration::from_secs(10);

/// What ends a backend generation.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    /// SIGKILL at a random moment.
    Kill,
    /// SIGKILL once the process stopped at its armed fault point.
    KillAtFault(&'static str),
    /// `--upgrade-from`: a new process takes the device over.
    Upgrade,
}

const EVENTS: [Event; 6] = [
    Event::Kill,
    Event::KillAtFault("after-storage-write"),
    Event::Kill,
    Event::KillAtFault("after-used-update"),
    Event::Kill,
    Event::Upgrade,
];

/// A small xorshift generator: the test's random moments, repeatable by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn assets_ready() -> Result<(), String> {
    let dir = std::env::var("OUTBOARD_GUEST_DIR").unwrap_or("/var/cache/outboard-guest".into());
    if !Path::new(&dir).join("env.sh").exists() {
        return Err(format!(
            "no guest assets in {dir}: run tests/guest/setup.sh (as root) first"
        ));
    }
    Ok(())
}

/// One backend process.
struct Generation {
    child: Child,
    log: PathBuf,
}

impl Generation {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    dir: TempDir,
    disk: PathBuf,
    socket: PathBuf,
    upgrade: PathBuf,
    out: PathBuf,
    /// `OUTBOARD_CRASH_KEEP=1`: leave the backend logs and the guest's files for a look.
    keep: bool,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if self.keep {
            // An empty path makes the directory's own drop remove nothing.
            let kept = std::mem::take(&mut self.dir.0);
            eprintln!("qemu_crash: logs kept in {}", kept.display());
        }
    }
}

impl Setup {
    /// Starts generation `n`: on the socket path (`--upgrade-socket` too, so any generation can
    /// be upgraded), or taking over from the running one with `--upgrade-from`. Debug logging:
    /// every vhost-user message is in the log.
    fn spawn(&self, n: usize, upgrade_from: bool, fault: Option<String>) -> Generation {
        let log = self.dir.path(&format!("backend-{n}.log"));
        let mut cmd = Command::new(binary("vhost-user-blk"));
        if upgrade_from {
            cmd.arg("--upgrade-from").arg(&self.upgrade);
        } else {
            cmd.arg("--socket-path").arg(&self.socket);
            cmd.arg("--upgrade-socket").arg(&self.upgrade);
        }
        cmd.arg("--blk-file")
            .arg(&self.disk)
            .args(["--num-queues", &QUEUES.to_string()]);
        if let Some(spec) = fault {
            cmd.args(["--fault-point", &spec]);
        }
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start vhost-user-blk");
        Generation { child, log }
    }

    fn results(&self) -> String {
        std::fs::read_to_string(self.out.join("results.log")).unwrap_or_default()
    }

    fn qemu_log(&self) -> String {
        std::fs::read_to_string(self.out.join("qemu.log")).unwrap_or_default()
    }
}

/// Waits until `gen`'s log contains `needle`; returns when it was seen. Panics (with the log)
/// if the process exits first or `limit` passes.
fn wait_log(gen: &mut Generation, needle: &str, limit: Duration, what: &str) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        if gen.log_text().contains(needle) {
            return Instant::now();
        }
        if let Some(s) = gen.child.try_wait().unwrap() {
            panic!("{what}: the backend exited with {s}:\n{}", gen.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no {needle:?} within {limit:?}:\n{}",
            gen.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The line QEMU 7.2 prints when the backend's socket closes under it.
const QEMU_DISCONNECT: &str = "Unexpected end-of-file before all data were read";
/// The debug line of a queue worker starting: the device runs.
const WORKER_STARTED: &str = "runs under the worker filter";

/// The facts of one event, for the checks and the report.
struct Restart {
    event: Event,
    /// Since the host saw the guest start fio.
    at: Duration,
    /// Host side: from the kill (or the upgrade's start) to the new process's workers running.
    backend_pause: Duration,
    /// After a kill: whether the dead process's socket file was still there when the new one
    /// started (its reaper had not run yet).
    stale_socket: Option<bool>,
    /// The next generation's log, once it ran.
    log: String,
}

#[test]
fn qemu_guest_fio_verify_survives_sigkill_restarts_and_a_live_upgrade() {
    if let Err(reason) = assets_ready() {
        eprintln!("SKIP qemu crash test: {reason}");
        return;
    }
    let seed = std::env::var("OUTBOARD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("OUTBOARD_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    let dir = TempDir::new("qemu-crash");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let setup = Setup {
        socket: dir.path("vhost.sock"),
        upgrade: dir.path("upgrade.sock"),
        out: dir.path("guest"),
        keep: std::env::var_os("OUTBOARD_CRASH_KEEP").is_some_and(|v| v == "1"),
        disk,
        dir,
    };
    let started = Instant::now();
    let fault_spec =
        |point: &str, rng: &mut Rng| format!("{point}@{}:stop", rng.between(500, 3000));
    let arm_for = |event: Event, rng: &mut Rng| match event {
        Event::KillAtFault(point) => Some(fault_spec(point, rng)),
        _ => None,
    };
    let mut gen = setup.spawn(0, false, arm_for(EVENTS[0], &mut rng));
    wait_log(&mut gen, "listening on", LOG_LIMIT, "first backend");

    let mut run = Script::start(&setup);
    let fail = |run: &mut Script, msg: String| stop_and_fail(run, msg, &setup);

    // The guest runs fio.
    let fio_start = loop {
        if setup.results().contains("PHASE fio_running") {
            break Instant::now();
        }
        if run.child.try_wait().unwrap().is_some() || started.elapsed() > FIO_START_LIMIT {
            fail(
                &mut run,
                format!("the guest did not start fio within {FIO_START_LIMIT:?}"),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "guest runs fio after {:.1?}; events: {EVENTS:?}",
        started.elapsed()
    );

    let mut restarts: Vec<Restart> = Vec::new();
    for (i, &event) in EVENTS.iter().enumerate() {
        // The next generation is armed for the event after this one.
        let next_fault = EVENTS.get(i + 1).and_then(|&e| arm_for(e, &mut rng));
        let t_event = match event {
            Event::Kill => {
                std::thread::sleep(Duration::from_millis(rng.between(3000, 6000)));
                Instant::now()
            }
            Event::KillAtFault(point) => wait_log(
                &mut gen,
                &format!("outboard-fault: {point} reached"),
                Duration::from_secs(40),
                "armed backend",
            ),
            Event::Upgrade => {
                std::thread::sleep(Duration::from_millis(rng.between(3000, 6000)));
                Instant::now()
            }
        };
        if setup.results().contains("PHASE fio_done") {
            fail(
                &mut run,
                format!(
                    "fio ended before event {i} ({event:?}): raise FIO_RUNTIME ({FIO_RUNTIME} s)"
                ),
            );
        }
        // The socket file is still the running backend's: no reaper of an earlier, killed
        // generation removed it after the restart.
        if !setup.socket.exists() {
            fail(
                &mut run,
                format!(
                    "before event {i}: the socket file is gone\n{}",
                    gen.log_text()
                ),
            );
        }
        let at = t_event - fio_start;
        let mut stale_socket = None;
        let mut next = match event {
            Event::Kill | Event::KillAtFault(_) => {
                // Every other kill holds the dead process's socket reapers back until the new
                // process has bound the same paths: the new process must replace the stale
                // file, and the old reaper, let go afterwards, must leave the new file alone
                // (it removes only the file its process bound). The other kills leave the
                // reapers to race the restart as they would.
                let held = if i % 2 == 0 {
                    reapers(&gen.log_text())
                } else {
                    Vec::new()
                };
                for &pid in &held {
                    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
                }
                nix::sys::signal::kill(gen.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
                let status = gen
                    .wait_exit(Duration::from_secs(10))
                    .expect("SIGKILL ends it");
                assert_eq!(
                    std::os::unix::process::ExitStatusExt::signal(&status),
                    Some(libc::SIGKILL),
                    "{status}"
                );
                // Restart at once on the same path.
                stale_socket = Some(setup.socket.exists());
                let mut next = setup.spawn(i + 1, false, next_fault);
                wait_log(&mut next, "listening on", LOG_LIMIT, "restarted backend");
                if !held.is_empty() {
                    assert_eq!(stale_socket, Some(true), "the held reaper removed the file");
                    for &pid in &held {
                        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
                    }
                    for &pid in &held {
                        wait_gone(pid, Duration::from_secs(10));
                    }
                    assert!(
                        setup.socket.exists() && setup.upgrade.exists(),
                        "the killed process's reapers removed the new process's socket files"
                    );
                }
                next
            }
            Event::Upgrade => {
                let mut next = setup.spawn(i + 1, true, next_fault);
                wait_log(
                    &mut next,
                    "upgrade: the device runs in this process",
                    LOG_LIMIT,
                    "upgrading backend",
                );
                let status = gen.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| {
                    panic!(
                        "the old backend did not exit after the upgrade:\n{}",
                        gen.log_text()
                    )
                });
                assert!(
                    status.success(),
                    "old backend after the upgrade: {status}\n{}",
                    gen.log_text()
                );
                next
            }
        };
        let running = wait_log(&mut next, WORKER_STARTED, RECONNECT_LIMIT, "new generation");
        let backend_pause = running - t_event;
        println!(
            "[{:>5.1}s] event {i} {event:?} at fio+{:.1}s: device running again after {} ms",
            started.elapsed().as_secs_f64(),
            at.as_secs_f64(),
            backend_pause.as_millis()
        );
        restarts.push(Restart {
            event,
            at,
            backend_pause,
            stale_socket,
            log: next.log_text(),
        });
        gen = next;
    }
    let events_done = fio_start.elapsed();
    if setup.results().contains("PHASE fio_done") {
        fail(
            &mut run,
            format!("fio ended during the last event: raise FIO_RUNTIME ({FIO_RUNTIME} s)"),
        );
    }

    // The guest finishes on the last generation.
    let deadline = started + RUN_LIMIT;
    let status = loop {
        if let Some(s) = run.child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            fail(
                &mut run,
                format!("the guest did not finish within {RUN_LIMIT:?}"),
            );
        }
        if let Some(s) = gen.child.try_wait().unwrap() {
            fail(
                &mut run,
                format!("the last backend died with {s}:\n{}", gen.log_text()),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (stdout, stderr) = run.output();
    let elapsed = started.elapsed();
    println!("{stdout}");
    assert!(
        status.success() && stdout.contains("run-crash-blk: PASS"),
        "the guest run failed ({status}) after {elapsed:?}:\n{stdout}\n{stderr}\n--- last backend ---\n{}",
        gen.log_text()
    );

    // Every kill was a disconnect QEMU saw; the upgrade was not.
    let kills = EVENTS.iter().filter(|e| **e != Event::Upgrade).count();
    let qemu = setup.qemu_log();
    assert_eq!(
        qemu.matches(QEMU_DISCONNECT).count(),
        kills,
        "QEMU saw a disconnect per kill and none for the upgrade:\n{qemu}"
    );
    for (i, r) in restarts.iter().enumerate() {
        match r.event {
            Event::Kill | Event::KillAtFault(_) => {
                // QEMU came back by itself and handed over the inflight region before the rings.
                let inflight = r.log.find("request Some(SET_INFLIGHT_FD)");
                let kick = r.log.find("request Some(SET_VRING_KICK)");
                assert!(
                    r.log.contains("frontend connected")
                        && inflight.is_some()
                        && inflight < kick,
                    "restart {i}: QEMU did not reconnect with SET_INFLIGHT_FD before the rings:\n{}",
                    r.log
                );
            }
            Event::Upgrade => assert!(
                !r.log.contains("frontend connected") && !r.log.contains("SET_INFLIGHT_FD"),
                "the upgraded backend saw a new connection:\n{}",
                r.log
            ),
        }
        if r.event == Event::KillAtFault("after-storage-write") {
            // The request whose data was written, unanswered at the kill, was resubmitted.
            assert!(
                r.log.contains("chain(s) an earlier process left in flight"),
                "restart {i} after {:?}: nothing resubmitted:\n{}",
                r.event,
                r.log
            );
        }
    }
    let resubmitted = restarts
        .iter()
        .filter(|r| r.log.contains("an earlier process left in flight"))
        .count();

    // The guest's view of each pause: its slowest request around each event, against the
    // run's usual slowest request per 100 ms window (a loaded TCG guest has slow moments of
    // its own).
    let windows = latmax(&setup.results());
    let mut usual: Vec<Duration> = windows.iter().map(|(_, lat)| *lat).collect();
    usual.sort();
    let mut guest_pauses = Vec::new();
    for (i, r) in restarts.iter().enumerate() {
        // fio's clock and the host's differ by a few hundred milliseconds (fio starts after the
        // host sees PHASE fio_running, and a window is logged by its start): look from a second
        // before the event to two seconds after it (a second before the next at the latest).
        let from = r.at.saturating_sub(Duration::from_secs(1));
        let to = restarts
            .get(i + 1)
            .map_or(r.at + Duration::from_secs(2), |n| {
                n.at.saturating_sub(Duration::from_secs(1))
                    .min(r.at + Duration::from_secs(2))
            });
        let slowest = windows
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .max_by_key(|(_, lat)| *lat)
            .copied()
            .unwrap_or_default();
        guest_pauses.push(slowest);
    }
    println!(
        "{:<44} {:>13} {:>15} {:>30}",
        "event (time since fio started)",
        "backend pause",
        "after connect",
        "guest's slowest request"
    );
    for (r, (t, lat)) in restarts.iter().zip(&guest_pauses) {
        println!(
            "{:<44} {:>10} ms {:>12} {:>11} ms at fio+{:.1}s",
            format!("{:?} at +{:.1}s", r.event, r.at.as_secs_f64()),
            r.backend_pause.as_millis(),
            setup_after_connect(&r.log).map_or("-".into(), |ms| format!("{ms} ms")),
            lat.as_millis(),
            t.as_secs_f64()
        );
    }
    println!(
        "(backend pause: host time from the kill, or the upgrade's start, to the new process's \
         workers running; after connect: its part after QEMU connected, from its log)"
    );
    let slow: Vec<String> = windows
        .iter()
        .filter(|(_, lat)| *lat > Duration::from_millis(300))
        .map(|(t, lat)| format!("+{:.1}s {} ms", t.as_secs_f64(), lat.as_millis()))
        .collect();
    println!("guest windows slower than 300 ms: {}", slow.join(", "));
    println!(
        "guest's slowest request per 100 ms window over the run ({} windows above 20 ms): median {} ms, 99th percentile {} ms",
        usual.len(),
        percentile(&usual, 50).as_millis(),
        percentile(&usual, 99).as_millis()
    );
    let ms = |v: Vec<Duration>| {
        format!(
            "median {} ms, max {} ms",
            percentile(&v, 50).as_millis(),
            v.iter().max().unwrap().as_millis()
        )
    };
    let kills_only = |f: &dyn Fn(usize) -> Duration| -> Vec<Duration> {
        (0..restarts.len())
            .filter(|&i| restarts[i].event != Event::Upgrade)
            .map(f)
            .collect()
    };
    println!(
        "SIGKILL restarts: backend pause {} (after QEMU connected: {}); guest's slowest request {}",
        ms(kills_only(&|i| restarts[i].backend_pause)),
        ms(kills_only(&|i| {
            Duration::from_millis(setup_after_connect(&restarts[i].log).unwrap_or(0))
        })),
        ms(kills_only(&|i| guest_pauses[i].1))
    );
    let stale = restarts
        .iter()
        .filter(|r| r.stale_socket == Some(true))
        .count();
    println!(
        "the killed process's socket file was still there at {stale} of {kills} restarts (at \
         every other one its reapers were held back until the new process had bound the path)"
    );
    println!(
        "{kills} kills ({resubmitted} restart(s) resubmitted requests), 1 live upgrade, all within fio+{:.1}s; whole test {:.1}s",
        events_done.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    for (r, (_, g)) in restarts.iter().zip(&guest_pauses) {
        assert!(
            r.backend_pause < PAUSE_LIMIT && *g < PAUSE_LIMIT,
            "{:?}: pause {:?} / {g:?} is longer than {PAUSE_LIMIT:?}",
            r.event,
            r.backend_pause
        );
    }

    // The last generation ends cleanly.
    nix::sys::signal::kill(gen.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = gen
        .wait_exit(Duration::from_secs(10))
        .expect("the last backend ignored SIGTERM");
    assert!(status.success(), "{status}\n{}", gen.log_text());
    // The socket files go with it, although the process that bound them was killed long ago:
    // each restart bound its own, and the upgrade handed them on.
    let deadline = Instant::now() + Duration::from_secs(5);
    while setup.socket.exists() || setup.upgrade.exists() {
        assert!(
            Instant::now() < deadline,
            "socket files left behind after the last backend exited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The guest run (`run-crash-blk.sh`), stopped with SIGTERM (it takes QEMU along) if the test
/// ends before it does, so a failing test leaves no guest behind.
struct Script {
    child: Child,
    output: Option<(JoinHandle<String>, JoinHandle<String>)>,
}

impl Script {
    fn start(setup: &Setup) -> Script {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guest/run-crash-blk.sh");
        let mut child = Command::new("bash")
            .arg(script)
            .arg(&setup.socket)
            .arg(QUEUES.to_string())
            .env("OUTBOARD_GUEST_OUT", &setup.out)
            .env("OUTBOARD_CRASH_FIO_RUNTIME", FIO_RUNTIME.to_string())
            .env("OUTBOARD_GUEST_TIMEOUT", "210")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the crash script");
        // Both pipes drained on threads, so a chatty script never blocks.
        let drain = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = pipe.read_to_string(&mut s);
                s
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        Script {
            child,
            output: Some((out, err)),
        }
    }

    fn stop(&mut self) {
        if self.child.try_wait().unwrap().is_some() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The script's stdout and stderr, once it has ended.
    fn output(&mut self) -> (String, String) {
        match self.output.take() {
            Some((out, err)) => (out.join().unwrap(), err.join().unwrap()),
            None => Default::default(),
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops the script and fails with `msg`, what the script printed and the guest's results.
fn stop_and_fail(run: &mut Script, msg: String, setup: &Setup) -> ! {
    run.stop();
    let (stdout, stderr) = run.output();
    panic!(
        "{msg}\n--- script ---\n{stdout}\n{stderr}\n--- results ---\n{}",
        setup.results()
    );
}

/// The guest's `LATMAX <job> <ms> <dir> <ns>` lines: (time since fio started, slowest request
/// of that 100 ms window).
fn latmax(results: &str) -> Vec<(Duration, Duration)> {
    results
        .lines()
        .filter_map(|l| l.strip_prefix("LATMAX "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ms: u64 = f.get(1)?.parse().ok()?;
            let ns: u64 = f.get(3)?.parse().ok()?;
            Some((Duration::from_millis(ms), Duration::from_nanos(ns)))
        })
        .collect()
}

/// The socket reapers a backend's debug log names (`sandbox: process N will remove PATH at
/// exit`).
fn reapers(log: &str) -> Vec<nix::unistd::Pid> {
    let pids: Vec<nix::unistd::Pid> = log
        .lines()
        .filter_map(|l| {
            l.split_once("sandbox: process ")?
                .1
                .split_once(" will remove ")
        })
        .filter_map(|(pid, _)| pid.parse().ok())
        .map(nix::unistd::Pid::from_raw)
        .collect();
    assert_eq!(pids.len(), 2, "a reaper per socket file in:\n{log}");
    pids
}

/// Waits until `pid` has exited (gone, or a zombie of another parent).
fn wait_gone(pid: nix::unistd::Pid, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().chars().next())
            })
            .flatten();
        if matches!(state, None | Some('Z') | Some('X')) {
            return;
        }
        assert!(Instant::now() < deadline, "reaper {pid} did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// From a restarted backend's log: milliseconds from QEMU connecting to the first queue
/// worker running (log timestamps have millisecond precision).
fn setup_after_connect(log: &str) -> Option<u64> {
    let time_of = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .and_then(log_time_ms)
    };
    time_of(WORKER_STARTED)?.checked_sub(time_of("frontend connected")?)
}

/// The time of day of a log line `[2026-11-22T03:18:05.713Z ...`, in milliseconds.
fn log_time_ms(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once('T')?;
    let hms = rest.get(..12)?; // 03:18:05.713
    let (h, rest) = hms.split_once(':')?;
    let (m, rest) = rest.split_once(':')?;
    let (sec, ms) = rest.split_once('.')?;
    let v = |x: &str| x.parse::<u64>().ok();
    Some(((v(h)? * 60 + v(m)?) * 60 + v(sec)?) * 1000 + v(ms)?)
}

/// The `p`-th percentile of `v` (nearest rank); zero for an empty `v`.
fn percentile(v: &[Duration], p: usize) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n => v[((n * p).div_ceil(100)).clamp(1, n) - 1],
    }
}
