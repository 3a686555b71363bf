//! A hostile frontend against `vhost-user-blk`: malformed descriptor chains, rings and vhost-user
//! messages, each answered as the specifications say (an IOERR or UNSUPP status byte, a used
//! entry of length zero when there is no status byte to write, DEVICE_NEEDS_RESET, a failed
//! REPLY_ACK, a zero-sized GET_CONFIG reply) or with a clean disconnect, and never with a crash,
//! a write outside the request's writable buffers, or a change to the disk.
//!
//! After every case, `Hostile::done` (tests/common/hostile.rs) checks the guest RAM canary, the
//! case's own session, the process, a fresh frontend's verified I/O, and the image file.

mod common;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use common::blk::{
    assert_accepted, assert_refused, config_msg, mem_table, pattern, region, reply_ack,
    single_region, vring_addr, vring_state, IO_TIMEOUT, SECTOR,
};
use common::hostile::*;
use outboard_frontend::queue::{DriverQueue, QueueConfig, RingAddressing, VringSetup};
use outboard_frontend::raw::{FLAG_NEED_REPLY, FLAG_REPLY, VERSION};
use outboard_frontend::{Connection, GuestBuf, GuestRam, NotifyMode, Segment};
use vhost::vhost_user::message::{FrontendReq as R, VhostUserProtocolFeatures as P};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn code(r: R) -> u32 {
    r as u32
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

fn memfd(size: u64) -> std::fs::File {
    let fd =
        nix::sys::memfd::memfd_create(c"hostile", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let f = std::fs::File::from(fd);
    f.set_len(size).unwrap();
    f
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().unwrap()
}

/// Whether the device writes the data buffer of this request type.
fn device_writes(request_type: u32) -> bool {
    matches!(request_type, T_IN | T_GET_ID)
}

/// A header, one data buffer in the direction the type needs, and a status byte.
fn request(g: &mut Guest, request_type: u32, sector: u64, data: Desc) -> Vec<Desc> {
    g.header(HDR, request_type, sector);
    let st = g.status(STATUS);
    linked(&[r(gpa(HDR), 16), data, w(st, 1)])
}

/// A buffer at `addr` of `len` bytes in the direction `request_type` needs.
fn data(request_type: u32, addr: u64, len: u32) -> Desc {
    if device_writes(request_type) {
        w(addr, len)
    } else {
        r(addr, len)
    }
}

// ---------------------------------------------------------------------------------------------
// Descriptor chains
// ---------------------------------------------------------------------------------------------

#[test]
fn buffers_outside_guest_memory_get_ioerr_and_nothing_is_written() {
    let mut h = Hostile::start("outside", &[]);
    let ram = RAM as u64;
    for (case, t, addr, len) in [
        ("a read into a buffer 1 TiB up", T_IN, OUTSIDE, 4096),
        ("a write from a buffer 1 TiB up", T_OUT, OUTSIDE, 4096),
        ("a read into the first byte past RAM", T_IN, ram, 512),
        ("a write from the first byte past RAM", T_OUT, ram, 512),
        (
            "a read at the top of the address space",
            T_IN,
            u64::MAX - 511,
            512,
        ),
        (
            "a write whose buffer end overflows",
            T_OUT,
            u64::MAX - 100,
            4096,
        ),
        ("a GET_ID into a buffer outside RAM", T_GET_ID, OUTSIDE, 20),
    ] {
        let mut g = h.guest();
        let chain = request(&mut g, t, 8, data(t, addr, len));
        g.expect_status(&chain, STATUS, S_IOERR, case);
        h.done(g, case, After::Serves);
    }

    let case = "a header outside RAM";
    let mut g = h.guest();
    let st = g.status(STATUS);
    g.expect_status(&linked(&[r(OUTSIDE, 16), w(st, 1)]), STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    let case = "discard ranges outside RAM";
    let mut g = h.guest();
    let chain = request(&mut g, T_DISCARD, 0, r(OUTSIDE, 16));
    g.expect_status(&chain, STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    // No status byte the device may write: the chain comes back unanswered, and the read's
    // data buffer is not written either.
    for (case, status) in [
        ("a status byte outside RAM", w(OUTSIDE, 1)),
        (
            "a status descriptor straddling the end of RAM",
            w(ram - 1, 2),
        ),
        ("a status descriptor whose end overflows", w(u64::MAX, 2)),
    ] {
        let mut g = h.guest();
        g.header(HDR, T_IN, 0);
        let chain = linked(&[r(gpa(HDR), 16), w(gpa(DATA), 4096), status]);
        g.expect_unanswered(&chain, case);
        h.done(g, case, After::Serves);
    }
}

#[test]
fn descriptor_loops_and_chains_longer_than_the_ring_are_refused() {
    let mut h = Hostile::start("loops", &[]);

    let case = "a descriptor whose next is itself";
    let mut g = h.guest();
    g.header(HDR, T_FLUSH, 0);
    let mut d = r(gpa(HDR), 16);
    d.next = Next::To(0);
    g.expect_unanswered(&[d], case);
    h.done(g, case, After::Serves);

    let case = "a status descriptor pointing back to the header";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    let st = g.status(STATUS);
    let mut chain = linked(&[r(gpa(HDR), 16), w(st, 1)]);
    chain[1].next = Next::To(0);
    g.expect_status(&chain, STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    let case = "a loop through every descriptor of the ring";
    let mut g = h.guest();
    let size = usize::from(g.blk.queue(0).driver_queue().size());
    g.header(HDR, T_OUT, 0);
    let st = g.status(STATUS);
    let mut chain = vec![r(gpa(HDR), 16)];
    chain.extend((0..size - 2).map(|_| r(gpa(DATA), 512)));
    chain.push(w(st, 1));
    let mut chain = linked(&chain);
    chain[size - 1].next = Next::To(0);
    g.expect_status(&chain, STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    let case = "a loop among a write's data descriptors, without a status";
    let mut g = h.guest();
    g.header(HDR, T_OUT, 0);
    let mut chain = linked(&[r(gpa(HDR), 16), r(gpa(DATA), 512), r(gpa(DATA), 512)]);
    chain[2].next = Next::To(1);
    g.expect_unanswered(&chain, case);
    h.done(g, case, After::Serves);

    let case = "a next index beyond the ring";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    let st = g.status(STATUS);
    let mut chain = linked(&[r(gpa(HDR), 16), w(st, 1)]);
    chain[1].next = Next::Raw(size as u16);
    g.expect_status(&chain, STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    let case = "a header whose next index is 0xffff";
    let mut g = h.guest();
    g.header(HDR, T_FLUSH, 0);
    let mut d = r(gpa(HDR), 16);
    d.next = Next::Raw(u16::MAX);
    g.expect_unanswered(&[d], case);
    h.done(g, case, After::Serves);

    let case = "a chain longer than 4 GiB";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    let st = g.status(STATUS);
    let chain = linked(&[r(gpa(HDR), 16), w(st, 1), r(gpa(DATA), u32::MAX)]);
    g.expect_status(&chain, STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);
}

fn indirect(off: usize, len: u32) -> Desc {
    Desc {
        addr: gpa(off),
        len,
        flags: INDIRECT,
        next: Next::End,
    }
}

#[test]
fn malformed_indirect_tables_are_refused() {
    let mut h = Hostile::start("indirect", &[]);

    // First a well-formed table, to show the way works.
    let case = "a well-formed indirect table";
    let mut g = h.guest();
    g.header(HDR, T_IN, 16);
    let st = g.status(STATUS);
    g.allow(DATA, 4096);
    let len = g.table(
        TABLE,
        &linked(&[r(gpa(HDR), 16), w(gpa(DATA), 4096), w(st, 1)]),
    );
    let used = g.expect_status(&[indirect(TABLE, len)], STATUS, S_OK, case);
    assert_eq!(used.len, 4097, "{case}: used length");
    let want = &h.expected()[16 * SECTOR..16 * SECTOR + 4096];
    assert_eq!(g.bytes(DATA, 4096), want, "{case}: data read");
    h.done(g, case, After::Serves);

    let case = "an indirect descriptor inside an indirect table";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    let st = g.status(STATUS);
    g.table(TABLE2, &linked(&[w(gpa(DATA), 4096)]));
    let len = g.table(
        TABLE,
        &linked(&[r(gpa(HDR), 16), w(st, 1), indirect(TABLE2, 16)]),
    );
    g.expect_status(&[indirect(TABLE, len)], STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    let case = "an indirect table holding only an indirect descriptor";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    // The inner table is well formed, but the device must not follow it: its status byte
    // stays unwritten.
    let inner = g.table(
        TABLE2,
        &linked(&[r(gpa(HDR), 16), w(gpa(DATA), 4096), w(gpa(STATUS), 1)]),
    );
    let len = g.table(TABLE, &[indirect(TABLE2, inner)]);
    g.expect_unanswered(&[indirect(TABLE, len)], case);
    h.done(g, case, After::Serves);

    for (case, table_len) in [
        ("an indirect table whose length is not a multiple of 16", 40),
        ("an indirect table of length zero", 0),
        ("an indirect table of 4 GiB - 16", u32::MAX - 15),
    ] {
        let mut g = h.guest();
        g.header(HDR, T_IN, 0);
        g.put(STATUS, &[UNWRITTEN]);
        g.table(
            TABLE,
            &linked(&[r(gpa(HDR), 16), w(gpa(DATA), 4096), w(gpa(STATUS), 1)]),
        );
        g.expect_unanswered(&[indirect(TABLE, table_len)], case);
        h.done(g, case, After::Serves);
    }

    let case = "a loop inside an indirect table";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    let st = g.status(STATUS);
    let mut table = linked(&[r(gpa(HDR), 16), w(st, 1)]);
    table[1].next = Next::To(0);
    let len = g.table(TABLE, &table);
    g.expect_status(&[indirect(TABLE, len)], STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    let case = "a next index leaving the indirect table";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    let st = g.status(STATUS);
    let mut table = linked(&[r(gpa(HDR), 16), w(st, 1)]);
    table[1].next = Next::Raw(7);
    let len = g.table(TABLE, &table);
    g.expect_status(&[indirect(TABLE, len)], STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    let case = "an indirect table outside RAM";
    let mut g = h.guest();
    let head = Desc {
        addr: OUTSIDE,
        len: 48,
        flags: INDIRECT,
        next: Next::End,
    };
    g.expect_unanswered(&[head], case);
    h.done(g, case, After::Serves);

    let case = "an indirect table running past the end of RAM";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    let st = g.status(STATUS);
    // Two entries in RAM; the second points on to a third beyond its end.
    let at = CANARY_LEN - 32;
    let mut table = linked(&[r(gpa(HDR), 16), w(st, 1)]);
    table[1].next = Next::To(2);
    g.table(at, &table);
    g.expect_status(&[indirect(at, 48)], STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    // seg_max is 254: an indirect table can carry more data segments than that.
    for (case, segments, status) in [
        ("254 data segments, the limit", 254, S_OK),
        ("255 data segments, one above seg_max", 255, S_IOERR),
        ("300 data segments", 300, S_IOERR),
    ] {
        let mut g = h.guest();
        g.header(HDR, T_IN, 0);
        let st = g.status(STATUS);
        let mut table = vec![r(gpa(HDR), 16)];
        for i in 0..segments {
            table.push(w(gpa(DATA + i * SECTOR), SECTOR as u32));
        }
        table.push(w(st, 1));
        if status == S_OK {
            g.allow(DATA, segments * SECTOR);
        }
        let len = g.table(TABLE, &linked(&table));
        let used = g.expect_status(&[indirect(TABLE, len)], STATUS, status, case);
        if status == S_OK {
            assert_eq!(
                used.len as usize,
                segments * SECTOR + 1,
                "{case}: used length"
            );
            let want = &h.expected()[..segments * SECTOR];
            assert_eq!(g.bytes(DATA, segments * SECTOR), want, "{case}: data");
        }
        h.done(g, case, After::Serves);
    }
}

#[test]
fn zero_length_buffers_are_skipped_and_never_written_through() {
    let mut h = Hostile::start("zero-length", &[]);

    let case = "a read with a zero-length data buffer";
    let mut g = h.guest();
    let chain = request(&mut g, T_IN, 0, w(gpa(DATA), 0));
    let used = g.expect_status(&chain, STATUS, S_OK, case);
    assert_eq!(used.len, 1, "{case}: the status byte alone");
    h.done(g, case, After::Serves);

    let case = "a write with a zero-length data buffer";
    let mut g = h.guest();
    let chain = request(&mut g, T_OUT, 0, r(gpa(DATA), 0));
    let used = g.expect_status(&chain, STATUS, S_OK, case);
    assert_eq!(used.len, 1, "{case}: the status byte alone");
    h.done(g, case, After::Serves);

    let case = "a flush whose header is split around a zero-length descriptor";
    let mut g = h.guest();
    g.header(HDR, T_FLUSH, 0);
    let st = g.status(STATUS);
    let chain = linked(&[
        r(gpa(DATA), 0),
        r(gpa(HDR), 8),
        r(gpa(DATA), 0),
        r(gpa(HDR + 8), 8),
        w(st, 1),
    ]);
    let used = g.expect_status(&chain, STATUS, S_OK, case);
    assert_eq!(used.len, 1, "{case}: the status byte alone");
    h.done(g, case, After::Serves);

    // The status is the last byte of the last non-empty device-writable buffer: here the
    // read's data buffer, which is then a byte short of a sector.
    let case = "a read whose status descriptor is empty";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    g.put(STATUS, &[UNWRITTEN]);
    g.allow(DATA + 4095, 1);
    let chain = linked(&[r(gpa(HDR), 16), w(gpa(DATA), 4096), w(gpa(STATUS), 0)]);
    g.expect_status(&chain, DATA + 4095, S_IOERR, case);
    h.done(g, case, After::Serves);

    let case = "a request made only of empty descriptors";
    let mut g = h.guest();
    g.header(HDR, T_FLUSH, 0);
    g.put(STATUS, &[UNWRITTEN]);
    let chain = linked(&[r(gpa(HDR), 0), w(gpa(DATA), 0), w(gpa(STATUS), 0)]);
    g.expect_unanswered(&chain, case);
    h.done(g, case, After::Serves);
}

#[test]
fn oversized_buffers_and_buffers_crossing_the_end_of_memory_get_ioerr() {
    let mut h = Hostile::start("oversized", &[]);
    let end = CANARY_LEN - 2048;
    for (case, t, d) in [
        (
            "a read into 4 GiB - 512 bytes",
            T_IN,
            w(gpa(DATA), 0xffff_fe00),
        ),
        (
            "a write of 4 GiB - 512 bytes",
            T_OUT,
            r(gpa(DATA), 0xffff_fe00),
        ),
        ("a read crossing the end of RAM", T_IN, w(gpa(end), 4096)),
        ("a write crossing the end of RAM", T_OUT, r(gpa(end), 4096)),
        (
            "a read of 2 MiB in one segment",
            T_IN,
            w(gpa(DATA), 2 << 20),
        ),
        (
            "a GET_ID buffer crossing the end of RAM",
            T_GET_ID,
            w(gpa(CANARY_LEN - 10), 20),
        ),
    ] {
        let mut g = h.guest();
        let chain = request(&mut g, t, 0, d);
        g.expect_status(&chain, STATUS, S_IOERR, case);
        h.done(g, case, After::Serves);
    }

    let case = "a read of more data than the disk holds";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    let st = g.status(STATUS);
    let mut chain = vec![r(gpa(HDR), 16)];
    // Five segments of 1 MiB over the same buffer: 5 MiB on a 4 MiB disk.
    chain.extend((0..5).map(|_| w(gpa(DATA), 1 << 20)));
    chain.push(w(st, 1));
    g.expect_status(&linked(&chain), STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    let case = "a header crossing the end of RAM";
    let mut g = h.guest();
    g.header(CANARY_LEN - 16, T_IN, 0);
    let st = g.status(STATUS);
    let chain = linked(&[r(gpa(CANARY_LEN - 8), 16), w(gpa(DATA), 512), w(st, 1)]);
    g.expect_status(&chain, STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);
}

#[test]
fn buffers_in_the_wrong_direction_are_refused() {
    let mut h = Hostile::start("direction", &[]);

    let case = "a device-writable header";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    let st = g.status(STATUS);
    let chain = linked(&[w(gpa(HDR), 16), w(gpa(DATA), 4096), w(st, 1)]);
    g.expect_status(&chain, STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    let case = "a write whose status byte is device-readable";
    let mut g = h.guest();
    g.header(HDR, T_OUT, 0);
    g.put(STATUS, &[UNWRITTEN]);
    let chain = linked(&[r(gpa(HDR), 16), r(gpa(DATA), 4096), r(gpa(STATUS), 1)]);
    g.expect_unanswered(&chain, case);
    h.done(g, case, After::Serves);

    // The device-writable data buffer holds the status: the chain is refused there.
    let case = "a read whose status byte is device-readable";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    g.put(STATUS, &[UNWRITTEN]);
    g.allow(DATA + 4095, 1);
    let chain = linked(&[r(gpa(HDR), 16), w(gpa(DATA), 4096), r(gpa(STATUS), 1)]);
    g.expect_status(&chain, DATA + 4095, S_IOERR, case);
    h.done(g, case, After::Serves);

    for (case, t, d) in [
        (
            "a read into a device-readable buffer",
            T_IN,
            r(gpa(DATA), 4096),
        ),
        (
            "a write from a device-writable buffer",
            T_OUT,
            w(gpa(DATA), 4096),
        ),
        (
            "a flush with a device-writable buffer",
            T_FLUSH,
            w(gpa(DATA), 512),
        ),
        (
            "a flush with a device-readable buffer",
            T_FLUSH,
            r(gpa(DATA), 512),
        ),
        (
            "a GET_ID with a device-readable buffer",
            T_GET_ID,
            r(gpa(DATA), 20),
        ),
        (
            "a discard with device-writable ranges",
            T_DISCARD,
            w(gpa(RANGES), 16),
        ),
    ] {
        let mut g = h.guest();
        let chain = request(&mut g, t, 0, d);
        g.expect_status(&chain, STATUS, S_IOERR, case);
        h.done(g, case, After::Serves);
    }

    let case = "a device-readable buffer after the status";
    let mut g = h.guest();
    g.header(HDR, T_OUT, 0);
    let st = g.status(STATUS);
    let chain = linked(&[r(gpa(HDR), 16), w(st, 1), r(gpa(DATA), 4096)]);
    g.expect_status(&chain, STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);
}

#[test]
fn requests_without_a_status_byte_are_returned_unanswered() {
    let mut h = Hostile::start("no-status", &[]);
    for (case, t, chain) in [
        (
            "a write without a status descriptor",
            T_OUT,
            vec![r(gpa(HDR), 16), r(gpa(DATA), 4096)],
        ),
        (
            "a flush that is only a header",
            T_FLUSH,
            vec![r(gpa(HDR), 16)],
        ),
        ("a 15-byte header alone", T_FLUSH, vec![r(gpa(HDR), 15)]),
    ] {
        let mut g = h.guest();
        g.header(HDR, t, 0);
        g.expect_unanswered(&linked(&chain), case);
        h.done(g, case, After::Serves);
    }

    let case = "a header of 15 bytes";
    let mut g = h.guest();
    g.header(HDR, T_FLUSH, 0);
    let st = g.status(STATUS);
    g.expect_status(&linked(&[r(gpa(HDR), 15), w(st, 1)]), STATUS, S_IOERR, case);
    h.done(g, case, After::Serves);

    // Without a status descriptor, the status is the data buffer's last byte.
    let case = "a read without a status descriptor";
    let mut g = h.guest();
    g.header(HDR, T_IN, 0);
    g.allow(DATA + 4095, 1);
    let chain = linked(&[r(gpa(HDR), 16), w(gpa(DATA), 4096)]);
    g.expect_status(&chain, DATA + 4095, S_IOERR, case);
    h.done(g, case, After::Serves);
}

#[test]
fn sectors_past_the_end_and_overflowing_get_ioerr_and_leave_the_disk_alone() {
    let mut h = Hostile::start("sectors", &[]);
    for (case, t, sector, len) in [
        ("a read at the capacity", T_IN, CAPACITY, 512),
        (
            "a read ending a sector past the capacity",
            T_IN,
            CAPACITY - 7,
            4096,
        ),
        (
            "a write ending a sector past the capacity",
            T_OUT,
            CAPACITY - 7,
            4096,
        ),
        ("a read at sector 2^64-1", T_IN, u64::MAX, 512),
        (
            "a write whose last sector overflows",
            T_OUT,
            u64::MAX - 7,
            4096,
        ),
        (
            "a read whose byte offset overflows",
            T_IN,
            u64::MAX / 512 + 1,
            512,
        ),
        ("a write of 513 bytes", T_OUT, 0, 513),
        ("a read of 100 bytes", T_IN, 0, 100),
    ] {
        let mut g = h.guest();
        let chain = request(&mut g, t, sector, data(t, gpa(DATA), len));
        g.expect_status(&chain, STATUS, S_IOERR, case);
        h.done(g, case, After::Serves);
    }

    let many: Vec<(u64, u32, u32)> = (0..33).map(|i| (i * 8, 8, 0)).collect();
    for (case, t, ranges, status) in [
        (
            "a discard past the capacity",
            T_DISCARD,
            vec![(CAPACITY - 1, 2, 0)],
            S_IOERR,
        ),
        (
            "a write-zeroes at sector 2^64-1",
            T_WRITE_ZEROES,
            vec![(u64::MAX, 1, 0)],
            S_IOERR,
        ),
        (
            "a discard whose range overflows",
            T_DISCARD,
            vec![(u64::MAX - 1, 4, 0)],
            S_IOERR,
        ),
        (
            "a write-zeroes range above max_write_zeroes_sectors",
            T_WRITE_ZEROES,
            vec![(0, (1 << 22) + 1, 0)],
            S_IOERR,
        ),
        (
            "a valid write-zeroes range followed by one past the capacity",
            T_WRITE_ZEROES,
            vec![(0, 8, 0), (CAPACITY, 8, 0)],
            S_IOERR,
        ),
        (
            "33 discard ranges, above max_discard_seg",
            T_DISCARD,
            many,
            S_IOERR,
        ),
        (
            "a discard with the unmap flag",
            T_DISCARD,
            vec![(0, 8, 1)],
            S_UNSUPP,
        ),
        (
            "a write-zeroes with an unknown flag",
            T_WRITE_ZEROES,
            vec![(0, 8, 2)],
            S_UNSUPP,
        ),
    ] {
        let mut g = h.guest();
        let len = g.ranges(RANGES, &ranges);
        let chain = request(&mut g, t, 0, r(gpa(RANGES), len));
        g.expect_status(&chain, STATUS, status, case);
        h.done(g, case, After::Serves);
    }

    for (case, t, d, status) in [
        (
            "a discard payload of 24 bytes",
            T_DISCARD,
            r(gpa(RANGES), 24),
            S_IOERR,
        ),
        (
            "a discard without ranges",
            T_DISCARD,
            r(gpa(RANGES), 0),
            S_IOERR,
        ),
        (
            "a GET_ID buffer of 19 bytes",
            T_GET_ID,
            w(gpa(DATA), 19),
            S_IOERR,
        ),
        ("an unknown request type", 0x99, r(gpa(DATA), 512), S_UNSUPP),
        ("GET_LIFETIME, not offered", 10, w(gpa(DATA), 16), S_UNSUPP),
        (
            "SECURE_ERASE, not offered",
            14,
            r(gpa(RANGES), 16),
            S_UNSUPP,
        ),
    ] {
        let mut g = h.guest();
        g.ranges(RANGES, &[(0, 8, 0)]);
        let chain = request(&mut g, t, 0, d);
        g.expect_status(&chain, STATUS, status, case);
        h.done(g, case, After::Serves);
    }
}

// ---------------------------------------------------------------------------------------------
// Rings
// ---------------------------------------------------------------------------------------------

#[test]
fn corrupt_avail_rings_mark_device_needs_reset_and_a_reset_recovers() {
    let mut h = Hostile::start("avail", &[]);
    for (case, ahead) in [
        ("an avail index 1000 entries ahead", 1000u16),
        ("an avail index one more than the ring size ahead", 257),
        ("an avail index 0x8000 ahead", 0x8000),
    ] {
        let mut g = h.guest();
        let dq = g.blk.queue(0).driver_queue_mut();
        let idx = dq.avail_idx().wrapping_add(ahead);
        dq.set_avail_idx(idx);
        dq.force_kick().unwrap();
        let channel = g.blk.session().backend_channel().expect("BACKEND_REQ");
        assert!(
            channel.recv_config_change(IO_TIMEOUT).unwrap(),
            "{case}: the frontend is told with a config-change message"
        );
        h.done(g, case, After::NeedsReset);
    }

    let case = "a head index beyond the ring";
    let mut g = h.guest();
    let dq = g.blk.queue(0).driver_queue_mut();
    dq.push_avail(300);
    dq.kick().unwrap();
    h.done(g, case, After::NeedsReset);

    // The backend channel is a pipe: telling the frontend fails, GET_STATUS still says it.
    let case = "an avail index running ahead with a backend channel that is not a socket";
    let mut g = h.guest();
    let (rd, wr) = pipe();
    let msg = code(R::SET_BACKEND_REQ_FD);
    assert_accepted(g.conn(), msg, &[], &[wr.as_raw_fd()], case);
    drop((rd, wr));
    let dq = g.blk.queue(0).driver_queue_mut();
    let idx = dq.avail_idx().wrapping_add(1000);
    dq.set_avail_idx(idx);
    dq.force_kick().unwrap();
    h.done(g, case, After::NeedsReset);
}

// ---------------------------------------------------------------------------------------------
// vhost-user messages
// ---------------------------------------------------------------------------------------------

/// The RAM region's description (GPA, size, frontend address) and its memfd.
fn ram_region(g: &mut Guest) -> (Vec<u8>, RawFd, u64) {
    let ram = g.blk.session().ram();
    let info = ram.region_info(ram.primary().unwrap()).unwrap();
    let desc = region(
        info.guest_phys_addr,
        info.memory_size,
        info.userspace_addr,
        info.mmap_offset,
    );
    (desc, info.mmap_handle, info.userspace_addr)
}

#[test]
fn wrong_fd_counts_are_refused_with_reply_ack() {
    let mut h = Hostile::start("fd-counts", &[]);
    let (e1, e2) = (eventfd(), eventfd());
    let (e1, e2) = (e1.as_raw_fd(), e2.as_raw_fd());
    let m = memfd(1 << 20);
    let mfd = m.as_raw_fd();
    let (s1, s2) = std::os::unix::net::UnixStream::pair().unwrap();
    let (s1, s2) = (s1.as_raw_fd(), s2.as_raw_fd());
    let added = single_region(&region(32 << 20, 1 << 20, 1 << 46, 0));
    let u64b = |v: u64| v.to_ne_bytes().to_vec();
    type Case = (&'static str, R, Vec<u8>, Vec<RawFd>);
    let cases = |table: Vec<u8>, fd: RawFd, ram: Vec<u8>| -> Vec<Case> {
        vec![
            (
                "SET_MEM_TABLE without the fd",
                R::SET_MEM_TABLE,
                table.clone(),
                vec![],
            ),
            (
                "SET_MEM_TABLE with two fds for one region",
                R::SET_MEM_TABLE,
                table,
                vec![fd, fd],
            ),
            (
                "ADD_MEM_REG without an fd",
                R::ADD_MEM_REG,
                added.clone(),
                vec![],
            ),
            (
                "ADD_MEM_REG with two fds",
                R::ADD_MEM_REG,
                added.clone(),
                vec![mfd, mfd],
            ),
            (
                "REM_MEM_REG with two fds",
                R::REM_MEM_REG,
                single_region(&ram),
                vec![mfd, mfd],
            ),
            (
                "SET_VRING_KICK without an fd or the no-fd flag",
                R::SET_VRING_KICK,
                u64b(0),
                vec![],
            ),
            (
                "SET_VRING_KICK with two fds",
                R::SET_VRING_KICK,
                u64b(0),
                vec![e1, e2],
            ),
            (
                "SET_VRING_KICK with the no-fd flag and an fd",
                R::SET_VRING_KICK,
                u64b(0x100),
                vec![e1],
            ),
            (
                "SET_VRING_KICK with the no-fd flag (polling)",
                R::SET_VRING_KICK,
                u64b(0x100),
                vec![],
            ),
            (
                "SET_VRING_CALL without an fd or the no-fd flag",
                R::SET_VRING_CALL,
                u64b(0),
                vec![],
            ),
            (
                "SET_VRING_CALL with two fds",
                R::SET_VRING_CALL,
                u64b(0),
                vec![e1, e2],
            ),
            (
                "SET_VRING_ERR with two fds",
                R::SET_VRING_ERR,
                u64b(0),
                vec![e1, e2],
            ),
            (
                "SET_VRING_NUM with an fd",
                R::SET_VRING_NUM,
                vring_state(0, 256),
                vec![e1],
            ),
            (
                "SET_VRING_ENABLE with an fd",
                R::SET_VRING_ENABLE,
                vring_state(0, 1),
                vec![e1],
            ),
            ("SET_STATUS with an fd", R::SET_STATUS, u64b(0xf), vec![e1]),
            (
                "SET_CONFIG with an fd",
                R::SET_CONFIG,
                config_msg(32, 1, &[1]),
                vec![e1],
            ),
            (
                "SET_BACKEND_REQ_FD without an fd",
                R::SET_BACKEND_REQ_FD,
                vec![],
                vec![],
            ),
            (
                "SET_BACKEND_REQ_FD with two fds",
                R::SET_BACKEND_REQ_FD,
                vec![],
                vec![s1, s2],
            ),
            ("RESET_DEVICE with an fd", R::RESET_DEVICE, vec![], vec![e1]),
        ]
    };
    let n = {
        let mut g = h.guest();
        let (ram, fd, _) = ram_region(&mut g);
        cases(mem_table(&[ram.clone()]), fd, ram).len()
    };
    for i in 0..n {
        let mut g = h.guest();
        let (ram, fd, _) = ram_region(&mut g);
        let (case, req, payload, fds) = cases(mem_table(&[ram.clone()]), fd, ram).remove(i);
        assert_refused(g.conn(), code(req), &payload, &fds, case);
        h.done(g, case, After::Serves);
    }

    // Requests with replies of their own cannot be refused with a REPLY_ACK.
    for (case, req, payload) in [
        ("GET_FEATURES with an fd", R::GET_FEATURES, vec![]),
        (
            "GET_VRING_BASE with an fd",
            R::GET_VRING_BASE,
            vring_state(0, 0),
        ),
    ] {
        let mut g = h.guest();
        g.conn()
            .send_raw(code(req), VERSION, &payload, &[e1])
            .unwrap();
        h.done(g, case, After::Closed);
    }
}

#[test]
fn kick_call_and_err_fds_that_are_not_eventfds_are_refused() {
    let mut h = Hostile::start("not-eventfd", &[]);
    let (rd, _wr) = pipe();
    let m = memfd(4096);
    let file = std::fs::File::open(&h.b.disk).unwrap();
    for (case, req, fd) in [
        ("a pipe as kick", R::SET_VRING_KICK, rd.as_raw_fd()),
        ("a memfd as kick", R::SET_VRING_KICK, m.as_raw_fd()),
        (
            "a regular file as kick",
            R::SET_VRING_KICK,
            file.as_raw_fd(),
        ),
        ("a pipe as call", R::SET_VRING_CALL, rd.as_raw_fd()),
        ("a memfd as err", R::SET_VRING_ERR, m.as_raw_fd()),
    ] {
        let mut g = h.guest();
        assert_refused(g.conn(), code(req), &0u64.to_ne_bytes(), &[fd], case);
        h.done(g, case, After::Serves);
    }

    let case = "the vhost-user socket itself as kick";
    let mut g = h.guest();
    let sock = g.conn().socket().as_raw_fd();
    assert_refused(
        g.conn(),
        code(R::SET_VRING_KICK),
        &0u64.to_ne_bytes(),
        &[sock],
        case,
    );
    h.done(g, case, After::Serves);
}

#[test]
fn truncated_messages_close_the_connection() {
    let mut h = Hostile::start("truncated", &[]);
    let e = eventfd();
    let set_features = header(code(R::SET_FEATURES), VERSION, 8);
    let mut short_payload = set_features.to_vec();
    short_payload.extend_from_slice(&[1, 2, 3]);
    for (case, bytes, fds) in [
        ("one byte of a header", set_features[..1].to_vec(), vec![]),
        ("a header cut short", set_features[..5].to_vec(), vec![]),
        (
            "a header cut short, with an fd",
            set_features[..4].to_vec(),
            vec![e.as_raw_fd()],
        ),
        ("a payload shorter than announced", short_payload, vec![]),
    ] {
        let mut g = h.guest();
        g.conn().send_raw_bytes(&bytes, &fds).unwrap();
        g.conn()
            .socket()
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        h.done(g, case, After::Closed);
    }
}

fn header(code: u32, flags: u32, size: u32) -> [u8; 12] {
    common::blk::header(code, flags, size)
}

#[test]
fn oversized_messages_close_the_connection() {
    let mut h = Hostile::start("oversized-msg", &[]);

    let case = "a SET_FEATURES announcing 4097 payload bytes";
    let mut g = h.guest();
    g.conn()
        .send_raw(code(R::SET_FEATURES), VERSION, &[0; 0x1001], &[])
        .unwrap();
    h.done(g, case, After::Closed);

    let case = "a GET_FEATURES announcing 4 GiB";
    let mut g = h.guest();
    let bytes = header(code(R::GET_FEATURES), VERSION, u32::MAX);
    g.conn().send_raw_bytes(&bytes, &[]).unwrap();
    h.done(g, case, After::Closed);

    let case = "a SET_MEM_TABLE of 128 regions";
    let mut g = h.guest();
    let (ram, fd, _) = ram_region(&mut g);
    let table = mem_table(&vec![ram; 128]);
    assert!(table.len() > 0x1000);
    g.conn()
        .send_raw(
            code(R::SET_MEM_TABLE),
            VERSION | FLAG_NEED_REPLY,
            &table,
            &[fd],
        )
        .unwrap();
    h.done(g, case, After::Closed);
}

#[test]
fn unknown_and_unsupported_requests_are_refused_or_close_the_connection() {
    let mut h = Hostile::start("unknown", &[]);
    for (case, request) in [
        ("an unknown request with NEED_REPLY", 9999),
        ("request code 0 with NEED_REPLY", 0),
        ("request code 2^32-1 with NEED_REPLY", u32::MAX),
        (
            "SET_INFLIGHT_FD, not supported, with NEED_REPLY",
            code(R::SET_INFLIGHT_FD),
        ),
        (
            "VRING_KICK, not supported, with NEED_REPLY",
            code(R::VRING_KICK),
        ),
        (
            "SEND_RARP, not for a block device, with NEED_REPLY",
            code(R::SEND_RARP),
        ),
    ] {
        let mut g = h.guest();
        assert_refused(g.conn(), request, &[1, 2, 3], &[], case);
        h.done(g, case, After::Serves);
    }

    for (case, request, flags) in [
        ("an unknown request without NEED_REPLY", 9999, VERSION),
        (
            "SET_INFLIGHT_FD without NEED_REPLY",
            code(R::SET_INFLIGHT_FD),
            VERSION,
        ),
        (
            "GET_INFLIGHT_FD, whose reply the backend cannot give",
            code(R::GET_INFLIGHT_FD),
            VERSION | FLAG_NEED_REPLY,
        ),
        (
            "SET_LOG_BASE without LOG_SHMFD",
            code(R::SET_LOG_BASE),
            VERSION | FLAG_NEED_REPLY,
        ),
        (
            "a request with the REPLY flag",
            code(R::GET_FEATURES),
            VERSION | FLAG_REPLY,
        ),
        ("a request of protocol version 2", code(R::GET_FEATURES), 2),
        ("a request of protocol version 0", code(R::GET_FEATURES), 0),
        (
            "a request with an unknown flag",
            code(R::SET_OWNER),
            VERSION | 0x10,
        ),
    ] {
        let mut g = h.guest();
        g.conn().send_raw(request, flags, &[], &[]).unwrap();
        h.done(g, case, After::Closed);
    }

    let case = "an unknown request with NEED_REPLY when REPLY_ACK is not negotiated";
    let protocol = outboard_frontend::device::default_protocol_features() - P::REPLY_ACK;
    let mut g = h.guest_with(h.builder().protocol_features(protocol));
    g.conn()
        .send_raw(9999, VERSION | FLAG_NEED_REPLY, &[], &[])
        .unwrap();
    h.done(g, case, After::Closed);
}

/// How the backend must answer a malformed request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// A failed REPLY_ACK; the session goes on.
    Refused,
    /// The request has a reply of its own, which cannot say "error": the connection closes.
    Closed,
    /// GET_CONFIG's error: a reply with a zero size.
    ZeroConfig,
}

#[test]
fn malformed_payload_sizes_are_refused_for_every_request() {
    let mut h = Hostile::start("payload-sizes", &[]);
    let e = eventfd();
    let m = memfd(1 << 20);
    let (s1, _s2) = std::os::unix::net::UnixStream::pair().unwrap();
    let added = single_region(&region(32 << 20, 1 << 20, 1 << 46, 0));
    let ev = vec![e.as_raw_fd()];
    let none: Vec<RawFd> = vec![];
    let cut = |mut v: Vec<u8>, len: usize| {
        v.resize(len, 0);
        v
    };
    let one_region = |g: &mut Guest| {
        let (ram, fd, _) = ram_region(g);
        (mem_table(&[ram]), fd)
    };
    use Answer::*;
    type Case = (&'static str, R, Vec<u8>, Vec<RawFd>, Answer);
    let cases: Vec<Box<dyn Fn(&mut Guest) -> Case + '_>> = vec![
        Box::new(|_| {
            (
                "GET_FEATURES with 8 bytes",
                R::GET_FEATURES,
                vec![0; 8],
                none.clone(),
                Closed,
            )
        }),
        Box::new(|_| {
            (
                "SET_FEATURES with 4 bytes",
                R::SET_FEATURES,
                vec![0; 4],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_FEATURES with 12 bytes",
                R::SET_FEATURES,
                vec![0; 12],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_OWNER with 8 bytes",
                R::SET_OWNER,
                vec![0; 8],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "RESET_OWNER with 8 bytes",
                R::RESET_OWNER,
                vec![0; 8],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_MEM_TABLE with 4 bytes",
                R::SET_MEM_TABLE,
                vec![1, 0, 0, 0],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|g| {
            let (t, fd) = one_region(g);
            (
                "SET_MEM_TABLE with a byte too many",
                R::SET_MEM_TABLE,
                cut(t.clone(), t.len() + 1),
                vec![fd],
                Refused,
            )
        }),
        Box::new(|g| {
            let (t, fd) = one_region(g);
            (
                "SET_MEM_TABLE with a byte too few",
                R::SET_MEM_TABLE,
                cut(t.clone(), t.len() - 1),
                vec![fd],
                Refused,
            )
        }),
        Box::new(|g| {
            let (mut t, fd) = one_region(g);
            t[0] = 2;
            (
                "SET_MEM_TABLE counting 2 regions, carrying 1",
                R::SET_MEM_TABLE,
                t,
                vec![fd],
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_VRING_NUM with 4 bytes",
                R::SET_VRING_NUM,
                vec![0; 4],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_VRING_NUM with 12 bytes",
                R::SET_VRING_NUM,
                cut(vring_state(0, 256), 12),
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_VRING_ADDR with 39 bytes",
                R::SET_VRING_ADDR,
                vec![0; 39],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_VRING_ADDR with 41 bytes",
                R::SET_VRING_ADDR,
                vec![0; 41],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_VRING_BASE with 4 bytes",
                R::SET_VRING_BASE,
                vec![0; 4],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "GET_VRING_BASE with 4 bytes",
                R::GET_VRING_BASE,
                vec![0; 4],
                none.clone(),
                Closed,
            )
        }),
        Box::new(|_| {
            (
                "GET_VRING_BASE with 12 bytes",
                R::GET_VRING_BASE,
                vec![0; 12],
                none.clone(),
                Closed,
            )
        }),
        Box::new(|_| {
            (
                "SET_VRING_KICK with 4 bytes",
                R::SET_VRING_KICK,
                vec![0; 4],
                ev.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_VRING_CALL with 12 bytes",
                R::SET_VRING_CALL,
                vec![0; 12],
                ev.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_VRING_ERR with no payload",
                R::SET_VRING_ERR,
                vec![],
                ev.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "GET_PROTOCOL_FEATURES with 8 bytes",
                R::GET_PROTOCOL_FEATURES,
                vec![0; 8],
                none.clone(),
                Closed,
            )
        }),
        Box::new(|_| {
            (
                "SET_PROTOCOL_FEATURES with 4 bytes",
                R::SET_PROTOCOL_FEATURES,
                vec![0; 4],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "GET_QUEUE_NUM with 8 bytes",
                R::GET_QUEUE_NUM,
                vec![0; 8],
                none.clone(),
                Closed,
            )
        }),
        Box::new(|_| {
            (
                "SET_VRING_ENABLE with 4 bytes",
                R::SET_VRING_ENABLE,
                vec![0; 4],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_BACKEND_REQ_FD with 4 bytes",
                R::SET_BACKEND_REQ_FD,
                vec![0; 4],
                vec![s1.as_raw_fd()],
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "GET_CONFIG with a short header",
                R::GET_CONFIG,
                vec![0; 8],
                none.clone(),
                ZeroConfig,
            )
        }),
        Box::new(|_| {
            (
                "GET_CONFIG with less data than its size",
                R::GET_CONFIG,
                config_msg(0, 8, &[0; 4]),
                none.clone(),
                ZeroConfig,
            )
        }),
        Box::new(|_| {
            (
                "GET_CONFIG with more data than its size",
                R::GET_CONFIG,
                config_msg(0, 8, &[0; 9]),
                none.clone(),
                ZeroConfig,
            )
        }),
        Box::new(|_| {
            (
                "GET_CONFIG of size zero",
                R::GET_CONFIG,
                config_msg(0, 0, &[]),
                none.clone(),
                ZeroConfig,
            )
        }),
        Box::new(|_| {
            (
                "SET_CONFIG with a short header",
                R::SET_CONFIG,
                vec![0; 8],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_CONFIG with more data than its size",
                R::SET_CONFIG,
                config_msg(32, 1, &[0, 0]),
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "RESET_DEVICE with 8 bytes",
                R::RESET_DEVICE,
                vec![0; 8],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "GET_MAX_MEM_SLOTS with 8 bytes",
                R::GET_MAX_MEM_SLOTS,
                vec![0; 8],
                none.clone(),
                Closed,
            )
        }),
        Box::new(|_| {
            (
                "ADD_MEM_REG with 32 bytes",
                R::ADD_MEM_REG,
                cut(added.clone(), 32),
                vec![m.as_raw_fd()],
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "ADD_MEM_REG with 48 bytes",
                R::ADD_MEM_REG,
                cut(added.clone(), 48),
                vec![m.as_raw_fd()],
                Refused,
            )
        }),
        Box::new(|g| {
            let (ram, _, _) = ram_region(g);
            (
                "REM_MEM_REG with 32 bytes",
                R::REM_MEM_REG,
                ram,
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_STATUS with 1 byte",
                R::SET_STATUS,
                vec![0xf],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "SET_STATUS with 4 bytes",
                R::SET_STATUS,
                vec![0xf, 0, 0, 0],
                none.clone(),
                Refused,
            )
        }),
        Box::new(|_| {
            (
                "GET_STATUS with 8 bytes",
                R::GET_STATUS,
                vec![0; 8],
                none.clone(),
                Closed,
            )
        }),
        Box::new(|_| {
            (
                "SET_LOG_FD with 8 bytes",
                R::SET_LOG_FD,
                vec![0; 8],
                ev.clone(),
                Refused,
            )
        }),
    ];
    for make in &cases {
        let mut g = h.guest();
        let (case, req, payload, fds, answer) = make(&mut g);
        let after = match answer {
            Refused => {
                assert_refused(g.conn(), code(req), &payload, &fds, case);
                After::Serves
            }
            Closed => {
                g.conn()
                    .send_raw(code(req), VERSION | FLAG_NEED_REPLY, &payload, &fds)
                    .unwrap();
                After::Closed
            }
            ZeroConfig => {
                let reply = g
                    .conn()
                    .raw_request(code(req), VERSION, &payload, &fds)
                    .unwrap()
                    .expect("GET_CONFIG always replies");
                assert_eq!(reply.header.request, code(R::GET_CONFIG), "{case}");
                assert!(reply.header.is_reply(), "{case}");
                assert_eq!(reply.payload.len(), 12, "{case}: a config header alone");
                assert_eq!(&reply.payload[4..8], &[0; 4], "{case}: size 0");
                After::Serves
            }
        };
        h.done(g, case, after);
    }
}

#[test]
fn malformed_memory_tables_are_refused_and_the_old_table_stays() {
    let mut h = Hostile::start("mem-table", &[]);
    let m = memfd(1 << 20);
    let mfd = m.as_raw_fd();
    let far = 1u64 << 46;
    for i in 0..12 {
        let mut g = h.guest();
        let (ram, fd, uaddr) = ram_region(&mut g);
        let (case, req, payload, fds): (&str, R, Vec<u8>, Vec<RawFd>) = match i {
            0 => (
                "two regions overlapping in GPA",
                R::SET_MEM_TABLE,
                mem_table(&[ram, region(8 << 20, 1 << 20, far, 0)]),
                vec![fd, mfd],
            ),
            1 => (
                "two regions overlapping in frontend addresses",
                R::SET_MEM_TABLE,
                mem_table(&[ram, region(32 << 20, 1 << 20, uaddr + 4096, 0)]),
                vec![fd, mfd],
            ),
            2 => (
                "a region of size zero",
                R::SET_MEM_TABLE,
                mem_table(&[ram, region(32 << 20, 0, far, 0)]),
                vec![fd, mfd],
            ),
            3 => (
                "a region larger than its memfd",
                R::SET_MEM_TABLE,
                mem_table(&[region(0, 2 * RAM as u64, uaddr, 0)]),
                vec![fd],
            ),
            4 => (
                "a region at an offset past the end of its memfd",
                R::SET_MEM_TABLE,
                mem_table(&[ram, region(32 << 20, 4096, far, 1 << 20)]),
                vec![fd, mfd],
            ),
            5 => (
                "a region whose end overflows the GPA space",
                R::SET_MEM_TABLE,
                mem_table(&[ram, region(u64::MAX - 4095, 8192, far, 0)]),
                vec![fd, mfd],
            ),
            6 => (
                "a region whose end overflows the frontend address space",
                R::SET_MEM_TABLE,
                mem_table(&[ram, region(32 << 20, 8192, u64::MAX - 4095, 0)]),
                vec![fd, mfd],
            ),
            7 => {
                let nine: Vec<Vec<u8>> = (0..9u64)
                    .map(|k| region((32 + k) << 20, 64 << 10, far + (k << 20), k << 16))
                    .collect();
                (
                    "nine regions",
                    R::SET_MEM_TABLE,
                    mem_table(&nine),
                    vec![mfd; 9],
                )
            }
            8 => ("no regions", R::SET_MEM_TABLE, mem_table(&[]), vec![]),
            9 => (
                "ADD_MEM_REG of a region of size zero",
                R::ADD_MEM_REG,
                single_region(&region(32 << 20, 0, far, 0)),
                vec![mfd],
            ),
            10 => (
                "ADD_MEM_REG beyond the end of its memfd",
                R::ADD_MEM_REG,
                single_region(&region(32 << 20, 2 << 20, far, 0)),
                vec![mfd],
            ),
            _ => (
                "REM_MEM_REG of a region that is not in the table",
                R::REM_MEM_REG,
                single_region(&region(32 << 20, 1 << 20, far, 0)),
                vec![],
            ),
        };
        assert_refused(g.conn(), code(req), &payload, &fds, case);
        h.done(g, case, After::Serves);
    }

    // The slot limit GET_MAX_MEM_SLOTS announced (32): the RAM region and 31 more fit.
    let case = "one region more than GET_MAX_MEM_SLOTS";
    let mut g = h.guest();
    let slots = g.blk.session().negotiated().max_mem_slots.unwrap();
    for k in 1..=slots {
        let r = single_region(&region(
            (64 + 2 * k) << 20,
            64 << 10,
            far + (k << 20),
            (k % 16) << 16,
        ));
        let status = reply_ack(g.conn(), code(R::ADD_MEM_REG), &r, &[mfd]);
        assert_eq!(status == 0, k < slots, "{case}: region {k} of {slots}");
    }
    h.done(g, case, After::Serves);

    // Removing the only region leaves the device without memory: it waits, and resumes once
    // the region is back. Either way the table and the device agree.
    let case = "REM_MEM_REG of the only region, then ADD_MEM_REG of it again";
    let mut g = h.guest();
    let (ram, fd, _) = ram_region(&mut g);
    let rem = single_region(&ram);
    assert_accepted(g.conn(), code(R::REM_MEM_REG), &rem, &[], case);
    let q = g.blk.queue(0);
    q.slot_data(0).fill(0, 4096, 0);
    q.submit(0, outboard_frontend::BlkRequest::read(0, 4096))
        .unwrap();
    q.kick().unwrap();
    let mut done = Vec::new();
    let r = q.reap(
        outboard_frontend::WaitMode::Block(Duration::from_millis(200)),
        &mut done,
    );
    assert!(r.is_err(), "{case}: served without memory: {done:?}");
    assert_accepted(g.conn(), code(R::ADD_MEM_REG), &rem, &[fd], case);
    g.blk.queue(0).drain(&mut done).unwrap();
    assert_eq!(done.len(), 1, "{case}");
    assert_eq!(done[0].status, outboard_frontend::BlkStatus::Ok, "{case}");
    let mut got = vec![0; 4096];
    g.blk.queue(0).slot_data(done[0].slot).read_at(0, &mut got);
    assert_eq!(got, &h.expected()[..4096], "{case}: data");
    h.done(g, case, After::Serves);
}

#[test]
fn features_cannot_change_after_driver_ok() {
    let mut h = Hostile::start("features", &[]);
    for i in 0..6 {
        let mut g = h.guest();
        let acked = g.blk.session().negotiated().features_acked;
        let (case, req, value, accepted) = match i {
            0 => (
                "SET_FEATURES without EVENT_IDX",
                R::SET_FEATURES,
                acked & !(1 << 29),
                false,
            ),
            1 => (
                "SET_FEATURES with a feature not offered",
                R::SET_FEATURES,
                acked | 1 << 50,
                false,
            ),
            2 => (
                "SET_FEATURES without VERSION_1",
                R::SET_FEATURES,
                acked & !(1 << 32),
                false,
            ),
            3 => (
                "SET_FEATURES with the same features",
                R::SET_FEATURES,
                acked,
                true,
            ),
            4 => (
                "SET_PROTOCOL_FEATURES with unknown bits",
                R::SET_PROTOCOL_FEATURES,
                1 << 60,
                false,
            ),
            _ => ("SET_OWNER a second time", R::SET_OWNER, 0, false),
        };
        let payload = if req == R::SET_OWNER {
            vec![]
        } else {
            value.to_ne_bytes().to_vec()
        };
        let status = reply_ack(g.conn(), code(req), &payload, &[]);
        assert_eq!(status == 0, accepted, "{case}: REPLY_ACK {status}");
        h.done(g, case, After::Serves);
    }
}

#[test]
fn invalid_vring_sizes_indices_and_bases_are_refused() {
    let mut h = Hostile::start("vrings", &[]);
    let e = eventfd();
    let ev = e.as_raw_fd();
    let u64b = |v: u64| v.to_ne_bytes().to_vec();
    let cases: Vec<(&str, R, Vec<u8>, Vec<RawFd>)> = vec![
        (
            "a ring size of 100",
            R::SET_VRING_NUM,
            vring_state(0, 100),
            vec![],
        ),
        (
            "a ring size of 512, above the maximum",
            R::SET_VRING_NUM,
            vring_state(0, 512),
            vec![],
        ),
        (
            "a ring size of 0",
            R::SET_VRING_NUM,
            vring_state(0, 0),
            vec![],
        ),
        (
            "a ring size of 2^32-1",
            R::SET_VRING_NUM,
            vring_state(0, u32::MAX),
            vec![],
        ),
        (
            "SET_VRING_NUM of ring 1 on a one-queue device",
            R::SET_VRING_NUM,
            vring_state(1, 256),
            vec![],
        ),
        (
            "SET_VRING_NUM of ring 255",
            R::SET_VRING_NUM,
            vring_state(255, 256),
            vec![],
        ),
        (
            "SET_VRING_BASE of ring 255",
            R::SET_VRING_BASE,
            vring_state(255, 0),
            vec![],
        ),
        (
            "SET_VRING_BASE of 65536",
            R::SET_VRING_BASE,
            vring_state(0, 65536),
            vec![],
        ),
        (
            "SET_VRING_BASE of 2^32-1",
            R::SET_VRING_BASE,
            vring_state(0, u32::MAX),
            vec![],
        ),
        (
            "SET_VRING_ENABLE of ring 255",
            R::SET_VRING_ENABLE,
            vring_state(255, 1),
            vec![],
        ),
        (
            "SET_VRING_ENABLE with 2",
            R::SET_VRING_ENABLE,
            vring_state(0, 2),
            vec![],
        ),
        (
            "SET_VRING_KICK of ring 255",
            R::SET_VRING_KICK,
            u64b(255),
            vec![ev],
        ),
        (
            "SET_VRING_KICK with reserved bits",
            R::SET_VRING_KICK,
            u64b(0x200),
            vec![ev],
        ),
        (
            "SET_VRING_CALL of ring 255",
            R::SET_VRING_CALL,
            u64b(255),
            vec![ev],
        ),
        (
            "SET_VRING_ERR of ring 255",
            R::SET_VRING_ERR,
            u64b(255),
            vec![ev],
        ),
        (
            "SET_VRING_ADDR of ring 255",
            R::SET_VRING_ADDR,
            vring_addr(255, 0, 0, 0, 0),
            vec![],
        ),
        (
            "SET_VRING_ADDR with unknown flags",
            R::SET_VRING_ADDR,
            vring_addr(0, 2, 0, 0, 0),
            vec![],
        ),
        (
            "SET_VRING_ADDR outside guest memory",
            R::SET_VRING_ADDR,
            vring_addr(0, 0, 0x1000, 0x1000, 0x1000),
            vec![],
        ),
    ];
    for (case, req, payload, fds) in cases {
        let mut g = h.guest();
        assert_refused(g.conn(), code(req), &payload, &fds, case);
        h.done(g, case, After::Serves);
    }

    let case = "GET_VRING_BASE of ring 255";
    let mut g = h.guest();
    g.conn()
        .send_raw(code(R::GET_VRING_BASE), VERSION, &vring_state(255, 0), &[])
        .unwrap();
    h.done(g, case, After::Closed);

    // Addresses inside guest memory but misaligned: accepted as a message, the ring cannot
    // run, and the device says so.
    let case = "a misaligned descriptor table on a running ring";
    let mut g = h.guest();
    let ring = g.blk.queue(0).driver_queue().ring().user_addr();
    let avail = g.blk.queue(0).driver_queue().avail_ring_gpa();
    let used = g.blk.queue(0).driver_queue().used_ring_gpa();
    let base = g.blk.queue(0).driver_queue().desc_table_gpa();
    let addr = vring_addr(0, 0, ring + 8, ring + (used - base), ring + (avail - base));
    assert_accepted(g.conn(), code(R::SET_VRING_ADDR), &addr, &[], case);
    h.done(g, case, After::NeedsReset);
}

// ---------------------------------------------------------------------------------------------
// Messages in an order no well-behaved frontend sends
// ---------------------------------------------------------------------------------------------

/// A frontend that sends vhost-user messages one by one, with NEED_REPLY on each.
struct Manual {
    conn: Connection,
    ram: GuestRam,
    dq: DriverQueue,
    v: VringSetup,
    /// 64 KiB at GPA 0, filled with a pattern the device has no business writing.
    low: GuestBuf,
}

impl Manual {
    /// Connects and negotiates up to SET_FEATURES (with the STATUS protocol feature, without
    /// EVENT_IDX); no memory table yet.
    fn connect(h: &Hostile) -> Manual {
        let mut conn = Connection::connect(&h.b.socket, 1, IO_TIMEOUT).unwrap();
        let fe = conn.frontend();
        let offered = fe.get_features().unwrap();
        let protocol = fe.get_protocol_features().unwrap();
        let want = P::REPLY_ACK | P::CONFIG | P::STATUS | P::MQ;
        conn.set_protocol_features(protocol & want).unwrap();
        conn.frontend().set_owner().unwrap();
        conn.set_need_reply(true).unwrap();
        conn.set_status(1).unwrap();
        conn.set_status(3).unwrap();
        conn.frontend()
            .set_features(offered & (1 << 32 | 1 << 30))
            .unwrap();
        conn.set_status(0xb).unwrap();
        let mut ram = GuestRam::new(RAM).unwrap();
        let low = ram.alloc(64 << 10, 4096).unwrap();
        assert_eq!(low.gpa(), 0);
        low.fill(0, 64 << 10, 0xa5);
        let cfg = QueueConfig {
            size: 64,
            event_idx: false,
            indirect_max: 0,
            notify: NotifyMode::Interrupt,
        };
        let dq = DriverQueue::new(&mut ram, 0, cfg).unwrap();
        let v = dq.vring_setup(RingAddressing::UserAddress).unwrap();
        Manual {
            conn,
            ram,
            dq,
            v,
            low,
        }
    }

    fn set_mem_table(&mut self) {
        let regions = self.ram.regions_info();
        self.conn.frontend().set_mem_table(&regions).unwrap();
    }

    fn set_vring_addr(&mut self) -> Result<(), vhost::Error> {
        let config = self.v.config();
        self.conn.frontend().set_vring_addr(0, &config)
    }

    /// The rest of the ring setup but SET_VRING_ADDR: size, base, call, kick, enable.
    fn ring_without_addresses(&mut self) {
        let fe = self.conn.frontend();
        fe.set_vring_num(0, self.v.size).unwrap();
        fe.set_vring_base(0, 0).unwrap();
        fe.set_vring_call(0, &self.v.call).unwrap();
        fe.set_vring_kick(0, &self.v.kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
    }

    /// Reads 4 KiB at sector 0 through a hand-made chain and returns them.
    fn read(&mut self) -> Vec<u8> {
        let hdr = self.ram.alloc(32, 32).unwrap();
        let data = self.ram.alloc(4096, 4096).unwrap();
        hdr.write_at(0, &T_IN.to_le_bytes());
        hdr.write_at(4, &[0; 12]);
        hdr.write_at(16, &[UNWRITTEN]);
        self.dq
            .submit(&[
                Segment::readable_part(&hdr, 0, 16),
                Segment::writable(&data),
                Segment::writable_part(&hdr, 16, 1),
            ])
            .unwrap();
        let mut used = Vec::new();
        self.dq.wait_used(IO_TIMEOUT, &mut used).unwrap();
        assert_eq!(hdr.read_u8(16), S_OK, "status");
        let mut got = vec![0; 4096];
        data.read_at(0, &mut got);
        got
    }

    /// Panics if the device wrote the low 64 KiB of guest RAM.
    fn check_low(&self, case: &str) {
        let mut got = vec![0; 64 << 10];
        self.low.read_at(0, &mut got);
        if let Some(i) = got.iter().position(|&b| b != 0xa5) {
            panic!(
                "{case}: the device wrote guest RAM at GPA {i:#x} ({:#04x})",
                got[i]
            );
        }
    }
}

#[test]
fn rings_set_up_before_the_memory_table_are_refused_then_work() {
    let mut h = Hostile::start("rings-first", &[]);
    let case = "rings set up before the memory table";
    let mut m = Manual::connect(&h);
    m.ring_without_addresses();
    assert!(
        m.set_vring_addr().is_err(),
        "{case}: addresses are refused while there is no memory to translate them"
    );
    m.conn.set_status(0xf).unwrap();
    m.set_mem_table();
    m.dq.kick().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    m.check_low(case);
    assert_eq!(m.conn.get_status().unwrap(), 0xf, "{case}: status");
    m.set_vring_addr().unwrap();
    assert_eq!(m.read(), &h.expected()[..4096], "{case}: data");
    m.check_low(case);
    drop(m);
    let g = h.guest();
    h.done(g, case, After::Serves);
}

#[test]
fn kicks_before_ring_addresses_do_not_start_the_ring_at_address_zero() {
    let mut h = Hostile::start("kick-first", &[]);
    let case = "a ring kicked and enabled before its addresses";
    let mut m = Manual::connect(&h);
    m.set_mem_table();
    m.ring_without_addresses();
    m.conn.set_status(0xf).unwrap();
    m.v.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    m.check_low(case);
    let status = m.conn.get_status().unwrap();
    assert_eq!(status & DEVICE_NEEDS_RESET, 0, "{case}: status {status:#x}");
    // The addresses complete the ring: it runs.
    m.set_vring_addr().unwrap();
    assert_eq!(m.read(), &h.expected()[..4096], "{case}: data");
    m.check_low(case);
    let base = m.conn.frontend().get_vring_base(0).unwrap();
    assert_eq!(base, 1, "{case}: one request served");
    drop(m);
    let g = h.guest();
    h.done(g, case, After::Serves);
}

// ---------------------------------------------------------------------------------------------
// Termination while a frontend misbehaves
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_ends_the_program_while_a_frontend_stalls_mid_message() {
    let set_features = header(code(R::SET_FEATURES), VERSION, 8);
    for (case, bytes) in [
        ("half a header", set_features[..6].to_vec()),
        ("a header without its payload", set_features.to_vec()),
    ] {
        let mut h = Hostile::start("stall", &[]);
        let mut g = h.guest();
        g.conn().send_raw_bytes(&bytes, &[]).unwrap();
        // Let the backend start reading the message.
        std::thread::sleep(Duration::from_millis(100));
        let status = h.b.backend.terminate();
        assert!(status.success(), "{case}: exit status {status}");
        drop(g);
    }
}

#[test]
fn sigterm_ends_the_program_while_a_frontend_does_not_read_replies() {
    let mut h = Hostile::start("no-reader", &[]);
    let mut g = h.guest();
    let request = header(code(R::GET_FEATURES), VERSION, 0);
    g.conn().socket().set_nonblocking(true).unwrap();
    // Requests until the backend stops reading: its replies have filled the socket, and it is
    // stuck sending one. A pause without progress tells it apart from a backend still busy.
    let mut sent = 0usize;
    loop {
        match g.conn().send_raw_bytes(&request, &[]) {
            Ok(()) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                match g.conn().send_raw_bytes(&request, &[]) {
                    Ok(()) => sent += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("after {sent} requests: {e}"),
                }
            }
            Err(e) => panic!("after {sent} requests: {e}"),
        }
        assert!(sent < 10_000_000, "the backend never stopped reading");
    }
    let status = h.b.backend.terminate();
    assert!(
        status.success(),
        "exit status {status} after {sent} requests"
    );
    drop(g);
}

#[test]
fn a_request_in_flight_across_sigterm_does_not_outlive_the_program() {
    // Not hostile as such, but the same property from the other side: a frontend with I/O in
    // flight at SIGTERM sees its connection closed, and the disk holds only whole writes.
    let mut h = Hostile::start("sigterm-io", &[]);
    let mut g = h.guest();
    let q = g.blk.queue(0);
    for slot in 0..8u16 {
        q.slot_data(slot).write_at(0, &pattern(77, 4096));
        q.submit(
            slot,
            outboard_frontend::BlkRequest::write(u64::from(slot) * 8, 4096),
        )
        .unwrap();
    }
    q.kick().unwrap();
    let status = h.b.backend.terminate();
    assert!(status.success(), "exit status {status}");
    g.assert_closed("SIGTERM");
    let mut done = Vec::new();
    let _ = g
        .blk
        .queue(0)
        .reap(outboard_frontend::WaitMode::NoWait, &mut done);
    let disk = h.b.disk_contents();
    for c in &done {
        assert_eq!(c.status, outboard_frontend::BlkStatus::Ok);
        let at = usize::from(c.slot) * 8 * SECTOR;
        assert_eq!(
            &disk[at..at + 4096],
            &pattern(77, 4096)[..],
            "slot {}",
            c.slot
        );
    }
}

#[test]
fn a_frontend_that_never_reads_the_backend_channel_cannot_stall_the_device() {
    // Every DEVICE_NEEDS_RESET sends a config-change message on the backend channel, which this
    // frontend never reads; after a few hundred the channel is full. The device must go on
    // resetting and serving.
    let mut h = Hostile::start("channel-full", &[]);
    let case = "600 NEEDS_RESET episodes with an unread backend channel";
    let mut g = h.guest();
    for i in 0..600 {
        let dq = g.blk.queue(0).driver_queue_mut();
        let idx = dq.avail_idx().wrapping_add(1000);
        dq.set_avail_idx(idx);
        dq.force_kick().unwrap();
        g.wait_needs_reset(case);
        if let Err(e) = g.blk.reset() {
            panic!("{case}: reset {i} failed: {e:?}");
        }
    }
    h.done(g, case, After::Serves);
}

/// How many file descriptors the process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn file_descriptors_of_refused_messages_are_closed() {
    let mut h = Hostile::start("fd-leak", &[]);
    let pid = h.b.backend.child.id();
    let case = "200 rounds of refused messages carrying fds";
    let mut g = h.guest();
    let before = open_fds(pid);
    let (rd, _wr) = pipe();
    let m = memfd(1 << 20);
    let mfd = m.as_raw_fd();
    let (ram, fd, _) = ram_region(&mut g);
    let overlapping = single_region(&ram);
    for _ in 0..200 {
        let e = eventfd();
        let ev = e.as_raw_fd();
        let conn = g.conn();
        let refused: [(R, Vec<u8>, Vec<RawFd>); 7] = [
            (R::SET_MEM_TABLE, mem_table(&[ram.clone()]), vec![fd, mfd]),
            (R::ADD_MEM_REG, overlapping.clone(), vec![fd]),
            (
                R::SET_VRING_KICK,
                0u64.to_ne_bytes().to_vec(),
                vec![rd.as_raw_fd()],
            ),
            (R::SET_VRING_CALL, 0u64.to_ne_bytes().to_vec(), vec![ev, ev]),
            (R::SET_VRING_NUM, vring_state(0, 100), vec![ev]),
            (R::SET_FEATURES, vec![0; 4], vec![ev, mfd, fd]),
            (R::RESET_OWNER, vec![0; 8], vec![ev]),
        ];
        for (req, payload, fds) in refused {
            assert_refused(conn, code(req), &payload, &fds, case);
        }
        assert_refused(conn, 9999, &[], &[ev, mfd], case);
        // Accepted messages whose fds replace earlier ones.
        let ok = 0u64.to_ne_bytes();
        assert_accepted(conn, code(R::SET_VRING_ERR), &ok, &[ev], case);
        assert_accepted(conn, code(R::SET_LOG_FD), &[], &[ev], case);
    }
    let after = open_fds(pid);
    assert!(
        after <= before + 1,
        "{case}: the backend had {before} fds open before and {after} after"
    );
    h.done(g, case, After::Serves);

    // More fds than a message may carry: the connection closes and none of them stays open.
    let case = "a message with 64 fds";
    let mut g = h.guest();
    let before = open_fds(pid);
    let fds = vec![mfd; 64];
    g.conn()
        .send_raw(code(R::SET_OWNER), VERSION | FLAG_NEED_REPLY, &[], &fds)
        .unwrap();
    g.assert_closed(case);
    // The session ended: its memory, kick and call fds are gone too.
    std::thread::sleep(Duration::from_millis(100));
    let after = open_fds(pid);
    assert!(
        after <= before,
        "{case}: {before} fds before, {after} after"
    );
    h.done(g, case, After::Closed);

    // Fds attached to the payload rather than the header are dropped with the bytes.
    let case = "fds sent with a payload, after the header";
    let mut g = h.guest();
    let before = open_fds(pid);
    let hdr = header(code(R::SET_FEATURES), VERSION | FLAG_NEED_REPLY, 8);
    let acked = g.blk.session().negotiated().features_acked;
    g.conn().send_raw_bytes(&hdr, &[]).unwrap();
    g.conn()
        .send_raw_bytes(&acked.to_ne_bytes(), &[mfd, mfd, mfd])
        .unwrap();
    let reply = g
        .conn()
        .recv_raw(Some(IO_TIMEOUT))
        .unwrap()
        .expect("a reply");
    let _ = common::blk::ack_status(code(R::SET_FEATURES), &reply);
    let after = open_fds(pid);
    assert!(
        after <= before,
        "{case}: {before} fds before, {after} after"
    );
    h.done(g, case, After::Serves);
}

#[test]
fn malformed_migration_messages_are_refused() {
    let mut h = Hostile::start("migration", &[]);
    let protocol =
        outboard_frontend::device::default_protocol_features() | P::LOG_SHMFD | P::DEVICE_STATE;
    let log = memfd(4096);
    let lfd = log.as_raw_fd();
    let (rd, _wr) = pipe();
    let pfd = rd.as_raw_fd();
    let log_msg = |size: u64, offset: u64| [size.to_ne_bytes(), offset.to_ne_bytes()].concat();
    let state =
        |direction: u32, phase: u32| [direction.to_ne_bytes(), phase.to_ne_bytes()].concat();
    // Requests with replies of their own: a refusal closes the connection.
    for (case, req, payload, fds) in [
        (
            "SET_LOG_BASE with 8 bytes",
            R::SET_LOG_BASE,
            vec![0; 8],
            vec![lfd],
        ),
        (
            "SET_LOG_BASE without an fd",
            R::SET_LOG_BASE,
            log_msg(4096, 0),
            vec![],
        ),
        (
            "SET_LOG_BASE of size zero",
            R::SET_LOG_BASE,
            log_msg(0, 0),
            vec![lfd],
        ),
        (
            "SET_LOG_BASE beyond its file",
            R::SET_LOG_BASE,
            log_msg(8192, 0),
            vec![lfd],
        ),
        (
            "SET_LOG_BASE whose end overflows",
            R::SET_LOG_BASE,
            log_msg(4096, u64::MAX - 100),
            vec![lfd],
        ),
        (
            "SET_DEVICE_STATE_FD with 4 bytes",
            R::SET_DEVICE_STATE_FD,
            vec![0; 4],
            vec![pfd],
        ),
        (
            "SET_DEVICE_STATE_FD without an fd",
            R::SET_DEVICE_STATE_FD,
            state(0, 0),
            vec![],
        ),
        (
            "CHECK_DEVICE_STATE with 8 bytes",
            R::CHECK_DEVICE_STATE,
            vec![0; 8],
            vec![],
        ),
    ] {
        let mut g = h.guest_with(h.builder().protocol_features(protocol));
        assert!(g.blk.session().negotiated().has_protocol(P::DEVICE_STATE));
        g.conn()
            .send_raw(code(req), VERSION | FLAG_NEED_REPLY, &payload, &fds)
            .unwrap();
        h.done(g, case, After::Closed);
    }

    let check = |g: &mut Guest| -> u64 {
        let reply = g
            .conn()
            .raw_request(code(R::CHECK_DEVICE_STATE), VERSION, &[], &[])
            .unwrap()
            .expect("CHECK_DEVICE_STATE replies");
        reply.payload_u64().expect("a u64 reply")
    };
    let case = "CHECK_DEVICE_STATE without a transfer";
    let mut g = h.guest_with(h.builder().protocol_features(protocol));
    assert_ne!(check(&mut g) & 1, 0, "{case}: reported as failed");
    h.done(g, case, After::Serves);

    for (case, direction, phase) in [
        ("a state transfer in an unknown direction", 7, 0),
        ("a state transfer in an unknown phase", 0, 9),
    ] {
        let mut g = h.guest_with(h.builder().protocol_features(protocol));
        let (rd, wr) = pipe();
        let fd = if direction == 0 {
            wr.as_raw_fd()
        } else {
            rd.as_raw_fd()
        };
        let reply = g
            .conn()
            .raw_request(
                code(R::SET_DEVICE_STATE_FD),
                VERSION,
                &state(direction, phase),
                &[fd],
            )
            .unwrap()
            .expect("SET_DEVICE_STATE_FD replies");
        assert_ne!(
            reply.payload_u64().unwrap() & 0x100,
            0,
            "{case}: no fd back"
        );
        drop((rd, wr));
        assert_ne!(check(&mut g) & 1, 0, "{case}: reported as failed");
        h.done(g, case, After::Serves);
    }

    for (case, blob) in [
        ("a state load of garbage", pattern(9, 4096)),
        ("a state load of nothing", Vec::new()),
        ("a state load larger than any state", vec![0; 2 << 20]),
    ] {
        let mut g = h.guest_with(h.builder().protocol_features(protocol));
        let (rd, wr) = pipe();
        let reply = g
            .conn()
            .raw_request(
                code(R::SET_DEVICE_STATE_FD),
                VERSION,
                &state(1, 0),
                &[rd.as_raw_fd()],
            )
            .unwrap()
            .expect("SET_DEVICE_STATE_FD replies");
        assert_eq!(
            reply.payload_u64(),
            Some(0x100),
            "{case}: accepted, no fd back"
        );
        drop(rd);
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut w = std::fs::File::from(wr);
            // The backend stops reading past its size cap: a broken pipe is fine.
            let _ = w.write_all(&blob);
        });
        writer.join().unwrap();
        assert_ne!(check(&mut g) & 1, 0, "{case}: reported as failed");
        h.done(g, case, After::Serves);
    }
}

#[test]
fn sigterm_ends_the_program_while_a_state_load_waits_for_the_frontend() {
    let mut h = Hostile::start("state-stall", &[]);
    let protocol =
        outboard_frontend::device::default_protocol_features() | P::LOG_SHMFD | P::DEVICE_STATE;
    let mut g = h.guest_with(h.builder().protocol_features(protocol));
    let (rd, _wr) = pipe();
    let payload = [1u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat();
    let fd = rd.as_raw_fd();
    g.conn()
        .raw_request(code(R::SET_DEVICE_STATE_FD), VERSION, &payload, &[fd])
        .unwrap()
        .expect("SET_DEVICE_STATE_FD replies");
    // The frontend keeps the pipe open and asks for the result.
    g.conn()
        .send_raw(code(R::CHECK_DEVICE_STATE), VERSION, &[], &[])
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let status = h.b.backend.terminate();
    assert!(status.success(), "exit status {status}");
}
