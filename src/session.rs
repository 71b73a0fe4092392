//! Device connections: handshake on the accepting shard, hand-over to the owner shard,
//! and the session loop that reads acks and pings and writes messages.
//!
//! Runs on: the accepting shard (handshake) and then the device's owner shard
//! (session). A session's state is a [`Session`] in the owner shard's slab; its task
//! holds only the socket. Reads land in the shard's scratch buffer and writes are
//! built in the shard's write buffer: a session keeps bytes of its own only while a
//! frame is half-read or the socket refuses bytes. Glommio's non-buffered stream polls
//! readiness before it reads, so a read that is pending holds no buffer either.

use crate::clock::mono_us;
use crate::routing::shard_for;
use crate::shard::{Request, ShardCore, ShardState, SCRATCH};
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use ringpush_protocol::device::{DeviceFrame, Welcome};
use ringpush_protocol::{Bye, DecodeError, DeviceToken, ErrorCode, ErrorFrame, Limits, Preamble, Role, PREAMBLE_LEN};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Outbound bytes a session may hold while its socket refuses them; beyond this the
/// device is disconnected as a slow consumer.
const MAX_SESSION_OUT: usize = 4 * SCRATCH;

/// Read/write rounds one poll of a session may run before yielding to other tasks.
pub(crate) const POLL_BUDGET: usize = 16;

/// How a session ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// Send BYE with this reason, then close.
    Bye(ErrorCode),
    /// Send ERROR, then close.
    Error(ErrorCode, &'static str),
    /// Close without a final frame (the device said BYE).
    Quiet,
}

/// One connected device, in the owner shard's slab.
pub struct Session {
    /// Key of the device in the shard's device table.
    pub device: usize,
    /// Distinguishes this session from a later one reusing the slab key.
    pub gen: u32,
    /// Wakes the session task when messages arrive or a timer fires.
    pub waker: Option<std::task::Waker>,
    /// Bytes the socket has not accepted yet (empty, unallocated while idle).
    pub out: Vec<u8>,
    /// A partly received frame (empty, unallocated while idle).
    pub inbuf: Vec<u8>,
    pub last_seen_ms: u64,
    /// When the socket started refusing bytes (0: it is not).
    pub blocked_since_ms: u64,
    pub close: Option<Close>,
    /// The final frame (BYE or ERROR) has been queued.
    pub final_sent: bool,
    /// Drop the connection now, without flushing.
    pub kill: bool,
}

/// Error found during a handshake: what to send before closing.
#[derive(Debug)]
pub(crate) struct HandshakeError {
    pub code: ErrorCode,
    pub what: &'static str,
    /// The client's preamble was valid, so it gets the server preamble first.
    pub preamble_ok: bool,
}

impl HandshakeError {
    pub(crate) fn new(code: ErrorCode, what: &'static str) -> Self {
        HandshakeError { code, what, preamble_ok: true }
    }
}

impl From<DecodeError> for HandshakeError {
    fn from(e: DecodeError) -> Self {
        HandshakeError::new(e.code, e.what)
    }
}

/// The server's preamble: the version chosen.
pub(crate) fn server_preamble(role: Role) -> [u8; PREAMBLE_LEN] {
    Preamble { role, min_version: ringpush_protocol::VERSION, max_version: ringpush_protocol::VERSION }.encode()
}

/// Reads the preamble and the first frame of a connection. `first` tries to decode
/// the first frame from the bytes after the preamble, returning an owned value and the
/// bytes it used. Returns that value and the bytes that followed it.
pub(crate) async fn read_handshake<T>(
    core: &ShardCore,
    stream: &mut TcpStream,
    role: Role,
    max_frame: u32,
    first: impl Fn(&[u8]) -> Result<Option<(T, usize)>, HandshakeError>,
) -> Result<(T, Vec<u8>), HandshakeError> {
    glommio::timer::timeout(core.cfg().handshake_timeout, async {
        Ok(read_handshake_untimed(stream, role, max_frame, first).await)
    })
    .await
    .unwrap_or(Err(HandshakeError::new(ErrorCode::BAD_FRAME, "handshake timed out")))
}

/// The app id's index, or `unknown_app`.
pub(crate) fn find_app(core: &ShardCore, app_id: &str) -> Result<u16, HandshakeError> {
    core.shared.app_index.get(app_id).copied().ok_or(HandshakeError::new(ErrorCode::UNKNOWN_APP, "unknown app"))
}

async fn read_handshake_untimed<T>(
    stream: &mut TcpStream,
    role: Role,
    max_frame: u32,
    first: impl Fn(&[u8]) -> Result<Option<(T, usize)>, HandshakeError>,
) -> Result<(T, Vec<u8>), HandshakeError> {
    use futures_lite::AsyncReadExt;
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let mut preamble = false;
    let cap = PREAMBLE_LEN + 5 + max_frame as usize;
    loop {
        if !preamble {
            let bad = |e: DecodeError| HandshakeError { code: e.code, what: e.what, preamble_ok: false };
            if let Some(p) = Preamble::decode(&buf).map_err(bad)? {
                if p.role != role {
                    return Err(HandshakeError {
                        code: ErrorCode::BAD_MAGIC,
                        what: "wrong role for this port",
                        preamble_ok: false,
                    });
                }
                p.negotiate().map_err(bad)?;
                preamble = true;
            }
        }
        if preamble {
            if let Some((v, used)) = first(&buf[PREAMBLE_LEN..])? {
                return Ok((v, buf.split_off(PREAMBLE_LEN + used)));
            }
        }
        let start = buf.len();
        let want = (start + 512).min(cap.max(start + 1));
        buf.resize(want, 0);
        let n = stream
            .read(&mut buf[start..])
            .await
            .map_err(|_| HandshakeError::new(ErrorCode::BAD_FRAME, "connection closed during handshake"))?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(HandshakeError::new(ErrorCode::BAD_FRAME, "connection closed during handshake"));
        }
    }
}

/// Sends the handshake error (with the server preamble if the client's was valid),
/// then closes gracefully.
pub(crate) async fn reject(mut stream: TcpStream, role: Role, e: HandshakeError) {
    let mut out = Vec::with_capacity(64);
    if e.preamble_ok {
        out.extend_from_slice(&server_preamble(role));
    }
    DeviceFrame::Error(ErrorFrame { code: e.code, message: e.what }).encode(&mut out);
    linger_close(&mut stream, &out).await;
}

/// Writes `last` (the final frame), half-closes, and drains what the peer still sends
/// for a moment, so the final frame is not destroyed by a reset.
pub(crate) async fn linger_close(stream: &mut TcpStream, last: &[u8]) {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let _ = glommio::timer::timeout(Duration::from_secs(1), async {
        if !last.is_empty() {
            let _ = stream.write_all(last).await;
        }
        let _ = stream.shutdown(std::net::Shutdown::Write).await;
        let mut sink = [0u8; 256];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
        Ok(())
    })
    .await;
}

/// A verified HELLO, owned so it can travel to the owner shard.
struct HelloOk {
    app: u16,
    device: String,
    last_acked: u64,
    cursor: u64,
}

/// Serves a freshly accepted device connection until its HELLO is verified, then
/// attaches it here or hands it to its owner shard.
pub async fn handshake(core: Rc<ShardCore>, mut stream: TcpStream) {
    let started_us = mono_us();
    core.state.borrow_mut().stats.device_accepted += 1;
    let c = Rc::clone(&core);
    let limits = Limits { max_frame: core.cfg().max_device_frame, max_targets: 0 };
    let verify = |bytes: &[u8]| -> Result<Option<(HelloOk, usize)>, HandshakeError> {
        let Some((frame, used)) = DeviceFrame::decode(bytes, &limits)? else {
            return Ok(None);
        };
        let DeviceFrame::Hello(h) = frame else {
            return Err(HandshakeError::new(ErrorCode::UNEXPECTED_FRAME, "first frame must be HELLO"));
        };
        let app = find_app(&c, h.app_id)?;
        let now_secs = c.now_ms() / 1000;
        DeviceToken(h.token).verify(c.shared.secret(app), h.app_id, h.device_id, now_secs)?;
        let device = h.device_id.to_string();
        Ok(Some((HelloOk { app, device, last_acked: h.last_acked_seq, cursor: h.broadcast_cursor }, used)))
    };
    let res = read_handshake(&core, &mut stream, Role::Device, limits.max_frame, verify).await;
    let (hello, leftover) = match res {
        Ok(v) => v,
        Err(e) => {
            core.state.borrow_mut().stats.handshakes_failed += 1;
            tracing::info!(shard = core.id, code = %e.code, "device handshake failed: {}", e.what);
            return reject(stream, Role::Device, e).await;
        }
    };
    {
        let st = &mut *core.state.borrow_mut();
        st.stats.handshakes_ok += 1;
        st.handshake_lat.record(mono_us() - started_us);
    }
    let app_id = &core.cfg().apps[hello.app as usize].id;
    let owner = shard_for(app_id, &hello.device, core.shared.shards);
    let Some(tx) = &core.requests[owner] else {
        return attach(&core, stream, hello.app, &hello.device, (hello.last_acked, hello.cursor), &leftover);
    };
    // Hand the socket to its owner: a duplicate fd travels, this one closes.
    // SAFETY: dup returns a new descriptor we own, or -1 which is checked.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if fd < 0 {
        return reject(stream, Role::Device, HandshakeError::new(ErrorCode::INTERNAL, "dup failed")).await;
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = Request::HandOff {
        fd,
        app: hello.app,
        device: hello.device,
        last_acked: hello.last_acked,
        cursor: hello.cursor,
        leftover,
    };
    match tx.try_send(req) {
        Ok(()) => {
            core.state.borrow_mut().stats.handed_off += 1;
            // Dropping our descriptor must not shut the socket down: the owner has it.
            drop(stream);
        }
        Err(_) => {
            let e = HandshakeError::new(ErrorCode::BUSY, "owner shard is busy, retry");
            reject(stream, Role::Device, e).await;
        }
    }
}

/// Binds a verified device connection to a session on this (its owner) shard.
/// `acks` is the device's own (last acked seq, broadcast cursor) from its HELLO.
pub fn attach(core: &Rc<ShardCore>, stream: TcpStream, app: u16, device: &str, acks: (u64, u64), leftover: &[u8]) {
    if core.draining.get() {
        let e = HandshakeError::new(ErrorCode::SHUTTING_DOWN, "server shutting down");
        glommio::spawn_local(reject(stream, Role::Device, e)).detach();
        return;
    }
    let now = core.now_ms();
    let hb = core.cfg().heartbeat.as_millis() as u64;
    let key = {
        let st = &mut *core.state.borrow_mut();
        let gen = st.gen();
        let key = st.sessions.vacant_key();
        let a = st.table.attach(app, device, acks.0, acks.1, key, now, mono_us());
        let mut out = Vec::with_capacity(PREAMBLE_LEN + 64);
        out.extend_from_slice(&server_preamble(Role::Device));
        DeviceFrame::Welcome(Welcome {
            heartbeat_ms: hb as u32,
            max_frame: core.cfg().max_device_frame,
            server_time_ms: now,
            acked_seq: a.acked,
            broadcast_cursor: a.cursor,
            pending: a.pending,
        })
        .encode(&mut out);
        st.sessions.insert(Session {
            device: a.device,
            gen,
            waker: None,
            out,
            inbuf: Vec::new(),
            last_seen_ms: now,
            blocked_since_ms: 0,
            close: None,
            final_sent: false,
            kill: false,
        });
        if let Some(old) = a.replaced {
            if let Some(s) = st.sessions.get_mut(old) {
                s.close = Some(Close::Bye(ErrorCode::REPLACED));
                if let Some(w) = &s.waker {
                    w.wake_by_ref();
                }
            }
            st.stats.replaced += 1;
        }
        st.wheel.insert((key, gen), now + 2 * hb);
        key
    };
    if !leftover.is_empty() {
        on_device_bytes(core, key, leftover);
    }
    let core = Rc::clone(core);
    glommio::spawn_local(async move {
        let mut stream = stream;
        let graceful = futures_lite::future::poll_fn(|cx| poll_session(&core, key, &mut stream, cx)).await;
        {
            let st = &mut *core.state.borrow_mut();
            let s = st.sessions.remove(key);
            st.table.detach(s.device, key, core.now_ms());
            st.stats.sessions_closed += 1;
        }
        if graceful {
            // Boxed: the task's state machine is as large as its largest await, and
            // this one (timer, read buffer) would otherwise sit in every idle session.
            Box::pin(linger_close(&mut stream, &[])).await;
        }
    })
    .detach();
}

/// Handles bytes a device sent: acks, pings, BYE; anything else closes the session
/// with an ERROR frame.
pub fn on_device_bytes(core: &ShardCore, key: usize, data: &[u8]) {
    let now = core.now_ms();
    let limits = Limits { max_frame: core.cfg().max_device_frame, max_targets: 0 };
    let st = &mut *core.state.borrow_mut();
    st.stats.device_bytes_in += data.len() as u64;
    let ShardState { sessions, table, .. } = st;
    let s = &mut sessions[key];
    s.last_seen_ms = now;
    if s.close.is_some() {
        return;
    }
    let mut held = std::mem::take(&mut s.inbuf);
    let buf: &[u8] = if held.is_empty() {
        data
    } else {
        held.extend_from_slice(data);
        &held
    };
    let mut pos = 0;
    while s.close.is_none() {
        match DeviceFrame::decode(&buf[pos..], &limits) {
            Ok(Some((frame, n))) => {
                pos += n;
                match frame {
                    DeviceFrame::Ack(a) => table.on_ack(s.device, a.seq, a.broadcast_seq, mono_us()),
                    DeviceFrame::Ping(nonce) => DeviceFrame::Pong(nonce).encode(&mut s.out),
                    DeviceFrame::Pong(_) => {}
                    DeviceFrame::Bye(_) => s.close = Some(Close::Quiet),
                    _ => {
                        s.close =
                            Some(Close::Error(ErrorCode::UNEXPECTED_FRAME, "unexpected frame on a device session"))
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::info!(shard = core.id, code = %e.code, "closing device session: {}", e.what);
                s.close = Some(Close::Error(e.code, e.what));
            }
        }
    }
    let rest = &buf[pos..];
    s.inbuf = if rest.is_empty() || s.close.is_some() { Vec::new() } else { rest.to_vec() };
}

/// Drives one session: read what the device sent, write what it is owed, and finish
/// when it closes. Returns `true` when the session ends gracefully (final frame
/// flushed), `false` when the connection broke or was killed.
fn poll_session(core: &ShardCore, key: usize, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<bool> {
    for _ in 0..POLL_BUDGET {
        let mut progress = false;
        let (kill, closing) = {
            let st = core.state.borrow();
            let s = &st.sessions[key];
            (s.kill, s.close.is_some())
        };
        if kill {
            return Poll::Ready(false);
        }
        if !closing {
            let mut scratch = core.scratch.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Ready(Ok(n)) => {
                    on_device_bytes(core, key, &scratch[..n]);
                    progress = true;
                }
                Poll::Pending => {}
            }
        }

        let now = core.now_ms();
        let mut w = core.wbuf.borrow_mut();
        w.clear();
        {
            let st = &mut *core.state.borrow_mut();
            let s = &mut st.sessions[key];
            w.extend_from_slice(&s.out);
            s.out.clear();
            match s.close {
                None => {
                    if w.len() < SCRATCH {
                        st.table.fill(s.device, now, mono_us(), &mut w, SCRATCH);
                    }
                }
                Some(c) if !s.final_sent => {
                    s.final_sent = true;
                    match c {
                        Close::Bye(reason) => DeviceFrame::Bye(Bye { reason, redirect: "" }).encode(&mut w),
                        Close::Error(code, message) => DeviceFrame::Error(ErrorFrame { code, message }).encode(&mut w),
                        Close::Quiet => {}
                    }
                }
                Some(_) => {}
            }
        }
        if !w.is_empty() {
            let accepted = match Pin::new(&mut *stream).poll_write(cx, &w) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Pending => 0,
            };
            progress |= accepted > 0;
            let st = &mut *core.state.borrow_mut();
            let slow = core.cfg().slow_device_timeout.as_millis() as u64;
            st.stats.device_bytes_out += accepted as u64;
            let ShardState { sessions, wheel, .. } = st;
            let s = &mut sessions[key];
            s.out.extend_from_slice(&w[accepted..]);
            if s.out.is_empty() {
                s.blocked_since_ms = 0;
            } else if s.blocked_since_ms == 0 {
                s.blocked_since_ms = now;
                wheel.insert((key, s.gen), now + slow);
            }
            if s.out.len() > MAX_SESSION_OUT {
                st.stats.slow_disconnects += 1;
                return Poll::Ready(false);
            }
        }
        drop(w);
        let st = &mut *core.state.borrow_mut();
        let s = &mut st.sessions[key];
        if s.out.is_empty() && s.out.capacity() > 0 {
            s.out = Vec::new();
        }
        if s.close.is_some() && s.final_sent && s.out.is_empty() {
            return Poll::Ready(true);
        }
        if !progress {
            return park(&mut s.waker, cx);
        }
    }
    yield_now(cx)
}

/// Keeps the task's waker in `slot` (cloned only when it changed) so pushes and
/// timers can wake the connection, and parks the task.
pub(crate) fn park<T>(slot: &mut Option<std::task::Waker>, cx: &Context<'_>) -> Poll<T> {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
    Poll::Pending
}

/// A connection spent its poll budget with work left: let the shard's other tasks
/// run, and come back.
pub(crate) fn yield_now<T>(cx: &Context<'_>) -> Poll<T> {
    cx.waker().wake_by_ref();
    Poll::Pending
}
