//! A virtio-blk device (VIRTIO 1.2, section 5.2) for the `outboard-virtio` device API.
//!
//! [`Blk::new`] opens the storage and makes every per-thread resource up front (so that a
//! sandbox can forbid opening files and creating io_uring instances afterwards). At activation
//! the queues are spread over worker threads ([`outboard_virtio::worker::QueueWorker`]); each
//! thread parses chains into [`BlkRequest`]s at the trust boundary and runs them on its own
//! storage engine:
//!
//! - io_uring (the default): reads and writes go straight between the file and guest memory,
//!   one submission per batch of requests, completions wake the worker through an eventfd;
//! - synchronous `preadv2`/`pwritev2`, used when io_uring is not available;
//! - null: a device that reads zeros and forgets writes, without system calls, for benchmarks.
//!
//! The device never names a transport.
#![deny(unsafe_code)]

mod config;
mod handler;
mod request;
mod state;
mod storage;
#[cfg(test)]
mod testing;

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use outboard_virtio::features::bit;
use outboard_virtio::worker::{QueueWorker, WorkerContext};
use outboard_virtio::{Activation, ActiveQueue, DeviceError, DeviceType, VirtioDevice};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use vm_memory::ByteValued;

pub use config::{
    BlkConfig, EngineKind, RangeCommandConfig, StorageConfig, COMPAT_VERSIONS,
    DEFAULT_COMPAT_VERSION, MAX_SEGMENTS,
};
pub use request::{
    locate_status, BlkRequest, RangeLimit, RequestError, RequestKind, RequestLimits, SectorRange,
    Segment, SECTOR_SIZE,
};
pub use state::BlkState;

use config::{CacheMode, ConfigSpace, DeviceSpec, WRITEBACK_OFFSET};
use handler::{BlkHandler, EngineSlot, Shared};

/// Why a device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The backing file could not be opened or inspected.
    #[error("cannot open {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{path} is neither a regular file nor a block device")]
    NotBlockOrFile {
        /// The path.
        path: PathBuf,
    },
    /// The storage size is not a whole number of 512-byte sectors.
    #[error("the storage size of {size} bytes is not a multiple of 512")]
    UnalignedSize {
        /// The size in bytes.
        size: u64,
    },
    /// A configuration field is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `O_DIRECT` needs a larger alignment than the block size the guest is told.
    #[error("direct I/O needs {needed}-byte blocks, but block_size is {block_size}")]
    DirectAlignment {
        /// The backing device's logical block size.
        needed: usize,
        /// The configured block size.
        block_size: u32,
    },
}

/// A virtio-blk device. See the crate documentation.
#[derive(Debug)]
pub struct Blk {
    spec: DeviceSpec,
    /// `None` for null storage.
    file: Option<Arc<File>>,
    dio_align: usize,
    engine_kind: EngineKind,
    engine_depth: u32,
    io_delay: Duration,
    /// One engine per worker thread, made at creation and reused across activations.
    engines: Vec<EngineSlot>,
    queue_sizes: Vec<u16>,
    acked: u64,
    writeback: Arc<AtomicBool>,
    workers: Vec<QueueWorker>,
}

impl Blk {
    /// Opens the storage, validates `config` and makes one storage engine per worker thread.
    pub fn new(config: BlkConfig) -> Result<Self, BlkError> {
        let (backing, size) = match &config.storage {
            StorageConfig::File { path } => {
                let b = storage::open(path, config.read_only, config.direct)?;
                let size = b.size;
                (Some(b), size)
            }
            StorageConfig::Null { size } => (None, *size),
        };
        let spec = DeviceSpec::new(&config, size)?;
        let dio_align = backing.as_ref().map_or(1, |b| b.dio_align);
        if dio_align > spec.block_size as usize {
            return Err(BlkError::DirectAlignment {
                needed: dio_align,
                block_size: spec.block_size,
            });
        }
        let file = backing.map(|b| Arc::new(b.file));
        let queues_per_thread = usize::from(spec.num_queues).div_ceil(spec.threads);
        let engine_depth = u32::from(spec.queue_size).saturating_mul(queues_per_thread as u32);
        let engines = (0..spec.threads)
            .map(|_| {
                let engine = storage::new_engine(
                    config.engine,
                    file.as_ref(),
                    engine_depth,
                    config.io_delay,
                );
                Arc::new(Mutex::new(Some(engine)))
            })
            .collect();
        Ok(Blk {
            queue_sizes: vec![spec.queue_size; usize::from(spec.num_queues)],
            writeback: Arc::new(AtomicBool::new(spec.writeback)),
            spec,
            file,
            dio_align,
            engine_kind: config.engine,
            engine_depth,
            io_delay: config.io_delay,
            engines,
            acked: 0,
            workers: Vec::new(),
        })
    }

    /// The capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.spec.capacity
    }

    /// The name of the storage engine of worker thread 0 (`"io_uring"`, `"sync"`, `"null"`),
    /// which tells whether io_uring was available. `None` while the device runs.
    pub fn engine_name(&self) -> Option<&'static str> {
        let slot = self.engines.first()?;
        let engine = slot.lock().unwrap_or_else(PoisonError::into_inner);
        engine.as_ref().map(|e| e.name())
    }

    /// The state `save_state` would write.
    pub fn state(&self) -> BlkState {
        BlkState {
            writeback: self.writeback.load(Ordering::Acquire),
            capacity: self.spec.capacity,
            read_only: self.spec.read_only,
            num_queues: self.spec.num_queues,
        }
    }

    fn config_space(&self) -> ConfigSpace {
        self.spec
            .config_space(self.writeback.load(Ordering::Acquire))
    }

    /// The engine for worker thread `t`: the one made at creation, or a new one if a worker
    /// could not give its engine back (it failed with requests in flight).
    fn take_engine(&self, t: usize) -> (Box<dyn storage::Engine>, EngineSlot) {
        let slot = self.engines[t].clone();
        let engine = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        let engine = engine.unwrap_or_else(|| {
            log::warn!("virtio-blk: worker {t} lost its storage engine; making a new one");
            storage::new_engine(
                self.engine_kind,
                self.file.as_ref(),
                self.engine_depth,
                self.io_delay,
            )
        });
        (engine, slot)
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.spec.features()
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
        // VIRTIO 1.2, section 5.2.5: with CONFIG_WCE but not FLUSH, writeback starts at 0.
        if features & bit(VIRTIO_BLK_F_CONFIG_WCE) != 0 && features & bit(VIRTIO_BLK_F_FLUSH) == 0 {
            self.writeback.store(false, Ordering::Release);
        }
    }

    fn config_size(&self) -> usize {
        std::mem::size_of::<ConfigSpace>()
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let space = self.config_space();
        let bytes = offset
            .checked_add(data.len())
            .and_then(|end| space.as_slice().get(offset..end));
        match bytes {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), DeviceError> {
        let wce = self.acked & bit(VIRTIO_BLK_F_CONFIG_WCE) != 0;
        match (offset, data) {
            (WRITEBACK_OFFSET, &[value @ (0 | 1)]) if wce => {
                log::info!(
                    "virtio-blk: the driver set the cache mode to {}",
                    if value == 1 {
                        "writeback"
                    } else {
                        "writethrough"
                    }
                );
                self.writeback.store(value == 1, Ordering::Release);
                Ok(())
            }
            _ => Err(DeviceError::ConfigWrite {
                offset,
                len: data.len(),
            }),
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        if !self.workers.is_empty() {
            return Err(DeviceError::Activate {
                reason: "the device is already running".into(),
            });
        }
        let Activation {
            features,
            memory,
            queues,
            interrupt,
        } = activation;
        let shared = Arc::new(Shared {
            limits: self.spec.request_limits(features),
            cache: CacheMode::new(features, self.writeback.clone()),
            serial: self.spec.serial,
            dio_align: self.dio_align,
            may_unmap: self.spec.write_zeroes_may_unmap,
        });
        let threads = self.spec.threads.min(queues.len()).max(1);
        let mut groups: Vec<Vec<ActiveQueue>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, q) in queues.into_iter().enumerate() {
            groups[i % threads].push(q);
        }
        let ctx = WorkerContext {
            memory,
            interrupt,
            poll: self.spec.poll,
        };
        for (t, group) in groups.into_iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let (engine, slot) = self.take_engine(t);
            let handler = BlkHandler::new(shared.clone(), engine, slot);
            match QueueWorker::spawn(format!("blk-worker-{t}"), group, handler, ctx.clone()) {
                Ok(w) => self.workers.push(w),
                Err(source) => {
                    drop(self.quiesce());
                    return Err(DeviceError::Io {
                        context: format!("starting virtio-blk worker thread {t}"),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    fn quiesce(&mut self) -> Vec<ActiveQueue> {
        let mut queues: Vec<ActiveQueue> =
            self.workers.drain(..).flat_map(QueueWorker::stop).collect();
        queues.sort_by_key(ActiveQueue::index);
        queues
    }

    /// Cancels the storage operations still in the kernel (io_uring) and leaves their requests
    /// to the inflight records; what completed meanwhile is answered as usual.
    fn suspend(&mut self) -> Vec<ActiveQueue> {
        let mut queues: Vec<ActiveQueue> = self
            .workers
            .drain(..)
            .flat_map(QueueWorker::suspend)
            .collect();
        queues.sort_by_key(ActiveQueue::index);
        queues
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        drop(self.quiesce());
        self.acked = 0;
        self.writeback.store(self.spec.writeback, Ordering::Release);
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        Ok(self.state().encode())
    }

    fn load_state(&mut self, blob: &[u8]) -> Result<(), DeviceError> {
        let refused = |e: outboard_virtio::state::StateError| DeviceError::State {
            reason: e.to_string(),
        };
        let saved = BlkState::decode(blob).map_err(refused)?;
        saved.check_matches(&self.state()).map_err(refused)?;
        self.writeback.store(saved.writeback, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    use outboard_virtio::features::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_blk::*;

    use super::*;
    use crate::testing::*;

    fn config_u32(blk: &Blk, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        blk.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn writeback(blk: &Blk) -> u8 {
        let mut b = [0u8; 1];
        blk.read_config(WRITEBACK_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn configuration_space_reports_the_storage_and_limits() {
        let file = temp_file(3 * 4096, 0);
        let mut config = BlkConfig::file(file.as_path());
        config.num_queues = 3;
        config.seg_max = 100;
        let blk = Blk::new(config).unwrap();
        assert_eq!(blk.config_size(), 60);
        let mut capacity = [0u8; 8];
        blk.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 24);
        assert_eq!(config_u32(&blk, 8), 1 << 20, "size_max");
        assert_eq!(config_u32(&blk, 12), 100, "seg_max");
        assert_eq!(config_u32(&blk, 20), 512, "blk_size");
        let mut num_queues = [0u8; 2];
        blk.read_config(34, &mut num_queues);
        assert_eq!(u16::from_le_bytes(num_queues), 3);
        assert_eq!(writeback(&blk), 1);
        let f = blk.device_features();
        for feature in [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_MQ,
        ] {
            assert_ne!(f & bit(feature), 0, "feature {feature} is offered");
        }
        assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(blk.queue_max_sizes(), &[256, 256, 256]);
    }

    #[test]
    fn writeback_is_the_only_field_the_driver_may_write() {
        let mut blk = Blk::new(BlkConfig::null(1 << 20)).unwrap();
        // Not before CONFIG_WCE is negotiated.
        let e = blk.write_config(WRITEBACK_OFFSET, &[0]);
        assert!(
            matches!(e, Err(DeviceError::ConfigWrite { offset: 32, len: 1 })),
            "{e:?}"
        );
        blk.ack_features(blk.device_features() | bit(VIRTIO_F_VERSION_1));
        blk.write_config(WRITEBACK_OFFSET, &[0]).unwrap();
        assert_eq!(writeback(&blk), 0);
        blk.write_config(WRITEBACK_OFFSET, &[1]).unwrap();
        assert_eq!(writeback(&blk), 1);
        for (offset, data) in [
            (WRITEBACK_OFFSET, &[2u8][..]),
            (WRITEBACK_OFFSET, &[0, 0][..]),
            (WRITEBACK_OFFSET - 1, &[0, 0][..]),
            (0, &[0u8; 8][..]),
            (34, &[1, 0][..]),
            (59, &[0][..]),
        ] {
            let e = blk.write_config(offset, data);
            assert!(
                matches!(e, Err(DeviceError::ConfigWrite { .. })),
                "{offset}: {e:?}"
            );
        }
        let mut capacity = [0u8; 8];
        blk.read_config(0, &mut capacity);
        assert_eq!(
            u64::from_le_bytes(capacity),
            2048,
            "refused writes changed nothing"
        );
        // A reset restores the configured default.
        blk.write_config(WRITEBACK_OFFSET, &[0]).unwrap();
        blk.reset().unwrap();
        assert_eq!(writeback(&blk), 1);
        assert!(
            blk.write_config(WRITEBACK_OFFSET, &[0]).is_err(),
            "features were reset"
        );
    }

    #[test]
    fn config_wce_without_flush_starts_in_writethrough() {
        let mut blk = Blk::new(BlkConfig::null(1 << 20)).unwrap();
        let features = blk.device_features() & !bit(VIRTIO_BLK_F_FLUSH);
        blk.ack_features(features | bit(VIRTIO_F_VERSION_1));
        assert_eq!(writeback(&blk), 0);
    }

    #[test]
    fn state_round_trips_and_refuses_other_devices() {
        let mut blk = Blk::new(BlkConfig::null(1 << 20)).unwrap();
        blk.ack_features(blk.device_features() | bit(VIRTIO_F_VERSION_1));
        blk.write_config(WRITEBACK_OFFSET, &[0]).unwrap();
        let saved = blk.save_state().unwrap();
        let mut restored = Blk::new(BlkConfig::null(1 << 20)).unwrap();
        assert_eq!(writeback(&restored), 1);
        restored.load_state(&saved).unwrap();
        assert_eq!(writeback(&restored), 0, "the driver's cache mode survives");
        assert_eq!(restored.state(), blk.state());
        let refused = |config: BlkConfig, blob: &[u8]| {
            let mut other = Blk::new(config).unwrap();
            let e = other.load_state(blob);
            assert!(matches!(e, Err(DeviceError::State { .. })), "{e:?}");
            assert_eq!(writeback(&other), 1, "a refused state changes nothing");
        };
        refused(BlkConfig::null(2 << 20), &saved);
        let mut two_queues = BlkConfig::null(1 << 20);
        two_queues.num_queues = 2;
        refused(two_queues, &saved);
        let mut read_only = BlkConfig::null(1 << 20);
        read_only.read_only = true;
        refused(read_only, &saved);
        refused(BlkConfig::null(1 << 20), &saved[..saved.len() - 1]);
        let mut corrupt = saved.clone();
        corrupt[6] = 7;
        refused(BlkConfig::null(1 << 20), &corrupt);
        let mut long = saved.clone();
        long.push(0);
        refused(BlkConfig::null(1 << 20), &long);
        refused(BlkConfig::null(1 << 20), &[]);
    }

    #[test]
    fn bad_storage_is_refused_with_a_clear_error() {
        let file = temp_file(1000, 0);
        let e = Blk::new(BlkConfig::file(file.as_path()));
        assert!(
            matches!(e, Err(BlkError::UnalignedSize { size: 1000 })),
            "{e:?}"
        );
        let e = Blk::new(BlkConfig::file("/nonexistent/outboard-blk"));
        assert!(matches!(e, Err(BlkError::Open { .. })), "{e:?}");
        let e = Blk::new(BlkConfig::file("/dev/null"));
        assert!(matches!(e, Err(BlkError::NotBlockOrFile { .. })), "{e:?}");
        let e = Blk::new(BlkConfig::null(1000));
        assert!(
            matches!(e, Err(BlkError::UnalignedSize { size: 1000 })),
            "{e:?}"
        );
    }

    #[test]
    fn a_read_only_device_opens_its_file_read_only() {
        let file = temp_file(4096, 0);
        let mut config = BlkConfig::file(file.as_path());
        config.read_only = true;
        let blk = Blk::new(config).unwrap();
        assert_ne!(blk.device_features() & bit(VIRTIO_BLK_F_RO), 0);
        let fd = blk.file.as_deref().unwrap();
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
    }

    #[test]
    fn activation_twice_is_refused_and_quiesce_returns_every_queue() {
        let mem = memory();
        let mut config = BlkConfig::null(1 << 20);
        config.num_queues = 3;
        let mut d = Driver::new(&mem, Blk::new(config).unwrap());
        d.activate();
        assert_eq!(d.device.engine_name(), None, "the engines are in use");
        let features = d.all_features();
        let e = d.device.activate(Activation {
            features,
            memory: vm_memory::GuestMemoryAtomic::new(mem.clone()),
            queues: Vec::new(),
            interrupt: d.interrupt.clone(),
        });
        assert!(matches!(e, Err(DeviceError::Activate { .. })), "{e:?}");
        let queues = d.device.quiesce();
        let indices: Vec<u16> = queues.iter().map(ActiveQueue::index).collect();
        assert_eq!(indices, [0, 1, 2]);
        assert_eq!(
            d.device.engine_name(),
            Some("null"),
            "the engines came back"
        );
        assert!(d.device.quiesce().is_empty());
    }

    #[test]
    fn every_queue_is_served_with_fewer_threads_than_queues() {
        let file = temp_file(DISK, 0);
        let mut config = BlkConfig::file(file.as_path());
        config.num_queues = 4;
        config.threads = std::num::NonZeroUsize::new(2);
        config.poll = Duration::from_millis(20);
        let mem = memory();
        let mut d = Driver::new(&mem, Blk::new(config).unwrap());
        d.activate();
        let mut statuses = Vec::new();
        for q in 0..4 {
            for i in 0..8u64 {
                let sector = q as u64 * 64 + i * 8;
                let h = d.header(VIRTIO_BLK_T_OUT, sector);
                let buf = d.alloc(4096, q as u8 * 16 + i as u8);
                let s = d.status();
                d.push(q, &[(h, 16, false), (buf, 4096, false), (s, 1, true)]);
                statuses.push(s);
            }
            d.kick(q);
        }
        for q in 0..4 {
            assert_eq!(d.wait_used(q, 8).len(), 8);
        }
        assert!(statuses.iter().all(|&s| d.byte(s) == OK));
        for q in 0..4u64 {
            for i in 0..8u64 {
                let mut block = vec![0u8; 4096];
                file.as_file()
                    .read_exact_at(&mut block, (q * 64 + i * 8) * 512)
                    .unwrap();
                assert_eq!(
                    block,
                    vec![q as u8 * 16 + i as u8; 4096],
                    "queue {q} request {i}"
                );
            }
        }
    }

    #[test]
    fn quiesce_publishes_every_request_in_flight() {
        let file = temp_file(DISK, 0);
        let mem = memory();
        let mut d = Driver::new(&mem, file_device(&file, EngineKind::Uring));
        d.activate();
        let mut statuses = Vec::new();
        for i in 0..64u64 {
            let h = d.header(VIRTIO_BLK_T_OUT, i * 8);
            let buf = d.alloc(4096, i as u8);
            let s = d.status();
            d.push(0, &[(h, 16, false), (buf, 4096, false), (s, 1, true)]);
            statuses.push(s);
        }
        d.kick(0);
        // Stop the worker at once: whatever it took must be complete when quiesce returns.
        let queues = d.device.quiesce();
        assert_eq!(queues.len(), 1);
        let taken = virtio_queue::QueueT::next_avail(queues[0].queue());
        assert_eq!(d.wait_used(0, taken).len(), usize::from(taken));
        assert!(statuses[..usize::from(taken)]
            .iter()
            .all(|&s| d.byte(s) == OK));
        assert!(statuses[usize::from(taken)..]
            .iter()
            .all(|&s| d.byte(s) == UNWRITTEN));
        // Activated again with the same queues, the device serves the rest.
        let features = d.all_features();
        d.activate_queues(features, queues);
        d.kick(0);
        d.wait_used(0, 64 - taken);
        assert!(statuses.iter().all(|&s| d.byte(s) == OK));
    }

    /// A device of compat version `v` in the framework, features not yet negotiated.
    fn fresh(v: u16) -> outboard_virtio::Framework {
        let mut config = BlkConfig::null(1 << 20);
        config.compat_version = v;
        let blk = Blk::new(config).unwrap();
        outboard_virtio::Framework::new(Box::new(blk), Arc::new(CountingInterrupt::default()))
    }

    /// As [`fresh`], the driver having acked everything offered.
    fn negotiated(v: u16) -> outboard_virtio::Framework {
        let mut fw = fresh(v);
        fw.set_features(fw.offered_features()).unwrap();
        fw
    }

    #[test]
    fn state_loads_on_its_compat_version_or_newer_and_never_older() {
        use outboard_virtio::state::StateError;
        use outboard_virtio::FrameworkError;
        let range_cmds = bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        let v1 = negotiated(1).save_state(1).unwrap();
        let v2 = negotiated(2).save_state(2).unwrap();
        assert_eq!(v1.framework.acked_features & range_cmds, 0);
        assert_eq!(v2.framework.acked_features & range_cmds, range_cmds);
        // Older state on a newer device: a fresh destination takes the saved features.
        let mut fw = fresh(2);
        fw.load_state(&v1, &[1, 2]).unwrap();
        assert_eq!(fw.acked_features(), Some(v1.framework.acked_features));
        negotiated(1).load_state(&v1, &[1]).unwrap();
        // Newer state on an older device: refused for its version ...
        let e = negotiated(1).load_state(&v2, &[1]).unwrap_err();
        assert!(
            matches!(
                e,
                FrameworkError::State(StateError::CompatVersion { found: 2, .. })
            ),
            "{e}"
        );
        // ... and, were the version accepted, for features the older device does not offer.
        let e = fresh(1).load_state(&v2, &[1, 2]).unwrap_err();
        assert!(e.to_string().contains("not offered"), "{e}");
    }
}
