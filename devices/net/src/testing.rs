//! A driver for tests: guest memory, driver-side queues (virtio-queue's mock), a counting
//! interrupt sink, and helpers that post buffers, kick and read the used ring.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_memory::GuestMemoryMmap;
use outboard_virtio::{ActiveQueue, Interrupt};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The size of every test queue.
pub const QUEUE_SIZE: u16 = 256;
/// The size of test guest memory.
pub const MEM_SIZE: usize = 0x100_0000;
/// Where buffers are allocated from (queues live below).
const HEAP: u64 = 0x10_0000;

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

/// The driver side of some queues.
pub struct MockDriver<'m> {
    pub mem: &'m GuestMemoryMmap,
    pub interrupt: Arc<CountingInterrupt>,
    queues: Vec<MockSplitQueue<'m, GuestMemoryMmap>>,
    kicks: Vec<EventFd>,
    next_desc: Vec<u16>,
    used_seen: Vec<u16>,
    /// Used entries read but handed back with [`MockDriver::unread`].
    unread: Vec<Vec<(u32, u32)>>,
    heap: u64,
}

impl<'m> MockDriver<'m> {
    /// `n` queues of [`QUEUE_SIZE`].
    pub fn new(mem: &'m GuestMemoryMmap, n: usize) -> Self {
        MockDriver {
            mem,
            interrupt: Arc::new(CountingInterrupt::default()),
            queues: (0..n)
                .map(|i| MockSplitQueue::create(mem, GuestAddress(i as u64 * 0x4000), QUEUE_SIZE))
                .collect(),
            kicks: (0..n)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            next_desc: vec![0; n],
            used_seen: vec![0; n],
            unread: vec![Vec::new(); n],
            heap: HEAP,
        }
    }

    /// Allocates `len` bytes of guest memory (64-byte aligned), zeroed.
    pub fn alloc(&mut self, len: usize) -> GuestAddress {
        let addr = GuestAddress(self.heap);
        self.heap += (len as u64).div_ceil(64).max(1) * 64;
        assert!(self.heap <= MEM_SIZE as u64, "test guest memory exhausted");
        self.mem.write_slice(&vec![0; len], addr).unwrap();
        addr
    }

    /// Makes the chain `descs` (`(addr, len, flags, next)`, `next` relative to the chain's
    /// first descriptor) available on queue `q`; returns its head. Descriptors are reused
    /// round the table, so chains must complete before it wraps.
    pub fn push_raw(&mut self, q: usize, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let n = descs.len() as u16;
        if self.next_desc[q] + n > QUEUE_SIZE {
            self.next_desc[q] = 0;
        }
        let base = self.next_desc[q];
        let table = self.queues[q].desc_table();
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, base + next));
            table.store(base + i as u16, d).unwrap();
        }
        self.next_desc[q] += n;
        self.push_head(q, base);
        base
    }

    /// Makes `head` available on queue `q` as it is.
    pub fn push_head(&mut self, q: usize, head: u16) {
        let avail = self.queues[q].avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
    }

    /// Makes the chain `descs` (`(addr, len, writable)`) available on queue `q`.
    pub fn push(&mut self, q: usize, descs: &[(GuestAddress, u32, bool)]) -> u16 {
        let raw: Vec<(u64, u32, u16, u16)> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                (addr.0, len, flags, i as u16 + 1)
            })
            .collect();
        self.push_raw(q, &raw)
    }

    /// Posts a receive buffer of `len` bytes on queue `q`: (head, address).
    pub fn rx_buffer(&mut self, q: usize, len: u32) -> (u16, GuestAddress) {
        let addr = self.alloc(len as usize);
        (self.push(q, &[(addr, len, true)]), addr)
    }

    /// Posts a transmit chain of `bytes` (split in two descriptors when long enough) on queue
    /// `q`; returns its head.
    pub fn tx_packet(&mut self, q: usize, bytes: &[u8]) -> u16 {
        let addr = self.alloc(bytes.len());
        self.mem.write_slice(bytes, addr).unwrap();
        if bytes.len() > 12 {
            self.push(
                q,
                &[
                    (addr, 12, false),
                    (addr.unchecked_add(12), bytes.len() as u32 - 12, false),
                ],
            )
        } else {
            self.push(q, &[(addr, bytes.len() as u32, false)])
        }
    }

    /// The running queue `q`.
    pub fn queue(&self, q: usize) -> ActiveQueue {
        let queue: Queue = self.queues[q].create_queue().unwrap();
        ActiveQueue::new(q as u16, queue, self.kicks[q].try_clone().unwrap())
    }

    /// Rings queue `q`'s doorbell.
    pub fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// The used entries of queue `q` not seen yet, as (id, len).
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let used = self.queues[q].used();
        let idx = used.idx().load();
        let mut out = std::mem::take(&mut self.unread[q]);
        while self.used_seen[q] != idx {
            let e = used
                .ring()
                .ref_at(usize::from(self.used_seen[q] % QUEUE_SIZE))
                .unwrap()
                .load();
            out.push((e.id(), e.len()));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// Hands used entries back: the next [`MockDriver::used`] returns them first.
    pub fn unread(&mut self, q: usize, entries: Vec<(u32, u32)>) {
        let mut rest = std::mem::take(&mut self.unread[q]);
        self.unread[q] = entries;
        self.unread[q].append(&mut rest);
    }

    /// Waits until queue `q` has `count` new used entries and returns them.
    pub fn wait_used(&mut self, q: usize, count: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < count {
            out.extend(self.used(q));
            assert!(
                Instant::now() < deadline,
                "queue {q}: {} used entries, expected {count}",
                out.len()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            out.len(),
            count,
            "queue {q}: more used entries than expected"
        );
        out
    }

    /// Reads `len` bytes of guest memory.
    pub fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, addr).unwrap();
        v
    }
}
