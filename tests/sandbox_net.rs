//! The sandbox of a serving `vhost-user-net`, seen from outside, as `sandbox_confinement` and
//! `sandbox_violations` see `vhost-user-blk`'s:
//!
//! - every thread of a switch with two ports, traffic flowing on every queue pair, runs under
//!   the seccomp filter of its role: the main thread, the control thread of each port (which
//!   inherits the main thread's control filter), the signal thread, and one worker per queue
//!   pair plus the control-queue worker of each device (the control filter and their own);
//! - the same for a TAP backend in a network namespace the test creates (root only), with the
//!   TUN ioctls of activation and of queue-pair changes going through, in the Landlock and the
//!   namespace sandbox, and as an unprivileged user on a persistent TAP it owns;
//! - no capability is left, the namespace sandbox leaves an empty root, the descriptor limit
//!   grows with ports and queue pairs;
//! - a forbidden system call (`OUTBOARD_SANDBOX_SELFTEST`) kills the process, or is reported
//!   with the role of its thread, or is only logged; a path cannot be opened;
//! - every port's socket file is removed at exit, even when the backend is killed.

mod common;
mod net_common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::proc::{is_root, threads, ThreadStatus};
use common::{binary, Backend, TempDir};
use net_common::*;
use outboard_frontend::{CtrlAck, NetDriver, NetHdr, NetOptions, SessionBuilder};

const WAIT: Duration = Duration::from_secs(10);

/// `pairs` queue pairs, all in use.
fn pairs(pairs: u16) -> NetOptions {
    NetOptions {
        max_pairs: pairs,
        pairs,
        ..NetOptions::default()
    }
}

/// A UDP frame from A to B; the port spreads frames over the receiver's queue pairs.
fn datagram(n: u16) -> Vec<u8> {
    udp(
        MAC_B,
        MAC_A,
        [10, 0, 0, 1],
        [10, 0, 0, 2],
        (1000 + n, 53),
        &n.to_be_bytes(),
    )
}

/// Sends `count` frames from `a` on every one of its transmit queues and checks that `b`
/// receives each exactly once, on whichever of its pairs the switch steered it to.
fn traffic(a: &mut NetDriver, b: &mut NetDriver, count: u16) {
    let tx_pairs = a.options().pairs;
    let mut sent = Vec::new();
    for n in 0..count {
        let f = datagram(n);
        let pair = n % tx_pairs;
        a.tx(pair).unwrap().add(NetHdr::default(), &f).unwrap();
        sent.push(f);
    }
    for pair in 0..tx_pairs {
        a.tx(pair).unwrap().flush().unwrap();
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < sent.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} frames arrived",
            got.len(),
            sent.len()
        );
        for pair in 0..b.options().pairs {
            while let Some(p) = b.rx(pair).unwrap().try_recv().unwrap() {
                got.push(p.frame);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    got.sort();
    sent.sort();
    assert_eq!(got, sent, "every frame arrives once");
}

/// Checks the seccomp state and capabilities of every thread of `pid`, and that the threads
/// named `expected` (a name and how many) are there. Returns the threads.
fn check_threads(pid: u32, expected: &[(&str, usize)]) -> Vec<ThreadStatus> {
    let ts = threads(pid);
    let count = |name: &str| ts.iter().filter(|t| t.name == name).count();
    for (name, n) in expected {
        assert_eq!(count(name), *n, "{name} threads in {ts:#?}");
    }
    for t in &ts {
        assert_eq!(t.seccomp, 2, "{t:?} runs without a seccomp filter");
        assert_eq!(t.no_new_privs, 1, "{t:?}");
        assert_eq!((t.cap_eff, t.cap_prm), (0, 0), "{t:?} keeps capabilities");
        if is_root() {
            assert_eq!(t.cap_bnd, 0, "{t:?}: root empties the bounding set too");
        }
    }
    let main = ts
        .iter()
        .find(|t| t.name == PROGRAM)
        .expect("the main thread");
    // Each role installs two programs: its refusals (clone3 -> ENOSYS, openat -> EACCES) and
    // its allow-list. The signal thread starts before the main thread installs the control
    // filter, so it has only its own.
    assert_eq!(main.filters, 2, "{main:?}");
    for t in &ts {
        let want = match t.name.as_str() {
            PROGRAM | "signals" => 2,
            // The control thread of each port runs under the filter it inherited from the
            // main thread, which started it after confining itself.
            n if n.starts_with("port-") => main.filters,
            // A worker adds its own two at start (the VIRTIO framework's thread-start hook).
            n if n.starts_with("net-pair-") || n == "net-ctrl" => main.filters + 2,
            other => panic!("unexpected thread {other:?} in {ts:#?}"),
        };
        assert_eq!(t.filters, want, "{t:?}");
    }
    ts
}

/// The per-role counts of the startup summary (`control 41, worker 24, signals 21`).
fn filter_sizes(log: &str) -> Vec<(String, usize)> {
    let line = log
        .lines()
        .find(|l| l.contains("system calls per role: "))
        .unwrap_or_else(|| panic!("no sandbox summary in the log:\n{log}"));
    let list = line.split("system calls per role: ").nth(1).unwrap();
    list.trim_end_matches(')')
        .split(", ")
        .map(|part| {
            let (role, n) = part.split_once(' ').unwrap();
            (role.to_string(), n.parse().unwrap())
        })
        .collect()
}

#[test]
fn every_thread_of_a_serving_switch_runs_under_the_filter_of_its_role() {
    let mut sw = SwitchBackend::start("sbx-net-switch", 2, &["--queue-pairs", "2"]);
    let pid = sw.backend.child.id();
    let mut a = sw.connect(0, pairs(2));
    let mut b = sw.connect(1, pairs(2));
    traffic(&mut a, &mut b, 64);
    // Both devices are active: per port a control thread, a worker per pair and the
    // control-queue worker.
    check_threads(
        pid,
        &[
            (PROGRAM, 1),
            ("signals", 1),
            ("port-0", 1),
            ("port-1", 1),
            ("net-pair-0", 2),
            ("net-pair-1", 2),
            ("net-ctrl", 2),
        ],
    );
    // The queue-pair changes of the control queue, under the filters.
    assert_eq!(a.ctrl().unwrap().set_queue_pairs(1).unwrap(), CtrlAck::Ok);
    assert_eq!(a.ctrl().unwrap().set_queue_pairs(2).unwrap(), CtrlAck::Ok);
    traffic(&mut a, &mut b, 64);
    let log = sw.backend.log_text();
    let sizes = filter_sizes(&log);
    let size = |role: &str| sizes.iter().find(|(r, _)| r == role).unwrap().1;
    assert!(
        size("signals") < size("worker") && size("worker") < size("control"),
        "{sizes:?}"
    );
    assert!(log.contains("seccomp kill"), "{log}");
    assert!(log.contains("capabilities dropped"), "{log}");
    drop((a, b));
    let status = sw.backend.terminate();
    assert!(status.success(), "{status}\n{}", sw.backend.log_text());
    for s in &sw.sockets {
        assert!(!s.exists(), "{} is removed at exit", s.display());
    }
}

#[test]
fn the_namespace_sandbox_serves_the_switch_with_an_empty_root_and_no_network() {
    let max_user_ns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces");
    if max_user_ns.is_ok_and(|n| n.trim() == "0") {
        eprintln!("SKIP: this kernel allows no user namespaces (user.max_user_namespaces = 0)");
        return;
    }
    let mut sw = SwitchBackend::start("sbx-net-ns", 2, &["--sandbox", "namespace"]);
    let pid = sw.backend.child.id();
    let mut a = sw.connect(0, pairs(1));
    let mut b = sw.connect(1, pairs(1));
    traffic(&mut a, &mut b, 16);
    check_threads(pid, &[("port-0", 1), ("port-1", 1), ("net-pair-0", 2)]);
    let root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(root, ["proc"], "the backend's root holds only /proc");
    for ns in ["user", "mnt", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the backend has its own {ns} namespace");
    }
    drop((a, b));
    let status = sw.backend.terminate();
    assert!(status.success(), "{status}\n{}", sw.backend.log_text());
    for s in &sw.sockets {
        assert!(!s.exists(), "{} is removed at exit", s.display());
    }
}

#[test]
fn the_descriptor_limit_fits_every_queue_pair_of_every_port() {
    // Two ports of 64 pairs need more descriptors than one backend of the default limit
    // (1024) has: the limit grows with ports and pairs, and every pair of both ports runs.
    let sw = SwitchBackend::start("sbx-net-nofile", 2, &["--queue-pairs", "64"]);
    let pid = sw.backend.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no open-files limit in {limits}"));
    assert!(nofile > 1024, "RLIMIT_NOFILE {nofile}");
    // Small queues, so that 129 of them fit the driver's memory.
    let small = NetOptions {
        queue_size: 64,
        rx_buffers: 16,
        tx_slots: 8,
        ..pairs(64)
    };
    let connect_64 = |port: usize| {
        connect(
            SessionBuilder::new(&sw.sockets[port]).ram_size(128 << 20),
            small,
        )
    };
    let mut a = connect_64(0);
    let mut b = connect_64(1);
    traffic(&mut a, &mut b, 256);
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    assert!(
        open > 1024 && open < nofile,
        "{open} of {nofile} descriptors"
    );
    check_threads(pid, &[("net-pair-63", 2), ("net-ctrl", 2)]);
    eprintln!("two ports of 64 active pairs: {open} descriptors open, limit {nofile}");
}

#[test]
fn every_ports_socket_file_is_removed_even_when_the_backend_is_killed() {
    let mut sw = SwitchBackend::start("sbx-net-kill9", 3, &[]);
    let mut a = sw.connect(0, pairs(1));
    let mut b = sw.connect(1, pairs(1));
    traffic(&mut a, &mut b, 4);
    sw.backend.child.kill().unwrap();
    sw.backend.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sw.sockets.iter().any(|s| s.exists()) {
        assert!(
            Instant::now() < deadline,
            "the socket reapers left {:?}",
            sw.sockets.iter().filter(|s| s.exists()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---- TAP in a network namespace ----

const TAP: &str = "obsbx0";
const KERNEL_IP: [u8; 4] = [10, 78, 0, 1];
const DRIVER_IP: [u8; 4] = [10, 78, 0, 2];

static NETNS: AtomicUsize = AtomicUsize::new(0);

/// A network namespace this test made, deleted on drop.
struct Netns(String);

impl Netns {
    /// A new namespace, or `None` (with the reason printed) where the test cannot run.
    fn new(test: &str) -> Option<Netns> {
        if !is_root() {
            eprintln!("SKIP {test}: creating a network namespace and a TAP needs root");
            return None;
        }
        if !Path::new("/dev/net/tun").exists() {
            eprintln!("SKIP {test}: /dev/net/tun does not exist");
            return None;
        }
        let name = format!(
            "obsbx-{}-{}",
            std::process::id(),
            NETNS.fetch_add(1, Ordering::Relaxed)
        );
        sh("ip", &["netns", "add", &name]);
        let ns = Netns(name);
        // No IPv6 chatter on the TAP the backend creates.
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &ns.0,
                "sysctl",
                "-qw",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        Some(ns)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Gives the TAP the backend created the kernel's address.
    fn configure_tap(&self) {
        let mac = MAC_A.map(|b| format!("{b:02x}")).join(":");
        self.ip(&["addr", "add", "10.78.0.1/24", "dev", TAP]);
        self.ip(&["link", "set", TAP, "up"]);
        self.ip(&["neigh", "replace", "10.78.0.2", "lladdr", &mac, "dev", TAP]);
    }

    /// Waits until `ip -d link show` of the TAP contains `want`, while `backend` runs.
    fn waits_for_tap(&self, want: &str, backend: &mut Backend) {
        let deadline = Instant::now() + WAIT;
        loop {
            backend.assert_alive();
            let out = Command::new("ip")
                .args(["-n", &self.0, "-d", "link", "show", TAP])
                .output()
                .unwrap();
            let details = String::from_utf8_lossy(&out.stdout);
            if details.contains(want) {
                return;
            }
            assert!(Instant::now() < deadline, "no {want:?} in {details}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs a command, failing loudly; returns stdout.
fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kernel's ARP reply to the driver (on any pair), which proves both directions.
fn arp_round_trip(d: &mut NetDriver) {
    let req = arp_request(MAC_A, DRIVER_IP, KERNEL_IP);
    d.tx(0).unwrap().send(NetHdr::default(), &req).unwrap();
    d.tx(0).unwrap().flush().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no ARP reply from the kernel");
        for pair in 0..d.options().pairs {
            while let Some(p) = d.rx(pair).unwrap().try_recv().unwrap() {
                let reply = p.frame.len() >= 42
                    && p.frame[12..14] == [0x08, 0x06]
                    && p.frame[20..22] == [0, 2]
                    && p.frame[28..32] == KERNEL_IP;
                if reply {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_tap_backend_runs_every_thread_under_its_filter_in_both_sandboxes() {
    let Some(ns) = Netns::new("a_tap_backend_runs_every_thread_under_its_filter") else {
        return;
    };
    for sandbox in ["landlock", "namespace"] {
        let dir = TempDir::new("sbx-net-tap");
        let socket = dir.path("net.sock");
        let log = dir.path("backend.log");
        let args = [
            "--socket-path",
            socket.to_str().unwrap(),
            "--tap",
            TAP,
            "--queue-pairs",
            "2",
            "--mac",
            "52:54:00:00:00:0a",
            "--sandbox",
            sandbox,
        ];
        let mut backend = spawn_in(&ns, &[], &args, &socket, log);
        let pid = backend.child.id();
        // The backend made the TAP; it goes away with the backend's descriptors.
        ns.waits_for_tap("multi_queue", &mut backend);
        ns.configure_tap();
        // Activation sets the TAP's offloads (TUNSETOFFLOAD) and attaches both queues.
        let mut d = connect(SessionBuilder::new(&socket), pairs(2));
        ns.waits_for_tap("numqueues 2 numdisabled 0", &mut backend);
        arp_round_trip(&mut d);
        check_threads(
            pid,
            &[
                (PROGRAM, 1),
                ("signals", 1),
                ("port-0", 1),
                ("net-pair-0", 1),
                ("net-pair-1", 1),
                ("net-ctrl", 1),
            ],
        );
        // A pair worker detaches its queue and attaches it again (TUNSETQUEUE).
        assert_eq!(d.ctrl().unwrap().set_queue_pairs(1).unwrap(), CtrlAck::Ok);
        ns.waits_for_tap("numqueues 1 numdisabled 1", &mut backend);
        assert_eq!(d.ctrl().unwrap().set_queue_pairs(2).unwrap(), CtrlAck::Ok);
        ns.waits_for_tap("numqueues 2 numdisabled 0", &mut backend);
        arp_round_trip(&mut d);
        if sandbox == "namespace" {
            // The TAP descriptors keep the namespace they were attached in; the backend
            // itself has a new, empty one.
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
            let tap_ns = std::fs::metadata(format!("/run/netns/{}", ns.0))
                .unwrap()
                .ino();
            assert_ne!(
                theirs.to_string_lossy(),
                format!("net:[{tap_ns}]"),
                "the backend has its own network namespace"
            );
        }
        drop(d);
        backend.assert_alive();
        let status = backend.terminate();
        assert!(
            status.success(),
            "{sandbox}: {status}\n{}",
            backend.log_text()
        );
        assert!(!socket.exists(), "{sandbox}: the socket file is removed");
    }
}

#[test]
fn an_unprivileged_backend_serves_a_persistent_tap_its_user_owns() {
    const NOBODY: &str = "65534";
    let Some(ns) = Netns::new("an_unprivileged_backend_serves_a_persistent_tap") else {
        return;
    };
    // What a privileged manager does once: a multi-queue TAP that user 65534 may attach to
    // without CAP_NET_ADMIN, and a socket directory it may write.
    ns.ip(&[
        "tuntap",
        "add",
        "mode",
        "tap",
        "multi_queue",
        "vnet_hdr",
        "user",
        NOBODY,
        "name",
        TAP,
    ]);
    ns.configure_tap();
    let dir = TempDir::new("sbx-net-nobody");
    sh("chown", &[NOBODY, dir.0.to_str().unwrap()]);
    let socket = dir.path("net.sock");
    let args = [
        "--socket-path",
        socket.to_str().unwrap(),
        "--tap",
        TAP,
        "--queue-pairs",
        "2",
    ];
    let user = [
        "--reuid",
        NOBODY,
        "--regid",
        NOBODY,
        "--clear-groups",
        "--bounding-set",
        "-all",
    ];
    let mut backend = spawn_in(&ns, &user, &args, &socket, dir.path("backend.log"));
    let mut d = connect(SessionBuilder::new(&socket), pairs(2));
    arp_round_trip(&mut d);
    assert_eq!(d.ctrl().unwrap().set_queue_pairs(1).unwrap(), CtrlAck::Ok);
    ns.waits_for_tap("numqueues 1 numdisabled 1", &mut backend);
    assert_eq!(d.ctrl().unwrap().set_queue_pairs(2).unwrap(), CtrlAck::Ok);
    ns.waits_for_tap("numqueues 2 numdisabled 0", &mut backend);
    arp_round_trip(&mut d);
    check_threads(backend.child.id(), &[("net-pair-1", 1), ("net-ctrl", 1)]);
    drop(d);
    let status = backend.terminate();
    assert!(status.success(), "{status}\n{}", backend.log_text());
    assert!(!socket.exists(), "the socket file is removed");
}

/// Starts the backend inside `ns` (as the user `setpriv` makes of `user`, if any) and waits
/// for its socket. `ip netns exec` and `setpriv` exec the backend, which keeps their process
/// id.
fn spawn_in(ns: &Netns, user: &[&str], args: &[&str], socket: &Path, log: PathBuf) -> Backend {
    let log_file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0]);
    if !user.is_empty() {
        cmd.arg("setpriv").args(user);
    }
    let child = cmd
        .arg(binary(PROGRAM))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start the backend");
    let mut b = Backend {
        child,
        socket: socket.to_path_buf(),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        b.assert_alive();
        assert!(Instant::now() < deadline, "no socket:\n{}", b.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    b
}

// ---- violations ----

/// A two-port switch started with a self-test (`OUTBOARD_SANDBOX_SELFTEST`).
struct SelfTestRun {
    child: Child,
    log: PathBuf,
    sockets: Vec<PathBuf>,
    _dir: TempDir,
}

impl SelfTestRun {
    fn start(test: &str, extra: &[&str]) -> SelfTestRun {
        let dir = TempDir::new("sbx-net-selftest");
        let log = dir.path("backend.log");
        let sockets = vec![dir.path("port0.sock"), dir.path("port1.sock")];
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary(PROGRAM))
            .args(["--switch", "--mac", "52:54:00:00:00:0a"])
            .args(["--socket-path", sockets[0].to_str().unwrap()])
            .args(["--socket-path", sockets[1].to_str().unwrap()])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("OUTBOARD_SANDBOX_SELFTEST", test)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start vhost-user-net");
        SelfTestRun {
            child,
            log,
            sockets,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the backend survived its self-test:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the log contains `text`.
    fn wait_log(&mut self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the backend exited with {status} before logging {text:?}:\n{log}");
            }
            assert!(Instant::now() < deadline, "no {text:?} in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The report of the SIGSYS handler.
    fn violation_report(&mut self) -> String {
        let status = self.wait_exit();
        let log = self.log();
        assert_eq!(status.code(), Some(128 + libc::SIGSYS), "{status}:\n{log}");
        log.lines()
            .find(|l| l.starts_with("outboard-sandbox: seccomp violation"))
            .unwrap_or_else(|| panic!("no violation report:\n{log}"))
            .to_string()
    }
}

impl Drop for SelfTestRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_forbidden_syscall_kills_vhost_user_net_with_sigsys() {
    let mut run = SelfTestRun::start("forbidden-syscall", &[]);
    let status = run.wait_exit();
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "exit {status}:\n{}",
        run.log()
    );
    assert!(!status.core_dumped(), "no core dump (RLIMIT_CORE 0)");
    let log = run.log();
    assert!(
        log.contains("calling socket(AF_INET) on a control thread"),
        "{log}"
    );
    assert!(!log.contains("went through"), "{log}");
    // The reapers remove both sockets of the killed backend.
    let deadline = Instant::now() + Duration::from_secs(5);
    while run.sockets.iter().any(|s| s.exists()) {
        assert!(Instant::now() < deadline, "a socket file was left behind");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn trap_names_the_syscall_and_the_role_of_the_thread() {
    let nr = libc::SYS_socket;
    let mut run = SelfTestRun::start("forbidden-syscall", &["--seccomp", "trap"]);
    let report = run.violation_report();
    assert!(
        report.contains(&format!("system call {nr} (socket)")),
        "{report}"
    );
    assert!(report.contains("\"main\" (role control)"), "{report}");
    let mut run = SelfTestRun::start("forbidden-syscall-worker", &["--seccomp", "trap"]);
    let report = run.violation_report();
    assert!(report.contains("(socket)"), "{report}");
    assert!(
        report.contains("\"selftest-worker\" (role worker)"),
        "{report}"
    );
}

#[test]
fn log_mode_lets_the_call_through_and_the_switch_keeps_forwarding() {
    let mut run = SelfTestRun::start("forbidden-syscall", &["--seccomp", "log"]);
    run.wait_log("socket(AF_INET) went through");
    let mut a = connect(SessionBuilder::new(&run.sockets[0]), pairs(1));
    let mut b = connect(SessionBuilder::new(&run.sockets[1]), pairs(1));
    traffic(&mut a, &mut b, 8);
}

#[test]
fn landlock_refuses_to_open_a_path() {
    for args in [&["--seccomp", "none"][..], &[]] {
        let mut run = SelfTestRun::start("open-file", args);
        let log = run.wait_log("sandbox self-test: open");
        assert!(
            log.contains("opening / failed: Permission denied (os error 13)"),
            "{args:?}: {log}"
        );
    }
}
