//! A shard: one glommio executor pinned to one CPU, and everything it owns.
//!
//! [`ShardCore`] holds the shard's state in one `RefCell` that only this thread
//! touches (device table, session slab, app-connection slab, session timer wheel,
//! counters), plus per-shard scratch buffers that sessions read into and build writes
//! in, so an idle session owns no buffer. Other shards reach it only through bounded
//! channels: [`Request`]s (socket hand-overs, pushes, receipt queries) on one mesh and
//! [`Reply`]s on another, so a shard waiting to send a request never blocks a reply.
//! No `Mutex` or `RwLock` anywhere: a borrow of the state never spans an `.await`.

use crate::clock::mono_us;
use crate::clock::Clock;
use crate::config::Config;
use crate::config::Durability;
use crate::devices::{Counts, DeviceTable, QueueLimits, TableOptions};
use crate::stats::{CounterRow, Hist, PushKind, PushResult, ShardSnapshot, Stage, KINDS, RESULTS};
use crate::timer::TimerWheel;
use glommio::channels::shared_channel::ConnectedSender;
use ringpush_protocol::ErrorCode;
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use crate::ingress::AppConn;
pub use crate::session::Session;

/// Size of the per-shard read scratch buffer and the write batch target.
pub const SCRATCH: usize = 64 * 1024;
/// Records a compaction looks at per tick (it continues on the next one), so copying a
/// big segment never stalls the shard for long.
pub const COMPACT_SLICE: usize = 4096;
/// Sessions' timer wheel resolution.
pub const TICK: Duration = Duration::from_millis(100);

/// Immutable, process-wide facts every shard reads (never written after start).
pub struct Shared {
    pub cfg: Config,
    /// App id → index into `cfg.apps`.
    pub app_index: HashMap<String, u16>,
    pub clock: Arc<dyn Clock>,
    pub shards: usize,
    pub shutdown: Arc<AtomicBool>,
    /// Every shard accepts connections (set once by the main thread; read by /readyz).
    pub ready: AtomicBool,
    /// Shards whose store partition is recovered.
    pub recovered: AtomicUsize,
    /// The highest push counter in any shard's store partition (each adds its own
    /// before counting itself recovered): every shard's push ids start above it.
    pub push_floor: AtomicU64,
    /// The fleet: which node each device belongs to, and their addresses.
    pub fleet: crate::dispatch::Fleet,
}

impl Shared {
    pub fn new(
        cfg: Config,
        clock: Arc<dyn Clock>,
        shards: usize,
        shutdown: Arc<AtomicBool>,
        fleet: crate::dispatch::Fleet,
    ) -> Self {
        let app_index = cfg.apps.iter().enumerate().map(|(i, a)| (a.id.clone(), i as u16)).collect();
        Shared {
            cfg,
            app_index,
            clock,
            shards,
            shutdown,
            ready: AtomicBool::new(false),
            recovered: AtomicUsize::new(0),
            push_floor: AtomicU64::new(0),
            fleet,
        }
    }

    pub fn secret(&self, app: u16) -> &[u8] {
        self.cfg.apps[app as usize].secret.as_bytes()
    }

    /// Whether every shard's store partition is recovered.
    pub fn all_recovered(&self) -> bool {
        self.recovered.load(Ordering::Acquire) >= self.shards
    }

    /// Where shard `id` keeps its store partition.
    pub fn store_dir(&self, id: usize) -> std::path::PathBuf {
        self.cfg.data_dir.join("store").join(format!("shard-{id}"))
    }

    /// The sizes each shard's store and table work within.
    pub fn table_options(&self) -> (crate::store::StoreOptions, TableOptions) {
        let cfg = &self.cfg;
        let n = self.shards as u64;
        let max_bytes = if cfg.store_max_bytes == 0 { u64::MAX } else { cfg.store_max_bytes / n };
        let sopts = crate::store::StoreOptions { segment_bytes: cfg.segment_bytes as usize, max_bytes };
        let limits = QueueLimits {
            window: cfg.window,
            max_msgs: cfg.max_queued_per_device,
            max_bytes: cfg.max_queued_bytes_per_device,
        };
        let cache_msgs = (cfg.cache_bytes / n / std::mem::size_of::<crate::devices::QueuedMsg>() as u64) as usize;
        let topts = TableOptions {
            limits,
            receipts: cfg.receipts_per_shard,
            cache_msgs,
            latencies: cfg.metrics,
            clock_seqs: self.fleet.is_shared(),
        };
        (sopts, topts)
    }

    pub fn app_ids(&self) -> Vec<Box<str>> {
        self.cfg.apps.iter().map(|a| a.id.as_str().into()).collect()
    }
}

/// Who a push goes to, once routed to an owner shard.
#[derive(Debug)]
pub enum Targets {
    /// One or more device ids owned by the receiving shard.
    Devices(Vec<String>),
    /// Every device of the app the receiving shard knows.
    App,
}

/// The counter in a push id (its low 48 bits; the shard that gave it is above).
pub fn push_counter(push_id: u64) -> u64 {
    push_id & ((1 << 48) - 1)
}

/// Identifies an app connection on its shard across slab-key reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRef {
    pub shard: usize,
    pub key: usize,
    pub gen: u32,
}

/// A push handed to an owner shard.
#[derive(Debug)]
pub struct PushReq {
    pub reply_to: ConnRef,
    pub request_id: u64,
    pub push_id: u64,
    pub app: u16,
    pub expiry_ms: u64,
    pub payload: Arc<[u8]>,
    pub targets: Targets,
}

/// Work sent to an owner shard.
#[derive(Debug)]
pub enum Request {
    /// A device connection whose HELLO verified on the accepting shard.
    HandOff {
        fd: OwnedFd,
        app: u16,
        device: String,
        last_acked: u64,
        cursor: u64,
        /// Bytes the device sent after its HELLO.
        leftover: Vec<u8>,
    },
    Push(PushReq),
    Receipt {
        reply_to: ConnRef,
        request_id: u64,
        push_id: u64,
    },
    /// A metrics scrape on shard `from` wants this shard's snapshot.
    Snapshot {
        from: usize,
        scrape: u64,
    },
}

/// Answers travelling back to the shard that holds the app connection.
#[derive(Debug)]
pub enum Reply {
    PushDone { to: ConnRef, request_id: u64, result: Result<u64, ErrorCode> },
    ReceiptPart { to: ConnRef, request_id: u64, counts: Option<Counts> },
    Snapshot { to: usize, scrape: u64, snap: Box<ShardSnapshot> },
}

/// Counters a shard keeps for its own connections (plain integers: only this shard
/// writes them; a scrape copies them).
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardStats {
    pub device_accepted: u64,
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    /// Verified HELLOs of devices another node of the fleet owns, sent there.
    pub handshakes_redirected: u64,
    pub handed_off: u64,
    /// Unicast and list pushes (or their shares) sent on to the shard that owns the
    /// devices: what a shard-aware app would have sent to that shard directly.
    pub pushes_forwarded: u64,
    pub sessions_closed: u64,
    pub slow_disconnects: u64,
    pub idle_disconnects: u64,
    pub replaced: u64,
    pub app_accepted: u64,
    pub app_handshake_failed: u64,
    /// Pushes by kind and result: `pushes[kind][result]`.
    pub pushes: [[u64; 3]; 3],
    pub device_bytes_in: u64,
    pub device_bytes_out: u64,
    /// Sends to device sockets (one per session per round with something to write).
    pub device_writes: u64,
    pub app_bytes_in: u64,
    pub app_bytes_out: u64,
}

impl ShardStats {
    pub fn count_push(&mut self, kind: PushKind, result: PushResult) {
        self.pushes[kind as usize][result as usize] += 1;
    }

    /// Counters as (metric, labels, value) rows.
    pub fn rows(&self) -> Vec<CounterRow> {
        let mut v = vec![
            ("ringpush_device_connections_accepted_total", vec![], self.device_accepted),
            ("ringpush_handshakes_total", vec![("result", "ok")], self.handshakes_ok),
            ("ringpush_handshakes_total", vec![("result", "failed")], self.handshakes_failed),
            ("ringpush_handshakes_total", vec![("result", "redirected")], self.handshakes_redirected),
            ("ringpush_handoffs_total", vec![], self.handed_off),
            ("ringpush_pushes_forwarded_total", vec![], self.pushes_forwarded),
            ("ringpush_sessions_closed_total", vec![], self.sessions_closed),
            ("ringpush_device_disconnects_total", vec![("reason", "slow_consumer")], self.slow_disconnects),
            ("ringpush_device_disconnects_total", vec![("reason", "idle_timeout")], self.idle_disconnects),
            ("ringpush_device_disconnects_total", vec![("reason", "replaced")], self.replaced),
            ("ringpush_app_connections_accepted_total", vec![], self.app_accepted),
            ("ringpush_app_handshake_failures_total", vec![], self.app_handshake_failed),
            ("ringpush_bytes_total", vec![("direction", "in"), ("peer", "device")], self.device_bytes_in),
            ("ringpush_bytes_total", vec![("direction", "out"), ("peer", "device")], self.device_bytes_out),
            ("ringpush_device_writes_total", vec![], self.device_writes),
            ("ringpush_bytes_total", vec![("direction", "in"), ("peer", "app")], self.app_bytes_in),
            ("ringpush_bytes_total", vec![("direction", "out"), ("peer", "app")], self.app_bytes_out),
        ];
        for (k, kind) in KINDS.iter().enumerate() {
            for (r, result) in RESULTS.iter().enumerate() {
                v.push(("ringpush_pushes_total", vec![("kind", kind), ("result", result)], self.pushes[k][r]));
            }
        }
        v
    }
}

/// Sessions due for the session driver's next round, and the driver's waker.
#[derive(Default)]
pub struct Due {
    pub keys: Vec<usize>,
    pub driver: Option<std::task::Waker>,
}

impl Due {
    /// Marks session `key` due (once) and wakes the driver.
    pub fn kick(&mut self, sessions: &mut Slab<Session>, key: usize) {
        if let Some(s) = sessions.get_mut(key) {
            if !s.queued {
                s.queued = true;
                self.keys.push(key);
            }
            if let Some(w) = self.driver.take() {
                w.wake();
            }
        }
    }
}

/// The shard's device listening socket, accepted from through the device ring.
#[derive(Default)]
pub struct Listener {
    pub fd: Option<OwnedFd>,
    /// A multishot accept is armed on it.
    pub armed: bool,
}

pub struct ShardState {
    pub table: DeviceTable,
    pub sessions: Slab<Session>,
    /// Device connections in their handshake.
    pub handshakes: Slab<crate::session::Pending>,
    pub due: Due,
    pub apps: Slab<AppConn>,
    /// (session key, generation) armed at the session's next deadline.
    pub wheel: TimerWheel<(usize, u32)>,
    pub stats: ShardStats,
    /// Device connection accepted → WELCOME queued.
    pub handshake_lat: Hist,
    /// PUSH decoded → reply queued.
    pub push_lat: Hist,
    /// A push share written to this shard's store (all its records).
    pub append_lat: Hist,
    /// One flush (`fdatasync` of the segments written since the last).
    pub flush_lat: Hist,
    /// Replies waiting for a flush: the append count the flush must cover, the reply.
    pub commits: std::collections::VecDeque<(u64, Reply)>,
    /// Wakes the flusher task.
    pub flusher: Option<std::task::Waker>,
    /// Dead segments wait for a flush before they are deleted.
    pub reclaim_due: bool,
    /// Next store maintenance (compaction, reclaiming), unix ms.
    pub maint_at: u64,
    pub next_gen: u32,
    next_push: u64,
    /// Scrapes this shard is gathering: scrape id → snapshots so far, and the waiter.
    pub scrapes: HashMap<u64, (Vec<ShardSnapshot>, Option<std::task::Waker>)>,
    next_scrape: u64,
}

impl ShardState {
    pub fn gen(&mut self) -> u32 {
        self.next_gen = self.next_gen.wrapping_add(1);
        self.next_gen
    }
}

pub struct ShardCore {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub state: RefCell<ShardState>,
    /// Read scratch: sessions read into it and keep only a partial frame, if any.
    pub scratch: RefCell<Vec<u8>>,
    /// Write scratch: the session driver's arena, and app connections' replies.
    pub wbuf: RefCell<Vec<u8>>,
    /// The ring device sessions are served through.
    pub ring: RefCell<crate::uring::SessionRing>,
    pub listener: RefCell<Listener>,
    /// `requests[s]` sends to shard `s` (None for this shard).
    pub requests: Vec<Option<Rc<ConnectedSender<Request>>>>,
    pub replies: Vec<Option<Rc<ConnectedSender<Reply>>>>,
    pub draining: Cell<bool>,
    /// The fleet's node health and dispatch counters (kept by shard 0, which serves HTTP).
    pub health: RefCell<crate::dispatch::Health>,
}

impl ShardCore {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        requests: Vec<Option<Rc<ConnectedSender<Request>>>>,
        replies: Vec<Option<Rc<ConnectedSender<Reply>>>>,
        ring: crate::uring::SessionRing,
    ) -> Self {
        let cfg = &shared.cfg;
        let now = shared.clock.now_ms();
        let (_, topts) = shared.table_options();
        let health = crate::dispatch::Health::new(shared.fleet.nodes.len(), &cfg.fleet);
        let state = ShardState {
            // Replaced by the recovered table before any connection is accepted.
            table: DeviceTable::new(shared.app_ids(), topts, now),
            sessions: Slab::new(),
            handshakes: Slab::new(),
            due: Due::default(),
            apps: Slab::new(),
            wheel: TimerWheel::new(1024, TICK.as_millis() as u64, now),
            stats: ShardStats::default(),
            handshake_lat: Hist::new(cfg.metrics),
            push_lat: Hist::new(cfg.metrics),
            append_lat: Hist::new(cfg.metrics),
            flush_lat: Hist::new(cfg.metrics),
            commits: std::collections::VecDeque::new(),
            flusher: None,
            reclaim_due: false,
            maint_at: 0,
            next_gen: 0,
            next_push: 0,
            scrapes: HashMap::new(),
            next_scrape: 0,
        };
        ShardCore {
            id,
            shared,
            state: RefCell::new(state),
            scratch: RefCell::new(vec![0; SCRATCH]),
            wbuf: RefCell::new(Vec::with_capacity(SCRATCH * 2)),
            ring: RefCell::new(ring),
            listener: RefCell::new(Listener::default()),
            requests,
            replies,
            draining: Cell::new(false),
            health: RefCell::new(health),
        }
    }

    pub fn cfg(&self) -> &Config {
        &self.shared.cfg
    }

    pub fn now_ms(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// Push ids from here on count up from above `floor` (the highest counter of any
    /// push id still in the store), so a stored message's id never names a new push.
    pub fn count_push_ids_above(&self, floor: u64) {
        let mut st = self.state.borrow_mut();
        st.next_push = st.next_push.max(floor);
    }

    /// A push id unique in this process and among those still stored: shard in the top
    /// 16 bits, a counter below.
    pub fn next_push_id(&self) -> u64 {
        let mut st = self.state.borrow_mut();
        st.next_push += 1;
        (self.id as u64) << 48 | push_counter(st.next_push)
    }

    /// Applies a push to this shard's devices (stored before this returns; flushed
    /// per the durability policy by the flusher); wakes the sessions that got mail.
    pub fn apply_push(&self, p: &PushReq) -> Result<u64, ErrorCode> {
        let now_us = mono_us();
        let now_ms = self.now_ms();
        let st = &mut *self.state.borrow_mut();
        let ShardState { table, sessions, append_lat, due, .. } = st;
        let mut wake = |key: usize| due.kick(sessions, key);
        let result = match &p.targets {
            Targets::App => {
                let n = table.broadcast(p.app, p.push_id, p.expiry_ms, &p.payload, now_ms, now_us);
                if n.is_ok() {
                    table.app_sessions(p.app).for_each(&mut wake);
                }
                n
            }
            Targets::Devices(ids) => {
                let (mut ok, mut err) = (0u64, None);
                for id in ids {
                    match table.enqueue_to(p.app, id, p.push_id, p.expiry_ms, &p.payload, now_ms, now_us) {
                        Ok(session) => {
                            ok += 1;
                            session.into_iter().for_each(&mut wake);
                        }
                        Err(e) => err = Some(e),
                    }
                }
                match (ok, err) {
                    (0, Some(e)) => Err(e),
                    _ => Ok(ok),
                }
            }
        };
        append_lat.record(mono_us().saturating_sub(now_us));
        result
    }

    /// Whether an accepted push must wait for a flush before its reply.
    pub fn needs_flush(&self) -> bool {
        self.cfg().durability != Durability::Memory
    }

    /// Sends a push's reply once what it stored is flushed (at once if it failed, or
    /// with `memory` durability).
    pub fn commit(self: &Rc<Self>, r: Reply) {
        let ok = matches!(r, Reply::PushDone { result: Ok(_), .. });
        if !ok || !self.needs_flush() {
            return self.reply(r);
        }
        let mut st = self.state.borrow_mut();
        let upto = st.table.store.appended();
        st.commits.push_back((upto, r));
        if let Some(w) = st.flusher.take() {
            w.wake();
        }
    }

    /// The flusher: one `fdatasync` round covers every push stored before it began
    /// (group commit), then their replies go out and dead segments are deleted. Runs
    /// as a task on the shard; the blocking `fdatasync` runs on glommio's blocking
    /// thread so the shard keeps serving.
    pub async fn flusher(self: Rc<Self>) {
        let batched = self.cfg().durability == Durability::Batched;
        let window = self.cfg().group_commit;
        loop {
            futures_lite::future::poll_fn(|cx| {
                let mut st = self.state.borrow_mut();
                if !st.commits.is_empty() || st.reclaim_due {
                    std::task::Poll::Ready(())
                } else {
                    st.flusher = Some(cx.waker().clone());
                    std::task::Poll::Pending
                }
            })
            .await;
            if batched && !window.is_zero() {
                glommio::timer::sleep(window).await;
            }
            let (upto, staged, dead) = {
                let st = &mut *self.state.borrow_mut();
                st.reclaim_due = false;
                let dead = st.table.store.dead_segments();
                // The flush covers every push stored so far; if writing the staged
                // records fails, it fails them all.
                match st.table.store.flush_files() {
                    Ok((upto, files)) => (upto, Ok(files), dead),
                    Err(e) => (st.table.store.appended(), Err(e.to_string()), Vec::new()),
                }
            };
            let started = mono_us();
            let res = match staged {
                Ok(files) => glommio::executor()
                    .spawn_blocking(move || files.iter().try_for_each(|f| f.sync_data()))
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            let ready: Vec<Reply> = {
                let st = &mut *self.state.borrow_mut();
                st.flush_lat.record(mono_us().saturating_sub(started));
                if let Err(e) = &res {
                    st.table.stats.store_errors += 1;
                    tracing::error!(shard = self.id, "store flush failed: {e}; the pushes it covered are refused");
                } else if let Err(e) = st.table.store.delete(&dead) {
                    tracing::error!(shard = self.id, "{e}");
                }
                let n = st.commits.iter().take_while(|(a, _)| *a <= upto).count();
                st.commits.drain(..n).map(|(_, r)| r).collect()
            };
            for mut r in ready {
                if res.is_err() {
                    if let Reply::PushDone { result, .. } = &mut r {
                        *result = Err(ErrorCode::INTERNAL);
                    }
                }
                self.reply(r);
            }
        }
    }

    /// Marks sessions due for the session driver.
    pub fn wake_sessions(&self, keys: &[usize]) {
        let st = &mut *self.state.borrow_mut();
        for &k in keys {
            st.due.kick(&mut st.sessions, k);
        }
    }

    /// Handles one request from another shard (or from this one).
    pub fn handle_request(self: &Rc<Self>, req: Request) {
        match req {
            Request::HandOff { fd, app, device, last_acked, cursor, leftover } => {
                crate::session::attach(self, fd, app, &device, (last_acked, cursor), &leftover);
            }
            Request::Push(p) => {
                let result = self.apply_push(&p);
                self.commit(Reply::PushDone { to: p.reply_to, request_id: p.request_id, result });
            }
            Request::Receipt { reply_to, request_id, push_id } => {
                let counts = self.state.borrow().table.receipt(push_id);
                self.reply(Reply::ReceiptPart { to: reply_to, request_id, counts });
            }
            Request::Snapshot { from, scrape } => {
                let snap = Box::new(self.snapshot());
                self.reply(Reply::Snapshot { to: from, scrape, snap });
            }
        }
    }

    /// Handles a reply addressed to this shard.
    pub fn handle_reply(&self, r: Reply) {
        match r {
            Reply::Snapshot { scrape, snap, .. } => {
                let mut st = self.state.borrow_mut();
                if let Some((snaps, waker)) = st.scrapes.get_mut(&scrape) {
                    snaps.push(*snap);
                    if let Some(w) = waker {
                        w.wake_by_ref();
                    }
                }
            }
            other => crate::ingress::handle_reply(self, other),
        }
    }

    /// This shard's counters, gauges and histograms, as of now.
    pub fn snapshot(&self) -> ShardSnapshot {
        let st = self.state.borrow();
        let mut counters = st.stats.rows();
        counters.extend(st.table.stats.rows());
        let hists = vec![
            (Stage::Write, st.table.write_lat.clone()),
            (Stage::Ack, st.table.ack_lat.clone()),
            (Stage::Handshake, st.handshake_lat.clone()),
            (Stage::Push, st.push_lat.clone()),
            (Stage::Append, st.append_lat.clone()),
            (Stage::Flush, st.flush_lat.clone()),
        ];
        let store = &st.table.store;
        counters.extend(store.stats.rows());
        let r = &store.report;
        let gauges = vec![
            ("ringpush_store_bytes", store.disk_bytes()),
            ("ringpush_store_live_bytes", store.live_bytes()),
            ("ringpush_store_segments", store.segments() as u64),
            ("ringpush_broadcasts_stored", st.table.broadcasts_kept()),
            ("ringpush_cache_messages", st.table.hot_msgs() as u64),
            ("ringpush_store_recovery_damaged_bytes", r.truncated_bytes + r.skipped_bytes),
        ];
        ShardSnapshot {
            shard: self.id,
            sessions: st.sessions.len() as u64,
            app_connections: st.apps.len() as u64,
            devices: st.table.len() as u64,
            queued_messages: st.table.queued(),
            gauges,
            counters,
            latency_us: hists.iter().map(|(s, h)| (s.key(), h.summary())).collect(),
            hists,
        }
    }

    /// Gathers every shard's snapshot (map-reduce over the request mesh), this one's
    /// first. Shards that do not answer within a second are left out.
    pub async fn gather(self: &Rc<Self>) -> Vec<ShardSnapshot> {
        let local = self.snapshot();
        let id = {
            let mut st = self.state.borrow_mut();
            st.next_scrape += 1;
            let id = st.next_scrape;
            st.scrapes.insert(id, (vec![local], None));
            id
        };
        let mut asked = 1;
        for tx in self.requests.iter().flatten() {
            let req = Request::Snapshot { from: self.id, scrape: id };
            if tx.send(req).await.is_ok() {
                asked += 1;
            }
        }
        let wait = futures_lite::future::poll_fn(|cx| {
            let mut st = self.state.borrow_mut();
            let (snaps, waker) = st.scrapes.get_mut(&id).expect("scrape registered");
            if snaps.len() >= asked {
                std::task::Poll::Ready(())
            } else {
                *waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        });
        let _ = glommio::timer::timeout(Duration::from_secs(1), async {
            wait.await;
            Ok(())
        })
        .await;
        let removed = self.state.borrow_mut().scrapes.remove(&id);
        let mut snaps = removed.map(|(s, _)| s).unwrap_or_default();
        snaps.sort_by_key(|s| s.shard);
        snaps
    }

    /// Sends a reply to the shard holding the app connection, or applies it here.
    pub fn reply(self: &Rc<Self>, r: Reply) {
        let to = match &r {
            Reply::PushDone { to, .. } | Reply::ReceiptPart { to, .. } => to.shard,
            Reply::Snapshot { to, .. } => *to,
        };
        match &self.replies[to] {
            None => self.handle_reply(r),
            Some(tx) => {
                if let Err(e) = tx.try_send(r) {
                    // The reply channel is full: wait for room in a task. Replies are
                    // bounded by the requests in flight, which are bounded per app.
                    let r = match e {
                        glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(r)) => r,
                        other => {
                            tracing::warn!(shard = self.id, "reply to shard {to} lost: {other}");
                            return;
                        }
                    };
                    let tx = Rc::clone(tx);
                    glommio::spawn_local(async move {
                        let _ = tx.send(r).await;
                    })
                    .detach();
                }
            }
        }
    }

    /// Starts accepting device connections on `fd` through the device ring. Accepted
    /// sockets inherit TCP_NODELAY from it.
    pub fn start_accepting(&self, fd: OwnedFd) {
        if let Err(e) = socket2::SockRef::from(&fd).set_nodelay(true) {
            tracing::warn!(shard = self.id, "TCP_NODELAY on the device listener: {e}");
        }
        *self.listener.borrow_mut() = Listener { fd: Some(fd), armed: false };
        self.arm_accept();
    }

    /// Arms the multishot accept unless it is armed, shutting down, or the listener is
    /// closed.
    fn arm_accept(&self) {
        let mut l = self.listener.borrow_mut();
        if l.armed || self.draining.get() {
            return;
        }
        if let Some(fd) = &l.fd {
            let mut ring = self.ring.borrow_mut();
            ring.arm_accept(std::os::fd::AsRawFd::as_raw_fd(fd));
            ring.submit();
            l.armed = true;
        }
    }

    /// Stops accepting: stops the socket listening (at once, though the ring's accept
    /// holds it until cancelled), cancels the accept, then closes the socket.
    fn stop_accepting(&self) {
        let mut l = self.listener.borrow_mut();
        if let Some(fd) = &l.fd {
            crate::server::stop_listening(fd);
        }
        let mut ring = self.ring.borrow_mut();
        ring.cancel_op(crate::uring::Op::Accept, 0, 0);
        ring.submit();
        l.armed = false;
        l.fd = None;
    }

    /// Periodic work: expiry, session deadlines, shutdown progress.
    pub fn tick(self: &Rc<Self>) {
        let now = self.now_ms();
        // The session driver sees what completes during its rounds by itself (the
        // eventfd is quiet then, see `session::round`); should a completion posted from
        // another CPU slip past its last look, this is the latest it is picked up.
        if self.ring.borrow_mut().has_completions() {
            if let Some(w) = self.state.borrow_mut().due.driver.take() {
                w.wake();
            }
        }
        crate::session::expire_handshakes(self, now);
        self.arm_accept();
        let mut fired = Vec::new();
        let mut wake = Vec::new();
        {
            let st = &mut *self.state.borrow_mut();
            st.table.expire(now);
            if st.table.compacting() {
                st.table.compact(0.5, now, COMPACT_SLICE);
            }
            if now >= st.maint_at {
                st.maint_at = now + 1000;
                self.maintain_store(st, now);
            }
            st.wheel.advance(now, &mut fired);
            let hb = self.cfg().heartbeat.as_millis() as u64;
            let slow = self.cfg().slow_device_timeout.as_millis() as u64;
            for (key, gen) in fired.drain(..) {
                let Some(s) = st.sessions.get_mut(key).filter(|s| s.gen == gen) else {
                    continue;
                };
                let idle_at = s.last_seen_ms + 2 * hb;
                let slow_at = if s.blocked_since_ms > 0 { s.blocked_since_ms + slow } else { u64::MAX };
                if slow_at <= now {
                    s.kill = true;
                    st.stats.slow_disconnects += 1;
                    tracing::info!(shard = self.id, "disconnecting a slow device (no bytes accepted for {slow} ms)");
                    wake.push(key);
                } else if idle_at <= now && s.close.is_none() {
                    s.close = Some(crate::session::Close::Bye(ErrorCode::IDLE_TIMEOUT));
                    st.stats.idle_disconnects += 1;
                    wake.push(key);
                    st.wheel.insert((key, gen), now + slow);
                } else {
                    st.wheel.insert((key, gen), idle_at.min(slow_at));
                }
            }
        }
        self.wake_sessions(&wake);
    }

    /// Once a second: start compacting the emptiest old segment when more than two
    /// exist (ticks continue it a slice at a time), and delete segments nothing needs
    /// any more (after a flush, unless `memory`).
    fn maintain_store(&self, st: &mut ShardState, now: u64) {
        if !st.table.compacting() && st.table.store.segments() > 2 {
            st.table.compact(0.5, now, COMPACT_SLICE);
        }
        st.table.forget_idle(now, self.cfg().max_ttl.as_millis() as u64, 4096);
        let dead = st.table.store.dead_segments();
        if dead.is_empty() {
            return;
        }
        if self.needs_flush() {
            // The flusher deletes them after a flush (it lists them again then).
            st.reclaim_due = true;
            if let Some(w) = st.flusher.take() {
                w.wake();
            }
        } else {
            if let Err(e) = st.table.store.delete(&dead) {
                tracing::error!(shard = self.id, "{e}");
            }
        }
    }

    /// Flushes the store on this thread (at shutdown).
    pub fn flush_store(&self) {
        if let Err(e) = self.state.borrow_mut().table.store.flush_now() {
            tracing::error!(shard = self.id, "final store flush failed: {e}");
        }
    }

    /// Starts an orderly shutdown: BYE to every device, no new requests from apps.
    pub fn begin_shutdown(self: &Rc<Self>) {
        self.draining.set(true);
        self.stop_accepting();
        let keys: Vec<usize> = {
            let st = &mut *self.state.borrow_mut();
            for (_, s) in st.sessions.iter_mut() {
                s.close.get_or_insert(crate::session::Close::Bye(ErrorCode::SHUTTING_DOWN));
            }
            for (_, a) in st.apps.iter_mut() {
                a.draining = true;
                if let Some(w) = &a.waker {
                    w.wake_by_ref();
                }
            }
            st.sessions.iter().map(|(k, _)| k).collect()
        };
        self.wake_sessions(&keys);
    }

    /// True once every session and app connection of this shard has closed.
    pub fn drained(&self) -> bool {
        let st = self.state.borrow();
        st.sessions.is_empty() && st.apps.is_empty()
    }

    pub fn shutdown_requested(&self) -> bool {
        self.shared.shutdown.load(Ordering::Relaxed)
    }
}
