//! A virtio-blk driver on top of a [`Session`].
//!
//! [`BlkDriver`] reads the device config and wraps each driver queue in a [`BlkQueue`], which
//! offers synchronous helpers (`read`, `write`, `flush`, `discard`, `write_zeroes`, `get_id`) and
//! a batched asynchronous API over preallocated request slots for benchmarks.

mod queue;

pub use queue::{BlkCompletion, BlkQueue, BlkRequest, WaitMode};

use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

use crate::device::{SessionBuilder, SessionError, DEFAULT_FEATURES};
use crate::queue::{NotifyMode, QueueError};
use crate::ram::RamError;
use crate::Session;

/// Sector size of virtio-blk addressing.
pub const SECTOR_SIZE: usize = 512;

/// virtio-blk features a [`BlkDriver`] asks for by default, on top of [`DEFAULT_FEATURES`].
pub const BLK_FEATURES: u64 = DEFAULT_FEATURES
    | 1 << VIRTIO_BLK_F_SIZE_MAX
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_GEOMETRY
    | 1 << VIRTIO_BLK_F_RO
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_TOPOLOGY
    | 1 << VIRTIO_BLK_F_CONFIG_WCE
    | 1 << VIRTIO_BLK_F_MQ
    | 1 << VIRTIO_BLK_F_DISCARD
    | 1 << VIRTIO_BLK_F_WRITE_ZEROES;

/// Errors of the virtio-blk driver.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// Session setup or a control message failed.
    #[error("vhost-user session")]
    Session(#[from] SessionError),
    /// A queue operation failed (including timeouts).
    #[error("virtqueue")]
    Queue(#[from] QueueError),
    /// Allocating request buffers failed.
    #[error("guest RAM")]
    Ram(#[from] RamError),
    /// The CONFIG protocol feature was not negotiated, so the config cannot be read.
    #[error("the backend did not negotiate the CONFIG protocol feature")]
    NoConfig,
    /// The config space is shorter than the capacity field.
    #[error("config space of {0} bytes is too short")]
    ShortConfig(usize),
    /// A synchronous helper was called with requests in flight.
    #[error("queue has {in_flight} requests in flight; synchronous helpers need an idle queue")]
    Busy {
        /// Requests in flight.
        in_flight: usize,
    },
    /// The slot is already in flight.
    #[error("request slot {0} is in flight")]
    SlotBusy(u16),
    /// No slot with this index.
    #[error("no request slot {0}")]
    NoSlot(u16),
    /// The request's data does not fit a slot buffer.
    #[error("{len} data bytes do not fit a {max}-byte slot buffer")]
    TooLarge {
        /// Bytes requested.
        len: usize,
        /// Slot buffer size.
        max: usize,
    },
    /// The device completed a request with a non-OK status where a value was expected.
    #[error("{op} failed with status {status:?}")]
    Status {
        /// The request.
        op: &'static str,
        /// Status byte written by the device.
        status: BlkStatus,
    },
    /// No queue with this index.
    #[error("no blk queue {0}")]
    NoQueue(u16),
}

/// The status byte of a completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkStatus {
    /// VIRTIO_BLK_S_OK.
    Ok,
    /// VIRTIO_BLK_S_IOERR.
    IoErr,
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupp,
    /// Any other value (0xff means the device never wrote the byte: it is preset to 0xff).
    Other(u8),
}

impl From<u8> for BlkStatus {
    fn from(b: u8) -> Self {
        match u32::from(b) {
            VIRTIO_BLK_S_OK => BlkStatus::Ok,
            VIRTIO_BLK_S_IOERR => BlkStatus::IoErr,
            VIRTIO_BLK_S_UNSUPP => BlkStatus::Unsupp,
            _ => BlkStatus::Other(b),
        }
    }
}

impl BlkStatus {
    /// `Ok(())` for [`BlkStatus::Ok`], else [`BlkError::Status`] naming `op`.
    pub fn ok(self, op: &'static str) -> Result<(), BlkError> {
        match self {
            BlkStatus::Ok => Ok(()),
            status => Err(BlkError::Status { op, status }),
        }
    }
}

/// A virtio-blk request type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// VIRTIO_BLK_T_IN: the device writes `len` bytes.
    Read,
    /// VIRTIO_BLK_T_OUT: the device reads `len` bytes.
    Write,
    /// VIRTIO_BLK_T_FLUSH: no data.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the device writes up to 20 bytes.
    GetId,
    /// VIRTIO_BLK_T_DISCARD: the data is an array of 16-byte segments.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES: as discard.
    WriteZeroes,
    /// Any type code, with the data segment device-writable or not (hostile tests).
    Other {
        /// The `type` field.
        code: u32,
        /// Whether the data segment is device-writable.
        device_writes: bool,
    },
}

impl BlkOp {
    /// The `type` field of the request header.
    pub fn code(self) -> u32 {
        match self {
            BlkOp::Read => VIRTIO_BLK_T_IN,
            BlkOp::Write => VIRTIO_BLK_T_OUT,
            BlkOp::Flush => VIRTIO_BLK_T_FLUSH,
            BlkOp::GetId => VIRTIO_BLK_T_GET_ID,
            BlkOp::Discard => VIRTIO_BLK_T_DISCARD,
            BlkOp::WriteZeroes => VIRTIO_BLK_T_WRITE_ZEROES,
            BlkOp::Other { code, .. } => code,
        }
    }

    /// Whether the device writes the data segment.
    pub fn device_writes(self) -> bool {
        match self {
            BlkOp::Read | BlkOp::GetId => true,
            BlkOp::Other { device_writes, .. } => device_writes,
            _ => false,
        }
    }
}

/// A range for discard and write-zeroes requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
}

/// Discard limits (VIRTIO_BLK_F_DISCARD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardLimits {
    /// max_discard_sectors.
    pub max_sectors: u32,
    /// max_discard_seg.
    pub max_segments: u32,
    /// discard_sector_alignment.
    pub sector_alignment: u32,
}

/// Write-zeroes limits (VIRTIO_BLK_F_WRITE_ZEROES).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteZeroesLimits {
    /// max_write_zeroes_sectors.
    pub max_sectors: u32,
    /// max_write_zeroes_seg.
    pub max_segments: u32,
    /// write_zeroes_may_unmap.
    pub may_unmap: bool,
}

/// Topology (VIRTIO_BLK_F_TOPOLOGY).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkTopology {
    /// Logical blocks per physical block, as a power of two.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in blocks.
    pub opt_io_size: u32,
}

/// The virtio-blk config space, each optional field present only when its feature was acked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum segment size (SIZE_MAX).
    pub size_max: Option<u32>,
    /// Maximum segments per request (SEG_MAX).
    pub seg_max: Option<u32>,
    /// Cylinders, heads, sectors (GEOMETRY).
    pub geometry: Option<(u16, u8, u8)>,
    /// Logical block size (BLK_SIZE).
    pub blk_size: Option<u32>,
    /// Topology (TOPOLOGY).
    pub topology: Option<BlkTopology>,
    /// Writeback cache mode (CONFIG_WCE).
    pub writeback: Option<u8>,
    /// Number of queues (MQ).
    pub num_queues: Option<u16>,
    /// Discard limits (DISCARD).
    pub discard: Option<DiscardLimits>,
    /// Write-zeroes limits (WRITE_ZEROES).
    pub write_zeroes: Option<WriteZeroesLimits>,
    /// The raw bytes read.
    pub raw: Vec<u8>,
}

impl BlkConfig {
    /// Parses config bytes; fields beyond `raw` or whose feature is not in `features` are
    /// `None`.
    pub fn parse(raw: &[u8], features: u64) -> Result<Self, BlkError> {
        let has = |bit: u32| features & (1 << bit) != 0;
        let field = |off: usize, len: usize| raw.get(off..off + len);
        let u8_at = |off| field(off, 1).map(|b| b[0]);
        let u16_at = |off| field(off, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |off| field(off, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let capacity = field(0, 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or(BlkError::ShortConfig(raw.len()))?;
        let when = |bit: u32| has(bit).then_some(());
        Ok(BlkConfig {
            capacity,
            size_max: when(VIRTIO_BLK_F_SIZE_MAX).and_then(|_| u32_at(8)),
            seg_max: when(VIRTIO_BLK_F_SEG_MAX).and_then(|_| u32_at(12)),
            geometry: when(VIRTIO_BLK_F_GEOMETRY)
                .and_then(|_| Some((u16_at(16)?, u8_at(18)?, u8_at(19)?))),
            blk_size: when(VIRTIO_BLK_F_BLK_SIZE).and_then(|_| u32_at(20)),
            topology: when(VIRTIO_BLK_F_TOPOLOGY).and_then(|_| {
                Some(BlkTopology {
                    physical_block_exp: u8_at(24)?,
                    alignment_offset: u8_at(25)?,
                    min_io_size: u16_at(26)?,
                    opt_io_size: u32_at(28)?,
                })
            }),
            writeback: when(VIRTIO_BLK_F_CONFIG_WCE).and_then(|_| u8_at(32)),
            num_queues: when(VIRTIO_BLK_F_MQ).and_then(|_| u16_at(34)),
            discard: when(VIRTIO_BLK_F_DISCARD).and_then(|_| {
                Some(DiscardLimits {
                    max_sectors: u32_at(36)?,
                    max_segments: u32_at(40)?,
                    sector_alignment: u32_at(44)?,
                })
            }),
            write_zeroes: when(VIRTIO_BLK_F_WRITE_ZEROES).and_then(|_| {
                Some(WriteZeroesLimits {
                    max_sectors: u32_at(48)?,
                    max_segments: u32_at(52)?,
                    may_unmap: u8_at(56)? != 0,
                })
            }),
            raw: raw.to_vec(),
        })
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR_SIZE as u64
    }
}

/// Options of a [`BlkDriver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkOptions {
    /// Request slots (maximum queue depth) per queue.
    pub slots: u16,
    /// Data buffer bytes per slot; larger synchronous requests are split.
    pub slot_data_size: usize,
    /// Bytes of config space to read (60 covers up to write_zeroes_may_unmap, as QEMU with
    /// discard and write-zeroes).
    pub config_len: usize,
    /// How synchronous helpers wait for their completion.
    pub wait: WaitMode,
    /// Use indirect descriptors for requests when negotiated.
    pub indirect: bool,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            slots: 32,
            slot_data_size: 128 << 10,
            config_len: 60,
            wait: WaitMode::Block(Duration::from_secs(30)),
            indirect: false,
        }
    }
}

/// A virtio-blk driver: the device config and one [`BlkQueue`] per queue.
#[derive(Debug)]
pub struct BlkDriver {
    session: Session,
    config: BlkConfig,
    queues: Vec<BlkQueue>,
    opts: BlkOptions,
}

impl BlkDriver {
    /// Sets up a session (asking for [`BLK_FEATURES`] unless the builder names features) and
    /// the driver with default options.
    pub fn connect(builder: SessionBuilder) -> Result<Self, BlkError> {
        Self::connect_with(builder, BlkOptions::default())
    }

    /// As [`BlkDriver::connect`], with options. With `opts.indirect`, the session gets indirect
    /// tables of 3 descriptors (header, data, status).
    pub fn connect_with(builder: SessionBuilder, opts: BlkOptions) -> Result<Self, BlkError> {
        let features = builder.features_or(BLK_FEATURES);
        let mut builder = builder.features(features);
        if opts.indirect {
            builder = builder.indirect(3);
        }
        Self::new(builder.connect()?, opts)
    }

    /// Builds the driver on a started session: reads the config and takes every queue the
    /// session owns.
    pub fn new(mut session: Session, opts: BlkOptions) -> Result<Self, BlkError> {
        let config = read_config(&mut session, opts.config_len)?;
        let mut max_data = opts.slot_data_size;
        if let Some(size_max) = config.size_max.filter(|&s| s > 0) {
            // One data segment per request, so a segment bounds the request.
            max_data = max_data.min(size_max as usize / SECTOR_SIZE * SECTOR_SIZE);
        }
        let indirect = opts.indirect
            && session
                .negotiated()
                .has_feature(VIRTIO_RING_F_INDIRECT_DESC);
        let mut queues = Vec::new();
        for i in session.queue_indices() {
            let Some(dq) = session.take_queue(i) else {
                continue;
            };
            let q = BlkQueue::new(
                session.ram_mut(),
                dq,
                opts.slots,
                max_data,
                indirect,
                opts.wait,
            )?;
            queues.push(q);
        }
        Ok(BlkDriver {
            session,
            config,
            queues,
            opts,
        })
    }

    /// The config read at setup (or by the last [`BlkDriver::refresh_config`]).
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Re-reads the config space (e.g. after a CONFIG_CHANGE_MSG).
    pub fn refresh_config(&mut self) -> Result<&BlkConfig, BlkError> {
        self.config = read_config(&mut self.session, self.opts.config_len)?;
        Ok(&self.config)
    }

    /// Queue `index`. Panics if there is no such queue (see [`BlkDriver::try_queue`]).
    pub fn queue(&mut self, index: u16) -> &mut BlkQueue {
        self.try_queue(index).expect("no such blk queue")
    }

    /// Queue `index`, if it exists.
    pub fn try_queue(&mut self, index: u16) -> Result<&mut BlkQueue, BlkError> {
        self.queues
            .iter_mut()
            .find(|q| q.index() == index)
            .ok_or(BlkError::NoQueue(index))
    }

    /// All queues, e.g. to drive them from scoped threads.
    pub fn queues_mut(&mut self) -> &mut [BlkQueue] {
        &mut self.queues
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The session, for control messages.
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Switches every queue's notification mode (e.g. [`NotifyMode::Poll`] for busy-polling).
    pub fn set_notify_mode(&mut self, mode: NotifyMode) {
        for q in &mut self.queues {
            q.driver_queue_mut().set_notify_mode(mode);
        }
    }

    fn ensure_idle(&self) -> Result<(), BlkError> {
        let in_flight: usize = self.queues.iter().map(|q| q.in_flight()).sum();
        if in_flight > 0 {
            return Err(BlkError::Busy { in_flight });
        }
        Ok(())
    }

    /// Reconnects the session (see [`Session::reconnect`]); every queue must be idle.
    pub fn reconnect(&mut self) -> Result<(), BlkError> {
        self.ensure_idle()?;
        self.session.reconnect()?;
        Ok(())
    }

    /// Resets the device, resets every queue driver-side and sets everything up again.
    pub fn reset(&mut self) -> Result<(), BlkError> {
        self.session.reset_device()?;
        for q in &mut self.queues {
            q.reset();
        }
        self.session.reinitialize()?;
        Ok(())
    }

    /// Stops every queue (GET_VRING_BASE) and closes the connection; returns the bases.
    pub fn disconnect(self) -> Result<Vec<Option<u32>>, BlkError> {
        Ok(self.session.disconnect()?)
    }
}

fn read_config(session: &mut Session, len: usize) -> Result<BlkConfig, BlkError> {
    if !session
        .negotiated()
        .has_protocol(VhostUserProtocolFeatures::CONFIG)
    {
        return Err(BlkError::NoConfig);
    }
    let raw = session.get_config(0, len)?;
    BlkConfig::parse(&raw, session.negotiated().features_acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fields_follow_features_and_length() {
        let mut raw = vec![0u8; 60];
        raw[0..8].copy_from_slice(&2048u64.to_le_bytes());
        raw[12..16].copy_from_slice(&126u32.to_le_bytes());
        raw[20..24].copy_from_slice(&4096u32.to_le_bytes());
        raw[34..36].copy_from_slice(&4u16.to_le_bytes());
        raw[36..40].copy_from_slice(&(1u32 << 20).to_le_bytes());
        raw[56] = 1;
        let f = 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        let c = BlkConfig::parse(&raw, f).unwrap();
        assert_eq!(c.capacity, 2048);
        assert_eq!(c.capacity_bytes(), 1 << 20);
        assert_eq!(c.seg_max, Some(126));
        assert_eq!(c.blk_size, Some(4096));
        assert_eq!(c.num_queues, Some(4));
        assert_eq!(c.size_max, None, "feature not acked");
        assert_eq!(c.discard, None);
        assert!(c.write_zeroes.unwrap().may_unmap);
        let short = BlkConfig::parse(&raw[..24], f).unwrap();
        assert_eq!(short.num_queues, None, "beyond the bytes read");
        assert!(matches!(
            BlkConfig::parse(&raw[..4], f),
            Err(BlkError::ShortConfig(4))
        ));
    }

    #[test]
    fn status_bytes_map_to_typed_statuses() {
        assert_eq!(BlkStatus::from(0), BlkStatus::Ok);
        assert_eq!(BlkStatus::from(1), BlkStatus::IoErr);
        assert_eq!(BlkStatus::from(2), BlkStatus::Unsupp);
        assert_eq!(BlkStatus::from(0xff), BlkStatus::Other(0xff));
        assert!(BlkStatus::Unsupp.ok("flush").is_err());
    }
}
