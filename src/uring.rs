//! The shard's own io_uring for device sockets.
//!
//! Device sessions are not glommio tasks: each is a raw socket in the owner shard's
//! slab, driven by one ring per shard (the `io-uring` crate) that the shard's session
//! driver (`session::drive`) works in rounds:
//!
//! - **Receive**: one multishot `RECV` per socket, armed once at attach, takes a buffer
//!   from the shard's provided-buffer ring only when bytes arrive. An idle session holds
//!   no buffer, no task and no poll source of its own; the kernel re-arms the receive.
//! - **Send**: a round encodes every due session's frames into one shard arena and
//!   submits one `SEND` per session (`MSG_DONTWAIT`, so none waits in the kernel) with a
//!   single `io_uring_enter`, instead of one `send` syscall per session.
//! - **Writable**: a one-shot `POLL_ADD` for `POLLOUT`, armed only while a socket
//!   refuses bytes.
//!
//! The ring posts completions to an eventfd; a glommio task reads that eventfd through
//! glommio's own ring and wakes the driver, so the shard sleeps in one place.

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use memmap2::{MmapMut, MmapOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

/// The provided-buffer group of the receive buffers.
const BUF_GROUP: u16 = 1;
/// Receive buffers per shard. Device traffic is acks and pings (tens of bytes); when
/// all are in use a socket's receive ends with `ENOBUFS` and is re-armed next round.
pub const BUF_COUNT: u16 = 1024;
/// Bytes per receive buffer.
pub const BUF_SIZE: usize = 1024;
/// Submission queue entries (the completion queue is four times larger).
const SQ_ENTRIES: u32 = 4096;

/// What a completion is for (the top byte of its user data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Recv = 1,
    Writable = 2,
    Send = 3,
    Cancel = 4,
    /// The device listener's multishot accept (key and generation 0).
    Accept = 5,
    /// The receive of a connection still in its handshake (key: handshake slab).
    Hello = 6,
}

/// One completion, decoded.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub op: Op,
    /// Session slab key.
    pub key: usize,
    /// Low 24 bits of the session's generation.
    pub gen: u32,
    pub res: i32,
    pub flags: u32,
}

impl Completion {
    /// The receive buffer this completion filled, if any.
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    /// Whether the (multishot) request stays armed.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// Packs an op, a session key and its generation into user data.
pub fn user_data(op: Op, key: usize, gen: u32) -> u64 {
    (op as u64) << 56 | (gen as u64 & 0xff_ffff) << 32 | (key as u64 & 0xffff_ffff)
}

/// The low 24 bits of a generation, as completions carry it.
pub fn gen24(gen: u32) -> u32 {
    gen & 0xff_ffff
}

fn decode(ud: u64, res: i32, flags: u32) -> Option<Completion> {
    let op = match ud >> 56 {
        1 => Op::Recv,
        2 => Op::Writable,
        3 => Op::Send,
        4 => Op::Cancel,
        5 => Op::Accept,
        6 => Op::Hello,
        _ => return None,
    };
    Some(Completion { op, key: (ud & 0xffff_ffff) as usize, gen: (ud >> 32) as u32 & 0xff_ffff, res, flags })
}

/// A shard's device-socket ring with its receive buffers.
pub struct SessionRing {
    ring: IoUring,
    /// The provided-buffer ring (`buf_count` entries the kernel takes buffers from).
    entries: MmapMut,
    /// The receive buffers themselves, `BUF_SIZE` each.
    bufs: MmapMut,
    /// Our tail of the buffer ring (published to the kernel by [`Self::publish`]).
    tail: u16,
    /// Receive buffers (a power of two).
    buf_count: u16,
    event: OwnedFd,
}

impl SessionRing {
    /// Sets up the ring, registers the receive buffers and the eventfd. Fails with the
    /// kernel's reason when io_uring or a needed feature (provided-buffer rings, Linux
    /// 5.19; multishot receive, Linux 6.0) is missing.
    pub fn new() -> io::Result<Self> {
        Self::with_buffers(BUF_COUNT)
    }

    /// [`Self::new`] with `buf_count` receive buffers (a power of two, at most 32768).
    pub fn with_buffers(buf_count: u16) -> io::Result<Self> {
        if !buf_count.is_power_of_two() || buf_count > 1 << 15 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "buffer count must be a power of two ≤ 32768"));
        }
        let ring = IoUring::builder().setup_cqsize(SQ_ENTRIES * 4).setup_coop_taskrun().build(SQ_ENTRIES)?;
        let entries_len = buf_count as usize * std::mem::size_of::<types::BufRingEntry>();
        // Anonymous mappings are page-aligned, as the kernel requires; populated so the
        // fixed cost shows at start rather than as per-session growth.
        let entries = MmapOptions::new().len(entries_len).populate().map_anon()?;
        let bufs = MmapOptions::new().len(buf_count as usize * BUF_SIZE).populate().map_anon()?;
        // SAFETY: plain syscall; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor we own.
        let event = unsafe { OwnedFd::from_raw_fd(efd) };
        let mut r = SessionRing { ring, entries, bufs, tail: 0, buf_count, event };
        // SAFETY: the entries mapping is page-aligned, buf_count entries long, and lives
        // as long as the ring (both are dropped together; the ring first).
        unsafe {
            r.ring.submitter().register_buf_ring_with_flags(r.entries.as_ptr() as u64, buf_count, BUF_GROUP, 0)?;
        }
        r.ring.submitter().register_eventfd(efd)?;
        for bid in 0..buf_count {
            r.recycle(bid);
        }
        r.publish();
        Ok(r)
    }

    /// The eventfd the ring signals when it posts completions.
    pub fn eventfd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Turns the eventfd signal off (`true`) or back on. For a driver that looks at the
    /// completion queue itself before it sleeps: completions it causes while awake (its
    /// sends complete during their submission) need not wake its thread once more
    /// through the eventfd and the reactor that reads it.
    pub fn quiet(&mut self, on: bool) {
        let cq = self.ring.completion();
        if on {
            cq.disable_eventfd();
        } else {
            cq.enable_eventfd();
            // The caller looks at the queue next: that load must not pass this store.
            std::sync::atomic::fence(Ordering::SeqCst);
        }
    }

    /// Queues one submission, submitting first if the queue is full.
    ///
    /// # Safety
    /// Any buffer the entry points at must stay valid until its completion.
    unsafe fn push(&mut self, e: &squeue::Entry) {
        loop {
            // SAFETY: passed on to the caller.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return;
            }
            if let Err(err) = self.ring.submit() {
                tracing::error!("io_uring submit failed: {err}");
            }
        }
    }

    /// Arms the multishot accept of the device listener: one completion per connection.
    pub fn arm_accept(&mut self, listener: RawFd) {
        let e = opcode::AcceptMulti::new(types::Fd(listener)).flags(libc::SOCK_CLOEXEC).build().user_data(user_data(
            Op::Accept,
            0,
            0,
        ));
        // SAFETY: no buffer (the peer address is not asked for).
        unsafe { self.push(&e) }
    }

    /// Arms the multishot receive of a socket: `Op::Recv` for a session, `Op::Hello`
    /// for a connection in its handshake.
    pub fn arm_recv(&mut self, op: Op, fd: RawFd, key: usize, gen: u32) {
        let e = opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP).build().user_data(user_data(op, key, gen));
        // SAFETY: the buffers come from the provided ring, which outlives the ring.
        unsafe { self.push(&e) }
    }

    /// Arms a one-shot wait for the socket to accept bytes again.
    pub fn arm_writable(&mut self, fd: RawFd, key: usize, gen: u32) {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32).build().user_data(user_data(
            Op::Writable,
            key,
            gen,
        ));
        // SAFETY: no buffer.
        unsafe { self.push(&e) }
    }

    /// Queues a non-blocking send of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid and unchanged until the send's completion is
    /// reaped.
    pub unsafe fn send(&mut self, fd: RawFd, ptr: *const u8, len: usize, key: usize, gen: u32) {
        let e = opcode::Send::new(types::Fd(fd), ptr, len as u32)
            .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(Op::Send, key, gen));
        // SAFETY: passed on to the caller.
        unsafe { self.push(&e) }
    }

    /// Cancels a session's receive and, if armed, its wait for POLLOUT (before its
    /// descriptor closes or goes to a glommio stream for a lingering close). Cancelling
    /// by user data finds the request by hash; by descriptor would scan every request.
    pub fn cancel(&mut self, key: usize, gen: u32, writable_armed: bool) {
        self.cancel_op(Op::Recv, key, gen);
        if writable_armed {
            self.cancel_op(Op::Writable, key, gen);
        }
    }

    /// Cancels the request with this op, key and generation.
    pub fn cancel_op(&mut self, op: Op, key: usize, gen: u32) {
        let e = opcode::AsyncCancel::new(user_data(op, key, gen)).build().user_data(user_data(Op::Cancel, 0, 0));
        // SAFETY: no buffer.
        unsafe { self.push(&e) }
    }

    /// Submits what is queued.
    pub fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            tracing::error!("io_uring submit failed: {e}");
        }
    }

    /// Submits what is queued and waits for at least `n` completions.
    pub fn submit_and_wait(&mut self, n: usize) {
        if let Err(e) = self.ring.submit_and_wait(n) {
            if e.raw_os_error() != Some(libc::EINTR) {
                tracing::error!("io_uring submit failed: {e}");
            }
        }
    }

    /// Submits what is queued and waits up to `timeout` for a completion (Linux 5.11's
    /// `IORING_FEAT_EXT_ARG`). Returns early on a signal; the caller looks at the
    /// queue either way.
    pub fn submit_and_wait_for(&mut self, timeout: std::time::Duration) {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        if let Err(e) = self.ring.submitter().submit_with_args(1, &args) {
            if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::ETIME)) {
                tracing::error!("io_uring submit failed: {e}");
            }
        }
    }

    /// Whether completions wait to be reaped.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Moves every posted completion into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        let cq = self.ring.completion();
        out.extend(cq.filter_map(|c| decode(c.user_data(), c.result(), c.flags())));
    }

    /// The first `len` bytes of receive buffer `bid`.
    pub fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        let at = bid as usize * BUF_SIZE;
        &self.bufs[at..at + len.min(BUF_SIZE)]
    }

    /// Gives buffer `bid` back to the kernel (visible after [`Self::publish`]).
    pub fn recycle(&mut self, bid: u16) {
        let base = self.entries.as_mut_ptr() as *mut types::BufRingEntry;
        let slot = (self.tail & (self.buf_count - 1)) as usize;
        // SAFETY: slot < buf_count, inside the entries mapping.
        let e = unsafe { &mut *base.add(slot) };
        e.set_addr(self.bufs.as_ptr() as u64 + (bid as usize * BUF_SIZE) as u64);
        e.set_len(BUF_SIZE as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes recycled buffers to the kernel.
    pub fn publish(&mut self) {
        let base = self.entries.as_ptr() as *const types::BufRingEntry;
        // SAFETY: the tail field of the first entry, which the kernel reads atomically.
        let tail = unsafe { &*(types::BufRingEntry::tail(base) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }
}

/// Calls `wake` each time the ring behind `event` (its eventfd, see
/// [`SessionRing::eventfd`]) posts completions, reading the eventfd through glommio's
/// reactor so the thread sleeps in one place. Returns only the error that stopped it
/// (the caller decides whether to watch again).
pub async fn watch(event: RawFd, wake: impl Fn()) -> io::Error {
    // SAFETY: dup returns a new descriptor we own, or -1 which is checked.
    let fd = unsafe { libc::dup(event) };
    if fd < 0 {
        return io::Error::last_os_error();
    }
    // SAFETY: fd is a fresh eventfd descriptor; the file owns it from here.
    let file = unsafe { glommio::io::BufferedFile::from_raw_fd(fd) };
    loop {
        if let Err(e) = file.read_at(0, 8).await {
            return e.into();
        }
        wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn user_data_round_trips() {
        let c = decode(user_data(Op::Send, 123_456, 0x1234_5678), 7, 0).unwrap();
        assert_eq!((c.op, c.key, c.gen, c.res), (Op::Send, 123_456, gen24(0x1234_5678), 7));
        assert!(decode(0, 0, 0).is_none());
    }

    #[test]
    fn multishot_receive_and_batched_send() {
        let mut ring = SessionRing::new().expect("io_uring with provided-buffer rings");
        let (mut a, b) = UnixStream::pair().unwrap();
        let fd = b.as_raw_fd();
        ring.arm_recv(Op::Recv, fd, 5, 9);
        ring.submit();
        let mut got = Vec::new();
        for chunk in [&b"hello"[..], b"world!"] {
            a.write_all(chunk).unwrap();
            let mut cs = Vec::new();
            while cs.is_empty() {
                ring.submit_and_wait(1);
                ring.drain(&mut cs);
            }
            let c = cs[0];
            assert_eq!((c.op, c.key, c.gen), (Op::Recv, 5, 9));
            assert!(c.more(), "the receive stays armed");
            let bid = c.buffer().expect("a provided buffer");
            got.extend_from_slice(ring.buffer(bid, c.res as usize));
            ring.recycle(bid);
            ring.publish();
        }
        assert_eq!(got, b"helloworld!");

        let out = b"frames".to_vec();
        // SAFETY: `out` lives until the completion is reaped below.
        unsafe { ring.send(fd, out.as_ptr(), out.len(), 5, 9) };
        let mut cs = Vec::new();
        while !cs.iter().any(|c: &Completion| c.op == Op::Send) {
            ring.submit_and_wait(1);
            ring.drain(&mut cs);
        }
        assert_eq!(cs.iter().find(|c| c.op == Op::Send).unwrap().res, 6);
        let mut buf = [0u8; 6];
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"frames");

        // Closing the peer ends the multishot receive with 0 (end of stream).
        drop(a);
        let mut cs = Vec::new();
        while !cs.iter().any(|c: &Completion| c.op == Op::Recv && !c.more()) {
            ring.submit_and_wait(1);
            ring.drain(&mut cs);
        }
        assert_eq!(cs.iter().find(|c| !c.more()).unwrap().res, 0);
    }

    #[test]
    fn a_quiet_ring_posts_completions_without_signalling_its_eventfd() {
        let signalled = |ring: &SessionRing| {
            let mut p = libc::pollfd { fd: ring.eventfd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one live pollfd, no timeout.
            unsafe { libc::poll(&mut p, 1, 0) == 1 }
        };
        let send = |ring: &mut SessionRing, fd: RawFd| {
            let out = b"x";
            // SAFETY: `out` is static; the completion is reaped below.
            unsafe { ring.send(fd, out.as_ptr(), 1, 1, 1) };
            let mut cs = Vec::new();
            while cs.is_empty() {
                ring.submit_and_wait(1);
                ring.drain(&mut cs);
            }
            assert_eq!(cs[0].res, 1);
        };
        let mut ring = SessionRing::new().unwrap();
        let (_a, b) = UnixStream::pair().unwrap();
        ring.quiet(true);
        send(&mut ring, b.as_raw_fd());
        assert!(!signalled(&ring), "a quiet ring signalled its eventfd");
        ring.quiet(false);
        send(&mut ring, b.as_raw_fd());
        assert!(signalled(&ring), "the eventfd was not signalled once the ring was loud again");
    }

    #[test]
    fn receive_ends_with_enobufs_when_every_buffer_is_taken_and_rearms() {
        // What the session driver relies on: with all buffers held, the multishot
        // receive ends with ENOBUFS (no data lost: it stays in the socket), and a
        // receive armed again after buffers are returned reads the rest.
        let mut ring = SessionRing::new().unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let total = (BUF_COUNT as usize + 100) * BUF_SIZE;
        let writer = std::thread::spawn(move || {
            let data: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
            a.write_all(&data).unwrap();
            a
        });
        ring.arm_recv(Op::Recv, b.as_raw_fd(), 1, 1);
        ring.submit();
        let mut got = Vec::with_capacity(total);
        let mut held = Vec::new();
        let mut ended_enobufs = false;
        while got.len() < total {
            let mut cs = Vec::new();
            ring.submit_and_wait(1);
            ring.drain(&mut cs);
            for c in cs {
                if let Some(bid) = c.buffer() {
                    got.extend_from_slice(ring.buffer(bid, c.res as usize));
                    held.push(bid);
                }
                if !c.more() {
                    assert_eq!(c.res, -libc::ENOBUFS, "the receive ended for another reason");
                    ended_enobufs = true;
                    for bid in held.drain(..) {
                        ring.recycle(bid);
                    }
                    ring.publish();
                    ring.arm_recv(Op::Recv, b.as_raw_fd(), 1, 1);
                }
            }
        }
        assert!(ended_enobufs, "{total} bytes fit in the buffers without running out");
        assert!(got.iter().enumerate().all(|(i, &v)| v == (i % 253) as u8), "bytes lost or reordered");
        drop(writer.join().unwrap());
    }
}
