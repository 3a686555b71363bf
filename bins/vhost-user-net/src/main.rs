//! `vhost-user-net`: virtio-net devices served over vhost-user.
//!
//! Follows the vhost-user backend program conventions: `--socket-path` or `--fd`,
//! `--print-capabilities`, no daemonizing, a clean exit on SIGTERM, and the next frontend served
//! after one disconnects. Packets go to a TAP interface (`--tap NAME`, opened or created; or
//! `--tap-fd FD,…`, descriptors a privileged manager opened) or to an in-process L2 switch
//! (`--switch`) that connects one device per socket, each served on its own control thread.
//!
//! Sandboxed by default, as `vhost-user-blk` is: once the TAP descriptors (or the switch) and
//! every socket are open the process enters the sandbox (`--sandbox`, `--seccomp`; see
//! the README's "Security model") before it reads any frontend message. The control thread
//! of each port runs under the control filter the main thread installed, and every queue
//! worker under the worker filter.

#![deny(unsafe_code)]

mod sandbox;

use std::collections::HashSet;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use outboard_net::backend::switch::{Switch, SwitchConfig};
use outboard_net::backend::tap::Tap;
use outboard_net::{
    MacAddress, Net, NetConfig, PacketBackend, DEFAULT_MAC, MAX_QUEUE_PAIRS, MIN_MTU,
};
use outboard_program as program;
use outboard_vhost_user::{BackendConfig, VhostUserBackend};

const PROGRAM: &str = "vhost-user-net";

/// Virtio-net devices served over vhost-user, on a TAP interface or an in-process switch.
#[derive(Parser, Debug)]
#[command(name = PROGRAM, version, about)]
struct Args {
    /// Listen for the frontend on this Unix socket (incompatible with --fd). With --switch,
    /// repeat it: one switch port per socket.
    #[arg(long, value_name = "PATH")]
    socket_path: Vec<PathBuf>,

    /// Use this inherited file descriptor as the vhost-user socket: a listening socket, or a
    /// connection to serve once (incompatible with --socket-path). With --switch, repeat it.
    #[arg(long, value_name = "FDNUM")]
    fd: Vec<RawFd>,

    /// Print the capabilities in JSON and exit.
    #[arg(long)]
    print_capabilities: bool,

    /// Attach to the TAP interface NAME, creating it if it does not exist (which needs
    /// CAP_NET_ADMIN).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["tap_fd", "switch"])]
    tap: Option<String>,

    /// Use these inherited descriptors of one TAP interface (opened with IFF_TAP, IFF_NO_PI,
    /// IFF_VNET_HDR and, for several, IFF_MULTI_QUEUE), one per queue pair.
    #[arg(
        long,
        value_name = "FD[,FD...]",
        value_delimiter = ',',
        conflicts_with = "switch"
    )]
    tap_fd: Vec<RawFd>,

    /// Connect the devices of every socket to an in-process L2 switch.
    #[arg(long)]
    switch: bool,

    /// The MAC address. With --switch, once for a base address incremented per port, or once
    /// per port.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: Vec<MacAddress>,

    /// Number of receive/transmit queue pairs (default: 1, or the number of --tap-fd
    /// descriptors).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUE_PAIRS)))]
    queue_pairs: Option<u16>,

    /// Maximum size of each queue (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,

    /// The MTU offered to the driver; larger transmitted frames are dropped.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(i64::from(MIN_MTU)..))]
    mtu: u16,

    /// With --switch: packets each port's queue pair holds before the switch drops.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65536))]
    switch_queue: u32,

    /// Busy-poll each queue pair for this many microseconds after the last packet before
    /// sleeping (an idle poller yields its CPU to other threads between rounds).
    #[arg(long, default_value_t = 0, value_name = "US")]
    poll_us: u64,

    #[command(flatten)]
    sandbox: program::SandboxArgs,
}

fn parse_mac(s: &str) -> Result<MacAddress, String> {
    let mac: MacAddress = s.parse().map_err(|e| format!("{e}"))?;
    if mac.is_multicast() {
        return Err(format!("{mac} is a multicast address"));
    }
    Ok(mac)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n < 2 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two of at least 2"));
    }
    Ok(n)
}

fn capabilities() -> serde_json::Value {
    // The vhost-user capability schema defines no net features.
    serde_json::json!({ "type": "net" })
}

/// Where the packets go.
enum Packets {
    Tap(String),
    TapFds(Vec<RawFd>),
    Switch,
}

/// The checked command line.
struct Plan {
    sockets: Vec<program::SocketSource>,
    packets: Packets,
    macs: Vec<MacAddress>,
    config: NetConfig,
    switch_queue: usize,
    sandbox: program::SandboxArgs,
}

/// A command-line error: one line, exit code 2.
fn usage(message: &str) -> ! {
    program::usage_error(PROGRAM, message)
}

fn plan(args: Args) -> Plan {
    let sockets: Vec<program::SocketSource> =
        match (args.socket_path.is_empty(), args.fd.is_empty()) {
            (false, false) => usage("--socket-path and --fd are incompatible"),
            (true, true) => usage("one of --socket-path or --fd is required"),
            (false, true) => args
                .socket_path
                .iter()
                .map(|p| program::socket_source(PROGRAM, Some(p.clone()), None))
                .collect(),
            (true, false) => args
                .fd
                .iter()
                .map(|&fd| program::socket_source(PROGRAM, None, Some(fd)))
                .collect(),
        };
    let packets = match (args.tap, args.tap_fd.is_empty(), args.switch) {
        (Some(name), true, false) => Packets::Tap(name),
        (None, false, false) => Packets::TapFds(args.tap_fd.clone()),
        (None, true, true) => Packets::Switch,
        _ => usage("one of --tap, --tap-fd or --switch is required"),
    };
    let ports = sockets.len();
    if ports > 1 && !matches!(packets, Packets::Switch) {
        usage("several sockets need --switch (one switch port per socket)");
    }
    let pairs = match (&packets, args.queue_pairs) {
        (Packets::TapFds(fds), Some(p)) if usize::from(p) != fds.len() => usage(&format!(
            "--queue-pairs {p} does not match the {} --tap-fd descriptors",
            fds.len()
        )),
        (Packets::TapFds(fds), _) => match u16::try_from(fds.len()) {
            Ok(n) if n <= MAX_QUEUE_PAIRS => n,
            _ => usage(&format!("at most {MAX_QUEUE_PAIRS} --tap-fd descriptors")),
        },
        (_, p) => p.unwrap_or(1),
    };
    let macs = match args.mac.len() {
        0 => (0..ports as u64).map(|i| DEFAULT_MAC.offset(i)).collect(),
        1 => (0..ports as u64).map(|i| args.mac[0].offset(i)).collect(),
        n if n == ports => args.mac.clone(),
        n => usage(&format!(
            "{n} --mac addresses for {ports} ports: give one (a base) or one per port"
        )),
    };
    if let Some(m) = macs.iter().find(|m| m.is_multicast()) {
        usage(&format!(
            "the MAC address {m} (incremented from --mac) is a multicast address"
        ));
    }
    let config = NetConfig {
        queue_pairs: pairs,
        queue_size: args.queue_size,
        mtu: args.mtu,
        poll: std::time::Duration::from_micros(args.poll_us),
        ..NetConfig::default()
    };
    Plan {
        sockets,
        packets,
        macs,
        config,
        switch_queue: args.switch_queue as usize,
        sandbox: args.sandbox,
    }
}

/// Takes ownership of the `--tap-fd` descriptors the process inherited.
fn adopt_tap_fds(fds: &[RawFd], sockets: &[program::SocketSource]) -> anyhow::Result<Vec<OwnedFd>> {
    let mut seen = HashSet::new();
    for s in sockets {
        if let program::SocketSource::Fd(fd) = s {
            seen.insert(*fd);
        }
    }
    let mut owned = Vec::with_capacity(fds.len());
    for &fd in fds {
        anyhow::ensure!(fd >= 0, "--tap-fd {fd} is not a file descriptor");
        anyhow::ensure!(
            seen.insert(fd),
            "--tap-fd {fd} is given twice (or is also --fd)"
        );
        // SAFETY: fcntl(F_GETFD) on any integer is harmless; it tells whether the fd is open.
        #[allow(unsafe_code)]
        let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        anyhow::ensure!(open, "--tap-fd {fd} is not an open file descriptor");
        // SAFETY: the descriptor is open (checked above), appears once on the command line
        // (checked above) and was handed to this process to own by the convention of
        // `--tap-fd`; nothing else in the program refers to it.
        #[allow(unsafe_code)]
        owned.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(owned)
}

fn main() {
    program::handle_print_capabilities(&capabilities());
    let args: Args = program::parse_args(PROGRAM);
    let plan = plan(args);
    program::init_logging();
    if let Err(e) = run(plan) {
        log::error!("{e:#}");
        std::process::exit(program::EXIT_FAILURE);
    }
}

fn devices(plan: &mut Plan) -> anyhow::Result<Vec<Net>> {
    let config = |i: usize| NetConfig {
        mac: plan.macs[i],
        ..plan.config.clone()
    };
    let pairs = plan.config.queue_pairs;
    let backends: Vec<Box<dyn PacketBackend>> = match &plan.packets {
        Packets::Tap(name) => vec![Box::new(Tap::open(name, pairs)?)],
        Packets::TapFds(fds) => {
            let owned = adopt_tap_fds(fds, &plan.sockets)?;
            vec![Box::new(Tap::from_fds(owned)?)]
        }
        Packets::Switch => {
            let switch = Switch::new(
                plan.sockets.len(),
                pairs,
                SwitchConfig {
                    queue_capacity: plan.switch_queue,
                    ..SwitchConfig::default()
                },
            )?;
            (0..switch.ports())
                .map(|i| Box::new(switch.port(i)) as Box<dyn PacketBackend>)
                .collect()
        }
    };
    backends
        .into_iter()
        .enumerate()
        .map(|(i, b)| Net::new(config(i), b).with_context(|| format!("device {i}")))
        .collect()
}

/// What the sandbox must admit for the devices of `plan`.
fn device_sandbox(plan: &Plan) -> program::DeviceSandbox {
    let backend = match plan.packets {
        Packets::Tap(_) | Packets::TapFds(_) => sandbox::Backend::Tap,
        Packets::Switch => sandbox::Backend::Switch,
    };
    program::DeviceSandbox {
        layer: sandbox::net_layer(backend),
        max_open_files: max_open_files(plan.sockets.len(), plan.config.queue_pairs),
    }
}

/// RLIMIT_NOFILE for `ports` devices of `pairs` queue pairs: per pair about 13 descriptors (the
/// kick, call and error eventfds of two queues, the worker's epoll and stop eventfds, the
/// handler's epoll and wake-up eventfd, the TAP descriptor or switch eventfd), rounded up to
/// 16; per port 64 more for the control queue, the frontend's connection, backend channel and
/// memory regions; never less than the sandbox's default.
fn max_open_files(ports: usize, pairs: u16) -> u64 {
    let per_port = 64 + 16 * u64::from(pairs);
    (64 + ports as u64 * per_port).max(outboard_sandbox::DEFAULT_MAX_OPEN_FILES)
}

fn run(mut plan: Plan) -> anyhow::Result<()> {
    // Before any other thread exists, so that every thread inherits the blocked signals.
    let signals = program::block_termination_signals()?;
    // Everything the devices need from the host is opened here, before the sandbox: the TAP
    // descriptors (or the switch's eventfds) and every port's socket.
    let device_sandbox = device_sandbox(&plan);
    let devices = devices(&mut plan)?;
    let mut sockets = std::mem::take(&mut plan.sockets)
        .into_iter()
        .map(program::open_socket)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shutdown = program::enter_sandbox(&plan.sandbox, device_sandbox, signals, &mut sockets)?;
    let mut threads = Vec::with_capacity(devices.len());
    for (i, (device, socket)) in devices.into_iter().zip(sockets).enumerate() {
        let stop = shutdown
            .try_clone()
            .context("cannot clone the shutdown eventfd")?;
        let thread = std::thread::Builder::new()
            .name(format!("port-{i}"))
            .spawn(move || {
                // Started by the confined main thread: it runs under the control filter.
                outboard_sandbox::inherit_role(outboard_sandbox::Role::Control);
                let mut backend = VhostUserBackend::new(Box::new(device), BackendConfig::default());
                program::serve(&mut backend, &socket, &stop)
            })
            .with_context(|| format!("cannot start the control thread of port {i}"))?;
        threads.push(thread);
    }
    let mut result = Ok(());
    for (i, t) in threads.into_iter().enumerate() {
        let outcome = match t.join() {
            Ok(r) => r.with_context(|| format!("port {i}")),
            Err(_) => Err(anyhow::anyhow!("the control thread of port {i} panicked")),
        };
        if let Err(e) = outcome {
            log::error!("{e:#}");
            // Stop the other ports too: the program failed.
            let _ = shutdown.write(1);
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}
