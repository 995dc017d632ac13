//! The `pubsub` binary, end to end.

use assert_cmd::Command;

fn pubsub() -> Command {
    Command::cargo_bin("pubsub").expect("binary built")
}

#[test]
fn bench_over_mem_reports_throughput_and_latency() {
    let out = pubsub()
        .args([
            "bench",
            "--topic",
            "mem://cli-bench",
            "--subscription",
            "mem://cli-bench",
            "--messages",
            "2000",
            "--senders",
            "4",
            "--receivers",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("2000 messages of 100 bytes"), "{stdout}");
    assert!(
        stdout.contains("throughput:") && stdout.contains("p99"),
        "{stdout}"
    );
}

#[test]
fn send_to_mem_succeeds_and_reads_stdin() {
    pubsub()
        .args(["send", "mem://cli-send", "--attr", "k=v", "hello"])
        .assert()
        .success();
    pubsub()
        .args(["send", "mem://cli-send", "-"])
        .write_stdin("from stdin")
        .assert()
        .success();
}

#[test]
fn receive_with_idle_timeout_ends_cleanly() {
    let out = pubsub()
        .args(["receive", "mem://cli-recv", "--idle", "0.2", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
}

#[test]
fn unknown_scheme_fails_with_the_registered_ones() {
    let out = pubsub()
        .args(["send", "nope://x", "body"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("\"nope\""), "{err}");
    assert!(err.contains("registered schemes: mem"), "{err}");
}

#[test]
fn malformed_attribute_is_a_usage_error() {
    let out = pubsub()
        .args(["send", "mem://x", "--attr", "novalue", "b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("KEY=VALUE"));
}

#[test]
fn missing_arguments_exit_with_usage() {
    let out = pubsub().args(["bench"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
