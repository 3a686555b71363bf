//! What /proc says about a backend's threads: their names, seccomp state, filters and
//! capabilities, for the sandbox tests.

/// What /proc/PID/task/TID/status says about one thread.
#[derive(Debug)]
pub struct ThreadStatus {
    pub name: String,
    /// 0: no seccomp, 2: filter mode.
    pub seccomp: u32,
    /// The number of filters (BPF programs) the thread runs under.
    pub filters: u32,
    pub no_new_privs: u32,
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_bnd: u64,
}

/// Every thread of process `pid` (threads that end while they are read are left out).
pub fn threads(pid: u32) -> Vec<ThreadStatus> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let task = task.unwrap().path();
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| -> String {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {status}"))
                .trim()
                .to_string()
        };
        let hex = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
        out.push(ThreadStatus {
            name: field("Name:"),
            seccomp: field("Seccomp:").parse().unwrap(),
            filters: field("Seccomp_filters:").parse().unwrap(),
            no_new_privs: field("NoNewPrivs:").parse().unwrap(),
            cap_eff: hex("CapEff:"),
            cap_prm: hex("CapPrm:"),
            cap_bnd: hex("CapBnd:"),
        });
    }
    out
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}
