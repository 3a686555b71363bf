//! Live migration of `vhost-user-blk`, proved by the real `outboard-migrate` runner against the
//! real backend binary: migrations under load with nothing lost, the compat-version matrix, and
//! every kind of state or destination that must be refused while the source keeps serving.

mod common;

use std::path::Path;
use std::process::Command;

use common::{binary, TempDir};
use serde_json::Value;

/// A 2 MiB disk: 512 blocks of 4 KiB, all of them in the runner's working set.
const DISK: u64 = 2 << 20;

fn blk_command(disk: &Path, extra: &str) -> String {
    format!(
        "{} --socket-path {{sock}} --blk-file {} {extra}",
        binary("vhost-user-blk").display(),
        disk.display()
    )
}

fn disk(dir: &TempDir, name: &str, size: u64) -> std::path::PathBuf {
    let path = dir.path(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn run_migrate(dir: &TempDir, args: &[&str]) -> Value {
    common::outboard_migrate_passing(dir, args)
}

fn case<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap().contains(name))
        .unwrap_or_else(|| panic!("no case {name:?} in {report:#}"))
}

#[test]
fn hundred_migrations_of_two_busy_queues_lose_no_write() {
    let dir = TempDir::new("mig-100");
    let d = disk(&dir, "disk.img", DISK);
    let backend = blk_command(&d, "--num-queues 2");
    let r = run_migrate(
        &dir,
        &[
            "migrate",
            "--count",
            "100",
            "--queues",
            "2",
            "--backend",
            &backend,
            "--ops-per-hop",
            "24",
            "--depth",
            "16",
        ],
    );
    let m = &r["migrations"];
    assert_eq!(m["migrated"], 100, "{r:#}");
    assert!(m["state_bytes"].as_u64().unwrap() > 0, "state moved");
    let req = &r["requests"];
    assert_eq!(
        req["submitted"], req["completed"],
        "every request completed once"
    );
    assert!(req["writes"].as_u64().unwrap() > 1000, "{req}");
    // Requests were in flight at every stop and were completed by one side or the other.
    let f = &r["in_flight_at_stop"];
    assert!(f["total"].as_u64().unwrap() >= 100 * 16, "{f}");
    assert_eq!(
        f["total"].as_u64().unwrap(),
        f["completed_by_source"].as_u64().unwrap() + f["resumed_by_destination"].as_u64().unwrap()
    );
    assert_eq!(r["readback"]["blocks"], 512);
    assert_eq!(r["readback"]["mismatches"], 0);
    let dl = &r["dirty_log"];
    assert_eq!(
        (dl["checked"].as_bool(), dl["checks"].as_u64()),
        (Some(true), Some(100))
    );
    assert!(dl["pages_expected"].as_u64().unwrap() > 100);
    assert_eq!(dl["pages_missing"], 0, "{dl}");
    assert_eq!(r["violations"].as_array().unwrap().len(), 0);
}

#[test]
fn compat_matrix_refuses_only_state_newer_than_the_destination() {
    let dir = TempDir::new("mig-matrix");
    let d = disk(&dir, "disk.img", DISK);
    let backend = blk_command(&d, "--compat-version {compat}");
    // The versions come from the binary's --print-capabilities.
    let r = run_migrate(&dir, &["matrix", "--backend", &backend]);
    for name in ["compat 1 -> 1", "compat 1 -> 2", "compat 2 -> 2"] {
        let c = case(&r, name);
        assert_eq!(c["outcome"], "migrated", "{c}");
        assert_eq!(c["second_migration_ok"], true, "{c}");
    }
    let c = case(&r, "compat 2 -> 1");
    assert_eq!(c["outcome"], "refused", "{c}");
    let said = c["backend_said"].as_str().unwrap();
    assert!(said.contains("compat version 2"), "{said}");
    assert!(
        c["source_requests_verified_after_refusal"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(r["readback"]["mismatches"], 0);
    assert_eq!(
        r["peer"]["capabilities"]["outboard"]["compat-versions"],
        serde_json::json!([1, 2])
    );
}

#[test]
fn damaged_foreign_and_mismatched_state_is_refused_and_the_source_keeps_serving() {
    let dir = TempDir::new("mig-refuse");
    let d = disk(&dir, "disk.img", DISK);
    let bigger = disk(&dir, "bigger.img", 2 * DISK);
    let backend = blk_command(&d, "");
    let other_size = blk_command(&bigger, "");
    let more_queues = blk_command(&d, "--num-queues 2");
    let r = run_migrate(
        &dir,
        &[
            "refusals",
            "--backend",
            &backend,
            "--mismatched-dest",
            &other_size,
            "--mismatched-dest",
            &more_queues,
        ],
    );
    for (name, reason) in [
        ("corrupted", "checksum"),
        ("another device type", "device type 1"),
        ("truncated", "truncated"),
        ("bigger.img", "capacity"),
        ("--num-queues 2", "queues"),
    ] {
        let c = case(&r, name);
        assert_eq!(c["outcome"], "refused", "{c}");
        let said = c["backend_said"].as_str().unwrap_or_default();
        assert!(
            said.contains(reason),
            "{name}: the destination said {said:?}"
        );
        assert!(
            c["source_requests_verified_after_refusal"]
                .as_u64()
                .unwrap()
                > 0,
            "{c}"
        );
    }
    let c = case(&r, "untouched state");
    assert_eq!(
        (&c["outcome"], &c["second_migration_ok"]),
        (&"migrated".into(), &true.into())
    );
    assert_eq!(r["readback"]["mismatches"], 0);
}

#[test]
fn a_destination_with_fewer_queues_is_refused_before_any_state_moves() {
    let dir = TempDir::new("mig-fewer");
    let d = disk(&dir, "disk.img", DISK);
    let two = blk_command(&d, "--num-queues 2");
    let one = blk_command(&d, "");
    let r = run_migrate(
        &dir,
        &[
            "migrate",
            "--queues",
            "2",
            "--backend",
            &two,
            "--dest-backend",
            &one,
            "--expect",
            "refused",
        ],
    );
    let c = &r["cases"][0];
    assert!(c["reason"].as_str().unwrap().contains("queues"), "{c}");
    assert!(
        c["source_requests_verified_after_refusal"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn the_runner_migrates_qemu_storage_daemon_without_device_state() {
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: qemu-storage-daemon is not installed (Debian: qemu-utils)");
        return;
    }
    let dir = TempDir::new("mig-qsd");
    let d = disk(&dir, "disk.img", DISK);
    // Two daemons share the image during the handover, so QEMU's image locking is off.
    let qsd = format!(
        "qemu-storage-daemon --blockdev driver=file,node-name=f0,filename={},locking=off \
         --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={{sock}},writable=on",
        d.display()
    );
    let r = run_migrate(&dir, &["migrate", "--count", "5", "--backend", &qsd]);
    assert_eq!(r["peer"]["device_state"], false);
    let notes = r["notes"].to_string();
    assert!(notes.contains("lacks the DEVICE_STATE"), "{notes}");
    assert_eq!(r["migrations"]["migrated"], 5);
    assert_eq!(r["readback"]["mismatches"], 0);
}
