//! Dirty-page logging into the frontend's log (vhost-user LOG_SHMFD).
//!
//! The frontend shares a bitmap with one bit per 4 KiB page of guest-physical space
//! (`log[page / 8] |= 1 << (page % 8)`). While logging is on, every byte the device writes into
//! guest memory must set its page's bit before the write can be seen as done, or a migration
//! misses it.
//!
//! The log lives inside the memory type: each mapped region carries a [`RegionDirty`] bitmap (a
//! vm-memory `Bitmap`) that knows its region's GPA and shares one [`LogSlot`] with the whole
//! table. vm-memory calls it on every write through its API, so a device cannot forget to log;
//! writes that bypass vm-memory (the kernel filling guest buffers for io_uring) are marked
//! through the same bitmap by the code that submits them. With no log attached, marking costs one
//! plain atomic load of a flag (see [`LogSlot`]): it runs for every write a device makes.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use crate::MemoryError;

/// The page size the vhost-user log counts in.
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// The frontend's dirty bitmap, mapped in this process.
#[derive(Debug)]
pub struct DirtyLog {
    map: MmapRegion<()>,
}

impl DirtyLog {
    /// Maps `size` bytes of `file` at `offset` as the log.
    pub fn new(file: std::fs::File, offset: u64, size: u64) -> Result<Self, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::Overflow { gpa: 0, size })?;
        if len == 0 {
            return Err(MemoryError::EmptyRegion { gpa: 0 });
        }
        // The log is mapped from a frontend file like guest memory, and written on every logged
        // guest write: shrunk under the mapping, it would kill the backend with SIGBUS (found by
        // the vhost_user_session fuzz target). Sealed before its size is checked.
        crate::seal_against_shrinking(&file, "the dirty log", 0);
        let meta = file
            .metadata()
            .map_err(|source| MemoryError::Stat { gpa: 0, source })?;
        let needed = offset
            .checked_add(size)
            .ok_or(MemoryError::Overflow { gpa: 0, size })?;
        if meta.file_type().is_file() && meta.len() < needed {
            return Err(MemoryError::BeyondFile {
                gpa: 0,
                needed,
                file_size: meta.len(),
            });
        }
        let map = MmapRegion::from_file(FileOffset::new(file, offset), len).map_err(|source| {
            MemoryError::Map {
                gpa: 0,
                size,
                source,
            }
        })?;
        Ok(DirtyLog { map })
    }

    /// The file the log is mapped from and the offset of the log in it (live upgrade hands
    /// them to the next process).
    pub fn file(&self) -> Option<(&std::fs::File, u64)> {
        self.map.file_offset().map(|f| (f.file(), f.start()))
    }

    /// The number of bytes in the log.
    pub fn len(&self) -> usize {
        self.map.size()
    }

    /// Whether the log has no bytes (never true for a mapped log).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks the pages of `[gpa, gpa + len)` dirty. Pages past the end of the log are not
    /// tracked (the frontend sizes the log to cover all of guest memory).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        let pages = (self.len() as u64) * 8;
        if first >= pages {
            return;
        }
        let last = last.min(pages - 1);
        let slice = self.map.as_volatile_slice();
        let mut page = first;
        while page <= last {
            let word = page / 64;
            let bit = page % 64;
            let span = (64 - bit).min(last - page + 1);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            let offset = (word * 8) as usize;
            match slice.get_atomic_ref::<AtomicU64>(offset) {
                Ok(w) => {
                    // The log is little-endian bit order within bytes; so is a u64 on the
                    // little-endian hosts vhost-user runs on.
                    w.fetch_or(mask.to_le(), Ordering::SeqCst);
                }
                Err(_) => self.mark_bytes(page, span),
            }
            page += span;
        }
    }

    /// The slow path for the log's last bytes when its size is not a multiple of 8.
    fn mark_bytes(&self, first: u64, count: u64) {
        let slice = self.map.as_volatile_slice();
        for page in first..first + count {
            if let Ok(b) = slice.get_atomic_ref::<AtomicU8>((page / 8) as usize) {
                b.fetch_or(1 << (page % 8), Ordering::SeqCst);
            }
        }
    }

    /// Whether the page holding `gpa` is marked.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE_SIZE;
        self.map
            .as_volatile_slice()
            .get_atomic_ref::<AtomicU8>((page / 8) as usize)
            .map(|b| b.load(Ordering::SeqCst) & (1 << (page % 8)) != 0)
            .unwrap_or(false)
    }
}

/// Where the current log (if any) is found; one per memory table, shared by its regions.
///
/// Every write into guest memory asks it for the log, also while none is set (nearly always):
/// an `ArcSwap` load takes a thread-local debt slot with an atomic exchange, which made the
/// check alone ~15 % of `vhost-user-net`'s cycles. `active` answers "no log" with one plain
/// load. While it is set, each thread keeps the log it last used with the slot's generation
/// (numbers unique in the process, a new one for every change): a write loads the generation
/// and, when it matches, uses the thread's copy with no atomic read-modify-write. Only a changed
/// generation loads the log itself. Logging a 4 KiB read costs four marks (data, status, used
/// entry, used index), so this took two locked instructions off each of them.
#[derive(Debug, Default)]
pub struct LogSlot {
    /// Set while `log` holds a log: set after it is stored, cleared before it is taken away,
    /// so that it is never clear while a log is set (a write never misses a log).
    active: AtomicBool,
    /// Changes with every [`LogSlot::store`], after `log` is stored (0: never set).
    generation: AtomicU64,
    log: ArcSwapOption<DirtyLog>,
}

/// Generations of every slot in the process: a thread's cached log can only match the slot and
/// the store it was loaded for.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The log this thread last wrote into, with its slot's generation then. It keeps that log
    /// mapped until the thread next logs into another one or exits (one log per thread at most).
    static CACHED_LOG: RefCell<Option<(u64, Arc<DirtyLog>)>> = const { RefCell::new(None) };
}

impl LogSlot {
    /// A slot with no log.
    pub fn empty() -> Self {
        LogSlot::default()
    }

    /// Sets the log (`Some`) or takes it away (`None`); writes that start after this returns
    /// see the change.
    pub fn store(&self, log: Option<Arc<DirtyLog>>) {
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        if log.is_some() {
            self.log.store(log);
            self.generation.store(generation, Ordering::SeqCst);
            self.active.store(true, Ordering::SeqCst);
        } else {
            self.active.store(false, Ordering::SeqCst);
            self.log.store(None);
            self.generation.store(generation, Ordering::SeqCst);
        }
    }

    /// Whether a log is set.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// Calls `f` with the current log, if one is set.
    fn with_log<R>(&self, f: impl FnOnce(&DirtyLog) -> R) -> Option<R> {
        // On x86 a SeqCst load is a plain load: this is the whole cost with no log.
        if !self.active.load(Ordering::SeqCst) {
            return None;
        }
        // Read before the log: the log loaded below is this generation's or a newer one, and a
        // newer one is loaded again the next time (the generation has moved on).
        let generation = self.generation.load(Ordering::SeqCst);
        let mut f = Some(f);
        let cached = CACHED_LOG.try_with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some((g, log)) = cache.as_ref() {
                if *g == generation {
                    return Some((f.take().expect("called once"))(log));
                }
            }
            let log = self.log.load_full()?;
            let r = (f.take().expect("called once"))(&log);
            *cache = Some((generation, log));
            Some(r)
        });
        match cached {
            Ok(r) => r,
            // The thread is exiting (its cache is gone, `f` unused): no caching.
            Err(_) => self.log.load().as_deref().map(f.take()?),
        }
    }
}

#[derive(Debug)]
struct RegionLog {
    gpa: u64,
    slot: Arc<LogSlot>,
}

/// The vm-memory bitmap of one region: it forwards marks to the table's log, translated to GPAs.
#[derive(Debug, Default)]
pub struct RegionDirty {
    log: Option<RegionLog>,
}

impl RegionDirty {
    /// The bitmap of a region that starts at `gpa` and logs into `slot`.
    pub fn new(gpa: u64, slot: Arc<LogSlot>) -> Self {
        RegionDirty {
            log: Some(RegionLog { gpa, slot }),
        }
    }
}

impl<'a> WithBitmapSlice<'a> for RegionDirty {
    type S = RefSlice<'a, RegionDirty>;
}

impl Bitmap for RegionDirty {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(rl) = &self.log {
            rl.slot
                .with_log(|log| log.mark(rl.gpa.wrapping_add(offset as u64), len as u64));
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.as_ref().is_some_and(|rl| {
            rl.slot
                .with_log(|log| log.is_dirty(rl.gpa.wrapping_add(offset as u64)))
                .unwrap_or(false)
        })
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, RegionDirty> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for RegionDirty {
    fn with_len(_len: usize) -> Self {
        RegionDirty::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MFdFlags};

    fn log(bytes: u64) -> (DirtyLog, MmapRegion<()>) {
        let fd = memfd_create("log", MFdFlags::MFD_CLOEXEC).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(bytes).unwrap();
        let view = MmapRegion::from_file(
            FileOffset::new(file.try_clone().unwrap(), 0),
            bytes as usize,
        )
        .unwrap();
        (DirtyLog::new(file, 0, bytes).unwrap(), view)
    }

    fn byte(view: &MmapRegion<()>, i: usize) -> u8 {
        view.as_volatile_slice()
            .get_atomic_ref::<AtomicU8>(i)
            .unwrap()
            .load(Ordering::SeqCst)
    }

    #[test]
    fn marks_follow_the_spec_bit_layout() {
        let (log, view) = log(16);
        // Page 0 and page 9 (bit 1 of byte 1).
        log.mark(0, 1);
        log.mark(9 * LOG_PAGE_SIZE + 5, 10);
        assert_eq!(byte(&view, 0), 0b1);
        assert_eq!(byte(&view, 1), 0b10);
        // A range across a word boundary: pages 62..=66.
        log.mark(62 * LOG_PAGE_SIZE, 5 * LOG_PAGE_SIZE);
        assert_eq!(byte(&view, 7), 0b1100_0000);
        assert_eq!(byte(&view, 8), 0b0000_0111);
        assert!(log.is_dirty(66 * LOG_PAGE_SIZE));
        assert!(!log.is_dirty(67 * LOG_PAGE_SIZE));
    }

    #[test]
    fn marks_past_the_end_and_odd_sizes_are_safe() {
        let (log, view) = log(3);
        log.mark(20 * LOG_PAGE_SIZE, 100 * LOG_PAGE_SIZE);
        assert_eq!(byte(&view, 2), 0b1111_0000);
        log.mark(u64::MAX - 10, 100);
        log.mark(0, 0);
        assert_eq!(byte(&view, 0), 0);
    }

    #[test]
    fn a_sealable_log_memfd_cannot_be_shrunk_under_the_mapping() {
        // Regression (vhost_user_session fuzz target): a frontend that truncated its log memfd
        // after SET_LOG_BASE made the next logged guest write fault with SIGBUS.
        let fd = memfd_create("log", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(64).unwrap();
        let log = DirtyLog::new(file.try_clone().unwrap(), 0, 64).unwrap();
        assert!(
            file.set_len(0).is_err(),
            "the frontend cannot shrink the log"
        );
        log.mark(63 * 8 * LOG_PAGE_SIZE, 1);
        assert!(log.is_dirty(63 * 8 * LOG_PAGE_SIZE));
    }

    #[test]
    fn region_bitmap_logs_at_its_gpa_only_while_a_log_is_attached() {
        let (dl, view) = log(8);
        let slot = Arc::new(LogSlot::empty());
        let region = RegionDirty::new(0x10000, slot.clone());
        region.mark_dirty(0x10, 1);
        assert_eq!(byte(&view, 2), 0, "no log attached yet");
        slot.store(Some(Arc::new(dl)));
        region.slice_at(0x1000).mark_dirty(0, 1);
        // GPA 0x11000 is page 17: byte 2, bit 1.
        assert_eq!(byte(&view, 2), 0b10);
        assert!(region.dirty_at(0x1000));
        slot.store(None);
        region.mark_dirty(0x2000, 1);
        assert_eq!(
            byte(&view, 2),
            0b10,
            "the log was taken away: page 18 stays clean"
        );
        assert!(!region.dirty_at(0x1000), "no log, nothing reported");
    }

    #[test]
    fn a_thread_writing_through_two_slots_marks_each_slots_own_current_log() {
        // Each thread caches the last log it used; the cache must never hand one slot's log to
        // another slot, nor a replaced log to a write that starts after the replacement.
        let (a_log, a_view) = log(8);
        let (b_log, b_view) = log(8);
        let (c_log, c_view) = log(8);
        let a = Arc::new(LogSlot::empty());
        let b = Arc::new(LogSlot::empty());
        a.store(Some(Arc::new(a_log)));
        b.store(Some(Arc::new(b_log)));
        let ra = RegionDirty::new(0, a.clone());
        let rb = RegionDirty::new(0, b.clone());
        ra.mark_dirty(0, 1); // page 0 into a
        rb.mark_dirty(LOG_PAGE_SIZE as usize, 1); // page 1 into b
        ra.mark_dirty(2 * LOG_PAGE_SIZE as usize, 1); // page 2 into a
        assert_eq!(byte(&a_view, 0), 0b101);
        assert_eq!(byte(&b_view, 0), 0b010);
        // Replaced on this thread and on another one: the next write goes to the new log.
        a.store(Some(Arc::new(c_log)));
        ra.mark_dirty(3 * LOG_PAGE_SIZE as usize, 1);
        assert_eq!(byte(&c_view, 0), 0b1000);
        assert_eq!(
            byte(&a_view, 0),
            0b101,
            "the replaced log gets nothing more"
        );
        let rb2 = RegionDirty::new(0, b.clone());
        std::thread::spawn(move || rb2.mark_dirty(4 * LOG_PAGE_SIZE as usize, 1))
            .join()
            .unwrap();
        assert_eq!(byte(&b_view, 0), 0b10010);
        // Taken away: a write through the thread's cached log would be a missed change.
        b.store(None);
        rb.mark_dirty(5 * LOG_PAGE_SIZE as usize, 1);
        assert_eq!(byte(&b_view, 0), 0b10010);
    }

    #[test]
    fn the_slot_is_active_exactly_while_a_log_is_set() {
        let slot = LogSlot::empty();
        assert!(!slot.is_active());
        assert_eq!(slot.with_log(|_| ()), None);
        let (dl, _view) = log(8);
        let dl = Arc::new(dl);
        slot.store(Some(dl.clone()));
        assert!(slot.is_active());
        assert_eq!(slot.with_log(|l| l.len()), Some(8));
        // Replacing one log by another keeps logging on.
        let (other, _other_view) = log(16);
        slot.store(Some(Arc::new(other)));
        assert_eq!(slot.with_log(|l| l.len()), Some(16));
        slot.store(None);
        assert!(!slot.is_active());
        assert_eq!(slot.with_log(|l| l.len()), None);
    }
}
