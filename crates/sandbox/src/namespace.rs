//! `--sandbox namespace`: new user, mount, IPC, network and UTS namespaces, and a root file
//! system that holds nothing but /proc.
//!
//! unshare(CLONE_NEWUSER) needs a single-threaded process, so this runs before any thread
//! starts and after the storage and the socket are open (open descriptors survive it). A PID
//! namespace is not made: it would only apply to children, and the backend starts none (its
//! filters refuse any clone without CLONE_THREAD).

use std::ffi::CString;
use std::io;

use crate::error::SandboxError;

/// Where the new root is built: any directory that exists; the tmpfs mounted over it (in the
/// new mount namespace only) hides its content.
const NEW_ROOT: &str = "/tmp";

/// Enters the namespaces and pivots to an empty root with /proc bound in it (for the eventfd
/// check on the descriptors a frontend sends).
pub(crate) fn enter() -> Result<(), SandboxError> {
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWUTS;
    // SAFETY: unshare takes flags only; the kernel refuses it in a multithreaded process.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(SandboxError::last_os_error(
            "unshare(user, mount, ipc, net, uts namespaces)",
        ));
    }
    // The same ids inside as outside, so that files keep their owners; setgroups must be denied
    // before an unprivileged process may write its gid_map.
    write_proc("/proc/self/setgroups", "deny")?;
    write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
    write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
    pivot_to_empty_root()
}

fn write_proc(path: &'static str, text: &str) -> Result<(), SandboxError> {
    std::fs::write(path, text).map_err(|source| SandboxError::Sys {
        what: path_what(path),
        source,
    })
}

fn path_what(path: &'static str) -> &'static str {
    match path {
        "/proc/self/setgroups" => "writing /proc/self/setgroups",
        "/proc/self/uid_map" => "writing /proc/self/uid_map",
        _ => "writing /proc/self/gid_map",
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a constant path")
}

fn check(ret: libc::c_int, what: &'static str) -> Result<(), SandboxError> {
    if ret != 0 {
        return Err(SandboxError::last_os_error(what));
    }
    Ok(())
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
    what: &'static str,
) -> Result<(), SandboxError> {
    let source = source.map(cstr);
    let target = cstr(target);
    let fstype = fstype.map(cstr);
    let data = data.map(cstr);
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let ret = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(ret, what)
}

fn pivot_to_empty_root() -> Result<(), SandboxError> {
    // Nothing done here may propagate back to the parent namespace.
    mount(
        None,
        "/",
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "making every mount private",
    )?;
    let hidden = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        hidden,
        Some("size=16k,nr_inodes=8,mode=0755"),
        "mounting the new root's tmpfs",
    )?;
    let proc_dir = cstr(&format!("{NEW_ROOT}/proc"));
    // SAFETY: `proc_dir` is a NUL-terminated path that outlives the call.
    let ret = unsafe { libc::mkdir(proc_dir.as_ptr(), 0o555) };
    check(ret, "mkdir in the new root")?;
    mount(
        Some("/proc"),
        &format!("{NEW_ROOT}/proc"),
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
        "binding /proc into the new root",
    )?;
    let new_root = cstr(NEW_ROOT);
    let dot = cstr(".");
    // SAFETY: both paths are NUL-terminated strings that outlive the calls.
    unsafe {
        check(libc::chdir(new_root.as_ptr()), "chdir to the new root")?;
        // pivot_root(".", "."): the old root ends up stacked on the new one, and is detached
        // right after, so no path leads back to it.
        check(
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int,
            "pivot_root",
        )?;
        check(
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH),
            "detaching the old root",
        )?;
        check(libc::chdir(cstr("/").as_ptr()), "chdir to /")?;
    }
    // The new root itself becomes read-only.
    mount(
        None,
        "/",
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | hidden,
        None,
        "remounting the new root read-only",
    )
}

/// Whether this process may create a user namespace at all (for tests and diagnostics).
pub fn user_namespaces_available() -> bool {
    match std::fs::read_to_string("/proc/sys/user/max_user_namespaces") {
        Ok(n) => n.trim() != "0",
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}
