//! Process-wide restrictions that are not seccomp or Landlock: no_new_privs, capabilities and
//! resource limits.

use crate::error::SandboxError;

/// The number of threads of this process, from /proc/self/status (`None` without /proc).
pub(crate) fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Sets `PR_SET_NO_NEW_PRIVS`: no exec can ever grant privileges again (set-user-ID bits and
/// file capabilities are ignored), which seccomp and Landlock require of an unprivileged
/// process anyway.
pub(crate) fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::last_os_error("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    Ok(())
}

/// The resource limits after `limit_resources`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// RLIMIT_NOFILE (soft and hard).
    pub open_files: u64,
}

/// Lowers the hard limits a compromised backend could otherwise use: no core dumps (a core
/// holds the guest memory the frontend shared), and at most `max_open_files` descriptors
/// (never raised above the current hard limit).
pub(crate) fn limit_resources(max_open_files: u64) -> Result<Limits, SandboxError> {
    set_rlimit(libc::RLIMIT_CORE, 0, "setrlimit(RLIMIT_CORE)")?;
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit to `current`, which lives for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } != 0 {
        return Err(SandboxError::last_os_error("getrlimit(RLIMIT_NOFILE)"));
    }
    let open_files = max_open_files.min(current.rlim_max);
    set_rlimit(libc::RLIMIT_NOFILE, open_files, "setrlimit(RLIMIT_NOFILE)")?;
    Ok(Limits { open_files })
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    what: &'static str,
) -> Result<(), SandboxError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads one rlimit from `limit`, which lives for the whole call.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(SandboxError::last_os_error(what));
    }
    Ok(())
}

/// `struct __user_cap_header_struct` of <linux/capability.h>.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct` of <linux/capability.h>; version 3 uses two of them (64
/// capability bits).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_SETPCAP: u32 = 8;

fn capget() -> Result<[CapData; 2], SandboxError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget reads the header and writes two CapData (the version-3 layout) to
    // `data`; both live for the whole call.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if ret != 0 {
        return Err(SandboxError::last_os_error("capget"));
    }
    Ok(data)
}

/// The capabilities the process had before `drop_capabilities`, as 64-bit masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DroppedCapabilities {
    /// The effective set before.
    pub effective: u64,
    /// The permitted set before.
    pub permitted: u64,
    /// Whether the bounding set was emptied too (needs CAP_SETPCAP).
    pub bounding_cleared: bool,
}

/// Empties every capability set: the bounding set (when the process may), the ambient set,
/// then the effective, permitted and inheritable sets. A backend running as root keeps its
/// user id (to reach files it opened already) but none of root's privileges.
pub(crate) fn drop_capabilities() -> Result<DroppedCapabilities, SandboxError> {
    let before = capget()?;
    let mask = |f: fn(&CapData) -> u32| u64::from(f(&before[0])) | u64::from(f(&before[1])) << 32;
    let effective = mask(|d| d.effective);
    let permitted = mask(|d| d.permitted);
    let bounding_cleared = effective & (1 << CAP_SETPCAP) != 0;
    if bounding_cleared {
        for cap in 0..64 {
            // SAFETY: PR_CAPBSET_DROP takes integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break; // past the kernel's last capability
                }
                return Err(SandboxError::last_os_error("prctl(PR_CAPBSET_DROP)"));
            }
        }
    }
    // SAFETY: PR_CAP_AMBIENT takes integer arguments only. Kernels before 4.3 have no ambient
    // set and answer EINVAL, which leaves nothing to clear.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if ret != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(SandboxError::last_os_error(
            "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
        ));
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let empty = [CapData::default(); 2];
    // SAFETY: capset reads the header and two CapData from memory that lives for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, empty.as_ptr()) } != 0 {
        return Err(SandboxError::last_os_error("capset"));
    }
    let after = capget()?;
    if after
        .iter()
        .any(|d| d.effective | d.permitted | d.inheritable != 0)
    {
        return Err(SandboxError::Sys {
            what: "capset",
            source: std::io::Error::other("capabilities are left after dropping them all"),
        });
    }
    Ok(DroppedCapabilities {
        effective,
        permitted,
        bounding_cleared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_process_reports_its_threads() {
        // The test harness runs this test on a thread of its own, so there are at least two.
        let n = thread_count().expect("/proc is mounted where the tests run");
        assert!(n >= 1, "{n} threads");
    }

    #[test]
    fn capget_reads_both_words() {
        // Whatever the user, the call must succeed and the layout be understood.
        capget().expect("capget");
    }
}
