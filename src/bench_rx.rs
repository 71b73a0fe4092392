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
use ringpush_protocol::Limits;
use slab::Slab;
use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Receive buffers of a load-generator process's ring: a broadcast reaches thousands of
/// its devices at once, so more than a server shard needs for acks and pings.
const BUFFERS: u16 = 8192;

/// Where received messages are counted.
pub trait Sink {
    /// One message's payload, and whether it was delivered before (a duplicate).
    fn record(&self, payload: &[u8], duplicate: bool);
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
        let gen = self.next_gen.get().wrapping_add(1);
        self.next_gen.set(gen);
        let raw = fd.as_raw_fd();
        let mut sock = Socket { fd, gen, wire, partial: Vec::new(), out: Vec::new() };
        if let Err(e) = feed(&mut sock, leftover, &self.sink) {
            eprintln!("ringpush bench-worker: {e}");
            return;
        }
        write_out(&mut sock);
        let key = self.socks.borrow_mut().insert(sock);
        let mut ring = self.ring.borrow_mut();
        ring.arm_recv(Op::Recv, raw, key, gen);
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

    /// Handles every posted completion: parses what arrived, returns the buffers,
    /// re-arms receives that ran out of buffers, closes sockets that ended.
    fn pass(&self, cqes: &mut Vec<Completion>) {
        let mut ring = self.ring.borrow_mut();
        let mut socks = self.socks.borrow_mut();
        ring.drain(cqes);
        let (mut recycled, mut submit) = (false, false);
        let mut rearm = Vec::new();
        for c in cqes.drain(..) {
            if c.op != Op::Recv {
                continue;
            }
            let live = socks.get(c.key).is_some_and(|s| uring::gen24(s.gen) == c.gen);
            let mut broken = false;
            if let Some(bid) = c.buffer() {
                if live && c.res > 0 {
                    let s = &mut socks[c.key];
                    match feed(s, ring.buffer(bid, c.res as usize), &self.sink) {
                        Ok(()) => broken = !write_out(s),
                        Err(e) => {
                            eprintln!("ringpush bench-worker: {e}");
                            broken = true;
                        }
                    }
                }
                ring.recycle(bid);
                recycled = true;
            }
            if !live {
                continue;
            }
            if broken {
                // The receive may still be armed: cancel it; the socket closes with it.
                ring.cancel_op(Op::Recv, c.key, c.gen);
                socks.remove(c.key);
                submit = true;
            } else if !c.more() {
                if c.res == -libc::ENOBUFS {
                    rearm.push(c.key);
                } else {
                    socks.remove(c.key); // EOF or error: the connection is over
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

/// Parses `data` (after any partial packet kept from before), records every message,
/// and queues the acks and pongs the protocol calls for.
fn feed(s: &mut Socket, data: &[u8], sink: &impl Sink) -> Result<(), String> {
    if s.partial.is_empty() {
        let used = parse(&mut s.wire, data, sink, &mut s.out)?;
        s.partial.extend_from_slice(&data[used..]);
    } else {
        s.partial.extend_from_slice(data);
        let used = parse(&mut s.wire, &s.partial, sink, &mut s.out)?;
        s.partial.drain(..used);
    }
    Ok(())
}

/// Handles every whole packet at the start of `bytes`; returns the bytes used.
fn parse(wire: &mut Wire, bytes: &[u8], sink: &impl Sink, out: &mut Vec<u8>) -> Result<usize, String> {
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
    struct Log(RefCell<Vec<(Vec<u8>, bool)>>);
    impl Sink for Log {
        fn record(&self, payload: &[u8], duplicate: bool) {
            self.0.borrow_mut().push((payload.to_vec(), duplicate));
        }
    }

    fn message(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        DeviceFrame::Message(Message { seq, push_id: seq, expiry_ms: 0, flags: 0, payload }).encode(&mut b);
        b
    }

    fn socket(wire: Wire) -> Socket {
        // Any open descriptor: these tests never write (no ack is due) or use a pipe.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        Socket { fd: a.into(), gen: 1, wire, partial: Vec::new(), out: Vec::new() }
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
}
