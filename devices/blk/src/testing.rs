//! A driver for tests: guest memory, driver-side queues (virtio-queue's mock), a counting
//! interrupt sink, and helpers that build requests, kick and wait for the used ring. Tests go
//! through the real path: [`Blk`] activated with [`Activation`], queue workers, engines.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_memory::GuestMemoryMmap;
use outboard_virtio::features::{bit, VIRTIO_F_VERSION_1};
use outboard_virtio::{Activation, ActiveQueue, Interrupt, VirtioDevice};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

use crate::{Blk, BlkConfig, EngineKind};

/// The size of every test queue.
pub const QUEUE_SIZE: u16 = 256;
/// The size of test guest memory.
pub const MEM_SIZE: usize = 0x80_0000;
/// Where buffers are allocated from (queues live below).
const HEAP: u64 = 0x10_0000;
/// The status byte's value before the device writes it.
pub const UNWRITTEN: u8 = 0xee;

/// Counts what the device signals.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    pub queue: AtomicUsize,
    pub config: AtomicUsize,
    pub needs_reset: AtomicUsize,
}

impl Interrupt for CountingInterrupt {
    fn signal_queue(&self, _index: u16) {
        self.queue.fetch_add(1, Ordering::SeqCst);
    }

    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }

    fn signal_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// Guest memory for a test: one region at GPA 0.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A temporary file of `size` bytes filled with `fill`.
pub fn temp_file(size: usize, fill: u8) -> TempFile {
    let f = TempFile::new_with_prefix("/tmp/outboard-blk-test").unwrap();
    std::fs::write(f.as_path(), vec![fill; size]).unwrap();
    f
}

/// A descriptor: address, length, device-writable.
pub type Desc = (GuestAddress, u32, bool);

/// The driver side of a running device.
pub struct Driver<'m> {
    pub mem: &'m GuestMemoryMmap,
    pub device: Blk,
    pub interrupt: Arc<CountingInterrupt>,
    queues: Vec<MockSplitQueue<'m, GuestMemoryMmap>>,
    kicks: Vec<EventFd>,
    next_desc: Vec<u16>,
    used_seen: Vec<u16>,
    heap: u64,
}

impl<'m> Driver<'m> {
    /// Sets up `num_queues` queues for `device` (not yet activated).
    pub fn new(mem: &'m GuestMemoryMmap, device: Blk) -> Self {
        let n = device.queue_max_sizes().len();
        let queues = (0..n)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(i as u64 * 0x4000), QUEUE_SIZE))
            .collect();
        Driver {
            mem,
            device,
            interrupt: Arc::new(CountingInterrupt::default()),
            queues,
            kicks: (0..n)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            next_desc: vec![0; n],
            used_seen: vec![0; n],
            heap: HEAP,
        }
    }

    /// The device's features plus VERSION_1.
    pub fn all_features(&self) -> u64 {
        self.device.device_features() | bit(VIRTIO_F_VERSION_1)
    }

    /// Negotiates `features` and activates the device with every queue.
    pub fn activate_with(&mut self, features: u64) {
        self.device.ack_features(features);
        let queues = (0..self.queues.len()).map(|i| self.queue(i)).collect();
        self.activate_queues(features, queues);
    }

    /// Activates the device with `queues` (for instance those a quiesce returned).
    pub fn activate_queues(&mut self, features: u64, queues: Vec<ActiveQueue>) {
        self.device
            .activate(Activation {
                features,
                memory: GuestMemoryAtomic::new(self.mem.clone()),
                queues,
                interrupt: self.interrupt.clone(),
            })
            .unwrap();
    }

    /// Negotiates every offered feature and activates the device.
    pub fn activate(&mut self) {
        self.activate_with(self.all_features());
    }

    /// Allocates `len` bytes of guest memory (aligned to 512 bytes) filled with `fill`.
    pub fn alloc(&mut self, len: u32, fill: u8) -> GuestAddress {
        let addr = GuestAddress(self.heap);
        self.heap += u64::from(len).div_ceil(512).max(1) * 512;
        assert!(self.heap <= MEM_SIZE as u64, "test guest memory exhausted");
        self.mem
            .write_slice(&vec![fill; len as usize], addr)
            .unwrap();
        addr
    }

    /// A request header in guest memory.
    pub fn header(&mut self, request_type: u32, sector: u64) -> GuestAddress {
        let addr = self.alloc(16, 0);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, addr).unwrap();
        addr
    }

    /// A status byte, preset to [`UNWRITTEN`].
    pub fn status(&mut self) -> GuestAddress {
        self.alloc(1, UNWRITTEN)
    }

    /// Makes the chain `descs` available on queue `q` with explicit flags and next fields
    /// (`(addr, len, flags, next)`, `next` relative to the chain's first descriptor); returns
    /// its head.
    pub fn push_raw(&mut self, q: usize, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let base = self.next_desc[q];
        assert!(
            usize::from(base) + descs.len() <= usize::from(QUEUE_SIZE),
            "test descriptor table exhausted"
        );
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, flags, next)| {
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, base + next))
            })
            .collect();
        self.queues[q].add_desc_chains(&raw, base).unwrap();
        self.next_desc[q] += descs.len() as u16;
        base
    }

    /// Makes the chain `descs` available on queue `q`; returns its head.
    pub fn push(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let raw: Vec<(u64, u32, u16, u16)> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let last = i + 1 == descs.len();
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if !last {
                    flags |= virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
                }
                (addr.0, len, flags, i as u16 + 1)
            })
            .collect();
        self.push_raw(q, &raw)
    }

    /// The running queue `q`, for a test that drives a handler itself.
    pub fn queue(&self, q: usize) -> ActiveQueue {
        let queue: Queue = self.queues[q].create_queue().unwrap();
        ActiveQueue::new(q as u16, queue, self.kicks[q].try_clone().unwrap())
    }

    /// The device's backing file.
    pub fn file(&self) -> Arc<std::fs::File> {
        self.device.file.clone().expect("a device with a file")
    }

    /// The used ring's index on queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used().idx().load()
    }

    /// Makes `head` available on queue `q` as it is, even if no such descriptor exists.
    pub fn push_head(&mut self, q: usize, head: u16) {
        let avail = self.queues[q].avail();
        let idx = avail.idx().load();
        let slot = usize::from(idx % QUEUE_SIZE);
        avail.ring().ref_at(slot).unwrap().store(head);
        avail.idx().store(idx.wrapping_add(1));
    }

    /// Rings queue `q`'s doorbell.
    pub fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Waits for `count` new used entries on queue `q` and returns them as (id, len).
    pub fn wait_used(&mut self, q: usize, count: u16) -> Vec<(u32, u32)> {
        let used = self.queues[q].used();
        let want = self.used_seen[q].wrapping_add(count);
        let deadline = Instant::now() + Duration::from_secs(10);
        while used.idx().load() != want {
            assert!(
                Instant::now() < deadline,
                "queue {q}: {} used entries, expected {want}",
                used.idx().load()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let entries = (0..count)
            .map(|i| {
                let slot = usize::from(self.used_seen[q].wrapping_add(i) % QUEUE_SIZE);
                let e = used.ring().ref_at(slot).unwrap().load();
                (e.id(), e.len())
            })
            .collect();
        self.used_seen[q] = want;
        entries
    }

    /// Submits one chain on queue 0, kicks, and returns its used length.
    pub fn run(&mut self, descs: &[Desc]) -> u32 {
        let head = self.push(0, descs);
        self.kick(0);
        let used = self.wait_used(0, 1);
        assert_eq!(used[0].0, u32::from(head), "used entry of another chain");
        used[0].1
    }

    /// Reads `len` bytes of guest memory.
    pub fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, addr).unwrap();
        v
    }

    /// Reads one byte of guest memory.
    pub fn byte(&self, addr: GuestAddress) -> u8 {
        self.mem.read_obj(addr).unwrap()
    }
}

impl Drop for Driver<'_> {
    fn drop(&mut self) {
        drop(self.device.quiesce());
    }
}

pub const OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
pub const DISK: usize = 1 << 20;

pub fn file_device(file: &TempFile, engine: EngineKind) -> Blk {
    let mut config = BlkConfig::file(file.as_path());
    config.engine = engine;
    config.serial = "outboard-serial".into();
    let blk = Blk::new(config).unwrap();
    let expected = match engine {
        EngineKind::Uring => "io_uring",
        EngineKind::Sync => "sync",
    };
    assert_eq!(
        blk.engine_name(),
        Some(expected),
        "the io_uring tests need a kernel (and seccomp policy) that allows io_uring_setup"
    );
    blk
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Writes `data` at `sector` (split over two descriptors) and returns the status.
pub fn write(d: &mut Driver, sector: u64, data: &[u8]) -> (u8, u32) {
    let h = d.header(VIRTIO_BLK_T_OUT, sector);
    let split = data.len() as u32 / 3;
    let a = d.alloc(split, 0);
    let b = d.alloc(data.len() as u32 - split, 0);
    d.mem.write_slice(&data[..split as usize], a).unwrap();
    d.mem.write_slice(&data[split as usize..], b).unwrap();
    let s = d.status();
    let len = d.run(&[
        (h, 16, false),
        (a, split, false),
        (b, data.len() as u32 - split, false),
        (s, 1, true),
    ]);
    (d.byte(s), len)
}

/// Reads `len` bytes at `sector` into two descriptors; returns status, used length, data.
pub fn read(d: &mut Driver, sector: u64, len: u32) -> (u8, u32, Vec<u8>) {
    let h = d.header(VIRTIO_BLK_T_IN, sector);
    let a = d.alloc(len / 2 + 100, 0x55);
    let b = d.alloc(len - len / 2 - 100, 0x55);
    let s = d.status();
    let used = d.run(&[
        (h, 16, false),
        (a, len / 2 + 100, true),
        (b, len - len / 2 - 100, true),
        (s, 1, true),
    ]);
    let mut data = d.read(a, (len / 2 + 100) as usize);
    data.extend(d.read(b, (len - len / 2 - 100) as usize));
    (d.byte(s), used, data)
}

/// A request of `request_type` with `payload` as device-readable data.
pub fn command(d: &mut Driver, request_type: u32, payload: &[u8]) -> (u8, u32) {
    let h = d.header(request_type, 0);
    let s = d.status();
    let mut descs = vec![(h, 16, false)];
    if !payload.is_empty() {
        let p = d.alloc(payload.len() as u32, 0);
        d.mem.write_slice(payload, p).unwrap();
        descs.push((p, payload.len() as u32, false));
    }
    descs.push((s, 1, true));
    let len = d.run(&descs);
    (d.byte(s), len)
}

pub fn range(sector: u64, num_sectors: u32, flags: u32) -> Vec<u8> {
    let mut r = sector.to_le_bytes().to_vec();
    r.extend(num_sectors.to_le_bytes());
    r.extend(flags.to_le_bytes());
    r
}
