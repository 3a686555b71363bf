//! Device tests through the real path: two devices on a switch, activated with driver-side
//! mock queues, with queue-pair and control-queue workers running.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outboard_virtio::features::{bit, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestMemoryAtomic};

use super::*;
use crate::backend::switch::{Switch, SwitchConfig};
use crate::hdr::HDR_LEN;
use crate::offload::tests::{tcp_checksum_ok, tcp_frame};
use crate::testing::*;

const MAC_A: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 0x0a]);
const MAC_B: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 0x0b]);
const OTHER: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 0x77]);
const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;

fn frame(dst: MacAddress, src: MacAddress, len: usize, seed: u8) -> Vec<u8> {
    let mut f = dst.0.to_vec();
    f.extend(src.0);
    f.extend([0x88, 0xb5]);
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(13) ^ seed));
    f
}

fn with_hdr(frame: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; HDR_LEN];
    p.extend_from_slice(frame);
    p
}

fn all_features(net: &Net) -> u64 {
    net.device_features() | bit(VIRTIO_F_VERSION_1)
}

/// A device on port `port` of `switch`, activated with the queues `queues` of `d`.
fn start(
    switch: &Switch,
    port: usize,
    config: NetConfig,
    d: &MockDriver,
    features: impl Fn(u64) -> u64,
    queues: &[usize],
) -> Net {
    let mut net = Net::new(config, Box::new(switch.port(port))).unwrap();
    let f = features(all_features(&net));
    net.ack_features(f);
    net.activate(Activation {
        features: f,
        memory: GuestMemoryAtomic::new(d.mem.clone()),
        queues: queues.iter().map(|&q| d.queue(q)).collect(),
        interrupt: d.interrupt.clone(),
    })
    .unwrap();
    net
}

fn config(mac: MacAddress, pairs: u16) -> NetConfig {
    NetConfig {
        queue_pairs: pairs,
        ..NetConfig::new(mac)
    }
}

/// Sends a control command on queue `ctrl` and returns the ack.
fn command(d: &mut MockDriver, ctrl: usize, bytes: &[u8]) -> u8 {
    let cmd = d.alloc(bytes.len());
    d.mem.write_slice(bytes, cmd).unwrap();
    let ack = d.alloc(1);
    d.mem.write_slice(&[0xee], ack).unwrap();
    d.push(ctrl, &[(cmd, bytes.len() as u32, false), (ack, 1, true)]);
    d.kick(ctrl);
    assert_eq!(d.wait_used(ctrl, 1)[0].1, 1, "the ack is written");
    d.read(ack, 1)[0]
}

/// Waits for `n` packets on receive queue `q` posted with `bufs` (head → address, in posting
/// order) and returns each packet's bytes (headers included), merging buffers by
/// `num_buffers`.
fn receive(
    d: &mut MockDriver,
    q: usize,
    bufs: &[(u16, vm_memory::GuestAddress)],
    n: usize,
) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    let mut used = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while packets.len() < n {
        used.extend(d.used(q));
        while packets.len() < n {
            let Some(&(id, len)) = used.first() else {
                break;
            };
            let addr = bufs.iter().find(|b| u32::from(b.0) == id).unwrap().1;
            let first = d.read(addr, len as usize);
            let count = usize::from(u16::from_le_bytes([first[10], first[11]]));
            if used.len() < count {
                break;
            }
            let mut p = first;
            for &(id, len) in &used[1..count] {
                let addr = bufs.iter().find(|b| u32::from(b.0) == id).unwrap().1;
                p.extend(d.read(addr, len as usize));
            }
            used.drain(..count);
            packets.push(p);
        }
        if packets.len() == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} packets received",
            packets.len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    d.unread(q, used);
    packets
}

/// Sends `frames` on transmit queue `q` and waits for their used entries.
fn transmit(d: &mut MockDriver, q: usize, frames: &[Vec<u8>]) {
    for f in frames {
        d.tx_packet(q, &with_hdr(f));
    }
    d.kick(q);
    d.wait_used(q, frames.len());
}

/// Waits until `cond` holds.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn frames_cross_the_switch_with_and_without_mergeable_buffers() {
    for mrg in [false, true] {
        let switch = Switch::new(2, 1, SwitchConfig::default()).unwrap();
        let (mem_a, mem_b) = (memory(), memory());
        let mut a = MockDriver::new(&mem_a, 3);
        let mut b = MockDriver::new(&mem_b, 3);
        let size = if mrg { 512 } else { 2048 };
        let bufs: Vec<_> = (0..16).map(|_| b.rx_buffer(0, size)).collect();
        let keep_mrg = |f: u64| {
            if mrg {
                f
            } else {
                f & !bit(VIRTIO_NET_F_MRG_RXBUF)
            }
        };
        let net_a = start(&switch, 0, config(MAC_A, 1), &a, keep_mrg, &[0, 1, 2]);
        let net_b = start(&switch, 1, config(MAC_B, 1), &b, keep_mrg, &[0, 1, 2]);
        let frames = vec![frame(MAC_B, MAC_A, 60, 1), frame(MAC_B, MAC_A, 1514, 2)];
        transmit(&mut a, 1, &frames);
        let got = receive(&mut b, 0, &bufs, 2);
        for (g, f) in got.iter().zip(&frames) {
            assert_eq!(&g[HDR_LEN..], &f[..], "mrg {mrg}");
            assert_eq!(g[0], 0, "no offload flags");
        }
        let buffers = u16::from_le_bytes([got[1][10], got[1][11]]);
        assert_eq!(buffers, if mrg { 3 } else { 1 });
        assert_eq!(net_a.stats().tx_packets, 2);
        assert_eq!(net_b.stats().rx_packets, 2);
        assert_eq!(net_b.stats().rx_bytes, 60 + 1514);
        assert!(b.interrupt.queue.load(Ordering::SeqCst) > 0);
    }
}

#[test]
fn the_device_stops_polling_the_backend_without_buffers_and_resumes_on_a_kick() {
    let switch = Switch::new(2, 1, SwitchConfig::default()).unwrap();
    let (mem_a, mem_b) = (memory(), memory());
    let mut a = MockDriver::new(&mem_a, 3);
    let mut b = MockDriver::new(&mem_b, 3);
    let _net_a = start(&switch, 0, config(MAC_A, 1), &a, |f| f, &[0, 1, 2]);
    let net_b = start(&switch, 1, config(MAC_B, 1), &b, |f| f, &[0, 1, 2]);
    let frames: Vec<_> = (0..5).map(|i| frame(MAC_B, MAC_A, 100, i)).collect();
    transmit(&mut a, 1, &frames);
    eventually("the switch delivered", || {
        switch.port_stats(1).delivered == 5
    });
    std::thread::sleep(Duration::from_millis(20));
    assert!(b.used(0).is_empty(), "no buffers, nothing placed");
    let bufs: Vec<_> = (0..5).map(|_| b.rx_buffer(0, 2048)).collect();
    b.kick(0);
    let got = receive(&mut b, 0, &bufs, 5);
    for (g, f) in got.iter().zip(&frames) {
        assert_eq!(&g[HDR_LEN..], &f[..], "in order, none lost");
    }
    assert_eq!(net_b.stats().rx_dropped, 0);
}

#[test]
fn a_stop_places_what_the_switch_holds_into_the_buffers_the_driver_posted() {
    // Frames A's device accepted wait in the switch for B; B's driver posts buffers, and the
    // stop (a migration's GET_VRING_BASE) overtakes its kick. The frames must be in B's
    // receive ring when the stop returns, not left behind in the old process.
    let switch = Switch::new(2, 1, SwitchConfig::default()).unwrap();
    let (mem_a, mem_b) = (memory(), memory());
    let mut a = MockDriver::new(&mem_a, 3);
    let mut b = MockDriver::new(&mem_b, 3);
    let _net_a = start(&switch, 0, config(MAC_A, 1), &a, |f| f, &[0, 1, 2]);
    let mut net_b = start(&switch, 1, config(MAC_B, 1), &b, |f| f, &[0, 1, 2]);
    let frames: Vec<_> = (0..5)
        .map(|i| frame(MAC_B, MAC_A, 100 + i, i as u8))
        .collect();
    transmit(&mut a, 1, &frames);
    eventually("the switch took every frame", || {
        switch.port_stats(1).delivered == 5
    });
    std::thread::sleep(Duration::from_millis(20));
    let bufs: Vec<_> = (0..8).map(|_| b.rx_buffer(0, 2048)).collect();
    drop(net_b.quiesce());
    let got = receive(&mut b, 0, &bufs, 5);
    for (g, f) in got.iter().zip(&frames) {
        assert_eq!(&g[HDR_LEN..], &f[..], "in order, none lost");
    }
    assert_eq!(net_b.stats().rx_dropped, 0);
}

#[test]
fn a_full_transmit_ring_is_taken_in_turns_and_nothing_stalls() {
    // A ring of transmit chains is several turns' budget: the worker takes the rest after a
    // receive turn, woken by itself, and then listens to kicks again.
    let switch = Switch::new(2, 1, SwitchConfig::default()).unwrap();
    let (mem_a, mem_b) = (memory(), memory());
    let mut a = MockDriver::new(&mem_a, 3);
    let mut b = MockDriver::new(&mem_b, 3);
    let net_a = start(&switch, 0, config(MAC_A, 1), &a, |f| f, &[0, 1, 2]);
    let net_b = start(&switch, 1, config(MAC_B, 1), &b, |f| f, &[0, 1, 2]);
    // Two descriptors per transmit chain, and the mock reuses descriptors round the table
    // (which the rounds stay clear of): a quarter of the ring per round, two turns each.
    let n = usize::from(QUEUE_SIZE) / 4;
    for round in 0..2u8 {
        let bufs: Vec<_> = (0..n).map(|_| b.rx_buffer(0, 2048)).collect();
        b.kick(0);
        let frames: Vec<_> = (0..n)
            .map(|i| frame(MAC_B, MAC_A, 60 + i % 64, i as u8 ^ round))
            .collect();
        transmit(&mut a, 1, &frames);
        let got = receive(&mut b, 0, &bufs, n);
        for (g, f) in got.iter().zip(&frames) {
            assert_eq!(&g[HDR_LEN..], &f[..], "round {round}: in order, none lost");
        }
    }
    assert_eq!(net_a.stats().tx_packets, 2 * n as u64);
    assert_eq!(net_b.stats().rx_packets, 2 * n as u64);
}

#[test]
fn a_sender_with_nowhere_to_go_leaves_its_frames_in_the_ring_until_there_is_room() {
    // B posts no receive buffers at first: once its switch queue has no room for a batch,
    // A stops taking chains (no frame is copied only to be dropped), and goes on when B
    // makes room.
    let small = SwitchConfig {
        queue_capacity: 64,
        ..SwitchConfig::default()
    };
    let switch = Switch::new(2, 1, small).unwrap();
    let (mem_a, mem_b) = (memory(), memory());
    let mut a = MockDriver::new(&mem_a, 3);
    let mut b = MockDriver::new(&mem_b, 3);
    let net_a = start(&switch, 0, config(MAC_A, 1), &a, |f| f, &[0, 1, 2]);
    let net_b = start(&switch, 1, config(MAC_B, 1), &b, |f| f, &[0, 1, 2]);
    let n = 100;
    let frames: Vec<_> = (0..n)
        .map(|i| frame(MAC_B, MAC_A, 60 + i % 64, i as u8))
        .collect();
    for f in &frames {
        a.tx_packet(1, &with_hdr(f));
    }
    a.kick(1);
    // Two turns of TX_BUDGET (32) fill B's queue past the headroom of a batch.
    let first = a.wait_used(1, 64).len();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(first + a.used(1).len(), 64, "the rest stays in A's ring");
    assert_eq!(switch.port_stats(1).dropped_full, 0);
    let bufs: Vec<_> = (0..n).map(|_| b.rx_buffer(0, 2048)).collect();
    b.kick(0);
    let got = receive(&mut b, 0, &bufs, n);
    for (i, (g, f)) in got.iter().zip(&frames).enumerate() {
        assert_eq!(&g[HDR_LEN..], &f[..], "frame {i}: in order, none lost");
    }
    a.wait_used(1, n - 64);
    assert_eq!(net_a.stats().tx_packets, n as u64);
    assert_eq!(net_a.stats().tx_backend_dropped, 0);
    assert_eq!(net_b.stats().rx_packets, n as u64);
    assert_eq!(switch.port_stats(1).dropped_full, 0);
}

#[test]
fn a_polling_worker_takes_frames_that_were_never_kicked() {
    // A polls (`NetConfig::poll`), B does not: after one kicked frame each, a second frame
    // without a kick leaves A's ring and stays in B's.
    let switch = Switch::new(2, 1, SwitchConfig::default()).unwrap();
    let (mem_a, mem_b) = (memory(), memory());
    let mut a = MockDriver::new(&mem_a, 3);
    let mut b = MockDriver::new(&mem_b, 3);
    let polling = NetConfig {
        poll: Duration::from_secs(2),
        ..config(MAC_A, 1)
    };
    let net_a = start(&switch, 0, polling, &a, |f| f, &[0, 1, 2]);
    let net_b = start(&switch, 1, config(MAC_B, 1), &b, |f| f, &[0, 1, 2]);
    let bufs_a: Vec<_> = (0..2).map(|_| a.rx_buffer(0, 2048)).collect();
    a.kick(0);
    let bufs_b: Vec<_> = (0..2).map(|_| b.rx_buffer(0, 2048)).collect();
    b.kick(0);
    let to_b: Vec<_> = (0..2).map(|i| frame(MAC_B, MAC_A, 100, i)).collect();
    let to_a: Vec<_> = (0..2).map(|i| frame(MAC_A, MAC_B, 100, 10 + i)).collect();
    transmit(&mut a, 1, &to_b[..1]);
    transmit(&mut b, 1, &to_a[..1]);
    // Long enough for a worker that does not poll to be asleep in epoll_wait.
    std::thread::sleep(Duration::from_millis(50));
    a.tx_packet(1, &with_hdr(&to_b[1]));
    b.tx_packet(1, &with_hdr(&to_a[1]));
    a.wait_used(1, 1);
    let got = receive(&mut b, 0, &bufs_b, 2);
    assert_eq!(
        &got[1][HDR_LEN..],
        &to_b[1][..],
        "the unkicked frame crossed"
    );
    assert_eq!(net_a.stats().tx_packets, 2);
    let got = receive(&mut a, 0, &bufs_a, 1);
    assert_eq!(&got[0][HDR_LEN..], &to_a[0][..]);
    std::thread::sleep(Duration::from_millis(100));
    assert!(b.used(1).is_empty(), "B sleeps until its driver kicks");
    assert_eq!(net_b.stats().tx_packets, 1);
    b.kick(1);
    b.wait_used(1, 1);
    let got = receive(&mut a, 0, &bufs_a, 1);
    assert_eq!(&got[0][HDR_LEN..], &to_a[1][..]);
}

#[test]
fn every_control_command_is_acknowledged_and_applied() {
    let switch = Switch::new(2, 2, SwitchConfig::default()).unwrap();
    let mem = memory();
    let mut d = MockDriver::new(&mem, 5);
    let net = start(&switch, 0, config(MAC_A, 2), &d, |f| f, &[0, 1, 2, 3, 4]);
    for (class, cmd) in [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5)] {
        assert_eq!(command(&mut d, 4, &[class, cmd, 1]), OK, "RX mode {cmd} on");
        assert_eq!(
            command(&mut d, 4, &[class, cmd, 0]),
            OK,
            "RX mode {cmd} off"
        );
    }
    let mut table = vec![1, 0];
    table.extend(1u32.to_le_bytes());
    table.extend(OTHER.0);
    table.extend(1u32.to_le_bytes());
    table.extend([1, 0, 0x5e, 0, 0, 1]);
    assert_eq!(command(&mut d, 4, &table), OK);
    let mut set = vec![1, 1];
    set.extend(MAC_B.0);
    assert_eq!(command(&mut d, 4, &set), OK);
    assert_eq!(command(&mut d, 4, &[2, 0, 10, 0]), OK);
    assert_eq!(command(&mut d, 4, &[2, 1, 10, 0]), OK);
    assert_eq!(command(&mut d, 4, &[2, 0, 20, 0]), OK);
    assert_eq!(command(&mut d, 4, &[4, 0, 2, 0]), OK);
    net.control().announce();
    assert_ne!(net.state().status & config::STATUS_ANNOUNCE, 0);
    assert_eq!(command(&mut d, 4, &[3, 0]), OK);
    let state = net.state();
    assert_eq!(
        state.status & config::STATUS_ANNOUNCE,
        0,
        "ANNOUNCE_ACK clears the bit"
    );
    assert_eq!(state.mac, MAC_B);
    assert_eq!(state.table.unicast, [OTHER]);
    assert_eq!(state.table.multicast.len(), 1);
    assert!(state.vlans.contains(20) && !state.vlans.contains(10));
    assert_eq!(state.pairs, 2);
    let mut mac = [0u8; 6];
    net.read_config(0, &mut mac);
    assert_eq!(mac, MAC_B.0, "the configuration space shows the MAC in use");
    // Malformed and unknown commands: ERR, and nothing changes.
    for bad in [
        &[0, 0][..],
        &[0, 0, 2],
        &[4, 0, 3, 0],
        &[4, 0, 0, 0],
        &[9, 9],
        &[2, 0, 0, 0x10],
    ] {
        assert_eq!(command(&mut d, 4, bad), ERR, "{bad:?}");
    }
    assert_eq!(net.state(), state);
    let stats = net.stats();
    assert_eq!(stats.ctrl_err, 6);
    assert_eq!(stats.ctrl_ok, 19);
    assert_eq!(d.interrupt.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn control_chains_without_room_for_the_ack_are_returned_empty() {
    let switch = Switch::new(1, 1, SwitchConfig::default()).unwrap();
    let mem = memory();
    let mut d = MockDriver::new(&mem, 3);
    let net = start(&switch, 0, config(MAC_A, 1), &d, |f| f, &[0, 1, 2]);
    let cmd = d.alloc(3);
    d.push(2, &[(cmd, 3, false)]);
    d.kick(2);
    assert_eq!(d.wait_used(2, 1)[0].1, 0);
    // A chain that loops.
    d.push_raw(2, &[(cmd.0, 3, VRING_DESC_F_NEXT_U16, 0)]);
    d.kick(2);
    assert_eq!(d.wait_used(2, 1)[0].1, 0);
    assert_eq!(net.stats().ctrl_unanswerable, 2);
    assert_eq!(command(&mut d, 2, &[0, 0, 0]), OK, "the queue still works");
}

const VRING_DESC_F_NEXT_U16: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

/// Sends `frames` from `a`, then a frame for B that always passes as a marker, and returns the
/// frames `b` received before the marker.
fn probe(
    a: &mut MockDriver,
    b: &mut MockDriver,
    bufs: &[(u16, vm_memory::GuestAddress)],
    frames: Vec<Vec<u8>>,
) -> Vec<Vec<u8>> {
    let marker = frame(MAC_B, MAC_A, 61, 0xaa);
    let mut all = frames;
    all.push(marker.clone());
    transmit(a, 1, &all);
    let mut got = Vec::new();
    loop {
        let p = receive(b, 0, bufs, 1).remove(0);
        if p[HDR_LEN..] == marker[..] {
            return got;
        }
        got.push(p[HDR_LEN..].to_vec());
    }
}

#[test]
fn receive_filtering_follows_the_driver() {
    let switch = Switch::new(2, 1, SwitchConfig::default()).unwrap();
    let (mem_a, mem_b) = (memory(), memory());
    let mut a = MockDriver::new(&mem_a, 3);
    let mut b = MockDriver::new(&mem_b, 3);
    let bufs: Vec<_> = (0..64).map(|_| b.rx_buffer(0, 2048)).collect();
    let _net_a = start(&switch, 0, config(MAC_A, 1), &a, |f| f, &[0, 1, 2]);
    let net_b = start(&switch, 1, config(MAC_B, 1), &b, |f| f, &[0, 1, 2]);
    let mcast = MacAddress([1, 0, 0x5e, 0, 0, 9]);
    // Promiscuous after reset: a frame for another MAC arrives.
    transmit(&mut a, 1, &[frame(OTHER, MAC_A, 60, 1)]);
    assert_eq!(
        receive(&mut b, 0, &bufs, 1)[0][HDR_LEN..],
        frame(OTHER, MAC_A, 60, 1)
    );
    assert_eq!(command(&mut b, 2, &[0, 0, 0]), OK, "promiscuous off");
    let other = frame(OTHER, MAC_A, 60, 2);
    let bcast = frame(MacAddress::BROADCAST, MAC_A, 60, 3);
    let multi = frame(mcast, MAC_A, 60, 4);
    assert_eq!(
        probe(
            &mut a,
            &mut b,
            &bufs,
            vec![other.clone(), bcast.clone(), multi.clone()]
        ),
        vec![bcast.clone()]
    );
    assert_eq!(command(&mut b, 2, &[0, 1, 1]), OK, "allmulti");
    assert_eq!(
        probe(&mut a, &mut b, &bufs, vec![multi.clone()]),
        vec![multi.clone()]
    );
    assert_eq!(command(&mut b, 2, &[0, 1, 0]), OK);
    let mut table = vec![1, 0];
    table.extend(1u32.to_le_bytes());
    table.extend(OTHER.0);
    table.extend(1u32.to_le_bytes());
    table.extend(mcast.0);
    assert_eq!(command(&mut b, 2, &table), OK);
    assert_eq!(
        probe(&mut a, &mut b, &bufs, vec![other.clone(), multi.clone()]),
        [other.clone(), multi.clone()]
    );
    assert_eq!(command(&mut b, 2, &[0, 5, 1]), OK, "nobcast");
    assert_eq!(
        probe(&mut a, &mut b, &bufs, vec![bcast.clone()]),
        Vec::<Vec<u8>>::new()
    );
    assert_eq!(command(&mut b, 2, &[0, 3, 1]), OK, "nomulti");
    assert_eq!(
        probe(&mut a, &mut b, &bufs, vec![multi.clone()]),
        Vec::<Vec<u8>>::new()
    );
    // VLAN filtering: tagged frames need their VID in the table.
    let mut tagged = MAC_B.0.to_vec();
    tagged.extend(MAC_A.0);
    tagged.extend([0x81, 0x00, 0x00, 0x07, 0x88, 0xb5]);
    tagged.resize(64, 0x5a);
    assert_eq!(
        probe(&mut a, &mut b, &bufs, vec![tagged.clone()]),
        Vec::<Vec<u8>>::new()
    );
    assert_eq!(command(&mut b, 2, &[2, 0, 7, 0]), OK);
    assert_eq!(
        probe(&mut a, &mut b, &bufs, vec![tagged.clone()]),
        vec![tagged.clone()]
    );
    assert_eq!(command(&mut b, 2, &[0, 0, 1]), OK, "promiscuous again");
    assert_eq!(probe(&mut a, &mut b, &bufs, vec![other.clone()]), [other]);
    assert!(net_b.stats().rx_filtered >= 5);
}

#[test]
fn oversized_and_malformed_transmissions_are_dropped_and_counted() {
    let switch = Switch::new(2, 1, SwitchConfig::default()).unwrap();
    let (mem_a, mem_b) = (memory(), memory());
    let mut a = MockDriver::new(&mem_a, 3);
    let mut b = MockDriver::new(&mem_b, 3);
    let bufs: Vec<_> = (0..8).map(|_| b.rx_buffer(0, 65562)).collect();
    let net_a = start(&switch, 0, config(MAC_A, 1), &a, |f| f, &[0, 1, 2]);
    let _net_b = start(&switch, 1, config(MAC_B, 1), &b, |f| f, &[0, 1, 2]);
    let too_big = frame(MAC_B, MAC_A, 1500 + 18 + 1, 1);
    let runt = vec![0u8; HDR_LEN + 10];
    let mut bad_gso = with_hdr(&frame(MAC_B, MAC_A, 100, 2));
    bad_gso[1] = 3; // UDP fragmentation offload: not supported.
    let huge = vec![0u8; HDR_LEN + 70_000];
    for p in [with_hdr(&too_big), runt, bad_gso, huge] {
        a.tx_packet(1, &p);
    }
    a.kick(1);
    let used = a.wait_used(1, 4);
    assert!(used.iter().all(|u| u.1 == 0));
    let stats = net_a.stats();
    assert_eq!(
        (stats.tx_oversize, stats.tx_malformed, stats.tx_packets),
        (2, 2, 0)
    );
    // A frame of exactly MTU + Ethernet + VLAN header passes.
    let max = frame(MAC_B, MAC_A, 1500 + 18, 3);
    transmit(&mut a, 1, std::slice::from_ref(&max));
    assert_eq!(receive(&mut b, 0, &bufs, 1)[0][HDR_LEN..], max[..]);
}

#[test]
fn tso_frames_are_segmented_for_a_driver_without_tso() {
    let switch = Switch::new(2, 1, SwitchConfig::default()).unwrap();
    let (mem_a, mem_b) = (memory(), memory());
    let mut a = MockDriver::new(&mem_a, 3);
    let mut b = MockDriver::new(&mem_b, 3);
    let bufs: Vec<_> = (0..8).map(|_| b.rx_buffer(0, 2048)).collect();
    let no_offloads = |f: u64| {
        f & !(bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN))
    };
    let _net_a = start(&switch, 0, config(MAC_A, 1), &a, |f| f, &[0, 1, 2]);
    let net_b = start(&switch, 1, config(MAC_B, 1), &b, no_offloads, &[0, 1, 2]);
    let mut f = tcp_frame(false, 4000, 0x18);
    f[..6].copy_from_slice(&MAC_B.0);
    let mut p = with_hdr(&f);
    // NEEDS_CSUM at the TCP checksum, TSO over IPv4 with an MSS of 1448.
    p[0] = 1;
    p[1] = 1;
    p[4..6].copy_from_slice(&1448u16.to_le_bytes());
    p[6..8].copy_from_slice(&34u16.to_le_bytes());
    p[8..10].copy_from_slice(&16u16.to_le_bytes());
    a.tx_packet(1, &p);
    a.kick(1);
    a.wait_used(1, 1);
    let got = receive(&mut b, 0, &bufs, 3);
    let mut payload = Vec::new();
    for g in &got {
        assert_eq!(g[..10], [0; 10], "no offload left for the driver");
        assert!(tcp_checksum_ok(&g[HDR_LEN..]));
        payload.extend_from_slice(&g[HDR_LEN + 54..]);
    }
    assert_eq!(payload, &f[54..]);
    assert_eq!(net_b.stats().rx_segmented, 1);
}

#[test]
fn pairs_beyond_vq_pairs_set_receive_nothing() {
    let switch = Switch::new(2, 4, SwitchConfig::default()).unwrap();
    let (mem_a, mem_b) = (memory(), memory());
    let mut a = MockDriver::new(&mem_a, 9);
    let mut b = MockDriver::new(&mem_b, 9);
    let mut bufs = Vec::new();
    for q in [0, 2, 4, 6] {
        bufs.push((0..64).map(|_| b.rx_buffer(q, 2048)).collect::<Vec<_>>());
    }
    let all: Vec<usize> = (0..9).collect();
    let _net_a = start(&switch, 0, config(MAC_A, 4), &a, |f| f, &all);
    let _net_b = start(&switch, 1, config(MAC_B, 4), &b, |f| f, &all);
    let udp = |port: u16| {
        let mut f = MAC_B.0.to_vec();
        f.extend(MAC_A.0);
        f.extend([
            0x08, 0x00, 0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ]);
        f.extend(port.to_be_bytes());
        f.extend([0, 53, 0, 8, 0, 0]);
        f
    };
    // The used entries of each receive queue until `n` arrived in all (and a little longer,
    // to catch any extra).
    let used_per_queue = |b: &mut MockDriver, n: usize| -> Vec<usize> {
        let mut counts = vec![0; 4];
        let deadline = Instant::now() + Duration::from_secs(10);
        while counts.iter().sum::<usize>() < n {
            assert!(Instant::now() < deadline, "{counts:?}: fewer than {n}");
            std::thread::sleep(Duration::from_millis(1));
            for (c, q) in counts.iter_mut().zip([0, 2, 4, 6]) {
                *c += b.used(q).len();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
        for (c, q) in counts.iter_mut().zip([0, 2, 4, 6]) {
            *c += b.used(q).len();
        }
        counts
    };
    // MQ negotiated: one pair until the driver sets more.
    transmit(&mut a, 1, &(0..32).map(udp).collect::<Vec<_>>());
    assert_eq!(used_per_queue(&mut b, 32), [32, 0, 0, 0]);
    assert_eq!(command(&mut b, 8, &[4, 0, 3, 0]), OK);
    transmit(&mut a, 1, &(100..164).map(udp).collect::<Vec<_>>());
    let counts = used_per_queue(&mut b, 64);
    assert_eq!(counts.iter().sum::<usize>(), 64);
    assert_eq!(counts[3], 0, "{counts:?}");
    assert!(counts[1] > 0 && counts[2] > 0, "{counts:?}");
}

#[test]
fn configuration_space_and_link_status() {
    let switch = Switch::new(1, 2, SwitchConfig::default()).unwrap();
    let net = Net::new(
        NetConfig {
            mtu: 9000,
            ..config(MAC_A, 2)
        },
        Box::new(switch.port(0)),
    )
    .unwrap();
    let mut c = [0u8; 24];
    net.read_config(0, &mut c);
    assert_eq!(&c[..6], &MAC_A.0);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
    net.control().set_link_up(false);
    net.read_config(6, &mut c[..2]);
    assert_eq!(&c[..2], &[0, 0]);
    let mut net = net;
    assert!(net.write_config(0, &[0; 6]).is_err());
    assert_eq!(net.queue_max_sizes().len(), 5);
    let f = net.device_features();
    assert_ne!(f & bit(VIRTIO_NET_F_MQ), 0);
    assert_ne!(
        f & bit(VIRTIO_NET_F_HOST_TSO4),
        0,
        "the switch carries offloads"
    );
}

#[test]
fn a_config_change_made_while_stopped_is_signalled_at_activation() {
    let switch = Switch::new(1, 1, SwitchConfig::default()).unwrap();
    let mem = memory();
    let d = MockDriver::new(&mem, 3);
    let mut net = start(&switch, 0, config(MAC_A, 1), &d, |f| f, &[0, 1, 2]);
    net.control().set_link_up(false);
    assert_eq!(d.interrupt.config.load(Ordering::SeqCst), 1);
    let queues = net.quiesce();
    net.control().set_link_up(true);
    assert_eq!(d.interrupt.config.load(Ordering::SeqCst), 1);
    let features = all_features(&net);
    net.activate(Activation {
        features,
        memory: GuestMemoryAtomic::new(mem.clone()),
        queues,
        interrupt: d.interrupt.clone(),
    })
    .unwrap();
    assert_eq!(d.interrupt.config.load(Ordering::SeqCst), 2);
    let e = net.activate(Activation {
        features,
        memory: GuestMemoryAtomic::new(mem.clone()),
        queues: Vec::new(),
        interrupt: d.interrupt.clone(),
    });
    assert!(matches!(e, Err(DeviceError::Activate { .. })), "{e:?}");
    let queues = net.quiesce();
    assert_eq!(
        queues.iter().map(|q| q.index()).collect::<Vec<_>>(),
        [0, 1, 2]
    );
}

#[test]
fn state_round_trips_and_refuses_other_devices() {
    let switch = Switch::new(3, 2, SwitchConfig::default()).unwrap();
    let mem = memory();
    let mut d = MockDriver::new(&mem, 5);
    let mut net = start(&switch, 0, config(MAC_A, 2), &d, |f| f, &[0, 1, 2, 3, 4]);
    assert_eq!(command(&mut d, 4, &[0, 0, 0]), OK);
    assert_eq!(command(&mut d, 4, &[2, 0, 42, 0]), OK);
    assert_eq!(command(&mut d, 4, &[4, 0, 2, 0]), OK);
    drop(net.quiesce());
    let saved = net.save_state().unwrap();
    let mut restored = Net::new(config(MAC_A, 2), Box::new(switch.port(1))).unwrap();
    restored.load_state(&saved).unwrap();
    assert_eq!(restored.state(), net.state());
    assert!(restored.state().vlans.contains(42));
    let mut other = Net::new(config(MAC_B, 2), Box::new(switch.port(2))).unwrap();
    let before = other.state();
    assert!(matches!(
        other.load_state(&saved),
        Err(DeviceError::State { .. })
    ));
    assert_eq!(other.state(), before, "a refused state changes nothing");
    assert!(matches!(
        other.load_state(&saved[..10]),
        Err(DeviceError::State { .. })
    ));
    net.reset().unwrap();
    assert!(net.state().mode.promisc, "reset restores the defaults");
    assert_eq!(net.state().pairs, 1);
}

#[test]
fn feature_sets_that_break_a_dependency_of_the_specification_are_refused() {
    let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, b| acc | bit(*b));
    let refused = |bits: &[u32]| crate::config::feature_dependency_violation(f(bits));
    assert_eq!(refused(&[]), None);
    assert_eq!(
        refused(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_ECN
        ]),
        None
    );
    assert_eq!(
        refused(&[VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_RX]),
        None
    );
    assert_eq!(
        refused(&[VIRTIO_NET_F_HOST_TSO6]).as_deref(),
        Some("HOST_TSO6 needs CSUM")
    );
    assert_eq!(
        refused(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN]).as_deref(),
        Some("HOST_ECN needs HOST_TSO4 or HOST_TSO6")
    );
    // Control-queue bits without the control queue are tolerated (QEMU keeps the queue and
    // still passes GUEST_ANNOUNCE on).
    assert_eq!(
        refused(&[VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MQ]),
        None
    );
    // The device's own check says the same.
    let switch = Switch::new(1, 2, SwitchConfig::default()).unwrap();
    let net = Net::new(config(MAC_A, 2), Box::new(switch.port(0))).unwrap();
    assert!(net.check_features(f(&[VIRTIO_NET_F_GUEST_TSO4])).is_err());
    assert!(net.check_features(all_features(&net)).is_ok());
}
