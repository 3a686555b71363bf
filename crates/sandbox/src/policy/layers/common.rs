//! What every Outboard process needs whatever it serves: the C library and the Rust standard
//! library (memory, threads, locks, signals, exit), and the sandbox's own needs.

use libc::{
    CLONE_THREAD, CLONE_VM, FUTEX_CLOCK_REALTIME, FUTEX_PRIVATE_FLAG, FUTEX_WAIT,
    FUTEX_WAIT_BITSET, FUTEX_WAKE, FUTEX_WAKE_BITSET, MADV_DONTNEED, PROT_EXEC, PR_SET_NAME,
    PR_SET_NO_NEW_PRIVS, SECCOMP_SET_MODE_FILTER, SIGABRT,
};

use crate::policy::{arg, Layer, Roles};
use crate::syscall;

/// The futex operation without its flag bits.
const FUTEX_CMD_MASK: u64 = !((FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME) as u64) & 0xffff_ffff;

/// The runtime layer. `pid` is this process's id (a filter is built for one process).
pub fn common(pid: u32) -> Layer {
    let all = Roles::ALL;
    let control = Roles::CONTROL;
    let mut l = Layer::new("common");

    // Memory. Nothing may become executable once the sandbox is on: the loader mapped the
    // program and its libraries before.
    l.allow(all, syscall!(SYS_mmap), "the allocator's and thread stacks' anonymous mappings, and the frontend's memory regions (MAP_SHARED from the fds it sends); never executable")
        .when([arg(2).none_of(PROT_EXEC as u64)]);
    l.allow(all, syscall!(SYS_mprotect), "thread stack guard pages (PROT_NONE) and glibc growing a thread's malloc arena; never executable")
        .when([arg(2).none_of(PROT_EXEC as u64)]);
    l.allow(
        all,
        syscall!(SYS_munmap),
        "freeing memory, unmapping frontend memory regions, thread stacks",
    );
    l.allow(
        all,
        syscall!(SYS_mremap),
        "glibc realloc of large (mmap'ed) allocations; mremap cannot change protections",
    );
    l.allow(all, syscall!(SYS_brk), "glibc malloc's main arena");
    l.allow(all, syscall!(SYS_madvise), "glibc returns freed memory and a finished thread's stack with MADV_DONTNEED; no other advice")
        .when([arg(2).eq(MADV_DONTNEED as u64)]);

    // Threads and locks.
    l.allow(all, syscall!(SYS_futex), "std's Mutex, Condvar, RwLock, Once and thread parking, glibc's internal locks and pthread_join: wait and wake only (no PI or requeue operations)")
        .when([arg(1).masked_eq(FUTEX_CMD_MASK, FUTEX_WAIT as u64)])
        .when([arg(1).masked_eq(FUTEX_CMD_MASK, FUTEX_WAKE as u64)])
        .when([arg(1).masked_eq(FUTEX_CMD_MASK, FUTEX_WAIT_BITSET as u64)])
        .when([arg(1).masked_eq(FUTEX_CMD_MASK, FUTEX_WAKE_BITSET as u64)]);
    l.allow(
        all,
        syscall!(SYS_exit),
        "a thread returning (a worker stopped at quiesce or reset)",
    );
    l.allow(
        all,
        syscall!(SYS_exit_group),
        "the process exiting, including the SIGSYS report's exit",
    );
    l.allow(
        all,
        syscall!(SYS_gettid),
        "glibc at thread start and exit; the SIGSYS report names the thread",
    );
    l.allow(all, syscall!(SYS_sigaltstack), "std's stack-overflow guard gives every thread an alternate signal stack and removes it at exit");
    l.allow(
        all,
        syscall!(SYS_rt_sigprocmask),
        "glibc masks signals around thread creation and exit and in abort()",
    );
    l.allow(
        all,
        syscall!(SYS_rt_sigreturn),
        "returning from a signal handler (std's SIGSEGV/SIGBUS stack-overflow handler)",
    );
    l.allow(
        all,
        syscall!(SYS_getpid),
        "glibc's abort() and raise() name the process to tgkill",
    );
    l.allow(all, syscall!(SYS_tgkill), "abort() (a panic while panicking, an allocation failure) ends the process with SIGABRT: only to this process, only SIGABRT")
        .when([arg(0).eq(u64::from(pid)), arg(2).eq(SIGABRT as u64)]);
    l.allow(
        all,
        syscall!(SYS_getrandom),
        "std seeds the keys of every HashMap, once per thread",
    );
    l.allow(all, syscall!(SYS_clock_gettime), "log timestamps and busy-poll deadlines: the vDSO answers without a system call but falls back to one on clock sources it cannot read");

    // Nothing opens a file once the sandbox is on; library code that tries anyway (std's
    // backtrace symbolizer after a panic, with RUST_BACKTRACE set) fails as Landlock would
    // make it fail, rather than turning a panic into a kill.
    l.refuse(all, syscall!(SYS_openat), libc::EACCES, "library code that opens a file after startup (std's panic backtraces read the executable) fails with EACCES, as Landlock would answer; the backend itself opens nothing");

    // File descriptors every role uses.
    l.allow(all, syscall!(SYS_read), "eventfd counters: kicks, a worker's stop, io_uring completions, the shutdown eventfd; the vhost-user socket");
    l.allow(all, syscall!(SYS_write), "eventfd signals (used-buffer and error notifications, stop, shutdown) and log lines on stderr");
    l.allow(all, syscall!(SYS_close), "dropping descriptors: a frontend's fds when replaced or at disconnect, a worker's epoll and eventfds");

    // Starting a thread. The new thread runs these under its parent's filter, which is the
    // control thread's for every thread started after the sandbox is on.
    l.allow(
        control,
        syscall!(SYS_clone),
        "std::thread::spawn: threads only (CLONE_VM | CLONE_THREAD), never a new process",
    )
    .when([arg(0).all_of((CLONE_VM | CLONE_THREAD) as u64)]);
    l.refuse(control, syscall!(SYS_clone3), libc::ENOSYS, "glibc tries clone3 first and falls back to clone on ENOSYS; clone3 passes its flags in memory, where a filter cannot check them");
    l.allow(
        control,
        syscall!(SYS_set_robust_list),
        "glibc registers the robust futex list of every new thread",
    );
    l.allow(
        control,
        syscall!(SYS_rseq),
        "glibc registers restartable sequences in every new thread",
    );
    l.allow(control, syscall!(SYS_sched_getaffinity), "std finds a new thread's stack guard with pthread_getattr_np, which asks for the CPU affinity");
    l.allow(control, syscall!(SYS_prctl), "std names a new thread (PR_SET_NAME); a new worker sets no_new_privs, already set, before installing its own filter")
        .when([arg(0).eq(PR_SET_NAME as u64)])
        .when([arg(0).eq(PR_SET_NO_NEW_PRIVS as u64), arg(1).qword().eq(1)]);
    l.allow(control, syscall!(SYS_seccomp), "a new worker installs its own filter, which can only narrow what it inherits; no flags (no TSYNC, no user-notification listener)")
        .when([arg(0).eq(u64::from(SECCOMP_SET_MODE_FILTER)), arg(1).qword().eq(0)]);
    l
}
