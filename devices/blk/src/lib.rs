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

use outboard_virtio::features::bit;
use outboard_virtio::worker::{QueueWorker, WorkerContext};
use outboard_virtio::{Activation, ActiveQueue, DeviceError, DeviceType, VirtioDevice};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use vm_memory::ByteValued;

pub use config::{BlkConfig, EngineKind, RangeCommandConfig, StorageConfig, MAX_SEGMENTS};
pub use request::{
    locate_status, BlkRequest, RangeLimit, RequestError, RequestKind, RequestLimits, SectorRange,
    Segment, SECTOR_SIZE,
};
pub use state::{BlkState, StateError};

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
        let engine_depth =
            u32::from(spec.queue_size).saturating_mul(queues_per_thread as u32);
        let engines = (0..spec.threads)
            .map(|_| {
                let engine = storage::new_engine(config.engine, file.as_ref(), engine_depth);
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
            storage::new_engine(self.engine_kind, self.file.as_ref(), self.engine_depth)
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
        // VIRTIO 1.2, 5.2.5.1: CONFIG_WCE without FLUSH starts in writethrough.
        if features & bit(VIRTIO_BLK_F_CONFIG_WCE) != 0 && features & bit(VIRTIO_BLK_F_FLUSH) == 0
        {
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
                    if value == 1 { "writeback" } else { "writethrough" }
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
        let mut queues: Vec<ActiveQueue> = self.workers.drain(..).flat_map(QueueWorker::stop).collect();
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
        let refused = |e: StateError| DeviceError::State {
            reason: e.to_string(),
        };
        let saved = BlkState::decode(blob).map_err(refused)?;
        saved.check_matches(&self.state()).map_err(refused)?;
        self.writeback.store(saved.writeback, Ordering::Release);
        Ok(())
    }
}
