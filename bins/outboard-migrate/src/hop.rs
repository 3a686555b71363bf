//! One migration of the device from one backend to another, with every check the runner makes
//! at the moment the source stops.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use outboard_frontend::migration::{DirtyLog, LOG_PAGE_SIZE};
use outboard_frontend::{MigrationError, WaitMode};

use crate::workload::Workload;

/// A deliberate change to the saved state, to prove the destination refuses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// Flip one bit in the middle of the state.
    FlipByte,
    /// Claim another VIRTIO device type in the header of an Outboard state blob.
    DeviceType,
    /// Send only the first half.
    Truncate,
}

impl Tamper {
    /// The case's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Tamper::FlipByte => "corrupted state (one bit flipped)",
            Tamper::DeviceType => "state of another device type",
            Tamper::Truncate => "truncated state",
        }
    }

    /// Applies the change; `Err` explains why it cannot be made to this state.
    pub fn apply(self, blob: &mut Vec<u8>) -> Result<(), String> {
        const OUTBOARD_MAGIC: &[u8] = b"OBSTATE\0";
        // magic (8), format (2), then the u32 device type.
        const TYPE_AT: usize = 10;
        match self {
            Tamper::FlipByte if !blob.is_empty() => {
                let at = blob.len() / 2;
                blob[at] ^= 0x10;
            }
            Tamper::Truncate if !blob.is_empty() => blob.truncate(blob.len() / 2),
            Tamper::DeviceType if blob.starts_with(OUTBOARD_MAGIC) && blob.len() >= 14 => {
                let t = u32::from_le_bytes(blob[TYPE_AT..TYPE_AT + 4].try_into().expect("4"));
                // virtio-net (1) for a block device, block (2) for anything else.
                let other: u32 = if t == 2 { 1 } else { 2 };
                blob[TYPE_AT..TYPE_AT + 4].copy_from_slice(&other.to_le_bytes());
            }
            Tamper::DeviceType => return Err("not an Outboard state blob".into()),
            _ => return Err("the state is empty".into()),
        }
        Ok(())
    }
}

/// What the dirty-log check found.
#[derive(Clone, Debug, Default)]
pub struct DirtyCheck {
    /// Pages the device is known to have written.
    pub expected: u64,
    /// Those of them the log did not mark, with what each holds.
    pub missing: Vec<(u64, &'static str)>,
    /// Pages the log marked in all.
    pub marked: u64,
}

/// How a hop ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The device runs on the destination.
    Migrated,
    /// The destination refused; the device runs on the source again.
    Refused(String),
}

/// One hop's measurements.
#[derive(Clone, Debug)]
pub struct Hop {
    /// How it ended.
    pub outcome: Outcome,
    /// Stopping the rings (GET_VRING_BASE of every queue).
    pub stop: Duration,
    /// Saving the state.
    pub save: Duration,
    /// Connecting to the destination, loading the state, starting the rings.
    pub switch: Duration,
    /// The state's size (`None`: not transferred).
    pub state_len: Option<usize>,
    /// Requests the driver had in flight when the source was told to stop.
    pub in_flight: u64,
    /// Of those, completed by the source before GET_VRING_BASE replied.
    pub completed_by_source: u64,
    /// Of those, left in the avail ring for the destination.
    pub resumed_by_destination: u64,
    /// The dirty-log check, if the source logs.
    pub dirty: Option<DirtyCheck>,
}

impl Hop {
    /// The time the device did not run.
    pub fn pause(&self) -> Duration {
        self.stop + self.save + self.switch
    }
}

/// Dirty-log bookkeeping across hops.
#[derive(Debug)]
pub struct Tracker {
    log: DirtyLog,
    /// Per queue, the used index from which the device's used-ring writes are still unchecked.
    used_start: Vec<u16>,
    active: bool,
}

impl Tracker {
    /// A log for the workload's guest RAM, switched on at the current session if it can log.
    /// `None` if the backend cannot log dirty pages.
    pub fn start(w: &mut Workload) -> anyhow::Result<Option<Self>> {
        let session = w.driver.session();
        if !session.supports_dirty_log() {
            return Ok(None);
        }
        let log = DirtyLog::for_ram(session.ram())?;
        session.start_dirty_log(&log)?;
        let mut t = Tracker {
            log,
            used_start: Vec::new(),
            active: true,
        };
        t.restart(w);
        Ok(Some(t))
    }

    /// Forgets everything logged and written so far: checks cover what follows.
    pub fn restart(&mut self, w: &mut Workload) {
        self.log.clear();
        w.take_device_pages();
        self.used_start = w
            .driver
            .queues_mut()
            .iter()
            .map(|q| q.driver_queue().used_idx())
            .collect();
    }

    /// The log, to hand to a destination.
    pub fn log(&self) -> Option<&DirtyLog> {
        self.active.then_some(&self.log)
    }

    /// Whether the backend the device runs on now logs (a destination without LOG_SHMFD ends
    /// the checks).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Follows the device to where it runs now.
    pub fn follow(&mut self, w: &mut Workload) {
        self.active = self.active && w.driver.session().supports_dirty_log();
    }

    /// Checks, with the device stopped, that every page it wrote since the last check is
    /// marked: read buffers, status bytes, used-ring entries and the used index.
    fn check(&mut self, w: &mut Workload) -> DirtyCheck {
        let bitmap = self.log.take();
        let mut expected: BTreeMap<u64, &'static str> = w.take_device_pages();
        for (qi, q) in w.driver.queues_mut().iter().enumerate() {
            let dq = q.driver_queue();
            let (start, end) = (self.used_start[qi], dq.used_idx());
            let used = dq.used_ring_gpa();
            if start != end {
                expected.insert((used + 2) / LOG_PAGE_SIZE, "used index");
            }
            let mut i = start;
            while i != end {
                let elem = used + 4 + 8 * u64::from(i % dq.size());
                expected.entry(elem / LOG_PAGE_SIZE).or_insert("used ring");
                i = i.wrapping_add(1);
            }
            self.used_start[qi] = end;
        }
        DirtyCheck {
            expected: expected.len() as u64,
            missing: expected
                .into_iter()
                .filter(|&(p, _)| !bitmap.is_dirty(p * LOG_PAGE_SIZE))
                .collect(),
            marked: bitmap.count(),
        }
    }
}

/// Migrates the device of `w` to the backend listening on `dest`, with `tamper` applied to the
/// state. A refusal is an [`Outcome::Refused`] with the source serving again; anything else
/// that fails is an error.
pub fn migrate(
    w: &mut Workload,
    tracker: Option<&mut Tracker>,
    dest: &Path,
    tamper: Option<Tamper>,
) -> anyhow::Result<Hop> {
    // Connected before the stop, as a VMM is to its backends: the pause is the handover only.
    let dest = w.driver.session().connect_destination(dest)?;
    // Stop the source with the queues full: requests it is working on must complete before
    // GET_VRING_BASE replies, and those it has not taken yet go to the destination. The last
    // ones are published without a kick, so that usually some are left for the destination.
    w.fill_unkicked()?;
    // Where the driver is: what it reaped and what it published.
    let before: Vec<(u16, u16)> = w
        .driver
        .queues_mut()
        .iter()
        .map(|q| (q.driver_queue().last_used(), q.driver_queue().avail_idx()))
        .collect();
    let in_flight = w.in_flight() as u64;
    let t = Instant::now();
    let bases = w.driver.session().stop_rings()?;
    let stop = t.elapsed();
    let mut completed_by_source = 0;
    let mut resumed_by_destination = 0;
    for &(qi, base) in &bases {
        let q = &w.driver.queues_mut()[usize::from(qi)];
        let used = q.driver_queue().used_idx();
        let (last_used, avail) = before[usize::from(qi)];
        if used != base {
            w.violations.push(format!(
                "queue {qi}: GET_VRING_BASE answered {base}, but the device had completed only up to {used}: \
                 it replied before finishing the requests it had taken"
            ));
        }
        completed_by_source += u64::from(used.wrapping_sub(last_used));
        resumed_by_destination += u64::from(avail.wrapping_sub(base));
    }
    // Record what the source completed while stopping (nothing is signalled any more).
    w.reap(WaitMode::NoWait)?;
    let mut tracker = tracker;
    let dirty = tracker
        .as_deref_mut()
        .filter(|t| t.is_active())
        .map(|t| t.check(w));
    let t = Instant::now();
    let session = w.driver.session();
    let mut state = if session.supports_device_state() {
        match session.save_device_state() {
            Ok(s) => Some(s),
            Err(e) => {
                session.resume_rings(&bases)?;
                return Err(anyhow::Error::new(e).context("the source could not save its state"));
            }
        }
    } else {
        None
    };
    let save = t.elapsed();
    let state_len = state.as_ref().map(Vec::len);
    if let (Some(tamper), Some(blob)) = (tamper, state.as_mut()) {
        if let Err(why) = tamper.apply(blob) {
            session.resume_rings(&bases)?;
            anyhow::bail!("cannot make the case \"{}\": {why}", tamper.name());
        }
    }
    let log = tracker.as_deref().and_then(Tracker::log);
    let source = session.options().path().to_path_buf();
    let t = Instant::now();
    let result = session.move_to(dest, &bases, state.as_deref(), log);
    let switch = t.elapsed();
    let outcome = match result {
        Ok(old) => {
            old.shutdown();
            Outcome::Migrated
        }
        Err(e) if !session.is_on(&source) => {
            return Err(anyhow::Error::new(e).context(
                "the destination failed after its rings started; the device stays there",
            ));
        }
        Err(e) => {
            session.resume_rings(&bases)?;
            if !is_refusal(&e) {
                return Err(anyhow::Error::new(e).context("the migration failed"));
            }
            Outcome::Refused(format!("{:#}", anyhow::Error::new(e)))
        }
    };
    Ok(Hop {
        outcome,
        stop,
        save,
        switch,
        state_len,
        in_flight,
        completed_by_source,
        resumed_by_destination,
        dirty,
    })
}

/// A refusal by the destination, including lacking a protocol feature the migration needs
/// (DEVICE_STATE when the source has state to give).
fn is_refusal(e: &MigrationError) -> bool {
    e.is_refusal() || matches!(e, MigrationError::NotNegotiated { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tampering_changes_what_it_says() {
        let mut blob = b"OBSTATE\0\x01\x00\x02\x00\x00\x00rest".to_vec();
        Tamper::DeviceType.apply(&mut blob).unwrap();
        assert_eq!(&blob[10..14], &1u32.to_le_bytes());
        let len = blob.len();
        Tamper::Truncate.apply(&mut blob).unwrap();
        assert_eq!(blob.len(), len / 2);
        let before = blob.clone();
        Tamper::FlipByte.apply(&mut blob).unwrap();
        assert_ne!(blob, before);
        assert!(Tamper::DeviceType.apply(&mut b"QEMU".to_vec()).is_err());
        assert!(Tamper::Truncate.apply(&mut Vec::new()).is_err());
    }
}
