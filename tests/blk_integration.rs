//! `vhost-user-blk` end to end: the real binary, driven over its socket by `outboard-frontend`.
//!
//! Every test starts its own backend on a temporary disk image (or a null disk) and checks data:
//! what a frontend reads back, and what is in the image file on disk. Covered: the request types,
//! one and four queues, the configuration space, the device status protocol, device reset,
//! memory hot-plug, reconnection (clean and abrupt), GET_VRING_BASE with requests in flight,
//! read-only disks. The program's command-line conventions are in `blk_cli.rs`.

mod common;

use std::time::Duration;

use common::blk::{
    assert_accepted, assert_bytes_eq, assert_refused, config_msg, pattern, region, single_region,
    verified_io, BlkBackend, IO_TIMEOUT, SECTOR,
};
use outboard_frontend::raw::VERSION;
use outboard_frontend::{
    BlkCompletion, BlkDriver, BlkOp, BlkOptions, BlkRange, BlkRequest, BlkStatus, ConnectionError,
    Segment, SessionError, WaitMode,
};
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures as P};

const DISK: usize = 8 << 20;

// virtio-blk feature bits (VIRTIO 1.2, 5.2.3).
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_MQ: u32 = 12;
const VIRTIO_BLK_F_DISCARD: u32 = 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
// virtio-blk request types (VIRTIO 1.2, 5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
// Device status bits (VIRTIO 1.2, 2.1).
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const DEVICE_NEEDS_RESET: u8 = 0x40;

fn code(r: FrontendReq) -> u32 {
    r as u32
}

fn zeros() -> Vec<u8> {
    vec![0; DISK]
}

/// `buf` with `data` at `sector`.
fn patch(buf: &mut [u8], sector: u64, data: &[u8]) {
    let at = sector as usize * SECTOR;
    buf[at..at + data.len()].copy_from_slice(data);
}

fn read_back(blk: &mut BlkDriver, queue: u16, sector: u64, len: usize) -> Vec<u8> {
    let mut back = vec![0u8; len];
    assert_eq!(
        blk.queue(queue).read(sector, &mut back).unwrap(),
        BlkStatus::Ok
    );
    back
}

#[test]
fn writes_read_back_and_reach_the_image_file_after_flush() {
    let b = BlkBackend::start("rw", &zeros(), &[]);
    let mut blk = b.connect();
    let small = pattern(1, 4096);
    // Larger than a slot buffer (128 KiB): the driver splits it into several requests.
    let big = pattern(2, 300 << 10);
    let q = blk.queue(0);
    assert_eq!(q.write(0, &small).unwrap(), BlkStatus::Ok);
    assert_eq!(q.write(1000, &big).unwrap(), BlkStatus::Ok);
    assert_bytes_eq(&read_back(&mut blk, 0, 0, small.len()), &small, "sector 0");
    assert_bytes_eq(
        &read_back(&mut blk, 0, 1000, big.len()),
        &big,
        "sector 1000",
    );
    // The used length counts what the device wrote: data and status for a read, the status
    // alone for a write.
    let q = blk.queue(0);
    let c = q.request(BlkRequest::read(1000, 4096), |_| {}).unwrap();
    assert_eq!((c.status, c.used_len), (BlkStatus::Ok, 4097));
    let third = pattern(3, 8192);
    let c = q
        .request(BlkRequest::write(5000, 8192), |d| d.write_at(0, &third))
        .unwrap();
    assert_eq!((c.status, c.used_len), (BlkStatus::Ok, 1));
    let c = q.request(BlkRequest::flush(), |_| {}).unwrap();
    assert_eq!((c.status, c.used_len), (BlkStatus::Ok, 1));
    let mut expected = zeros();
    patch(&mut expected, 0, &small);
    patch(&mut expected, 1000, &big);
    patch(&mut expected, 5000, &third);
    assert_bytes_eq(&b.disk_contents(), &expected, "image file after flush");
    // The last sector is usable; one past it is not.
    let last = (DISK / SECTOR - 1) as u64;
    verified_io(&mut blk, 0, 0, last, &pattern(4, SECTOR));
    let mut one = vec![0; SECTOR];
    assert_eq!(
        blk.queue(0).read(last + 1, &mut one).unwrap(),
        BlkStatus::IoErr
    );
}

#[test]
fn write_zeroes_and_discard_change_only_their_ranges() {
    let initial = pattern(10, DISK);
    let b = BlkBackend::start("zeroes", &initial, &[]);
    let mut blk = b.connect();
    let c = blk.config().clone();
    assert!(c.discard.is_some() && c.write_zeroes.is_some(), "{c:?}");
    let q = blk.queue(0);
    let r = |sector, num_sectors| BlkRange {
        sector,
        num_sectors,
    };
    assert_eq!(q.write_zeroes(&[r(64, 16)], false).unwrap(), BlkStatus::Ok);
    // Two ranges in one request, the driver allowing deallocation.
    assert_eq!(
        q.write_zeroes(&[r(200, 8), r(300, 9)], true).unwrap(),
        BlkStatus::Ok
    );
    assert_eq!(q.discard(&[r(400, 8), r(420, 1)]).unwrap(), BlkStatus::Ok);
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
    let mut expected = initial.clone();
    for (sector, n) in [(64, 16), (200, 8), (300, 9)] {
        patch(&mut expected, sector, &vec![0; n * SECTOR]);
    }
    // What a discarded range reads back is up to the device; everything else is defined.
    let mut got = read_back(&mut blk, 0, 0, 1024 * SECTOR);
    let mut disk = b.disk_contents();
    for (sector, n) in [(400, 8), (420, 1)] {
        let range = sector * SECTOR..(sector + n) * SECTOR;
        got[range.clone()].copy_from_slice(&expected[range.clone()]);
        disk[range.clone()].copy_from_slice(&expected[range]);
    }
    assert_bytes_eq(&got, &expected[..1024 * SECTOR], "read after zeroes");
    assert_bytes_eq(&disk, &expected, "image file after zeroes and discard");
}

#[test]
fn get_id_returns_the_serial_given_on_the_command_line() {
    for (serial, want) in [
        (Some("outboard-serial-01"), "outboard-serial-01"),
        // Exactly 20 bytes: no terminating NUL.
        (Some("ABCDEFGHIJ0123456789"), "ABCDEFGHIJ0123456789"),
        (None, ""),
    ] {
        let extra: Vec<&str> = serial.iter().flat_map(|s| ["--serial", *s]).collect();
        let b = BlkBackend::start("serial", &zeros(), &extra);
        let mut blk = b.connect();
        assert_eq!(blk.queue(0).get_id().unwrap(), want);
        let req = BlkRequest {
            op: BlkOp::GetId,
            sector: 0,
            len: 20,
        };
        let c = blk.queue(0).request(req, |d| d.fill(0, 20, 0xee)).unwrap();
        assert_eq!((c.status, c.used_len), (BlkStatus::Ok, 21), "{serial:?}");
        let mut id = [0u8; 20];
        blk.queue(0).slot_data(c.slot).read_at(0, &mut id);
        let mut padded = want.as_bytes().to_vec();
        padded.resize(20, 0);
        assert_eq!(id.to_vec(), padded, "the whole 20-byte field is written");
    }
}

#[test]
fn one_queue_device_does_not_offer_mq_and_refuses_a_second_queue() {
    let b = BlkBackend::start("one-queue", &zeros(), &[]);
    let blk = b.connect();
    assert_eq!(blk.num_queues(), 1);
    assert_eq!(blk.config().num_queues, None, "MQ is not negotiated");
    drop(blk);
    let mut s = b.builder().handshake().unwrap();
    assert_eq!(
        s.negotiated().features_offered & (1 << VIRTIO_BLK_F_MQ),
        0,
        "MQ offered by a one-queue device"
    );
    assert_eq!(s.get_queue_num().unwrap(), 1);
    drop(s);
    let e = b.builder().queues(2).handshake().unwrap_err();
    assert!(
        matches!(e, SessionError::TooManyQueues { max: 1, .. }),
        "{e:?}"
    );
    b.connect();
}

#[test]
fn four_queues_each_serve_io_and_see_each_others_writes() {
    let b = BlkBackend::start("four-queues", &zeros(), &["--num-queues", "4"]);
    let mut blk = b.connect_with(b.builder().queues(4));
    assert_eq!(blk.num_queues(), 4);
    assert_eq!(blk.config().num_queues, Some(4));
    let mut expected = zeros();
    // One at a time: written on queue q, read back on queue q+1.
    for q in 0..4u16 {
        let data = pattern(20 + u64::from(q), 16 << 10);
        let sector = u64::from(q) * 64;
        verified_io(&mut blk, q, (q + 1) % 4, sector, &data);
        patch(&mut expected, sector, &data);
    }
    // All at once: eight writes in flight on every queue.
    for q in 0..4u16 {
        let queue = blk.queue(q);
        for slot in 0..8u16 {
            let seed = 100 + u64::from(q) * 8 + u64::from(slot);
            let sector = 1024 + seed * 8;
            queue.slot_data(slot).write_at(0, &pattern(seed, 4096));
            queue.submit(slot, BlkRequest::write(sector, 4096)).unwrap();
            patch(&mut expected, sector, &pattern(seed, 4096));
        }
        queue.kick().unwrap();
    }
    for q in 0..4u16 {
        let mut done = Vec::new();
        blk.queue(q).drain(&mut done).unwrap();
        assert_eq!(done.len(), 8, "queue {q}");
        assert!(done.iter().all(|c| c.status == BlkStatus::Ok), "{done:?}");
        let completions = blk.queue(q).driver_queue().stats().completions;
        assert_eq!(completions, 10, "queue {q} served its own requests");
    }
    assert_eq!(blk.queue(2).flush().unwrap(), BlkStatus::Ok);
    let got = read_back(&mut blk, 3, 0, 2048 * SECTOR);
    assert_bytes_eq(&got, &expected[..2048 * SECTOR], "read on queue 3");
    assert_bytes_eq(&b.disk_contents(), &expected, "image file");
}

#[test]
fn config_space_reports_capacity_block_size_limits_and_queues() {
    let b = BlkBackend::start("config", &zeros(), &["--num-queues", "2"]);
    let mut blk = b.connect_with(b.builder().queues(2));
    let c = blk.config().clone();
    assert_eq!(c.raw.len(), 60);
    assert_eq!(c.capacity, (DISK / SECTOR) as u64);
    assert_eq!(c.size_max, Some(1 << 20));
    assert_eq!(c.seg_max, Some(254));
    assert_eq!(c.blk_size, Some(512));
    let t = c.topology.expect("TOPOLOGY");
    assert_eq!((t.physical_block_exp, t.alignment_offset), (3, 0));
    assert_eq!((t.min_io_size, t.opt_io_size), (8, 0));
    assert_eq!(c.writeback, Some(1));
    assert_eq!(c.num_queues, Some(2));
    let d = c.discard.expect("DISCARD");
    assert_eq!(
        (d.max_sectors, d.max_segments, d.sector_alignment),
        (1 << 22, 32, 8)
    );
    let z = c.write_zeroes.expect("WRITE_ZEROES");
    assert_eq!(
        (z.max_sectors, z.max_segments, z.may_unmap),
        (1 << 22, 32, true)
    );
    // Partial reads see the same bytes.
    let s = blk.session();
    assert_eq!(s.get_config(34, 2).unwrap(), vec![2, 0]);
    assert_eq!(s.get_config(0, 8).unwrap(), c.raw[..8].to_vec());
    // A read beyond the 60-byte space gets the zero-sized reply that means "error".
    let conn = s.connection();
    for (offset, size) in [(56, 8), (60, 1), (0, 61), (u32::MAX, 1)] {
        let reply = conn
            .raw_request(
                code(FrontendReq::GET_CONFIG),
                VERSION,
                &config_msg(offset, size, &vec![0; size as usize]),
                &[],
            )
            .unwrap()
            .expect("GET_CONFIG always replies");
        assert_eq!(reply.header.request, code(FrontendReq::GET_CONFIG));
        assert_eq!(reply.payload.len(), 12, "{offset}+{size}: header only");
        assert_eq!(&reply.payload[4..8], &[0; 4], "{offset}+{size}: size 0");
    }
    // Read-only fields refuse writes and keep their value.
    conn.set_need_reply(true).unwrap();
    for (offset, data, what) in [
        (0u32, &[0u8; 8][..], "capacity"),
        (20, &[0, 2, 0, 0][..], "blk_size"),
        (34, &[1, 0][..], "num_queues"),
        (56, &[0][..], "write_zeroes_may_unmap"),
        (31, &[0, 0][..], "a write straddling writeback"),
        (59, &[0, 0][..], "beyond the end"),
    ] {
        let msg = config_msg(offset, data.len() as u32, data);
        assert_refused(conn, code(FrontendReq::SET_CONFIG), &msg, &[], what);
    }
    assert_eq!(blk.refresh_config().unwrap(), &c, "nothing changed");
    verified_io(&mut blk, 1, 0, 8, &pattern(5, 4096));
}

#[test]
fn set_config_on_writeback_toggles_the_cache_mode_visibly() {
    let b = BlkBackend::start("writeback", &zeros(), &[]);
    let mut blk = b.connect();
    assert_eq!(blk.config().writeback, Some(1));
    let set = |blk: &mut BlkDriver, value: u8| {
        let conn = blk.session().connection();
        let msg = config_msg(32, 1, &[value]);
        common::blk::reply_ack(conn, code(FrontendReq::SET_CONFIG), &msg, &[])
    };
    assert_eq!(set(&mut blk, 0), 0, "writethrough accepted");
    assert_eq!(blk.refresh_config().unwrap().writeback, Some(0));
    // Writethrough still writes.
    let data = pattern(6, 64 << 10);
    verified_io(&mut blk, 0, 0, 100, &data);
    let mut expected = zeros();
    patch(&mut expected, 100, &data);
    assert_bytes_eq(&b.disk_contents(), &expected, "writethrough data on disk");
    assert_ne!(set(&mut blk, 2), 0, "2 is not a cache mode");
    assert_eq!(blk.refresh_config().unwrap().writeback, Some(0));
    assert_eq!(set(&mut blk, 1), 0, "writeback accepted");
    assert_eq!(blk.refresh_config().unwrap().writeback, Some(1));
    verified_io(&mut blk, 0, 0, 300, &pattern(7, 4096));
}

#[test]
fn status_walk_reaches_driver_ok_and_features_ok_sticks() {
    let b = BlkBackend::start("status-walk", &zeros(), &[]);
    let mut s = b.builder().handshake().unwrap();
    assert!(s.negotiated().has_protocol(P::STATUS));
    assert_eq!(
        s.get_status().unwrap(),
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        "FEATURES_OK sticks after SET_FEATURES"
    );
    s.setup_queues().unwrap();
    // The device waits for DRIVER_OK: the status is unchanged by ring setup.
    assert_eq!(s.get_status().unwrap(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    s.driver_ok().unwrap();
    assert_eq!(
        s.get_status().unwrap(),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    let mut blk = BlkDriver::new(s, BlkOptions::default()).unwrap();
    verified_io(&mut blk, 0, 0, 0, &pattern(8, 4096));
    assert_eq!(
        blk.session().get_status().unwrap(),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
}

#[test]
fn rings_wait_for_driver_ok_when_the_status_is_negotiated() {
    let b = BlkBackend::start("wait-driver-ok", &zeros(), &[]);
    let mut s = b.builder().handshake().unwrap();
    s.setup_queues().unwrap();
    let mut blk = BlkDriver::new(s, BlkOptions::default()).unwrap();
    let q = blk.queue(0);
    q.slot_data(0).write_at(0, &pattern(9, 4096));
    q.submit(0, BlkRequest::write(16, 4096)).unwrap();
    q.kick().unwrap();
    let mut done = Vec::new();
    assert!(
        q.reap(WaitMode::Block(Duration::from_millis(300)), &mut done)
            .is_err(),
        "a request completed before DRIVER_OK: {done:?}"
    );
    blk.session().driver_ok().unwrap();
    let q = blk.queue(0);
    q.drain(&mut done).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, BlkStatus::Ok);
    assert_bytes_eq(&read_back(&mut blk, 0, 16, 4096), &pattern(9, 4096), "data");
}

#[test]
fn status_write_that_clears_bits_is_refused_with_reply_ack() {
    let b = BlkBackend::start("status-refused", &zeros(), &[]);
    let mut blk = b.connect();
    let all = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    let conn = blk.session().connection();
    conn.set_need_reply(true).unwrap();
    for (status, what) in [
        (ACKNOWLEDGE | DRIVER, "clears FEATURES_OK and DRIVER_OK"),
        (all & !DRIVER, "clears DRIVER"),
        (
            all | DEVICE_NEEDS_RESET,
            "sets the device's own NEEDS_RESET",
        ),
        (all | 0x20, "sets a reserved bit"),
    ] {
        let e = conn.set_status(status).unwrap_err();
        assert!(
            matches!(e, ConnectionError::Nack { .. }),
            "{what}: {status:#x} gave {e:?}"
        );
    }
    // A value that is not a byte.
    assert_refused(
        conn,
        code(FrontendReq::SET_STATUS),
        &0x10fu64.to_ne_bytes(),
        &[],
        "status 0x10f",
    );
    // Writing the same status again is not a change and is accepted.
    conn.set_status(all).unwrap();
    assert_eq!(conn.get_status().unwrap(), all);
    verified_io(&mut blk, 0, 0, 0, &pattern(11, 4096));
}

#[test]
fn set_status_zero_resets_the_device_until_it_is_set_up_again() {
    let b = BlkBackend::start("status-zero", &zeros(), &[]);
    // Without RESET_DEVICE the session resets with SET_STATUS(0).
    let protocol = outboard_frontend::device::default_protocol_features() - P::RESET_DEVICE;
    let mut blk = b.connect_with(b.builder().protocol_features(protocol));
    let data = pattern(12, 8192);
    verified_io(&mut blk, 0, 0, 40, &data);
    blk.session().set_status(0).unwrap();
    assert_eq!(blk.session().get_status().unwrap(), 0);
    // The reset device does not serve the ring any more.
    let q = blk.queue(0);
    q.submit(0, BlkRequest::read(40, 4096)).unwrap();
    q.kick().unwrap();
    let mut done = Vec::new();
    let r = q.reap(WaitMode::Block(Duration::from_millis(300)), &mut done);
    assert!(r.is_err(), "a reset device completed {done:?}");
    q.reset();
    blk.session().reinitialize().unwrap();
    assert_eq!(
        blk.session().get_status().unwrap(),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert_bytes_eq(
        &read_back(&mut blk, 0, 40, data.len()),
        &data,
        "after reset",
    );
    verified_io(&mut blk, 0, 0, 80, &pattern(13, 4096));
}

#[test]
fn reset_device_then_setup_again_serves_io_with_defaults_restored() {
    let b = BlkBackend::start("reset-device", &zeros(), &[]);
    let mut blk = b.connect();
    let data = pattern(14, 16 << 10);
    verified_io(&mut blk, 0, 0, 64, &data);
    let conn = blk.session().connection();
    let msg = config_msg(32, 1, &[0]);
    assert_accepted(
        conn,
        code(FrontendReq::SET_CONFIG),
        &msg,
        &[],
        "writethrough",
    );
    assert_eq!(blk.refresh_config().unwrap().writeback, Some(0));
    blk.session().reset_device().unwrap();
    assert_eq!(blk.session().get_status().unwrap(), 0, "status after reset");
    for q in blk.queues_mut() {
        q.reset();
    }
    blk.session().reinitialize().unwrap();
    assert_eq!(
        blk.refresh_config().unwrap().writeback,
        Some(1),
        "reset restores the configured cache mode"
    );
    assert_bytes_eq(
        &read_back(&mut blk, 0, 64, data.len()),
        &data,
        "after reset",
    );
    verified_io(&mut blk, 0, 0, 128, &pattern(15, 4096));
    // And once more through the driver's own helper.
    blk.reset().unwrap();
    verified_io(&mut blk, 0, 0, 256, &pattern(16, 4096));
}

/// A write request with every buffer in `hdr` (header at 0, status at 16) and `data`, built by
/// hand on queue 0's ring. Returns the status byte and the used length.
fn hand_made_request(
    blk: &mut BlkDriver,
    request_type: u32,
    sector: u64,
    hdr: &outboard_frontend::GuestBuf,
    data: &outboard_frontend::GuestBuf,
) -> (u8, u32) {
    hdr.write_at(0, &request_type.to_le_bytes());
    hdr.write_at(4, &[0; 4]);
    hdr.write_u64(8, sector);
    hdr.write_at(16, &[0xff]);
    let data_seg = if request_type == VIRTIO_BLK_T_IN {
        Segment::writable(data)
    } else {
        Segment::readable(data)
    };
    let dq = blk.queue(0).driver_queue_mut();
    dq.submit(&[
        Segment::readable_part(hdr, 0, 16),
        data_seg,
        Segment::writable_part(hdr, 16, 1),
    ])
    .unwrap();
    let mut used = Vec::new();
    dq.wait_used(IO_TIMEOUT, &mut used).unwrap();
    assert_eq!(used.len(), 1);
    (hdr.read_u8(16), used[0].len)
}

#[test]
fn hot_added_memory_carries_io_and_its_removal_leaves_the_rest_working() {
    let b = BlkBackend::start("hotplug", &zeros(), &[]);
    let mut blk = b.connect();
    let s = blk.session();
    // As QEMU does: wait for the backend to have mapped a region before the guest uses it.
    s.connection().set_need_reply(true).unwrap();
    assert!(s.negotiated().has_protocol(P::CONFIGURE_MEM_SLOTS));
    assert_eq!(s.negotiated().max_mem_slots, Some(32));
    let added = s.add_mem_region(2 << 20).unwrap();
    let ram = s.ram_mut();
    let hdr = ram.alloc_in(added, 32, 32).unwrap();
    let data = ram.alloc_in(added, 8192, 4096).unwrap();
    let primary = ram.primary().unwrap();
    let low_hdr = ram.alloc_in(primary, 32, 32).unwrap();
    assert!(hdr.gpa() >= 2 << 20, "the new region lies above the first");
    // A write and a read with every buffer in the new region.
    data.write_at(0, &pattern(17, 8192));
    assert_eq!(
        hand_made_request(&mut blk, VIRTIO_BLK_T_OUT, 48, &hdr, &data),
        (0, 1)
    );
    assert_bytes_eq(
        &read_back(&mut blk, 0, 48, 8192),
        &pattern(17, 8192),
        "write",
    );
    verified_io(&mut blk, 0, 0, 64, &pattern(18, 8192));
    data.fill(0, 8192, 0);
    assert_eq!(
        hand_made_request(&mut blk, VIRTIO_BLK_T_IN, 64, &hdr, &data),
        (0, 8193)
    );
    let mut got = vec![0; 8192];
    data.read_at(0, &mut got);
    assert_bytes_eq(&got, &pattern(18, 8192), "read into the new region");
    // A region overlapping one in the table is refused, in GPA or in frontend-address space.
    let info = blk.session().ram().region_info(added).unwrap();
    let fd = info.mmap_handle;
    let (gpa, size, uaddr) = (info.guest_phys_addr, info.memory_size, info.userspace_addr);
    let conn = blk.session().connection();
    let add = code(FrontendReq::ADD_MEM_REG);
    for (r, what) in [
        (region(gpa, size / 2, uaddr, 0), "its first half"),
        (region(gpa + 4096, 4096, 1 << 46, 0), "inside its GPA range"),
        (
            region(1 << 40, 4096, uaddr + 8192, 0),
            "inside its user addresses",
        ),
        (
            region(0, 4096, 1 << 46, 0),
            "inside the first region's GPAs",
        ),
    ] {
        assert_refused(conn, add, &single_region(&r), &[fd], what);
    }
    // Removal: I/O goes on in the first region; a buffer in the removed one is an error.
    blk.session().remove_mem_region(added).unwrap();
    verified_io(&mut blk, 0, 0, 96, &pattern(19, 4096));
    assert_eq!(
        hand_made_request(&mut blk, VIRTIO_BLK_T_OUT, 128, &low_hdr, &data),
        (1, 1),
        "IOERR for data in a removed region"
    );
    assert_bytes_eq(
        &read_back(&mut blk, 0, 128, 4096),
        &[0; 4096],
        "not written",
    );
    // The slot is free again: a new region may be added.
    let again = blk.session().add_mem_region(1 << 20).unwrap();
    let hdr2 = blk.session().ram_mut().alloc_in(again, 32, 32).unwrap();
    let data2 = blk.session().ram_mut().alloc_in(again, 4096, 4096).unwrap();
    data2.write_at(0, &pattern(20, 4096));
    assert_eq!(
        hand_made_request(&mut blk, VIRTIO_BLK_T_OUT, 160, &hdr2, &data2),
        (0, 1)
    );
    assert_bytes_eq(
        &read_back(&mut blk, 0, 160, 4096),
        &pattern(20, 4096),
        "new",
    );
}

#[test]
fn regions_hot_added_below_earlier_ones_carry_io() {
    let b = BlkBackend::start("hotplug-order", &zeros(), &[]);
    let mut blk = b.connect();
    blk.session().connection().set_need_reply(true).unwrap();
    let ram = blk.session().ram_mut();
    let low = ram.add_region(2 << 20).unwrap();
    let high = ram.add_region(2 << 20).unwrap();
    // Announced in descending GPA order: the backend's table is not sorted by address.
    for id in [high, low] {
        let info = blk.session().ram().region_info(id).unwrap();
        let r = region(
            info.guest_phys_addr,
            info.memory_size,
            info.userspace_addr,
            info.mmap_offset,
        );
        let conn = blk.session().connection();
        let add = code(FrontendReq::ADD_MEM_REG);
        assert_accepted(conn, add, &single_region(&r), &[info.mmap_handle], "region");
    }
    for (i, id) in [low, high].into_iter().enumerate() {
        let ram = blk.session().ram_mut();
        let hdr = ram.alloc_in(id, 32, 32).unwrap();
        let data = ram.alloc_in(id, 4096, 4096).unwrap();
        let sector = 64 * i as u64;
        data.write_at(0, &pattern(40 + i as u64, 4096));
        assert_eq!(
            hand_made_request(&mut blk, VIRTIO_BLK_T_OUT, sector, &hdr, &data),
            (0, 1),
            "write from region {i}"
        );
        let got = read_back(&mut blk, 0, sector, 4096);
        assert_bytes_eq(&got, &pattern(40 + i as u64, 4096), "data");
    }
}

#[test]
fn set_mem_table_with_requests_in_flight_keeps_their_data_intact() {
    let b = BlkBackend::start("remap", &zeros(), &[]);
    let mut blk = b.connect();
    blk.session().connection().set_need_reply(true).unwrap();
    for round in 0..4u64 {
        let q = blk.queue(0);
        for slot in 0..32u16 {
            let seed = 500 + round * 32 + u64::from(slot);
            q.slot_data(slot).write_at(0, &pattern(seed, 64 << 10));
            q.submit(slot, BlkRequest::write(u64::from(slot) * 128, 64 << 10))
                .unwrap();
        }
        q.kick().unwrap();
        // QEMU resends the table whenever guest memory changes; here it is the same table.
        blk.session().set_mem_table().unwrap();
        let mut done = Vec::new();
        blk.queue(0).drain(&mut done).unwrap();
        assert_eq!(done.len(), 32);
        assert!(done.iter().all(|c| c.status == BlkStatus::Ok), "{done:?}");
        for slot in 0..32u16 {
            let want = pattern(500 + round * 32 + u64::from(slot), 64 << 10);
            let got = read_back(&mut blk, 0, u64::from(slot) * 128, want.len());
            assert_bytes_eq(&got, &want, "a write across SET_MEM_TABLE");
        }
    }
}

#[test]
fn disabling_a_ring_stops_it_after_its_requests_and_enabling_resumes_it() {
    let b = BlkBackend::start("enable", &zeros(), &["--num-queues", "2"]);
    let mut blk = b.connect_with(b.builder().queues(2));
    blk.session().connection().set_need_reply(true).unwrap();
    blk.session().enable_queue(1, false).unwrap();
    // Queue 0 goes on while queue 1 is disabled.
    verified_io(&mut blk, 0, 0, 0, &pattern(45, 4096));
    let q = blk.queue(1);
    q.slot_data(0).write_at(0, &pattern(46, 4096));
    q.submit(0, BlkRequest::write(64, 4096)).unwrap();
    q.kick().unwrap();
    let mut done = Vec::new();
    let r = q.reap(WaitMode::Block(Duration::from_millis(200)), &mut done);
    assert!(r.is_err(), "a disabled ring was served: {done:?}");
    blk.session().enable_queue(1, true).unwrap();
    blk.queue(1).drain(&mut done).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, BlkStatus::Ok);
    assert_bytes_eq(
        &read_back(&mut blk, 0, 64, 4096),
        &pattern(46, 4096),
        "data",
    );
}

#[test]
fn second_frontend_reads_what_the_first_wrote_after_a_clean_disconnect() {
    let b = BlkBackend::start("reconnect", &zeros(), &["--num-queues", "2"]);
    let mut first = b.connect_with(b.builder().queues(2));
    let a = pattern(21, 64 << 10);
    let c = pattern(22, 4096);
    verified_io(&mut first, 0, 1, 0, &a);
    verified_io(&mut first, 1, 0, 2000, &c);
    let bases = first.disconnect().unwrap();
    // Queue 0 served a write split in one request and a read; queue 1 a write and a read.
    assert_eq!(bases, vec![Some(2), Some(2)]);
    let mut second = b.connect_with(b.builder().queues(2));
    assert_bytes_eq(&read_back(&mut second, 1, 0, a.len()), &a, "first write");
    assert_bytes_eq(&read_back(&mut second, 0, 2000, c.len()), &c, "second");
    verified_io(&mut second, 0, 1, 4000, &pattern(23, 4096));
    // The same frontend reconnecting resumes its rings where they were.
    second.reconnect().unwrap();
    verified_io(&mut second, 1, 0, 4100, &pattern(24, 4096));
}

#[test]
fn second_frontend_reads_what_the_first_wrote_after_it_vanished_mid_io() {
    let b = BlkBackend::start("abrupt", &zeros(), &[]);
    let mut first = b.connect();
    let a = pattern(25, 32 << 10);
    verified_io(&mut first, 0, 0, 0, &a);
    // 32 writes of 64 KiB in flight, then the connection is gone.
    let q = first.queue(0);
    for slot in 0..32u16 {
        q.slot_data(slot)
            .write_at(0, &pattern(300 + u64::from(slot), 64 << 10));
        let sector = 1024 + u64::from(slot) * 128;
        q.submit(slot, BlkRequest::write(sector, 64 << 10)).unwrap();
    }
    q.kick().unwrap();
    first.session().connection().shutdown();
    // The backend serves one frontend at a time: this setup completes only once the first
    // session is over (its requests drained, the device reset).
    let mut second = b.connect();
    assert_bytes_eq(&read_back(&mut second, 0, 0, a.len()), &a, "before");
    // Whatever the device completed for the first frontend is complete and on disk.
    let mut done: Vec<BlkCompletion> = Vec::new();
    let _ = first.queue(0).reap(WaitMode::NoWait, &mut done);
    eprintln!(
        "{} of 32 writes completed before the disconnect",
        done.len()
    );
    for c in &done {
        assert_eq!(c.status, BlkStatus::Ok, "slot {}", c.slot);
        let sector = 1024 + u64::from(c.slot) * 128;
        let want = pattern(300 + u64::from(c.slot), 64 << 10);
        let got = read_back(&mut second, 0, sector, want.len());
        assert_bytes_eq(&got, &want, "a completed write");
    }
    verified_io(&mut second, 0, 0, 8000, &pattern(26, 4096));
}

#[test]
fn get_vring_base_completes_requests_in_flight_and_returns_the_next_avail_index() {
    let b = BlkBackend::start("vring-base", &zeros(), &[]);
    let mut blk = b.connect();
    let q = blk.queue(0);
    for slot in 0..32u16 {
        q.slot_data(slot)
            .write_at(0, &pattern(400 + u64::from(slot), 16 << 10));
        let sector = u64::from(slot) * 32;
        q.submit(slot, BlkRequest::write(sector, 16 << 10)).unwrap();
    }
    q.kick().unwrap();
    let base = blk.session().stop_queue(0).unwrap();
    assert!(base <= 32, "base {base}");
    // Every request the device took is complete by the time GET_VRING_BASE answers.
    let q = blk.queue(0);
    assert_eq!(q.driver_queue().used_idx(), base as u16, "used index");
    let mut done = Vec::new();
    q.reap(WaitMode::NoWait, &mut done).unwrap();
    assert_eq!(done.len(), base as usize);
    assert!(done.iter().all(|c| c.status == BlkStatus::Ok), "{done:?}");
    // Restarted at that index, the device serves the rest exactly once.
    blk.session().start_queue(0, base as u16).unwrap();
    let q = blk.queue(0);
    q.drain(&mut done).unwrap();
    assert_eq!(done.len(), 32);
    assert_eq!(q.driver_queue().used_idx(), 32);
    for slot in 0..32u16 {
        let want = pattern(400 + u64::from(slot), 16 << 10);
        let got = read_back(&mut blk, 0, u64::from(slot) * 32, want.len());
        assert_bytes_eq(&got, &want, "slot data");
    }
    // 32 writes and 32 reads.
    assert_eq!(blk.session().stop_queue(0).unwrap(), 64);
    assert_eq!(blk.session().stop_queue(0).unwrap(), 64, "a stopped ring");
}

#[test]
fn read_only_device_offers_ro_and_fails_writes_with_ioerr() {
    let initial = pattern(30, DISK);
    let b = BlkBackend::start("read-only", &initial, &["--read-only"]);
    let mut blk = b.connect();
    let n = *blk.session().negotiated();
    assert_ne!(n.features_offered & (1 << VIRTIO_BLK_F_RO), 0, "RO offered");
    assert_ne!(n.features_acked & (1 << VIRTIO_BLK_F_RO), 0, "RO acked");
    for f in [VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES] {
        assert_eq!(n.features_offered & (1 << f), 0, "feature {f} writes");
    }
    let q = blk.queue(0);
    assert_eq!(q.write(0, &pattern(31, 4096)).unwrap(), BlkStatus::IoErr);
    let r = [BlkRange {
        sector: 0,
        num_sectors: 8,
    }];
    assert_eq!(q.discard(&r).unwrap(), BlkStatus::Unsupp);
    assert_eq!(q.write_zeroes(&r, false).unwrap(), BlkStatus::Unsupp);
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
    assert_bytes_eq(
        &read_back(&mut blk, 0, 0, 64 << 10),
        &initial[..64 << 10],
        "read",
    );
    assert_bytes_eq(&b.disk_contents(), &initial, "image file untouched");
}

#[test]
fn null_disk_reads_zeros_and_accepts_writes() {
    let b = BlkBackend::start_null("null", 64 << 20, &["--num-queues", "2"]);
    let mut blk = b.connect_with(b.builder().queues(2));
    assert_eq!(blk.config().capacity_bytes(), 64 << 20);
    let q = blk.queue(1);
    assert_eq!(q.write(0, &pattern(32, 8192)).unwrap(), BlkStatus::Ok);
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
    let mut back = vec![0xaa; 8192];
    assert_eq!(q.read(0, &mut back).unwrap(), BlkStatus::Ok);
    assert!(back.iter().all(|&x| x == 0), "null reads zeros");
}
