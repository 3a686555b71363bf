//! Packet-rate benchmark of `vhost-user-net --switch` against DPDK's own vhost-user backend
//! (`dpdk-testpmd` with `net_vhost` ports), driven by the same DPDK frontend in the same run.
//!
//! ```text
//! cargo build --release -p vhost-user-net
//! cargo bench --bench net                  # 64 B and 1514 B, open and closed loop, 3 reps, ~4 min
//! cargo bench --bench net -- --quick       # one repetition of 2 s windows, ~1 min
//! cargo bench --bench net -- --reps 5 --secs 5 --sizes 64 --modes open
//! ```
//!
//! The topology is the same for both backends: a backend with two vhost-user-net ports that
//! forwards between them (ours: the in-process L2 switch, `--switch` with two sockets; DPDK's:
//! testpmd in `io` forwarding between two `net_vhost` ports), and one frontend testpmd with two
//! `net_virtio_user` ports, one on each backend port. Every frame crosses the backend once:
//! out of one frontend port's transmit ring, into the other one's receive ring.
//!
//! - `open`: the frontend generates UDP flows on both ports as fast as it can
//!   (`--forward-mode=flowgen`, which also receives and frees everything). What the backend
//!   cannot carry it drops; the number is what the frontend received per second (both ports
//!   added), the offered rate is reported beside it.
//! - `closed`: the frontend sends one burst of 32 on each port (`--tx-first`) and then forwards
//!   whatever it receives back out of the other port (`io`): a fixed number of frames circulate,
//!   nothing needs dropping, and the rate is what the backend sustains at that depth.
//!
//! The backend is pinned to CPU 0 (ours: the whole process, both port workers; DPDK's: its
//! main and forwarding lcores), the frontend's lcores to CPU 1: two busy pollers on one CPU
//! collapse. Each run starts both processes fresh, skips the first 2 per-second reports and takes
//! the median of the next `--secs`. Repetitions walk every cell (size × mode) and run both
//! backends back to back, the order alternating, so that drifts of the shared machine hit both
//! alike; reported are medians over the repetitions and the median of the per-repetition ratios.
//! Other processes' CPU use during each window is measured (`/proc/stat` minus our two
//! processes) and reported as `noise`: this machine is shared and a compile next door moves
//! every number.
//!
//! Mpps counts frames; Gbps is frames × frame length × 8 (the Ethernet frame without FCS,
//! preamble or gap: 64 B and 1514 B frames, the latter a full 1500-byte MTU packet).
//!
//! Options (also as `NET_BENCH_<NAME>` environment variables): `--quick`, `--reps N` (3),
//! `--secs N` (4), `--sizes 64,1514`, `--modes open,closed`, `--max-noise CPUS` (0.3) and
//! `--retries N` (2: a run during which other processes used more than CPUS is repeated up to N
//! times and the quietest kept), `--wait-quiet S` (0: before each run, wait up to S seconds until
//! the machine uses at most the noise limit; not counted), `--bin PATH` (our binary, default
//! target/release/vhost-user-net), `--out PATH` (report base name, default `target/bench-net`:
//! `.md` and `.json`).

#[path = "../tests/dpdk/mod.rs"]
mod dpdk;

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use dpdk::{find_testpmd, PortStats, Testpmd, TestpmdConfig};
use serde_json::json;

const BACKEND_CPU: usize = 0;
const FRONTEND_CPU: usize = 1;
const MAC_0: &str = "52:54:00:00:00:0a";
const MAC_1: &str = "52:54:00:00:00:0b";
/// Per-second reports skipped at the start of a run (connection, first bursts).
const WARMUP_REPORTS: usize = 2;

#[derive(Clone, Debug)]
struct Options {
    reps: usize,
    secs: usize,
    sizes: Vec<usize>,
    modes: Vec<Mode>,
    bin: PathBuf,
    out: PathBuf,
    max_noise: f64,
    retries: usize,
    wait_quiet: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Open,
    Closed,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Open => "open",
            Mode::Closed => "closed",
        }
    }

    fn args(self) -> Vec<String> {
        match self {
            Mode::Open => vec!["--forward-mode=flowgen".into()],
            Mode::Closed => vec!["--forward-mode=io".into(), "--tx-first".into()],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Ours,
    Dpdk,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Ours => "vhost-user-net",
            Which::Dpdk => "testpmd net_vhost",
        }
    }
}

fn parse_options() -> Result<Options, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Options {
        reps: 3,
        secs: 4,
        sizes: vec![64, 1514],
        modes: vec![Mode::Open, Mode::Closed],
        bin: root.join("target/release/vhost-user-net"),
        out: root.join("target/bench-net"),
        max_noise: 0.3,
        retries: 2,
        wait_quiet: 0.0,
    };
    let mut pairs: Vec<(String, Option<String>)> = Vec::new();
    for (k, v) in std::env::vars() {
        if let Some(name) = k.strip_prefix("NET_BENCH_") {
            pairs.push((name.to_lowercase().replace('_', "-"), Some(v)));
        }
    }
    let mut args = std::env::args().skip(1).peekable();
    while let Some(a) = args.next() {
        // cargo bench passes --bench; ignore it.
        if a == "--bench" {
            continue;
        }
        let Some(name) = a.strip_prefix("--") else {
            return Err(format!("unexpected argument {a:?}"));
        };
        let value = if name == "quick" {
            None
        } else {
            Some(args.next().ok_or(format!("--{name} needs a value"))?)
        };
        pairs.push((name.to_string(), value));
    }
    for (name, value) in pairs {
        let v = || value.clone().unwrap_or_default();
        let num = |s: String| s.parse::<usize>().map_err(|e| format!("--{name} {s}: {e}"));
        match name.as_str() {
            "quick" => {
                o.reps = 1;
                o.secs = 2;
            }
            "reps" => o.reps = num(v())?.max(1),
            "secs" => o.secs = num(v())?.max(1),
            "sizes" => {
                o.sizes = v()
                    .split(',')
                    .map(|s| num(s.to_string()))
                    .collect::<Result<_, _>>()?
            }
            "modes" => {
                o.modes = v()
                    .split(',')
                    .map(|m| match m {
                        "open" => Ok(Mode::Open),
                        "closed" => Ok(Mode::Closed),
                        _ => Err(format!("unknown mode {m:?} (open, closed)")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "max-noise" => {
                o.max_noise = v()
                    .parse()
                    .map_err(|e| format!("--max-noise {}: {e}", v()))?
            }
            "retries" => o.retries = num(v())?,
            "wait-quiet" => {
                o.wait_quiet = v()
                    .parse()
                    .map_err(|e| format!("--wait-quiet {}: {e}", v()))?
            }
            "bin" => o.bin = PathBuf::from(v()),
            "out" => o.out = PathBuf::from(v()),
            _ => return Err(format!("unknown option --{name}")),
        }
    }
    if let Some(s) = o.sizes.iter().find(|&&s| !(60..=1514).contains(&s)) {
        return Err(format!("frame size {s} is outside 60..=1514"));
    }
    Ok(o)
}

/// CPU time (user + system, all threads) of process `pid`, in clock ticks.
fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may hold spaces: fields count from the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(0) … utime(11) stime(12).
    let at = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    at(11) + at(12)
}

/// Busy ticks of the whole machine (user, nice, system, irq, softirq, steal).
fn machine_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| v.get(i).copied().unwrap_or(0))
        .sum()
}

const TICKS_PER_SEC: f64 = 100.0;

/// Waits up to `limit` seconds until the machine (nothing of ours runs between runs) uses at
/// most `max_cpus`, measured over half a second. Returns the seconds waited.
fn wait_quiet(limit: f64, max_cpus: f64) -> f64 {
    let start = Instant::now();
    loop {
        let (before, t) = (machine_ticks(), Instant::now());
        std::thread::sleep(Duration::from_millis(500));
        let busy = machine_ticks().saturating_sub(before) as f64
            / TICKS_PER_SEC
            / t.elapsed().as_secs_f64();
        if busy <= max_cpus || start.elapsed().as_secs_f64() >= limit {
            return start.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One backend process.
enum BackendProc {
    Ours(Child),
    Dpdk(Testpmd),
}

impl BackendProc {
    fn pid(&self) -> u32 {
        match self {
            BackendProc::Ours(c) => c.id(),
            BackendProc::Dpdk(t) => t.pid(),
        }
    }

    fn stop(self) {
        match self {
            BackendProc::Ours(mut c) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let _ = c.wait();
            }
            BackendProc::Dpdk(t) => {
                t.stop();
            }
        }
    }
}

fn start_backend(
    which: Which,
    testpmd: &Path,
    opts: &Options,
    dir: &Path,
    socks: &[PathBuf; 2],
) -> BackendProc {
    match which {
        Which::Ours => {
            let log = std::fs::File::create(dir.join("ours.log")).unwrap();
            let mut cmd = Command::new(&opts.bin);
            cmd.args(["--switch", "--mac", MAC_0])
                .args(["--socket-path", &socks[0].display().to_string()])
                .args(["--socket-path", &socks[1].display().to_string()])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            // SAFETY: runs in the forked child before exec; sched_setaffinity is
            // async-signal-safe and nothing is allocated.
            unsafe {
                cmd.pre_exec(|| {
                    let mut set = nix::sched::CpuSet::new();
                    set.set(BACKEND_CPU).map_err(std::io::Error::from)?;
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                        .map_err(std::io::Error::from)
                });
            }
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", opts.bin.display()));
            BackendProc::Ours(child)
        }
        Which::Dpdk => BackendProc::Dpdk(Testpmd::start(
            testpmd,
            TestpmdConfig {
                name: "net-vhost".into(),
                lcores: format!("0@{BACKEND_CPU},1@{BACKEND_CPU}"),
                vdevs: socks
                    .iter()
                    .enumerate()
                    .map(|(i, s)| format!("net_vhost{i},iface={},queues=1", s.display()))
                    .collect(),
                args: vec![
                    "--forward-mode=io".into(),
                    "--nb-cores=1".into(),
                    "--total-num-mbufs=32768".into(),
                ],
                log: dir.join("net-vhost.log"),
            },
        )),
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
struct RunResult {
    rx_pps: f64,
    tx_pps: f64,
    /// CPUs the backend used during the window.
    backend_cpus: f64,
    /// CPUs other processes used during the window.
    noise: f64,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run_once(
    which: Which,
    mode: Mode,
    size: usize,
    testpmd: &Path,
    opts: &Options,
    dir: &Path,
) -> RunResult {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let socks = [dir.join("port0.sock"), dir.join("port1.sock")];
    let backend = start_backend(which, testpmd, opts, dir, &socks);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socks.iter().all(|s| s.exists()) {
        assert!(
            Instant::now() < deadline,
            "{}: the backend did not listen (logs in {})",
            which.name(),
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut args = mode.args();
    args.extend([
        "--nb-cores=1".into(),
        format!("--txpkts={size}"),
        format!("--eth-peer=0,{MAC_1}"),
        format!("--eth-peer=1,{MAC_0}"),
        "--total-num-mbufs=32768".into(),
    ]);
    let mut fe = Testpmd::start(
        testpmd,
        TestpmdConfig {
            name: "frontend".into(),
            lcores: format!("0@{FRONTEND_CPU},1@{FRONTEND_CPU}"),
            vdevs: socks
                .iter()
                .enumerate()
                .map(|(i, s)| format!("net_virtio_user{i},path={},queues=1", s.display()))
                .collect(),
            args,
            log: dir.join("frontend.log"),
        },
    );
    fe.wait_for("packet forwarding - ports=", Duration::from_secs(30));
    fe.next_reports(WARMUP_REPORTS, Duration::from_secs(20));
    let (m0, b0, f0, t0) = (
        machine_ticks(),
        process_ticks(backend.pid()),
        process_ticks(fe.pid()),
        Instant::now(),
    );
    let reports = fe.next_reports(opts.secs, Duration::from_secs(opts.secs as u64 * 5 + 10));
    let (m1, b1, f1, secs) = (
        machine_ticks(),
        process_ticks(backend.pid()),
        process_ticks(fe.pid()),
        t0.elapsed().as_secs_f64(),
    );
    fe.stop();
    backend.stop();
    let sum = |r: &Vec<PortStats>, f: fn(&PortStats) -> u64| r.iter().map(f).sum::<u64>() as f64;
    let mut rx: Vec<f64> = reports.iter().map(|r| sum(r, |p| p.rx_pps)).collect();
    let mut tx: Vec<f64> = reports.iter().map(|r| sum(r, |p| p.tx_pps)).collect();
    let ours = (b1 - b0) + (f1 - f0);
    RunResult {
        rx_pps: median(&mut rx),
        tx_pps: median(&mut tx),
        backend_cpus: (b1 - b0) as f64 / TICKS_PER_SEC / secs,
        noise: (m1.saturating_sub(m0).saturating_sub(ours)) as f64 / TICKS_PER_SEC / secs,
    }
}

fn main() -> ExitCode {
    let opts = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("net bench: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(testpmd) = find_testpmd() else {
        eprintln!("net bench: SKIP: dpdk-testpmd is not installed (apt-get install dpdk-dev)");
        return ExitCode::SUCCESS;
    };
    if !opts.bin.exists() {
        eprintln!(
            "net bench: {} is missing: cargo build --release -p vhost-user-net",
            opts.bin.display()
        );
        return ExitCode::from(2);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("net bench: needs 2 CPUs (backend and frontend pinned apart), found {cpus}");
        return ExitCode::from(2);
    }
    let work = std::env::temp_dir().join(format!("outboard-net-bench-{}", std::process::id()));
    let cells: Vec<(usize, Mode)> = opts
        .sizes
        .iter()
        .flat_map(|&s| opts.modes.iter().map(move |&m| (s, m)))
        .collect();
    // results[cell][backend] = one RunResult per repetition.
    let mut results = vec![[Vec::new(), Vec::new()]; cells.len()];
    let started = Instant::now();
    for rep in 0..opts.reps {
        for (c, &(size, mode)) in cells.iter().enumerate() {
            let order = if (rep + c) % 2 == 0 {
                [Which::Ours, Which::Dpdk]
            } else {
                [Which::Dpdk, Which::Ours]
            };
            for which in order {
                // The machine is shared: a run during which other processes took more than
                // --max-noise CPUs is repeated (up to --retries times); the quietest is kept.
                let quiet = || {
                    if opts.wait_quiet > 0.0 {
                        wait_quiet(opts.wait_quiet, opts.max_noise);
                    }
                };
                quiet();
                let mut r = run_once(which, mode, size, &testpmd, &opts, &work.join("run"));
                for _ in 0..opts.retries {
                    if r.noise <= opts.max_noise {
                        break;
                    }
                    quiet();
                    let again = run_once(which, mode, size, &testpmd, &opts, &work.join("run"));
                    if again.noise < r.noise {
                        r = again;
                    }
                }
                eprintln!(
                    "rep {rep} {size:>4} B {:<6} {:<17} rx {:>7.3} Mpps  tx {:>7.3} Mpps  backend {:.2} CPU  noise {:.2} CPU",
                    mode.name(),
                    which.name(),
                    r.rx_pps / 1e6,
                    r.tx_pps / 1e6,
                    r.backend_cpus,
                    r.noise
                );
                results[c][which as usize].push(r);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);

    let mut md = String::new();
    let _ = writeln!(
        md,
        "| frame | mode | backend | Mpps (median) | Gbps | offered Mpps | backend CPUs | noise CPUs (max) | ours / DPDK (median of per-rep ratios) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (c, &(size, mode)) in cells.iter().enumerate() {
        let mut ratios: Vec<f64> = results[c][0]
            .iter()
            .zip(&results[c][1])
            .map(|(o, d)| o.rx_pps / d.rx_pps)
            .collect();
        let ratio = median(&mut ratios);
        for which in [Which::Ours, Which::Dpdk] {
            let runs = &results[c][which as usize];
            let pick =
                |f: fn(&RunResult) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
            let rx = pick(|r| r.rx_pps);
            let tx = pick(|r| r.tx_pps);
            let cpu = pick(|r| r.backend_cpus);
            let noise = runs.iter().map(|r| r.noise).fold(0.0, f64::max);
            let gbps = rx * size as f64 * 8.0 / 1e9;
            let ratio_cell = if which == Which::Ours {
                format!("{ratio:.3}")
            } else {
                String::new()
            };
            let _ = writeln!(
                md,
                "| {size} B | {} | {} | {:.3} | {:.2} | {:.3} | {:.2} | {:.2} | {} |",
                mode.name(),
                which.name(),
                rx / 1e6,
                gbps,
                tx / 1e6,
                cpu,
                noise,
                ratio_cell
            );
            rows.push(json!({
                "frame_bytes": size,
                "mode": mode.name(),
                "backend": which.name(),
                "rx_mpps_median": rx / 1e6,
                "gbps_median": gbps,
                "offered_mpps_median": tx / 1e6,
                "backend_cpus_median": cpu,
                "noise_cpus_max": noise,
                "ratio_ours_over_dpdk": if which == Which::Ours { json!(ratio) } else { json!(null) },
                "runs": runs.iter().map(|r| json!({"rx_pps": r.rx_pps, "tx_pps": r.tx_pps, "backend_cpus": r.backend_cpus, "noise_cpus": r.noise})).collect::<Vec<_>>(),
            }));
        }
    }
    let header = format!(
        "reps={} secs={} (after {WARMUP_REPORTS} s warm-up) max-noise={} retries={}; backend on CPU {BACKEND_CPU}, frontend testpmd on CPU {FRONTEND_CPU}; {:.0} s\n\n",
        opts.reps,
        opts.secs,
        opts.max_noise,
        opts.retries,
        started.elapsed().as_secs_f64()
    );
    println!("{header}{md}");
    let json = json!({
        "reps": opts.reps,
        "secs": opts.secs,
        "backend_cpu": BACKEND_CPU,
        "frontend_cpu": FRONTEND_CPU,
        "binary": opts.bin.display().to_string(),
        "rows": rows,
    });
    let md_path = opts.out.with_extension("md");
    let json_path = opts.out.with_extension("json");
    if let Some(dir) = md_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&md_path, format!("{header}{md}"))
        .and_then(|()| std::fs::write(&json_path, serde_json::to_string_pretty(&json).unwrap()))
    {
        eprintln!("net bench: cannot write the report: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!("report: {} and {}", md_path.display(), json_path.display());
    ExitCode::SUCCESS
}
