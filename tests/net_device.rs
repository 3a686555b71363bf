//! `vhost-user-net` end to end on its in-process switch: the real binary with two (or more)
//! ports, each driven over its socket by `outboard-frontend`'s virtio-net driver. No kernel
//! networking is involved, so these run anywhere.
//!
//! Covered: frames both ways with and without mergeable receive buffers (bytes compared), the
//! configuration space, every control command and its ack, receive filtering per mode and VLAN,
//! queue-pair changes while traffic flows, TSO across ports that negotiated different offloads,
//! and hostile input (malformed control commands, oversized and malformed frames) answered as
//! the spec says without the process going away.

mod common;
mod net_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use net_common::*;
use outboard_frontend::net::NET_FEATURES;
use outboard_frontend::{CtrlAck, NetHdr, NetOptions, RxMode, Segment};

const F_GUEST_CSUM: u32 = 1;
const F_GUEST_TSO4: u32 = 7;
const F_GUEST_TSO6: u32 = 8;
const F_GUEST_ECN: u32 = 9;
const F_MRG_RXBUF: u32 = 15;
const F_CTRL_RX_EXTRA: u32 = 20;

fn opts() -> NetOptions {
    NetOptions::default()
}

#[test]
fn frames_cross_the_switch_with_and_without_mergeable_buffers() {
    let mut sw = SwitchBackend::start("net-rxtx", 2, &[]);
    for mrg in [true, false] {
        let features = if mrg {
            NET_FEATURES
        } else {
            NET_FEATURES & !(1 << F_MRG_RXBUF)
        };
        // Small buffers with MRG_RXBUF, so that a full-size frame spans several.
        let rx_buffer_size = Some(if mrg { 512 } else { 2048 });
        let o = NetOptions {
            rx_buffer_size,
            ..opts()
        };
        let mut a = sw.connect_with(0, features, o);
        let mut b = sw.connect_with(1, features, o);
        assert_eq!(a.config().mac, MAC_A);
        assert_eq!(b.config().mac, MAC_B);
        let sizes = [60, 61, 512, 1000, 1514];
        for (i, &len) in sizes.iter().enumerate() {
            let f = frame(MAC_B, MAC_A, len, i as u8);
            a.send(0, &f).unwrap();
            let p = expect(&mut b, 0);
            assert_eq!(p.frame, f, "A to B, {len} bytes, mrg {mrg}");
            assert_eq!(p.hdr.flags, 0);
            let want = if mrg {
                (12 + len).div_ceil(512) as u16
            } else {
                1
            };
            assert_eq!((p.hdr.num_buffers, p.buffers), (want, want), "{len} bytes");
            let back = frame(MAC_A, MAC_B, len, 0x80 | i as u8);
            b.send(0, &back).unwrap();
            assert_eq!(expect(&mut a, 0).frame, back, "B to A, {len} bytes");
        }
        // A burst, in order and complete.
        let burst: Vec<Vec<u8>> = (0..100)
            .map(|i| frame(MAC_B, MAC_A, 60 + i * 7, i as u8))
            .collect();
        for f in &burst {
            a.tx(0).unwrap().add(NetHdr::default(), f).unwrap();
        }
        a.tx(0).unwrap().flush().unwrap();
        let got: Vec<Vec<u8>> = drain(&mut b, 0).into_iter().map(|p| p.frame).collect();
        assert_eq!(got, burst, "mrg {mrg}");
        drop(a);
        drop(b);
    }
    sw.backend.terminate();
}

#[test]
fn the_configuration_space_reports_mac_link_pairs_and_mtu() {
    let sw = SwitchBackend::start("net-config", 2, &["--mtu", "9000", "--queue-pairs", "2"]);
    let d = sw.connect(
        1,
        NetOptions {
            max_pairs: 2,
            pairs: 2,
            ..opts()
        },
    );
    let c = d.config();
    assert_eq!(c.mac, MAC_B);
    assert_eq!(c.status, 1, "link up");
    assert_eq!(c.max_virtqueue_pairs, 2);
    assert_eq!(c.mtu, 9000);
}

#[test]
fn every_control_command_is_acknowledged() {
    let mut sw = SwitchBackend::start("net-ctrl", 2, &["--queue-pairs", "4"]);
    let mut d = sw.connect(
        0,
        NetOptions {
            max_pairs: 4,
            pairs: 4,
            ..opts()
        },
    );
    let c = d.ctrl().unwrap();
    for mode in [
        RxMode::Promisc,
        RxMode::AllMulti,
        RxMode::AllUni,
        RxMode::NoMulti,
        RxMode::NoUni,
        RxMode::NoBcast,
    ] {
        assert_eq!(
            c.set_rx_mode(mode, true).unwrap(),
            CtrlAck::Ok,
            "{mode:?} on"
        );
        assert_eq!(
            c.set_rx_mode(mode, false).unwrap(),
            CtrlAck::Ok,
            "{mode:?} off"
        );
    }
    let mcast = [1, 0, 0x5e, 0, 0, 1];
    assert_eq!(c.set_mac_table(&[OTHER], &[mcast]).unwrap(), CtrlAck::Ok);
    assert_eq!(c.set_mac_table(&[], &[]).unwrap(), CtrlAck::Ok);
    assert_eq!(
        c.set_mac_table(&[OTHER; 70], &[mcast; 70]).unwrap(),
        CtrlAck::Ok,
        "overflow"
    );
    assert_eq!(c.set_mac([0x52, 0x54, 0, 0, 0, 0x99]).unwrap(), CtrlAck::Ok);
    assert_eq!(c.vlan(100, true).unwrap(), CtrlAck::Ok);
    assert_eq!(c.vlan(100, false).unwrap(), CtrlAck::Ok);
    assert_eq!(c.vlan(4095, true).unwrap(), CtrlAck::Ok);
    assert_eq!(c.announce_ack().unwrap(), CtrlAck::Ok);
    for pairs in [1, 4, 2] {
        assert_eq!(
            c.set_queue_pairs(pairs).unwrap(),
            CtrlAck::Ok,
            "{pairs} pairs"
        );
    }
    // Out of range, malformed, unknown: ERR.
    assert_eq!(c.set_queue_pairs(0).unwrap(), CtrlAck::Err);
    assert_eq!(c.set_queue_pairs(5).unwrap(), CtrlAck::Err);
    assert_eq!(c.vlan(4096, true).unwrap(), CtrlAck::Err);
    assert_eq!(
        c.set_mac([1, 0, 0, 0, 0, 1]).unwrap(),
        CtrlAck::Err,
        "multicast MAC"
    );
    assert_eq!(c.command(0, 0, &[2]).unwrap(), CtrlAck::Err, "on = 2");
    assert_eq!(c.command(0, 0, &[1, 1]).unwrap(), CtrlAck::Err, "two bytes");
    assert_eq!(
        c.command(0, 6, &[1]).unwrap(),
        CtrlAck::Err,
        "unknown RX command"
    );
    assert_eq!(
        c.command(1, 0, &[1, 0, 0, 0]).unwrap(),
        CtrlAck::Err,
        "short MAC table"
    );
    assert_eq!(
        c.command(1, 0, &[0xff; 8]).unwrap(),
        CtrlAck::Err,
        "huge MAC count"
    );
    assert_eq!(
        c.command(3, 0, &[0]).unwrap(),
        CtrlAck::Err,
        "ANNOUNCE_ACK with data"
    );
    assert_eq!(
        c.command(4, 1, &[0; 8]).unwrap(),
        CtrlAck::Err,
        "RSS is not offered"
    );
    assert_eq!(
        c.command(5, 0, &[0; 8]).unwrap(),
        CtrlAck::Err,
        "guest offloads are not offered"
    );
    assert_eq!(
        c.command(0xff, 0, &[]).unwrap(),
        CtrlAck::Err,
        "unknown class"
    );
    assert_eq!(
        c.set_rx_mode(RxMode::Promisc, true).unwrap(),
        CtrlAck::Ok,
        "still serving"
    );
    drop(d);
    // A command whose feature was not negotiated is refused.
    let mut d = sw.connect_with(
        1,
        NET_FEATURES & !(1 << F_CTRL_RX_EXTRA),
        NetOptions {
            max_pairs: 4,
            pairs: 4,
            ..opts()
        },
    );
    let c = d.ctrl().unwrap();
    assert_eq!(c.set_rx_mode(RxMode::NoMulti, true).unwrap(), CtrlAck::Err);
    assert_eq!(c.set_rx_mode(RxMode::AllMulti, true).unwrap(), CtrlAck::Ok);
    sw.backend.assert_alive();
}

/// Sends `frames` from `a` and then a marker that always reaches B; returns what B received
/// before the marker.
fn probe(
    a: &mut outboard_frontend::NetDriver,
    b: &mut outboard_frontend::NetDriver,
    frames: &[impl AsRef<[u8]>],
) -> Vec<Vec<u8>> {
    let marker = frame(MAC_B, MAC_A, 99, 0xee);
    for f in frames {
        a.send(0, f.as_ref()).unwrap();
    }
    a.send(0, &marker).unwrap();
    let mut got = Vec::new();
    loop {
        let p = expect(b, 0);
        if p.frame == marker {
            return got;
        }
        got.push(p.frame);
    }
}

#[test]
fn receive_filtering_follows_the_rx_mode_the_mac_table_and_the_vlan_table() {
    let mut sw = SwitchBackend::start("net-filter", 2, &[]);
    let mut a = sw.connect(0, opts());
    let mut b = sw.connect(1, opts());
    let mcast = [1, 0, 0x5e, 0, 0, 9];
    let other = frame(OTHER, MAC_A, 60, 1);
    let bcast = frame([0xff; 6], MAC_A, 60, 2);
    let multi = frame(mcast, MAC_A, 60, 3);
    let mine = frame(MAC_B, MAC_A, 60, 4);
    let mut tagged = MAC_B.to_vec();
    tagged.extend(MAC_A);
    tagged.extend([0x81, 0x00, 0x00, 0x2a, 0x88, 0xb5]);
    tagged.resize(64, 0x5a);
    // After reset the device is promiscuous.
    let all = [
        other.clone(),
        bcast.clone(),
        multi.clone(),
        mine.clone(),
        tagged.clone(),
    ];
    assert_eq!(probe(&mut a, &mut b, &all), all);
    let c = b.ctrl().unwrap();
    assert_eq!(c.set_rx_mode(RxMode::Promisc, false).unwrap(), CtrlAck::Ok);
    // Unicast to another MAC is dropped; broadcast and our own pass; multicast needs a mode or
    // the table; a tagged frame needs its VLAN.
    assert_eq!(
        probe(&mut a, &mut b, &all),
        vec![bcast.clone(), mine.clone()]
    );
    assert_eq!(b.ctrl().unwrap().vlan(42, true).unwrap(), CtrlAck::Ok);
    assert_eq!(probe(&mut a, &mut b, &[&tagged]), vec![tagged.clone()]);
    assert_eq!(
        b.ctrl()
            .unwrap()
            .set_rx_mode(RxMode::AllMulti, true)
            .unwrap(),
        CtrlAck::Ok
    );
    assert_eq!(probe(&mut a, &mut b, &[&multi]), vec![multi.clone()]);
    assert_eq!(
        b.ctrl()
            .unwrap()
            .set_rx_mode(RxMode::AllMulti, false)
            .unwrap(),
        CtrlAck::Ok
    );
    assert!(probe(&mut a, &mut b, &[&multi]).is_empty());
    assert_eq!(
        b.ctrl().unwrap().set_mac_table(&[OTHER], &[mcast]).unwrap(),
        CtrlAck::Ok
    );
    assert_eq!(
        probe(&mut a, &mut b, &[&other, &multi]),
        vec![other.clone(), multi.clone()]
    );
    assert_eq!(
        b.ctrl()
            .unwrap()
            .set_rx_mode(RxMode::NoMulti, true)
            .unwrap(),
        CtrlAck::Ok
    );
    assert_eq!(
        probe(&mut a, &mut b, &[&multi, &bcast]),
        vec![bcast.clone()]
    );
    assert_eq!(
        b.ctrl()
            .unwrap()
            .set_rx_mode(RxMode::NoBcast, true)
            .unwrap(),
        CtrlAck::Ok
    );
    assert!(probe(&mut a, &mut b, &[&bcast]).is_empty());
    assert_eq!(
        b.ctrl().unwrap().set_rx_mode(RxMode::NoUni, true).unwrap(),
        CtrlAck::Ok
    );
    // The marker itself is unicast: with NOUNI nothing arrives at all.
    a.send(0, &mine).unwrap();
    assert!(drain(&mut b, 0).is_empty(), "NOUNI drops our own unicast");
    assert_eq!(
        b.ctrl().unwrap().set_rx_mode(RxMode::NoUni, false).unwrap(),
        CtrlAck::Ok
    );
    assert_eq!(
        b.ctrl().unwrap().set_mac_table(&[], &[]).unwrap(),
        CtrlAck::Ok
    );
    assert!(probe(&mut a, &mut b, &[&other]).is_empty());
    assert_eq!(
        b.ctrl().unwrap().set_rx_mode(RxMode::AllUni, true).unwrap(),
        CtrlAck::Ok
    );
    assert_eq!(probe(&mut a, &mut b, &[&other]), vec![other.clone()]);
    // MAC_ADDR_SET moves our own address.
    assert_eq!(
        b.ctrl()
            .unwrap()
            .set_rx_mode(RxMode::AllUni, false)
            .unwrap(),
        CtrlAck::Ok
    );
    assert_eq!(b.ctrl().unwrap().set_mac(OTHER).unwrap(), CtrlAck::Ok);
    let to_new = frame(OTHER, MAC_A, 70, 5);
    a.send(0, &to_new).unwrap();
    assert_eq!(expect(&mut b, 0).frame, to_new);
    a.send(0, &mine).unwrap();
    assert!(
        drain(&mut b, 0).is_empty(),
        "the old address no longer passes"
    );
    sw.backend.assert_alive();
}

#[test]
fn queue_pairs_change_while_traffic_flows() {
    let mut sw = SwitchBackend::start("net-mq", 2, &["--queue-pairs", "4"]);
    let four = NetOptions {
        max_pairs: 4,
        pairs: 4,
        ..opts()
    };
    let mut a = sw.connect(0, four);
    let mut b = sw.connect(
        1,
        NetOptions {
            set_pairs: false,
            ..four
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..32 {
                    let port = (n % 4096) as u16;
                    let f = udp(
                        MAC_B,
                        MAC_A,
                        [10, 0, 0, 1],
                        [10, 0, 0, 2],
                        (port, 53),
                        &n.to_be_bytes(),
                    );
                    a.tx(0).unwrap().add(NetHdr::default(), &f).unwrap();
                    n += 1;
                }
                a.tx(0).unwrap().flush().unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            (a, n)
        })
    };
    let count = |b: &mut outboard_frontend::NetDriver, pair: u16| -> usize {
        let mut n = 0;
        while b.rx(pair).unwrap().try_recv().unwrap().is_some() {
            n += 1;
        }
        n
    };
    for pairs in [1u16, 4, 2, 3, 1, 4] {
        assert_eq!(
            b.ctrl().unwrap().set_queue_pairs(pairs).unwrap(),
            CtrlAck::Ok
        );
        // Whatever was placed before the ack is visible now: take it.
        for p in 0..4 {
            count(&mut b, p);
        }
        let mut received = [0usize; 4];
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(10));
            for p in 0..4 {
                received[p as usize] += count(&mut b, p);
            }
        }
        for p in pairs..4 {
            assert_eq!(
                received[usize::from(p)],
                0,
                "pair {p} received with {pairs} pairs active: {received:?}"
            );
        }
        assert!(
            received.iter().sum::<usize>() > 0,
            "{pairs} pairs: nothing received"
        );
        if pairs > 1 {
            let used = received[..usize::from(pairs)]
                .iter()
                .filter(|&&n| n > 0)
                .count();
            assert!(used > 1, "{pairs} pairs, but flows used only {received:?}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (_a, sent) = sender.join().unwrap();
    assert!(sent > 0);
    sw.backend.assert_alive();
    sw.backend.terminate();
}

#[test]
fn tso_frames_reach_ports_with_and_without_tso() {
    let sw = SwitchBackend::start("net-tso", 3, &[]);
    let no_offloads = NET_FEATURES
        & !(1 << F_GUEST_CSUM | 1 << F_GUEST_TSO4 | 1 << F_GUEST_TSO6 | 1 << F_GUEST_ECN);
    let mut a = sw.connect(0, opts());
    let mut b = sw.connect_with(1, no_offloads, opts());
    let big = NetOptions {
        rx_buffer_size: Some(2048),
        ..opts()
    };
    let mut c = sw.connect(2, big);
    let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    // Broadcast destination, so both B and C get it.
    let f = tcp4_partial([0xff; 6], MAC_A, &payload);
    let hdr = NetHdr {
        flags: 1,
        gso_type: 1,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    a.tx(0).unwrap().send(hdr, &f).unwrap();
    a.tx(0).unwrap().flush().unwrap();
    // B has neither checksum nor TSO offload: complete segments.
    let segs = drain(&mut b, 0);
    assert_eq!(segs.len(), 4, "5000 bytes in 1448-byte segments");
    let mut joined = Vec::new();
    for s in &segs {
        assert_eq!((s.hdr.flags, s.hdr.gso_type), (0, 0));
        assert!(tcp4_checksum_ok(&s.frame));
        assert!(s.frame.len() <= 14 + 20 + 20 + 1448);
        joined.extend_from_slice(&s.frame[54..]);
    }
    assert_eq!(joined, payload);
    // C negotiated TSO (and mergeable buffers): the frame arrives whole with its offload.
    let whole = expect(&mut c, 0);
    assert_eq!(whole.frame, f);
    assert_eq!(
        (whole.hdr.flags, whole.hdr.gso_type, whole.hdr.gso_size),
        (1, 1, 1448)
    );
    assert_eq!((whole.hdr.csum_start, whole.hdr.csum_offset), (34, 16));
    assert!(whole.buffers > 1);
}

#[test]
fn malformed_control_commands_are_answered_without_harm() {
    let mut sw = SwitchBackend::start("net-hostile-ctrl", 2, &[]);
    let mut d = sw.connect(0, opts());
    let buf = d.session().ram_mut().alloc(64, 64).unwrap();
    buf.write_at(0, &[0, 0, 1]);
    buf.fill(8, 1, 0xff);
    let cmd = Segment::readable_part(&buf, 0, 3);
    let ack = Segment::writable_part(&buf, 8, 1);
    let c = d.ctrl().unwrap();
    // No room for the ack: returned with nothing written.
    assert_eq!(c.raw(&[cmd]).unwrap().len, 0);
    // The ack only, no command: ERR.
    assert_eq!(c.raw(&[ack]).unwrap().len, 1);
    assert_eq!(buf.read_u8(8), 1);
    // Class and command split over descriptors: framing is free, the command is fine.
    buf.fill(8, 1, 0xff);
    let split = [
        Segment::readable_part(&buf, 0, 1),
        Segment::readable_part(&buf, 1, 1),
        Segment::readable_part(&buf, 2, 1),
        ack,
    ];
    assert_eq!(c.raw(&split).unwrap().len, 1);
    assert_eq!(buf.read_u8(8), 0);
    // A readable descriptor after the ack: refused whole.
    assert_eq!(c.raw(&[ack, cmd]).unwrap().len, 0);
    // A buffer outside guest memory.
    let outside = Segment {
        gpa: 1 << 40,
        len: 4,
        writable: false,
    };
    assert_eq!(c.raw(&[outside, ack]).unwrap().len, 0);
    // A command longer than the device reads.
    let long = d.session().ram_mut().alloc(20_000, 64).unwrap();
    long.write_at(0, &[1, 0]);
    let c = d.ctrl().unwrap();
    buf.fill(8, 1, 0xff);
    assert_eq!(c.raw(&[Segment::readable(&long), ack]).unwrap().len, 1);
    assert_eq!(buf.read_u8(8), 1, "ERR");
    sw.backend.assert_alive();
    assert_eq!(c.set_rx_mode(RxMode::Promisc, true).unwrap(), CtrlAck::Ok);
    // Malformed chains on the control queue made no one reset the device.
    assert_eq!(
        d.session().get_status().unwrap() & 0x40,
        0,
        "no DEVICE_NEEDS_RESET"
    );
}

#[test]
fn oversized_and_malformed_frames_are_dropped_and_counted() {
    let mut sw = SwitchBackend::start("net-hostile-tx", 2, &["--mtu", "1500"]);
    let mut a = sw.connect(0, opts());
    let mut b = sw.connect(1, opts());
    let tx = a.tx(0).unwrap();
    // MTU + Ethernet + VLAN + 1 byte.
    tx.send(NetHdr::default(), &frame(MAC_B, MAC_A, 1519, 1))
        .unwrap();
    // A runt.
    tx.send(NetHdr::default(), &[0u8; 10]).unwrap();
    // UDP fragmentation offload, which is not offered.
    let ufo = NetHdr {
        gso_type: 3,
        gso_size: 1000,
        ..NetHdr::default()
    };
    tx.send(ufo, &frame(MAC_B, MAC_A, 3000, 2)).unwrap();
    // A checksum offset beyond the frame.
    let csum = NetHdr {
        flags: 1,
        csum_start: 50,
        csum_offset: 20,
        ..NetHdr::default()
    };
    tx.send(csum, &frame(MAC_B, MAC_A, 60, 3)).unwrap();
    a.tx(0).unwrap().flush().unwrap();
    // A frame of more than 64 KiB, in a chain of its own.
    let huge = a.session().ram_mut().alloc(70_000, 64).unwrap();
    let dq = a.tx(0).unwrap().driver_queue_mut();
    dq.submit(&[Segment::readable(&huge)]).unwrap();
    let mut used = Vec::new();
    dq.wait_used(Duration::from_secs(10), &mut used).unwrap();
    assert_eq!(used.len(), 1);
    assert!(drain(&mut b, 0).is_empty(), "nothing was forwarded");
    // The largest valid frame passes.
    let max = frame(MAC_B, MAC_A, 1518, 4);
    a.send(0, &max).unwrap();
    assert_eq!(expect(&mut b, 0).frame, max);
    sw.backend.assert_alive();
    drop(a);
    drop(b);
    sw.backend.terminate();
    let log = sw.backend.log_text();
    assert!(
        log.contains("tx_oversize=2") && log.contains("tx_malformed=3"),
        "the counters are logged when the session ends:\n{log}"
    );
}

/// CPU time of process `pid` in clock ticks (user + system).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which ends with ')'): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_port_without_receive_buffers_waits_without_spinning_and_loses_nothing() {
    let sw = SwitchBackend::start("net-starved", 2, &[]);
    let mut a = sw.connect(0, opts());
    let mut b = sw.connect(
        1,
        NetOptions {
            rx_buffers: 4,
            ..opts()
        },
    );
    let frames: Vec<Vec<u8>> = (0..100)
        .map(|i| frame(MAC_B, MAC_A, 200, i as u8))
        .collect();
    for f in &frames {
        a.tx(0).unwrap().add(NetHdr::default(), f).unwrap();
    }
    a.tx(0).unwrap().flush().unwrap();
    // B's four buffers fill at once; the rest waits in the device and the switch.
    std::thread::sleep(Duration::from_millis(100));
    let pid = sw.backend.child.id();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(500));
    let spent = cpu_ticks(pid) - before;
    assert!(
        spent <= 10,
        "the backend used {spent} ticks while the port had no buffers"
    );
    // Each packet read gives a buffer back; every frame arrives, in order.
    let got: Vec<Vec<u8>> = drain(&mut b, 0).into_iter().map(|p| p.frame).collect();
    assert_eq!(got, frames);
}

/// A feature set that breaks an offload dependency of the specification (5.1.3.1) is refused:
/// FEATURES_OK does not stick, as the VIRTIO specification has a device refuse features. The
/// port serves the next driver with a valid set. Control-queue bits without the control queue
/// are taken (a vhost-user frontend may keep the control queue itself).
#[test]
fn a_feature_without_the_feature_it_depends_on_is_refused() {
    use outboard_frontend::device::SessionError;
    use outboard_frontend::SessionBuilder;

    const F_CSUM: u32 = 0;
    const F_HOST_TSO4: u32 = 11;
    const F_GUEST_ANNOUNCE: u32 = 21;
    let sw = SwitchBackend::start("net-feature-deps", 1, &[]);
    let version_1 = 1u64 << 32;
    for (features, what) in [
        (1u64 << F_GUEST_TSO4, "GUEST_TSO4 without GUEST_CSUM"),
        (1u64 << F_HOST_TSO4, "HOST_TSO4 without CSUM"),
        (
            (1u64 << F_GUEST_ECN) | (1u64 << F_GUEST_CSUM),
            "GUEST_ECN without GUEST_TSO4 or GUEST_TSO6",
        ),
    ] {
        let r = SessionBuilder::new(&sw.sockets[0])
            .features(features | version_1)
            .handshake();
        assert!(
            matches!(r, Err(SessionError::FeaturesRejected { .. })),
            "{what}: {:?}",
            r.err()
        );
    }
    // The same features with what they need are taken, so are control-queue bits alone.
    for ok in [
        (1u64 << F_HOST_TSO4) | (1u64 << F_CSUM),
        (1u64 << F_GUEST_TSO4) | (1u64 << F_GUEST_CSUM),
        1u64 << F_GUEST_ANNOUNCE,
    ] {
        let r = SessionBuilder::new(&sw.sockets[0])
            .features(ok | version_1)
            .handshake();
        assert!(r.is_ok(), "{ok:#x}: {:?}", r.err());
    }
    let d = sw.connect(0, opts());
    assert_eq!(d.config().max_virtqueue_pairs, 1);
}
