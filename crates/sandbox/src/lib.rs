//! Least privilege for Outboard's backend processes.
//!
//! A backend trusts nothing its frontend or the guest sends, so it gives up, once its storage
//! and its socket are open, everything it does not need to serve them:
//!
//! - **seccomp**, per thread role ([`Role`]): each thread installs the filter of its role, built
//!   at startup from a [`Policy`] of layers (the common runtime, the program conventions, the
//!   VIRTIO framework, the vhost-user transport, the device), every rule with the reason it
//!   exists. A violation kills the process, or traps into a report naming the system call and
//!   the thread's role, or is only logged by the kernel ([`SeccompMode`]).
//! - **Landlock**: no path at all (the files the device needs are open already), no TCP, no
//!   abstract Unix sockets or signals outside the sandbox. Best effort: a kernel without
//!   Landlock degrades with a warning.
//! - **no_new_privs**, an empty capability set (also for root), no core dumps and a cap on open
//!   descriptors.
//! - the socket file the program created is removed at exit by a [`SocketReaper`], a helper
//!   process forked before the sandbox, so that the backend needs no right to remove files.
//! - optionally ([`SandboxLevel::Namespace`]) new user, mount, IPC, network and UTS namespaces
//!   with an empty, read-only root holding only /proc.
//!
//! The order is the program's: parse the command line, open storage and socket, then
//!
//! ```text
//! Sandbox::new(config, &policy)   compile every role's filter; SIGSYS handler (trap)
//! sandbox.restrict_process()      single-threaded: namespaces, rlimits, capabilities,
//!                                 Landlock + no_new_privs (inherited by every later thread)
//! confine_thread(Role::Signals)   in the signal thread, first thing
//! confine_thread(Role::Control)   in the main thread, before serving
//! inherit_role(Role::Control)     in further control threads the main thread starts
//! worker_thread_start             the hook each queue worker runs first
//! ```
//!
//! io_uring: requests on a ring are carried out by the kernel (in the submitting thread or its
//! io-wq workers) without passing through seccomp, so the filters only decide who may call
//! `io_uring_enter` on a ring made before the sandbox, and refuse new rings. What a request may
//! reach is bounded by Landlock (opening by path) and the namespaces, not by seccomp.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod error;
mod filesystem;
mod namespace;
pub mod policy;
mod process;
mod reaper;
mod seccomp;
mod selftest;
mod sys;
mod trap;

use std::fmt;
use std::str::FromStr;

pub use error::SandboxError;
pub use filesystem::{Enforcement, LandlockReport};
pub use namespace::user_namespaces_available;
pub use policy::layers;
pub use policy::{
    arg, ArgCmp, ArgRef, Entry, Layer, Policy, PolicyError, Role, RolePolicy, Roles, Rule, Syscall,
    Verdict, Width,
};
pub use process::{DroppedCapabilities, Limits};
pub use reaper::{lock_socket_dir, DirLock, SocketReaper};
pub use seccomp::{confine_thread, inherit_role, worker_thread_start, SeccompMode};
pub use selftest::SelfTest;
pub use sys::syscall_name;
pub use trap::TRAP_EXIT_STATUS;

#[doc(hidden)]
pub mod __private {
    pub use libc;
}

/// RLIMIT_NOFILE in the sandbox unless configured otherwise: room for 64 queues' kick, call
/// and error eventfds, their workers' epoll, stop eventfds and io_uring instances, and every
/// memory region a frontend may add.
pub const DEFAULT_MAX_OPEN_FILES: u64 = 1024;

/// How much of the process-wide confinement to apply (seccomp is chosen separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxLevel {
    /// Nothing process-wide: no Landlock, namespaces, capability drop or resource limits.
    None,
    /// Landlock, no_new_privs, an empty capability set and resource limits.
    Landlock,
    /// All of [`SandboxLevel::Landlock`], inside new user, mount, IPC, network and UTS
    /// namespaces with an empty root.
    Namespace,
}

impl SandboxLevel {
    /// The names `FromStr` accepts, in the order `--help` shows them.
    pub const NAMES: [&'static str; 3] = ["none", "landlock", "namespace"];
}

impl FromStr for SandboxLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(SandboxLevel::None),
            "landlock" => Ok(SandboxLevel::Landlock),
            "namespace" => Ok(SandboxLevel::Namespace),
            _ => Err(format!(
                "unknown sandbox {s:?} (expected one of {})",
                SandboxLevel::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for SandboxLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SandboxLevel::NAMES[*self as usize])
    }
}

/// What to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The process-wide confinement.
    pub level: SandboxLevel,
    /// The seccomp action on a violation (or no filter).
    pub seccomp: SeccompMode,
    /// RLIMIT_NOFILE (never raised above the current hard limit).
    pub max_open_files: u64,
}

impl SandboxConfig {
    /// `level` and `seccomp` with the default limits.
    pub fn new(level: SandboxLevel, seccomp: SeccompMode) -> SandboxConfig {
        SandboxConfig {
            level,
            seccomp,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
        }
    }
}

/// What the sandbox achieved, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Namespaces were entered.
    pub namespaces: bool,
    /// Landlock's outcome, if it was asked for.
    pub landlock: Option<LandlockReport>,
    /// The capabilities dropped, if that was asked for.
    pub capabilities: Option<DroppedCapabilities>,
    /// The resource limits set, if that was asked for.
    pub limits: Option<Limits>,
}

/// The sandbox of this process. See the crate documentation for the order of the steps.
#[derive(Debug)]
pub struct Sandbox {
    config: SandboxConfig,
    report: Report,
}

impl Sandbox {
    /// Compiles the filter of every role from `policy` and keeps them for the threads of this
    /// process (once per process), and installs the SIGSYS handler in trap mode. Restricts
    /// nothing yet.
    pub fn new(config: SandboxConfig, policy: &Policy) -> Result<Sandbox, SandboxError> {
        seccomp::prepare(policy, config.seccomp)?;
        if config.seccomp == SeccompMode::Trap {
            trap::install().map_err(|source| SandboxError::Sys {
                what: "installing the SIGSYS handler",
                source,
            })?;
        }
        Ok(Sandbox {
            config,
            report: Report::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// What has been applied so far.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Applies the process-wide confinement of the configured level. The process must still
    /// have a single thread, so that every thread is covered (and unshare can make a user
    /// namespace): start threads after this, and have each call [`confine_thread`].
    pub fn restrict_process(&mut self) -> Result<(), SandboxError> {
        if self.config.level == SandboxLevel::None {
            if self.config.seccomp != SeccompMode::None {
                process::set_no_new_privs()?;
            }
            return Ok(());
        }
        match process::thread_count() {
            Some(1) => {}
            Some(threads) => return Err(SandboxError::Threaded { threads }),
            None => log::warn!(
                "sandbox: /proc is not readable, so the process cannot check it has one thread"
            ),
        }
        if self.config.level == SandboxLevel::Namespace {
            namespace::enter()?;
            self.report.namespaces = true;
        }
        self.report.limits = Some(process::limit_resources(self.config.max_open_files)?);
        self.report.capabilities = Some(process::drop_capabilities()?);
        process::set_no_new_privs()?;
        let landlock = filesystem::restrict()?;
        if landlock.enforcement != Enforcement::Full {
            log::warn!(
                "sandbox: Landlock is {} on this kernel (ABI {:?}): the file system is {} confined",
                if landlock.enforcement == Enforcement::None {
                    "not available"
                } else {
                    "only partly available"
                },
                landlock.abi,
                if landlock.enforcement == Enforcement::None {
                    "not"
                } else {
                    "partly"
                },
            );
        }
        self.report.landlock = Some(landlock);
        Ok(())
    }

    /// A one-line summary of the sandbox for the log.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("sandbox {}", self.config.level)];
        if self.report.namespaces {
            parts.push("namespaces user, mount, ipc, net, uts with an empty root".into());
        }
        if let Some(l) = self.report.landlock {
            let abi = l
                .abi
                .map_or("no Landlock".to_string(), |v| format!("ABI {v}"));
            parts.push(match l.enforcement {
                Enforcement::Full => format!("Landlock fully enforced ({abi})"),
                Enforcement::Partial => format!("Landlock partly enforced ({abi})"),
                Enforcement::None => format!("Landlock NOT enforced ({abi})"),
            });
        }
        if let Some(c) = self.report.capabilities {
            let place = if self.report.namespaces {
                " in its new user namespace"
            } else {
                ""
            };
            parts.push(format!(
                "capabilities dropped (effective was {:#x}{place})",
                c.effective
            ));
        }
        if let Some(l) = self.report.limits {
            parts.push(format!("RLIMIT_NOFILE {}, no core dumps", l.open_files));
        }
        match seccomp::summary() {
            Some((SeccompMode::None, _)) | None => parts.push("no seccomp filter".into()),
            Some((mode, counts)) => {
                let roles: Vec<String> = counts.iter().map(|(r, n)| format!("{r} {n}")).collect();
                parts.push(format!(
                    "seccomp {mode} (system calls per role: {})",
                    roles.join(", ")
                ));
            }
        }
        parts.join("; ")
    }
}
