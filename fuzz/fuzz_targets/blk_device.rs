//! The virtio-blk device end to end: a `Blk` with a configuration the input chooses (null
//! storage, or a memfd through the synchronous or io_uring engine), activated with one or two
//! queues whose rings and buffers the input wrote, run by its real workers and `QueueHandler`,
//! quiesced, given more input, activated and quiesced again, then reset. A worker processes its
//! queues once when it starts, so each activation serves everything the input made available.
//! The device must never panic, and must stop when asked with every request published.
#![no_main]

use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nix::sys::memfd::{memfd_create, MFdFlags};
use outboard_blk::{Blk, BlkConfig, EngineKind, RangeCommandConfig, StorageConfig};
use outboard_fuzz::guest::{self, CountingInterrupt};
use outboard_fuzz::input::Input;
use outboard_virtio::features::{bit, VIRTIO_F_VERSION_1};
use outboard_virtio::{Activation, ActiveQueue, VirtioDevice};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The backing file of the file engines: a 1 MiB memfd, opened by its /proc path.
const FILE_SIZE: u64 = 1 << 20;

fn backing_file() -> String {
    static FILE: OnceLock<OwnedFd> = OnceLock::new();
    let fd = FILE.get_or_init(|| {
        let fd = memfd_create("outboard-fuzz-blk", MFdFlags::MFD_CLOEXEC).expect("memfd");
        nix::unistd::ftruncate(&fd, FILE_SIZE as i64).expect("ftruncate");
        fd
    });
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn range(input: &mut Input) -> RangeCommandConfig {
    RangeCommandConfig {
        enabled: input.bool(),
        max_sectors: 1 + input.u32() % (1 << 22),
        max_segments: 1 + u32::from(input.u8() % 32),
    }
}

fn config(input: &mut Input) -> BlkConfig {
    let storage = match input.u8() % 4 {
        // Null storage is the fastest: most inputs use it.
        0 | 1 => StorageConfig::Null {
            size: (u64::from(input.u16()) + 1) * 4096,
        },
        _ => StorageConfig::File {
            path: backing_file().into(),
        },
    };
    let flags = input.u8();
    let mut c = BlkConfig::new(storage);
    c.engine = if flags & 1 != 0 {
        EngineKind::Sync
    } else {
        EngineKind::Uring
    };
    c.read_only = flags & 2 != 0;
    c.num_queues = if flags & 4 != 0 { 2 } else { 1 };
    c.threads = if flags & 8 != 0 {
        NonZeroUsize::new(1)
    } else {
        None
    };
    c.poll = if flags & 16 != 0 {
        Duration::from_micros(50)
    } else {
        Duration::ZERO
    };
    c.writeback = flags & 32 != 0;
    c.write_zeroes_may_unmap = flags & 64 != 0;
    c.compat_version = if flags & 128 != 0 { 1 } else { 2 };
    c.queue_size = guest::queue_size(input.u8()).max(2);
    c.serial = "outboard-fuzz".into();
    c.block_size = 512 << (input.u8() % 4);
    c.physical_block_size = c.block_size;
    c.seg_max = 1 + u32::from(input.u16() % 1024);
    c.size_max = 4096 + input.u32() % (1 << 24);
    c.discard = range(input);
    c.write_zeroes = range(input);
    c
}

fn activate(
    blk: &mut Blk,
    features: u64,
    memory: &outboard_virtio::GuestMemoryHandle,
    queues: Vec<ActiveQueue>,
    interrupt: &Arc<CountingInterrupt>,
) -> Option<Vec<ActiveQueue>> {
    let count = queues.len();
    let activation = Activation {
        features,
        memory: memory.clone(),
        queues,
        interrupt: interrupt.clone(),
    };
    // Activation fails only when a thread cannot start.
    blk.activate(activation).ok()?;
    let queues = blk.quiesce();
    assert_eq!(queues.len(), count, "quiesce returns every queue");
    assert!(blk.quiesce().is_empty(), "a quiesced device runs no queue");
    Some(queues)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let Ok(mut blk) = Blk::new(config(&mut input)) else {
        return;
    };
    let offered = blk.device_features() | bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX);
    let features = offered & (input.u64() | bit(VIRTIO_F_VERSION_1));
    blk.ack_features(features);
    let event_idx = features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
    let mem = guest::memory();
    let max = blk.queue_max_sizes()[0];
    let mut queues = Vec::new();
    for i in 0..blk.queue_max_sizes().len() as u16 {
        let size = guest::queue_size(input.u8()).min(max);
        let config = guest::queue_config(i, max, size, input.u16());
        // Rings are in guest memory and aligned by construction; only a size can be refused.
        let Ok(queue) = config.build(&mem, event_idx) else {
            return;
        };
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        queues.push(ActiveQueue::new(i, queue, kick));
    }
    // The rest of the input: two rounds of memory patches.
    let first = usize::from(input.u8() % 64);
    guest::patch(&mem, &mut input, first);
    let memory = GuestMemoryAtomic::new(mem.clone());
    let interrupt = Arc::new(CountingInterrupt::default());
    let Some(queues) = activate(&mut blk, features, &memory, queues, &interrupt) else {
        return;
    };
    guest::patch(&mem, &mut input, 64);
    if activate(&mut blk, features, &memory, queues, &interrupt).is_none() {
        return;
    }
    blk.reset().expect("a null or file device resets");
});
