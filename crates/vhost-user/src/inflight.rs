//! The inflight region of `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, in the specification's layout
//! for split rings.
//!
//! The backend creates the region when the frontend asks for it (GET_INFLIGHT_FD); the frontend
//! keeps the fd and hands it back to a restarted backend (SET_INFLIGHT_FD), which finds there
//! what its predecessor had taken and not answered. Each queue has one record:
//!
//! ```text
//! QueueRegionSplit { features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16,
//!                    desc[desc_num]: DescStateSplit { inflight u8, padding [u8; 5], next u16,
//!                                                     counter u64 } }
//! ```
//!
//! padded to 64 bytes; the records follow each other. The region is shared with the frontend,
//! which the backend does not trust: every index read back is bounded by the queue size, every
//! walk by the number of entries, and a record whose header does not match the queue is started
//! afresh rather than believed.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use outboard_virtio::inflight::{InflightLog, InflightSource, Recovery};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

/// The record layout's version.
const VERSION: u16 = 1;
/// The header of one queue's record.
const HEADER: usize = 16;
/// One descriptor's entry.
const ENTRY: usize = 16;
/// Records are padded to this.
const ALIGN: usize = 64;
/// The largest split ring.
const MAX_QUEUE_SIZE: u16 = 32768;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH: usize = 12;
const OFF_USED_IDX: usize = 14;
const ENTRY_INFLIGHT: usize = 0;
const ENTRY_NEXT: usize = 6;
const ENTRY_COUNTER: usize = 8;

/// Why a region was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Queue count or size outside what the device has.
    #[error("inflight region for {num_queues} queue(s) of {queue_size} entries: {why}")]
    Shape {
        /// Queues asked for.
        num_queues: u16,
        /// Entries per queue asked for.
        queue_size: u16,
        /// What is wrong.
        why: &'static str,
    },
    /// The size does not match the shape.
    #[error("inflight region of {got} bytes, {want} expected for its queues")]
    Size {
        /// Given.
        got: u64,
        /// What the layout needs.
        want: u64,
    },
    /// The offset cannot be mapped.
    #[error("inflight region offset {0:#x} is not page-aligned")]
    Offset(u64),
    /// The file is smaller than the region.
    #[error("inflight file of {file} bytes cannot hold {end} bytes")]
    ShortFile {
        /// The file's size.
        file: u64,
        /// Offset plus size.
        end: u64,
    },
    /// A system call failed.
    #[error("inflight region: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// The bytes of one queue's record.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + ENTRY * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// The shape of a region: how many queues of how many entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflightShape {
    /// Queues.
    pub num_queues: u16,
    /// Entries per queue (the largest ring size).
    pub queue_size: u16,
}

impl InflightShape {
    /// Checks a frontend's shape against a device with `device_queues` queues.
    pub fn new(
        num_queues: u16,
        queue_size: u16,
        device_queues: usize,
    ) -> Result<Self, InflightError> {
        let bad = |why| InflightError::Shape {
            num_queues,
            queue_size,
            why,
        };
        if num_queues == 0 || usize::from(num_queues) > device_queues {
            return Err(bad("the queue count is not the device's"));
        }
        if queue_size == 0 || queue_size > MAX_QUEUE_SIZE || !queue_size.is_power_of_two() {
            return Err(bad("the queue size is not a power of two up to 32768"));
        }
        Ok(InflightShape {
            num_queues,
            queue_size,
        })
    }

    /// The bytes of the whole region.
    pub fn size(&self) -> u64 {
        u64::from(self.num_queues) * queue_region_size(self.queue_size) as u64
    }
}

/// A mapped inflight region: the source of every queue's record.
#[derive(Debug)]
pub struct InflightRegion {
    map: Arc<MmapRegion<()>>,
    shape: InflightShape,
    file: File,
    offset: u64,
}

impl InflightRegion {
    /// A new, zeroed region in a memfd sealed against resizing (GET_INFLIGHT_FD).
    pub fn create(shape: InflightShape) -> Result<Self, InflightError> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let io = |what| {
            move |e: nix::Error| InflightError::Io {
                what,
                source: e.into(),
            }
        };
        let fd = memfd_create(
            "outboard-inflight",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(io("memfd_create"))?;
        let file = File::from(fd);
        file.set_len(shape.size())
            .map_err(|source| InflightError::Io {
                what: "ftruncate",
                source,
            })?;
        fcntl(
            file.as_fd(),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(io("sealing"))?;
        Self::map(file, 0, shape)
    }

    /// A region the frontend handed back (SET_INFLIGHT_FD), `size` bytes at `offset` of `file`.
    pub fn open(
        file: File,
        offset: u64,
        size: u64,
        shape: InflightShape,
    ) -> Result<Self, InflightError> {
        if size != shape.size() {
            return Err(InflightError::Size {
                got: size,
                want: shape.size(),
            });
        }
        if !offset.is_multiple_of(4096) {
            return Err(InflightError::Offset(offset));
        }
        let len = file
            .metadata()
            .map_err(|source| InflightError::Io {
                what: "fstat",
                source,
            })?
            .len();
        let end = offset
            .checked_add(size)
            .ok_or(InflightError::Offset(offset))?;
        if len < end {
            return Err(InflightError::ShortFile { file: len, end });
        }
        // A frontend that shrank the file under the mapping would kill the backend with SIGBUS.
        outboard_memory::seal_against_shrinking(&file, "inflight region", offset);
        Self::map(file, offset, shape)
    }

    fn map(file: File, offset: u64, shape: InflightShape) -> Result<Self, InflightError> {
        let size = usize::try_from(shape.size()).map_err(|_| InflightError::Size {
            got: shape.size(),
            want: shape.size(),
        })?;
        let dup = file.try_clone().map_err(|source| InflightError::Io {
            what: "dup",
            source,
        })?;
        let map = MmapRegion::from_file(FileOffset::new(dup, offset), size).map_err(|e| {
            InflightError::Io {
                what: "mmap",
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        Ok(InflightRegion {
            map: Arc::new(map),
            shape,
            file,
            offset,
        })
    }

    /// The region's shape.
    pub fn shape(&self) -> InflightShape {
        self.shape
    }

    /// The file behind it (to hand to the frontend or to a successor process).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where the region starts in its file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The record of queue `index`, as this queue's log, if the region has one of the size.
    fn record(&self, index: u16, size: u16) -> Option<QueueRecord> {
        if index >= self.shape.num_queues || size == 0 || size > self.shape.queue_size {
            return None;
        }
        Some(QueueRecord {
            map: self.map.clone(),
            base: usize::from(index) * queue_region_size(self.shape.queue_size),
            size,
            counter: 1,
            completing: Vec::new(),
        })
    }
}

impl InflightSource for InflightRegion {
    fn queue(&self, index: u16, size: u16) -> Option<Box<dyn InflightLog>> {
        match self.record(index, size) {
            Some(r) => Some(Box::new(r)),
            None => {
                log::warn!(
                    "queue {index} of {size} entries has no record in the inflight region ({:?}): \
                     it runs without crash recovery",
                    self.shape
                );
                None
            }
        }
    }
}

/// One queue's record.
#[derive(Debug)]
struct QueueRecord {
    map: Arc<MmapRegion<()>>,
    base: usize,
    size: u16,
    /// The next request's counter.
    counter: u64,
    /// Heads whose used entries are being written.
    completing: Vec<u16>,
}

impl QueueRecord {
    fn store<T: vm_memory::AtomicAccess>(&self, off: usize, v: T, order: Ordering) {
        // In bounds by construction (offsets below the record's size); a failure would be a bug.
        if let Err(e) = self
            .map
            .as_volatile_slice()
            .store(v, self.base + off, order)
        {
            log::error!("inflight record: store at {off}: {e}");
        }
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, off: usize) -> T {
        self.map
            .as_volatile_slice()
            .load(self.base + off, Ordering::Acquire)
            .unwrap_or_default()
    }

    fn entry(head: u16) -> usize {
        HEADER + ENTRY * usize::from(head)
    }

    /// Starts the record afresh for a ring whose used index is `used_idx`.
    fn initialize(&mut self, used_idx: u16) {
        self.store(OFF_VERSION, 0u16, Ordering::Release);
        self.store(0, 0u64, Ordering::Relaxed);
        for i in 0..self.size {
            let e = Self::entry(i);
            self.store(e + ENTRY_INFLIGHT, 0u8, Ordering::Relaxed);
            self.store(e + ENTRY_NEXT, 0u16, Ordering::Relaxed);
            self.store(e + ENTRY_COUNTER, 0u64, Ordering::Relaxed);
        }
        self.store(OFF_DESC_NUM, self.size, Ordering::Relaxed);
        self.store(OFF_LAST_BATCH, 0u16, Ordering::Relaxed);
        self.store(OFF_USED_IDX, used_idx, Ordering::Relaxed);
        self.store(OFF_VERSION, VERSION, Ordering::Release);
        self.counter = 1;
    }
}

impl InflightLog for QueueRecord {
    fn recover(&mut self, used_idx: u16) -> Recovery {
        let version: u16 = self.load(OFF_VERSION);
        let desc_num: u16 = self.load(OFF_DESC_NUM);
        if version == 0 {
            self.initialize(used_idx);
            return Recovery::default();
        }
        if version != VERSION || desc_num != self.size {
            log::warn!(
                "inflight record (version {version}, {desc_num} entries) does not fit a queue of \
                 {} entries: starting it afresh; requests it held are not resubmitted",
                self.size
            );
            self.initialize(used_idx);
            return Recovery::default();
        }
        // A batch whose used index was published but not recorded is complete: clear it.
        let recorded: u16 = self.load(OFF_USED_IDX);
        let batch = used_idx.wrapping_sub(recorded);
        if batch != 0 {
            let mut head: u16 = self.load(OFF_LAST_BATCH);
            for _ in 0..batch.min(self.size) {
                if head >= self.size {
                    break;
                }
                let e = Self::entry(head);
                self.store(e + ENTRY_INFLIGHT, 0u8, Ordering::Relaxed);
                head = self.load(e + ENTRY_NEXT);
            }
            self.store(OFF_USED_IDX, used_idx, Ordering::Release);
        }
        let mut held: Vec<(u64, u16)> = (0..self.size)
            .filter_map(|i| {
                let e = Self::entry(i);
                (self.load::<u8>(e + ENTRY_INFLIGHT) == 1)
                    .then(|| (self.load::<u64>(e + ENTRY_COUNTER), i))
            })
            .collect();
        held.sort_unstable();
        self.counter = held.last().map_or(1, |&(c, _)| c.saturating_add(1));
        Recovery {
            next_avail: Some(used_idx.wrapping_add(held.len() as u16)),
            resubmit: held.into_iter().map(|(_, i)| i).collect(),
        }
    }

    fn taken(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let e = Self::entry(head);
        self.store(e + ENTRY_COUNTER, self.counter, Ordering::Relaxed);
        self.counter = self.counter.wrapping_add(1);
        self.store(e + ENTRY_INFLIGHT, 1u8, Ordering::Release);
    }

    fn untaken(&mut self, head: u16) {
        if head < self.size {
            self.store(Self::entry(head) + ENTRY_INFLIGHT, 0u8, Ordering::Release);
        }
    }

    fn completing(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let last: u16 = self.load(OFF_LAST_BATCH);
        self.store(Self::entry(head) + ENTRY_NEXT, last, Ordering::Relaxed);
        self.store(OFF_LAST_BATCH, head, Ordering::Release);
        self.completing.push(head);
    }

    fn completed(&mut self, used_idx: u16) {
        let mut heads = std::mem::take(&mut self.completing);
        for &head in &heads {
            self.store(Self::entry(head) + ENTRY_INFLIGHT, 0u8, Ordering::Release);
        }
        heads.clear();
        self.completing = heads;
        self.store(OFF_USED_IDX, used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> InflightRegion {
        InflightRegion::create(InflightShape::new(2, 8, 2).unwrap()).unwrap()
    }

    fn log(r: &InflightRegion, q: u16) -> QueueRecord {
        r.record(q, 8).unwrap()
    }

    #[test]
    fn shapes_and_sizes_are_checked() {
        assert!(InflightShape::new(0, 8, 2).is_err());
        assert!(InflightShape::new(3, 8, 2).is_err());
        assert!(InflightShape::new(1, 100, 2).is_err());
        assert!(InflightShape::new(1, 0, 2).is_err());
        let s = InflightShape::new(2, 128, 2).unwrap();
        assert_eq!(s.size(), 2 * (16 + 16 * 128 + 48) as u64);
        let r = region();
        let f = r.file().try_clone().unwrap();
        let e = InflightRegion::open(f, 0, 100, r.shape()).unwrap_err();
        assert!(matches!(e, InflightError::Size { .. }), "{e}");
        let f = r.file().try_clone().unwrap();
        let e = InflightRegion::open(f, 4096, r.shape().size(), r.shape()).unwrap_err();
        assert!(matches!(e, InflightError::ShortFile { .. }), "{e}");
        assert!(r.record(2, 8).is_none() && r.record(0, 16).is_none());
    }

    #[test]
    fn a_fresh_record_resubmits_nothing_and_keeps_the_configured_index() {
        let r = region();
        let mut q = log(&r, 0);
        assert_eq!(q.recover(7), Recovery::default());
        assert_eq!(q.load::<u16>(OFF_VERSION), 1);
        assert_eq!(q.load::<u16>(OFF_USED_IDX), 7);
    }

    #[test]
    fn a_successor_resubmits_what_was_taken_and_not_answered_in_order() {
        let r = region();
        let mut q = log(&r, 1);
        q.recover(0);
        for h in [6, 1, 4, 3] {
            q.taken(h);
        }
        q.completing(1);
        q.completed(1);
        // The process dies; a new one maps the same file.
        let f = r.file().try_clone().unwrap();
        let r2 = InflightRegion::open(f, 0, r.shape().size(), r.shape()).unwrap();
        let mut q2 = log(&r2, 1);
        let rec = q2.recover(1);
        assert_eq!(rec.resubmit, vec![6, 4, 3]);
        assert_eq!(rec.next_avail, Some(4), "used 1 + 3 in flight");
        // Queue 0's record is untouched.
        assert_eq!(log(&r2, 0).recover(0), Recovery::default());
    }

    #[test]
    fn a_used_index_published_but_not_recorded_completes_the_batch() {
        let r = region();
        let mut q = log(&r, 0);
        q.recover(10);
        q.taken(2);
        q.taken(5);
        q.completing(5);
        // Crash after the used index moved to 11, before `completed`.
        let mut q2 = log(&r, 0);
        let rec = q2.recover(11);
        assert_eq!(rec.resubmit, vec![2]);
        assert_eq!(rec.next_avail, Some(12));
        // Crash before the used index moved: the chain is resubmitted.
        let mut q3 = log(&r, 0);
        q3.taken(7);
        q3.completing(7);
        let rec = log(&r, 0).recover(11);
        assert_eq!(rec.resubmit, vec![2, 7]);
    }

    #[test]
    fn a_hostile_record_is_bounded() {
        let r = region();
        let mut q = log(&r, 0);
        q.recover(0);
        // The frontend scribbles: every entry in flight, a batch list that loops and points
        // outside the ring, a used index far away.
        for i in 0..8u16 {
            let e = QueueRecord::entry(i);
            q.store(e + ENTRY_INFLIGHT, 1u8, Ordering::Relaxed);
            q.store(e + ENTRY_NEXT, 0xffffu16, Ordering::Relaxed);
        }
        q.store(OFF_LAST_BATCH, 3u16, Ordering::Relaxed);
        q.store(OFF_USED_IDX, 40_000u16, Ordering::Relaxed);
        let rec = log(&r, 0).recover(5);
        assert!(rec.resubmit.len() <= 8);
        assert!(rec.resubmit.iter().all(|&h| h < 8));
        // A record of another size is started afresh.
        q.store(OFF_DESC_NUM, 4u16, Ordering::Relaxed);
        assert_eq!(log(&r, 0).recover(5), Recovery::default());
        q.store(OFF_VERSION, 9u16, Ordering::Relaxed);
        assert_eq!(log(&r, 0).recover(5), Recovery::default());
    }
}
