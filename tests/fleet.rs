//! Black-box tests of a fleet: two real boxes on two loopback addresses, each told
//! about both. A device and its pushes belong to one node; dispatch sends devices
//! there and answers 503 while that node is down.

mod common;

use common::*;
use ringpush::client::{AppClient, ClientError, DeviceClient, PushOutcome, PushTarget};
use ringpush::dispatch::Ring;
use ringpush::protocol::ErrorCode;
use std::time::{Duration, Instant};

/// One node of the test fleet: a loopback address of its own, the usual ports.
struct Node {
    name: &'static str,
    ip: String,
}

impl Node {
    fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    fn listen(&self) -> [String; 3] {
        [self.addr(7000), self.addr(7100), self.addr(7200)]
    }
}

/// Two nodes on random 127.x.y.z addresses (tests run in parallel; ports stay fixed).
fn nodes() -> [Node; 2] {
    let base: [u8; 2] = rand::random();
    let ip = |last: u8| format!("127.{}.{}.{last}", base[0].max(1), base[1]);
    [Node { name: "a", ip: ip(10) }, Node { name: "b", ip: ip(11) }]
}

fn fleet_toml(me: &str, nodes: &[Node]) -> String {
    let mut t = format!(
        "[fleet]\nnode = \"{me}\"\nprobe_interval = \"200ms\"\nprobe_timeout = \"150ms\"\nfall = 2\nrise = 1\n"
    );
    for n in nodes {
        t += &format!(
            "[[fleet.nodes]]\nname = \"{}\"\ndevice_addr = \"{}\"\napp_addr = \"{}\"\nhttp_addr = \"{}\"\n",
            n.name,
            n.addr(7000),
            n.addr(7100),
            n.addr(7200)
        );
    }
    t
}

fn start(me: usize, nodes: &[Node], dir: tempfile::TempDir) -> Server {
    let l = nodes[me].listen();
    Server::launch_on(dir, 1, &fleet_toml(nodes[me].name, nodes), [&l[0], &l[1], &l[2]]).ready()
}

/// A device id of `node` (index into the ring built like the servers build theirs).
fn device_on(node: usize, skip: usize) -> String {
    let ring = Ring::new([("a", 100), ("b", 100)]);
    (0..).map(|i| format!("dev-{i}")).filter(|d| ring.node_for(APP, d) == node).nth(skip).unwrap()
}

fn dispatch(srv: &Server, query: &str) -> (u16, serde_json::Value) {
    let (status, body) = http_get(srv.http, &format!("/v1/dispatch?{query}"));
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status} {body:?} is not JSON: {e}")))
}

/// Polls dispatch until it answers `status`, within `limit`.
fn dispatch_until(srv: &Server, query: &str, status: u16, limit: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (s, body) = dispatch(srv, query);
        if s == status {
            return body;
        }
        assert!(start.elapsed() < limit, "dispatch still answers {s} {body} after {limit:?}, want {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dispatch_devices_and_pushes_go_to_the_devices_node_and_a_node_that_is_down_gets_none() {
    let nodes = nodes();
    let a = start(0, &nodes, tempfile::tempdir().unwrap());
    let b = start(1, &nodes, tempfile::tempdir().unwrap());
    let (dev_a, dev_b, dev_b2) = (device_on(0, 0), device_on(1, 0), device_on(1, 1));

    // Either node answers where a device belongs.
    for srv in [&a, &b] {
        let (s, body) = dispatch(srv, &format!("app={APP}&device={dev_b}"));
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["node"], "b");
        assert_eq!(body["device_addr"], nodes[1].addr(7000));
        assert_eq!(body["app_addr"], nodes[1].addr(7100));
        assert_eq!(dispatch(srv, &format!("app={APP}&device={dev_a}")).1["node"], "a");
    }
    // Bad queries get a clear error.
    assert_eq!(dispatch(&a, &format!("app={APP}")).1["error"], "bad_request");
    let (s, body) = dispatch(&a, "app=nope&device=x");
    assert_eq!((s, body["error"].as_str()), (404, Some("unknown_app")));
    let (s, body) = dispatch(&a, &format!("app={APP}&device=x&failed=zz"));
    assert_eq!((s, body["error"].as_str()), (400, Some("unknown_node")));

    run(|| async {
        // A device at the wrong node is sent to its own.
        match DeviceClient::connect(a.device, APP, &dev_b, token_for(&dev_b, 3600), 0).await {
            Err(ClientError::Server { code, message }) => {
                assert_eq!(code, ErrorCode::REDIRECT);
                assert_eq!(message, nodes[1].addr(7000));
            }
            other => panic!("expected BYE redirect, got {:?}", other.map(|_| "a session")),
        }
        let mut on_b = b.device(&dev_b).await;
        let mut on_a = a.device(&dev_a).await;

        // A push for a device of another node is not taken; it names where to push.
        let mut app_a = a.app().await;
        let out = app_a.push(PushTarget::Device(&dev_b), 0, b"wrong node").await.unwrap();
        assert_eq!(out, PushOutcome::Rejected(ErrorCode::REDIRECT, nodes[1].addr(7100)));
        let list = [dev_a.clone(), dev_b.clone()];
        let out = app_a.push(PushTarget::List(&list), 0, b"mixed list").await.unwrap();
        assert_eq!(out, PushOutcome::Rejected(ErrorCode::REDIRECT, nodes[1].addr(7100)));
        quiet(&mut on_a, Duration::from_millis(300)).await;

        // At their own node, pushes are taken and delivered.
        let mut app_b = AppClient::connect(b.app, APP, SECRET.as_bytes()).await.unwrap();
        assert!(matches!(
            app_b.push(PushTarget::Device(&dev_b), 0, b"hello b").await.unwrap(),
            PushOutcome::Accepted(_)
        ));
        assert_eq!(message(&mut on_b).await.payload, b"hello b");
        assert!(matches!(
            app_a.push(PushTarget::Device(&dev_a), 0, b"hello a").await.unwrap(),
            PushOutcome::Accepted(_)
        ));
        assert_eq!(message(&mut on_a).await.payload, b"hello a");
    });
    // `ringpush push` given the wrong node pushes to the device's own, once.
    let cli = |target: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ringpush"))
            .args(["push", "--server", &a.app.to_string(), "--app", APP, "--secret", SECRET])
            .args(target)
            .output()
            .expect("run ringpush push")
    };
    let out = cli(&["--device", &dev_b, "via the cli"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&nodes[1].addr(7100)));
    let out = cli(&["--device", &dev_a, "--device", &dev_b, "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("push each node its own devices"));
    run(|| async {
        // "hello b" was never acked, so it comes again before the CLI's push.
        let mut on_b = b.device(&dev_b).await;
        assert_eq!(message(&mut on_b).await.payload, b"hello b");
        assert_eq!(message(&mut on_b).await.payload, b"via the cli");
    });

    // `ringpush device` given the wrong node follows the redirect and gets its message.
    let dev_b3 = device_on(1, 2);
    assert!(cli(&["--device", &dev_b3, "waiting at b"]).status.success());
    let mut device = std::process::Command::new(env!("CARGO_BIN_EXE_ringpush"))
        .args(["device", "--server", &a.device.to_string(), "--app", APP, "--secret", SECRET])
        .args(["--device", &dev_b3, "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ringpush device");
    let started = Instant::now();
    while device.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            device.kill().unwrap();
            panic!("ringpush device did not get its message within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = device.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "waiting at b\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&nodes[1].addr(7000)));

    let (_, metrics) = http_get(a.http, "/metrics");
    assert!(metrics.contains("ringpush_handshakes_total{shard=\"0\",result=\"redirected\"} 2"), "{metrics}");
    assert!(metrics.contains("ringpush_fleet_node_up{node=\"b\"} 1"), "{metrics}");

    // b goes away: a stops sending b's devices there, and says when to ask again.
    let b_dir = b.stop_keep(Duration::from_secs(10));
    let body = dispatch_until(&a, &format!("app={APP}&device={dev_b2}"), 503, Duration::from_secs(5));
    assert_eq!(body["error"], "node_down");
    assert_eq!(body["node"], "b");
    assert_eq!(body["retry_after_ms"], 200);
    assert_eq!(dispatch(&a, &format!("app={APP}&device={dev_a}")).0, 200, "a's own devices are unaffected");
    assert!(http_get(a.http, "/metrics").1.contains("ringpush_fleet_node_up{node=\"b\"} 0"));

    // b comes back on its data: dispatch sends its devices to it again, and the
    // message b stored while its device was away is still there.
    let b = start(1, &nodes, b_dir);
    let body = dispatch_until(&a, &format!("app={APP}&device={dev_b}"), 200, Duration::from_secs(5));
    assert_eq!(body["node"], "b");
    run(|| async {
        let mut app_b = AppClient::connect(b.app, APP, SECRET.as_bytes()).await.unwrap();
        assert!(matches!(
            app_b.push(PushTarget::Device(&dev_b2), 0, b"stored").await.unwrap(),
            PushOutcome::Accepted(_)
        ));
        let mut dev = b.device(&dev_b2).await;
        assert_eq!(message(&mut dev).await.payload, b"stored");
    });
    let (s, _) = dispatch(&a, &format!("app={APP}&device={dev_b}&failed=b"));
    assert_eq!(s, 200, "one report does not take a node down (fall = 2)");
    assert!(http_get(a.http, "/metrics").1.contains("ringpush_dispatch_failure_reports_total 1"));
    assert!(a.stop(Duration::from_secs(10)).success());
    assert!(b.stop(Duration::from_secs(10)).success());
}

#[test]
fn a_box_without_a_fleet_dispatches_every_device_to_itself() {
    let srv = Server::start(2, "");
    for dev in ["dev-1", "sensor%2F7", "phone-42"] {
        let (s, body) = dispatch(&srv, &format!("app={APP}&device={dev}"));
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["node"], "local");
        assert_eq!(body["device_addr"], srv.device.to_string());
        assert_eq!(body["app_addr"], srv.app.to_string());
    }
    assert_eq!(dispatch(&srv, &format!("app={APP}&device=d&extra=1")).1["error"], "bad_request");
    assert!(srv.stop(Duration::from_secs(10)).success());
}

#[test]
fn a_box_listening_on_every_address_answers_the_address_it_was_asked_on() {
    // 0.0.0.0 with an ephemeral port: dispatch answers the address the request came to.
    let srv = Server::launch_on(tempfile::tempdir().unwrap(), 1, "", ["0.0.0.0:0", "0.0.0.0:0", "127.0.0.1:0"]).ready();
    let (s, body) = dispatch(&srv, &format!("app={APP}&device=dev-1"));
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["device_addr"], format!("127.0.0.1:{}", srv.device.port()));
    assert_eq!(body["app_addr"], format!("127.0.0.1:{}", srv.app.port()));
    assert!(srv.stop(Duration::from_secs(10)).success());
}

#[test]
fn a_box_that_joins_a_fleet_hands_messages_stored_for_devices_now_elsewhere_to_their_node() {
    let nodes = nodes();
    // Alone, the box takes messages for a device that the fleet will give to b.
    let (dev_a, dev_b) = (device_on(0, 0), device_on(1, 0));
    let l = nodes[0].listen();
    let alone = Server::launch_on(tempfile::tempdir().unwrap(), 1, "", [&l[0], &l[1], &l[2]]).ready();
    run(|| async {
        let mut app = alone.app().await;
        // The device was served here before: it processed seq 1 of this box.
        let mut dev = alone.device(&dev_b).await;
        assert!(matches!(app.push(PushTarget::Device(&dev_b), 0, b"before").await.unwrap(), PushOutcome::Accepted(_)));
        let m = message(&mut dev).await;
        dev.ack(m.seq).await.unwrap();
        dev.close().await.unwrap();
        for (dev, n) in [(&dev_b, 3), (&dev_a, 1)] {
            for i in 0..n {
                let out = app.push(PushTarget::Device(dev), 3600, format!("m{i}").as_bytes()).await.unwrap();
                assert!(matches!(out, PushOutcome::Accepted(_)), "{out:?}");
            }
        }
    });
    let dir = alone.stop_keep(Duration::from_secs(10));
    // Restarted as node a of a two-node fleet, while b is not up yet: it says what it
    // holds for b's device, and keeps it.
    let a = start(0, &nodes, dir);
    let log = a.log();
    let line =
        log.lines().find(|l| l.contains("now belong to other nodes")).unwrap_or_else(|| panic!("no warning in\n{log}"));
    assert!(line.contains("devices=1") && line.contains("messages=3"), "{line}");
    assert_eq!(metric_sum(a.http, "ringpush_queued_messages{"), 4.0);
    // b comes up: a hands the three messages over, in order, and releases them.
    let b = start(1, &nodes, tempfile::tempdir().unwrap());
    let started = Instant::now();
    while metric_sum(a.http, "ringpush_messages_total{shard=\"0\",event=\"handed_over\"}") < 3.0 {
        assert!(started.elapsed() < Duration::from_secs(10), "not handed over within 10 s:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric_sum(a.http, "ringpush_queued_messages{"), 1.0, "a keeps only its own device's message");
    run(|| async {
        // It comes to b saying it processed seq 1 of a's numbering (a box alone counts
        // from 1): b, a node of a fleet, numbers from the clock, above it, so the claim
        // acks none of what b holds.
        let mut dev = DeviceClient::connect(b.device, APP, &dev_b, token_for(&dev_b, 3600), 1).await.unwrap();
        let mut last = 1;
        for want in ["m0", "m1", "m2"] {
            let m = message(&mut dev).await;
            assert_eq!(m.payload, want.as_bytes());
            assert!(m.seq > last, "seq {} after {last}", m.seq);
            last = m.seq;
            assert!(m.expiry_ms > ringpush::client::unix_ms() + 3_000_000, "the TTL travels with the message");
        }
        quiet(&mut dev, Duration::from_millis(200)).await;
        // Its own device still gets its message at a.
        let mut dev = a.device(&dev_a).await;
        let m = message(&mut dev).await;
        assert_eq!(m.payload, b"m0");
        dev.ack(m.seq).await.unwrap();
    });
    let started = Instant::now();
    while metric_sum(a.http, "ringpush_queued_messages{") > 0.0 {
        assert!(started.elapsed() < Duration::from_secs(5), "the ack never landed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing is left to hand over after a restart of a: no second warning.
    let a = start(0, &nodes, a.stop_keep(Duration::from_secs(10)));
    assert_eq!(a.log().matches("now belong to other nodes").count(), 1, "{}", a.log());
    assert_eq!(metric_sum(a.http, "ringpush_queued_messages{"), 0.0);
    assert!(a.stop(Duration::from_secs(10)).success());
    assert!(b.stop(Duration::from_secs(10)).success());
}
