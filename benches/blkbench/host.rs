//! The machine: pinning this process, finding the programs, preparing the backing file, and the
//! facts the report records.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Pins the calling thread (the whole frontend: it is single-threaded) to `cpu`.
pub fn pin_self(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

/// Machine-wide CPU time, to tell how much of the machine other processes took during a run
/// (this machine is shared; a compile next door moves every number).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SystemCounters {
    /// Busy time of all CPUs (user, nice, system, irq, softirq), in clock ticks.
    pub busy_ticks: u64,
    /// Time the hypervisor ran something else while our CPUs wanted to run, in clock ticks.
    pub steal_ticks: u64,
    /// CPU time of the calling thread (the frontend), nanoseconds.
    pub frontend_ns: u64,
}

/// Clock ticks per second of `/proc/stat` (USER_HZ, 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

impl SystemCounters {
    /// Reads the counters now.
    pub fn read() -> SystemCounters {
        let mut c = SystemCounters::default();
        if let Ok(stat) = fs::read_to_string("/proc/stat") {
            if let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) {
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .map(|x| x.parse().unwrap_or(0))
                    .collect();
                let at = |i: usize| v.get(i).copied().unwrap_or(0);
                // user nice system idle iowait irq softirq steal …
                c.busy_ticks = at(0) + at(1) + at(2) + at(5) + at(6);
                c.steal_ticks = at(7);
            }
        }
        c.frontend_ns = fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        c
    }
}

/// Waits up to `limit` until other processes use less than `max_cpus` (measured over 200 ms,
/// while this process and its idle backends do nothing). Returns how long it waited.
pub fn wait_quiet(limit: std::time::Duration, max_cpus: f64) -> std::time::Duration {
    let start = std::time::Instant::now();
    loop {
        let before = SystemCounters::read();
        let t = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let after = SystemCounters::read();
        let busy = (after.busy_ticks + after.steal_ticks)
            .saturating_sub(before.busy_ticks + before.steal_ticks) as f64
            / TICKS_PER_SEC
            / t.elapsed().as_secs_f64();
        if busy <= max_cpus || start.elapsed() >= limit {
            return start.elapsed();
        }
        std::thread::sleep(std::time::Duration::from_millis(800));
    }
}

/// CPUs online.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `target/` of this build: the bench runs as `target/<profile>/deps/blk-<hash>`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Our backend binary: `$BLK_BENCH_BIN`, else `vhost-user-blk` of the release build.
pub fn ours_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BLK_BENCH_BIN") {
        return PathBuf::from(p);
    }
    target_dir().join("release").join("vhost-user-blk")
}

/// `program` found on PATH.
pub fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// A source file of `binary` newer than it, if any: the binary is stale. The sources are the
/// ones cargo listed in the binary's dep-info file (`<binary>.d`); without it, nothing is known.
pub fn stale_against_sources(binary: &Path) -> Option<PathBuf> {
    let built = fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let mut dep_info = binary.as_os_str().to_owned();
    dep_info.push(".d");
    let text = fs::read_to_string(PathBuf::from(dep_info)).ok()?;
    // `target: src1 src2 …`, spaces inside paths escaped as `\ `.
    let (_, deps) = text.lines().next()?.split_once(": ")?;
    let mut paths = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => current.push(chars.next()?),
            ' ' => paths.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    paths.push(current);
    paths
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .find(|p| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built)
        })
}

/// Creates `path` of `size` bytes with every page written (so that reads hit real tmpfs pages,
/// not holes).
pub fn prepare_file(path: &Path, size: u64) -> io::Result<()> {
    let mut f = File::create(path)?;
    let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 + 1) as u8).collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// What the report says about the machine and the code.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// `date -u`.
    pub date: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu_model: String,
    /// CPUs online.
    pub cpus: usize,
    /// Whether the CPU flags say we run under a hypervisor.
    pub hypervisor: bool,
    /// The clock source (TSC makes `Instant::now` a vDSO read, not a system call).
    pub clocksource: String,
    /// `qemu-storage-daemon --version`.
    pub qsd_version: String,
    /// `git describe`-like state of the tree the bench was built from.
    pub git: String,
}

impl HostFacts {
    /// Collects the facts (`qsd`: the daemon to ask for its version).
    pub fn collect(qsd: &Path) -> HostFacts {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let online = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let hypervisor = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"));
        let root = env!("CARGO_MANIFEST_DIR");
        let rev = first_line("git", &["-C", root, "rev-parse", "--short", "HEAD"]);
        let dirty = Command::new("git")
            .args(["-C", root, "status", "--porcelain", "--untracked-files=no"])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        HostFacts {
            date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            cpu_model,
            // Not `available_parallelism`: it follows this thread's affinity, pinned by now.
            cpus: if online > 0 { online } else { cpus() },
            hypervisor,
            clocksource: fs::read_to_string(
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            )
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
            qsd_version: first_line(&qsd.display().to_string(), &["--version"]),
            git: if dirty {
                format!("{rev} + uncommitted changes")
            } else {
                rev
            },
        }
    }
}
