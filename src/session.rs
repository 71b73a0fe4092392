//! Device connections: handshake on the accepting shard, hand-over to the owner shard,
//! and the session loop that reads acks and pings and writes messages.
//!
//! Runs on: the accepting shard (handshake) and then the device's owner shard
//! (session). The handshake is a glommio task with a glommio stream; once HELLO
//! verifies, the socket becomes a [`Session`] in the owner shard's slab: a raw
//! descriptor, no task. The shard's session driver ([`drive`]) serves every session
//! through the shard's own io_uring ([`crate::uring`]): received bytes arrive in the
//! ring's provided buffers, and each round encodes every due session's frames into one
//! arena and sends them all with one submission. A session keeps bytes of its own only
//! while a frame is half-read or the socket refuses bytes.

use crate::clock::mono_us;
use crate::routing::shard_for;
use crate::shard::{Request, ShardCore, ShardState, SCRATCH};
use crate::uring::{self, Completion, Op, SessionRing};
use glommio::net::TcpStream;
use glommio::{GlommioError, ResourceType};
use ringpush_protocol::device::{DeviceFrame, Welcome};
use ringpush_protocol::{Bye, DecodeError, DeviceToken, ErrorCode, ErrorFrame, Limits, Preamble, Role, PREAMBLE_LEN};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Outbound bytes a session may hold while its socket refuses them; beyond this the
/// device is disconnected as a slow consumer.
const MAX_SESSION_OUT: usize = 4 * SCRATCH;

/// Read/write rounds one poll of an app connection may run before yielding.
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
    /// The socket (its ring requests are cancelled before it closes).
    pub fd: OwnedFd,
    /// In the shard's due list for the next driver round.
    pub queued: bool,
    /// The socket refused bytes; a POLLOUT wait is armed.
    pub writable_armed: bool,
    /// Bytes of its own, only while it has any (none while idle).
    pub spill: Option<Box<Spill>>,
    pub last_seen_ms: u64,
    /// When the socket started refusing bytes (0: it is not).
    pub blocked_since_ms: u64,
    pub close: Option<Close>,
    /// The final frame (BYE or ERROR) has been queued.
    pub final_sent: bool,
    /// Drop the connection now, without flushing.
    pub kill: bool,
}

/// Bytes a session holds of its own: what the socket has not accepted yet and a partly
/// received frame. Boxed and absent while both are empty, so an idle session pays for
/// one pointer.
#[derive(Default)]
pub struct Spill {
    pub out: Vec<u8>,
    pub inbuf: Vec<u8>,
}

impl Session {
    /// Bytes waiting for the socket.
    pub fn out_len(&self) -> usize {
        self.spill.as_ref().map_or(0, |b| b.out.len())
    }

    fn spill_mut(&mut self) -> &mut Spill {
        self.spill.get_or_insert_with(Default::default)
    }

    /// Frees the spill once it holds nothing.
    fn tidy(&mut self) {
        if self.spill.as_ref().is_some_and(|b| b.out.is_empty() && b.inbuf.is_empty()) {
            self.spill = None;
        }
    }
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

/// Decodes the preamble and the first frame from the bytes a connection sent so far.
/// Returns the frame's value and the bytes both used, or `None` if more are needed.
pub(crate) fn parse_handshake<T>(
    buf: &[u8],
    role: Role,
    first: impl Fn(&[u8]) -> Result<Option<(T, usize)>, HandshakeError>,
) -> Result<Option<(T, usize)>, HandshakeError> {
    let bad = |e: DecodeError| HandshakeError { code: e.code, what: e.what, preamble_ok: false };
    let Some(p) = Preamble::decode(buf).map_err(bad)? else {
        return Ok(None);
    };
    if p.role != role {
        return Err(HandshakeError {
            code: ErrorCode::BAD_MAGIC,
            what: "wrong role for this port",
            preamble_ok: false,
        });
    }
    p.negotiate().map_err(bad)?;
    Ok(first(&buf[PREAMBLE_LEN..])?.map(|(v, used)| (v, PREAMBLE_LEN + used)))
}

async fn read_handshake_untimed<T>(
    stream: &mut TcpStream,
    role: Role,
    max_frame: u32,
    first: impl Fn(&[u8]) -> Result<Option<(T, usize)>, HandshakeError>,
) -> Result<(T, Vec<u8>), HandshakeError> {
    use futures_lite::AsyncReadExt;
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let cap = PREAMBLE_LEN + 5 + max_frame as usize;
    loop {
        if let Some((v, used)) = parse_handshake(&buf, role, &first)? {
            return Ok((v, buf.split_off(used)));
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

/// Where a device connection's handshake stands.
enum HelloState {
    /// Waiting for the preamble and HELLO.
    Reading,
    /// HELLO verified (and the bytes it used): waiting for the receive to be cancelled
    /// before the socket moves to a session, here or on its owner shard.
    Verified(HelloOk, usize),
    /// Refused: waiting for the receive to be cancelled before the ERROR goes out.
    Failed(HandshakeError),
}

/// A device connection between accept and a verified HELLO, in the shard's handshake
/// slab. Its bytes arrive through the device ring like a session's.
pub struct Pending {
    fd: OwnedFd,
    gen: u32,
    /// What the connection sent so far (preamble, HELLO, and whatever followed).
    buf: Vec<u8>,
    started_us: u64,
    /// Unix ms after which the handshake is refused as timed out.
    deadline_ms: u64,
    state: HelloState,
}

/// A connection the device listener accepted. Its preamble and HELLO are usually
/// there already (a device writes them right after connecting, or in its SYN with TCP
/// Fast Open), so they are read at once with a non-blocking `recv`; only a handshake
/// still incomplete after that continues on the ring.
fn accepted(core: &Rc<ShardCore>, fd: OwnedFd) {
    let raw = fd.as_raw_fd();
    let (key, gen) = {
        let st = &mut *core.state.borrow_mut();
        st.stats.device_accepted += 1;
        let gen = st.gen();
        let deadline_ms = core.now_ms() + core.cfg().handshake_timeout.as_millis() as u64;
        let pending =
            Pending { fd, gen, buf: Vec::new(), started_us: mono_us(), deadline_ms, state: HelloState::Reading };
        (st.handshakes.insert(pending), gen)
    };
    let mut first = [0u8; 1024];
    // SAFETY: `raw` is the open socket owned by the pending handshake; `first` is writable.
    let n = unsafe { libc::recv(raw, first.as_mut_ptr().cast(), first.len(), libc::MSG_DONTWAIT) };
    match n {
        // Closed before a word: nothing to answer.
        0 => return finish_handshake(core, key, 0),
        n if n > 0 && on_hello_bytes(core, key, &first[..n as usize]) => return finish_handshake(core, key, 0),
        // Incomplete, not there yet (EAGAIN), or broken: the ring's receive takes over
        // (and reports a broken connection itself).
        _ => {}
    }
    core.ring.borrow_mut().arm_recv(Op::Hello, raw, key, gen);
}

/// Bytes from a connection in its handshake: verify the preamble and HELLO once they
/// are complete. Returns `true` when the handshake is decided and its receive must be
/// cancelled (the session arms its own).
fn on_hello_bytes(core: &ShardCore, key: usize, data: &[u8]) -> bool {
    let limits = Limits { max_frame: core.cfg().max_device_frame, max_targets: 0 };
    let cap = PREAMBLE_LEN + 5 + limits.max_frame as usize;
    let now_secs = core.now_ms() / 1000;
    let st = &mut *core.state.borrow_mut();
    let p = &mut st.handshakes[key];
    p.buf.extend_from_slice(data);
    if !matches!(p.state, HelloState::Reading) {
        return false; // bytes after HELLO: they go to the session
    }
    let verify = |bytes: &[u8]| -> Result<Option<(HelloOk, usize)>, HandshakeError> {
        let Some((frame, used)) = DeviceFrame::decode(bytes, &limits)? else {
            return Ok(None);
        };
        let DeviceFrame::Hello(h) = frame else {
            return Err(HandshakeError::new(ErrorCode::UNEXPECTED_FRAME, "first frame must be HELLO"));
        };
        let app = find_app(core, h.app_id)?;
        DeviceToken(h.token).verify(core.shared.secret(app), h.app_id, h.device_id, now_secs)?;
        let device = h.device_id.to_string();
        Ok(Some((HelloOk { app, device, last_acked: h.last_acked_seq, cursor: h.broadcast_cursor }, used)))
    };
    p.state = match parse_handshake(&p.buf, Role::Device, verify) {
        Ok(None) if p.buf.len() <= cap => return false,
        Ok(None) => HelloState::Failed(HandshakeError::new(ErrorCode::OVERSIZE, "handshake too large")),
        Ok(Some((hello, used))) => HelloState::Verified(hello, used),
        Err(e) => HelloState::Failed(e),
    };
    true
}

/// Refuses handshakes that outlived `handshake_timeout` (from the shard's ticker).
pub(crate) fn expire_handshakes(core: &ShardCore, now_ms: u64) {
    let st = &mut *core.state.borrow_mut();
    let mut ring = core.ring.borrow_mut();
    let mut any = false;
    for (key, p) in st.handshakes.iter_mut() {
        if matches!(p.state, HelloState::Reading) && p.deadline_ms <= now_ms {
            p.state = HelloState::Failed(HandshakeError::new(ErrorCode::BAD_FRAME, "handshake timed out"));
            ring.cancel_op(Op::Hello, key, p.gen);
            any = true;
        }
    }
    if any {
        ring.submit();
    }
}

/// The handshake's receive ended (cancelled after HELLO, refused, or the connection
/// broke): attach the session here, hand it to its owner shard, or refuse it.
fn finish_handshake(core: &Rc<ShardCore>, key: usize, res: i32) {
    let p = {
        let st = &mut *core.state.borrow_mut();
        if matches!(st.handshakes[key].state, HelloState::Reading) && res == -libc::ENOBUFS {
            let p = &st.handshakes[key];
            core.ring.borrow_mut().arm_recv(Op::Hello, p.fd.as_raw_fd(), key, p.gen);
            return;
        }
        st.handshakes.remove(key)
    };
    let (hello, used) = match p.state {
        // Closed (or broken) before HELLO: nobody to answer.
        HelloState::Reading => {
            core.state.borrow_mut().stats.handshakes_failed += 1;
            return;
        }
        HelloState::Failed(e) => {
            core.state.borrow_mut().stats.handshakes_failed += 1;
            tracing::info!(shard = core.id, code = %e.code, "device handshake failed: {}", e.what);
            glommio::spawn_local(reject(stream_of(p.fd), Role::Device, e)).detach();
            return;
        }
        HelloState::Verified(hello, used) => (hello, used),
    };
    let app_id = &core.cfg().apps[hello.app as usize].id;
    if let Some(node) = core.shared.fleet.elsewhere(app_id, &hello.device) {
        core.state.borrow_mut().stats.handshakes_redirected += 1;
        let mut out = Vec::with_capacity(PREAMBLE_LEN + 8 + node.device_addr.len());
        out.extend_from_slice(&server_preamble(Role::Device));
        DeviceFrame::Bye(Bye { reason: ErrorCode::REDIRECT, redirect: &node.device_addr }).encode(&mut out);
        glommio::spawn_local(async move { linger_close(&mut stream_of(p.fd), &out).await }).detach();
        return;
    }
    {
        let st = &mut *core.state.borrow_mut();
        st.stats.handshakes_ok += 1;
        st.handshake_lat.record(mono_us() - p.started_us);
    }
    let leftover = &p.buf[used..];
    let owner = shard_for(app_id, &hello.device, core.shared.shards);
    let Some(tx) = &core.requests[owner] else {
        return attach(core, p.fd, hello.app, &hello.device, (hello.last_acked, hello.cursor), leftover);
    };
    let req = Request::HandOff {
        fd: p.fd,
        app: hello.app,
        device: hello.device,
        last_acked: hello.last_acked,
        cursor: hello.cursor,
        leftover: leftover.to_vec(),
    };
    match tx.try_send(req) {
        Ok(()) => core.state.borrow_mut().stats.handed_off += 1,
        Err(GlommioError::WouldBlock(ResourceType::Channel(Request::HandOff { fd, .. }))) => {
            let e = HandshakeError::new(ErrorCode::BUSY, "owner shard is busy, retry");
            glommio::spawn_local(reject(stream_of(fd), Role::Device, e)).detach();
        }
        // The owner shard has stopped: the socket closes with the request.
        Err(_) => {}
    }
}

/// Binds a verified device connection to a session on this (its owner) shard.
/// `acks` is the device's own (last acked seq, broadcast cursor) from its HELLO.
pub fn attach(core: &Rc<ShardCore>, fd: OwnedFd, app: u16, device: &str, acks: (u64, u64), leftover: &[u8]) {
    if core.draining.get() {
        let e = HandshakeError::new(ErrorCode::SHUTTING_DOWN, "server shutting down");
        glommio::spawn_local(reject(stream_of(fd), Role::Device, e)).detach();
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
        core.ring.borrow_mut().arm_recv(Op::Recv, fd.as_raw_fd(), key, gen);
        st.sessions.insert(Session {
            device: a.device,
            gen,
            fd,
            queued: false,
            writable_armed: false,
            spill: Some(Box::new(Spill { out, inbuf: Vec::new() })),
            last_seen_ms: now,
            blocked_since_ms: 0,
            close: None,
            final_sent: false,
            kill: false,
        });
        let ShardState { sessions, due, .. } = st;
        due.kick(sessions, key);
        if let Some(old) = a.replaced {
            if let Some(s) = sessions.get_mut(old) {
                s.close = Some(Close::Bye(ErrorCode::REPLACED));
                due.kick(sessions, old);
            }
            st.stats.replaced += 1;
        }
        st.wheel.insert((key, gen), now + 2 * hb);
        key
    };
    if !leftover.is_empty() {
        on_device_bytes(core, key, leftover);
    }
}

/// A glommio stream over a session's socket, for a lingering close or a rejection.
fn stream_of(fd: OwnedFd) -> TcpStream {
    // SAFETY: the descriptor is a connected TCP socket we own; the stream takes it.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

/// Handles bytes a device sent: acks, pings, BYE; anything else closes the session
/// with an ERROR frame. Marks the session due when it has something to write.
pub fn on_device_bytes(core: &ShardCore, key: usize, data: &[u8]) {
    let now = core.now_ms();
    let limits = Limits { max_frame: core.cfg().max_device_frame, max_targets: 0 };
    let st = &mut *core.state.borrow_mut();
    st.stats.device_bytes_in += data.len() as u64;
    let ShardState { sessions, table, due, .. } = st;
    let s = &mut sessions[key];
    s.last_seen_ms = now;
    if s.close.is_some() {
        return;
    }
    let mut held = s.spill.as_mut().map(|b| std::mem::take(&mut b.inbuf)).unwrap_or_default();
    let buf: &[u8] = if held.is_empty() {
        data
    } else {
        held.extend_from_slice(data);
        &held
    };
    let mut pos = 0;
    let mut acked = false;
    while s.close.is_none() {
        match DeviceFrame::decode(&buf[pos..], &limits) {
            Ok(Some((frame, n))) => {
                pos += n;
                match frame {
                    DeviceFrame::Ack(a) => {
                        table.on_ack(s.device, a.seq, a.broadcast_seq, mono_us());
                        acked = true;
                    }
                    DeviceFrame::Ping(nonce) => DeviceFrame::Pong(nonce).encode(&mut s.spill_mut().out),
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
    if !rest.is_empty() && s.close.is_none() {
        s.spill_mut().inbuf = rest.to_vec();
    }
    s.tidy();
    // An ack may open the device's window for more messages.
    if acked || s.out_len() > 0 || s.close.is_some() {
        due.kick(sessions, key);
    }
}

/// Sessions one driver round serves at most; the rest wait for the next round.
const ROUND_SESSIONS: usize = 4096;
/// Bytes one round encodes at most before it sends.
const ROUND_BYTES: usize = 4 << 20;

/// One session's bytes in a round's arena, sent by one `SEND`.
struct Queued {
    key: usize,
    gen: u32,
    fd: RawFd,
    start: usize,
    end: usize,
    /// The session had more to send than one batch.
    more: bool,
}

/// Reusable buffers of the session driver.
#[derive(Default)]
pub struct DriverScratch {
    cqes: Vec<Completion>,
    keys: Vec<usize>,
    queued: Vec<Queued>,
    /// Sessions that ended this round: their socket, and whether to close gracefully.
    ends: Vec<(OwnedFd, bool)>,
}

/// The shard's session driver: reaps the device ring's completions (bytes received,
/// sockets writable again) and serves the sessions marked due, in rounds, until the
/// shard stops.
pub async fn drive(core: Rc<ShardCore>) {
    glommio::spawn_local(watch_ring(Rc::clone(&core))).detach();
    let mut scratch = DriverScratch::default();
    loop {
        futures_lite::future::poll_fn(|cx| {
            let reaped = core.ring.borrow_mut().has_completions();
            let st = &mut *core.state.borrow_mut();
            if reaped || !st.due.keys.is_empty() {
                Poll::Ready(())
            } else {
                park(&mut st.due.driver, cx)
            }
        })
        .await;
        round(&core, &mut scratch);
        glommio::yield_if_needed().await;
    }
}

/// Waits on the ring's eventfd through glommio's reactor and wakes the driver each
/// time the ring posts completions.
async fn watch_ring(core: Rc<ShardCore>) {
    let event = core.ring.borrow().eventfd();
    loop {
        let wake = || {
            if let Some(w) = core.state.borrow_mut().due.driver.take() {
                w.wake();
            }
        };
        let e = uring::watch(event, wake).await;
        tracing::error!(shard = core.id, "watching the device ring's eventfd failed: {e}");
        glommio::timer::sleep(crate::shard::TICK).await;
    }
}

/// One round: handle completions, encode every due session's frames into the arena,
/// send them all with one submission, and settle what each socket accepted.
fn round(core: &Rc<ShardCore>, sc: &mut DriverScratch) {
    // What completes while the round runs is seen by `drive` before it parks (it checks
    // the queue after every round), so it need not signal the eventfd: that signal
    // would wake the shard again for nothing, once per round with sends.
    core.ring.borrow_mut().quiet(true);
    core.ring.borrow_mut().drain(&mut sc.cqes);
    reap(core, sc, &[]);

    let now = core.now_ms();
    let mut arena = core.wbuf.borrow_mut();
    arena.clear();
    {
        let st = &mut *core.state.borrow_mut();
        // A message goes to a device only once its record is in the segment file (the
        // page cache): a killed process then still knows every seq a device has seen,
        // and never hands the same seq to another message after a restart.
        if !st.due.keys.is_empty() {
            if let Err(e) = st.table.store.write_staged() {
                st.table.stats.store_errors += 1;
                tracing::error!(shard = core.id, "{e}");
            }
        }
        std::mem::swap(&mut sc.keys, &mut st.due.keys);
        let mut ring = core.ring.borrow_mut();
        for i in 0..sc.keys.len() {
            if i >= ROUND_SESSIONS || arena.len() >= ROUND_BYTES {
                // Still marked due: they go first next round.
                st.due.keys.extend_from_slice(&sc.keys[i..]);
                break;
            }
            let key = sc.keys[i];
            prepare(st, &mut ring, key, now, &mut arena, sc);
        }
        sc.keys.clear();
        for (i, q) in sc.queued.iter().enumerate() {
            // SAFETY: the arena is neither touched nor freed until every send of this
            // round has completed (the loop below waits for all of them).
            unsafe { ring.send(q.fd, arena.as_ptr().add(q.start), q.end - q.start, i, q.gen) };
        }
        ring.submit();
        let mut outstanding = sc.queued.len();
        loop {
            let before = sc.cqes.len();
            ring.drain(&mut sc.cqes);
            outstanding -= sc.cqes[before..].iter().filter(|c| c.op == Op::Send).count();
            if outstanding == 0 {
                break;
            }
            // Non-blocking sends complete during the submission; this is a fallback.
            ring.submit_and_wait(1);
        }
    }
    reap(core, sc, &arena);
    sc.queued.clear();
    drop(arena);

    // Cancel before closing: the ring holds the sockets until its requests end.
    core.ring.borrow_mut().submit();
    core.ring.borrow_mut().quiet(false);
    for (fd, graceful) in sc.ends.drain(..) {
        if graceful {
            // Boxed: rare, and the driver's own state stays small.
            glommio::spawn_local(async move {
                let mut stream = stream_of(fd);
                linger_close(&mut stream, &[]).await;
            })
            .detach();
        }
    }
}

/// Encodes what session `key` is owed into the arena and queues its send, or ends it.
fn prepare(
    st: &mut ShardState,
    ring: &mut SessionRing,
    key: usize,
    now: u64,
    arena: &mut Vec<u8>,
    sc: &mut DriverScratch,
) {
    let Some(s) = st.sessions.get_mut(key) else {
        return;
    };
    s.queued = false;
    if s.kill {
        return end(st, ring, key, false, &mut sc.ends, now);
    }
    if s.writable_armed {
        // The socket refuses bytes; its POLLOUT completion marks it due again.
        return;
    }
    let ShardState { sessions, table, .. } = st;
    let s = &mut sessions[key];
    let start = arena.len();
    if let Some(b) = &mut s.spill {
        arena.extend_from_slice(&b.out);
        b.out.clear();
    }
    s.tidy();
    match s.close {
        None => {
            table.fill(s.device, now, mono_us(), arena, start + SCRATCH);
        }
        Some(c) if !s.final_sent => {
            s.final_sent = true;
            match c {
                Close::Bye(reason) => DeviceFrame::Bye(Bye { reason, redirect: "" }).encode(arena),
                Close::Error(code, message) => DeviceFrame::Error(ErrorFrame { code, message }).encode(arena),
                Close::Quiet => {}
            }
        }
        Some(_) => {}
    }
    if arena.len() > start {
        let more = s.close.is_none() && arena.len() >= start + SCRATCH;
        sc.queued.push(Queued { key, gen: s.gen, fd: s.fd.as_raw_fd(), start, end: arena.len(), more });
    } else if s.close.is_some() && s.final_sent {
        end(st, ring, key, true, &mut sc.ends, now);
    }
}

/// Removes session `key`: its device goes offline, its ring requests are cancelled,
/// and its socket waits in `ends` until the cancellation is submitted.
fn end(
    st: &mut ShardState,
    ring: &mut SessionRing,
    key: usize,
    graceful: bool,
    ends: &mut Vec<(OwnedFd, bool)>,
    now: u64,
) {
    let s = st.sessions.remove(key);
    st.table.detach(s.device, key, now);
    st.stats.sessions_closed += 1;
    ring.cancel(key, s.gen, s.writable_armed);
    ends.push((s.fd, graceful));
}

/// Handles the completions in `sc.cqes`: received bytes, re-arms, writable sockets,
/// and (with `arena`, during a round's send phase) what each send accepted.
fn reap(core: &Rc<ShardCore>, sc: &mut DriverScratch, arena: &[u8]) {
    if sc.cqes.is_empty() {
        return;
    }
    let now = core.now_ms();
    let mut recycled = false;
    for c in sc.cqes.drain(..) {
        let live = {
            let st = core.state.borrow();
            st.sessions.get(c.key).is_some_and(|s| uring::gen24(s.gen) == c.gen)
        };
        match c.op {
            Op::Recv => {
                if let Some(bid) = c.buffer() {
                    if live && c.res > 0 {
                        let ring = core.ring.borrow();
                        on_device_bytes(core, c.key, ring.buffer(bid, c.res as usize));
                    }
                    core.ring.borrow_mut().recycle(bid);
                    recycled = true;
                }
                if live && !c.more() {
                    let st = &mut *core.state.borrow_mut();
                    let ShardState { sessions, due, .. } = st;
                    let s = &mut sessions[c.key];
                    if c.res > 0 || c.res == -libc::ENOBUFS {
                        core.ring.borrow_mut().arm_recv(Op::Recv, s.fd.as_raw_fd(), c.key, s.gen);
                    } else {
                        // End of stream or a socket error: the connection is gone.
                        s.kill = true;
                        due.kick(sessions, c.key);
                    }
                }
            }
            Op::Writable => {
                if live {
                    let st = &mut *core.state.borrow_mut();
                    let ShardState { sessions, due, .. } = st;
                    sessions[c.key].writable_armed = false;
                    due.kick(sessions, c.key);
                }
            }
            Op::Send => {
                if let Some(q) = sc.queued.get(c.key) {
                    settle_send(core, q, c.res, &arena[q.start..q.end], now);
                }
            }
            Op::Accept => {
                if c.res >= 0 {
                    // SAFETY: the ring's accept returned a new descriptor we own.
                    accepted(core, unsafe { OwnedFd::from_raw_fd(c.res) });
                } else if !core.draining.get() {
                    // (Shutting down, the listener is stopped: EINVAL, or ECANCELED once
                    // the accept is cancelled.)
                    let e = std::io::Error::from_raw_os_error(-c.res);
                    tracing::warn!(shard = core.id, "device accept failed: {e}");
                }
                if !c.more() {
                    // An error ended it (e.g. out of descriptors): the ticker re-arms it.
                    core.listener.borrow_mut().armed = false;
                }
            }
            Op::Hello => {
                let live = core.state.borrow().handshakes.get(c.key).is_some_and(|p| uring::gen24(p.gen) == c.gen);
                if let Some(bid) = c.buffer() {
                    let decided = live && c.res > 0 && {
                        let ring = core.ring.borrow();
                        on_hello_bytes(core, c.key, ring.buffer(bid, c.res as usize))
                    };
                    if decided {
                        core.ring.borrow_mut().cancel_op(Op::Hello, c.key, c.gen);
                    }
                    core.ring.borrow_mut().recycle(bid);
                    recycled = true;
                }
                if live && !c.more() {
                    finish_handshake(core, c.key, c.res);
                }
            }
            Op::Cancel => {}
        }
    }
    if recycled {
        core.ring.borrow_mut().publish();
    }
}

/// Settles one send of a round: keeps what the socket refused, waits for it to become
/// writable, disconnects a consumer too slow to take its bytes, and ends a session
/// whose final frame went out.
fn settle_send(core: &Rc<ShardCore>, q: &Queued, res: i32, bytes: &[u8], now: u64) {
    let slow = core.cfg().slow_device_timeout.as_millis() as u64;
    let st = &mut *core.state.borrow_mut();
    let ShardState { sessions, wheel, due, stats, .. } = st;
    let Some(s) = sessions.get_mut(q.key).filter(|s| s.gen == q.gen) else {
        return;
    };
    let accepted = match res {
        n if n >= 0 => n as usize,
        n if n == -libc::EAGAIN => 0,
        _ => {
            s.kill = true;
            due.kick(sessions, q.key);
            return;
        }
    };
    stats.device_bytes_out += accepted as u64;
    stats.device_writes += 1;
    let rest = &bytes[accepted.min(bytes.len())..];
    if rest.is_empty() {
        s.blocked_since_ms = 0;
        if q.more || s.out_len() > 0 || (s.close.is_some() && s.final_sent) {
            due.kick(sessions, q.key);
        }
        return;
    }
    // What the socket refused goes before anything queued since.
    let b = s.spill_mut();
    let mut out = Vec::with_capacity(rest.len() + b.out.len());
    out.extend_from_slice(rest);
    out.extend_from_slice(&b.out);
    b.out = out;
    if s.blocked_since_ms == 0 {
        s.blocked_since_ms = now;
        wheel.insert((q.key, s.gen), now + slow);
    }
    if s.out_len() > MAX_SESSION_OUT {
        stats.slow_disconnects += 1;
        s.kill = true;
        due.kick(sessions, q.key);
    } else {
        s.writable_armed = true;
        core.ring.borrow_mut().arm_writable(q.fd, q.key, s.gen);
    }
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
