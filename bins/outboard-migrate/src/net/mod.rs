//! The virtio-net mode: two ports of one backend process (a switch, or anything that forwards
//! between two vhost-user-net sockets), each driven by the runner as a separate frontend, with
//! numbered frames flowing both ways, and the whole backend migrated to a fresh process.
//!
//! **Frames.** Each payload is self-describing: a magic, the direction, a sequence number, the
//! frame's length and a CRC-32 over all of it; the length varies with the number (60 to 1514
//! bytes). A receiver expects exactly the next number of its direction: a higher one proves
//! frames lost, a lower one a duplicate or a reordering, a bad CRC corruption.
//!
//! **What "accepted" means.** A frame is accepted when the device puts its transmit chain in the
//! used ring. Every accepted frame must reach the peer's receive ring exactly once and in order,
//! across any number of migrations, provided the peer's driver has a buffer for it (a receiver
//! without buffers drops, as a NIC does). The workload keeps each direction's window (frames
//! sent and not yet received) below the receive buffers the peer posts and below the switch's
//! queue, so that any loss is the migration's. At the end every frame sent has been accepted
//! and must have arrived.
//!
//! **Stopping a switch.** A frame taken from a transmit ring sits in the switch until the
//! receiving port's worker places it. The device places what its backend holds for a port
//! before that port's receive queue stops (GET_VRING_BASE replies after it, as far as the
//! driver posted buffers). A switch process moves as a whole, so the runner stops every port's
//! transmit queue before any receive queue (nothing enters the switch any more, and every
//! receive queue then empties it), and on the destination starts every receive queue, and waits
//! for a reply on every port (DRIVER_OK has none, and each port has its own control thread),
//! before any transmit queue: no frame reaches a port that is not up yet (the switch drops
//! those, as a real one does; without the wait 16 of 16 864 frames were lost in 100 migrations).
//! Frames still in a transmit ring (avail past the base) are taken by the destination.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outboard_frontend::migration::{migration_protocol_features, DirtyLog, LOG_PAGE_SIZE};
use outboard_frontend::{NetDriver, NetHdr, NetOptions, RxPacket, SessionBuilder};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::VhostBackend;

mod frames;

use crate::backend::{self, BackendProcess};
use crate::hop::{DirtyCheck, Hop, Outcome, Tamper};
use crate::report::{Case, FrameCounts, Progress, Report};
use frames::{numbered_frame, parse_frame};

/// Frames of one direction sent and not yet received.
const WINDOW: u64 = 96;
/// Frames published without a kick before a stop, on top of the window.
const UNKICKED: u64 = 8;
/// Receive buffers each port keeps posted (more than [`WINDOW`] + [`UNKICKED`]).
const RX_BUFFERS: u16 = 160;
/// The queue indices of the one pair the runner drives, and the control queue.
const RX: u16 = 0;
const TX: u16 = 1;
const CTRL: u16 = 2;

/// One port: the driver on its socket, what it sent and received, and its dirty log.
struct Port {
    name: &'static str,
    d: NetDriver,
    /// Frames added to the transmit ring (the next number to send).
    sent: u64,
    /// The next number expected from the peer.
    expect: u64,
    received: u64,
    log: Option<DirtyLog>,
    /// Pages the device wrote since the last check (receive buffers).
    pages: BTreeMap<u64, &'static str>,
    /// Used indices (receive, transmit) at the last check.
    used_start: [u16; 2],
    labels: &'static PageLabels,
}

/// What a page the device wrote holds, per port, for reports.
struct PageLabels {
    buffer: &'static str,
    used_idx: &'static str,
    used_ring: &'static str,
}

const LABELS: [PageLabels; 2] = [
    PageLabels {
        buffer: "port A receive buffer",
        used_idx: "port A used index",
        used_ring: "port A used ring",
    },
    PageLabels {
        buffer: "port B receive buffer",
        used_idx: "port B used index",
        used_ring: "port B used ring",
    },
];

impl Port {
    fn used_idx(&mut self) -> [u16; 2] {
        let rx = self.d.rx(0).expect("pair 0").driver_queue_mut().used_idx();
        let tx = self.d.tx(0).expect("pair 0").driver_queue_mut().used_idx();
        [rx, tx]
    }

    fn dirty_logging(&mut self) -> bool {
        self.log.is_some() && self.d.session().supports_dirty_log()
    }
}

/// Counters and findings of the frame workload.
struct Frames {
    counts: FrameCounts,
    violations: Vec<String>,
}

/// The two ports and the workload.
struct NetRun<'a> {
    dir: &'a Path,
    seq: &'a mut u32,
    timeout: Duration,
    ports: [Port; 2],
    frames: Frames,
    source: BackendProcess,
    hops: Vec<Hop>,
}

fn spawn(
    dir: &Path,
    seq: &mut u32,
    template: &str,
    timeout: Duration,
) -> anyhow::Result<BackendProcess> {
    *seq += 1;
    let socks: Vec<PathBuf> = (0..2)
        .map(|p| dir.join(format!("backend-{seq}-port{p}.sock")))
        .collect();
    let log = dir.join(format!("backend-{seq}.log"));
    let cmd = backend::expand(template, &socks, None);
    BackendProcess::start(&cmd, &socks, &log, timeout)
}

impl<'a> NetRun<'a> {
    fn start(
        dir: &'a Path,
        seq: &'a mut u32,
        template: &str,
        timeout: Duration,
        report: &mut Report,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            template.contains("{sock0}") && template.contains("{sock1}"),
            "the net mode drives two ports: put `{{sock0}}` and `{{sock1}}` in --backend where their socket paths go (e.g. 'vhost-user-net --switch --socket-path {{sock0}} --socket-path {{sock1}}')"
        );
        let source = spawn(dir, seq, template, timeout)?;
        let opts = NetOptions {
            rx_buffers: RX_BUFFERS,
            tx_slots: 128,
            timeout,
            ..NetOptions::default()
        };
        let connect = |i: usize, report: &mut Report| -> anyhow::Result<Port> {
            let builder = SessionBuilder::new(&source.socks[i])
                .protocol_features(migration_protocol_features())
                .io_timeout(Some(timeout));
            let d = match NetDriver::connect(builder, opts) {
                Ok(d) => d,
                Err(e) => {
                    let e = anyhow::Error::new(e);
                    if format!("{e:#}").contains("CONFIG protocol feature") {
                        report.notes.push("the backend lacks the CONFIG protocol feature: the runner's driver reads the MAC, status and queue pairs from the device's config space (a VMM that emulates the config space itself, as QEMU does for DPDK, is needed to drive it)".into());
                    }
                    return Err(
                        e.context(format!("cannot set up port {i} of `{}`", source.command))
                    );
                }
            };
            Ok(Port {
                name: ["A", "B"][i],
                d,
                sent: 0,
                expect: 0,
                received: 0,
                log: None,
                pages: BTreeMap::new(),
                used_start: [0; 2],
                labels: &LABELS[i],
            })
        };
        let mut ports = [connect(0, report)?, connect(1, report)?];
        describe_peer(&mut ports[0], template, report);
        for p in &mut ports {
            if p.d.session().supports_dirty_log() {
                let log = DirtyLog::for_ram(p.d.session().ram())?;
                p.d.session().start_dirty_log(&log)?;
                p.log = Some(log);
                p.used_start = p.used_idx();
            }
        }
        Ok(NetRun {
            dir,
            seq,
            timeout,
            ports,
            frames: Frames {
                counts: FrameCounts::default(),
                violations: Vec::new(),
            },
            source,
            hops: Vec::new(),
        })
    }

    /// Adds frames to each transmit ring while its window allows (and, with `goals`, up to
    /// each port's goal); kicks if `kick`.
    fn fill(&mut self, goals: Option<[u64; 2]>, kick: bool) -> anyhow::Result<()> {
        for src in 0..2 {
            let peer_got = self.ports[1 - src].expect;
            let p = &mut self.ports[src];
            let mut added = false;
            while p.sent - peer_got < WINDOW && goals.is_none_or(|g| p.sent < g[src]) {
                let f = numbered_frame(src as u8, p.sent);
                p.d.tx(0)?.add(NetHdr::default(), &f)?;
                p.sent += 1;
                added = true;
            }
            if added && kick {
                p.d.tx(0)?.kick()?;
            }
            p.d.tx(0)?.reap()?;
        }
        Ok(())
    }

    /// Adds up to `n` more frames to each transmit ring (past the window if need be) and
    /// publishes them without notifying the device.
    fn publish_unkicked(&mut self, n: u64) -> anyhow::Result<()> {
        for (src, p) in self.ports.iter_mut().enumerate() {
            for _ in 0..n {
                let f = numbered_frame(src as u8, p.sent);
                p.d.tx(0)?.add(NetHdr::default(), &f)?;
                p.sent += 1;
            }
            p.d.tx(0)?.driver_queue_mut().publish();
        }
        Ok(())
    }

    /// Takes every frame the ports have received, waiting up to `wait` if none has arrived, and
    /// checks each. Returns how many arrived.
    fn receive(&mut self, wait: Duration) -> anyhow::Result<u64> {
        let mut got = self.take_received()?;
        if got == 0 && !wait.is_zero() {
            if let Some(packet) = self.ports[1].d.rx(0)?.recv(wait)? {
                self.check(1, packet);
                got = 1 + self.take_received()?;
            }
        }
        Ok(got)
    }

    /// Takes every frame already in the ports' used rings.
    fn take_received(&mut self) -> anyhow::Result<u64> {
        let mut got = 0;
        for i in 0..2 {
            while let Some(packet) = self.ports[i].d.rx(0)?.try_recv()? {
                self.check(i, packet);
                got += 1;
            }
        }
        Ok(got)
    }

    /// Checks a frame port `i` received: the next of its peer's, intact. Notes the pages the
    /// device wrote for it.
    fn check(&mut self, i: usize, packet: RxPacket) {
        let p = &mut self.ports[i];
        if p.log.is_some() {
            for &(gpa, len) in &packet.written {
                let end = gpa + u64::from(len.max(1)) - 1;
                for page in gpa / LOG_PAGE_SIZE..=end / LOG_PAGE_SIZE {
                    p.pages.insert(page, p.labels.buffer);
                }
            }
        }
        let (name, expect) = (p.name, p.expect);
        let v = &mut self.frames.violations;
        let c = &mut self.frames.counts;
        match parse_frame(&packet.frame) {
            Err(e) => {
                c.corrupt += 1;
                v.push(format!("port {name} received {e}"));
            }
            Ok((dir, _)) if usize::from(dir) == i => {
                c.corrupt += 1;
                v.push(format!("port {name} received its own frame back"));
            }
            Ok((_, seq)) if seq == expect => {
                p.expect += 1;
                p.received += 1;
            }
            Ok((_, seq)) if seq > expect => {
                c.lost += seq - expect;
                v.push(format!(
                    "port {name}: frames {expect}..{} never arrived (next was {seq})",
                    seq - 1
                ));
                p.expect = seq + 1;
                p.received += 1;
            }
            Ok((_, seq)) => {
                c.duplicated_or_reordered += 1;
                v.push(format!(
                    "port {name}: frame {seq} arrived again or out of order (expected {expect})"
                ));
            }
        }
    }

    /// Exchanges `count` more frames each way, waiting until all arrived; fails after
    /// `timeout` without progress.
    fn run(&mut self, count: u64) -> anyhow::Result<()> {
        let goal = [self.ports[0].sent + count, self.ports[1].sent + count];
        let mut last_progress = Instant::now();
        while self.ports[1].expect < goal[0] || self.ports[0].expect < goal[1] {
            let before = (self.ports[0].sent, self.ports[1].sent);
            self.fill(Some(goal), true)?;
            let got = self.receive(Duration::from_millis(2))?;
            if got > 0 || before != (self.ports[0].sent, self.ports[1].sent) {
                last_progress = Instant::now();
            }
            if last_progress.elapsed() > self.timeout {
                bail!(
                    "no progress for {:?}: A sent {} and B received {} of them, B sent {} and A received {} of them",
                    self.timeout,
                    self.ports[0].sent,
                    self.ports[1].expect,
                    self.ports[1].sent,
                    self.ports[0].expect
                );
            }
        }
        Ok(())
    }

    /// Checks, with every queue stopped, that the log of each port marks every page its device
    /// wrote since the last check.
    fn check_dirty(&mut self) -> Option<DirtyCheck> {
        let mut check = DirtyCheck::default();
        let mut any = false;
        for p in &mut self.ports {
            if !p.dirty_logging() {
                continue;
            }
            any = true;
            let bitmap = p.log.as_ref().expect("checked").take();
            let mut expected = std::mem::take(&mut p.pages);
            let end = p.used_idx();
            for (k, q) in [(0, RX), (1, TX)] {
                let dq = if q == RX {
                    p.d.rx(0).expect("pair 0").driver_queue_mut()
                } else {
                    p.d.tx(0).expect("pair 0").driver_queue_mut()
                };
                let (start, stop) = (p.used_start[k], end[k]);
                let used = dq.used_ring_gpa();
                if start != stop {
                    expected.insert((used + 2) / LOG_PAGE_SIZE, p.labels.used_idx);
                }
                let mut i = start;
                while i != stop {
                    let elem = used + 4 + 8 * u64::from(i % dq.size());
                    expected
                        .entry(elem / LOG_PAGE_SIZE)
                        .or_insert(p.labels.used_ring);
                    i = i.wrapping_add(1);
                }
            }
            p.used_start = end;
            check.expected += expected.len() as u64;
            check.marked += bitmap.count();
            check.missing.extend(
                expected
                    .into_iter()
                    .filter(|&(page, _)| !bitmap.is_dirty(page * LOG_PAGE_SIZE)),
            );
        }
        any.then_some(check)
    }

    /// Migrates both ports to a fresh backend started from `template`.
    fn hop(
        &mut self,
        template: &str,
        tamper: Option<Tamper>,
    ) -> anyhow::Result<(Hop, Option<String>)> {
        let mut dest = spawn(self.dir, self.seq, template, self.timeout)?;
        let mut dests = Vec::new();
        for (i, p) in self.ports.iter_mut().enumerate() {
            dests.push(Some(p.d.session().connect_destination(&dest.socks[i])?));
        }
        // Under load: both windows full, nothing waited for; the last frames of each port are
        // published without a kick, so that usually some are left for the destination.
        self.fill(None, true)?;
        self.publish_unkicked(UNKICKED)?;
        let before: Vec<(u16, u16)> = self
            .ports
            .iter_mut()
            .map(|p| {
                let dq = p.d.tx(0).expect("pair 0").driver_queue_mut();
                (dq.last_used(), dq.avail_idx())
            })
            .collect();
        let in_flight: u64 = self
            .ports
            .iter_mut()
            .map(|p| p.d.tx(0).expect("pair 0").in_flight() as u64)
            .sum();
        let t = Instant::now();
        // Every transmit queue, then the control queues, then every receive queue.
        let mut bases: [Vec<(u16, u16)>; 2] = [Vec::new(), Vec::new()];
        for q in [TX, CTRL, RX] {
            for (i, p) in self.ports.iter_mut().enumerate() {
                let s = p.d.session();
                if s.is_started(q) {
                    bases[i].push((q, s.stop_queue(q)? as u16));
                }
            }
        }
        let stop = t.elapsed();
        let (mut by_source, mut by_dest) = (0, 0);
        for (i, p) in self.ports.iter_mut().enumerate() {
            let base = bases[i].iter().find(|b| b.0 == TX).map(|b| b.1);
            let used = p.d.tx(0)?.driver_queue_mut().used_idx();
            let (last_used, avail) = before[i];
            if let Some(base) = base {
                if used != base {
                    self.frames.violations.push(format!(
                        "port {}: GET_VRING_BASE of the transmit queue answered {base}, but the device had completed only up to {used}: it replied before finishing the frames it had taken",
                        p.name
                    ));
                }
                by_dest += u64::from(avail.wrapping_sub(base));
            }
            by_source += u64::from(used.wrapping_sub(last_used));
        }
        // What the source delivered while stopping.
        self.receive(Duration::ZERO)?;
        let dirty = self.check_dirty();
        let t = Instant::now();
        let mut states: [Option<Vec<u8>>; 2] = [None, None];
        for (i, state) in states.iter_mut().enumerate() {
            let p = &mut self.ports[i];
            if p.d.session().supports_device_state() {
                match p.d.session().save_device_state() {
                    Ok(s) => *state = Some(s),
                    Err(e) => {
                        let name = p.name;
                        self.resume(&bases)?;
                        return Err(anyhow::Error::new(e)
                            .context(format!("port {name}: the source could not save its state")));
                    }
                }
            }
        }
        let save = t.elapsed();
        let state_len = states.iter().flatten().map(Vec::len).reduce(|a, b| a + b);
        if let (Some(tamper), Some(blob)) = (tamper, states[0].as_mut()) {
            if let Err(why) = tamper.apply(blob) {
                self.resume(&bases)?;
                bail!("cannot make the case \"{}\": {why}", tamper.name());
            }
        }
        let t = Instant::now();
        // Receive (and control) queues of every port first, then the transmit queues.
        let mut old = Vec::new();
        for i in 0..2 {
            let p = &mut self.ports[i];
            let source_path = p.d.session().options().path().to_path_buf();
            let first: Vec<(u16, u16)> = bases[i].iter().copied().filter(|b| b.0 != TX).collect();
            let d = dests[i].take().expect("one destination per port");
            let result =
                p.d.session()
                    .move_to(d, &first, states[i].as_deref(), p.log.as_ref());
            match result {
                Ok(conn) => old.push(conn),
                Err(e) if i == 0 && p.d.session().is_on(&source_path) && is_refusal(&e) => {
                    let said = dest.last_error();
                    dest.stop();
                    self.resume(&bases)?;
                    let hop = Hop {
                        outcome: Outcome::Refused(format!("{:#}", anyhow::Error::new(e))),
                        stop,
                        save,
                        switch: t.elapsed(),
                        state_len,
                        in_flight,
                        completed_by_source: by_source,
                        resumed_by_destination: by_dest,
                        dirty,
                    };
                    self.hops.push(hop.clone());
                    return Ok((hop, said));
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("port {}: moving to the destination failed", p.name)))
                }
            }
        }
        // Each port is its own connection and control thread: DRIVER_OK has no reply, so a
        // round trip on every port proves its receive queue runs before any port transmits.
        for p in &mut self.ports {
            round_trip(p)?;
        }
        for (i, p) in self.ports.iter_mut().enumerate() {
            for &(q, base) in bases[i].iter().filter(|b| b.0 == TX) {
                p.d.session().start_queue(q, base)?;
            }
            p.d.session().driver_ok()?;
        }
        let switch = t.elapsed();
        for conn in old {
            conn.shutdown();
        }
        std::mem::swap(&mut self.source, &mut dest);
        dest.stop();
        let hop = Hop {
            outcome: Outcome::Migrated,
            stop,
            save,
            switch,
            state_len,
            in_flight,
            completed_by_source: by_source,
            resumed_by_destination: by_dest,
            dirty,
        };
        self.hops.push(hop.clone());
        Ok((hop, None))
    }

    /// Restarts the stopped rings on the source: receive queues first.
    fn resume(&mut self, bases: &[Vec<(u16, u16)>; 2]) -> anyhow::Result<()> {
        for pass in [false, true] {
            for (i, p) in self.ports.iter_mut().enumerate() {
                for &(q, base) in bases[i].iter().filter(|b| (b.0 == TX) == pass) {
                    p.d.session().start_queue(q, base)?;
                }
                p.d.session().driver_ok()?;
                round_trip(p)?;
            }
        }
        Ok(())
    }

    /// Sends nothing more, waits until every frame sent arrived, and adds the findings.
    fn finish(mut self, report: &mut Report) -> anyhow::Result<()> {
        let result = self.run(0).and_then(|()| {
            for p in &mut self.ports {
                p.d.tx(0)?.flush()?;
            }
            // Nothing else may arrive.
            let extra = self.receive(Duration::from_millis(50))?;
            if extra > 0 {
                self.frames
                    .violations
                    .push(format!("{extra} frames arrived that were never sent"));
            }
            Ok(())
        });
        let c = &mut self.frames.counts;
        c.sent = [self.ports[0].sent, self.ports[1].sent];
        c.received = [self.ports[1].received, self.ports[0].received];
        for (dir, p) in self.ports.iter().enumerate() {
            let peer = &self.ports[1 - dir];
            if peer.expect < p.sent {
                c.lost += p.sent - peer.expect;
                self.frames.violations.push(format!(
                    "port {}: frames {}..{} sent by {} never arrived",
                    peer.name,
                    peer.expect,
                    p.sent - 1,
                    p.name
                ));
            }
        }
        report.hops.append(&mut self.hops);
        report.violations.append(&mut self.frames.violations);
        let total = report.frames.get_or_insert_with(FrameCounts::default);
        total.add(&self.frames.counts);
        result
    }
}

/// A request with a reply (GET_FEATURES): every message sent before it on the port's connection
/// has taken effect when it returns.
fn round_trip(p: &mut Port) -> anyhow::Result<()> {
    p.d.session()
        .connection()
        .frontend()
        .get_features()
        .with_context(|| format!("port {}: GET_FEATURES", p.name))?;
    Ok(())
}

fn is_refusal(e: &outboard_frontend::MigrationError) -> bool {
    e.is_refusal() || matches!(e, outboard_frontend::MigrationError::NotNegotiated { .. })
}

/// Says what the peer negotiated and what it lacks.
fn describe_peer(p: &mut Port, template: &str, report: &mut Report) {
    let s = p.d.session();
    let n = *s.negotiated();
    let has = |f: VhostUserProtocolFeatures| n.protocol_offered.contains(f);
    let device_state = has(VhostUserProtocolFeatures::DEVICE_STATE);
    let dirty_log = s.supports_dirty_log();
    let mut note = |t: String| {
        if !report.notes.contains(&t) {
            report.notes.push(t);
        }
    };
    if !device_state {
        note("the backend lacks the DEVICE_STATE protocol feature: no device state is transferred, so the destination starts with its own MAC, receive modes, MAC/VLAN tables and queue pairs (the driver's filter settings are lost); destinations restart the rings from GET_VRING_BASE's bases".into());
    }
    if !dirty_log {
        let what = if has(VhostUserProtocolFeatures::LOG_SHMFD) {
            "the LOG_ALL feature"
        } else {
            "the LOG_SHMFD protocol feature"
        };
        note(format!(
            "the backend lacks {what}: the dirty log (receive buffers, used rings) is not checked"
        ));
    }
    if report.peer.is_null() {
        report.peer = serde_json::json!({
            "device": "net",
            "features_offered": format!("{:#x}", n.features_offered),
            "features_acked": format!("{:#x}", n.features_acked),
            "protocol_offered": format!("{:#x}", n.protocol_offered.bits()),
            "device_state": device_state,
            "dirty_log": dirty_log,
            "capabilities": backend::probe_capabilities(template),
        });
    }
}

/// `migrate --count N` for a net backend.
pub fn run_migrate(
    dir: &Path,
    src: &str,
    dst: &str,
    count: u32,
    per_hop: u64,
    timeout: Duration,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut seq = 0;
    let mut r = NetRun::start(dir, &mut seq, src, timeout, report)?;
    r.run(per_hop)?;
    let progress = Progress::new(u64::from(count));
    for i in 0..count {
        let (hop, said) = r.hop(dst, None)?;
        if let Outcome::Refused(why) = &hop.outcome {
            progress.finish();
            report.violations.push(format!(
                "migration {} was refused: {why}{}",
                i + 1,
                said.map(|s| format!(" (destination said: {s})"))
                    .unwrap_or_default()
            ));
            break;
        }
        r.run(per_hop)?;
        progress.update(u64::from(i) + 1);
    }
    progress.finish();
    r.finish(report)
}

/// `refusals` for a net backend: tampered states of port A, each refused with both ports still
/// serving on the source, then two migrations of the untouched state.
pub fn run_refusals(
    dir: &Path,
    src: &str,
    dst: &str,
    per_hop: u64,
    timeout: Duration,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut seq = 0;
    let mut r = NetRun::start(dir, &mut seq, src, timeout, report)?;
    r.run(per_hop)?;
    let has_state = r.ports[0].d.session().supports_device_state();
    for tamper in [Tamper::FlipByte, Tamper::DeviceType, Tamper::Truncate] {
        if !has_state {
            report.notes.push(format!(
                "case \"{}\" skipped: the backend transfers no state",
                tamper.name()
            ));
            continue;
        }
        let (hop, said) = r.hop(dst, Some(tamper))?;
        let refused = match &hop.outcome {
            Outcome::Migrated => None,
            Outcome::Refused(why) => Some(why.clone()),
        };
        let mut verified = None;
        if refused.is_some() {
            if !r.source.is_alive() {
                bail!("the source backend exited after the refused migration");
            }
            let before = r.ports[1].received + r.ports[0].received;
            let violations = r.frames.violations.len();
            r.run(per_hop.max(16))?;
            let after = r.ports[1].received + r.ports[0].received;
            verified = (r.frames.violations.len() == violations).then_some(after - before);
        }
        report.cases.push(Case {
            name: tamper.name().into(),
            expect_migrated: false,
            refused,
            backend_said: said,
            source_verified: verified,
            second_hop: None,
        });
    }
    let (first, _) = r.hop(dst, None)?;
    r.run(per_hop)?;
    let (second, _) = r.hop(dst, None)?;
    r.run(per_hop)?;
    let ok = |h: &Hop| matches!(h.outcome, Outcome::Migrated);
    report.cases.push(Case {
        name: "the untouched state after the refusals".into(),
        expect_migrated: true,
        refused: (!ok(&first)).then(|| "refused".into()),
        backend_said: None,
        source_verified: None,
        second_hop: Some(ok(&second)),
    });
    r.finish(report)
}
