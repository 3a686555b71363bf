//! Landlock: after the storage and the socket are open, the backend needs no path at all.
//!
//! Landlock checks access when a file is opened, so descriptors opened before the ruleset is
//! enforced (the disk image, the listening socket, the io_uring instances) keep working, and
//! the ruleset grants no path: every open, create, remove, rename, link, mkdir, truncate or
//! execute by path is refused, as are TCP bind and connect (ABI 4), connecting to an abstract
//! Unix socket or signalling a process outside the sandbox (ABI 6). Reading a symlink such as
//! /proc/self/fd/N is not an access Landlock controls, so the transport's eventfd check still
//! works. On a kernel without Landlock (or an older ABI) the process degrades to what the
//! kernel enforces, with a warning.

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use crate::error::SandboxError;

/// The Landlock ABI this ruleset was written and tested against (Linux 6.15).
const TESTED_ABI: ABI = ABI::V7;

/// How much of the ruleset the kernel enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Everything the ruleset asks for.
    Full,
    /// Part of it (an older Landlock ABI): see the kernel's ABI in the log.
    Partial,
    /// Nothing: the kernel has no Landlock, or it is disabled.
    None,
}

/// What `restrict` achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LandlockReport {
    /// The enforcement.
    pub enforcement: Enforcement,
    /// The Landlock ABI of the running kernel (as far as the `landlock` crate knows it), if any.
    pub abi: Option<i32>,
}

/// Restricts the calling thread, and every thread it starts afterwards, to no path at all.
/// Call while the process has one thread, so that no thread escapes it.
pub(crate) fn restrict() -> Result<LandlockReport, SandboxError> {
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TESTED_ABI))?
        .handle_access(AccessNet::from_all(TESTED_ABI))?
        .scope(Scope::from_all(TESTED_ABI))?
        .create()?
        .no_new_privs(true)
        .restrict_self()?;
    let enforcement = match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::None,
    };
    let abi = match status.landlock {
        LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => Some(kernel_abi.unwrap_or(effective_abi as i32)),
        _ => None,
    };
    Ok(LandlockReport { enforcement, abi })
}
