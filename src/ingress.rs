//! App connections: authentication, pipelined PUSH and RECEIPT requests, replies.
//!
//! Runs on: whichever shard accepted the app connection (the ingress shard). A push
//! is split by owner shard: the ingress sends the remote shares as [`Request::Push`]
//! over bounded channels and applies its own share, directly while the read has had no
//! remote shares, else once every request of the read has gone out, so the other
//! shards get a burst together (a burst of broadcasts then reaches each of their
//! devices in one write, as it does here). ACCEPTED goes
//! back only when every owner has taken the message ([`Reply::PushDone`]). If the
//! first owner's channel is full the app gets BUSY and nothing was taken; once one
//! owner has taken a push, the remaining shares wait for channel room instead, so a
//! push is never half-applied and then refused.

use crate::clock::mono_us;
use crate::devices::Counts;
use crate::routing::shard_for;
use crate::session::{
    find_app, linger_close, park, read_handshake, reject, server_preamble, yield_now, HandshakeError, POLL_BUDGET,
};
use crate::shard::{ConnRef, PushReq, Reply, Request, ShardCore, Targets, SCRATCH};
use crate::stats::{PushKind, PushResult};
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use glommio::{GlommioError, ResourceType};
use ringpush_protocol::app::{AppFrame, AuthOk, Push, Rejected, Target};
use ringpush_protocol::{token, ErrorCode, ErrorFrame, Limits, Role};
use std::collections::HashMap;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Unread replies an app may leave with us before we stop reading its requests.
const MAX_APP_OUT: usize = 1 << 20;
/// Milliseconds an app is told to wait after BUSY.
const RETRY_AFTER_MS: u32 = 10;

/// A request waiting for owner shards.
#[derive(Debug)]
pub struct Pending {
    remaining: u32,
    push_id: u64,
    /// A RECEIPT query rather than a PUSH.
    receipt: bool,
    /// PUSH: some owner took the message.
    ok: bool,
    err: Option<ErrorCode>,
    /// RECEIPT: sums over shards, and whether any shard knew the push.
    counts: Counts,
    known: bool,
    /// PUSH: its kind and when it was decoded, for counters and latency.
    kind: PushKind,
    started_us: u64,
}

/// One authenticated app connection, in its shard's slab.
pub struct AppConn {
    pub gen: u32,
    pub app: u16,
    pub waker: Option<std::task::Waker>,
    /// Replies not yet accepted by the socket.
    pub out: Vec<u8>,
    /// A partly received request.
    pub inbuf: Vec<u8>,
    /// By request id (the app's choice: a keyed hash, cheaper than SipHash per push).
    pub pending: HashMap<u64, Pending, ahash::RandomState>,
    /// Shutting down: read no more, finish what is in flight.
    pub draining: bool,
    pub close: Option<(ErrorCode, &'static str)>,
    final_sent: bool,
}

/// Authenticates a new app connection, then serves it.
pub async fn handshake(core: Rc<ShardCore>, mut stream: TcpStream) {
    let limits = Limits { max_frame: core.cfg().max_app_frame, max_targets: core.cfg().max_targets };
    let c = Rc::clone(&core);
    let verify = |bytes: &[u8]| -> Result<Option<(u16, usize)>, HandshakeError> {
        let Some((frame, used)) = AppFrame::decode(bytes, &limits)? else {
            return Ok(None);
        };
        let AppFrame::Auth(a) = frame else {
            return Err(HandshakeError::new(ErrorCode::UNEXPECTED_FRAME, "first frame must be AUTH"));
        };
        let app = find_app(&c, a.app_id)?;
        let skew = c.cfg().auth_skew.as_millis() as u64;
        token::verify_auth(c.shared.secret(app), a.app_id, a.timestamp_ms, &a.proof, c.now_ms(), skew)?;
        Ok(Some((app, used)))
    };
    let res = read_handshake(&core, &mut stream, Role::App, limits.max_frame, verify).await;
    let (app, leftover) = match res {
        Ok(v) => v,
        Err(e) => {
            core.state.borrow_mut().stats.app_handshake_failed += 1;
            tracing::info!(shard = core.id, code = %e.code, "app handshake failed: {}", e.what);
            return reject(stream, Role::App, e).await;
        }
    };
    if core.draining.get() {
        let e = HandshakeError::new(ErrorCode::SHUTTING_DOWN, "server shutting down");
        return reject(stream, Role::App, e).await;
    }
    let key = {
        let st = &mut *core.state.borrow_mut();
        st.stats.app_accepted += 1;
        let gen = st.gen();
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&server_preamble(Role::App));
        AppFrame::AuthOk(AuthOk {
            max_frame: limits.max_frame,
            max_targets: limits.max_targets,
            server_time_ms: core.now_ms(),
            shard: core.id as u16,
            shards: core.shared.shards as u16,
        })
        .encode(&mut out);
        st.apps.insert(AppConn {
            gen,
            app,
            waker: None,
            out,
            inbuf: Vec::new(),
            pending: HashMap::default(),
            draining: false,
            close: None,
            final_sent: false,
        })
    };
    tracing::debug!(shard = core.id, app = %core.cfg().apps[app as usize].id, "app connected");
    if !leftover.is_empty() {
        on_app_bytes(&core, key, &leftover);
    }
    let graceful = futures_lite::future::poll_fn(|cx| poll_app(&core, key, &mut stream, cx)).await;
    core.state.borrow_mut().apps.remove(key);
    if graceful {
        linger_close(&mut stream, &[]).await;
    }
}

fn conn_ref(core: &ShardCore, key: usize) -> ConnRef {
    ConnRef { shard: core.id, key, gen: core.state.borrow().apps[key].gen }
}

/// Appends a reply frame to the connection's output.
fn send(core: &ShardCore, key: usize, frame: AppFrame<'_>) {
    let mut st = core.state.borrow_mut();
    if let Some(c) = st.apps.get_mut(key) {
        frame.encode(&mut c.out);
        if let Some(w) = &c.waker {
            w.wake_by_ref();
        }
    }
}

fn rejected(core: &ShardCore, key: usize, request_id: u64, code: ErrorCode, reason: &str) {
    send(core, key, AppFrame::Rejected(Rejected { request_id, code, reason }));
}

/// Sends the reply to a PUSH, counting it by kind and result and timing it.
fn push_reply(core: &ShardCore, key: usize, kind: PushKind, started_us: u64, frame: AppFrame<'_>) {
    let result = match frame {
        AppFrame::Accepted { .. } => PushResult::Accepted,
        AppFrame::Busy { .. } => PushResult::Busy,
        _ => PushResult::Rejected,
    };
    {
        let st = &mut *core.state.borrow_mut();
        st.stats.count_push(kind, result);
        st.push_lat.record(mono_us().saturating_sub(started_us));
    }
    send(core, key, frame);
}

fn busy(request_id: u64) -> AppFrame<'static> {
    AppFrame::Busy { request_id, retry_after_ms: RETRY_AFTER_MS }
}

/// Whether a request may start on this connection.
enum Admit {
    Yes,
    /// Too many requests in flight: BUSY.
    Busy,
    /// The request id is already in flight.
    Duplicate,
}

fn on_app_bytes(core: &Rc<ShardCore>, key: usize, data: &[u8]) {
    let limits = Limits { max_frame: core.cfg().max_app_frame, max_targets: core.cfg().max_targets };
    let mut held = std::mem::take(&mut core.state.borrow_mut().apps[key].inbuf);
    let buf: &[u8] = if held.is_empty() {
        data
    } else {
        held.extend_from_slice(data);
        &held
    };
    let mut pos = 0;
    let mut local = Vec::new();
    loop {
        if core.state.borrow().apps[key].close.is_some() {
            break;
        }
        match AppFrame::decode(&buf[pos..], &limits) {
            Ok(Some((frame, n))) => {
                pos += n;
                match frame {
                    AppFrame::Push(p) => handle_push(core, key, &p, &mut local),
                    AppFrame::ReceiptQuery { request_id, push_id } => handle_receipt(core, key, request_id, push_id),
                    AppFrame::Ping(nonce) => send(core, key, AppFrame::Pong(nonce)),
                    AppFrame::Pong(_) => {}
                    _ => {
                        core.state.borrow_mut().apps[key].close =
                            Some((ErrorCode::UNEXPECTED_FRAME, "unexpected frame on an app connection"))
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::info!(shard = core.id, code = %e.code, "closing app connection: {}", e.what);
                core.state.borrow_mut().apps[key].close = Some((e.code, e.what));
            }
        }
    }
    let rest = &buf[pos..];
    {
        let mut st = core.state.borrow_mut();
        let c = &mut st.apps[key];
        c.inbuf = if rest.is_empty() || c.close.is_some() { Vec::new() } else { rest.to_vec() };
    }
    // This shard's shares, in the order they came, each answered like a remote one.
    for req in local {
        core.handle_request(Request::Push(req));
    }
}

/// Refuses a request id already in flight or a connection over its in-flight cap.
fn admit(core: &ShardCore, key: usize, request_id: u64) -> Admit {
    let st = core.state.borrow();
    let c = &st.apps[key];
    if c.pending.contains_key(&request_id) {
        Admit::Duplicate
    } else if c.pending.len() >= core.cfg().max_inflight_per_app as usize {
        Admit::Busy
    } else {
        Admit::Yes
    }
}

const DUPLICATE: &str = "request id already in flight";

/// Admits one PUSH and sends its remote shares. Its share for this shard is applied at
/// once while no request of this read had remote shares (a shard-aware app's unicasts
/// never do); after that it goes to `local`, to be applied once the read's other
/// requests have gone out (its pending entry counts it as an owner still to answer).
fn handle_push(core: &Rc<ShardCore>, key: usize, p: &Push<'_>, local: &mut Vec<PushReq>) {
    let started_us = mono_us();
    let kind = match p.target {
        Target::Device(_) => PushKind::Unicast,
        Target::List(_) => PushKind::Multicast,
        Target::App => PushKind::Broadcast,
    };
    let reject = |code: ErrorCode, reason: &str| {
        push_reply(core, key, kind, started_us, AppFrame::Rejected(Rejected { request_id: p.request_id, code, reason }))
    };
    let cfg = core.cfg();
    let ttl_ms = match p.ttl_secs {
        0 => cfg.default_ttl.as_millis() as u64,
        s => s as u64 * 1000,
    };
    if ttl_ms > cfg.max_ttl.as_millis() as u64 {
        return reject(ErrorCode::BAD_TTL, "ttl above the server maximum");
    }
    if p.flags != 0 {
        return reject(ErrorCode::BAD_FRAME, "unknown push flags");
    }
    let app = core.state.borrow().apps[key].app;
    let app_id = &cfg.apps[app as usize].id;
    // A device another node of the fleet owns: its messages must be stored there.
    let fleet = &core.shared.fleet;
    if fleet.is_shared() {
        let foreign = match p.target {
            Target::Device(d) => fleet.elsewhere(app_id, d),
            Target::List(list) => list.iter().find_map(|d| fleet.elsewhere(app_id, d)),
            Target::App => None,
        };
        if let Some(node) = foreign {
            return reject(ErrorCode::REDIRECT, &node.app_addr);
        }
    }
    match admit(core, key, p.request_id) {
        Admit::Yes => {}
        Admit::Busy => return push_reply(core, key, kind, started_us, busy(p.request_id)),
        Admit::Duplicate => return reject(ErrorCode::UNEXPECTED_FRAME, DUPLICATE),
    }
    let n = core.shared.shards;
    let mut groups: Vec<(usize, Targets)> = match p.target {
        Target::Device(d) => vec![(shard_for(app_id, d, n), Targets::Devices(vec![d.to_string()]))],
        Target::List(list) => {
            let mut by_shard: Vec<Vec<String>> = vec![Vec::new(); n];
            for d in list.iter() {
                by_shard[shard_for(app_id, d, n)].push(d.to_string());
            }
            by_shard
                .into_iter()
                .enumerate()
                .filter(|(_, v)| !v.is_empty())
                .map(|(s, v)| (s, Targets::Devices(v)))
                .collect()
        }
        Target::App => (0..n).map(|s| (s, Targets::App)).collect(),
    };
    // Remote shares first, so a BUSY can only come before anything was taken.
    groups.sort_by_key(|(s, _)| *s == core.id);
    let reply_to = conn_ref(core, key);
    let push_id = core.next_push_id();
    let payload: Arc<[u8]> = Arc::from(p.payload);
    let expiry_ms = core.now_ms() + ttl_ms;
    let mut pending = Pending {
        remaining: 0,
        push_id,
        receipt: false,
        ok: false,
        err: None,
        counts: Counts::default(),
        known: false,
        kind,
        started_us,
    };
    for (i, (shard, targets)) in groups.into_iter().enumerate() {
        let req = PushReq {
            reply_to,
            request_id: p.request_id,
            push_id,
            app,
            expiry_ms,
            payload: Arc::clone(&payload),
            targets,
        };
        let Some(tx) = &core.requests[shard] else {
            if i > 0 || !local.is_empty() {
                // Remote shares of this read went out: apply this one after them all,
                // and after the local shares deferred before it, in order.
                pending.remaining += 1;
                local.push(req);
                continue;
            }
            match core.apply_push(&req) {
                // The reply waits for the flush, which runs after this request is
                // registered as pending.
                Ok(n) if core.needs_flush() => {
                    pending.remaining += 1;
                    core.commit(Reply::PushDone { to: reply_to, request_id: p.request_id, result: Ok(n) });
                }
                Ok(_) => pending.ok = true,
                Err(e) => pending.err = Some(e),
            }
            continue;
        };
        let forwarded = || {
            if kind != PushKind::Broadcast {
                core.state.borrow_mut().stats.pushes_forwarded += 1;
            }
        };
        match tx.try_send(Request::Push(req)) {
            Ok(()) => {
                forwarded();
                pending.remaining += 1;
            }
            Err(GlommioError::WouldBlock(ResourceType::Channel(req))) => {
                if i == 0 {
                    return push_reply(core, key, kind, started_us, busy(p.request_id));
                }
                forwarded();
                pending.remaining += 1;
                let (tx, c, request_id) = (Rc::clone(tx), Rc::clone(core), p.request_id);
                glommio::spawn_local(async move {
                    if tx.send(req).await.is_err() {
                        let r = Reply::PushDone { to: reply_to, request_id, result: Err(ErrorCode::SHUTTING_DOWN) };
                        handle_reply(&c, r);
                    }
                })
                .detach();
            }
            Err(_) => pending.err = Some(ErrorCode::SHUTTING_DOWN),
        }
    }
    finish_or_wait(core, key, p.request_id, pending);
}

fn handle_receipt(core: &Rc<ShardCore>, key: usize, request_id: u64, push_id: u64) {
    match admit(core, key, request_id) {
        Admit::Yes => {}
        Admit::Busy => return send(core, key, busy(request_id)),
        Admit::Duplicate => return rejected(core, key, request_id, ErrorCode::UNEXPECTED_FRAME, DUPLICATE),
    }
    let reply_to = conn_ref(core, key);
    let mut pending = Pending {
        remaining: 0,
        push_id,
        receipt: true,
        ok: false,
        err: None,
        counts: Counts::default(),
        known: false,
        kind: PushKind::Unicast,
        started_us: 0,
    };
    if let Some(c) = core.state.borrow().table.receipt(push_id) {
        pending.counts.add(&c);
        pending.known = true;
    }
    for tx in core.requests.iter().flatten() {
        let req = Request::Receipt { reply_to, request_id, push_id };
        match tx.try_send(req) {
            Ok(()) => pending.remaining += 1,
            Err(GlommioError::WouldBlock(ResourceType::Channel(req))) => {
                pending.remaining += 1;
                let (tx, c) = (Rc::clone(tx), Rc::clone(core));
                glommio::spawn_local(async move {
                    if tx.send(req).await.is_err() {
                        handle_reply(&c, Reply::ReceiptPart { to: reply_to, request_id, counts: None });
                    }
                })
                .detach();
            }
            Err(_) => {}
        }
    }
    finish_or_wait(core, key, request_id, pending);
}

fn finish_or_wait(core: &ShardCore, key: usize, request_id: u64, pending: Pending) {
    if pending.remaining == 0 {
        answer(core, key, request_id, &pending);
    } else {
        core.state.borrow_mut().apps[key].pending.insert(request_id, pending);
    }
}

fn answer(core: &ShardCore, key: usize, request_id: u64, p: &Pending) {
    if p.receipt {
        if p.known {
            send(core, key, AppFrame::Receipt(p.counts.receipt(request_id, p.push_id)));
        } else {
            send(
                core,
                key,
                AppFrame::Rejected(Rejected { request_id, code: ErrorCode::UNKNOWN_PUSH, reason: "push id not known" }),
            );
        }
    } else if p.ok && !(p.kind == PushKind::Broadcast && p.err.is_some()) {
        // A broadcast must reach every shard's log: one that could not store it makes
        // the whole push REJECTED (devices on other shards may have it already; a
        // retry can duplicate, which beats an ACCEPTED that silently misses devices).
        push_reply(core, key, p.kind, p.started_us, AppFrame::Accepted { request_id, push_id: p.push_id });
    } else {
        let code = p.err.unwrap_or(ErrorCode::INTERNAL);
        let frame = AppFrame::Rejected(Rejected { request_id, code, reason: code.name() });
        push_reply(core, key, p.kind, p.started_us, frame);
    }
}

/// Applies an owner shard's answer to the request waiting on this shard.
pub fn handle_reply(core: &ShardCore, r: Reply) {
    let (to, request_id) = match &r {
        Reply::PushDone { to, request_id, .. } | Reply::ReceiptPart { to, request_id, .. } => (*to, *request_id),
        Reply::Snapshot { .. } => return, // handled by ShardCore::handle_reply
    };
    let done = {
        let mut st = core.state.borrow_mut();
        let Some(c) = st.apps.get_mut(to.key).filter(|c| c.gen == to.gen) else {
            return; // the app went away; its pushes were taken regardless
        };
        let Some(p) = c.pending.get_mut(&request_id) else {
            return;
        };
        match r {
            Reply::PushDone { result: Ok(_), .. } => p.ok = true,
            Reply::PushDone { result: Err(e), .. } => p.err = Some(e),
            Reply::ReceiptPart { counts, .. } => {
                if let Some(cnt) = counts {
                    p.counts.add(&cnt);
                    p.known = true;
                }
            }
            Reply::Snapshot { .. } => return,
        }
        p.remaining -= 1;
        if p.remaining == 0 {
            c.pending.remove(&request_id)
        } else {
            None
        }
    };
    if let Some(p) = done {
        answer(core, to.key, request_id, &p);
    }
}

/// Drives one app connection; `true` when it ended gracefully.
fn poll_app(core: &Rc<ShardCore>, key: usize, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<bool> {
    for _ in 0..POLL_BUDGET {
        let mut progress = false;
        let reading = {
            let st = core.state.borrow();
            let c = &st.apps[key];
            c.close.is_none() && !c.draining && c.out.len() < MAX_APP_OUT
        };
        if reading {
            let mut scratch = core.scratch.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Ready(Ok(n)) => {
                    core.state.borrow_mut().stats.app_bytes_in += n as u64;
                    on_app_bytes(core, key, &scratch[..n]);
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        {
            let st = &mut *core.state.borrow_mut();
            let c = &mut st.apps[key];
            let finishing = c.close.or(if c.draining && c.pending.is_empty() {
                Some((ErrorCode::SHUTTING_DOWN, "server shutting down"))
            } else {
                None
            });
            if let Some((code, message)) = finishing.filter(|_| !c.final_sent) {
                c.final_sent = true;
                AppFrame::Error(ErrorFrame { code, message }).encode(&mut c.out);
            }
        }
        let mut w = core.wbuf.borrow_mut();
        w.clear();
        std::mem::swap(&mut *w, &mut core.state.borrow_mut().apps[key].out);
        if !w.is_empty() {
            let accepted = match Pin::new(&mut *stream).poll_write(cx, &w[..w.len().min(4 * SCRATCH)]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(_)) => {
                    std::mem::swap(&mut *w, &mut core.state.borrow_mut().apps[key].out);
                    return Poll::Ready(false);
                }
                Poll::Pending => 0,
            };
            progress |= accepted > 0;
            core.state.borrow_mut().stats.app_bytes_out += accepted as u64;
            w.drain(..accepted);
        }
        // Give the buffer back: the connection keeps what is unsent.
        std::mem::swap(&mut *w, &mut core.state.borrow_mut().apps[key].out);
        drop(w);
        let st = &mut *core.state.borrow_mut();
        let c = &mut st.apps[key];
        if c.final_sent && c.out.is_empty() {
            return Poll::Ready(true);
        }
        if !progress {
            return park(&mut c.waker, cx);
        }
    }
    yield_now(cx)
}
