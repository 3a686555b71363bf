//! A hostile guest against `vhost-user-blk`: malformed descriptor chains and rings, each
//! answered as the VIRTIO specification says (an IOERR or UNSUPP status byte, a used entry of
//! length zero when there is no status byte to write, DEVICE_NEEDS_RESET) and never with a crash,
//! a write outside the request's writable buffers, or a change to the disk.
//!
//! After every case, `Hostile::done` (tests/common/hostile.rs) checks the guest RAM canary, the
//! case's own session, the process, a fresh frontend's verified I/O, and the image file. The
//! vhost-user messages of a hostile frontend are in `blk_hostile_messages.rs`.

mod common;

use std::os::fd::AsRawFd;

use common::blk::{assert_accepted, IO_TIMEOUT, SECTOR};
use common::hostile::*;
use vhost::vhost_user::message::FrontendReq as R;

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
    #[rustfmt::skip]
    let cases = [
        ("a read into a buffer 1 TiB up", T_IN, OUTSIDE, 4096),
        ("a write from a buffer 1 TiB up", T_OUT, OUTSIDE, 4096),
        ("a read into the first byte past RAM", T_IN, ram, 512),
        ("a write from the first byte past RAM", T_OUT, ram, 512),
        ("a read at the top of the address space", T_IN, u64::MAX - 511, 512),
        ("a write whose buffer end overflows", T_OUT, u64::MAX - 100, 4096),
        ("a GET_ID into a buffer outside RAM", T_GET_ID, OUTSIDE, 20),
    ];
    for (case, t, addr, len) in cases {
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
    #[rustfmt::skip]
    let cases = [
        ("a status byte outside RAM", w(OUTSIDE, 1)),
        ("a status descriptor straddling the end of RAM", w(ram - 1, 2)),
        ("a status descriptor whose end overflows", w(u64::MAX, 2)),
    ];
    for (case, status) in cases {
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

    #[rustfmt::skip]
    let cases = [
        ("an indirect table whose length is not a multiple of 16", 40),
        ("an indirect table of length zero", 0),
        ("an indirect table of 4 GiB - 16", u32::MAX - 15),
    ];
    for (case, table_len) in cases {
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
    #[rustfmt::skip]
    let cases = [
        ("254 data segments, the limit", 254, S_OK),
        ("255 data segments, one above seg_max", 255, S_IOERR),
        ("300 data segments", 300, S_IOERR),
    ];
    for (case, segments, status) in cases {
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
    #[rustfmt::skip]
    let cases = [
        ("a read into 4 GiB - 512 bytes", T_IN, w(gpa(DATA), 0xffff_fe00)),
        ("a write of 4 GiB - 512 bytes", T_OUT, r(gpa(DATA), 0xffff_fe00)),
        ("a read crossing the end of RAM", T_IN, w(gpa(end), 4096)),
        ("a write crossing the end of RAM", T_OUT, r(gpa(end), 4096)),
        ("a read of 2 MiB in one segment", T_IN, w(gpa(DATA), 2 << 20)),
        ("a GET_ID buffer crossing the end of RAM", T_GET_ID, w(gpa(CANARY_LEN - 10), 20)),
    ];
    for (case, t, d) in cases {
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

    #[rustfmt::skip]
    let cases = [
        ("a read into a device-readable buffer", T_IN, r(gpa(DATA), 4096)),
        ("a write from a device-writable buffer", T_OUT, w(gpa(DATA), 4096)),
        ("a flush with a device-writable buffer", T_FLUSH, w(gpa(DATA), 512)),
        ("a flush with a device-readable buffer", T_FLUSH, r(gpa(DATA), 512)),
        ("a GET_ID with a device-readable buffer", T_GET_ID, r(gpa(DATA), 20)),
        ("a discard with device-writable ranges", T_DISCARD, w(gpa(RANGES), 16)),
    ];
    for (case, t, d) in cases {
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
    #[rustfmt::skip]
    let cases = [
        (
            "a write without a status descriptor",
            T_OUT,
            vec![r(gpa(HDR), 16), r(gpa(DATA), 4096)],
        ),
        ("a flush that is only a header", T_FLUSH, vec![r(gpa(HDR), 16)]),
        ("a 15-byte header alone", T_FLUSH, vec![r(gpa(HDR), 15)]),
    ];
    for (case, t, chain) in cases {
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
    #[rustfmt::skip]
    let cases = [
        ("a read at the capacity", T_IN, CAPACITY, 512),
        ("a read ending a sector past the capacity", T_IN, CAPACITY - 7, 4096),
        ("a write ending a sector past the capacity", T_OUT, CAPACITY - 7, 4096),
        ("a read at sector 2^64-1", T_IN, u64::MAX, 512),
        ("a write whose last sector overflows", T_OUT, u64::MAX - 7, 4096),
        ("a read whose byte offset overflows", T_IN, u64::MAX / 512 + 1, 512),
        ("a write of 513 bytes", T_OUT, 0, 513),
        ("a read of 100 bytes", T_IN, 0, 100),
    ];
    for (case, t, sector, len) in cases {
        let mut g = h.guest();
        let chain = request(&mut g, t, sector, data(t, gpa(DATA), len));
        g.expect_status(&chain, STATUS, S_IOERR, case);
        h.done(g, case, After::Serves);
    }

    let many: Vec<(u64, u32, u32)> = (0..33).map(|i| (i * 8, 8, 0)).collect();
    #[rustfmt::skip]
    let cases = [
        ("a discard past the capacity", T_DISCARD, vec![(CAPACITY - 1, 2, 0)], S_IOERR),
        ("a write-zeroes at sector 2^64-1", T_WRITE_ZEROES, vec![(u64::MAX, 1, 0)], S_IOERR),
        ("a discard whose range overflows", T_DISCARD, vec![(u64::MAX - 1, 4, 0)], S_IOERR),
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
        ("33 discard ranges, above max_discard_seg", T_DISCARD, many, S_IOERR),
        ("a discard with the unmap flag", T_DISCARD, vec![(0, 8, 1)], S_UNSUPP),
        ("a write-zeroes with an unknown flag", T_WRITE_ZEROES, vec![(0, 8, 2)], S_UNSUPP),
    ];
    for (case, t, ranges, status) in cases {
        let mut g = h.guest();
        let len = g.ranges(RANGES, &ranges);
        let chain = request(&mut g, t, 0, r(gpa(RANGES), len));
        g.expect_status(&chain, STATUS, status, case);
        h.done(g, case, After::Serves);
    }

    #[rustfmt::skip]
    let cases = [
        ("a discard payload of 24 bytes", T_DISCARD, r(gpa(RANGES), 24), S_IOERR),
        ("a discard without ranges", T_DISCARD, r(gpa(RANGES), 0), S_IOERR),
        ("a GET_ID buffer of 19 bytes", T_GET_ID, w(gpa(DATA), 19), S_IOERR),
        ("an unknown request type", 0x99, r(gpa(DATA), 512), S_UNSUPP),
        ("GET_LIFETIME, not offered", 10, w(gpa(DATA), 16), S_UNSUPP),
        ("SECURE_ERASE, not offered", 14, r(gpa(RANGES), 16), S_UNSUPP),
    ];
    for (case, t, d, status) in cases {
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
    #[rustfmt::skip]
    let cases = [
        ("an avail index 1000 entries ahead", 1000u16),
        ("an avail index one more than the ring size ahead", 257),
        ("an avail index 0x8000 ahead", 0x8000),
    ];
    for (case, ahead) in cases {
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
