//! Real Linux guests (QEMU 7.2, TCG) on `vhost-user-net`: the guests' own virtio-net drivers
//! (`virtio-net-pci`, `-netdev vhost-user`) exchange traffic through the backend, and every
//! stream is checked with sha256 at both ends (`tests/guest/net-guest.sh`, judged by
//! `tests/guest/run-net.sh`).
//!
//! - Two guests at once on the two ports of one `vhost-user-net --switch`: ping both ways,
//!   promiscuous mode, a live MAC change that the switch follows, one TCP stream each way at
//!   once; with two queue pairs also `ethtool -L combined 1` / `combined 2`, the per-queue
//!   receive counters showing which pairs the backend delivers to.
//! - One guest on `vhost-user-net --tap` whose TAP lives in a network namespace this test
//!   creates: ping the namespace's address, and a stream each way with checksums.
//!
//! The assets come from `tests/guest/setup.sh`, which `scripts/test.sh` runs first (as root).
//! The guests run one at a time (two QEMUs under TCG already fill the two cores).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::{binary, Backend, TempDir};

/// One guest test at a time.
static GUESTS: Mutex<()> = Mutex::new(());
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The MAC base of the backend; run-net.sh gives QEMU the same addresses (port 0 `:0a`,
/// port 1 `:0b`): QEMU keeps the config space, the backend's filter must agree with it.
const MAC_BASE: &str = "52:54:00:00:00:0a";

fn assets_ready(test: &str) -> bool {
    let dir = std::env::var("OUTBOARD_GUEST_DIR").unwrap_or("/var/cache/outboard-guest".into());
    if !Path::new(&dir).join("env.sh").exists() {
        // Only a machine that cannot install the assets (not root) gets here; scripts/test.sh
        // installs them everywhere else.
        eprintln!(
            "{test}: SKIP: no guest assets in {dir}: run tests/guest/setup.sh (as root) first"
        );
        return false;
    }
    true
}

fn script(name: &str) -> String {
    format!("{}/tests/guest/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `tests/guest/run-net.sh` with `args` and fails loudly unless every check passed.
fn run_guests(what: &str, args: &[String], backend: &mut Backend, dir: &TempDir, stream_mib: u32) {
    let out = Command::new("bash")
        .arg(script("run-net.sh"))
        .args(args)
        .env("OUTBOARD_BACKEND_PID", backend.child.id().to_string())
        .env("OUTBOARD_GUEST_OUT", dir.path("guest"))
        .env("OUTBOARD_NET_STREAM_MIB", stream_mib.to_string())
        .env("OUTBOARD_GUEST_TIMEOUT", "240")
        .output()
        .expect("run tests/guest/run-net.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{what}: guest checks failed ({}):\n{stdout}\n{}\n--- backend log ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        backend.log_text()
    );
    assert!(stdout.contains("run-net: PASS"), "{what}: {stdout}");
    backend.assert_alive();
    let status = backend.terminate();
    assert!(
        status.success(),
        "{what}: vhost-user-net exited with {status} on SIGTERM:\n{}",
        backend.log_text()
    );
}

/// Two guests on one `--switch` with `pairs` queue pairs per port.
fn two_guests_on_a_switch(test: &str, pairs: u16, stream_mib: u32) {
    if !assets_ready(test) {
        return;
    }
    let _one = GUESTS.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = TempDir::new("net-guest");
    let a = dir.path("a.sock");
    let b = dir.path("b.sock");
    let mut backend = Backend::start(
        "vhost-user-net",
        &a,
        &[
            "--switch".into(),
            "--socket-path".into(),
            a.display().to_string(),
            "--socket-path".into(),
            b.display().to_string(),
            "--mac".into(),
            MAC_BASE.into(),
            "--queue-pairs".into(),
            pairs.to_string(),
        ],
        dir.path("backend.log"),
    );
    wait_for(&b, &mut backend);
    run_guests(
        test,
        &[
            "pair".into(),
            a.display().to_string(),
            b.display().to_string(),
            pairs.to_string(),
        ],
        &mut backend,
        &dir,
        stream_mib,
    );
}

fn wait_for(socket: &Path, backend: &mut Backend) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        backend.assert_alive();
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn two_linux_guests_on_one_switch_ping_change_mac_and_stream_128_mib() {
    // 64 MiB each way at once: ~60 s under TCG.
    two_guests_on_a_switch(
        "two_linux_guests_on_one_switch_ping_change_mac_and_stream_128_mib",
        1,
        64,
    );
}

#[test]
fn two_linux_guests_on_one_switch_choose_their_queue_pairs_with_ethtool() {
    // QEMU starts one vhost device per queue pair on the one connection (and sends each memory
    // region once per pair); the guests switch between one and two pairs with ethtool -L.
    two_guests_on_a_switch(
        "two_linux_guests_on_one_switch_choose_their_queue_pairs_with_ethtool",
        2,
        16,
    );
}

/// Starts `vhost-user-net` with `args` inside the network namespace `ns` (`ip netns exec`
/// execs it, so the child's pid is the backend's) and waits until it listens on `socket`.
fn backend_in_netns(ns: &str, socket: &Path, args: &[&str], log: PathBuf) -> Backend {
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(binary("vhost-user-net"))
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start vhost-user-net in the namespace");
    let mut backend = Backend {
        child,
        socket: socket.to_path_buf(),
        log,
    };
    wait_for(socket, &mut backend);
    backend
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn linux_guest_on_a_tap_reaches_its_network_namespace() {
    let test = "linux_guest_on_a_tap_reaches_its_network_namespace";
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("{test}: SKIP: creating a network namespace and a TAP needs root");
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("{test}: SKIP: /dev/net/tun does not exist");
        return;
    }
    if !assets_ready(test) {
        return;
    }
    let _one = GUESTS.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = TempDir::new("net-guest-tap");
    let ns = Netns(format!(
        "obguest-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let st = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .unwrap();
    assert!(st.success(), "ip netns add {}", ns.0);
    ns.ip(&["link", "set", "lo", "up"]);
    // The backend opens (creates) the TAP in the namespace it runs in: run it there. QEMU
    // connects over the unix socket from here.
    let sock = dir.path("tap.sock");
    let mut backend = backend_in_netns(
        &ns.0,
        &sock,
        &[
            "--tap",
            "obtap0",
            "--socket-path",
            &sock.display().to_string(),
            "--mac",
            MAC_BASE,
        ],
        dir.path("backend.log"),
    );
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "obtap0"]);
    ns.ip(&["link", "set", "obtap0", "up"]);
    run_guests(
        test,
        &[
            "tap".into(),
            sock.display().to_string(),
            ns.0.clone(),
            "10.78.0.1".into(),
            "10.78.0.2".into(),
            "1".into(),
        ],
        &mut backend,
        &dir,
        64,
    );
}
