//! `vhost-user-net` on a TAP interface, inside a network namespace each test creates for
//! itself (so the host's networking is never touched): the backend creates the TAP (or is
//! handed descriptors the test opened), the test gives the kernel side an address, and the
//! driver talks to the kernel: ARP, ICMP echo with and without checksum offload, UDP from a
//! kernel socket with the offloads the driver negotiated, and multi-queue TAPs whose queues
//! follow `VQ_PAIRS_SET`.
//!
//! The tests need root (to create the namespace and the TAP) and `/dev/net/tun`; without them
//! each test prints why and passes without running.

mod common;
mod net_common;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{binary, Backend, TempDir};
use net_common::*;
use outboard_frontend::net::NET_FEATURES;
use outboard_frontend::{CtrlAck, NetDriver, NetHdr, NetOptions, RxPacket, SessionBuilder};

const F_GUEST_CSUM: u32 = 1;
/// GUEST_TSO4, GUEST_TSO6, GUEST_ECN, GUEST_UFO: they need GUEST_CSUM (virtio 5.1.3.1).
const GUEST_CSUM_DEPENDENTS: u64 = (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10);
const F_MRG_RXBUF: u32 = 15;
const KERNEL_IP: [u8; 4] = [10, 77, 0, 1];
const DRIVER_IP: [u8; 4] = [10, 77, 0, 2];
const TAP: &str = "obtap0";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace, or `None` (with the reason printed) where the test cannot run.
    fn new(test: &str) -> Option<Netns> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("{test}: skipped: creating a network namespace and a TAP needs root");
            return None;
        }
        if !Path::new("/dev/net/tun").exists() {
            eprintln!("{test}: skipped: /dev/net/tun does not exist");
            return None;
        }
        let name = format!(
            "obnet-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        // No IPv6 chatter (router solicitations, MLD) on the interfaces created later.
        ns.exec(&[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
        ]);
        Some(ns)
    }

    /// Runs a command in the namespace and returns its stdout; fails loudly.
    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip` in the namespace.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// The TAP's details (`ip -d link show`).
    fn tap_details(&self) -> String {
        self.ip(&["-d", "link", "show", TAP])
    }

    /// Waits until the backend has created the TAP, then gives it the kernel's address and a
    /// static neighbour entry for the driver.
    fn configure_tap(&self, driver_mac: [u8; 6]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("ip")
                .args(["-n", &self.name, "link", "show", TAP])
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the backend did not create {TAP}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mac = driver_mac.map(|b| format!("{b:02x}")).join(":");
        self.ip(&["addr", "add", "10.77.0.1/24", "dev", TAP]);
        self.ip(&["link", "set", TAP, "up"]);
        self.ip(&["neigh", "replace", "10.77.0.2", "lladdr", &mac, "dev", TAP]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command, failing loudly; returns stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts the backend inside `ns` with `args` and waits for its socket.
fn start_in(ns: &Netns, dir: &TempDir, args: &[&str]) -> (Backend, PathBuf) {
    let socket = dir.path("net.sock");
    let log = dir.path("backend.log");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(binary(PROGRAM))
        .args(["--socket-path", socket.to_str().unwrap()])
        .args(args);
    (spawn(cmd, &socket, log), socket)
}

/// Spawns `cmd` with its output in `log` and waits for `socket`.
fn spawn(mut cmd: Command, socket: &Path, log: PathBuf) -> Backend {
    let log_file = std::fs::File::create(&log).unwrap();
    cmd.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    )
    .stdin(Stdio::null())
    .stdout(log_file.try_clone().unwrap())
    .stderr(log_file);
    let child = cmd.spawn().expect("start the backend");
    let mut b = Backend {
        child,
        socket: socket.to_path_buf(),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(status) = b.child.try_wait().unwrap() {
            panic!("the backend exited with {status}:\n{}", b.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "the backend did not listen:\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    b
}

/// Receives frames on `pair` until one satisfies `want` (other traffic is skipped).
fn wait_for(
    d: &mut NetDriver,
    pair: u16,
    what: &str,
    want: impl Fn(&RxPacket) -> bool,
) -> RxPacket {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} from the kernel");
        if let Some(p) = d.rx(pair).unwrap().recv(left).unwrap() {
            if want(&p) {
                return p;
            }
        }
    }
}

fn is_arp_reply(p: &RxPacket) -> bool {
    p.frame.len() >= 42 && p.frame[12..14] == [0x08, 0x06] && p.frame[20..22] == [0, 2]
}

fn is_echo_reply(p: &RxPacket, seq: u16) -> bool {
    p.frame.len() >= 42
        && p.frame[12..14] == [0x08, 0x00]
        && p.frame[23] == 1
        && p.frame[34] == 0
        && p.frame[40..42] == seq.to_be_bytes()
}

/// Pings the kernel (at `kmac`) from the driver; returns the reply's ICMP payload, if one
/// came.
fn ping(
    d: &mut NetDriver,
    kmac: [u8; 6],
    seq: u16,
    payload: &[u8],
    offload: bool,
) -> Option<Vec<u8>> {
    let icmp = icmp_echo(0x4242, seq, payload, offload);
    let f = ipv4(kmac, MAC_A, DRIVER_IP, KERNEL_IP, 1, &icmp);
    let hdr = if offload {
        NetHdr {
            flags: 1,
            csum_start: 34,
            csum_offset: 2,
            ..NetHdr::default()
        }
    } else {
        NetHdr::default()
    };
    d.tx(0).unwrap().send(hdr, &f).unwrap();
    d.tx(0).unwrap().flush().unwrap();
    // The kernel steers the reply to any queue pair in use.
    let pairs = d.options().pairs;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        for pair in 0..pairs {
            while let Some(p) = d.rx(pair).unwrap().try_recv().unwrap() {
                if is_echo_reply(&p, seq) {
                    assert_eq!(checksum(&p.frame[34..], 0), 0, "the reply's ICMP checksum");
                    return Some(p.frame[42..].to_vec());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// The kernel side's MAC, learned with ARP.
fn kernel_mac(d: &mut NetDriver) -> [u8; 6] {
    d.tx(0)
        .unwrap()
        .send(NetHdr::default(), &arp_request(MAC_A, DRIVER_IP, KERNEL_IP))
        .unwrap();
    d.tx(0).unwrap().flush().unwrap();
    let reply = wait_for(d, 0, "ARP reply", is_arp_reply);
    assert_eq!(&reply.frame[..6], &MAC_A, "the reply is for us");
    assert_eq!(&reply.frame[28..32], &KERNEL_IP);
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&reply.frame[22..28]);
    mac
}

#[test]
fn frames_reach_the_kernel_and_come_back_with_and_without_mergeable_buffers() {
    let Some(ns) = Netns::new("tap_rxtx") else {
        return;
    };
    let dir = TempDir::new("net-tap");
    let (mut backend, socket) = start_in(&ns, &dir, &["--tap", TAP, "--mac", "52:54:00:00:00:0a"]);
    ns.configure_tap(MAC_A);
    for mrg in [true, false] {
        let features = if mrg {
            NET_FEATURES
        } else {
            NET_FEATURES & !(1 << F_MRG_RXBUF)
        };
        let opts = NetOptions {
            rx_buffer_size: mrg.then_some(1024),
            ..NetOptions::default()
        };
        let mut d = connect(SessionBuilder::new(&socket).features(features), opts);
        let kmac = kernel_mac(&mut d);
        let payload: Vec<u8> = (0..1200u32).map(|i| (i * 3) as u8).collect();
        let reply = ping(&mut d, kmac, 1, &payload, false);
        assert_eq!(reply.as_deref(), Some(&payload[..]), "mrg {mrg}");
        // Checksum offload: the kernel completes the ICMP checksum the driver left out.
        let reply = ping(&mut d, kmac, 2, &payload, true);
        assert_eq!(reply.as_deref(), Some(&payload[..]), "mrg {mrg}");
        // The same frame without NEEDS_CSUM has a wrong checksum, and the kernel drops it.
        let icmp = icmp_echo(0x4242, 3, &payload, true);
        d.send(0, &ipv4(kmac, MAC_A, DRIVER_IP, KERNEL_IP, 1, &icmp))
            .unwrap();
        let late = d.rx(0).unwrap().drain(Duration::from_millis(300)).unwrap();
        assert!(
            !late.iter().any(|p| is_echo_reply(p, 3)),
            "a bad checksum was answered"
        );
        drop(d);
    }
    backend.assert_alive();
    backend.terminate();
}

#[test]
fn received_checksums_follow_the_negotiated_guest_offloads() {
    let Some(ns) = Netns::new("tap_offloads") else {
        return;
    };
    let dir = TempDir::new("net-tap-csum");
    let (_backend, socket) = start_in(&ns, &dir, &["--tap", TAP, "--mac", "52:54:00:00:00:0a"]);
    ns.configure_tap(MAC_A);
    for guest_csum in [true, false] {
        let features = if guest_csum {
            NET_FEATURES
        } else {
            // With the receive offloads that need GUEST_CSUM (a driver may not keep them).
            NET_FEATURES & !(1 << F_GUEST_CSUM | GUEST_CSUM_DEPENDENTS)
        };
        let mut d = connect(
            SessionBuilder::new(&socket).features(features),
            NetOptions::default(),
        );
        // A UDP datagram from a kernel socket.
        ns.exec(&[
            "bash",
            "-c",
            "printf offload-test > /dev/udp/10.77.0.2/4242",
        ]);
        let p = wait_for(&mut d, 0, "UDP datagram", |p| {
            p.frame.len() > 42 && p.frame[23] == 17 && p.frame[36..38] == 4242u16.to_be_bytes()
        });
        assert_eq!(&p.frame[42..], b"offload-test");
        let pseudo = pseudo_sum(&p.frame[14..34], 17, p.frame.len() - 34);
        if guest_csum {
            // With checksum offload mirrored into the TAP, the kernel leaves the UDP checksum
            // to the driver: it is partial, where the header says.
            assert_eq!(
                p.hdr.flags & 1,
                1,
                "NEEDS_CSUM with GUEST_CSUM: {:?}",
                p.hdr
            );
            assert_eq!((p.hdr.csum_start, p.hdr.csum_offset), (34, 6));
            let mut f = p.frame.clone();
            let c = checksum(&f[34..], 0);
            f[40..42].copy_from_slice(&c.to_be_bytes());
            assert_eq!(
                checksum(&f[34..], pseudo),
                0,
                "completing the partial checksum"
            );
        } else {
            assert_eq!(p.hdr.flags & 1, 0, "no partial checksum without GUEST_CSUM");
            assert_eq!(
                checksum(&p.frame[34..], pseudo),
                0,
                "a complete UDP checksum"
            );
        }
    }
}

#[test]
fn a_multi_queue_tap_attaches_the_queues_the_driver_uses() {
    let Some(ns) = Netns::new("tap_mq") else {
        return;
    };
    let dir = TempDir::new("net-tap-mq");
    let (mut backend, socket) = start_in(
        &ns,
        &dir,
        &[
            "--tap",
            TAP,
            "--queue-pairs",
            "2",
            "--mac",
            "52:54:00:00:00:0a",
        ],
    );
    ns.configure_tap(MAC_A);
    assert!(
        ns.tap_details().contains("multi_queue"),
        "{}",
        ns.tap_details()
    );
    let opts = NetOptions {
        max_pairs: 2,
        pairs: 2,
        ..NetOptions::default()
    };
    let mut d = connect(SessionBuilder::new(&socket), opts);
    // The device starts with one pair; the pair-1 worker attaches its queue after the driver's
    // VQ_PAIRS_SET(2), which `connect` sends, and possibly after its ack.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ns.tap_details().contains("numqueues 2 numdisabled 0") {
        assert!(
            Instant::now() < deadline,
            "queue 1 was not attached: {}",
            ns.tap_details()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.ctrl().unwrap().set_queue_pairs(1).unwrap(), CtrlAck::Ok);
    let detached = || ns.tap_details().contains("numqueues 1 numdisabled 1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !detached() {
        assert!(
            Instant::now() < deadline,
            "queue 1 stayed attached: {}",
            ns.tap_details()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let payload = [7u8; 64];
    let kmac = kernel_mac(&mut d);
    assert_eq!(
        ping(&mut d, kmac, 1, &payload, false).as_deref(),
        Some(&payload[..])
    );
    assert_eq!(d.ctrl().unwrap().set_queue_pairs(2).unwrap(), CtrlAck::Ok);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ns.tap_details().contains("numqueues 2 numdisabled 0") {
        assert!(
            Instant::now() < deadline,
            "queue 1 was not attached again: {}",
            ns.tap_details()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        ping(&mut d, kmac, 2, &payload, false).as_deref(),
        Some(&payload[..])
    );
    backend.assert_alive();
}

/// `struct ifreq` with the flags member.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `TAP` in `ns` the way a privileged manager would, from a thread that enters the
/// namespace: one descriptor with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
fn open_tap_in(ns: &Netns) -> OwnedFd {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..TAP.len()].copy_from_slice(TAP.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (40 bytes, the
        // flags after the 16-byte name), exclusively borrowed for the call.
        let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        assert!(ret == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        OwnedFd::from(tun)
    })
    .join()
    .unwrap()
}

#[test]
fn an_unprivileged_style_backend_uses_a_tap_descriptor_it_was_given() {
    let Some(ns) = Netns::new("tap_fd") else {
        return;
    };
    let dir = TempDir::new("net-tap-fd");
    let tap = open_tap_in(&ns);
    let fd: RawFd = tap.as_raw_fd();
    let socket = dir.path("net.sock");
    let mut cmd = Command::new(binary(PROGRAM));
    cmd.args(["--socket-path", socket.to_str().unwrap()]).args([
        "--tap-fd",
        &fd.to_string(),
        "--mac",
        "52:54:00:00:00:0a",
    ]);
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe; clearing FD_CLOEXEC there leaves the parent's descriptor alone.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut backend = spawn(cmd, &socket, dir.path("backend.log"));
    // The backend has its own copy; the test's is closed so that only the backend holds the TAP.
    drop(tap);
    ns.configure_tap(MAC_A);
    let mut d = connect(SessionBuilder::new(&socket), NetOptions::default());
    let payload = b"through an inherited descriptor".to_vec();
    let kmac = kernel_mac(&mut d);
    assert_eq!(ping(&mut d, kmac, 1, &payload, false), Some(payload));
    backend.assert_alive();
}

/// Crash recovery on a TAP: the backend is killed with SIGKILL five times while the driver
/// transmits numbered UDP datagrams to the kernel; each time it is restarted on the same socket
/// and the driver reconnects with the inflight region (as QEMU does with `reconnect=1`). A
/// frame is answered only once it has left the device, and what was in flight is resubmitted:
/// the kernel receives every datagram the driver transmitted (a datagram may arrive twice when
/// the kill fell between the write to the TAP and the used entry; none may be missing).
#[test]
fn a_killed_and_restarted_backend_loses_no_transmitted_frame() {
    use std::collections::BTreeMap;
    use std::net::UdpSocket;
    use std::sync::{Arc, Mutex};
    use vhost::vhost_user::message::VhostUserProtocolFeatures;

    let Some(ns) = Netns::new("tap_crash") else {
        return;
    };
    let dir = TempDir::new("net-tap-crash");
    // A persistent TAP, so that the kernel side (address, neighbour) outlives the backend.
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        TAP,
        "mode",
        "tap",
        "multi_queue",
        "vnet_hdr",
    ]);
    ns.configure_tap(MAC_A);
    // The receiver: a thread that joins the namespace and counts datagrams by number.
    let got: Arc<Mutex<BTreeMap<u32, u32>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = {
        let (got, stop) = (got.clone(), stop.clone());
        let ns_path = format!("/run/netns/{}", ns.name);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns_path).unwrap();
            // SAFETY: setns on a namespace fd this thread owns; it changes only this thread's
            // network namespace.
            let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let sock = UdpSocket::bind("10.77.0.1:7777").unwrap();
            // Bursts arrive faster than this thread may be scheduled on a busy machine: a
            // receive buffer for every datagram of the test, so that a drop is never the
            // socket's (SO_RCVBUFFORCE: root may exceed rmem_max).
            let size: libc::c_int = 64 << 20;
            // SAFETY: setsockopt on a socket this thread owns, with a c_int option value.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    if n >= 4 {
                        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                        *got.lock().unwrap().entry(seq).or_default() += 1;
                    }
                }
            }
        })
    };
    ready_rx.recv().unwrap();
    let args = ["--tap", TAP, "--mac", "52:54:00:00:00:0a"];
    let (mut backend, socket) = start_in(&ns, &dir, &args);
    let builder = SessionBuilder::new(&socket).protocol_features(
        outboard_frontend::device::default_protocol_features()
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
    );
    let mut d = connect(builder, NetOptions::default());
    assert!(
        d.session().has_inflight(),
        "the backend offers INFLIGHT_SHMFD"
    );
    let kmac = kernel_mac(&mut d);
    let mut seq = 0u32;
    let mut send = |d: &mut NetDriver, n: u32| {
        for _ in 0..n {
            let mut payload = seq.to_be_bytes().to_vec();
            payload.resize(200, 0x5a);
            let f = udp(kmac, MAC_A, DRIVER_IP, KERNEL_IP, (4000, 7777), &payload);
            // Added without waiting for the device: at the kill, the ring holds frames the
            // device has not taken, has taken, and has answered.
            let tx = d.tx(0).unwrap();
            tx.add(NetHdr::default(), &f).unwrap();
            if seq % 8 == 7 {
                tx.kick().unwrap();
            }
            seq += 1;
        }
        d.tx(0).unwrap().kick().unwrap();
        d.tx(0).unwrap().in_flight()
    };
    for round in 0..5u32 {
        // A burst, then the kill with the tail of the burst still in the ring.
        let in_flight = send(&mut d, 300 + 37 * round);
        backend.child.kill().unwrap();
        println!("kill {round}: {in_flight} frames in flight");
        backend.child.wait().unwrap();
        let (b, _) = start_in(&ns, &dir, &args);
        backend = b;
        d.session()
            .reconnect()
            .unwrap_or_else(|e| panic!("reconnect after kill {round}: {e}"));
    }
    send(&mut d, 100);
    d.tx(0).unwrap().flush().unwrap();
    let total = seq;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().len() < total as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    receiver.join().unwrap();
    let got = got.lock().unwrap();
    let missing: Vec<u32> = (0..total).filter(|s| !got.contains_key(s)).collect();
    let twice = got.values().filter(|&&n| n > 1).count();
    println!("{total} datagrams sent across 5 kills; {twice} arrived twice");
    assert!(
        missing.is_empty(),
        "{} of {total} datagrams lost (first: {:?}); backend log:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        backend.log_text()
    );
    backend.assert_alive();
}
