//! The load generator's receive side.
//!
//! Once a device is connected (and subscribed, for the peers), its socket leaves glommio
//! for one io_uring per load-generator process ([`SessionRing`], the same ring the
//! server's shards use): one multishot receive per socket into provided buffers, and
//! every completion of a wake-up handled in one pass, parsed in place. Every system's
//! devices (ringpush, Redis, MQTT, the raw limit) go through this same code, so the load
//! generator costs each system the same, and costs little: on a machine whose cores the
//! load generator shares with the system measured, what it saves goes to that system.

use crate::client::Acker;
use crate::uring::{self, Completion, Op, SessionRing};
use ringpush_protocol::device::{DeviceFrame, FLAG_BROADCAST};
use ringpush_protocol::{Limits, Preamble, PREAMBLE_LEN};
use slab::Slab;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

/// Why a socket ended when the server closed it (after a BYE, or at the end of a run).
const CLOSED: &str = "closed by the server";

/// Receive buffers of a load-generator process's ring: a broadcast reaches thousands of
/// its devices at once, so more than a server shard needs for acks and pings.
const BUFFERS: u16 = 8192;

/// Where received messages and finished handshakes are counted.
pub trait Sink {
    /// One message's payload, and whether it was delivered before (a duplicate).
    fn record(&self, payload: &[u8], duplicate: bool);
    /// A socket given to [`Receiver::open`] finished its handshake.
    fn connected(&self);
    /// A socket given to [`Receiver::open`] (with this `tag`) ended before its
    /// handshake finished.
    fn failed(&self, tag: usize, why: &str);
}

/// Where a socket is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Its TCP connect is in progress: connected once the socket turns writable.
    Connecting,
    /// A ringpush device waiting for the server's preamble (`preamble`: already read)
    /// and WELCOME.
    Greeting { preamble: bool },
    /// Connected: messages flow.
    Live,
}

/// The protocol spoken on a socket.
pub enum Wire {
    /// ringpush device frames; messages are acked by the policy of the [`Acker`].
    Ringpush(Acker),
    /// The raw limit: fixed-size messages of this many bytes, no framing.
    Raw(usize),
    /// RESP pub/sub pushes.
    Redis,
    /// MQTT PUBLISH packets.
    Mqtt,
}

struct Socket {
    fd: OwnedFd,
    gen: u32,
    wire: Wire,
    phase: Phase,
    /// The caller's name for the socket, for [`Sink::failed`].
    tag: usize,
    /// A wait for POLLOUT is armed.
    writable: bool,
    /// The start of a packet whose end has not arrived yet.
    partial: Vec<u8>,
    /// Bytes to write (acks, pongs) the socket has not taken yet.
    out: Vec<u8>,
}

/// One process's device sockets on one ring.
pub struct Receiver<S: Sink> {
    ring: RefCell<SessionRing>,
    socks: RefCell<Slab<Socket>>,
    sink: S,
    /// The driver, parked while the ring has nothing.
    driver: RefCell<Option<Waker>>,
    next_gen: std::cell::Cell<u32>,
}

impl<S: Sink + 'static> Receiver<S> {
    /// Sets up the ring and starts its driver on the current glommio executor.
    pub fn start(sink: S) -> std::io::Result<Rc<Self>> {
        let r = Rc::new(Receiver {
            ring: RefCell::new(SessionRing::with_buffers(BUFFERS)?),
            socks: RefCell::new(Slab::new()),
            sink,
            driver: RefCell::new(None),
            next_gen: std::cell::Cell::new(0),
        });
        glommio::spawn_local(Rc::clone(&r).drive()).detach();
        Ok(r)
    }

    /// Where this receiver records messages.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Takes over a connected socket: `leftover` are bytes already read from it.
    pub fn add(&self, fd: OwnedFd, wire: Wire, leftover: &[u8]) {
        let mut sock = self.socket(fd, wire, Phase::Live, &[], 0);
        if let Err(e) = feed(&mut sock, leftover, &self.sink) {
            eprintln!("ringpush bench-worker: {e}");
            return;
        }
        write_out(&mut sock);
        self.arm(sock);
    }

    /// Takes over a socket whose connect was issued (non-blocking) and whose handshake
    /// is still to come: `Phase::Connecting` (connected once writable) or
    /// `Phase::Greeting` (connected at the WELCOME). `unsent` is what it still has to
    /// send once writable (what did not ride in the SYN). The sink hears `connected`
    /// or `failed` (with `tag`) for it.
    pub fn open(&self, fd: OwnedFd, wire: Wire, phase: Phase, unsent: &[u8], tag: usize) {
        let sock = self.socket(fd, wire, phase, unsent, tag);
        self.arm(sock);
    }

    fn socket(&self, fd: OwnedFd, wire: Wire, phase: Phase, unsent: &[u8], tag: usize) -> Socket {
        let gen = self.next_gen.get().wrapping_add(1);
        self.next_gen.set(gen);
        Socket { fd, gen, wire, phase, tag, writable: false, partial: Vec::new(), out: unsent.to_vec() }
    }

    /// Arms the socket's receive, and its wait for POLLOUT when it is connecting or has
    /// bytes the socket did not take.
    fn arm(&self, mut sock: Socket) {
        let raw = sock.fd.as_raw_fd();
        sock.writable = sock.phase == Phase::Connecting || !sock.out.is_empty();
        let (gen, writable) = (sock.gen, sock.writable);
        let key = self.socks.borrow_mut().insert(sock);
        let mut ring = self.ring.borrow_mut();
        ring.arm_recv(Op::Recv, raw, key, gen);
        if writable {
            ring.arm_writable(raw, key, gen);
        }
        ring.submit();
    }

    async fn drive(self: Rc<Self>) {
        let event = self.ring.borrow().eventfd();
        let me = Rc::clone(&self);
        glommio::spawn_local(async move {
            let wake = || {
                if let Some(w) = me.driver.borrow_mut().take() {
                    w.wake();
                }
            };
            let e = uring::watch(event, wake).await;
            eprintln!("ringpush bench-worker: cannot watch the receive ring: {e}");
        })
        .detach();
        let mut cqes = Vec::new();
        loop {
            futures_lite::future::poll_fn(|cx| {
                if self.ring.borrow_mut().has_completions() {
                    Poll::Ready(())
                } else {
                    *self.driver.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            self.pass(&mut cqes);
            glommio::yield_if_needed().await;
        }
    }

    /// Drives the ring on the calling thread, outside glommio, until `done` says so:
    /// a pass over what was posted, then a wait in `io_uring_enter` of at most `tick`.
    /// For a process that only receives once its sockets are connected: a wake-up then
    /// costs one system call instead of a pass through glommio's loop (its three rings,
    /// preemption timers and a `membarrier` before it parks), which on a machine shared
    /// with the server under test is CPU taken from that server.
    pub fn run_blocking(&self, tick: Duration, mut done: impl FnMut(&S) -> bool) {
        // Nobody reads the eventfd any more: no signal per completion.
        self.ring.borrow_mut().quiet(true);
        let mut cqes = Vec::new();
        loop {
            self.pass(&mut cqes);
            if done(&self.sink) {
                break;
            }
            let mut ring = self.ring.borrow_mut();
            if !ring.has_completions() {
                ring.submit_and_wait_for(tick);
            }
        }
        self.ring.borrow_mut().quiet(false);
    }

    /// Sends every device's cumulative ACK that is still owed (the policy waits for
    /// more messages or for time to pass): a device that is done acks what it has
    /// before it goes, or the box keeps those messages and delivers them again when the
    /// device comes back (on a box that outlives the run, to the next run's devices).
    pub fn ack_all(&self) {
        for (_, s) in self.socks.borrow_mut().iter_mut() {
            ack_owed(s);
        }
    }

    /// Handles every posted completion: parses what arrived, returns the buffers,
    /// re-arms receives that ran out of buffers, closes sockets that ended.
    fn pass(&self, cqes: &mut Vec<Completion>) {
        let mut ring = self.ring.borrow_mut();
        let mut socks = self.socks.borrow_mut();
        ring.drain(cqes);
        let (mut recycled, mut submit) = (false, false);
        let mut rearm = Vec::new();
        for c in cqes.drain(..) {
            let live = socks.get(c.key).is_some_and(|s| uring::gen24(s.gen) == c.gen);
            // Why the socket ends now, if it does.
            let mut end: Option<String> = None;
            match c.op {
                Op::Recv => {
                    if let Some(bid) = c.buffer() {
                        if live && c.res > 0 {
                            let s = &mut socks[c.key];
                            match feed(s, ring.buffer(bid, c.res as usize), &self.sink) {
                                Ok(()) if !write_out(s) => end = Some("send failed".into()),
                                Ok(()) => {}
                                Err(e) => end = Some(e),
                            }
                        }
                        ring.recycle(bid);
                        recycled = true;
                    }
                    if !live {
                        continue;
                    }
                    if end.is_none() && !c.more() {
                        if c.res == -libc::ENOBUFS {
                            rearm.push(c.key);
                        } else if c.res < 0 {
                            end = Some(std::io::Error::from_raw_os_error(-c.res).to_string());
                        } else {
                            end = Some(CLOSED.into()); // EOF: the connection is over
                        }
                    }
                }
                Op::Writable if live => {
                    let s = &mut socks[c.key];
                    s.writable = false;
                    if c.res < 0 || c.res & (libc::POLLERR | libc::POLLHUP) as i32 != 0 {
                        let err = socket2::SockRef::from(&s.fd).take_error().ok().flatten();
                        end = Some(err.map_or_else(|| "connection failed".into(), |e| e.to_string()));
                    } else {
                        if s.phase == Phase::Connecting {
                            s.phase = Phase::Live;
                            self.sink.connected();
                        }
                        if !write_out(s) {
                            end = Some("send failed".into());
                        } else if !s.out.is_empty() {
                            ring.arm_writable(s.fd.as_raw_fd(), c.key, s.gen);
                            s.writable = true;
                            submit = true;
                        }
                    }
                }
                _ => continue,
            }
            if let Some(why) = end {
                let s = socks.remove(c.key);
                // Requests still armed are cancelled; the socket closes with the last.
                if c.op != Op::Recv || c.more() {
                    ring.cancel_op(Op::Recv, c.key, c.gen);
                }
                if s.writable {
                    ring.cancel_op(Op::Writable, c.key, c.gen);
                }
                submit = true;
                match s.phase {
                    Phase::Live if why == CLOSED => {}
                    Phase::Live => eprintln!("ringpush bench-worker: {why}"),
                    _ => self.sink.failed(s.tag, &why),
                }
            }
        }
        if recycled {
            ring.publish();
        }
        for key in rearm {
            let s = &socks[key];
            ring.arm_recv(Op::Recv, s.fd.as_raw_fd(), key, s.gen);
            submit = true;
        }
        if submit {
            ring.submit();
        }
    }
}

/// A non-blocking, close-on-exec TCP socket connecting to `addr`, and whether the
/// connect is already done (on loopback it usually is by the time the `connect` call
/// returns, though that call says `EINPROGRESS`): if not, give it to
/// [`Receiver::open`] with `Phase::Connecting`, whose wait for POLLOUT says when it is.
pub fn connect_raw(addr: SocketAddr) -> std::io::Result<(OwnedFd, bool)> {
    let ty = socket2::Type::STREAM.nonblocking().cloexec();
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    match s.connect(&addr.into()) {
        Ok(()) => return Ok((s.into(), true)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n > 0 && p.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        return Err(s.take_error()?.unwrap_or_else(|| std::io::Error::other("connection failed")));
    }
    Ok((s.into(), n > 0))
}

/// Parses `data` (after any partial packet kept from before), records every message,
/// and queues the acks and pongs the protocol calls for.
fn feed(s: &mut Socket, data: &[u8], sink: &impl Sink) -> Result<(), String> {
    if s.partial.is_empty() {
        let used = parse(&mut s.wire, &mut s.phase, data, sink, &mut s.out)?;
        s.partial.extend_from_slice(&data[used..]);
    } else {
        s.partial.extend_from_slice(data);
        let used = parse(&mut s.wire, &mut s.phase, &s.partial, sink, &mut s.out)?;
        s.partial.drain(..used);
    }
    Ok(())
}

/// Handles every whole packet at the start of `bytes`; returns the bytes used.
fn parse(
    wire: &mut Wire,
    phase: &mut Phase,
    bytes: &[u8],
    sink: &impl Sink,
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    const LIMITS: Limits = Limits { max_frame: ringpush_protocol::wire::MAX_FRAME_CEILING, max_targets: u16::MAX };
    let mut pos = 0;
    match wire {
        Wire::Raw(size) => {
            pos = bytes.len() / *size * *size;
            bytes[..pos].chunks_exact(*size).for_each(|m| sink.record(m, false));
        }
        Wire::Redis | Wire::Mqtt => loop {
            let next = match wire {
                Wire::Redis => crate::peers::resp_next(&bytes[pos..])?,
                _ => crate::peers::mqtt_next(&bytes[pos..])?,
            };
            let Some((used, payload)) = next else { break };
            if let Some(p) = payload {
                sink.record(p, false);
            }
            pos += used;
        },
        Wire::Ringpush(acker) => {
            if let Phase::Greeting { preamble } = phase {
                if !*preamble {
                    if bytes.len() < PREAMBLE_LEN {
                        return Ok(0);
                    }
                    // Without one, the server refused ours and sent a bare ERROR frame.
                    if Preamble::decode(&bytes[..PREAMBLE_LEN]).is_ok() {
                        pos = PREAMBLE_LEN;
                    }
                    *preamble = true;
                }
                match DeviceFrame::decode(&bytes[pos..], &LIMITS)
                    .map_err(|e| format!("bad frame from the server: {e:?}"))?
                {
                    None => return Ok(pos),
                    Some((DeviceFrame::Welcome(_), used)) => {
                        pos += used;
                        *phase = Phase::Live;
                        sink.connected();
                    }
                    Some((DeviceFrame::Error(e), _)) => return Err(format!("refused: {}: {}", e.code, e.message)),
                    Some((other, _)) => return Err(format!("expected WELCOME, got {other:?}")),
                }
            }
            while let Some((frame, used)) =
                DeviceFrame::decode(&bytes[pos..], &LIMITS).map_err(|e| format!("bad frame from the server: {e:?}"))?
            {
                pos += used;
                match frame {
                    DeviceFrame::Message(m) => {
                        let fresh = acker.saw(m.seq, m.flags & FLAG_BROADCAST != 0);
                        sink.record(m.payload, !fresh);
                    }
                    DeviceFrame::Ping(x) => DeviceFrame::Pong(x).encode(out),
                    // BYE: the server closes next; what it sent before counts.
                    DeviceFrame::Pong(_) | DeviceFrame::Bye(_) => {}
                    DeviceFrame::Error(e) => return Err(format!("server error {}: {}", e.code, e.message)),
                    other => return Err(format!("unexpected frame {other:?}")),
                }
            }
            // One ack decision per batch, cumulative.
            if acker.due() {
                acker.encode_ack(out);
            }
        }
    }
    Ok(pos)
}

/// Sends a live ringpush device's cumulative ACK if it owes one.
fn ack_owed(s: &mut Socket) {
    if let (Phase::Live, Wire::Ringpush(acker)) = (s.phase, &mut s.wire) {
        if acker.owes() {
            acker.encode_ack(&mut s.out);
            write_out(s);
        }
    }
}

/// Writes what the socket has queued, without waiting; what it does not take now is
/// tried again when it next receives. Returns false if the connection broke.
fn write_out(s: &mut Socket) -> bool {
    if s.out.is_empty() {
        return true;
    }
    // SAFETY: `out` is a live buffer of the given length; the descriptor is open.
    let n = unsafe {
        libc::send(s.fd.as_raw_fd(), s.out.as_ptr().cast(), s.out.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    match n {
        n if n >= 0 => {
            s.out.drain(..n as usize);
            true
        }
        _ => std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::AckPolicy;
    use ringpush_protocol::device::{Ack, Message};
    use std::cell::RefCell;
    use std::time::Duration;

    #[derive(Default)]
    struct Log(RefCell<Vec<(Vec<u8>, bool)>>, std::cell::Cell<u32>);
    impl Sink for Log {
        fn record(&self, payload: &[u8], duplicate: bool) {
            self.0.borrow_mut().push((payload.to_vec(), duplicate));
        }
        fn connected(&self) {
            self.1.set(self.1.get() + 1);
        }
        fn failed(&self, _: usize, why: &str) {
            panic!("the parser reports failures by its result, not the sink: {why}");
        }
    }

    fn message(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        DeviceFrame::Message(Message { seq, push_id: seq, expiry_ms: 0, flags: 0, payload }).encode(&mut b);
        b
    }

    fn socket(wire: Wire) -> Socket {
        greeting(wire, Phase::Live)
    }

    fn greeting(wire: Wire, phase: Phase) -> Socket {
        // Any open descriptor: these tests never write (no ack is due) or use a pipe.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        Socket { fd: a.into(), gen: 1, wire, phase, tag: 0, writable: false, partial: Vec::new(), out: Vec::new() }
    }

    /// The server's preamble and a WELCOME with `pending` messages.
    fn welcome(pending: u32) -> Vec<u8> {
        let mut b = crate::session::server_preamble(ringpush_protocol::Role::Device).to_vec();
        DeviceFrame::Welcome(ringpush_protocol::device::Welcome {
            heartbeat_ms: 30_000,
            max_frame: 4096,
            server_time_ms: 1,
            acked_seq: 0,
            broadcast_cursor: 0,
            pending,
        })
        .encode(&mut b);
        b
    }

    fn acker() -> Wire {
        Wire::Ringpush(Acker::new(AckPolicy { every: 100, delay: Duration::from_secs(60) }, 0, 0))
    }

    #[test]
    fn a_device_is_connected_at_its_welcome_and_what_follows_it_is_read() {
        let log = Log::default();
        let mut s = greeting(acker(), Phase::Greeting { preamble: false });
        let mut bytes = welcome(1);
        bytes.extend(message(1, b"waiting"));
        // One byte at a time: the preamble, the WELCOME and the message each arrive split.
        for b in &bytes[..bytes.len() - 1] {
            feed(&mut s, std::slice::from_ref(b), &log).unwrap();
        }
        assert_eq!((log.1.get(), log.0.borrow().len()), (1, 0));
        assert_eq!(s.phase, Phase::Live);
        feed(&mut s, &bytes[bytes.len() - 1..], &log).unwrap();
        assert_eq!((log.1.get(), log.0.borrow()[0].0.as_slice()), (1, &b"waiting"[..]));
    }

    /// A bare ERROR frame, as the server sends to refuse a handshake.
    fn refusal(code: ringpush_protocol::ErrorCode, message: &str) -> Vec<u8> {
        let mut b = Vec::new();
        DeviceFrame::Error(ringpush_protocol::ErrorFrame { code, message }).encode(&mut b);
        b
    }

    #[test]
    fn a_refused_device_fails_with_the_servers_reason_preamble_or_not() {
        let refusal = refusal(ringpush_protocol::ErrorCode::EXPIRED_TOKEN, "token expired");
        let with = [&crate::session::server_preamble(ringpush_protocol::Role::Device)[..], &refusal].concat();
        for bytes in [with, refusal] {
            let log = Log::default();
            let mut s = greeting(acker(), Phase::Greeting { preamble: false });
            let e = feed(&mut s, &bytes, &log).unwrap_err();
            assert!(e.contains("token expired"), "{e}");
            assert_eq!(log.1.get(), 0);
            assert_ne!(s.phase, Phase::Live);
        }
    }

    #[test]
    fn a_device_that_is_done_acks_what_it_owes_once() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut s = socket(acker());
        s.fd = a.into();
        let log = Log::default();
        for seq in 1..=4 {
            feed(&mut s, &message(seq, b"m"), &log).unwrap();
        }
        assert!(s.out.is_empty(), "4 of 100: no ack is due by the policy");
        ack_owed(&mut s);
        ack_owed(&mut s);
        drop(s);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut b, &mut got).unwrap();
        let mut want = Vec::new();
        DeviceFrame::Ack(Ack { seq: 4, broadcast_seq: 0 }).encode(&mut want);
        assert_eq!(got, want, "one cumulative ACK, sent once");
    }

    #[test]
    fn packets_split_anywhere_are_reassembled_in_order() {
        let log = Log::default();
        let policy = AckPolicy { every: 3, delay: Duration::from_secs(60) };
        let mut s = socket(Wire::Ringpush(Acker::new(policy, 0, 0)));
        let mut bytes = Vec::new();
        for seq in 1..=4 {
            bytes.extend(message(seq, format!("m{seq}").as_bytes()));
        }
        bytes.extend(message(2, b"again")); // a redelivery
        for chunk in bytes.chunks(7) {
            feed(&mut s, chunk, &log).unwrap();
        }
        let got = log.0.borrow();
        let payloads: Vec<_> = got.iter().map(|(p, d)| (String::from_utf8_lossy(p).to_string(), *d)).collect();
        assert_eq!(
            payloads,
            [("m1", false), ("m2", false), ("m3", false), ("m4", false), ("again", true)]
                .map(|(p, d)| (p.to_string(), d))
        );
        assert!(s.partial.is_empty());
        // Three fresh messages made an ack due: one cumulative ACK for seq 3.
        let mut want = Vec::new();
        DeviceFrame::Ack(Ack { seq: 3, broadcast_seq: 0 }).encode(&mut want);
        assert_eq!(s.out, want);
    }

    #[test]
    fn raw_and_peer_packets_are_counted_whole() {
        let log = Log::default();
        let mut raw = socket(Wire::Raw(8));
        feed(&mut raw, &[1; 12], &log).unwrap();
        feed(&mut raw, &[2; 12], &log).unwrap();
        assert_eq!(log.0.borrow().len(), 3);
        assert!(raw.partial.is_empty());

        let mut resp = Vec::new();
        resp.extend_from_slice(b"*3\r\n$7\r\nmessage\r\n$2\r\nd1\r\n$5\r\nhello\r\n");
        let mut redis = socket(Wire::Redis);
        feed(&mut redis, &resp[..10], &log).unwrap();
        feed(&mut redis, &resp[10..], &log).unwrap();
        assert_eq!(log.0.borrow().last().unwrap().0, b"hello");
        assert_eq!(log.0.borrow().len(), 4);
    }

    #[test]
    fn an_error_frame_ends_the_socket() {
        let log = Log::default();
        let mut s = socket(Wire::Ringpush(Acker::new(AckPolicy { every: 1, delay: Duration::ZERO }, 0, 0)));
        let mut b = Vec::new();
        DeviceFrame::Error(ringpush_protocol::ErrorFrame {
            code: ringpush_protocol::ErrorCode::BAD_FRAME,
            message: "no",
        })
        .encode(&mut b);
        assert!(feed(&mut s, &b, &log).unwrap_err().contains("no"));
    }

    #[derive(Default)]
    struct Outcomes {
        connected: std::cell::Cell<u32>,
        failed: RefCell<Vec<(usize, String)>>,
    }
    impl Sink for Outcomes {
        fn record(&self, _: &[u8], _: bool) {}
        fn connected(&self) {
            self.connected.set(self.connected.get() + 1);
        }
        fn failed(&self, tag: usize, why: &str) {
            self.failed.borrow_mut().push((tag, why.to_string()));
        }
    }

    /// A server on loopback that reads each connection's preamble and HELLO and answers
    /// with `reply`.
    fn answering(reply: Vec<u8>, conns: usize) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for _ in 0..conns {
                let (mut c, _) = l.accept().unwrap();
                let mut first = [0u8; PREAMBLE_LEN + 3];
                std::io::Read::read_exact(&mut c, &mut first).unwrap();
                std::io::Write::write_all(&mut c, &reply).unwrap();
                held.push(c);
            }
            std::thread::sleep(Duration::from_secs(5));
        });
        addr
    }

    #[test]
    fn a_ring_driven_on_the_thread_sees_what_arrives_after_glommio_stopped() {
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().unwrap();
        let r = ex.run(async move {
            let r = Receiver::start(Log::default()).unwrap();
            r.add(theirs.into(), Wire::Raw(8), &[1; 8]);
            r
        });
        let writer = std::thread::spawn(move || {
            for i in 2..=4u8 {
                std::thread::sleep(Duration::from_millis(20));
                std::io::Write::write_all(&mut ours, &[i; 8]).unwrap();
            }
            ours
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        r.run_blocking(Duration::from_millis(5), |log| {
            log.0.borrow().len() == 4 || std::time::Instant::now() >= deadline
        });
        let got: Vec<u8> = r.sink().0.borrow().iter().map(|(p, _)| p[0]).collect();
        assert_eq!(got, [1, 2, 3, 4], "the leftover, then each message as it came");
        // With nothing arriving, it still returns once `done` says so.
        let until = std::time::Instant::now() + Duration::from_millis(30);
        r.run_blocking(Duration::from_millis(5), |_| std::time::Instant::now() >= until);
        assert_eq!(r.sink().0.borrow().len(), 4);
        drop(writer.join().unwrap());
    }

    #[test]
    fn sockets_opened_on_the_ring_report_their_handshake() {
        let no = answering(refusal(ringpush_protocol::ErrorCode::BAD_TOKEN, "bad token"), 1);
        let ok = answering(welcome(0), 3);
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().unwrap();
        let (connected, failed) = ex.run(async move {
            let r = Receiver::start(Outcomes::default()).unwrap();
            let token = ringpush_protocol::DeviceToken::mint(b"secret", "app", "d1", u64::MAX / 2000);
            let hello = crate::client::hello_bytes("app", "d1", &token, 0, 0);
            for (tag, addr) in [(1, ok), (2, ok), (3, no)] {
                let (fd, sent) = crate::client::open_sending(addr, &hello, None).unwrap();
                r.open(fd, acker(), Phase::Greeting { preamble: false }, &hello[sent..], tag);
            }
            // A raw connect the ring sees complete, and one nobody listens for.
            let (fd, _) = connect_raw(ok).unwrap();
            r.open(fd, Wire::Raw(8), Phase::Connecting, &[], 4);
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM.nonblocking(), None).unwrap();
            let _ = s.connect(&closed.into()); // EINPROGRESS; the refusal is the ring's to see
            r.open(s.into(), Wire::Raw(8), Phase::Connecting, &[], 5);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let done = |o: &Outcomes| o.connected.get() + o.failed.borrow().len() as u32 == 5;
            while !done(r.sink()) && std::time::Instant::now() < deadline {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            let failed = r.sink().failed.borrow().clone();
            (r.sink().connected.get(), failed)
        });
        assert_eq!(connected, 3, "two WELCOMEs and a raw connect; failed: {failed:?}");
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(failed.iter().any(|(tag, f)| *tag == 3 && f.contains("bad token")), "{failed:?}");
        assert!(failed.iter().any(|(tag, f)| *tag == 5 && f.contains("refused")), "{failed:?}");
    }
}
