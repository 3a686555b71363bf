//! Dirty logging of the real `vhost-user-blk`, driven through the frontend's migration API: while
//! LOG_ALL is on, every page the device writes (read data, status byte, used ring) is marked
//! before the device stops; pages it only reads are not; with LOG_ALL off nothing is marked.
//! Every storage engine is covered, since io_uring fills guest memory behind vm-memory's back.

mod common;

use std::time::Duration;

use common::blk::{pattern, BlkBackend};
use outboard_frontend::migration::{migration_protocol_features, DirtyLog, LOG_PAGE_SIZE};
use outboard_frontend::{
    BlkCompletion, BlkDriver, BlkOptions, BlkRequest, BlkStatus, DirtyBitmap, WaitMode,
};

const LEN: u32 = 64 << 10;
const WAIT: WaitMode = WaitMode::Block(Duration::from_secs(10));

fn pages(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
    (gpa / LOG_PAGE_SIZE..=(gpa + len - 1) / LOG_PAGE_SIZE).map(|p| p * LOG_PAGE_SIZE)
}

/// Runs one request on queue 0 and returns the slot it used.
fn request(blk: &mut BlkDriver, req: BlkRequest) -> u16 {
    let q = blk.queue(0);
    let slot = q.free_slot().unwrap();
    if req.op == outboard_frontend::BlkOp::Write {
        q.slot_data(slot).write_at(0, &pattern(7, req.len as usize));
    }
    q.submit(slot, req).unwrap();
    q.kick().unwrap();
    let mut done: Vec<BlkCompletion> = Vec::new();
    while done.is_empty() {
        q.reap(WAIT, &mut done).unwrap();
    }
    assert_eq!(done[0].status, BlkStatus::Ok);
    slot
}

/// Stops the device (so that every mark is made), takes the log, and restarts the device.
fn stopped_log(blk: &mut BlkDriver, log: &DirtyLog) -> DirtyBitmap {
    let s = blk.session();
    let bases = s.stop_rings().unwrap();
    let bitmap = log.take();
    s.resume_rings(&bases).unwrap();
    bitmap
}

fn check(backend: &BlkBackend, what: &str) {
    let builder = backend
        .builder()
        .protocol_features(migration_protocol_features());
    let mut blk = BlkDriver::connect_with(builder, BlkOptions::default()).unwrap();
    assert!(blk.session().supports_dirty_log(), "{what}: no dirty log");
    let log = DirtyLog::for_ram(blk.session().ram()).unwrap();
    blk.session().start_dirty_log(&log).unwrap();
    log.clear();

    let slot = request(&mut blk, BlkRequest::read(8, LEN));
    let q = blk.queue(0);
    let data = q.slot_data(slot).gpa();
    let status = q.slot_status_gpa(slot);
    let used = q.driver_queue().used_ring_gpa();
    let bitmap = stopped_log(&mut blk, &log);
    for p in pages(data, u64::from(LEN)) {
        assert!(
            bitmap.is_dirty(p),
            "{what}: read data page {p:#x} not marked"
        );
    }
    assert!(bitmap.is_dirty(status), "{what}: status byte not marked");
    assert!(bitmap.is_dirty(used), "{what}: used ring not marked");

    // A write: the device reads the data and writes only the status and the used ring.
    let slot = request(&mut blk, BlkRequest::write(8, LEN));
    let q = blk.queue(0);
    let data = q.slot_data(slot).gpa();
    let bitmap = stopped_log(&mut blk, &log);
    assert!(
        bitmap.is_dirty(blk.queue(0).slot_status_gpa(slot)),
        "{what}: write status"
    );
    for p in pages(data, u64::from(LEN)) {
        assert!(
            !bitmap.is_dirty(p),
            "{what}: a page the device only read is marked: {p:#x}"
        );
    }

    // Logging off: nothing is marked.
    blk.session().stop_dirty_log().unwrap();
    log.clear();
    request(&mut blk, BlkRequest::read(0, LEN));
    let bitmap = stopped_log(&mut blk, &log);
    assert_eq!(bitmap.count(), 0, "{what}: pages marked with logging off");
}

#[test]
fn every_page_the_device_writes_is_marked_and_nothing_else() {
    let contents = pattern(3, 1 << 20);
    for engine in ["io-uring", "sync"] {
        let b = BlkBackend::start("dirty-log", &contents, &["--engine", engine]);
        check(&b, engine);
    }
    let b = BlkBackend::start_null("dirty-log-null", 1 << 20, &[]);
    check(&b, "null");
}

#[test]
fn logging_survives_a_migration_to_a_new_backend() {
    let contents = pattern(4, 1 << 20);
    let src = BlkBackend::start("dirty-src", &contents, &[]);
    let builder = src
        .builder()
        .protocol_features(migration_protocol_features());
    let mut blk = BlkDriver::connect_with(builder, BlkOptions::default()).unwrap();
    let log = DirtyLog::for_ram(blk.session().ram()).unwrap();
    blk.session().start_dirty_log(&log).unwrap();
    // Nothing is written before the migration, so an image with the same contents stands in
    // for the shared disk.
    let dst = BlkBackend::start("dirty-dst", &contents, &[]);
    let m = blk.session().migrate(&dst.socket, Some(&log)).unwrap();
    assert!(m.state_len.unwrap() > 0);
    log.clear();
    let slot = request(&mut blk, BlkRequest::read(0, LEN));
    let data = blk.queue(0).slot_data(slot).gpa();
    let bitmap = stopped_log(&mut blk, &log);
    for p in pages(data, u64::from(LEN)) {
        assert!(bitmap.is_dirty(p), "destination did not mark {p:#x}");
    }
    let mut buf = vec![0u8; LEN as usize];
    assert_eq!(blk.queue(0).read(0, &mut buf).unwrap(), BlkStatus::Ok);
    common::blk::assert_bytes_eq(&buf, &contents[..LEN as usize], "read on the destination");
}
