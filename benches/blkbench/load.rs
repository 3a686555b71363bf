//! The load generator: random 4 KiB requests at a fixed depth per queue, every queue of a
//! session driven round-robin from the calling thread, completions busy-polled.

use std::time::{Duration, Instant};

use outboard_frontend::{BlkDriver, BlkError, BlkRequest, BlkStatus, WaitMode};

use super::backend::ProcCounters;
use super::host::{SystemCounters, TICKS_PER_SEC};

/// The counters read at the edges of the measured window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    /// The backend process.
    pub backend: ProcCounters,
    /// The machine and the frontend.
    pub system: SystemCounters,
}

/// Bytes per request.
pub const BLOCK: u32 = 4096;
const SECTORS_PER_BLOCK: u64 = BLOCK as u64 / 512;

/// Read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
}

impl Op {
    /// Name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Op::RandRead => "randread",
            Op::RandWrite => "randwrite",
        }
    }
}

/// One measurement: `op` at depth `qd` on every queue of the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Request type.
    pub op: Op,
    /// Requests in flight per queue.
    pub qd: u16,
    /// Seed of the offset sequence (the same for every backend of a cell).
    pub seed: u64,
}

/// Phases of a measurement.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Run this long before measuring.
    pub warmup: Duration,
    /// Then measure this long.
    pub measure: Duration,
    /// Give up when no request completes for this long.
    pub stall: Duration,
}

/// What one measurement found.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Completions per second in the measured window.
    pub iops: f64,
    /// Median latency (submission to reaping), nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile latency, nanoseconds.
    pub p99_ns: u64,
    /// 99.9th percentile latency, nanoseconds.
    pub p999_ns: u64,
    /// Completions in the window.
    pub completions: u64,
    /// Backend CPU time over the window, in CPUs (1.0: one CPU fully busy).
    pub backend_cpus: f64,
    /// Backend context switches per request.
    pub switches_per_req: f64,
    /// Kick eventfd writes by the frontend per request.
    pub kicks_per_req: f64,
    /// CPUs' worth of time that went to neither the backend nor the frontend (other
    /// processes, plus hypervisor steal) during the window: how disturbed the run was.
    pub noise_cpus: f64,
    /// Runs it took to get this sample (a run disturbed by other processes is repeated).
    pub attempts: u32,
}

/// The load stopped making progress or the device failed a request.
#[derive(Debug)]
pub enum LoadError {
    /// A frontend operation failed.
    Blk(BlkError),
    /// A request completed with a non-OK status.
    Status(BlkStatus),
    /// Nothing completed for [`Timing::stall`].
    Stalled {
        /// Requests in flight at the time.
        in_flight: usize,
    },
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Blk(e) => {
                write!(f, "frontend: {e}")?;
                let mut src = std::error::Error::source(e);
                while let Some(s) = src {
                    write!(f, ": {s}")?;
                    src = s.source();
                }
                Ok(())
            }
            LoadError::Status(s) => write!(f, "a request completed with status {s:?}"),
            LoadError::Stalled { in_flight } => {
                write!(f, "no completion for too long with {in_flight} in flight")
            }
        }
    }
}

impl std::error::Error for LoadError {}

impl From<BlkError> for LoadError {
    fn from(e: BlkError) -> Self {
        LoadError::Blk(e)
    }
}

/// xorshift64: cheap, deterministic offsets.
struct Offsets {
    state: u64,
    blocks: u64,
}

impl Offsets {
    fn new(seed: u64, blocks: u64) -> Self {
        Offsets {
            state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            blocks,
        }
    }

    fn next_sector(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        (x % self.blocks) * SECTORS_PER_BLOCK
    }
}

/// The `per_mille`‰ latency of `sorted`.
fn percentile(sorted: &[u64], per_mille: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() * per_mille / 1000).min(sorted.len() - 1)]
}

/// Runs `w` on every queue of `blk` for `timing`; `probe` reads the counters at the edges of
/// the measured window. The queues must be idle; they are idle again on return.
pub fn run(
    blk: &mut BlkDriver,
    w: Workload,
    timing: Timing,
    probe: &dyn Fn() -> Probe,
) -> Result<Sample, LoadError> {
    let blocks = blk.config().capacity / SECTORS_PER_BLOCK;
    let mut offsets = Offsets::new(w.seed, blocks.max(1));
    let request = |sector| match w.op {
        Op::RandRead => BlkRequest::read(sector, BLOCK),
        Op::RandWrite => BlkRequest::write(sector, BLOCK),
    };
    let queues = blk.queues_mut();
    for q in queues.iter_mut() {
        for slot in 0..w.qd {
            if w.op == Op::RandWrite {
                q.slot_data(slot).fill(0, BLOCK as usize, 0x5a);
            }
            q.submit(slot, request(offsets.next_sector()))?;
        }
        q.kick()?;
    }

    let kicks = |queues: &[outboard_frontend::BlkQueue]| -> u64 {
        queues.iter().map(|q| q.driver_queue().stats().kicks).sum()
    };
    let expected = timing.measure.as_secs_f64() * 2e6;
    let mut latencies: Vec<u64> = Vec::with_capacity(expected.min(8e6) as usize);
    let mut done = Vec::with_capacity(usize::from(w.qd));
    let start = Instant::now();
    let mut last_progress = start;
    // Some(..) once the window opened: its start time and the counters then.
    let mut window: Option<(Instant, Probe, u64)> = None;
    let mut closed: Option<(Duration, Probe, Probe, u64)> = None;
    loop {
        let mut progress = false;
        for q in queues.iter_mut() {
            done.clear();
            q.reap(WaitMode::NoWait, &mut done)?;
            if done.is_empty() {
                continue;
            }
            progress = true;
            for c in &done {
                if c.status != BlkStatus::Ok {
                    return Err(LoadError::Status(c.status));
                }
                if window.is_some() && closed.is_none() {
                    latencies.push(c.latency.as_nanos() as u64);
                }
                if closed.is_none() {
                    q.submit(c.slot, request(offsets.next_sector()))?;
                }
            }
            q.kick()?;
        }
        let now = Instant::now();
        if progress {
            last_progress = now;
        } else {
            if closed.is_some() && queues.iter().all(|q| q.in_flight() == 0) {
                break;
            }
            if now - last_progress > timing.stall {
                let in_flight = queues.iter().map(|q| q.in_flight()).sum();
                return Err(LoadError::Stalled { in_flight });
            }
            std::hint::spin_loop();
        }
        match (window, closed) {
            (None, _) if now - start >= timing.warmup => {
                let p = probe();
                window = Some((Instant::now(), p, kicks(queues)));
            }
            (Some((opened, first, k)), None) if now - opened >= timing.measure => {
                let elapsed = now - opened;
                closed = Some((elapsed, first, probe(), kicks(queues) - k));
            }
            _ => {}
        }
    }
    let (elapsed, first, last, kicks) = closed.expect("the loop ends after the window closed");
    let secs = elapsed.as_secs_f64();
    let counters = last.backend.since(first.backend);
    let backend_cpus = counters.cpu_ns as f64 / 1e9 / secs;
    let ticks = |a: u64, b: u64| b.saturating_sub(a) as f64 / TICKS_PER_SEC / secs;
    let busy = ticks(first.system.busy_ticks, last.system.busy_ticks);
    let steal = ticks(first.system.steal_ticks, last.system.steal_ticks);
    let frontend_cpus = last
        .system
        .frontend_ns
        .saturating_sub(first.system.frontend_ns) as f64
        / 1e9
        / secs;
    latencies.sort_unstable();
    let n = latencies.len() as u64;
    let per_req = |x: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
    Ok(Sample {
        iops: n as f64 / secs,
        p50_ns: percentile(&latencies, 500),
        p99_ns: percentile(&latencies, 990),
        p999_ns: percentile(&latencies, 999),
        completions: n,
        backend_cpus,
        switches_per_req: per_req(counters.switches),
        kicks_per_req: per_req(kicks),
        noise_cpus: (busy - backend_cpus - frontend_cpus).max(0.0) + steal,
        attempts: 1,
    })
}
