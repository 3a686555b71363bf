//! One virtio-blk request queue: preallocated request slots over a [`DriverQueue`].

use std::time::{Duration, Instant};

use crate::queue::{DriverQueue, Segment, Used};
use crate::ram::{GuestBuf, GuestRam};

use super::{BlkError, BlkOp, BlkRange, BlkStatus, SECTOR_SIZE};

/// Size of the request header (type u32, ioprio u32, sector u64).
const HEADER_SIZE: usize = 16;
/// Offset of the status byte in a slot's header buffer.
const STATUS_OFFSET: usize = HEADER_SIZE;
/// Status preset before submission, so an unwritten status is visible.
const STATUS_UNWRITTEN: u8 = 0xff;
/// Size of a GET_ID answer.
const ID_LEN: usize = 20;
/// Size of a discard/write-zeroes segment.
const RANGE_SIZE: usize = 16;

/// How to wait for completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// Do not wait: reap what is there.
    NoWait,
    /// Busy-poll the used ring for up to the duration.
    Spin(Duration),
    /// Sleep on the call eventfd for up to the duration.
    Block(Duration),
}

/// A request to submit from a slot: the slot's data buffer holds (or receives) `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    /// Request type.
    pub op: BlkOp,
    /// Sector field of the header.
    pub sector: u64,
    /// Data bytes (0: no data segment).
    pub len: u32,
}

impl BlkRequest {
    /// A read of `len` bytes at `sector`.
    pub fn read(sector: u64, len: u32) -> Self {
        BlkRequest {
            op: BlkOp::Read,
            sector,
            len,
        }
    }

    /// A write of `len` bytes at `sector`.
    pub fn write(sector: u64, len: u32) -> Self {
        BlkRequest {
            op: BlkOp::Write,
            sector,
            len,
        }
    }

    /// A flush.
    pub fn flush() -> Self {
        BlkRequest {
            op: BlkOp::Flush,
            sector: 0,
            len: 0,
        }
    }
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkCompletion {
    /// The slot, free again.
    pub slot: u16,
    /// The status byte.
    pub status: BlkStatus,
    /// Bytes the device reported writing (used element `len`).
    pub used_len: u32,
    /// Time from submission to reaping.
    pub latency: Duration,
}

#[derive(Debug)]
struct Slot {
    /// Header at 0..16, status byte at 16.
    hdr: GuestBuf,
    data: GuestBuf,
    busy: bool,
    submitted: Instant,
}

/// A virtio-blk queue with `slots` preallocated requests (header, status and data buffers in
/// guest RAM), laid out like Linux: header (readable), data, status (writable, 1 byte).
#[derive(Debug)]
pub struct BlkQueue {
    dq: DriverQueue,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    /// Slot of each in-flight head.
    head_slot: Vec<u16>,
    indirect: bool,
    wait: WaitMode,
    max_data: usize,
    used: Vec<Used>,
    done: Vec<BlkCompletion>,
}

impl BlkQueue {
    pub(crate) fn new(
        ram: &mut GuestRam,
        dq: DriverQueue,
        slots: u16,
        max_data: usize,
        indirect: bool,
        wait: WaitMode,
    ) -> Result<Self, BlkError> {
        let mut v = Vec::with_capacity(usize::from(slots));
        for _ in 0..slots {
            v.push(Slot {
                hdr: ram.alloc(32, 32)?,
                data: ram.alloc(max_data.max(ID_LEN), 4096)?,
                busy: false,
                submitted: Instant::now(),
            });
        }
        Ok(BlkQueue {
            head_slot: vec![u16::MAX; usize::from(dq.size())],
            dq,
            slots: v,
            free_slots: (0..slots).rev().collect(),
            indirect,
            wait,
            max_data,
            used: Vec::new(),
            done: Vec::new(),
        })
    }

    /// Queue index on the device.
    pub fn index(&self) -> u16 {
        self.dq.index()
    }

    /// Number of request slots (the maximum queue depth).
    pub fn slots(&self) -> u16 {
        self.slots.len() as u16
    }

    /// Data buffer bytes per slot (the largest request).
    pub fn max_data(&self) -> usize {
        self.max_data
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// The data buffer of `slot`: fill it before a write, read it after a read.
    pub fn slot_data(&self, slot: u16) -> &GuestBuf {
        &self.slots[usize::from(slot)].data
    }

    /// The guest-physical address of `slot`'s status byte (which the device writes).
    pub fn slot_status_gpa(&self, slot: u16) -> u64 {
        self.slots[usize::from(slot)].hdr.gpa() + STATUS_OFFSET as u64
    }

    /// A free slot, if any (it stays free until submitted).
    pub fn free_slot(&self) -> Option<u16> {
        self.free_slots.last().copied()
    }

    /// The underlying driver queue.
    pub fn driver_queue(&self) -> &DriverQueue {
        &self.dq
    }

    /// The underlying driver queue (for raw descriptors or notification modes).
    pub fn driver_queue_mut(&mut self) -> &mut DriverQueue {
        &mut self.dq
    }

    /// How synchronous helpers wait.
    pub fn set_wait(&mut self, wait: WaitMode) {
        self.wait = wait;
    }

    /// Forgets all requests and resets the ring driver-side (after a device reset).
    pub fn reset(&mut self) {
        self.dq.reset();
        for s in &mut self.slots {
            s.busy = false;
        }
        self.free_slots = (0..self.slots.len() as u16).rev().collect();
        self.head_slot.fill(u16::MAX);
    }

    /// Adds the request of `slot` to the ring without publishing it; call
    /// [`BlkQueue::kick`] once for a batch.
    pub fn submit(&mut self, slot: u16, req: BlkRequest) -> Result<(), BlkError> {
        let s = self
            .slots
            .get_mut(usize::from(slot))
            .ok_or(BlkError::NoSlot(slot))?;
        if s.busy {
            return Err(BlkError::SlotBusy(slot));
        }
        let len = req.len as usize;
        if len > s.data.len() {
            return Err(BlkError::TooLarge {
                len,
                max: s.data.len(),
            });
        }
        let mut hdr = [0u8; HEADER_SIZE + 1];
        hdr[0..4].copy_from_slice(&req.op.code().to_le_bytes());
        hdr[8..16].copy_from_slice(&req.sector.to_le_bytes());
        hdr[STATUS_OFFSET] = STATUS_UNWRITTEN;
        s.hdr.write_at(0, &hdr);
        let header = Segment::readable_part(&s.hdr, 0, HEADER_SIZE);
        let status = Segment::writable_part(&s.hdr, STATUS_OFFSET, 1);
        let data = if req.op.device_writes() {
            Segment::writable_part(&s.data, 0, len)
        } else {
            Segment::readable_part(&s.data, 0, len)
        };
        let segs_buf = [header, data, status];
        let segs: &[Segment] = if len == 0 {
            &[header, status]
        } else {
            &segs_buf
        };
        let head = if self.indirect {
            self.dq.add_indirect_chain(segs)?
        } else {
            self.dq.add_chain(segs)?
        };
        s.busy = true;
        s.submitted = Instant::now();
        self.head_slot[usize::from(head)] = slot;
        // Slots are usually taken from the free stack's top; keep the stack exact either way.
        if let Some(pos) = self.free_slots.iter().rposition(|&f| f == slot) {
            self.free_slots.swap_remove(pos);
        }
        Ok(())
    }

    /// Publishes everything submitted and notifies the device if needed.
    pub fn kick(&mut self) -> Result<bool, BlkError> {
        Ok(self.dq.kick()?)
    }

    /// Reaps completions into `out` (appending), waiting as `wait` says. Returns how many
    /// used elements were reaped. A timeout with nothing reaped is
    /// [`crate::QueueError::Timeout`].
    pub fn reap(
        &mut self,
        wait: WaitMode,
        out: &mut Vec<BlkCompletion>,
    ) -> Result<usize, BlkError> {
        self.used.clear();
        match wait {
            WaitMode::NoWait => self.dq.poll_used(&mut self.used)?,
            WaitMode::Spin(t) => self.dq.spin_used(t, &mut self.used)?,
            WaitMode::Block(t) => self.dq.wait_used(t, &mut self.used)?,
        };
        let now = Instant::now();
        for u in &self.used {
            let head = u.id as usize;
            let slot = self.head_slot[head];
            if slot == u16::MAX {
                // A raw head a test published through `driver_queue_mut`: not ours.
                continue;
            }
            self.head_slot[head] = u16::MAX;
            let s = &mut self.slots[usize::from(slot)];
            s.busy = false;
            self.free_slots.push(slot);
            out.push(BlkCompletion {
                slot,
                status: BlkStatus::from(s.hdr.read_u8(STATUS_OFFSET)),
                used_len: u.len,
                latency: now - s.submitted,
            });
        }
        Ok(self.used.len())
    }

    /// Submits one request from a free slot, waits for it and returns its completion; the
    /// slot's data is valid until the next submission. Needs an idle queue.
    fn run(
        &mut self,
        req: BlkRequest,
        fill: impl FnOnce(&GuestBuf),
    ) -> Result<BlkCompletion, BlkError> {
        if self.in_flight() > 0 {
            return Err(BlkError::Busy {
                in_flight: self.in_flight(),
            });
        }
        let slot = self.free_slot().ok_or(BlkError::Busy { in_flight: 0 })?;
        fill(&self.slots[usize::from(slot)].data);
        self.submit(slot, req)?;
        self.kick()?;
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        while done.is_empty() {
            if let Err(e) = self.reap(self.wait, &mut done) {
                self.done = done;
                return Err(e);
            }
        }
        let c = done[0];
        self.done = done;
        Ok(c)
    }

    /// Reads `buf.len()` bytes at `sector` (split into slot-sized requests). Stops at the
    /// first non-OK status and returns it.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<BlkStatus, BlkError> {
        let chunk = self.max_data;
        for (i, part) in buf.chunks_mut(chunk).enumerate() {
            let sec = sector + (i * chunk / SECTOR_SIZE) as u64;
            let c = self.run(BlkRequest::read(sec, part.len() as u32), |_| {})?;
            if c.status != BlkStatus::Ok {
                return Ok(c.status);
            }
            self.slots[usize::from(c.slot)].data.read_at(0, part);
        }
        Ok(BlkStatus::Ok)
    }

    /// Writes `buf` at `sector` (split into slot-sized requests). Stops at the first non-OK
    /// status and returns it.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<BlkStatus, BlkError> {
        let chunk = self.max_data;
        for (i, part) in buf.chunks(chunk).enumerate() {
            let sec = sector + (i * chunk / SECTOR_SIZE) as u64;
            let c = self.run(BlkRequest::write(sec, part.len() as u32), |d| {
                d.write_at(0, part)
            })?;
            if c.status != BlkStatus::Ok {
                return Ok(c.status);
            }
        }
        Ok(BlkStatus::Ok)
    }

    /// Sends a flush.
    pub fn flush(&mut self) -> Result<BlkStatus, BlkError> {
        Ok(self.run(BlkRequest::flush(), |_| {})?.status)
    }

    fn ranges(
        &mut self,
        op: BlkOp,
        ranges: &[BlkRange],
        unmap: bool,
    ) -> Result<BlkStatus, BlkError> {
        let mut data = Vec::with_capacity(ranges.len() * RANGE_SIZE);
        for r in ranges {
            data.extend_from_slice(&r.sector.to_le_bytes());
            data.extend_from_slice(&r.num_sectors.to_le_bytes());
            data.extend_from_slice(&u32::from(unmap).to_le_bytes());
        }
        let req = BlkRequest {
            op,
            sector: 0,
            len: data.len() as u32,
        };
        Ok(self.run(req, |d| d.write_at(0, &data))?.status)
    }

    /// Discards `ranges`.
    pub fn discard(&mut self, ranges: &[BlkRange]) -> Result<BlkStatus, BlkError> {
        self.ranges(BlkOp::Discard, ranges, false)
    }

    /// Writes zeroes to `ranges`, allowing the device to unmap them if `unmap`.
    pub fn write_zeroes(
        &mut self,
        ranges: &[BlkRange],
        unmap: bool,
    ) -> Result<BlkStatus, BlkError> {
        self.ranges(BlkOp::WriteZeroes, ranges, unmap)
    }

    /// GET_ID: the device serial, up to 20 bytes, cut at the first NUL.
    pub fn get_id(&mut self) -> Result<String, BlkError> {
        let req = BlkRequest {
            op: BlkOp::GetId,
            sector: 0,
            len: ID_LEN as u32,
        };
        let c = self.run(req, |d| d.fill(0, ID_LEN, 0))?;
        c.status.ok("GET_ID")?;
        let mut id = [0u8; ID_LEN];
        self.slots[usize::from(c.slot)].data.read_at(0, &mut id);
        let end = id.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
        Ok(String::from_utf8_lossy(&id[..end]).into_owned())
    }

    /// Submits a request with any op from a free slot, waits and returns the completion
    /// (the data buffer is filled by `fill` first). For tests of unusual requests.
    pub fn request(
        &mut self,
        req: BlkRequest,
        fill: impl FnOnce(&GuestBuf),
    ) -> Result<BlkCompletion, BlkError> {
        self.run(req, fill)
    }

    /// Waits (as [`BlkQueue::set_wait`] says) until nothing is in flight, appending the
    /// completions to `out`.
    pub fn drain(&mut self, out: &mut Vec<BlkCompletion>) -> Result<(), BlkError> {
        while self.in_flight() > 0 {
            self.reap(self.wait, out)?;
        }
        Ok(())
    }

    /// Time budget of the current wait mode, for callers building their own loops.
    pub fn wait_mode(&self) -> WaitMode {
        self.wait
    }
}
