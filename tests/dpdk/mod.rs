//! Running DPDK's `dpdk-testpmd` (Debian package `dpdk-dev`) as a vhost-user peer, for the
//! DPDK interoperability tests (`tests/net_dpdk.rs`) and the network benchmark
//! (`benches/net.rs`).
//!
//! - As a frontend: `--vdev net_virtio_user<i>,path=SOCK` is a virtio-net driver in userspace
//!   that connects to a vhost-user-net backend listening on SOCK.
//! - As a backend: `--vdev net_vhost<i>,iface=SOCK` is DPDK's own vhost-user-net backend, which
//!   listens on SOCK; with two such ports and `--forward-mode=io` it forwards between them like
//!   `vhost-user-net --switch` does between its two ports.
//!
//! No hugepages: `--no-huge -m 512` (DPDK backs the memory with a memfd, which vhost-user can
//! share). testpmd runs non-interactively with `--stats-period 1`: it prints every port's
//! counters and rates once a second until SIGINT, then the totals of the run.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

static PREFIX: AtomicUsize = AtomicUsize::new(0);

/// Where `dpdk-testpmd` is, if installed.
pub fn find_testpmd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OUTBOARD_TESTPMD") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("dpdk-testpmd"))
        .find(|p| p.exists())
}

/// What a testpmd process does.
#[derive(Clone, Debug)]
pub struct TestpmdConfig {
    /// For log names.
    pub name: String,
    /// `--lcores`: the main lcore and one forwarding lcore, e.g. `0@1,1@1` (both on CPU 1).
    pub lcores: String,
    /// `--vdev` arguments, one port each, in port order.
    pub vdevs: Vec<String>,
    /// testpmd's own arguments (after `--`); `--stats-period 1` is added.
    pub args: Vec<String>,
    /// Where stdout and stderr go (also kept in memory).
    pub log: PathBuf,
}

/// One port's counters in one stats report.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_missed: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_bytes: u64,
    pub rx_pps: u64,
    pub tx_pps: u64,
}

/// A running testpmd, interrupted and reaped on drop.
pub struct Testpmd {
    pub config: TestpmdConfig,
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Testpmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testpmd")
            .field("name", &self.config.name)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Testpmd {
    /// Starts testpmd.
    pub fn start(testpmd: &Path, config: TestpmdConfig) -> Testpmd {
        let prefix = format!(
            "outboard-{}-{}-{}",
            config.name,
            std::process::id(),
            PREFIX.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = Command::new(testpmd);
        cmd.args(["--lcores", &config.lcores])
            .args(["--no-huge", "-m", "512", "--no-pci", "--no-shconf"])
            .args(["--file-prefix", &prefix])
            // EAL's informational lines are noise here; warnings stay.
            .args(["--log-level", "lib.eal:warning"]);
        for v in &config.vdevs {
            cmd.args(["--vdev", v]);
        }
        cmd.arg("--")
            .args(&config.args)
            .args(["--stats-period", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", testpmd.display()));
        let output = Arc::new(Mutex::new(String::new()));
        let log = Arc::new(Mutex::new(
            std::fs::File::create(&config.log).expect("testpmd log file"),
        ));
        let mut readers = Vec::new();
        let stdout: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [stdout, stderr] {
            let output = output.clone();
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                use std::io::Write;
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log.lock().unwrap_or_else(PoisonError::into_inner), "{line}");
                    let mut out = output.lock().unwrap_or_else(PoisonError::into_inner);
                    out.push_str(&line);
                    out.push('\n');
                }
            }));
        }
        Testpmd {
            config,
            child,
            output,
            readers,
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics (with the output) if testpmd has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            self.join_readers();
            panic!(
                "{} exited with {status}:\n{}",
                self.config.name,
                self.output()
            );
        }
    }

    /// Waits until the output contains `text`, failing loudly after `timeout`.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(text) {
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{}: no '{text}' within {timeout:?}:\n{}",
                self.config.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The number of complete periodic stats reports printed so far.
    pub fn reports(&self) -> usize {
        parse_reports(&self.output(), self.config.vdevs.len()).len()
    }

    /// Waits until `n` reports more than now have been printed, and returns them.
    pub fn next_reports(&mut self, n: usize, timeout: Duration) -> Vec<Vec<PortStats>> {
        let ports = self.config.vdevs.len();
        let start = self.reports();
        let deadline = Instant::now() + timeout;
        loop {
            let all = parse_reports(&self.output(), ports);
            if all.len() >= start + n {
                return all[start..start + n].to_vec();
            }
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{}: {n} stats reports did not come within {timeout:?}:\n{}",
                self.config.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops testpmd with SIGINT (it prints the totals of the run and exits) and returns the
    /// whole output.
    pub fn stop(mut self) -> String {
        self.interrupt_and_reap();
        self.output()
    }

    fn interrupt_and_reap(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(15);
            while self.child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.join_readers();
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.interrupt_and_reap();
    }
}

fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    line[at..].split_whitespace().next()?.parse().ok()
}

/// The periodic "NIC statistics" reports in `output`: one entry per report, each with the
/// stats of every port (reports that do not cover all `ports` are left out).
pub fn parse_reports(output: &str, ports: usize) -> Vec<Vec<PortStats>> {
    let mut reports = Vec::new();
    let mut current: Vec<PortStats> = Vec::new();
    let mut port: Option<PortStats> = None;
    for line in output.lines() {
        if line.contains("NIC statistics for port") {
            let index: usize = line
                .split("port")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(usize::MAX);
            if index == 0 && !current.is_empty() {
                current.clear();
            }
            port = Some(PortStats::default());
            continue;
        }
        let Some(p) = port.as_mut() else { continue };
        if let Some(v) = field(line, "RX-packets:") {
            p.rx_packets = v;
            p.rx_missed = field(line, "RX-missed:").unwrap_or(0);
            p.rx_bytes = field(line, "RX-bytes:").unwrap_or(0);
        } else if let Some(v) = field(line, "TX-packets:") {
            p.tx_packets = v;
            p.tx_errors = field(line, "TX-errors:").unwrap_or(0);
            p.tx_bytes = field(line, "TX-bytes:").unwrap_or(0);
        } else if let Some(v) = field(line, "Rx-pps:") {
            p.rx_pps = v;
        } else if let Some(v) = field(line, "Tx-pps:") {
            p.tx_pps = v;
        } else if line.trim_start().starts_with("#####") && !line.contains("statistics") {
            current.push(port.take().unwrap_or_default());
            if current.len() == ports {
                reports.push(std::mem::take(&mut current));
            }
        }
    }
    reports
}

/// The totals testpmd prints when it stops ("Forward statistics for port N"): per port, the
/// RX and TX packet counts and the TX drops.
pub fn parse_totals(output: &str) -> Vec<(u64, u64, u64)> {
    let mut totals = Vec::new();
    let mut in_port = false;
    let mut cur = (0, 0, 0);
    for line in output.lines() {
        if line.contains("Forward statistics for port") {
            in_port = true;
            cur = (0, 0, 0);
        } else if in_port && line.contains("RX-packets:") {
            cur.0 = field(line, "RX-packets:").unwrap_or(0);
        } else if in_port && line.contains("TX-packets:") {
            cur.1 = field(line, "TX-packets:").unwrap_or(0);
            cur.2 = field(line, "TX-dropped:").unwrap_or(0);
            totals.push(cur);
            in_port = false;
        }
    }
    totals
}
