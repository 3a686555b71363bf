//! A transmit queue: frames copied into preallocated slots and sent behind a header.

use std::time::{Duration, Instant};

use crate::queue::{DriverQueue, QueueError, Segment, Used};
use crate::ram::{GuestBuf, GuestRam};

use super::{NetError, NetHdr, NET_HDR_LEN};

/// The largest frame a slot holds: a 64 KiB IP packet, an Ethernet header and a VLAN tag.
pub const MAX_TX_FRAME: usize = 65535 + 18;

const NO_SLOT: usize = usize::MAX;

/// A transmit queue with `slots` buffers of a header and `MAX_TX_FRAME` bytes.
#[derive(Debug)]
pub struct NetTxQueue {
    dq: DriverQueue,
    slots: Vec<GuestBuf>,
    free: Vec<usize>,
    head_slot: Vec<usize>,
    timeout: Duration,
    used: Vec<Used>,
}

impl NetTxQueue {
    pub(crate) fn new(
        ram: &mut GuestRam,
        dq: DriverQueue,
        slots: u16,
        timeout: Duration,
    ) -> Result<Self, NetError> {
        let slots = slots.min(dq.size());
        let mut bufs = Vec::with_capacity(usize::from(slots));
        for _ in 0..slots {
            bufs.push(ram.alloc(NET_HDR_LEN + MAX_TX_FRAME, 64)?);
        }
        Ok(NetTxQueue {
            head_slot: vec![NO_SLOT; usize::from(dq.size())],
            dq,
            free: (0..bufs.len()).rev().collect(),
            slots: bufs,
            timeout,
            used: Vec::new(),
        })
    }

    /// The queue's index on the device.
    pub fn index(&self) -> u16 {
        self.dq.index()
    }

    /// Frames the device has not completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The underlying driver queue (for hostile tests; chains added there are not tracked).
    pub fn driver_queue_mut(&mut self) -> &mut DriverQueue {
        &mut self.dq
    }

    /// Frees the slots of completed frames without waiting; returns how many completed.
    pub fn reap(&mut self) -> Result<usize, NetError> {
        self.used.clear();
        self.dq.poll_used(&mut self.used)?;
        self.release()
    }

    fn release(&mut self) -> Result<usize, NetError> {
        let n = self.used.len();
        for u in self.used.drain(..) {
            let slot = self
                .head_slot
                .get(u.id as usize)
                .copied()
                .filter(|&s| s != NO_SLOT)
                .ok_or(NetError::Device {
                    queue: self.dq.index(),
                    reason: format!("used id {} is not a frame in flight", u.id),
                })?;
            self.head_slot[u.id as usize] = NO_SLOT;
            self.free.push(slot);
        }
        Ok(n)
    }

    /// Waits until at least one frame completes (or the timeout).
    fn wait_one(&mut self) -> Result<(), NetError> {
        self.used.clear();
        self.dq.wait_used(self.timeout, &mut self.used)?;
        self.release()?;
        Ok(())
    }

    /// Adds `hdr` and `frame` to the ring (header and frame in two descriptors, as Linux
    /// does without `VIRTIO_F_ANY_LAYOUT`) without notifying the device; waits for a free slot
    /// if every slot is in flight.
    pub fn add(&mut self, hdr: NetHdr, frame: &[u8]) -> Result<(), NetError> {
        if frame.len() > MAX_TX_FRAME {
            return Err(NetError::TooLarge {
                len: frame.len(),
                max: MAX_TX_FRAME,
            });
        }
        self.reap()?;
        if self.free.is_empty() {
            self.dq.kick()?;
            self.wait_one()?;
        }
        let slot = self.free.pop().expect("a slot is free");
        let buf = &self.slots[slot];
        buf.write_at(0, &hdr.to_bytes());
        buf.write_at(NET_HDR_LEN, frame);
        let mut segments = vec![Segment::readable_part(buf, 0, NET_HDR_LEN)];
        if !frame.is_empty() {
            segments.push(Segment::readable_part(buf, NET_HDR_LEN, frame.len()));
        }
        match self.dq.add_chain(&segments) {
            Ok(head) => {
                self.head_slot[usize::from(head)] = slot;
                Ok(())
            }
            Err(e) => {
                self.free.push(slot);
                Err(e.into())
            }
        }
    }

    /// Publishes what was added and notifies the device if it wants.
    pub fn kick(&mut self) -> Result<(), NetError> {
        self.dq.kick()?;
        Ok(())
    }

    /// Sends one frame behind `hdr` (added and kicked; not waited for).
    pub fn send(&mut self, hdr: NetHdr, frame: &[u8]) -> Result<(), NetError> {
        self.add(hdr, frame)?;
        self.kick()
    }

    /// Sends `packet` as it is: its first 12 bytes are the header, whatever they say.
    pub fn send_raw(&mut self, packet: &[u8]) -> Result<(), NetError> {
        let Some(frame) = packet.get(NET_HDR_LEN..) else {
            return Err(NetError::TooLarge {
                len: packet.len(),
                max: NET_HDR_LEN,
            });
        };
        let mut raw = [0u8; NET_HDR_LEN];
        raw.copy_from_slice(&packet[..NET_HDR_LEN]);
        self.send(NetHdr::from_bytes(&raw), frame)
    }

    /// Waits until the device has completed every frame sent.
    pub fn flush(&mut self) -> Result<(), NetError> {
        self.dq.kick()?;
        let start = Instant::now();
        while self.in_flight() > 0 {
            self.reap()?;
            if self.in_flight() == 0 {
                break;
            }
            if start.elapsed() > self.timeout {
                return Err(NetError::Queue(QueueError::Timeout {
                    queue: self.dq.index(),
                    waited: start.elapsed(),
                    in_flight: self.in_flight(),
                }));
            }
            self.wait_one()?;
        }
        Ok(())
    }
}
