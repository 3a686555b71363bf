//! A hostile frontend against `vhost-user-blk`: malformed vhost-user messages, wrong file
//! descriptors, messages in orders no well-behaved frontend sends, and frontends that stall. Each
//! is answered as the vhost-user specification says (a failed REPLY_ACK, a zero-sized GET_CONFIG
//! reply) or with a clean disconnect, and never with a crash, a leaked file descriptor, a write
//! to guest memory the driver did not give, or a backend that cannot be stopped.
//!
//! After every case, `Hostile::done` (tests/common/hostile.rs) checks the guest RAM canary, the
//! case's own session, the process, a fresh frontend's verified I/O, and the image file.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use common::blk::{
    assert_accepted, assert_refused, config_msg, header, mem_table, pattern, region, reply_ack,
    single_region, vring_addr, vring_state, IO_TIMEOUT, SECTOR,
};
use common::hostile::*;
use outboard_frontend::queue::{DriverQueue, QueueConfig, RingAddressing, VringSetup};
use outboard_frontend::raw::{FLAG_NEED_REPLY, FLAG_REPLY, VERSION};
use outboard_frontend::{Connection, GuestBuf, GuestRam, NotifyMode, Segment};
use vhost::vhost_user::message::{FrontendReq as R, VhostUserProtocolFeatures as P};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

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
    #[rustfmt::skip]
    let cases = |table: Vec<u8>, fd: RawFd, ram: Vec<u8>| -> [Case; 19] {
        [
            ("SET_MEM_TABLE without the fd", R::SET_MEM_TABLE, table.clone(), vec![]),
            ("SET_MEM_TABLE with two fds for one region", R::SET_MEM_TABLE, table, vec![fd, fd]),
            ("ADD_MEM_REG without an fd", R::ADD_MEM_REG, added.clone(), vec![]),
            ("ADD_MEM_REG with two fds", R::ADD_MEM_REG, added.clone(), vec![mfd, mfd]),
            ("REM_MEM_REG with two fds", R::REM_MEM_REG, single_region(&ram), vec![mfd, mfd]),
            ("SET_VRING_KICK without an fd or the no-fd flag", R::SET_VRING_KICK, u64b(0), vec![]),
            ("SET_VRING_KICK with two fds", R::SET_VRING_KICK, u64b(0), vec![e1, e2]),
            ("SET_VRING_KICK with the no-fd flag and an fd", R::SET_VRING_KICK, u64b(0x100),
                vec![e1]),
            ("SET_VRING_KICK with the no-fd flag (polling)", R::SET_VRING_KICK, u64b(0x100),
                vec![]),
            ("SET_VRING_CALL without an fd or the no-fd flag", R::SET_VRING_CALL, u64b(0), vec![]),
            ("SET_VRING_CALL with two fds", R::SET_VRING_CALL, u64b(0), vec![e1, e2]),
            ("SET_VRING_ERR with two fds", R::SET_VRING_ERR, u64b(0), vec![e1, e2]),
            ("SET_VRING_NUM with an fd", R::SET_VRING_NUM, vring_state(0, 256), vec![e1]),
            ("SET_VRING_ENABLE with an fd", R::SET_VRING_ENABLE, vring_state(0, 1), vec![e1]),
            ("SET_STATUS with an fd", R::SET_STATUS, u64b(0xf), vec![e1]),
            ("SET_CONFIG with an fd", R::SET_CONFIG, config_msg(32, 1, &[1]), vec![e1]),
            ("SET_BACKEND_REQ_FD without an fd", R::SET_BACKEND_REQ_FD, vec![], vec![]),
            ("SET_BACKEND_REQ_FD with two fds", R::SET_BACKEND_REQ_FD, vec![], vec![s1, s2]),
            ("RESET_DEVICE with an fd", R::RESET_DEVICE, vec![], vec![e1]),
        ]
    };
    // Each case on a fresh guest, with the guest's own RAM region: only the fds are wrong.
    for i in 0..19 {
        let mut g = h.guest();
        let (ram, fd, _) = g.ram_region();
        let table = mem_table(std::slice::from_ref(&ram));
        let (case, req, payload, fds) = cases(table, fd, ram).into_iter().nth(i).unwrap();
        assert_refused(g.conn(), code(req), &payload, &fds, case);
        h.done(g, case, After::Serves);
    }

    // Requests with replies of their own cannot be refused with a REPLY_ACK.
    #[rustfmt::skip]
    let cases = [
        ("GET_FEATURES with an fd", R::GET_FEATURES, vec![]),
        ("GET_VRING_BASE with an fd", R::GET_VRING_BASE, vring_state(0, 0)),
    ];
    for (case, req, payload) in cases {
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
    #[rustfmt::skip]
    let cases = [
        ("a pipe as kick", R::SET_VRING_KICK, rd.as_raw_fd()),
        ("a memfd as kick", R::SET_VRING_KICK, m.as_raw_fd()),
        ("a regular file as kick", R::SET_VRING_KICK, file.as_raw_fd()),
        ("a pipe as call", R::SET_VRING_CALL, rd.as_raw_fd()),
        ("a memfd as err", R::SET_VRING_ERR, m.as_raw_fd()),
    ];
    for (case, req, fd) in cases {
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
    #[rustfmt::skip]
    let cases = [
        ("one byte of a header", set_features[..1].to_vec(), vec![]),
        ("a header cut short", set_features[..5].to_vec(), vec![]),
        ("a header cut short, with an fd", set_features[..4].to_vec(), vec![e.as_raw_fd()]),
        ("a payload shorter than announced", short_payload, vec![]),
    ];
    for (case, bytes, fds) in cases {
        let mut g = h.guest();
        g.conn().send_raw_bytes(&bytes, &fds).unwrap();
        g.conn()
            .socket()
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        h.done(g, case, After::Closed);
    }
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
    let (ram, fd, _) = g.ram_region();
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
    #[rustfmt::skip]
    let cases = [
        ("an unknown request with NEED_REPLY", 9999),
        ("request code 0 with NEED_REPLY", 0),
        ("request code 2^32-1 with NEED_REPLY", u32::MAX),
        ("SET_INFLIGHT_FD, not negotiated, with NEED_REPLY", code(R::SET_INFLIGHT_FD)),
        ("VRING_KICK, not supported, with NEED_REPLY", code(R::VRING_KICK)),
        ("SEND_RARP, not for a block device, with NEED_REPLY", code(R::SEND_RARP)),
    ];
    for (case, request) in cases {
        let mut g = h.guest();
        assert_refused(g.conn(), request, &[1, 2, 3], &[], case);
        h.done(g, case, After::Serves);
    }

    #[rustfmt::skip]
    let cases = [
        ("an unknown request without NEED_REPLY", 9999, VERSION),
        ("GET_INFLIGHT_FD, whose reply the backend cannot give", code(R::GET_INFLIGHT_FD),
            VERSION | FLAG_NEED_REPLY),
        ("SET_LOG_BASE without LOG_SHMFD", code(R::SET_LOG_BASE), VERSION | FLAG_NEED_REPLY),
        ("a request with the REPLY flag", code(R::GET_FEATURES), VERSION | FLAG_REPLY),
        ("a request of protocol version 2", code(R::GET_FEATURES), 2),
        ("a request of protocol version 0", code(R::GET_FEATURES), 0),
        ("a request with an unknown flag", code(R::SET_OWNER), VERSION | 0x10),
    ];
    for (case, request, flags) in cases {
        let mut g = h.guest();
        g.conn().send_raw(request, flags, &[], &[]).unwrap();
        h.done(g, case, After::Closed);
    }

    // A known request whose protocol feature was not negotiated, without a way to say no: it
    // is logged and ignored, and the session goes on.
    let case = "SET_INFLIGHT_FD, not negotiated, without NEED_REPLY";
    let mut g = h.guest();
    g.conn()
        .send_raw(code(R::SET_INFLIGHT_FD), VERSION, &[], &[])
        .unwrap();
    h.done(g, case, After::Serves);

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
    use Answer::*;
    let mut h = Hostile::start("payload-sizes", &[]);
    let (e, m) = (eventfd(), memfd(1 << 20));
    let (s1, _s2) = std::os::unix::net::UnixStream::pair().unwrap();
    let (ev, mfd, sock) = (
        vec![e.as_raw_fd()],
        vec![m.as_raw_fd()],
        vec![s1.as_raw_fd()],
    );
    let none = Vec::new();
    let zeros = |n: usize| vec![0u8; n];
    let resized = |mut v: Vec<u8>, len: usize| {
        v.resize(len, 0);
        v
    };
    // Sizes are checked before anything else, so these regions are never looked at.
    let table = mem_table(&[region(0, RAM as u64, 1 << 46, 0)]);
    let mut two = table.clone();
    two[0] = 2;
    let one = single_region(&region(32 << 20, 1 << 20, 1 << 46, 0));
    let state = vring_state(0, 256);
    type Case<'a> = (&'static str, R, Vec<u8>, &'a Vec<RawFd>, Answer);
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("GET_FEATURES with 8 bytes", R::GET_FEATURES, zeros(8), &none, Closed),
        ("SET_FEATURES with 4 bytes", R::SET_FEATURES, zeros(4), &none, Refused),
        ("SET_FEATURES with 12 bytes", R::SET_FEATURES, zeros(12), &none, Refused),
        ("SET_OWNER with 8 bytes", R::SET_OWNER, zeros(8), &none, Refused),
        ("RESET_OWNER with 8 bytes", R::RESET_OWNER, zeros(8), &none, Refused),
        ("SET_MEM_TABLE with 4 bytes", R::SET_MEM_TABLE, vec![1, 0, 0, 0], &none, Refused),
        ("SET_MEM_TABLE with a byte too many", R::SET_MEM_TABLE,
            resized(table.clone(), table.len() + 1), &mfd, Refused),
        ("SET_MEM_TABLE with a byte too few", R::SET_MEM_TABLE,
            resized(table.clone(), table.len() - 1), &mfd, Refused),
        ("SET_MEM_TABLE counting 2 regions, carrying 1", R::SET_MEM_TABLE, two, &mfd, Refused),
        ("SET_VRING_NUM with 4 bytes", R::SET_VRING_NUM, zeros(4), &none, Refused),
        ("SET_VRING_NUM with 12 bytes", R::SET_VRING_NUM, resized(state, 12), &none, Refused),
        ("SET_VRING_ADDR with 39 bytes", R::SET_VRING_ADDR, zeros(39), &none, Refused),
        ("SET_VRING_ADDR with 41 bytes", R::SET_VRING_ADDR, zeros(41), &none, Refused),
        ("SET_VRING_BASE with 4 bytes", R::SET_VRING_BASE, zeros(4), &none, Refused),
        ("GET_VRING_BASE with 4 bytes", R::GET_VRING_BASE, zeros(4), &none, Closed),
        ("GET_VRING_BASE with 12 bytes", R::GET_VRING_BASE, zeros(12), &none, Closed),
        ("SET_VRING_KICK with 4 bytes", R::SET_VRING_KICK, zeros(4), &ev, Refused),
        ("SET_VRING_CALL with 12 bytes", R::SET_VRING_CALL, zeros(12), &ev, Refused),
        ("SET_VRING_ERR with no payload", R::SET_VRING_ERR, vec![], &ev, Refused),
        ("GET_PROTOCOL_FEATURES with 8 bytes", R::GET_PROTOCOL_FEATURES, zeros(8), &none, Closed),
        ("SET_PROTOCOL_FEATURES with 4 bytes", R::SET_PROTOCOL_FEATURES, zeros(4), &none, Refused),
        ("GET_QUEUE_NUM with 8 bytes", R::GET_QUEUE_NUM, zeros(8), &none, Closed),
        ("SET_VRING_ENABLE with 4 bytes", R::SET_VRING_ENABLE, zeros(4), &none, Refused),
        ("SET_BACKEND_REQ_FD with 4 bytes", R::SET_BACKEND_REQ_FD, zeros(4), &sock, Refused),
        ("GET_CONFIG with a short header", R::GET_CONFIG, zeros(8), &none, ZeroConfig),
        ("GET_CONFIG with less data than its size", R::GET_CONFIG,
            config_msg(0, 8, &[0; 4]), &none, ZeroConfig),
        ("GET_CONFIG with more data than its size", R::GET_CONFIG,
            config_msg(0, 8, &[0; 9]), &none, ZeroConfig),
        ("GET_CONFIG of size zero", R::GET_CONFIG, config_msg(0, 0, &[]), &none, ZeroConfig),
        ("SET_CONFIG with a short header", R::SET_CONFIG, zeros(8), &none, Refused),
        ("SET_CONFIG with more data than its size", R::SET_CONFIG,
            config_msg(32, 1, &[0, 0]), &none, Refused),
        ("RESET_DEVICE with 8 bytes", R::RESET_DEVICE, zeros(8), &none, Refused),
        ("GET_MAX_MEM_SLOTS with 8 bytes", R::GET_MAX_MEM_SLOTS, zeros(8), &none, Closed),
        ("ADD_MEM_REG with 32 bytes", R::ADD_MEM_REG, resized(one.clone(), 32), &mfd, Refused),
        ("ADD_MEM_REG with 48 bytes", R::ADD_MEM_REG, resized(one.clone(), 48), &mfd, Refused),
        ("REM_MEM_REG with 32 bytes", R::REM_MEM_REG, resized(one, 32), &none, Refused),
        ("SET_STATUS with 1 byte", R::SET_STATUS, vec![0xf], &none, Refused),
        ("SET_STATUS with 4 bytes", R::SET_STATUS, vec![0xf, 0, 0, 0], &none, Refused),
        ("GET_STATUS with 8 bytes", R::GET_STATUS, zeros(8), &none, Closed),
        ("SET_LOG_FD with 8 bytes", R::SET_LOG_FD, zeros(8), &ev, Refused),
    ];
    for (case, req, payload, fds, answer) in cases {
        let mut g = h.guest();
        let after = match answer {
            Refused => {
                assert_refused(g.conn(), code(req), &payload, fds, case);
                After::Serves
            }
            Closed => {
                g.conn()
                    .send_raw(code(req), VERSION | FLAG_NEED_REPLY, &payload, fds)
                    .unwrap();
                After::Closed
            }
            ZeroConfig => {
                let reply = g
                    .conn()
                    .raw_request(code(req), VERSION, &payload, fds)
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
        let (ram, fd, uaddr) = g.ram_region();
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
    let (ram, fd, _) = g.ram_region();
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
    #[rustfmt::skip]
    let cases: Vec<(&str, R, Vec<u8>, Vec<RawFd>)> = vec![
        ("a ring size of 100", R::SET_VRING_NUM, vring_state(0, 100), vec![]),
        ("a ring size of 512, above the maximum", R::SET_VRING_NUM, vring_state(0, 512), vec![]),
        ("a ring size of 0", R::SET_VRING_NUM, vring_state(0, 0), vec![]),
        ("a ring size of 2^32-1", R::SET_VRING_NUM, vring_state(0, u32::MAX), vec![]),
        ("SET_VRING_NUM of ring 1 on a one-queue device", R::SET_VRING_NUM, vring_state(1, 256),
            vec![]),
        ("SET_VRING_NUM of ring 255", R::SET_VRING_NUM, vring_state(255, 256), vec![]),
        ("SET_VRING_BASE of ring 255", R::SET_VRING_BASE, vring_state(255, 0), vec![]),
        ("SET_VRING_BASE of 65536", R::SET_VRING_BASE, vring_state(0, 65536), vec![]),
        ("SET_VRING_BASE of 2^32-1", R::SET_VRING_BASE, vring_state(0, u32::MAX), vec![]),
        ("SET_VRING_ENABLE of ring 255", R::SET_VRING_ENABLE, vring_state(255, 1), vec![]),
        ("SET_VRING_ENABLE with 2", R::SET_VRING_ENABLE, vring_state(0, 2), vec![]),
        ("SET_VRING_KICK of ring 255", R::SET_VRING_KICK, u64b(255), vec![ev]),
        ("SET_VRING_KICK with reserved bits", R::SET_VRING_KICK, u64b(0x200), vec![ev]),
        ("SET_VRING_CALL of ring 255", R::SET_VRING_CALL, u64b(255), vec![ev]),
        ("SET_VRING_ERR of ring 255", R::SET_VRING_ERR, u64b(255), vec![ev]),
        ("SET_VRING_ADDR of ring 255", R::SET_VRING_ADDR, vring_addr(255, 0, 0, 0, 0), vec![]),
        ("SET_VRING_ADDR with unknown flags", R::SET_VRING_ADDR, vring_addr(0, 2, 0, 0, 0), vec![]),
        ("SET_VRING_ADDR outside guest memory", R::SET_VRING_ADDR,
            vring_addr(0, 0, 0x1000, 0x1000, 0x1000), vec![]),
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
    #[rustfmt::skip]
    let cases = [
        ("half a header", set_features[..6].to_vec()),
        ("a header without its payload", set_features.to_vec()),
    ];
    for (case, bytes) in cases {
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
    let (ram, fd, _) = g.ram_region();
    // The first half of the guest's RAM: overlapping, and not the same region (an identical one
    // is counted and accepted, as QEMU sends each region once per virtio-net queue pair).
    let mut half = ram.clone();
    let size = u64::from_ne_bytes(ram[8..16].try_into().unwrap());
    half[8..16].copy_from_slice(&(size / 2).to_ne_bytes());
    let overlapping = single_region(&half);
    for _ in 0..200 {
        let e = eventfd();
        let ev = e.as_raw_fd();
        let conn = g.conn();
        let refused: [(R, Vec<u8>, Vec<RawFd>); 7] = [
            (
                R::SET_MEM_TABLE,
                mem_table(std::slice::from_ref(&ram)),
                vec![fd, mfd],
            ),
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
    #[rustfmt::skip]
    let cases = [
        ("SET_LOG_BASE with 8 bytes", R::SET_LOG_BASE, vec![0; 8], vec![lfd]),
        ("SET_LOG_BASE without an fd", R::SET_LOG_BASE, log_msg(4096, 0), vec![]),
        ("SET_LOG_BASE of size zero", R::SET_LOG_BASE, log_msg(0, 0), vec![lfd]),
        ("SET_LOG_BASE beyond its file", R::SET_LOG_BASE, log_msg(8192, 0), vec![lfd]),
        ("SET_LOG_BASE whose end overflows", R::SET_LOG_BASE, log_msg(4096, u64::MAX - 100),
            vec![lfd]),
        ("SET_DEVICE_STATE_FD with 4 bytes", R::SET_DEVICE_STATE_FD, vec![0; 4], vec![pfd]),
        ("SET_DEVICE_STATE_FD without an fd", R::SET_DEVICE_STATE_FD, state(0, 0), vec![]),
        ("CHECK_DEVICE_STATE with 8 bytes", R::CHECK_DEVICE_STATE, vec![0; 8], vec![]),
    ];
    for (case, req, payload, fds) in cases {
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

    #[rustfmt::skip]
    let cases = [
        ("a state transfer in an unknown direction", 7, 0),
        ("a state transfer in an unknown phase", 0, 9),
    ];
    for (case, direction, phase) in cases {
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

    #[rustfmt::skip]
    let cases = [
        ("a state load of garbage", pattern(9, 4096)),
        ("a state load of nothing", Vec::new()),
        ("a state load larger than any state", vec![0; 2 << 20]),
    ];
    for (case, blob) in cases {
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

/// A frontend that stalls a state transfer (a load pipe it never closes, a save pipe it never
/// reads) and then hangs up does not keep the backend: the control thread notices the hang-up
/// while CHECK_DEVICE_STATE waits, abandoned transfer threads are cancelled and joined, and the
/// next frontend is served. Repeated, the backend's thread count does not grow.
#[test]
fn a_frontend_that_hangs_up_during_a_stalled_transfer_leaves_no_thread_behind() {
    let mut h = Hostile::start("state-hangup", &[]);
    let protocol =
        outboard_frontend::device::default_protocol_features() | P::LOG_SHMFD | P::DEVICE_STATE;
    let pid = h.b.backend.child.id();
    let baseline = common::proc::threads(pid).len();
    for round in 0..5 {
        // A load that waits on a pipe the frontend keeps, checked, then a hang-up.
        let mut g = h.guest_with(h.builder().protocol_features(protocol));
        let (rd, wr) = pipe();
        let payload = [1u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat();
        g.conn()
            .raw_request(
                code(R::SET_DEVICE_STATE_FD),
                VERSION,
                &payload,
                &[rd.as_raw_fd()],
            )
            .unwrap()
            .expect("SET_DEVICE_STATE_FD replies");
        drop(rd);
        g.conn()
            .send_raw(code(R::CHECK_DEVICE_STATE), VERSION, &[], &[])
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // The hang-up (before the driver's own teardown, which would wait for replies).
        g.conn().shutdown();
        drop(g);
        // A save into a pipe nobody reads, never checked, then a hang-up.
        let mut g = h.guest_with(h.builder().protocol_features(protocol));
        let (rd2, wr2) = pipe();
        let payload = [0u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat();
        g.conn()
            .raw_request(
                code(R::SET_DEVICE_STATE_FD),
                VERSION,
                &payload,
                &[wr2.as_raw_fd()],
            )
            .unwrap()
            .expect("SET_DEVICE_STATE_FD replies");
        drop(wr2);
        g.conn().shutdown();
        drop(g);
        // The next frontend is served, with the stalled pipes still open on our side.
        let g = h.guest();
        h.done(
            g,
            &format!("after stalled transfers, round {round}"),
            After::Serves,
        );
        drop((wr, rd2));
    }
    // Threads of the last session may still be on their way out on a busy machine: wait for
    // them (bounded); a thread left behind never goes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut now = common::proc::threads(pid).len();
    while now > baseline && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = common::proc::threads(pid).len();
    }
    assert!(
        now <= baseline,
        "transfer threads left behind: {baseline} threads before, {now} after 10 s"
    );
}
