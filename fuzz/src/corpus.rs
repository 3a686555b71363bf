//! Seed inputs: a few valid inputs per target, built from the same encoders the targets decode
//! with, so that they stay valid when a format changes. `examples/gen_corpus.rs` writes them to
//! `corpus/<target>/`.

use std::sync::Arc;

use outboard_blk::{Blk, BlkConfig};
use outboard_net::backend::switch::{Switch, SwitchConfig};
use outboard_net::{Net, NetConfig, DEFAULT_MAC};
use outboard_vhost_user::supported_protocol_features;
use outboard_virtio::{Framework, VirtioDevice};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserConfigFlags, VhostUserLog, VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_net::*;
use vm_memory::ByteValued;

use crate::guest::{self, CountingInterrupt, DATA_START};
use crate::input::Output;
use crate::session::{FdKind, Op, Setup};

/// One seed: a file name and its bytes.
pub type Seed = (String, Vec<u8>);

const W: u16 = 2; // VRING_DESC_F_WRITE
const INDIRECT: u16 = 4; // VRING_DESC_F_INDIRECT

/// Request chains for virtio-blk, with the memory they need: `(patches, chains)`, where a chain
/// is a list of `(addr, len, flags)` descriptors. Everything lives in the data area.
struct BlkRequests {
    /// `(guest address, bytes)` to write.
    memory: Vec<(u64, Vec<u8>)>,
    chains: Vec<Vec<(u64, u32, u16)>>,
}

fn blk_header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut h = request_type.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn blk_range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut r = sector.to_le_bytes().to_vec();
    r.extend_from_slice(&sectors.to_le_bytes());
    r.extend_from_slice(&flags.to_le_bytes());
    r
}

/// One request of every kind, and an indirect one.
fn blk_requests() -> BlkRequests {
    let d = DATA_START;
    let status = d + 0x7f0;
    let mut memory = vec![
        (d, blk_header(VIRTIO_BLK_T_OUT, 8)),
        (d + 0x10, blk_header(VIRTIO_BLK_T_IN, 0)),
        (d + 0x20, blk_header(VIRTIO_BLK_T_FLUSH, 0)),
        (d + 0x30, blk_header(VIRTIO_BLK_T_GET_ID, 0)),
        (d + 0x40, blk_header(VIRTIO_BLK_T_DISCARD, 0)),
        (d + 0x50, blk_range(16, 8, 0)),
        (d + 0x60, blk_header(VIRTIO_BLK_T_WRITE_ZEROES, 0)),
        (
            d + 0x70,
            blk_range(32, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
        ),
        (d + 0x80, blk_header(VIRTIO_BLK_T_IN, 4)),
        (d + 0x400, vec![0xab; 512]),
    ];
    // An indirect table at d + 0x100: a read of one sector.
    let mut table = Vec::new();
    table.extend_from_slice(&guest::descriptor(d + 0x80, 16, 1, 1));
    table.extend_from_slice(&guest::descriptor(d + 0x600, 512, W | 1, 2));
    table.extend_from_slice(&guest::descriptor(status + 6, 1, W, 0));
    memory.push((d + 0x100, table));
    let chains = vec![
        vec![(d, 16, 0), (d + 0x400, 512, 0), (status, 1, W)],
        vec![
            (d + 0x10, 8, 0),
            (d + 0x18, 8, 0),
            (d + 0x600, 512, W),
            (d + 0x800, 512, W),
            (status + 1, 1, W),
        ],
        vec![(d + 0x20, 16, 0), (status + 2, 1, W)],
        vec![(d + 0x30, 16, 0), (d + 0x200, 21, W)],
        vec![(d + 0x40, 32, 0), (status + 3, 1, W)],
        vec![(d + 0x60, 16, 0), (d + 0x70, 16, 0), (status + 4, 1, W)],
        vec![(d + 0x100, 48, INDIRECT)],
        // A read into the high region, across nothing, and one into the hole.
        vec![(d + 0x80, 16, 0), (0x1_1000, 512, W), (status + 5, 1, W)],
        vec![(d + 0x80, 16, 0), (0x1_0000, 512, W), (status + 7, 1, W)],
    ];
    BlkRequests { memory, chains }
}

fn write_blk_requests(out: &mut Output, queue: u16, size: u16, requests: &BlkRequests) {
    for (addr, bytes) in &requests.memory {
        guest::write_patch(out, *addr as u16, bytes);
    }
    let chains: Vec<&[(u64, u32, u16)]> = requests.chains.iter().map(Vec::as_slice).collect();
    guest::write_chains(out, queue, size, &chains);
}

/// Seeds of `blk_chain`: limits, queue setup, memory patches.
pub fn blk_chain() -> Vec<Seed> {
    let requests = blk_requests();
    let mut seeds = Vec::new();
    for (name, read_only, event_idx) in [
        ("all-kinds", false, false),
        ("all-kinds-ro", true, false),
        ("all-kinds-event-idx", false, true),
    ] {
        let mut out = Output::new();
        out.u64(2048) // capacity
            .u8(u8::from(read_only))
            .u16(8) // seg_max
            .u32(1 << 20) // size_max
            .u8(1 | 4 << 1)
            .u32(64) // discard
            .u8(1 | 4 << 1)
            .u32(64) // write zeroes
            .u8(4) // size 16
            .u8(u8::from(event_idx))
            .u16(0);
        write_blk_requests(&mut out, 0, 16, &requests);
        seeds.push((name.to_string(), out.finish()));
    }
    seeds
}

/// Seeds of `blk_device`.
pub fn blk_device() -> Vec<Seed> {
    let requests = blk_requests();
    let mut seeds = Vec::new();
    // (name, storage byte, flags)
    for (name, storage, flags) in [
        ("null", 0u8, 0u8),
        ("null-two-queues-one-thread", 0, 4 | 8),
        ("null-read-only-compat1", 0, 2 | 128),
        ("sync-file", 2, 1 | 32),
        ("uring-file-polling", 2, 16),
    ] {
        let mut out = Output::new();
        out.u8(storage);
        if storage < 2 {
            out.u16(255); // 1 MiB
        }
        out.u8(flags)
            .u8(4) // queue_size 16
            .u8(0) // block size 512
            .u16(253) // seg_max 254
            .u32(1 << 20) // size_max
            .u8(1)
            .u32(64)
            .u8(8) // discard
            .u8(1)
            .u32(64)
            .u8(8) // write zeroes
            .u64(u64::MAX); // every feature offered
        let queues = if flags & 4 != 0 { 2 } else { 1 };
        for _ in 0..queues {
            out.u8(4).u16(0); // size 16, next_avail 0
        }
        // Patches: every request on queue 0 in the first round.
        let mut patches = Output::new();
        write_blk_requests(&mut patches, 0, 16, &requests);
        let patches = patches.finish();
        let count = count_patches(&patches);
        out.u8(count as u8).bytes(&patches);
        seeds.push((name.to_string(), out.finish()));
    }
    seeds
}

/// The number of patches in an encoded patch list.
fn count_patches(mut b: &[u8]) -> usize {
    let mut n = 0;
    while b.len() >= 3 {
        let len = usize::from(b[2]);
        b = &b[(3 + len).min(b.len())..];
        n += 1;
    }
    n
}

/// An Ethernet frame carrying TCP over IPv4 or IPv6 with `payload` bytes, optionally VLAN
/// tagged, to `dst`.
fn tcp_frame(dst: [u8; 6], v6: bool, vlan: bool, payload: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    if vlan {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    }
    let tcp_len = 20 + payload;
    if v6 {
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]);
        f.extend_from_slice(&[0xfd; 16]);
        f.extend_from_slice(&[0xfe; 16]);
    } else {
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    }
    f.extend_from_slice(&[0x30, 0x39, 0x00, 0x50]); // ports
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
    f.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]); // doff 5, PSH|ACK
    f.extend((0..payload).map(|i| i as u8));
    f
}

/// A virtio-net header: flags, gso type, hdr_len, gso_size, csum_start, csum_offset.
fn net_hdr(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, offset: u16) -> Vec<u8> {
    let mut h = vec![flags, gso];
    for v in [hdr_len, gso_size, start, offset, 0] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h
}

/// Packets with headers: plain, partial checksum, TSO over IPv4 and IPv6, with VLAN and ECN.
fn net_packets() -> Vec<(&'static str, Vec<u8>)> {
    let own = DEFAULT_MAC.0;
    let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let mut out = Vec::new();
    let mut packet = |name, hdr: Vec<u8>, frame: Vec<u8>| {
        let mut p = hdr;
        p.extend_from_slice(&frame);
        out.push((name, p));
    };
    packet(
        "plain",
        net_hdr(0, 0, 0, 0, 0, 0),
        tcp_frame(own, false, false, 32),
    );
    packet(
        "csum4",
        net_hdr(csum, 0, 0, 0, 34, 16),
        tcp_frame(own, false, false, 100),
    );
    let tso4 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    let tso6 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
    let ecn = VIRTIO_NET_HDR_GSO_ECN as u8;
    packet(
        "tso4",
        net_hdr(csum, tso4, 54, 100, 34, 16),
        tcp_frame(own, false, false, 350),
    );
    packet(
        "tso6-vlan",
        net_hdr(csum, tso6, 78, 200, 58, 16),
        tcp_frame(own, true, true, 500),
    );
    packet(
        "tso4-ecn",
        net_hdr(csum, tso4 | ecn, 54, 64, 34, 16),
        tcp_frame(own, false, false, 130),
    );
    packet(
        "broadcast",
        net_hdr(0, 0, 0, 0, 0, 0),
        tcp_frame([0xff; 6], false, false, 8),
    );
    out
}

/// Seeds of `net_parse`.
pub fn net_parse() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (name, packet) in net_packets() {
        for (dir, flags) in [("tx", 0x0fu8), ("rx", 0x1f), ("none", 0x10)] {
            let mut out = Output::new();
            out.u8(0)
                .bytes(&packet[..12])
                .u8(flags)
                .bytes(&packet[12..]);
            seeds.push((format!("hdr-{name}-{dir}"), out.finish()));
        }
    }
    for (name, command) in ctrl_commands() {
        let mut out = Output::new();
        out.u8(1).u64(u64::MAX).u8(4).bytes(&command);
        seeds.push((format!("ctrl-{name}"), out.finish()));
    }
    for (name, mode, frame) in [
        (
            "own-unicast",
            0u8,
            tcp_frame(DEFAULT_MAC.0, false, false, 4),
        ),
        (
            "vlan-filtered",
            0,
            tcp_frame([2, 0, 0, 0, 0, 1], false, true, 4),
        ),
        (
            "multicast-allmulti",
            2,
            tcp_frame([1, 0, 0x5e, 0, 0, 1], false, false, 4),
        ),
        (
            "broadcast-nobcast",
            32,
            tcp_frame([0xff; 6], false, false, 4),
        ),
    ] {
        let mut out = Output::new();
        out.u8(2).bytes(&DEFAULT_MAC.0).u8(mode).u8(0x11);
        out.bytes(&[2, 0, 0, 0, 0, 1]).bytes(&[1, 0, 0x5e, 0, 0, 2]);
        out.u8(4 | 1 << 4).u16(5).bytes(&frame);
        seeds.push((format!("filter-{name}"), out.finish()));
    }
    seeds
}

/// Control commands (class, command, data), every one the device knows.
fn ctrl_commands() -> Vec<(&'static str, Vec<u8>)> {
    let c = |class: u32, command: u32, data: &[u8]| {
        let mut v = vec![class as u8, command as u8];
        v.extend_from_slice(data);
        v
    };
    let mut table = 1u32.to_le_bytes().to_vec();
    table.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
    table.extend_from_slice(&2u32.to_le_bytes());
    table.extend_from_slice(&[1, 0, 0x5e, 0, 0, 1, 1, 0, 0x5e, 0, 0, 2]);
    vec![
        (
            "rx-promisc-off",
            c(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        ),
        (
            "rx-nobcast-on",
            c(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, &[1]),
        ),
        (
            "mac-table",
            c(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, &table),
        ),
        (
            "mac-addr",
            c(
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_ADDR_SET,
                &[2, 0, 0, 0, 0, 7],
            ),
        ),
        (
            "vlan-add",
            c(VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, &[5, 0]),
        ),
        (
            "vlan-del",
            c(VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_DEL, &[5, 0]),
        ),
        (
            "announce-ack",
            c(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, &[]),
        ),
        (
            "mq-pairs",
            c(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, &[2, 0]),
        ),
    ]
}

/// Seeds of `net_device`: transmitted packets, control commands, receive buffers and injected
/// packets, on one or two queue pairs.
pub fn net_device() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (name, flags, features) in [
        ("one-pair-offloads", 2u8, u64::MAX),
        (
            "two-pairs-no-offloads",
            3,
            !(1u64 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_CSUM),
        ),
        ("no-mergeable-buffers", 2, !(1u64 << VIRTIO_NET_F_MRG_RXBUF)),
    ] {
        let pairs: u16 = 1 + u16::from(flags & 1);
        let queues = pairs * 2 + 1;
        let mut out = Output::new();
        out.u8(flags).u8(4).u16(1500).u64(features);
        out.u8(0xff); // every queue started
        for _ in 0..queues {
            out.u8(4).u16(0); // size 16
        }
        let mut patches = Output::new();
        let d = DATA_START;
        // rx0: four buffers of 2 KiB.
        let rx: Vec<Vec<(u64, u32, u16)>> = (0..4)
            .map(|i| vec![(d + 0x2000 + i * 0x800, 0x800, W)])
            .collect();
        let rx: Vec<&[(u64, u32, u16)]> = rx.iter().map(Vec::as_slice).collect();
        guest::write_chains(&mut patches, 0, 16, &rx);
        // tx0: every packet, header and frame in one descriptor or split.
        let mut tx = Vec::new();
        let mut at = d;
        for (_, packet) in net_packets() {
            guest::write_patch(&mut patches, at as u16, &packet);
            tx.push(vec![(at, 12, 0), (at + 12, packet.len() as u32 - 12, 0)]);
            at += (packet.len() as u64 + 15) & !15;
        }
        let tx: Vec<&[(u64, u32, u16)]> = tx.iter().map(Vec::as_slice).collect();
        guest::write_chains(&mut patches, 1, 16, &tx);
        // ctrl: every command, each with its ack byte.
        let mut ctrl = Vec::new();
        let ack = d + 0x1f00;
        for (i, (_, command)) in ctrl_commands().into_iter().enumerate() {
            guest::write_patch(&mut patches, at as u16, &command);
            ctrl.push(vec![(at, command.len() as u32, 0), (ack + i as u64, 1, W)]);
            at += (command.len() as u64 + 15) & !15;
        }
        let ctrl: Vec<&[(u64, u32, u16)]> = ctrl.iter().map(Vec::as_slice).collect();
        guest::write_chains(&mut patches, queues - 1, 16, &ctrl);
        let patches = patches.finish();
        out.u8(count_patches(&patches) as u8).bytes(&patches);
        let injected = net_packets();
        out.u8(injected.len() as u8);
        for (_, p) in injected {
            out.u16(p.len() as u16).bytes(&p);
        }
        seeds.push((name.to_string(), out.finish()));
    }
    seeds
}

fn blk_device_for(num_queues: u16) -> Blk {
    let mut config = BlkConfig::null(1 << 20);
    config.num_queues = num_queues;
    config.queue_size = 64;
    Blk::new(config).expect("valid")
}

fn net_device_for(pairs: u16) -> Net {
    let mut config = NetConfig::new(DEFAULT_MAC);
    config.queue_pairs = pairs;
    config.queue_size = 64;
    let switch = Switch::new(2, pairs, SwitchConfig::default()).expect("valid");
    Net::new(config, Box::new(switch.port(0))).expect("valid")
}

/// A negotiated framework's saved state, encoded.
fn saved_state(device: Box<dyn VirtioDevice>, compat: u16) -> Vec<u8> {
    let mut fw = Framework::new(device, Arc::new(CountingInterrupt::default()));
    fw.set_features(fw.offered_features()).expect("negotiates");
    fw.save_state(compat)
        .expect("saves")
        .encode()
        .expect("encodes")
}

/// Seeds of `state_load`.
pub fn state_load() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (name, blob) in [
        ("blob-blk", saved_state(Box::new(blk_device_for(1)), 2)),
        ("blob-net", saved_state(Box::new(net_device_for(1)), 1)),
    ] {
        let mut out = Output::new();
        out.u8(0).bytes(&blob);
        seeds.push((name.to_string(), out.finish()));
    }
    // Framework payloads (the blob's header is made by the target): blk (flag 0) and net
    // (flag 1), fresh and negotiated.
    const HEADER: usize = 24;
    let blk = saved_state(Box::new(blk_device_for(1)), 2);
    let net = saved_state(Box::new(net_device_for(1)), 1);
    for (name, flags, compat, device_byte, blob) in [
        ("payload-blk-fresh", 0u8, 2u8, 0u8, &blk),
        ("payload-blk-negotiated", 2, 2, 0, &blk),
        ("payload-net-fresh", 1, 1, 0, &net),
        ("payload-net-negotiated", 3, 1, 0, &net),
    ] {
        let mut out = Output::new();
        out.u8(1)
            .u8(flags)
            .u8(compat)
            .u8(device_byte)
            .bytes(&blob[HEADER..]);
        seeds.push((name.to_string(), out.finish()));
    }
    // Device payloads: what a default device saves (blk: 1 MiB is `b >> 2 == 0`).
    let blk_payload = blk_device_for(1).save_state().expect("saves");
    let mut out = Output::new();
    out.u8(2).u8(0).bytes(&blk_payload);
    seeds.push(("device-blk".into(), out.finish()));
    let net_payload = net_device_for(1).save_state().expect("saves");
    let mut out = Output::new();
    out.u8(3).u8(0).bytes(&net_payload);
    seeds.push(("device-net".into(), out.finish()));
    seeds
}

/// Builds a session script.
struct Script {
    out: Output,
}

impl Script {
    fn new(setup: Setup) -> Self {
        let mut out = Output::new();
        setup.encode(&mut out);
        Script { out }
    }

    fn op(&mut self, op: Op) -> &mut Self {
        op.encode(&mut self.out);
        self
    }

    fn msg_fds(
        &mut self,
        request: FrontendReq,
        payload: &[u8],
        fd_kind: FdKind,
        fd_count: u8,
    ) -> &mut Self {
        self.op(Op::Message {
            request: request as u32,
            need_reply: false,
            reply: false,
            fd_kind,
            fd_count,
            payload: payload.to_vec(),
        })
    }

    fn msg(&mut self, request: FrontendReq, payload: &[u8]) -> &mut Self {
        self.msg_fds(request, payload, FdKind::Ram, 0)
    }

    fn u64(&mut self, request: FrontendReq, v: u64) -> &mut Self {
        self.msg(request, VhostUserU64::new(v).as_slice())
    }

    fn finish(&mut self) -> Vec<u8> {
        self.out.finish()
    }
}

/// Where the frontend says guest RAM is in its address space.
const USER_ADDR: u64 = 0x7f00_0000_0000;

/// The vhost-user handshake and ring setup for `queues` queues of 16, as QEMU does it.
fn session_setup(s: &mut Script, features: u64, protocol: u64, queues: u16, log: bool) {
    s.msg(FrontendReq::GET_FEATURES, &[])
        .msg(FrontendReq::SET_OWNER, &[])
        .msg(FrontendReq::GET_PROTOCOL_FEATURES, &[])
        .u64(FrontendReq::SET_PROTOCOL_FEATURES, protocol)
        .msg(FrontendReq::GET_QUEUE_NUM, &[])
        .msg(FrontendReq::GET_MAX_MEM_SLOTS, &[])
        .msg_fds(FrontendReq::SET_BACKEND_REQ_FD, &[], FdKind::Socket, 1)
        .u64(FrontendReq::SET_FEATURES, features);
    let config = VhostUserConfig::new(0, 16, VhostUserConfigFlags::empty());
    let mut get_config = config.as_slice().to_vec();
    get_config.extend_from_slice(&[0; 16]);
    s.msg(FrontendReq::GET_CONFIG, &get_config);
    let mut table = VhostUserU64::new(1).as_slice().to_vec();
    table
        .extend_from_slice(VhostUserMemoryRegion::new(0, guest::RAM_SIZE, USER_ADDR, 0).as_slice());
    s.msg_fds(FrontendReq::SET_MEM_TABLE, &table, FdKind::Ram, 1);
    if log {
        s.op(Op::Blob(vec![0; 64]));
        s.msg_fds(
            FrontendReq::SET_LOG_BASE,
            VhostUserLog::new(64, 0).as_slice(),
            FdKind::Blob,
            1,
        );
    }
    for q in 0..queues {
        let (desc, avail, used) = guest::ring_layout(q, 16);
        let index = u32::from(q);
        s.msg(
            FrontendReq::SET_VRING_NUM,
            VhostUserVringState::new(index, 16).as_slice(),
        )
        .msg(
            FrontendReq::SET_VRING_ADDR,
            VhostUserVringAddr::new(
                index,
                VhostUserVringAddrFlags::empty(),
                USER_ADDR + desc,
                USER_ADDR + used,
                USER_ADDR + avail,
                0,
            )
            .as_slice(),
        )
        .msg(
            FrontendReq::SET_VRING_BASE,
            VhostUserVringState::new(index, 0).as_slice(),
        )
        .msg_fds(
            FrontendReq::SET_VRING_CALL,
            VhostUserU64::new(index.into()).as_slice(),
            FdKind::EventFd,
            1,
        )
        .msg_fds(
            FrontendReq::SET_VRING_ERR,
            VhostUserU64::new(index.into()).as_slice(),
            FdKind::EventFd,
            1,
        )
        .msg_fds(
            FrontendReq::SET_VRING_KICK,
            VhostUserU64::new(index.into()).as_slice(),
            FdKind::EventFd,
            1,
        )
        .msg(
            FrontendReq::SET_VRING_ENABLE,
            VhostUserVringState::new(index, 1).as_slice(),
        );
    }
}

/// Guest RAM writes that put blk requests on queue 0.
fn blk_ram(s: &mut Script) {
    let requests = blk_requests();
    let mut patches = Output::new();
    write_blk_requests(&mut patches, 0, 16, &requests);
    // Re-encode the patches as RAM ops.
    let buf = patches.finish();
    let mut input = crate::input::Input::new(&buf);
    while !input.is_empty() {
        let offset = input.u16();
        let len = usize::from(input.u8());
        s.op(Op::Ram {
            offset,
            bytes: input.bytes(len).to_vec(),
        });
    }
}

fn offered(device: Box<dyn VirtioDevice>) -> u64 {
    let fw = Framework::new(device, Arc::new(CountingInterrupt::default()));
    fw.offered_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// Seeds of `vhost_user_session`.
pub fn vhost_user_session() -> Vec<Seed> {
    let all = supported_protocol_features().bits();
    let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
    let status = VhostUserProtocolFeatures::STATUS.bits();
    let mut seeds = Vec::new();

    // QEMU-like blk session: handshake, rings, requests, kick, config, stop, save state.
    let setup = Setup {
        net: false,
        two: false,
        old: false,
    };
    let mut s = Script::new(setup);
    session_setup(&mut s, offered(Box::new(blk_device_for(1))), all, 1, false);
    blk_ram(&mut s);
    s.u64(FrontendReq::SET_STATUS, 0xf)
        .op(Op::Kick(2))
        .msg(FrontendReq::GET_STATUS, &[])
        .msg(
            FrontendReq::GET_VRING_BASE,
            VhostUserVringState::new(0, 0).as_slice(),
        )
        .op(Op::Blob(Vec::new()))
        .msg_fds(
            FrontendReq::SET_DEVICE_STATE_FD,
            &[0; 8], // save, stopped
            FdKind::Blob,
            1,
        )
        .msg(FrontendReq::CHECK_DEVICE_STATE, &[])
        .msg(FrontendReq::RESET_DEVICE, &[]);
    seeds.push(("blk-qemu".to_string(), s.finish()));

    // Without protocol features (rings start on kick), two queues, with REPLY_ACK asked for.
    let setup = Setup {
        net: false,
        two: true,
        old: true,
    };
    let mut s = Script::new(setup);
    let features =
        offered(Box::new(blk_device_for(2))) & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    session_setup(&mut s, features, 0, 2, false);
    blk_ram(&mut s);
    s.op(Op::Kick(2)).msg(
        FrontendReq::GET_VRING_BASE,
        VhostUserVringState::new(1, 0).as_slice(),
    );
    seeds.push(("blk-legacy-two-queues".to_string(), s.finish()));

    // Migration destination: load a saved state.
    let setup = Setup {
        net: false,
        two: false,
        old: false,
    };
    let mut s = Script::new(setup);
    let blob = saved_state(Box::new(blk_device_for(1)), 2);
    s.msg(FrontendReq::SET_OWNER, &[])
        .u64(FrontendReq::SET_PROTOCOL_FEATURES, all)
        .op(Op::Blob(blob));
    let mut load = 1u32.to_le_bytes().to_vec();
    load.extend_from_slice(&0u32.to_le_bytes());
    s.msg_fds(FrontendReq::SET_DEVICE_STATE_FD, &load, FdKind::Blob, 1)
        .msg(FrontendReq::CHECK_DEVICE_STATE, &[])
        .msg(FrontendReq::GET_STATUS, &[]);
    seeds.push(("blk-load-state".to_string(), s.finish()));

    // Dirty logging on while requests run, then memory hot-plug.
    let setup = Setup {
        net: false,
        two: false,
        old: false,
    };
    let mut s = Script::new(setup);
    session_setup(
        &mut s,
        offered(Box::new(blk_device_for(1))) | log_all,
        all,
        1,
        true,
    );
    blk_ram(&mut s);
    s.u64(FrontendReq::SET_STATUS, 0xf).op(Op::Kick(2));
    let region = VhostUserSingleMemoryRegion::new(0x2_0000, 0x1000, USER_ADDR + 0x2_0000, 0x1000);
    s.msg_fds(FrontendReq::ADD_MEM_REG, region.as_slice(), FdKind::Ram, 1)
        .msg(FrontendReq::REM_MEM_REG, region.as_slice())
        .msg(
            FrontendReq::GET_VRING_BASE,
            VhostUserVringState::new(0, 0).as_slice(),
        );
    seeds.push(("blk-dirty-log-hotplug".to_string(), s.finish()));

    // Regression: the frontend shrinks its dirty log (the second memfd it sent) while the
    // device writes guest memory; this killed the backend with SIGBUS before the log was
    // sealed.
    let setup = Setup {
        net: false,
        two: false,
        old: false,
    };
    let mut s = Script::new(setup);
    session_setup(
        &mut s,
        offered(Box::new(blk_device_for(1))) | log_all,
        all,
        1,
        true,
    );
    blk_ram(&mut s);
    s.op(Op::Truncate { fd: 1, size: 0 })
        .u64(FrontendReq::SET_STATUS, 0xf)
        .op(Op::Kick(2))
        .msg(
            FrontendReq::GET_VRING_BASE,
            VhostUserVringState::new(0, 0).as_slice(),
        );
    seeds.push(("blk-dirty-log-truncated".to_string(), s.finish()));

    // Need-reply acks, a refused message, a malformed one.
    let setup = Setup {
        net: false,
        two: false,
        old: false,
    };
    let mut s = Script::new(setup);
    s.u64(FrontendReq::SET_PROTOCOL_FEATURES, all)
        .op(Op::Message {
            request: FrontendReq::SET_OWNER as u32,
            need_reply: true,
            reply: false,
            fd_kind: FdKind::Ram,
            fd_count: 0,
            payload: Vec::new(),
        });
    s.op(Op::Message {
        request: FrontendReq::SET_OWNER as u32,
        need_reply: true,
        reply: false,
        fd_kind: FdKind::Ram,
        fd_count: 0,
        payload: Vec::new(),
    })
    .op(Op::Message {
        request: 99,
        need_reply: true,
        reply: false,
        fd_kind: FdKind::EventFd,
        fd_count: 2,
        payload: vec![1; 8],
    })
    .op(Op::Raw(vec![1, 0, 0, 0, 5, 0, 0, 0]));
    seeds.push(("reply-ack-and-errors".to_string(), s.finish()));

    // QEMU-like net session with STATUS.
    let setup = Setup {
        net: true,
        two: false,
        old: true,
    };
    let mut s = Script::new(setup);
    session_setup(
        &mut s,
        offered(Box::new(net_device_for(1))),
        status
            | VhostUserProtocolFeatures::REPLY_ACK.bits()
            | VhostUserProtocolFeatures::CONFIG.bits(),
        3,
        false,
    );
    s.u64(FrontendReq::SET_STATUS, 0xf).op(Op::Kick(5)).msg(
        FrontendReq::GET_VRING_BASE,
        VhostUserVringState::new(1, 0).as_slice(),
    );
    seeds.push(("net-qemu".to_string(), s.finish()));
    seeds
}

/// Seeds of `handover_receive`: the descriptor byte (how many of which kind), the frame byte
/// (0: an honest HANDOVER header), then the metadata: the upgrade socket alone, and with the
/// vhost-user listener, each with no frontend session.
pub fn handover_receive() -> Vec<Seed> {
    fn metadata(listeners: u32) -> Vec<u8> {
        let mut m = b"OBHANDOV".to_vec();
        m.extend_from_slice(&1u16.to_le_bytes()); // protocol version
        m.extend_from_slice(&listeners.to_le_bytes()); // descriptor count
        for (present, index) in [(true, 0u32), (listeners > 1, 1)] {
            m.push(u8::from(present));
            if present {
                m.extend_from_slice(&index.to_le_bytes());
                m.extend_from_slice(&0u32.to_le_bytes()); // no path
                m.extend_from_slice(&u32::MAX.to_le_bytes()); // no reaper pipe
            }
        }
        m.push(0); // no session
        m
    }
    // Descriptor bytes: 25 is one listening socket, 10 two (see the target).
    [("upgrade-socket", 25u8, 1u32), ("two-listeners", 10, 2)]
        .into_iter()
        .map(|(name, fds, listeners)| {
            let mut seed = vec![fds, 0];
            seed.extend_from_slice(&metadata(listeners));
            (name.to_string(), seed)
        })
        .collect()
}

/// Every target's seeds.
pub fn all() -> Vec<(&'static str, Vec<Seed>)> {
    vec![
        ("blk_chain", blk_chain()),
        ("blk_device", blk_device()),
        ("net_parse", net_parse()),
        ("net_device", net_device()),
        ("state_load", state_load()),
        ("vhost_user_session", vhost_user_session()),
        ("handover_receive", handover_receive()),
    ]
}
