//! Black-box tests of the command line: `token`, `device`, `push` against a real box.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ringpush(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringpush")).args(args).output().expect("run ringpush")
}

#[test]
fn token_device_and_push_work_together() {
    let srv = Server::start(2, "");
    let token = ringpush(&["token", "--app", APP, "--secret", SECRET, "--device", "cli-1", "--ttl", "1h"]);
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    assert_eq!(token.len(), 80, "{token}");

    let mut device = Command::new(env!("CARGO_BIN_EXE_ringpush"))
        .args(["device", "--server", &srv.device.to_string(), "--app", APP, "--device", "cli-1"])
        .args(["--token", &token, "--json", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringpush device");
    // Wait until the box has the session, then push.
    let start = Instant::now();
    while !http_get(srv.http, "/stats").1.contains("\"sessions\":1") {
        assert!(start.elapsed() < Duration::from_secs(10), "device never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let app = srv.app.to_string();
    let unicast = ringpush(&["push", "--server", &app, "--app", APP, "--secret", SECRET, "--device", "cli-1", "hello"]);
    assert!(unicast.status.success(), "{}", String::from_utf8_lossy(&unicast.stderr));
    let push_id: u64 = String::from_utf8(unicast.stdout).unwrap().trim().parse().expect("push prints its id");
    let all =
        ringpush(&["push", "--server", &app, "--app", APP, "--secret", SECRET, "--all", "--ttl", "5m", "everyone"]);
    assert!(all.status.success(), "{}", String::from_utf8_lossy(&all.stderr));

    let lines: Vec<serde_json::Value> = BufReader::new(device.stdout.take().unwrap())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).expect("--json lines"))
        .collect();
    assert!(device.wait().unwrap().success(), "device exits 0 after --count messages");
    assert_eq!(lines.len(), 2);
    assert_eq!((lines[0]["payload"].as_str(), lines[0]["seq"].as_u64()), (Some("hello"), Some(1)));
    assert_eq!(lines[0]["push_id"].as_u64(), Some(push_id));
    // Broadcasts have their own stream and numbering.
    assert_eq!((lines[1]["payload"].as_str(), lines[1]["seq"].as_u64()), (Some("everyone"), Some(1)));
    assert_eq!((lines[0]["broadcast"].as_bool(), lines[1]["broadcast"].as_bool()), (Some(false), Some(true)));
}

#[test]
fn bad_input_on_the_command_line_fails_clearly() {
    let srv = Server::start(1, "");
    let app = srv.app.to_string();
    let wrong =
        ringpush(&["push", "--server", &app, "--app", APP, "--secret", "not-the-secret-000", "--device", "x", "p"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not_authorized"), "{wrong:?}");
    let ttl =
        ringpush(&["push", "--server", &app, "--app", APP, "--secret", SECRET, "--device", "x", "--ttl", "5", "p"]);
    assert!(!ttl.status.success());
    assert!(String::from_utf8_lossy(&ttl.stderr).contains("needs a unit"), "{ttl:?}");
    let too_long =
        ringpush(&["push", "--server", &app, "--app", APP, "--secret", SECRET, "--device", "x", "--ttl", "90d", "p"]);
    assert!(!too_long.status.success());
    assert!(String::from_utf8_lossy(&too_long.stderr).contains("bad_ttl"), "{too_long:?}");
    let bad_token =
        ringpush(&["device", "--server", &srv.device.to_string(), "--app", APP, "--device", "x", "--token", "abc"]);
    assert!(!bad_token.status.success());
    assert!(String::from_utf8_lossy(&bad_token.stderr).contains("80 hex digits"), "{bad_token:?}");
    let refused = ringpush(&[
        "device",
        "--server",
        &srv.device.to_string(),
        "--app",
        APP,
        "--device",
        "x",
        "--secret",
        "wrong-secret-00000000",
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("bad_token"), "{refused:?}");
}

/// `nic-affinity.sh` writes CPU masks the way /proc and /sys take them: one hex word
/// wider than 32 bits is refused there, so big boxes need comma-separated words.
#[test]
fn nic_affinity_masks_are_in_32_bit_words() {
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kernel-tuning/nic-affinity.sh")).unwrap();
    let start = script.find("cpumask() {").expect("cpumask function");
    let end = start + script[start..].find("\n}\n").expect("end of cpumask") + 3;
    let mask = |ncpu: usize, cpus: &str| {
        let prog = format!("ncpu={ncpu}\n{}\ncpumask {cpus}", &script[start..end]);
        let out = std::process::Command::new("bash").arg("-c").arg(prog).output().expect("bash runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(mask(2, "0 1"), "3");
    assert_eq!(mask(4, "2"), "4");
    assert_eq!(mask(36, &(0..36).map(|c| c.to_string()).collect::<Vec<_>>().join(" ")), "f,ffffffff");
    assert_eq!(mask(64, "32"), "1,00000000");
    assert_eq!(mask(96, "95"), "80000000,00000000,00000000");
}
