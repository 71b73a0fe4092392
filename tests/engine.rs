//! Black-box engine tests: the real server on loopback, devices and apps as clients.

mod common;

use common::*;
use ringpush::client::{AppClient, AppReply, ClientError, DeviceClient, DeviceEvent, PushOutcome, PushTarget};
use ringpush::protocol::device::{DeviceFrame, Hello};
use ringpush::protocol::{ErrorCode, Limits, Preamble, Role};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

fn accepted(o: PushOutcome) -> u64 {
    match o {
        PushOutcome::Accepted(id) => id,
        other => panic!("push not accepted: {other:?}"),
    }
}

/// Writes `bytes` on a fresh connection and reads until the server closes it.
fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("server did not close the connection: {e} (got {out:?})"),
    }
    out
}

/// One blocking read, retried when a signal interrupts it (`EINTR`: std's `read` does
/// not retry, and the test process gets signals from the executors and servers it runs).
fn read_some(s: &mut std::net::TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Parses "[server preamble] ERROR" and returns the error code.
fn error_code(reply: &[u8]) -> ErrorCode {
    let body = match Preamble::decode(reply) {
        Ok(Some(_)) => &reply[8..],
        _ => reply,
    };
    match DeviceFrame::decode(body, &Limits::default()) {
        Ok(Some((DeviceFrame::Error(e), _))) => e.code,
        other => panic!("expected an ERROR frame, got {other:?} from {reply:?}"),
    }
}

fn hello_bytes(app: &str, device: &str, token: [u8; 40]) -> Vec<u8> {
    let mut b = Preamble::client(Role::Device).encode().to_vec();
    DeviceFrame::Hello(Hello {
        app_id: app,
        device_id: device,
        token,
        last_acked_seq: 0,
        broadcast_cursor: 0,
        capabilities: 0,
    })
    .encode(&mut b);
    b
}

#[test]
fn unicast_reaches_devices_on_every_shard_in_order() {
    let srv = Server::start(2, "");
    run(|| async {
        let ids: Vec<String> = (0..16).map(|i| format!("u{i}")).collect();
        let mut shards_hit = std::collections::HashSet::new();
        let mut devs = Vec::new();
        for id in &ids {
            shards_hit.insert(ringpush::routing::shard_for(APP, id, 2));
            devs.push(srv.device(id).await);
        }
        assert_eq!(shards_hit.len(), 2, "devices must span both shards");
        let mut app = srv.app().await;
        for (i, id) in ids.iter().enumerate() {
            for k in 0..3 {
                accepted(app.push(PushTarget::Device(id), 0, format!("{i}-{k}").as_bytes()).await.unwrap());
            }
        }
        for (i, dev) in devs.iter_mut().enumerate() {
            for k in 0..3u64 {
                let m = message(dev).await;
                assert_eq!((m.seq, m.payload), (k + 1, format!("{i}-{k}").into_bytes()));
            }
            dev.ack(3).await.unwrap();
        }
    });
}

#[test]
fn a_shard_aware_app_lands_on_the_shard_it_asks_for_and_its_pushes_stay_there() {
    let srv = Server::start(3, "");
    run(|| async {
        let first = srv.app().await;
        assert_eq!(first.shards, 3);
        assert!(first.shard < 3);
        let mut apps = Vec::new();
        for shard in [0u16, 1, 2, 2, 1, 0] {
            let app = AppClient::connect_to_shard(srv.app, APP, SECRET.as_bytes(), shard, 3).await.unwrap();
            assert_eq!(app.shard, shard, "the listener steers by source port");
            apps.push(app);
        }
        apps.truncate(3);
        // Each push on a connection its device's owner shard holds: taken there (the
        // push id names the shard), delivered, never forwarded.
        let ids: Vec<String> = (0..12).map(|i| format!("sa{i}")).collect();
        let mut devs = Vec::new();
        for id in &ids {
            devs.push(srv.device(id).await);
        }
        for id in &ids {
            let owner = ringpush::routing::shard_for(APP, id, 3);
            let push_id = accepted(apps[owner].push(PushTarget::Device(id), 0, id.as_bytes()).await.unwrap());
            assert_eq!(push_id >> 48, owner as u64);
        }
        for (id, dev) in ids.iter().zip(devs.iter_mut()) {
            assert_eq!(message(dev).await.payload, id.as_bytes());
        }
        assert_eq!(metric_sum(srv.http, "ringpush_pushes_forwarded_total"), 0.0);
        // On another shard's connection the push is forwarded, and delivered all the same.
        let other = (ringpush::routing::shard_for(APP, &ids[0], 3) + 1) % 3;
        accepted(apps[other].push(PushTarget::Device(&ids[0]), 0, b"again").await.unwrap());
        assert_eq!(message(&mut devs[0]).await.payload, b"again");
        assert_eq!(metric_sum(srv.http, "ringpush_pushes_forwarded_total"), 1.0);
    });
}

#[test]
fn multicast_and_broadcast_deliver_once_to_each_target() {
    let srv = Server::start(2, "");
    run(|| async {
        let ids: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
        let mut devs = Vec::new();
        for id in &ids {
            devs.push(srv.device(id).await);
        }
        let mut app = srv.app().await;
        let list: Vec<String> = ids[..6].to_vec();
        let mc = accepted(app.push(PushTarget::List(&list), 0, b"multi").await.unwrap());
        let bc = accepted(app.push(PushTarget::App, 0, b"broad").await.unwrap());
        for (i, dev) in devs.iter_mut().enumerate() {
            if i < 6 {
                let m = message(dev).await;
                assert_eq!((m.push_id, m.payload.as_slice()), (mc, &b"multi"[..]));
            }
            let m = message(dev).await;
            assert_eq!((m.push_id, m.payload.as_slice(), m.broadcast), (bc, &b"broad"[..], true));
            dev.ack_both(u64::from(i < 6), m.seq).await.unwrap();
            quiet(dev, Duration::from_millis(50)).await;
        }
        // Devices of another app never see this app's broadcast.
        let other = DeviceClient::connect(
            srv.device,
            "other",
            "x",
            ringpush::protocol::DeviceToken::mint(b"other-secret-0123456789", "other", "x", 4_000_000_000),
            0,
        )
        .await;
        let mut other = other.unwrap();
        accepted(app.push(PushTarget::App, 0, b"again").await.unwrap());
        quiet(&mut other, Duration::from_millis(200)).await;
        // Receipts add up across shards once devices ack.
        glommio::timer::sleep(Duration::from_millis(100)).await;
        let r = app.receipt(bc).await.unwrap().unwrap();
        assert_eq!((r.targeted, r.delivered, r.stored), (12, 12, 0), "{r:?}");
        let r = app.receipt(mc).await.unwrap().unwrap();
        assert_eq!(r.targeted, 6);
        assert_eq!(app.receipt(12345).await.unwrap(), Err(ErrorCode::UNKNOWN_PUSH));
    });
}

#[test]
fn unacked_messages_are_redelivered_after_reconnect_and_offline_devices_get_theirs() {
    let srv = Server::start(2, "");
    run(|| async {
        let mut app = srv.app().await;
        // Offline first: queued until the device connects.
        for k in 1..=3 {
            accepted(app.push(PushTarget::Device("r1"), 0, format!("p{k}").as_bytes()).await.unwrap());
        }
        let mut dev = srv.device("r1").await;
        assert_eq!(dev.welcome.pending, 3);
        for k in 1..=3 {
            assert_eq!(message(&mut dev).await.seq, k);
        }
        dev.ack(1).await.unwrap();
        glommio::timer::sleep(Duration::from_millis(50)).await;
        drop(dev); // connection lost with 2 and 3 unacked
        glommio::timer::sleep(Duration::from_millis(100)).await;
        let mut dev = DeviceClient::connect(srv.device, APP, "r1", srv.token("r1"), 1).await.unwrap();
        assert_eq!(dev.welcome.acked_seq, 1);
        let again: Vec<(u64, Vec<u8>)> =
            vec![message(&mut dev).await, message(&mut dev).await].into_iter().map(|m| (m.seq, m.payload)).collect();
        assert_eq!(again, vec![(2, b"p2".to_vec()), (3, b"p3".to_vec())]);
        dev.ack(3).await.unwrap();
        accepted(app.push(PushTarget::Device("r1"), 0, b"p4").await.unwrap());
        assert_eq!(message(&mut dev).await.seq, 4);
    });
}

#[test]
fn second_login_replaces_the_first() {
    let srv = Server::start(2, "");
    run(|| async {
        let mut first = srv.device("dup").await;
        let mut second = srv.device("dup").await;
        match next(&mut first, T).await {
            Ok(DeviceEvent::Bye(code, _)) => assert_eq!(code, ErrorCode::REPLACED),
            other => panic!("first session should get BYE replaced, got {other:?}"),
        }
        let mut app = srv.app().await;
        accepted(app.push(PushTarget::Device("dup"), 0, b"to-second").await.unwrap());
        assert_eq!(message(&mut second).await.payload, b"to-second");
    });
}

#[test]
fn bad_input_gets_an_error_and_closes_only_that_connection() {
    let srv = Server::start(2, "max_device_frame = 1024");
    let addr = srv.device;
    run(|| async {
        let mut bystander = srv.device("bystander").await;
        let mut app = srv.app().await;

        let good = srv.token("dev").0;
        let mut bad = good;
        bad[20] ^= 0xff;
        let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
            ("bad token", hello_bytes(APP, "dev", bad), ErrorCode::BAD_TOKEN),
            ("expired token", hello_bytes(APP, "dev", token_for("dev", -10).0), ErrorCode::EXPIRED_TOKEN),
            ("unknown app", hello_bytes("nope", "dev", good), ErrorCode::UNKNOWN_APP),
            ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), ErrorCode::BAD_MAGIC),
            ("tls", vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01], ErrorCode::BAD_MAGIC),
            ("wrong version", b"RPSHD\x07\x09\x00".to_vec(), ErrorCode::UNSUPPORTED_VERSION),
            ("app role on device port", Preamble::client(Role::App).encode().to_vec(), ErrorCode::BAD_MAGIC),
            (
                "oversize",
                {
                    let mut b = Preamble::client(Role::Device).encode().to_vec();
                    b.extend_from_slice(&[0x01, 0, 0, 0x10, 0]); // HELLO claiming 4096 bytes
                    b
                },
                ErrorCode::OVERSIZE,
            ),
            (
                "garbage frame",
                {
                    let mut b = Preamble::client(Role::Device).encode().to_vec();
                    b.extend_from_slice(&[0x42, 0, 0, 0, 0]);
                    b
                },
                ErrorCode::UNKNOWN_FRAME_TYPE,
            ),
            (
                "not hello",
                {
                    let mut b = Preamble::client(Role::Device).encode().to_vec();
                    DeviceFrame::Ping(1).encode(&mut b);
                    b
                },
                ErrorCode::UNEXPECTED_FRAME,
            ),
        ];
        for (name, bytes, code) in cases {
            let reply = std::thread::spawn(move || raw_exchange(addr, &bytes)).join().unwrap();
            assert_eq!(error_code(&reply), code, "{name}");
        }
        // A session that goes bad mid-stream: oversize frame after a good HELLO.
        let mut dev = srv.device("midstream").await;
        dev.send_raw(&[0x04, 0, 0, 0x10, 0]).await.unwrap();
        match next(&mut dev, T).await {
            Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::OVERSIZE),
            other => panic!("expected ERROR oversize, got {other:?}"),
        }
        // Bad app input: wrong secret, and an oversize push on a live connection.
        match ringpush::client::AppClient::connect(srv.app, APP, b"wrong-secret-xxxxxxxx").await {
            Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::NOT_AUTHORIZED),
            Err(e) => panic!("expected not_authorized, got {e}"),
            Ok(_) => panic!("wrong secret was accepted"),
        }
        let mut app2 = srv.app().await;
        app2.queue_raw(&[0x23, 0x7f, 0, 0, 0]);
        app2.flush().await.unwrap();
        match app2.next_reply().await {
            Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::OVERSIZE),
            other => panic!("expected ERROR oversize, got {other:?}"),
        }
        // The bystander never noticed.
        accepted(app.push(PushTarget::Device("bystander"), 0, b"still here").await.unwrap());
        assert_eq!(message(&mut bystander).await.payload, b"still here");
        // Bad requests are rejected without closing the app connection.
        match app.push(PushTarget::Device("x"), u32::MAX, b"ttl").await.unwrap() {
            PushOutcome::Rejected(code, _) => assert_eq!(code, ErrorCode::BAD_TTL),
            other => panic!("expected bad_ttl, got {other:?}"),
        }
        accepted(app.push(PushTarget::Device("bystander"), 0, b"after").await.unwrap());
        assert_eq!(message(&mut bystander).await.payload, b"after");
    });
    assert!(srv.log().contains("device handshake failed"), "bad input is logged");
}

#[test]
fn a_flooded_shard_answers_busy_and_every_request_is_answered() {
    let srv = Server::start(2, "shard_queue = 1");
    run(|| async {
        let mut app = srv.app().await;
        let ids: Vec<String> = (0..64).map(|i| format!("f{i}")).collect();
        let total = 4000;
        for i in 0..total {
            app.queue_push(PushTarget::Device(&ids[i % ids.len()]), 0, b"flood");
        }
        app.flush().await.unwrap();
        let (mut ok, mut busy) = (0, 0);
        let mut accepted_per_device: HashMap<usize, u64> = HashMap::new();
        for _ in 0..total {
            match app.next_reply().await.unwrap() {
                AppReply::Push(req, PushOutcome::Accepted(_)) => {
                    ok += 1;
                    *accepted_per_device.entry((req as usize - 1) % ids.len()).or_default() += 1;
                }
                AppReply::Push(_, PushOutcome::Busy(ms)) => {
                    assert!(ms > 0);
                    busy += 1
                }
                other => panic!("unexpected reply {other:?}"),
            }
        }
        assert!(busy > 0, "a one-slot channel under a pipelined flood must answer BUSY");
        assert!(ok > 0);
        // Every accepted push reaches its device: nothing accepted is lost.
        for (i, id) in ids.iter().enumerate() {
            let want = accepted_per_device.get(&i).copied().unwrap_or(0);
            let mut dev = srv.device(id).await;
            assert_eq!(dev.welcome.pending as u64, want, "{id}");
            for k in 1..=want {
                assert_eq!(message(&mut dev).await.seq, k);
                if k % 32 == 0 {
                    dev.ack(k).await.unwrap();
                }
            }
        }
    });
}

#[test]
fn a_slow_device_does_not_stall_others_and_is_disconnected() {
    let srv = Server::start(
        1,
        "slow_device_timeout = \"1s\"\nwindow = 4096\nmax_queued_per_device = 8192\nmax_queued_bytes_per_device = 1073741824",
    );
    let addr = srv.device;
    // The slow device: connects, says HELLO, then never reads.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.write_all(&hello_bytes(APP, "slow", token_for("slow", 3600).0)).unwrap();
    run(|| async {
        let mut fast = srv.device("fast").await;
        let mut app = srv.app().await;
        let big = vec![7u8; 60_000];
        for _ in 0..300 {
            accepted(app.push(PushTarget::Device("slow"), 0, &big).await.unwrap());
        }
        for k in 1..=50u64 {
            accepted(app.push(PushTarget::Device("fast"), 0, b"quick").await.unwrap());
            let m = glommio::timer::timeout(Duration::from_millis(500), async { Ok(message(&mut fast).await) })
                .await
                .expect("fast device stalled behind the slow one");
            assert_eq!(m.seq, k);
        }
        glommio::timer::sleep(Duration::from_millis(2500)).await;
    });
    // The server gave up on the slow device: reading what it sent ends in EOF/reset
    // well before all 18 MB arrive.
    slow.set_read_timeout(Some(T)).unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match read_some(&mut slow, &mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("slow device was not disconnected: {e} after {total} bytes"),
        }
    }
    assert!(total < 300 * 60_000, "got everything ({total} bytes): never throttled");
}

#[test]
fn a_device_that_stops_reading_gets_everything_in_order_when_it_resumes() {
    // 300 x 60 KB is far more than the loopback socket buffers hold: the server's sends
    // come back short, the session waits for the socket to become writable, and must
    // resume exactly where the socket stopped taking bytes.
    let srv = Server::start(
        1,
        "slow_device_timeout = \"30s\"\nwindow = 4096\nmax_queued_per_device = 8192\nmax_queued_bytes_per_device = 1073741824",
    );
    let addr = srv.device;
    let mut dev = std::net::TcpStream::connect(addr).unwrap();
    dev.write_all(&hello_bytes(APP, "paused", token_for("paused", 3600).0)).unwrap();
    run(|| async {
        let mut app = srv.app().await;
        for i in 0..300u32 {
            let mut payload = vec![(i % 251) as u8; 60_000];
            payload[..4].copy_from_slice(&i.to_be_bytes());
            accepted(app.push(PushTarget::Device("paused"), 0, &payload).await.unwrap());
        }
        glommio::timer::sleep(Duration::from_millis(300)).await;
    });
    // Now read everything: preamble, WELCOME, then 300 MESSAGEs in order, intact.
    dev.set_read_timeout(Some(T)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let limits = Limits { max_frame: 1 << 20, max_targets: 0 };
    let mut pos = ringpush::protocol::PREAMBLE_LEN;
    let mut next = 0u32;
    while next < 300 {
        let n = read_some(&mut dev, &mut chunk).expect("the server kept the session while the device paused");
        assert!(n > 0, "connection closed after {next} messages");
        buf.extend_from_slice(&chunk[..n]);
        while let Some((frame, used)) = DeviceFrame::decode(&buf[pos.min(buf.len())..], &limits).unwrap() {
            pos += used;
            match frame {
                DeviceFrame::Welcome(_) => {}
                DeviceFrame::Message(m) => {
                    assert_eq!(m.seq, next as u64 + 1);
                    assert_eq!(m.payload[..4], next.to_be_bytes());
                    assert!(m.payload[4..].iter().all(|&b| b == (next % 251) as u8), "message {next} corrupted");
                    next += 1;
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

#[test]
fn a_handshake_that_stalls_is_refused_after_the_timeout() {
    let srv = Server::start(2, "handshake_timeout = \"1s\"");
    // The preamble and half a HELLO, then silence.
    let hello = hello_bytes(APP, "stalled", token_for("stalled", 3600).0);
    let started = std::time::Instant::now();
    let reply = raw_exchange(srv.device, &hello[..hello.len() / 2]);
    assert_eq!(error_code(&reply), ErrorCode::BAD_FRAME);
    assert!(started.elapsed() >= Duration::from_millis(900), "refused before the timeout");
    // A connection that sends everything at once in tiny pieces still gets in.
    run(|| async {
        let mut app = srv.app().await;
        accepted(app.push(PushTarget::Device("slowpoke"), 0, b"waiting").await.unwrap());
    });
    let mut s = std::net::TcpStream::connect(srv.device).unwrap();
    s.set_nodelay(true).unwrap();
    for b in hello_bytes(APP, "slowpoke", token_for("slowpoke", 3600).0) {
        s.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let limits = Limits::default();
    let message = loop {
        let n = read_some(&mut s, &mut chunk).expect("the server answers");
        assert!(n > 0, "closed: {got:?}");
        got.extend_from_slice(&chunk[..n]);
        let mut pos = ringpush::protocol::PREAMBLE_LEN.min(got.len());
        let mut found = None;
        while let Ok(Some((frame, used))) = DeviceFrame::decode(&got[pos..], &limits) {
            pos += used;
            if let DeviceFrame::Message(m) = frame {
                found = Some(m.payload.to_vec());
            }
        }
        if let Some(m) = found {
            break m;
        }
    };
    assert_eq!(message, b"waiting");
}

#[test]
fn read_batch_hands_every_buffered_message_over_in_order() {
    let srv = Server::start(2, "");
    run(|| async {
        let mut app = srv.app().await;
        for i in 0..50u32 {
            accepted(app.push(PushTarget::Device("batcher"), 0, &i.to_be_bytes()).await.unwrap());
        }
        let mut dev = srv.device("batcher").await;
        let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
        while got.len() < 50 {
            let mut on = |m: &ringpush::protocol::device::Message<'_>| got.push((m.seq, m.payload.to_vec()));
            let ev = glommio::timer::timeout(T, async { Ok(dev.read_batch(&mut on).await) }).await.unwrap();
            assert!(matches!(ev, Ok(None)), "{ev:?}");
        }
        for (i, (seq, payload)) in got.iter().enumerate() {
            assert_eq!((*seq, payload.as_slice()), (i as u64 + 1, &(i as u32).to_be_bytes()[..]));
        }
        dev.ack(50).await.unwrap();
        // A PONG ends a batch and is returned.
        dev.ping(7).await.unwrap();
        let ev = dev.read_batch(&mut |_| panic!("no more messages")).await.unwrap();
        assert!(matches!(ev, Some(DeviceEvent::Pong(7))), "{ev:?}");
    });
}

#[test]
fn idle_devices_are_closed_after_two_heartbeats_and_pings_keep_them() {
    let srv = Server::start(1, "heartbeat = \"300ms\"");
    run(|| async {
        let mut idle = srv.device("idle").await;
        let mut alive = srv.device("alive").await;
        assert_eq!(idle.welcome.heartbeat_ms, 300);
        for i in 0..8 {
            alive.ping(i).await.unwrap();
            assert_eq!(next(&mut alive, T).await.unwrap(), DeviceEvent::Pong(i));
            glommio::timer::sleep(Duration::from_millis(150)).await;
        }
        match next(&mut idle, T).await {
            Ok(DeviceEvent::Bye(code, _)) => assert_eq!(code, ErrorCode::IDLE_TIMEOUT),
            other => panic!("expected BYE idle_timeout, got {other:?}"),
        }
    });
}

#[test]
fn pipelined_requests_are_matched_by_request_id() {
    let srv = Server::start(2, "");
    run(|| async {
        let mut dev = srv.device("pipe").await;
        let mut app = srv.app().await;
        let ids: Vec<u64> =
            (0..200).map(|i| app.queue_push(PushTarget::Device("pipe"), 0, format!("{i}").as_bytes())).collect();
        app.flush().await.unwrap();
        let mut replies = HashMap::new();
        for _ in 0..ids.len() {
            if let AppReply::Push(r, o) = app.next_reply().await.unwrap() {
                replies.insert(r, o);
            }
        }
        assert!(ids.iter().all(|id| matches!(replies.get(id), Some(PushOutcome::Accepted(_)))));
        for i in 0..200u64 {
            let m = message(&mut dev).await;
            assert_eq!((m.seq, m.payload), (i + 1, format!("{i}").into_bytes()));
            if m.seq % 32 == 0 {
                dev.ack(m.seq).await.unwrap(); // the window is 64 unacked messages
            }
        }
        // A request id reused while in flight is refused, the connection stays up.
        let mut raw = Vec::new();
        for _ in 0..2 {
            ringpush::protocol::AppFrame::ReceiptQuery { request_id: 9_999, push_id: 0xdead << 32 }.encode(&mut raw);
        }
        app.queue_raw(&raw);
        app.flush().await.unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(app.next_reply().await.unwrap());
        }
        // The first waits for the other shard's answer, so the second finds it in flight.
        let codes: Vec<ErrorCode> = got
            .iter()
            .map(|r| match r {
                AppReply::Push(9_999, PushOutcome::Rejected(code, _)) => *code,
                other => panic!("unexpected reply {other:?}"),
            })
            .collect();
        assert_eq!(codes, [ErrorCode::UNEXPECTED_FRAME, ErrorCode::UNKNOWN_PUSH]);
        // The connection still works.
        accepted(app.push(PushTarget::Device("pipe"), 0, b"more").await.unwrap());
    });
}

#[test]
fn pushes_read_together_keep_each_devices_order_across_shards() {
    // The ingress applies its own shares after a read's remote shares: a later push to
    // a device of the ingress shard must still come after an earlier one in that read.
    let srv = Server::start(2, "");
    run(|| async {
        let on =
            |shard: usize| (0..).map(|i| format!("o{i}")).find(|id| ringpush::routing::shard_for(APP, id, 2) == shard);
        let (a, b) = (on(0).unwrap(), on(1).unwrap());
        let (mut da, mut db) = (srv.device(&a).await, srv.device(&b).await);
        let mut app = AppClient::connect_to_shard(srv.app, APP, SECRET.as_bytes(), 0, 2).await.unwrap();
        assert_eq!(app.shard, 0);
        let both = vec![a.clone(), b.clone()];
        let ids = [
            app.queue_push(PushTarget::List(&both), 0, b"1"),
            app.queue_push(PushTarget::Device(&a), 0, b"2"),
            app.queue_push(PushTarget::App, 0, b"3"),
            app.queue_push(PushTarget::Device(&a), 0, b"4"),
            app.queue_push(PushTarget::Device(&b), 0, b"5"),
        ];
        app.flush().await.unwrap();
        let mut replies = HashMap::new();
        for _ in 0..ids.len() {
            if let AppReply::Push(r, o) = app.next_reply().await.unwrap() {
                replies.insert(r, o);
            }
        }
        assert!(ids.iter().all(|id| matches!(replies.get(id), Some(PushOutcome::Accepted(_)))), "{replies:?}");
        for (dev, unicast) in [(&mut da, vec!["1", "2", "4"]), (&mut db, vec!["1", "5"])] {
            let (mut got, mut broadcast) = (Vec::new(), Vec::new());
            for _ in 0..unicast.len() + 1 {
                let m = message(dev).await;
                let text = String::from_utf8(m.payload).unwrap();
                if m.broadcast {
                    broadcast.push(text)
                } else {
                    got.push((m.seq, text))
                }
            }
            let want: Vec<(u64, String)> =
                unicast.iter().enumerate().map(|(i, p)| (i as u64 + 1, p.to_string())).collect();
            assert_eq!((got, broadcast), (want, vec!["3".to_string()]));
        }
    });
}

#[test]
fn sigterm_says_bye_to_devices_and_exits_zero() {
    let srv = Server::start(2, "");
    let (tx, rx) = std::sync::mpsc::channel();
    let device = srv.device;
    let t = std::thread::spawn(move || {
        run(|| async {
            let mut devs = Vec::new();
            for i in 0..8 {
                let id = format!("s{i}");
                devs.push(DeviceClient::connect(device, APP, &id, token_for(&id, 60), 0).await.unwrap());
            }
            tx.send(()).unwrap();
            for d in devs.iter_mut() {
                match next(d, T).await {
                    Ok(DeviceEvent::Bye(code, _)) => assert_eq!(code, ErrorCode::SHUTTING_DOWN),
                    other => panic!("expected BYE shutting_down, got {other:?}"),
                }
            }
        })
    });
    rx.recv().unwrap();
    let status = srv.stop(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    t.join().expect("devices got BYE");
}

#[test]
fn a_stopped_box_leaves_its_ports_free_the_moment_it_exits() {
    // A pending accept in a ring (the shard's device ring, glommio's for app and HTTP)
    // holds its listener until the kernel tears the ring down, after the process exited:
    // a box restarted on the same ports found them taken for that moment. Each round
    // binds the ports as a restarted box would (SO_REUSEADDR, its first listener without
    // SO_REUSEPORT) as soon as the old one is reaped.
    for round in 0..8 {
        let srv = Server::start(2, "");
        let addrs = [srv.device, srv.app, srv.http];
        // A connected device, so the shards are still at work when their listeners stop.
        let mut dev = std::net::TcpStream::connect(srv.device).unwrap();
        dev.write_all(&ringpush::client::hello_bytes(APP, "stay", &token_for("stay", 60), 0, 0)).unwrap();
        let mut welcome = [0u8; 8];
        dev.read_exact(&mut welcome).unwrap();
        let (status, log) = srv.stop_with_log(Duration::from_secs(10));
        drop(dev);
        assert!(status.success(), "exit status {status:?}");
        // Stopping the listeners ends their accepts with errors that are not news.
        assert!(!log.contains("accept failed"), "{log}");
        for addr in addrs {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&addr.into()).unwrap_or_else(|e| panic!("round {round}: {addr} still held after exit: {e}"));
            s.listen(16).unwrap();
        }
    }
}

#[test]
fn readyz_says_shutting_down_while_the_box_drains() {
    let srv = Server::start(1, "");
    let mut dev = std::net::TcpStream::connect(srv.device).unwrap();
    dev.write_all(&ringpush::client::hello_bytes(APP, "drain", &token_for("drain", 60), 0, 0)).unwrap();
    let mut preamble = [0u8; 8];
    dev.read_exact(&mut preamble).unwrap();
    assert_eq!(http_get(srv.http, "/readyz"), (200, "ready\n".to_string()));
    srv.signal(libc::SIGTERM);
    // The device gets its BYE and the connection ends once the shard has begun to
    // drain; the HTTP port still answers then, and says why the box is not ready.
    dev.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    dev.read_to_end(&mut rest).expect("WELCOME, BYE, then the end of the connection");
    assert_eq!(http_get(srv.http, "/readyz"), (503, "shutting down\n".to_string()));
    let (status, _) = srv.stop_with_log(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn thousands_of_devices_get_unicast_and_broadcast() {
    let srv = Server::start(2, "");
    run(|| async {
        const N: usize = 3000;
        let mut devs = Vec::with_capacity(N);
        for i in 0..N {
            devs.push(srv.device(&format!("k{i}")).await);
        }
        let mut app = srv.app().await;
        let names: Vec<String> = (0..N).map(|i| format!("k{i}")).collect();
        for name in &names {
            app.queue_push(PushTarget::Device(name), 0, name.as_bytes());
        }
        app.queue_push(PushTarget::App, 0, b"everyone");
        app.flush().await.unwrap();
        for _ in 0..=N {
            match app.next_reply().await.unwrap() {
                AppReply::Push(_, PushOutcome::Accepted(_)) => {}
                other => panic!("not accepted: {other:?}"),
            }
        }
        for (i, dev) in devs.iter_mut().enumerate() {
            let a = message(dev).await;
            let b = message(dev).await;
            assert_eq!(a.payload, names[i].as_bytes());
            assert_eq!(b.payload, b"everyone");
            // Unicast seq 1, and broadcast seq 1 in the app's broadcast stream.
            assert_eq!((a.seq, a.broadcast, b.seq, b.broadcast), (1, false, 1, true));
        }
    });
}

#[test]
fn health_endpoints_answer_on_the_http_port() {
    let srv = Server::start(2, "");
    assert_eq!(http_get(srv.http, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(srv.http, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(http_get(srv.http, "/nope").0, 404);
    let status = srv.stop(Duration::from_secs(10));
    assert!(status.success());
}

#[test]
fn a_device_client_read_cancelled_by_a_timeout_loses_nothing() {
    let srv = Server::start(1, "");
    run(|| async {
        let mut dev = srv.device("cancel").await;
        let mut app = srv.app().await;
        let mut got = Vec::new();
        let mut cancelled = 0;
        for n in 0..20u64 {
            app.queue_push(PushTarget::Device("cancel"), 0, format!("m{n}").as_bytes());
            app.flush().await.unwrap();
            // Poll with timeouts much shorter than the delivery: reads get cancelled.
            loop {
                match glommio::timer::timeout(Duration::from_micros(50), async { Ok(dev.next_event().await) }).await {
                    Ok(Ok(DeviceEvent::Message(m))) => {
                        got.push((m.seq, String::from_utf8(m.payload).unwrap()));
                        break;
                    }
                    Ok(other) => panic!("{other:?}"),
                    Err(_) => cancelled += 1,
                }
            }
            assert!(matches!(app.next_reply().await.unwrap(), AppReply::Push(_, PushOutcome::Accepted(_))));
        }
        let want: Vec<(u64, String)> = (0..20).map(|n| (n + 1, format!("m{n}"))).collect();
        assert_eq!(got, want);
        assert!(cancelled > 0, "no read was cancelled: the test proved nothing");
    });
}

/// The kernel's count of connections accepted with data in their SYN (TCP Fast Open).
fn fastopen_accepted() -> u64 {
    let netstat = std::fs::read_to_string("/proc/net/netstat").expect("/proc/net/netstat");
    let mut tcpext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcpext.next().expect("TcpExt names"), tcpext.next().expect("TcpExt values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPFastOpenPassive")
        .and_then(|(_, v)| v.parse().ok())
        .expect("TCPFastOpenPassive in /proc/net/netstat")
}

#[test]
fn a_returning_device_sends_its_hello_in_the_syn_when_the_kernel_allows_it() {
    // Bit 2 of net.ipv4.tcp_fastopen lets servers take data in a SYN (kernel-tuning
    // sets 3). Without it the same connections must work over a plain handshake.
    let sysctl = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fastopen").expect("tcp_fastopen sysctl");
    let server_bit = sysctl.trim().parse::<u32>().expect("a number") & 2 != 0;
    let srv = Server::start(2, "");
    let before = fastopen_accepted();
    run(|| async {
        let mut app = srv.app().await;
        // The first connection to the address may only fetch a cookie; the later ones
        // carry preamble and HELLO in the SYN.
        for i in 0..4 {
            let device = format!("fast-open-{i}");
            let mut dev = srv.device(&device).await;
            accepted(app.push(PushTarget::Device(&device), 0, device.as_bytes()).await.unwrap());
            assert_eq!(message(&mut dev).await.payload, device.as_bytes());
        }
    });
    let after = fastopen_accepted();
    if server_bit {
        assert!(after >= before + 3, "expected HELLOs in SYNs: TCPFastOpenPassive {before} -> {after}");
    } else {
        assert_eq!(after, before, "the kernel took SYN data with server Fast Open off");
    }
}

/// `serve` grows its descriptor table to its open-files limit (2^20 slots at most)
/// before the shards start, so the accepts of a storm never wait for the table to grow
/// (each growth in a threaded process waits for an RCU grace period).
#[test]
fn the_box_starts_with_its_descriptor_table_grown() {
    let srv = Server::start(2, "");
    let proc_file = |name: &str| std::fs::read_to_string(format!("/proc/{}/{name}", srv.pid())).unwrap();
    let limits = proc_file("limits");
    let soft_limit: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric open-files limit in\n{limits}"));
    let status = proc_file("status");
    let table: u64 = status.lines().find_map(|l| l.strip_prefix("FDSize:")).unwrap().trim().parse().unwrap();
    assert!(table >= soft_limit.min(1 << 20), "descriptor table of {table} slots, open-files limit {soft_limit}");
    assert!(srv.stop(T).success());
}

/// With a CPU per shard (`device_steering = "cpu"`, the default) the shard pinned to the
/// CPU that processed a device connection's SYN accepts it; on loopback that is the
/// connecting thread's CPU.
#[test]
fn device_connections_are_accepted_by_the_shard_on_the_cpu_of_their_syn() {
    let cpus = ringpush::server::affinity_cpus();
    assert!(cpus.len() >= 2, "this test needs two CPUs in its affinity mask, it has {cpus:?}");
    let srv = Server::start(2, "");
    let accepted = || {
        [0, 1].map(|s| metric_sum(srv.http, &format!("ringpush_device_connections_accepted_total{{shard=\"{s}\"}}")))
    };
    for shard in [1, 0, 1] {
        let before = accepted();
        let (addr, cpu) = (srv.device, cpus[shard]);
        // Eight connections from a thread pinned to the shard's CPU, held until counted.
        let held: Vec<std::net::TcpStream> = std::thread::spawn(move || {
            // SAFETY: cpu_set_t is plain data; the mask applies to this thread (pid 0).
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
            }
            (0..8).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect()
        })
        .join()
        .unwrap();
        let deadline = std::time::Instant::now() + T;
        let mut now = accepted();
        while now[0] + now[1] < before[0] + before[1] + 8.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            now = accepted();
        }
        let mut want = before;
        want[shard] += 8.0;
        assert_eq!(now, want, "connections from CPU {cpu} (shard {shard}'s), accepted per shard before: {before:?}");
        drop(held);
    }
    assert!(srv.stop(T).success());
}
