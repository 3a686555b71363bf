//! The fixture of the hostile-frontend tests.
//!
//! [`Hostile`] runs one `vhost-user-blk` on a disk image filled with a known pattern and keeps
//! the image's expected contents. Each case takes a [`Guest`]: a frontend whose guest RAM ends
//! in a canary area (the last 4 MiB, filled with a known pattern, where the hostile requests'
//! headers, buffers and tables live). After the case, [`Hostile::done`] proves that the backend
//! survived it unharmed:
//!
//! - no byte of the canary area changed except those the case let the device write (its status
//!   bytes, and the writable buffers the request legitimately fills);
//! - the case's own session still does verified I/O when the case expects it to survive (or the
//!   backend closed it, or reported DEVICE_NEEDS_RESET and recovers from a reset, as the case
//!   says);
//! - the process is alive, a fresh frontend connects and does verified I/O;
//! - the image file holds exactly what the verified writes put there, nothing else.

use std::ops::Range;
use std::os::fd::{OwnedFd, RawFd};
use std::time::{Duration, Instant};

use outboard_frontend::queue::RawDescriptor;
use outboard_frontend::{
    BlkDriver, BlkStatus, Connection, GuestBuf, QueueError, SessionBuilder, Used,
};
use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::blk::{assert_bytes_eq, pattern, region, BlkBackend, SECTOR};

/// The code of a request.
pub fn code(r: FrontendReq) -> u32 {
    r as u32
}

/// A new eventfd.
pub fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// A new memfd of `size` bytes.
pub fn memfd(size: u64) -> std::fs::File {
    let fd =
        nix::sys::memfd::memfd_create(c"hostile", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let f = std::fs::File::from(fd);
    f.set_len(size).unwrap();
    f
}

/// A new pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().unwrap()
}

/// Guest RAM of a hostile session: one region at GPA 0.
pub const RAM: usize = 16 << 20;
/// Where the canary area starts (GPA): the last 4 MiB of RAM, above every allocation.
pub const CANARY_AT: u64 = 12 << 20;
/// The size of the canary area.
pub const CANARY_LEN: usize = 4 << 20;
/// The disk image size.
pub const DISK: usize = 4 << 20;
/// The disk's capacity in sectors.
pub const CAPACITY: u64 = (DISK / SECTOR) as u64;
/// Verified I/O goes to the last 64 KiB of the disk.
const SCRATCH: u64 = CAPACITY - 128;
/// A guest-physical address far outside guest RAM.
pub const OUTSIDE: u64 = 1 << 40;

/// Descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// virtio-blk request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// virtio-blk status bytes.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What a status byte holds before the device answers.
pub const UNWRITTEN: u8 = 0xff;

/// The DEVICE_NEEDS_RESET status bit.
pub const DEVICE_NEEDS_RESET: u8 = 0x40;

/// Where a descriptor's `next` points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The chain ends here.
    End,
    /// The descriptor at this position of the list given to [`Guest::publish`].
    To(usize),
    /// This raw index, whatever it is.
    Raw(u16),
}

/// A descriptor of a hand-made chain.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: Next,
}

/// A device-readable descriptor.
pub fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        flags: 0,
        next: Next::End,
    }
}

/// A device-writable descriptor.
pub fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        flags: WRITE,
        next: Next::End,
    }
}

/// Links `descs` in order (each to the next), as a well-formed chain.
pub fn linked(descs: &[Desc]) -> Vec<Desc> {
    let mut v = descs.to_vec();
    let n = v.len();
    for (i, d) in v.iter_mut().enumerate() {
        if i + 1 < n {
            d.next = Next::To(i + 1);
        }
    }
    v
}

/// The GPA of canary offset `off`.
pub fn gpa(off: usize) -> u64 {
    CANARY_AT + off as u64
}

/// Canary offsets where cases put things.
pub const HDR: usize = 0;
pub const STATUS: usize = 0x100;
pub const STATUS2: usize = 0x101;
pub const RANGES: usize = 0x200;
pub const DATA: usize = 0x1000;
pub const TABLE: usize = 0x10_0000;
pub const TABLE2: usize = 0x18_0000;

/// What a case leaves behind in its own session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// The session goes on and serves I/O.
    Serves,
    /// The backend closed the session.
    Closed,
    /// The device reported DEVICE_NEEDS_RESET; after a reset the session serves I/O again.
    NeedsReset,
}

/// One backend under attack, and what its disk must hold.
#[derive(Debug)]
pub struct Hostile {
    pub b: BlkBackend,
    expected: Vec<u8>,
    round: u64,
}

impl Hostile {
    /// Starts `vhost-user-blk` with `extra` options on a disk filled with a known pattern.
    pub fn start(tag: &str, extra: &[&str]) -> Hostile {
        let initial = pattern(0xd15c, DISK);
        let b = BlkBackend::start(tag, &initial, extra);
        Hostile {
            b,
            expected: initial,
            round: 0,
        }
    }

    /// What the image file must hold now.
    pub fn expected(&self) -> &[u8] {
        &self.expected
    }

    /// A session builder with the guest RAM of a hostile session.
    pub fn builder(&self) -> SessionBuilder {
        self.b.builder().ram_size(RAM)
    }

    /// A guest set up from the default builder.
    pub fn guest(&self) -> Guest {
        self.guest_with(self.builder())
    }

    /// A guest set up from `builder`, its canary area filled.
    pub fn guest_with(&self, builder: SessionBuilder) -> Guest {
        let mut blk = self.b.connect_with(builder);
        let canary = blk
            .session()
            .ram()
            .buf(CANARY_AT, CANARY_LEN)
            .expect("the canary area is guest RAM");
        let reference = pattern(0xca5a, CANARY_LEN);
        canary.write_at(0, &reference);
        Guest {
            blk,
            canary,
            reference,
            allowed: Vec::new(),
        }
    }

    /// Writes, reads back and checks fresh data in the scratch area through `blk`'s queue 0, and
    /// records it as expected on disk.
    pub fn verified_io(&mut self, blk: &mut BlkDriver, case: &str) {
        self.round += 1;
        let data = pattern(0x5eed + self.round, 16 << 10);
        let sector = SCRATCH + (self.round % 4) * 32;
        let q = blk.queue(0);
        let w = q.write(sector, &data);
        assert!(
            matches!(w, Ok(BlkStatus::Ok)),
            "{case}: verified write: {w:?}"
        );
        let mut back = vec![0u8; data.len()];
        let r = q.read(sector, &mut back);
        assert!(
            matches!(r, Ok(BlkStatus::Ok)),
            "{case}: verified read: {r:?}"
        );
        assert_bytes_eq(&back, &data, &format!("{case}: verified I/O"));
        let at = sector as usize * SECTOR;
        self.expected[at..at + data.len()].copy_from_slice(&data);
    }

    /// Proves the backend survived the case (see the module documentation).
    pub fn done(&mut self, mut g: Guest, case: &str, after: After) {
        g.check_canary(case);
        match after {
            After::Serves => self.verified_io(&mut g.blk, case),
            After::Closed => g.assert_closed(case),
            After::NeedsReset => {
                g.wait_needs_reset(case);
                g.blk
                    .reset()
                    .unwrap_or_else(|e| panic!("{case}: reset after NEEDS_RESET: {e:?}"));
                let status = g.blk.session().get_status().unwrap();
                assert_eq!(status & DEVICE_NEEDS_RESET, 0, "{case}: after reset");
                self.verified_io(&mut g.blk, case);
            }
        }
        drop(g);
        self.b.backend.assert_alive();
        let mut fresh = self.b.connect();
        self.verified_io(&mut fresh, case);
        assert_eq!(fresh.queue(0).flush().unwrap(), BlkStatus::Ok, "{case}");
        drop(fresh);
        assert_bytes_eq(
            &self.b.disk_contents(),
            &self.expected,
            &format!("{case}: the image file"),
        );
    }
}

/// A frontend whose guest RAM ends in a canary area.
#[derive(Debug)]
pub struct Guest {
    pub blk: BlkDriver,
    canary: GuestBuf,
    reference: Vec<u8>,
    allowed: Vec<Range<usize>>,
}

impl Guest {
    /// The connection, for raw messages.
    pub fn conn(&mut self) -> &mut Connection {
        self.blk.session().connection()
    }

    /// The RAM region as SET_MEM_TABLE describes it, its memfd, and its frontend address.
    pub fn ram_region(&mut self) -> (Vec<u8>, RawFd, u64) {
        let ram = self.blk.session().ram();
        let info = ram.region_info(ram.primary().unwrap()).unwrap();
        let desc = region(
            info.guest_phys_addr,
            info.memory_size,
            info.userspace_addr,
            info.mmap_offset,
        );
        (desc, info.mmap_handle, info.userspace_addr)
    }

    /// Puts `bytes` at canary offset `off` (they become the reference there).
    pub fn put(&mut self, off: usize, bytes: &[u8]) {
        self.canary.write_at(off, bytes);
        self.reference[off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// Puts a request header at `off`.
    pub fn header(&mut self, off: usize, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.put(off, &h);
    }

    /// Puts discard/write-zeroes ranges `(sector, num_sectors, flags)` at `off`; returns their
    /// length in bytes.
    pub fn ranges(&mut self, off: usize, ranges: &[(u64, u32, u32)]) -> u32 {
        let mut b = Vec::new();
        for &(sector, n, flags) in ranges {
            b.extend_from_slice(&sector.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
        }
        self.put(off, &b);
        b.len() as u32
    }

    /// Puts descriptors at `off` (an indirect table); `Next::To(i)` means entry `i`.
    pub fn table(&mut self, off: usize, descs: &[Desc]) -> u32 {
        let mut b = Vec::new();
        for d in descs {
            let (flags, next) = match d.next {
                Next::End => (d.flags, 0),
                Next::To(i) => (d.flags | NEXT, i as u16),
                Next::Raw(n) => (d.flags | NEXT, n),
            };
            let raw = RawDescriptor {
                addr: d.addr,
                len: d.len,
                flags,
                next,
            };
            b.extend_from_slice(&raw.to_bytes());
        }
        self.put(off, &b);
        b.len() as u32
    }

    /// Presets a status byte at `off` and lets the device write it.
    pub fn status(&mut self, off: usize) -> u64 {
        self.put(off, &[UNWRITTEN]);
        self.allow(off, 1);
        gpa(off)
    }

    /// Lets the device write `len` bytes at canary offset `off`.
    pub fn allow(&mut self, off: usize, len: usize) {
        self.allowed.push(off..off + len);
    }

    /// The byte at canary offset `off`.
    pub fn byte(&self, off: usize) -> u8 {
        self.canary.read_u8(off)
    }

    /// Copies `len` bytes at canary offset `off`.
    pub fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.canary.read_at(off, &mut b);
        b
    }

    /// Writes `descs` into queue 0's descriptor table and makes the first available. Returns
    /// the descriptor indices used (release them with [`Guest::release`]).
    pub fn publish(&mut self, descs: &[Desc]) -> Vec<u16> {
        let dq = self.blk.queue(0).driver_queue_mut();
        let ids = dq.alloc_descs(descs.len()).unwrap();
        for (i, d) in descs.iter().enumerate() {
            let (flags, next) = match d.next {
                Next::End => (d.flags, 0),
                Next::To(j) => (d.flags | NEXT, ids[j]),
                Next::Raw(n) => (d.flags | NEXT, n),
            };
            let raw = RawDescriptor {
                addr: d.addr,
                len: d.len,
                flags,
                next,
            };
            dq.write_desc(ids[i], raw).unwrap();
        }
        dq.push_avail(ids[0]);
        dq.kick().unwrap();
        ids
    }

    /// Returns descriptors to the free list.
    pub fn release(&mut self, ids: &[u16]) {
        self.blk.queue(0).driver_queue_mut().release_descs(ids);
    }

    /// Waits up to `timeout` for one used entry on queue 0.
    pub fn wait_used(&mut self, timeout: Duration) -> Option<Used> {
        let dq = self.blk.queue(0).driver_queue_mut();
        let mut used = Vec::new();
        match dq.wait_used(timeout, &mut used) {
            Ok(_) => {
                assert_eq!(used.len(), 1, "one chain, one used entry: {used:?}");
                Some(used[0])
            }
            Err(QueueError::Timeout { .. }) => None,
            Err(e) => panic!("used ring: {e}"),
        }
    }

    /// Submits a hand-made chain and waits for its used entry.
    #[track_caller]
    pub fn submit(&mut self, descs: &[Desc], case: &str) -> Used {
        let ids = self.publish(descs);
        let used = self
            .wait_used(super::blk::IO_TIMEOUT)
            .unwrap_or_else(|| panic!("{case}: the request was never completed"));
        assert_eq!(used.id, u32::from(ids[0]), "{case}: used id is the head");
        self.release(&ids);
        used
    }

    /// Submits a chain and asserts the device answered `status` at canary offset `status_at`.
    /// A refused request has a used length of 1 (the status byte alone); the used entry is
    /// returned for the caller to check a successful one.
    #[track_caller]
    pub fn expect_status(
        &mut self,
        descs: &[Desc],
        status_at: usize,
        status: u8,
        case: &str,
    ) -> Used {
        let used = self.submit(descs, case);
        assert_eq!(
            self.byte(status_at),
            status,
            "{case}: status byte (used length {})",
            used.len
        );
        if status != S_OK {
            assert_eq!(used.len, 1, "{case}: used length");
        }
        used
    }

    /// Submits a chain the device cannot answer (no status byte it may write): it must be
    /// returned with a used length of 0.
    #[track_caller]
    pub fn expect_unanswered(&mut self, descs: &[Desc], case: &str) {
        let used = self.submit(descs, case);
        assert_eq!(
            used.len, 0,
            "{case}: used length of an unanswerable request"
        );
    }

    /// Panics if a canary byte the device was not allowed to write changed; then restores the
    /// area for the next case.
    #[track_caller]
    pub fn check_canary(&mut self, case: &str) {
        let mut now = vec![0u8; CANARY_LEN];
        self.canary.read_at(0, &mut now);
        for range in &self.allowed {
            now[range.clone()].copy_from_slice(&self.reference[range.clone()]);
        }
        assert_bytes_eq(&now, &self.reference, &format!("{case}: guest RAM canary"));
        self.canary.write_at(0, &self.reference);
        self.allowed.clear();
    }

    /// Asserts the backend closed the connection.
    #[track_caller]
    pub fn assert_closed(&mut self, case: &str) {
        assert!(
            self.conn().peer_closed(Duration::from_secs(5)).unwrap(),
            "{case}: the backend must close the connection"
        );
    }

    /// Waits until GET_STATUS reports DEVICE_NEEDS_RESET.
    #[track_caller]
    pub fn wait_needs_reset(&mut self, case: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = self.blk.session().get_status().unwrap();
            if status & DEVICE_NEEDS_RESET != 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{case}: no DEVICE_NEEDS_RESET (status {status:#x})"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
