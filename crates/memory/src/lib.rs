//! Guest memory as a device sees it, built from the file descriptors a frontend sends.
//!
//! A [`MemoryTable`] is the transport's record of the frontend's memory regions: where each one
//! sits in guest-physical (GPA) space, where it sits in the frontend's own address space (its
//! "user address"), and the mapping of it in this process. Every region is validated before it is
//! mapped: non-empty, no arithmetic overflow, inside its file, no overlap with another region in
//! GPA space nor in user-address space, and no more regions than the slot limit.
//!
//! Devices never see the table: they get a [`GuestMemoryHandle`], an RCU-style handle
//! (vm-memory's `GuestMemoryAtomic`) whose snapshot the transport swaps when regions are added or
//! removed. A worker takes one snapshot per batch of requests. Every access through a snapshot is
//! bounds-checked by vm-memory; an address outside every region is an error, never a fault.
//!
//! IOTLB translation and dirty logging will live inside the snapshot type (vm-memory's
//! `IommuMemory` and bitmap types), so a device cannot forget them; the aliases below are the one
//! place that type is named.
#![forbid(unsafe_code)]

pub mod dirty;

use std::fs::File;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestRegionCollection};

use dirty::{DirtyLog, LogSlot, RegionDirty};

/// One mapped region, with its dirty-log bitmap.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<RegionDirty>;
/// The snapshot type a device reads and writes guest memory through. Every write through it is
/// logged while the frontend has dirty logging on.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<RegionDirty>;
/// An RCU-style handle to the current guest memory; cloning it is cheap.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryMmap>;

/// Why a memory region was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region of size zero.
    #[error("memory region at GPA {gpa:#x} has size zero")]
    EmptyRegion {
        /// Its guest-physical address.
        gpa: u64,
    },
    /// `start + size` overflows in one of the address spaces.
    #[error("memory region at GPA {gpa:#x} with size {size:#x} overflows an address space")]
    Overflow {
        /// Its guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// The region overlaps one already in the table.
    #[error("memory region GPA {gpa:#x}+{size:#x} (user address {uaddr:#x}) overlaps region GPA {other_gpa:#x}")]
    Overlap {
        /// Its guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// Its frontend user address.
        uaddr: u64,
        /// The guest-physical address of the region it overlaps.
        other_gpa: u64,
    },
    /// The table already holds as many regions as it may.
    #[error("no free memory slot: the limit is {limit}")]
    NoFreeSlot {
        /// The slot limit.
        limit: usize,
    },
    /// The region does not fit in its file.
    #[error("memory region at GPA {gpa:#x} needs {needed:#x} bytes of its file, which has {file_size:#x}")]
    BeyondFile {
        /// Its guest-physical address.
        gpa: u64,
        /// `mmap_offset + size`.
        needed: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The file could not be inspected.
    #[error("cannot inspect the file of memory region at GPA {gpa:#x}")]
    Stat {
        /// Its guest-physical address.
        gpa: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map memory region at GPA {gpa:#x} size {size:#x}")]
    Map {
        /// Its guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A region to remove matches none in the table.
    #[error("no memory region GPA {gpa:#x}+{size:#x} (user address {uaddr:#x}) to remove")]
    NotFound {
        /// Its guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// Its frontend user address.
        uaddr: u64,
    },
    /// A frontend address is in no region (or a range crosses a region's end).
    #[error("frontend address range {addr:#x}+{len:#x} is not inside one memory region")]
    Untranslatable {
        /// The address.
        addr: u64,
        /// The length of the range.
        len: u64,
    },
    /// vm-memory refused the collection.
    #[error("cannot assemble guest memory")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// A memory region as the frontend describes it (a validated copy of the wire description).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDescriptor {
    /// Guest-physical address of the region's first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub memory_size: u64,
    /// Address of the region's first byte in the frontend's address space.
    pub user_addr: u64,
    /// Offset of the region's first byte in its file.
    pub mmap_offset: u64,
}

impl RegionDescriptor {
    fn check_arithmetic(&self) -> Result<(), MemoryError> {
        let err = || MemoryError::Overflow {
            gpa: self.guest_phys_addr,
            size: self.memory_size,
        };
        if self.memory_size == 0 {
            return Err(MemoryError::EmptyRegion {
                gpa: self.guest_phys_addr,
            });
        }
        self.guest_phys_addr
            .checked_add(self.memory_size)
            .ok_or_else(err)?;
        self.user_addr
            .checked_add(self.memory_size)
            .ok_or_else(err)?;
        self.mmap_offset
            .checked_add(self.memory_size)
            .ok_or_else(err)?;
        usize::try_from(self.memory_size).map_err(|_| err())?;
        Ok(())
    }

    fn gpa_end(&self) -> u64 {
        self.guest_phys_addr + self.memory_size
    }

    fn uaddr_end(&self) -> u64 {
        self.user_addr + self.memory_size
    }

    fn overlaps(&self, other: &RegionDescriptor) -> bool {
        let gpa = self.guest_phys_addr < other.gpa_end() && other.guest_phys_addr < self.gpa_end();
        let ua = self.user_addr < other.uaddr_end() && other.user_addr < self.uaddr_end();
        gpa || ua
    }

    /// Whether `other` names the same region (mmap offset ignored, as REM_MEM_REG requires).
    fn same_region(&self, other: &RegionDescriptor) -> bool {
        self.guest_phys_addr == other.guest_phys_addr
            && self.memory_size == other.memory_size
            && self.user_addr == other.user_addr
    }
}

#[derive(Debug)]
struct MappedRegion {
    desc: RegionDescriptor,
    region: Arc<GuestRegionMmap>,
    /// How many ADD_MEM_REG of exactly this region are not yet matched by a REM_MEM_REG.
    adds: u32,
}

/// The frontend's memory regions and their mappings in this process.
#[derive(Debug)]
pub struct MemoryTable {
    regions: Vec<MappedRegion>,
    max_slots: usize,
    log: Arc<LogSlot>,
}

impl MemoryTable {
    /// An empty table that holds at most `max_slots` regions.
    pub fn new(max_slots: usize) -> Self {
        MemoryTable {
            regions: Vec::new(),
            max_slots,
            log: Arc::new(LogSlot::empty()),
        }
    }

    /// Starts logging every write into guest memory to `log`, or stops logging (`None`). Takes
    /// effect at once for every snapshot of this table, old ones included.
    pub fn set_dirty_log(&self, log: Option<Arc<DirtyLog>>) {
        self.log.store(log);
    }

    /// Whether writes are being logged.
    pub fn dirty_log_active(&self) -> bool {
        self.log.is_active()
    }

    /// The slot limit.
    pub fn max_slots(&self) -> usize {
        self.max_slots
    }

    /// The regions, in the order they were added.
    pub fn regions(&self) -> impl Iterator<Item = &RegionDescriptor> {
        self.regions.iter().map(|r| &r.desc)
    }

    /// Each region with the file it is mapped from and how many ADD_MEM_REG of it are not yet
    /// matched by a REM_MEM_REG: what another process needs to map the same table (live upgrade).
    pub fn region_files(&self) -> impl Iterator<Item = (&RegionDescriptor, &File, u32)> {
        self.regions.iter().filter_map(|r| {
            let file = vm_memory::GuestMemoryRegion::file_offset(r.region.as_ref())?.file();
            Some((&r.desc, file, r.adds))
        })
    }

    /// Whether the table has no region.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Replaces the whole table (SET_MEM_TABLE). On error the table is unchanged.
    pub fn replace(&mut self, regions: Vec<(RegionDescriptor, File)>) -> Result<(), MemoryError> {
        let mut staged = MemoryTable {
            regions: Vec::new(),
            max_slots: self.max_slots,
            log: self.log.clone(),
        };
        for (desc, file) in regions {
            staged.insert(desc, file)?;
        }
        self.regions = staged.regions;
        Ok(())
    }

    /// Validates, maps and adds one region (ADD_MEM_REG). On error the table is unchanged.
    ///
    /// A region identical to one in the table (GPA, size, user address and offset) is counted,
    /// not mapped again, and stays until as many REM_MEM_REG have named it: QEMU (before 9.1)
    /// sends ADD_MEM_REG and REM_MEM_REG once per queue pair of a multiqueue virtio-net device
    /// over the one connection, so each region arrives once per pair.
    pub fn add(&mut self, desc: RegionDescriptor, file: File) -> Result<(), MemoryError> {
        desc.check_arithmetic()?;
        if let Some(same) = self
            .regions
            .iter_mut()
            .find(|r| r.desc.same_region(&desc) && r.desc.mmap_offset == desc.mmap_offset)
        {
            // `file` is another descriptor of memory already mapped; it closes here.
            same.adds = same.adds.saturating_add(1);
            return Ok(());
        }
        self.insert(desc, file)
    }

    /// Maps and adds a region that is not in the table yet.
    fn insert(&mut self, desc: RegionDescriptor, file: File) -> Result<(), MemoryError> {
        desc.check_arithmetic()?;
        if self.regions.len() >= self.max_slots {
            return Err(MemoryError::NoFreeSlot {
                limit: self.max_slots,
            });
        }
        if let Some(other) = self.regions.iter().find(|r| r.desc.overlaps(&desc)) {
            return Err(MemoryError::Overlap {
                gpa: desc.guest_phys_addr,
                size: desc.memory_size,
                uaddr: desc.user_addr,
                other_gpa: other.desc.guest_phys_addr,
            });
        }
        // Sealed before its size is checked, so that it cannot shrink in between.
        seal_against_shrinking(&file, "memory region", desc.guest_phys_addr);
        let meta = file.metadata().map_err(|source| MemoryError::Stat {
            gpa: desc.guest_phys_addr,
            source,
        })?;
        let needed = desc.mmap_offset + desc.memory_size;
        // Regular files and memfds have a size; mapping past it would SIGBUS on access.
        if meta.file_type().is_file() && meta.len() < needed {
            return Err(MemoryError::BeyondFile {
                gpa: desc.guest_phys_addr,
                needed,
                file_size: meta.len(),
            });
        }
        let size = desc.memory_size as usize;
        let bitmap = RegionDirty::new(desc.guest_phys_addr, self.log.clone());
        let mapping = MmapRegionBuilder::new_with_bitmap(size, bitmap)
            .with_file_offset(FileOffset::new(file, desc.mmap_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_SHARED)
            .build()
            .map_err(|source| MemoryError::Map {
                gpa: desc.guest_phys_addr,
                size: desc.memory_size,
                source,
            })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(desc.guest_phys_addr)).ok_or(
            MemoryError::Overflow {
                gpa: desc.guest_phys_addr,
                size: desc.memory_size,
            },
        )?;
        self.regions.push(MappedRegion {
            desc,
            region: Arc::new(region),
            adds: 1,
        });
        Ok(())
    }

    /// Removes the region matching `desc` by GPA, size and user address (REM_MEM_REG); a region
    /// added several times (see [`MemoryTable::add`]) goes with its last removal.
    pub fn remove(&mut self, desc: &RegionDescriptor) -> Result<(), MemoryError> {
        let pos = self
            .regions
            .iter()
            .position(|r| r.desc.same_region(desc))
            .ok_or(MemoryError::NotFound {
                gpa: desc.guest_phys_addr,
                size: desc.memory_size,
                uaddr: desc.user_addr,
            })?;
        if self.regions[pos].adds > 1 {
            self.regions[pos].adds -= 1;
        } else {
            self.regions.remove(pos);
        }
        Ok(())
    }

    /// Removes every region and stops logging.
    pub fn clear(&mut self) {
        self.regions.clear();
        self.set_dirty_log(None);
    }

    /// A snapshot of the regions for devices to use. The mappings are shared, not copied: a
    /// snapshot keeps its regions mapped after they leave the table, until the last user drops it.
    pub fn snapshot(&self) -> Result<GuestMemoryMmap, MemoryError> {
        // vm-memory wants the regions sorted by GPA; the table keeps the frontend's order, and a
        // frontend may add a region below one it added before.
        let mut sorted: Vec<&MappedRegion> = self.regions.iter().collect();
        sorted.sort_by_key(|r| r.desc.guest_phys_addr);
        GuestRegionCollection::from_arc_regions(sorted.iter().map(|r| r.region.clone()).collect())
            .map_err(MemoryError::Collection)
    }

    /// Translates a range in the frontend's address space to a guest-physical address. The whole
    /// range `[addr, addr + len)` must lie inside one region.
    pub fn va_to_gpa(&self, addr: u64, len: u64) -> Result<GuestAddress, MemoryError> {
        let untranslatable = MemoryError::Untranslatable { addr, len };
        let end = addr
            .checked_add(len)
            .ok_or(MemoryError::Untranslatable { addr, len })?;
        self.regions
            .iter()
            .map(|r| &r.desc)
            .find(|d| addr >= d.user_addr && end <= d.uaddr_end())
            .map(|d| GuestAddress(d.guest_phys_addr + (addr - d.user_addr)))
            .ok_or(untranslatable)
    }

    /// The end of the highest region in GPA space (the size a dirty log must cover).
    pub fn gpa_limit(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.desc.gpa_end())
            .max()
            .unwrap_or(0)
    }
}

/// A frontend that shrinks a file after sending it would make every access past the new end
/// fault with SIGBUS, killing the backend. A memfd that allows sealing is sealed against
/// shrinking (QEMU's memfd backend already seals its memfds); for other files the risk is logged,
/// as it exists for every mmap-based backend. `what` and `gpa` name the file in the log: guest
/// memory regions and the dirty log (see `dirty.rs`) are both mapped from frontend files.
pub fn seal_against_shrinking(file: &File, what: &str, gpa: u64) {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    match fcntl(file, FcntlArg::F_GET_SEALS) {
        Ok(seals) if SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) => {}
        Ok(_) => {
            if let Err(e) = fcntl(file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)) {
                log::warn!(
                    "{what} at GPA {gpa:#x}: cannot seal the memfd against shrinking \
                     ({e}); a frontend that shrinks it can crash the backend"
                );
            }
        }
        Err(_) => log::debug!(
            "{what} at GPA {gpa:#x} is not a sealable memfd; a frontend that shrinks it \
             can crash the backend"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn memfd(size: u64) -> File {
        let fd = memfd_create("outboard-test", MFdFlags::MFD_CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(size).unwrap();
        file
    }

    fn desc(gpa: u64, size: u64, uaddr: u64) -> RegionDescriptor {
        RegionDescriptor {
            guest_phys_addr: gpa,
            memory_size: size,
            user_addr: uaddr,
            mmap_offset: 0,
        }
    }

    #[test]
    fn regions_map_and_translate() {
        let mut t = MemoryTable::new(8);
        t.add(desc(0, 0x10000, 0x7000_0000), memfd(0x10000))
            .unwrap();
        t.add(desc(0x100000, 0x10000, 0x8000_0000), memfd(0x10000))
            .unwrap();
        assert_eq!(t.va_to_gpa(0x7000_0010, 16).unwrap(), GuestAddress(0x10));
        assert_eq!(
            t.va_to_gpa(0x8000_fff0, 16).unwrap(),
            GuestAddress(0x10fff0)
        );
        // Crossing a region's end is refused.
        assert!(t.va_to_gpa(0x8000_fff0, 17).is_err());
        assert!(t.va_to_gpa(u64::MAX, 2).is_err());
        let mem = t.snapshot().unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x100004))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x100004)).unwrap(),
            0xdead_beef
        );
        // Outside every region: an error, not a fault.
        assert!(mem.read_obj::<u32>(GuestAddress(0x20000)).is_err());
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(t.gpa_limit(), 0x110000);
    }

    #[test]
    fn an_identical_region_added_twice_stays_until_removed_twice() {
        let mut t = MemoryTable::new(1);
        let r = desc(0, 0x10000, 0x7000_0000);
        t.add(r, memfd(0x10000)).unwrap();
        // The same region again (one ADD_MEM_REG per queue pair): counted, no slot used.
        t.add(r, memfd(0x10000)).unwrap();
        assert_eq!(t.regions().count(), 1);
        // Overlapping but different: still refused.
        assert!(t.add(desc(0, 0x8000, 0x7000_0000), memfd(0x8000)).is_err());
        let mut other_offset = r;
        other_offset.mmap_offset = 0x1000;
        assert!(t.add(other_offset, memfd(0x11000)).is_err());
        t.remove(&r).unwrap();
        assert_eq!(t.regions().count(), 1, "one ADD is still unmatched");
        assert!(t
            .snapshot()
            .unwrap()
            .read_obj::<u8>(GuestAddress(0x10))
            .is_ok());
        t.remove(&r).unwrap();
        assert!(t.is_empty());
        assert!(matches!(t.remove(&r), Err(MemoryError::NotFound { .. })));
        // SET_MEM_TABLE with the same region twice is refused whole.
        let dup = vec![(r, memfd(0x10000)), (r, memfd(0x10000))];
        assert!(MemoryTable::new(4).replace(dup).is_err());
    }

    #[test]
    fn regions_added_below_earlier_ones_make_a_snapshot() {
        let mut t = MemoryTable::new(8);
        t.add(desc(0x100000, 0x10000, 0x8000_0000), memfd(0x10000))
            .unwrap();
        t.add(desc(0, 0x10000, 0x7000_0000), memfd(0x10000))
            .unwrap();
        let mem = t.snapshot().unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(7u8, GuestAddress(0x10)).unwrap();
        mem.write_obj(8u8, GuestAddress(0x100010)).unwrap();
    }

    #[test]
    fn writes_through_snapshots_are_logged_while_logging_is_on() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryRegion;
        let mut t = MemoryTable::new(8);
        t.add(desc(0x200000, 0x10000, 0x7000_0000), memfd(0x10000))
            .unwrap();
        let mem = t.snapshot().unwrap();
        let region = mem.find_region(GuestAddress(0x200000)).unwrap();
        // Not logging: the write leaves no trace.
        mem.write_obj(1u32, GuestAddress(0x203000)).unwrap();
        // 128 bytes of log cover 1024 pages, GPA 0 to 4 MiB.
        t.set_dirty_log(Some(Arc::new(DirtyLog::new(memfd(128), 0, 128).unwrap())));
        assert!(t.dirty_log_active());
        assert!(!region.bitmap().dirty_at(0x3000));
        // A write across a page boundary marks both pages (0x205 and 0x206), nothing else.
        mem.write_obj(3u64, GuestAddress(0x205ffc)).unwrap();
        assert!(region.bitmap().dirty_at(0x5ffc));
        assert!(region.bitmap().dirty_at(0x6000));
        assert!(!region.bitmap().dirty_at(0x4000));
        assert!(!region.bitmap().dirty_at(0x7000));
        t.set_dirty_log(None);
        assert!(
            !region.bitmap().dirty_at(0x5ffc),
            "no log, nothing reported"
        );
    }

    #[test]
    fn sealable_memfds_are_sealed_against_shrinking() {
        let fd = memfd_create(
            "outboard-test",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let file = File::from(fd);
        file.set_len(0x10000).unwrap();
        let mut t = MemoryTable::new(8);
        t.add(desc(0, 0x10000, 0x1000), file.try_clone().unwrap())
            .unwrap();
        // The frontend can no longer shrink it under the mapping; growing stays allowed.
        assert!(file.set_len(0x1000).is_err());
        file.set_len(0x20000).unwrap();
        let mem = t.snapshot().unwrap();
        mem.write_obj(1u64, GuestAddress(0xfff8)).unwrap();
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let mut t = MemoryTable::new(8);
        t.add(desc(0, 0x10000, 0x7000_0000), memfd(0x10000))
            .unwrap();
        // Overlap in GPA space.
        let e = t.add(desc(0x8000, 0x10000, 0x9000_0000), memfd(0x10000));
        assert!(matches!(e, Err(MemoryError::Overlap { .. })), "{e:?}");
        // Overlap in user-address space only.
        let e = t.add(desc(0x100000, 0x10000, 0x7000_8000), memfd(0x10000));
        assert!(matches!(e, Err(MemoryError::Overlap { .. })), "{e:?}");
        assert_eq!(t.regions().count(), 1);
    }

    #[test]
    fn malformed_regions_are_refused() {
        let mut t = MemoryTable::new(1);
        assert!(matches!(
            t.add(desc(0, 0, 0), memfd(0x1000)),
            Err(MemoryError::EmptyRegion { .. })
        ));
        assert!(matches!(
            t.add(desc(u64::MAX - 10, 0x1000, 0), memfd(0x1000)),
            Err(MemoryError::Overflow { .. })
        ));
        assert!(matches!(
            t.add(desc(0, 0x2000, 0), memfd(0x1000)),
            Err(MemoryError::BeyondFile { .. })
        ));
        t.add(desc(0, 0x1000, 0), memfd(0x1000)).unwrap();
        assert!(matches!(
            t.add(desc(0x1000, 0x1000, 0x1000), memfd(0x1000)),
            Err(MemoryError::NoFreeSlot { limit: 1 })
        ));
    }

    #[test]
    fn remove_keeps_old_snapshots_valid() {
        let mut t = MemoryTable::new(8);
        t.add(desc(0, 0x1000, 0x1000), memfd(0x1000)).unwrap();
        let old = t.snapshot().unwrap();
        assert!(t.remove(&desc(0, 0x2000, 0x1000)).is_err());
        t.remove(&desc(0, 0x1000, 0x1000)).unwrap();
        assert!(t.is_empty());
        old.write_obj(7u8, GuestAddress(0xfff)).unwrap();
        assert_eq!(old.read_obj::<u8>(GuestAddress(0xfff)).unwrap(), 7);
    }

    #[test]
    fn failed_replace_keeps_the_old_table() {
        let mut t = MemoryTable::new(8);
        t.add(desc(0, 0x1000, 0x1000), memfd(0x1000)).unwrap();
        let bad = vec![
            (desc(0, 0x1000, 0x1000), memfd(0x1000)),
            (desc(0x800, 0x1000, 0x9000), memfd(0x1000)),
        ];
        assert!(t.replace(bad).is_err());
        assert_eq!(t.regions().count(), 1);
    }
}
