//! The `upgrade` mode: the backend is replaced by a new process (possibly another version of
//! the binary) COUNT times while the verifying workload runs, through the backend's own live
//! upgrade: the new process takes the listening socket, the frontend connection, guest memory
//! and device state over from the old one, which then exits. The runner's connection must never
//! see a hang-up, nothing may be lost, and the pause it sees is measured.
//!
//! `--backend` starts the first process and `--dest-backend` every new one; `{sock}` is the
//! vhost-user socket and `{upgrade}` the upgrade control socket, e.g.
//! `--backend 'vhost-user-blk --socket-path {sock} --upgrade-socket {upgrade} --blk-file D'`
//! `--dest-backend 'vhost-user-blk --upgrade-from {upgrade} --blk-file D'`
//! (Outboard's new process keeps serving the same upgrade socket).

use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use outboard_frontend::migration::migration_protocol_features;
use outboard_frontend::WaitMode;
use serde_json::json;

use crate::backend::{self, BackendProcess};
use crate::report::{spread, Progress, Report};
use crate::workload::Workload;
use crate::Cli;

/// Whether the frontend's connection has something to read: the backend never writes on it
/// unasked, so that is a hang-up (or a stray message).
fn connection_event(w: &mut Workload) -> Option<String> {
    let sock = w.driver.session().connection().socket();
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => None,
        Ok(_) => Some(format!("{:?}", fds[0].revents())),
        Err(e) => Some(format!("poll: {e}")),
    }
}

fn spawn(cmd: &str, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec {cmd}"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start `{cmd}`"))
}

/// Runs `count` live upgrades under load.
pub fn run_upgrade(cli: &Cli, dir: &Path, count: u32, report: &mut Report) -> anyhow::Result<()> {
    let template = cli.backend.as_deref().expect("checked");
    let Some(dest) = cli.dest_backend.as_deref() else {
        bail!("the upgrade mode needs --dest-backend: the command of a new process that takes over from {{upgrade}}");
    };
    if !template.contains("{upgrade}") || !dest.contains("{upgrade}") {
        bail!("--backend and --dest-backend need `{{upgrade}}` where the upgrade socket goes");
    }
    let sock = dir.join("upgrade-vhost.sock");
    let ctl = dir.join("upgrade-control.sock");
    let fill = |t: &str| {
        backend::expand(t, std::slice::from_ref(&sock), None)
            .replace("{upgrade}", &ctl.display().to_string())
    };
    let timeout = Duration::from_secs(cli.timeout);
    let first = BackendProcess::start(
        &fill(template),
        std::slice::from_ref(&sock),
        &dir.join("upgrade-0.log"),
        timeout,
    )?;
    let deadline = Instant::now() + timeout;
    while !ctl.exists() {
        if Instant::now() > deadline {
            bail!(
                "the backend did not listen on its upgrade socket {}",
                ctl.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut w = crate::blk_workload(cli, &first, migration_protocol_features())?;
    let short = WaitMode::Block(Duration::from_millis(1));
    // The first process is owned by `first` until its successor takes over; later ones by
    // `old`.
    let mut first = Some(first);
    let mut old: Option<Child> = None;
    let mut pauses = Vec::new();
    let mut takeovers = Vec::new();
    let progress = Progress::new(u64::from(count));
    w.run(cli.ops_per_hop, timeout)?;
    for i in 0..count {
        let log = dir.join(format!("upgrade-{}.log", i + 1));
        let mut new = spawn(&fill(dest), &log)?;
        let t0 = Instant::now();
        let mut last = Instant::now();
        let mut longest = Duration::ZERO;
        // Keep the load on until the old process has handed over and exited.
        loop {
            w.fill()?;
            let before = w.counts.completed;
            w.reap(short)?;
            let now = Instant::now();
            if w.counts.completed > before {
                longest = longest.max(now - last);
                last = now;
            }
            if let Some(ev) = connection_event(&mut w) {
                bail!(
                    "upgrade {}: the frontend's connection reported {ev} (a disconnect)",
                    i + 1
                );
            }
            let exited = match (&mut first, &mut old) {
                (Some(f), _) => !f.is_alive(),
                (None, Some(o)) => o.try_wait()?.is_some(),
                (None, None) => true,
            };
            if exited {
                break;
            }
            if let Some(st) = new.try_wait()? {
                bail!(
                    "upgrade {}: the new process exited ({st}) and the old one still runs:\n{}",
                    i + 1,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if now - t0 > timeout {
                bail!("upgrade {}: no handover within {timeout:?}", i + 1);
            }
        }
        takeovers.push((Instant::now() - t0).as_secs_f64() * 1e3);
        if let Some(st) = new.try_wait()? {
            bail!(
                "upgrade {}: the new process exited ({st}) after taking over",
                i + 1
            );
        }
        // Some work on the new process: its first completion ends the pause.
        let before = w.counts.completed;
        while w.counts.completed == before && w.in_flight() > 0 {
            w.fill()?;
            w.reap(short)?;
            if Instant::now() - last > timeout {
                bail!("upgrade {}: nothing completed on the new process", i + 1);
            }
        }
        longest = longest.max(Instant::now() - last);
        pauses.push(longest.as_secs_f64() * 1e3);
        first = None;
        old = Some(new);
        w.run(cli.ops_per_hop.min(16), timeout)?;
        progress.update(u64::from(i) + 1);
    }
    progress.finish();
    w.run(cli.ops_per_hop, timeout)?;
    w.drain(timeout)?;
    // A vhost-user round trip on the connection the runner opened before the first upgrade.
    w.driver
        .refresh_config()
        .context("GET_CONFIG on the original connection after the upgrades")?;
    if let Some(ev) = connection_event(&mut w) {
        bail!("after the upgrades, the frontend's connection reported {ev}");
    }
    crate::settle(&mut w, timeout, report)?;
    let (med, _, max) = spread(&mut pauses);
    let (take, _, _) = spread(&mut takeovers);
    report.notes.push(format!(
        "upgrade: {count} live upgrades, the connection never hung up; pause seen by the frontend median {med:.2} ms, max {max:.2} ms; new process started to old process gone: median {take:.1} ms"
    ));
    report.extra.insert(
        "upgrade".into(),
        json!({
            "upgrades": count,
            "pause_ms": {"median": med, "max": max},
            "handover_ms_median": take,
            "disconnects": 0,
        }),
    );
    if let Some(mut o) = old {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(o.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = o.wait();
    }
    Ok(())
}
