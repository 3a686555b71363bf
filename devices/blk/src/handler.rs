//! The device-specific half of a queue worker: takes chains from the queues, parses them into
//! requests, hands their storage operations to the thread's engine, and publishes each request
//! (status byte, used entry, notification) once all its operations are done.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, PoisonError};

use outboard_virtio::fault::{self, FaultPoint};
use outboard_virtio::worker::QueueHandler;
use outboard_virtio::Chain;
use outboard_virtio::{ActiveQueue, GuestMemoryMmap, Interrupt};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{Bytes, GuestAddress};

use crate::config::{CacheMode, SERIAL_LEN};
use crate::request::{locate_status, BlkRequest, RequestKind, RequestLimits, Segment, SECTOR_SIZE};
use crate::storage::{Completion, Direction, Engine, IoBuffers, NullEngine, Op, StorageError};

/// Where a worker's engine lives while no worker uses it, so that it is made once (when the
/// device is created, before a sandbox may forbid it) and reused across activations.
pub(crate) type EngineSlot = Arc<Mutex<Option<Box<dyn Engine>>>>;

/// What every worker of one activation shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// What requests are checked against.
    pub limits: RequestLimits,
    /// The write cache policy.
    pub cache: CacheMode,
    /// The GET_ID answer.
    pub serial: [u8; SERIAL_LEN],
    /// The alignment `O_DIRECT` needs (1 when buffered).
    pub dio_align: usize,
    /// Whether write zeroes with the unmap flag may deallocate.
    pub may_unmap: bool,
}

/// A request whose storage operations are in flight.
#[derive(Debug)]
struct Pending {
    queue: u16,
    head: u16,
    status: GuestAddress,
    /// The memory snapshot the request was parsed in; its status byte is written through it.
    mem: Arc<GuestMemoryMmap>,
    /// Operations not yet complete.
    ops: usize,
    /// The first error of any operation.
    error: Option<StorageError>,
    /// The used length on success.
    ok_len: u32,
    /// Flush once every operation succeeded (writethrough discard and write zeroes).
    flush_after: bool,
    /// The request changes the disk (write, discard, write zeroes, flush).
    writes: bool,
    /// An operation was cancelled: the request is dropped unanswered (its inflight record
    /// brings it back).
    cancelled: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct BlkHandler {
    shared: Arc<Shared>,
    engine: Box<dyn Engine>,
    home: EngineSlot,
    requests: Vec<Option<Pending>>,
    free: Vec<usize>,
    live: usize,
    done: Vec<Completion>,
    touched: Vec<u16>,
}

/// Writes `status` and returns the used length `len`, or 0 if the byte cannot be written.
fn write_status(mem: &GuestMemoryMmap, addr: GuestAddress, status: u32, len: u32) -> u32 {
    match mem.write_obj(status as u8, addr) {
        Ok(()) => len,
        Err(e) => {
            log::error!(
                "virtio-blk: cannot write the status byte at {:#x}: {e}",
                addr.0
            );
            0
        }
    }
}

fn data_len(data: &[Segment]) -> u64 {
    data.iter().map(|s| u64::from(s.len)).sum()
}

impl BlkHandler {
    pub fn new(shared: Arc<Shared>, engine: Box<dyn Engine>, home: EngineSlot) -> Self {
        BlkHandler {
            shared,
            engine,
            home,
            requests: Vec::new(),
            free: Vec::new(),
            live: 0,
            done: Vec::new(),
            touched: Vec::new(),
        }
    }

    fn insert(&mut self, p: Pending) -> u64 {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.requests[i] = Some(p);
                i as u64
            }
            None => {
                self.requests.push(Some(p));
                (self.requests.len() - 1) as u64
            }
        }
    }

    /// Parses one chain and starts it. Returns the used entry (head, length) of a request
    /// answered at once.
    fn start(
        &mut self,
        queue: u16,
        chain: Chain<'_>,
        mem: &Arc<GuestMemoryMmap>,
    ) -> Option<(u16, u32)> {
        let head = chain.head_index();
        let request = match BlkRequest::parse(chain.clone(), mem, &self.shared.limits) {
            Ok(r) => r,
            Err(e) => {
                let Some(status) = locate_status(chain, mem) else {
                    log::warn!("virtio-blk: queue {queue}: request {head} cannot be answered: {e}");
                    return Some((head, 0));
                };
                log::debug!("virtio-blk: queue {queue}: request {head} refused: {e}");
                return Some((head, write_status(mem, status, e.status().into(), 1)));
            }
        };
        let (head, kind, status) = request.into_parts();
        let ok = |len: u32| Some((head, write_status(mem, status, VIRTIO_BLK_S_OK, len)));
        let ioerr = |e: StorageError| {
            log::warn!("virtio-blk: queue {queue}: request {head} failed: {e}");
            Some((head, write_status(mem, status, VIRTIO_BLK_S_IOERR, 1)))
        };
        let writeback = self.shared.cache.is_writeback();
        let align = self.shared.dio_align;
        let mut pending = Pending {
            queue,
            head,
            status,
            mem: mem.clone(),
            ops: 1,
            error: None,
            ok_len: 1,
            flush_after: false,
            writes: matches!(
                kind,
                RequestKind::Write { .. }
                    | RequestKind::Flush
                    | RequestKind::Discard { .. }
                    | RequestKind::WriteZeroes { .. }
            ),
            cancelled: false,
        };
        let ops = match kind {
            RequestKind::Read { sector, data } => {
                let len = data_len(&data);
                if len == 0 {
                    return ok(1);
                }
                let bufs = match IoBuffers::new(mem, data, Direction::ToGuest, align) {
                    Ok(b) => b,
                    Err(e) => return ioerr(e),
                };
                // The chain is under 4 GiB, so the data and the status fit a u32.
                pending.ok_len = u32::try_from(len + 1).unwrap_or(u32::MAX);
                vec![Op::Read {
                    offset: sector * SECTOR_SIZE,
                    bufs,
                }]
            }
            RequestKind::Write { sector, data } => {
                if data_len(&data) == 0 {
                    return ok(1);
                }
                let bufs = match IoBuffers::new(mem, data, Direction::FromGuest, align) {
                    Ok(b) => b,
                    Err(e) => return ioerr(e),
                };
                vec![Op::Write {
                    offset: sector * SECTOR_SIZE,
                    bufs,
                    durable: !writeback,
                }]
            }
            RequestKind::Flush => vec![Op::Flush],
            RequestKind::GetId { data } => {
                return match self.write_serial(mem, &data) {
                    Ok(()) => ok(SERIAL_LEN as u32 + 1),
                    Err(e) => ioerr(e),
                };
            }
            RequestKind::Discard { ranges } => {
                pending.flush_after = !writeback;
                ranges
                    .iter()
                    .filter(|r| r.num_sectors > 0)
                    .map(|r| Op::Discard {
                        offset: r.sector * SECTOR_SIZE,
                        len: u64::from(r.num_sectors) * SECTOR_SIZE,
                    })
                    .collect()
            }
            RequestKind::WriteZeroes { ranges } => {
                pending.flush_after = !writeback;
                ranges
                    .iter()
                    .filter(|r| r.num_sectors > 0)
                    .map(|r| Op::WriteZeroes {
                        offset: r.sector * SECTOR_SIZE,
                        len: u64::from(r.num_sectors) * SECTOR_SIZE,
                        unmap: r.unmap && self.shared.may_unmap,
                    })
                    .collect()
            }
        };
        if ops.is_empty() {
            return ok(1);
        }
        pending.ops = ops.len();
        let token = self.insert(pending);
        for op in ops {
            self.engine.enqueue(token, op);
        }
        None
    }

    /// Writes the serial number into the GET_ID buffer (at least 20 bytes, checked by parsing).
    fn write_serial(&self, mem: &GuestMemoryMmap, data: &[Segment]) -> Result<(), StorageError> {
        let mut at = 0;
        for seg in data {
            if at == SERIAL_LEN {
                break;
            }
            let n = (seg.len as usize).min(SERIAL_LEN - at);
            mem.write_slice(&self.shared.serial[at..at + n], seg.addr)
                .map_err(|source| StorageError::GuestMemory {
                    addr: seg.addr.0,
                    source,
                })?;
            at += n;
        }
        Ok(())
    }

    /// Publishes every finished request on its queue (among `queues`), recording the queues
    /// that got used entries in `self.touched`. Returns the first used-ring error.
    fn publish(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), virtio_queue::Error> {
        let mut first_err = None;
        loop {
            self.engine.reap(&mut self.done);
            if self.done.is_empty() {
                break;
            }
            let mut resubmit = false;
            let mut done = std::mem::take(&mut self.done);
            for c in done.drain(..) {
                let token = c.token;
                let Some(p) = self
                    .requests
                    .get_mut(token as usize)
                    .and_then(Option::as_mut)
                else {
                    log::error!("virtio-blk: completion for unknown request {token}");
                    continue;
                };
                match c.result {
                    Ok(()) => {}
                    Err(StorageError::Cancelled { .. }) => p.cancelled = true,
                    Err(e) => {
                        p.error.get_or_insert(e);
                    }
                }
                p.ops -= 1;
                if p.ops > 0 {
                    continue;
                }
                if p.flush_after && p.error.is_none() && !p.cancelled {
                    p.flush_after = false;
                    p.ops = 1;
                    self.engine.enqueue(token, Op::Flush);
                    resubmit = true;
                    continue;
                }
                let Some(p) = self.requests[token as usize].take() else {
                    continue;
                };
                self.free.push(token as usize);
                self.live -= 1;
                if p.cancelled {
                    // Not answered: the queue's inflight record still holds the request.
                    log::debug!(
                        "virtio-blk: queue {}: request {} cancelled, left to the inflight record",
                        p.queue,
                        p.head
                    );
                    continue;
                }
                let (status, len) = match p.error {
                    None => {
                        if p.writes {
                            fault::hit(FaultPoint::AfterStorageWrite);
                        }
                        (VIRTIO_BLK_S_OK, p.ok_len)
                    }
                    Some(e) => {
                        log::warn!(
                            "virtio-blk: queue {}: request {} failed: {e}",
                            p.queue,
                            p.head
                        );
                        (VIRTIO_BLK_S_IOERR, 1)
                    }
                };
                let len = write_status(&p.mem, p.status, status, len);
                let Some(q) = queues.iter_mut().find(|q| q.index() == p.queue) else {
                    log::error!(
                        "virtio-blk: request {} of queue {} has no queue",
                        p.head,
                        p.queue
                    );
                    continue;
                };
                if let Err(e) = q.add_used(mem, p.head, len) {
                    first_err.get_or_insert(e);
                }
                if !self.touched.contains(&p.queue) {
                    self.touched.push(p.queue);
                }
            }
            self.done = done;
            if resubmit {
                self.engine.submit();
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Signals every queue in `self.touched`.
    fn notify(&mut self, queues: &mut [ActiveQueue], mem: &GuestMemoryMmap, irq: &dyn Interrupt) {
        for index in self.touched.drain(..) {
            if let Some(q) = queues.iter_mut().find(|q| q.index() == index) {
                q.notify(mem, irq);
            }
        }
    }
}

impl QueueHandler for BlkHandler {
    fn process_queue(
        &mut self,
        queue: &mut ActiveQueue,
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) -> Result<(), virtio_queue::Error> {
        let index = queue.index();
        let mut used_err = None;
        let mut answered = false;
        queue.take_available(mem, |q, chain| {
            if let Some((head, len)) = self.start(index, chain, mem) {
                answered = true;
                if let Err(e) = q.add_used(mem, head, len) {
                    used_err.get_or_insert(e);
                }
            }
        })?;
        self.engine.submit();
        let queues = std::slice::from_mut(queue);
        // A synchronous engine has finished everything already; an asynchronous one reports
        // through its completion fd.
        let published = if self.engine.completion_fd().is_none() {
            self.publish(queues, mem)
        } else {
            Ok(())
        };
        if answered && !self.touched.contains(&index) {
            self.touched.push(index);
        }
        self.notify(queues, mem, interrupt);
        match used_err {
            Some(e) => Err(e),
            None => published,
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.engine.completion_fd()
    }

    fn process_completions(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) -> bool {
        if let Err(e) = self.publish(queues, mem) {
            log::error!("virtio-blk: cannot publish completed requests: {e}");
            interrupt.signal_needs_reset();
        }
        let any = !self.touched.is_empty();
        self.notify(queues, mem, interrupt);
        any
    }

    fn drain(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) {
        loop {
            self.process_completions(queues, mem, interrupt);
            if self.live == 0 {
                return;
            }
            if self.engine.in_flight() == 0 {
                log::error!(
                    "virtio-blk: {} requests in flight but none in the {} engine",
                    self.live,
                    self.engine.name()
                );
                return;
            }
            if let Err(e) = self.engine.wait() {
                log::error!("virtio-blk: cannot wait for requests in flight: {e}");
                interrupt.signal_needs_reset();
                return;
            }
        }
    }

    fn suspend(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) {
        // The engine cancels what it still can; the rest finishes and is answered.
        self.engine.cancel();
        self.drain(queues, mem, interrupt);
    }
}

impl Drop for BlkHandler {
    fn drop(&mut self) {
        let engine = std::mem::replace(&mut self.engine, Box::new(NullEngine::new()));
        if engine.in_flight() == 0 {
            *self.home.lock().unwrap_or_else(PoisonError::into_inner) = Some(engine);
        }
        // Otherwise the engine is dropped here, which waits for what the kernel still holds.
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::Ordering;

    use outboard_virtio::VirtioDevice;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_bindings::virtio_blk::*;
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::testing::*;
    use crate::{Blk, BlkConfig, EngineKind};

    #[test]
    fn get_id_returns_the_serial_padded_with_zeros() {
        let mem = memory();
        let mut config = BlkConfig::null(DISK as u64);
        config.serial = "outboard-serial".into();
        let mut d = Driver::new(&mem, Blk::new(config).unwrap());
        d.activate();
        let h = d.header(VIRTIO_BLK_T_GET_ID, 0);
        let buf = d.alloc(20, 0xff);
        let s = d.status();
        let used = d.run(&[(h, 16, false), (buf, 20, true), (s, 1, true)]);
        assert_eq!((d.byte(s), used), (OK, 21));
        let mut want = b"outboard-serial".to_vec();
        want.resize(20, 0);
        assert_eq!(d.read(buf, 20), want);
        // A buffer shorter than the serial is refused.
        let h = d.header(VIRTIO_BLK_T_GET_ID, 0);
        let buf = d.alloc(8, 0xff);
        let s = d.status();
        let used = d.run(&[(h, 16, false), (buf, 8, true), (s, 1, true)]);
        assert_eq!((d.byte(s), used), (IOERR, 1));
        assert_eq!(d.read(buf, 8), vec![0xff; 8]);
    }

    #[test]
    fn the_null_device_reads_zeros_and_forgets_writes() {
        let mem = memory();
        let mut d = Driver::new(&mem, Blk::new(BlkConfig::null(DISK as u64)).unwrap());
        assert_eq!(d.device.engine_name(), Some("null"));
        d.activate();
        assert_eq!(write(&mut d, 0, &pattern(1024, 1)), (OK, 1));
        let (status, used, back) = read(&mut d, 0, 1024);
        assert_eq!((status, used), (OK, 1025));
        assert_eq!(back, vec![0; 1024]);
        assert_eq!(command(&mut d, VIRTIO_BLK_T_FLUSH, &[]), (OK, 1));
        assert_eq!(read(&mut d, (DISK / 512) as u64, 512).0, IOERR);
    }

    #[test]
    fn sectors_past_the_end_are_io_errors() {
        let file = temp_file(DISK, 0xaa);
        let mem = memory();
        let mut d = Driver::new(&mem, file_device(&file, EngineKind::Uring));
        d.activate();
        let last = (DISK / 512 - 1) as u64;
        let (status, used, data) = read(&mut d, last, 1024);
        assert_eq!((status, used), (IOERR, 1));
        assert_eq!(data, vec![0x55; 1024], "nothing was read into the buffers");
        assert_eq!(
            write(&mut d, u64::MAX, &[1; 512]).0,
            IOERR,
            "sector overflow"
        );
        let ranges = range(last, 2, 0);
        assert_eq!(command(&mut d, VIRTIO_BLK_T_WRITE_ZEROES, &ranges).0, IOERR);
        let mut disk = vec![0u8; 512];
        file.as_file().read_exact_at(&mut disk, last * 512).unwrap();
        assert_eq!(disk, vec![0xaa; 512]);
    }

    #[test]
    fn a_read_only_device_refuses_writes() {
        let file = temp_file(DISK, 0xaa);
        let mut config = BlkConfig::file(file.as_path());
        config.read_only = true;
        let mem = memory();
        let mut d = Driver::new(&mem, Blk::new(config).unwrap());
        assert_ne!(d.device.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
        d.activate();
        assert_eq!(write(&mut d, 0, &[1; 512]), (IOERR, 1));
        assert_eq!(read(&mut d, 0, 512).2, vec![0xaa; 512]);
        // Discard and write zeroes are not offered on a read-only device.
        let ranges = range(0, 1, 0);
        assert_eq!(command(&mut d, VIRTIO_BLK_T_DISCARD, &ranges).0, UNSUPP);
        assert_eq!(command(&mut d, VIRTIO_BLK_T_FLUSH, &[]).0, OK);
    }

    #[test]
    fn unknown_types_and_flags_are_unsupported() {
        let file = temp_file(DISK, 0xaa);
        let mem = memory();
        let mut d = Driver::new(&mem, file_device(&file, EngineKind::Uring));
        d.activate();
        assert_eq!(command(&mut d, 0x77, &[]), (UNSUPP, 1));
        assert_eq!(command(&mut d, VIRTIO_BLK_T_SCSI_CMD, &[]), (UNSUPP, 1));
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let ranges = range(0, 8, unmap);
        assert_eq!(command(&mut d, VIRTIO_BLK_T_DISCARD, &ranges).0, UNSUPP);
        let ranges = range(0, 8, 2);
        assert_eq!(
            command(&mut d, VIRTIO_BLK_T_WRITE_ZEROES, &ranges).0,
            UNSUPP
        );
        let mut disk = vec![0u8; 4096];
        file.as_file().read_exact_at(&mut disk, 0).unwrap();
        assert_eq!(disk, vec![0xaa; 4096], "refused commands changed nothing");
        // A command the driver did not negotiate is unsupported too.
        drop(d);
        let mut d = Driver::new(&mem, file_device(&file, EngineKind::Uring));
        let features = d.all_features() & !(1 << VIRTIO_BLK_F_DISCARD);
        d.activate_with(features);
        assert_eq!(
            command(&mut d, VIRTIO_BLK_T_DISCARD, &range(0, 8, 0)).0,
            UNSUPP
        );
    }

    #[test]
    fn malformed_chains_get_an_io_error_where_a_status_byte_exists() {
        let file = temp_file(DISK, 0xaa);
        let mem = memory();
        let mut d = Driver::new(&mem, file_device(&file, EngineKind::Uring));
        d.activate();
        // The header in a device-writable descriptor.
        let h = d.header(VIRTIO_BLK_T_IN, 0);
        let s = d.status();
        assert_eq!(d.run(&[(h, 16, true), (s, 1, true)]), 1);
        assert_eq!(d.byte(s), IOERR);
        // A read whose data is device-readable.
        let h = d.header(VIRTIO_BLK_T_IN, 0);
        let data = d.alloc(512, 0x33);
        let s = d.status();
        assert_eq!(
            d.run(&[(h, 16, false), (data, 512, false), (s, 1, true)]),
            1
        );
        assert_eq!((d.byte(s), d.read(data, 512)), (IOERR, vec![0x33; 512]));
        // A write whose data is device-writable.
        let h = d.header(VIRTIO_BLK_T_OUT, 0);
        let data = d.alloc(512, 0x33);
        let s = d.status();
        assert_eq!(d.run(&[(h, 16, false), (data, 512, true), (s, 1, true)]), 1);
        assert_eq!((d.byte(s), d.read(data, 512)), (IOERR, vec![0x33; 512]));
        // A device-readable descriptor after a device-writable one.
        let h = d.header(VIRTIO_BLK_T_IN, 0);
        let data = d.alloc(512, 0x33);
        let extra = d.alloc(16, 0);
        let s = d.status();
        let descs = [
            (h, 16, false),
            (data, 512, true),
            (extra, 16, false),
            (s, 1, true),
        ];
        assert_eq!(d.run(&descs), 1);
        assert_eq!((d.byte(s), d.read(data, 512)), (IOERR, vec![0x33; 512]));
        // Data that is not a whole number of sectors.
        let h = d.header(VIRTIO_BLK_T_OUT, 0);
        let data = d.alloc(700, 0x33);
        let s = d.status();
        assert_eq!(
            d.run(&[(h, 16, false), (data, 700, false), (s, 1, true)]),
            1
        );
        assert_eq!(d.byte(s), IOERR);
        // A data buffer outside guest memory.
        let h = d.header(VIRTIO_BLK_T_IN, 0);
        let outside = GuestAddress(crate::testing::MEM_SIZE as u64 - 256);
        let s = d.status();
        assert_eq!(
            d.run(&[(h, 16, false), (outside, 512, true), (s, 1, true)]),
            1
        );
        assert_eq!(d.byte(s), IOERR);
        let mut disk = vec![0u8; 4096];
        file.as_file().read_exact_at(&mut disk, 0).unwrap();
        assert_eq!(
            disk,
            vec![0xaa; 4096],
            "no malformed request reached the disk"
        );
        assert_eq!(d.interrupt.needs_reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn chains_without_a_status_byte_are_used_with_length_zero() {
        let file = temp_file(DISK, 0xaa);
        let mem = memory();
        let mut d = Driver::new(&mem, file_device(&file, EngineKind::Uring));
        d.activate();
        // No device-writable descriptor at all.
        let h = d.header(VIRTIO_BLK_T_OUT, 0);
        let data = d.alloc(512, 0x33);
        assert_eq!(d.run(&[(h, 16, false), (data, 512, false)]), 0);
        // The status byte outside guest memory.
        let h = d.header(VIRTIO_BLK_T_FLUSH, 0);
        let outside = GuestAddress(crate::testing::MEM_SIZE as u64 + 0x1000);
        assert_eq!(d.run(&[(h, 16, false), (outside, 1, true)]), 0);
        // The head descriptor itself outside guest memory.
        assert_eq!(d.run(&[(outside, 16, false)]), 0);
        let mut disk = vec![0u8; 512];
        file.as_file().read_exact_at(&mut disk, 0).unwrap();
        assert_eq!(disk, vec![0xaa; 512]);
        // The queue still works.
        assert_eq!(command(&mut d, VIRTIO_BLK_T_FLUSH, &[]), (OK, 1));
    }

    #[test]
    fn a_looping_chain_is_refused_without_touching_its_buffers() {
        let file = temp_file(DISK, 0xaa);
        let mem = memory();
        let mut d = Driver::new(&mem, file_device(&file, EngineKind::Uring));
        d.activate();
        let h = d.header(VIRTIO_BLK_T_IN, 0);
        let data = d.alloc(512, 0x33);
        let s = d.status();
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        // header → data → status → status → … until virtio-queue gives up.
        let head = d.push_raw(
            0,
            &[
                (h.0, 16, next, 1),
                (data.0, 512, next | write, 2),
                (s.0, 1, next | write, 2),
            ],
        );
        d.kick(0);
        let used = d.wait_used(0, 1);
        assert_eq!(used, vec![(u32::from(head), 1)]);
        assert_eq!(d.byte(s), IOERR);
        assert_eq!(d.read(data, 512), vec![0x33; 512]);
        assert_eq!(command(&mut d, VIRTIO_BLK_T_FLUSH, &[]), (OK, 1));
    }

    #[test]
    fn indirect_descriptor_tables_are_followed() {
        let file = temp_file(DISK, 0xaa);
        let mem = memory();
        let mut d = Driver::new(&mem, file_device(&file, EngineKind::Uring));
        d.activate();
        let h = d.header(VIRTIO_BLK_T_IN, 0);
        let data = d.alloc(1024, 0x33);
        let s = d.status();
        let table = d.alloc(48, 0);
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let entries = [
            (h.0, 16, next, 1),
            (data.0, 1024, next | write, 2),
            (s.0, 1, write, 0),
        ];
        for (i, &(addr, len, flags, n)) in entries.iter().enumerate() {
            let desc = virtio_queue::desc::RawDescriptor::from(
                virtio_queue::desc::split::Descriptor::new(addr, len, flags, n),
            );
            d.mem
                .write_obj(desc, table.unchecked_add(16 * i as u64))
                .unwrap();
        }
        let head = d.push_raw(0, &[(table.0, 48, VRING_DESC_F_INDIRECT as u16, 0)]);
        d.kick(0);
        assert_eq!(d.wait_used(0, 1), vec![(u32::from(head), 1025)]);
        assert_eq!((d.byte(s), d.read(data, 1024)), (OK, vec![0xaa; 1024]));
    }

    #[test]
    fn drain_waits_for_io_uring_requests_and_publishes_them() {
        let file = temp_file(DISK, 0x11);
        let mem = memory();
        let blk = file_device(&file, EngineKind::Uring);
        let mut d = Driver::new(&mem, blk);
        let features = d.all_features();
        let mut queue = d.queue(0);
        let slot: EngineSlot = Arc::new(Mutex::new(None));
        let engine = crate::storage::new_engine(
            EngineKind::Uring,
            Some(&d.file()),
            64,
            std::time::Duration::ZERO,
        );
        let shared = Arc::new(Shared {
            limits: d.device.spec.request_limits(features),
            cache: CacheMode::new(features, Arc::default()),
            serial: [0; SERIAL_LEN],
            dio_align: 1,
            may_unmap: true,
        });
        let mut handler = BlkHandler::new(shared, engine, slot.clone());
        let mut bufs = Vec::new();
        for i in 0..16u64 {
            let h = d.header(VIRTIO_BLK_T_IN, i * 8);
            let buf = d.alloc(4096, 0);
            let s = d.status();
            d.push(0, &[(h, 16, false), (buf, 4096, true), (s, 1, true)]);
            bufs.push((buf, s));
        }
        let mem_arc = Arc::new(mem.clone());
        let irq = CountingInterrupt::default();
        handler.process_queue(&mut queue, &mem_arc, &irq).unwrap();
        // io_uring requests are published from the completion path, never from process_queue.
        assert_eq!(handler.live, 16);
        assert_eq!(d.used_idx(0), 0);
        handler.drain(std::slice::from_mut(&mut queue), &mem_arc, &irq);
        assert_eq!(handler.live, 0);
        assert_eq!(d.wait_used(0, 16).len(), 16);
        for (buf, s) in bufs {
            assert_eq!((d.byte(s), d.read(buf, 4096)), (OK, vec![0x11; 4096]));
        }
        assert!(irq.queue.load(Ordering::SeqCst) > 0);
        // The engine goes back to its slot for the next activation.
        drop(handler);
        let engine = slot.lock().unwrap().take();
        assert_eq!(engine.map(|e| e.name()), Some("io_uring"));
    }

    #[test]
    fn an_out_of_range_head_stops_the_queue_and_asks_for_a_reset() {
        let mem = memory();
        let mut d = Driver::new(&mem, Blk::new(BlkConfig::null(DISK as u64)).unwrap());
        d.activate();
        assert_eq!(command(&mut d, VIRTIO_BLK_T_FLUSH, &[]), (OK, 1));
        d.push_head(0, QUEUE_SIZE + 3);
        d.kick(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while d.interrupt.needs_reset.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "no reset requested");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The worker is still alive and gives the queue back.
        assert_eq!(d.device.quiesce().len(), 1);
    }
}
