//! DPDK as a vhost-user-net peer: `dpdk-testpmd` with two `net_virtio_user` ports (DPDK's
//! userspace virtio-net driver, a real vhost-user frontend that is not ours) on the two ports of
//! `vhost-user-net --switch`, generating UDP flows on both ports (`--forward-mode=flowgen`,
//! which also receives and counts), so that every packet crosses the switch from one port to
//! the other. The same harness runs against DPDK's own backend (`net_vhost`, a second testpmd
//! forwarding between its two ports) for comparison; `benches/net.rs` measures both.
//!
//! The backend and the frontend are pinned to different CPUs (busy-polling testpmd on CPU 1,
//! the backend on CPU 0). The tests need `dpdk-testpmd` (Debian package `dpdk-dev`, which
//! `.ci/run` installs); without it each test prints why and passes without running.

mod common;
mod dpdk;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, Backend, TempDir};
use dpdk::{find_testpmd, parse_totals, PortStats, Testpmd, TestpmdConfig};

/// One DPDK test at a time: each pins busy pollers to both CPUs.
static PINNED: std::sync::Mutex<()> = std::sync::Mutex::new(());

const MAC_0: &str = "52:54:00:00:00:0a";
const MAC_1: &str = "52:54:00:00:00:0b";
/// How long traffic runs.
const RUN: Duration = Duration::from_secs(3);

fn testpmd_or_skip(test: &str) -> Option<PathBuf> {
    let found = find_testpmd();
    if found.is_none() {
        eprintln!(
            "{test}: SKIP: dpdk-testpmd is not installed (apt-get install dpdk-dev; .ci/run does)"
        );
    }
    found
}

/// The CPU the backend runs on and the one testpmd's lcores run on.
fn cpus() -> (usize, usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n >= 2 {
        (0, 1)
    } else {
        (0, 0)
    }
}

/// `vhost-user-net --switch` with two ports, pinned to `cpu`.
fn start_switch(dir: &TempDir, cpu: usize, extra: &[&str]) -> (Backend, [PathBuf; 2]) {
    let socks = [dir.path("port0.sock"), dir.path("port1.sock")];
    let log = dir.path("backend.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(binary("vhost-user-net"));
    cmd.args(["--switch", "--mac", MAC_0])
        .args(["--socket-path", &socks[0].display().to_string()])
        .args(["--socket-path", &socks[1].display().to_string()])
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // sched_setaffinity, which is async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let mut set = nix::sched::CpuSet::new();
            set.set(cpu).map_err(std::io::Error::from)?;
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().expect("start vhost-user-net");
    let mut backend = Backend {
        child,
        socket: socks[0].clone(),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socks.iter().all(|s| s.exists()) {
        backend.assert_alive();
        assert!(Instant::now() < deadline, "vhost-user-net did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    (backend, socks)
}

/// testpmd with a `net_virtio_user` port on each socket, generating flows of `len`-byte
/// frames on both ports towards the other port's MAC.
fn frontend(
    testpmd: &Path,
    dir: &TempDir,
    socks: &[PathBuf; 2],
    cpu: usize,
    len: usize,
) -> Testpmd {
    Testpmd::start(
        testpmd,
        TestpmdConfig {
            name: "frontend".into(),
            lcores: format!("0@{cpu},1@{cpu}"),
            vdevs: socks
                .iter()
                .enumerate()
                .map(|(i, s)| format!("net_virtio_user{i},path={},queues=1", s.display()))
                .collect(),
            args: vec![
                "--forward-mode=flowgen".into(),
                "--nb-cores=1".into(),
                format!("--txpkts={len}"),
                format!("--eth-peer=0,{MAC_1}"),
                format!("--eth-peer=1,{MAC_0}"),
                "--total-num-mbufs=32768".into(),
            ],
            log: dir.path("frontend.log"),
        },
    )
}

/// Runs the frontend for [`RUN`] and checks that frames crossed in both directions: each
/// port received frames, never more than the other port sent.
fn traffic_crosses(what: &str, mut fe: Testpmd) -> Vec<(u64, u64, u64)> {
    fe.wait_for("packet forwarding - ports=", Duration::from_secs(30));
    let reports = fe.next_reports(RUN.as_secs() as usize, RUN * 10);
    let last: &Vec<PortStats> = reports.last().unwrap();
    let out = fe.stop();
    let totals = parse_totals(&out);
    assert_eq!(totals.len(), 2, "{what}: no totals for both ports:\n{out}");
    for (port, other) in [(0, 1), (1, 0)] {
        let (rx, _, _) = totals[port];
        let (_, tx_other, _) = totals[other];
        assert!(
            rx > 1000,
            "{what}: port {port} received {rx} frames (last report {:?}):\n{out}",
            last[port]
        );
        assert!(
            rx <= tx_other,
            "{what}: port {port} received {rx} frames but port {other} sent only {tx_other}"
        );
    }
    println!(
        "{what}: port 0 rx={} tx={} dropped={}; port 1 rx={} tx={} dropped={}",
        totals[0].0, totals[0].1, totals[0].2, totals[1].0, totals[1].1, totals[1].2
    );
    totals
}

fn switch_passes_traffic(test: &str, len: usize) {
    let Some(testpmd) = testpmd_or_skip(test) else {
        return;
    };
    let _one = PINNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (backend_cpu, frontend_cpu) = cpus();
    let dir = TempDir::new("net-dpdk");
    let (mut backend, socks) = start_switch(&dir, backend_cpu, &[]);
    let fe = frontend(&testpmd, &dir, &socks, frontend_cpu, len);
    traffic_crosses(test, fe);
    backend.assert_alive();
    // Both devices count what they carried and log it when their frontend goes away.
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.log_text().matches("tx_packets=").count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = backend.log_text();
    assert!(
        log.matches("tx_packets=").count() >= 2 && !log.contains("ERROR"),
        "{test}: backend log:\n{log}"
    );
    let status = backend.terminate();
    assert!(
        status.success(),
        "vhost-user-net exited with {status}:\n{log}"
    );
}

#[test]
fn testpmd_virtio_user_ports_exchange_64_byte_flows_through_the_switch() {
    switch_passes_traffic(
        "testpmd_virtio_user_ports_exchange_64_byte_flows_through_the_switch",
        64,
    );
}

#[test]
fn testpmd_virtio_user_ports_exchange_1514_byte_flows_through_the_switch() {
    switch_passes_traffic(
        "testpmd_virtio_user_ports_exchange_1514_byte_flows_through_the_switch",
        1514,
    );
}

#[test]
fn the_same_harness_runs_against_dpdks_own_vhost_backend() {
    let test = "the_same_harness_runs_against_dpdks_own_vhost_backend";
    let Some(testpmd) = testpmd_or_skip(test) else {
        return;
    };
    let _one = PINNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (backend_cpu, frontend_cpu) = cpus();
    let dir = TempDir::new("net-dpdk-vhost");
    let socks = [dir.path("vhost0.sock"), dir.path("vhost1.sock")];
    let mut backend = Testpmd::start(
        &testpmd,
        TestpmdConfig {
            name: "net-vhost".into(),
            lcores: format!("0@{backend_cpu},1@{backend_cpu}"),
            vdevs: socks
                .iter()
                .enumerate()
                .map(|(i, s)| format!("net_vhost{i},iface={},queues=1", s.display()))
                .collect(),
            args: vec![
                "--forward-mode=io".into(),
                "--nb-cores=1".into(),
                "--total-num-mbufs=32768".into(),
            ],
            log: dir.path("backend.log"),
        },
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socks.iter().all(|s| s.exists()) {
        backend.assert_alive();
        assert!(Instant::now() < deadline, "net_vhost did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fe = frontend(&testpmd, &dir, &socks, frontend_cpu, 64);
    traffic_crosses(test, fe);
    backend.assert_alive();
    let out = backend.stop();
    let totals = parse_totals(&out);
    assert_eq!(totals.len(), 2, "net_vhost backend totals:\n{out}");
    assert!(totals[0].0 > 0 && totals[1].1 > 0, "{totals:?}");
}

#[test]
fn testpmd_periodic_reports_and_totals_parse() {
    let out = "\
  ######################## NIC statistics for port 0  ########################
  RX-packets: 100        RX-missed: 0          RX-bytes:  6400
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 200        TX-errors: 0          TX-bytes:  12800

  Throughput (since last show)
  Rx-pps:           50          Rx-bps:        25600
  Tx-pps:           60          Tx-bps:        30720
  ############################################################################

  ######################## NIC statistics for port 1  ########################
  RX-packets: 300        RX-missed: 1          RX-bytes:  19200
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 400        TX-errors: 2          TX-bytes:  25600

  Throughput (since last show)
  Rx-pps:           70          Rx-bps:        35840
  Tx-pps:           80          Tx-bps:        40960
  ############################################################################
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 1000           RX-dropped: 0             RX-total: 1000
  TX-packets: 2000           TX-dropped: 5             TX-total: 2005
  ----------------------------------------------------------------------------
";
    let r = dpdk::parse_reports(out, 2);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0][0].rx_packets, 100);
    assert_eq!(r[0][0].tx_pps, 60);
    assert_eq!(r[0][1].rx_missed, 1);
    assert_eq!(r[0][1].tx_errors, 2);
    assert_eq!(r[0][1].rx_pps, 70);
    assert_eq!(parse_totals(out), vec![(1000, 2000, 5)]);
}
