//! What differs between architectures: the names of system call numbers, for the SIGSYS
//! report. The filters themselves take their numbers from `libc` (`syscall!`).

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
use aarch64::NAMES;
#[cfg(target_arch = "x86_64")]
use x86_64::NAMES;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const NAMES: &[(libc::c_long, &str)] = &[];

/// The name of system call `nr` on this architecture. A linear scan of a static table: no
/// allocation and no lock, so the SIGSYS handler can call it.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_libc_numbers() {
        assert_eq!(syscall_name(libc::SYS_read), Some("read"));
        assert_eq!(
            syscall_name(libc::SYS_io_uring_enter),
            Some("io_uring_enter")
        );
        assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
        assert_eq!(syscall_name(-1), None);
    }
}
