//! GET_VRING_BASE_SKIP_DRAIN (protocol features 20 and 23 with INFLIGHT_SHMFD): a ring stops
//! without waiting for slow storage. The real `vhost-user-blk` holds every io_uring operation
//! back in the kernel (its test-only `--io-delay-ms`, a linked timeout), so requests are really
//! in flight when the frontend stops the ring. Skipping the drain, the backend cancels them: no
//! used entry, no byte on the disk, every request still marked in the inflight record. The
//! ring restarts in the same process (the record resubmits them, and a second suspend cancels
//! them again), then a fresh process without the delay takes the record over, as a destination
//! of a migration or a new binary would, and carries every request out exactly once.

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{Backend, TempDir};
use outboard_frontend::connection::{GET_VRING_BASE_SKIP_DRAIN, PROTOCOL_F_SKIP_DRAIN};
use outboard_frontend::raw::{FLAG_NEED_REPLY, VERSION};
use outboard_frontend::{
    BlkCompletion, BlkDriver, BlkRequest, BlkStatus, SessionBuilder, WaitMode,
};
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};

const SECTOR: u64 = 512;
const BLOCK: u32 = 4096;
/// Long enough that a ring stop which waited for the storage would be plain to see.
const DELAY_MS: &str = "20000";

fn skip_drain_features() -> VhostUserProtocolFeatures {
    outboard_frontend::device::default_protocol_features()
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT
        | VhostUserProtocolFeatures::from_bits_retain(PROTOCOL_F_SKIP_DRAIN)
}

fn pattern(block: u64, generation: u8) -> Vec<u8> {
    (0..BLOCK as u64)
        .map(|i| (block as u8) ^ (i as u8).wrapping_mul(7) ^ generation)
        .collect()
}

fn backend(dir: &TempDir, disk: &std::path::Path, name: &str, delay: bool) -> Backend {
    let socket = dir.path("blk.sock");
    let mut args: Vec<String> = [
        "--socket-path",
        socket.to_str().unwrap(),
        "--blk-file",
        disk.to_str().unwrap(),
        "--poll-us",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if delay {
        args.extend(["--io-delay-ms".to_string(), DELAY_MS.to_string()]);
    }
    Backend::start("vhost-user-blk", &socket, &args, dir.path(name))
}

#[test]
fn a_ring_stopped_without_drain_leaves_slow_requests_to_the_record_and_a_new_process_finishes_them()
{
    let dir = TempDir::new("skip-drain");
    let disk = dir.path("disk.img");
    let blocks = 16u64;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&disk)
        .unwrap();
    for b in 0..blocks {
        file.write_all_at(&pattern(b, 0), b * u64::from(BLOCK))
            .unwrap();
    }
    let slow = backend(&dir, &disk, "slow.log", true);
    let mut blk = BlkDriver::connect(
        SessionBuilder::new(dir.path("blk.sock")).protocol_features(skip_drain_features()),
    )
    .unwrap();
    assert!(blk.session().has_inflight(), "the session has a record");
    if slow.log_text().contains("io_uring is not available") {
        eprintln!(
            "SKIP: io_uring is not available here, and only io_uring requests can be cancelled"
        );
        return;
    }

    // Reads of blocks 0..8 and writes of new contents to blocks 8..12.
    let q = blk.queue(0);
    let mut reads = Vec::new();
    let mut writes = Vec::new();
    for b in 0..12u64 {
        let slot = q.free_slot().unwrap();
        let sector = b * u64::from(BLOCK) / SECTOR;
        if b < 8 {
            q.submit(slot, BlkRequest::read(sector, BLOCK)).unwrap();
            reads.push((slot, b));
        } else {
            q.slot_data(slot).write_at(0, &pattern(b, 1));
            q.submit(slot, BlkRequest::write(sector, BLOCK)).unwrap();
            writes.push((slot, b));
        }
    }
    q.kick().unwrap();
    // Give the worker time to take them all into the kernel, where they wait on the delay.
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let base = blk.session().suspend_queue(0).unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "GET_VRING_BASE_SKIP_DRAIN took {took:?}: it waited for the {DELAY_MS} ms storage:\n{}",
        slow.log_text()
    );
    assert_eq!(base, 12, "every request was taken from the ring");
    let q = blk.queue(0);
    assert_eq!(
        q.driver_queue_mut().used_idx(),
        0,
        "a cancelled request must not be answered:\n{}",
        slow.log_text()
    );
    for b in 8..12u64 {
        let mut now = vec![0u8; BLOCK as usize];
        file.read_exact_at(&mut now, b * u64::from(BLOCK)).unwrap();
        assert_eq!(
            now,
            pattern(b, 0),
            "block {b} was written although cancelled"
        );
    }

    // The same process starts the ring again: the record resubmits the twelve (held back by the
    // delay again), and a second suspend cancels them again.
    blk.session().start_queue(0, base as u16).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let base = blk.session().suspend_queue(0).unwrap();
    assert_eq!(base, 12, "resubmission takes nothing new from the ring");
    assert_eq!(blk.queue(0).driver_queue_mut().used_idx(), 0);
    assert!(
        slow.log_text().contains("resubmitting 12 chain(s)"),
        "the restarted ring resubmits from the record:\n{}",
        slow.log_text()
    );

    // A new process without the delay takes the record over and finishes every request once.
    drop(slow);
    let _fast = backend(&dir, &disk, "fast.log", false);
    blk.session().reconnect().unwrap();
    let q = blk.queue(0);
    let mut done: Vec<BlkCompletion> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < 12 {
        assert!(
            Instant::now() < deadline,
            "only {} of 12 completed",
            done.len()
        );
        q.reap(WaitMode::Block(Duration::from_millis(100)), &mut done)
            .unwrap();
    }
    assert_eq!(q.driver_queue_mut().used_idx(), 12, "each request once");
    for c in &done {
        assert_eq!(c.status, BlkStatus::Ok, "slot {}", c.slot);
    }
    for (slot, b) in reads {
        let mut got = vec![0u8; BLOCK as usize];
        q.slot_data(slot).read_at(0, &mut got);
        assert_eq!(got, pattern(b, 0), "read of block {b}");
    }
    for (_, b) in writes {
        let mut now = vec![0u8; BLOCK as usize];
        file.read_exact_at(&mut now, b * u64::from(BLOCK)).unwrap();
        assert_eq!(now, pattern(b, 1), "write of block {b}");
    }
}

/// Feature 23 without the features it needs is refused, and message 45 without feature 23
/// closes the connection (it has a reply that cannot be given); the backend serves the next
/// frontend.
#[test]
fn skip_drain_is_refused_without_its_features() {
    let dir = TempDir::new("skip-drain-refused");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let _b = backend(&dir, &disk, "b.log", false);
    let socket = dir.path("blk.sock");

    // Offered, with its prerequisites.
    let s = SessionBuilder::new(&socket)
        .protocol_features(skip_drain_features())
        .handshake()
        .unwrap();
    let offered = s.negotiated().protocol_offered.bits();
    assert_ne!(offered & PROTOCOL_F_SKIP_DRAIN, 0, "feature 23 offered");
    assert_ne!(
        offered & VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT.bits(),
        0,
        "feature 20 offered"
    );
    drop(s);

    // Feature 23 without 20: refused (REPLY_ACK gives the status).
    let mut s = SessionBuilder::new(&socket)
        .protocol_features(
            outboard_frontend::device::default_protocol_features()
                | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .handshake()
        .unwrap();
    let c = s.connection();
    let bad = (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        .bits()
        | PROTOCOL_F_SKIP_DRAIN;
    let reply = c
        .raw_request(
            FrontendReq::SET_PROTOCOL_FEATURES as u32,
            VERSION | FLAG_NEED_REPLY,
            &bad.to_ne_bytes(),
            &[],
        )
        .unwrap()
        .expect("a REPLY_ACK status");
    assert_ne!(
        u64::from_ne_bytes(reply.payload[..8].try_into().unwrap()),
        0,
        "feature 23 without feature 20 must be refused"
    );
    // Message 45 without the feature: the connection closes.
    let state = [0u8; 8];
    let r = c.raw_request(GET_VRING_BASE_SKIP_DRAIN, VERSION, &state, &[]);
    assert!(
        !matches!(r, Ok(Some(_))),
        "GET_VRING_BASE_SKIP_DRAIN without its feature got an answer: {r:?}"
    );
    drop(s);

    // The backend serves the next frontend.
    let mut blk = BlkDriver::connect(SessionBuilder::new(&socket)).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(blk.queue(0).read(0, &mut buf).unwrap(), BlkStatus::Ok);
}
