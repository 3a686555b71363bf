//! `vhost-user-blk`: a virtio-blk device served over vhost-user.
//!
//! Follows the vhost-user backend program conventions: `--socket-path` or `--fd`,
//! `--print-capabilities`, no daemonizing, a clean exit on SIGTERM, and the next frontend served
//! after one disconnects. Storage is a regular file or a block device (`--blk-file`, io_uring by
//! default) or a null disk for benchmarks (`--null-size`).

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

    /// Busy-poll the queues for this many microseconds after the last request before sleeping.
    #[arg(long, default_value_t = 0, value_name = "US")]
    poll_us: u64,
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
    let n: u64 = digits.parse().map_err(|e| format!("{s:?} is not a size: {e}"))?;
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

fn capabilities() -> serde_json::Value {
    serde_json::json!({
        "type": "block",
        "features": ["read-only", "blk-file"],
    })
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
    config
}

fn main() {
    program::handle_print_capabilities(&capabilities());
    let args: Args = program::parse_args(PROGRAM);
    let source = program::socket_source(PROGRAM, args.socket_path.clone(), args.fd);
    let config = blk_config(&args);
    program::init_logging();
    if let Err(e) = run(config, source) {
        log::error!("{e:#}");
        std::process::exit(program::EXIT_FAILURE);
    }
}

fn run(config: outboard_blk::BlkConfig, source: program::SocketSource) -> anyhow::Result<()> {
    // Before any other thread exists, so that every thread inherits the blocked signals.
    let shutdown = program::shutdown_on_signals()?;
    let device = outboard_blk::Blk::new(config)?;
    let socket = program::open_socket(source)?;
    let mut backend = VhostUserBackend::new(Box::new(device), BackendConfig::default());
    program::serve(&mut backend, &socket, &shutdown)
}
