//! Deterministic fault points for crash tests.
//!
//! A test names a point in the request path and what happens there; the process then stops
//! (the thread parks forever, for the test to `kill -9` it in that exact state) or exits at once
//! the `n`-th time a request passes the point. Points are compiled in but cost one relaxed
//! atomic load while nothing is armed. Programs arm them from a test-only option
//! (`--fault-point`); nothing else does.
//!
//! When a point fires, the process writes `outboard-fault: <point> reached` to its standard
//! error first, so a test can wait for it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Places in the request path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// A chain was taken and marked in the inflight record; the device has not seen it.
    AfterInflightMark,
    /// A device wrote a request's data to its storage; nothing is answered yet.
    AfterStorageWrite,
    /// A request is answered in the device; its used entry is not written yet.
    BeforeUsedUpdate,
    /// The used entry and index are written; the inflight record may not say so yet.
    AfterUsedUpdate,
}

impl FaultPoint {
    /// Every point, for tests that visit them all.
    pub const ALL: [FaultPoint; 4] = [
        FaultPoint::AfterInflightMark,
        FaultPoint::AfterStorageWrite,
        FaultPoint::BeforeUsedUpdate,
        FaultPoint::AfterUsedUpdate,
    ];

    /// The point's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::AfterInflightMark => "after-inflight-mark",
            FaultPoint::AfterStorageWrite => "after-storage-write",
            FaultPoint::BeforeUsedUpdate => "before-used-update",
            FaultPoint::AfterUsedUpdate => "after-used-update",
        }
    }
}

impl std::fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens at an armed point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// The thread stops for good (the process is to be killed from outside).
    Stop,
    /// The process exits at once with status [`FAULT_EXIT_STATUS`], running no destructor of
    /// any other thread.
    Exit,
}

/// The exit status of [`FaultAction::Exit`].
pub const FAULT_EXIT_STATUS: i32 = 86;

/// A parsed `--fault-point` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSpec {
    /// Where.
    pub point: FaultPoint,
    /// On which pass (1 = the first).
    pub nth: u64,
    /// What then.
    pub action: FaultAction,
}

impl std::str::FromStr for FaultSpec {
    type Err = String;

    /// `POINT[@N][:stop|exit]`, e.g. `after-storage-write@20:exit`; the default is the first
    /// pass and `stop`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, action) = match s.rsplit_once(':') {
            Some((r, "stop")) => (r, FaultAction::Stop),
            Some((r, "exit")) => (r, FaultAction::Exit),
            Some((_, a)) => return Err(format!("unknown fault action {a:?} (stop or exit)")),
            None => (s, FaultAction::Stop),
        };
        let (name, nth) = match rest.split_once('@') {
            Some((n, k)) => match k.parse::<u64>() {
                Ok(k) if k > 0 => (n, k),
                _ => return Err(format!("bad pass count {k:?} (a number from 1)")),
            },
            None => (rest, 1),
        };
        let point = FaultPoint::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = FaultPoint::ALL.iter().map(|p| p.name()).collect();
                format!("unknown fault point {name:?} (one of {})", names.join(", "))
            })?;
        Ok(FaultSpec { point, nth, action })
    }
}

static ARMED: AtomicBool = AtomicBool::new(false);
static SPEC: OnceLock<FaultSpec> = OnceLock::new();
static PASSES: AtomicU64 = AtomicU64::new(0);

/// Arms one fault point for the life of the process. Returns false if one was armed already.
pub fn arm(spec: FaultSpec) -> bool {
    if SPEC.set(spec).is_err() {
        return false;
    }
    ARMED.store(true, Ordering::Release);
    true
}

/// A request passes `point`.
#[inline]
pub fn hit(point: FaultPoint) {
    if ARMED.load(Ordering::Relaxed) {
        fire(point);
    }
}

#[cold]
fn fire(point: FaultPoint) {
    let Some(spec) = SPEC.get() else { return };
    if spec.point != point || PASSES.fetch_add(1, Ordering::AcqRel) + 1 != spec.nth {
        return;
    }
    eprintln!("outboard-fault: {point} reached");
    match spec.action {
        FaultAction::Exit => std::process::exit(FAULT_EXIT_STATUS),
        FaultAction::Stop => loop {
            std::thread::park();
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_defaults_and_bad_ones_say_why() {
        let s: FaultSpec = "after-storage-write".parse().unwrap();
        assert_eq!(
            s,
            FaultSpec {
                point: FaultPoint::AfterStorageWrite,
                nth: 1,
                action: FaultAction::Stop
            }
        );
        let s: FaultSpec = "before-used-update@7:exit".parse().unwrap();
        assert_eq!((s.nth, s.action), (7, FaultAction::Exit));
        assert!("nowhere"
            .parse::<FaultSpec>()
            .unwrap_err()
            .contains("one of"));
        assert!("after-used-update@0".parse::<FaultSpec>().is_err());
        assert!("after-used-update:boom".parse::<FaultSpec>().is_err());
    }
}
