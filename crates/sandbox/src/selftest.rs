//! Test-only triggers that prove the sandbox on a running backend.
//!
//! The trigger comes from the environment variable [`SelfTest::ENV`], read when the program
//! starts: only whoever launches the backend can set it, never a frontend or a guest. It runs
//! once, right after the sandbox is entered and before the first frontend is served.

use std::os::fd::{FromRawFd, OwnedFd};

use crate::policy::Role;
use crate::seccomp;

/// A self-test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfTest {
    /// Make a system call no role's filter allows (`socket(AF_INET)`) on the thread of this
    /// role: the control thread itself, or a new thread that installs the worker filter first.
    ForbiddenSyscall(Role),
    /// Open a path outside the Landlock rules (`/`), and log the outcome.
    OpenFile,
}

impl SelfTest {
    /// The environment variable: `forbidden-syscall`, `forbidden-syscall-worker` or
    /// `open-file`.
    pub const ENV: &'static str = "OUTBOARD_SANDBOX_SELFTEST";

    /// The self-test the environment asks for, if any.
    pub fn from_env() -> Result<Option<SelfTest>, String> {
        let Some(value) = std::env::var_os(Self::ENV) else {
            return Ok(None);
        };
        match value.to_str() {
            Some("forbidden-syscall") => Ok(Some(SelfTest::ForbiddenSyscall(Role::Control))),
            Some("forbidden-syscall-worker") => Ok(Some(SelfTest::ForbiddenSyscall(Role::Worker))),
            Some("open-file") => Ok(Some(SelfTest::OpenFile)),
            _ => Err(format!(
                "{}={value:?}: expected forbidden-syscall, forbidden-syscall-worker or open-file",
                Self::ENV
            )),
        }
    }

    /// Runs the self-test on the calling (control) thread. A forbidden system call that gets
    /// through (seccomp `log` or `none`) is logged and undone.
    pub fn run(self) {
        match self {
            SelfTest::ForbiddenSyscall(Role::Worker) => {
                let thread = std::thread::Builder::new()
                    .name("selftest-worker".into())
                    .spawn(|| {
                        if let Err(e) = seccomp::worker_thread_start() {
                            log::error!("sandbox self-test: {e}");
                            return;
                        }
                        forbidden_syscall(Role::Worker);
                    });
                match thread {
                    Ok(t) => {
                        let _ = t.join();
                    }
                    Err(e) => log::error!("sandbox self-test: cannot start a thread: {e}"),
                }
            }
            SelfTest::ForbiddenSyscall(role) => forbidden_syscall(role),
            SelfTest::OpenFile => match std::fs::File::open("/") {
                Ok(_) => {
                    log::warn!("sandbox self-test: opened / (the file system is not confined)")
                }
                Err(e) => log::info!("sandbox self-test: opening / failed: {e}"),
            },
        }
    }
}

fn forbidden_syscall(role: Role) {
    log::info!("sandbox self-test: calling socket(AF_INET) on a {role} thread");
    // SAFETY: socket takes integer arguments only; a descriptor it returns is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        log::warn!("sandbox self-test: socket(AF_INET) went through: no filter refused it");
    } else {
        log::info!(
            "sandbox self-test: socket(AF_INET) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}
