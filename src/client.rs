//! Client library: a device client and an app client, async on glommio.
//!
//! Used by the CLI (`ringpush device`, `ringpush push`), the black-box tests and the
//! load generator; app teams on glommio can use it as is, and teams on other runtimes
//! use the sans-IO `ringpush-protocol` crate the same way this module does.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ringpush::client::ClientError> {
//! use ringpush::client::{AppClient, DeviceClient, DeviceEvent, PushOutcome, PushTarget};
//! let mut app = AppClient::connect("127.0.0.1:7100", "demo", b"app-secret-0123456").await?;
//! let token = app.mint_token("phone-1", 86_400);
//! let mut dev = DeviceClient::connect("127.0.0.1:7000", "demo", "phone-1", token, 0).await?;
//! let PushOutcome::Accepted(push_id) = app.push(PushTarget::Device("phone-1"), 0, b"hi").await? else {
//!     panic!("not accepted")
//! };
//! if let DeviceEvent::Message(m) = dev.next_event().await? {
//!     assert_eq!(m.push_id, push_id);
//!     dev.ack(m.seq).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! An app that pushes a lot keeps one connection per shard and sends each unicast on
//! the connection of the device's owner shard, so the server never moves it between
//! cores ("Shard-aware apps" in docs/protocol.md):
//!
//! ```no_run
//! # async fn demo() -> Result<(), ringpush::client::ClientError> {
//! use ringpush::client::{AppClient, PushTarget};
//! let (addr, secret) = ("127.0.0.1:7100", b"app-secret-0123456");
//! let shards = AppClient::connect(addr, "demo", secret).await?.shards;
//! let mut apps = Vec::new();
//! for shard in 0..shards {
//!     apps.push(AppClient::connect_to_shard(addr, "demo", secret, shard, shards).await?);
//! }
//! let device = "phone-1";
//! let owner = ringpush::routing::shard_for("demo", device, usize::from(shards));
//! apps[owner].push(PushTarget::Device(device), 0, b"hi").await?;
//! # Ok(()) }
//! ```

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use ringpush_protocol::app::{encode_push_list, AppFrame, Auth, Push, Target};
use ringpush_protocol::device::{Ack, DeviceFrame, Hello, Welcome};
use ringpush_protocol::{token, DecodeError, DeviceToken, ErrorCode, Limits, Preamble, Receipt, Role, PREAMBLE_LEN};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    Io(std::io::Error),
    /// The server sent ERROR (or BYE) with this code and reason.
    Server {
        code: ErrorCode,
        message: String,
    },
    /// The server's bytes did not decode.
    Protocol(DecodeError),
    /// The connection closed.
    Closed,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "i/o error: {e}"),
            ClientError::Server { code, message } => write!(f, "server error {code}: {message}"),
            ClientError::Protocol(e) => write!(f, "protocol error: {e}"),
            ClientError::Closed => f.write_str("connection closed"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// An ERROR frame from the server.
impl From<ringpush_protocol::ErrorFrame<'_>> for ClientError {
    fn from(e: ringpush_protocol::ErrorFrame<'_>) -> Self {
        ClientError::Server { code: e.code, message: e.message.into() }
    }
}

impl From<glommio::GlommioError<()>> for ClientError {
    fn from(e: glommio::GlommioError<()>) -> Self {
        ClientError::Io(e.into())
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Connects and sends `first` (preamble and HELLO/AUTH) with TCP Fast Open: when the
/// kernel holds a cookie from an earlier connection to the server, `first` rides in the
/// SYN and the handshake saves a round trip; otherwise the kernel asks for a cookie and
/// sends `first` after the usual three-way handshake. Returns the stream and how many
/// bytes of `first` are already on their way (the caller writes the rest).
/// With `local_port`, the connection leaves from that port (see
/// [`AppClient::connect_to_shard`]).
fn connect_sending(addr: SocketAddr, first: &[u8], local_port: Option<u16>) -> std::io::Result<(TcpStream, usize)> {
    let (fd, sent) = open_sending(addr, first, local_port)?;
    // SAFETY: the descriptor is a TCP socket we own; the stream takes it over.
    Ok((unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }, sent))
}

/// The socket under [`connect_sending`], for a caller that drives its sockets itself
/// (e.g. on an io_uring of its own, as the load generator does with
/// [`hello_bytes`]): a non-blocking, close-on-exec TCP socket with `TCP_NODELAY`,
/// connecting to `addr`, and how many bytes of `first` it has sent. When that is less
/// than all of them (no Fast Open cookie yet, so the SYN went without data), the rest is
/// the caller's to write once the socket is writable.
pub fn open_sending(
    addr: SocketAddr,
    first: &[u8],
    local_port: Option<u16>,
) -> std::io::Result<(std::os::fd::OwnedFd, usize)> {
    let ty = socket2::Type::STREAM.nonblocking().cloexec();
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    s.set_nodelay(true)?;
    if let Some(port) = local_port {
        let any: SocketAddr = match addr {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, port).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
        };
        s.bind(&any.into())?;
    }
    // Without it (a kernel that lacks it) the connect below is an ordinary one.
    let fastopen = crate::server::set_int_opt(&s, libc::IPPROTO_TCP, libc::TCP_FASTOPEN_CONNECT, 1).is_ok();
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let sent = if fastopen {
        match s.send_with_flags(first, libc::MSG_NOSIGNAL) {
            Ok(n) => n,
            // No cookie yet (the SYN went without data), or still connecting.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINPROGRESS | libc::EAGAIN)) => 0,
            Err(e) => return Err(e),
        }
    } else {
        0
    };
    Ok((s.into(), sent))
}

/// What a device sends first: the client preamble, then its HELLO (`last_acked` and
/// `cursor` as for [`DeviceClient::connect_resume`]).
pub fn hello_bytes(app: &str, device: &str, token: &DeviceToken, last_acked: u64, cursor: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(&Preamble::client(Role::Device).encode());
    DeviceFrame::Hello(Hello {
        app_id: app,
        device_id: device,
        token: token.0,
        last_acked_seq: last_acked,
        broadcast_cursor: cursor,
        capabilities: 0,
    })
    .encode(&mut b);
    b
}

/// The first address `addr` resolves to.
fn first_addr(addr: impl ToSocketAddrs) -> std::io::Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address"))
}

/// A descriptor of its own for a glommio stream's socket (glommio streams cannot give
/// theirs up): the socket stays open after the stream is dropped.
pub fn dup_socket(stream: &TcpStream) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor; the result is checked.
    let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A byte stream with a receive buffer and frame decoding.
struct Conn {
    stream: TcpStream,
    /// Received bytes are `buf[start..end]`; the rest is room for the next read.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    limits: Limits,
    /// How much the buffer grows by when less than a quarter of it is free: a device
    /// gets a page (a socket's default receive buffer holds about that much, and a
    /// million devices must not each zero 16 KiB), an app connection more.
    chunk: usize,
}

impl Conn {
    /// Connects and sends `first` (the client preamble and the opening frame).
    async fn open(
        addr: impl ToSocketAddrs,
        role: Role,
        first: &[u8],
        local_port: Option<u16>,
    ) -> Result<Conn, ClientError> {
        let addr = first_addr(addr)?;
        let (mut stream, sent) = connect_sending(addr, first, local_port)?;
        stream.write_all(&first[sent..]).await?;
        let mut c = Conn {
            stream,
            buf: Vec::new(),
            start: 0,
            end: 0,
            limits: Limits { max_frame: ringpush_protocol::wire::MAX_FRAME_CEILING, max_targets: u16::MAX },
            chunk: match role {
                Role::Device => 4096,
                Role::App => 16 * 1024,
            },
        };
        while c.end < PREAMBLE_LEN {
            c.fill().await?;
        }
        match Preamble::decode(&c.buf[..PREAMBLE_LEN]) {
            Ok(Some(_)) => c.start = PREAMBLE_LEN,
            // No preamble: the server rejected ours and sent a bare ERROR frame.
            Err(_) => {}
            Ok(None) => unreachable!("8 bytes are a whole preamble"),
        }
        Ok(c)
    }

    /// Reads more bytes. Cancel-safe: received bytes count only once the read returns,
    /// so a caller may drop this (e.g. a timeout around `next_event`) and lose nothing.
    async fn fill(&mut self) -> Result<(), ClientError> {
        self.make_room();
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        self.end += n;
        Ok(())
    }

    /// Reads what the socket holds now, without waiting; returns the bytes read. Not
    /// while a [`Conn::fill`] is pending (nothing else reads the stream meanwhile).
    fn fill_now(&mut self) -> Result<usize, ClientError> {
        use std::os::fd::AsRawFd;
        self.make_room();
        let free = &mut self.buf[self.end..];
        // SAFETY: `free` is a live, writable buffer of the length given; the descriptor
        // is the stream's open socket.
        let n =
            unsafe { libc::recv(self.stream.as_raw_fd(), free.as_mut_ptr().cast(), free.len(), libc::MSG_DONTWAIT) };
        match n {
            0 => Err(ClientError::Closed),
            n if n > 0 => {
                self.end += n as usize;
                Ok(n as usize)
            }
            _ => match std::io::Error::last_os_error() {
                e if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
                e => Err(e.into()),
            },
        }
    }

    /// Moves unread bytes to the front or grows the buffer, so a read has room.
    fn make_room(&mut self) {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.start > 0 && self.buf.len() - self.end < self.chunk / 4 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.buf.len() - self.end < self.chunk / 4 {
            self.buf.resize(self.end + self.chunk, 0);
        }
    }

    /// Waits for the next whole frame; returns its byte range in `buf`.
    async fn frame(
        &mut self,
        decode: fn(&[u8], &Limits) -> Result<Option<usize>, DecodeError>,
    ) -> Result<(usize, usize), ClientError> {
        loop {
            if let Some(range) = self.buffered(decode)? {
                return Ok(range);
            }
            self.fill().await?;
        }
    }

    /// The next whole frame already received, if any (no read); its byte range in `buf`.
    fn buffered(
        &mut self,
        decode: fn(&[u8], &Limits) -> Result<Option<usize>, DecodeError>,
    ) -> Result<Option<(usize, usize)>, ClientError> {
        Ok(decode(&self.buf[self.start..self.end], &self.limits).map_err(ClientError::Protocol)?.map(|n| {
            let s = self.start;
            self.start += n;
            (s, s + n)
        }))
    }
}

fn device_len(b: &[u8], l: &Limits) -> Result<Option<usize>, DecodeError> {
    DeviceFrame::decode(b, l).map(|o| o.map(|(_, n)| n))
}

fn app_len(b: &[u8], l: &Limits) -> Result<Option<usize>, DecodeError> {
    AppFrame::decode(b, l).map(|o| o.map(|(_, n)| n))
}

/// A message received by a device, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub seq: u64,
    pub push_id: u64,
    pub expiry_ms: u64,
    pub broadcast: bool,
    pub payload: Vec<u8>,
}

/// When a device acks: cumulative acks of both streams, coalesced so they do not add a
/// packet per message. Ack once `every` messages are unacked, or once `delay` has
/// passed since the first unacked one arrived (like TCP's delayed ACK). Keep `every` at
/// most half the server's window (64 by default), so the window never fills while an
/// ack waits. `every: 1` acks each burst of messages read together.
#[derive(Clone, Copy, Debug)]
pub struct AckPolicy {
    pub every: u32,
    pub delay: std::time::Duration,
}

/// Tracks what a device received and when it owes an ack, per [`AckPolicy`].
#[derive(Debug)]
pub struct Acker {
    policy: AckPolicy,
    /// Highest unicast and broadcast seq received.
    pub seq: u64,
    pub bseq: u64,
    unacked: u32,
    since: Option<std::time::Instant>,
}

impl Acker {
    pub fn new(policy: AckPolicy, seq: u64, bseq: u64) -> Self {
        Acker { policy, seq, bseq, unacked: 0, since: None }
    }

    /// Records a received message; false if its seq was seen before (a redelivery).
    pub fn received(&mut self, m: &Received) -> bool {
        self.saw(m.seq, m.broadcast)
    }

    /// [`Self::received`] from a message's seq and stream.
    pub fn saw(&mut self, seq: u64, broadcast: bool) -> bool {
        let seen = if broadcast { &mut self.bseq } else { &mut self.seq };
        if seq <= *seen {
            return false;
        }
        *seen = seq;
        self.unacked += 1;
        self.since.get_or_insert_with(std::time::Instant::now);
        true
    }

    /// Whether an ack is due now: enough unacked, or the oldest waited long enough.
    pub fn due(&self) -> bool {
        self.unacked >= self.policy.every || self.since.is_some_and(|t| t.elapsed() >= self.policy.delay)
    }

    /// Whether any message received is not acked yet.
    pub fn owes(&self) -> bool {
        self.unacked > 0
    }

    /// Takes the server's view from a WELCOME: what it considers acked was processed.
    pub fn resume(&mut self, w: &Welcome) {
        self.seq = self.seq.max(w.acked_seq);
        self.bseq = self.bseq.max(w.broadcast_cursor);
    }

    /// Encodes the cumulative ACK of both streams into `out`, for a caller that writes
    /// to the socket itself.
    pub fn encode_ack(&mut self, out: &mut Vec<u8>) {
        self.unacked = 0;
        self.since = None;
        DeviceFrame::Ack(Ack { seq: self.seq, broadcast_seq: self.bseq }).encode(out);
    }

    /// Sends the cumulative ACK of both streams.
    pub async fn ack(&mut self, dev: &mut DeviceClient) -> Result<(), ClientError> {
        let mut frame = Vec::with_capacity(32);
        self.encode_ack(&mut frame);
        dev.send_raw(&frame).await
    }
}

/// What a device connection produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    Message(Received),
    Pong(u64),
    /// The server closed the session (reason, redirect).
    Bye(ErrorCode, String),
}

/// A device connection.
pub struct DeviceClient {
    conn: Conn,
    pub welcome: Welcome,
    out: Vec<u8>,
}

impl DeviceClient {
    /// Connects, sends HELLO and waits for WELCOME. `last_acked` is the highest seq
    /// this device has processed (0 on first start).
    pub async fn connect(
        addr: impl ToSocketAddrs,
        app: &str,
        device: &str,
        token: DeviceToken,
        last_acked: u64,
    ) -> Result<DeviceClient, ClientError> {
        Self::connect_resume(addr, app, device, token, last_acked, 0).await
    }

    /// Like [`DeviceClient::connect`], also stating the highest broadcast seq the
    /// device has processed (`cursor`), so broadcasts resume after it.
    pub async fn connect_resume(
        addr: impl ToSocketAddrs,
        app: &str,
        device: &str,
        token: DeviceToken,
        last_acked: u64,
        cursor: u64,
    ) -> Result<DeviceClient, ClientError> {
        let hello = hello_bytes(app, device, &token, last_acked, cursor);
        let mut conn = Conn::open(addr, Role::Device, &hello, None).await?;
        let (a, b) = conn.frame(device_len).await?;
        let welcome = match DeviceFrame::decode(&conn.buf[a..b], &conn.limits).map_err(ClientError::Protocol)? {
            Some((DeviceFrame::Welcome(w), _)) => w,
            Some((DeviceFrame::Error(e), _)) => return Err(ClientError::from(e)),
            // Another node of the fleet owns the device: the message is where to go.
            Some((DeviceFrame::Bye(b), _)) => {
                return Err(ClientError::Server { code: b.reason, message: b.redirect.to_string() })
            }
            Some((f, _)) => {
                return Err(ClientError::Server {
                    code: ErrorCode::UNEXPECTED_FRAME,
                    message: format!("expected WELCOME, got {f:?}"),
                })
            }
            None => unreachable!("frame() returns whole frames"),
        };
        Ok(DeviceClient { conn, welcome, out: Vec::with_capacity(64) })
    }

    /// The next message, PONG or BYE. PINGs from the server are answered here.
    pub async fn next_event(&mut self) -> Result<DeviceEvent, ClientError> {
        loop {
            let (a, b) = self.conn.frame(device_len).await?;
            let frame = DeviceFrame::decode(&self.conn.buf[a..b], &self.conn.limits)
                .map_err(ClientError::Protocol)?
                .expect("whole frame")
                .0;
            match frame {
                DeviceFrame::Message(m) => {
                    return Ok(DeviceEvent::Message(Received {
                        seq: m.seq,
                        push_id: m.push_id,
                        expiry_ms: m.expiry_ms,
                        broadcast: m.flags & ringpush_protocol::device::FLAG_BROADCAST != 0,
                        payload: m.payload.to_vec(),
                    }))
                }
                DeviceFrame::Pong(n) => return Ok(DeviceEvent::Pong(n)),
                DeviceFrame::Bye(b) => return Ok(DeviceEvent::Bye(b.reason, b.redirect.to_string())),
                DeviceFrame::Error(e) => return Err(ClientError::from(e)),
                DeviceFrame::Ping(n) => {
                    let mut o = Vec::new();
                    DeviceFrame::Pong(n).encode(&mut o);
                    self.conn.stream.write_all(&o).await?;
                }
                other => {
                    return Err(ClientError::Server {
                        code: ErrorCode::UNEXPECTED_FRAME,
                        message: format!("unexpected {other:?}"),
                    })
                }
            }
        }
    }

    /// Waits for at least one frame, then handles every whole frame already buffered:
    /// each MESSAGE goes to `on_message` borrowed from the read buffer (no copy, no
    /// await per message), PINGs are answered. Returns the first other event (PONG,
    /// BYE) that ends the batch, or `None` once the buffered frames are used up: the
    /// moment to decide on an ack. For receive loops that must keep up with a flood.
    pub async fn read_batch(
        &mut self,
        on_message: &mut impl FnMut(&ringpush_protocol::device::Message<'_>),
    ) -> Result<Option<DeviceEvent>, ClientError> {
        enum Step {
            More,
            Ping(u64),
            Done(DeviceEvent),
        }
        let mut handled = false;
        loop {
            let c = &mut self.conn;
            let decoded = DeviceFrame::decode(&c.buf[c.start..c.end], &c.limits).map_err(ClientError::Protocol)?;
            let (step, n) = match decoded {
                None if handled => return Ok(None),
                None => {
                    c.fill().await?;
                    continue;
                }
                Some((DeviceFrame::Message(m), n)) => {
                    on_message(&m);
                    (Step::More, n)
                }
                Some((DeviceFrame::Ping(x), n)) => (Step::Ping(x), n),
                Some((DeviceFrame::Pong(x), n)) => (Step::Done(DeviceEvent::Pong(x)), n),
                Some((DeviceFrame::Bye(b), n)) => (Step::Done(DeviceEvent::Bye(b.reason, b.redirect.to_string())), n),
                Some((DeviceFrame::Error(e), _)) => return Err(ClientError::from(e)),
                Some((other, _)) => {
                    return Err(ClientError::Server {
                        code: ErrorCode::UNEXPECTED_FRAME,
                        message: format!("unexpected {other:?}"),
                    })
                }
            };
            c.start += n;
            handled = true;
            match step {
                Step::More => {}
                Step::Ping(x) => {
                    let mut o = Vec::new();
                    DeviceFrame::Pong(x).encode(&mut o);
                    self.conn.stream.write_all(&o).await?;
                }
                Step::Done(ev) => return Ok(Some(ev)),
            }
        }
    }

    /// Whether a whole frame is already buffered (so `next_event` will not wait).
    pub fn has_buffered_frame(&self) -> bool {
        let c = &self.conn;
        matches!(device_len(&c.buf[c.start..c.end], &c.limits), Ok(Some(_)))
    }

    /// Cumulative ACK of every unicast message with seq ≤ `seq`.
    pub async fn ack(&mut self, seq: u64) -> Result<(), ClientError> {
        self.send(DeviceFrame::Ack(Ack { seq, broadcast_seq: 0 })).await
    }

    /// Cumulative ACK of both streams: unicast seq ≤ `seq`, broadcast seq ≤ `bseq`.
    pub async fn ack_both(&mut self, seq: u64, bseq: u64) -> Result<(), ClientError> {
        self.send(DeviceFrame::Ack(Ack { seq, broadcast_seq: bseq })).await
    }

    pub async fn ping(&mut self, nonce: u64) -> Result<(), ClientError> {
        self.send(DeviceFrame::Ping(nonce)).await
    }

    /// Sends raw bytes (tests use this to send malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        Ok(self.conn.stream.write_all(bytes).await?)
    }

    async fn send(&mut self, f: DeviceFrame<'_>) -> Result<(), ClientError> {
        self.out.clear();
        f.encode(&mut self.out);
        Ok(self.conn.stream.write_all(&self.out).await?)
    }

    /// Says BYE and closes.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.send(DeviceFrame::Bye(ringpush_protocol::Bye { reason: ErrorCode::OK, redirect: "" })).await?;
        self.conn.stream.close().await?;
        Ok(())
    }
}

/// Who a push goes to (client side).
#[derive(Clone, Copy, Debug)]
pub enum PushTarget<'a> {
    Device(&'a str),
    List(&'a [String]),
    App,
}

/// The server's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Accepted(u64),
    Rejected(ErrorCode, String),
    Busy(u32),
}

/// A reply read from an app connection, with the request id it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppReply {
    Push(u64, PushOutcome),
    Receipt(Receipt),
    Pong(u64),
}

/// An authenticated app connection. Requests may be pipelined: queue them with
/// [`AppClient::queue_push`], send with [`AppClient::flush`], read replies with
/// [`AppClient::next_reply`] (in any order, matched by request id).
pub struct AppClient {
    conn: Conn,
    out: Vec<u8>,
    next_request: u64,
    app: String,
    secret: Vec<u8>,
    pub limits: Limits,
    /// The shard holding this connection, and how many the server runs (AUTH_OK).
    pub shard: u16,
    pub shards: u16,
}

impl AppClient {
    pub async fn connect(addr: impl ToSocketAddrs, app: &str, secret: &[u8]) -> Result<AppClient, ClientError> {
        Self::open(addr, app, secret, None).await
    }

    /// Connects so that shard `shard` of `shards` (from an earlier connection's AUTH_OK)
    /// holds the connection: the server steers app connections by source port
    /// (`port % shards`), so this picks a free local port of that residue. Pushes sent
    /// here for devices that shard owns (`routing::shard_for`) stay on its core. Where
    /// steering is lost on the way (a NAT rewriting ports) the connection works all
    /// the same, on the shard that `self.shard` names.
    pub async fn connect_to_shard(
        addr: impl ToSocketAddrs,
        app: &str,
        secret: &[u8],
        shard: u16,
        shards: u16,
    ) -> Result<AppClient, ClientError> {
        let addr = first_addr(addr)?;
        let shards = u32::from(shards.max(1));
        let mut last = None;
        for _ in 0..64 {
            // A random port of the right residue in the usual ephemeral range.
            let base = 32_768 + rand::random::<u32>() % 28_000;
            let Ok(port) = u16::try_from(base - base % shards + u32::from(shard) % shards) else {
                continue;
            };
            match Self::open(addr, app, secret, Some(port)).await {
                Err(ClientError::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable) =>
                {
                    last = Some(e)
                }
                other => return other,
            }
        }
        Err(ClientError::Io(last.unwrap_or_else(|| std::io::Error::other("no local port of the shard's residue"))))
    }

    async fn open(
        addr: impl ToSocketAddrs,
        app: &str,
        secret: &[u8],
        local_port: Option<u16>,
    ) -> Result<AppClient, ClientError> {
        let ts = unix_ms();
        let mut auth = Preamble::client(Role::App).encode().to_vec();
        AppFrame::Auth(Auth { app_id: app, timestamp_ms: ts, proof: token::auth_proof(secret, app, ts) })
            .encode(&mut auth);
        let mut conn = Conn::open(addr, Role::App, &auth, local_port).await?;
        let (a, b) = conn.frame(app_len).await?;
        let ok = match AppFrame::decode(&conn.buf[a..b], &conn.limits).map_err(ClientError::Protocol)? {
            Some((AppFrame::AuthOk(ok), _)) => ok,
            Some((AppFrame::Error(e), _)) => return Err(ClientError::from(e)),
            other => {
                return Err(ClientError::Server {
                    code: ErrorCode::UNEXPECTED_FRAME,
                    message: format!("expected AUTH_OK, got {other:?}"),
                })
            }
        };
        Ok(AppClient {
            conn,
            out: Vec::with_capacity(64 * 1024),
            next_request: 1,
            app: app.to_string(),
            secret: secret.to_vec(),
            limits: Limits { max_frame: ok.max_frame, max_targets: ok.max_targets },
            shard: ok.shard,
            shards: ok.shards,
        })
    }

    /// Mints a device token for this app, valid for `ttl_secs`.
    pub fn mint_token(&self, device: &str, ttl_secs: u64) -> DeviceToken {
        DeviceToken::mint(&self.secret, &self.app, device, unix_ms() / 1000 + ttl_secs)
    }

    /// Queues a PUSH (not sent until [`AppClient::flush`]); returns its request id.
    pub fn queue_push(&mut self, target: PushTarget<'_>, ttl_secs: u32, payload: &[u8]) -> u64 {
        let request_id = self.next_request;
        self.next_request += 1;
        match target {
            PushTarget::Device(d) => {
                AppFrame::Push(Push { request_id, ttl_secs, flags: 0, target: Target::Device(d), payload })
                    .encode(&mut self.out)
            }
            PushTarget::List(l) => encode_push_list(&mut self.out, request_id, ttl_secs, l, payload),
            PushTarget::App => AppFrame::Push(Push { request_id, ttl_secs, flags: 0, target: Target::App, payload })
                .encode(&mut self.out),
        }
        request_id
    }

    /// Queues a RECEIPT query; returns its request id.
    pub fn queue_receipt(&mut self, push_id: u64) -> u64 {
        let request_id = self.next_request;
        self.next_request += 1;
        AppFrame::ReceiptQuery { request_id, push_id }.encode(&mut self.out);
        request_id
    }

    /// Queues raw bytes (tests use this to send malformed requests).
    pub fn queue_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.out.is_empty() {
            self.conn.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// The next reply. ERROR from the server is returned as `Err`.
    pub async fn next_reply(&mut self) -> Result<AppReply, ClientError> {
        let (a, b) = self.conn.frame(app_len).await?;
        self.reply_at(a, b)
    }

    /// The next reply if one is already received whole, without reading the socket:
    /// after [`AppClient::next_reply`], a pipelining client takes the rest of the batch
    /// that arrived with it before queueing and flushing more (one write for the lot).
    pub fn try_reply(&mut self) -> Result<Option<AppReply>, ClientError> {
        match self.conn.buffered(app_len)? {
            Some((a, b)) => self.reply_at(a, b).map(Some),
            None => Ok(None),
        }
    }

    /// Reads whatever replies the socket holds now, without waiting, for
    /// [`AppClient::try_reply`] to take: for an app server that sends on a timer and
    /// looks at its replies at each tick, instead of keeping a read armed (and
    /// cancelling it at every tick). Returns the bytes read.
    pub fn read_available(&mut self) -> Result<usize, ClientError> {
        self.conn.fill_now()
    }

    /// Decodes the whole frame at `buf[a..b]` as a reply.
    fn reply_at(&self, a: usize, b: usize) -> Result<AppReply, ClientError> {
        let frame = AppFrame::decode(&self.conn.buf[a..b], &self.conn.limits)
            .map_err(ClientError::Protocol)?
            .expect("whole frame")
            .0;
        Ok(match frame {
            AppFrame::Accepted { request_id, push_id } => AppReply::Push(request_id, PushOutcome::Accepted(push_id)),
            AppFrame::Rejected(r) => AppReply::Push(r.request_id, PushOutcome::Rejected(r.code, r.reason.into())),
            AppFrame::Busy { request_id, retry_after_ms } => {
                AppReply::Push(request_id, PushOutcome::Busy(retry_after_ms))
            }
            AppFrame::Receipt(r) => AppReply::Receipt(r),
            AppFrame::Pong(n) => AppReply::Pong(n),
            AppFrame::Error(e) => return Err(ClientError::from(e)),
            other => {
                return Err(ClientError::Server {
                    code: ErrorCode::UNEXPECTED_FRAME,
                    message: format!("unexpected {other:?}"),
                })
            }
        })
    }

    /// Pushes and waits for the answer (no other requests may be in flight).
    pub async fn push(
        &mut self,
        target: PushTarget<'_>,
        ttl_secs: u32,
        payload: &[u8],
    ) -> Result<PushOutcome, ClientError> {
        let id = self.queue_push(target, ttl_secs, payload);
        self.flush().await?;
        match self.next_reply().await? {
            AppReply::Push(r, outcome) if r == id => Ok(outcome),
            other => Err(ClientError::Server {
                code: ErrorCode::UNEXPECTED_FRAME,
                message: format!("reply for another request: {other:?}"),
            }),
        }
    }

    /// Asks for a push's delivery counts.
    pub async fn receipt(&mut self, push_id: u64) -> Result<Result<Receipt, ErrorCode>, ClientError> {
        let id = self.queue_receipt(push_id);
        self.flush().await?;
        match self.next_reply().await? {
            AppReply::Receipt(r) if r.request_id == id => Ok(Ok(r)),
            AppReply::Push(r, PushOutcome::Rejected(code, _)) if r == id => Ok(Err(code)),
            other => Err(ClientError::Server {
                code: ErrorCode::UNEXPECTED_FRAME,
                message: format!("reply for another request: {other:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_connection_asks_for_fast_open_and_its_first_bytes_arrive_whole() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let first: Vec<u8> = (0..200u8).collect();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().unwrap();
        let expect = first.clone();
        let (tfo, nodelay) = ex.run(async move {
            let (mut stream, sent) = connect_sending(addr, &first, None).unwrap();
            stream.write_all(&first[sent..]).await.unwrap();
            let opt = |name| crate::server::int_opt(&stream, libc::IPPROTO_TCP, name);
            (opt(libc::TCP_FASTOPEN_CONNECT), opt(libc::TCP_NODELAY))
        });
        assert_eq!((tfo, nodelay), (1, 1));
        let (mut peer, _) = listener.accept().unwrap();
        let mut got = vec![0u8; expect.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, expect);
    }

    /// A one-connection app server on loopback: reads the client's preamble and AUTH,
    /// answers AUTH_OK (one shard), then runs `then` with the socket, a scratch buffer
    /// and an emptied output buffer.
    fn app_server(
        then: impl FnOnce(std::net::TcpStream, [u8; 512], Vec<u8>) + Send + 'static,
    ) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut peer, _) = listener.accept().unwrap();
            let mut hello = [0u8; 512];
            let _ = peer.read(&mut hello).unwrap();
            let mut out = crate::session::server_preamble(Role::App).to_vec();
            let ok = ringpush_protocol::app::AuthOk {
                max_frame: 1 << 16,
                max_targets: 100,
                server_time_ms: 1,
                shard: 0,
                shards: 1,
            };
            AppFrame::AuthOk(ok).encode(&mut out);
            peer.write_all(&out).unwrap();
            out.clear();
            then(peer, hello, out)
        });
        (addr, server)
    }

    #[test]
    fn replies_that_arrived_together_are_taken_without_reading_again() {
        use std::io::Write;
        let (addr, server) = app_server(|mut peer, mut hello, mut out| {
            // Once the client says so: two replies in one write, then silence. The
            // client must not need a read for the second one.
            peer.read_exact(&mut hello[..1]).unwrap();
            AppFrame::Accepted { request_id: 1, push_id: 10 }.encode(&mut out);
            AppFrame::Accepted { request_id: 2, push_id: 20 }.encode(&mut out);
            peer.write_all(&out).unwrap();
            let _ = peer.read(&mut hello);
        });
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().unwrap();
        let got = ex.run(async move {
            let mut app = AppClient::connect(addr, "app", b"secret").await.unwrap();
            assert!(app.try_reply().unwrap().is_none(), "nothing arrived yet");
            app.queue_raw(b"!");
            app.flush().await.unwrap();
            let first = app.next_reply().await.unwrap();
            let second = app.try_reply().unwrap();
            let third = app.try_reply().unwrap();
            (format!("{first:?}"), format!("{second:?}"), third.is_none())
        });
        assert_eq!(got.0, format!("{:?}", AppReply::Push(1, PushOutcome::Accepted(10))));
        assert_eq!(got.1, format!("{:?}", Some(AppReply::Push(2, PushOutcome::Accepted(20)))));
        assert!(got.2, "no third reply");
        server.join().unwrap();
    }

    #[test]
    fn read_available_takes_what_arrived_without_waiting_and_reports_a_close() {
        use std::io::Write;
        let (addr, server) = app_server(|mut peer, mut hello, mut out| {
            peer.read_exact(&mut hello[..1]).unwrap();
            AppFrame::Accepted { request_id: 1, push_id: 10 }.encode(&mut out);
            peer.write_all(&out).unwrap();
            // Then close once the client has taken it.
            peer.read_exact(&mut hello[..1]).unwrap();
        });
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().unwrap();
        let (idle, got, closed) = ex.run(async move {
            let mut app = AppClient::connect(addr, "app", b"secret").await.unwrap();
            let idle = app.read_available().unwrap();
            app.queue_raw(b"!");
            app.flush().await.unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut got = None;
            while got.is_none() && std::time::Instant::now() < deadline {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                app.read_available().unwrap();
                got = app.try_reply().unwrap();
            }
            app.queue_raw(b"!");
            app.flush().await.unwrap();
            let mut closed = None;
            while closed.is_none() && std::time::Instant::now() < deadline {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                closed = app.read_available().err();
            }
            (idle, format!("{got:?}"), format!("{closed:?}"))
        });
        assert_eq!(idle, 0, "nothing to read yet, and no waiting for it");
        assert_eq!(got, format!("{:?}", Some(AppReply::Push(1, PushOutcome::Accepted(10)))));
        assert_eq!(closed, format!("{:?}", Some(ClientError::Closed)));
        server.join().unwrap();
    }

    #[test]
    fn connecting_to_a_closed_port_is_an_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().unwrap();
        let err = ex.run(async move { DeviceClient::connect(port, "app", "dev", DeviceToken([0; 40]), 0).await.err() });
        assert!(matches!(err, Some(ClientError::Io(_))), "got {err:?}");
    }
}
