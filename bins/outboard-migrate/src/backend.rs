//! Backend processes started from a command template.
//!
//! The template is a shell command line in which `{sock}` stands for the vhost-user socket path
//! the runner chooses (`{sock0}`, `{sock1}`, … for a backend with one socket per port, such as
//! `vhost-user-net --switch`; `{sock}` is `{sock0}`), and `{compat}` for a compat version in
//! the matrix mode. It runs as
//! `sh -c "exec …"`, so the process the runner stops is the backend itself. Its stdout and
//! stderr go to a log file, whose last error lines explain a refusal.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Replaces the placeholders of `template`.
pub fn expand(template: &str, socks: &[PathBuf], compat: Option<u16>) -> String {
    let mut cmd = template.to_string();
    for (i, s) in socks.iter().enumerate() {
        cmd = cmd.replace(&format!("{{sock{i}}}"), &s.display().to_string());
    }
    if let Some(s) = socks.first() {
        cmd = cmd.replace("{sock}", &s.display().to_string());
    }
    if let Some(c) = compat {
        cmd = cmd.replace("{compat}", &c.to_string());
    }
    cmd
}

/// A running backend, stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct BackendProcess {
    child: Child,
    /// The socket it listens on (the first port's).
    pub sock: PathBuf,
    /// Every socket it listens on, one per port.
    pub socks: Vec<PathBuf>,
    /// Where its output goes.
    pub log: PathBuf,
    /// The command line.
    pub command: String,
}

impl BackendProcess {
    /// Starts `command` (already expanded) and waits until every socket of `socks` exists, for
    /// up to `timeout`.
    pub fn start(
        command: &str,
        socks: &[PathBuf],
        log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let sock = socks.first().context("a backend needs a socket")?;
        for s in socks {
            let _ = std::fs::remove_file(s);
        }
        let out = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start `{command}`"))?;
        let mut b = BackendProcess {
            child,
            sock: sock.clone(),
            socks: socks.to_vec(),
            log: log.into(),
            command: command.into(),
        };
        let deadline = Instant::now() + timeout;
        while let Some(sock) = socks.iter().find(|s| !s.exists()) {
            if let Some(status) = b.child.try_wait()? {
                bail!(
                    "`{command}` exited with {status} before listening on {}:\n{}",
                    sock.display(),
                    b.log_tail(20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "`{command}` did not listen on {} within {timeout:?}:\n{}",
                    sock.display(),
                    b.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(b)
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `n` lines of its output.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The last line of its output that reports an error or a refusal, if any: the backend's
    /// own account of why it refused a state.
    pub fn last_error(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines()
            .rev()
            .find(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("error") || l.contains("refused") || l.contains("failed")
            })
            // Without a logger's "[time LEVEL module] " prefix.
            .map(|l| match (l.starts_with('['), l.find("] ")) {
                (true, Some(i)) => l[i + 2..].to_string(),
                _ => l.to_string(),
            })
    }

    /// Kills the process with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether its output contains `needle` (a fault point's marker).
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|t| t.contains(needle))
    }

    /// Stops the process: SIGTERM, and SIGKILL after two seconds.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the template's program with `--print-capabilities` and returns the JSON, if it prints
/// any (the vhost-user backend program conventions; QSD does not).
pub fn probe_capabilities(template: &str) -> Option<serde_json::Value> {
    let program = template.split_whitespace().next()?;
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec {program} --print-capabilities"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced() {
        let c = expand(
            "b --socket-path {sock} --compat-version {compat}",
            &["/t/s".into()],
            Some(2),
        );
        assert_eq!(c, "b --socket-path /t/s --compat-version 2");
        assert_eq!(expand("x {compat}", &["/s".into()], None), "x {compat}");
        let net = expand(
            "n --socket-path {sock0} --socket-path {sock1}",
            &["/t/a".into(), "/t/b".into()],
            None,
        );
        assert_eq!(net, "n --socket-path /t/a --socket-path /t/b");
    }
}
