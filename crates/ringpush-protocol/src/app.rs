//! App protocol frames: application servers push messages through these.
//!
//! | type | frame         | direction    |
//! |------|---------------|--------------|
//! | 0x21 | AUTH          | app → server |
//! | 0x22 | AUTH_OK       | server → app |
//! | 0x23 | PUSH          | app → server |
//! | 0x24 | ACCEPTED      | server → app |
//! | 0x25 | REJECTED      | server → app |
//! | 0x26 | BUSY          | server → app |
//! | 0x27 | RECEIPT_QUERY | app → server |
//! | 0x28 | RECEIPT       | server → app |
//! | 0x05 | PING          | either       |
//! | 0x06 | PONG          | either       |
//! | 0x0F | ERROR         | server → app |
//!
//! Requests carry a `request_id` chosen by the app; replies echo it, so many requests
//! may be in flight on one connection and replies may come back in any order.

use crate::device::{ERROR, PING, PONG};
use crate::error::{DecodeError, ErrorCode, ErrorFrame};
use crate::wire::{self, Limits, Reader, MAX_APP_ID, MAX_DEVICE_ID};

pub const AUTH: u8 = 0x21;
pub const AUTH_OK: u8 = 0x22;
pub const PUSH: u8 = 0x23;
pub const ACCEPTED: u8 = 0x24;
pub const REJECTED: u8 = 0x25;
pub const BUSY: u8 = 0x26;
pub const RECEIPT_QUERY: u8 = 0x27;
pub const RECEIPT: u8 = 0x28;

/// PUSH target kinds.
pub const TARGET_DEVICE: u8 = 1;
pub const TARGET_LIST: u8 = 2;
pub const TARGET_APP: u8 = 3;

fn known(ty: u8) -> bool {
    matches!(ty, AUTH..=RECEIPT | PING | PONG | ERROR)
}

/// First frame of an app connection: proves knowledge of the app secret without
/// sending it (see [`crate::token::auth_proof`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Auth<'a> {
    pub app_id: &'a str,
    /// Unix milliseconds when the proof was made; the server allows a bounded skew.
    pub timestamp_ms: u64,
    pub proof: [u8; 32],
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AuthOk {
    pub max_frame: u32,
    pub max_targets: u16,
    pub server_time_ms: u64,
    /// The shard that holds this connection, of `shards`: a client that sends each
    /// push on a connection held by the target device's owner shard spares the server
    /// a hop between cores (see "Shard-aware apps" in docs/protocol.md).
    pub shard: u16,
    pub shards: u16,
}

/// A multicast list, validated at decode time and iterated without allocation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DeviceList<'a> {
    count: u16,
    raw: &'a [u8],
}

impl<'a> DeviceList<'a> {
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterates over the device ids (already validated).
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut r = Reader::new(self.raw);
        (0..self.count).map_while(move |_| r.str8().ok())
    }

    fn read(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        let count = r.u16()?;
        if count == 0 {
            return Err(DecodeError::new(ErrorCode::BAD_FRAME, "empty device list"));
        }
        if count > limits.max_targets {
            return Err(DecodeError::new(ErrorCode::TOO_MANY_TARGETS, "device list longer than the maximum"));
        }
        let all = r.rest();
        let mut scan = Reader::new(all);
        for _ in 0..count {
            scan.id(MAX_DEVICE_ID)?;
        }
        let used = all.len() - scan.rest().len();
        *r = Reader::new(&all[used..]);
        Ok(DeviceList { count, raw: &all[..used] })
    }

    /// Encodes a list of ids into `out` in list wire form (`u16` count then `str8`s).
    fn write<S: AsRef<str>>(out: &mut Vec<u8>, ids: &[S]) {
        let n = u16::try_from(ids.len()).expect("device list longer than 65535");
        out.extend_from_slice(&n.to_be_bytes());
        for id in ids {
            assert!(id.as_ref().len() <= MAX_DEVICE_ID);
            wire::put_str8(out, id.as_ref());
        }
    }
}

/// Who a PUSH goes to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target<'a> {
    Device(&'a str),
    List(DeviceList<'a>),
    App,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Push<'a> {
    pub request_id: u64,
    /// Seconds the message may wait for an offline device; 0 means the server default.
    pub ttl_secs: u32,
    /// Reserved flag bits (none defined in version 1; must be 0).
    pub flags: u8,
    pub target: Target<'a>,
    pub payload: &'a [u8],
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Rejected<'a> {
    pub request_id: u64,
    pub code: ErrorCode,
    pub reason: &'a str,
}

/// Delivery counts for one push, summed over the server's shards.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Receipt {
    pub request_id: u64,
    pub push_id: u64,
    /// Messages created (devices addressed that the server knows or could queue for).
    pub targeted: u64,
    /// Messages acked by their device.
    pub delivered: u64,
    /// Messages waiting for an offline or not-yet-acking device.
    pub stored: u64,
    /// Messages dropped because their TTL passed before delivery.
    pub expired: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AppFrame<'a> {
    Auth(Auth<'a>),
    AuthOk(AuthOk),
    Push(Push<'a>),
    Accepted { request_id: u64, push_id: u64 },
    Rejected(Rejected<'a>),
    Busy { request_id: u64, retry_after_ms: u32 },
    ReceiptQuery { request_id: u64, push_id: u64 },
    Receipt(Receipt),
    Ping(u64),
    Pong(u64),
    Error(ErrorFrame<'a>),
}

impl<'a> AppFrame<'a> {
    /// Decodes the first frame in `buf`: `Ok(Some((frame, consumed)))`, `Ok(None)` when
    /// more bytes are needed, or the error to report before closing.
    pub fn decode(buf: &'a [u8], limits: &Limits) -> Result<Option<(AppFrame<'a>, usize)>, DecodeError> {
        let Some(n) = wire::check_frame(buf, limits, known)? else {
            return Ok(None);
        };
        Ok(Some((Self::parse(&buf[..n], limits)?, n)))
    }

    fn parse(frame: &'a [u8], limits: &Limits) -> Result<AppFrame<'a>, DecodeError> {
        let (ty, body) = wire::split(frame);
        let mut r = Reader::new(body);
        let f = match ty {
            AUTH => AppFrame::Auth(Auth { app_id: r.id(MAX_APP_ID)?, timestamp_ms: r.u64()?, proof: r.array()? }),
            AUTH_OK => AppFrame::AuthOk(AuthOk {
                max_frame: r.u32()?,
                max_targets: r.u16()?,
                server_time_ms: r.u64()?,
                shard: r.u16()?,
                shards: r.u16()?,
            }),
            PUSH => {
                let request_id = r.u64()?;
                let ttl_secs = r.u32()?;
                let flags = r.u8()?;
                let target = match r.u8()? {
                    TARGET_DEVICE => Target::Device(r.id(MAX_DEVICE_ID)?),
                    TARGET_LIST => Target::List(DeviceList::read(&mut r, limits)?),
                    TARGET_APP => Target::App,
                    _ => return Err(DecodeError::new(ErrorCode::BAD_FRAME, "unknown push target kind")),
                };
                return Ok(AppFrame::Push(Push { request_id, ttl_secs, flags, target, payload: r.rest() }));
            }
            ACCEPTED => AppFrame::Accepted { request_id: r.u64()?, push_id: r.u64()? },
            REJECTED => {
                AppFrame::Rejected(Rejected { request_id: r.u64()?, code: ErrorCode(r.u16()?), reason: r.str8()? })
            }
            BUSY => AppFrame::Busy { request_id: r.u64()?, retry_after_ms: r.u32()? },
            RECEIPT_QUERY => AppFrame::ReceiptQuery { request_id: r.u64()?, push_id: r.u64()? },
            RECEIPT => AppFrame::Receipt(Receipt {
                request_id: r.u64()?,
                push_id: r.u64()?,
                targeted: r.u64()?,
                delivered: r.u64()?,
                stored: r.u64()?,
                expired: r.u64()?,
            }),
            PING => AppFrame::Ping(r.u64()?),
            PONG => AppFrame::Pong(r.u64()?),
            ERROR => AppFrame::Error(ErrorFrame { code: ErrorCode(r.u16()?), message: r.str8()? }),
            _ => unreachable!("check_frame admits known types only"),
        };
        r.end()?;
        Ok(f)
    }

    /// Appends the encoded frame to `out`. Panics on caller bugs only (see
    /// [`crate::DeviceFrame::encode`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let put64 = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_be_bytes());
        let ty = match self {
            AppFrame::Auth(_) => AUTH,
            AppFrame::AuthOk(_) => AUTH_OK,
            AppFrame::Push(_) => PUSH,
            AppFrame::Accepted { .. } => ACCEPTED,
            AppFrame::Rejected(_) => REJECTED,
            AppFrame::Busy { .. } => BUSY,
            AppFrame::ReceiptQuery { .. } => RECEIPT_QUERY,
            AppFrame::Receipt(_) => RECEIPT,
            AppFrame::Ping(_) => PING,
            AppFrame::Pong(_) => PONG,
            AppFrame::Error(_) => ERROR,
        };
        let at = wire::begin(out, ty);
        match self {
            AppFrame::Auth(a) => {
                assert!(a.app_id.len() <= MAX_APP_ID);
                wire::put_str8(out, a.app_id);
                put64(out, a.timestamp_ms);
                out.extend_from_slice(&a.proof);
            }
            AppFrame::AuthOk(a) => {
                out.extend_from_slice(&a.max_frame.to_be_bytes());
                out.extend_from_slice(&a.max_targets.to_be_bytes());
                put64(out, a.server_time_ms);
                out.extend_from_slice(&a.shard.to_be_bytes());
                out.extend_from_slice(&a.shards.to_be_bytes());
            }
            AppFrame::Push(p) => {
                put64(out, p.request_id);
                out.extend_from_slice(&p.ttl_secs.to_be_bytes());
                out.push(p.flags);
                match p.target {
                    Target::Device(d) => {
                        assert!(d.len() <= MAX_DEVICE_ID);
                        out.push(TARGET_DEVICE);
                        wire::put_str8(out, d);
                    }
                    Target::List(l) => {
                        out.push(TARGET_LIST);
                        out.extend_from_slice(&l.count.to_be_bytes());
                        out.extend_from_slice(l.raw);
                    }
                    Target::App => out.push(TARGET_APP),
                }
                out.extend_from_slice(p.payload);
            }
            AppFrame::Accepted { request_id, push_id } => {
                put64(out, *request_id);
                put64(out, *push_id);
            }
            AppFrame::Rejected(r) => {
                put64(out, r.request_id);
                out.extend_from_slice(&r.code.0.to_be_bytes());
                wire::put_str8(out, r.reason);
            }
            AppFrame::Busy { request_id, retry_after_ms } => {
                put64(out, *request_id);
                out.extend_from_slice(&retry_after_ms.to_be_bytes());
            }
            AppFrame::ReceiptQuery { request_id, push_id } => {
                put64(out, *request_id);
                put64(out, *push_id);
            }
            AppFrame::Receipt(r) => {
                for v in [r.request_id, r.push_id, r.targeted, r.delivered, r.stored, r.expired] {
                    put64(out, v);
                }
            }
            AppFrame::Ping(n) | AppFrame::Pong(n) => put64(out, *n),
            AppFrame::Error(e) => {
                out.extend_from_slice(&e.code.0.to_be_bytes());
                wire::put_str8(out, e.message);
            }
        }
        wire::finish(out, at);
    }
}

/// Encodes a PUSH to a list of devices given as owned or borrowed strings (the
/// client-side form: [`DeviceList`] itself is only produced by decoding).
pub fn encode_push_list<S: AsRef<str>>(
    out: &mut Vec<u8>,
    request_id: u64,
    ttl_secs: u32,
    devices: &[S],
    payload: &[u8],
) {
    let at = wire::begin(out, PUSH);
    out.extend_from_slice(&request_id.to_be_bytes());
    out.extend_from_slice(&ttl_secs.to_be_bytes());
    out.push(0);
    out.push(TARGET_LIST);
    DeviceList::write(out, devices);
    out.extend_from_slice(payload);
    wire::finish(out, at);
}
