//! Removing the socket file at exit without giving the backend any right on the file system.
//!
//! The program conventions remove the socket file a backend created when it exits, but
//! Landlock refuses every removal, and a rule that allowed it would allow removing anything
//! beneath the socket's directory (`/run`, `/tmp`). So the removal is done by a helper process,
//! forked while the backend is still single-threaded and unconfined: it keeps no descriptor
//! but the read end of a pipe and the socket's directory, confines itself to removing files
//! beneath that directory, waits for the pipe to close (the backend exiting, or dying: even a
//! killed backend leaves no socket behind), and removes the path only if it is still the socket
//! the backend bound (same device, inode and inode change time). It reads nothing but
//! end-of-file from that pipe, so a compromised backend can do nothing to it beyond what
//! exiting does anyway.
//!
//! A supervisor restarts a killed backend at once, so the new process replaces the stale file
//! and binds its own while the old helper checks and removes. Both hold an exclusive `flock` on
//! the directory for that ([`lock_socket_dir`]), so the helper never checks the old file and
//! then removes the new one, and the new process never finds the old file vanishing under it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, ABI,
};

use crate::error::SandboxError;
use crate::process;

/// The helper that removes the socket file when the backend ends; see the module
/// documentation. Dropping it (at the backend's clean exit) has the helper remove the file
/// and waits for it.
#[derive(Debug)]
pub struct SocketReaper {
    pipe: Option<OwnedFd>,
    pid: libc::pid_t,
}

impl SocketReaper {
    /// Forks the helper for the socket at `path`. The process must have a single thread.
    pub fn spawn(path: &Path) -> Result<SocketReaper, SandboxError> {
        match process::thread_count() {
            Some(1) | None => {}
            Some(threads) => return Err(SandboxError::Threaded { threads }),
        }
        let meta = std::fs::symlink_metadata(path).map_err(|source| SandboxError::Sys {
            what: "inspecting the socket file",
            source,
        })?;
        let target = Target {
            path: path.to_path_buf(),
            dir: match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            },
            identity: Identity::of(&meta),
        };
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors to `fds`, which lives for the whole call.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(SandboxError::last_os_error("pipe2"));
        }
        // SAFETY: pipe2 just returned these two descriptors; nothing else owns them.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the process has a single thread (checked above), so the child is a complete
        // copy in which every lock is free; it only runs `helper`, which never returns.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(SandboxError::last_os_error("fork")),
            0 => {
                drop(write_end);
                helper(read_end, &target)
            }
            pid => {
                drop(read_end);
                log::debug!(
                    "sandbox: process {pid} will remove {} at exit",
                    target.path.display()
                );
                Ok(SocketReaper {
                    pipe: Some(write_end),
                    pid,
                })
            }
        }
    }

    /// The helper's process id (the control thread may wait for it, and only for it).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The pipe the helper waits on. A process that holds a duplicate keeps the socket file in
    /// place: live upgrade hands one to the process that takes the socket over.
    pub fn pipe(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.pipe.as_ref().map(AsFd::as_fd)
    }

    /// Lets go of the helper without waiting for it: after a live upgrade another process holds
    /// the pipe and the file stays until that process ends. The helper, orphaned when this
    /// process exits, is reaped by init.
    pub fn disown(mut self) {
        drop(self.pipe.take());
        self.pid = 0;
    }
}

impl Drop for SocketReaper {
    fn drop(&mut self) {
        // End of file on the pipe: the helper removes the socket and exits.
        drop(self.pipe.take());
        if self.pid == 0 {
            return;
        }
        loop {
            // SAFETY: waitpid on our own child, with no status pointer.
            let ret = unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
            if ret >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        }
    }
}

/// What the helper removes.
struct Target {
    path: PathBuf,
    dir: PathBuf,
    identity: Identity,
}

/// What tells the socket this backend bound from a later one at the same path: device and
/// inode, and the inode's change time to the nanosecond, since a file system reuses the inode
/// number of a removed file (a supervisor restarting a killed backend at once binds a new
/// socket there while this helper wakes up). A socket whose change time moved for another
/// reason (chmod) is left in place: the check fails safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The helper process: never returns.
fn helper(pipe: OwnedFd, target: &Target) -> ! {
    let status = match confine_helper(pipe.as_raw_fd(), target) {
        Ok(dir) => {
            wait_for_eof(&pipe);
            // A backend restarting at the same path holds this lock while it replaces the stale
            // file and binds its own (`lock_socket_dir`): the check and the removal below see
            // either the old file or the new one, never the old one checked and the new one
            // removed.
            let _lock = dir.and_then(DirLock::exclusive);
            remove_if_same(target);
            0
        }
        Err(e) => {
            eprintln!(
                "socket reaper: {e}; {} will not be removed at exit",
                target.path.display()
            );
            1
        }
    };
    // SAFETY: _exit ends the helper without running the parent's exit handlers or destructors,
    // which belong to the backend.
    unsafe { libc::_exit(status) }
}

/// Confines the helper; returns the socket's directory, opened for [`lock_socket_dir`]'s lock
/// (none if it cannot be opened: the removal then goes unlocked, as before).
fn confine_helper(pipe: RawFd, target: &Target) -> Result<Option<File>, SandboxError> {
    let name = CString::new("socket-reaper").expect("no NUL");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string that outlives the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    close_other_fds(pipe);
    let lock_dir = File::open(&target.dir).ok();
    process::drop_capabilities()?;
    process::set_no_new_privs()?;
    let dir = PathFd::new(&target.dir).map_err(|e| SandboxError::Sys {
        what: "opening the socket's directory",
        source: std::io::Error::other(e.to_string()),
    })?;
    Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(ABI::V7))?
        .create()?
        .add_rule(PathBeneath::new(dir, AccessFs::RemoveFile))?
        .restrict_self()?;
    Ok(lock_dir)
}

/// Locks the directory of the socket file at `path` (flock on the directory) while a backend
/// replaces a stale socket file there and binds its own. A killed backend's reaper takes the
/// same lock to check and remove its file, so it cannot check the old file and then remove the
/// new one. `None` if the directory cannot be opened (no read permission): the caller goes on
/// unlocked.
pub fn lock_socket_dir(path: &Path) -> Option<DirLock> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    DirLock::exclusive(File::open(dir).ok()?)
}

/// An exclusive `flock` on a directory, released when dropped (the descriptor is closed; it is
/// close-on-exec and never shared).
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
}

impl DirLock {
    fn exclusive(dir: File) -> Option<DirLock> {
        loop {
            // SAFETY: flock on a descriptor `dir` owns for the whole call; no memory is passed.
            if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Some(DirLock { _dir: dir });
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return None;
            }
        }
    }
}

/// Closes every descriptor but stdin, stdout, stderr and `keep`: the helper must not hold the
/// backend's disk, socket or io_uring instances open.
fn close_other_fds(keep: RawFd) {
    let ranges = [(3, keep - 1), (keep + 1, libc::c_int::MAX)];
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        // SAFETY: close_range only closes descriptors; none of these is used by the helper.
        let ret = unsafe { libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32) };
        if ret != 0 {
            // Kernels before 5.9: close what /proc lists.
            for fd in open_fds()
                .into_iter()
                .filter(|fd| (first..=last).contains(fd))
            {
                // SAFETY: as above.
                unsafe { libc::close(fd) };
            }
        }
    }
}

fn open_fds() -> Vec<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for_eof(pipe: &OwnedFd) {
    let mut byte = [0u8; 1];
    loop {
        // SAFETY: read into a one-byte buffer that outlives the call.
        let n = unsafe { libc::read(pipe.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        if n == 0 || (n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
        {
            return;
        }
    }
}

fn remove_if_same(target: &Target) {
    match std::fs::symlink_metadata(&target.path) {
        Ok(m) if m.file_type().is_socket() && Identity::of(&m) == target.identity => {
            if let Err(e) = std::fs::remove_file(&target.path) {
                eprintln!(
                    "socket reaper: cannot remove {}: {e}",
                    target.path.display()
                );
            }
        }
        // Gone already, or replaced by another file: not ours to remove.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether another open file description of `dir` can take the lock now.
    fn lockable(dir: &Path) -> bool {
        let other = File::open(dir).unwrap();
        // SAFETY: flock on a descriptor `other` owns for the whole call; no memory is passed.
        unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }

    #[test]
    fn the_socket_directory_is_locked_until_the_lock_is_dropped() {
        let dir = std::env::temp_dir().join(format!("outboard-dirlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = lock_socket_dir(&dir.join("vhost.sock")).expect("a readable directory");
        assert!(!lockable(&dir), "a reaper would not wait");
        drop(lock);
        assert!(lockable(&dir), "the lock outlived its guard");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
