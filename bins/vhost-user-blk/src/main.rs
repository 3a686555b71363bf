//! `vhost-user-blk`: a virtio-blk device served over vhost-user.
//!
//! Follows the vhost-user backend program conventions: `--socket-path` or `--fd`,
//! `--print-capabilities`, no daemonizing, a clean exit on SIGTERM, and the next frontend served
//! after one disconnects. Storage is a regular file or a block device (`--blk-file`, io_uring by
//! default) or a null disk for benchmarks (`--null-size`).
//!
//! Sandboxed by default: once the storage and the socket are open the process enters the
//! sandbox (`--sandbox`, `--seccomp`; see the README's "Security model") before it reads
//! any frontend message. The sandbox is the launcher's business, not something a frontend
//! negotiates, so it is not in the capability JSON.
//!
//! Live upgrade: started with `--upgrade-socket PATH`, the program hands its running device to
//! a new binary started with `--upgrade-from PATH` (and the same device options), without the
//! frontend seeing a disconnect (see `outboard_program::upgrade`).
//!
//! `--compat-version N` fixes the guest-visible device (see `outboard_blk::COMPAT_VERSIONS`) and
//! the compat version written into saved device state; state of version N or older is loaded.
//! The capability JSON is the vhost-user schema's `type` and `features`, plus an `outboard`
//! object that the schema does not define (QEMU ignores members it does not know) telling a
//! migration tool what this binary can present and read:
//! `"outboard": {"compat-versions": [1, 2], "default-compat-version": 2, "state-format": 1}`.

mod sandbox;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use outboard_program as program;
use outboard_vhost_user::{BackendConfig, VhostUserBackend};

const PROGRAM: &str = "vhost-user-blk";

/// A virtio-blk device served over vhost-user.
#[derive(Parser, Debug)]
#[command(name = PROGRAM, version, about)]
struct Args {
    /// Listen for the frontend on this Unix socket (incompatible with --fd).
    #[arg(long, value_name = "PATH")]
    socket_path: Option<PathBuf>,

    /// Use this inherited file descriptor as the vhost-user socket: a listening socket, or a
    /// connection to serve once (incompatible with --socket-path).
    #[arg(long, value_name = "FDNUM")]
    fd: Option<RawFd>,

    /// Print the capabilities in JSON and exit.
    #[arg(long)]
    print_capabilities: bool,

    /// The disk: a regular file (its size a multiple of 512) or a block device.
    #[arg(long, value_name = "PATH", conflicts_with = "null_size")]
    blk_file: Option<PathBuf>,

    /// Serve a null disk of this many bytes instead of a file (reads return zeros, writes are
    /// dropped): for benchmarks. Accepts K, M, G suffixes.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    null_size: Option<u64>,

    /// Offer the disk read-only.
    #[arg(long)]
    read_only: bool,

    /// Number of request queues.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,

    /// Maximum size of each queue (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,

    /// The disk's serial number (GET_ID), up to 20 bytes.
    #[arg(long, value_parser = parse_serial)]
    serial: Option<String>,

    /// Open the file with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,

    /// Worker threads; queues are spread over them round-robin (default: one per queue).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: Option<u16>,

    /// I/O engine.
    #[arg(long, value_enum, default_value_t = Engine::IoUring)]
    engine: Engine,

    /// Busy-poll the queues for this many microseconds after the last request before sleeping
    /// (0: sleep at once). Polling spends CPU only while requests keep coming, and saves the
    /// wake-up per request that otherwise dominates latency at low queue depth (QEMU's
    /// iothreads poll up to 32 µs by default for the same reason).
    #[arg(long, default_value_t = 50, value_name = "US")]
    poll_us: u64,

    /// Test only: every io_uring storage operation waits this long in the kernel before it
    /// starts, so that tests can suspend requests that are still in flight.
    #[arg(long, hide = true, default_value_t = 0, value_name = "MS")]
    io_delay_ms: u64,

    /// The guest-visible device generation to present and to write into saved state (1: no
    /// discard or write zeroes; 2: both). State saved by this version or an older one loads.
    #[arg(long, default_value_t = outboard_blk::DEFAULT_COMPAT_VERSION,
          value_parser = parse_compat_version)]
    compat_version: u16,

    #[command(flatten)]
    sandbox: program::SandboxArgs,

    #[command(flatten)]
    upgrade: program::upgrade::UpgradeArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    /// io_uring (falls back to sync if the kernel refuses it).
    IoUring,
    /// Blocking preadv/pwritev on the worker thread.
    Sync,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("{s:?} is not a size: {e}"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!("{s:?} is not a positive multiple of 512 bytes"));
    }
    Ok(bytes)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n == 0 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two"));
    }
    Ok(n)
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!("serial {s:?} is longer than 20 bytes"));
    }
    Ok(s.to_string())
}

fn parse_compat_version(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !outboard_blk::COMPAT_VERSIONS.contains(&n) {
        return Err(format!(
            "compat version {n} is not one of {:?}",
            outboard_blk::COMPAT_VERSIONS
        ));
    }
    Ok(n)
}

fn capabilities() -> serde_json::Value {
    serde_json::json!({
        "type": "block",
        "features": ["read-only", "blk-file"],
        "outboard": {
            "compat-versions": outboard_blk::COMPAT_VERSIONS,
            "default-compat-version": outboard_blk::DEFAULT_COMPAT_VERSION,
            "state-format": outboard_virtio::state::FORMAT_VERSION,
        },
    })
}

/// The transport settings for `compat_version`: state is written as that version, and state of
/// it or any older version is loaded.
fn backend_config(compat_version: u16) -> BackendConfig {
    BackendConfig {
        compat_version,
        accepted_compat: outboard_blk::COMPAT_VERSIONS
            .into_iter()
            .filter(|&v| v <= compat_version)
            .collect(),
        ..BackendConfig::default()
    }
}

fn blk_config(args: &Args) -> outboard_blk::BlkConfig {
    let storage = match (&args.blk_file, args.null_size) {
        (Some(path), None) => outboard_blk::StorageConfig::File { path: path.clone() },
        (None, Some(size)) => outboard_blk::StorageConfig::Null { size },
        _ => program::usage_error(PROGRAM, "one of --blk-file or --null-size is required"),
    };
    if args.threads.is_some_and(|t| t > args.num_queues) {
        program::usage_error(PROGRAM, "--threads cannot exceed --num-queues");
    }
    let mut config = outboard_blk::BlkConfig::new(storage);
    config.engine = match args.engine {
        Engine::IoUring => outboard_blk::EngineKind::Uring,
        Engine::Sync => outboard_blk::EngineKind::Sync,
    };
    config.read_only = args.read_only;
    config.direct = args.direct;
    config.num_queues = args.num_queues;
    config.queue_size = args.queue_size;
    config.serial = args.serial.clone().unwrap_or_default();
    config.threads = args
        .threads
        .and_then(|t| std::num::NonZeroUsize::new(usize::from(t)));
    config.poll = Duration::from_micros(args.poll_us);
    config.compat_version = args.compat_version;
    config.io_delay = Duration::from_millis(args.io_delay_ms);
    if args.io_delay_ms > 0 {
        log::warn!(
            "test option: every storage operation is held back {} ms",
            args.io_delay_ms
        );
    }
    config
}

fn main() {
    program::handle_print_capabilities(&capabilities());
    let args: Args = program::parse_args(PROGRAM);
    let source =
        program::upgrade::socket_source(PROGRAM, args.socket_path.clone(), args.fd, &args.upgrade);
    let config = blk_config(&args);
    program::init_logging();
    if let Err(e) = run(config, source, &args) {
        log::error!("{e:#}");
        std::process::exit(program::EXIT_FAILURE);
    }
}

fn run(
    config: outboard_blk::BlkConfig,
    source: Option<program::SocketSource>,
    args: &Args,
) -> anyhow::Result<()> {
    // Before any other thread exists, so that every thread inherits the blocked signals.
    let signals = program::block_termination_signals()?;
    // Everything the device needs from the host is opened here, before the sandbox: the
    // storage, one engine per worker thread, the socket.
    let transport = backend_config(config.compat_version);
    let device = outboard_blk::Blk::new(config)?;
    let engine = device
        .engine_name()
        .and_then(sandbox::Engine::from_name)
        .ok_or_else(|| anyhow::anyhow!("unknown storage engine {:?}", device.engine_name()))?;
    let mut backend = VhostUserBackend::new(Box::new(device), transport);
    // With --upgrade-from: the running backend's sockets and session, received (and checked)
    // before the sandbox is entered, applied after.
    let mut sockets = program::upgrade::open_sockets(&backend, source, &args.upgrade)?;
    let shutdown = sockets.enter_sandbox(
        &args.sandbox,
        program::DeviceSandbox::new(sandbox::blk_layer(engine)),
        signals,
    )?;
    sockets.serve(&mut backend, &shutdown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_loads_state_of_its_compat_version_or_older() {
        assert_eq!(backend_config(1).accepted_compat, vec![1]);
        let c = backend_config(2);
        assert_eq!((c.compat_version, c.accepted_compat), (2, vec![1, 2]));
        assert!(parse_compat_version("0").is_err());
        assert!(parse_compat_version("3").is_err());
        let caps = capabilities();
        assert_eq!(
            caps["outboard"]["compat-versions"],
            serde_json::json!([1, 2])
        );
        assert_eq!(caps["type"], "block");
    }
}
