//! Compiling each role's [`RolePolicy`] into BPF at startup, and installing it in the threads of
//! that role.
//!
//! The compiled filters live in a process-wide table, so that a thread can install its own
//! with a plain function ([`confine_thread`], [`worker_thread_start`]) whatever started it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::SandboxError;
use crate::policy::{ArgCmp, Policy, Role, RolePolicy, Verdict, Width};
use crate::trap;

/// What the kernel does when a thread makes a system call its role's filter does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kill the whole process at once (`SECCOMP_RET_KILL_PROCESS`; it dies of SIGSYS).
    Kill,
    /// Send SIGSYS: the sandbox's handler writes the system call, the thread and its role to
    /// stderr, then exits with status 159 (128 + SIGSYS).
    Trap,
    /// Let the call through and have the kernel log it (`SECCOMP_RET_LOG`: an audit record
    /// with `syscall=` and `comm=`, the thread's name, in the kernel log). For building a
    /// policy, not for production.
    Log,
    /// No filter.
    None,
}

impl SeccompMode {
    /// The names `FromStr` accepts, in the order `--help` shows them.
    pub const NAMES: [&'static str; 4] = ["kill", "trap", "log", "none"];

    fn mismatch_action(self) -> Option<SeccompAction> {
        match self {
            SeccompMode::Kill => Some(SeccompAction::KillProcess),
            SeccompMode::Trap => Some(SeccompAction::Trap),
            SeccompMode::Log => Some(SeccompAction::Log),
            SeccompMode::None => None,
        }
    }
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "trap" => Ok(SeccompMode::Trap),
            "log" => Ok(SeccompMode::Log),
            "none" => Ok(SeccompMode::None),
            _ => Err(format!(
                "unknown seccomp action {s:?} (expected one of {})",
                SeccompMode::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Trap => "trap",
            SeccompMode::Log => "log",
            SeccompMode::None => "none",
        })
    }
}

/// The BPF programs of one role, in the order they are installed.
#[derive(Debug)]
pub(crate) struct RoleFilter {
    /// The refusals (each refused call returns its errno, everything else is allowed), if any,
    /// then the allow-list, whose default is the mode's action. Refusals go first so that
    /// installing them needs nothing from the allow-list.
    programs: Vec<BpfProgram>,
    /// System calls the allow-list admits.
    allowed: usize,
}

impl RoleFilter {
    /// The programs, in installation order.
    #[cfg(test)]
    pub(crate) fn programs(&self) -> &[BpfProgram] {
        &self.programs
    }
}

/// Every role's filter, compiled once per process.
#[derive(Debug)]
pub(crate) struct Filters {
    mode: SeccompMode,
    roles: BTreeMap<Role, RoleFilter>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Compiles every role's filter and stores them for the threads of the process.
pub(crate) fn prepare(policy: &Policy, mode: SeccompMode) -> Result<(), SandboxError> {
    let mut roles = BTreeMap::new();
    if mode != SeccompMode::None {
        for role in Role::ALL {
            roles.insert(role, compile(&policy.role(role)?, mode)?);
        }
    }
    FILTERS
        .set(Filters { mode, roles })
        .map_err(|_| SandboxError::AlreadyPrepared)
}

/// The mode the process was prepared with, and the number of system calls each role's filter
/// admits.
pub(crate) fn summary() -> Option<(SeccompMode, Vec<(Role, usize)>)> {
    let f = FILTERS.get()?;
    let counts = f.roles.iter().map(|(r, rf)| (*r, rf.allowed)).collect();
    Some((f.mode, counts))
}

/// Compiles `policy` for `mode` (which must not be [`SeccompMode::None`]).
pub(crate) fn compile(policy: &RolePolicy, mode: SeccompMode) -> Result<RoleFilter, SandboxError> {
    let role = policy.role;
    let compile_err = |source| SandboxError::Compile { role, source };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(compile_err)?;
    let mismatch = mode.mismatch_action().unwrap_or(SeccompAction::Allow);
    let mut allow: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut refusals: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for entry in policy.entries() {
        let nr = entry.syscall.nr();
        let rules = match &entry.when {
            None => Vec::new(),
            Some(alternatives) => alternatives
                .iter()
                .map(|conds| {
                    let conds = conds.iter().map(condition).collect::<Result<_, _>>()?;
                    SeccompRule::new(conds)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(compile_err)?,
        };
        // A refused call is allowed by the allow-list so that the refusal's errno, not the
        // mode's action, is what the thread sees.
        if let Verdict::Refuse { errno } = entry.verdict {
            refusals.entry(errno).or_default().insert(nr, Vec::new());
        }
        allow.insert(nr, rules);
    }
    let allowed = policy.allowed_count();
    let mut programs = Vec::new();
    if !refusals.is_empty() {
        programs.push(refusal_program(&refusals));
    }
    let filter =
        SeccompFilter::new(allow, mismatch, SeccompAction::Allow, arch).map_err(compile_err)?;
    programs.push(BpfProgram::try_from(filter).map_err(compile_err)?);
    Ok(RoleFilter { programs, allowed })
}

// Classic BPF, as seccomp runs it (<linux/bpf_common.h>, <linux/seccomp.h>).
/// BPF_LD | BPF_W | BPF_ABS: load a 32-bit word of `seccomp_data`.
const BPF_LD_W_ABS: u16 = 0x20;
/// BPF_JMP | BPF_JEQ | BPF_K: jump if the accumulator equals the constant.
const BPF_JMP_JEQ_K: u16 = 0x15;
/// BPF_RET | BPF_K: return the constant.
const BPF_RET_K: u16 = 0x06;
/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: u32 = 0;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// One program that answers each refused system call with its errno and allows everything
/// else (the allow-list installed after it decides about the rest). seccompiler gives a filter
/// a single match action, so this small program is built by hand: check the architecture (a
/// foreign one is left to the allow-list, which kills it), load the number, compare.
fn refusal_program(refusals: &BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>>) -> BpfProgram {
    let allow = libc::SECCOMP_RET_ALLOW;
    let mut prog = vec![
        insn(BPF_LD_W_ABS, 0, 0, DATA_ARCH),
        insn(BPF_JMP_JEQ_K, 1, 0, AUDIT_ARCH),
        insn(BPF_RET_K, 0, 0, allow),
        insn(BPF_LD_W_ABS, 0, 0, DATA_NR),
    ];
    for (errno, calls) in refusals {
        let ret = libc::SECCOMP_RET_ERRNO | (*errno as u32 & libc::SECCOMP_RET_DATA);
        for nr in calls.keys() {
            prog.push(insn(BPF_JMP_JEQ_K, 0, 1, *nr as u32));
            prog.push(insn(BPF_RET_K, 0, 0, ret));
        }
    }
    prog.push(insn(BPF_RET_K, 0, 0, allow));
    prog
}

fn condition(c: &ArgCmp) -> Result<SeccompCondition, seccompiler::BackendError> {
    let width = match c.width {
        Width::Dword => SeccompCmpArgLen::Dword,
        Width::Qword => SeccompCmpArgLen::Qword,
    };
    let op = match c.mask {
        Some(mask) => SeccompCmpOp::MaskedEq(mask),
        None => SeccompCmpOp::Eq,
    };
    SeccompCondition::new(c.index, width, op, c.value)
}

/// Installs the filter of `role` in the calling thread (nothing in [`SeccompMode::None`]).
/// The thread keeps every filter it inherited: this one can only narrow them.
pub fn confine_thread(role: Role) -> Result<(), SandboxError> {
    let filters = FILTERS.get().ok_or(SandboxError::NotPrepared)?;
    trap::label_thread(role);
    let Some(filter) = filters.roles.get(&role) else {
        return Ok(());
    };
    for program in &filter.programs {
        seccompiler::apply_filter(program)
            .map_err(|source| SandboxError::Install { role, source })?;
    }
    log::debug!(
        "sandbox: thread {:?} runs under the {role} filter ({} system calls)",
        std::thread::current().name().unwrap_or("?"),
        filter.allowed
    );
    Ok(())
}

/// Records that the calling thread has the role `role` and runs under that role's filter,
/// which it inherited from the thread that started it (a thread that called
/// [`confine_thread`] with the same role), without installing the filter a second time: a
/// violation report then names the thread's role. For programs with several threads of one
/// role, such as one control thread per socket (`vhost-user-net --switch`).
///
/// Nothing is checked: calling it in a thread whose inherited filter is another role's only
/// mislabels the report.
pub fn inherit_role(role: Role) {
    trap::label_thread(role);
}

/// The queue-worker thread-start hook (`outboard_virtio::worker::set_thread_start_hook`):
/// installs the [`Role::Worker`] filter in the calling thread.
pub fn worker_thread_start() -> Result<(), String> {
    confine_thread(Role::Worker).map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text += &format!(": {s}");
            source = s.source();
        }
        text
    })
}
