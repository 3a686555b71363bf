//! `vhost-user-net`'s command line and process conventions: `--print-capabilities`, one-line
//! usage errors with exit code 2, start failures with exit code 1, a clean exit on SIGTERM with
//! every port's socket removed, and the next frontend served after one leaves.

mod common;
mod net_common;

use std::process::Command;

use common::{binary, TempDir};
use net_common::*;
use outboard_frontend::NetOptions;

/// Runs the program with `args` and returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary(PROGRAM))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn print_capabilities_prints_the_net_type_and_ignores_other_options() {
    for args in [
        &["--print-capabilities"][..],
        &["--bogus", "--print-capabilities", "--queue-size", "3"][..],
    ] {
        let (status, stdout, stderr) = run(args);
        assert_eq!(status, Some(0), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
        assert_eq!(stdout, "{\"type\":\"net\"}\n", "{args:?}");
    }
}

#[test]
fn bad_options_exit_with_code_2_and_one_line_on_stderr() {
    let dir = TempDir::new("net-cli");
    let sock = dir.path("never.sock");
    let sock = sock.to_str().unwrap();
    let sock2 = dir.path("never2.sock");
    let sock2 = sock2.to_str().unwrap();
    let s = ["--socket-path", sock];
    let two = ["--socket-path", sock, "--socket-path", sock2];
    let sw = ["--switch"];
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--bogus"],
        sw.to_vec(),
        s.to_vec(),
        [&s[..], &["--bogus"]].concat(),
        [&s[..], &sw, &["--fd", "3"]].concat(),
        [&s[..], &sw, &["--tap", "tap0"]].concat(),
        [&s[..], &["--tap", "tap0", "--tap-fd", "3"]].concat(),
        two.to_vec(),
        [&two[..], &["--tap", "tap0"]].concat(),
        [&s[..], &sw, &["--mac", "01:00:5e:00:00:01"]].concat(),
        [&s[..], &sw, &["--mac", "52:54:00:00:00"]].concat(),
        [&s[..], &sw, &["--mac", "52:54:00:00:00:zz"]].concat(),
        [&two[..], &sw, &["--mac", "52:54:00:00:00:03"]]
            .concat()
            .iter()
            .chain(&["--mac", "52:54:00:00:00:04", "--mac", "52:54:00:00:00:05"])
            .copied()
            .collect(),
        [&two[..], &sw, &["--mac", "fe:ff:ff:ff:ff:ff"]].concat(),
        [&s[..], &sw, &["--queue-size", "100"]].concat(),
        [&s[..], &sw, &["--queue-size", "1"]].concat(),
        [&s[..], &sw, &["--queue-pairs", "0"]].concat(),
        [&s[..], &sw, &["--queue-pairs", "65"]].concat(),
        [&s[..], &sw, &["--mtu", "67"]].concat(),
        [&s[..], &sw, &["--mtu", "65536"]].concat(),
        [&s[..], &sw, &["--switch-queue", "0"]].concat(),
        [&s[..], &["--tap-fd", "x"]].concat(),
        [&s[..], &["--tap-fd", "3", "--queue-pairs", "2"]].concat(),
        [&["--fd", "-1"][..], &sw].concat(),
    ];
    for args in cases {
        let (status, stdout, stderr) = run(&args);
        assert_eq!(status, Some(2), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert!(
            stderr.ends_with('\n') && stderr.lines().count() == 1,
            "{args:?}: not one line: {stderr:?}"
        );
        assert!(
            stderr.starts_with("vhost-user-net: "),
            "{args:?}: {stderr:?}"
        );
        assert!(!std::path::Path::new(sock).exists(), "{args:?} listened");
    }
}

#[test]
fn a_backend_that_cannot_start_exits_with_code_1() {
    let dir = TempDir::new("net-cli-fail");
    let sock = dir.path("never.sock");
    let sock = sock.to_str().unwrap();
    for (args, says) in [
        (vec!["--socket-path", sock, "--tap-fd", "987"], "987"),
        (vec!["--socket-path", sock, "--tap-fd", "0"], "TUNGETIFF"),
        (
            vec!["--socket-path", sock, "--tap", "a-name-longer-than-15"],
            "a-name-longer-than-15",
        ),
    ] {
        let (status, _, stderr) = run(&args);
        assert_eq!(status, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!std::path::Path::new(sock).exists());
    }
}

#[test]
fn sigterm_ends_every_port_and_removes_the_sockets() {
    let mut sw = SwitchBackend::start("net-sigterm", 3, &[]);
    let d = sw.connect(2, NetOptions::default());
    // A frontend that leaves and comes back is served again.
    drop(d);
    let mut d = sw.connect(2, NetOptions::default());
    let f = frame([0xff; 6], MAC_A, 60, 1);
    let mut other = sw.connect(0, NetOptions::default());
    other.send(0, &f).unwrap();
    assert_eq!(expect(&mut d, 0).frame, f);
    let status = sw.backend.terminate();
    assert!(status.success(), "{status}:\n{}", sw.backend.log_text());
    for s in &sw.sockets {
        assert!(!s.exists(), "{} is left behind", s.display());
    }
}
