//! The program conventions, the VIRTIO framework's queue workers and the vhost-user transport:
//! what every Outboard vhost-user backend needs whatever its device.

use libc::{
    AT_EMPTY_PATH, FIONBIO, F_ADD_SEALS, F_DUPFD_CLOEXEC, F_GETFD, F_GETFL, F_GET_SEALS,
    F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, F_SETFD, MFD_ALLOW_SEALING, MFD_CLOEXEC,
};

use crate::policy::{arg, Layer, Roles};
use crate::syscall;

/// Options of the program layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramOptions {
    /// The process ids of the [`SocketReaper`](crate::SocketReaper)s that remove the socket
    /// files at exit: one per socket the program created (several for a program that serves
    /// several sockets, such as `vhost-user-net --switch`), none without.
    pub socket_reapers: Vec<u32>,
    /// The program listens on an upgrade socket (`--upgrade-socket`, or one inherited by
    /// `--upgrade-from`): its control thread may hand the device to a new process.
    pub live_upgrade: bool,
}

/// The backend program conventions (`outboard-program`): the signal thread, the socket file.
pub fn program(options: ProgramOptions) -> Layer {
    let mut l = Layer::new("program");
    l.allow(
        Roles::SIGNALS,
        syscall!(SYS_rt_sigtimedwait),
        "the signal thread waits for SIGTERM, SIGINT and SIGHUP (sigwait)",
    );
    if options.live_upgrade {
        // Live upgrade (outboard-vhost-user's handover.rs) runs on the control thread between
        // two frontend messages. The rest of what it needs is already here: accept4 on a
        // listening socket (the upgrade socket), poll, recvmsg/recvfrom and sendmsg with
        // SCM_RIGHTS (every descriptor of the session goes to the new process in FDS frames),
        // fcntl F_DUPFD_CLOEXEC (duplicates of what it sends).
        l.allow(Roles::CONTROL, syscall!(SYS_getsockopt), "live upgrade: the credentials of a process at the upgrade socket (SO_PEERCRED), which must be this backend's user to take the device; no other option")
            .when([arg(1).eq(libc::SOL_SOCKET as u64), arg(2).eq(libc::SO_PEERCRED as u64)]);
        l.allow(
            Roles::CONTROL,
            syscall!(SYS_geteuid),
            "live upgrade: this backend's user, compared with the new process's",
        );
        l.allow(Roles::CONTROL, syscall!(SYS_shutdown), "live upgrade: when the new process does not confirm in time, shutting the control connection down for reading decides atomically whether it took the device (its confirmation was queued) or not (its send fails); read side only")
            .when([arg(1).eq(libc::SHUT_RD as u64)]);
    }
    if !options.socket_reapers.is_empty() {
        let rule = l.allow(Roles::CONTROL, syscall!(SYS_wait4), "at exit, waiting for the helper processes that remove the socket files (only those processes)");
        for pid in options.socket_reapers {
            rule.when([arg(0).eq(u64::from(pid))]);
        }
    }
    l
}

/// The VIRTIO framework (`outboard-virtio`): starting, running and stopping queue workers.
pub fn virtio() -> Layer {
    let control = Roles::CONTROL;
    let worker = Roles::WORKER;
    let mut l = Layer::new("virtio");
    l.allow(
        control,
        syscall!(SYS_epoll_create1),
        "each queue worker's epoll instance, made when the device is activated",
    );
    l.allow(
        control,
        syscall!(SYS_epoll_ctl),
        "registering a worker's stop eventfd, completion fd and kick eventfds",
    );
    l.allow(control, syscall!(SYS_eventfd2), "a worker's stop eventfd");
    l.allow(control, syscall!(SYS_fcntl), "duplicating eventfds and sockets (try_clone: F_DUPFD_CLOEXEC) and reading descriptor flags; no locks, leases, owners or seals")
        .when([arg(1).eq(F_DUPFD_CLOEXEC as u64)])
        .when([arg(1).eq(F_GETFD as u64)])
        .when([arg(1).eq(F_SETFD as u64)])
        .when([arg(1).eq(F_GETFL as u64)]);
    l.allow(
        worker,
        syscall!(SYS_sched_yield),
        "a busy-polling worker (--poll-us) yields the CPU between looks at its queues",
    );
    #[cfg(target_arch = "x86_64")]
    l.allow(
        worker,
        syscall!(SYS_epoll_wait),
        "a worker waits for kicks, completions and its stop eventfd",
    );
    #[cfg(not(target_arch = "x86_64"))]
    l.allow(worker, syscall!(SYS_epoll_pwait), "a worker waits for kicks, completions and its stop eventfd (the C library's epoll_wait on architectures without the older call)");
    l
}

/// The vhost-user transport (`outboard-vhost-user`, `outboard-memory`): the message loop on the
/// control thread and the interrupt sink the workers signal through.
pub fn vhost_user() -> Layer {
    let control = Roles::CONTROL;
    let worker = Roles::WORKER;
    let mut l = Layer::new("vhost-user");
    l.allow(control, syscall!(SYS_accept4), "accepting the next frontend on the listening socket, which was bound before the sandbox was entered");
    #[cfg(target_arch = "x86_64")]
    l.allow(
        control,
        syscall!(SYS_poll),
        "waiting for the socket or the shutdown eventfd",
    );
    #[cfg(not(target_arch = "x86_64"))]
    l.allow(control, syscall!(SYS_ppoll), "waiting for the socket or the shutdown eventfd (the C library's poll on architectures without the older call)");
    l.allow(control, syscall!(SYS_recvmsg), "a message header with its SCM_RIGHTS fds (memory regions, kick/call/err eventfds, the backend channel)");
    l.allow(
        control,
        syscall!(SYS_recvfrom),
        "the rest of a message's header and its payload",
    );
    l.allow(control, syscall!(SYS_ioctl), "making the backend channel non-blocking (FIONBIO), so that a frontend that does not read it cannot stall a worker; no other request")
        .when([arg(1).eq(FIONBIO)]);
    l.allow(control | worker, syscall!(SYS_sendmsg), "replies to the frontend (control); config-change messages on the backend channel when the device needs a reset (worker)");
    #[cfg(target_arch = "x86_64")]
    l.allow(
        control,
        syscall!(SYS_readlink),
        "checking that an fd the frontend sends is an eventfd (/proc/self/fd/N)",
    );
    #[cfg(not(target_arch = "x86_64"))]
    l.allow(control, syscall!(SYS_readlinkat), "checking that an fd the frontend sends is an eventfd (/proc/self/fd/N), on architectures without readlink");
    l.allow(control, syscall!(SYS_fcntl), "sealing a frontend's memfd against shrinking, which would make guest memory accesses fault (F_GET_SEALS, and F_ADD_SEALS with F_SEAL_SHRINK only)")
        .when([arg(1).eq(F_GET_SEALS as u64)])
        .when([arg(1).eq(F_ADD_SEALS as u64), arg(2).eq(F_SEAL_SHRINK as u64)]);
    l.allow(
        control,
        syscall!(SYS_statx),
        "the size of a memory region's file before it is mapped (fstat of the fd: AT_EMPTY_PATH)",
    )
    .when([arg(2).all_of(AT_EMPTY_PATH as u64)]);
    l.allow(control, syscall!(SYS_memfd_create), "the inflight region a frontend asks for (GET_INFLIGHT_FD): a sealable, close-on-exec memfd")
        .when([arg(1).eq((MFD_CLOEXEC | MFD_ALLOW_SEALING) as u64)]);
    l.allow(
        control,
        syscall!(SYS_ftruncate),
        "sizing a new inflight region's memfd before it is sealed",
    );
    l.allow(control, syscall!(SYS_fcntl), "sealing a new inflight region's memfd against any resize before the frontend gets it (F_ADD_SEALS with SHRINK|GROW|SEAL only)")
        .when([arg(1).eq(F_ADD_SEALS as u64), arg(2).eq((F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) as u64)]);
    l
}
