//! The verifying virtio-blk workload and its model of the disk.
//!
//! Every write fills a whole 4 KiB block with a self-describing record: a magic, the block
//! number, a sequence number that grows with every write the runner issues, a payload derived
//! from both, and a CRC-32 over all of it. The model holds, per block, the sequence number of the
//! last write that completed (or a hash of the block as it was found at the start). At most one
//! request per block is in flight, so the model is exact: a read must return precisely the
//! model's content. A read that returns an older sequence number proves a lost or reordered
//! write; every submitted request must complete exactly once (the driver rejects a used id that
//! is not in flight, and the runner tracks every request itself too).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{bail, Context};
use outboard_frontend::migration::LOG_PAGE_SIZE;
use outboard_frontend::{BlkCompletion, BlkDriver, BlkRequest, BlkStatus, WaitMode};

/// The block the runner reads and writes.
pub const BLOCK: usize = 4096;
const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;
const MAGIC: &[u8; 8] = b"OBMIGRAT";
const CRC_AT: usize = 24;
const PAYLOAD_AT: usize = 28;

/// What a block must contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// What was there at the start (its hash).
    Baseline(u64),
    /// The record of the write with this sequence number.
    Written(u64),
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Read,
    Write(u64),
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    block: u64,
    op: Op,
}

/// Counters of the workload.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// Requests submitted.
    pub submitted: u64,
    /// Requests completed.
    pub completed: u64,
    /// Writes completed.
    pub writes: u64,
    /// Reads whose content matched the model.
    pub reads_verified: u64,
}

/// The workload: the driver, the model, and what is in flight.
pub struct Workload {
    /// The driver (its session is migrated under it).
    pub driver: BlkDriver,
    blocks: u64,
    model: Vec<Expect>,
    busy: Vec<bool>,
    pending: Vec<HashMap<u16, Pending>>,
    next_seq: u64,
    rng: u64,
    depth: u16,
    /// Counters.
    pub counts: Counts,
    /// Every way the device broke its contract, in words.
    pub violations: Vec<String>,
    /// Guest pages the device wrote since the last [`Workload::take_device_pages`] (read data
    /// and status bytes; the used ring is added by the caller).
    device_pages: BTreeMap<u64, &'static str>,
    done: Vec<BlkCompletion>,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("blocks", &self.blocks)
            .field("counts", &self.counts)
            .finish()
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The record a write of `seq` puts in `block`.
fn record(block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut x = (block << 40 ^ seq).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in b[PAYLOAD_AT..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let crc = crc32fast::hash(&b[PAYLOAD_AT..]) ^ crc32fast::hash(&b[..CRC_AT]);
    b[CRC_AT..PAYLOAD_AT].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Explains how `got` differs from what `block` must hold, or `None` if it matches.
fn check_block(block: u64, expect: Expect, got: &[u8]) -> Option<String> {
    match expect {
        Expect::Baseline(h) if fnv(got) == h => return None,
        Expect::Written(seq) if got == record(block, seq).as_slice() => return None,
        _ => {}
    }
    let want = match expect {
        Expect::Baseline(_) => "its original content".to_string(),
        Expect::Written(seq) => format!("write #{seq}"),
    };
    if &got[..8] != MAGIC {
        return Some(format!(
            "block {block}: expected {want}, found unknown content"
        ));
    }
    let found_block = u64::from_le_bytes(got[8..16].try_into().expect("8 bytes"));
    let found_seq = u64::from_le_bytes(got[16..24].try_into().expect("8 bytes"));
    if got != record(found_block, found_seq).as_slice() {
        return Some(format!(
            "block {block}: expected {want}, found a corrupt record (checksum mismatch)"
        ));
    }
    if found_block != block {
        return Some(format!(
            "block {block}: expected {want}, found write #{found_seq} of block {found_block} (misdirected write)"
        ));
    }
    let why = match expect {
        Expect::Written(seq) if found_seq < seq => "a completed write was lost or reordered",
        Expect::Written(_) => "a write the model has not seen completed",
        Expect::Baseline(_) => "a write that never completed",
    };
    Some(format!(
        "block {block}: expected {want}, found write #{found_seq}: {why}"
    ))
}

impl Workload {
    /// Reads the first `blocks` blocks (or the whole disk, if smaller) to learn their content.
    pub fn new(mut driver: BlkDriver, blocks: u64, depth: u16, seed: u64) -> anyhow::Result<Self> {
        let capacity = driver.config().capacity_bytes() / BLOCK as u64;
        let blocks = blocks.min(capacity);
        if blocks == 0 {
            bail!("the disk holds no whole 4 KiB block");
        }
        let queues = driver.num_queues();
        let mut model = Vec::with_capacity(blocks as usize);
        let mut buf = vec![0u8; BLOCK];
        for b in 0..blocks {
            let status = driver
                .queue(0)
                .read(b * SECTORS_PER_BLOCK, &mut buf)
                .context("reading the disk's initial content")?;
            if status != BlkStatus::Ok {
                bail!("reading block {b} at the start failed with status {status:?}");
            }
            model.push(Expect::Baseline(fnv(&buf)));
        }
        Ok(Workload {
            driver,
            blocks,
            model,
            busy: vec![false; blocks as usize],
            pending: vec![HashMap::new(); queues],
            next_seq: 1,
            rng: seed | 1,
            depth,
            counts: Counts::default(),
            violations: Vec::new(),
            device_pages: BTreeMap::new(),
            done: Vec::new(),
        })
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Requests in flight on every queue.
    pub fn in_flight(&self) -> usize {
        self.pending.iter().map(HashMap::len).sum()
    }

    /// Tops every queue up to the queue depth with random reads and writes of idle blocks, and
    /// kicks each queue once.
    pub fn fill(&mut self) -> anyhow::Result<()> {
        self.top_up(true)
    }

    /// Tops every queue up and publishes the requests without notifying the device: a device
    /// that is not already looking at the ring leaves them to whoever runs it next.
    pub fn fill_unkicked(&mut self) -> anyhow::Result<()> {
        self.top_up(false)
    }

    fn top_up(&mut self, kick: bool) -> anyhow::Result<()> {
        for qi in 0..self.pending.len() {
            let mut added = false;
            while self.pending[qi].len() < usize::from(self.depth) {
                let Some(slot) = self.driver.queues_mut()[qi].free_slot() else {
                    break;
                };
                let block = self.idle_block();
                let Some(block) = block else { break };
                let op = if self.random() & 1 == 0 {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    Op::Write(seq)
                } else {
                    Op::Read
                };
                let q = &mut self.driver.queues_mut()[qi];
                let sector = block * SECTORS_PER_BLOCK;
                let req = match op {
                    Op::Write(seq) => {
                        q.slot_data(slot).write_at(0, &record(block, seq));
                        BlkRequest::write(sector, BLOCK as u32)
                    }
                    Op::Read => {
                        q.slot_data(slot).fill(0, BLOCK, 0xa5);
                        BlkRequest::read(sector, BLOCK as u32)
                    }
                };
                q.submit(slot, req)?;
                self.busy[block as usize] = true;
                self.pending[qi].insert(slot, Pending { block, op });
                self.counts.submitted += 1;
                added = true;
            }
            let q = &mut self.driver.queues_mut()[qi];
            match (added, kick) {
                (true, true) => {
                    q.kick()?;
                }
                (true, false) => q.driver_queue_mut().publish(),
                (false, _) => {}
            }
        }
        Ok(())
    }

    fn idle_block(&mut self) -> Option<u64> {
        for _ in 0..64 {
            let b = self.random() % self.blocks;
            if !self.busy[b as usize] {
                return Some(b);
            }
        }
        (0..self.blocks).find(|&b| !self.busy[b as usize])
    }

    /// Reaps completions on every queue, waiting as `wait` says on the first queue with
    /// requests in flight, and checks each one. Returns how many completed.
    pub fn reap(&mut self, wait: WaitMode) -> anyhow::Result<usize> {
        let mut total = 0;
        let mut first = true;
        for qi in 0..self.pending.len() {
            let mode = if first && !self.pending[qi].is_empty() {
                first = false;
                wait
            } else {
                WaitMode::NoWait
            };
            let mut done = std::mem::take(&mut self.done);
            done.clear();
            let q = &mut self.driver.queues_mut()[qi];
            match q.reap(mode, &mut done) {
                Ok(_) => {}
                Err(outboard_frontend::BlkError::Queue(
                    outboard_frontend::QueueError::Timeout { .. },
                )) => {}
                Err(e) => {
                    self.violations
                        .push(format!("queue {qi}: the device broke the ring: {e}"));
                    return Err(anyhow::Error::new(e).context("reaping completions"));
                }
            }
            for c in &done {
                self.complete(qi, c);
            }
            total += done.len();
            self.done = done;
        }
        Ok(total)
    }

    fn complete(&mut self, qi: usize, c: &BlkCompletion) {
        let Some(p) = self.pending[qi].remove(&c.slot) else {
            self.violations.push(format!(
                "queue {qi}: slot {} completed but nothing was in flight there (a request completed twice)",
                c.slot
            ));
            return;
        };
        self.counts.completed += 1;
        self.busy[p.block as usize] = false;
        let q = &self.driver.queues_mut()[qi];
        self.device_pages
            .insert(q.slot_status_gpa(c.slot) / LOG_PAGE_SIZE, "status byte");
        if c.status != BlkStatus::Ok {
            self.violations.push(format!(
                "block {}: {:?} failed with status {:?}",
                p.block, p.op, c.status
            ));
            return;
        }
        match p.op {
            Op::Write(seq) => {
                self.model[p.block as usize] = Expect::Written(seq);
                self.counts.writes += 1;
            }
            Op::Read => {
                let data = q.slot_data(c.slot);
                let first = data.gpa() / LOG_PAGE_SIZE;
                let last = (data.gpa() + BLOCK as u64 - 1) / LOG_PAGE_SIZE;
                self.device_pages
                    .extend((first..=last).map(|p| (p, "read buffer")));
                let mut got = vec![0u8; BLOCK];
                data.read_at(0, &mut got);
                match check_block(p.block, self.model[p.block as usize], &got) {
                    None => self.counts.reads_verified += 1,
                    Some(v) => self.violations.push(v),
                }
            }
        }
    }

    /// Runs until `ops` more requests have completed, keeping every queue full.
    pub fn run(&mut self, ops: u64, timeout: Duration) -> anyhow::Result<()> {
        let target = self.counts.completed + ops;
        while self.counts.completed < target {
            self.fill()?;
            let before = self.counts.completed;
            self.reap(WaitMode::Block(timeout))?;
            if self.counts.completed == before && self.in_flight() > 0 {
                bail!(
                    "no request completed within {timeout:?} ({} in flight)",
                    self.in_flight()
                );
            }
        }
        Ok(())
    }

    /// Waits until nothing is in flight.
    pub fn drain(&mut self, timeout: Duration) -> anyhow::Result<()> {
        while self.in_flight() > 0 {
            let before = self.counts.completed;
            self.reap(WaitMode::Block(timeout))?;
            if self.counts.completed == before {
                bail!(
                    "{} requests never completed (lost across a migration?)",
                    self.in_flight()
                );
            }
        }
        Ok(())
    }

    /// The guest pages the device wrote since the last call (read buffers and status bytes),
    /// each with what it holds.
    pub fn take_device_pages(&mut self) -> BTreeMap<u64, &'static str> {
        std::mem::take(&mut self.device_pages)
    }

    /// Reads every block of the working set back (nothing may be in flight) and checks it
    /// against the model. Returns (blocks read, mismatches).
    pub fn read_back(&mut self) -> anyhow::Result<(u64, Vec<String>)> {
        let mut bad = Vec::new();
        let mut buf = vec![0u8; BLOCK];
        for b in 0..self.blocks {
            let status = self
                .driver
                .queue(0)
                .read(b * SECTORS_PER_BLOCK, &mut buf)
                .context("reading the disk back")?;
            if status != BlkStatus::Ok {
                bad.push(format!(
                    "block {b}: read-back failed with status {status:?}"
                ));
                continue;
            }
            if let Some(v) = check_block(b, self.model[b as usize], &buf) {
                bad.push(v);
            }
        }
        // The synchronous reads also wrote pages; they are not part of any hop's check.
        self.device_pages.clear();
        Ok((self.blocks, bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_describe_themselves_and_differences_are_named() {
        let r = record(7, 42);
        assert_eq!(check_block(7, Expect::Written(42), &r), None);
        let older = check_block(7, Expect::Written(43), &r).unwrap();
        assert!(older.contains("lost or reordered"), "{older}");
        let other = check_block(8, Expect::Written(42), &r).unwrap();
        assert!(other.contains("misdirected"), "{other}");
        let mut corrupt = r.clone();
        corrupt[100] ^= 1;
        let c = check_block(7, Expect::Written(42), &corrupt).unwrap();
        assert!(c.contains("checksum"), "{c}");
        let zero = vec![0u8; BLOCK];
        assert_eq!(check_block(1, Expect::Baseline(fnv(&zero)), &zero), None);
        assert!(check_block(1, Expect::Baseline(fnv(&zero)), &r).is_some());
        assert_ne!(record(7, 42), record(7, 43));
    }
}
