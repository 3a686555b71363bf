//! Why a request is refused, and what the driver is told.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
use vm_memory::GuestMemoryError;

use crate::config::SERIAL_LEN;

/// Why a request was refused. The driver learns [`RequestError::status`]; the variant is for
/// the log.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain has no device-writable byte to put the status in: it cannot be answered.
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    /// The status byte is outside guest memory: the request cannot be answered.
    #[error("the status byte at {addr:#x} is outside guest memory")]
    StatusOutOfMemory {
        /// Its address.
        addr: u64,
    },
    /// The chain loops, leaves its descriptor table, has a bad indirect table or exceeds 4 GiB.
    #[error("the descriptor chain is broken after {descriptors} descriptors")]
    BrokenChain {
        /// Descriptors read before it broke.
        descriptors: usize,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// Its position in the chain.
        index: usize,
    },
    /// Fewer than 16 device-readable bytes for the header.
    #[error("the header needs 16 device-readable bytes, the chain has {readable}")]
    ShortHeader {
        /// Device-readable bytes in the chain.
        readable: u64,
    },
    /// A buffer the request uses lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Reading the header or ranges from guest memory failed.
    #[error("cannot read the request from guest memory at {addr:#x}")]
    GuestMemory {
        /// Where.
        addr: u64,
        /// The underlying error.
        #[source]
        source: GuestMemoryError,
    },
    /// The request type is unknown or not negotiated.
    #[error("request type {request_type:#x} is not supported")]
    Unsupported {
        /// The type field.
        request_type: u32,
    },
    /// Device-readable bytes where the request type has none.
    #[error("request type {request_type} carries {len} unexpected device-readable bytes")]
    UnexpectedReadable {
        /// The type field.
        request_type: u32,
        /// Bytes beyond the header.
        len: u64,
    },
    /// Device-writable bytes where the request type has none.
    #[error("request type {request_type} carries {len} unexpected device-writable bytes")]
    UnexpectedWritable {
        /// The type field.
        request_type: u32,
        /// Bytes besides the status.
        len: u64,
    },
    /// A read or write whose data is not made of whole sectors.
    #[error("data length {len} is not a multiple of 512")]
    UnalignedLength {
        /// The data length.
        len: u64,
    },
    /// Sectors beyond the end of the device (or a range that overflows).
    #[error("sectors {sector}+{sectors} are beyond the capacity of {capacity} sectors")]
    OutOfRange {
        /// The first sector.
        sector: u64,
        /// The number of sectors.
        sectors: u64,
        /// The capacity.
        capacity: u64,
    },
    /// More data segments (or descriptors) than allowed.
    #[error("{segments} data segments exceed the limit of {max}")]
    TooManySegments {
        /// How many the chain has.
        segments: usize,
        /// The limit.
        max: u32,
    },
    /// A data segment larger than `size_max`.
    #[error("a data segment of {len} bytes exceeds size_max {max}")]
    SegmentTooLarge {
        /// Its length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A request that writes, on a read-only device.
    #[error("request type {request_type} writes to a read-only device")]
    ReadOnly {
        /// The type field.
        request_type: u32,
    },
    /// A discard or write-zeroes payload that is not a nonzero number of 16-byte ranges.
    #[error("a range payload of {len} bytes is not a nonzero multiple of 16")]
    BadRangePayload {
        /// Its length.
        len: u64,
    },
    /// More ranges than the negotiated limit.
    #[error("{count} ranges exceed the limit of {max}")]
    TooManyRanges {
        /// How many the request has.
        count: usize,
        /// The limit.
        max: u32,
    },
    /// A range with flags the command does not define.
    #[error("range flags {flags:#x} are not supported by request type {request_type}")]
    UnsupportedFlags {
        /// The type field.
        request_type: u32,
        /// The flags.
        flags: u32,
    },
    /// A range larger than the negotiated limit.
    #[error("a range of {num_sectors} sectors exceeds the limit of {max}")]
    RangeTooLarge {
        /// Its size.
        num_sectors: u32,
        /// The limit.
        max: u32,
    },
    /// A GET_ID buffer shorter than the 20-byte serial.
    #[error("the GET_ID buffer of {len} bytes is shorter than {SERIAL_LEN}")]
    GetIdBufferTooSmall {
        /// Its length.
        len: u64,
    },
}

impl RequestError {
    /// The status the driver is told: `VIRTIO_BLK_S_UNSUPP` for what the device does not
    /// implement, `VIRTIO_BLK_S_IOERR` for everything malformed.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported { .. } | RequestError::UnsupportedFlags { .. } => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}
