//! The vhost-user "backend program conventions" (QEMU's `docs/interop/vhost-user.rst`), shared by
//! every Outboard backend binary:
//!
//! - `--socket-path=PATH` (listen on a new socket) or `--fd=FDNUM` (an inherited socket, either
//!   listening or already connected); the two are exclusive;
//! - `--print-capabilities` prints the capability JSON and exits, ignoring every other option;
//! - the program never daemonizes, ends cleanly on SIGTERM (and SIGINT), and serves the next
//!   frontend after one disconnects;
//! - a bad option is one line on stderr and exit code 2; a failure to start is exit code 1;
//! - sandboxed by default (`--sandbox`, `--seccomp`): once the storage and the socket are
//!   open, [`enter_sandbox`] confines the process (`outboard-sandbox`) before any frontend
//!   message is read, and every thread runs under the seccomp filter of its role.

pub mod upgrade;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{getsockopt, sockopt};
use outboard_sandbox::layers::{self, ProgramOptions};
use outboard_sandbox::{
    Layer, Role, Sandbox, SandboxConfig, SandboxLevel, SeccompMode, SelfTest, SocketReaper,
};
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
    if std::env::args_os()
        .skip(1)
        .any(|a| a == "--print-capabilities")
    {
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
pub fn socket_source(program: &str, path: Option<PathBuf>, fd: Option<RawFd>) -> SocketSource {
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
/// Unsandboxed: a sandboxed program calls [`block_termination_signals`] first and
/// [`enter_sandbox`] later, which starts the signal thread under its own filter.
pub fn shutdown_on_signals() -> anyhow::Result<EventFd> {
    let set = block_termination_signals()?;
    start_signal_thread(set, false)
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread, and so in every thread it starts later.
/// Call before any other thread exists; pass the set to [`enter_sandbox`].
pub fn block_termination_signals() -> anyhow::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block()
        .context("cannot block termination signals")?;
    Ok(set)
}

/// Starts the thread that turns the signals of `set` into a readable eventfd. With `confine`,
/// the thread installs the [`Role::Signals`] filter before anything else and this returns only
/// once it has (or with its error).
fn start_signal_thread(set: SigSet, confine: bool) -> anyhow::Result<EventFd> {
    let shutdown = EventFd::new(EFD_NONBLOCK).context("cannot create the shutdown eventfd")?;
    let notify = shutdown
        .try_clone()
        .context("cannot clone the shutdown eventfd")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let confined = if confine {
                outboard_sandbox::confine_thread(Role::Signals)
            } else {
                Ok(())
            };
            let failed = confined.is_err();
            let _ = ready_tx.send(confined);
            if failed {
                return;
            }
            loop {
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
            }
        })
        .context("cannot start the signal thread")?;
    ready_rx
        .recv()
        .context("the signal thread ended before it started")?
        .context("cannot confine the signal thread")?;
    Ok(shutdown)
}

/// `--sandbox` and `--seccomp`, shared by every backend binary (`#[command(flatten)]`).
#[derive(clap::Args, Clone, Debug)]
pub struct SandboxArgs {
    /// Process-wide confinement, applied once the storage and the socket are open: landlock
    /// (no file system paths, no TCP, no_new_privs, no capabilities even as root, no core
    /// dumps); namespace (the same, in new user, mount, IPC, network and UTS namespaces with an
    /// empty root); none (only the seccomp filter, if any).
    #[arg(long, value_name = "LEVEL", default_value = "landlock", value_parser = sandbox_level_parser())]
    pub sandbox: SandboxLevel,

    /// What a system call outside the thread's seccomp policy does: kill the process; trap
    /// (log the call, the thread and its role, then exit with status 159); log (let it through:
    /// the kernel logs it, for building policies); none (no filter).
    #[arg(long, value_name = "ACTION", default_value = "kill", value_parser = seccomp_mode_parser())]
    pub seccomp: SeccompMode,

    /// Test only: stop the thread (`stop`, for the test to kill the process) or exit the
    /// process at once (`exit`) the N-th time a request passes POINT: after-inflight-mark,
    /// after-storage-write, before-used-update or after-used-update. Armed when the sandbox is
    /// entered.
    #[arg(long, hide = true, value_name = "POINT[@N][:stop|exit]")]
    pub fault_point: Option<outboard_virtio::fault::FaultSpec>,
}

fn sandbox_level_parser() -> impl TypedValueParser<Value = SandboxLevel> {
    PossibleValuesParser::new(SandboxLevel::NAMES)
        .map(|s| s.parse::<SandboxLevel>().expect("one of the listed values"))
}

fn seccomp_mode_parser() -> impl TypedValueParser<Value = SeccompMode> {
    PossibleValuesParser::new(SeccompMode::NAMES)
        .map(|s| s.parse::<SeccompMode>().expect("one of the listed values"))
}

/// What the device adds to the sandbox of its program.
#[derive(Clone, Debug)]
pub struct DeviceSandbox {
    /// The device's seccomp layer.
    pub layer: Layer,
    /// RLIMIT_NOFILE: enough for every descriptor the device and the frontends' memory
    /// regions may hold at once.
    pub max_open_files: u64,
}

impl DeviceSandbox {
    /// The device layer `layer`, with the default descriptor limit
    /// ([`outboard_sandbox::DEFAULT_MAX_OPEN_FILES`]).
    pub fn new(layer: Layer) -> DeviceSandbox {
        DeviceSandbox {
            layer,
            max_open_files: outboard_sandbox::DEFAULT_MAX_OPEN_FILES,
        }
    }
}

/// Confines the process once its resources are open, and starts the signal thread: the
/// process-wide restrictions of `args.sandbox` (while this is the only thread), the signal
/// thread under its own filter, the queue workers' filter as their start hook, and this
/// (control) thread's filter. `sockets` are every socket the program serves; the files of
/// those it created are handed to socket reapers. A further control thread this thread starts
/// (one per socket) runs under its filter and calls [`outboard_sandbox::inherit_role`]. Returns
/// the shutdown eventfd.
///
/// Runs the self-test named by `OUTBOARD_SANDBOX_SELFTEST`, if any, last (see [`SelfTest`]).
pub fn enter_sandbox(
    args: &SandboxArgs,
    device: DeviceSandbox,
    signals: SigSet,
    sockets: &mut [ServingSocket],
) -> anyhow::Result<EventFd> {
    confine(args, device, signals, sockets, false)
}

/// [`enter_sandbox`], with the control thread's rules for live upgrade if `live_upgrade`.
fn confine(
    args: &SandboxArgs,
    device: DeviceSandbox,
    signals: SigSet,
    sockets: &mut [ServingSocket],
    live_upgrade: bool,
) -> anyhow::Result<EventFd> {
    let selftest = SelfTest::from_env().map_err(anyhow::Error::msg)?;
    if let Some(spec) = args.fault_point {
        log::warn!("fault point armed: {spec:?}");
        outboard_virtio::fault::arm(spec);
    }
    let config = SandboxConfig {
        max_open_files: device.max_open_files,
        ..SandboxConfig::new(args.sandbox, args.seccomp)
    };
    // Without any confinement the program removes its socket files itself, as ever; otherwise
    // helper processes do it, so that the backend keeps no right on the file system.
    let confined = config.level != SandboxLevel::None || config.seccomp != SeccompMode::None;
    let mut socket_reapers = Vec::new();
    for socket in sockets.iter_mut() {
        let reaper = match socket.path() {
            Some(path) if confined => SocketReaper::spawn(path).with_context(|| {
                format!(
                    "cannot start the reaper of the socket file {}",
                    path.display()
                )
            })?,
            _ => continue,
        };
        socket_reapers.push(reaper.pid());
        socket.hand_file_to(reaper);
    }
    let options = ProgramOptions {
        socket_reapers,
        live_upgrade,
    };
    let policy =
        layers::vhost_user_backend(options, device.layer).context("invalid sandbox policy")?;
    let mut sandbox = Sandbox::new(config, &policy).context("cannot prepare the sandbox")?;
    sandbox
        .restrict_process()
        .context("cannot enter the sandbox")?;
    let shutdown = start_signal_thread(signals, true)?;
    if !outboard_virtio::worker::set_thread_start_hook(outboard_sandbox::worker_thread_start) {
        anyhow::bail!("the queue workers' start hook is already set");
    }
    outboard_sandbox::confine_thread(Role::Control).context("cannot confine the control thread")?;
    log::info!("{}", sandbox.summary());
    if let Some(test) = selftest {
        test.run();
    }
    Ok(shutdown)
}

/// A socket ready to serve: a listener, or one inherited connection.
#[derive(Debug)]
pub enum ServingSocket {
    /// Accept frontends one after another; what becomes of the socket file at exit.
    Listener(UnixListener, SocketFile),
    /// Serve the one frontend on this connection, then exit.
    Connected(UnixStream),
}

/// What becomes of a listener's socket file when the program ends.
#[derive(Debug)]
pub enum SocketFile {
    /// Not this program's (an inherited listener): left alone.
    NotOurs,
    /// Removed by this process when the socket is dropped.
    Remove(PathBuf),
    /// Removed by the sandbox's helper process when the socket is dropped, or when this
    /// process dies (a sandboxed process has no right to remove files).
    Reaper(SocketReaper),
    /// Taken over from another process by live upgrade, with a duplicate of the pipe its
    /// reaper waits on: the file is removed once this process (and every other holder) ends.
    Handed(OwnedFd),
}

impl ServingSocket {
    /// The socket file this program created and removes itself on drop, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ServingSocket::Listener(_, SocketFile::Remove(path)) => Some(path),
            _ => None,
        }
    }

    /// After a live upgrade: the socket file is the new process's now; nothing is removed or
    /// waited for when this one ends.
    pub fn give_away_file(&mut self) {
        if let ServingSocket::Listener(_, file) = self {
            match std::mem::replace(file, SocketFile::NotOurs) {
                SocketFile::Reaper(reaper) => reaper.disown(),
                SocketFile::Remove(_) | SocketFile::Handed(_) | SocketFile::NotOurs => {}
            }
        }
    }

    /// Hands the removal of the socket file to `reaper`.
    pub fn hand_file_to(&mut self, reaper: SocketReaper) {
        if let ServingSocket::Listener(_, file) = self {
            *file = SocketFile::Reaper(reaper);
        }
    }
}

impl Drop for ServingSocket {
    fn drop(&mut self) {
        if let ServingSocket::Listener(_, file) = self {
            match std::mem::replace(file, SocketFile::NotOurs) {
                SocketFile::Remove(path) => {
                    let _ = std::fs::remove_file(path);
                }
                // Waits until the helper has removed the file.
                SocketFile::Reaper(reaper) => drop(reaper),
                // Closing the pipe lets the old process's helper remove the file.
                SocketFile::Handed(pipe) => drop(pipe),
                SocketFile::NotOurs => {}
            }
        }
    }
}

/// Opens the socket: binds a new listener at a path (replacing a stale socket file, never any
/// other kind of file), or adopts an inherited descriptor.
pub fn open_socket(source: SocketSource) -> anyhow::Result<ServingSocket> {
    match source {
        SocketSource::Path(path) => {
            // Held until the new file is bound: a killed predecessor's socket reaper, waking up
            // now, removes only its own file.
            let lock = outboard_sandbox::lock_socket_dir(&path);
            remove_stale_socket(&path)?;
            let listener = UnixListener::bind(&path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            drop(lock);
            log::info!("listening on {}", path.display());
            Ok(ServingSocket::Listener(listener, SocketFile::Remove(path)))
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
                Ok(ServingSocket::Listener(
                    UnixListener::from(owned),
                    SocketFile::NotOurs,
                ))
            } else {
                Ok(ServingSocket::Connected(UnixStream::from(owned)))
            }
        }
    }
}

fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::fs::remove_file(path) {
            // The socket reaper of a killed predecessor removes the same file as this process
            // restarts: gone is what was wanted.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r.with_context(|| format!("cannot remove the stale socket {}", path.display())),
        },
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
    serve_socket(backend, socket, shutdown)?;
    log::info!("exiting");
    Ok(())
}

fn serve_socket(
    backend: &mut VhostUserBackend,
    socket: &ServingSocket,
    shutdown: &EventFd,
) -> anyhow::Result<outboard_vhost_user::SessionEnd> {
    Ok(match socket {
        ServingSocket::Listener(l, _) => backend.serve_listener(l, shutdown)?,
        ServingSocket::Connected(s) => {
            let stream = s.try_clone().context("cannot duplicate the socket")?;
            log::info!("serving the frontend on fd {}", s.as_raw_fd());
            backend.serve_stream(stream, shutdown)?
        }
    })
}
