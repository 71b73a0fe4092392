//! Black-box tests of the offline store: restarts, crashes (SIGKILL), a full disk,
//! and readiness during recovery. Each starts the real binary on loopback.

mod common;

use common::*;
use ringpush::client::{AppClient, AppReply, DeviceClient, PushOutcome, PushTarget};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Connects `id` and reads messages until `want` unicast and `bwant` broadcast ones
/// arrived, acking as it goes. Returns (seq, broadcast, payload) in arrival order.
async fn drain(srv: &Server, id: &str, last_acked: u64, want: usize, bwant: usize) -> Vec<(u64, bool, String)> {
    let mut dev = DeviceClient::connect(srv.device, APP, id, srv.token(id), last_acked)
        .await
        .unwrap_or_else(|e| panic!("{id} connects: {e}"));
    let mut got = Vec::new();
    let (mut u, mut b) = (last_acked, 0);
    while got.iter().filter(|m: &&(u64, bool, String)| !m.1).count() < want
        || got.iter().filter(|m: &&(u64, bool, String)| m.1).count() < bwant
    {
        let m = message(&mut dev).await;
        *(if m.broadcast { &mut b } else { &mut u }) = m.seq;
        got.push((m.seq, m.broadcast, String::from_utf8(m.payload).unwrap()));
        if !dev.has_buffered_frame() {
            dev.ack_both(u, b).await.unwrap();
        }
    }
    dev.ack_both(u, b).await.unwrap();
    quiet(&mut dev, Duration::from_millis(100)).await;
    got
}

#[test]
fn offline_messages_and_broadcasts_survive_a_restart_in_order_exactly_once() {
    let srv = Server::start(2, "");
    run(|| async {
        // Register the devices (a broadcast reaches devices the box knows).
        for i in 0..6 {
            let d = srv.device(&format!("r{i}")).await;
            d.close().await.unwrap();
        }
        let mut app = srv.app().await;
        for n in 0..20 {
            for i in 0..6 {
                let out = app.push(PushTarget::Device(&format!("r{i}")), 0, format!("{i}:{n}").as_bytes()).await;
                assert!(matches!(out.unwrap(), PushOutcome::Accepted(_)));
            }
        }
        let out = app.push(PushTarget::App, 0, b"to everyone").await.unwrap();
        assert!(matches!(out, PushOutcome::Accepted(_)));
    });
    let dir = srv.stop_keep(Duration::from_secs(10));
    let srv = Server::launch(dir, 2, "").ready();
    assert!(srv.log().contains("store recovered"), "{}", srv.log());
    run(|| async {
        for i in 0..6 {
            let got = drain(&srv, &format!("r{i}"), 0, 20, 1).await;
            let unicast: Vec<(u64, String)> = got.iter().filter(|m| !m.1).map(|m| (m.0, m.2.clone())).collect();
            let want: Vec<(u64, String)> = (0..20).map(|n| (n as u64 + 1, format!("{i}:{n}"))).collect();
            assert_eq!(unicast, want, "device r{i}: every message, in order, once");
            assert_eq!(got.iter().filter(|m| m.1).collect::<Vec<_>>(), [&(1, true, "to everyone".to_string())]);
        }
    });
    // Acked messages stay acked across another restart.
    let dir = srv.stop_keep(Duration::from_secs(10));
    let srv = Server::launch(dir, 2, "").ready();
    run(|| async {
        let mut dev = srv.device("r0").await;
        assert_eq!((dev.welcome.acked_seq, dev.welcome.pending, dev.welcome.broadcast_cursor), (20, 0, 1));
        quiet(&mut dev, Duration::from_millis(200)).await;
    });
}

fn accepted_id(out: PushOutcome) -> u64 {
    match out {
        PushOutcome::Accepted(id) => id,
        other => panic!("push not accepted: {other:?}"),
    }
}

#[test]
fn a_push_id_still_in_the_store_is_never_given_to_a_push_after_a_restart() {
    // Push ids count per shard. A message stored by the last process and acked after a
    // restart must not count toward a new push that got its id.
    let srv = Server::start(1, "");
    let old = std::cell::Cell::new(0);
    run(|| async {
        let mut app = srv.app().await;
        old.set(accepted_id(app.push(PushTarget::Device("late"), 0, b"old").await.unwrap()));
    });
    let dir = srv.stop_keep(Duration::from_secs(10));
    let srv = Server::launch(dir, 1, "").ready();
    run(|| async {
        let mut app = srv.app().await;
        let new = accepted_id(app.push(PushTarget::Device("fresh"), 0, b"new").await.unwrap());
        assert_ne!(new, old.get(), "a stored push's id given again");
        let got = drain(&srv, "late", 0, 1, 0).await;
        assert_eq!(got, [(1, false, "old".to_string())]);
        let r = app.receipt(new).await.unwrap().unwrap();
        assert_eq!((r.targeted, r.delivered, r.stored), (1, 0, 1), "the new push's receipt: {r:?}");
    });
}

/// Pushes unicast messages numbered per device to `devices` offline devices until the
/// connection breaks or `deadline`; records which numbers were ACCEPTED.
async fn push_until_broken(srv_app: std::net::SocketAddr, devices: usize, next: &mut [u64], accepted: &mut [Vec<u64>]) {
    let Ok(mut app) = AppClient::connect(srv_app, APP, SECRET.as_bytes()).await else { return };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut inflight: HashMap<u64, (usize, u64)> = HashMap::new();
    let mut d = 0;
    while Instant::now() < deadline {
        // Keep a few pushes in flight, so the kill lands among unanswered ones.
        while inflight.len() < 16 {
            let id = format!("c{d}");
            let n = next[d];
            next[d] += 1;
            let rid = app.queue_push(PushTarget::Device(&id), 0, format!("{d}:{n}").as_bytes());
            inflight.insert(rid, (d, n));
            d = (d + 1) % devices;
        }
        if app.flush().await.is_err() {
            return;
        }
        match app.next_reply().await {
            Ok(AppReply::Push(rid, PushOutcome::Accepted(_))) => {
                let (dev, n) = inflight.remove(&rid).expect("known request");
                accepted[dev].push(n);
            }
            Ok(other) => panic!("push not accepted: {other:?}"),
            Err(_) => return, // the server died
        }
    }
}

#[test]
fn every_accepted_push_survives_sigkill_under_load() {
    const DEVICES: usize = 40;
    let mut srv = Server::start(2, "durability = \"batched\"\nsegment_bytes = 262144\nmax_app_frame = 4096");
    let mut next = vec![0u64; DEVICES];
    let mut accepted: Vec<Vec<u64>> = vec![Vec::new(); DEVICES];
    // Kill moments differ on every run; the seed is printed to replay a failure.
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("kill schedule seed {seed}");
    let mut rng_state = seed;
    for round in 0..5 {
        // Kill at a pseudo-random moment 150–650 ms into a steady push load.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let kill_after = Duration::from_millis(150 + rng_state % 500);
        let pid = srv.pid();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            // SAFETY: kill(2) on the server we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let app_addr = srv.app;
        run(|| async { push_until_broken(app_addr, DEVICES, &mut next, &mut accepted).await });
        killer.join().unwrap();
        let dir = srv.kill();
        srv = Server::launch(dir, 2, "durability = \"batched\"\nsegment_bytes = 262144\nmax_app_frame = 4096").ready();
        assert!(srv.log().contains("store recovered"), "round {round}");
        // After each restart every accepted push is stored again (a device that connects
        // without acking releases nothing).
        run(|| async {
            for (d, acc) in accepted.iter().enumerate() {
                let id = format!("c{d}");
                let dev = DeviceClient::connect(srv.device, APP, &id, srv.token(&id), 0).await.unwrap();
                let pending = dev.welcome.pending as usize;
                assert!(pending >= acc.len(), "round {round}, {id}: {pending} stored < {} accepted", acc.len());
                dev.close().await.unwrap();
            }
        });
    }
    let total: usize = accepted.iter().map(Vec::len).sum();
    assert!(total > 100, "the load ran: {total} accepted");
    eprintln!("{total} pushes accepted across 5 SIGKILLs");
    // Every accepted push reaches its device, in push order; pushes whose reply was lost
    // in the kill may be there too (they were stored, not yet flushed), never others.
    run(|| async {
        for (d, acc) in accepted.iter().enumerate() {
            let id = format!("c{d}");
            let pending = DeviceClient::connect(srv.device, APP, &id, srv.token(&id), 0).await.unwrap().welcome.pending;
            assert!(pending as usize >= acc.len(), "{id}: {pending} stored < {} accepted", acc.len());
            let got = drain(&srv, &id, 0, pending as usize, 0).await;
            let numbers: Vec<u64> = got.iter().map(|m| m.2.split(':').nth(1).unwrap().parse().unwrap()).collect();
            let seqs: Vec<u64> = got.iter().map(|m| m.0).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{id}: seqs in order, once: {seqs:?}");
            assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{id}: pushes in order: {numbers:?}");
            for n in acc {
                assert!(numbers.contains(n), "{id}: accepted push {n} lost; got {numbers:?}");
            }
        }
    });
}

#[test]
fn a_full_disk_refuses_pushes_with_storage_full_and_keeps_serving() {
    // A filesystem made for the test: a 3 MiB tmpfs (root is needed to mount it).
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and must run as root");
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount -t tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let extra = "segment_bytes = 262144\nmax_app_frame = 65536\nmax_queued_per_device = 100000\nmax_queued_bytes_per_device = 100000000";
    // The harness passes its own --data-dir; point it at the tmpfs through a link.
    let home = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&mnt, home.path().join("data")).unwrap();
    let srv = Server::launch(home, 2, extra).ready();
    // One device on each shard: "full" fills shard 0's store; the other makes shard 1
    // write its first segment before the disk is full.
    let on = |shard: usize| {
        (0..).map(|i| format!("dev{i}")).find(|id| ringpush::routing::shard_for(APP, id, 2) == shard).unwrap()
    };
    let (full, other) = (on(0), on(1));
    let payload = vec![b'x'; 16 * 1024];
    run(|| async {
        srv.device(&other).await.close().await.unwrap();
        let mut app = srv.app().await;
        let mut accepted = 0usize;
        let code = loop {
            match app.push(PushTarget::Device(&full), 0, &payload).await.unwrap() {
                PushOutcome::Accepted(_) => accepted += 1,
                PushOutcome::Rejected(code, _) => break code,
                other => panic!("{other:?}"),
            }
            assert!(accepted < 1000, "a 3 MiB disk cannot take 16 MiB");
        };
        assert_eq!(code, ringpush::protocol::ErrorCode::STORAGE_FULL);
        assert!(accepted >= 10, "{accepted}");
        // A broadcast that one shard cannot store is refused as a whole, though the
        // other shard took it: ACCEPTED must mean every shard has it.
        match app.push(PushTarget::App, 0, b"to all").await.unwrap() {
            PushOutcome::Rejected(code, _) => assert_eq!(code, ringpush::protocol::ErrorCode::STORAGE_FULL),
            other => panic!("a half-stored broadcast must be refused: {other:?}"),
        }
        // Still serving: the device gets everything that was accepted, and once it
        // acked, the space comes back.
        let got = drain(&srv, &full, 0, accepted, 0).await;
        assert_eq!(got.len(), accepted);
        assert!(got.iter().enumerate().all(|(i, m)| m.0 == i as u64 + 1));
        let start = Instant::now();
        loop {
            match app.push(PushTarget::Device(&full), 0, &payload).await.unwrap() {
                PushOutcome::Accepted(_) => break,
                PushOutcome::Rejected(code, _) => assert_eq!(code, ringpush::protocol::ErrorCode::STORAGE_FULL),
                other => panic!("{other:?}"),
            }
            assert!(start.elapsed() < Duration::from_secs(10), "space never came back");
            glommio::timer::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(metric_sum(srv.http, "ringpush_store_errors_total") > 0.0);
    drop(srv);
}

#[test]
fn readyz_says_recovering_until_the_store_is_rebuilt() {
    // Fill a data dir directly through the library: 400 000 messages over 2 shards.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("store")).unwrap();
    std::fs::write(data.join("store/LAYOUT"), "shards = 2\n").unwrap();
    let limits = ringpush::devices::QueueLimits { window: 64, max_msgs: 100_000, max_bytes: 1 << 30 };
    let opts =
        ringpush::devices::TableOptions { limits, receipts: 16, cache_msgs: 0, latencies: false, clock_seqs: false };
    let now = ringpush::client::unix_ms();
    for shard in 0..2 {
        let sopts = ringpush::store::StoreOptions { segment_bytes: 64 << 20, max_bytes: u64::MAX };
        let apps = vec![APP.into(), "other".into()];
        let dir = data.join(format!("store/shard-{shard}"));
        let mut t = ringpush::devices::DeviceTable::open(&dir, sopts, apps, opts, now).unwrap();
        for i in 0..200_000u64 {
            let id = format!("s{shard}-{}", i % 2000);
            t.enqueue_to(0, &id, i, now + 3_600_000, &[7u8; 64], now, 0).unwrap();
        }
        t.store.flush_now().unwrap();
    }
    let starting = Server::launch(dir, 2, "");
    let mut answers = Vec::new();
    let start = Instant::now();
    loop {
        let (code, body) = http_get(starting.http, "/readyz");
        answers.push((code, body.clone()));
        if code == 200 {
            break;
        }
        // "starting": recovered, listeners about to open.
        assert!(code == 503 && (body == "recovering\n" || body == "starting\n"), "{code} {body:?}");
        assert!(start.elapsed() < Duration::from_secs(60), "never ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(answers.iter().any(|a| a.1 == "recovering\n"), "recovery was observed: {answers:?}");
    let srv = starting.ready();
    assert_eq!(metric_sum(srv.http, "ringpush_queued_messages{"), 400_000.0);
}

#[test]
fn every_durability_policy_accepts_and_keeps_pushes_across_a_restart() {
    for policy in ["sync", "batched", "memory"] {
        let extra = format!("durability = \"{policy}\"");
        let srv = Server::start(2, &extra);
        run(|| async {
            let mut app = srv.app().await;
            for n in 0..3 {
                let out = app.push(PushTarget::Device("p"), 0, format!("{policy}-{n}").as_bytes()).await.unwrap();
                assert!(matches!(out, PushOutcome::Accepted(_)), "{policy}: {out:?}");
            }
        });
        let flushes = metric_sum(srv.http, "ringpush_store_flush_seconds_count");
        if policy == "memory" {
            assert_eq!(flushes, 0.0, "memory answers without flushing");
        } else {
            assert!(flushes >= 1.0, "{policy} flushes before answering");
        }
        let srv = Server::launch(srv.stop_keep(Duration::from_secs(10)), 2, &extra).ready();
        run(|| async {
            let got: Vec<String> = drain(&srv, "p", 0, 3, 0).await.into_iter().map(|m| m.2).collect();
            assert_eq!(got, (0..3).map(|n| format!("{policy}-{n}")).collect::<Vec<_>>());
        });
    }
}

#[test]
fn a_seq_a_device_was_shown_is_never_given_to_another_message_after_sigkill() {
    // Delivery does not wait for the flush: with a long group commit the device gets
    // the push, then the process dies before the flush and the app never hears
    // ACCEPTED. Whatever the restarted box delivers under that seq must be the same
    // message, or the device (which drops seqs it has seen) would lose the new one.
    let config = "group_commit = \"1s\"";
    let srv = Server::start(1, config);
    let seen = std::cell::Cell::new(0);
    run(|| async {
        let mut dev = srv.device("seen").await;
        let mut app = srv.app().await;
        app.queue_push(PushTarget::Device("seen"), 0, b"first");
        app.flush().await.unwrap();
        let m = message(&mut dev).await;
        assert_eq!(m.payload, b"first");
        seen.set(m.seq);
    });
    let dir = srv.kill();
    let srv = Server::launch(dir, 1, config).ready();
    run(|| async {
        let mut app = srv.app().await;
        assert!(matches!(app.push(PushTarget::Device("seen"), 0, b"second").await.unwrap(), PushOutcome::Accepted(_)));
        let mut dev = srv.device("seen").await;
        loop {
            let m = message(&mut dev).await;
            if m.seq <= seen.get() {
                assert_eq!((m.seq, m.payload.as_slice()), (seen.get(), &b"first"[..]), "a seen seq, another message");
                continue;
            }
            assert_eq!(m.payload, b"second");
            break;
        }
    });
}
