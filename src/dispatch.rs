//! Dispatch: which node of a fleet a device belongs to, and where it should connect.
//!
//! Runs on: every shard reads the [`Fleet`] (immutable, built from the config at
//! start); shard 0 alone keeps the [`Health`] of the nodes, probes them, and answers
//! `GET /v1/dispatch` on the HTTP port.
//!
//! A device's **node** is fixed by the config: the first point clockwise from the
//! device's point on a ring where each node has `weight × POINTS_PER_WEIGHT` virtual
//! points ([`Ring`]). Every node and every app client computes the same answer, with
//! no shared state. The node keeps the device's stored messages, so a push for a device
//! is taken only by its node (any other answers REJECTED `redirect` with the node's app
//! address) and a device session only by its node (any other says BYE `redirect` with
//! the node's device address).
//!
//! Health decides what dispatch answers, not where a device belongs: a node that is
//! down (its `/readyz` failed `fall` probes in a row, or a device reported it
//! unreachable) gets no devices sent to it; dispatch answers 503 with a retry hint
//! until it has passed `rise` probes. It does not send the device to the next node,
//! because that node does not hold the device's stored messages, and pushes taken
//! there would be stranded when the device goes home.

use crate::config::{FleetConfig, FleetNode};
use crate::routing::device_hash;
use std::net::SocketAddr;
use std::time::Duration;

/// Virtual points per unit of weight.
pub const POINTS_PER_WEIGHT: u32 = 4;

/// splitmix64's finalizer: spreads the FNV hashes over the whole ring.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where a device sits on the node ring.
pub fn device_point(app: &str, device: &str) -> u64 {
    mix(device_hash(app, device))
}

/// Where virtual point `k` of node `name` sits: FNV-1a of `u8 len(name) | name | u32 BE k`, mixed.
pub fn node_point(name: &str, k: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = std::iter::once(name.len() as u8).chain(name.bytes()).chain(k.to_be_bytes());
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// A weighted consistent-hash ring over node indexes.
#[derive(Debug, Clone)]
pub struct Ring {
    /// (point, node index), sorted by point, then by node name.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// `nodes` are (name, weight); weights of 0 get no points.
    pub fn new<'a>(nodes: impl IntoIterator<Item = (&'a str, u32)>) -> Ring {
        let nodes: Vec<(&str, u32)> = nodes.into_iter().collect();
        let mut points: Vec<(u64, u32)> = Vec::new();
        for (i, &(name, weight)) in nodes.iter().enumerate() {
            points.extend((0..weight * POINTS_PER_WEIGHT).map(|k| (node_point(name, k), i as u32)));
        }
        // Equal points are ordered by name, so the ring does not depend on the order
        // the config lists the nodes in.
        points.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| nodes[a.1 as usize].0.cmp(nodes[b.1 as usize].0)));
        Ring { points }
    }

    /// The node owning `point`: the first virtual point at or after it, wrapping.
    pub fn node_at(&self, point: u64) -> usize {
        assert!(!self.points.is_empty(), "a ring needs a node with weight");
        let i = self.points.partition_point(|&(p, _)| p < point);
        self.points[if i == self.points.len() { 0 } else { i }].1 as usize
    }

    /// The node `device` of `app` belongs to.
    pub fn node_for(&self, app: &str, device: &str) -> usize {
        self.node_at(device_point(app, device))
    }

    pub fn points(&self) -> usize {
        self.points.len()
    }
}

/// The fleet as this node sees it: every node, which one it is, and the ring.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub nodes: Vec<FleetNode>,
    /// This node's index in `nodes`.
    pub me: usize,
    ring: Ring,
}

impl Fleet {
    /// The fleet of `cfg`. A config without nodes is a fleet of this box alone, named
    /// `cfg.node`, reached at the addresses it listens on (`device_addr` and `app_addr`
    /// are those of the listeners; an unspecified IP is answered per request).
    pub fn new(cfg: &FleetConfig, device_addr: SocketAddr, app_addr: SocketAddr, http_addr: SocketAddr) -> Fleet {
        let nodes = if cfg.nodes.is_empty() {
            vec![FleetNode {
                name: cfg.node.clone(),
                device_addr: device_addr.to_string(),
                app_addr: app_addr.to_string(),
                http_addr,
                weight: 1,
            }]
        } else {
            cfg.nodes.clone()
        };
        let me = nodes.iter().position(|n| n.name == cfg.node).expect("validated: fleet.node is among fleet.nodes");
        let ring = Ring::new(nodes.iter().map(|n| (n.name.as_str(), n.weight)));
        Fleet { nodes, me, ring }
    }

    /// Whether the fleet has other nodes (only then can a device belong elsewhere).
    pub fn is_shared(&self) -> bool {
        self.nodes.len() > 1
    }

    /// The index of the node `device` of `app` belongs to.
    pub fn node_for(&self, app: &str, device: &str) -> usize {
        if self.is_shared() {
            self.ring.node_for(app, device)
        } else {
            self.me
        }
    }

    /// The other node `device` of `app` belongs to, or `None` when it is this one.
    pub fn elsewhere(&self, app: &str, device: &str) -> Option<&FleetNode> {
        let n = self.node_for(app, device);
        (n != self.me).then(|| &self.nodes[n])
    }
}

/// One node's health as probes and reports have seen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NodeHealth {
    up: bool,
    /// Results in a row that disagree with `up` (failures while up, successes while down).
    streak: u32,
    /// When the last device report counted against it (ms, shard clock).
    reported_ms: Option<u64>,
}

/// Outcome counters of `GET /v1/dispatch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchCounts {
    pub answered: u64,
    pub node_down: u64,
    pub bad_request: u64,
    pub reports: u64,
}

/// Every node's health, kept by shard 0. Nodes start up (a box is not kept from its
/// devices while the first probes are in flight), go down after `fall` failed probes
/// in a row, and come back after `rise` good ones. A device's report that it could not
/// reach a node counts as one failed probe, at most once per `probe_interval` per node,
/// so a lying device can hasten a real outage but cannot keep a node down on its own.
#[derive(Debug, Clone)]
pub struct Health {
    nodes: Vec<NodeHealth>,
    fall: u32,
    rise: u32,
    report_gap_ms: u64,
    pub counts: DispatchCounts,
}

impl Health {
    pub fn new(nodes: usize, cfg: &FleetConfig) -> Health {
        Health {
            nodes: vec![NodeHealth { up: true, streak: 0, reported_ms: None }; nodes],
            fall: cfg.fall,
            rise: cfg.rise,
            report_gap_ms: cfg.probe_interval.as_millis() as u64,
            counts: DispatchCounts::default(),
        }
    }

    pub fn is_up(&self, node: usize) -> bool {
        self.nodes[node].up
    }

    /// Records a probe result; returns the new state when it changed.
    pub fn observe(&mut self, node: usize, ok: bool) -> Option<bool> {
        let (fall, rise) = (self.fall, self.rise);
        let h = &mut self.nodes[node];
        if ok == h.up {
            h.streak = 0;
            return None;
        }
        h.streak += 1;
        if h.streak >= if h.up { fall } else { rise } {
            h.up = ok;
            h.streak = 0;
            return Some(ok);
        }
        None
    }

    /// A device could not reach `node`; returns whether the report was counted.
    pub fn report_failure(&mut self, node: usize, now_ms: u64) -> bool {
        let gap = self.report_gap_ms;
        let h = &mut self.nodes[node];
        if !h.up || h.reported_ms.is_some_and(|t| now_ms < t + gap) {
            return false;
        }
        h.reported_ms = Some(now_ms);
        self.counts.reports += 1;
        self.observe(node, false);
        true
    }
}

/// What `GET /v1/dispatch` answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// 200: connect to this node.
    Node { node: usize },
    /// 503: the device's node is down; ask again after `retry_after_ms`.
    Down { node: usize, retry_after_ms: u64 },
    /// 400 (bad request or id) or 404 (unknown app), with a reason.
    Refused { status: u16, error: &'static str, reason: &'static str },
}

/// The query of a dispatch request: `app`, `device`, and optionally `failed` (the
/// name of a node the device could not reach). Values are percent-decoded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub app: Option<String>,
    pub device: Option<String>,
    pub failed: Option<String>,
}

impl Query {
    pub fn parse(query: &str) -> Result<Query, &'static str> {
        let mut q = Query::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)?;
            match k {
                "app" => q.app = Some(v),
                "device" => q.device = Some(v),
                "failed" => q.failed = Some(v),
                _ => return Err("unknown query parameter (app, device and failed are known)"),
            }
        }
        Ok(q)
    }
}

fn percent_decode(s: &str) -> Result<String, &'static str> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("bad percent-encoding")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a value is not UTF-8 once decoded")
}

/// Decides a dispatch request. `known_app` says whether an app id is configured,
/// `self_up` whether this box takes traffic; `now_ms` is for device reports.
pub fn decide(
    fleet: &Fleet,
    health: &mut Health,
    q: &Query,
    known_app: impl Fn(&str) -> bool,
    self_up: bool,
    retry_after: Duration,
    now_ms: u64,
) -> Answer {
    use ringpush_protocol::wire::{check_id, MAX_APP_ID, MAX_DEVICE_ID};
    let refused = |status, error, reason| Answer::Refused { status, error, reason };
    let (Some(app), Some(device)) = (&q.app, &q.device) else {
        return refused(400, "bad_request", "app and device are required");
    };
    if check_id(app, MAX_APP_ID).is_err() || check_id(device, MAX_DEVICE_ID).is_err() {
        return refused(400, "bad_id", "app or device id is empty, too long or has control characters");
    }
    if !known_app(app) {
        return refused(404, "unknown_app", "the app id is not configured on this server");
    }
    if let Some(failed) = &q.failed {
        match fleet.nodes.iter().position(|n| &n.name == failed) {
            Some(n) if n != fleet.me => {
                health.report_failure(n, now_ms);
            }
            Some(_) => {}
            None => return refused(400, "unknown_node", "failed names no node of this fleet"),
        }
    }
    let node = fleet.node_for(app, device);
    let up = if node == fleet.me { self_up } else { health.is_up(node) };
    if up {
        Answer::Node { node }
    } else {
        Answer::Down { node, retry_after_ms: retry_after.as_millis() as u64 }
    }
}

/// Whether the `/readyz` answer in `reply` (an HTTP response's first bytes) is 200.
pub fn probe_ok(reply: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(reply).is_ok() && resp.code == Some(200)
}

/// Probes `addr`'s `/readyz` once: connect, ask, read the status line, within `limit`.
pub async fn probe(addr: SocketAddr, limit: Duration) -> bool {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = glommio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: ringpush\r\nConnection: close\r\n\r\n").await?;
        let mut buf = [0u8; 256];
        let mut len = 0;
        while len < buf.len() {
            let n = s.read(&mut buf[len..]).await?;
            if n == 0 || buf[..len + n].windows(2).any(|w| w == b"\r\n") {
                len += n;
                break;
            }
            len += n;
        }
        Ok(probe_ok(&buf[..len]))
    };
    glommio::timer::timeout(limit, attempt).await.unwrap_or(false)
}

/// Hands over the stored messages of devices another node owns, a round every
/// `5 × probe_interval`, until none is left or the shard stops (each shard, for its own
/// partition). Only a start with a changed `[fleet]` leaves any: the running box refuses
/// pushes for other nodes' devices, so once they are gone the device slab is not
/// scanned again.
pub async fn hand_over(core: std::rc::Rc<crate::shard::ShardCore>) {
    let every = core.cfg().fleet.probe_interval * 5;
    while !core.draining.get() && !core.shutdown_requested() {
        if hand_over_round(&core).await.is_none() {
            return;
        }
        glommio::timer::sleep(every).await;
    }
}

/// How long one connect or push of a hand-over may take.
const HAND_OVER_WAIT: Duration = Duration::from_secs(5);

/// `f`'s result within [`HAND_OVER_WAIT`], its error or the timeout as text.
async fn within<T, E: std::fmt::Display>(f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, String> {
    glommio::timer::timeout(HAND_OVER_WAIT, async { Ok(f.await.map_err(|e| e.to_string())) })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
}

/// One hand-over round: each device's messages go, oldest first, to its node as pushes
/// of its app, and are released here as that node accepts them. A node that cannot be
/// reached, or refuses, keeps them here for the next round. Returns how many moved, or
/// `None` when no device had any waiting.
pub async fn hand_over_round(core: &crate::shard::ShardCore) -> Option<u64> {
    use crate::client::{AppClient, PushOutcome, PushTarget};
    let fleet = &core.shared.fleet;
    let keys = core.state.borrow().table.waiting_elsewhere(|a, d| fleet.elsewhere(a, d).is_none());
    if keys.is_empty() {
        return None;
    }
    // (node, app) → devices, so each group shares one connection.
    let mut groups: std::collections::BTreeMap<(usize, u16), Vec<(usize, String)>> = Default::default();
    for key in keys {
        let st = core.state.borrow();
        let d = st.table.device(key);
        let node = fleet.node_for(st.table.app_id(d.app), &d.id);
        groups.entry((node, d.app)).or_default().push((key, d.id.to_string()));
    }
    let mut moved = 0;
    for ((node, app), devices) in groups {
        let (addr, app_id) = (fleet.nodes[node].app_addr.as_str(), core.cfg().apps[app as usize].id.as_str());
        let secret = core.shared.secret(app);
        let mut client = match within(AppClient::connect(addr, app_id, secret)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(shard = core.id, node = %fleet.nodes[node].name, "cannot hand stored messages over yet: {e}");
                continue;
            }
        };
        'devices: for (key, id) in devices {
            loop {
                let now_ms = core.now_ms();
                let batch = {
                    let table = &mut core.state.borrow_mut().table;
                    if table.find(app, &id) != Some(key) {
                        continue 'devices; // forgotten meanwhile
                    }
                    table.pending_messages(key, now_ms, 256)
                };
                let Some(want) = batch.last().map(|m| m.seq) else { continue 'devices };
                let mut last = None;
                for m in &batch {
                    let ttl = (m.expiry_ms.saturating_sub(now_ms).div_ceil(1000)).clamp(1, u32::MAX as u64) as u32;
                    match within(client.push(PushTarget::Device(&id), ttl, &m.payload)).await {
                        Ok(PushOutcome::Accepted(_)) => last = Some(m.seq),
                        other => {
                            tracing::warn!(shard = core.id, node = %fleet.nodes[node].name, device = %id, "hand-over stopped: {other:?}");
                            break;
                        }
                    }
                }
                if let Some(seq) = last {
                    let table = &mut core.state.borrow_mut().table;
                    let before = table.stats.handed_over;
                    table.handed_over(key, seq, core.now_ms(), crate::clock::mono_us());
                    moved += table.stats.handed_over - before;
                }
                if last != Some(want) {
                    break 'devices; // the node refused or went away: next round
                }
            }
        }
    }
    if moved > 0 {
        tracing::info!(shard = core.id, messages = moved, "handed stored messages over to their devices' nodes");
    }
    Some(moved)
}

/// The fleet's lines for `/metrics`.
pub fn prometheus(fleet: &Fleet, health: &Health, self_up: bool) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ =
        writeln!(t, "# HELP ringpush_fleet_node_up Whether dispatch sends devices to the node (1) or answers 503 (0).");
    let _ = writeln!(t, "# TYPE ringpush_fleet_node_up gauge");
    for (i, n) in fleet.nodes.iter().enumerate() {
        let up = if i == fleet.me { self_up } else { health.is_up(i) };
        let _ = writeln!(t, "ringpush_fleet_node_up{{node=\"{}\"}} {}", n.name.escape_default(), up as u8);
    }
    let c = health.counts;
    let _ = writeln!(t, "# HELP ringpush_dispatch_total Dispatch requests, by answer.");
    let _ = writeln!(t, "# TYPE ringpush_dispatch_total counter");
    for (result, v) in [("node", c.answered), ("node_down", c.node_down), ("refused", c.bad_request)] {
        let _ = writeln!(t, "ringpush_dispatch_total{{result=\"{result}\"}} {v}");
    }
    let _ = writeln!(
        t,
        "# HELP ringpush_dispatch_failure_reports_total Device reports of an unreachable node that counted."
    );
    let _ = writeln!(t, "# TYPE ringpush_dispatch_failure_reports_total counter");
    let _ = writeln!(t, "ringpush_dispatch_failure_reports_total {}", c.reports);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, weight: u32) -> FleetNode {
        FleetNode {
            name: name.into(),
            device_addr: format!("{name}:7000"),
            app_addr: format!("{name}:7100"),
            http_addr: "127.0.0.1:7200".parse().unwrap(),
            weight,
        }
    }

    fn fleet(nodes: Vec<FleetNode>, me: &str) -> Fleet {
        let cfg = FleetConfig { node: me.into(), nodes, ..FleetConfig::default() };
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Fleet::new(&cfg, a, a, a)
    }

    fn counts(ring: &Ring, n: usize, devices: u32) -> Vec<u32> {
        let mut c = vec![0; n];
        for d in 0..devices {
            c[ring.node_for("demo", &format!("dev-{d}"))] += 1;
        }
        c
    }

    #[test]
    fn the_fleet_placement_vectors_in_the_protocol_doc_hold() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
        let block = doc.split("```fleet\n").nth(1).expect("a fleet block").split("```").next().unwrap();
        let mut lines = block.lines().filter(|l| !l.trim().is_empty());
        let nodes: Vec<(String, u32)> = lines
            .next()
            .expect("a nodes line")
            .strip_prefix("nodes:")
            .expect("`nodes: name=weight ...`")
            .split_whitespace()
            .map(|nw| {
                let (n, w) = nw.split_once('=').unwrap();
                (n.to_string(), w.parse().unwrap())
            })
            .collect();
        let ring = Ring::new(nodes.iter().map(|(n, w)| (n.as_str(), *w)));
        let mut checked = 0;
        for line in lines {
            let (lhs, want) = line.split_once('=').expect("`app device = node`");
            let f: Vec<&str> = lhs.split_whitespace().collect();
            assert_eq!(nodes[ring.node_for(f[0], f[1])].0, want.trim(), "{line}");
            checked += 1;
        }
        assert!(checked >= 8, "only {checked} fleet vectors");
        assert!(doc.contains(&format!("{:016x}", device_point("demo", "dev-1"))));
        assert!(doc.contains(&format!("{:016x}", node_point("n1", 0))));
    }

    #[test]
    fn devices_spread_in_proportion_to_weight() {
        let ring = Ring::new([("a", 100), ("b", 100), ("c", 200)]);
        assert_eq!(ring.points(), 400 * POINTS_PER_WEIGHT as usize);
        let c = counts(&ring, 3, 40_000);
        let share = |i: usize| c[i] as f64 / 40_000.0;
        for (i, want) in [(0, 0.25), (1, 0.25), (2, 0.5)] {
            assert!((share(i) - want).abs() < 0.05, "node {i} has {:.3} of the devices, want {want}: {c:?}", share(i));
        }
    }

    #[test]
    fn adding_a_node_moves_only_devices_onto_it() {
        let before = Ring::new([("a", 100), ("b", 100), ("c", 100)]);
        let after = Ring::new([("a", 100), ("b", 100), ("c", 100), ("d", 100)]);
        let mut moved = 0;
        for d in 0..20_000 {
            let id = format!("dev-{d}");
            let (x, y) = (before.node_for("demo", &id), after.node_for("demo", &id));
            if x != y {
                assert_eq!(y, 3, "{id} moved from {x} to {y}, not to the new node");
                moved += 1;
            }
        }
        let share = moved as f64 / 20_000.0;
        assert!((0.18..0.32).contains(&share), "moved {share:.3}, about 1/4 expected");
    }

    #[test]
    fn placement_does_not_depend_on_the_order_nodes_are_listed_in() {
        let f1 = fleet(vec![node("a", 100), node("b", 50), node("c", 100)], "a");
        let f2 = fleet(vec![node("c", 100), node("a", 100), node("b", 50)], "c");
        for d in 0..2_000 {
            let id = format!("dev-{d}");
            assert_eq!(f1.nodes[f1.node_for("demo", &id)].name, f2.nodes[f2.node_for("demo", &id)].name, "{id}");
        }
    }

    #[test]
    fn a_box_without_a_fleet_owns_every_device_and_answers_its_own_addresses() {
        let cfg = FleetConfig::default();
        let (d, a, h) =
            ("10.0.0.1:7000".parse().unwrap(), "10.0.0.1:7100".parse().unwrap(), "10.0.0.1:7200".parse().unwrap());
        let f = Fleet::new(&cfg, d, a, h);
        assert!(!f.is_shared());
        assert_eq!(f.elsewhere("demo", "dev-1"), None);
        assert_eq!(f.nodes[f.me].device_addr, "10.0.0.1:7000");
        assert_eq!(f.nodes[f.me].name, cfg.node);
    }

    #[test]
    fn elsewhere_names_the_other_node() {
        let fa = fleet(vec![node("a", 100), node("b", 100)], "a");
        let fb = fleet(vec![node("a", 100), node("b", 100)], "b");
        let (mut on_a, mut on_b) = (0, 0);
        for d in 0..1_000 {
            let id = format!("dev-{d}");
            match (fa.elsewhere("demo", &id), fb.elsewhere("demo", &id)) {
                (None, Some(n)) => {
                    assert_eq!(n.name, "a");
                    on_a += 1;
                }
                (Some(n), None) => {
                    assert_eq!(n.name, "b");
                    on_b += 1;
                }
                other => panic!("{id}: exactly one node must own it, got {other:?}"),
            }
        }
        assert!(on_a > 300 && on_b > 300, "{on_a} / {on_b}");
    }

    fn cfg(fall: u32, rise: u32) -> FleetConfig {
        FleetConfig { fall, rise, probe_interval: Duration::from_secs(1), ..FleetConfig::default() }
    }

    #[test]
    fn a_node_goes_down_after_fall_failures_in_a_row_and_up_after_rise_successes() {
        let mut h = Health::new(2, &cfg(3, 2));
        assert!(h.is_up(1), "nodes start up");
        assert_eq!(h.observe(1, false), None);
        assert_eq!(h.observe(1, false), None);
        assert_eq!(h.observe(1, true), None, "a success resets the failures");
        assert_eq!(h.observe(1, false), None);
        assert_eq!(h.observe(1, false), None);
        assert_eq!(h.observe(1, false), Some(false));
        assert!(!h.is_up(1));
        assert!(h.is_up(0), "the other node is untouched");
        assert_eq!(h.observe(1, true), None);
        assert_eq!(h.observe(1, false), None, "a failure while down resets the successes");
        assert_eq!(h.observe(1, true), None);
        assert_eq!(h.observe(1, true), Some(true));
        assert!(h.is_up(1));
    }

    #[test]
    fn device_reports_count_once_per_probe_interval() {
        let mut h = Health::new(2, &cfg(2, 1));
        assert!(h.report_failure(1, 10_000));
        assert!(!h.report_failure(1, 10_500), "within the interval: not counted");
        assert!(h.is_up(1), "one report is not enough");
        assert!(h.report_failure(1, 11_000));
        assert!(!h.is_up(1), "two counted reports reach fall = 2");
        assert!(!h.report_failure(1, 20_000), "a node already down is not reported again");
        assert_eq!(h.counts.reports, 2);
        assert_eq!(h.observe(1, true), Some(true), "one good probe brings it back (rise = 1)");
    }

    fn q(s: &str) -> Query {
        Query::parse(s).unwrap()
    }

    #[test]
    fn queries_are_percent_decoded_and_unknown_parameters_refused() {
        assert_eq!(
            q("app=demo&device=sensor%2F7%20a&failed=n2"),
            Query { app: Some("demo".into()), device: Some("sensor/7 a".into()), failed: Some("n2".into()) }
        );
        assert_eq!(q("device=a+b").device.as_deref(), Some("a+b"), "+ is not a space");
        assert!(Query::parse("app=demo&dev=1").is_err());
        assert!(Query::parse("app=%zz").is_err());
        assert!(Query::parse("app=%ff").is_err(), "not UTF-8");
        assert!(Query::parse("app=%4").is_err(), "truncated escape");
    }

    #[test]
    fn dispatch_answers_the_node_or_503_when_it_is_down_and_refuses_bad_requests() {
        let f = fleet(vec![node("a", 100), node("b", 100)], "a");
        let c = cfg(1, 1);
        let mut h = Health::new(2, &c);
        let known = |a: &str| a == "demo";
        let wait = Duration::from_millis(1500);
        let on = |f: &Fleet, n: &str| {
            (0..).map(|d| format!("dev-{d}")).find(|id| f.nodes[f.node_for("demo", id)].name == n).unwrap()
        };
        let (dev_a, dev_b) = (on(&f, "a"), on(&f, "b"));
        let ask = |h: &mut Health, query: String, self_up| decide(&f, h, &q(&query), known, self_up, wait, 0);
        assert_eq!(ask(&mut h, format!("app=demo&device={dev_b}"), true), Answer::Node { node: 1 });
        assert_eq!(ask(&mut h, format!("app=demo&device={dev_a}"), true), Answer::Node { node: 0 });
        assert_eq!(
            ask(&mut h, format!("app=demo&device={dev_a}"), false),
            Answer::Down { node: 0, retry_after_ms: 1500 }
        );
        // A report that b is unreachable (fall = 1) takes it down for everyone.
        assert_eq!(
            ask(&mut h, format!("app=demo&device={dev_b}&failed=b"), true),
            Answer::Down { node: 1, retry_after_ms: 1500 }
        );
        assert_eq!(
            ask(&mut h, format!("app=demo&device={dev_a}&failed=a"), true),
            Answer::Node { node: 0 },
            "self is judged by its own readiness"
        );
        let refusals = [
            ("app=demo", 400, "bad_request"),
            ("app=news&device=x", 404, "unknown_app"),
            ("app=demo&device=", 400, "bad_id"),
            ("app=demo&device=x&failed=zz", 400, "unknown_node"),
        ];
        for (query, status, error) in refusals {
            match ask(&mut h, query.into(), true) {
                Answer::Refused { status: s, error: e, .. } => assert_eq!((s, e), (status, error), "{query}"),
                other => panic!("{query}: expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_probe_is_good_only_on_a_200() {
        assert!(probe_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nready\n"));
        assert!(probe_ok(b"HTTP/1.1 200 OK\r\n"), "the status line is enough");
        assert!(!probe_ok(b"HTTP/1.1 503 Service Unavailable\r\n\r\nshutting down\n"));
        assert!(!probe_ok(b""));
        assert!(!probe_ok(b"garbage\r\n"));
    }

    #[test]
    fn a_probe_fails_within_its_timeout_on_a_node_that_never_answers_and_passes_a_ready_one() {
        use std::io::{Read, Write};
        // Accepted by the kernel (backlog), never read: the probe must give up on its own.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ready = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (silent_addr, ready_addr) = (silent.local_addr().unwrap(), ready.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut s, _) = ready.accept().unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nready\n").unwrap();
        });
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().unwrap().run(async move {
            let started = std::time::Instant::now();
            assert!(!probe(silent_addr, Duration::from_millis(200)).await);
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(3), "gave up after {took:?}");
            assert!(probe(ready_addr, Duration::from_secs(5)).await);
        });
        server.join().unwrap();
        drop(silent);
    }

    #[test]
    fn metrics_show_each_node_and_the_answers() {
        let f = fleet(vec![node("a", 100), node("b", 100)], "a");
        let mut h = Health::new(2, &cfg(1, 1));
        h.observe(1, false);
        h.counts.answered = 3;
        let text = prometheus(&f, &h, true);
        assert!(text.contains("ringpush_fleet_node_up{node=\"a\"} 1"), "{text}");
        assert!(text.contains("ringpush_fleet_node_up{node=\"b\"} 0"), "{text}");
        assert!(text.contains("ringpush_dispatch_total{result=\"node\"} 3"), "{text}");
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        assert_eq!(parsed.samples.len(), 6);
    }
}
