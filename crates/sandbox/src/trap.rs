//! The SIGSYS handler of [`SeccompMode::Trap`](crate::SeccompMode::Trap): it reports the
//! system call a filter refused, the thread and its role, then ends the process.
//!
//! A signal handler may only do async-signal-safe work: this one reads two thread-locals that
//! need no initialisation, formats into a buffer on its stack, and makes two system calls that
//! every role's filter allows, write(2) to stderr and exit_group(2).

use std::cell::Cell;

use crate::policy::Role;
use crate::sys;

/// The exit status after a trapped violation: 128 + SIGSYS, as a shell reports a process that
/// SIGSYS killed.
pub const TRAP_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// A thread's role and name, recorded when it installs its filter.
#[derive(Clone, Copy)]
struct Label {
    /// `0`: none recorded (the thread runs under a filter it inherited); else `1 + role`.
    role: u8,
    name: [u8; 16],
    name_len: u8,
}

thread_local! {
    // `const` initialisation and a `Copy` type: no lazy initialisation and no destructor, so
    // reading it from a signal handler is a plain thread-local load.
    static LABEL: Cell<Label> = const {
        Cell::new(Label {
            role: 0,
            name: [0; 16],
            name_len: 0,
        })
    };
}

/// Records the calling thread's role and name for the report.
pub(crate) fn label_thread(role: Role) {
    let mut label = Label {
        role: 1 + Role::ALL.iter().position(|r| *r == role).unwrap_or(0) as u8,
        name: [0; 16],
        name_len: 0,
    };
    let current = std::thread::current();
    let name = current.name().unwrap_or("").as_bytes();
    let n = name.len().min(label.name.len());
    label.name[..n].copy_from_slice(&name[..n]);
    label.name_len = n as u8;
    LABEL.with(|l| l.set(label));
}

/// Installs the handler for the whole process (signal dispositions are per process).
pub(crate) fn install() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (no handler, empty mask, no flags); every
    // field this code relies on is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    // SA_ONSTACK: the report works even if the violation happened on an exhausted stack.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and outlives the call; the handler it names only
    // does async-signal-safe work (see the module documentation).
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The SIGSYS part of `siginfo_t` on 64-bit Linux: `_sigsys` follows three ints and padding.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS that a seccomp filter raised.
const SYS_SECCOMP: libc::c_int = 1;

extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo_t, which for SIGSYS has
    // the `_sigsys` layout of `SigsysInfo` (checked by si_code below before use).
    let info = unsafe { &*(info as *const SigsysInfo) };
    let mut out = Report::new();
    if info.code == SYS_SECCOMP {
        out.push(b"outboard-sandbox: seccomp violation: system call ");
        out.push_int(i64::from(info.syscall));
        out.push(b" (");
        out.push(
            sys::syscall_name(i64::from(info.syscall))
                .unwrap_or("unknown")
                .as_bytes(),
        );
        out.push(b")");
    } else {
        out.push(b"outboard-sandbox: SIGSYS not raised by seccomp");
    }
    out.push(b" in thread ");
    // SAFETY: gettid has no preconditions; every role's filter allows it.
    out.push_int(i64::from(unsafe { libc::gettid() }));
    let label = LABEL.try_with(Cell::get).ok();
    if let Some(label) = label.filter(|l| l.name_len > 0) {
        out.push(b" \"");
        out.push(&label.name[..usize::from(label.name_len)]);
        out.push(b"\"");
    }
    out.push(b" (role ");
    match label.map_or(0, |l| l.role) {
        0 => out.push(b"unknown: it runs under the filter of the thread that started it"),
        n => out.push(Role::ALL[usize::from(n - 1)].name().as_bytes()),
    }
    out.push(b"); exiting\n");
    out.write_stderr();
    // SAFETY: _exit ends the process without running anything else in it; exit_group is
    // allowed in every role.
    unsafe { libc::_exit(TRAP_EXIT_STATUS) }
}

/// A fixed buffer formatted without allocating.
struct Report {
    buf: [u8; 256],
    len: usize,
}

impl Report {
    fn new() -> Report {
        Report {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_int(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut n = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if v < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn write_stderr(&self) {
        let mut rest = self.as_bytes();
        while !rest.is_empty() {
            // SAFETY: `rest` is valid for reads of its length for the whole call.
            let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
            if n <= 0 {
                return;
            }
            rest = &rest[n as usize..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_format_numbers_without_allocating() {
        let mut r = Report::new();
        r.push(b"nr ");
        r.push_int(0);
        r.push(b" ");
        r.push_int(425);
        r.push(b" ");
        r.push_int(-38);
        assert_eq!(r.as_bytes(), b"nr 0 425 -38");
    }

    #[test]
    fn a_report_longer_than_its_buffer_is_cut_not_overflowed() {
        let mut r = Report::new();
        for _ in 0..100 {
            r.push(b"0123456789");
        }
        assert_eq!(r.as_bytes().len(), 256);
    }

    #[test]
    fn a_thread_that_inherits_its_filter_is_labelled_with_its_role() {
        std::thread::Builder::new()
            .name("port-3".into())
            .spawn(|| {
                crate::seccomp::inherit_role(Role::Control);
                let l = LABEL.with(Cell::get);
                assert_eq!(Role::ALL[usize::from(l.role - 1)], Role::Control);
                assert_eq!(&l.name[..usize::from(l.name_len)], b"port-3");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_thread_label_records_role_and_name() {
        std::thread::Builder::new()
            .name("blk-worker-7".into())
            .spawn(|| {
                label_thread(Role::Worker);
                let l = LABEL.with(Cell::get);
                assert_eq!(Role::ALL[usize::from(l.role - 1)], Role::Worker);
                assert_eq!(&l.name[..usize::from(l.name_len)], b"blk-worker-7");
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
