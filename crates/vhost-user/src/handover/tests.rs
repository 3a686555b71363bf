//! Hostile input for the handover receiver: what a compromised old process could send.

use super::frame::{recv_frame, send_frame};
use super::*;
use std::io::Write;

fn hello() -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        device_type: 2,
        num_queues: 1,
        compat_version: 2,
        accepted_compat: vec![1, 2],
        state_formats: vec![FORMAT_VERSION],
    }
}

/// Plays the old process: reads HELLO, then sends `metadata` and `fds` as it would.
fn old_side(metadata: Vec<u8>, fds: Vec<OwnedFd>, chunks: usize) -> UnixStream {
    let (new, old) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        let f = recv_frame(&old, deadline, None, "HELLO").unwrap();
        assert_eq!(f.kind, Kind::Hello);
        send_frame(&old, Kind::Handover, &metadata, &[], deadline).unwrap();
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        for chunk in raw.chunks(chunks.max(1)) {
            send_frame(&old, Kind::Fds, &[], chunk, deadline).unwrap();
        }
        // Keep the socket open until the receiver is done.
        let _ = recv_frame(&old, deadline, None, "the end");
    });
    new
}

fn listener() -> (UnixListener, TempPath) {
    let path = TempPath::new();
    (UnixListener::bind(&path.0).unwrap(), path)
}

struct TempPath(PathBuf);
impl TempPath {
    fn new() -> TempPath {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TempPath(
            std::env::temp_dir().join(format!("outboard-handover-{}-{n}.sock", std::process::id())),
        )
    }
}
impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Metadata naming an upgrade socket and no session.
fn minimal(fd_count: u32) -> Vec<u8> {
    let mut w = StateWriter::new();
    for b in METADATA_MAGIC {
        w.u8(b);
    }
    w.u16(PROTOCOL_VERSION).u32(fd_count);
    w.bool(true).u32(0).bytes(b"").u32(NO_FD);
    w.bool(false);
    w.bool(false);
    w.finish()
}

#[test]
fn a_well_formed_handover_without_a_session_is_received() {
    let (l, _p) = listener();
    let sock = old_side(minimal(1), vec![l.as_fd().try_clone_to_owned().unwrap()], 1);
    let r = receive_handover(sock, &hello()).unwrap();
    assert!(r.session.is_none());
    assert!(r.sockets.listener.is_none());
    assert!(r.sockets.control.file.path.is_none());
}

#[test]
fn truncated_metadata_is_refused() {
    let (l, _p) = listener();
    let mut m = minimal(1);
    m.pop();
    let sock = old_side(m, vec![l.as_fd().try_clone_to_owned().unwrap()], 1);
    let e = receive_handover(sock, &hello()).unwrap_err();
    assert!(
        matches!(e, HandoverError::Malformed { .. }),
        "truncated metadata: {e}"
    );
    // Trailing bytes are refused too.
    let (l, _p) = listener();
    let mut m = minimal(1);
    m.push(0);
    let sock = old_side(m, vec![l.as_fd().try_clone_to_owned().unwrap()], 1);
    let e = receive_handover(sock, &hello()).unwrap_err();
    assert!(e.to_string().contains("trailing"), "{e}");
}

#[test]
fn a_wrong_descriptor_count_is_refused() {
    let (l, _p) = listener();
    // The metadata announces two descriptors, one is sent and named: the second never
    // comes, so the count check fails when the frame after it is not FDS.
    let extra = l.as_fd().try_clone_to_owned().unwrap();
    let sock = old_side(
        minimal(1),
        vec![l.as_fd().try_clone_to_owned().unwrap(), extra],
        2,
    );
    let e = receive_handover(sock, &hello()).unwrap_err();
    assert!(
        matches!(e, HandoverError::FdCount { want: 1, got: 2 }),
        "{e}"
    );
    // Announced and sent, but one is never named.
    let (l, _p) = listener();
    let m = minimal(2);
    let sock = old_side(
        m,
        vec![
            l.as_fd().try_clone_to_owned().unwrap(),
            l.as_fd().try_clone_to_owned().unwrap(),
        ],
        1,
    );
    let e = receive_handover(sock, &hello()).unwrap_err();
    assert!(e.to_string().contains("descriptor 1 is not named"), "{e}");
}

#[test]
fn a_descriptor_of_the_wrong_kind_is_refused() {
    // A pipe where the upgrade socket belongs.
    let (rd, _wr) = nix::unistd::pipe().unwrap();
    let sock = old_side(minimal(1), vec![rd], 1);
    let e = receive_handover(sock, &hello()).unwrap_err();
    assert!(matches!(e, HandoverError::FdKind { .. }), "{e}");
}

#[test]
fn an_index_out_of_range_or_named_twice_is_refused() {
    let (l, _p) = listener();
    let mut w = StateWriter::new();
    for b in METADATA_MAGIC {
        w.u8(b);
    }
    w.u16(PROTOCOL_VERSION).u32(1);
    w.bool(true).u32(0).bytes(b"").u32(0); // the socket's fd again as its reaper pipe
    w.bool(false).bool(false);
    let sock = old_side(w.finish(), vec![l.as_fd().try_clone_to_owned().unwrap()], 1);
    let e = receive_handover(sock, &hello()).unwrap_err();
    assert!(e.to_string().contains("named twice"), "{e}");
    let mut m = minimal(1);
    // The upgrade socket's index (after magic, version, count and the presence byte).
    m[15..19].copy_from_slice(&7u32.to_le_bytes());
    let (l, _p) = listener();
    let sock = old_side(m, vec![l.as_fd().try_clone_to_owned().unwrap()], 1);
    let e = receive_handover(sock, &hello()).unwrap_err();
    assert!(e.to_string().contains("descriptor 7 of 1"), "{e}");
}

#[test]
fn garbage_frames_are_refused() {
    let (new, mut old) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut hello = [0u8; 256];
        let _ = std::io::Read::read(&mut old, &mut hello);
        old.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
    });
    let e = receive_handover(new, &hello()).unwrap_err();
    assert!(e.to_string().contains("bad magic"), "{e}");
    t.join().unwrap();
    // An oversized frame is refused before anything is allocated for it.
    let (new, old) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        let _ = recv_frame(&old, deadline, None, "HELLO");
        let mut h = [0u8; FRAME_HEADER];
        h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&(Kind::Handover as u16).to_le_bytes());
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        (&old).write_all(&h).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    });
    let e = receive_handover(new, &hello()).unwrap_err();
    assert!(e.to_string().contains("exceeds"), "{e}");
    t.join().unwrap();
}

#[test]
fn a_refusal_carries_the_old_processes_reason() {
    let (new, old) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        let f = recv_frame(&old, deadline, None, "HELLO").unwrap();
        let h = Hello::decode(&f.payload).unwrap();
        assert_eq!(h, hello());
        send_frame(&old, Kind::Refused, b"no thanks", &[], deadline).unwrap();
    });
    let e = receive_handover(new, &hello()).unwrap_err();
    assert!(
        matches!(&e, HandoverError::Refused { reason } if reason == "no thanks"),
        "{e}"
    );
    t.join().unwrap();
}

#[test]
fn taken_sent_after_the_old_side_gave_up_fails() {
    let (new, old) = UnixStream::pair().unwrap();
    old.shutdown(std::net::Shutdown::Read).unwrap();
    assert!(
        confirm_taken(&new).is_err(),
        "EPIPE: the new side must not start"
    );
    // One sent before the shutdown is still read.
    let (new, old) = UnixStream::pair().unwrap();
    confirm_taken(&new).unwrap();
    old.shutdown(std::net::Shutdown::Read).unwrap();
    let f = recv_frame(&old, Instant::now() + Duration::from_secs(1), None, "TAKEN").unwrap();
    assert_eq!(f.kind, Kind::Taken);
}

#[test]
fn hello_round_trips_and_rejects_long_lists() {
    let h = hello();
    assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
    let mut w = StateWriter::new();
    w.u16(1).u32(2).u32(1).u16(2).u32(1_000_000);
    assert!(Hello::decode(&w.finish()).is_err());
}
