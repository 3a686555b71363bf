//! Storage engines: where a request's blocks are read and written.
//!
//! An [`Engine`] takes operations ([`Op`]) tagged with a token, and reports them back as
//! [`Completion`]s. The io_uring engine completes them asynchronously (its eventfd becomes
//! readable); the synchronous and null engines complete each one before `enqueue` returns.
//! Each worker thread has its own engine; all engines of a device share its open file.

mod file;
mod iovec;
mod null;
mod sync;
mod uring;

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use file::open;
pub(crate) use iovec::{Direction, IoBuffers};
pub(crate) use null::NullEngine;
pub(crate) use sync::SyncEngine;
pub(crate) use uring::UringEngine;

use crate::config::EngineKind;

/// Why a storage operation failed. The driver sees `VIRTIO_BLK_S_IOERR`; this is for the log.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The system call failed.
    #[error("{op} at byte {offset} failed")]
    Io {
        /// The operation.
        op: &'static str,
        /// Its byte offset in the storage.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A read or write made no progress before its end (the file shrank under the device).
    #[error("{op} at byte {offset} stopped with {remaining} bytes left")]
    ShortTransfer {
        /// The operation.
        op: &'static str,
        /// Its byte offset in the storage.
        offset: u64,
        /// Bytes not transferred.
        remaining: usize,
    },
    /// A guest buffer could not be mapped or copied.
    #[error("guest buffer at {addr:#x} is not accessible")]
    GuestMemory {
        /// Its guest-physical address.
        addr: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The operation was cancelled ([`Engine::cancel`]) before it finished.
    #[error("{op} at byte {offset} was cancelled")]
    Cancelled {
        /// The operation.
        op: &'static str,
        /// Its byte offset in the storage.
        offset: u64,
    },
    /// The io_uring instance failed.
    #[error("io_uring {what} failed")]
    Ring {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// One storage operation. Offsets and lengths are in bytes.
#[derive(Debug)]
pub(crate) enum Op {
    /// Read into guest buffers.
    Read { offset: u64, bufs: IoBuffers },
    /// Write guest buffers; `durable`: complete only once the data is on stable storage.
    Write {
        offset: u64,
        bufs: IoBuffers,
        durable: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Deallocate a range (advisory: an engine that cannot do it succeeds without doing it).
    Discard { offset: u64, len: u64 },
    /// Make a range read as zeros, deallocating it if `unmap` allows.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

impl Op {
    /// The operation's name, for the log.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::Discard { .. } => "discard",
            Op::WriteZeroes { .. } => "write zeroes",
        }
    }

    /// The byte offset the operation starts at (0 for a flush).
    pub fn offset(&self) -> u64 {
        match self {
            Op::Read { offset, .. }
            | Op::Write { offset, .. }
            | Op::Discard { offset, .. }
            | Op::WriteZeroes { offset, .. } => *offset,
            Op::Flush => 0,
        }
    }
}

/// A finished operation.
#[derive(Debug)]
pub(crate) struct Completion {
    /// The token it was enqueued with.
    pub token: u64,
    /// How it went.
    pub result: Result<(), StorageError>,
}

/// A storage engine. Methods never block except [`Engine::wait`].
pub(crate) trait Engine: Send + Debug {
    /// The engine's name, for the log.
    fn name(&self) -> &'static str;

    /// Queues `op`; it is started at the latest by the next [`Engine::submit`].
    fn enqueue(&mut self, token: u64, op: Op);

    /// Starts every queued operation (one system call for the batch).
    fn submit(&mut self);

    /// A file descriptor that becomes readable when operations complete, for an asynchronous
    /// engine.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Moves finished operations to `done`.
    fn reap(&mut self, done: &mut Vec<Completion>);

    /// Blocks until at least one operation finishes (returns at once if none is in flight).
    fn wait(&mut self) -> Result<(), StorageError>;

    /// Operations enqueued and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Asks every operation not yet finished to stop: it then completes with
    /// [`StorageError::Cancelled`], possibly after part of its transfer was done (the request
    /// must be carried out again as a whole). An operation the kernel cannot stop any more
    /// completes as usual. Completions still arrive through [`Engine::reap`]; nothing is left
    /// in the kernel once every operation has been reaped. The default cancels nothing (the
    /// synchronous engines finish each operation inside `enqueue`).
    fn cancel(&mut self) {}
}

/// Whether `e` means the operation is not implemented for this file.
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// Whether `e` means "try again".
pub(crate) fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

/// An aligned buffer of zeros, the source of write-zeroes when the file system cannot zero a
/// range itself.
#[derive(Debug)]
pub(crate) struct ZeroBuffer {
    buf: Vec<u8>,
    offset: usize,
}

impl ZeroBuffer {
    /// Bytes written per operation.
    pub const LEN: usize = 1 << 20;
    const ALIGN: usize = 4096;

    pub fn new() -> Self {
        let buf = vec![0u8; Self::LEN + Self::ALIGN];
        let offset = buf.as_ptr().align_offset(Self::ALIGN);
        ZeroBuffer { buf, offset }
    }

    /// The aligned zeros.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.offset..self.offset + Self::LEN]
    }
}

/// Makes the engine for one worker thread: io_uring of `depth` entries if asked for and the
/// kernel allows it, otherwise synchronous; the null engine for null storage.
pub(crate) fn new_engine(
    kind: EngineKind,
    file: Option<&Arc<File>>,
    depth: u32,
    delay: Duration,
) -> Box<dyn Engine> {
    let Some(file) = file else {
        return Box::new(NullEngine::new());
    };
    match kind {
        EngineKind::Sync => Box::new(SyncEngine::new(file.clone())),
        EngineKind::Uring => match UringEngine::new(file.clone(), depth, delay) {
            Ok(e) => Box::new(e),
            Err(e) => {
                log::warn!(
                    "virtio-blk: io_uring is not available ({e}); using synchronous I/O instead"
                );
                Box::new(SyncEngine::new(file.clone()))
            }
        },
    }
}

/// The `fallocate` mode that deallocates a range (reads then return zeros).
pub(crate) const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// The `fallocate` mode that zeroes a range without writing data.
pub(crate) const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// How a write-zeroes range is zeroed, from the cheapest way on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ZeroStep {
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: deallocate (reads return zeros).
    Punch,
    /// `fallocate(ZERO_RANGE | KEEP_SIZE)`: zero without writing data.
    ZeroRange,
    /// Write zeros from a [`ZeroBuffer`].
    Write,
}

impl ZeroStep {
    /// The `fallocate` mode of the step, if it is one.
    pub fn mode(self) -> Option<i32> {
        match self {
            ZeroStep::Punch => Some(PUNCH_HOLE),
            ZeroStep::ZeroRange => Some(ZERO_RANGE),
            ZeroStep::Write => None,
        }
    }
}

/// Which `fallocate` modes the file turned out to support (learnt from `EOPNOTSUPP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FallocateSupport {
    /// `PUNCH_HOLE | KEEP_SIZE` works.
    pub punch_hole: bool,
    /// `ZERO_RANGE | KEEP_SIZE` works.
    pub zero_range: bool,
}

impl Default for FallocateSupport {
    fn default() -> Self {
        FallocateSupport {
            punch_hole: true,
            zero_range: true,
        }
    }
}

impl FallocateSupport {
    /// The first way to zero a range; `unmap`: the driver allows deallocation.
    pub fn first_step(&self, unmap: bool) -> ZeroStep {
        if unmap && self.punch_hole {
            ZeroStep::Punch
        } else if self.zero_range {
            ZeroStep::ZeroRange
        } else {
            ZeroStep::Write
        }
    }

    /// Records that `step` is not supported and returns the next way to try.
    pub fn unsupported(&mut self, step: ZeroStep) -> ZeroStep {
        match step {
            ZeroStep::Punch => self.punch_hole = false,
            ZeroStep::ZeroRange => self.zero_range = false,
            ZeroStep::Write => {}
        }
        self.first_step(false)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::Ordering;

    use virtio_bindings::virtio_blk::*;
    use vm_memory::{Bytes, GuestAddress};

    use crate::testing::*;
    use crate::{Blk, BlkConfig, EngineKind};

    #[test]
    fn reads_and_writes_round_trip_through_both_engines() {
        for engine in [EngineKind::Uring, EngineKind::Sync] {
            let file = temp_file(DISK, 0xaa);
            let mem = memory();
            let mut d = Driver::new(&mem, file_device(&file, engine));
            d.activate();
            let data = pattern(3 * 512, 7);
            assert_eq!(write(&mut d, 5, &data), (OK, 1), "{engine:?}");
            let mut on_disk = vec![0u8; data.len()];
            file.as_file().read_exact_at(&mut on_disk, 5 * 512).unwrap();
            assert_eq!(
                on_disk, data,
                "{engine:?}: the file holds what the guest wrote"
            );
            let (status, used, back) = read(&mut d, 5, 3 * 512);
            assert_eq!((status, used), (OK, 3 * 512 + 1), "{engine:?}");
            assert_eq!(back, data, "{engine:?}");
            let (_, _, before) = read(&mut d, 4, 512);
            assert_eq!(
                before,
                vec![0xaa; 512],
                "{engine:?}: the sector before is untouched"
            );
            // The last sector of the disk is readable, the one after it is not.
            let last = (DISK / 512 - 1) as u64;
            assert_eq!(read(&mut d, last, 512).0, OK, "{engine:?}");
            assert!(d.interrupt.queue.load(Ordering::SeqCst) > 0);
        }
    }

    #[test]
    fn flush_discard_and_write_zeroes_work_through_both_engines() {
        for engine in [EngineKind::Uring, EngineKind::Sync] {
            let file = temp_file(DISK, 0xaa);
            let mem = memory();
            let mut d = Driver::new(&mem, file_device(&file, engine));
            d.activate();
            assert_eq!(
                command(&mut d, VIRTIO_BLK_T_FLUSH, &[]),
                (OK, 1),
                "{engine:?}"
            );
            // Write zeroes over two ranges, one of which may be unmapped.
            let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
            let mut ranges = range(8, 8, 0);
            ranges.extend(range(100, 16, unmap));
            assert_eq!(
                command(&mut d, VIRTIO_BLK_T_WRITE_ZEROES, &ranges),
                (OK, 1),
                "{engine:?}"
            );
            let mut disk = vec![0u8; DISK];
            file.as_file().read_exact_at(&mut disk, 0).unwrap();
            assert!(
                disk[8 * 512..16 * 512].iter().all(|&b| b == 0),
                "{engine:?}"
            );
            assert!(
                disk[100 * 512..116 * 512].iter().all(|&b| b == 0),
                "{engine:?}"
            );
            assert_eq!(disk[7 * 512..8 * 512], [0xaa; 512], "{engine:?}");
            assert_eq!(disk[16 * 512..17 * 512], [0xaa; 512], "{engine:?}");
            assert_eq!(read(&mut d, 100, 1024).2, vec![0; 1024], "{engine:?}");
            // Discard: the file system deallocates (reads then return zeros); neighbours stay.
            assert_eq!(
                command(&mut d, VIRTIO_BLK_T_DISCARD, &range(256, 256, 0)),
                (OK, 1),
                "{engine:?}"
            );
            file.as_file().read_exact_at(&mut disk, 0).unwrap();
            assert_eq!(disk[255 * 512..256 * 512], [0xaa; 512], "{engine:?}");
            assert_eq!(disk[512 * 512..513 * 512], [0xaa; 512], "{engine:?}");
            assert!(
                disk[256 * 512..512 * 512].iter().all(|&b| b == 0),
                "{engine:?}"
            );
        }
    }

    #[test]
    fn writethrough_requests_still_complete() {
        // Without FLUSH the device is writethrough: writes carry RWF_DSYNC and discards are
        // followed by a flush. The data must be the same.
        for engine in [EngineKind::Uring, EngineKind::Sync] {
            let file = temp_file(DISK, 0);
            let mem = memory();
            let mut d = Driver::new(&mem, file_device(&file, engine));
            let features = d.all_features() & !(1 << VIRTIO_BLK_F_FLUSH);
            d.activate_with(features);
            let data = pattern(4096, 3);
            assert_eq!(write(&mut d, 0, &data), (OK, 1));
            assert_eq!(read(&mut d, 0, 4096).2, data);
            let zeroes = range(0, 8, 0);
            assert_eq!(command(&mut d, VIRTIO_BLK_T_WRITE_ZEROES, &zeroes), (OK, 1));
            assert_eq!(read(&mut d, 0, 4096).2, vec![0; 4096], "{engine:?}");
        }
    }

    #[test]
    fn direct_io_round_trips_aligned_and_bounced_buffers() {
        let file = temp_file(DISK, 0xaa);
        let mut config = BlkConfig::file(file.as_path());
        config.direct = true;
        let blk = match Blk::new(config) {
            Ok(b) => b,
            Err(e) => panic!(
                "O_DIRECT on {} is needed for this test: {e}",
                file.as_path().display()
            ),
        };
        let mem = memory();
        let mut d = Driver::new(&mem, blk);
        d.activate();
        // 4 KiB-aligned buffers go straight to the kernel; `write` and `read` split theirs at
        // unaligned offsets, which go through a bounce buffer.
        let h = d.header(VIRTIO_BLK_T_OUT, 8);
        let data = pattern(4096, 9);
        let buf = GuestAddress(d.alloc(8192, 0).0.next_multiple_of(4096));
        d.mem.write_slice(&data, buf).unwrap();
        let s = d.status();
        assert_eq!(
            d.run(&[(h, 16, false), (buf, 4096, false), (s, 1, true)]),
            1
        );
        assert_eq!(d.byte(s), OK);
        let (status, _, back) = read(&mut d, 8, 4096);
        assert_eq!((status, back), (OK, data.clone()));
        let other = pattern(1536, 4);
        assert_eq!(write(&mut d, 1, &other).0, OK);
        let mut disk = vec![0u8; 1536];
        file.as_file().read_exact_at(&mut disk, 512).unwrap();
        assert_eq!(disk, other);
    }

    #[test]
    fn a_file_that_shrinks_under_the_device_gives_io_errors() {
        for engine in [EngineKind::Uring, EngineKind::Sync] {
            let file = temp_file(DISK, 0xaa);
            let mem = memory();
            let mut d = Driver::new(&mem, file_device(&file, engine));
            d.activate();
            file.as_file().set_len(4096).unwrap();
            // The first transfer is short (it stops at the new end), the resumed one gets
            // nothing: an I/O error, not a hang or a success.
            let (status, used, _) = read(&mut d, 4, 4096);
            assert_eq!((status, used), (IOERR, 1), "{engine:?}");
            let (status, _, data) = read(&mut d, 0, 4096);
            assert_eq!((status, data), (OK, vec![0xaa; 4096]), "{engine:?}");
        }
    }
}
