//! virtio-blk's seccomp layer: what its storage engines need once the sandbox is on.
//!
//! The device opened its storage and made one engine per worker thread before the sandbox
//! (`Blk::new`), so no role opens files, sizes block devices (BLKGETSIZE64/BLKSSZGET ioctls) or
//! sets up io_uring instances afterwards. io_uring requests themselves run in the kernel
//! without passing through seccomp: what they can reach is bounded by the descriptors the
//! process holds and by Landlock.

use outboard_sandbox::{syscall, Layer, Roles};

/// The storage engine the device ended up with (`Blk::engine_name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// io_uring.
    Uring,
    /// Blocking system calls on the worker threads.
    Sync,
    /// No storage.
    Null,
}

impl Engine {
    /// The engine named by `Blk::engine_name`.
    pub fn from_name(name: &str) -> Option<Engine> {
        match name {
            "io_uring" => Some(Engine::Uring),
            "sync" => Some(Engine::Sync),
            "null" => Some(Engine::Null),
            _ => None,
        }
    }
}

/// The device layer for `engine`.
pub fn blk_layer(engine: Engine) -> Layer {
    let worker = Roles::WORKER;
    let control = Roles::CONTROL;
    let mut l = Layer::new("blk");
    l.refuse(control, syscall!(SYS_io_uring_setup), libc::ENOSYS, "a worker's engine lost to a failure is rebuilt: with new rings refused, it falls back to the synchronous engine");
    if engine == Engine::Uring {
        l.allow(worker, syscall!(SYS_io_uring_enter), "submitting a batch of storage requests and waiting for completions (the requests themselves are not seen by seccomp)");
        l.allow(
            control,
            syscall!(SYS_io_uring_enter),
            "an engine dropped at exit waits for the requests still in the kernel",
        );
    }
    if engine != Engine::Null {
        // With io_uring these serve the synchronous engine that replaces a lost one.
        l.allow(
            worker,
            syscall!(SYS_preadv),
            "synchronous engine: reads into guest buffers",
        );
        l.allow(
            worker,
            syscall!(SYS_pwritev2),
            "synchronous engine: writes from guest buffers (RWF_DSYNC in writethrough mode)",
        );
        l.allow(
            worker,
            syscall!(SYS_pwrite64),
            "synchronous engine: write-zeroes written as zeros where fallocate cannot zero",
        );
        l.allow(
            worker,
            syscall!(SYS_fallocate),
            "synchronous engine: discard (punch hole) and write-zeroes (zero range)",
        );
        l.allow(worker, syscall!(SYS_fdatasync), "synchronous engine: flush");
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboard_sandbox::layers::{vhost_user_backend, ProgramOptions};
    use outboard_sandbox::Role;

    #[test]
    fn the_blk_policy_builds_for_every_engine_and_role() {
        for engine in [Engine::Uring, Engine::Sync, Engine::Null] {
            let policy = vhost_user_backend(ProgramOptions::default(), blk_layer(engine))
                .unwrap_or_else(|e| panic!("{engine:?}: {e}"));
            for role in Role::ALL {
                let p = policy.role(role).unwrap();
                for e in p.entries() {
                    assert!(
                        e.reasons.iter().all(|(_, r)| r.len() > 10),
                        "{}",
                        e.syscall.name()
                    );
                }
            }
            let worker = policy.role(Role::Worker).unwrap();
            let uring = syscall!(SYS_io_uring_enter).nr();
            let preadv = syscall!(SYS_preadv).nr();
            assert_eq!(
                worker.get(uring).is_some(),
                engine == Engine::Uring,
                "{engine:?}"
            );
            assert_eq!(
                worker.get(preadv).is_some(),
                engine != Engine::Null,
                "{engine:?}"
            );
            let signals = policy.role(Role::Signals).unwrap();
            assert!(signals.get(uring).is_none() && signals.get(preadv).is_none());
        }
    }

    #[test]
    fn engine_names_are_the_devices() {
        assert_eq!(Engine::from_name("io_uring"), Some(Engine::Uring));
        assert_eq!(Engine::from_name("sync"), Some(Engine::Sync));
        assert_eq!(Engine::from_name("null"), Some(Engine::Null));
        assert_eq!(Engine::from_name("spdk"), None);
    }
}
