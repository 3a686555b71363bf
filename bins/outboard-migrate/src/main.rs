//! `outboard-migrate`: a live-migration test runner for vhost-user-blk and vhost-user-net
//! backends.
//!
//! For net (`--device net`, or a backend whose `--print-capabilities` says `"type":"net"`) it
//! drives two ports of one backend process (`{sock0}`, `{sock1}` in the template) with numbered
//! frames both ways and migrates the whole backend; see `net.rs` for what it proves. What
//! follows describes the blk mode.
//!
//! It plays the VMM (Outboard's userspace frontend, guest RAM in a memfd shared with every
//! backend), starts a backend from a command template (`{sock}` is replaced by the socket path
//! it chooses), runs a verifying workload, and migrates the device from one backend process to
//! a freshly started one while requests are in flight. At every stop it checks that the source
//! completed each request it had taken before GET_VRING_BASE replied, and that the dirty log
//! marks every page the device wrote (read buffers, status bytes, used ring); at the end a full
//! read-back against its model proves that no write was lost, duplicated or reordered.
//!
//! Modes:
//! - `migrate --count N`: N migrations under load (`--dest-backend` for a different
//!   destination; `--expect refused` to prove a destination refuses);
//! - `matrix`: every pair of compat versions (`{compat}` in the template): save with A, load
//!   with B; an older backend must refuse newer state, with the source still serving, and a
//!   migration that succeeds is followed by a second one;
//! - `refusals`: corrupted, foreign and truncated state, and destinations configured
//!   differently (`--mismatched-dest`), each refused with the source still serving.
//!
//! Works on any vhost-user-blk backend and says what a peer lacks: without DEVICE_STATE no state
//! moves (qemu-storage-daemon keeps its state in its block layer), without LOG_SHMFD the dirty
//! log is not checked. Exit status 0 for a pass, 1 for a failure, 2 for a usage error.

mod backend;
mod crash;
mod hop;
mod net;
mod report;
mod upgrade;
mod workload;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outboard_frontend::migration::migration_protocol_features;
use outboard_frontend::{BlkDriver, BlkOptions, SessionBuilder, WaitMode};
use serde_json::json;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use backend::BackendProcess;
use hop::{Hop, Outcome, Tamper, Tracker};
use report::{Case, Progress, Report};
use workload::Workload;

/// Live-migration test runner for vhost-user-blk and vhost-user-net backends.
#[derive(Parser, Debug)]
#[command(name = "outboard-migrate", version, about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,

    /// The command that starts a backend; `{sock}` is replaced by the socket path (and
    /// `{compat}` by a compat version in `matrix`), e.g.
    /// 'vhost-user-blk --socket-path {sock} --blk-file /tmp/d.img'.
    #[arg(long, global = true, value_name = "CMD")]
    backend: Option<String>,

    /// The command for destinations (default: --backend).
    #[arg(long, global = true, value_name = "CMD")]
    dest_backend: Option<String>,

    /// The device type (default: the `type` the backend prints with --print-capabilities;
    /// blk if it prints none). Net drives two ports: `{sock0}` and `{sock1}` in the template.
    #[arg(long, global = true, value_enum)]
    device: Option<DeviceKind>,

    /// Request queues to drive.
    #[arg(long, global = true, default_value_t = 1)]
    queues: u16,

    /// Requests kept in flight per queue.
    #[arg(long, global = true, default_value_t = 16)]
    depth: u16,

    /// 4 KiB blocks of the disk to use (from its start).
    #[arg(long, global = true, default_value_t = 512)]
    blocks: u64,

    /// Requests completed (net: frames exchanged each way) between two migrations.
    #[arg(long, global = true, default_value_t = 64)]
    ops_per_hop: u64,

    /// Write a JSON report here.
    #[arg(long, global = true, value_name = "PATH")]
    json: Option<PathBuf>,

    /// Where sockets and backend logs go (default: a new directory under the temp dir, removed
    /// after a passing run).
    #[arg(long, global = true, value_name = "DIR")]
    workdir: Option<PathBuf>,

    /// Seed of the workload's choices.
    #[arg(long, global = true, default_value_t = 1)]
    seed: u64,

    /// How long to wait for a backend or a request, in seconds.
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Migrate the device COUNT times under load.
    Migrate {
        /// Number of migrations.
        #[arg(long, default_value_t = 10)]
        count: u32,
        /// What the destination must do: migrate, or refuse (one attempt, then the source must
        /// keep serving).
        #[arg(long, value_enum, default_value_t = Expect::Migrated)]
        expect: Expect,
    },
    /// Every pair of compat versions: `{compat}` in --backend is the version.
    Matrix {
        /// The versions (default: the `outboard.compat-versions` the backend prints with
        /// --print-capabilities).
        #[arg(long, value_delimiter = ',')]
        versions: Vec<u16>,
    },
    /// Kill the backend with SIGKILL COUNT times under load (at random times, and at every
    /// fault point where the template has `{fault}`), restart it on the same socket and
    /// reconnect: nothing in flight may be lost.
    Crash {
        /// Number of kills.
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// Every N-th restart carries a fault point (0: never).
        #[arg(long, default_value_t = 4)]
        fault_every: u32,
    },
    /// Replace the backend COUNT times under load through its live upgrade (`{upgrade}` in
    /// --backend and --dest-backend is the upgrade socket): no disconnect, nothing lost.
    Upgrade {
        /// Number of upgrades.
        #[arg(long, default_value_t = 100)]
        count: u32,
    },
    /// Tampered states and mismatched destinations must be refused.
    Refusals {
        /// A destination command configured differently from the source (repeatable).
        #[arg(long, value_name = "CMD")]
        mismatched_dest: Vec<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceKind {
    Blk,
    Net,
}

/// The device type: `--device`, else what the backend says it is.
fn device_kind(cli: &Cli, template: &str) -> DeviceKind {
    cli.device.unwrap_or_else(|| {
        match backend::probe_capabilities(template)
            .as_ref()
            .and_then(|c| c["type"].as_str())
        {
            Some("net") => DeviceKind::Net,
            _ => DeviceKind::Blk,
        }
    })
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Migrated,
    Refused,
}

/// One device under test: its backend process, the driver's workload and the dirty log.
struct Runner<'a> {
    cli: &'a Cli,
    dir: &'a Path,
    seq: &'a mut u32,
    source: BackendProcess,
    w: Workload,
    tracker: Option<Tracker>,
    hops: Vec<Hop>,
}

impl<'a> Runner<'a> {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.cli.timeout)
    }

    fn spawn(
        cli: &Cli,
        dir: &Path,
        seq: &mut u32,
        template: &str,
        compat: Option<u16>,
    ) -> anyhow::Result<BackendProcess> {
        *seq += 1;
        let sock = dir.join(format!("backend-{seq}.sock"));
        let log = dir.join(format!("backend-{seq}.log"));
        let socks = [sock];
        let cmd = backend::expand(template, &socks, compat);
        BackendProcess::start(&cmd, &socks, &log, Duration::from_secs(cli.timeout))
    }

    /// Starts the source and the workload on it.
    fn start(
        cli: &'a Cli,
        dir: &'a Path,
        seq: &'a mut u32,
        template: &str,
        compat: Option<u16>,
        report: &mut Report,
    ) -> anyhow::Result<Self> {
        let source = Self::spawn(cli, dir, seq, template, compat)?;
        let mut w = blk_workload(cli, &source, migration_protocol_features())?;
        describe_peer(&mut w, template, report);
        let tracker = Tracker::start(&mut w)?;
        Ok(Runner {
            cli,
            dir,
            seq,
            source,
            w,
            tracker,
            hops: Vec::new(),
        })
    }

    fn run(&mut self, ops: u64) -> anyhow::Result<()> {
        let t = self.timeout();
        self.w.run(ops, t)
    }

    /// Migrates to a new backend started from `template`. On success the old source stops;
    /// on a refusal the destination stops and the source is checked to be serving.
    fn hop(
        &mut self,
        template: &str,
        compat: Option<u16>,
        tamper: Option<Tamper>,
    ) -> anyhow::Result<(Hop, Option<String>, Option<u64>)> {
        let mut dest = Self::spawn(self.cli, self.dir, self.seq, template, compat)?;
        let hop = hop::migrate(&mut self.w, self.tracker.as_mut(), &dest.sock, tamper)?;
        self.hops.push(hop.clone());
        match &hop.outcome {
            Outcome::Migrated => {
                std::mem::swap(&mut self.source, &mut dest);
                dest.stop();
                if let Some(t) = self.tracker.as_mut() {
                    t.follow(&mut self.w);
                }
                Ok((hop, None, None))
            }
            Outcome::Refused(_) => {
                let said = dest.last_error();
                dest.stop();
                if !self.source.is_alive() {
                    anyhow::bail!("the source backend exited after the refused migration");
                }
                let before = self.w.counts.completed;
                let violations = self.w.violations.len();
                self.run(self.cli.ops_per_hop.max(16))?;
                let verified = if self.w.violations.len() == violations {
                    self.w.counts.completed - before
                } else {
                    0
                };
                Ok((hop, said, Some(verified)))
            }
        }
    }

    /// Drains, reads everything back, and adds the findings to `report`.
    fn finish(mut self, report: &mut Report) -> anyhow::Result<()> {
        report.hops.append(&mut self.hops);
        let timeout = self.timeout();
        settle(&mut self.w, timeout, report)
    }
}

/// Connects the verifying blk workload to `backend`, asking for `protocol`.
fn blk_workload(
    cli: &Cli,
    backend: &BackendProcess,
    protocol: VhostUserProtocolFeatures,
) -> anyhow::Result<Workload> {
    let timeout = Duration::from_secs(cli.timeout);
    let builder = SessionBuilder::new(&backend.sock)
        .queues(cli.queues)
        .ram_size(ram_size(cli))
        .protocol_features(protocol)
        .io_timeout(Some(timeout));
    let opts = BlkOptions {
        slots: cli.depth,
        slot_data_size: workload::BLOCK,
        wait: WaitMode::Block(timeout),
        ..BlkOptions::default()
    };
    let driver = BlkDriver::connect_with(builder, opts)
        .with_context(|| format!("cannot set up the device on `{}`", backend.command))?;
    Workload::new(driver, cli.blocks, cli.depth, cli.seed)
}

/// Drains `w`, reads the disk back, and adds its counts, violations and mismatches to
/// `report`.
fn settle(w: &mut Workload, timeout: Duration, report: &mut Report) -> anyhow::Result<()> {
    let result = w.drain(timeout).and_then(|()| w.read_back());
    report.violations.append(&mut w.violations);
    let c = w.counts;
    for (total, n) in
        report
            .requests
            .iter_mut()
            .zip([c.submitted, c.completed, c.writes, c.reads_verified])
    {
        *total += n;
    }
    let (blocks, mut bad) = result?;
    let (total, all_bad) = report.readback.get_or_insert((0, Vec::new()));
    *total += blocks;
    all_bad.append(&mut bad);
    Ok(())
}

fn ram_size(cli: &Cli) -> usize {
    // Per queue: ring, headers and one block per slot; plus room for the synchronous helpers.
    let per_queue = usize::from(cli.depth) * (workload::BLOCK + 64) + (1 << 20);
    (usize::from(cli.queues) * per_queue + (4 << 20)).next_multiple_of(2 << 20)
}

/// Says what the peer negotiated and what it lacks.
fn describe_peer(w: &mut Workload, template: &str, report: &mut Report) {
    let n = *w.driver.session().negotiated();
    let has = |f: VhostUserProtocolFeatures| n.protocol_offered.contains(f);
    let device_state = has(VhostUserProtocolFeatures::DEVICE_STATE);
    let dirty_log = w.driver.session().supports_dirty_log();
    let note = |report: &mut Report, s: String| {
        if !report.notes.contains(&s) {
            report.notes.push(s);
        }
    };
    if !device_state {
        note(report, "the backend lacks the DEVICE_STATE protocol feature: no device state is transferred (a backend like qemu-storage-daemon keeps its state in its block layer); destinations restart the rings from GET_VRING_BASE's bases".into());
    }
    if !dirty_log {
        let what = if has(VhostUserProtocolFeatures::LOG_SHMFD) {
            "the LOG_ALL feature"
        } else {
            "the LOG_SHMFD protocol feature"
        };
        note(
            report,
            format!("the backend lacks {what}: the dirty log is not checked"),
        );
    }
    if report.peer.is_null() {
        report.peer = json!({
            "features_offered": format!("{:#x}", n.features_offered),
            "features_acked": format!("{:#x}", n.features_acked),
            "protocol_offered": format!("{:#x}", n.protocol_offered.bits()),
            "device_state": device_state,
            "dirty_log": dirty_log,
            "capabilities": backend::probe_capabilities(template),
        });
    }
}

fn run_migrate(
    cli: &Cli,
    dir: &Path,
    count: u32,
    expect: Expect,
    report: &mut Report,
) -> anyhow::Result<()> {
    let src = cli.backend.as_deref().expect("checked");
    let dst = cli.dest_backend.as_deref().unwrap_or(src);
    let mut seq = 0;
    let mut r = Runner::start(cli, dir, &mut seq, src, None, report)?;
    r.run(cli.ops_per_hop)?;
    if expect == Expect::Refused {
        let (hop, said, verified) = r.hop(dst, None, None)?;
        report.cases.push(Case {
            name: format!("migration to `{dst}`"),
            expect_migrated: false,
            refused: refusal(&hop),
            backend_said: said,
            source_verified: verified,
            second_hop: None,
        });
        return r.finish(report);
    }
    let progress = Progress::new(u64::from(count));
    for i in 0..count {
        let (hop, said, _) = r.hop(dst, None, None)?;
        if let Outcome::Refused(why) = &hop.outcome {
            progress.finish();
            report.violations.push(format!(
                "migration {} was refused: {why}{}",
                i + 1,
                said.map(|s| format!(" (destination said: {s})"))
                    .unwrap_or_default()
            ));
            break;
        }
        r.run(cli.ops_per_hop)?;
        progress.update(u64::from(i) + 1);
    }
    progress.finish();
    r.finish(report)
}

fn refusal(hop: &Hop) -> Option<String> {
    match &hop.outcome {
        Outcome::Migrated => None,
        Outcome::Refused(why) => Some(why.clone()),
    }
}

fn run_matrix(cli: &Cli, dir: &Path, versions: &[u16], report: &mut Report) -> anyhow::Result<()> {
    let template = cli.backend.as_deref().expect("checked");
    anyhow::ensure!(
        template.contains("{compat}"),
        "the matrix needs `{{compat}}` in --backend where the compat version goes"
    );
    let versions = if versions.is_empty() {
        let caps = backend::probe_capabilities(template).unwrap_or_default();
        let v: Vec<u16> = caps["outboard"]["compat-versions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u16)
                    .collect()
            })
            .unwrap_or_default();
        anyhow::ensure!(
            !v.is_empty(),
            "the backend does not list its compat versions (outboard.compat-versions in --print-capabilities): pass --versions"
        );
        v
    } else {
        versions.to_vec()
    };
    let mut seq = 0;
    for &a in &versions {
        for &b in &versions {
            let mut r = Runner::start(cli, dir, &mut seq, template, Some(a), report)?;
            r.run(cli.ops_per_hop)?;
            let (hop, said, verified) = r.hop(template, Some(b), None)?;
            let refused = refusal(&hop);
            let second_hop = if refused.is_none() {
                r.run(cli.ops_per_hop)?;
                let (second, _, _) = r.hop(template, Some(b), None)?;
                r.run(cli.ops_per_hop)?;
                Some(refusal(&second).is_none())
            } else {
                None
            };
            report.cases.push(Case {
                name: format!("compat {a} -> {b}"),
                // State loads on the same version or a newer one.
                expect_migrated: a <= b,
                refused,
                backend_said: said,
                source_verified: verified,
                second_hop,
            });
            r.finish(report)?;
        }
    }
    Ok(())
}

fn run_refusals(
    cli: &Cli,
    dir: &Path,
    mismatched: &[String],
    report: &mut Report,
) -> anyhow::Result<()> {
    let src = cli.backend.as_deref().expect("checked");
    let dst = cli.dest_backend.as_deref().unwrap_or(src);
    let mut seq = 0;
    let mut r = Runner::start(cli, dir, &mut seq, src, None, report)?;
    r.run(cli.ops_per_hop)?;
    let has_state = r.w.driver.session().supports_device_state();
    for tamper in [Tamper::FlipByte, Tamper::DeviceType, Tamper::Truncate] {
        if !has_state {
            report.notes.push(format!(
                "case \"{}\" skipped: the backend transfers no state",
                tamper.name()
            ));
            continue;
        }
        let (hop, said, verified) = r.hop(dst, None, Some(tamper))?;
        report.cases.push(Case {
            name: tamper.name().into(),
            expect_migrated: false,
            refused: refusal(&hop),
            backend_said: said,
            source_verified: verified,
            second_hop: None,
        });
    }
    for cmd in mismatched {
        let (hop, said, verified) = r.hop(cmd, None, None)?;
        report.cases.push(Case {
            name: format!("destination configured differently: `{cmd}`"),
            expect_migrated: false,
            refused: refusal(&hop),
            backend_said: said,
            source_verified: verified,
            second_hop: None,
        });
    }
    // After every refusal, the untouched state still migrates, twice.
    let (first, _, _) = r.hop(dst, None, None)?;
    r.run(cli.ops_per_hop)?;
    let (second, _, _) = r.hop(dst, None, None)?;
    r.run(cli.ops_per_hop)?;
    report.cases.push(Case {
        name: "the untouched state after the refusals".into(),
        expect_migrated: true,
        refused: refusal(&first),
        backend_said: None,
        source_verified: None,
        second_hop: Some(refusal(&second).is_none()),
    });
    r.finish(report)
}

fn main() {
    let cli = Cli::parse();
    let Some(backend) = cli.backend.clone() else {
        eprintln!("outboard-migrate: --backend is required");
        std::process::exit(2);
    };
    let (dir, temporary) = match &cli.workdir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("outboard-migrate-{}", std::process::id())),
            true,
        ),
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("outboard-migrate: cannot create {}: {e}", dir.display());
        std::process::exit(2);
    }
    let kind = device_kind(&cli, &backend);
    let mut report = Report {
        backend: backend.clone(),
        ..Report::default()
    };
    let timeout = Duration::from_secs(cli.timeout);
    let dst = cli.dest_backend.clone().unwrap_or_else(|| backend.clone());
    if kind == DeviceKind::Net {
        report.frames = Some(report::FrameCounts::default());
        if cli.queues != 1 {
            report.notes.push(format!(
                "--queues {} ignored: the net mode drives one queue pair per port",
                cli.queues
            ));
        }
    }
    let result = match (&cli.mode, kind) {
        (Mode::Migrate { count, expect }, DeviceKind::Net) => {
            report.mode = "migrate (net)".into();
            if *expect == Expect::Refused {
                Err(anyhow::anyhow!(
                    "--expect refused is not implemented for net: use the refusals mode"
                ))
            } else {
                net::run_migrate(
                    &dir,
                    &backend,
                    &dst,
                    *count,
                    cli.ops_per_hop,
                    timeout,
                    &mut report,
                )
            }
        }
        (Mode::Refusals { mismatched_dest }, DeviceKind::Net) => {
            report.mode = "refusals (net)".into();
            if mismatched_dest.is_empty() {
                net::run_refusals(&dir, &backend, &dst, cli.ops_per_hop, timeout, &mut report)
            } else {
                Err(anyhow::anyhow!(
                    "--mismatched-dest is not implemented for net (tests/migration_net.rs covers a port configured otherwise)"
                ))
            }
        }
        (Mode::Matrix { .. }, DeviceKind::Net) => {
            report.mode = "matrix (net)".into();
            Err(anyhow::anyhow!(
                "vhost-user-net has a single compat version: there is no matrix to run"
            ))
        }
        (Mode::Migrate { count, expect }, DeviceKind::Blk) => {
            report.mode = "migrate".into();
            run_migrate(&cli, &dir, *count, *expect, &mut report)
        }
        (Mode::Matrix { versions }, DeviceKind::Blk) => {
            report.mode = "matrix".into();
            run_matrix(&cli, &dir, versions, &mut report)
        }
        (Mode::Crash { count, fault_every }, DeviceKind::Blk) => {
            report.mode = "crash".into();
            crash::run_crash(&cli, &dir, *count, *fault_every, &mut report)
        }
        (Mode::Upgrade { count }, DeviceKind::Blk) => {
            report.mode = "upgrade".into();
            upgrade::run_upgrade(&cli, &dir, *count, &mut report)
        }
        (Mode::Upgrade { .. }, DeviceKind::Net) => {
            report.mode = "upgrade (net)".into();
            Err(anyhow::anyhow!("the upgrade mode drives blk backends"))
        }
        (Mode::Crash { .. }, DeviceKind::Net) => {
            report.mode = "crash (net)".into();
            Err(anyhow::anyhow!(
                "the crash mode drives blk backends; net restarts are covered by tests/crash_recovery.rs"
            ))
        }
        (Mode::Refusals { mismatched_dest }, DeviceKind::Blk) => {
            report.mode = "refusals".into();
            run_refusals(&cli, &dir, mismatched_dest, &mut report)
        }
    };
    if let Err(e) = result {
        report.error = Some(format!("{e:#}"));
    }
    print!("{}", report.text());
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report.to_json()).expect("JSON");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("outboard-migrate: cannot write {}: {e}", path.display());
        }
    }
    let passed = report.passed();
    if passed && temporary {
        let _ = std::fs::remove_dir_all(&dir);
    } else if !passed {
        println!("backend logs: {}", dir.display());
    }
    std::process::exit(if passed { 0 } else { 1 });
}
