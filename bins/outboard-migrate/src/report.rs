//! The run's findings: a readable verdict on stdout and a JSON report.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::hop::{Hop, Outcome};

/// A case the run was asked to prove (a compat pair, a tampered state, …) and how it went.
#[derive(Clone, Debug)]
pub struct Case {
    /// What was tried.
    pub name: String,
    /// Whether the destination should accept it.
    pub expect_migrated: bool,
    /// What happened: `None` migrated, `Some(reason)` refused.
    pub refused: Option<String>,
    /// What the destination backend logged about it.
    pub backend_said: Option<String>,
    /// After a refusal: requests verified on the source afterwards.
    pub source_verified: Option<u64>,
    /// After a success: whether a second migration onwards succeeded too.
    pub second_hop: Option<bool>,
}

impl Case {
    /// Whether the case went as expected.
    pub fn as_expected(&self) -> bool {
        match (self.expect_migrated, &self.refused) {
            (true, None) => self.second_hop != Some(false),
            (false, Some(_)) => self.source_verified.is_some_and(|n| n > 0),
            _ => false,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "expected": if self.expect_migrated { "migrated" } else { "refused" },
            "outcome": if self.refused.is_some() { "refused" } else { "migrated" },
            "as_expected": self.as_expected(),
            "reason": self.refused,
            "backend_said": self.backend_said,
            "source_requests_verified_after_refusal": self.source_verified,
            "second_migration_ok": self.second_hop,
        })
    }
}

/// Frames of the net workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCounts {
    /// Sent by port A and by port B.
    pub sent: [u64; 2],
    /// Received in order from port A (by B) and from port B (by A).
    pub received: [u64; 2],
    /// Never arrived.
    pub lost: u64,
    /// Arrived again, or before a frame sent earlier.
    pub duplicated_or_reordered: u64,
    /// Not a frame the runner sent, or one whose CRC does not match.
    pub corrupt: u64,
}

impl FrameCounts {
    /// Adds another run's counts.
    pub fn add(&mut self, o: &FrameCounts) {
        for i in 0..2 {
            self.sent[i] += o.sent[i];
            self.received[i] += o.received[i];
        }
        self.lost += o.lost;
        self.duplicated_or_reordered += o.duplicated_or_reordered;
        self.corrupt += o.corrupt;
    }

    /// Every frame sent arrived once, in order, intact.
    pub fn clean(&self) -> bool {
        self.sent == self.received
            && self.lost == 0
            && self.duplicated_or_reordered == 0
            && self.corrupt == 0
    }
}

/// Everything a run found.
#[derive(Debug, Default)]
pub struct Report {
    /// The mode.
    pub mode: String,
    /// The source backend command.
    pub backend: String,
    /// Statements about the peer (what it lacks and what is therefore skipped).
    pub notes: Vec<String>,
    /// What the peer negotiated.
    pub peer: Value,
    /// Every hop made.
    pub hops: Vec<Hop>,
    /// The cases proved.
    pub cases: Vec<Case>,
    /// Broken promises: any entry fails the run.
    pub violations: Vec<String>,
    /// Requests (submitted, completed, writes, reads verified).
    pub requests: [u64; 4],
    /// Blocks read back at the end and the mismatches found (blk).
    pub readback: Option<(u64, Vec<String>)>,
    /// The frames exchanged (net).
    pub frames: Option<FrameCounts>,
    /// A fatal error that ended the run early.
    pub error: Option<String>,
    /// Mode-specific results (crash: kills and pauses), added to the JSON report as they are.
    pub extra: serde_json::Map<String, Value>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median, 99th percentile and maximum of `v` (sorted in place); zeros when it is empty.
pub fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (
        percentile(v, 0.5),
        percentile(v, 0.99),
        v.last().copied().unwrap_or(0.0),
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

impl Report {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.violations.is_empty()
            && self.cases.iter().all(Case::as_expected)
            && (self
                .readback
                .as_ref()
                .is_some_and(|(_, bad)| bad.is_empty())
                || self.frames.is_some_and(|f| f.clean()))
            && self
                .hops
                .iter()
                .all(|h| h.dirty.as_ref().is_none_or(|d| d.missing.is_empty()))
    }

    fn migrated(&self) -> impl Iterator<Item = &Hop> {
        self.hops
            .iter()
            .filter(|h| matches!(h.outcome, Outcome::Migrated))
    }

    fn pauses(&self) -> Vec<f64> {
        let mut p: Vec<f64> = self.migrated().map(|h| ms(h.pause())).collect();
        p.sort_by(f64::total_cmp);
        p
    }

    /// The JSON report.
    pub fn to_json(&self) -> Value {
        let pauses = self.pauses();
        let sum = |f: fn(&Hop) -> u64| self.hops.iter().map(f).sum::<u64>();
        let dirty: Vec<_> = self.hops.iter().filter_map(|h| h.dirty.as_ref()).collect();
        let missing: Vec<(u64, &str)> = dirty
            .iter()
            .flat_map(|d| d.missing.iter().copied())
            .collect();
        let mut report = json!({
            "tool": "outboard-migrate",
            "mode": self.mode,
            "backend": self.backend,
            "verdict": if self.passed() { "pass" } else { "fail" },
            "error": self.error,
            "peer": self.peer,
            "notes": self.notes,
            "migrations": {
                "attempted": self.hops.len(),
                "migrated": self.migrated().count(),
                "refused": self.hops.len() - self.migrated().count(),
                "pause_ms": {
                    "median": percentile(&pauses, 0.5),
                    "p99": percentile(&pauses, 0.99),
                    "max": pauses.last().copied().unwrap_or(0.0),
                },
                "stop_ms_median": median(self.migrated().map(|h| ms(h.stop))),
                "save_ms_median": median(self.migrated().map(|h| ms(h.save))),
                "switch_ms_median": median(self.migrated().map(|h| ms(h.switch))),
                "state_bytes": self.hops.iter().find_map(|h| h.state_len),
            },
            "in_flight_at_stop": {
                "total": sum(|h| h.in_flight),
                "completed_by_source": sum(|h| h.completed_by_source),
                "resumed_by_destination": sum(|h| h.resumed_by_destination),
            },
            "requests": {
                "submitted": self.requests[0],
                "completed": self.requests[1],
                "writes": self.requests[2],
                "reads_verified": self.requests[3],
            },
            "dirty_log": {
                "checked": !dirty.is_empty(),
                "checks": dirty.len(),
                "pages_expected": dirty.iter().map(|d| d.expected).sum::<u64>(),
                "pages_marked": dirty.iter().map(|d| d.marked).sum::<u64>(),
                "pages_missing": missing.len(),
                "missing_examples": missing.iter().take(8)
                    .map(|(p, what)| format!("{:#x} ({what})", p * 4096)).collect::<Vec<_>>(),
            },
            "frames": self.frames.map(|f| json!({
                "sent": {"a_to_b": f.sent[0], "b_to_a": f.sent[1]},
                "received_in_order": {"a_to_b": f.received[0], "b_to_a": f.received[1]},
                "lost": f.lost,
                "duplicated_or_reordered": f.duplicated_or_reordered,
                "corrupt": f.corrupt,
            })),
            "readback": self.readback.as_ref().map(|(n, bad)| json!({
                "blocks": n, "mismatches": bad.len(), "examples": bad.iter().take(8).collect::<Vec<_>>(),
            })),
            "cases": self.cases.iter().map(Case::to_json).collect::<Vec<_>>(),
            "hops": self.hops.iter().map(|h| json!({
                "outcome": match &h.outcome { Outcome::Migrated => "migrated", Outcome::Refused(_) => "refused" },
                "pause_ms": ms(h.pause()),
                "stop_ms": ms(h.stop),
                "save_ms": ms(h.save),
                "switch_ms": ms(h.switch),
                "in_flight": h.in_flight,
                "completed_by_source": h.completed_by_source,
                "dirty_pages_missing": h.dirty.as_ref().map(|d| d.missing.len()),
            })).collect::<Vec<_>>(),
            "violations": self.violations,
        });
        if let Some(map) = report.as_object_mut() {
            for (k, v) in &self.extra {
                map.insert(k.clone(), v.clone());
            }
        }
        report
    }

    /// The readable verdict.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("outboard-migrate {}: {}", self.mode, self.backend));
        for n in &self.notes {
            line(format!("  note: {n}"));
        }
        let pauses = self.pauses();
        let migrated = self.migrated().count();
        line(format!(
            "  migrations: {} attempted, {migrated} migrated, {} refused",
            self.hops.len(),
            self.hops.len() - migrated
        ));
        if !pauses.is_empty() {
            line(format!(
                "  pause (stop → running on the destination): median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                percentile(&pauses, 0.5),
                percentile(&pauses, 0.99),
                pauses[pauses.len() - 1]
            ));
        }
        let inflight: u64 = self.hops.iter().map(|h| h.in_flight).sum();
        if inflight > 0 {
            let by_src: u64 = self.hops.iter().map(|h| h.completed_by_source).sum();
            let by_dst: u64 = self.hops.iter().map(|h| h.resumed_by_destination).sum();
            let what = if self.frames.is_some() {
                "transmitted frames"
            } else {
                "requests"
            };
            line(format!(
                "  in flight at stop: {inflight} {what} ({by_src} completed by the source before GET_VRING_BASE replied, {by_dst} resumed by the destination)"
            ));
        }
        if let Some(f) = &self.frames {
            line(format!(
                "  frames: A→B {} sent, {} received in order; B→A {} sent, {} received in order; {} lost, {} duplicated or reordered, {} corrupt{}",
                f.sent[0], f.received[0], f.sent[1], f.received[1], f.lost,
                f.duplicated_or_reordered, f.corrupt,
                if f.clean() { ": no accepted frame lost, duplicated or reordered" } else { "" }
            ));
        } else {
            line(format!(
                "  requests: {} submitted, {} completed exactly once, {} writes, {} reads verified",
                self.requests[0], self.requests[1], self.requests[2], self.requests[3]
            ));
        }
        let dirty: Vec<_> = self.hops.iter().filter_map(|h| h.dirty.as_ref()).collect();
        if !dirty.is_empty() {
            let expected: u64 = dirty.iter().map(|d| d.expected).sum();
            let missing: usize = dirty.iter().map(|d| d.missing.len()).sum();
            line(format!(
                "  dirty log: {} checks, {expected} device-written pages expected, {missing} missing",
                dirty.len()
            ));
            for (p, what) in dirty.iter().flat_map(|d| &d.missing).take(8) {
                line(format!("    not marked: page {:#x} ({what})", p * 4096));
            }
        }
        if let Some((n, bad)) = &self.readback {
            line(format!(
                "  read-back: {n} blocks, {} mismatches{}",
                bad.len(),
                if bad.is_empty() {
                    ": no write lost, duplicated or reordered"
                } else {
                    ""
                }
            ));
            for b in bad.iter().take(8) {
                line(format!("    {b}"));
            }
        }
        for c in &self.cases {
            let what = match &c.refused {
                None => "migrated".to_string(),
                Some(r) => format!("refused: {r}"),
            };
            line(format!(
                "  [{}] {}: {what}",
                if c.as_expected() { "ok" } else { "UNEXPECTED" },
                c.name
            ));
            if let Some(b) = &c.backend_said {
                line(format!("        destination backend said: {b}"));
            }
            if let Some(n) = c.source_verified {
                let unit = if self.frames.is_some() {
                    "frames received in order"
                } else {
                    "requests verified"
                };
                line(format!(
                    "        the source kept serving: {n} {unit} after the refusal"
                ));
            }
        }
        for v in self.violations.iter().take(20) {
            line(format!("  VIOLATION: {v}"));
        }
        if let Some(e) = &self.error {
            line(format!("  ERROR: {e}"));
        }
        line(format!(
            "verdict: {}",
            if self.passed() { "PASS" } else { "FAIL" }
        ));
        out
    }
}

fn median(it: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = it.collect();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
#[derive(Debug)]
pub struct Progress {
    total: u64,
    start: Instant,
    tty: bool,
}

impl Progress {
    /// A bar for `total` steps.
    pub fn new(total: u64) -> Self {
        Progress {
            total,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal() && total > 1,
        }
    }

    /// Shows `done` steps.
    pub fn update(&self, done: u64) {
        if !self.tty {
            return;
        }
        const WIDTH: u64 = 30;
        let filled = (done * WIDTH / self.total.max(1)) as usize;
        eprint!(
            "\r  migrations [{}{}] {done}/{} {:.1} s ",
            "#".repeat(filled),
            ".".repeat(WIDTH as usize - filled),
            self.total,
            self.start.elapsed().as_secs_f64()
        );
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if self.tty {
            eprint!("\r{}\r", " ".repeat(72));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_passes_only_with_a_clean_read_back_and_expected_cases() {
        let mut r = Report {
            readback: Some((4, vec![])),
            ..Report::default()
        };
        assert!(r.passed());
        r.cases.push(Case {
            name: "2 -> 1".into(),
            expect_migrated: false,
            refused: Some("no".into()),
            backend_said: None,
            source_verified: Some(10),
            second_hop: None,
        });
        assert!(r.passed());
        r.cases[0].source_verified = Some(0);
        assert!(!r.passed(), "a refusal must leave the source serving");
        r.cases[0].source_verified = Some(1);
        r.violations.push("x".into());
        assert!(!r.passed());
        assert_eq!(r.to_json()["verdict"], "fail");
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.5), 2.0);
    }
}
