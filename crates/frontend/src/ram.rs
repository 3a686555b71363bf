//! Guest RAM: memfd-backed regions mapped in this process, with a small allocator.
//!
//! The frontend plays the VMM, so "guest physical addresses" (GPAs) are offsets into the
//! regions it creates here. Each region is a memfd mapped `MAP_SHARED`, so a backend that maps
//! the same fd (from SET_MEM_TABLE or ADD_MEM_REG) sees the same bytes. Like QEMU, the
//! `user_addr` announced for a region is the address of our own mapping.
//!
//! All raw pointer work of the crate lives in [`GuestBuf`]: a bounds-checked window on a
//! mapping that keeps the mapping alive.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::io::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use nix::sys::memfd::{memfd_create, MFdFlags};
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// Alignment of hot-added regions in guest physical address space (2 MiB, like DIMMs).
const REGION_ALIGN: u64 = 2 << 20;

/// Errors of guest RAM management.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// Creating or sizing the memfd failed.
    #[error("cannot create a {size}-byte memfd")]
    Memfd {
        /// Requested size.
        size: usize,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("cannot map a {size}-byte region")]
    Mmap {
        /// Requested size.
        size: usize,
        /// Underlying error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The region size is zero or not a multiple of the page size.
    #[error("invalid region size {size:#x} (must be a non-zero multiple of 4 KiB)")]
    BadSize {
        /// Requested size.
        size: usize,
    },
    /// No region has this id, or it was already removed.
    #[error("no active region with id {0:?}")]
    NoRegion(RegionId),
    /// The allocator has no free range of this size.
    #[error(
        "out of guest memory: cannot allocate {len} bytes aligned to {align} in region {region:?}"
    )]
    OutOfMemory {
        /// Region searched.
        region: RegionId,
        /// Requested length.
        len: usize,
        /// Requested alignment.
        align: usize,
    },
    /// A guest address range is not inside one region.
    #[error("guest range {gpa:#x}+{len:#x} is not inside one region")]
    BadRange {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: usize,
    },
}

/// Identifies a region of a [`GuestRam`]; ids are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionId(pub u32);

/// A window `[gpa, gpa+len)` on a mapped guest region.
///
/// The window keeps its region mapped (it holds an `Arc` to it) even after the region is
/// removed from the [`GuestRam`], so using a stale buffer never touches unmapped memory; it only
/// stops being visible to a backend that unmapped the region.
///
/// Accesses are bounds-checked against the window and panic when out of range: offsets come from
/// the frontend itself, so an out-of-range access is a bug in the caller, not hostile input.
#[derive(Clone, Debug)]
pub struct GuestBuf {
    region: Arc<GuestRegionMmap>,
    /// Host address of `gpa` in this process.
    host: usize,
    gpa: u64,
    len: usize,
}

impl GuestBuf {
    /// Guest physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the first byte in this process (the "frontend user address").
    pub fn user_addr(&self) -> u64 {
        self.host as u64
    }

    /// A sub-window `[offset, offset+len)` of this one.
    pub fn slice(&self, offset: usize, len: usize) -> GuestBuf {
        self.check(offset, len);
        GuestBuf {
            region: Arc::clone(&self.region),
            host: self.host + offset,
            gpa: self.gpa + offset as u64,
            len,
        }
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "guest buffer access {offset:#x}+{len:#x} out of bounds (len {:#x})",
            self.len
        );
    }

    fn ptr(&self, offset: usize, len: usize) -> *mut u8 {
        self.check(offset, len);
        (self.host + offset) as *mut u8
    }

    /// Copies `data` into guest memory at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) {
        let dst = self.ptr(offset, data.len());
        // SAFETY: `dst..dst+len` is inside the mapping (checked above), which stays mapped while
        // `self.region` is alive. The mapping is shared with another process, so it cannot alias
        // any Rust reference: no `&[u8]` to guest memory is ever handed out.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// Copies guest memory at `offset` into `data`.
    pub fn read_at(&self, offset: usize, data: &mut [u8]) {
        let src = self.ptr(offset, data.len());
        // SAFETY: as in `write_at`; `data` is a distinct Rust buffer, so they do not overlap.
        unsafe { ptr::copy_nonoverlapping(src, data.as_mut_ptr(), data.len()) };
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) {
        let dst = self.ptr(offset, len);
        // SAFETY: the range is inside the live mapping (checked above).
        unsafe { ptr::write_bytes(dst, byte, len) };
    }

    /// Reads a little-endian `u64` at `offset` (no alignment needed).
    pub fn read_u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.read_at(offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// Writes a little-endian `u64` at `offset` (no alignment needed).
    pub fn write_u64(&self, offset: usize, v: u64) {
        self.write_at(offset, &v.to_le_bytes());
    }

    /// Writes a little-endian `u32` at `offset` (no alignment needed).
    pub fn write_u32(&self, offset: usize, v: u32) {
        self.write_at(offset, &v.to_le_bytes());
    }

    /// Writes a little-endian `u16` at `offset` (no alignment needed).
    pub fn write_u16(&self, offset: usize, v: u16) {
        self.write_at(offset, &v.to_le_bytes());
    }

    /// Reads one byte at `offset`.
    pub fn read_u8(&self, offset: usize) -> u8 {
        let mut b = [0u8; 1];
        self.read_at(offset, &mut b);
        b[0]
    }

    fn atomic16(&self, offset: usize) -> &AtomicU16 {
        let p = self.ptr(offset, 2);
        assert!(p as usize & 1 == 0, "unaligned atomic u16 at {offset:#x}");
        // SAFETY: the pointer is in bounds and aligned (checked above), the mapping outlives the
        // returned borrow of `self`, and all frontend accesses to ring indices go through atomics;
        // the other process uses atomic or volatile accesses of the same width.
        unsafe { AtomicU16::from_ptr(p.cast()) }
    }

    fn atomic32(&self, offset: usize) -> &AtomicU32 {
        let p = self.ptr(offset, 4);
        assert!(p as usize & 3 == 0, "unaligned atomic u32 at {offset:#x}");
        // SAFETY: as in `atomic16`, with 4-byte alignment checked.
        unsafe { AtomicU32::from_ptr(p.cast()) }
    }

    /// Atomically loads a native-endian (= little-endian on supported hosts) `u16` at an aligned
    /// `offset`.
    pub fn load_u16(&self, offset: usize, order: Ordering) -> u16 {
        self.atomic16(offset).load(order)
    }

    /// Atomically stores a `u16` at an aligned `offset`.
    pub fn store_u16(&self, offset: usize, v: u16, order: Ordering) {
        self.atomic16(offset).store(v, order)
    }

    /// Atomically loads a `u32` at an aligned `offset`.
    pub fn load_u32(&self, offset: usize, order: Ordering) -> u32 {
        self.atomic32(offset).load(order)
    }

    /// Atomically stores a `u32` at an aligned `offset`.
    pub fn store_u32(&self, offset: usize, v: u32, order: Ordering) {
        self.atomic32(offset).store(v, order)
    }
}

/// First-fit free list over `[0, size)` of one region.
#[derive(Debug, Clone)]
struct FreeList {
    /// Sorted, non-adjacent free ranges `(start, len)`.
    free: Vec<(usize, usize)>,
}

impl FreeList {
    fn new(size: usize) -> Self {
        FreeList {
            free: vec![(0, size)],
        }
    }

    fn alloc(&mut self, len: usize, align: usize) -> Option<usize> {
        debug_assert!(align.is_power_of_two());
        let len = len.max(1);
        for i in 0..self.free.len() {
            let (start, flen) = self.free[i];
            let aligned = start.checked_add(align - 1)? & !(align - 1);
            let pad = aligned - start;
            if flen < pad + len {
                continue;
            }
            let tail = flen - pad - len;
            match (pad, tail) {
                (0, 0) => {
                    self.free.remove(i);
                }
                (0, _) => self.free[i] = (aligned + len, tail),
                (_, 0) => self.free[i] = (start, pad),
                (_, _) => {
                    self.free[i] = (start, pad);
                    self.free.insert(i + 1, (aligned + len, tail));
                }
            }
            return Some(aligned);
        }
        None
    }

    fn free(&mut self, start: usize, len: usize) {
        let len = len.max(1);
        let i = self.free.partition_point(|&(s, _)| s < start);
        if let Some(&(ps, pl)) = i.checked_sub(1).and_then(|p| self.free.get(p)) {
            assert!(ps + pl <= start, "double free of guest range {start:#x}");
        }
        if let Some(&(ns, _)) = self.free.get(i) {
            assert!(start + len <= ns, "double free of guest range {start:#x}");
        }
        self.free.insert(i, (start, len));
        // Merge with the next range, then with the previous one.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }

    fn free_bytes(&self) -> usize {
        self.free.iter().map(|&(_, l)| l).sum()
    }
}

#[derive(Debug)]
struct Region {
    id: RegionId,
    mmap: Arc<GuestRegionMmap>,
    alloc: FreeList,
}

impl Region {
    fn info(&self) -> VhostUserMemoryRegionInfo {
        let fo = self
            .mmap
            .file_offset()
            .expect("guest RAM regions are always file-backed");
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.mmap.start_addr().0,
            memory_size: self.mmap.len(),
            userspace_addr: self.mmap.as_ptr() as u64,
            mmap_offset: fo.start(),
            mmap_handle: fo.file().as_raw_fd(),
        }
    }

    fn whole(&self) -> GuestBuf {
        GuestBuf {
            region: Arc::clone(&self.mmap),
            host: self.mmap.as_ptr() as usize,
            gpa: self.mmap.start_addr().0,
            len: self.mmap.len() as usize,
        }
    }
}

/// Guest memory of the test VMM: memfd-backed regions plus an allocator per region.
#[derive(Debug)]
pub struct GuestRam {
    regions: Vec<Region>,
    next_id: u32,
    next_gpa: u64,
}

impl GuestRam {
    /// Creates guest RAM with one region of `size` bytes at guest physical address 0.
    pub fn new(size: usize) -> Result<Self, RamError> {
        let mut ram = GuestRam {
            regions: Vec::new(),
            next_id: 0,
            next_gpa: 0,
        };
        ram.add_region(size)?;
        Ok(ram)
    }

    /// Creates a new region of `size` bytes above all existing ones (aligned to 2 MiB, leaving a
    /// gap after the previous region) and makes it part of this RAM.
    ///
    /// The backend does not know about it until it is announced (SET_MEM_TABLE or ADD_MEM_REG).
    pub fn add_region(&mut self, size: usize) -> Result<RegionId, RamError> {
        if size == 0 || size & 4095 != 0 {
            return Err(RamError::BadSize { size });
        }
        let gpa = self.next_gpa;
        let file = memfd(size)?;
        let mmap = MmapRegion::from_file(FileOffset::new(file, 0), size)
            .map_err(|source| RamError::Mmap { size, source })?;
        let mmap = GuestRegionMmap::new(mmap, GuestAddress(gpa))
            .expect("region end does not overflow: gpa and size are bounded by the host");
        let id = RegionId(self.next_id);
        self.next_id += 1;
        // Leave a hole after each region so that off-by-one GPAs land outside any region.
        self.next_gpa = (gpa + size as u64 + REGION_ALIGN).next_multiple_of(REGION_ALIGN);
        self.regions.push(Region {
            id,
            mmap: Arc::new(mmap),
            alloc: FreeList::new(size),
        });
        Ok(id)
    }

    /// Removes a region from this RAM. Buffers in it stay mapped while they are alive.
    pub fn remove_region(&mut self, id: RegionId) -> Result<(), RamError> {
        let i = self.index(id)?;
        self.regions.remove(i);
        Ok(())
    }

    fn index(&self, id: RegionId) -> Result<usize, RamError> {
        self.regions
            .iter()
            .position(|r| r.id == id)
            .ok_or(RamError::NoRegion(id))
    }

    /// The id of the first (boot) region, where [`GuestRam::alloc`] allocates.
    pub fn primary(&self) -> Option<RegionId> {
        self.regions.first().map(|r| r.id)
    }

    /// Ids of all active regions, in creation order.
    pub fn region_ids(&self) -> Vec<RegionId> {
        self.regions.iter().map(|r| r.id).collect()
    }

    /// The vhost-user description of one region (GPA, size, our mapping address, fd).
    ///
    /// The fd in `mmap_handle` is owned by this RAM and valid while the region is.
    pub fn region_info(&self, id: RegionId) -> Result<VhostUserMemoryRegionInfo, RamError> {
        Ok(self.regions[self.index(id)?].info())
    }

    /// The vhost-user description of every active region, for SET_MEM_TABLE.
    pub fn regions_info(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.regions.iter().map(Region::info).collect()
    }

    /// The memfd of a region.
    pub fn region_fd(&self, id: RegionId) -> Result<RawFd, RamError> {
        Ok(self.region_info(id)?.mmap_handle)
    }

    /// A window on a whole region.
    pub fn region_buf(&self, id: RegionId) -> Result<GuestBuf, RamError> {
        Ok(self.regions[self.index(id)?].whole())
    }

    /// Allocates `len` bytes aligned to `align` (a power of two) in the primary region.
    pub fn alloc(&mut self, len: usize, align: usize) -> Result<GuestBuf, RamError> {
        let id = self.primary().ok_or(RamError::NoRegion(RegionId(0)))?;
        self.alloc_in(id, len, align)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two) in region `id`.
    pub fn alloc_in(
        &mut self,
        id: RegionId,
        len: usize,
        align: usize,
    ) -> Result<GuestBuf, RamError> {
        let i = self.index(id)?;
        let region = &mut self.regions[i];
        let off = region
            .alloc
            .alloc(len, align.max(1))
            .ok_or(RamError::OutOfMemory {
                region: id,
                len,
                align,
            })?;
        Ok(region.whole().slice(off, len))
    }

    /// Returns a buffer from [`GuestRam::alloc`] or [`GuestRam::alloc_in`] to its region's
    /// allocator. Buffers of removed regions are ignored.
    pub fn free(&mut self, buf: &GuestBuf) {
        if let Some(r) = self
            .regions
            .iter_mut()
            .find(|r| Arc::ptr_eq(&r.mmap, &buf.region))
        {
            let off = (buf.gpa - r.mmap.start_addr().0) as usize;
            r.alloc.free(off, buf.len);
        }
    }

    /// Free bytes left in region `id`'s allocator.
    pub fn free_bytes(&self, id: RegionId) -> Result<usize, RamError> {
        Ok(self.regions[self.index(id)?].alloc.free_bytes())
    }

    /// A window on `[gpa, gpa+len)`, which must lie inside one active region.
    pub fn buf(&self, gpa: u64, len: usize) -> Result<GuestBuf, RamError> {
        let bad = RamError::BadRange { gpa, len };
        let r = self
            .regions
            .iter()
            .find(|r| {
                let start = r.mmap.start_addr().0;
                gpa >= start && gpa < start + r.mmap.len()
            })
            .ok_or(bad)?;
        let off = (gpa - r.mmap.start_addr().0) as usize;
        if off + len > r.mmap.len() as usize {
            return Err(RamError::BadRange { gpa, len });
        }
        Ok(r.whole().slice(off, len))
    }

    /// A vm-memory view of all active regions (sharing the mappings), e.g. for an in-process
    /// device model.
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        GuestMemoryMmap::from_arc_regions(
            self.regions.iter().map(|r| Arc::clone(&r.mmap)).collect(),
        )
        .expect("regions are created sorted and disjoint")
    }

    /// Translates a guest physical address to our own mapping address.
    pub fn user_addr(&self, gpa: u64) -> Result<u64, RamError> {
        Ok(self.buf(gpa, 0)?.user_addr())
    }

    /// Writes `data` at guest physical address `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), RamError> {
        self.buf(gpa, data.len())?.write_at(0, data);
        Ok(())
    }

    /// Reads guest memory at `gpa` into `data`.
    pub fn read(&self, gpa: u64, data: &mut [u8]) -> Result<(), RamError> {
        self.buf(gpa, data.len())?.read_at(0, data);
        Ok(())
    }
}

fn memfd(size: usize) -> Result<File, RamError> {
    let err = |source| RamError::Memfd { size, source };
    let fd =
        memfd_create(c"outboard-guest-ram", MFdFlags::MFD_CLOEXEC).map_err(|e| err(e.into()))?;
    let file = File::from(fd);
    file.set_len(size as u64).map_err(err)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_list_reuses_and_merges_ranges() {
        let mut f = FreeList::new(0x10000);
        let a = f.alloc(0x100, 0x1000).unwrap();
        let b = f.alloc(0x10, 16).unwrap();
        let c = f.alloc(0x1000, 0x1000).unwrap();
        assert_eq!((a, b, c), (0, 0x100, 0x1000));
        f.free(b, 0x10);
        assert_eq!(f.alloc(0x8, 8).unwrap(), 0x100);
        f.free(0x100, 0x8);
        f.free(a, 0x100);
        f.free(c, 0x1000);
        assert_eq!(f.free, vec![(0, 0x10000)]);
        assert!(f.alloc(0x10001, 1).is_none());
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn free_list_detects_double_free() {
        let mut f = FreeList::new(0x1000);
        let a = f.alloc(0x100, 1).unwrap();
        f.free(a, 0x100);
        f.free(a, 0x100);
    }

    #[test]
    fn regions_are_shared_memfds_with_holes_between_them() {
        let mut ram = GuestRam::new(1 << 20).unwrap();
        let r1 = ram.add_region(1 << 20).unwrap();
        let infos = ram.regions_info();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].guest_phys_addr, 0);
        assert_eq!(infos[1].guest_phys_addr, 4 << 20);
        assert!(infos[1].mmap_handle >= 0);
        // The fd really backs the mapping: write via the mapping, read via the fd.
        let buf = ram.alloc_in(r1, 64, 64).unwrap();
        buf.write_at(0, b"hello");
        let mut got = [0u8; 5];
        nix::sys::uio::pread(
            // SAFETY: the fd belongs to `ram`, which outlives this call.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(infos[1].mmap_handle) },
            &mut got,
            (buf.gpa() - infos[1].guest_phys_addr) as i64,
        )
        .unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(ram.user_addr(buf.gpa()).unwrap(), buf.user_addr());
        assert!(ram.buf(2 << 20, 1).is_err(), "the hole is not memory");
        ram.remove_region(r1).unwrap();
        assert_eq!(ram.regions_info().len(), 1);
        // A stale buffer still points at live (if unannounced) memory.
        buf.write_at(0, b"still mapped");
    }
}
