//! Live migration of `vhost-user-net`, proved by the real `outboard-migrate` runner against the
//! real backend binary: a two-port switch process migrated as a whole to a fresh process again
//! and again while numbered frames flow both ways, with no accepted frame lost, duplicated or
//! reordered and every receive buffer and used-ring write in the dirty log; tampered states
//! refused with both ports still serving; and a plain account of what another peer lacks.

mod common;
mod dpdk;

use std::process::Output;

use common::{binary, TempDir};
use serde_json::Value;

fn switch_command() -> String {
    format!(
        "{} --switch --socket-path {{sock0}} --mac 52:54:00:6d:69:10 --socket-path {{sock1}} --mac 52:54:00:6d:69:11",
        binary("vhost-user-net").display()
    )
}

fn runner(dir: &TempDir, args: &[&str]) -> (Output, Value) {
    common::outboard_migrate(dir, args)
}

fn passing(dir: &TempDir, args: &[&str]) -> Value {
    common::outboard_migrate_passing(dir, args)
}

#[test]
fn hundred_net_migrations_under_load_lose_no_accepted_frame() {
    let dir = TempDir::new("mig-net-100");
    let backend = switch_command();
    // No --device: the runner reads `"type":"net"` from --print-capabilities.
    let r = passing(
        &dir,
        &[
            "migrate",
            "--count",
            "100",
            "--backend",
            &backend,
            "--ops-per-hop",
            "64",
        ],
    );
    assert_eq!(r["peer"]["device"], "net", "{r:#}");
    assert_eq!(r["migrations"]["migrated"], 100);
    let f = &r["frames"];
    assert_eq!(f["lost"], 0, "{f:#}");
    assert_eq!(f["duplicated_or_reordered"], 0, "{f:#}");
    assert_eq!(f["corrupt"], 0, "{f:#}");
    for dir in ["a_to_b", "b_to_a"] {
        let sent = f["sent"][dir].as_u64().unwrap();
        assert!(sent >= 100 * 64, "{dir}: {sent} frames");
        assert_eq!(f["received_in_order"][dir].as_u64(), Some(sent), "{dir}");
    }
    // Under load: frames were in flight at every stop, and some were left in the transmit
    // rings for the destinations.
    let inflight = &r["in_flight_at_stop"];
    assert!(inflight["total"].as_u64().unwrap() >= 100, "{inflight:#}");
    assert!(
        inflight["completed_by_source"].as_u64().unwrap() > 0,
        "{inflight:#}"
    );
    assert!(
        inflight["resumed_by_destination"].as_u64().unwrap() > 0,
        "{inflight:#}"
    );
    let dirty = &r["dirty_log"];
    assert_eq!(dirty["checked"], true, "{dirty:#}");
    assert_eq!(dirty["checks"], 100, "{dirty:#}");
    assert!(dirty["pages_expected"].as_u64().unwrap() > 100, "{dirty:#}");
    assert_eq!(dirty["pages_missing"], 0, "{dirty:#}");
    assert!(r["migrations"]["state_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn tampered_net_states_are_refused_with_both_ports_still_serving() {
    let dir = TempDir::new("mig-net-refusals");
    let backend = switch_command();
    let r = passing(
        &dir,
        &["refusals", "--device", "net", "--backend", &backend],
    );
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4, "{r:#}");
    for c in cases {
        assert_eq!(c["as_expected"], true, "{c:#}");
    }
    for c in &cases[..3] {
        assert_eq!(c["outcome"], "refused", "{c:#}");
        assert!(
            c["backend_said"]
                .as_str()
                .is_some_and(|s| s.contains("device state")),
            "the destination says why: {c:#}"
        );
        assert!(
            c["source_requests_verified_after_refusal"]
                .as_u64()
                .unwrap()
                > 0
        );
    }
    assert_eq!(cases[3]["second_migration_ok"], true);
    assert_eq!(r["frames"]["lost"], 0);
}

#[test]
fn the_runner_says_plainly_what_dpdks_net_backend_lacks() {
    let Some(testpmd) = dpdk::find_testpmd() else {
        eprintln!(
            "the_runner_says_plainly_what_dpdks_net_backend_lacks: SKIP: dpdk-testpmd is not installed (apt-get install dpdk-dev; .ci/run does)"
        );
        return;
    };
    let dir = TempDir::new("mig-net-dpdk");
    let backend = format!(
        "{} --no-huge -m 512 --no-pci --no-shconf --file-prefix outboard-mig-{} \
         --log-level lib.eal:warning --vdev net_vhost0,iface={{sock0}},queues=1 \
         --vdev net_vhost1,iface={{sock1}},queues=1 -- --forward-mode=io --nb-cores=1 \
         --total-num-mbufs=32768 --stats-period 100",
        testpmd.display(),
        std::process::id()
    );
    // testpmd maps 512 MiB before it listens: slow on a busy machine.
    let (out, r) = runner(
        &dir,
        &[
            "migrate",
            "--device",
            "net",
            "--count",
            "2",
            "--timeout",
            "60",
            "--backend",
            &backend,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // DPDK's vhost backend has no CONFIG (QEMU emulates the config space for it) and no
    // DEVICE_STATE: the runner cannot drive it and says why, instead of a bare failure.
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(r["verdict"], "fail", "{text}");
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("lacks the CONFIG protocol feature"),
        "{text}"
    );
    assert!(
        text.contains("note: the backend lacks the CONFIG"),
        "{text}"
    );
}
