//! The backends under test: our `vhost-user-blk` and qemu-storage-daemon, each a child process
//! pinned to one CPU, with the per-process counters (CPU time, context switches) the report
//! shows next to the throughput.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Our backend's I/O engine (`--engine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// io_uring (the default).
    IoUring,
    /// Blocking preadv/pwritev on the worker thread.
    Sync,
}

impl Engine {
    fn suffix(self) -> &'static str {
        match self {
            Engine::IoUring => "",
            Engine::Sync => ", sync engine",
        }
    }
}

/// Which program serves the disk, and how it is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// Our `vhost-user-blk`.
    Ours {
        /// `--poll-us` (0: sleep in epoll as soon as the queues are empty).
        poll_us: u64,
        /// `--threads` (None: the default, one worker per queue).
        threads: Option<u16>,
        /// `--engine`.
        engine: Engine,
    },
    /// qemu-storage-daemon's vhost-user-blk export.
    Qsd {
        /// Run the export in an `iothread` object (default poll-max-ns) instead of the main
        /// loop.
        iothread: bool,
    },
}

/// What the disk is backed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// A null disk of this many bytes: reads return zeroes, writes are dropped.
    Null(u64),
    /// A preallocated file (on tmpfs in the standard matrix).
    File(PathBuf),
}

impl Storage {
    /// Short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Storage::Null(_) => "null",
            Storage::File(_) => "file",
        }
    }
}

/// One backend configuration of the matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    /// Name in tables (`qsd`, `ours-poll50`, …).
    pub name: String,
    /// The program and its options.
    pub program: Program,
    /// Request queues.
    pub queues: u16,
    /// Our binary for this variant, if not the launcher's (A/B runs of two builds).
    pub bin: Option<PathBuf>,
}

impl Variant {
    /// Whether this is a QSD variant (a reference, not a contender).
    pub fn is_qsd(&self) -> bool {
        matches!(self.program, Program::Qsd { .. })
    }

    /// Threads that serve the queues, as configured (not counting control threads).
    pub fn serving_threads(&self) -> u16 {
        match self.program {
            Program::Ours { threads, .. } => threads.unwrap_or(self.queues),
            Program::Qsd { .. } => 1,
        }
    }

    /// How the serving threads wait for work, for tables.
    pub fn wait_style(&self) -> String {
        match self.program {
            Program::Ours {
                poll_us: 0, engine, ..
            } => format!("epoll{}", engine.suffix()),
            Program::Ours {
                poll_us, engine, ..
            } => format!("poll {poll_us} µs, then epoll{}", engine.suffix()),
            Program::Qsd { iothread: false } => "main loop (glib poll)".into(),
            Program::Qsd { iothread: true } => "iothread aio_poll (no vq polling)".into(),
        }
    }
}

/// Where the programs are and how to start them.
#[derive(Clone, Debug)]
pub struct Launcher {
    /// Our `vhost-user-blk` binary.
    pub ours: PathBuf,
    /// `qemu-storage-daemon`.
    pub qsd: PathBuf,
    /// Pin every backend thread to this CPU (through `taskset`), if set.
    pub cpu: Option<usize>,
    /// Directory for sockets.
    pub dir: PathBuf,
    /// `setpriv`, to have every backend killed when this process dies, however it dies.
    pub setpriv: Option<PathBuf>,
}

/// Why a backend could not be started.
#[derive(Debug)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// A running backend; terminated on drop.
#[derive(Debug)]
pub struct Backend {
    child: Child,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The command line, for the report.
    pub command: String,
}

impl Launcher {
    /// The argument vector (program first) that starts `v` on `storage` listening on `socket`.
    pub fn command(&self, v: &Variant, storage: &Storage, socket: &Path) -> Vec<String> {
        let mut cmd = Vec::new();
        if let Some(cpu) = self.cpu {
            cmd.extend(["taskset".into(), "-c".into(), cpu.to_string()]);
        }
        if let Some(setpriv) = &self.setpriv {
            cmd.extend([
                setpriv.display().to_string(),
                "--pdeathsig".into(),
                "TERM".into(),
            ]);
        }
        match v.program {
            Program::Ours {
                poll_us,
                threads,
                engine,
            } => {
                cmd.push(v.bin.as_ref().unwrap_or(&self.ours).display().to_string());
                cmd.extend(["--socket-path".into(), socket.display().to_string()]);
                match storage {
                    Storage::Null(size) => {
                        cmd.extend(["--null-size".into(), size.to_string()]);
                    }
                    Storage::File(path) => {
                        cmd.extend(["--blk-file".into(), path.display().to_string()]);
                    }
                }
                cmd.extend(["--num-queues".into(), v.queues.to_string()]);
                if let Some(t) = threads {
                    cmd.extend(["--threads".into(), t.to_string()]);
                }
                // Always explicit: the program's default polls.
                cmd.extend(["--poll-us".into(), poll_us.to_string()]);
                if engine == Engine::Sync {
                    cmd.extend(["--engine".into(), "sync".into()]);
                }
            }
            Program::Qsd { iothread } => {
                cmd.push(self.qsd.display().to_string());
                let node = match storage {
                    Storage::Null(size) => {
                        format!("driver=null-co,node-name=d0,size={size},read-zeroes=on")
                    }
                    // Buffered (tmpfs has no O_DIRECT before 6.6 and it would not help), no
                    // image locking so that several daemons can open the one file, io_uring
                    // as our backend uses. The file node is exported directly: no format layer.
                    Storage::File(path) => format!(
                        "driver=file,node-name=d0,filename={},aio=io_uring,cache.direct=off,locking=off",
                        path.display()
                    ),
                };
                cmd.extend(["--blockdev".into(), node]);
                let mut export = format!(
                    "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues={}",
                    socket.display(),
                    v.queues
                );
                if iothread {
                    cmd.extend(["--object".into(), "iothread,id=iot0".into()]);
                    export.push_str(",iothread=iot0");
                }
                cmd.extend(["--export".into(), export]);
            }
        }
        cmd
    }

    /// Starts `v` on `storage`. The frontend connects with retries, so this does not wait.
    pub fn start(&self, v: &Variant, storage: &Storage) -> Result<Backend, StartError> {
        let socket = self
            .dir
            .join(format!("{}-{}-q{}.sock", v.name, storage.name(), v.queues));
        let _ = fs::remove_file(&socket);
        let argv = self.command(v, storage, &socket);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| StartError(format!("cannot start {}: {e}", argv[0])))?;
        Ok(Backend {
            child,
            socket,
            command: argv.join(" "),
        })
    }
}

/// Per-process counters summed over its threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcCounters {
    /// Time on a CPU (schedstat), nanoseconds.
    pub cpu_ns: u64,
    /// Voluntary plus involuntary context switches.
    pub switches: u64,
}

impl ProcCounters {
    /// `self - earlier`, saturating (a thread that exited takes its counts with it).
    pub fn since(self, earlier: ProcCounters) -> ProcCounters {
        ProcCounters {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            switches: self.switches.saturating_sub(earlier.switches),
        }
    }
}

/// A thread of a backend and the CPUs it may run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadInfo {
    /// `comm`.
    pub name: String,
    /// `Cpus_allowed_list`.
    pub cpus: String,
}

impl Backend {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tasks(&self) -> Vec<PathBuf> {
        let dir = PathBuf::from(format!("/proc/{}/task", self.pid()));
        fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// CPU time and context switches of every thread so far.
    pub fn counters(&self) -> ProcCounters {
        let mut c = ProcCounters::default();
        for task in self.tasks() {
            if let Ok(s) = fs::read_to_string(task.join("schedstat")) {
                c.cpu_ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            if let Ok(s) = fs::read_to_string(task.join("status")) {
                for line in s.lines() {
                    if line.starts_with("voluntary_ctxt_switches")
                        || line.starts_with("nonvoluntary_ctxt_switches")
                    {
                        c.switches += line
                            .split_whitespace()
                            .nth(1)
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(0);
                    }
                }
            }
        }
        c
    }

    /// Every thread's name and allowed CPUs, to show the pinning took.
    pub fn threads(&self) -> Vec<ThreadInfo> {
        let mut out = Vec::new();
        for task in self.tasks() {
            let name = fs::read_to_string(task.join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            let cpus = fs::read_to_string(task.join("status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                        .map(|v| v.trim().to_string())
                })
                .unwrap_or_default();
            out.push(ThreadInfo { name, cpus });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Both programs exit cleanly on SIGTERM; SIGKILL if one does not within a second.
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                let _ = fs::remove_file(&self.socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.socket);
    }
}
