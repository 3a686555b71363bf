//! Helpers of the virtio-net integration tests: starting `vhost-user-net`, connecting drivers,
//! and building frames (Ethernet, ARP, IPv4/ICMP/UDP/TCP with their checksums).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outboard_frontend::{NetDriver, NetOptions, RxPacket, SessionBuilder};

use crate::common::{Backend, TempDir};

/// The program under test.
pub const PROGRAM: &str = "vhost-user-net";
/// The MAC of switch port 0 (`--mac` base); port `i` has the last byte `0x0a + i`.
pub const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0a];
/// The MAC of switch port 1.
pub const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0b];
/// An address no port has.
pub const OTHER: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x77];
/// How long "nothing more arrives" is waited for.
pub const QUIET: Duration = Duration::from_millis(150);

/// A `vhost-user-net --switch` process with one socket per port.
pub struct SwitchBackend {
    pub backend: Backend,
    pub sockets: Vec<PathBuf>,
    pub dir: TempDir,
}

impl SwitchBackend {
    /// Starts a switch of `ports` ports (MACs from [`MAC_A`]) with `args` added.
    pub fn start(tag: &str, ports: usize, args: &[&str]) -> SwitchBackend {
        let dir = TempDir::new(tag);
        let sockets: Vec<PathBuf> = (0..ports)
            .map(|i| dir.path(&format!("port{i}.sock")))
            .collect();
        let mut all = vec![
            "--switch".to_string(),
            "--mac".into(),
            "52:54:00:00:00:0a".into(),
        ];
        for s in &sockets {
            all.push("--socket-path".into());
            all.push(s.display().to_string());
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let backend = Backend::start(PROGRAM, &sockets[0], &all, dir.path("backend.log"));
        let mut b = SwitchBackend {
            backend,
            sockets,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !b.sockets.iter().all(|s| s.exists()) {
            b.backend.assert_alive();
            assert!(Instant::now() < deadline, "not every port listens");
            std::thread::sleep(Duration::from_millis(10));
        }
        b
    }

    /// A driver on port `port`.
    pub fn connect(&self, port: usize, opts: NetOptions) -> NetDriver {
        connect(SessionBuilder::new(&self.sockets[port]), opts)
    }

    /// A driver on port `port` asking for `features` only.
    pub fn connect_with(&self, port: usize, features: u64, opts: NetOptions) -> NetDriver {
        connect(
            SessionBuilder::new(&self.sockets[port]).features(features),
            opts,
        )
    }
}

/// Connects a driver, failing loudly.
pub fn connect(builder: SessionBuilder, opts: NetOptions) -> NetDriver {
    match NetDriver::connect(builder, opts) {
        Ok(d) => d,
        Err(e) => panic!("cannot set up the virtio-net driver: {}", error_chain(&e)),
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// An Ethernet frame of `len` bytes (at least 14) with a test EtherType and a payload
/// derived from `seed`.
pub fn frame(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend(src);
    f.extend([0x88, 0xb5]);
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(31) ^ seed));
    f
}

/// Every frame that arrives on pair `pair` until none has for [`QUIET`].
pub fn drain(d: &mut NetDriver, pair: u16) -> Vec<RxPacket> {
    d.rx(pair).unwrap().drain(QUIET).unwrap()
}

/// The next frame on pair `pair`, failing after the driver's timeout.
pub fn expect(d: &mut NetDriver, pair: u16) -> RxPacket {
    match d.rx(pair).unwrap().expect() {
        Ok(p) => p,
        Err(e) => panic!("no frame on pair {pair}: {}", error_chain(&e)),
    }
}

/// The ones' complement checksum of `data` (RFC 1071), with `acc` added first.
pub fn checksum(data: &[u8], mut acc: u32) -> u16 {
    for w in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The pseudo-header sum of an IPv4 packet (`ip` is its header) for `len` bytes of `proto`.
pub fn pseudo_sum(ip: &[u8], proto: u8, len: usize) -> u32 {
    let mut acc = u32::from(proto) + len as u32;
    for w in ip[12..20].chunks(2) {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    acc
}

/// An IPv4 packet in an Ethernet frame: `proto` and `l4` (the transport header and payload,
/// checksum fields as given).
pub fn ipv4(
    dst: [u8; 6],
    src: [u8; 6],
    from: [u8; 4],
    to: [u8; 4],
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend(src);
    f.extend([0x08, 0x00]);
    let total = (20 + l4.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend(total.to_be_bytes());
    ip.extend([0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    ip.extend(from);
    ip.extend(to);
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend(ip);
    f.extend(l4);
    f
}

/// An ICMP echo request with `payload`; the checksum is complete, or zero when `partial`.
pub fn icmp_echo(id: u16, seq: u16, payload: &[u8], partial: bool) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend(id.to_be_bytes());
    m.extend(seq.to_be_bytes());
    m.extend(payload);
    if !partial {
        let c = checksum(&m, 0);
        m[2..4].copy_from_slice(&c.to_be_bytes());
    }
    m
}

/// An ARP request from `mac`/`ip` for `target`.
pub fn arp_request(mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(mac);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend(mac);
    f.extend(ip);
    f.extend([0; 6]);
    f.extend(target);
    f.resize(60, 0);
    f
}

/// A UDP datagram in an IPv4 frame with a complete checksum.
pub fn udp(
    dst: [u8; 6],
    src: [u8; 6],
    from: [u8; 4],
    to: [u8; 4],
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = ports.0.to_be_bytes().to_vec();
    u.extend(ports.1.to_be_bytes());
    u.extend((len as u16).to_be_bytes());
    u.extend([0, 0]);
    u.extend(payload);
    let mut f = ipv4(dst, src, from, to, 17, &u);
    let c = checksum(&f[34..], pseudo_sum(&f[14..34], 17, len));
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

/// Whether the TCP checksum of an IPv4 frame (no VLAN, IHL 5) verifies.
pub fn tcp4_checksum_ok(f: &[u8]) -> bool {
    checksum(&f[34..], pseudo_sum(&f[14..34], 6, f.len() - 34)) == 0
}

/// A TCP segment in an IPv4 frame with `payload`, the checksum field holding the pseudo-header
/// sum (as a driver leaves it for checksum offload).
pub fn tcp4_partial(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0x30, 0x39, 0x00, 0x50];
    t.extend(1000u32.to_be_bytes());
    t.extend(1u32.to_be_bytes());
    t.extend([0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend(payload);
    let mut f = ipv4(dst, src, [10, 0, 0, 1], [10, 0, 0, 2], 6, &t);
    let pseudo = !checksum(&[], pseudo_sum(&f[14..34], 6, t.len()));
    f[50..52].copy_from_slice(&pseudo.to_be_bytes());
    f
}
