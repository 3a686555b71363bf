//! The `crash` mode: the backend is killed with SIGKILL under a verifying workload, at random
//! times and at every fault point, restarted on the same socket, and the runner reconnects the
//! way QEMU does (`-chardev socket,reconnect=1`): the same RAM and rings, each ring restarted at
//! its used index, the inflight region handed back. The backend must resubmit what its
//! predecessor had in flight; the workload proves that no write was lost, duplicated or
//! corrupted and that every request completed exactly once.
//!
//! Fault points need the backend's cooperation: where the template has `{fault}`, the runner
//! puts `--fault-point POINT@N:ACTION` there (Outboard's test-only option) for every
//! `--fault-every`-th restart, walking every point with both actions (`stop`: the runner kills
//! the stopped process; `exit`: it dies by itself); elsewhere `{fault}` is empty. A backend
//! without INFLIGHT_SHMFD cannot recover requests in flight: the runner says so and stops.
//!
//! When the backend offers GET_VRING_BASE_SKIP_DRAIN (and the template has `{fault}`), every
//! fifth fault slot is a `skip-drain` kill instead: the process is started with Outboard's
//! test-only `--io-delay-ms 20` (each storage operation waits 20 ms in the kernel), the runner
//! fills the rings, stops every ring with GET_VRING_BASE_SKIP_DRAIN, checks that nothing is
//! answered afterwards (a suspended device must not touch guest memory), and kills the process:
//! the requests it cancelled must come back from the inflight record in the next process.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outboard_frontend::migration::migration_protocol_features;
use outboard_frontend::WaitMode;
use serde_json::json;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::backend::{self, BackendProcess};
use crate::report::{spread, Progress, Report};
use crate::Cli;
use outboard_frontend::connection::PROTOCOL_F_SKIP_DRAIN;

/// The fault points of Outboard's backends (`--fault-point`).
const POINTS: [&str; 4] = [
    "after-inflight-mark",
    "after-storage-write",
    "before-used-update",
    "after-used-update",
];

/// One planned crash.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kill {
    /// SIGKILL after a random amount of work.
    Random,
    /// At a fault point: (point, pass, action).
    Fault(&'static str, u64, &'static str),
    /// Every ring stopped with GET_VRING_BASE_SKIP_DRAIN while requests wait in the kernel.
    SkipDrain,
}

/// How long a `skip-drain` process holds each storage operation back.
const SKIP_DRAIN_IO_DELAY_MS: u64 = 20;

impl Kill {
    fn arg(&self) -> String {
        match self {
            Kill::Random => String::new(),
            Kill::Fault(p, n, a) => format!("--fault-point {p}@{n}:{a}"),
            Kill::SkipDrain => format!("--io-delay-ms {SKIP_DRAIN_IO_DELAY_MS}"),
        }
    }

    /// What the backend prints when it reaches the fault point.
    fn marker(&self) -> Option<String> {
        match self {
            Kill::Random | Kill::SkipDrain => None,
            Kill::Fault(p, _, _) => Some(format!("outboard-fault: {p} reached")),
        }
    }

    fn name(&self) -> String {
        match self {
            Kill::Random => "random".into(),
            Kill::Fault(p, _, a) => format!("{p}:{a}"),
            Kill::SkipDrain => "skip-drain".into(),
        }
    }
}

struct Crasher<'a> {
    cli: &'a Cli,
    dir: &'a Path,
    template: &'a str,
    sock: std::path::PathBuf,
    started: u32,
    rng: u64,
    /// The backend offers GET_VRING_BASE_SKIP_DRAIN.
    skip_drain: bool,
}

impl Crasher<'_> {
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn spawn(&mut self, kill: &Kill) -> anyhow::Result<BackendProcess> {
        self.started += 1;
        let log = self.dir.join(format!("crash-{}.log", self.started));
        let cmd = self.template.replace("{fault}", &kill.arg());
        let cmd = backend::expand(&cmd, std::slice::from_ref(&self.sock), None);
        BackendProcess::start(
            &cmd,
            std::slice::from_ref(&self.sock),
            &log,
            Duration::from_secs(self.cli.timeout),
        )
    }

    /// What the `i`-th restart will carry.
    fn plan(&mut self, i: u32, fault_every: u32, faults: bool) -> Kill {
        if !faults || fault_every == 0 || i % fault_every != fault_every - 1 {
            return Kill::Random;
        }
        let k = (i / fault_every) as usize;
        if self.skip_drain && k % 5 == 4 {
            return Kill::SkipDrain;
        }
        let point = POINTS[k % POINTS.len()];
        let action = if (k / POINTS.len()).is_multiple_of(2) {
            "stop"
        } else {
            "exit"
        };
        let nth = 1 + self.random() % (2 * u64::from(self.cli.depth.max(1)));
        Kill::Fault(point, nth, action)
    }
}

/// Statistics of a crash run.
#[derive(Debug, Default)]
struct Stats {
    kills: BTreeMap<String, u64>,
    /// From the kill to the session running on the new process.
    reconnect: Vec<f64>,
    /// From the kill to the first completion afterwards.
    pause: Vec<f64>,
    in_flight_at_kill: u64,
    /// Requests a GET_VRING_BASE_SKIP_DRAIN left unanswered (cancelled).
    cancelled: u64,
}

fn summary(v: &mut [f64]) -> serde_json::Value {
    if v.is_empty() {
        return json!(null);
    }
    let (median, p99, max) = spread(v);
    json!({"median_ms": median, "p99_ms": p99, "max_ms": max})
}

/// Runs `count` crash/restart cycles.
pub fn run_crash(
    cli: &Cli,
    dir: &Path,
    count: u32,
    fault_every: u32,
    report: &mut Report,
) -> anyhow::Result<()> {
    let template = cli.backend.as_deref().expect("checked");
    let faults = template.contains("{fault}");
    if !faults {
        report.notes.push(
            "no `{fault}` in --backend: only random kills (fault points need Outboard's --fault-point)"
                .into(),
        );
    }
    let mut c = Crasher {
        cli,
        dir,
        template,
        sock: dir.join("crash.sock"),
        started: 0,
        rng: cli.seed | 1,
        skip_drain: false,
    };
    let timeout = Duration::from_secs(cli.timeout);
    let mut kill = c.plan(0, fault_every, faults);
    let mut proc = c.spawn(&kill)?;
    let mut w = crate::blk_workload(
        cli,
        &proc,
        migration_protocol_features()
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT
            | VhostUserProtocolFeatures::from_bits_retain(PROTOCOL_F_SKIP_DRAIN),
    )?;
    c.skip_drain = faults
        && w.driver.session().negotiated().protocol_acked.bits() & PROTOCOL_F_SKIP_DRAIN != 0;
    if !c.skip_drain {
        report.notes.push(
            "no skip-drain kills: they need `{fault}` and a backend with GET_VRING_BASE_SKIP_DRAIN"
                .into(),
        );
    }
    if !w.driver.session().has_inflight() {
        report.notes.push("the backend lacks the INFLIGHT_SHMFD protocol feature: requests in flight at a crash cannot be recovered, so crash recovery cannot be proved".into());
        bail!("the backend does not offer INFLIGHT_SHMFD");
    }
    let mut stats = Stats::default();
    let progress = Progress::new(u64::from(count));
    let short = WaitMode::Block(Duration::from_millis(2));
    let mut early_faults = 0u32;
    for i in 0..count {
        // Work, then the crash this process was started for.
        match &kill {
            Kill::Random => {
                let ops = c.random() % (cli.ops_per_hop.max(1) + 1);
                w.run(ops, timeout)?;
                w.fill()?;
                let spin = c.random() % 300;
                std::thread::sleep(Duration::from_micros(spin));
                proc.kill();
            }
            Kill::Fault(point, _, _) => {
                let marker = kill.marker().expect("a fault point");
                let deadline = Instant::now() + timeout;
                loop {
                    w.fill()?;
                    w.reap(short)?;
                    if proc.log_contains(&marker) {
                        break;
                    }
                    if !proc.is_alive() {
                        bail!(
                            "the backend exited before reaching {point}:\n{}",
                            proc.log_tail(10)
                        );
                    }
                    if Instant::now() > deadline {
                        bail!("the backend did not reach {point} within {timeout:?}");
                    }
                }
                // `exit` ends the process itself; `stop` leaves it for the kill.
                proc.kill();
            }
            Kill::SkipDrain => {
                stats.cancelled += skip_drain(&mut w, i)?;
                proc.kill();
            }
        }
        let killed = Instant::now();
        let last = kill.name();
        stats.in_flight_at_kill += w.in_flight() as u64;
        *stats.kills.entry(kill.name()).or_default() += 1;
        if let Some(v) = w.violations.first() {
            bail!("before crash {}: {v}", i + 1);
        }
        // Restart on the same socket, with the next crash planned, and reconnect.
        kill = c.plan(i + 1, fault_every, faults);
        proc = c.spawn(&kill)?;
        w.driver
            .session()
            .reconnect()
            .with_context(|| format!("reconnecting after crash {}", i + 1))?;
        stats.reconnect.push(killed.elapsed().as_secs_f64() * 1e3);
        if w.in_flight() > 0 {
            // Every queue is looked at (a process started to stop at a fault point may hold
            // one queue's completions); the pause ends with the first completion on any. A
            // process started with a fault point may reach it before it completes anything
            // (resubmitted requests still in the storage engine, a new one taken from the
            // ring): then there is no pause to measure, and the next round kills it.
            let before = w.counts.completed;
            let deadline = Instant::now() + timeout;
            let marker = kill.marker();
            while w.counts.completed == before {
                w.reap(short)?;
                // Liveness first: a process that printed its marker and exited is not a death.
                let alive = proc.is_alive();
                if marker.as_ref().is_some_and(|m| proc.log_contains(m)) {
                    early_faults += 1;
                    break;
                }
                if !alive {
                    bail!(
                        "after crash {}: the backend died before completing anything:\n{}",
                        i + 1,
                        proc.log_tail(10)
                    );
                }
                if Instant::now() > deadline {
                    bail!(
                        "after crash {}: none of the {} requests in flight completed within {timeout:?}",
                        i + 1,
                        w.in_flight()
                    );
                }
            }
            let pause = killed.elapsed().as_secs_f64() * 1e3;
            if pause > 1000.0 {
                report.notes.push(format!(
                    "crash {} ({}): the first completion took {pause:.0} ms",
                    i + 1,
                    last
                ));
            }
            stats.pause.push(pause);
        }
        progress.update(u64::from(i) + 1);
    }
    progress.finish();
    w.run(cli.ops_per_hop, timeout)?;
    crate::settle(&mut w, timeout, report)?;
    report.notes.push(format!(
        "crash: {count} kills ({}), {} requests in flight at the kills ({} of them left unanswered by GET_VRING_BASE_SKIP_DRAIN: cancelled, or not yet taken), all recovered; {early_faults} restarted processes reached their fault point before completing anything; reconnect {} / first completion {}",
        stats
            .kills
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect::<Vec<_>>()
            .join(", "),
        stats.in_flight_at_kill,
        stats.cancelled,
        summary(&mut stats.reconnect),
        summary(&mut stats.pause),
    ));
    report.extra.insert(
        "crash".into(),
        json!({
            "kills": stats.kills,
            "in_flight_at_kills": stats.in_flight_at_kill,
            "faults_before_first_completion": early_faults,
            "unanswered_after_skip_drain": stats.cancelled,
            "reconnect": summary(&mut stats.reconnect),
            "pause": summary(&mut stats.pause),
        }),
    );
    Ok(())
}

/// Fills the rings, stops every ring with GET_VRING_BASE_SKIP_DRAIN while the requests wait in
/// the kernel, takes what was answered before the stop, and checks that nothing is answered
/// after it. Returns how many requests were left unanswered (cancelled, for the next process).
fn skip_drain(w: &mut crate::workload::Workload, i: u32) -> anyhow::Result<u64> {
    w.fill()?;
    // Long enough for the backend to take them into the kernel, short of the delay.
    std::thread::sleep(Duration::from_millis(SKIP_DRAIN_IO_DELAY_MS / 4));
    for q in 0..w.driver.num_queues() as u16 {
        w.driver.session().suspend_queue(q).with_context(|| {
            format!(
                "GET_VRING_BASE_SKIP_DRAIN of queue {q} before crash {}",
                i + 1
            )
        })?;
    }
    // Answers published before the stop.
    while w.reap(WaitMode::Block(Duration::from_millis(1)))? > 0 {}
    let left = w.in_flight();
    // A suspended device writes no guest memory: nothing may be answered now, even after the
    // storage delay has run out.
    std::thread::sleep(Duration::from_millis(3 * SKIP_DRAIN_IO_DELAY_MS));
    let late = w.reap(WaitMode::Block(Duration::from_millis(1)))?;
    if late > 0 {
        bail!(
            "before crash {}: {late} requests were answered after every ring was stopped with GET_VRING_BASE_SKIP_DRAIN",
            i + 1
        );
    }
    Ok(left as u64)
}
