//! Session setup against a scripted in-process backend, for what QSD does not offer (the
//! STATUS protocol feature): the exact message order, the status walk and its failure path.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;

use outboard_frontend::raw::{self, MsgHeader, FLAG_REPLY, VERSION};
use outboard_frontend::{SessionBuilder, SessionError};
use vhost::vhost_user::message::{FrontendReq as R, VhostUserProtocolFeatures as P};

/// One message as the backend saw it: request, u64 payload (if 8 bytes), number of fds.
type Seen = (u32, Option<u64>, usize);

/// Serves one connection: answers GET_* from `status_after_features_ok` and the offers below,
/// records everything else, until the frontend hangs up.
fn scripted_backend(name: &str, status_after_features_ok: u64) -> (PathBuf, JoinHandle<Vec<Seen>>) {
    let dir = std::env::temp_dir().join(format!("outboard-scripted-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut seen = Vec::new();
        let mut status = 0u64;
        while let Ok(Some(m)) = raw::recv_message(&sock, None) {
            let code = m.header.request;
            let v = m.payload_u64();
            seen.push((code, v, m.fds.len()));
            let reply = |value: u64| reply_u64(&sock, code, value);
            match code {
                c if c == R::GET_FEATURES as u32 => reply(1 << 32 | 1 << 30),
                c if c == R::GET_PROTOCOL_FEATURES as u32 => reply(P::STATUS.bits()),
                c if c == R::SET_STATUS as u32 => {
                    status = v.unwrap();
                    if status & 0x8 != 0 {
                        status = status_after_features_ok;
                    }
                }
                c if c == R::GET_STATUS as u32 => reply(status),
                _ => {}
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        seen
    });
    (path, handle)
}

fn reply_u64(sock: &UnixStream, code: u32, value: u64) {
    let hdr = MsgHeader::new(code, VERSION | FLAG_REPLY, 8);
    raw::send_message(sock, &hdr, &value.to_ne_bytes(), &[]).unwrap();
}

#[test]
fn setup_walks_the_status_byte_around_set_features() {
    let (path, backend) = scripted_backend("walk", 0xb);
    let s = SessionBuilder::new(&path).connect().unwrap();
    assert_eq!(s.status(), 0xf, "DRIVER_OK set last");
    assert!(s.negotiated().has_protocol(P::STATUS));
    drop(s);
    let seen = backend.join().unwrap();
    let expected: Vec<Seen> = vec![
        (R::GET_FEATURES as u32, None, 0),
        (R::GET_PROTOCOL_FEATURES as u32, None, 0),
        (R::SET_PROTOCOL_FEATURES as u32, Some(P::STATUS.bits()), 0),
        (R::SET_OWNER as u32, None, 0),
        (R::SET_STATUS as u32, Some(0x1), 0),
        (R::SET_STATUS as u32, Some(0x3), 0),
        (R::SET_FEATURES as u32, Some(1 << 32 | 1 << 30), 0),
        (R::SET_STATUS as u32, Some(0xb), 0),
        (R::GET_STATUS as u32, None, 0),
    ];
    assert_eq!(seen[..expected.len()], expected[..]);
    let rest: Vec<(u32, usize)> = seen[expected.len()..]
        .iter()
        .map(|&(c, _, fds)| (c, fds))
        .collect();
    assert_eq!(
        rest,
        vec![
            (R::SET_MEM_TABLE as u32, 1),
            (R::SET_VRING_NUM as u32, 0),
            (R::SET_VRING_ADDR as u32, 0),
            (R::SET_VRING_BASE as u32, 0),
            (R::SET_VRING_CALL as u32, 1),
            (R::SET_VRING_KICK as u32, 1),
            (R::SET_VRING_ENABLE as u32, 0),
            (R::SET_STATUS as u32, 0),
        ]
    );
    assert_eq!(seen.last().unwrap().1, Some(0xf));
}

#[test]
fn features_ok_that_does_not_stick_fails_setup() {
    let (path, backend) = scripted_backend("reject", 0x3);
    let err = SessionBuilder::new(&path).connect().unwrap_err();
    assert!(
        matches!(err, SessionError::FeaturesRejected { status: 0x3 }),
        "{err:?}"
    );
    let seen = backend.join().unwrap();
    assert_eq!(
        seen.last().unwrap().0,
        R::GET_STATUS as u32,
        "stopped right there"
    );
}
