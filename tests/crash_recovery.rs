//! Crash recovery of `vhost-user-blk`: the real `outboard-migrate` runner kills the real backend
//! with SIGKILL a thousand times under a verifying workload (at random moments, at every fault
//! point with both actions, and after stopping every ring with GET_VRING_BASE_SKIP_DRAIN while
//! requests wait in the kernel), restarts it on the same socket and reconnects the way QEMU
//! does. Nothing in flight may be lost, completed twice or corrupted. Also: the inflight
//! messages refuse what a frontend must not send, with the backend still serving.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;

use common::blk::{assert_accepted, BlkBackend};
use common::{binary, TempDir};
use outboard_frontend::raw::VERSION;
use outboard_frontend::SessionBuilder;
use serde_json::Value;
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};

fn crash(dir: &TempDir, disk: &Path, count: u32, queues: u16) -> Value {
    let backend = format!(
        "{} --socket-path {{sock}} --blk-file {} --num-queues {queues} {{fault}}",
        binary("vhost-user-blk").display(),
        disk.display()
    );
    let (count, queues) = (count.to_string(), queues.to_string());
    common::outboard_migrate_passing(
        dir,
        &[
            "crash",
            "--backend",
            &backend,
            "--count",
            &count,
            "--fault-every",
            "4",
            "--queues",
            &queues,
            "--depth",
            "16",
        ],
    )
}

#[test]
fn a_thousand_kills_under_load_lose_no_write_and_visit_every_fault_point() {
    let dir = TempDir::new("crash-1000");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let report = crash(&dir, &disk, 1000, 2);
    let kills = report["crash"]["kills"].as_object().unwrap();
    let total: u64 = kills.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 1000);
    for point in [
        "after-inflight-mark",
        "after-storage-write",
        "before-used-update",
        "after-used-update",
    ] {
        for action in ["stop", "exit"] {
            let n = kills
                .get(&format!("{point}:{action}"))
                .and_then(Value::as_u64);
            assert!(n >= Some(1), "{point}:{action} never exercised: {kills:?}");
        }
    }
    // Every fifth fault slot stops the rings with GET_VRING_BASE_SKIP_DRAIN while requests
    // wait in the kernel; what it leaves unanswered comes back in the next process.
    assert!(
        kills.get("skip-drain").and_then(Value::as_u64) >= Some(10),
        "{kills:?}"
    );
    assert!(
        report["crash"]["unanswered_after_skip_drain"]
            .as_u64()
            .unwrap()
            > 100,
        "{}",
        report["crash"]
    );
    assert!(
        report["crash"]["in_flight_at_kills"].as_u64().unwrap() > 1000,
        "the kills must catch requests in flight: {}",
        report["crash"]
    );
    let r = &report["requests"];
    assert_eq!(
        r["submitted"], r["completed"],
        "every request completes once"
    );
    assert_eq!(report["readback"]["mismatches"], 0);
    assert!(report["violations"].as_array().unwrap().is_empty());
}

/// GET/SET_INFLIGHT_FD with shapes the device cannot have, wrong fd counts, truncated payloads
/// and a file too small are refused (REPLY_ACK status), and the session keeps serving.
#[test]
fn bad_inflight_messages_are_refused_and_the_backend_keeps_serving() {
    let b = BlkBackend::start_null("inflight-hostile", 1 << 20, &[]);
    let mut conn = b
        .builder()
        .protocol_features(
            outboard_frontend::device::default_protocol_features()
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .handshake()
        .unwrap();
    let c = conn.connection();
    let get = FrontendReq::GET_INFLIGHT_FD as u32;
    let set = FrontendReq::SET_INFLIGHT_FD as u32;
    let inflight = |size: u64, offset: u64, queues: u16, qsize: u16| {
        let mut p = Vec::new();
        p.extend(size.to_le_bytes());
        p.extend(offset.to_le_bytes());
        p.extend(queues.to_le_bytes());
        p.extend(qsize.to_le_bytes());
        p.extend([0u8; 4]);
        p
    };
    // GET_INFLIGHT_FD always has a reply; a refused one closes the connection in an orderly
    // way (there is no error reply), so the refusals go to SET, and GET is checked to work.
    let memfd = common::hostile::memfd(4096);
    let fd = [memfd.as_raw_fd()];
    for (payload, fds, what) in [
        (
            inflight(4096, 0, 9, 256),
            &fd[..],
            "more queues than the device has",
        ),
        (
            inflight(4096, 0, 1, 100),
            &fd[..],
            "a queue size that is no power of two",
        ),
        (inflight(4096, 0, 1, 0), &fd[..], "queue size 0"),
        (
            inflight(123, 0, 1, 256),
            &fd[..],
            "a size that does not match the layout",
        ),
        (
            inflight(4160, 0, 1, 256),
            &fd[..],
            "a file smaller than the region",
        ),
        (inflight(4160, 100, 1, 256), &fd[..], "an unaligned offset"),
        (inflight(4160, 0, 1, 256), &[][..], "no fd"),
        (
            inflight(4160, 0, 1, 256)[..10].to_vec(),
            &fd[..],
            "a truncated payload",
        ),
    ] {
        let status = common::blk::reply_ack(c, set, &payload, fds);
        assert_ne!(status, 0, "SET_INFLIGHT_FD with {what} was accepted");
    }
    // The session still works: a real region, then I/O.
    let big = common::hostile::memfd(4160);
    assert_accepted(
        c,
        set,
        &inflight(4160, 0, 1, 256)[..],
        &[big.as_raw_fd()],
        "a well-formed region",
    );
    let reply = c
        .raw_request(get, VERSION, &inflight(0, 0, 1, 128), &[])
        .unwrap()
        .expect("GET_INFLIGHT_FD has a reply");
    assert_eq!(reply.fds.len(), 1, "GET_INFLIGHT_FD returns one fd");
    assert_eq!(
        u64::from_le_bytes(reply.payload[..8].try_into().unwrap()),
        2112,
        "one queue of 128: 16 + 16 * 128 bytes, padded to 64"
    );
    drop(conn);
    let mut blk = b.connect_with(SessionBuilder::new(&b.socket));
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        blk.queue(0).read(0, &mut buf).unwrap(),
        outboard_frontend::BlkStatus::Ok
    );
}

/// The runner's `upgrade` mode: a hundred live upgrades under the verifying workload, on the
/// connection the runner opened first.
#[test]
fn the_runner_proves_a_hundred_live_upgrades_lose_nothing_and_never_disconnect() {
    let dir = TempDir::new("runner-upgrade");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let blk = binary("vhost-user-blk");
    let device = format!("--blk-file {} --num-queues 2", disk.display());
    let first = format!(
        "{} --socket-path {{sock}} --upgrade-socket {{upgrade}} {device}",
        blk.display()
    );
    let next = format!("{} --upgrade-from {{upgrade}} {device}", blk.display());
    let report = common::outboard_migrate_passing(
        &dir,
        &[
            "upgrade",
            "--backend",
            &first,
            "--dest-backend",
            &next,
            "--count",
            "100",
            "--queues",
            "2",
        ],
    );
    assert_eq!(report["upgrade"]["upgrades"], 100);
    assert_eq!(report["upgrade"]["disconnects"], 0);
    let r = &report["requests"];
    assert_eq!(r["submitted"], r["completed"]);
    assert!(r["writes"].as_u64().unwrap() > 1000, "{r}");
    assert_eq!(report["readback"]["mismatches"], 0);
}

/// A backend that dies after publishing a used entry but before signalling it leaves the
/// driver waiting for an interrupt that never comes: the restarted backend, finding the
/// queue's record, interrupts the driver once.
#[test]
fn a_used_entry_published_but_not_signalled_before_the_crash_is_signalled_after_it() {
    use outboard_frontend::raw::wait_readable_fd;
    use outboard_frontend::BlkRequest;

    let dir = TempDir::new("crash-signal");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let socket = dir.path("blk.sock");
    let args = |fault: &[&str]| -> Vec<String> {
        let path = [socket.to_str().unwrap(), disk.to_str().unwrap()];
        [
            "--socket-path",
            path[0],
            "--blk-file",
            path[1],
            "--poll-us",
            "0",
        ]
        .iter()
        .chain(fault)
        .map(|s| s.to_string())
        .collect()
    };
    let mut first = common::Backend::start(
        "vhost-user-blk",
        &socket,
        &args(&["--fault-point", "after-used-update@1:stop"]),
        dir.path("b1.log"),
    );
    let builder = SessionBuilder::new(&socket).protocol_features(
        outboard_frontend::device::default_protocol_features()
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
    );
    let mut blk = outboard_frontend::BlkDriver::connect(builder).unwrap();
    let q = blk.queue(0);
    let slot = q.free_slot().unwrap();
    q.slot_data(slot).write_at(0, &[0x5a; 4096]);
    q.submit(slot, BlkRequest::write(0, 4096)).unwrap();
    q.kick().unwrap();
    // The worker stops right after writing the used entry, before it signals.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !first
        .log_text()
        .contains("outboard-fault: after-used-update reached")
    {
        assert!(std::time::Instant::now() < deadline, "{}", first.log_text());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let q = blk.queue(0);
    assert_eq!(
        q.driver_queue_mut().used_idx(),
        1,
        "the used entry is there"
    );
    let call = q.driver_queue_mut().call_fd().try_clone().unwrap();
    let _ = call.read(); // Whatever was signalled before.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let _second = common::Backend::start("vhost-user-blk", &socket, &args(&[]), dir.path("b2.log"));
    blk.session().reconnect().unwrap();
    assert!(
        wait_readable_fd(&call, Some(std::time::Duration::from_secs(2))).unwrap(),
        "no interrupt for the used entry the dead process published"
    );
}
