//! Medians, ratios against QSD, and the Markdown and JSON reports.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::backend::Variant;
use super::load::{Op, Sample};

/// The name of the reference variant the ratios divide by.
pub const REFERENCE: &str = "qsd";

/// A workload cell, the same for every backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellKey {
    /// `null` or `file`.
    pub storage: &'static str,
    /// Request queues.
    pub queues: u16,
    /// Read or write.
    pub op: Op,
    /// Requests in flight per queue.
    pub qd: u16,
}

impl CellKey {
    /// Label for progress lines and filters: `file/q2/randread/qd32`.
    pub fn label(&self) -> String {
        format!(
            "{}/q{}/{}/qd{}",
            self.storage,
            self.queues,
            self.op.name(),
            self.qd
        )
    }
}

/// Every repetition of one backend on one cell.
#[derive(Clone, Debug)]
pub struct Row {
    /// The cell.
    pub key: CellKey,
    /// The backend.
    pub variant: Variant,
    /// One sample per repetition, in order (None: that repetition failed).
    pub samples: Vec<Option<Sample>>,
}

/// The median of `v` (mean of the middle two for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians of a row and its ratios to the reference row.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    /// Median IOPS.
    pub iops: f64,
    /// Median p50, µs.
    pub p50_us: f64,
    /// Median p99, µs.
    pub p99_us: f64,
    /// (max − min) / median of IOPS over the repetitions.
    pub spread: f64,
    /// Median over repetitions of IOPS / reference IOPS of the same repetition.
    pub iops_ratio: f64,
    /// Median over repetitions of p50 / reference p50 of the same repetition.
    pub p50_ratio: f64,
    /// Median backend CPUs busy.
    pub backend_cpus: f64,
    /// Median backend context switches per request.
    pub switches_per_req: f64,
    /// Median frontend kicks per request.
    pub kicks_per_req: f64,
    /// Median CPUs taken by other work during the window.
    pub noise_cpus: f64,
}

fn col(samples: &[Option<Sample>], f: impl Fn(&Sample) -> f64) -> Vec<f64> {
    samples.iter().flatten().map(f).collect()
}

/// Summarizes `row`, pairing its repetitions with those of `reference` for the ratios.
pub fn summarize(row: &Row, reference: Option<&Row>) -> Summary {
    let s = &row.samples;
    let iops = col(s, |x| x.iops);
    let med = median(iops.clone());
    let (lo, hi) = iops.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| {
        (lo.min(x), hi.max(x))
    });
    let paired = |f: &dyn Fn(&Sample) -> f64| -> f64 {
        let Some(r) = reference else {
            return f64::NAN;
        };
        median(
            s.iter()
                .zip(&r.samples)
                .filter_map(|(a, b)| Some(f(a.as_ref()?) / f(b.as_ref()?)))
                .filter(|x| x.is_finite())
                .collect(),
        )
    };
    Summary {
        iops: med,
        p50_us: median(col(s, |x| x.p50_ns as f64 / 1e3)),
        p99_us: median(col(s, |x| x.p99_ns as f64 / 1e3)),
        spread: if iops.is_empty() {
            f64::NAN
        } else {
            (hi - lo) / med
        },
        iops_ratio: paired(&|x| x.iops),
        p50_ratio: paired(&|x| x.p50_ns as f64),
        backend_cpus: median(col(s, |x| x.backend_cpus)),
        switches_per_req: median(col(s, |x| x.switches_per_req)),
        kicks_per_req: median(col(s, |x| x.kicks_per_req)),
        noise_cpus: median(col(s, |x| x.noise_cpus)),
    }
}

fn reference_of<'a>(rows: &'a [Row], key: &CellKey) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.key == *key && r.variant.name == REFERENCE)
}

fn num(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "–".into()
    }
}

fn kiops(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1} k", x / 1e3)
    } else {
        "failed".into()
    }
}

/// The results table, one row per backend × storage × workload × QD × queues.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| storage | queues | workload | QD/queue | backend | serving threads | IOPS | p50 µs | p99 µs \
         | IOPS ÷ QSD | p50 ÷ QSD | backend CPUs | ctx sw/req | kicks/req | spread | noise |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut last: Option<CellKey> = None;
    for row in rows {
        let s = summarize(row, reference_of(rows, &row.key));
        let same = last == Some(row.key);
        last = Some(row.key);
        let k = row.key;
        let (storage, queues, op, qd) = if same {
            (String::new(), String::new(), String::new(), String::new())
        } else {
            (
                k.storage.to_string(),
                k.queues.to_string(),
                k.op.name().to_string(),
                k.qd.to_string(),
            )
        };
        let ratio = |x: f64| {
            if row.variant.name == REFERENCE {
                "1".to_string()
            } else {
                num(x, 2)
            }
        };
        let name = if row.variant.is_qsd() {
            row.variant.name.clone()
        } else {
            format!("**{}**", row.variant.name)
        };
        let _ = writeln!(
            out,
            "| {storage} | {queues} | {op} | {qd} | {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.variant.serving_threads(),
            kiops(s.iops),
            num(s.p50_us, 1),
            num(s.p99_us, 1),
            ratio(s.iops_ratio),
            ratio(s.p50_ratio),
            num(s.backend_cpus, 2),
            num(s.switches_per_req, 2),
            num(s.kicks_per_req, 2),
            if s.spread.is_finite() {
                format!("{:.0} %", s.spread * 100.0)
            } else {
                "–".into()
            },
            num(s.noise_cpus, 2),
        );
    }
    out
}

/// Everything, machine-readable: the metadata and every sample of every row.
pub fn json_report(meta: &Value, rows: &[Row]) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|row| {
            let s = summarize(row, reference_of(rows, &row.key));
            let finite = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
            json!({
                "storage": row.key.storage,
                "queues": row.key.queues,
                "op": row.key.op.name(),
                "qd_per_queue": row.key.qd,
                "backend": row.variant.name,
                "serving_threads": row.variant.serving_threads(),
                "wait": row.variant.wait_style(),
                "median": {
                    "iops": finite(s.iops),
                    "p50_us": finite(s.p50_us),
                    "p99_us": finite(s.p99_us),
                    "iops_vs_qsd": finite(s.iops_ratio),
                    "p50_vs_qsd": finite(s.p50_ratio),
                    "backend_cpus": finite(s.backend_cpus),
                    "switches_per_req": finite(s.switches_per_req),
                    "kicks_per_req": finite(s.kicks_per_req),
                    "spread": finite(s.spread),
                    "noise_cpus": finite(s.noise_cpus),
                },
                "samples": row.samples.iter().map(|x| match x {
                    Some(x) => json!({
                        "iops": x.iops,
                        "p50_ns": x.p50_ns,
                        "p99_ns": x.p99_ns,
                        "p999_ns": x.p999_ns,
                        "completions": x.completions,
                        "backend_cpus": x.backend_cpus,
                        "switches_per_req": x.switches_per_req,
                        "kicks_per_req": x.kicks_per_req,
                        "noise_cpus": x.noise_cpus,
                        "attempts": x.attempts,
                    }),
                    None => Value::Null,
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "meta": meta, "rows": rows })
}
