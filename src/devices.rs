//! A shard's device table: per-device message queues, seqs, acks, TTL expiry and push
//! receipts. Pure state, no I/O and no clock of its own (callers pass `now_ms`), so
//! every rule here is unit-tested directly.
//!
//! Runs on its owner shard only. Payloads are `Arc<[u8]>` so a multicast or broadcast
//! stores its payload once, however many devices it reaches; the Arc is only touched
//! by the owner shard after the hand-over, so its refcount is never contended.
//!
//! Per device: `acked` ≤ `sent_upto` < `next_seq`. `queue` holds every message with
//! seq > acked, in seq order; those with seq ≤ `sent_upto` are in flight on the current
//! session. A new session resets `sent_upto` to `acked`, so unacked messages are sent
//! again (at-least-once; devices de-duplicate by seq).

use crate::stats::{CounterRow, Hist};
use crate::timer::TimerWheel;
use ringpush_protocol::device::{encode_message, Message};
use ringpush_protocol::{ErrorCode, Receipt};
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// One message waiting for (or in flight to) one device.
#[derive(Clone, Debug)]
pub struct QueuedMsg {
    pub seq: u64,
    pub push_id: u64,
    pub expiry_ms: u64,
    /// When the owner shard took it (monotonic µs), for latency histograms.
    pub enqueued_us: u64,
    pub payload: Arc<[u8]>,
}

#[derive(Debug)]
pub struct Device {
    pub app: u16,
    pub id: Box<str>,
    /// Seq the next message for this device gets.
    next_seq: u64,
    /// Highest seq the device acked (cumulative).
    acked: u64,
    /// Highest seq written to the current session.
    sent_upto: u64,
    /// Highest seq ever written to any session (to count redeliveries).
    max_sent: u64,
    /// Messages with seq > acked, in seq order.
    queue: VecDeque<QueuedMsg>,
    queued_bytes: u64,
    /// Slab key of the session serving this device, if connected.
    pub session: Option<usize>,
    /// Deadline currently armed in the expiry wheel (u64::MAX: none).
    expiry_armed: u64,
}

impl Device {
    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// True when the session has something to write within the window.
    pub fn has_unsent(&self, window: u32) -> bool {
        let inflight = self.queue.partition_point(|m| m.seq <= self.sent_upto);
        inflight < self.queue.len() && inflight < window as usize
    }
}

/// Per-device queue bounds.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub window: u32,
    pub max_msgs: u32,
    pub max_bytes: u64,
}

/// What attaching a session found.
#[derive(Debug, PartialEq, Eq)]
pub struct Attached {
    pub device: usize,
    /// The session this one replaces (it must get BYE `replaced`).
    pub replaced: Option<usize>,
    pub acked: u64,
    pub pending: u32,
}

/// Counts kept per push id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub targeted: u64,
    pub delivered: u64,
    pub stored: u64,
    pub expired: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.targeted += o.targeted;
        self.delivered += o.delivered;
        self.stored += o.stored;
        self.expired += o.expired;
    }

    pub fn receipt(&self, request_id: u64, push_id: u64) -> Receipt {
        Receipt {
            request_id,
            push_id,
            targeted: self.targeted,
            delivered: self.delivered,
            stored: self.stored,
            expired: self.expired,
        }
    }
}

/// Receipts of the most recent pushes this shard handled, bounded in count.
pub struct Receipts {
    map: HashMap<u64, Counts>,
    order: VecDeque<u64>,
    cap: usize,
}

impl Receipts {
    pub fn new(cap: usize) -> Self {
        Receipts { map: HashMap::new(), order: VecDeque::new(), cap: cap.max(1) }
    }

    pub fn get(&self, push_id: u64) -> Option<Counts> {
        self.map.get(&push_id).copied()
    }

    fn entry(&mut self, push_id: u64) -> &mut Counts {
        if !self.map.contains_key(&push_id) {
            if self.order.len() == self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
            self.order.push_back(push_id);
        }
        self.map.entry(push_id).or_default()
    }

    fn update(&mut self, push_id: u64, f: impl FnOnce(&mut Counts)) {
        if let Some(c) = self.map.get_mut(&push_id) {
            f(c);
        }
    }
}

/// Running totals the shard reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct TableStats {
    pub enqueued: u64,
    pub written: u64,
    pub redelivered: u64,
    pub acked: u64,
    pub expired: u64,
    pub rejected_full: u64,
}

impl TableStats {
    /// Counters as (metric, labels, value) rows.
    pub fn rows(&self) -> Vec<CounterRow> {
        let m = "ringpush_messages_total";
        vec![
            (m, vec![("event", "enqueued")], self.enqueued),
            (m, vec![("event", "written")], self.written),
            (m, vec![("event", "redelivered")], self.redelivered),
            (m, vec![("event", "acked")], self.acked),
            (m, vec![("event", "expired")], self.expired),
            (m, vec![("event", "rejected_queue_full")], self.rejected_full),
        ]
    }
}

pub struct DeviceTable {
    devices: Slab<Device>,
    /// Per app index: device id → slab key.
    index: Vec<HashMap<Box<str>, usize>>,
    receipts: Receipts,
    expiry: TimerWheel<usize>,
    limits: QueueLimits,
    pub stats: TableStats,
    /// Push taken → written to the socket.
    pub write_lat: Hist,
    /// Push taken → acked by the device.
    pub ack_lat: Hist,
    /// Messages queued over all devices.
    queued: u64,
    fired: Vec<usize>,
}

impl DeviceTable {
    pub fn new(apps: usize, limits: QueueLimits, receipts: usize, now_ms: u64, latencies: bool) -> Self {
        DeviceTable {
            devices: Slab::new(),
            index: (0..apps).map(|_| HashMap::new()).collect(),
            receipts: Receipts::new(receipts),
            // 1 s ticks, 4096 slots: a turn is ~68 min; longer TTLs wait their round.
            expiry: TimerWheel::new(4096, 1000, now_ms),
            limits,
            stats: TableStats::default(),
            write_lat: Hist::new(latencies),
            ack_lat: Hist::new(latencies),
            queued: 0,
            fired: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Messages queued over all devices of this shard.
    pub fn queued(&self) -> u64 {
        self.queued
    }

    pub fn device(&self, key: usize) -> &Device {
        &self.devices[key]
    }

    pub fn find(&self, app: u16, id: &str) -> Option<usize> {
        self.index[app as usize].get(id).copied()
    }

    pub fn receipt(&self, push_id: u64) -> Option<Counts> {
        self.receipts.get(push_id)
    }

    fn find_or_insert(&mut self, app: u16, id: &str) -> usize {
        if let Some(k) = self.find(app, id) {
            return k;
        }
        let key = self.devices.insert(Device {
            app,
            id: id.into(),
            next_seq: 1,
            acked: 0,
            sent_upto: 0,
            max_sent: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            session: None,
            expiry_armed: u64::MAX,
        });
        self.index[app as usize].insert(id.into(), key);
        key
    }

    /// Binds `session` to the device after a valid HELLO. `last_acked` is the device's
    /// own view: it releases messages the server had not seen acked, and for a device
    /// this server has never seen it continues the seq numbering after it.
    pub fn attach(&mut self, app: u16, id: &str, last_acked: u64, session: usize, now_us: u64) -> Attached {
        let key = self.find_or_insert(app, id);
        let d = &mut self.devices[key];
        if d.queue.is_empty() && d.next_seq <= last_acked {
            d.next_seq = last_acked + 1;
            d.acked = last_acked;
        }
        let replaced = d.session.replace(session);
        self.ack_upto(key, last_acked.min(self.devices[key].next_seq - 1), now_us);
        let d = &mut self.devices[key];
        d.sent_upto = d.acked;
        Attached { device: key, replaced, acked: d.acked, pending: d.queue.len() as u32 }
    }

    /// Unbinds `session` (if it is still the device's); in-flight messages will be
    /// sent again on the next session.
    pub fn detach(&mut self, key: usize, session: usize) {
        if let Some(d) = self.devices.get_mut(key) {
            if d.session == Some(session) {
                d.session = None;
                d.sent_upto = d.acked;
            }
        }
    }

    /// Queues a message for a known device key. Returns the device's session to wake.
    pub fn enqueue(
        &mut self,
        key: usize,
        push_id: u64,
        expiry_ms: u64,
        payload: &Arc<[u8]>,
        now_us: u64,
    ) -> Result<Option<usize>, ErrorCode> {
        let limits = self.limits;
        let d = &mut self.devices[key];
        if d.queue.len() as u64 >= limits.max_msgs as u64 || d.queued_bytes + payload.len() as u64 > limits.max_bytes {
            self.stats.rejected_full += 1;
            return Err(ErrorCode::STORAGE_FULL);
        }
        let seq = d.next_seq;
        d.next_seq += 1;
        d.queued_bytes += payload.len() as u64;
        d.queue.push_back(QueuedMsg { seq, push_id, expiry_ms, enqueued_us: now_us, payload: Arc::clone(payload) });
        self.queued += 1;
        if expiry_ms < d.expiry_armed {
            d.expiry_armed = expiry_ms;
            self.expiry.insert(key, expiry_ms);
        }
        let session = d.session;
        self.stats.enqueued += 1;
        let c = self.receipts.entry(push_id);
        c.targeted += 1;
        c.stored += 1;
        Ok(session)
    }

    /// Queues for `id` of `app`, creating the device record if needed (unicast and
    /// multicast address devices that may not have connected yet).
    pub fn enqueue_to(
        &mut self,
        app: u16,
        id: &str,
        push_id: u64,
        expiry_ms: u64,
        payload: &Arc<[u8]>,
        now_us: u64,
    ) -> Result<Option<usize>, ErrorCode> {
        let key = self.find_or_insert(app, id);
        self.enqueue(key, push_id, expiry_ms, payload, now_us)
    }

    /// Queues for every device of `app` this shard knows; returns how many took it and
    /// pushes the sessions to wake into `wake`. Devices whose queue is full are skipped
    /// (counted in `stats.rejected_full`).
    pub fn broadcast(
        &mut self,
        app: u16,
        push_id: u64,
        expiry_ms: u64,
        payload: &Arc<[u8]>,
        wake: &mut Vec<usize>,
        now_us: u64,
    ) -> u64 {
        let keys: Vec<usize> = self.index[app as usize].values().copied().collect();
        let mut n = 0;
        for key in keys {
            if let Ok(s) = self.enqueue(key, push_id, expiry_ms, payload, now_us) {
                n += 1;
                wake.extend(s);
            }
        }
        // A broadcast that reached nobody still gets a receipt (all zero).
        self.receipts.entry(push_id);
        n
    }

    /// Applies a cumulative ACK from the session. Acks beyond what was sent are
    /// clamped: a device cannot ack what it never received.
    pub fn on_ack(&mut self, key: usize, seq: u64, now_us: u64) {
        let upto = seq.min(self.devices[key].sent_upto);
        self.ack_upto(key, upto, now_us);
    }

    fn ack_upto(&mut self, key: usize, upto: u64, now_us: u64) {
        let d = &mut self.devices[key];
        while d.queue.front().is_some_and(|m| m.seq <= upto) {
            let m = d.queue.pop_front().expect("front exists");
            d.queued_bytes -= m.payload.len() as u64;
            self.queued -= 1;
            self.stats.acked += 1;
            self.ack_lat.record(now_us.saturating_sub(m.enqueued_us));
            self.receipts.update(m.push_id, |c| {
                c.delivered += 1;
                c.stored = c.stored.saturating_sub(1);
            });
        }
        d.acked = d.acked.max(upto);
    }

    /// Encodes messages the device has not been sent yet, within the window and up to
    /// about `max_bytes`, into `out`. Expired messages are dropped, never sent.
    /// Returns how many messages were written.
    pub fn fill(&mut self, key: usize, now_ms: u64, now_us: u64, out: &mut Vec<u8>, max_bytes: usize) -> usize {
        let window = self.limits.window as usize;
        let d = &mut self.devices[key];
        let mut i = d.queue.partition_point(|m| m.seq <= d.sent_upto);
        let mut written = 0;
        while i < d.queue.len() && i < window && out.len() < max_bytes {
            let m = &d.queue[i];
            if m.expiry_ms <= now_ms {
                let m = d.queue.remove(i).expect("index in range");
                d.queued_bytes -= m.payload.len() as u64;
                self.queued -= 1;
                self.stats.expired += 1;
                self.receipts.update(m.push_id, |c| {
                    c.expired += 1;
                    c.stored = c.stored.saturating_sub(1);
                });
                continue;
            }
            encode_message(
                out,
                &Message { flags: 0, seq: m.seq, push_id: m.push_id, expiry_ms: m.expiry_ms, payload: &m.payload },
            );
            d.sent_upto = m.seq;
            if m.seq <= d.max_sent {
                self.stats.redelivered += 1;
            } else {
                d.max_sent = m.seq;
            }
            self.write_lat.record(now_us.saturating_sub(m.enqueued_us));
            written += 1;
            i += 1;
        }
        self.stats.written += written as u64;
        written
    }

    /// Whether the device has messages to write now.
    pub fn has_unsent(&self, key: usize) -> bool {
        self.devices[key].has_unsent(self.limits.window)
    }

    /// Drops messages whose TTL passed; returns the sessions that may now have room.
    pub fn expire(&mut self, now_ms: u64) {
        self.fired.clear();
        self.expiry.advance(now_ms, &mut self.fired);
        let fired = std::mem::take(&mut self.fired);
        for &key in &fired {
            let Some(d) = self.devices.get_mut(key) else {
                continue;
            };
            let mut expired = 0;
            let mut freed = 0;
            let receipts = &mut self.receipts;
            d.queue.retain(|m| {
                if m.expiry_ms <= now_ms {
                    expired += 1;
                    freed += m.payload.len() as u64;
                    receipts.update(m.push_id, |c| {
                        c.expired += 1;
                        c.stored = c.stored.saturating_sub(1);
                    });
                    false
                } else {
                    true
                }
            });
            d.queued_bytes -= freed;
            self.queued -= expired;
            self.stats.expired += expired;
            // Re-arm only if the entry that fired was the armed one.
            if d.expiry_armed <= now_ms {
                d.expiry_armed = u64::MAX;
                if let Some(next) = d.queue.iter().map(|m| m.expiry_ms).min() {
                    d.expiry_armed = next;
                    self.expiry.insert(key, next);
                }
            }
        }
        self.fired = fired;
    }

    /// Every connected session of this shard (for shutdown).
    pub fn sessions(&self) -> impl Iterator<Item = usize> + '_ {
        self.devices.iter().filter_map(|(_, d)| d.session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringpush_protocol::{DeviceFrame, Limits};

    const NOW: u64 = 1_000_000;

    fn table() -> DeviceTable {
        let limits = QueueLimits { window: 3, max_msgs: 5, max_bytes: 1000 };
        DeviceTable::new(2, limits, 100, NOW, true)
    }

    fn payload(s: &str) -> Arc<[u8]> {
        Arc::from(s.as_bytes())
    }

    /// Decodes the seqs written by `fill`.
    fn seqs(out: &[u8]) -> Vec<u64> {
        let mut rest = out;
        let mut v = Vec::new();
        while let Some((f, n)) = DeviceFrame::decode(rest, &Limits::default()).unwrap() {
            let DeviceFrame::Message(m) = f else { panic!("{f:?}") };
            v.push(m.seq);
            rest = &rest[n..];
        }
        v
    }

    fn fill(t: &mut DeviceTable, key: usize) -> Vec<u64> {
        let mut out = Vec::new();
        t.fill(key, NOW, 0, &mut out, 1 << 20);
        seqs(&out)
    }

    #[test]
    fn in_order_delivery_within_the_window_and_cumulative_acks() {
        let mut t = table();
        let a = t.attach(0, "d", 0, 7, 0);
        assert_eq!(a, Attached { device: a.device, replaced: None, acked: 0, pending: 0 });
        for i in 0..5 {
            assert_eq!(t.enqueue(a.device, 100 + i, NOW + 10_000, &payload("x"), 0), Ok(Some(7)));
        }
        assert_eq!(fill(&mut t, a.device), [1, 2, 3], "window of 3");
        assert_eq!(fill(&mut t, a.device), Vec::<u64>::new(), "window full");
        t.on_ack(a.device, 2, 0);
        assert_eq!(fill(&mut t, a.device), [4, 5]);
        t.on_ack(a.device, 99, 0); // clamped to what was sent
        assert_eq!(t.device(a.device).acked(), 5);
        assert_eq!(t.device(a.device).pending(), 0);
        assert_eq!(t.receipt(100).unwrap(), Counts { targeted: 1, delivered: 1, stored: 0, expired: 0 });
    }

    #[test]
    fn unacked_messages_are_resent_after_reconnect() {
        let mut t = table();
        let a = t.attach(0, "d", 0, 1, 0);
        for i in 0..3 {
            t.enqueue(a.device, i, NOW + 10_000, &payload("x"), 0).unwrap();
        }
        assert_eq!(fill(&mut t, a.device), [1, 2, 3]);
        t.on_ack(a.device, 1, 0);
        t.detach(a.device, 1);
        let b = t.attach(0, "d", 1, 2, 0);
        assert_eq!((b.acked, b.pending, b.replaced), (1, 2, None));
        assert_eq!(fill(&mut t, b.device), [2, 3]);
        // The device had processed 2 before the reconnect and says so in HELLO.
        t.detach(b.device, 2);
        let c = t.attach(0, "d", 2, 3, 0);
        assert_eq!((c.acked, c.pending), (2, 1));
        assert_eq!(fill(&mut t, c.device), [3]);
    }

    #[test]
    fn second_login_replaces_the_first() {
        let mut t = table();
        let a = t.attach(1, "d", 0, 10, 0);
        let b = t.attach(1, "d", 0, 11, 0);
        assert_eq!(b.replaced, Some(10));
        // The replaced session detaching later does not unbind the new one.
        t.detach(a.device, 10);
        assert_eq!(t.device(b.device).session, Some(11));
    }

    #[test]
    fn unknown_device_continues_after_its_own_last_acked() {
        let mut t = table();
        let a = t.attach(0, "d", 41, 1, 0);
        assert_eq!(a.acked, 41);
        t.enqueue(a.device, 1, NOW + 1000, &payload("x"), 0).unwrap();
        assert_eq!(fill(&mut t, a.device), [42]);
    }

    #[test]
    fn queues_are_bounded_by_count_and_bytes() {
        let mut t = table();
        for i in 0..5 {
            t.enqueue_to(0, "off", i, NOW + 1000, &payload("x"), 0).unwrap();
        }
        assert_eq!(t.enqueue_to(0, "off", 9, NOW + 1000, &payload("x"), 0), Err(ErrorCode::STORAGE_FULL));
        let big: Arc<[u8]> = Arc::from(vec![0u8; 1001]);
        assert_eq!(t.enqueue_to(0, "other", 1, NOW + 1000, &big, 0), Err(ErrorCode::STORAGE_FULL));
        assert_eq!(t.stats.rejected_full, 2);
    }

    #[test]
    fn expired_messages_are_never_sent_and_are_counted() {
        let mut t = table();
        let k = t.attach(0, "d", 0, 1, 0).device;
        t.enqueue(k, 1, NOW - 1, &payload("old"), 0).unwrap();
        t.enqueue(k, 2, NOW + 5_000, &payload("new"), 0).unwrap();
        assert_eq!(fill(&mut t, k), [2]);
        assert_eq!(t.receipt(1).unwrap().expired, 1);
        // Offline device: the wheel drops it when its time comes.
        t.enqueue_to(0, "off", 3, NOW + 2_000, &payload("x"), 0).unwrap();
        t.enqueue_to(0, "off", 4, NOW + 9_000, &payload("y"), 0).unwrap();
        t.expire(NOW + 1_000);
        assert_eq!(t.device(t.find(0, "off").unwrap()).pending(), 2);
        t.expire(NOW + 2_500);
        assert_eq!(t.device(t.find(0, "off").unwrap()).pending(), 1);
        t.expire(NOW + 9_500);
        assert_eq!(t.device(t.find(0, "off").unwrap()).pending(), 0);
        assert_eq!(t.receipt(4).unwrap(), Counts { targeted: 1, delivered: 0, stored: 0, expired: 1 });
    }

    #[test]
    fn broadcast_reaches_every_known_device_of_the_app_once() {
        let mut t = table();
        t.attach(0, "a", 0, 1, 0);
        t.attach(0, "b", 0, 2, 0);
        t.enqueue_to(0, "offline", 5, NOW + 100, &payload("u"), 0).unwrap();
        t.attach(1, "other-app", 0, 3, 0);
        let p = payload("all");
        let mut wake = Vec::new();
        assert_eq!(t.broadcast(0, 77, NOW + 1000, &p, &mut wake, 0), 3);
        wake.sort();
        assert_eq!(wake, [1, 2]);
        assert_eq!(Arc::strong_count(&p), 4, "payload stored once, shared");
        assert_eq!(t.receipt(77).unwrap().targeted, 3);
    }

    #[test]
    fn receipts_forget_the_oldest_beyond_their_bound() {
        let mut r = Receipts::new(2);
        r.entry(1).targeted = 1;
        r.entry(2);
        r.entry(3);
        assert!(r.get(1).is_none());
        assert!(r.get(3).is_some());
    }
}
