//! virtio-net's seccomp layer: what its queue-pair workers and packet backends need once the
//! sandbox is on.
//!
//! Every resource is open before the sandbox: the TAP descriptors (opened by name, which needs
//! `/dev/net/tun` and maybe CAP_NET_ADMIN, or inherited with `--tap-fd`, sized and configured
//! with TUNSETIFF, TUNGETIFF, TUNSETVNETHDRSZ and O_NONBLOCK), the switch's eventfds and every
//! port's socket. So no role opens files, creates or configures interfaces, or makes sockets
//! afterwards. What is left is packet I/O, which reuses what every role has already (read and
//! write on the TAP descriptors and the switch's eventfds), the pair workers' own epoll sets,
//! and two TUN ioctls, each allowed by its request number only.
//!
//! The TAP descriptors keep working in a new network namespace (`--sandbox namespace`): a
//! descriptor stays bound to the interface, and so to the namespace, it was attached to.

use libc::{TUNSETOFFLOAD, TUNSETQUEUE};
use outboard_sandbox::{arg, syscall, Layer, Roles};

/// Where the device's packets go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A TAP interface: one descriptor per queue pair.
    Tap,
    /// The in-process switch: eventfds and memory only.
    Switch,
}

/// The device layer for `backend`.
pub fn net_layer(backend: Backend) -> Layer {
    let control = Roles::CONTROL;
    let worker = Roles::WORKER;
    let mut l = Layer::new("net");
    l.allow(worker, syscall!(SYS_epoll_ctl), "a queue-pair worker watches its backend queue's ready fd (the TAP descriptor or the switch queue's eventfd) in its own small epoll set while the driver has receive buffers, and stops watching it when they run out");
    if backend == Backend::Tap {
        // The common layer admits read and write in every role already (eventfds, the log);
        // these rules record why the workers need them on the TAP too.
        l.allow(worker, syscall!(SYS_read), "TAP: a queue-pair worker reads the packets the kernel received from its queue's descriptor, one packet per read (non-blocking)");
        l.allow(worker, syscall!(SYS_write), "TAP: a queue-pair worker writes the packets the driver transmitted to its queue's descriptor, one packet per write");
        // Argument 1 is the request (`unsigned int` in the kernel: the low 32 bits).
        l.allow(control, syscall!(SYS_ioctl), "TAP: at activation, the offloads the driver negotiated become the TAP's (TUNSETOFFLOAD); the queues of the pairs the driver uses are attached and the others detached (TUNSETQUEUE), and at reset detached")
            .when([arg(1).eq(TUNSETOFFLOAD)])
            .when([arg(1).eq(TUNSETQUEUE)]);
        l.allow(worker, syscall!(SYS_ioctl), "TAP: a queue-pair worker attaches its queue to a multi-queue TAP or detaches it when the driver changes the number of pairs in use (TUNSETQUEUE)")
            .when([arg(1).eq(TUNSETQUEUE)]);
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboard_sandbox::layers::{vhost_user_backend, ProgramOptions};
    use outboard_sandbox::Role;

    fn ioctl_requests(backend: Backend, role: Role) -> Option<Vec<u64>> {
        let policy = vhost_user_backend(ProgramOptions::default(), net_layer(backend))
            .unwrap_or_else(|e| panic!("{backend:?}: {e}"));
        let p = policy.role(role).unwrap();
        let e = p.get(syscall!(SYS_ioctl).nr())?;
        let alternatives = e.when.as_ref().expect("ioctl is always argument-filtered");
        let mut requests: Vec<u64> = alternatives
            .iter()
            .map(|alt| {
                assert_eq!(alt.len(), 1, "{alt:?}");
                assert_eq!(alt[0], arg(1).eq(alt[0].value), "{alt:?}");
                alt[0].value
            })
            .collect();
        // The control filter admits the workers' rules too, so a request may come twice.
        requests.sort_unstable();
        requests.dedup();
        Some(requests)
    }

    #[test]
    fn the_net_policy_builds_for_every_backend_and_role() {
        for backend in [Backend::Tap, Backend::Switch] {
            let policy = vhost_user_backend(ProgramOptions::default(), net_layer(backend))
                .unwrap_or_else(|e| panic!("{backend:?}: {e}"));
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
            assert!(worker.get(syscall!(SYS_epoll_ctl).nr()).is_some());
            let signals = policy.role(Role::Signals).unwrap();
            assert!(signals.get(syscall!(SYS_epoll_ctl).nr()).is_none());
        }
    }

    #[test]
    fn only_a_tap_gets_tun_ioctls_and_only_those_it_uses_at_runtime() {
        let fionbio = libc::FIONBIO;
        let mut control = vec![fionbio, TUNSETOFFLOAD, TUNSETQUEUE];
        control.sort_unstable();
        assert_eq!(ioctl_requests(Backend::Tap, Role::Control), Some(control));
        assert_eq!(
            ioctl_requests(Backend::Tap, Role::Worker),
            Some(vec![TUNSETQUEUE])
        );
        assert_eq!(ioctl_requests(Backend::Tap, Role::Signals), None);
        assert_eq!(
            ioctl_requests(Backend::Switch, Role::Control),
            Some(vec![fionbio])
        );
        assert_eq!(ioctl_requests(Backend::Switch, Role::Worker), None);
        // Setting up or reconfiguring an interface stays refused.
        for request in [libc::TUNSETIFF, libc::TUNSETVNETHDRSZ, libc::TUNSETOWNER] {
            for role in [Role::Control, Role::Worker] {
                let allowed = ioctl_requests(Backend::Tap, role).unwrap_or_default();
                assert!(!allowed.contains(&request), "{role}: {request:#x}");
            }
        }
    }
}
