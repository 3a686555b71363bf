//! The vhost-user "backend program conventions" (QEMU's `docs/interop/vhost-user.rst`), shared by
//! every Outboard backend binary:
//!
//! - `--socket-path=PATH` (listen on a new socket) or `--fd=FDNUM` (an inherited socket, either
//!   listening or already connected); the two are exclusive;
//! - `--print-capabilities` prints the capability JSON and exits, ignoring every other option;
//! - the program never daemonizes, ends cleanly on SIGTERM (and SIGINT), and serves the next
//!   frontend after one disconnects;
//! - a bad option is one line on stderr and exit code 2; a failure to start is exit code 1.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{getsockopt, sockopt};
use outboard_vhost_user::VhostUserBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Exit code for a command-line error.
pub const EXIT_USAGE: i32 = 2;
/// Exit code for a failure to start or serve.
pub const EXIT_FAILURE: i32 = 1;

/// Where the vhost-user socket comes from.
#[derive(Debug)]
pub enum SocketSource {
    /// Create and listen on this path.
    Path(PathBuf),
    /// An inherited descriptor.
    Fd(RawFd),
}

/// Prints `json` and exits if `--print-capabilities` is among the arguments: the spec says every
/// other option is then ignored, so this runs before parsing.
pub fn handle_print_capabilities(json: &serde_json::Value) {
    if std::env::args_os().skip(1).any(|a| a == "--print-capabilities") {
        println!("{json}");
        std::process::exit(0);
    }
}

/// Parses the command line; a bad option is one line on stderr and exit code 2.
pub fn parse_args<T: Parser>(program: &str) -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayVersion
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => {
                let text = e.render().to_string();
                let line = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ");
                usage_error(program, line)
            }
        },
    }
}

/// Reports a command-line error in one line and exits with code 2.
pub fn usage_error(program: &str, message: &str) -> ! {
    eprintln!("{program}: {message}");
    std::process::exit(EXIT_USAGE)
}

/// Chooses the socket source from `--socket-path` and `--fd`, exactly one of which is required.
pub fn socket_source(
    program: &str,
    path: Option<PathBuf>,
    fd: Option<RawFd>,
) -> SocketSource {
    match (path, fd) {
        (Some(p), None) => SocketSource::Path(p),
        (None, Some(fd)) if fd >= 0 => SocketSource::Fd(fd),
        (None, Some(fd)) => usage_error(program, &format!("--fd {fd} is not a file descriptor")),
        (Some(_), Some(_)) => usage_error(program, "--socket-path and --fd are incompatible"),
        (None, None) => usage_error(program, "one of --socket-path or --fd is required"),
    }
}

/// Sets up logging to stderr (`RUST_LOG` overrides the default `info`).
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and so in every thread it starts later) and
/// starts a thread that turns them into a readable eventfd. Call before starting other threads.
pub fn shutdown_on_signals() -> anyhow::Result<EventFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block().context("cannot block termination signals")?;
    let shutdown = EventFd::new(EFD_NONBLOCK).context("cannot create the shutdown eventfd")?;
    let notify = shutdown.try_clone().context("cannot clone the shutdown eventfd")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(sig) => {
                    log::info!("{sig:?} received: shutting down");
                    if let Err(e) = notify.write(1) {
                        log::error!("cannot signal shutdown: {e}");
                    }
                }
                Err(e) => {
                    log::error!("sigwait failed: {e}");
                    return;
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(shutdown)
}

/// A socket ready to serve: a listener, or one inherited connection.
#[derive(Debug)]
pub enum ServingSocket {
    /// Accept frontends one after another; the path (if ours) is removed on drop.
    Listener(UnixListener, Option<PathBuf>),
    /// Serve the one frontend on this connection, then exit.
    Connected(UnixStream),
}

impl Drop for ServingSocket {
    fn drop(&mut self) {
        if let ServingSocket::Listener(_, Some(path)) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Opens the socket: binds a new listener at a path (replacing a stale socket file, never any
/// other kind of file), or adopts an inherited descriptor.
pub fn open_socket(source: SocketSource) -> anyhow::Result<ServingSocket> {
    match source {
        SocketSource::Path(path) => {
            remove_stale_socket(&path)?;
            let listener = UnixListener::bind(&path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            log::info!("listening on {}", path.display());
            Ok(ServingSocket::Listener(listener, Some(path)))
        }
        SocketSource::Fd(fd) => {
            // SAFETY: fcntl(F_GETFD) on any integer is harmless; it tells whether the fd is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                anyhow::bail!("--fd {fd} is not an open file descriptor");
            }
            // SAFETY: the descriptor is open (checked above) and was handed to this process to
            // own by the convention of `--fd`; nothing else in the program refers to it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let listening = getsockopt(&owned, sockopt::AcceptConn)
                .with_context(|| format!("--fd {fd} is not a socket"))?;
            if listening {
                Ok(ServingSocket::Listener(UnixListener::from(owned), None))
            } else {
                Ok(ServingSocket::Connected(UnixStream::from(owned)))
            }
        }
    }
}

fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display())),
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(_) => Ok(()),
    }
}

/// Serves frontends on `socket` until shutdown (or, for an inherited connection, until the
/// frontend leaves).
pub fn serve(
    backend: &mut VhostUserBackend,
    socket: &ServingSocket,
    shutdown: &EventFd,
) -> anyhow::Result<()> {
    match socket {
        ServingSocket::Listener(l, _) => backend.serve_listener(l, shutdown)?,
        ServingSocket::Connected(s) => {
            let stream = s.try_clone().context("cannot duplicate the socket")?;
            log::info!("serving the frontend on fd {}", s.as_raw_fd());
            backend.serve_stream(stream, shutdown)?;
        }
    }
    log::info!("exiting");
    Ok(())
}
