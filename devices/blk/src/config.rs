//! The device's configuration: what the operator asks for ([`BlkConfig`]), its validated form
//! ([`DeviceSpec`]), the feature bits it implies, and the VIRTIO configuration space
//! (`struct virtio_blk_config`, VIRTIO 1.2 section 5.2.4).

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outboard_virtio::features::bit;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use vm_memory::ByteValued;

use crate::request::{RangeLimit, RequestLimits, SECTOR_SIZE};
use crate::BlkError;

/// The most data segments a request may have whatever the driver negotiated: the kernel's limit
/// on the iovecs of one `preadv`/`pwritev`/io_uring vectored operation (`UIO_MAXIOV`).
pub const MAX_SEGMENTS: u32 = 1024;

/// The length of the serial number returned by `VIRTIO_BLK_T_GET_ID`.
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The guest-visible device generations this build can present, oldest first
/// ([`BlkConfig::compat_version`]).
///
/// A compat version fixes what the driver sees (feature bits and configuration space) and the
/// compat version written into saved state, so that a device started with `--compat-version N`
/// on a newer build is indistinguishable from one on the build that introduced N, and its state
/// loads there. A version is never changed once released; a new guest-visible feature is a new
/// version.
///
/// - **1**: SIZE_MAX, SEG_MAX, BLK_SIZE, TOPOLOGY, FLUSH, CONFIG_WCE, RO (read-only devices) and MQ
///   (several queues). The discard and write-zeroes fields of the configuration space read as
///   zero.
/// - **2**: version 1 plus DISCARD and WRITE_ZEROES (each unless disabled or read-only).
pub const COMPAT_VERSIONS: [u16; 2] = [1, 2];

/// The compat version a device presents unless told otherwise: the newest.
pub const DEFAULT_COMPAT_VERSION: u16 = 2;

/// The device-specific features compat version `version` may offer (before the configuration
/// removes those it does not want).
fn compat_features(version: u16) -> u64 {
    let v1 = bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_RO)
        | bit(VIRTIO_BLK_F_MQ);
    match version {
        1 => v1,
        _ => v1 | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES),
    }
}

/// Where the device's blocks live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageConfig {
    /// A regular file (its size a multiple of 512 bytes) or a block device.
    File {
        /// The path to open.
        path: PathBuf,
    },
    /// A device of `size` bytes (a multiple of 512) that discards writes and reads zeros, with no
    /// system call per request: for benchmarks of everything but the storage.
    Null {
        /// The size in bytes.
        size: u64,
    },
}

/// How requests reach a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// One io_uring per worker thread, requests batched per kick; falls back to
    /// [`EngineKind::Sync`] with a warning if the kernel refuses io_uring.
    #[default]
    Uring,
    /// `preadv2`/`pwritev2`/`fallocate`/`fdatasync` on the worker thread, one request at a time.
    Sync,
}

/// Limits of the discard or write-zeroes command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeCommandConfig {
    /// Whether the command is offered to the driver.
    pub enabled: bool,
    /// The most sectors one segment may cover.
    pub max_sectors: u32,
    /// The most segments one request may carry.
    pub max_segments: u32,
}

impl Default for RangeCommandConfig {
    fn default() -> Self {
        RangeCommandConfig {
            enabled: true,
            // 2 GiB per segment: large enough that a driver rarely splits, small enough that one
            // segment is one bounded fallocate.
            max_sectors: 1 << 22,
            max_segments: 32,
        }
    }
}

/// What the operator configures. Build it with [`BlkConfig::new`] and change fields as needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Where the blocks live.
    pub storage: StorageConfig,
    /// How requests reach a file (ignored for [`StorageConfig::Null`]).
    pub engine: EngineKind,
    /// Offer `VIRTIO_BLK_F_RO` and refuse every write. The file is opened read-only.
    pub read_only: bool,
    /// Open the file with `O_DIRECT` (bypass the host page cache). Guest buffers that are not
    /// aligned for it go through an aligned bounce buffer.
    pub direct: bool,
    /// The number of request queues (more than one offers `VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// The largest size of each queue (a power of two).
    pub queue_size: u16,
    /// The serial number `VIRTIO_BLK_T_GET_ID` returns: at most 20 bytes.
    pub serial: String,
    /// The number of worker threads; queue `i` runs on thread `i % threads`. `None`: one thread
    /// per queue. More threads than queues are never started.
    pub threads: Option<NonZeroUsize>,
    /// Busy-poll the queues for this long after the last request before sleeping (zero: never).
    pub poll: Duration,
    /// The write cache mode the device starts in (and returns to at reset) when the driver
    /// negotiates `VIRTIO_BLK_F_CONFIG_WCE`: `true` is writeback.
    pub writeback: bool,
    /// The logical block size reported in `blk_size` (a power of two from 512 to 4096). With
    /// `direct` it must be at least the backing device's logical block size.
    pub block_size: u32,
    /// The physical block size reported through the topology (a power of two, at least
    /// `block_size`).
    pub physical_block_size: u32,
    /// The most data segments a request may have (`seg_max`, 1 to 1024).
    pub seg_max: u32,
    /// The largest data segment (`size_max`, at least 4096 bytes).
    pub size_max: u32,
    /// The discard command.
    pub discard: RangeCommandConfig,
    /// The write-zeroes command.
    pub write_zeroes: RangeCommandConfig,
    /// Whether write zeroes with the unmap flag may deallocate the range.
    pub write_zeroes_may_unmap: bool,
    /// The guest-visible device generation (one of [`COMPAT_VERSIONS`]); see there.
    pub compat_version: u16,
    /// For tests of cancellation only (zero otherwise): every io_uring operation waits this long
    /// in the kernel before it starts (a linked timeout), so that requests stay in flight long
    /// enough to be suspended. Ignored by the other engines.
    pub io_delay: Duration,
}

impl BlkConfig {
    /// A configuration for `storage` with the defaults: io_uring, read-write, buffered, one
    /// queue of 256 entries, an empty serial, one thread per queue, no polling, writeback,
    /// 512-byte logical and 4 KiB physical blocks, up to 254 segments of up to 1 MiB, discard
    /// and write zeroes on, the newest compat version.
    pub fn new(storage: StorageConfig) -> Self {
        BlkConfig {
            storage,
            engine: EngineKind::default(),
            read_only: false,
            direct: false,
            num_queues: 1,
            queue_size: 256,
            serial: String::new(),
            threads: None,
            poll: Duration::ZERO,
            writeback: true,
            block_size: 512,
            physical_block_size: 4096,
            seg_max: 254,
            size_max: 1 << 20,
            discard: RangeCommandConfig::default(),
            write_zeroes: RangeCommandConfig::default(),
            write_zeroes_may_unmap: true,
            compat_version: DEFAULT_COMPAT_VERSION,
            io_delay: Duration::ZERO,
        }
    }

    /// A configuration for the file or block device at `path`, with the defaults of
    /// [`BlkConfig::new`].
    pub fn file(path: impl Into<PathBuf>) -> Self {
        BlkConfig::new(StorageConfig::File { path: path.into() })
    }

    /// A configuration for a null device of `size` bytes, with the defaults of
    /// [`BlkConfig::new`].
    pub fn null(size: u64) -> Self {
        BlkConfig::new(StorageConfig::Null { size })
    }
}

/// A validated configuration and the size of the storage behind it: everything the device
/// reports to the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DeviceSpec {
    pub capacity: u64,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: [u8; SERIAL_LEN],
    pub threads: usize,
    pub poll: Duration,
    pub writeback: bool,
    pub block_size: u32,
    pub physical_block_size: u32,
    pub seg_max: u32,
    pub size_max: u32,
    pub discard: Option<RangeLimit>,
    pub write_zeroes: Option<RangeLimit>,
    pub write_zeroes_may_unmap: bool,
    pub compat_version: u16,
}

fn invalid(field: &'static str, reason: String) -> BlkError {
    BlkError::InvalidConfig { field, reason }
}

fn range_limit(
    field: &'static str,
    c: &RangeCommandConfig,
    read_only: bool,
) -> Result<Option<RangeLimit>, BlkError> {
    if !c.enabled || read_only {
        return Ok(None);
    }
    if c.max_sectors == 0 || c.max_segments == 0 || c.max_segments > MAX_SEGMENTS {
        return Err(invalid(
            field,
            format!(
                "max_sectors {} and max_segments {} must be nonzero, max_segments at most {MAX_SEGMENTS}",
                c.max_sectors, c.max_segments
            ),
        ));
    }
    Ok(Some(RangeLimit {
        max_sectors: c.max_sectors,
        max_segments: c.max_segments,
    }))
}

impl DeviceSpec {
    /// Validates `config` for storage of `size_bytes`.
    pub fn new(config: &BlkConfig, size_bytes: u64) -> Result<Self, BlkError> {
        if size_bytes % SECTOR_SIZE != 0 {
            return Err(BlkError::UnalignedSize { size: size_bytes });
        }
        let q = config.queue_size;
        if q < 2 || !q.is_power_of_two() || q > 32768 {
            return Err(invalid(
                "queue_size",
                format!("{q} is not a power of two from 2 to 32768"),
            ));
        }
        if config.num_queues == 0 {
            return Err(invalid("num_queues", "must be at least 1".into()));
        }
        let serial = config.serial.as_bytes();
        if serial.len() > SERIAL_LEN {
            return Err(invalid(
                "serial",
                format!("{} bytes, at most {SERIAL_LEN}", serial.len()),
            ));
        }
        let mut padded = [0u8; SERIAL_LEN];
        padded[..serial.len()].copy_from_slice(serial);
        let bs = config.block_size;
        if !bs.is_power_of_two() || !(512..=4096).contains(&bs) {
            return Err(invalid(
                "block_size",
                format!("{bs} is not a power of two from 512 to 4096"),
            ));
        }
        let pbs = config.physical_block_size;
        if !pbs.is_power_of_two() || pbs < bs || pbs > 1 << 20 {
            return Err(invalid(
                "physical_block_size",
                format!("{pbs} is not a power of two from block_size ({bs}) to 1 MiB"),
            ));
        }
        if config.seg_max == 0 || config.seg_max > MAX_SEGMENTS {
            return Err(invalid(
                "seg_max",
                format!("{} is not from 1 to {MAX_SEGMENTS}", config.seg_max),
            ));
        }
        if config.size_max < 4096 {
            return Err(invalid(
                "size_max",
                format!("{} is below 4096 bytes", config.size_max),
            ));
        }
        if !COMPAT_VERSIONS.contains(&config.compat_version) {
            return Err(invalid(
                "compat_version",
                format!(
                    "{} is not one of {COMPAT_VERSIONS:?}",
                    config.compat_version
                ),
            ));
        }
        // Commands a compat version does not have are off, whatever the configuration says.
        let has = |f: u32| compat_features(config.compat_version) & bit(f) != 0;
        let discard = match has(VIRTIO_BLK_F_DISCARD) {
            true => range_limit("discard", &config.discard, config.read_only)?,
            false => None,
        };
        let write_zeroes = match has(VIRTIO_BLK_F_WRITE_ZEROES) {
            true => range_limit("write_zeroes", &config.write_zeroes, config.read_only)?,
            false => None,
        };
        let threads = config
            .threads
            .map_or(usize::from(config.num_queues), NonZeroUsize::get)
            .min(usize::from(config.num_queues));
        Ok(DeviceSpec {
            capacity: size_bytes / SECTOR_SIZE,
            read_only: config.read_only,
            num_queues: config.num_queues,
            queue_size: q,
            serial: padded,
            threads,
            poll: config.poll,
            writeback: config.writeback,
            block_size: bs,
            physical_block_size: pbs,
            seg_max: config.seg_max,
            size_max: config.size_max,
            discard,
            write_zeroes,
            write_zeroes_may_unmap: config.write_zeroes_may_unmap,
            compat_version: config.compat_version,
        })
    }

    /// The device-specific features offered.
    pub fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE);
        if self.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        }
        if self.num_queues > 1 {
            f |= bit(VIRTIO_BLK_F_MQ);
        }
        if self.discard.is_some() {
            f |= bit(VIRTIO_BLK_F_DISCARD);
        }
        if self.write_zeroes.is_some() {
            f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f & compat_features(self.compat_version)
    }

    /// The limits requests are checked against, given the features the driver acknowledged:
    /// a limit the driver was not told about does not bind it (beyond what the device can do at
    /// all), and a command it did not negotiate is unsupported.
    pub fn request_limits(&self, acked: u64) -> RequestLimits {
        let has = |f: u32| acked & bit(f) != 0;
        RequestLimits {
            capacity: self.capacity,
            read_only: self.read_only,
            seg_max: if has(VIRTIO_BLK_F_SEG_MAX) {
                self.seg_max
            } else {
                MAX_SEGMENTS
            },
            size_max: if has(VIRTIO_BLK_F_SIZE_MAX) {
                self.size_max
            } else {
                u32::MAX
            },
            discard: self.discard.filter(|_| has(VIRTIO_BLK_F_DISCARD)),
            write_zeroes: self.write_zeroes.filter(|_| has(VIRTIO_BLK_F_WRITE_ZEROES)),
        }
    }

    /// The configuration space with the current `writeback` field. The fields of commands the
    /// compat version does not have read as zero.
    pub fn config_space(&self, writeback: bool) -> ConfigSpace {
        let ratio = self.physical_block_size / self.block_size;
        let discard = self.discard.unwrap_or_default();
        let write_zeroes = self.write_zeroes.unwrap_or_default();
        let has = |f: u32| compat_features(self.compat_version) & bit(f) != 0;
        let discard_sector_alignment = match has(VIRTIO_BLK_F_DISCARD) {
            true => self.physical_block_size / SECTOR_SIZE as u32,
            false => 0,
        };
        let write_zeroes_may_unmap = has(VIRTIO_BLK_F_WRITE_ZEROES) && self.write_zeroes_may_unmap;
        ConfigSpace {
            capacity: self.capacity.to_le(),
            size_max: self.size_max.to_le(),
            seg_max: self.seg_max.to_le(),
            geometry_cylinders: 0,
            geometry_heads: 0,
            geometry_sectors: 0,
            blk_size: self.block_size.to_le(),
            // `ratio` is a power of two no larger than 2^11, so the exponent fits a byte.
            physical_block_exp: ratio.trailing_zeros() as u8,
            alignment_offset: 0,
            // In logical blocks; the ratio is at most 2^11.
            min_io_size: (ratio as u16).to_le(),
            opt_io_size: 0,
            writeback: u8::from(writeback),
            unused0: 0,
            num_queues: self.num_queues.to_le(),
            max_discard_sectors: discard.max_sectors.to_le(),
            max_discard_seg: discard.max_segments.to_le(),
            discard_sector_alignment: discard_sector_alignment.to_le(),
            max_write_zeroes_sectors: write_zeroes.max_sectors.to_le(),
            max_write_zeroes_seg: write_zeroes.max_segments.to_le(),
            write_zeroes_may_unmap: u8::from(write_zeroes_may_unmap),
            unused1: [0; 3],
        }
    }
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding, as the driver sees
/// it: little-endian integers, no padding between fields.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConfigSpace {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub geometry_cylinders: u16,
    pub geometry_heads: u8,
    pub geometry_sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}

const _: () = assert!(std::mem::size_of::<ConfigSpace>() == 60);

/// The offset of the `writeback` field, the only one the driver may write.
pub(crate) const WRITEBACK_OFFSET: usize = std::mem::offset_of!(ConfigSpace, writeback);

#[allow(unsafe_code)]
// SAFETY: `ConfigSpace` is `repr(C, packed)` and made only of integers and an integer array, so it
// has no padding bytes and every bit pattern of its size is a valid value.
unsafe impl ByteValued for ConfigSpace {}

/// The write cache policy in force, from the features and the driver's `writeback` choice.
#[derive(Clone, Debug)]
pub(crate) struct CacheMode {
    /// The `writeback` configuration field (shared with the control thread, which the driver
    /// writes through).
    pub writeback: Arc<AtomicBool>,
    /// `VIRTIO_BLK_F_FLUSH` was negotiated.
    pub flush: bool,
    /// `VIRTIO_BLK_F_CONFIG_WCE` was negotiated.
    pub config_wce: bool,
}

impl CacheMode {
    /// From the acknowledged features (VIRTIO 1.2, section 5.2.6): without FLUSH the driver cannot
    /// flush, so every write must be durable before it completes; with FLUSH but without
    /// CONFIG_WCE the device is writeback; with both, the `writeback` field decides.
    pub fn new(acked: u64, writeback: Arc<AtomicBool>) -> Self {
        CacheMode {
            writeback,
            flush: acked & bit(VIRTIO_BLK_F_FLUSH) != 0,
            config_wce: acked & bit(VIRTIO_BLK_F_CONFIG_WCE) != 0,
        }
    }

    /// Whether a write may complete before it is durable.
    pub fn is_writeback(&self) -> bool {
        self.flush && (!self.config_wce || self.writeback.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(config: &BlkConfig) -> DeviceSpec {
        DeviceSpec::new(config, 1 << 20).unwrap()
    }

    #[test]
    fn config_space_layout_matches_the_spec_offsets() {
        assert_eq!(WRITEBACK_OFFSET, 32);
        assert_eq!(std::mem::offset_of!(ConfigSpace, num_queues), 34);
        assert_eq!(std::mem::offset_of!(ConfigSpace, max_discard_sectors), 36);
        assert_eq!(
            std::mem::offset_of!(ConfigSpace, write_zeroes_may_unmap),
            56
        );
        let mut config = BlkConfig::null(1 << 20);
        config.num_queues = 4;
        let bytes = spec(&config).config_space(true);
        let b = bytes.as_slice();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(b[24], 3, "physical_block_exp: 4096 / 512 = 2^3");
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
    }

    #[test]
    fn features_follow_the_configuration() {
        let mut config = BlkConfig::null(1 << 20);
        let f = spec(&config).features();
        assert_eq!(f & bit(VIRTIO_BLK_F_MQ), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        config.read_only = true;
        config.num_queues = 2;
        let f = spec(&config).features();
        assert_ne!(f & bit(VIRTIO_BLK_F_MQ), 0);
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            f & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
            0,
            "a read-only device offers no command that writes"
        );
    }

    #[test]
    fn compat_version_1_has_no_discard_or_write_zeroes() {
        let mut config = BlkConfig::null(1 << 20);
        let v2 = spec(&config);
        config.compat_version = 1;
        let v1 = spec(&config);
        let range_cmds = bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        assert_eq!(v2.features() & range_cmds, range_cmds);
        assert_eq!(v1.features() & range_cmds, 0);
        assert_eq!(v1.features(), v2.features() & !range_cmds);
        assert!(v1.request_limits(u64::MAX).discard.is_none());
        assert!(v1.request_limits(u64::MAX).write_zeroes.is_none());
        let s1 = v1.config_space(true);
        let s2 = v2.config_space(true);
        assert_eq!(
            s1.as_slice()[..36],
            s2.as_slice()[..36],
            "fields before discard agree"
        );
        assert!(
            s1.as_slice()[36..].iter().all(|&b| b == 0),
            "{:?}",
            &s1.as_slice()[36..]
        );
        assert!(s2.as_slice()[36..].iter().any(|&b| b != 0));
        config.num_queues = 2;
        config.read_only = true;
        let f = spec(&config).features();
        assert_ne!(f & bit(VIRTIO_BLK_F_MQ), 0);
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let bad: [fn(&mut BlkConfig); 9] = [
            |c| c.queue_size = 100,
            |c| c.num_queues = 0,
            |c| c.serial = "x".repeat(21),
            |c| c.block_size = 1000,
            |c| c.physical_block_size = 256,
            |c| c.seg_max = 0,
            |c| c.size_max = 512,
            |c| c.compat_version = 0,
            |c| c.compat_version = 3,
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut config = BlkConfig::null(1 << 20);
            f(&mut config);
            let e = DeviceSpec::new(&config, 1 << 20);
            assert!(
                matches!(e, Err(BlkError::InvalidConfig { .. })),
                "case {i}: {e:?}"
            );
        }
        let e = DeviceSpec::new(&BlkConfig::null(1000), 1000);
        assert!(
            matches!(e, Err(BlkError::UnalignedSize { size: 1000 })),
            "{e:?}"
        );
    }

    #[test]
    fn cache_mode_follows_negotiation() {
        let wb = Arc::new(AtomicBool::new(false));
        let flush = bit(VIRTIO_BLK_F_FLUSH);
        let wce = bit(VIRTIO_BLK_F_CONFIG_WCE);
        assert!(!CacheMode::new(0, wb.clone()).is_writeback());
        assert!(CacheMode::new(flush, wb.clone()).is_writeback());
        assert!(!CacheMode::new(flush | wce, wb.clone()).is_writeback());
        wb.store(true, Ordering::Release);
        assert!(CacheMode::new(flush | wce, wb.clone()).is_writeback());
        assert!(!CacheMode::new(wce, wb).is_writeback());
    }

    #[test]
    fn unnegotiated_limits_do_not_bind_the_driver() {
        let s = spec(&BlkConfig::null(1 << 20));
        let l = s.request_limits(0);
        assert_eq!((l.seg_max, l.size_max), (MAX_SEGMENTS, u32::MAX));
        assert!(l.discard.is_none() && l.write_zeroes.is_none());
        let l = s.request_limits(s.features());
        assert_eq!((l.seg_max, l.size_max), (254, 1 << 20));
        assert!(l.discard.is_some() && l.write_zeroes.is_some());
    }
}
