//! A real Linux guest (QEMU 7.2, TCG) on `vhost-user-blk`: the guest's own virtio-blk driver
//! writes patterns and reads them back with checksums, runs `fio --verify`, discards and zeroes,
//! and makes and checks an ext4 file system (`tests/guest/blk-guest.sh`), with 1 and 2 queues.
//! The assets come from `tests/guest/setup.sh`, which `scripts/test.sh` runs first.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Backend, TempDir};

fn assets_ready() -> Result<(), String> {
    let dir = std::env::var("OUTBOARD_GUEST_DIR").unwrap_or("/var/cache/outboard-guest".into());
    if !Path::new(&dir).join("env.sh").exists() {
        return Err(format!(
            "no guest assets in {dir}: run tests/guest/setup.sh (as root) first"
        ));
    }
    Ok(())
}

fn run_guest(queues: u16) {
    if let Err(reason) = assets_ready() {
        // Only a machine that cannot install the assets (not root) gets here; scripts/test.sh
        // installs them everywhere else.
        eprintln!("SKIP guest test: {reason}");
        return;
    }
    let dir = TempDir::new("guest");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let sock = dir.path("blk.sock");
    let mut backend = Backend::start(
        "vhost-user-blk",
        &sock,
        &[
            "--socket-path".into(),
            sock.display().to_string(),
            "--blk-file".into(),
            disk.display().to_string(),
            "--num-queues".into(),
            queues.to_string(),
            "--serial".into(),
            "outboard-guest".into(),
        ],
        dir.path("backend.log"),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guest/run-blk.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&sock)
        .arg(queues.to_string())
        .env("OUTBOARD_BACKEND_PID", backend.child.id().to_string())
        .env("OUTBOARD_GUEST_OUT", dir.path("guest"))
        .output()
        .expect("run tests/guest/run-blk.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "guest checks failed with {} queue(s):\n{stdout}\n{}\n--- backend log ---\n{}",
        queues,
        String::from_utf8_lossy(&out.stderr),
        backend.log_text()
    );
    assert!(stdout.contains("RESULT PASS"));
    backend.assert_alive();
    let status = backend.terminate();
    assert!(
        status.success(),
        "vhost-user-blk exited with {status} on SIGTERM"
    );
}

#[test]
fn linux_guest_verifies_data_fio_and_ext4_on_one_queue() {
    run_guest(1);
}

#[test]
fn linux_guest_verifies_data_fio_and_ext4_on_two_queues() {
    run_guest(2);
}
