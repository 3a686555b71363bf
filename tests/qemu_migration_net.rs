//! Real QEMU live migration of a guest on `vhost-user-net`: two QEMU 7.2 instances (TCG) on this
//! host, each with its own `vhost-user-net` process on its own TAP. Both TAPs are ports of a
//! bridge in a network namespace the test creates, which also holds the peer address, so the
//! guest keeps its address and its connections when it moves from one TAP to the other (the
//! bridge learns the guest's MAC on the new port from the guest's first frame). The guest keeps a
//! ping, a stream to the peer and a stream from the peer running across the migration: pings
//! lost during the switch-over are counted and bounded, and both streams must arrive whole (byte
//! counts and SHA-256; the stream from the peer lands in receive buffers the device fills while
//! QEMU copies guest RAM, so a receive write missing from the dirty log would show up as stale
//! bytes). `tests/guest/run-migrate-net.sh`, `tests/guest/migrate-net-guest.sh`.
//!
//! Two queue pairs (`mq=on`, two vCPUs): four rings stop and move. QEMU 7.2 migrates
//! vhost-user-net through its own virtio state and the vring bases; the control queue is QEMU's
//! own. The backend's part is dirty logging and reporting the right ring
//! positions when QEMU stops it.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, Backend, TempDir};

/// The script bounds each QEMU with `timeout`; this is the test's own limit on top.
const RUN_LIMIT: Duration = Duration::from_secs(300);
const MAC: &str = "52:54:00:12:34:56";
const PEER_IP: &str = "10.79.0.1";
const GUEST_IP: &str = "10.79.0.2";
/// Pings (one every 0.2 s) that may go unanswered around the switch-over.
const MAX_LOST_PINGS: u32 = 25;
/// Queue pairs (the guest has 2 vCPUs, so it uses both): four rings move.
const PAIRS: u16 = 2;

/// Why the machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("creating a network namespace, TAPs and a bridge needs root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun does not exist".into());
    }
    let dir = std::env::var("OUTBOARD_GUEST_DIR").unwrap_or("/var/cache/outboard-guest".into());
    if !Path::new(&dir).join("env.sh").exists() {
        return Some(format!(
            "no guest assets in {dir}: run tests/guest/setup.sh (as root) first"
        ));
    }
    for tool in ["ip", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// A network namespace, deleted (with its bridge and any TAP left) on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

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

/// Starts `vhost-user-net` on TAP `tap` inside `ns` (`ip netns exec` execs it, so the child's
/// pid is the backend's), with debug logging (the log records every vhost-user message), and
/// waits until it listens.
fn start_backend(dir: &TempDir, ns: &Netns, side: &str, tap: &str) -> Backend {
    let sock = dir.path(&format!("{side}.sock"));
    let log = dir.path(&format!("{side}-backend.log"));
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(binary("vhost-user-net"))
        .args(["--tap", tap, "--socket-path", &sock.display().to_string()])
        .args(["--mac", MAC, "--queue-pairs", &PAIRS.to_string()])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start vhost-user-net in the namespace");
    let mut backend = Backend {
        child,
        socket: sock.clone(),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        backend.assert_alive();
        assert!(Instant::now() < deadline, "{side} backend did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    backend
}

/// Runs `script` with `args`, stopping it after `limit`; returns its status (`None`: stopped),
/// stdout and stderr.
fn run_bounded(
    script: &str,
    args: &[String],
    envs: &[(&str, String)],
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let mut child = Command::new("bash")
        .arg(script)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the migration script");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let grace = Instant::now() + Duration::from_secs(15);
            while child.try_wait().unwrap().is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    (status, out_t.join().unwrap(), err_t.join().unwrap())
}

/// The `MIGRATION key value…` lines of the script's output.
fn fact(stdout: &str, key: &str) -> String {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("MIGRATION "))
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no MIGRATION {key} in the output:\n{stdout}"))
        .to_string()
}

/// The vhost-user requests in a backend's debug log, in order.
fn requests(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once("request Some(").map(|(_, r)| r))
        .filter_map(|r| r.split_once(')').map(|(name, _)| name.to_string()))
        .collect()
}

/// Whether a guest console in `guest_out` shows a guest kernel panic.
fn guest_panicked(guest_out: &std::path::Path) -> bool {
    ["src-console.log", "dst-console.log"].iter().any(|f| {
        std::fs::read_to_string(guest_out.join(f)).is_ok_and(|t| t.contains("Kernel panic"))
    })
}

#[test]
fn qemu_live_migration_of_vhost_user_net_keeps_ping_and_streams_going() {
    if let Some(reason) = missing() {
        eprintln!("SKIP qemu net migration test: {reason}");
        return;
    }
    // Open problem (issue 5): in 2 of ~44 runs on a busy 2-CPU machine the destination guest's
    // kernel panicked right after the switch-over (list corruption in net_rx_action) with every
    // check of ours passing. It is QEMU 7.2's TCG migration losing guest memory, not this
    // backend: with run-migrate-net.sh's RAM check (OUTBOARD_MIGRATE_NET_RAM_CHECK=1, both
    // sides paused and compared after the load) the destination's RAM differed from the
    // source's in 2 of 26 control runs on QEMU's own virtio-net (OUTBOARD_MIGRATE_NET_NETDEV=tap,
    // no vhost-user), both guests then failing (an RCU stall, an RCU warning; one lost write was
    // in vCPU 1's per-CPU area, where softnet_data lives), and in 2 of 28 runs on vhost-user-net,
    // every differing page (1-176 bytes) outside the rings and the posted receive buffers. Such
    // a run is reported and run once more; any other failure, or a second panic, fails the test. OUTBOARD_MIGRATE_NET_NO_RETRY=1 makes
    // the first panic fail the test (for counting panics over repeated runs).
    let retry = std::env::var_os("OUTBOARD_MIGRATE_NET_NO_RETRY").is_none_or(|v| v != "1");
    if !migrate_once(1) {
        assert!(
            retry,
            "the guest kernel panicked after the switch-over (no retry: OUTBOARD_MIGRATE_NET_NO_RETRY=1)"
        );
        eprintln!(
            "WARNING: the destination guest's kernel panicked after the switch-over (open \
             problem, see the comment above); running the migration once more"
        );
        assert!(
            migrate_once(2),
            "the guest kernel panicked after the switch-over twice in a row"
        );
    }
}

/// One migration run. Returns false, on the first attempt only, when it failed because a
/// guest kernel panicked; panics on any other failure.
fn migrate_once(attempt: u32) -> bool {
    let dir = TempDir::new("qemu-migration-net");
    let id = std::process::id() % 100_000;
    let ns = Netns::new(format!("obmig-{id}"));
    let (src_tap, dst_tap, bridge) = (
        format!("obms{id}"),
        format!("obmd{id}"),
        format!("obmb{id}"),
    );
    let mut src = start_backend(&dir, &ns, "src", &src_tap);
    let mut dst = start_backend(&dir, &ns, "dst", &dst_tap);
    ns.ip(&["link", "add", &bridge, "type", "bridge"]);
    for tap in [&src_tap, &dst_tap] {
        ns.ip(&["link", "set", tap, "master", &bridge]);
        ns.ip(&["link", "set", tap, "up"]);
    }
    ns.ip(&["addr", "add", &format!("{PEER_IP}/24"), "dev", &bridge]);
    ns.ip(&["link", "set", &bridge, "up"]);

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/guest/run-migrate-net.sh"
    );
    let guest_out: PathBuf = dir.path("guest");
    let started = Instant::now();
    let (status, stdout, stderr) = run_bounded(
        script,
        &[
            src.socket.display().to_string(),
            dst.socket.display().to_string(),
            ns.0.clone(),
            PEER_IP.into(),
            GUEST_IP.into(),
            MAC.into(),
            PAIRS.to_string(),
        ],
        &[
            ("OUTBOARD_SRC_BACKEND_PID", src.child.id().to_string()),
            ("OUTBOARD_DST_BACKEND_PID", dst.child.id().to_string()),
            ("OUTBOARD_GUEST_OUT", guest_out.display().to_string()),
            ("OUTBOARD_GUEST_TIMEOUT", "240".into()),
            ("OUTBOARD_MIGRATE_NET_MAX_LOST", MAX_LOST_PINGS.to_string()),
        ],
        RUN_LIMIT,
    );
    let elapsed = started.elapsed();
    println!("{stdout}");
    let logs = || {
        format!(
            "{stderr}\n--- source backend log (tail) ---\n{}\n--- destination backend log (tail) ---\n{}",
            tail(&src.log_text(), 30),
            tail(&dst.log_text(), 30)
        )
    };
    let Some(status) = status else {
        let logs = logs();
        panic!(
            "the migration run did not end within {RUN_LIMIT:?} (logs kept in {}):\n{stdout}\n{logs}",
            keep(&dir, attempt).display()
        )
    };
    if !(status.success() && stdout.contains("run-migrate-net: PASS")) {
        if attempt == 1 && guest_panicked(&guest_out) {
            let kept = keep(&dir, attempt);
            eprintln!(
                "attempt {attempt}: guest kernel panic (logs kept in {}):\n{}",
                kept.display(),
                tail(&stdout, 20)
            );
            return false;
        }
        let logs = logs();
        panic!(
            "guest migration failed ({status}) after {elapsed:?} (logs kept in {}):\n{stdout}\n{logs}",
            keep(&dir, attempt).display()
        );
    }
    // The script checked these; the test states them.
    let ping = fact(&stdout, "ping");
    let lost: u32 = ping
        .split_whitespace()
        .find_map(|w| w.strip_prefix("lost="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no lost count in `{ping}`"));
    assert!(lost <= MAX_LOST_PINGS, "{ping}");
    let stream = fact(&stdout, "stream-bytes-sent");
    let words: Vec<&str> = stream.split_whitespace().collect();
    assert_eq!(words.first(), words.get(2), "guest → peer stream: {stream}");
    let pull = fact(&stdout, "pull-bytes-sent");
    assert!(pull.ends_with("sha256-match yes"), "peer → guest: {pull}");
    println!(
        "migration: total {} ms, downtime {} ms; ping {ping} (lost seqs {}); guest→peer {stream}; peer→guest {pull}; receive queues on the destination: {}; whole run {elapsed:.1?}",
        fact(&stdout, "total-time-ms"),
        fact(&stdout, "downtime-ms"),
        fact(&stdout, "ping_lost_seqs"),
        fact(&stdout, "rx_queues"),
    );

    // The source backend logged dirty pages for the migration and its rings were stopped
    // after: receive and transmit (QEMU keeps the control queue).
    let src_status = src.wait_exit(Duration::from_secs(10));
    assert!(src_status.success(), "source backend: {src_status}");
    let src_log = src.log_text();
    assert!(
        src_log.contains("dirty logging on"),
        "{}",
        tail(&src_log, 40)
    );
    let src_reqs = requests(&src_log);
    let log_base = src_reqs
        .iter()
        .position(|r| r == "SET_LOG_BASE")
        .expect("SET_LOG_BASE in the source log");
    let stops = src_reqs[log_base..]
        .iter()
        .filter(|r| *r == "GET_VRING_BASE")
        .count();
    assert!(
        stops >= 2 * usize::from(PAIRS),
        "a GET_VRING_BASE per ring after logging started: {:?}",
        &src_reqs[log_base..]
    );
    // The destination took over the rings and still serves.
    dst.assert_alive();
    let dst_reqs = requests(&dst.log_text());
    assert!(
        dst_reqs.iter().filter(|r| *r == "SET_VRING_BASE").count() >= 2 * usize::from(PAIRS),
        "the destination never started its rings: {dst_reqs:?}"
    );
    let dst_status = dst.terminate();
    assert!(dst_status.success(), "destination backend: {dst_status}");
    true
}

/// Moves the test's directory (guest consoles and results, backend logs) out of the way of its
/// removal, for a failure to be looked at; returns where it went. Named by process and attempt:
/// a second attempt's failure must not collide with the first's kept directory (the rename
/// would fail, and the directory would be removed with the logs in it).
fn keep(dir: &TempDir, attempt: u32) -> PathBuf {
    let kept = std::env::temp_dir().join(format!(
        "outboard-qemu-migration-net-failed-{}-{attempt}",
        std::process::id()
    ));
    match std::fs::rename(&dir.0, &kept) {
        Ok(()) => kept,
        Err(_) => dir.0.clone(),
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
