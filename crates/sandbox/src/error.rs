//! The sandbox's error type.

use std::io;

use crate::policy::{PolicyError, Role};

/// Why the sandbox could not be set up. Every failure is fatal to the program: a backend that
/// was asked for a sandbox never serves without it.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The policy is inconsistent.
    #[error("invalid seccomp policy")]
    Policy(#[from] PolicyError),
    /// seccompiler refused a role's rules.
    #[error("cannot compile the seccomp filter of the {role} role")]
    Compile {
        /// The role.
        role: Role,
        /// The underlying error.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused a role's filter.
    #[error("cannot install the seccomp filter of the {role} role")]
    Install {
        /// The role.
        role: Role,
        /// The underlying error.
        #[source]
        source: seccompiler::Error,
    },
    /// [`crate::Sandbox::new`] was called twice in one process.
    #[error("the sandbox is already set up in this process")]
    AlreadyPrepared,
    /// A thread asked for its filter before [`crate::Sandbox::new`].
    #[error("no sandbox is set up in this process")]
    NotPrepared,
    /// The process-wide restrictions must be applied while the process has one thread, so that
    /// every thread inherits them.
    #[error("the process already has {threads} threads: the sandbox must be entered before any thread starts")]
    Threaded {
        /// The number of threads.
        threads: usize,
    },
    /// A system call setting up the sandbox failed.
    #[error("{what} failed")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Landlock refused the ruleset (not merely "unsupported", which degrades with a warning).
    #[error("cannot restrict the file system with Landlock")]
    Landlock(#[from] landlock::RulesetError),
}

impl SandboxError {
    /// `what` failed with the calling thread's errno.
    pub(crate) fn last_os_error(what: &'static str) -> SandboxError {
        SandboxError::Sys {
            what,
            source: io::Error::last_os_error(),
        }
    }
}
