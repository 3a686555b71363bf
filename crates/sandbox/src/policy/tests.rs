use super::layers::{self, ProgramOptions};
use super::*;
use crate::seccomp::{self, SeccompMode};

/// A device layer like a block device's: storage I/O in the workers.
fn device() -> Layer {
    let mut l = Layer::new("test-device");
    l.allow(
        Roles::WORKER,
        syscall!(SYS_io_uring_enter),
        "submitting storage requests",
    );
    l.allow(
        Roles::WORKER,
        syscall!(SYS_fdatasync),
        "flush requests of the sync engine",
    );
    l.refuse(
        Roles::CONTROL,
        syscall!(SYS_io_uring_setup),
        libc::ENOSYS,
        "no new rings after startup",
    );
    l
}

fn backend() -> Policy {
    layers::vhost_user_backend(ProgramOptions::default(), device()).expect("the policy builds")
}

fn names(p: &RolePolicy) -> Vec<&'static str> {
    p.entries().map(|e| e.syscall.name()).collect()
}

#[test]
fn the_policy_builds_for_every_role_and_every_rule_has_a_reason() {
    let policy = backend();
    for role in Role::ALL {
        let p = policy.role(role).unwrap();
        assert!(p.allowed_count() > 10, "{role}: {}", p.describe());
        for e in p.entries() {
            assert!(!e.reasons.is_empty(), "{role}: {}", e.syscall.name());
            for (layer, reason) in &e.reasons {
                assert!(
                    reason.len() > 10,
                    "{role}: {} in layer {layer} has no real reason: {reason:?}",
                    e.syscall.name()
                );
            }
        }
    }
    for layer in policy.layers() {
        assert!(
            !layer.rules.is_empty() || layer.name == "program",
            "{}",
            layer.name
        );
    }
}

#[test]
fn the_control_filter_admits_what_the_workers_it_starts_need() {
    let policy = backend();
    let control = policy.role(Role::Control).unwrap();
    let worker = policy.role(Role::Worker).unwrap();
    for e in worker.entries() {
        assert!(
            control.get(e.syscall.nr()).is_some(),
            "a worker inherits the control filter, which lacks {}",
            e.syscall.name()
        );
    }
}

#[test]
fn roles_get_only_what_they_need() {
    let policy = backend();
    let worker = names(&policy.role(Role::Worker).unwrap());
    let signals = names(&policy.role(Role::Signals).unwrap());
    let control = names(&policy.role(Role::Control).unwrap());
    for call in ["accept4", "recvmsg", "clone", "epoll_ctl", "seccomp"] {
        assert!(!worker.contains(&call), "worker has {call}");
        assert!(!signals.contains(&call), "signals has {call}");
    }
    assert!(control.contains(&"accept4") && control.contains(&"clone"));
    assert!(worker.contains(&"io_uring_enter") && !signals.contains(&"io_uring_enter"));
    assert!(signals.contains(&"rt_sigtimedwait") && !worker.contains(&"rt_sigtimedwait"));
    assert!(signals.len() < worker.len() && worker.len() < control.len());
}

#[test]
fn no_role_may_start_programs_open_networks_or_trace() {
    let policy = backend();
    let forbidden = [
        syscall!(SYS_execve),
        syscall!(SYS_execveat),
        syscall!(SYS_fork),
        syscall!(SYS_vfork),
        syscall!(SYS_socket),
        syscall!(SYS_socketpair),
        syscall!(SYS_connect),
        syscall!(SYS_bind),
        syscall!(SYS_ptrace),
        syscall!(SYS_process_vm_writev),
        syscall!(SYS_mount),
        syscall!(SYS_unshare),
        syscall!(SYS_setns),
        syscall!(SYS_bpf),
        syscall!(SYS_kill),
        syscall!(SYS_unlink),
    ];
    for role in Role::ALL {
        let p = policy.role(role).unwrap();
        for s in forbidden {
            assert!(p.get(s.nr()).is_none(), "{role} may call {}", s.name());
        }
    }
}

#[test]
fn ioctl_is_only_fionbio_on_the_control_thread() {
    let policy = backend();
    let ioctl = syscall!(SYS_ioctl).nr();
    let control = policy.role(Role::Control).unwrap();
    assert_eq!(
        control.get(ioctl).unwrap().when.as_deref(),
        Some(&[vec![arg(1).eq(libc::FIONBIO)]][..])
    );
    assert!(policy.role(Role::Worker).unwrap().get(ioctl).is_none());
    assert!(policy.role(Role::Signals).unwrap().get(ioctl).is_none());
}

#[test]
fn opening_files_is_refused_with_eacces_in_every_role() {
    let policy = backend();
    for role in Role::ALL {
        let p = policy.role(role).unwrap();
        let openat = p.get(syscall!(SYS_openat).nr()).unwrap();
        assert_eq!(
            openat.verdict,
            Verdict::Refuse {
                errno: libc::EACCES
            },
            "{role}"
        );
    }
}

#[test]
fn memory_can_never_become_executable() {
    let policy = backend();
    for role in Role::ALL {
        let p = policy.role(role).unwrap();
        for s in [syscall!(SYS_mmap), syscall!(SYS_mprotect)] {
            let alts = p.get(s.nr()).unwrap().when.as_ref().expect("conditional");
            for alt in alts {
                assert!(
                    alt.contains(&arg(2).none_of(libc::PROT_EXEC as u64)),
                    "{role}: {} without the PROT_EXEC check",
                    s.name()
                );
            }
        }
    }
}

#[test]
fn clone_is_for_threads_and_clone3_falls_back_to_it() {
    let control = backend().role(Role::Control).unwrap();
    let clone = control.get(syscall!(SYS_clone).nr()).unwrap();
    assert_eq!(
        clone.when.as_deref(),
        Some(
            &[vec![
                arg(0).all_of((libc::CLONE_VM | libc::CLONE_THREAD) as u64)
            ]][..]
        )
    );
    let clone3 = control.get(syscall!(SYS_clone3).nr()).unwrap();
    assert_eq!(
        clone3.verdict,
        Verdict::Refuse {
            errno: libc::ENOSYS
        }
    );
}

#[test]
fn the_control_thread_may_wait_for_the_socket_reapers_only() {
    let with = layers::vhost_user_backend(
        ProgramOptions {
            socket_reapers: vec![4242, 4243],
            ..ProgramOptions::default()
        },
        device(),
    )
    .unwrap();
    let wait4 = syscall!(SYS_wait4).nr();
    let control = with.role(Role::Control).unwrap();
    assert_eq!(
        control.get(wait4).unwrap().when.as_deref(),
        Some(&[vec![arg(0).eq(4242)], vec![arg(0).eq(4243)]][..])
    );
    assert!(with.role(Role::Worker).unwrap().get(wait4).is_none());
    assert!(backend().role(Role::Control).unwrap().get(wait4).is_none());
}

#[test]
fn conditions_of_several_layers_add_up_and_an_unconditional_rule_wins() {
    let mut a = Layer::new("a");
    a.allow(Roles::WORKER, syscall!(SYS_fcntl), "dup")
        .when([arg(1).eq(libc::F_DUPFD_CLOEXEC as u64)]);
    let mut b = Layer::new("b");
    b.allow(Roles::WORKER, syscall!(SYS_fcntl), "flags")
        .when([arg(1).eq(libc::F_GETFL as u64)]);
    let p = Policy::new(vec![a.clone(), b]).unwrap();
    let e = p.role(Role::Worker).unwrap();
    let e = e.get(syscall!(SYS_fcntl).nr()).unwrap();
    assert_eq!(e.when.as_ref().unwrap().len(), 2);
    assert_eq!(e.reasons.len(), 2);
    let mut c = Layer::new("c");
    c.allow(Roles::WORKER, syscall!(SYS_fcntl), "anything");
    let p = Policy::new(vec![a, c]).unwrap();
    assert_eq!(
        p.role(Role::Worker)
            .unwrap()
            .get(syscall!(SYS_fcntl).nr())
            .unwrap()
            .when,
        None
    );
}

#[test]
fn bad_rules_are_refused() {
    let mut l = Layer::new("l");
    l.allow(Roles::WORKER, syscall!(SYS_read), " ");
    assert_eq!(
        Policy::new(vec![l]),
        Err(PolicyError::NoReason {
            layer: "l",
            syscall: "read"
        })
    );
    let mut l = Layer::new("l");
    l.allow(Roles::WORKER, syscall!(SYS_read), "reads")
        .when([arg(6).eq(0)]);
    assert!(matches!(
        Policy::new(vec![l]),
        Err(PolicyError::BadCondition { .. })
    ));
    let mut l = Layer::new("l");
    l.allow(Roles::WORKER, syscall!(SYS_read), "reads").when([]);
    assert!(matches!(
        Policy::new(vec![l]),
        Err(PolicyError::BadCondition { .. })
    ));
    let mut l = Layer::new("l");
    l.refuse(Roles::WORKER, syscall!(SYS_read), libc::EPERM, "no")
        .when([arg(0).eq(0)]);
    assert!(matches!(
        Policy::new(vec![l]),
        Err(PolicyError::ConditionalRefusal { .. })
    ));
}

#[test]
fn a_call_allowed_in_one_layer_and_refused_in_another_is_a_conflict() {
    let mut a = Layer::new("a");
    a.allow(Roles::CONTROL, syscall!(SYS_clone3), "threads");
    let err = Policy::new(vec![a, layers::common(1)]).unwrap_err();
    assert!(matches!(
        err,
        PolicyError::Conflict {
            role: Role::Control,
            syscall: "clone3",
            ..
        }
    ));
}

#[test]
fn every_role_compiles_in_every_mode() {
    let policy = backend();
    for mode in [SeccompMode::Kill, SeccompMode::Trap, SeccompMode::Log] {
        for role in Role::ALL {
            seccomp::compile(&policy.role(role).unwrap(), mode)
                .unwrap_or_else(|e| panic!("{role} in {mode}: {e}"));
        }
    }
}

#[test]
fn the_kernel_accepts_the_filters_and_a_refusal_returns_its_errno() {
    // In a thread of its own, which keeps the filters until it ends. Log mode: a call the
    // policy does not know would be logged, not kill the test process.
    let policy = backend();
    let control =
        seccomp::compile(&policy.role(Role::Control).unwrap(), SeccompMode::Log).expect("compiles");
    let worker =
        seccomp::compile(&policy.role(Role::Worker).unwrap(), SeccompMode::Log).expect("compiles");
    // As in the backend: a control thread confines itself, then starts a worker that narrows
    // itself to the worker filter.
    std::thread::spawn(move || {
        use std::io::Read;
        // Opened before the filters, which refuse openat; read with read(2) alone.
        let mut status_file = std::fs::File::open("/proc/thread-self/status").unwrap();
        for program in control.programs() {
            seccompiler::apply_filter(program).expect("the kernel accepts the filter");
        }
        let mut buf = [0u8; 4096];
        let n = status_file.read(&mut buf).unwrap();
        let status = String::from_utf8_lossy(&buf[..n]);
        assert!(status.contains("Seccomp:\t2"), "{status}");
        assert!(status.contains("Seccomp_filters:\t2"), "{status}");
        // Without a filter the kernel would answer EFAULT or EINVAL; the refusal says ENOSYS.
        // SAFETY: clone3 with a null argument structure creates nothing.
        let ret = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        assert_eq!(ret, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOSYS)
        );
        // SAFETY: a NUL-terminated path; a descriptor returned would be closed at once.
        let fd = unsafe { libc::open(c"/".as_ptr(), libc::O_RDONLY) };
        assert_eq!(fd, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EACCES)
        );
        // Threads can still be started (glibc falls back to clone), and install their own.
        std::thread::spawn(move || {
            for program in worker.programs() {
                seccompiler::apply_filter(program).expect("the kernel accepts the filter");
            }
            7
        })
        .join()
        .unwrap()
    })
    .join()
    .map(|v| assert_eq!(v, 7))
    .expect("the confined threads ran to the end");
}

#[test]
fn live_upgrade_adds_peer_credentials_and_a_read_shutdown_to_the_control_thread_only() {
    let with = layers::vhost_user_backend(
        ProgramOptions {
            live_upgrade: true,
            ..ProgramOptions::default()
        },
        device(),
    )
    .unwrap();
    let control = with.role(Role::Control).unwrap();
    let getsockopt = syscall!(SYS_getsockopt).nr();
    let shutdown = syscall!(SYS_shutdown).nr();
    assert_eq!(
        control.get(getsockopt).unwrap().when.as_deref(),
        Some(
            &[vec![
                arg(1).eq(libc::SOL_SOCKET as u64),
                arg(2).eq(libc::SO_PEERCRED as u64)
            ]][..]
        )
    );
    assert_eq!(
        control.get(shutdown).unwrap().when.as_deref(),
        Some(&[vec![arg(1).eq(libc::SHUT_RD as u64)]][..])
    );
    for role in [Role::Worker, Role::Signals] {
        assert!(with.role(role).unwrap().get(getsockopt).is_none());
        assert!(with.role(role).unwrap().get(shutdown).is_none());
    }
    let without = backend();
    assert!(without.role(Role::Control).unwrap().get(shutdown).is_none());
    assert!(without
        .role(Role::Control)
        .unwrap()
        .get(getsockopt)
        .is_none());
}
