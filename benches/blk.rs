//! End-to-end virtio-blk benchmark: our `vhost-user-blk` against qemu-storage-daemon (QSD),
//! driven by the same userspace frontend in the same run.
//!
//! ```text
//! cargo build --release -p vhost-user-blk
//! cargo bench --bench blk                 # the full matrix, < 5 minutes
//! cargo bench --bench blk -- --quick      # a smoke run of every cell, ~30 s
//! cargo bench --bench blk -- --only q1,randread --secs 2 --reps 5
//! ```
//!
//! Every backend of the matrix is started once, pinned to CPU 0 (`taskset`), and gets one
//! frontend session (busy-polled completions: `NotifyMode::Poll`, no call eventfd); this
//! process is single-threaded and pinned to CPU 1. Each repetition walks every cell (storage ×
//! queues × op × QD) and runs every backend on it back to back, the order rotated per
//! repetition, so that slow drifts of the machine hit all backends alike. Reported are medians
//! over the repetitions and, for ratios, the median of the per-repetition ratios against QSD.
//!
//! With two queues the frontend drives both round-robin from its one thread (one CPU is all it
//! has), at the given depth per queue. QSD serves every queue from one thread; our backend runs
//! one worker per queue by default (`ours`, both workers sharing CPU 0) and is also run with
//! `--threads 1` (`ours-1t`), the same thread model as QSD. On the file, `ours-sync` is our
//! backend with `--engine sync`.
//!
//! QSD does not poll virtqueues: its vhost-user-blk export registers the kick eventfds without
//! a poll handler, which disables an AioContext's adaptive polling, so even the `iothread`
//! variant (default `poll-max-ns`) sleeps in the kernel between kicks. Our `--poll-us`
//! variants busy-poll and therefore burn their CPU; the report shows backend CPU time.
//!
//! The machine may be shared: each run records how much CPU other processes (and hypervisor
//! steal) took during its window, and a disturbed run is repeated.
//!
//! Options, each also an environment variable `BLK_BENCH_<NAME>` (`BLK_BENCH_QUICK=1`):
//! - `--quick`: 0.25 s runs, one repetition.
//! - `--secs S` (0.9), `--warmup S` (0.1), `--reps N` (3): the measured window of a run, the
//!   warmup before it, the repetitions of the whole matrix.
//! - `--poll-us N` (50): of the polling variant.
//! - `--size BYTES` (1G), `--dir DIR` (/dev/shm): the disk and where its file lives.
//! - `--only TERM,…`: run the rows whose label `backend/storage/qQ/op/qdN` contains every term;
//!   the QSD reference of a selected cell runs too, unless `--no-ref`.
//! - `--extra`: add `ours-poll50-2t` (two polling workers on one CPU).
//! - `--max-noise CPUS` (0.1), `--retries N` (2), `--budget S` (280): a run during which other
//!   work took more than CPUS is repeated up to N times, the quietest attempt kept, while the
//!   matrix still fits S seconds.
//! - `--wait-quiet S` (0): before each cell and each repeat, wait up to S seconds for other work
//!   to stop (not counted in the budget).
//! - `--no-pin`, `--out PATH` (`target/bench-blk`: `.md` and `.json` are added).
//! - `--bin PATH` (`target/release/vhost-user-blk`), `--baseline PATH`: every variant of ours
//!   also runs with this other build, as `<variant>@base` (an A/B comparison).

mod blkbench;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blkbench::backend::{Backend, Engine, Launcher, Program, Storage, Variant};
use blkbench::host::{self, HostFacts, SystemCounters};
use blkbench::load::{self, Op, Probe, Sample, Timing, Workload};
use blkbench::options::{usage, Options};
use blkbench::report::{self, CellKey, Row, REFERENCE};
use outboard_frontend::{BlkDriver, BlkOptions, NotifyMode, SessionBuilder, WaitMode};
use serde_json::json;

const BACKEND_CPU: usize = 0;
const FRONTEND_CPU: usize = 1;

/// The backends of the matrix for `queues` queues on `storage`.
fn variants(queues: u16, storage: &str, opts: &Options) -> Vec<Variant> {
    let (poll_us, extra) = (opts.poll_us, opts.extra);
    let v = |name: &str, program| Variant {
        name: name.to_string(),
        program,
        queues,
        bin: None,
    };
    let poll = format!("ours-poll{poll_us}");
    let mut out = vec![
        v(REFERENCE, Program::Qsd { iothread: false }),
        v("qsd-iothread", Program::Qsd { iothread: true }),
        v(
            "ours",
            Program::Ours {
                poll_us: 0,
                threads: None,
                engine: Engine::IoUring,
            },
        ),
    ];
    if queues > 1 {
        out.push(v(
            "ours-1t",
            Program::Ours {
                poll_us: 0,
                threads: Some(1),
                engine: Engine::IoUring,
            },
        ));
    }
    if storage == "file" {
        // Page-cache I/O with plain preadv/pwritev on the worker thread.
        out.push(v(
            "ours-sync",
            Program::Ours {
                poll_us: 0,
                threads: Some(1),
                engine: Engine::Sync,
            },
        ));
    }
    // One polling thread: two pollers sharing one CPU starve each other.
    out.push(v(
        &poll,
        Program::Ours {
            poll_us,
            threads: Some(1),
            engine: Engine::IoUring,
        },
    ));
    if extra && queues > 1 {
        out.push(v(
            &format!("{poll}-2t"),
            Program::Ours {
                poll_us,
                threads: None,
                engine: Engine::IoUring,
            },
        ));
    }
    if let Some(base) = &opts.baseline {
        let copies: Vec<Variant> = out
            .iter()
            .filter(|v| !v.is_qsd())
            .map(|v| Variant {
                name: format!("{}@base", v.name),
                bin: Some(base.clone()),
                ..v.clone()
            })
            .collect();
        out.extend(copies);
    }
    out
}

/// One backend process and its frontend session.
struct Peer {
    variant: Variant,
    storage: Storage,
    backend: Backend,
    blk: Option<BlkDriver>,
    writeback: Option<u8>,
    failed: Option<String>,
}

fn connect(backend: &Backend, queues: u16) -> Result<BlkDriver, String> {
    let builder = SessionBuilder::new(&backend.socket)
        .queues(queues)
        .notify(NotifyMode::Poll)
        .connect_timeout(Duration::from_secs(10));
    let opts = BlkOptions {
        slots: 32,
        slot_data_size: load::BLOCK as usize,
        wait: WaitMode::Spin(Duration::from_secs(10)),
        ..BlkOptions::default()
    };
    BlkDriver::connect_with(builder, opts).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            let _ = write!(msg, ": {s}");
            src = s.source();
        }
        msg
    })
}

fn row_label(v: &Variant, k: &CellKey) -> String {
    format!("{}/{}", v.name, k.label())
}

fn selected(only: &[String], label: &str) -> bool {
    only.iter().all(|t| label.contains(t.as_str()))
}

fn main() -> ExitCode {
    let opts = Options::parse();
    let started = Instant::now();
    let qsd = host::on_path("qemu-storage-daemon");
    let Some(qsd) = qsd else {
        eprintln!("blk bench: qemu-storage-daemon is not on PATH (Debian: qemu-utils); it is the reference");
        return ExitCode::FAILURE;
    };
    if !opts.bin.is_file() {
        eprintln!(
            "blk bench: {} is missing: run `cargo build --release -p vhost-user-blk` first",
            opts.bin.display()
        );
        return ExitCode::FAILURE;
    }
    let stale = host::stale_against_sources(&opts.bin);
    if let Some(src) = &stale {
        eprintln!(
            "blk bench: WARNING: {} is newer than {}: rebuild with `cargo build --release -p vhost-user-blk`",
            src.display(),
            opts.bin.display()
        );
    }
    let cpus = host::cpus();
    let pin = opts.pin && cpus >= 2 && host::on_path("taskset").is_some();
    if opts.pin && !pin {
        eprintln!("blk bench: WARNING: not pinning (needs 2 CPUs and taskset); pollers will fight");
    }
    if pin {
        if let Err(e) = host::pin_self(FRONTEND_CPU) {
            eprintln!("blk bench: cannot pin the frontend to CPU {FRONTEND_CPU}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let facts = HostFacts::collect(&qsd);

    let run_dir = std::env::temp_dir().join(format!("outboard-bench-blk-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&run_dir) {
        eprintln!("blk bench: cannot create {}: {e}", run_dir.display());
        return ExitCode::FAILURE;
    }
    let file = opts
        .dir
        .join(format!("outboard-bench-blk-{}.img", std::process::id()));
    let env = Env {
        opts: &opts,
        facts: &facts,
        qsd: &qsd,
        pin,
        run_dir: &run_dir,
        file: &file,
        stale: stale.is_some(),
    };
    let code = run(&env);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir_all(&run_dir);
    eprintln!(
        "blk bench: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    code
}

/// What a run needs besides the options.
struct Env<'a> {
    opts: &'a Options,
    facts: &'a HostFacts,
    /// qemu-storage-daemon.
    qsd: &'a Path,
    /// Whether backends and frontend are pinned.
    pin: bool,
    /// Sockets go here.
    run_dir: &'a Path,
    /// The backing file.
    file: &'a Path,
    /// Whether our binary is older than its sources.
    stale: bool,
}

fn run(env: &Env) -> ExitCode {
    let Env {
        opts,
        facts,
        qsd,
        pin,
        run_dir,
        file,
        stale,
    } = *env;
    let storages = [Storage::Null(opts.size), Storage::File(file.to_path_buf())];
    let mut cells = Vec::new();
    for storage in &storages {
        for queues in [1u16, 2] {
            for op in [Op::RandRead, Op::RandWrite] {
                for qd in [1u16, 32] {
                    cells.push(CellKey {
                        storage: storage.name(),
                        queues,
                        op,
                        qd,
                    });
                }
            }
        }
    }
    // Which rows run: selected ones, plus the reference of every cell with a selected row.
    let mut rows: Vec<Row> = Vec::new();
    for key in &cells {
        let vs = variants(key.queues, key.storage, opts);
        let any = vs.iter().any(|v| selected(&opts.only, &row_label(v, key)));
        for v in vs {
            let reference = v.name == REFERENCE && !opts.no_ref;
            if any && (reference || selected(&opts.only, &row_label(&v, key))) {
                rows.push(Row {
                    key: *key,
                    variant: v,
                    samples: Vec::new(),
                });
            }
        }
    }
    if rows.is_empty() {
        usage("--only selects nothing");
    }
    let needs_file = rows.iter().any(|r| r.key.storage == "file");
    if needs_file {
        eprintln!(
            "blk bench: writing {} MiB to {}",
            opts.size >> 20,
            file.display()
        );
        if let Err(e) = host::prepare_file(file, opts.size) {
            eprintln!("blk bench: cannot prepare {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    }

    // Start every backend the rows need, then connect a session to each.
    let launcher = Launcher {
        ours: opts.bin.clone(),
        qsd: qsd.to_path_buf(),
        cpu: pin.then_some(BACKEND_CPU),
        dir: run_dir.to_path_buf(),
        setpriv: host::on_path("setpriv"),
    };
    let mut peers: Vec<Peer> = Vec::new();
    for row in &rows {
        let storage = storages
            .iter()
            .find(|s| s.name() == row.key.storage)
            .expect("cells use the listed storages");
        if peers
            .iter()
            .any(|p| p.variant == row.variant && p.storage == *storage)
        {
            continue;
        }
        match launcher.start(&row.variant, storage) {
            Ok(backend) => peers.push(Peer {
                variant: row.variant.clone(),
                storage: storage.clone(),
                backend,
                blk: None,
                writeback: None,
                failed: None,
            }),
            Err(e) => {
                eprintln!("blk bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    for p in &mut peers {
        match connect(&p.backend, p.variant.queues) {
            Ok(blk) => {
                p.writeback = blk.config().writeback;
                p.blk = Some(blk);
            }
            Err(e) => {
                eprintln!(
                    "blk bench: {} on {}: cannot connect: {e}",
                    p.variant.name,
                    p.storage.name()
                );
                p.failed = Some(e);
            }
        }
    }
    // Every backend has the file open by now: unlinked, its memory goes back to tmpfs when the
    // last of them exits, even if this process is killed.
    if needs_file {
        let _ = std::fs::remove_file(file);
    }

    let timing = Timing {
        warmup: Duration::from_secs_f64(opts.warmup),
        measure: Duration::from_secs_f64(opts.secs),
        stall: Duration::from_secs(10),
    };
    let per_rep = rows.len() as f64 * (opts.secs + opts.warmup);
    eprintln!(
        "blk bench: {} rows × {} reps × ({} s + {} s warmup) ≈ {:.0} s; backend CPU {}, frontend CPU {}",
        rows.len(),
        opts.reps,
        opts.secs,
        opts.warmup,
        per_rep * opts.reps as f64,
        if pin { BACKEND_CPU.to_string() } else { "any".into() },
        if pin { FRONTEND_CPU.to_string() } else { "any".into() },
    );
    // Disturbed runs are repeated only while the rest of the matrix still fits the time
    // budget, so that a busy machine cannot stretch the run without bound.
    let run_secs = opts.secs + opts.warmup + 0.02;
    let mut measuring = Instant::now();
    let mut waited = Duration::ZERO;
    let mut runs_left = rows.len() * opts.reps;
    let may_retry = |measuring: Instant, runs_left: usize| {
        measuring.elapsed().as_secs_f64() + (runs_left + 1) as f64 * run_secs <= opts.budget
    };
    for rep in 0..opts.reps {
        for (ci, key) in cells.iter().enumerate() {
            let idx: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].key == *key).collect();
            if idx.is_empty() {
                continue;
            }
            if opts.wait_quiet > 0.0 {
                let w = host::wait_quiet(Duration::from_secs_f64(opts.wait_quiet), opts.max_noise);
                if w >= Duration::from_millis(500) {
                    eprintln!("  waited {:.0} s for other work to stop", w.as_secs_f64());
                }
                // Waiting does not count against the budget.
                measuring += w;
                waited += w;
            }
            let seed = (rep as u64) << 32 | ci as u64;
            // Rotate the order per repetition.
            for k in 0..idx.len() {
                let i = idx[(k + rep) % idx.len()];
                let row = &mut rows[i];
                let storage = storages
                    .iter()
                    .find(|s| s.name() == key.storage)
                    .expect("listed storage");
                let peer = peers
                    .iter_mut()
                    .find(|p| p.variant == row.variant && p.storage == *storage)
                    .expect("every row has a peer");
                // A run that other processes disturbed is repeated (within a budget); the
                // quietest attempt is kept.
                runs_left -= 1;
                let mut sample = measure(peer, key, seed, timing);
                let mut attempts = 1;
                while let Some(s) = sample {
                    if s.noise_cpus <= opts.max_noise
                        || attempts > opts.retries
                        || !may_retry(measuring, runs_left)
                    {
                        break;
                    }
                    attempts += 1;
                    eprintln!(
                        "  rep {} {:<44} disturbed ({:.2} CPUs of other work): again",
                        rep + 1,
                        row_label(&row.variant, key),
                        s.noise_cpus
                    );
                    if opts.wait_quiet > 0.0 {
                        let w = host::wait_quiet(
                            Duration::from_secs_f64(opts.wait_quiet),
                            opts.max_noise,
                        );
                        measuring += w;
                        waited += w;
                    }
                    sample = match measure(peer, key, seed, timing) {
                        Some(n) if n.noise_cpus < s.noise_cpus => Some(n),
                        Some(_) => Some(s),
                        None => None,
                    };
                }
                if let Some(s) = &mut sample {
                    s.attempts = attempts;
                }
                match &sample {
                    Some(s) => eprintln!(
                        "  rep {} {:<44} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs  cpu {:.2}  noise {:.2}",
                        rep + 1,
                        row_label(&row.variant, key),
                        s.iops,
                        s.p50_ns as f64 / 1e3,
                        s.p99_ns as f64 / 1e3,
                        s.backend_cpus,
                        s.noise_cpus,
                    ),
                    None => eprintln!(
                        "  rep {} {:<44} failed: {}",
                        rep + 1,
                        row_label(&row.variant, key),
                        peer.failed.as_deref().unwrap_or("?")
                    ),
                }
                row.samples.push(sample);
            }
        }
    }

    if !waited.is_zero() {
        eprintln!(
            "blk bench: waited {:.0} s in all for the machine to go quiet",
            waited.as_secs_f64()
        );
    }
    let meta = metadata(opts, facts, pin, &peers, stale);
    let table = report::markdown_table(&rows);
    let md = markdown(opts, facts, pin, &peers, &table, stale);
    println!("{md}");
    let json = report::json_report(&meta, &rows);
    let md_path = opts.out.with_extension("md");
    let json_path = opts.out.with_extension("json");
    let mut ok = true;
    for (path, text) in [
        (&md_path, md),
        (
            &json_path,
            serde_json::to_string_pretty(&json).expect("JSON of plain values"),
        ),
    ] {
        match std::fs::write(path, text) {
            Ok(()) => eprintln!("blk bench: wrote {}", path.display()),
            Err(e) => {
                eprintln!("blk bench: cannot write {}: {e}", path.display());
                ok = false;
            }
        }
    }
    let failures = rows
        .iter()
        .flat_map(|r| &r.samples)
        .filter(|s| s.is_none())
        .count();
    if failures > 0 {
        eprintln!("blk bench: {failures} runs failed");
    }
    if ok && failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One run of `key` on `peer`; None (and the peer marked failed) if it fails.
fn measure(peer: &mut Peer, key: &CellKey, seed: u64, timing: Timing) -> Option<Sample> {
    if peer.failed.is_some() {
        return None;
    }
    if !peer.backend.alive() {
        peer.failed = Some("the backend exited".into());
        return None;
    }
    let blk = peer.blk.as_mut()?;
    let backend = &peer.backend;
    let w = Workload {
        op: key.op,
        qd: key.qd,
        seed,
    };
    let probe = || Probe {
        backend: backend.counters(),
        system: SystemCounters::read(),
    };
    match load::run(blk, w, timing, &probe) {
        Ok(s) => Some(s),
        Err(e) => {
            // The session's queues are in an unknown state: this peer is done.
            peer.failed = Some(e.to_string());
            None
        }
    }
}

fn metadata(
    opts: &Options,
    facts: &HostFacts,
    pin: bool,
    peers: &[Peer],
    stale: bool,
) -> serde_json::Value {
    let backends: Vec<_> = peers
        .iter()
        .map(|p| {
            json!({
                "backend": p.variant.name,
                "storage": p.storage.name(),
                "queues": p.variant.queues,
                "command": p.backend.command,
                "serving_threads": p.variant.serving_threads(),
                "wait": p.variant.wait_style(),
                "config_writeback": p.writeback,
                "threads": p.backend.threads().iter()
                    .map(|t| json!({"name": t.name, "cpus": t.cpus}))
                    .collect::<Vec<_>>(),
                "error": p.failed,
            })
        })
        .collect();
    json!({
        "date": facts.date,
        "kernel": facts.kernel,
        "cpu_model": facts.cpu_model,
        "cpus": facts.cpus,
        "hypervisor": facts.hypervisor,
        "clocksource": facts.clocksource,
        "qsd_version": facts.qsd_version,
        "git": facts.git,
        "binary": opts.bin.display().to_string(),
        "binary_stale": stale,
        "command": command_line(),
        "secs": opts.secs,
        "warmup_secs": opts.warmup,
        "reps": opts.reps,
        "block_bytes": load::BLOCK,
        "disk_bytes": opts.size,
        "pinned": pin,
        "backend_cpu": pin.then_some(BACKEND_CPU),
        "frontend_cpu": pin.then_some(FRONTEND_CPU),
        "frontend": "outboard-frontend, one thread, NotifyMode::Poll (used_event parked), reap NoWait spin, queues round-robin",
        "backends": backends,
    })
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.is_empty() {
        "cargo bench --bench blk".into()
    } else {
        format!("cargo bench --bench blk -- {}", args.join(" "))
    }
}

fn markdown(
    opts: &Options,
    facts: &HostFacts,
    pin: bool,
    peers: &[Peer],
    table: &str,
    stale: bool,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# vhost-user-blk: ours vs qemu-storage-daemon\n");
    let _ = writeln!(
        md,
        "- date: {}\n- machine: {} × {} ({}), kernel {}, clocksource {}\n- QSD: {}\n- tree: {}{}\n- command: `{}`\n- {} s measured after {} s warmup per run, {} repetitions interleaved, medians; 4 KiB random I/O on a {} MiB disk\n- pinning: {}",
        facts.date,
        facts.cpus,
        facts.cpu_model,
        if facts.hypervisor { "virtual machine" } else { "bare metal" },
        facts.kernel,
        facts.clocksource,
        facts.qsd_version,
        facts.git,
        if stale { " (WARNING: the backend binary is older than its sources)" } else { "" },
        command_line(),
        opts.secs,
        opts.warmup,
        opts.reps,
        opts.size >> 20,
        if pin {
            format!("every backend thread on CPU {BACKEND_CPU} (taskset), the frontend on CPU {FRONTEND_CPU}")
        } else {
            "none".into()
        }
    );
    let _ = writeln!(
        md,
        "\nIOPS ÷ QSD and p50 ÷ QSD: median over repetitions of the ratio to `{REFERENCE}` in the same repetition \
         (IOPS > 1 and p50 < 1 favour the row). backend CPUs: CPU time of all backend threads over the window \
         (1.00 = CPU 0 fully busy). ctx sw/req: backend context switches per request (≈ sleeps). \
         kicks/req: kick eventfd writes by the frontend per request (notification suppression). \
         spread: (max − min) / median of IOPS over repetitions. noise: CPUs' worth of other processes' \
         work and hypervisor steal during the window (the machine is shared; runs above {:.2} were repeated).\n",
        opts.max_noise
    );
    md.push_str(table);
    md.push_str("\n## Backends\n\n");
    let mut seen = BTreeMap::new();
    for p in peers {
        seen.entry((p.variant.queues, p.variant.name.clone(), p.storage.name()))
            .or_insert(p);
    }
    for p in seen.values() {
        let threads = p.backend.threads();
        let pinned: Vec<String> = threads
            .iter()
            .map(|t| format!("{}@{}", t.name, t.cpus))
            .collect();
        let _ = writeln!(
            md,
            "- `{}` on {} ({} queue{}): {}; config writeback={}; threads {}\n  `{}`",
            p.variant.name,
            p.storage.name(),
            p.variant.queues,
            if p.variant.queues > 1 { "s" } else { "" },
            p.variant.wait_style(),
            p.writeback.map_or("–".into(), |w| w.to_string()),
            pinned.join(", "),
            p.backend.command
        );
    }
    md
}
