//! The physical limit for `ringpush bench`: the bench process accepts the devices'
//! connections itself and writes fixed-size messages to them with no protocol, one
//! message per send, submitted to io_uring in batches (the `io-uring` crate directly).
//! Every system's delivered/s is reported as a ratio to this.

use io_uring::{opcode, types, IoUring};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Sends per io_uring submission.
const BATCH: usize = 256;

/// The raw sink's listener and the connections it accepted.
pub struct RawServer {
    pub addr: SocketAddr,
    /// Accepted connections, each with the unix µs of its accept.
    accepted: mpsc::Receiver<(TcpStream, u64)>,
    conns: Vec<TcpStream>,
    last_accept_us: u64,
}

impl RawServer {
    pub fn start() -> Result<RawServer, String> {
        // A deep accept queue: thousands of devices connect at once.
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        sock.bind(&any.into()).map_err(|e| e.to_string())?;
        sock.listen(4096).map_err(|e| e.to_string())?;
        let listener: TcpListener = sock.into();
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let _ = s.set_nodelay(true);
                if tx.send((s, crate::bench::unix_us())).is_err() {
                    break;
                }
            }
        });
        Ok(RawServer { addr, accepted: rx, conns: Vec::new(), last_accept_us: 0 })
    }

    /// Waits until `n` connections are accepted (10 s at most).
    pub fn wait_for(&mut self, n: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.conns.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.accepted.recv_timeout(left) {
                Ok((s, at)) => {
                    self.conns.push(s);
                    self.last_accept_us = self.last_accept_us.max(at);
                }
                Err(_) => return Err(format!("raw sink: {} of {n} connections", self.conns.len())),
            }
        }
        Ok(())
    }

    /// When the latest connection taken by [`RawServer::wait_for`] was accepted (unix µs).
    pub fn last_accept_us(&self) -> u64 {
        self.last_accept_us
    }

    /// Sends `messages` messages of `size` bytes (send time in the first 8 bytes),
    /// each to one connection picked by `target` (`None`: every connection, one send
    /// each, for broadcast), issuing no new push after `deadline`. Returns how many
    /// pushes were sent.
    pub fn send(
        &self,
        messages: u64,
        deadline: Option<Instant>,
        size: usize,
        mut target: impl FnMut() -> Option<usize>,
        now_us: impl Fn() -> u64,
    ) -> Result<u64, String> {
        let mut ring = IoUring::new(BATCH as u32 * 2).map_err(|e| format!("io_uring: {e}"))?;
        let mut bufs = vec![vec![0x2au8; size.max(8)]; BATCH];
        let mut fan: Vec<i32> = Vec::with_capacity(BATCH);
        let mut pushes = 0u64;
        let more = |pushes: u64| pushes < messages && deadline.is_none_or(|d| Instant::now() < d);
        while more(pushes) || !fan.is_empty() {
            // One batch: up to BATCH sends, each with its own buffer.
            let mut n = 0;
            while n < BATCH {
                let fd = match fan.pop() {
                    Some(fd) => fd,
                    None if more(pushes) => {
                        pushes += 1;
                        match target() {
                            Some(i) => self.conns[i].as_raw_fd(),
                            None => {
                                fan.extend(self.conns.iter().map(|c| c.as_raw_fd()));
                                continue;
                            }
                        }
                    }
                    None => break,
                };
                let buf = &mut bufs[n];
                buf[..8].copy_from_slice(&now_us().to_be_bytes());
                let sqe = opcode::Send::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32).build().user_data(n as u64);
                // SAFETY: the buffer stays alive and unmodified until its completion is
                // reaped below, before the next batch reuses it.
                unsafe { ring.submission().push(&sqe).map_err(|_| "submission queue full")? };
                n += 1;
            }
            if n == 0 {
                continue;
            }
            ring.submit_and_wait(n).map_err(|e| format!("io_uring submit: {e}"))?;
            for cqe in ring.completion().take(n) {
                match cqe.result() {
                    r if r as usize == size.max(8) => {}
                    r => return Err(format!("raw send returned {r} (expected {})", size.max(8))),
                }
            }
        }
        Ok(pushes)
    }
}
