//! The io_uring engine: reads and writes go straight between the file and guest memory, the
//! operations of a batch are submitted with one system call, and completions raise an eventfd
//! the queue worker waits on.
//!
//! Every operation in the kernel is owned by the engine until its completion is reaped: its
//! [`IoBuffers`] keep the guest mapping and the iovec array alive. Dropping the engine waits for
//! every operation still in the kernel, so the kernel never writes to memory that was freed.
//!
//! [`Engine::cancel`] submits one `IORING_OP_ASYNC_CANCEL` for every operation of the ring
//! (`IORING_ASYNC_CANCEL_ANY`); what the kernel stops completes with `-ECANCELED`, what it can
//! no longer stop completes as usual. For tests of that path an engine can hold each operation
//! back for a while first (`delay`: a timeout linked before it, which the cancel stops too).
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    is_transient, is_unsupported, Completion, Engine, FallocateSupport, Op, StorageError,
    ZeroBuffer, ZeroStep, PUNCH_HOLE,
};

/// One operation the engine owns.
#[derive(Debug)]
struct Slot {
    token: u64,
    op: Op,
    /// Write zeroes: the way being tried, and for [`ZeroStep::Write`] the bytes written.
    step: ZeroStep,
    zeroed: u64,
}

/// See the module documentation.
pub(crate) struct UringEngine {
    ring: IoUring,
    eventfd: EventFd,
    /// The disk, open as long as the engine (the ring holds its own reference as well).
    _file: Arc<File>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Slots waiting for room in the submission queue (new, or resubmitted after a short
    /// transfer or a transient error).
    backlog: VecDeque<usize>,
    done: Vec<Completion>,
    /// Operations pushed to the ring and not yet completed; kept at most the completion queue's
    /// size so that no completion can be dropped.
    in_kernel: usize,
    max_in_kernel: usize,
    support: FallocateSupport,
    zeroes: Arc<ZeroBuffer>,
    cqes: Vec<(u64, i32)>,
    /// Tests only: each operation waits this long behind a linked timeout (read by the kernel
    /// when the timeout is submitted; boxed so that its address stays put).
    delay: Option<Box<types::Timespec>>,
    /// Set by [`Engine::cancel`] until nothing is left: operations that do not finish now
    /// complete as cancelled instead of being retried.
    cancelling: bool,
}

/// `user_data` of a delay timeout (the low bits: its operation's slot).
const TIMER_TAG: u64 = 1 << 62;
/// `user_data` of a cancel request.
const CANCEL_TAG: u64 = 1 << 63;

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("ring_fd", &self.ring.as_raw_fd())
            .field("eventfd", &self.eventfd.as_raw_fd())
            .field("in_flight", &self.in_flight())
            .field("in_kernel", &self.in_kernel)
            .field("support", &self.support)
            .finish()
    }
}

/// Registers the disk as the ring's only file and restricts the ring (IORING_REGISTER_RESTRICTIONS)
/// to what the engine submits: readv, writev, write, fsync and fallocate, each on that fixed
/// file, and cancels of its own operations (with `delay`, also timeouts linked to them); no
/// other opcode, no flag but IOSQE_FIXED_FILE, no register operation once enabled. A
/// compromised worker cannot use the ring to open, read or write anything else (seccomp does not
/// see the operations a ring carries out). Then enables the ring.
fn restrict(ring: &IoUring, disk: RawFd, delay: bool) -> Result<(), StorageError> {
    let ring_err = |what| move |source| StorageError::Ring { what, source };
    let submitter = ring.submitter();
    submitter
        .register_files(&[disk])
        .map_err(ring_err("registering the disk file"))?;
    let mut restrictions = vec![
        Restriction::sqe_op(opcode::Readv::CODE),
        Restriction::sqe_op(opcode::Writev::CODE),
        Restriction::sqe_op(opcode::Write::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        Restriction::sqe_op(opcode::Fallocate::CODE),
        // Cancels act on this ring's own operations only.
        Restriction::sqe_op(opcode::AsyncCancel2::CODE),
        Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
    ];
    if delay {
        restrictions.push(Restriction::sqe_op(opcode::Timeout::CODE));
        restrictions.push(Restriction::sqe_flags_allowed(
            squeue::Flags::IO_LINK.bits(),
        ));
    }
    submitter
        .register_restrictions(&mut restrictions)
        .map_err(ring_err("restricting the ring"))?;
    submitter
        .register_enable_rings()
        .map_err(ring_err("enabling the ring"))
}

impl UringEngine {
    /// A ring of `depth` entries (clamped to 8..=4096) on `file`, its completions signalled on a
    /// new eventfd. A non-zero `delay` holds every operation back that long (tests only).
    pub fn new(file: Arc<File>, depth: u32, delay: Duration) -> Result<Self, StorageError> {
        // Created disabled, so that it can be restricted before it runs anything.
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(depth.clamp(8, 4096))
            .map_err(|source| StorageError::Ring {
                what: "setup",
                source,
            })?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(|source| StorageError::Ring {
            what: "eventfd creation",
            source,
        })?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(|source| StorageError::Ring {
                what: "eventfd registration",
                source,
            })?;
        restrict(&ring, file.as_raw_fd(), !delay.is_zero())?;
        let max_in_kernel = ring.params().cq_entries() as usize;
        Ok(UringEngine {
            ring,
            eventfd,
            _file: file,
            slots: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            done: Vec::new(),
            in_kernel: 0,
            max_in_kernel,
            support: FallocateSupport::default(),
            zeroes: Arc::new(ZeroBuffer::new()),
            cqes: Vec::new(),
            delay: (!delay.is_zero()).then(|| Box::new(types::Timespec::from(delay))),
            cancelling: false,
        })
    }

    fn finish(&mut self, id: usize, result: Result<(), StorageError>) {
        if let Some(slot) = self.slots.get_mut(id).and_then(Option::take) {
            let result = match (&slot.op, result) {
                (Op::Read { bufs, .. }, Ok(())) => bufs.finish(),
                (_, r) => r,
            };
            self.free.push(id);
            self.done.push(Completion {
                token: slot.token,
                result,
            });
        }
    }

    /// The submission queue entry for slot `id` in its current state.
    fn entry(&self, id: usize, slot: &Slot) -> squeue::Entry {
        // The disk is the ring's only registered file, and the only one it may use.
        let fd = types::Fixed(0);
        let entry = match &slot.op {
            Op::Read { offset, bufs } => {
                let iov = bufs.pending();
                // At most UIO_MAXIOV iovecs: IoBuffers bounces more.
                opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                    .offset(offset + bufs.done() as u64)
                    .build()
            }
            Op::Write {
                offset,
                bufs,
                durable,
            } => {
                let iov = bufs.pending();
                opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                    .offset(offset + bufs.done() as u64)
                    .rw_flags(if *durable { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard { offset, len } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(PUNCH_HOLE)
                .build(),
            Op::WriteZeroes { offset, len, .. } => match slot.step.mode() {
                Some(mode) => opcode::Fallocate::new(fd, *len)
                    .offset(*offset)
                    .mode(mode)
                    .build(),
                None => {
                    let n = (len - slot.zeroed).min(ZeroBuffer::LEN as u64) as u32;
                    opcode::Write::new(fd, self.zeroes.as_slice().as_ptr(), n)
                        .offset(offset + slot.zeroed)
                        .build()
                }
            },
        };
        entry.user_data(id as u64)
    }

    /// Pushes backlogged operations while the rings have room.
    fn push_backlog(&mut self) {
        // Each operation takes one entry, two with its delay timeout (linked, so pushed
        // together); one completion stays free for a cancel request.
        let per_op = if self.delay.is_some() { 2 } else { 1 };
        while self.in_kernel + per_op < self.max_in_kernel {
            let Some(&id) = self.backlog.front() else {
                break;
            };
            let Some(slot) = self.slots.get(id).and_then(Option::as_ref) else {
                self.backlog.pop_front();
                continue;
            };
            let entry = self.entry(id, slot);
            let mut sq = self.ring.submission();
            // SAFETY: every buffer the entries refer to stays valid until their completions
            // are reaped: the iovec array and the memory it points to belong to the slot's
            // IoBuffers (which also hold the guest mapping), the zero buffer and the delay's
            // timespec to the engine, and slots are only freed when their completion arrives;
            // Drop waits for every operation in the kernel.
            let pushed = match &self.delay {
                // SAFETY: see above.
                None => unsafe { sq.push(&entry) },
                Some(ts) => {
                    let ts: &types::Timespec = ts;
                    let timer = opcode::Timeout::new(ts)
                        .flags(types::TimeoutFlags::ETIME_SUCCESS)
                        .build()
                        .flags(squeue::Flags::IO_LINK | squeue::Flags::FIXED_FILE)
                        .user_data(TIMER_TAG | id as u64);
                    // SAFETY: as above.
                    unsafe { sq.push_multiple(&[timer, entry]) }
                }
            };
            drop(sq);
            if pushed.is_err() {
                // The submission queue is full: hand it to the kernel and try again later.
                if let Err(e) = self.ring.submit() {
                    if !is_transient(&e) && e.raw_os_error() != Some(libc::EBUSY) {
                        log::error!("virtio-blk: io_uring submit failed: {e}");
                    }
                    break;
                }
                continue;
            }
            self.backlog.pop_front();
            self.in_kernel += per_op;
        }
    }

    /// Handles one completion: finishes the operation, or queues what is left of it.
    fn complete(&mut self, id: usize, res: i32) {
        let Some(slot) = self.slots.get_mut(id).and_then(Option::as_mut) else {
            log::error!("virtio-blk: io_uring completion for unknown operation {id}");
            return;
        };
        let op = slot.op.name();
        let offset = slot.op.offset();
        let unfinished = res < 0
            || matches!(&slot.op, Op::Read { bufs, .. } | Op::Write { bufs, .. }
                if bufs.remaining() > res as usize);
        if self.cancelling && unfinished {
            // Stopped (or failed, or short) while cancelling: the request is carried out again
            // as a whole later, so this part is not retried now.
            return self.finish(id, Err(StorageError::Cancelled { op, offset }));
        }
        if res < 0 {
            let source = io::Error::from_raw_os_error(-res);
            if is_transient(&source) {
                self.backlog.push_back(id);
                return;
            }
            if is_unsupported(&source) {
                match &slot.op {
                    // Discard is advisory.
                    Op::Discard { .. } => {
                        self.support.punch_hole = false;
                        return self.finish(id, Ok(()));
                    }
                    Op::WriteZeroes { .. } if slot.step != ZeroStep::Write => {
                        slot.step = self.support.unsupported(slot.step);
                        self.backlog.push_back(id);
                        return;
                    }
                    _ => {}
                }
            }
            return self.finish(id, Err(StorageError::Io { op, offset, source }));
        }
        let n = res as usize;
        match &mut slot.op {
            Op::Read { bufs, .. } | Op::Write { bufs, .. } => {
                if n == 0 && bufs.remaining() > 0 {
                    let remaining = bufs.remaining();
                    let offset = offset + bufs.done() as u64;
                    return self.finish(
                        id,
                        Err(StorageError::ShortTransfer {
                            op,
                            offset,
                            remaining,
                        }),
                    );
                }
                bufs.advance(n);
                if bufs.remaining() > 0 {
                    self.backlog.push_back(id);
                    return;
                }
            }
            Op::WriteZeroes { len, .. } if slot.step == ZeroStep::Write => {
                slot.zeroed += n as u64;
                if n == 0 {
                    let err = StorageError::ShortTransfer {
                        op,
                        offset: offset + slot.zeroed,
                        remaining: (*len - slot.zeroed) as usize,
                    };
                    return self.finish(id, Err(err));
                }
                if slot.zeroed < *len {
                    self.backlog.push_back(id);
                    return;
                }
            }
            _ => {}
        }
        self.finish(id, Ok(()))
    }

    /// Takes every completion the kernel has posted.
    fn drain_cq(&mut self) -> bool {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let any = !cqes.is_empty();
        for &(id, res) in &cqes {
            self.in_kernel = self.in_kernel.saturating_sub(1);
            if id & (TIMER_TAG | CANCEL_TAG) != 0 {
                // A delay ran out or was cancelled, or a cancel request finished: the
                // operations themselves complete on their own entries.
                continue;
            }
            self.complete(id as usize, res);
        }
        cqes.clear();
        self.cqes = cqes;
        any
    }
}

impl Engine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn enqueue(&mut self, token: u64, op: Op) {
        let step = match &op {
            Op::WriteZeroes { unmap, .. } => self.support.first_step(*unmap),
            _ => ZeroStep::Write,
        };
        let slot = Slot {
            token,
            op,
            step,
            zeroed: 0,
        };
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let discard_unsupported = matches!(slot.op, Op::Discard { .. }) && !self.support.punch_hole;
        self.slots[id] = Some(slot);
        if discard_unsupported {
            self.finish(id, Ok(()));
        } else {
            self.backlog.push_back(id);
        }
    }

    fn submit(&mut self) {
        self.push_backlog();
        if self.ring.submission().is_empty() {
            return;
        }
        if let Err(e) = self.ring.submit() {
            // Entries stay in the submission queue and go with the next submit.
            if !is_transient(&e) && e.raw_os_error() != Some(libc::EBUSY) {
                log::error!("virtio-blk: io_uring submit failed: {e}");
            }
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn reap(&mut self, done: &mut Vec<Completion>) {
        // Without completions this makes no system call (the busy-poll path).
        if !self.ring.completion().is_empty() {
            // Reset the eventfd, then take the completions, until a reset is followed by an
            // empty queue: the eventfd is then raised only for completions still to take, so
            // none is missed and the worker is not woken for nothing. A failed read only means
            // the eventfd was not raised.
            loop {
                let _ = self.eventfd.read();
                if !self.drain_cq() {
                    break;
                }
            }
            if !self.backlog.is_empty() {
                self.submit();
            }
        }
        if self.cancelling && self.in_kernel == 0 && self.backlog.is_empty() {
            self.cancelling = false;
        }
        done.append(&mut self.done);
    }

    fn wait(&mut self) -> Result<(), StorageError> {
        self.push_backlog();
        if self.in_kernel == 0 {
            return Ok(());
        }
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) || e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(source) => Err(StorageError::Ring {
                what: "wait",
                source,
            }),
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.done.len()
    }

    fn cancel(&mut self) {
        // What never reached the kernel is cancelled here and now.
        let waiting: Vec<usize> = self.backlog.drain(..).collect();
        for id in waiting {
            if let Some(slot) = self.slots.get(id).and_then(Option::as_ref) {
                let (op, offset) = (slot.op.name(), slot.op.offset());
                self.finish(id, Err(StorageError::Cancelled { op, offset }));
            }
        }
        if self.in_kernel == 0 {
            return;
        }
        self.cancelling = true;
        // One request cancels everything of this ring the kernel can still stop. Its
        // completion is counted in `in_kernel` like any other; `push_backlog` keeps room for it.
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(CANCEL_TAG);
        // SAFETY: a cancel request refers to no memory.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            if let Err(e) = self.ring.submit() {
                log::warn!("virtio-blk: cannot submit to cancel io_uring operations: {e}");
                return;
            }
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                return;
            }
        }
        self.in_kernel += 1;
        if let Err(e) = self.ring.submit() {
            if !is_transient(&e) && e.raw_os_error() != Some(libc::EBUSY) {
                log::warn!("virtio-blk: cannot submit an io_uring cancel: {e}");
            }
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.backlog.clear();
        while self.in_kernel > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if !is_transient(&e) {
                    log::error!(
                        "virtio-blk: cannot wait for {} io_uring operations ({e}); leaking their buffers",
                        self.in_kernel
                    );
                    // The kernel may still use them: never free them.
                    std::mem::forget(std::mem::take(&mut self.slots));
                    std::mem::forget(self.zeroes.clone());
                    return;
                }
            }
            let n = self.ring.completion().count();
            self.in_kernel = self.in_kernel.saturating_sub(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::storage::{Direction, IoBuffers};
    use crate::testing::temp_file;
    use crate::Segment;
    use outboard_virtio::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_ring_refuses_other_files_and_other_operations() {
        let f = temp_file(4096, 0);
        let mut e = engine(&f);
        let other = temp_file(4096, 1);
        let mut buf = [0u8; 16];
        let attempts = [
            // A read of a file that is not the registered disk.
            opcode::Read::new(types::Fd(other.as_file().as_raw_fd()), buf.as_mut_ptr(), 16).build(),
            // An operation the engine never submits, even on the disk.
            opcode::Fadvise::new(types::Fixed(0), 16, libc::POSIX_FADV_NORMAL).build(),
            opcode::Nop::new().build(),
        ];
        for (i, sqe) in attempts.into_iter().enumerate() {
            // SAFETY: the entry points at `buf`, which outlives the wait for its completion.
            unsafe { e.ring.submission().push(&sqe.user_data(1000 + i as u64)) }.unwrap();
            e.ring.submit_and_wait(1).unwrap();
            let cqe = e.ring.completion().next().expect("a completion");
            assert_eq!(
                cqe.result(),
                -libc::EACCES,
                "attempt {i} must be refused by the ring's restrictions"
            );
        }
    }

    fn engine(file: &vmm_sys_util::tempfile::TempFile) -> UringEngine {
        let file = Arc::new(file.as_file().try_clone().unwrap());
        UringEngine::new(file, 8, Duration::ZERO).expect("io_uring is needed for this test")
    }

    /// Runs `ops` to completion; returns their results in token order.
    fn run(e: &mut UringEngine, ops: Vec<Op>) -> Vec<Result<(), StorageError>> {
        let n = ops.len();
        for (i, op) in ops.into_iter().enumerate() {
            e.enqueue(i as u64, op);
        }
        e.submit();
        let mut done = Vec::new();
        while done.len() < n {
            e.wait().unwrap();
            e.reap(&mut done);
        }
        done.sort_by_key(|c| c.token);
        done.into_iter().map(|c| c.result).collect()
    }

    #[test]
    fn write_zeroes_falls_back_to_writing_zeros() {
        let file = temp_file(3 << 20, 0xaa);
        let mut e = engine(&file);
        e.support = FallocateSupport {
            punch_hole: false,
            zero_range: false,
        };
        let (offset, len) = (4096u64, (5 << 20) / 2);
        let op = Op::WriteZeroes {
            offset,
            len,
            unmap: true,
        };
        assert!(run(&mut e, vec![op])[0].is_ok());
        let mut disk = vec![0u8; 3 << 20];
        file.as_file().read_exact_at(&mut disk, 0).unwrap();
        let end = (offset + len) as usize;
        assert!(disk[offset as usize..end].iter().all(|&b| b == 0));
        assert!(disk[..offset as usize].iter().all(|&b| b == 0xaa));
        assert!(disk[end..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn discard_without_punch_hole_succeeds_and_changes_nothing() {
        let file = temp_file(1 << 20, 0xaa);
        let mut e = engine(&file);
        e.support.punch_hole = false;
        let op = Op::Discard {
            offset: 0,
            len: 1 << 20,
        };
        assert!(run(&mut e, vec![op])[0].is_ok());
        let mut disk = vec![0u8; 1 << 20];
        file.as_file().read_exact_at(&mut disk, 0).unwrap();
        assert!(disk.iter().all(|&b| b == 0xaa));
    }

    fn writes(mem: &Arc<GuestMemoryMmap>, n: u64) -> Vec<Op> {
        (0..n)
            .map(|i| {
                mem.write_slice(&[i as u8 + 1; 512], GuestAddress(i * 512))
                    .unwrap();
                let seg = Segment {
                    addr: GuestAddress(i * 512),
                    len: 512,
                };
                let bufs = IoBuffers::new(mem, vec![seg], Direction::FromGuest, 1).unwrap();
                Op::Write {
                    offset: i * 512,
                    bufs,
                    durable: false,
                }
            })
            .collect()
    }

    #[test]
    fn cancel_stops_operations_still_in_the_kernel_and_they_never_reach_the_file() {
        let file = temp_file(1 << 20, 0);
        let disk = Arc::new(file.as_file().try_clone().unwrap());
        // Each operation waits 20 s behind its timeout: they are all still in the kernel (or
        // in the backlog, past the ring's size) when the cancel comes.
        let mut e = UringEngine::new(disk, 8, Duration::from_secs(20)).unwrap();
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        for (i, op) in writes(&mem, 20).into_iter().enumerate() {
            e.enqueue(i as u64, op);
        }
        e.submit();
        let started = std::time::Instant::now();
        e.cancel();
        let mut done = Vec::new();
        while done.len() < 20 {
            e.wait().unwrap();
            e.reap(&mut done);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the cancel waited"
        );
        for c in &done {
            assert!(
                matches!(c.result, Err(StorageError::Cancelled { .. })),
                "{:?}",
                c.result
            );
        }
        assert_eq!(e.in_flight(), 0);
        let mut b = vec![0u8; 20 * 512];
        file.as_file().read_exact_at(&mut b, 0).unwrap();
        assert!(
            b.iter().all(|&x| x == 0),
            "a cancelled write reached the file"
        );
        // The engine works normally afterwards (the delay still applies, so it is not used).
        assert!(!e.cancelling);
    }

    #[test]
    fn cancel_after_completion_changes_nothing() {
        let file = temp_file(1 << 20, 0);
        let mut e = engine(&file);
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        assert!(run(&mut e, writes(&mem, 4)).iter().all(Result::is_ok));
        e.cancel();
        assert!(run(&mut e, writes(&mem, 4)).iter().all(Result::is_ok));
        let mut b = [0u8; 512];
        file.as_file().read_exact_at(&mut b, 3 * 512).unwrap();
        assert_eq!(b, [4; 512]);
    }

    #[test]
    fn more_operations_than_the_ring_holds_all_complete() {
        let file = temp_file(1 << 20, 0);
        let mut e = engine(&file);
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let ops = (0..100u64)
            .map(|i| {
                mem.write_slice(&[i as u8; 512], GuestAddress(i * 512))
                    .unwrap();
                let seg = Segment {
                    addr: GuestAddress(i * 512),
                    len: 512,
                };
                let bufs = IoBuffers::new(&mem, vec![seg], Direction::FromGuest, 1).unwrap();
                Op::Write {
                    offset: i * 512,
                    bufs,
                    durable: false,
                }
            })
            .collect();
        assert!(run(&mut e, ops).iter().all(Result::is_ok));
        for i in 0..100u64 {
            let mut b = [0u8; 512];
            file.as_file().read_exact_at(&mut b, i * 512).unwrap();
            assert_eq!(b, [i as u8; 512]);
        }
        assert_eq!(e.in_flight(), 0);
        // Every completion was taken, so the eventfd must not be left raised: the worker would
        // be woken again and again for nothing.
        let e2 = e.eventfd.read();
        assert!(
            matches!(&e2, Err(err) if err.kind() == io::ErrorKind::WouldBlock),
            "{e2:?}"
        );
    }
}
