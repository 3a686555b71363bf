//! Live upgrade for every backend program: `--upgrade-socket` and `--upgrade-from`.
//!
//! A running backend started with `--upgrade-socket PATH` listens there for a successor. A new
//! binary started with `--upgrade-from PATH` (instead of `--socket-path`/`--fd`, and with the
//! same device options) connects, takes over the vhost-user socket, the frontend connection,
//! guest memory and the device's state, and the old process exits; the frontend sees no
//! disconnect. The new process listens on the same upgrade socket, so it can be upgraded in
//! turn. The protocol is `outboard_vhost_user::handover`.
//!
//! The upgrade socket is off by default: it is a second way into the backend, one that takes
//! the whole device (guest memory included), so an operator opts in and chooses where it lives
//! and who may reach it (its file's permissions; the backend also refuses a peer of another
//! user, SO_PEERCRED). A default path derived from `--socket-path` would put such a socket
//! next to every frontend socket, readable by whoever may connect to the frontend socket.
//!
//! The new process connects and receives everything before it enters its sandbox (it needs
//! the sockets to set up its reapers), checks what it received as untrusted input, enters the
//! sandbox, rebuilds the session under its filter, confirms, and only then starts the device.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::Context;
use nix::sys::signal::SigSet;
use outboard_vhost_user::handover::{
    self, ListenerHandover, SessionHandover, SocketFileHandover, UpgradePoint,
};
use outboard_vhost_user::{SessionEnd, VhostUserBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    confine, open_socket, serve_socket, usage_error, DeviceSandbox, SandboxArgs, ServingSocket,
    SocketFile, SocketSource,
};

/// `--upgrade-socket` and `--upgrade-from`, shared by every backend binary
/// (`#[command(flatten)]`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct UpgradeArgs {
    /// Listen on this Unix socket for a new backend binary that takes the running device over
    /// without the frontend seeing a disconnect (live upgrade). Off by default.
    #[arg(long, value_name = "PATH")]
    pub upgrade_socket: Option<PathBuf>,

    /// Take the device over from the backend listening on this upgrade socket: its vhost-user
    /// socket, frontend connection, guest memory and device state (instead of --socket-path or
    /// --fd; give the same device options). The upgrade socket is then this process's.
    #[arg(long, value_name = "PATH", conflicts_with = "upgrade_socket")]
    pub upgrade_from: Option<PathBuf>,
}

/// What a new process received and has yet to apply.
#[derive(Debug)]
struct Takeover {
    control: UnixStream,
    session: Option<SessionHandover>,
}

/// A program's sockets: the vhost-user socket, the upgrade socket if any, and, for a process
/// started with `--upgrade-from`, the device it is taking over.
#[derive(Debug)]
pub struct Sockets {
    /// `[vhost-user socket, upgrade socket?]`.
    sockets: Vec<ServingSocket>,
    upgrade: bool,
    takeover: Option<Takeover>,
}

/// Chooses the socket source from `--socket-path` and `--fd` as [`crate::socket_source`] does,
/// or none with `--upgrade-from` (which takes the running backend's socket; the two others
/// are then a usage error).
pub fn socket_source(
    program: &str,
    path: Option<PathBuf>,
    fd: Option<std::os::fd::RawFd>,
    args: &UpgradeArgs,
) -> Option<SocketSource> {
    match &args.upgrade_from {
        None => Some(crate::socket_source(program, path, fd)),
        Some(_) if path.is_some() || fd.is_some() => usage_error(
            program,
            "--upgrade-from takes the running backend's socket: --socket-path and --fd do not apply",
        ),
        Some(_) => None,
    }
}

/// Opens the sockets of a program with one vhost-user socket: `source` (from
/// [`socket_source`]) plus `--upgrade-socket`; or, with `--upgrade-from`, takes them and the
/// device's session from the running backend. Call before entering the sandbox, once
/// `backend` exists (it says what state it can load).
pub fn open_sockets(
    backend: &VhostUserBackend,
    source: Option<SocketSource>,
    args: &UpgradeArgs,
) -> anyhow::Result<Sockets> {
    let (Some(from), None) = (&args.upgrade_from, &source) else {
        let source = source.context("no socket to serve")?;
        let mut sockets = vec![open_socket(source)?];
        if let Some(path) = &args.upgrade_socket {
            sockets.push(open_socket(SocketSource::Path(path.clone())).map_err(|e| {
                e.context(format!("cannot open the upgrade socket {}", path.display()))
            })?);
        }
        let upgrade = sockets.len() > 1;
        return Ok(Sockets {
            sockets,
            upgrade,
            takeover: None,
        });
    };
    let hello = backend.handover_hello();
    let received = handover::request_handover(from, &hello)
        .with_context(|| format!("cannot take the device over from {}", from.display()))?;
    log::info!(
        "upgrade: received the device from {} ({})",
        from.display(),
        if received.session.is_some() {
            "a frontend is connected"
        } else {
            "no frontend connected"
        }
    );
    let UpgradePoint { control, listener } = received.sockets;
    let serving = match (listener, &received.session) {
        (Some(l), _) => ServingSocket::Listener(l.listener, socket_file(l.file)),
        (None, Some(s)) => ServingSocket::Connected(
            s.connection
                .try_clone()
                .context("cannot duplicate the frontend connection")?,
        ),
        (None, None) => {
            anyhow::bail!("the running backend handed over neither a socket nor a connection")
        }
    };
    let upgrade = ServingSocket::Listener(control.listener, socket_file(control.file));
    Ok(Sockets {
        sockets: vec![serving, upgrade],
        upgrade: true,
        takeover: Some(Takeover {
            control: received.control,
            session: received.session,
        }),
    })
}

fn socket_file(file: SocketFileHandover) -> SocketFile {
    match file {
        SocketFileHandover {
            reaper: Some(pipe), ..
        } => SocketFile::Handed(pipe),
        SocketFileHandover {
            path: Some(path),
            reaper: None,
        } => SocketFile::Remove(path),
        SocketFileHandover {
            path: None,
            reaper: None,
        } => SocketFile::NotOurs,
    }
}

impl Sockets {
    /// [`crate::enter_sandbox`] for these sockets (with the control thread's live-upgrade
    /// rules when there is an upgrade socket).
    pub fn enter_sandbox(
        &mut self,
        args: &SandboxArgs,
        device: DeviceSandbox,
        signals: SigSet,
    ) -> anyhow::Result<EventFd> {
        confine(args, device, signals, &mut self.sockets, self.upgrade)
    }

    /// Serves until shutdown, or until the device is handed to a new process. A process
    /// started with `--upgrade-from` first rebuilds the session it received, confirms the
    /// takeover and starts the device.
    pub fn serve(
        mut self,
        backend: &mut VhostUserBackend,
        shutdown: &EventFd,
    ) -> anyhow::Result<()> {
        let served = self.serve_until_end(backend, shutdown);
        // The upgrade point holds duplicates of the reapers' pipes: the reapers would wait
        // for them forever when the sockets are dropped.
        drop(backend.take_upgrade_point());
        if served? == SessionEnd::HandedOver {
            // The new process holds the sockets and their files; nothing of them is ours to
            // remove or to wait for.
            for socket in &mut self.sockets {
                socket.give_away_file();
            }
            log::info!("exiting: the device was handed to the new process");
        } else {
            log::info!("exiting");
        }
        Ok(())
    }

    fn serve_until_end(
        &mut self,
        backend: &mut VhostUserBackend,
        shutdown: &EventFd,
    ) -> anyhow::Result<SessionEnd> {
        let mut connection = None;
        if let Some(takeover) = self.takeover.take() {
            connection = take_over(backend, takeover)?;
        }
        self.arm(backend)?;
        Ok(match connection {
            Some(conn) => match backend.serve_stream(conn, shutdown)? {
                SessionEnd::Disconnected
                    if matches!(self.sockets[0], ServingSocket::Listener(..)) =>
                {
                    log::info!("frontend disconnected; listening again");
                    serve_socket(backend, &self.sockets[0], shutdown)?
                }
                end => end,
            },
            None => serve_socket(backend, &self.sockets[0], shutdown)?,
        })
    }

    /// Listens for upgrade requests on the upgrade socket, if there is one.
    fn arm(&self, backend: &mut VhostUserBackend) -> anyhow::Result<()> {
        let Some(ServingSocket::Listener(upgrade, upgrade_file)) = self.sockets.get(1) else {
            return Ok(());
        };
        let listener = match &self.sockets[0] {
            ServingSocket::Listener(l, file) => Some(ListenerHandover {
                listener: l
                    .try_clone()
                    .context("cannot duplicate the listening socket")?,
                file: file_handover(file)?,
            }),
            ServingSocket::Connected(_) => None,
        };
        let control = ListenerHandover {
            listener: upgrade
                .try_clone()
                .context("cannot duplicate the upgrade socket")?,
            file: file_handover(upgrade_file)?,
        };
        backend.set_upgrade_point(UpgradePoint { control, listener });
        Ok(())
    }
}

/// Who removes the file, as the next process must know it.
fn file_handover(file: &SocketFile) -> anyhow::Result<SocketFileHandover> {
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .context("cannot duplicate a socket reaper's pipe")
    };
    Ok(match file {
        SocketFile::NotOurs => SocketFileHandover::default(),
        SocketFile::Remove(path) => SocketFileHandover {
            path: Some(path.clone()),
            reaper: None,
        },
        SocketFile::Reaper(reaper) => SocketFileHandover {
            path: None,
            reaper: reaper.pipe().map(dup).transpose()?,
        },
        SocketFile::Handed(pipe) => {
            use std::os::fd::AsFd;
            SocketFileHandover {
                path: None,
                reaper: Some(dup(pipe.as_fd())?),
            }
        }
    })
}

/// Rebuilds the received session, confirms the takeover and starts the device. Returns the
/// frontend connection to serve.
fn take_over(
    backend: &mut VhostUserBackend,
    takeover: Takeover,
) -> anyhow::Result<Option<UnixStream>> {
    let connection = match takeover.session {
        Some(session) => match backend.adopt(session) {
            Ok(conn) => Some(conn),
            Err(e) => {
                // The running backend resumes when it reads this (or sees the connection
                // close): it keeps the device.
                handover::report_failure(&takeover.control, &e.to_string());
                return Err(anyhow::Error::new(e).context("cannot take the device over"));
            }
        },
        None => None,
    };
    handover::confirm_taken(&takeover.control).context(
        "the running backend gave up waiting before the takeover was confirmed; it keeps the device",
    )?;
    backend.start_adopted();
    log::info!("upgrade: the device runs in this process");
    Ok(connection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reaper_pipe_outranks_the_path_and_nothing_means_not_ours() {
        let (rd, _wr) = nix::unistd::pipe().unwrap();
        assert!(matches!(
            socket_file(SocketFileHandover {
                path: Some("/x".into()),
                reaper: Some(rd)
            }),
            SocketFile::Handed(_)
        ));
        assert!(matches!(
            socket_file(SocketFileHandover {
                path: Some("/x".into()),
                reaper: None
            }),
            SocketFile::Remove(_)
        ));
        assert!(matches!(
            socket_file(SocketFileHandover::default()),
            SocketFile::NotOurs
        ));
    }
}
