//! Live migration of a virtio-net device on `vhost-user-net --switch`: the device of one port
//! moves to another port with the same MAC (a fresh device on the same L2 switch, like a VM
//! arriving on another host of the same network) and back, again and again, while numbered
//! frames flow both ways. Every frame sent is received exactly once and in order, and the
//! device state (MAC, filters, queue pairs) is refused by a port configured otherwise.

mod common;
mod net_common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Backend, TempDir};
use net_common::*;
use outboard_frontend::migration::migration_protocol_features;
use outboard_frontend::{NetDriver, NetHdr, NetOptions, SessionBuilder};

const MAC_A_TEXT: &str = "52:54:00:00:00:0a";
const MAC_B_TEXT: &str = "52:54:00:00:00:0b";
const WAIT: Duration = Duration::from_secs(10);

/// A switch with ports 0 and 2 configured alike (MAC A) and port 1 with MAC B.
fn start_switch(tag: &str) -> (Backend, Vec<PathBuf>, TempDir) {
    let dir = TempDir::new(tag);
    let sockets: Vec<PathBuf> = (0..3).map(|i| dir.path(&format!("port{i}.sock"))).collect();
    let mut args = vec!["--switch".to_string()];
    for (s, mac) in sockets.iter().zip([MAC_A_TEXT, MAC_B_TEXT, MAC_A_TEXT]) {
        args.extend(["--socket-path".into(), s.display().to_string()]);
        args.extend(["--mac".into(), mac.into()]);
    }
    let backend = Backend::start(PROGRAM, &sockets[0], &args, dir.path("backend.log"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !sockets.iter().all(|s| s.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "not every port listens"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (backend, sockets, dir)
}

/// Frame number `n` from `src` to `dst`, of a length that varies with `n`.
fn numbered(dst: [u8; 6], src: [u8; 6], n: u32) -> Vec<u8> {
    let mut f = frame(dst, src, 64 + (n as usize * 37) % 1400, n as u8);
    f[14..18].copy_from_slice(&n.to_le_bytes());
    f
}

fn number(f: &[u8]) -> u32 {
    u32::from_le_bytes(f[14..18].try_into().unwrap())
}

/// Receives frames on `d` until `count` more have arrived; checks they are `first..`, in order.
fn receive_in_order(d: &mut NetDriver, first: u32, count: u32, what: &str) {
    for n in first..first + count {
        let p = d
            .rx(0)
            .unwrap()
            .recv(WAIT)
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: frame {n} never arrived"));
        assert_eq!(
            number(&p.frame),
            n,
            "{what}: frames lost, duplicated or reordered"
        );
        assert_eq!(
            p.frame.len(),
            numbered(MAC_B, MAC_A, n).len(),
            "{what}: frame {n}"
        );
    }
}

#[test]
fn numbered_frames_cross_repeated_net_migrations_exactly_once_in_order() {
    let (mut backend, ports, _dir) = start_switch("mig-net");
    let opts = NetOptions::default();
    let mut a = connect(
        SessionBuilder::new(&ports[0]).protocol_features(migration_protocol_features()),
        opts,
    );
    let mut b = connect(SessionBuilder::new(&ports[1]), opts);
    let (mut a_to_b, mut b_to_a) = (0u32, 0u32);
    for hop in 0..20 {
        // A burst from A, kicked but not waited for: frames are in flight at the stop.
        for _ in 0..24 {
            let tx = a.tx(0).unwrap();
            tx.add(NetHdr::default(), &numbered(MAC_B, MAC_A, a_to_b))
                .unwrap();
            a_to_b += 1;
        }
        a.tx(0).unwrap().kick().unwrap();
        let dest = &ports[if hop % 2 == 0 { 2 } else { 0 }];
        let m = a.session().migrate(dest, None).unwrap();
        assert!(m.state_len.unwrap() > 0, "the net device has state");
        // The destination sends first: the switch learns where A is now.
        for _ in 0..8 {
            a.tx(0)
                .unwrap()
                .send(NetHdr::default(), &numbered(MAC_B, MAC_A, a_to_b))
                .unwrap();
            a_to_b += 1;
        }
        a.tx(0).unwrap().flush().unwrap();
        receive_in_order(&mut b, a_to_b - 32, 32, "A to B");
        for _ in 0..16 {
            b.tx(0)
                .unwrap()
                .add(NetHdr::default(), &numbered(MAC_A, MAC_B, b_to_a))
                .unwrap();
            b_to_a += 1;
        }
        b.tx(0).unwrap().flush().unwrap();
        receive_in_order(&mut a, b_to_a - 16, 16, "B to A");
    }
    assert!(drain(&mut a, 0).is_empty(), "A received frames nobody sent");
    assert!(drain(&mut b, 0).is_empty(), "B received frames nobody sent");
    backend.assert_alive();
}

#[test]
fn a_net_state_is_refused_by_a_port_configured_otherwise() {
    let (mut backend, ports, _dir) = start_switch("mig-net-refuse");
    let mut a = connect(
        SessionBuilder::new(&ports[0]).protocol_features(migration_protocol_features()),
        NetOptions::default(),
    );
    // Port 1 is configured with MAC B; A's state says MAC A.
    let e = a.session().migrate(&ports[1], None).unwrap_err();
    assert!(e.is_refusal(), "{}", error_chain(&e));
    let log = backend.log_text();
    assert!(log.contains("device state transfer failed"), "{log}");
    // A still serves on port 0: a frame to B arrives once B is there.
    let mut b = connect(SessionBuilder::new(&ports[1]), NetOptions::default());
    a.tx(0)
        .unwrap()
        .send(NetHdr::default(), &numbered(MAC_B, MAC_A, 7))
        .unwrap();
    a.tx(0).unwrap().flush().unwrap();
    receive_in_order(&mut b, 7, 1, "A to B after the refusal");
    backend.assert_alive();
}
