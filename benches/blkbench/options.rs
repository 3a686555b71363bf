//! The benchmark's options: `--name value` arguments, each also a `BLK_BENCH_NAME` variable.

use std::path::PathBuf;

use super::host;

/// What to run, from the arguments and `BLK_BENCH_*` variables.
#[derive(Clone, Debug)]
pub struct Options {
    /// Measured window per run, seconds.
    pub secs: f64,
    /// Warmup before each window, seconds.
    pub warmup: f64,
    /// Repetitions of the whole matrix.
    pub reps: usize,
    /// `--poll-us` of the polling variants.
    pub poll_us: u64,
    /// Disk size in bytes.
    pub size: u64,
    /// Directory of the backing file (tmpfs).
    pub dir: PathBuf,
    /// Run only rows whose label contains every term.
    pub only: Vec<String>,
    /// Do not add the QSD reference rows to a selection.
    pub no_ref: bool,
    /// Add the extra variants.
    pub extra: bool,
    /// Repeat runs during which other work took more CPUs than this.
    pub max_noise: f64,
    /// Repeat a disturbed run at most this often.
    pub retries: u32,
    /// Repeat disturbed runs only while the whole matrix still fits this many seconds.
    pub budget: f64,
    /// Before each cell, wait up to this many seconds for other processes to go quiet (0: do
    /// not wait). Waiting does not count against the budget.
    pub wait_quiet: f64,
    /// Pin the backend and the frontend to their CPUs.
    pub pin: bool,
    /// Short smoke run.
    pub quick: bool,
    /// Report base name (`.md` and `.json` are added).
    pub out: PathBuf,
    /// Our backend binary.
    pub bin: PathBuf,
    /// Another build of it to compare with (its rows are named `<variant>@base`).
    pub baseline: Option<PathBuf>,
}

/// Prints `msg` and how to get help, and exits with status 2.
pub fn usage(msg: &str) -> ! {
    eprintln!("blk bench: {msg}\n(see the documentation at the top of benches/blk.rs)");
    std::process::exit(2)
}

fn parse_size(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

impl Options {
    /// Reads the environment, then the arguments.
    pub fn parse() -> Options {
        let mut o = Options {
            secs: 0.9,
            warmup: 0.1,
            reps: 3,
            poll_us: 50,
            size: 1 << 30,
            dir: PathBuf::from("/dev/shm"),
            only: Vec::new(),
            no_ref: false,
            extra: false,
            max_noise: 0.1,
            retries: 2,
            budget: 280.0,
            wait_quiet: 0.0,
            pin: true,
            quick: false,
            out: host::target_dir().join("bench-blk"),
            bin: host::ours_binary(),
            baseline: None,
        };
        // Environment first, then arguments (which win).
        let mut pairs: Vec<(String, Option<String>)> = Vec::new();
        for name in [
            "quick",
            "secs",
            "warmup",
            "reps",
            "poll-us",
            "size",
            "dir",
            "only",
            "no-ref",
            "extra",
            "no-pin",
            "out",
            "max-noise",
            "budget",
            "wait-quiet",
            "retries",
            "bin",
            "baseline",
        ] {
            let var = format!("BLK_BENCH_{}", name.replace('-', "_").to_uppercase());
            if let Ok(v) = std::env::var(&var) {
                pairs.push((name.to_string(), Some(v)));
            }
        }
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            // `cargo bench` appends `--bench`; a libtest-style filter may follow.
            if a == "--bench" || a == "--nocapture" {
                continue;
            }
            let Some(name) = a.strip_prefix("--") else {
                usage(&format!("unexpected argument {a:?}"));
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (name.to_string(), None),
            };
            let takes_value = !matches!(name.as_str(), "quick" | "extra" | "no-pin" | "no-ref");
            let value = if takes_value {
                inline.or_else(|| args.next())
            } else {
                inline
            };
            pairs.push((name, value));
        }
        let mut secs = None;
        let mut warmup = None;
        let mut reps = None;
        for (name, value) in pairs {
            let v = || {
                value
                    .clone()
                    .unwrap_or_else(|| usage(&format!("--{name} needs a value")))
            };
            let flag = || value.as_deref().is_none_or(|v| v != "0" && v != "false");
            let f64_of = |s: String| {
                s.parse::<f64>()
                    .ok()
                    .filter(|x| *x > 0.0)
                    .unwrap_or_else(|| usage(&format!("--{name}: {s:?} is not a positive number")))
            };
            match name.as_str() {
                "quick" => o.quick = flag(),
                "extra" => o.extra = flag(),
                "no-ref" => o.no_ref = flag(),
                "no-pin" => o.pin = !flag(),
                "secs" => secs = Some(f64_of(v())),
                "warmup" => warmup = Some(f64_of(v())),
                "reps" => {
                    reps = Some(
                        v().parse::<usize>()
                            .ok()
                            .filter(|&n| n > 0)
                            .unwrap_or_else(|| usage("--reps needs a positive count")),
                    )
                }
                "poll-us" => {
                    o.poll_us = v()
                        .parse()
                        .unwrap_or_else(|_| usage("--poll-us needs microseconds"))
                }
                "size" => {
                    o.size = parse_size(&v())
                        .filter(|s| *s >= 1 << 20 && s % 4096 == 0)
                        .unwrap_or_else(|| usage("--size needs a multiple of 4 KiB, ≥ 1 MiB"))
                }
                "dir" => o.dir = PathBuf::from(v()),
                "max-noise" => o.max_noise = f64_of(v()),
                "budget" => o.budget = f64_of(v()),
                "wait-quiet" => o.wait_quiet = f64_of(v()),
                "retries" => {
                    o.retries = v()
                        .parse()
                        .unwrap_or_else(|_| usage("--retries needs a count"))
                }
                "only" => {
                    o.only = v()
                        .split(',')
                        .filter(|t| !t.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                "out" => o.out = PathBuf::from(v()),
                "bin" => o.bin = PathBuf::from(v()),
                "baseline" => o.baseline = Some(PathBuf::from(v())),
                _ => usage(&format!("unknown option --{name}")),
            }
        }
        if o.quick {
            o.secs = 0.25;
            o.warmup = 0.05;
            o.reps = 1;
        }
        o.secs = secs.unwrap_or(o.secs);
        o.warmup = warmup.unwrap_or(o.warmup);
        o.reps = reps.unwrap_or(o.reps);
        o
    }
}
