//! The cost of dirty logging: 4 KiB random-read IOPS of `vhost-user-blk --null-size` through the
//! userspace frontend, with LOG_ALL on and off, in the same run.
//!
//! ```text
//! cargo build --release -p vhost-user-blk
//! cargo bench --bench dirty_log                    # 7 repetitions of 1 s per mode
//! cargo bench --bench dirty_log -- --reps 3 --secs 0.5
//! ```
//!
//! The null disk keeps storage out of the figure: each read is the device writing 4 KiB of
//! zeros into guest memory through vm-memory, its status byte and a used-ring entry, so with
//! logging on every request marks at least three pages of the log. The backend is pinned to CPU
//! 0 (`taskset`, when present) and this process to CPU 1; completions are busy-polled. Each
//! repetition runs both modes back to back, the order alternating, so that drifts of the shared
//! machine hit both alike. Reported: the median IOPS per mode and the median of the
//! per-repetition on/off ratios (the target is a cost below 10%). A JSON copy goes to
//! `target/bench-dirty-log.json`.
//!
//! Options: `--reps N` (7), `--secs S` (1.0), `--qd N` (32), `--bin PATH` (the backend binary;
//! default `target/release/vhost-user-blk`), `--backend-arg ARG` (repeatable: added to the
//! backend's command line).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_frontend::migration::{migration_protocol_features, DirtyLog};
use outboard_frontend::{
    BlkCompletion, BlkDriver, BlkOptions, BlkRequest, NotifyMode, SessionBuilder, WaitMode,
};

const DISK: u64 = 1 << 30;
const BLOCK: u32 = 4096;

struct Options {
    reps: usize,
    secs: f64,
    qd: u16,
    bin: PathBuf,
    backend_args: Vec<String>,
}

fn options() -> Options {
    let mut o = Options {
        reps: 7,
        secs: 1.0,
        qd: 32,
        bin: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/vhost-user-blk"),
        backend_args: Vec::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--reps" => o.reps = value.parse().expect("--reps N"),
            "--secs" => o.secs = value.parse().expect("--secs S"),
            "--qd" => o.qd = value.parse().expect("--qd N"),
            "--bin" => o.bin = value.into(),
            "--backend-arg" => o.backend_args.push(value),
            // `cargo bench` passes --bench; anything else is ignored the same way.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_backend(o: &Options, socket: &std::path::Path) -> Backend {
    assert!(
        o.bin.exists(),
        "{} is missing: run `cargo build --release -p vhost-user-blk` first",
        o.bin.display()
    );
    let pin = Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(&o.bin);
        c
    } else {
        Command::new(&o.bin)
    };
    let child = cmd
        .arg("--socket-path")
        .arg(socket)
        .arg("--null-size")
        .arg(DISK.to_string())
        .args(&o.backend_args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start vhost-user-blk");
    Backend(child)
}

fn pin_self(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Runs random 4 KiB reads at queue depth `qd` for `secs` and returns the IOPS.
fn measure(blk: &mut BlkDriver, secs: f64, rng: &mut u64) -> f64 {
    let blocks = DISK / u64::from(BLOCK);
    let q = blk.queue(0);
    let mut done: Vec<BlkCompletion> = Vec::with_capacity(64);
    let run = |q: &mut outboard_frontend::BlkQueue,
               done: &mut Vec<BlkCompletion>,
               rng: &mut u64,
               until: Instant|
     -> u64 {
        let mut completed = 0u64;
        while Instant::now() < until {
            while let Some(slot) = q.free_slot() {
                *rng ^= *rng << 13;
                *rng ^= *rng >> 7;
                *rng ^= *rng << 17;
                let sector = (*rng % blocks) * u64::from(BLOCK / 512);
                q.submit(slot, BlkRequest::read(sector, BLOCK)).unwrap();
            }
            q.kick().unwrap();
            done.clear();
            q.reap(WaitMode::Spin(Duration::from_secs(5)), done)
                .unwrap();
            completed += done.len() as u64;
        }
        completed
    };
    // Warm up, then measure.
    run(
        q,
        &mut done,
        rng,
        Instant::now() + Duration::from_millis(100),
    );
    let start = Instant::now();
    let n = run(q, &mut done, rng, start + Duration::from_secs_f64(secs));
    let elapsed = start.elapsed().as_secs_f64();
    let mut rest = Vec::new();
    q.drain(&mut rest).unwrap();
    n as f64 / elapsed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let o = options();
    let dir = std::env::temp_dir().join(format!("outboard-bench-dirty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("blk.sock");
    let _backend = start_backend(&o, &socket);
    pin_self(1);
    let builder = SessionBuilder::new(&socket)
        .protocol_features(migration_protocol_features())
        .notify(NotifyMode::Poll);
    let opts = BlkOptions {
        slots: o.qd,
        slot_data_size: BLOCK as usize,
        ..BlkOptions::default()
    };
    let mut blk = BlkDriver::connect_with(builder, opts).expect("connect to vhost-user-blk");
    blk.set_notify_mode(NotifyMode::Poll);
    assert!(
        blk.session().supports_dirty_log(),
        "the backend cannot log dirty pages"
    );
    let log = DirtyLog::for_ram(blk.session().ram()).unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let (mut on, mut off, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..o.reps {
        let mut iops = [0.0f64; 2];
        let order = if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for logging in order {
            if logging {
                blk.session().start_dirty_log(&log).unwrap();
            } else {
                blk.session().stop_dirty_log().unwrap();
            }
            iops[usize::from(logging)] = measure(&mut blk, o.secs, &mut rng);
        }
        log.clear();
        eprintln!(
            "rep {rep}: logging off {:.0} IOPS, on {:.0} IOPS ({:+.1}%)",
            iops[0],
            iops[1],
            (iops[1] / iops[0] - 1.0) * 100.0
        );
        off.push(iops[0]);
        on.push(iops[1]);
        ratio.push(iops[1] / iops[0]);
    }
    let (m_off, m_on, m_ratio) = (median(off), median(on), median(ratio));
    println!(
        "dirty logging, 4 KiB random reads, null disk, QD {}, {} reps of {} s:",
        o.qd, o.reps, o.secs
    );
    println!("  logging off: {m_off:.0} IOPS (median)");
    println!("  logging on:  {m_on:.0} IOPS (median)");
    println!(
        "  cost: {:.1}% (median of per-repetition ratios; target < 10%)",
        (1.0 - m_ratio) * 100.0
    );
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-dirty-log.json");
    let json = serde_json::json!({
        "bench": "dirty_log",
        "qd": o.qd, "reps": o.reps, "secs": o.secs,
        "iops_off_median": m_off, "iops_on_median": m_on,
        "cost_percent": (1.0 - m_ratio) * 100.0,
    });
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}
