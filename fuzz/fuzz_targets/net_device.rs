//! The virtio-net device end to end, through its public API: a `Net` on port 0 of an
//! in-process switch, activated with the receive, transmit and control queues the input
//! chooses, whose rings and buffers the input wrote. Its workers take transmit chains
//! (`virtio_net_hdr` and frame parsing, forwarding to port 1) and control commands (chain
//! framing, `CtrlCommand::parse`, the filter and queue-pair changes) when they start; packets the
//! input injects on port 1 (another guest: any header, any frame) are received through the
//! device's filter and software offloads into the receive buffers. Then the device is quiesced
//! and reset. It must never panic.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use outboard_fuzz::guest::{self, CountingInterrupt};
use outboard_fuzz::input::Input;
use outboard_net::backend::switch::{Switch, SwitchConfig};
use outboard_net::{Net, NetConfig, PacketBackend, DEFAULT_MAC, MIN_MTU};
use outboard_virtio::features::{bit, VIRTIO_F_VERSION_1};
use outboard_virtio::{Activation, ActiveQueue, VirtioDevice};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long the receive side may take to account for injected packets.
const RX_DEADLINE: Duration = Duration::from_millis(5);
/// The most packets one input injects.
const MAX_INJECTED: usize = 16;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let pairs = 1 + u16::from(flags & 1);
    let mut config = NetConfig::new(DEFAULT_MAC);
    config.queue_pairs = pairs;
    config.queue_size = guest::queue_size(input.u8()).max(2);
    config.mtu = MIN_MTU.max(input.u16());
    config.link_up = flags & 2 != 0;
    let switch = Switch::new(
        2,
        pairs,
        SwitchConfig {
            queue_capacity: 64,
            table_capacity: 8,
            ..SwitchConfig::default()
        },
    )
    .expect("a valid switch");
    let Ok(mut net) = Net::new(config.clone(), Box::new(switch.port(0))) else {
        return;
    };
    let mut peer = Box::new(switch.port(1)).into_queues();
    for q in &mut peer {
        q.set_enabled(true).expect("a switch queue enables");
    }
    let offered = net.device_features() | bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX);
    let features = offered & (input.u64() | bit(VIRTIO_F_VERSION_1));
    net.ack_features(features);
    let event_idx = features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
    let mem = guest::memory();
    // Which queues the driver started: one bit per queue (rx0, tx0, [rx1, tx1,] ctrl).
    let started = input.u8();
    let max = config.queue_size;
    let mut queues = Vec::new();
    for i in 0..net.queue_max_sizes().len() as u16 {
        let size = guest::queue_size(input.u8()).min(max);
        let next_avail = input.u16();
        if started & (1 << i) == 0 {
            continue;
        }
        let Ok(queue) = guest::queue_config(i, max, size, next_avail).build(&mem, event_idx) else {
            return;
        };
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        queues.push(ActiveQueue::new(i, queue, kick));
    }
    let count = queues.len();
    let patches = usize::from(input.u8() % 64);
    guest::patch(&mem, &mut input, patches);
    // Packets another guest sends: a length, then the virtio header and the frame.
    let mut injected = Vec::new();
    for _ in 0..input.u8() as usize % (MAX_INJECTED + 1) {
        let len = usize::from(input.u16() % 2048);
        injected.push(input.bytes(len).to_vec());
    }
    let activation = Activation {
        features,
        memory: GuestMemoryAtomic::new(mem.clone()),
        queues,
        interrupt: Arc::new(CountingInterrupt::default()),
    };
    if net.activate(activation).is_err() {
        return;
    }
    if !injected.is_empty() {
        let rx_seen = |net: &Net| {
            let s = net.stats();
            s.rx_packets + s.rx_filtered + s.rx_malformed + s.rx_too_big + s.rx_dropped
        };
        let before = (rx_seen(&net), switch.port_stats(0).delivered);
        peer[0].send(&mut injected);
        // The switch forwards at once; the receive worker takes the packets on its own thread:
        // give it a moment (it does not take them while the driver gives no buffers).
        let delivered = switch.port_stats(0).delivered - before.1;
        let start = Instant::now();
        while rx_seen(&net) - before.0 < delivered && start.elapsed() < RX_DEADLINE {
            std::thread::yield_now();
        }
    }
    let queues = net.quiesce();
    assert_eq!(queues.len(), count, "quiesce returns every queue");
    // Whatever the device transmitted reached port 1.
    let mut packet = Vec::new();
    for q in &mut peer {
        while q.recv(&mut packet).unwrap_or(false) {}
    }
    net.reset().expect("a switch device resets");
});
