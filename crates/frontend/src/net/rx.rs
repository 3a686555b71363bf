//! A receive queue kept full of buffers, and packets read back from it, merged across buffers
//! by `num_buffers` when `VIRTIO_NET_F_MRG_RXBUF` was negotiated.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::queue::{DriverQueue, QueueError, Segment, Used};
use crate::ram::{GuestBuf, GuestRam};

use super::{NetError, NetHdr, NET_HDR_LEN};

/// A received packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxPacket {
    /// The header the device wrote.
    pub hdr: NetHdr,
    /// The Ethernet frame.
    pub frame: Vec<u8>,
    /// The buffers (used entries) it spanned.
    pub buffers: u16,
    /// Each of those buffers' guest-physical address and the length the device wrote there
    /// (what a dirty log must mark).
    pub written: Vec<(u64, u32)>,
}

const NO_BUFFER: usize = usize::MAX;

/// A receive queue with preallocated buffers of one size, one descriptor each.
#[derive(Debug)]
pub struct NetRxQueue {
    dq: DriverQueue,
    bufs: Vec<GuestBuf>,
    /// The buffer of each head in flight.
    head_buf: Vec<usize>,
    mrg: bool,
    timeout: Duration,
    /// Reaped entries not yet assembled: (buffer, used length). Heads are translated when
    /// reaped, as the queue frees their descriptors at once.
    used: VecDeque<(usize, u32)>,
    scratch: Vec<Used>,
}

impl NetRxQueue {
    pub(crate) fn new(
        ram: &mut GuestRam,
        dq: DriverQueue,
        count: u16,
        size: usize,
        mrg: bool,
        timeout: Duration,
    ) -> Result<Self, NetError> {
        let count = count.min(dq.size());
        let mut bufs = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            bufs.push(ram.alloc(size, 64)?);
        }
        let mut q = NetRxQueue {
            head_buf: vec![NO_BUFFER; usize::from(dq.size())],
            dq,
            bufs,
            mrg,
            timeout,
            used: VecDeque::new(),
            scratch: Vec::new(),
        };
        for i in 0..q.bufs.len() {
            q.post(i)?;
        }
        q.dq.kick()?;
        Ok(q)
    }

    fn post(&mut self, i: usize) -> Result<(), NetError> {
        let head = self.dq.add_chain(&[Segment::writable(&self.bufs[i])])?;
        self.head_buf[usize::from(head)] = i;
        Ok(())
    }

    /// The queue's index on the device.
    pub fn index(&self) -> u16 {
        self.dq.index()
    }

    /// The size of each buffer.
    pub fn buffer_size(&self) -> usize {
        self.bufs.first().map_or(0, GuestBuf::len)
    }

    /// Buffers posted and not yet used.
    pub fn posted(&self) -> usize {
        self.dq.in_flight()
    }

    /// Used entries reaped but not yet assembled into a packet.
    pub fn unassembled(&self) -> usize {
        self.used.len()
    }

    /// The underlying driver queue (for hostile tests).
    pub fn driver_queue_mut(&mut self) -> &mut DriverQueue {
        &mut self.dq
    }

    fn device_error(&self, reason: String) -> NetError {
        NetError::Device {
            queue: self.dq.index(),
            reason,
        }
    }

    /// The buffer of a used entry, checking what the device reported.
    fn buffer_of(&self, u: &Used) -> Result<usize, NetError> {
        let i = self
            .head_buf
            .get(u.id as usize)
            .copied()
            .filter(|&i| i != NO_BUFFER)
            .ok_or_else(|| self.device_error(format!("used id {} is not a posted buffer", u.id)))?;
        if u.len as usize > self.bufs[i].len() {
            return Err(self.device_error(format!(
                "used length {} exceeds the {}-byte buffer",
                u.len,
                self.bufs[i].len()
            )));
        }
        Ok(i)
    }

    /// Moves reaped entries from `scratch` to `used`, translated to buffers.
    fn take_scratch(&mut self) -> Result<(), NetError> {
        let entries = std::mem::take(&mut self.scratch);
        for u in &entries {
            let i = self.buffer_of(u)?;
            self.head_buf[u.id as usize] = NO_BUFFER;
            self.used.push_back((i, u.len));
        }
        self.scratch = entries;
        self.scratch.clear();
        Ok(())
    }

    /// Assembles the next packet from the used entries reaped so far.
    fn assemble(&mut self) -> Result<Option<RxPacket>, NetError> {
        let Some(&(i, len)) = self.used.front() else {
            return Ok(None);
        };
        if (len as usize) < NET_HDR_LEN {
            return Err(
                self.device_error(format!("a used length of {len} is shorter than the header"))
            );
        }
        let mut raw = [0u8; NET_HDR_LEN];
        self.bufs[i].read_at(0, &mut raw);
        let hdr = NetHdr::from_bytes(&raw);
        let count = if self.mrg {
            usize::from(hdr.num_buffers)
        } else {
            1
        };
        if count == 0 || count > self.bufs.len() {
            return Err(self.device_error(format!("num_buffers {}", hdr.num_buffers)));
        }
        if self.used.len() < count {
            return Ok(None);
        }
        let mut frame = Vec::new();
        let mut written = Vec::with_capacity(count);
        for k in 0..count {
            let (b, len) = self.used.pop_front().expect("counted above");
            written.push((self.bufs[b].gpa(), len));
            let skip = if k == 0 { NET_HDR_LEN } else { 0 };
            let start = frame.len();
            frame.resize(start + (len as usize).saturating_sub(skip), 0);
            self.bufs[b].read_at(skip, &mut frame[start..]);
            self.post(b)?;
        }
        self.dq.kick()?;
        Ok(Some(RxPacket {
            hdr,
            frame,
            buffers: count as u16,
            written,
        }))
    }

    /// The next packet if one is complete in the used ring, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<RxPacket>, NetError> {
        self.scratch.clear();
        self.dq.poll_used(&mut self.scratch)?;
        self.take_scratch()?;
        self.assemble()
    }

    /// Waits up to `timeout` for the next packet.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<RxPacket>, NetError> {
        let start = Instant::now();
        loop {
            if let Some(p) = self.try_recv()? {
                return Ok(Some(p));
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            self.scratch.clear();
            match self.dq.wait_used(left, &mut self.scratch) {
                Ok(_) => self.take_scratch()?,
                Err(QueueError::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits for the next packet, the driver's default timeout, or fails.
    pub fn expect(&mut self) -> Result<RxPacket, NetError> {
        let timeout = self.timeout;
        self.recv(timeout)?
            .ok_or(NetError::Queue(QueueError::Timeout {
                queue: self.dq.index(),
                waited: timeout,
                in_flight: self.dq.in_flight(),
            }))
    }

    /// Every packet that arrives until none has for `quiet`.
    pub fn drain(&mut self, quiet: Duration) -> Result<Vec<RxPacket>, NetError> {
        let mut out = Vec::new();
        while let Some(p) = self.recv(quiet)? {
            out.push(p);
        }
        Ok(out)
    }
}
