//! A shard's device table: the device registry, per-device message queues, the
//! per-app broadcast logs, acks, TTL expiry, push receipts, and the LRU that bounds
//! how many queued-message references stay on the heap. No I/O of its own beyond the
//! store's mapped memory and no clock (callers pass `now_ms`), so every rule here is
//! unit-tested directly.
//!
//! Runs on its owner shard only.
//!
//! ## Unicast and multicast
//! Per device: `acked` ≤ `sent_upto` < `next_seq`. Every message is a record in the
//! store (payload included) that links to the device's previous message record, so the
//! device's pending messages can be found from its newest one (`tail`). When the
//! device is *hot* its queue of references (seq, expiry, record location: no payload)
//! is in memory; when the LRU evicts it, only the registry fields stay and the queue
//! is rebuilt from the chain when needed. A new session resets `sent_upto` to `acked`,
//! so unacked messages are sent again (at-least-once; devices de-duplicate by seq).
//!
//! A message that expires while older ones are still pending stays in the queue as a
//! dead entry (never sent) and keeps its record, so the chain on disk stays whole;
//! records are released only from the front of a queue (by ack or expiry).
//!
//! ## Broadcast
//! A broadcast is stored once per app (per shard) in the app's log with its own
//! sequence (`bseq`). A device's `cursor` is the highest bseq it acked; a device that
//! registers starts at the log's head, so it gets broadcasts sent after it appeared.
//! An entry is released when every device counted at send time acked it, or when it
//! expires.

use crate::stats::{CounterRow, Hist};
use crate::store::{BroadcastRec, DeviceRec, Loc, MessageRec, Record, Store, StoreError, NO_LOC};
use crate::timer::TimerWheel;
use ringpush_protocol::device::{encode_message, Message, FLAG_BROADCAST};
use ringpush_protocol::{ErrorCode, Receipt};
use slab::Slab;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// No device (LRU links are 32-bit slab keys, to keep the device record small).
const NIL: u32 = u32::MAX;

/// A reference to one message waiting for (or in flight to) one device.
#[derive(Clone, Copy, Debug)]
pub struct QueuedMsg {
    pub seq: u64,
    /// Its push's receipt (the push id itself is in the record).
    pub receipt: ReceiptSeq,
    pub expiry_ms: u64,
    /// When the owner shard took it (monotonic µs), for latency histograms.
    pub enqueued_us: u64,
    /// The message's record in the store.
    pub loc: Loc,
    pub len: u32,
    /// Expired while older messages were pending: never sent, released at the front.
    pub dead: bool,
}

#[derive(Debug)]
/// One app's device id → slab key map. It keeps only the key: the id it hashes and
/// compares is the one in the device record, so each id is stored once.
#[derive(Default)]
struct DeviceIndex {
    keys: hashbrown::HashTable<u32>,
    hasher: ahash::RandomState,
}

impl DeviceIndex {
    fn get(&self, devices: &Slab<Device>, id: &str) -> Option<usize> {
        let h = self.hasher.hash_one(id);
        self.keys.find(h, |&k| *devices[k as usize].id == *id).map(|&k| k as usize)
    }

    /// Indexes `key`, already in `devices` (its id is not indexed yet).
    fn insert(&mut self, devices: &Slab<Device>, key: usize) {
        let h = self.hasher.hash_one(&*devices[key].id);
        let hasher = &self.hasher;
        self.keys.insert_unique(h, key as u32, |&k| hasher.hash_one(&*devices[k as usize].id));
    }

    /// Drops `key`, still in `devices`.
    fn remove(&mut self, devices: &Slab<Device>, key: usize) {
        let h = self.hasher.hash_one(&*devices[key].id);
        if let Ok(e) = self.keys.find_entry(h, |&k| k as usize == key) {
            e.remove();
        }
    }

    fn keys(&self) -> impl Iterator<Item = usize> + '_ {
        self.keys.iter().map(|&k| k as usize)
    }
}

pub struct Device {
    pub app: u16,
    pub id: Box<str>,
    /// Seq the next message for this device gets.
    next_seq: u64,
    /// Highest seq the device acked (cumulative).
    acked: u64,
    /// Highest seq whose record was released from the front of the queue.
    floor: u64,
    /// Highest seq written to the current session.
    sent_upto: u64,
    /// Highest seq ever written to any session (to count redeliveries).
    max_sent: u64,
    /// Highest broadcast seq the device acked, and the highest sent on this session.
    cursor: u64,
    bsent: u64,
    /// Queue of references, valid while `loaded` (hot).
    queue: VecDeque<QueuedMsg>,
    loaded: bool,
    /// When the device went cold (its expired messages were all dropped by then).
    cold_since_ms: u64,
    /// The newest message record, start of the chain to the older ones.
    tail: Loc,
    /// Live (not dead) messages pending and their payload bytes, hot or cold.
    pending: u32,
    queued_bytes: u64,
    /// The device's newest registry record.
    dev_loc: Loc,
    last_seen_ms: u64,
    /// Slab key of the session serving this device, if connected.
    pub session: Option<u32>,
    /// Deadline currently armed in the expiry wheel (u64::MAX: none).
    expiry_armed: u64,
    lru_prev: u32,
    lru_next: u32,
    /// Used since the eviction scan last passed (second chance).
    recent: bool,
}

impl Device {
    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn pending(&self) -> usize {
        self.pending as usize
    }

    pub fn is_hot(&self) -> bool {
        self.loaded
    }

    /// A live message left the backlog without being acked.
    fn forget(&mut self, m: &QueuedMsg) {
        self.pending -= 1;
        self.queued_bytes -= m.len as u64;
    }
}

/// Shard-wide accounting of one message that expired before its device acked it.
fn count_expired(receipts: &mut Receipts, stats: &mut TableStats, queued: &mut u64, receipt: ReceiptSeq) {
    *queued -= 1;
    stats.expired += 1;
    receipts.update(receipt, |c| {
        c.expired += 1;
        c.stored = c.stored.saturating_sub(1);
    });
}

/// Per-device queue bounds.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub window: u32,
    pub max_msgs: u32,
    pub max_bytes: u64,
}

/// How a table is sized.
#[derive(Clone, Copy, Debug)]
pub struct TableOptions {
    pub limits: QueueLimits,
    /// Push receipts kept (oldest forgotten first).
    pub receipts: usize,
    /// Queued-message references kept on the heap before cold devices are evicted.
    pub cache_msgs: usize,
    /// Record latency histograms.
    pub latencies: bool,
    /// Number a new device's messages from the clock (`unix ms << 20`) instead of 1:
    /// in a fleet, where a device moves between nodes, so the seqs one node gives come
    /// after the ones another gave it before (see `docs/architecture.md`, Fleet).
    pub clock_seqs: bool,
}

/// The first seq of a device registered at `now_ms` under clock numbering: above every
/// seq a node registering it earlier could have given (up to 2^20 per ms since).
pub fn clock_seq(now_ms: u64) -> u64 {
    (now_ms << 20).max(1)
}

/// What attaching a session found.
#[derive(Debug, PartialEq, Eq)]
pub struct Attached {
    pub device: usize,
    /// The session this one replaces (it must get BYE `replaced`).
    pub replaced: Option<usize>,
    pub acked: u64,
    pub cursor: u64,
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

/// Where a receipt sits in [`Receipts`]: its number in arrival order, never reused
/// (64 bits). Queued messages and broadcast entries keep the number of their push's
/// receipt, so an ack or an expiry reaches it without a lookup by push id.
pub type ReceiptSeq = u64;

/// No receipt (a message stored by an earlier process, or one whose receipt was gone
/// when its queue was read back from the store).
pub const NO_RECEIPT: ReceiptSeq = u64::MAX;

/// Receipts of the most recent pushes this shard handled, bounded in count: a ring in
/// arrival order, so the receipts of recent pushes (the ones their devices' acks
/// update) sit together in memory, and an index from push id to the entry's sequence
/// number that holds 4 bytes per receipt, for the app's RECEIPT_QUERY. A hash map of
/// the counts themselves made every push and every ack a cache miss into a table of
/// several MB; the index alone still cost three misses per ack, so acks and expiries
/// go by the [`ReceiptSeq`] their message keeps.
pub struct Receipts {
    /// Oldest first; entry `i` has sequence number `front + i`.
    ring: VecDeque<(u64, Counts)>,
    front: ReceiptSeq,
    /// Sequence numbers (their low 32 bits: the ring never holds 2^31), found by their
    /// entry's push id.
    index: hashbrown::HashTable<u32>,
    hasher: ahash::RandomState,
    cap: usize,
}

impl Receipts {
    pub fn new(cap: usize) -> Self {
        let cap = cap.clamp(1, 1 << 31);
        Receipts { ring: VecDeque::new(), front: 0, index: Default::default(), hasher: Default::default(), cap }
    }

    /// Position in `ring` of the receipt of `push_id`.
    fn find(&self, push_id: u64) -> Option<usize> {
        let (ring, front) = (&self.ring, self.front as u32);
        let h = self.hasher.hash_one(push_id);
        self.index
            .find(h, |&seq| ring[seq.wrapping_sub(front) as usize].0 == push_id)
            .map(|&seq| seq.wrapping_sub(front) as usize)
    }

    pub fn get(&self, push_id: u64) -> Option<Counts> {
        self.find(push_id).map(|i| self.ring[i].1)
    }

    /// The number of `push_id`'s receipt, if it is still kept (for messages read back
    /// from the store).
    pub fn seq_of(&self, push_id: u64) -> ReceiptSeq {
        self.find(push_id).map_or(NO_RECEIPT, |i| self.front + i as u64)
    }

    /// The receipt of `push_id`, added unless it is the newest. A push reaches a
    /// shard's table in one piece (one share, its devices here one after another), so
    /// no older receipt has its id and adding needs no lookup.
    fn add(&mut self, push_id: u64) -> (ReceiptSeq, &mut Counts) {
        if self.ring.back().is_some_and(|e| e.0 == push_id) {
            let i = self.ring.len() - 1;
            return (self.front + i as u64, &mut self.ring[i].1);
        }
        debug_assert!(self.find(push_id).is_none(), "push {push_id:#x} reached this shard twice");
        if self.ring.len() == self.cap {
            let (old, _) = self.ring.pop_front().expect("a full ring has a front");
            let front = self.front as u32;
            if let Ok(e) = self.index.find_entry(self.hasher.hash_one(old), |&seq| seq == front) {
                e.remove();
            }
            self.front += 1;
        }
        let seq = self.front + self.ring.len() as u64;
        self.ring.push_back((push_id, Counts::default()));
        let (ring, front, hasher) = (&self.ring, self.front as u32, &self.hasher);
        let rehash = |&seq: &u32| hasher.hash_one(ring[seq.wrapping_sub(front) as usize].0);
        self.index.insert_unique(hasher.hash_one(push_id), seq as u32, rehash);
        let i = self.ring.len() - 1;
        (seq, &mut self.ring[i].1)
    }

    /// The receipt numbered `seq`, unless it was forgotten (or `seq` is [`NO_RECEIPT`]).
    fn at(&mut self, seq: ReceiptSeq) -> Option<&mut Counts> {
        let i = usize::try_from(seq.wrapping_sub(self.front)).ok()?;
        self.ring.get_mut(i).map(|e| &mut e.1)
    }

    fn update(&mut self, seq: ReceiptSeq, f: impl FnOnce(&mut Counts)) {
        if let Some(c) = self.at(seq) {
            f(c);
        }
    }
}

/// A stored message on its way to another node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub seq: u64,
    pub expiry_ms: u64,
    pub payload: Vec<u8>,
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
    pub broadcasts: u64,
    pub store_errors: u64,
    pub evictions: u64,
    pub loads: u64,
    pub forgotten: u64,
    pub compacted_records: u64,
    /// Messages taken by the device's node in the fleet and released here.
    pub handed_over: u64,
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
            (m, vec![("event", "broadcast_stored")], self.broadcasts),
            (m, vec![("event", "handed_over")], self.handed_over),
            ("ringpush_store_errors_total", vec![], self.store_errors),
            ("ringpush_cache_evictions_total", vec![], self.evictions),
            ("ringpush_cache_loads_total", vec![], self.loads),
            ("ringpush_devices_forgotten_total", vec![], self.forgotten),
            ("ringpush_store_compacted_records_total", vec![], self.compacted_records),
        ]
    }
}

/// One broadcast in an app's log.
#[derive(Clone, Debug)]
struct BEntry {
    bseq: u64,
    push_id: u64,
    receipt: ReceiptSeq,
    expiry_ms: u64,
    enqueued_us: u64,
    loc: Loc,
    /// Devices counted at send time that have not acked it yet.
    remaining: u64,
    /// Released (all acked, or expired): never sent again.
    live: bool,
    /// The MESSAGE frame, the same bytes for every device (its seq is the broadcast
    /// seq): encoded from the store once, on first send, and dropped on release.
    frame: Option<Box<[u8]>>,
}

#[derive(Default)]
struct AppLog {
    entries: VecDeque<BEntry>,
    next_bseq: u64,
    /// Devices of the app this shard knows.
    devices: u64,
    /// The newest head record (`next_bseq` kept across an empty log).
    head_loc: Loc,
}

pub struct DeviceTable {
    devices: Slab<Device>,
    /// Per app index: device id → slab key.
    /// Keyed hashing (ahash, seeded per process): ids come from the network.
    index: Vec<DeviceIndex>,
    /// App ids, by app index (records name apps by id, so config order may change).
    apps: Vec<Box<str>>,
    logs: Vec<AppLog>,
    receipts: Receipts,
    expiry: TimerWheel<usize>,
    limits: QueueLimits,
    pub stats: TableStats,
    /// Push taken → written to the socket.
    pub write_lat: Hist,
    /// Push taken → acked by the device.
    pub ack_lat: Hist,
    /// Live messages queued over all devices.
    queued: u64,
    fired: Vec<usize>,
    pub store: Store,
    /// Scratch for encoding record heads.
    head: Vec<u8>,
    cache_msgs: usize,
    /// New devices are numbered from the clock ([`TableOptions::clock_seqs`]).
    clock_seqs: bool,
    /// References held by hot queues.
    hot_msgs: usize,
    lru_head: u32,
    lru_tail: u32,
    /// Store failures since the last one was logged (one line per burst, not per push).
    quiet_errors: u64,
    /// Next slab key `forget_idle` looks at.
    forget_cursor: usize,
    /// The compaction under way, if any.
    compaction: Option<Compaction>,
    /// The highest push counter (the low bits of a push id) in the store when it was
    /// opened: push ids count per process, so the next process starts above it and a
    /// stored message's id never names a new push.
    pub newest_push: u64,
}

/// A segment being compacted a slice at a time.
struct Compaction {
    seg: u32,
    /// Its records, and the next one to look at.
    locs: Vec<Loc>,
    next: usize,
    moved: u64,
    /// Devices whose whole chain was already moved.
    rewritten: std::collections::HashSet<usize>,
}

impl DeviceTable {
    /// An empty table over a closed store (a shard's placeholder until recovery).
    pub fn new(apps: Vec<Box<str>>, opts: TableOptions, now_ms: u64) -> Self {
        let n = apps.len();
        DeviceTable {
            devices: Slab::new(),
            index: (0..n).map(|_| DeviceIndex::default()).collect(),
            apps,
            logs: (0..n).map(|_| AppLog { next_bseq: 1, head_loc: NO_LOC, ..AppLog::default() }).collect(),
            receipts: Receipts::new(opts.receipts),
            // 1 s ticks, 4096 slots: a turn is ~68 min; longer TTLs wait their round.
            expiry: TimerWheel::new(4096, 1000, now_ms),
            limits: opts.limits,
            stats: TableStats::default(),
            write_lat: Hist::new(opts.latencies),
            ack_lat: Hist::new(opts.latencies),
            queued: 0,
            fired: Vec::new(),
            store: Store::closed(),
            head: Vec::with_capacity(256),
            cache_msgs: opts.cache_msgs,
            clock_seqs: opts.clock_seqs,
            hot_msgs: 0,
            lru_head: NIL,
            lru_tail: NIL,
            quiet_errors: 0,
            forget_cursor: 0,
            compaction: None,
            newest_push: 0,
        }
    }

    /// Opens the store in `dir` and rebuilds the registry, queues and broadcast logs
    /// from it. Expired messages are dropped; devices beyond the cache bound start cold.
    pub fn open(
        dir: &std::path::Path,
        sopts: crate::store::StoreOptions,
        apps: Vec<Box<str>>,
        opts: TableOptions,
        now_ms: u64,
    ) -> Result<Self, StoreError> {
        let mut t = DeviceTable::new(apps, opts, now_ms);
        let by_id: HashMap<Box<str>, u16> = t.apps.iter().enumerate().map(|(i, a)| (a.clone(), i as u16)).collect();
        let mut tail_seq: Vec<u64> = Vec::new();
        let mut orphans = 0u64;
        let mut newest_push = 0u64;
        let store = Store::open(dir, sopts, |loc, rec| {
            let app_of = |id: &str| by_id.get(id).copied();
            if let Record::Message(MessageRec { push_id, .. }) | Record::Broadcast(BroadcastRec { push_id, .. }) = rec {
                newest_push = newest_push.max(crate::shard::push_counter(push_id));
            }
            match rec {
                Record::Device(r) => match app_of(r.app) {
                    Some(app) => {
                        let k = t.insert_raw(app, r.id);
                        let d = &mut t.devices[k];
                        d.next_seq = d.next_seq.max(r.next_seq);
                        d.acked = d.acked.max(r.acked);
                        d.cursor = d.cursor.max(r.cursor);
                        d.last_seen_ms = r.last_seen_ms;
                        d.dev_loc = loc;
                    }
                    None => orphans += 1,
                },
                Record::Message(m) => match app_of(m.app) {
                    Some(app) => {
                        let k = t.insert_raw(app, m.id);
                        tail_seq.resize(tail_seq.len().max(k + 1), 0);
                        let d = &mut t.devices[k];
                        d.next_seq = d.next_seq.max(m.seq + 1);
                        if m.seq >= tail_seq[k] {
                            tail_seq[k] = m.seq;
                            d.tail = loc;
                        }
                    }
                    None => orphans += 1,
                },
                Record::Broadcast(b) => match app_of(b.app) {
                    Some(app) => t.logs[app as usize].entries.push_back(BEntry {
                        bseq: b.bseq,
                        push_id: b.push_id,
                        receipt: NO_RECEIPT,
                        expiry_ms: b.expiry_ms,
                        enqueued_us: crate::clock::mono_us(),
                        loc,
                        remaining: 0,
                        live: true,
                        frame: None,
                    }),
                    None => orphans += 1,
                },
                Record::Head { app, next_bseq } => match app_of(app) {
                    Some(app) => {
                        let log = &mut t.logs[app as usize];
                        log.next_bseq = log.next_bseq.max(next_bseq);
                        log.head_loc = loc;
                    }
                    None => orphans += 1,
                },
            }
        })?;
        if orphans > 0 {
            tracing::warn!("store {}: {orphans} records of apps no longer configured ignored", dir.display());
        }
        t.store = store;
        t.newest_push = newest_push;
        t.finish_recovery(now_ms);
        Ok(t)
    }

    /// After the scan: retain what is still needed, rebuild queues, broadcast counts.
    fn finish_recovery(&mut self, now_ms: u64) {
        let keys: Vec<usize> = self.devices.iter().map(|(k, _)| k).collect();
        let damaged = self.store.damaged();
        let mut broken: HashMap<usize, BTreeMap<u64, QueuedMsg>> = HashMap::new();
        for &k in &keys {
            let d = &mut self.devices[k];
            d.floor = d.acked;
            d.next_seq = d.next_seq.max(d.acked + 1);
            if d.dev_loc != NO_LOC {
                self.store.retain(d.dev_loc);
            }
            let (q, whole) = self.walk(k, now_ms);
            if !whole && damaged {
                broken.insert(k, q.into_iter().map(|m| (m.seq, m)).collect());
                continue;
            }
            self.adopt(k, q);
            self.evict_over_bound(now_ms);
        }
        if !broken.is_empty() {
            self.repair_chains(broken, now_ms);
        }
        for app in 0..self.logs.len() {
            let mut cursors: Vec<u64> = self.index[app].keys().map(|k| self.devices[k].cursor).collect::<Vec<_>>();
            cursors.sort_unstable();
            let log = &mut self.logs[app];
            let mut v: Vec<BEntry> = log.entries.drain(..).collect();
            // Compaction may have copied an entry: the later copy is the one kept.
            v.sort_by_key(|e| e.bseq);
            v.reverse();
            v.dedup_by_key(|e| e.bseq);
            v.reverse();
            let max_cursor = cursors.last().copied().unwrap_or(0);
            log.next_bseq = log.next_bseq.max(v.last().map_or(0, |e| e.bseq) + 1).max(max_cursor + 1);
            log.devices = cursors.len() as u64;
            for mut e in v {
                e.remaining = cursors.partition_point(|&c| c < e.bseq) as u64;
                if e.expiry_ms > now_ms && e.remaining > 0 {
                    self.store.retain(e.loc);
                    log.entries.push_back(e);
                }
            }
            if log.head_loc != NO_LOC {
                self.store.retain(log.head_loc);
            }
        }
    }

    /// Takes a recovered queue: retains its records, counts its backlog, arms expiry.
    fn adopt(&mut self, k: usize, q: VecDeque<QueuedMsg>) {
        let d = &mut self.devices[k];
        let mut min_expiry = u64::MAX;
        for m in &q {
            self.store.retain(m.loc);
            if m.dead {
                self.stats.expired += 1;
            } else {
                d.pending += 1;
                d.queued_bytes += m.len as u64;
                min_expiry = min_expiry.min(m.expiry_ms);
            }
        }
        self.queued += d.pending as u64;
        d.queue = q;
        d.loaded = true;
        self.hot_msgs += d.queue.len();
        if min_expiry != u64::MAX {
            d.expiry_armed = min_expiry;
            self.expiry.insert(k, min_expiry);
        }
        self.trim_front(k);
        self.lru_touch(k);
    }

    /// Devices whose chain of message records ran into damaged store data: find the
    /// rest of their messages by scanning every readable record, then write their
    /// pending messages again as a whole chain.
    fn repair_chains(&mut self, mut found: HashMap<usize, BTreeMap<u64, QueuedMsg>>, now_ms: u64) {
        let now_us = crate::clock::mono_us();
        let DeviceTable { store, index, devices, apps, .. } = &*self;
        store.scan(|l, rec| {
            let Record::Message(m) = rec else { return };
            let Some(app) = apps.iter().position(|a| **a == *m.app) else { return };
            let Some(k) = index[app].get(devices, m.id) else { return };
            let Some(msgs) = found.get_mut(&k) else { return };
            let d = &devices[k];
            if m.seq > d.acked.max(d.floor) {
                // Log order: a later copy (from compaction) replaces an earlier one.
                let len = m.payload.len() as u32;
                let dead = m.expiry_ms <= now_ms;
                let q = QueuedMsg {
                    seq: m.seq,
                    // Repairs run at open, before any receipt.
                    receipt: NO_RECEIPT,
                    expiry_ms: m.expiry_ms,
                    enqueued_us: now_us,
                    loc: l,
                    len,
                    dead,
                };
                msgs.insert(m.seq, q);
            }
        });
        let (devices, mut messages, mut written) = (found.len(), 0, 0);
        for (k, msgs) in found {
            messages += msgs.len();
            self.adopt(k, msgs.into_values().collect());
            written += self.rewrite_chain(k);
            self.evict_over_bound(now_ms);
        }
        tracing::warn!(
            "{devices} devices' message chains crossed damaged store data: \
             {messages} messages found by scanning, {written} written again as whole chains"
        );
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Live messages queued over all devices of this shard.
    pub fn queued(&self) -> u64 {
        self.queued
    }

    /// Broadcasts kept in the logs of this shard.
    pub fn broadcasts_kept(&self) -> u64 {
        self.logs.iter().map(|l| l.entries.iter().filter(|e| e.live).count() as u64).sum()
    }

    /// Queued-message references on the heap.
    pub fn hot_msgs(&self) -> usize {
        self.hot_msgs
    }

    pub fn device(&self, key: usize) -> &Device {
        &self.devices[key]
    }

    /// Devices with messages waiting whose (app id, device id) `keep` refuses: in a
    /// fleet, the devices another node now owns. Their slab keys.
    pub fn waiting_elsewhere(&self, keep: impl Fn(&str, &str) -> bool) -> Vec<usize> {
        let foreign = |d: &Device| d.pending > 0 && !keep(&self.apps[d.app as usize], &d.id);
        self.devices.iter().filter(|(_, d)| foreign(d)).map(|(k, _)| k).collect()
    }

    /// The app id of an app index.
    pub fn app_id(&self, app: u16) -> &str {
        &self.apps[app as usize]
    }

    /// Up to `max` of the device's live, unexpired unicast messages, oldest first, with
    /// their payloads copied: what handing them to another node needs. Reads a cold
    /// queue back from the store.
    pub fn pending_messages(&mut self, key: usize, now_ms: u64, max: usize) -> Vec<Outgoing> {
        self.load(key, now_ms);
        let d = &self.devices[key];
        let live = d.queue.iter().filter(|m| !m.dead && m.expiry_ms > now_ms);
        live.take(max)
            .filter_map(|m| match self.store.get(m.loc) {
                Some(Record::Message(r)) => {
                    Some(Outgoing { seq: m.seq, expiry_ms: m.expiry_ms, payload: r.payload.to_vec() })
                }
                _ => None,
            })
            .collect()
    }

    /// The device's node took its messages up to `seq`: they are released here, and
    /// the registry record says so, as for an ack.
    pub fn handed_over(&mut self, key: usize, seq: u64, now_ms: u64, now_us: u64) {
        // The queue may have gone cold while the pushes were in flight.
        self.load(key, now_ms);
        // What expired unsent was not handed over: it counts as expired.
        let DeviceTable { devices, receipts, stats, queued, .. } = self;
        let d = &mut devices[key];
        let upto = d.queue.partition_point(|m| m.seq <= seq);
        for i in 0..upto {
            let m = d.queue[i];
            if !m.dead && m.expiry_ms <= now_ms {
                d.queue[i].dead = true;
                d.forget(&m);
                count_expired(receipts, stats, queued, m.receipt);
            }
        }
        let acked = self.devices[key].acked;
        self.ack_upto(key, seq, now_us, true);
        if self.devices[key].acked != acked {
            self.persist(key);
        }
    }

    pub fn find(&self, app: u16, id: &str) -> Option<usize> {
        self.index[app as usize].get(&self.devices, id)
    }

    pub fn receipt(&self, push_id: u64) -> Option<Counts> {
        self.receipts.get(push_id)
    }

    fn store_error(&mut self, e: StoreError) -> ErrorCode {
        self.stats.store_errors += 1;
        self.quiet_errors += 1;
        if self.quiet_errors == 1 {
            tracing::error!("{e}; pushes are refused until the store has room");
        }
        match e {
            StoreError::Full(_) => ErrorCode::STORAGE_FULL,
            StoreError::Io(_) => ErrorCode::INTERNAL,
        }
    }

    fn store_ok(&mut self) {
        if self.quiet_errors > 0 {
            tracing::info!("store accepts writes again ({} refused meanwhile)", self.quiet_errors);
            self.quiet_errors = 0;
        }
    }

    /// A registry entry with no record written (recovery, and the start of `register`).
    fn insert_raw(&mut self, app: u16, id: &str) -> usize {
        if let Some(k) = self.find(app, id) {
            return k;
        }
        let key = self.devices.insert(Device {
            app,
            id: id.into(),
            next_seq: 1,
            acked: 0,
            floor: 0,
            sent_upto: 0,
            max_sent: 0,
            cursor: 0,
            bsent: 0,
            queue: VecDeque::new(),
            loaded: true,
            cold_since_ms: 0,
            tail: NO_LOC,
            pending: 0,
            queued_bytes: 0,
            dev_loc: NO_LOC,
            last_seen_ms: 0,
            session: None,
            expiry_armed: u64::MAX,
            lru_prev: NIL,
            lru_next: NIL,
            recent: false,
        });
        self.index[app as usize].insert(&self.devices, key);
        key
    }

    /// Finds or registers a device; a new one starts at its app's broadcast head. Its
    /// registry record is written unless the caller writes one itself (`persist`).
    fn register(&mut self, app: u16, id: &str, now_ms: u64, persist: bool) -> usize {
        if let Some(k) = self.find(app, id) {
            return k;
        }
        let k = self.insert_raw(app, id);
        let log = &mut self.logs[app as usize];
        log.devices += 1;
        let d = &mut self.devices[k];
        d.cursor = log.next_bseq - 1;
        d.bsent = d.cursor;
        d.last_seen_ms = now_ms;
        if self.clock_seqs {
            d.next_seq = clock_seq(now_ms);
            (d.acked, d.floor, d.sent_upto, d.max_sent) =
                (d.next_seq - 1, d.next_seq - 1, d.next_seq - 1, d.next_seq - 1);
        }
        if persist {
            self.persist(k);
        }
        k
    }

    /// Writes the device's registry record (best effort: a lost one costs a
    /// redelivery, never a message, because the device states its own acks in HELLO).
    fn persist(&mut self, key: usize) {
        let DeviceTable { devices, apps, store, head, .. } = self;
        let d = &devices[key];
        let rec = Record::Device(DeviceRec {
            app: &apps[d.app as usize],
            id: &d.id,
            next_seq: d.next_seq,
            acked: d.acked,
            cursor: d.cursor,
            last_seen_ms: d.last_seen_ms,
        });
        match store.append(&rec, head) {
            Ok(l) => {
                let old = std::mem::replace(&mut devices[key].dev_loc, l);
                self.store.release(old);
            }
            Err(e) => {
                self.store_error(e);
            }
        }
    }

    // --- LRU over hot queues -------------------------------------------------

    fn lru_unlink(&mut self, k: usize) {
        let (p, n) = (self.devices[k].lru_prev, self.devices[k].lru_next);
        if p != NIL {
            self.devices[p as usize].lru_next = n;
        } else if self.lru_head == k as u32 {
            self.lru_head = n;
        } else {
            return; // not linked
        }
        if n != NIL {
            self.devices[n as usize].lru_prev = p;
        } else {
            self.lru_tail = p;
        }
        let d = &mut self.devices[k];
        d.lru_prev = NIL;
        d.lru_next = NIL;
    }

    /// Marks a hot device used. A device already in the list only gets its `recent`
    /// bit set (a write to its own record; the hot path touches devices constantly),
    /// and the eviction scan gives it a second chance (CLOCK).
    fn lru_touch(&mut self, k: usize) {
        let d = &mut self.devices[k];
        if d.lru_prev != NIL || self.lru_head == k as u32 {
            d.recent = true;
            return;
        }
        self.lru_push_head(k);
    }

    fn lru_push_head(&mut self, k: usize) {
        let old = self.lru_head;
        let d = &mut self.devices[k];
        d.lru_next = old;
        d.lru_prev = NIL;
        d.recent = false;
        if old != NIL {
            self.devices[old as usize].lru_prev = k as u32;
        } else {
            self.lru_tail = k as u32;
        }
        self.lru_head = k as u32;
    }

    /// Evicts the least recently used unconnected devices while the hot queues hold more
    /// references than the cache bound: from the tail, a device used since the last
    /// pass (or connected) goes back to the head, another is evicted. Looks at a
    /// bounded number of entries per call.
    fn evict_over_bound(&mut self, now_ms: u64) {
        let mut budget = 64;
        while self.hot_msgs > self.cache_msgs && self.lru_tail != NIL && budget > 0 {
            budget -= 1;
            let k = self.lru_tail as usize;
            let d = &self.devices[k];
            if d.recent || d.session.is_some() {
                self.lru_unlink(k);
                self.lru_push_head(k);
            } else {
                self.evict(k, now_ms);
            }
        }
    }

    fn evict(&mut self, k: usize, now_ms: u64) {
        self.drop_expired(k, now_ms);
        self.lru_unlink(k);
        let d = &mut self.devices[k];
        if d.queue.is_empty() {
            // Nothing to rebuild later: stay "loaded" with an empty queue.
            d.queue = VecDeque::new();
            return;
        }
        self.hot_msgs -= d.queue.len();
        d.queue = VecDeque::new();
        d.loaded = false;
        d.cold_since_ms = now_ms;
        self.stats.evictions += 1;
    }

    /// Reads a device's queue back from the chain of records (newest to oldest),
    /// stopping at what was already acked or released. Entries expired by `now_ms`
    /// are marked dead.
    /// Also says whether the chain ended where it should (at the start, or at what was
    /// acked or released) rather than at a record that is missing or unreadable.
    fn walk(&self, k: usize, now_ms: u64) -> (VecDeque<QueuedMsg>, bool) {
        let now_us = crate::clock::mono_us();
        let d = &self.devices[k];
        let app = &self.apps[d.app as usize];
        let stop = d.acked.max(d.floor);
        let mut v = Vec::new();
        let (mut l, mut last) = (d.tail, u64::MAX);
        let mut whole = true;
        while l != NO_LOC {
            let Some(Record::Message(m)) = self.store.get(l) else {
                whole = false;
                break;
            };
            if m.seq <= stop {
                break;
            }
            // A chain runs down in seq within one device; anything else is damage.
            if m.seq >= last || m.id != &*d.id || m.app != &**app {
                whole = false;
                break;
            }
            v.push(QueuedMsg {
                seq: m.seq,
                receipt: self.receipts.seq_of(m.push_id),
                expiry_ms: m.expiry_ms,
                enqueued_us: now_us,
                loc: l,
                len: m.payload.len() as u32,
                dead: m.expiry_ms <= now_ms,
            });
            last = m.seq;
            l = m.prev;
        }
        v.reverse();
        (v.into(), whole)
    }

    /// Makes a device hot: its queue rebuilt from the store if it was evicted.
    fn load(&mut self, k: usize, now_ms: u64) {
        if !self.devices[k].loaded {
            let (q, _) = self.walk(k, now_ms);
            let d = &mut self.devices[k];
            for m in &q {
                // Dead before eviction were counted then; these expired while cold.
                if m.dead && m.expiry_ms > d.cold_since_ms {
                    d.forget(m);
                    count_expired(&mut self.receipts, &mut self.stats, &mut self.queued, m.receipt);
                }
            }
            self.hot_msgs += q.len();
            d.queue = q;
            d.loaded = true;
            self.stats.loads += 1;
            self.trim_front(k);
        }
        self.lru_touch(k);
    }

    /// Releases dead entries at the front of a hot queue.
    fn trim_front(&mut self, k: usize) {
        let d = &mut self.devices[k];
        while d.queue.front().is_some_and(|m| m.dead) {
            let m = d.queue.pop_front().expect("front exists");
            d.floor = m.seq;
            self.hot_msgs -= 1;
            self.store.release_sized(m.loc, Store::message_size(&self.apps[d.app as usize], &d.id, m.len as usize));
        }
    }

    /// Binds `session` to the device after a valid HELLO. `last_acked` and `cursor`
    /// are the device's own view: they release what the server had not seen acked,
    /// and for a device this server has never seen they continue the numbering.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        &mut self,
        app: u16,
        id: &str,
        last_acked: u64,
        cursor: u64,
        session: usize,
        now_ms: u64,
        now_us: u64,
    ) -> Attached {
        let known = self.find(app, id).is_some();
        let key = self.register(app, id, now_ms, false);
        self.load(key, now_ms);
        let head = self.logs[app as usize].next_bseq - 1;
        let d = &mut self.devices[key];
        let foreign_numbering = d.next_seq <= last_acked;
        if d.pending == 0 && d.queue.is_empty() && foreign_numbering {
            d.next_seq = last_acked + 1;
            d.acked = last_acked;
            d.floor = last_acked;
        } else if foreign_numbering {
            // The device has processed seqs this box never gave: its numbering came from
            // elsewhere (another node of the fleet, or this box before it forgot the
            // device), and what waits here was never seen by it. Acking it by that
            // number would lose it; it is numbered after what the device has instead.
            self.renumber_after(key, last_acked);
        }
        let d = &mut self.devices[key];
        if !known && cursor > d.cursor {
            d.cursor = cursor;
        }
        let replaced = d.session.replace(session as u32).map(|k| k as usize);
        d.last_seen_ms = now_ms;
        // Never past what this box numbered (a device cannot have seen more), nor by a
        // foreign number that could not be renumbered after (store full).
        let upto = if d.next_seq <= last_acked { d.acked } else { last_acked.min(d.next_seq - 1) };
        self.ack_upto(key, upto, now_us, false);
        self.bcast_ack(key, cursor.min(head), now_us);
        let d = &mut self.devices[key];
        d.sent_upto = d.acked;
        d.bsent = d.cursor;
        self.persist(key);
        let d = &self.devices[key];
        Attached { device: key, replaced, acked: d.acked, cursor: d.cursor, pending: d.pending }
    }

    /// Unbinds `session` (if it is still the device's); in-flight messages will be
    /// sent again on the next session.
    pub fn detach(&mut self, key: usize, session: usize, now_ms: u64) {
        if let Some(d) = self.devices.get_mut(key) {
            if d.session == Some(session as u32) {
                d.session = None;
                d.sent_upto = d.acked;
                d.bsent = d.cursor;
                d.last_seen_ms = now_ms;
                self.evict_over_bound(now_ms);
            }
        }
    }

    /// Stores a message for a known device key. Returns the device's session to wake.
    pub fn enqueue(
        &mut self,
        key: usize,
        push_id: u64,
        expiry_ms: u64,
        payload: &[u8],
        now_us: u64,
    ) -> Result<Option<usize>, ErrorCode> {
        let limits = self.limits;
        let d = &self.devices[key];
        if d.pending >= limits.max_msgs || d.queued_bytes + payload.len() as u64 > limits.max_bytes {
            self.stats.rejected_full += 1;
            return Err(ErrorCode::STORAGE_FULL);
        }
        let appended = {
            let DeviceTable { devices, apps, store, head, .. } = self;
            let d = &devices[key];
            let rec = Record::Message(MessageRec {
                app: &apps[d.app as usize],
                id: &d.id,
                seq: d.next_seq,
                push_id,
                expiry_ms,
                prev: d.tail,
                payload,
            });
            store.append(&rec, head)
        };
        let loc = match appended {
            Ok(l) => l,
            Err(e) => return Err(self.store_error(e)),
        };
        self.store_ok();
        let (receipt, c) = self.receipts.add(push_id);
        c.targeted += 1;
        c.stored += 1;
        let d = &mut self.devices[key];
        let seq = d.next_seq;
        d.next_seq += 1;
        d.tail = loc;
        d.pending += 1;
        d.queued_bytes += payload.len() as u64;
        if d.loaded {
            let len = payload.len() as u32;
            d.queue.push_back(QueuedMsg { seq, receipt, expiry_ms, enqueued_us: now_us, loc, len, dead: false });
            self.hot_msgs += 1;
        }
        self.queued += 1;
        if expiry_ms < d.expiry_armed {
            d.expiry_armed = expiry_ms;
            self.expiry.insert(key, expiry_ms);
        }
        let session = d.session.map(|k| k as usize);
        if self.devices[key].loaded {
            self.lru_touch(key);
        }
        self.stats.enqueued += 1;
        Ok(session)
    }

    /// Stores a message for `id` of `app`, registering the device if needed (unicast
    /// and multicast address devices that may not have connected yet).
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_to(
        &mut self,
        app: u16,
        id: &str,
        push_id: u64,
        expiry_ms: u64,
        payload: &[u8],
        now_ms: u64,
        now_us: u64,
    ) -> Result<Option<usize>, ErrorCode> {
        let key = self.register(app, id, now_ms, true);
        let r = self.enqueue(key, push_id, expiry_ms, payload, now_us);
        self.evict_over_bound(now_ms);
        r
    }

    /// Stores a broadcast once in the app's log; every device of the app this shard
    /// knows gets it. Returns how many devices that is.
    pub fn broadcast(
        &mut self,
        app: u16,
        push_id: u64,
        expiry_ms: u64,
        payload: &[u8],
        now_ms: u64,
        now_us: u64,
    ) -> Result<u64, ErrorCode> {
        let log = &self.logs[app as usize];
        let n = log.devices;
        // Clock numbering (fleets): a device that processed another node's broadcasts
        // up to some seq must not take this node's later ones for processed.
        let bseq = if self.clock_seqs { log.next_bseq.max(clock_seq(now_ms)) } else { log.next_bseq };
        // A broadcast that reaches nobody here still gets a receipt (all zero).
        let (receipt, c) = self.receipts.add(push_id);
        c.targeted += n;
        c.stored += n;
        if n == 0 {
            return Ok(0);
        }
        let rec = Record::Broadcast(BroadcastRec { app: &self.apps[app as usize], bseq, push_id, expiry_ms, payload });
        let loc = match self.store.append(&rec, &mut self.head) {
            Ok(l) => l,
            Err(e) => {
                self.receipts.update(receipt, |c| {
                    c.targeted -= n;
                    c.stored -= n;
                });
                return Err(self.store_error(e));
            }
        };
        self.store_ok();
        let log = &mut self.logs[app as usize];
        log.next_bseq = bseq + 1;
        log.entries.push_back(BEntry {
            bseq,
            push_id,
            receipt,
            expiry_ms,
            enqueued_us: now_us,
            loc,
            remaining: n,
            live: true,
            frame: None,
        });
        self.stats.broadcasts += 1;
        Ok(n)
    }

    /// Sessions of `app`'s devices (to wake after a broadcast).
    pub fn app_sessions(&self, app: u16) -> impl Iterator<Item = usize> + '_ {
        self.index[app as usize].keys().filter_map(|k| self.devices[k].session.map(|s| s as usize))
    }

    /// Applies a cumulative ACK of both streams from the session. Acks beyond what was
    /// sent are clamped: a device cannot ack what it never received.
    pub fn on_ack(&mut self, key: usize, seq: u64, bseq: u64, now_us: u64) {
        let d = &self.devices[key];
        let (upto, bupto) = (seq.min(d.sent_upto), bseq.min(d.bsent));
        let (acked, cursor) = (d.acked, d.cursor);
        self.ack_upto(key, upto, now_us, false);
        self.bcast_ack(key, bupto, now_us);
        let d = &self.devices[key];
        if d.acked != acked || d.cursor != cursor {
            self.persist(key);
        }
    }

    /// Releases the device's messages up to `upto`: acked by the device, or, when
    /// `handed`, taken by its node in the fleet (its receipt here stops counting them
    /// as stored without counting them delivered).
    fn ack_upto(&mut self, key: usize, upto: u64, now_us: u64, handed: bool) {
        let d = &mut self.devices[key];
        while d.queue.front().is_some_and(|m| m.seq <= upto) {
            let m = d.queue.pop_front().expect("front exists");
            self.hot_msgs -= 1;
            self.store.release_sized(m.loc, Store::message_size(&self.apps[d.app as usize], &d.id, m.len as usize));
            d.floor = m.seq;
            if m.dead {
                continue;
            }
            d.pending -= 1;
            d.queued_bytes -= m.len as u64;
            self.queued -= 1;
            if handed {
                self.stats.handed_over += 1;
            } else {
                self.stats.acked += 1;
                self.ack_lat.record(now_us.saturating_sub(m.enqueued_us));
            }
            self.receipts.update(m.receipt, |c| {
                c.delivered += u64::from(!handed);
                c.stored = c.stored.saturating_sub(1);
            });
        }
        d.acked = d.acked.max(upto);
        self.trim_front(key);
    }

    /// Moves a device's broadcast cursor to `upto`, counting deliveries.
    fn bcast_ack(&mut self, key: usize, upto: u64, now_us: u64) {
        let d = &mut self.devices[key];
        if upto <= d.cursor {
            return;
        }
        let log = &mut self.logs[d.app as usize];
        let from = log.entries.partition_point(|e| e.bseq <= d.cursor);
        for e in log.entries.range_mut(from..) {
            if e.bseq > upto {
                break;
            }
            if e.live {
                e.remaining = e.remaining.saturating_sub(1);
                self.stats.acked += 1;
                self.ack_lat.record(now_us.saturating_sub(e.enqueued_us));
                self.receipts.update(e.receipt, |c| {
                    c.delivered += 1;
                    c.stored = c.stored.saturating_sub(1);
                });
                if e.remaining == 0 {
                    e.live = false;
                    e.frame = None;
                    self.store.release(e.loc);
                }
            }
        }
        d.cursor = upto;
        d.bsent = d.bsent.max(upto);
        let app = d.app;
        self.trim_log(app);
    }

    /// Pops released entries off the front of an app's log; when the log empties, a
    /// head record keeps its numbering across a restart.
    fn trim_log(&mut self, app: u16) {
        let log = &mut self.logs[app as usize];
        let mut popped = false;
        while log.entries.front().is_some_and(|e| !e.live) {
            log.entries.pop_front();
            popped = true;
        }
        if popped && log.entries.is_empty() {
            self.write_head(app);
        }
    }

    fn write_head(&mut self, app: u16) {
        let next_bseq = self.logs[app as usize].next_bseq;
        match self.store.append(&Record::Head { app: &self.apps[app as usize], next_bseq }, &mut self.head) {
            Ok(l) => {
                let old = std::mem::replace(&mut self.logs[app as usize].head_loc, l);
                self.store.release(old);
            }
            Err(e) => {
                self.store_error(e);
            }
        }
    }

    /// Encodes messages the device has not been sent yet, within the window and up to
    /// about `max_bytes`, into `out`: its unicast queue first, then its app's
    /// broadcasts. Expired messages are never sent. Returns how many were written.
    pub fn fill(&mut self, key: usize, now_ms: u64, now_us: u64, out: &mut Vec<u8>, max_bytes: usize) -> usize {
        self.load(key, now_ms);
        let window = self.limits.window as usize;
        let mut written = 0;
        let mut expired_any = false;
        {
            let DeviceTable { devices, logs, store, stats, write_lat, receipts, queued, .. } = self;
            let d = &mut devices[key];
            let mut i = d.queue.partition_point(|m| m.seq <= d.sent_upto);
            while i < d.queue.len() && i < window && out.len() < max_bytes {
                let m = &mut d.queue[i];
                i += 1;
                if m.dead {
                    continue;
                }
                if m.expiry_ms <= now_ms {
                    m.dead = true;
                    let m = *m;
                    d.forget(&m);
                    count_expired(receipts, stats, queued, m.receipt);
                    expired_any = true;
                    continue;
                }
                let Some(Record::Message(r)) = store.get(m.loc) else {
                    // Retained records are always there; this is damage after start
                    // (the checksum failed). Skip it rather than stop the shard.
                    tracing::error!(seq = m.seq, "a stored message failed its checksum; it is skipped");
                    m.dead = true;
                    let m = *m;
                    d.forget(&m);
                    *queued -= 1;
                    expired_any = true;
                    continue;
                };
                let msg =
                    Message { flags: 0, seq: m.seq, push_id: r.push_id, expiry_ms: m.expiry_ms, payload: r.payload };
                encode_message(out, &msg);
                d.sent_upto = m.seq;
                if m.seq <= d.max_sent {
                    stats.redelivered += 1;
                } else {
                    d.max_sent = m.seq;
                }
                write_lat.record(now_us.saturating_sub(m.enqueued_us));
                written += 1;
            }
            // Broadcasts, in their own window.
            let log = &mut logs[d.app as usize];
            let acked_at = log.entries.partition_point(|e| e.bseq <= d.cursor);
            let mut j = log.entries.partition_point(|e| e.bseq <= d.bsent);
            while j < log.entries.len() && j - acked_at < window && out.len() < max_bytes {
                let e = &mut log.entries[j];
                j += 1;
                d.bsent = e.bseq;
                if !e.live || e.expiry_ms <= now_ms {
                    continue;
                }
                if e.frame.is_none() {
                    let Some(Record::Broadcast(r)) = store.get(e.loc) else {
                        tracing::error!(bseq = e.bseq, "a stored broadcast failed its checksum; it is skipped");
                        continue;
                    };
                    let msg = Message {
                        flags: FLAG_BROADCAST,
                        seq: e.bseq,
                        push_id: e.push_id,
                        expiry_ms: e.expiry_ms,
                        payload: r.payload,
                    };
                    let mut frame = Vec::new();
                    encode_message(&mut frame, &msg);
                    e.frame = Some(frame.into_boxed_slice());
                }
                out.extend_from_slice(e.frame.as_deref().unwrap_or_default());
                write_lat.record(now_us.saturating_sub(e.enqueued_us));
                written += 1;
            }
        }
        if expired_any {
            self.trim_front(key);
        }
        self.stats.written += written as u64;
        written
    }

    /// Whether the device has messages to write now.
    pub fn has_unsent(&self, key: usize) -> bool {
        let d = &self.devices[key];
        let window = self.limits.window as usize;
        if d.loaded {
            let inflight = d.queue.partition_point(|m| m.seq <= d.sent_upto);
            if inflight < d.queue.len() && inflight < window {
                return true;
            }
        } else if d.pending > 0 {
            return true;
        }
        let log = &self.logs[d.app as usize];
        let acked_at = log.entries.partition_point(|e| e.bseq <= d.cursor);
        let sent_at = log.entries.partition_point(|e| e.bseq <= d.bsent);
        sent_at < log.entries.len() && sent_at - acked_at < window
    }

    /// Marks expired messages of a hot device dead and releases those at the front.
    fn drop_expired(&mut self, k: usize, now_ms: u64) {
        let d = &mut self.devices[k];
        let mut expired = false;
        for i in 0..d.queue.len() {
            let m = d.queue[i];
            if !m.dead && m.expiry_ms <= now_ms {
                d.queue[i].dead = true;
                d.forget(&m);
                count_expired(&mut self.receipts, &mut self.stats, &mut self.queued, m.receipt);
                expired = true;
            }
        }
        if expired {
            self.trim_front(k);
            // The registry record carries next_seq past what may now be deleted.
            self.persist(k);
        }
    }

    /// Drops messages and broadcasts whose TTL passed.
    pub fn expire(&mut self, now_ms: u64) {
        self.fired.clear();
        self.expiry.advance(now_ms, &mut self.fired);
        let fired = std::mem::take(&mut self.fired);
        for &key in &fired {
            if !self.devices.contains(key) || self.devices[key].expiry_armed > now_ms {
                continue; // re-armed later: a stale entry
            }
            self.load(key, now_ms);
            self.drop_expired(key, now_ms);
            let d = &mut self.devices[key];
            d.expiry_armed = u64::MAX;
            if let Some(next) = d.queue.iter().filter(|m| !m.dead).map(|m| m.expiry_ms).min() {
                d.expiry_armed = next;
                self.expiry.insert(key, next);
            }
        }
        self.fired = fired;
        for app in 0..self.logs.len() {
            let log = &mut self.logs[app];
            for e in log.entries.iter_mut().filter(|e| e.live && e.expiry_ms <= now_ms) {
                e.live = false;
                e.frame = None;
                self.store.release(e.loc);
                self.stats.expired += e.remaining;
                let n = e.remaining;
                self.receipts.update(e.receipt, |c| {
                    c.expired += n;
                    c.stored = c.stored.saturating_sub(n);
                });
            }
            self.trim_log(app as u16);
        }
        self.evict_over_bound(now_ms);
    }

    /// Whether a compaction is under way (it continues on the next [`compact`] call).
    ///
    /// [`compact`]: DeviceTable::compact
    pub fn compacting(&self) -> bool {
        self.compaction.is_some()
    }

    /// Copies the live records of the emptiest old segment (below `max_live` of its
    /// size) to the head of the log, so the segment can be deleted. A device's
    /// messages are rewritten together, keeping its chain whole. Works through at most
    /// `budget` records per call, so a big segment never stalls the shard: each record's
    /// liveness is checked when its turn comes. Returns whether there was work.
    pub fn compact(&mut self, max_live: f64, now_ms: u64, budget: usize) -> bool {
        let mut c = match self.compaction.take() {
            Some(c) => c,
            None => match self.store.compaction_candidate(max_live) {
                Some((seg, locs)) => Compaction { seg, locs, next: 0, moved: 0, rewritten: Default::default() },
                None => return false,
            },
        };
        let end = (c.next + budget.max(1)).min(c.locs.len());
        let (seg, locs, rewritten) = (c.seg, &c.locs[c.next..end], &mut c.rewritten);
        /// What a record in the segment is, resolved while the store is borrowed.
        enum Live {
            Device(usize),
            Message(usize),
            Broadcast(u16, usize),
            Head(u16),
        }
        let mut moved = 0u64;
        for &l in locs {
            let live = {
                let app_of = |app: &str| self.apps.iter().position(|a| **a == *app).map(|a| a as u16);
                match self.store.get(l) {
                    Some(Record::Device(r)) => app_of(r.app)
                        .and_then(|a| self.find(a, r.id))
                        .filter(|&k| self.devices[k].dev_loc == l)
                        .map(Live::Device),
                    Some(Record::Message(r)) => app_of(r.app)
                        .and_then(|a| self.find(a, r.id))
                        .filter(|k| !rewritten.contains(k))
                        .map(Live::Message),
                    Some(Record::Broadcast(r)) => app_of(r.app).and_then(|a| {
                        let log = &self.logs[a as usize];
                        let i = log.entries.iter().position(|e| e.bseq == r.bseq && e.live && e.loc == l)?;
                        Some(Live::Broadcast(a, i))
                    }),
                    Some(Record::Head { app, .. }) => {
                        app_of(app).filter(|&a| self.logs[a as usize].head_loc == l).map(Live::Head)
                    }
                    None => None,
                }
            };
            match live {
                None => {}
                Some(Live::Device(k)) => {
                    self.persist(k);
                    moved += 1;
                }
                Some(Live::Message(k)) => {
                    // The whole chain moves at once: later records of this device here
                    // are released by it.
                    self.load(k, now_ms);
                    if self.devices[k].queue.iter().any(|m| m.loc == l) {
                        moved += self.rewrite_chain(k) as u64;
                        rewritten.insert(k);
                    }
                }
                Some(Live::Broadcast(a, i)) => {
                    let (bseq, push_id, expiry_ms) = {
                        let e = &self.logs[a as usize].entries[i];
                        (e.bseq, e.push_id, e.expiry_ms)
                    };
                    let Some(Record::Broadcast(r)) = self.store.get(l) else { continue };
                    let payload = r.payload.to_vec();
                    let rec = Record::Broadcast(BroadcastRec {
                        app: &self.apps[a as usize],
                        bseq,
                        push_id,
                        expiry_ms,
                        payload: &payload,
                    });
                    if let Ok(nl) = self.store.append(&rec, &mut self.head) {
                        self.logs[a as usize].entries[i].loc = nl;
                        self.store.release(l);
                        moved += 1;
                    }
                }
                Some(Live::Head(a)) => {
                    self.write_head(a);
                    moved += 1;
                }
            }
        }
        self.stats.compacted_records += moved;
        c.moved += moved;
        c.next = end;
        if c.next < c.locs.len() {
            self.compaction = Some(c);
        } else {
            self.store.stats.compactions += 1;
            tracing::debug!("store segment {seg} compacted: {} live records moved", c.moved);
        }
        self.evict_over_bound(now_ms);
        true
    }

    /// Gives a hot device's queued messages the seqs after `base`, in order, and
    /// rewrites them so that their records carry the new seqs. If the store has no room
    /// for that, the old numbering stays (and the device will take the messages for
    /// ones it has seen).
    fn renumber_after(&mut self, k: usize, base: u64) {
        // (On failure `next_seq` stays at or below `base`, which `attach` reads as such.)
        let d = &mut self.devices[k];
        let before: Vec<u64> = d.queue.iter().map(|m| m.seq).collect();
        for (m, seq) in d.queue.iter_mut().zip(base + 1..) {
            m.seq = seq;
        }
        if self.rewrite_chain(k) == 0 && self.devices[k].pending > 0 {
            let d = &mut self.devices[k];
            for (m, &seq) in d.queue.iter_mut().zip(&before) {
                m.seq = seq;
            }
            tracing::error!(device = %d.id, "no room in the store to renumber its messages after the seqs it has seen");
            return;
        }
        let d = &mut self.devices[k];
        let last = d.queue.back().map_or(base, |m| m.seq);
        d.next_seq = last + 1;
        (d.acked, d.floor, d.sent_upto, d.max_sent) = (base, base, base, base);
    }

    /// Rewrites a hot device's live messages as a fresh chain at the head of the log,
    /// releasing the old records (dead entries are dropped). Returns records written.
    fn rewrite_chain(&mut self, k: usize) -> usize {
        let old: Vec<QueuedMsg> = self.devices[k].queue.drain(..).collect();
        self.hot_msgs -= old.len();
        let mut prev = NO_LOC;
        let mut kept = VecDeque::with_capacity(old.len());
        let mut failed = false;
        for m in &old {
            if m.dead {
                continue;
            }
            let new = if failed {
                None
            } else {
                let DeviceTable { devices, apps, store, head, .. } = self;
                let d = &devices[k];
                // An unreadable record (damage after start) fails the move: the old
                // chain stays as it was.
                store
                    .get(m.loc)
                    .and_then(|r| match r {
                        Record::Message(r) => Some((r.push_id, r.payload.to_vec())),
                        _ => None,
                    })
                    .and_then(|(push_id, payload)| {
                        let rec = Record::Message(MessageRec {
                            app: &apps[d.app as usize],
                            id: &d.id,
                            seq: m.seq,
                            push_id,
                            expiry_ms: m.expiry_ms,
                            prev,
                            payload: &payload,
                        });
                        store.append(&rec, head).ok()
                    })
            };
            match new {
                Some(l) => {
                    prev = l;
                    kept.push_back(QueuedMsg { loc: l, ..*m });
                }
                None => {
                    // No room to move it: keep the old chain as it was.
                    failed = true;
                }
            }
        }
        if failed {
            for m in &kept {
                self.store.release(m.loc);
            }
            self.hot_msgs += old.len();
            self.devices[k].queue = old.into();
            return 0;
        }
        for m in &old {
            self.store.release(m.loc);
        }
        let n = kept.len();
        self.hot_msgs += n;
        let d = &mut self.devices[k];
        d.tail = kept.back().map_or(NO_LOC, |m| m.loc);
        d.queue = kept;
        n
    }

    /// Drops from the registry devices that have nothing stored, are not connected and
    /// were not seen for `idle_ms` (a device addressed once and never again must not
    /// stay forever). Looks at `budget` slab entries per call, round robin. A device
    /// that comes back later registers anew: its HELLO states where its numbering was.
    pub fn forget_idle(&mut self, now_ms: u64, idle_ms: u64, budget: usize) -> usize {
        let mut forgotten = 0;
        for _ in 0..budget {
            if self.forget_cursor >= self.devices.capacity() {
                self.forget_cursor = 0;
                break;
            }
            let k = self.forget_cursor;
            self.forget_cursor += 1;
            let Some(d) = self.devices.get(k) else { continue };
            let idle = d.session.is_none() && d.pending == 0 && d.queue.is_empty() && d.loaded;
            if !idle || d.last_seen_ms.saturating_add(idle_ms) > now_ms {
                continue;
            }
            let app = d.app as usize;
            self.lru_unlink(k);
            self.index[app].remove(&self.devices, k);
            let d = self.devices.remove(k);
            self.logs[d.app as usize].devices -= 1;
            self.store.release(d.dev_loc);
            forgotten += 1;
        }
        self.stats.forgotten += forgotten as u64;
        forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;
    use ringpush_protocol::{DeviceFrame, Limits};
    use std::path::Path;

    const NOW: u64 = 1_000_000;
    const SEG: usize = 4096;

    fn opts(cache_msgs: usize) -> TableOptions {
        let limits = QueueLimits { window: 3, max_msgs: 5, max_bytes: 1000 };
        TableOptions { limits, receipts: 100, cache_msgs, latencies: true, clock_seqs: false }
    }

    fn open_with(dir: &Path, cache_msgs: usize, max_bytes: u64, now: u64) -> DeviceTable {
        let sopts = StoreOptions { segment_bytes: SEG, max_bytes };
        DeviceTable::open(dir, sopts, vec!["a".into(), "b".into()], opts(cache_msgs), now).unwrap()
    }

    fn open(dir: &Path) -> DeviceTable {
        open_with(dir, usize::MAX, u64::MAX, NOW)
    }

    /// Decodes the (broadcast?, seq, payload) of every MESSAGE written by `fill`.
    fn decode(out: &[u8]) -> Vec<(bool, u64, String)> {
        let mut rest = out;
        let mut v = Vec::new();
        while let Some((f, n)) = DeviceFrame::decode(rest, &Limits::default()).unwrap() {
            let DeviceFrame::Message(m) = f else { panic!("{f:?}") };
            v.push((m.flags & FLAG_BROADCAST != 0, m.seq, String::from_utf8_lossy(m.payload).into_owned()));
            rest = &rest[n..];
        }
        v
    }

    fn fill_at(t: &mut DeviceTable, key: usize, now: u64) -> Vec<(bool, u64, String)> {
        let mut out = Vec::new();
        t.fill(key, now, 0, &mut out, 1 << 20);
        decode(&out)
    }

    fn seqs(t: &mut DeviceTable, key: usize) -> Vec<u64> {
        fill_at(t, key, NOW).into_iter().map(|(_, s, _)| s).collect()
    }

    fn attach(t: &mut DeviceTable, id: &str, last_acked: u64, session: usize) -> Attached {
        t.attach(0, id, last_acked, 0, session, NOW, 0)
    }

    fn push(
        t: &mut DeviceTable,
        id: &str,
        push_id: u64,
        expiry: u64,
        payload: &str,
    ) -> Result<Option<usize>, ErrorCode> {
        t.enqueue_to(0, id, push_id, expiry, payload.as_bytes(), NOW, 0)
    }

    #[test]
    fn in_order_delivery_within_the_window_and_cumulative_acks() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        let a = attach(&mut t, "d", 0, 7);
        assert_eq!(a, Attached { device: a.device, replaced: None, acked: 0, cursor: 0, pending: 0 });
        for i in 0..5 {
            assert_eq!(t.enqueue(a.device, 100 + i, NOW + 10_000, b"x", 0), Ok(Some(7)));
        }
        assert_eq!(seqs(&mut t, a.device), [1, 2, 3], "window of 3");
        assert_eq!(seqs(&mut t, a.device), Vec::<u64>::new(), "window full");
        t.on_ack(a.device, 2, 0, 0);
        assert_eq!(seqs(&mut t, a.device), [4, 5]);
        t.on_ack(a.device, 99, 0, 0); // clamped to what was sent
        assert_eq!(t.device(a.device).acked(), 5);
        assert_eq!(t.device(a.device).pending(), 0);
        assert_eq!(t.receipt(100).unwrap(), Counts { targeted: 1, delivered: 1, stored: 0, expired: 0 });
    }

    #[test]
    fn messages_handed_to_another_node_leave_the_queue_and_stay_gone_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        for (i, expiry) in [(1, NOW + 10_000), (2, NOW + 1), (3, NOW + 10_000), (4, NOW + 10_000)] {
            push(&mut t, "far", i, expiry, &format!("m{i}")).unwrap();
        }
        push(&mut t, "near", 9, NOW + 10_000, "mine").unwrap();
        let keep = |_: &str, d: &str| d != "far";
        let far = t.waiting_elsewhere(keep);
        assert_eq!(far.len(), 1);
        let key = far[0];
        let out = t.pending_messages(key, NOW + 5, 2);
        let got: Vec<(u64, &[u8])> = out.iter().map(|m| (m.seq, m.payload.as_slice())).collect();
        assert_eq!(got, [(1, &b"m1"[..]), (3, &b"m3"[..])], "oldest first, the expired one skipped, at most 2");
        assert_eq!(out[0].expiry_ms, NOW + 10_000);
        t.handed_over(key, 3, NOW + 5, 0);
        assert_eq!(t.device(key).pending(), 1, "m4 is still here");
        assert_eq!(t.receipt(1).unwrap(), Counts { targeted: 1, delivered: 0, stored: 0, expired: 0 });
        assert_eq!((t.stats.handed_over, t.stats.expired), (2, 1), "m1 and m3 moved, m2 expired");
        assert_eq!(t.receipt(2).unwrap(), Counts { targeted: 1, delivered: 0, stored: 0, expired: 1 });
        drop(t);
        let mut t = open_with(dir.path(), 0, u64::MAX, NOW + 5);
        let key = t.waiting_elsewhere(keep)[0];
        assert!(!t.device(key).is_hot(), "a cache of 0 starts every queue cold");
        let out = t.pending_messages(key, NOW + 5, 10);
        assert_eq!(out.iter().map(|m| m.seq).collect::<Vec<_>>(), [4], "only m4 is left after a restart");
        t.handed_over(key, 4, NOW + 5, 0);
        assert!(t.waiting_elsewhere(keep).is_empty());
        assert_eq!(t.queued(), 1, "the near device keeps its message");
    }

    #[test]
    fn messages_waiting_for_a_device_numbered_elsewhere_are_numbered_after_what_it_has_seen() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        // Stored before the device ever came here (handed over from another node, or
        // pushed after this box forgot the device): seqs 1..3 of this box.
        for i in 1..=3 {
            push(&mut t, "moved", i, NOW + 10_000, &format!("m{i}")).unwrap();
        }
        // The device processed seq 57 of another numbering: acking 1..3 by it would lose them.
        let a = attach(&mut t, "moved", 57, 1);
        assert_eq!((a.acked, a.pending), (57, 3));
        assert_eq!(
            fill_at(&mut t, a.device, NOW),
            [(false, 58, "m1".into()), (false, 59, "m2".into()), (false, 60, "m3".into())]
        );
        t.on_ack(a.device, 59, 0, 0);
        t.detach(a.device, 1, NOW);
        drop(t);
        // The new numbering is what the store holds: a restart keeps it.
        let mut t = open(dir.path());
        let b = attach(&mut t, "moved", 59, 2);
        assert_eq!((b.acked, b.pending), (59, 1));
        assert_eq!(fill_at(&mut t, b.device, NOW), [(false, 60, "m3".into())]);
        assert_eq!(t.enqueue(b.device, 9, NOW + 10_000, b"m4", 0), Ok(Some(2)));
        assert_eq!(fill_at(&mut t, b.device, NOW), [(false, 61, "m4".into())], "new messages follow");
    }

    #[test]
    fn a_fleet_node_numbers_new_devices_from_the_clock_above_what_another_node_gave() {
        let dir = tempfile::tempdir().unwrap();
        let sopts = StoreOptions { segment_bytes: SEG, max_bytes: u64::MAX };
        let topts = TableOptions { clock_seqs: true, ..opts(usize::MAX) };
        let mut t = DeviceTable::open(dir.path(), sopts, vec!["a".into()], topts, NOW).unwrap();
        push(&mut t, "moved", 1, NOW + 10_000, "m1").unwrap();
        push(&mut t, "moved", 2, NOW + 10_000, "m2").unwrap();
        // The device processed seq 5 at a node that numbered from 1 (or from an earlier clock).
        let a = attach(&mut t, "moved", 5, 1);
        let first = clock_seq(NOW);
        assert_eq!((a.pending, a.acked), (2, first - 1));
        assert_eq!(fill_at(&mut t, a.device, NOW), [(false, first, "m1".into()), (false, first + 1, "m2".into())]);
        // Broadcasts too: the device's stated cursor from another node (7) does not
        // cover this node's.
        t.broadcast(0, 60, NOW + 10_000, b"all", NOW, 0).unwrap();
        t.detach(a.device, 1, NOW);
        let again = t.attach(0, "moved", first + 1, 7, 3, NOW, 0);
        assert!(again.cursor < first, "the stated 7 acks nothing here: {}", again.cursor);
        assert_eq!(fill_at(&mut t, again.device, NOW), [(true, first, "all".into())]);
        // A device that first connects numbers from the clock as well.
        let b = attach(&mut t, "fresh", 0, 2);
        assert_eq!(t.enqueue(b.device, 3, NOW + 10_000, b"x", 0), Ok(Some(2)));
        assert_eq!(fill_at(&mut t, b.device, NOW)[0].1, first);
    }

    #[test]
    fn unacked_messages_are_resent_after_reconnect() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        let a = attach(&mut t, "d", 0, 1);
        for i in 0..3 {
            t.enqueue(a.device, i, NOW + 10_000, b"x", 0).unwrap();
        }
        assert_eq!(seqs(&mut t, a.device), [1, 2, 3]);
        t.on_ack(a.device, 1, 0, 0);
        t.detach(a.device, 1, NOW);
        let b = attach(&mut t, "d", 1, 2);
        assert_eq!((b.acked, b.pending, b.replaced), (1, 2, None));
        assert_eq!(seqs(&mut t, b.device), [2, 3]);
        // The device had processed 2 before the reconnect and says so in HELLO.
        t.detach(b.device, 2, NOW);
        let c = attach(&mut t, "d", 2, 3);
        assert_eq!((c.acked, c.pending), (2, 1));
        assert_eq!(seqs(&mut t, c.device), [3]);
    }

    #[test]
    fn second_login_replaces_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        let a = attach(&mut t, "d", 0, 10);
        let b = attach(&mut t, "d", 0, 11);
        assert_eq!(b.replaced, Some(10));
        // The replaced session detaching later does not unbind the new one.
        t.detach(a.device, 10, NOW);
        assert_eq!(t.device(b.device).session, Some(11));
    }

    #[test]
    fn unknown_device_continues_after_its_own_last_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        let a = attach(&mut t, "d", 41, 1);
        assert_eq!(a.acked, 41);
        t.enqueue(a.device, 1, NOW + 1000, b"x", 0).unwrap();
        assert_eq!(seqs(&mut t, a.device), [42]);
    }

    #[test]
    fn queues_are_bounded_by_count_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        for i in 0..5 {
            push(&mut t, "off", i, NOW + 1000, "x").unwrap();
        }
        assert_eq!(push(&mut t, "off", 9, NOW + 1000, "x"), Err(ErrorCode::STORAGE_FULL));
        let big = "y".repeat(1001);
        assert_eq!(push(&mut t, "other", 1, NOW + 1000, &big), Err(ErrorCode::STORAGE_FULL));
        assert_eq!(t.stats.rejected_full, 2);
    }

    #[test]
    fn expired_messages_are_never_sent_and_are_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        let k = attach(&mut t, "d", 0, 1).device;
        t.enqueue(k, 1, NOW - 1, b"old", 0).unwrap();
        t.enqueue(k, 2, NOW + 5_000, b"new", 0).unwrap();
        assert_eq!(seqs(&mut t, k), [2]);
        assert_eq!(t.receipt(1).unwrap().expired, 1);
        // Offline device: the wheel drops them when their time comes.
        push(&mut t, "off", 3, NOW + 2_000, "x").unwrap();
        push(&mut t, "off", 4, NOW + 9_000, "y").unwrap();
        let off = t.find(0, "off").unwrap();
        t.expire(NOW + 1_000);
        assert_eq!(t.device(off).pending(), 2);
        t.expire(NOW + 2_500);
        assert_eq!(t.device(off).pending(), 1);
        t.expire(NOW + 9_500);
        assert_eq!(t.device(off).pending(), 0);
        assert_eq!(t.receipt(4).unwrap(), Counts { targeted: 1, delivered: 0, stored: 0, expired: 1 });
        // d's seq 2 was sent but never acked: it expires too.
        assert_eq!(t.stats.expired, 4);
        assert_eq!(t.queued(), 0);
    }

    #[test]
    fn a_message_expiring_between_pending_ones_is_skipped_and_the_rest_survive_eviction_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open_with(dir.path(), 0, u64::MAX, NOW);
        push(&mut t, "d", 1, NOW + 60_000, "first").unwrap();
        push(&mut t, "d", 2, NOW + 1_000, "short").unwrap();
        push(&mut t, "d", 3, NOW + 60_000, "third").unwrap();
        let k = t.find(0, "d").unwrap();
        assert!(!t.device(k).is_hot(), "cache bound 0: offline devices stay cold");
        t.expire(NOW + 2_000);
        assert_eq!(t.device(k).pending(), 2);
        assert_eq!(t.receipt(2).unwrap().expired, 1);
        // Reloading from the chain skips the dead one and counts it only once.
        let a = t.attach(0, "d", 0, 0, 1, NOW + 2_000, 0);
        assert_eq!(a.pending, 2);
        let got = fill_at(&mut t, k, NOW + 2_000);
        assert_eq!(got, [(false, 1, "first".into()), (false, 3, "third".into())]);
        assert_eq!(t.stats.expired, 1);
        drop(t);
        let mut t = open_with(dir.path(), 0, u64::MAX, NOW + 3_000);
        let a = t.attach(0, "d", 0, 0, 1, NOW + 3_000, 0);
        assert_eq!(a.pending, 2);
        assert_eq!(fill_at(&mut t, a.device, NOW + 3_000).iter().map(|m| m.1).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn broadcast_is_stored_once_and_reaches_every_device_of_the_app() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        let a = attach(&mut t, "a", 0, 1).device;
        let b = attach(&mut t, "b", 0, 2).device;
        push(&mut t, "offline", 5, NOW + 100, "u").unwrap();
        t.attach(1, "other-app", 0, 0, 3, NOW, 0);
        let appends = t.store.stats.appends;
        assert_eq!(t.broadcast(0, 77, NOW + 1000, b"all", NOW, 0), Ok(3));
        assert_eq!(t.store.stats.appends, appends + 1, "one record for the whole app");
        let mut wake: Vec<usize> = t.app_sessions(0).collect();
        wake.sort();
        assert_eq!(wake, [1, 2]);
        assert_eq!(fill_at(&mut t, a, NOW), [(true, 1, "all".into())]);
        assert_eq!(fill_at(&mut t, b, NOW), [(true, 1, "all".into())]);
        t.on_ack(a, 0, 1, 0);
        t.on_ack(b, 0, 1, 0);
        assert_eq!(t.receipt(77).unwrap(), Counts { targeted: 3, delivered: 2, stored: 1, expired: 0 });
        // A device registered later starts at the head: it does not get old broadcasts.
        let late = attach(&mut t, "late", 0, 4);
        assert_eq!(late.cursor, 1);
        assert!(fill_at(&mut t, late.device, NOW).is_empty());
        // The offline device gets it on connect; then every counted device has it.
        let off = attach(&mut t, "offline", 0, 5).device;
        assert_eq!(fill_at(&mut t, off, NOW), [(false, 1, "u".into()), (true, 1, "all".into())]);
        t.on_ack(off, 1, 1, 0);
        assert_eq!(t.broadcasts_kept(), 0, "released once everyone acked");
        assert_eq!(t.receipt(77).unwrap().delivered, 3);
    }

    #[test]
    fn broadcasts_expire_for_devices_that_never_came_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        push(&mut t, "x", 1, NOW + 100_000, "u").unwrap();
        push(&mut t, "y", 2, NOW + 100_000, "u").unwrap();
        t.broadcast(0, 9, NOW + 1_000, b"b", NOW, 0).unwrap();
        t.expire(NOW + 1_500);
        assert_eq!(t.receipt(9).unwrap(), Counts { targeted: 2, delivered: 0, stored: 0, expired: 2 });
        let x = attach(&mut t, "x", 0, 1).device;
        assert_eq!(fill_at(&mut t, x, NOW + 1_500), [(false, 1, "u".into())]);
    }

    #[test]
    fn a_restart_keeps_registry_pending_messages_and_broadcasts() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        let k = attach(&mut t, "d", 0, 1).device;
        for i in 1..=4 {
            t.enqueue(k, i, NOW + 60_000, format!("m{i}").as_bytes(), 0).unwrap();
        }
        fill_at(&mut t, k, NOW);
        t.on_ack(k, 2, 0, 0);
        push(&mut t, "off", 60, NOW + 60_000, "offline one").unwrap();
        t.broadcast(0, 50, NOW + 60_000, b"hello all", NOW, 0).unwrap();
        t.store.flush_now().unwrap();
        drop(t);

        let mut t = open(dir.path());
        assert_eq!(t.queued(), 3);
        let a = attach(&mut t, "d", 0, 1);
        assert_eq!((a.acked, a.pending, a.cursor), (2, 2, 0));
        let got = fill_at(&mut t, a.device, NOW);
        assert_eq!(got, [(false, 3, "m3".into()), (false, 4, "m4".into()), (true, 1, "hello all".into())]);
        t.on_ack(a.device, 4, 1, 0);
        let k2 = t.enqueue(a.device, 5, NOW + 60_000, b"m5", 0);
        assert!(k2.is_ok());
        assert_eq!(fill_at(&mut t, a.device, NOW), [(false, 5, "m5".into())], "numbering continues");
        let off = attach(&mut t, "off", 0, 2).device;
        assert_eq!(fill_at(&mut t, off, NOW), [(false, 1, "offline one".into()), (true, 1, "hello all".into())]);
        drop(t);
        // Acked state survives too, and a broadcast after restart continues the numbering.
        let mut t = open(dir.path());
        let a = attach(&mut t, "d", 0, 1);
        assert_eq!((a.acked, a.cursor), (4, 1));
        t.broadcast(0, 51, NOW + 60_000, b"again", NOW, 0).unwrap();
        assert_eq!(fill_at(&mut t, a.device, NOW)[1], (true, 2, "again".into()));
    }

    #[test]
    fn the_cache_bound_evicts_offline_devices_and_reloads_them_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open_with(dir.path(), 8, u64::MAX, NOW);
        for d in 0..10 {
            for m in 0..4 {
                push(&mut t, &format!("d{d}"), d * 10 + m, NOW + 60_000, &format!("{d}-{m}")).unwrap();
            }
        }
        assert!(t.hot_msgs() <= 8, "bounded: {}", t.hot_msgs());
        assert!(t.stats.evictions >= 8);
        assert_eq!(t.queued(), 40);
        for d in 0..10 {
            let a = t.attach(0, &format!("d{d}"), 0, 0, d as usize, NOW, 0);
            assert_eq!(a.pending, 4);
            let got: Vec<String> = fill_at(&mut t, a.device, NOW).into_iter().map(|m| m.2).collect();
            assert_eq!(got, [format!("{d}-0"), format!("{d}-1"), format!("{d}-2")], "window 3, in order");
            t.on_ack(a.device, 3, 0, 0);
            t.detach(a.device, d as usize, NOW);
        }
        assert!(t.stats.loads >= 8);
        assert_eq!(t.queued(), 10);
        assert!(t.hot_msgs() <= 8);
        // Acks of messages read back from the store still reach their receipts.
        for d in 0..10u64 {
            for m in 0..4 {
                let c = t.receipt(d * 10 + m).unwrap();
                let want = if m < 3 { (1, 1, 0) } else { (1, 0, 1) };
                assert_eq!((c.targeted, c.delivered, c.stored), want, "push {d}-{m}");
            }
        }
    }

    /// Runs the shard's once-a-second store maintenance.
    fn maintain(t: &mut DeviceTable, now: u64) {
        if t.store.segments() > 2 {
            while t.compact(0.5, now, 8) && t.compacting() {}
        }
        let dead = t.store.dead_segments();
        t.store.delete(&dead).unwrap();
    }

    #[test]
    fn disk_use_stays_within_a_small_factor_of_live_data_under_steady_push_and_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        let devices: Vec<usize> = (0..20).map(|i| attach(&mut t, &format!("d{i}"), 0, i).device).collect();
        // One slow device keeps a few old messages pending, so old segments stay partly live.
        let slow = push(&mut t, "slow", 0, NOW + 3_600_000, "kept").map(|_| t.find(0, "slow").unwrap()).unwrap();
        let mut worst = 0f64;
        for round in 0..400u64 {
            for &k in &devices {
                t.enqueue(k, round, NOW + 3_600_000, &[7u8; 64], 0).unwrap();
                fill_at(&mut t, k, NOW);
                let upto = t.device(k).acked() + 1;
                t.on_ack(k, upto, 0, 0);
            }
            if round % 100 == 50 && t.device(slow).pending() < 5 {
                push(&mut t, "slow", round, NOW + 3_600_000, "kept").unwrap();
            }
            maintain(&mut t, NOW);
            let live = t.store.live_bytes().max(1) as f64;
            let disk = t.store.disk_bytes() as f64 - SEG as f64; // the active segment is preallocated
            worst = worst.max(disk / live);
        }
        assert!(t.store.stats.appends > 8000);
        assert!(t.store.stats.segments_deleted > 100, "{:?}", t.store.stats);
        assert!(t.store.stats.compactions > 0, "{:?}", t.store.stats);
        assert!(t.store.segments() <= 4, "{} segments", t.store.segments());
        assert!(worst < 8.0, "disk / live reached {worst}");
        // Nothing pending was lost on the way.
        let a = attach(&mut t, "slow", 0, 99);
        assert_eq!(a.pending, 5);
        assert_eq!(fill_at(&mut t, a.device, NOW).len(), 3);
        drop(t);
        let mut t = open(dir.path());
        assert_eq!(attach(&mut t, "slow", 0, 99).pending, 5);
    }

    #[test]
    fn compaction_works_in_slices_and_loses_nothing_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        // Four devices keep one old message each; many others come and go.
        for i in 0..4 {
            push(&mut t, &format!("keep{i}"), i, NOW + 60_000, &format!("old{i}")).unwrap();
        }
        let busy = attach(&mut t, "busy", 0, 1).device;
        for n in 0..200 {
            t.enqueue(busy, 100 + n, NOW + 60_000, &[1u8; 64], 0).unwrap();
            fill_at(&mut t, busy, NOW);
            let upto = t.device(busy).acked() + 1;
            t.on_ack(busy, upto, 0, 0);
        }
        assert!(t.compact(0.5, NOW, 1), "a candidate exists");
        assert!(t.compacting(), "one record per call: not done yet");
        // Traffic goes on between slices.
        push(&mut t, "keep0", 9, NOW + 60_000, "new0").unwrap();
        let mut calls = 1;
        while t.compacting() {
            t.compact(0.5, NOW, 1);
            calls += 1;
        }
        assert!(calls > 5, "{calls}");
        assert!(t.stats.compacted_records >= 4);
        let dead = t.store.dead_segments();
        assert!(!dead.is_empty());
        t.store.delete(&dead).unwrap();
        drop(t);
        let mut t = open(dir.path());
        let k = attach(&mut t, "keep0", 0, 2).device;
        let got: Vec<String> = fill_at(&mut t, k, NOW).into_iter().map(|m| m.2).collect();
        assert_eq!(got, ["old0", "new0"]);
        for i in 1..4 {
            assert_eq!(attach(&mut t, &format!("keep{i}"), 0, 3 + i).pending, 1);
        }
    }

    #[test]
    fn a_full_store_refuses_pushes_keeps_what_it_accepted_and_recovers_room() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open_with(dir.path(), usize::MAX, 3 * SEG as u64, NOW);
        let mut accepted = 0;
        let err = loop {
            match push(&mut t, &format!("d{}", accepted % 40), accepted, NOW + 60_000, "payload-payload") {
                Ok(_) => accepted += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(err, ErrorCode::STORAGE_FULL);
        assert!(t.stats.store_errors >= 1);
        assert_eq!(t.queued(), accepted);
        // Deliver and ack everything: the space comes back and pushes are taken again.
        for d in 0..40 {
            let a = t.attach(0, &format!("d{d}"), 0, 0, d, NOW, 0);
            while !fill_at(&mut t, a.device, NOW).is_empty() {
                let upto = t.device(a.device).acked() + 3;
                t.on_ack(a.device, upto, 0, 0);
            }
        }
        assert_eq!(t.queued(), 0);
        maintain(&mut t, NOW);
        maintain(&mut t, NOW);
        push(&mut t, "d0", 999, NOW + 60_000, "again").expect("room after reclaiming");
    }

    #[test]
    fn a_corrupt_segment_loses_only_its_own_records_not_the_chains_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let roomy = |dir: &Path| {
            let mut o = opts(usize::MAX);
            o.limits = QueueLimits { window: 3, max_msgs: 100, max_bytes: 1 << 20 };
            let sopts = StoreOptions { segment_bytes: SEG, max_bytes: u64::MAX };
            DeviceTable::open(dir, sopts, vec!["a".into(), "b".into()], o, NOW).unwrap()
        };
        let mut t = roomy(dir.path());
        let big = "p".repeat(900); // four records per 4 KiB segment
        for i in 1..=12u64 {
            let id = if i % 2 == 0 { "even" } else { "odd" };
            t.enqueue_to(0, id, i, NOW + 60_000, format!("{i}{big}").as_bytes(), NOW, 0).unwrap();
        }
        t.store.flush_now().unwrap();
        drop(t);
        // Segment 1 holds the two registry records and messages 1 and 2: damage segment 2.
        let seg = dir.path().join("0000000002.seg");
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[3] ^= 0xff;
        std::fs::write(&seg, bytes).unwrap();
        let mut t = roomy(dir.path());
        assert_eq!(t.store.report.bad_segments, 1);
        let nums = |t: &mut DeviceTable, id: &str| -> Vec<u64> {
            let k = t.attach(0, id, 0, 0, 1, NOW, 0).device;
            let mut v = Vec::new();
            loop {
                let got = fill_at(t, k, NOW);
                if got.is_empty() {
                    break v;
                }
                v.extend(got.iter().map(|m| m.2.trim_end_matches('p').parse::<u64>().unwrap()));
                let upto = t.device(k).acked() + 3;
                t.on_ack(k, upto, 0, 0);
            }
        };
        let odd = nums(&mut t, "odd");
        let even = nums(&mut t, "even");
        let lost: Vec<u64> = (1..=12).filter(|i| !odd.contains(i) && !even.contains(i)).collect();
        assert!(!lost.is_empty() && lost.len() <= 4, "only segment 2's records are lost: {lost:?}");
        assert!(odd.contains(&1) && even.contains(&2), "records before the damage are kept: {odd:?} {even:?}");
        assert!(odd.contains(&11) && even.contains(&12), "records after it are kept: {odd:?} {even:?}");
        drop(t);
        // The repaired chains hold without another scan.
        let mut t = roomy(dir.path());
        assert_eq!(t.queued(), 0, "everything found was delivered and acked");
        assert!(t.attach(0, "odd", 0, 0, 1, NOW, 0).pending == 0);
    }

    #[test]
    fn devices_silent_with_nothing_stored_are_forgotten_and_can_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(dir.path());
        push(&mut t, "waiting", 1, NOW + 1_000_000_000, "x").unwrap();
        let gone = attach(&mut t, "gone", 0, 1);
        t.enqueue(gone.device, 2, NOW + 100, b"y", 0).unwrap();
        fill_at(&mut t, gone.device, NOW);
        t.on_ack(gone.device, 1, 0, 0);
        t.detach(gone.device, 1, NOW);
        let online = attach(&mut t, "online", 0, 2).device;
        let day = 86_400_000;
        assert_eq!(t.forget_idle(NOW + day, 2 * day, 100), 0, "not silent long enough");
        assert_eq!(t.forget_idle(NOW + 3 * day, 2 * day, 100), 1);
        assert!(t.find(0, "gone").is_none());
        assert!(t.find(0, "waiting").is_some(), "has a message stored");
        assert!(t.find(0, "online").is_some() && t.device(online).session.is_some());
        assert_eq!(t.stats.forgotten, 1);
        // It comes back knowing where it was: numbering continues after its own acks.
        let back = attach(&mut t, "gone", 1, 3);
        t.enqueue(back.device, 3, NOW + 1000, b"z", 0).unwrap();
        assert_eq!(seqs(&mut t, back.device), [2]);
        drop(t);
        let t = open(dir.path());
        assert!(t.find(0, "gone").is_some(), "registered again, and that was stored");
    }

    #[test]
    fn a_queued_message_reference_is_48_bytes() {
        // The cache budget (`cache_bytes`) counts these; docs/architecture.md names the size.
        assert_eq!(std::mem::size_of::<QueuedMsg>(), 48);
    }

    #[test]
    fn receipts_forget_the_oldest_beyond_their_bound() {
        let mut r = Receipts::new(2);
        let (first, c) = r.add(1);
        c.targeted = 1;
        r.add(2);
        r.add(3);
        assert!(r.get(1).is_none());
        assert!(r.get(3).is_some());
        assert_eq!(r.seq_of(1), NO_RECEIPT);
        assert!(r.at(first).is_none(), "a forgotten receipt's number reaches nothing");
        assert!(r.at(NO_RECEIPT).is_none());
    }

    #[test]
    fn receipts_are_found_by_push_id_and_by_number_through_evictions_and_index_wrap() {
        let cap = 1000;
        let mut r = Receipts::new(cap);
        r.front = u64::from(u32::MAX) - 1500; // the index's 32-bit numbers wrap during the run
                                              // Push ids as shards make them (shard << 48 | counter), from two shards.
        let id = |n: u64| (n % 2) << 48 | n;
        let mut seqs = Vec::new();
        for n in 0..5000u64 {
            let (seq, c) = r.add(id(n));
            c.targeted += 1;
            c.stored += 1;
            seqs.push(seq);
            // Acks come in for pushes a little older than the newest.
            if n >= 10 {
                r.update(seqs[n as usize - 10], |c| {
                    c.delivered += 1;
                    c.stored -= 1;
                });
            }
            // A push's next device on this shard: the same receipt, not a second one.
            let (again, c) = r.add(id(n));
            assert_eq!(again, seq);
            c.targeted += 1;
        }
        assert_eq!(r.ring.len(), cap);
        assert_eq!(r.index.len(), cap);
        for n in 0..5000u64 {
            let want = (n >= 4000).then_some(Counts {
                targeted: 2,
                delivered: u64::from(n < 4990),
                stored: u64::from(n >= 4990),
                expired: 0,
            });
            assert_eq!(r.get(id(n)), want, "push {n}");
            let kept = if n >= 4000 { seqs[n as usize] } else { NO_RECEIPT };
            assert_eq!(r.seq_of(id(n)), kept, "push {n}");
        }
        r.update(seqs[5], |c| c.delivered += 1); // forgotten: nothing to update
        assert!(r.get(id(5)).is_none());
    }
}
