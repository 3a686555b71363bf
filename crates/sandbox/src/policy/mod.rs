//! The seccomp policy as data: which system calls each thread role may make, and why.
//!
//! A [`Policy`] is a stack of [`Layer`]s (the runtime every process has, the program conventions,
//! the VIRTIO framework, the transport, the device). Each layer is a list of [`Rule`]s; a rule
//! names one system call, the [`Roles`] that need it, optional argument conditions, a
//! [`Verdict`] and the reason it exists. [`Policy::role`] merges the layers into the
//! [`RolePolicy`] of one thread role, which `seccomp` compiles into BPF.
//!
//! Filters are inherited: a new thread runs under its parent's filter, and filters only stack.
//! The control thread starts the queue workers, so its filter admits the worker rules too
//! ([`Role::admits`]); the worker then installs its own, narrower filter at start.

pub mod layers;

use std::collections::BTreeMap;
use std::fmt;

/// A thread role: what a thread does decides what it may ask of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The main thread: accepts frontends, runs the vhost-user message loop and the framework,
    /// starts and stops the queue workers.
    Control,
    /// A vring worker: requests of its queues, storage I/O, interrupts.
    Worker,
    /// The signal thread: waits for SIGTERM/SIGINT/SIGHUP and raises the shutdown eventfd.
    Signals,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Control, Role::Worker, Role::Signals];

    /// The role's name, as logs and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Worker => "worker",
            Role::Signals => "signals",
        }
    }

    /// The roles whose rules this role's filter admits: its own, and those of the threads it
    /// starts, since a new thread runs under its parent's filter (filters only stack, so the
    /// child's own filter can narrow them but never widen them).
    pub fn admits(self) -> Roles {
        match self {
            Role::Control => Roles::CONTROL | Roles::WORKER,
            Role::Worker => Roles::WORKER,
            Role::Signals => Roles::SIGNALS,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Role::Control => 1,
            Role::Worker => 2,
            Role::Signals => 4,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of roles.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    /// The control thread.
    pub const CONTROL: Roles = Roles(1);
    /// Queue workers.
    pub const WORKER: Roles = Roles(2);
    /// The signal thread.
    pub const SIGNALS: Roles = Roles(4);
    /// Every thread.
    pub const ALL: Roles = Roles(7);

    /// Whether `role` is in the set.
    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    /// Whether any role of `other` is in the set.
    pub fn intersects(self, other: Roles) -> bool {
        self.0 & other.0 != 0
    }
}

impl std::ops::BitOr for Roles {
    type Output = Roles;
    fn bitor(self, rhs: Roles) -> Roles {
        Roles(self.0 | rhs.0)
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = Role::ALL
            .iter()
            .filter(|r| self.contains(**r))
            .map(|r| r.name())
            .collect();
        write!(f, "{{{}}}", names.join(", "))
    }
}

/// A system call of this architecture: its number and its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syscall {
    nr: i64,
    ident: &'static str,
}

impl Syscall {
    /// The system call numbered `nr`, named by its `libc` constant (`SYS_read`) or its name.
    pub const fn new(nr: i64, ident: &'static str) -> Syscall {
        Syscall { nr, ident }
    }

    /// The number.
    pub fn nr(self) -> i64 {
        self.nr
    }

    /// The name, as `man 2` spells it.
    pub fn name(self) -> &'static str {
        self.ident.strip_prefix("SYS_").unwrap_or(self.ident)
    }
}

/// The [`Syscall`] of this architecture that `libc` names `SYS_name`:
/// `syscall!(SYS_io_uring_enter)`.
#[macro_export]
macro_rules! syscall {
    ($sys:ident) => {
        $crate::Syscall::new($crate::__private::libc::$sys as i64, stringify!($sys))
    };
}

/// How many bytes of an argument a condition compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// The low 32 bits: `int` and `unsigned int` arguments.
    Dword,
    /// All 64 bits: pointers, sizes, `unsigned long`.
    Qword,
}

/// A comparison of one system call argument with a constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgCmp {
    /// The argument's index (0..=5).
    pub index: u8,
    /// How much of it is compared.
    pub width: Width,
    /// `Some(mask)`: compare `arg & mask`; `None`: compare `arg`.
    pub mask: Option<u64>,
    /// The value it must equal.
    pub value: u64,
}

/// Argument `index` (a 32-bit `int`; [`ArgRef::qword`] for 64-bit ones), to compare.
pub fn arg(index: u8) -> ArgRef {
    ArgRef {
        index,
        width: Width::Dword,
    }
}

/// An argument about to be compared: see [`arg`].
#[derive(Clone, Copy, Debug)]
pub struct ArgRef {
    index: u8,
    width: Width,
}

impl ArgRef {
    /// Compares all 64 bits of the argument.
    pub fn qword(self) -> ArgRef {
        ArgRef {
            width: Width::Qword,
            ..self
        }
    }

    /// The argument equals `value`.
    pub fn eq(self, value: u64) -> ArgCmp {
        ArgCmp {
            index: self.index,
            width: self.width,
            mask: None,
            value,
        }
    }

    /// The bits of the argument under `mask` equal `value`.
    pub fn masked_eq(self, mask: u64, value: u64) -> ArgCmp {
        ArgCmp {
            index: self.index,
            width: self.width,
            mask: Some(mask),
            value,
        }
    }

    /// None of the bits in `bits` is set.
    pub fn none_of(self, bits: u64) -> ArgCmp {
        self.masked_eq(bits, 0)
    }

    /// Every bit in `bits` is set.
    pub fn all_of(self, bits: u64) -> ArgCmp {
        self.masked_eq(bits, bits)
    }
}

/// What the filter does with a system call a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The call goes through.
    Allow,
    /// The call fails with this errno without reaching the kernel: for calls that libraries
    /// make and handle failing (`clone3` → `ENOSYS` makes glibc fall back to `clone`, whose
    /// flags a filter can check).
    Refuse {
        /// The errno the call returns.
        errno: i32,
    },
}

/// One system call a layer needs, for some roles, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The system call.
    pub syscall: Syscall,
    /// The roles that need it.
    pub roles: Roles,
    /// What happens when it matches.
    pub verdict: Verdict,
    /// Alternatives (any may hold) of argument conditions (all must hold); empty: any
    /// arguments.
    pub when: Vec<Vec<ArgCmp>>,
    /// Why the call is needed.
    pub reason: &'static str,
}

impl Rule {
    /// Matches only when every condition in `conditions` holds; call again for an alternative.
    pub fn when(&mut self, conditions: impl IntoIterator<Item = ArgCmp>) -> &mut Rule {
        self.when.push(conditions.into_iter().collect());
        self
    }
}

/// A named list of rules: what one part of the program needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The layer's name (`common`, `vhost-user`, `blk`, …).
    pub name: &'static str,
    /// Its rules.
    pub rules: Vec<Rule>,
}

impl Layer {
    /// An empty layer.
    pub fn new(name: &'static str) -> Layer {
        Layer {
            name,
            rules: Vec::new(),
        }
    }

    /// Allows `syscall` in `roles`, for `reason`. Narrow it with [`Rule::when`].
    pub fn allow(&mut self, roles: Roles, syscall: Syscall, reason: &'static str) -> &mut Rule {
        self.push(roles, syscall, Verdict::Allow, reason)
    }

    /// Makes `syscall` fail with `errno` in `roles`, for `reason`.
    pub fn refuse(
        &mut self,
        roles: Roles,
        syscall: Syscall,
        errno: i32,
        reason: &'static str,
    ) -> &mut Rule {
        self.push(roles, syscall, Verdict::Refuse { errno }, reason)
    }

    fn push(
        &mut self,
        roles: Roles,
        syscall: Syscall,
        verdict: Verdict,
        reason: &'static str,
    ) -> &mut Rule {
        self.rules.push(Rule {
            syscall,
            roles,
            verdict,
            when: Vec::new(),
            reason,
        });
        self.rules.last_mut().expect("just pushed")
    }
}

/// Why a policy cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// A rule has no reason.
    #[error("layer {layer}: the rule for {syscall} has no reason")]
    NoReason {
        /// The layer.
        layer: &'static str,
        /// The system call.
        syscall: &'static str,
    },
    /// A rule applies to no role.
    #[error("layer {layer}: the rule for {syscall} applies to no role")]
    NoRole {
        /// The layer.
        layer: &'static str,
        /// The system call.
        syscall: &'static str,
    },
    /// A rule has an empty alternative, or a condition on an argument that does not exist.
    #[error("layer {layer}: the rule for {syscall} has an invalid condition")]
    BadCondition {
        /// The layer.
        layer: &'static str,
        /// The system call.
        syscall: &'static str,
    },
    /// A refusal has argument conditions (refusals are unconditional).
    #[error("layer {layer}: the refusal of {syscall} has argument conditions")]
    ConditionalRefusal {
        /// The layer.
        layer: &'static str,
        /// The system call.
        syscall: &'static str,
    },
    /// Two rules admitted in one role's filter give one system call different verdicts.
    #[error("role {role}: {syscall} is both {first:?} and {second:?}")]
    Conflict {
        /// The role.
        role: Role,
        /// The system call.
        syscall: &'static str,
        /// One verdict.
        first: Verdict,
        /// The other.
        second: Verdict,
    },
}

/// The layers of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    layers: Vec<Layer>,
}

impl Policy {
    /// A policy made of `layers`; every rule is checked.
    pub fn new(layers: Vec<Layer>) -> Result<Policy, PolicyError> {
        for layer in &layers {
            for rule in &layer.rules {
                check_rule(layer.name, rule)?;
            }
        }
        let policy = Policy { layers };
        for role in Role::ALL {
            policy.role(role)?;
        }
        Ok(policy)
    }

    /// The layers.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// What the filter of `role` admits: the rules of every layer for the roles it admits
    /// ([`Role::admits`]), merged per system call.
    pub fn role(&self, role: Role) -> Result<RolePolicy, PolicyError> {
        let admitted = role.admits();
        let mut entries: BTreeMap<i64, Entry> = BTreeMap::new();
        for layer in &self.layers {
            for rule in layer.rules.iter().filter(|r| r.roles.intersects(admitted)) {
                let entry = entries.entry(rule.syscall.nr()).or_insert_with(|| Entry {
                    syscall: rule.syscall,
                    verdict: rule.verdict,
                    when: Some(Vec::new()),
                    reasons: Vec::new(),
                });
                if entry.verdict != rule.verdict {
                    return Err(PolicyError::Conflict {
                        role,
                        syscall: rule.syscall.name(),
                        first: entry.verdict,
                        second: rule.verdict,
                    });
                }
                // An unconditional rule admits every call; otherwise the alternatives add up.
                match (&mut entry.when, rule.when.is_empty()) {
                    (_, true) => entry.when = None,
                    (Some(alternatives), false) => alternatives.extend(rule.when.iter().cloned()),
                    (None, false) => {}
                }
                entry.reasons.push((layer.name, rule.reason));
            }
        }
        Ok(RolePolicy { role, entries })
    }
}

fn check_rule(layer: &'static str, rule: &Rule) -> Result<(), PolicyError> {
    let syscall = rule.syscall.name();
    if rule.reason.trim().is_empty() {
        return Err(PolicyError::NoReason { layer, syscall });
    }
    if !rule.roles.intersects(Roles::ALL) {
        return Err(PolicyError::NoRole { layer, syscall });
    }
    let bad = rule
        .when
        .iter()
        .any(|alt| alt.is_empty() || alt.iter().any(|c| c.index > 5));
    if bad {
        return Err(PolicyError::BadCondition { layer, syscall });
    }
    if matches!(rule.verdict, Verdict::Refuse { .. }) && !rule.when.is_empty() {
        return Err(PolicyError::ConditionalRefusal { layer, syscall });
    }
    Ok(())
}

/// One system call in a role's filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The system call.
    pub syscall: Syscall,
    /// What the filter does with it.
    pub verdict: Verdict,
    /// `None`: any arguments; `Some`: the alternatives that match.
    pub when: Option<Vec<Vec<ArgCmp>>>,
    /// `(layer, reason)` of every rule that asked for it.
    pub reasons: Vec<(&'static str, &'static str)>,
}

/// The merged rules of one role's filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolePolicy {
    /// The role.
    pub role: Role,
    entries: BTreeMap<i64, Entry>,
}

impl RolePolicy {
    /// Every system call the filter names, by number.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The entry for system call `nr`, if the filter names it.
    pub fn get(&self, nr: i64) -> Option<&Entry> {
        self.entries.get(&nr)
    }

    /// How many system calls the filter allows (with or without argument conditions).
    pub fn allowed_count(&self) -> usize {
        self.entries()
            .filter(|e| e.verdict == Verdict::Allow)
            .count()
    }

    /// A plain-text listing: one line per system call with its conditions and reasons.
    pub fn describe(&self) -> String {
        let mut out = format!("role {}: {} system calls\n", self.role, self.entries.len());
        for e in self.entries() {
            let verdict = match e.verdict {
                Verdict::Allow => "allow".to_string(),
                Verdict::Refuse { errno } => format!("refuse with errno {errno}"),
            };
            let cond = match &e.when {
                None => String::new(),
                Some(alts) => format!(" when {} alternative(s)", alts.len()),
            };
            let reasons: Vec<String> = e
                .reasons
                .iter()
                .map(|(l, r)| format!("[{l}] {r}"))
                .collect();
            out += &format!(
                "  {:<18} {verdict}{cond}: {}\n",
                e.syscall.name(),
                reasons.join(" ")
            );
        }
        out
    }
}

#[cfg(test)]
mod tests;
