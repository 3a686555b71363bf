//! The frontend against a real vhost-user-blk backend: qemu-storage-daemon (QSD).
//!
//! Each test starts its own QSD on a socket in a unique temporary directory and kills it when
//! the test ends, even on panic. Tests skip (with a printed reason) when `qemu-storage-daemon`
//! is not on PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use outboard_frontend::queue::{RawDescriptor, Segment};
use outboard_frontend::raw::{FLAG_NEED_REPLY, FLAG_REPLY, VERSION};
use outboard_frontend::{
    BlkCompletion, BlkDriver, BlkOptions, BlkRange, BlkRequest, BlkStatus, NotifyMode,
    SessionBuilder, WaitMode,
};
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const NULL_SIZE: u64 = 64 << 20;
const IMG_SIZE: u64 = 16 << 20;

/// A running qemu-storage-daemon with a vhost-user-blk export and a QMP monitor; killed on
/// drop.
struct Qsd {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    qmp: PathBuf,
}

enum Backing {
    /// null-co, reads return zeroes.
    Null,
    /// A raw image file in the test's directory.
    File,
}

impl Qsd {
    /// Starts QSD, or returns `None` (after printing why) when it is not installed.
    fn start(test: &str, backing: Backing, queues: u16) -> Option<Qsd> {
        if Command::new("qemu-storage-daemon")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("skipping {test}: qemu-storage-daemon is not on PATH (Debian: qemu-utils)");
            return None;
        }
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "outboard-qsd-{}-{}-{test}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("vhost-user-blk.sock");
        let qmp = dir.join("qmp.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0");
        match backing {
            Backing::Null => {
                cmd.arg("--blockdev").arg(format!(
                    "driver=null-co,node-name=d0,size={NULL_SIZE},read-zeroes=on"
                ));
            }
            Backing::File => {
                let img = dir.join("disk.img");
                std::fs::File::create(&img)
                    .unwrap()
                    .set_len(IMG_SIZE)
                    .unwrap();
                cmd.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=f0,filename={},discard=unmap",
                        img.display()
                    ))
                    .arg("--blockdev")
                    .arg("driver=raw,node-name=d0,file=f0,discard=unmap");
            }
        }
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            sock.display()
        ));
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        Some(Qsd {
            child,
            dir,
            sock,
            qmp,
        })
    }

    /// Runs one QMP command and returns the response line.
    fn qmp(&self, command: &str) -> String {
        use std::io::{BufRead, BufReader, Write};
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(&self.qmp) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("QMP connect: {e}"),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        let reply = |r: &mut BufReader<_>| loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "QMP closed");
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return line;
            }
        };
        let mut greeting = String::new();
        r.read_line(&mut greeting).unwrap();
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .unwrap();
        reply(&mut r);
        w.write_all(command.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        reply(&mut r)
    }

    fn sock(&self) -> &Path {
        &self.sock
    }

    fn image(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deterministic test data: a different byte pattern per `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn setup_negotiates_protocol_features_with_qsd() {
    let Some(qsd) = Qsd::start("setup", Backing::Null, 2) else {
        return;
    };
    let mut s = SessionBuilder::new(qsd.sock()).queues(2).connect().unwrap();
    let n = *s.negotiated();
    eprintln!("QSD negotiated: {n:#x?}");
    use VhostUserProtocolFeatures as P;
    for f in [P::MQ, P::REPLY_ACK, P::CONFIG] {
        assert!(n.has_protocol(f), "{f:?} not negotiated: {n:?}");
    }
    assert!(n.features_acked & (1 << 32) != 0, "VERSION_1");
    assert!(n.features_acked & (1 << 30) != 0, "protocol features bit");
    assert_eq!(n.features_acked & !n.features_offered, 0, "acked ⊆ offered");
    assert!(n.max_queues.unwrap() >= 2);
    assert_eq!(s.get_queue_num().unwrap(), n.max_queues.unwrap());
    assert!(s.is_started(0) && s.is_started(1));
    let bases = s.disconnect().unwrap();
    assert_eq!(bases, vec![Some(0), Some(0)], "no request was made");
}

#[test]
fn config_reports_the_null_device() {
    let Some(qsd) = Qsd::start("config", Backing::Null, 2) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock()).queues(2)).unwrap();
    let c = blk.config().clone();
    eprintln!("QSD blk config: {c:?}");
    assert_eq!(c.capacity_bytes(), NULL_SIZE);
    assert_eq!(c.num_queues, Some(2));
    assert_eq!(c.blk_size, Some(512));
    assert!(c.seg_max.unwrap() >= 1);
    assert_eq!(blk.refresh_config().unwrap().capacity, c.capacity);
    // null-co with read-zeroes: a read returns zeroes.
    let mut buf = vec![0xaa; 8192];
    assert_eq!(blk.queue(1).read(100, &mut buf).unwrap(), BlkStatus::Ok);
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn writes_read_back_across_two_queues_and_reach_the_image() {
    let Some(qsd) = Qsd::start("rw", Backing::File, 2) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock()).queues(2)).unwrap();
    let a = pattern(1, 64 << 10);
    // Larger than one slot buffer (128 KiB): split into several requests.
    let b = pattern(2, 300 << 10);
    assert_eq!(blk.queue(0).write(0, &a).unwrap(), BlkStatus::Ok);
    assert_eq!(blk.queue(1).write(1024, &b).unwrap(), BlkStatus::Ok);
    let mut ra = vec![0; a.len()];
    let mut rb = vec![0; b.len()];
    assert_eq!(blk.queue(1).read(0, &mut ra).unwrap(), BlkStatus::Ok);
    assert_eq!(blk.queue(0).read(1024, &mut rb).unwrap(), BlkStatus::Ok);
    assert!(ra == a, "queue 1 read back what queue 0 wrote");
    assert!(rb == b, "queue 0 read back what queue 1 wrote");
    assert_eq!(blk.queue(0).flush().unwrap(), BlkStatus::Ok);
    let img = std::fs::read(qsd.image()).unwrap();
    assert!(img[..a.len()] == a[..], "data is in the image file");
    assert!(img[1024 * 512..1024 * 512 + b.len()] == b[..]);
    let id = blk.queue(1).get_id().unwrap();
    eprintln!("GET_ID: {id:?}");
}

#[test]
fn flush_completes_ok_on_every_queue() {
    let Some(qsd) = Qsd::start("flush", Backing::File, 2) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock()).queues(2)).unwrap();
    for q in blk.queues_mut() {
        assert_eq!(q.write(8, &pattern(3, 4096)).unwrap(), BlkStatus::Ok);
        assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
    }
}

#[test]
fn write_zeroes_and_discard_clear_data() {
    let Some(qsd) = Qsd::start("zeroes", Backing::File, 1) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock())).unwrap();
    eprintln!(
        "discard {:?}, write zeroes {:?}",
        blk.config().discard,
        blk.config().write_zeroes
    );
    let q = blk.queue(0);
    let data = pattern(4, 16 << 10);
    assert_eq!(q.write(64, &data).unwrap(), BlkStatus::Ok);
    let r = BlkRange {
        sector: 64,
        num_sectors: 16,
    };
    assert_eq!(q.write_zeroes(&[r], false).unwrap(), BlkStatus::Ok);
    let mut back = vec![0xff; data.len()];
    assert_eq!(q.read(64, &mut back).unwrap(), BlkStatus::Ok);
    assert!(back[..8192].iter().all(|&b| b == 0), "zeroed range");
    assert!(back[8192..] == data[8192..], "rest untouched");
    assert_eq!(q.discard(&[r]).unwrap(), BlkStatus::Ok);
    // An unknown request type is refused, not fatal.
    let odd = BlkRequest {
        op: outboard_frontend::BlkOp::Other {
            code: 0x7777,
            device_writes: false,
        },
        sector: 0,
        len: 512,
    };
    assert_eq!(q.request(odd, |_| {}).unwrap().status, BlkStatus::Unsupp);
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok);
}

#[test]
fn resize_sends_config_change_on_the_backend_channel() {
    let Some(qsd) = Qsd::start("resize", Backing::File, 1) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock())).unwrap();
    assert_eq!(blk.config().capacity_bytes(), IMG_SIZE);
    let mut channel = blk
        .session()
        .take_backend_channel()
        .expect("QSD negotiates BACKEND_REQ");
    assert!(!channel
        .recv_config_change(Duration::from_millis(50))
        .unwrap());
    let r = qsd.qmp(&format!(
        r#"{{"execute":"block_resize","arguments":{{"node-name":"d0","size":{}}}}}"#,
        2 * IMG_SIZE
    ));
    assert!(r.contains("return"), "block_resize: {r}");
    assert!(channel.recv_config_change(Duration::from_secs(10)).unwrap());
    assert_eq!(channel.config_changes(), 1);
    assert_eq!(blk.refresh_config().unwrap().capacity_bytes(), 2 * IMG_SIZE);
    // The new space is usable.
    let last = 2 * IMG_SIZE / 512 - 8;
    assert_eq!(
        blk.queue(0).write(last, &pattern(8, 4096)).unwrap(),
        BlkStatus::Ok
    );
}

#[test]
fn io_works_without_event_idx_and_with_indirect_descriptors() {
    let Some(qsd) = Qsd::start("ring-variants", Backing::File, 1) else {
        return;
    };
    let no_event_idx = outboard_frontend::blk::BLK_FEATURES & !(1 << 29);
    for (features, indirect, notify) in [
        (no_event_idx, false, NotifyMode::Interrupt),
        (no_event_idx, false, NotifyMode::Poll),
        (
            outboard_frontend::blk::BLK_FEATURES,
            true,
            NotifyMode::Interrupt,
        ),
    ] {
        let opts = BlkOptions {
            indirect,
            ..BlkOptions::default()
        };
        let builder = SessionBuilder::new(qsd.sock())
            .features(features)
            .notify(notify);
        let mut blk = BlkDriver::connect_with(builder, opts).unwrap();
        assert_eq!(
            blk.session().negotiated().features_acked & (1 << 29) != 0,
            features & (1 << 29) != 0
        );
        let q = blk.queue(0);
        let size = usize::from(q.driver_queue().size());
        for slot in 0..32u16 {
            q.slot_data(slot)
                .write_at(0, &pattern(200 + u64::from(slot), 4096));
            q.submit(slot, BlkRequest::write(u64::from(slot) * 8, 4096))
                .unwrap();
        }
        let per_request = if indirect { 1 } else { 3 };
        assert_eq!(q.driver_queue().free_descriptors(), size - 32 * per_request);
        q.kick().unwrap();
        let mut done = Vec::new();
        q.drain(&mut done).unwrap();
        assert!(done.iter().all(|c| c.status == BlkStatus::Ok));
        let mut back = vec![0; 4096];
        assert_eq!(q.read(31 * 8, &mut back).unwrap(), BlkStatus::Ok);
        assert!(
            back == pattern(231, 4096),
            "{features:#x} {indirect} {notify:?}"
        );
        blk.disconnect().unwrap();
    }
}

#[test]
fn batched_qd32_requests_complete_with_their_data() {
    let Some(qsd) = Qsd::start("qd32", Backing::File, 1) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock())).unwrap();
    let q = blk.queue(0);
    assert_eq!(q.slots(), 32);
    let kicks_before = q.driver_queue().stats().kicks;
    for slot in 0..32u16 {
        q.slot_data(slot)
            .write_at(0, &pattern(100 + u64::from(slot), 4096));
        q.submit(slot, BlkRequest::write(u64::from(slot) * 8, 4096))
            .unwrap();
    }
    assert!(q.kick().unwrap() || q.driver_queue().stats().kicks_suppressed > 0);
    assert!(
        q.driver_queue().stats().kicks - kicks_before <= 1,
        "one kick per batch"
    );
    let mut done: Vec<BlkCompletion> = Vec::new();
    q.drain(&mut done).unwrap();
    assert_eq!(done.len(), 32);
    assert!(done.iter().all(|c| c.status == BlkStatus::Ok));
    // Read back in one batch, each slot reading another slot's sector.
    for slot in 0..32u16 {
        q.slot_data(slot).fill(0, 4096, 0);
        let src = (slot + 7) % 32;
        q.submit(slot, BlkRequest::read(u64::from(src) * 8, 4096))
            .unwrap();
    }
    q.kick().unwrap();
    done.clear();
    q.drain(&mut done).unwrap();
    assert_eq!(done.len(), 32);
    for c in &done {
        assert_eq!(c.status, BlkStatus::Ok);
        assert_eq!(c.used_len, 4097, "data plus status byte");
        let mut got = vec![0; 4096];
        q.slot_data(c.slot).read_at(0, &mut got);
        let src = (c.slot + 7) % 32;
        assert!(
            got == pattern(100 + u64::from(src), 4096),
            "slot {}",
            c.slot
        );
    }
}

#[test]
fn get_vring_base_stops_the_ring_at_the_avail_index_and_it_restarts() {
    let Some(qsd) = Qsd::start("vring-base", Backing::File, 2) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock()).queues(2)).unwrap();
    for i in 0..10u64 {
        assert_eq!(
            blk.queue(0).write(i * 8, &pattern(i, 4096)).unwrap(),
            BlkStatus::Ok
        );
    }
    assert_eq!(blk.queue(0).driver_queue().avail_idx(), 10);
    let base = blk.session().stop_queue(0).unwrap();
    assert_eq!(base, 10);
    assert_eq!(blk.session().stop_queue(1).unwrap(), 0);
    blk.session().start_queue(0, base as u16).unwrap();
    blk.session().start_queue(1, 0).unwrap();
    let mut back = vec![0; 4096];
    assert_eq!(blk.queue(0).read(9 * 8, &mut back).unwrap(), BlkStatus::Ok);
    assert!(back == pattern(9, 4096));
    assert_eq!(blk.queue(1).read(0, &mut back).unwrap(), BlkStatus::Ok);
    assert!(back == pattern(0, 4096));
}

#[test]
fn reconnect_replays_setup_and_keeps_serving_io() {
    let Some(qsd) = Qsd::start("reconnect", Backing::File, 1) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock())).unwrap();
    let data = pattern(5, 8192);
    assert_eq!(blk.queue(0).write(16, &data).unwrap(), BlkStatus::Ok);
    blk.reconnect().unwrap();
    let mut back = vec![0; data.len()];
    assert_eq!(blk.queue(0).read(16, &mut back).unwrap(), BlkStatus::Ok);
    assert!(back == data);
    assert_eq!(blk.disconnect().unwrap(), vec![Some(2)]);
    // A brand-new session on the same export sees the data too.
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock())).unwrap();
    assert_eq!(blk.queue(0).read(16, &mut back).unwrap(), BlkStatus::Ok);
    assert!(back == data);
}

#[test]
fn need_reply_on_every_message_is_acked() {
    let Some(qsd) = Qsd::start("need-reply", Backing::Null, 1) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock()).need_reply(true)).unwrap();
    assert!(blk.session().connection().need_reply());
    assert_eq!(blk.queue(0).write(0, &[1; 4096]).unwrap(), BlkStatus::Ok);
    assert_eq!(blk.queue(0).flush().unwrap(), BlkStatus::Ok);
    assert!(blk.disconnect().is_ok());
}

#[test]
fn raw_requests_share_the_socket_with_vhosts_frontend() {
    let Some(qsd) = Qsd::start("raw", Backing::Null, 1) else {
        return;
    };
    let mut s = SessionBuilder::new(qsd.sock()).connect().unwrap();
    let offered = s.negotiated().features_offered;
    let conn = s.connection();
    let reply = conn
        .raw_request(FrontendReq::GET_FEATURES as u32, VERSION, &[], &[])
        .unwrap()
        .expect("GET_FEATURES always replies");
    assert_eq!(reply.header.request, FrontendReq::GET_FEATURES as u32);
    assert_eq!(reply.header.flags & FLAG_REPLY, FLAG_REPLY);
    assert_eq!(reply.payload_u64(), Some(offered));
    // The typed frontend still works after the raw exchange.
    assert_eq!(
        s.get_queue_num().unwrap(),
        s.negotiated().max_queues.unwrap()
    );
    assert_eq!(s.get_config(0, 8).unwrap().len(), 8);
}

#[test]
fn hot_added_memory_region_carries_io_and_can_be_removed() {
    let Some(qsd) = Qsd::start("hotplug", Backing::File, 1) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock())).unwrap();
    let s = blk.session();
    if !s
        .negotiated()
        .has_protocol(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    {
        eprintln!("skipping: QSD did not negotiate CONFIGURE_MEM_SLOTS");
        return;
    }
    assert!(s.negotiated().max_mem_slots.unwrap() >= 2);
    let region = s.add_mem_region(2 << 20).unwrap();
    let ram = s.ram_mut();
    let hdr = ram.alloc_in(region, 32, 32).unwrap();
    let data = ram.alloc_in(region, 4096, 4096).unwrap();
    // A write request built by hand with every buffer in the new region.
    hdr.write_at(0, &1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
    hdr.write_u64(8, 40);
    hdr.write_at(16, &[0xff]);
    data.write_at(0, &pattern(6, 4096));
    let dq = blk.queue(0).driver_queue_mut();
    dq.submit(&[
        Segment::readable_part(&hdr, 0, 16),
        Segment::readable(&data),
        Segment::writable_part(&hdr, 16, 1),
    ])
    .unwrap();
    let mut used = Vec::new();
    dq.wait_used(Duration::from_secs(10), &mut used).unwrap();
    assert_eq!(hdr.read_u8(16), 0, "status OK");
    let mut back = vec![0; 4096];
    assert_eq!(blk.queue(0).read(40, &mut back).unwrap(), BlkStatus::Ok);
    assert!(back == pattern(6, 4096));
    blk.session().remove_mem_region(region).unwrap();
    assert_eq!(blk.queue(0).read(40, &mut back).unwrap(), BlkStatus::Ok);
}

#[test]
fn reset_device_then_reinitialize_serves_io_again() {
    let Some(qsd) = Qsd::start("reset", Backing::File, 1) else {
        return;
    };
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock())).unwrap();
    let n = *blk.session().negotiated();
    use VhostUserProtocolFeatures as P;
    if !n.has_protocol(P::RESET_DEVICE) && !n.has_protocol(P::STATUS) {
        eprintln!("skipping: QSD negotiated neither RESET_DEVICE nor STATUS");
        return;
    }
    assert_eq!(
        blk.queue(0).write(0, &pattern(7, 4096)).unwrap(),
        BlkStatus::Ok
    );
    blk.reset().unwrap();
    let mut back = vec![0; 4096];
    assert_eq!(blk.queue(0).read(0, &mut back).unwrap(), BlkStatus::Ok);
    assert!(back == pattern(7, 4096));
}

/// Random 4 KiB I/O at a fixed queue depth for `dur`; returns (IOPS, p50, p99, max).
fn run_qd(
    blk: &mut BlkDriver,
    qd: u16,
    write: bool,
    dur: Duration,
) -> (f64, Duration, Duration, Duration) {
    let sectors = blk.config().capacity / 8;
    let q = blk.queue(0);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next_sector = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % sectors) * 8
    };
    let req = |sector| {
        if write {
            BlkRequest::write(sector, 4096)
        } else {
            BlkRequest::read(sector, 4096)
        }
    };
    for slot in 0..qd {
        q.slot_data(slot).fill(0, 4096, 0x5a);
        q.submit(slot, req(next_sector())).unwrap();
    }
    q.kick().unwrap();
    let mut lat = Vec::with_capacity(1 << 20);
    let mut done = Vec::with_capacity(usize::from(qd));
    let start = Instant::now();
    let mut stop = false;
    while !stop || q.in_flight() > 0 {
        done.clear();
        q.reap(WaitMode::Spin(Duration::from_secs(10)), &mut done)
            .unwrap();
        stop = stop || start.elapsed() >= dur;
        for c in &done {
            assert_eq!(c.status, BlkStatus::Ok);
            lat.push(c.latency);
            if !stop {
                q.submit(c.slot, req(next_sector())).unwrap();
            }
        }
        q.kick().unwrap();
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
    let max = *lat.last().unwrap();
    (
        lat.len() as f64 / elapsed.as_secs_f64(),
        pct(50),
        pct(99),
        max,
    )
}

/// Not a correctness test: `cargo test --release -p outboard-frontend --test qsd -- --ignored
/// --nocapture bench`. Pins QSD to CPU 0 and this process to CPU 1 when `taskset` exists.
#[test]
#[ignore = "benchmark; run explicitly in release mode"]
fn bench_qsd_null_co_random_4k() {
    let Some(qsd) = Qsd::start("bench", Backing::Null, 1) else {
        return;
    };
    let pid = qsd.child.id().to_string();
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &pid])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if pinned {
        // Pin this process (all its threads) to the other CPU.
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
    }
    let opts = BlkOptions {
        wait: WaitMode::Spin(Duration::from_secs(10)),
        ..BlkOptions::default()
    };
    let builder = SessionBuilder::new(qsd.sock()).notify(NotifyMode::Poll);
    let mut blk = BlkDriver::connect_with(builder, opts).unwrap();
    let dur = Duration::from_secs(3);
    eprintln!("QSD null-co, 4 KiB random, 1 queue, busy-poll (pinned: {pinned})");
    for (qd, write) in [(1, false), (1, true), (32, false), (32, true)] {
        let before = blk.queue(0).driver_queue().stats();
        let (iops, p50, p99, max) = run_qd(&mut blk, qd, write, dur);
        let after = blk.queue(0).driver_queue().stats();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        eprintln!(
            "  QD{qd:<2} {}: {iops:>8.0} IOPS  p50 {:>6.1} us  p99 {:>6.1} us  max {:>8.1} us  \
             kicks/req {:.3}  idle polls/req {:.0}",
            if write { "write" } else { "read " },
            us(p50),
            us(p99),
            us(max),
            (after.kicks - before.kicks) as f64 / (after.completions - before.completions) as f64,
            (after.empty_polls - before.empty_polls) as f64
                / (after.completions - before.completions) as f64
        );
    }
}

#[test]
fn unknown_request_code_does_not_take_qsd_down() {
    let Some(qsd) = Qsd::start("unknown-request", Backing::Null, 1) else {
        return;
    };
    let mut s = SessionBuilder::new(qsd.sock())
        .io_timeout(Some(Duration::from_secs(2)))
        .connect()
        .unwrap();
    let conn = s.connection();
    let r = conn.raw_request(9999, VERSION | FLAG_NEED_REPLY, &[1, 2, 3], &[]);
    let closed = conn.peer_closed(Duration::from_secs(2)).unwrap();
    eprintln!("QSD answered an unknown request with {r:?}; session closed: {closed}");
    // A backend must refuse the request: a failure status, or ending the session. QSD 10
    // (libvhost-user) does the latter, after acking 0 because NEED_REPLY was set.
    let nacked = matches!(&r, Ok(Some(reply)) if reply.payload_u64() != Some(0));
    assert!(
        nacked || closed,
        "unknown request neither refused nor fatal: {r:?}"
    );
    drop(s);
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock())).unwrap();
    assert_eq!(blk.queue(0).flush().unwrap(), BlkStatus::Ok);
}

#[test]
fn descriptor_outside_guest_memory_does_not_take_qsd_down() {
    let Some(qsd) = Qsd::start("bad-descriptor", Backing::Null, 1) else {
        return;
    };
    let mut blk = BlkDriver::connect(
        SessionBuilder::new(qsd.sock()).io_timeout(Some(Duration::from_secs(2))),
    )
    .unwrap();
    let hdr = blk.session().ram_mut().alloc(32, 32).unwrap();
    hdr.write_at(0, &0u32.to_le_bytes()); // VIRTIO_BLK_T_IN
    hdr.write_at(16, &[0xff]);
    let dq = blk.queue(0).driver_queue_mut();
    let d = dq.alloc_descs(3).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let descs = [
        RawDescriptor {
            addr: hdr.gpa(),
            len: 16,
            flags: next,
            next: d[1],
        },
        // 1 TiB: far outside the 64 MiB of guest RAM.
        RawDescriptor {
            addr: 1 << 40,
            len: 4096,
            flags: next | write,
            next: d[2],
        },
        RawDescriptor {
            addr: hdr.gpa() + 16,
            len: 1,
            flags: write,
            next: 0,
        },
    ];
    for (i, desc) in descs.into_iter().enumerate() {
        dq.write_desc(d[i], desc).unwrap();
    }
    dq.push_avail(d[0]);
    dq.kick().unwrap();
    let mut used = Vec::new();
    let completed = dq.wait_used(Duration::from_secs(2), &mut used).is_ok();
    let closed = blk
        .session()
        .connection()
        .peer_closed(Duration::from_millis(200))
        .unwrap();
    eprintln!(
        "QSD on a descriptor outside RAM: completed {completed} (status {:#x}), session closed {closed}",
        hdr.read_u8(16)
    );
    if completed {
        assert_ne!(hdr.read_u8(16), 0, "must not report success");
    }
    drop(blk);
    let mut blk = BlkDriver::connect(SessionBuilder::new(qsd.sock())).unwrap();
    assert_eq!(blk.queue(0).flush().unwrap(), BlkStatus::Ok);
}
