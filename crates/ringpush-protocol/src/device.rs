//! Device protocol frames: one long-lived connection per device.
//!
//! | type | frame   | direction       |
//! |------|---------|-----------------|
//! | 0x01 | HELLO   | device → server |
//! | 0x02 | WELCOME | server → device |
//! | 0x03 | MESSAGE | server → device |
//! | 0x04 | ACK     | device → server |
//! | 0x05 | PING    | either          |
//! | 0x06 | PONG    | either          |
//! | 0x07 | BYE     | either          |
//! | 0x0F | ERROR   | server → device |
//!
//! The decoder is direction-agnostic: it decodes every frame type, and the server
//! answers a frame that is not valid in its state with `unexpected_frame`.

use crate::error::{DecodeError, ErrorCode, ErrorFrame};
use crate::token::TOKEN_LEN;
use crate::wire::{self, Limits, Reader, MAX_APP_ID, MAX_DEVICE_ID};

pub const HELLO: u8 = 0x01;
pub const WELCOME: u8 = 0x02;
pub const MESSAGE: u8 = 0x03;
pub const ACK: u8 = 0x04;
pub const PING: u8 = 0x05;
pub const PONG: u8 = 0x06;
pub const BYE: u8 = 0x07;
pub const ERROR: u8 = 0x0F;

/// MESSAGE flag: the message belongs to the app's broadcast stream; `seq` is then a
/// broadcast sequence number (acked through ACK's `broadcast_seq`).
pub const FLAG_BROADCAST: u8 = 0x01;

/// Bytes of a MESSAGE frame before its payload (header included).
pub const MESSAGE_OVERHEAD: usize = wire::HEADER_LEN + 1 + 8 + 8 + 8;

fn known(ty: u8) -> bool {
    matches!(ty, HELLO..=BYE | ERROR)
}

/// First frame of a device connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Hello<'a> {
    pub app_id: &'a str,
    pub device_id: &'a str,
    /// Binary device token: expiry (u64 BE, unix seconds) then the 32-byte MAC.
    pub token: [u8; TOKEN_LEN],
    /// Highest unicast seq the device has processed (0: none).
    pub last_acked_seq: u64,
    /// Highest broadcast seq the device has processed (0: none).
    pub broadcast_cursor: u64,
    /// Client capability bits (none defined in version 1; servers ignore unknown bits).
    pub capabilities: u32,
}

/// Server's answer to a valid HELLO.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Welcome {
    /// The device must send something (PING if idle) at least this often.
    pub heartbeat_ms: u32,
    /// Largest frame body the server accepts from the device.
    pub max_frame: u32,
    /// Server clock, unix milliseconds.
    pub server_time_ms: u64,
    /// Highest unicast seq the server considers acked: delivery resumes after it.
    pub acked_seq: u64,
    /// Highest broadcast seq the server considers seen by this device.
    pub broadcast_cursor: u64,
    /// Messages waiting for this device at the time of the WELCOME.
    pub pending: u32,
}

/// One message to one device.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Message<'a> {
    pub flags: u8,
    pub seq: u64,
    pub push_id: u64,
    /// Unix milliseconds after which the message must not be delivered.
    pub expiry_ms: u64,
    pub payload: &'a [u8],
}

/// Cumulative acknowledgement of both streams.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Ack {
    pub seq: u64,
    pub broadcast_seq: u64,
}

/// Orderly close, with an optional redirect (`host:port`, empty for none).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Bye<'a> {
    pub reason: ErrorCode,
    pub redirect: &'a str,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DeviceFrame<'a> {
    Hello(Hello<'a>),
    Welcome(Welcome),
    Message(Message<'a>),
    Ack(Ack),
    Ping(u64),
    Pong(u64),
    Bye(Bye<'a>),
    Error(ErrorFrame<'a>),
}

impl<'a> DeviceFrame<'a> {
    /// Decodes the first frame in `buf`: `Ok(Some((frame, consumed)))`, `Ok(None)` when
    /// more bytes are needed, or the error to report before closing.
    pub fn decode(buf: &'a [u8], limits: &Limits) -> Result<Option<(DeviceFrame<'a>, usize)>, DecodeError> {
        let Some(n) = wire::check_frame(buf, limits, known)? else {
            return Ok(None);
        };
        Ok(Some((Self::parse(&buf[..n])?, n)))
    }

    /// Parses one whole frame already delimited by [`wire::check_frame`].
    fn parse(frame: &'a [u8]) -> Result<DeviceFrame<'a>, DecodeError> {
        let (ty, body) = wire::split(frame);
        let mut r = Reader::new(body);
        let f = match ty {
            HELLO => DeviceFrame::Hello(Hello {
                app_id: r.id(MAX_APP_ID)?,
                device_id: r.id(MAX_DEVICE_ID)?,
                token: r.array()?,
                last_acked_seq: r.u64()?,
                broadcast_cursor: r.u64()?,
                capabilities: r.u32()?,
            }),
            WELCOME => DeviceFrame::Welcome(Welcome {
                heartbeat_ms: r.u32()?,
                max_frame: r.u32()?,
                server_time_ms: r.u64()?,
                acked_seq: r.u64()?,
                broadcast_cursor: r.u64()?,
                pending: r.u32()?,
            }),
            MESSAGE => {
                let m = Message {
                    flags: r.u8()?,
                    seq: r.u64()?,
                    push_id: r.u64()?,
                    expiry_ms: r.u64()?,
                    payload: r.rest(),
                };
                return Ok(DeviceFrame::Message(m));
            }
            ACK => DeviceFrame::Ack(Ack { seq: r.u64()?, broadcast_seq: r.u64()? }),
            PING => DeviceFrame::Ping(r.u64()?),
            PONG => DeviceFrame::Pong(r.u64()?),
            BYE => DeviceFrame::Bye(Bye { reason: ErrorCode(r.u16()?), redirect: r.str8()? }),
            ERROR => DeviceFrame::Error(ErrorFrame { code: ErrorCode(r.u16()?), message: r.str8()? }),
            _ => unreachable!("check_frame admits known types only"),
        };
        r.end()?;
        Ok(f)
    }

    /// Appends the encoded frame to `out` (a reused buffer on the hot path).
    ///
    /// Panics if a field breaks a limit that decoding enforces (an id longer than its
    /// maximum, a BYE redirect or ERROR message over 255 bytes): encoding invalid
    /// frames is a caller bug, never reachable from network input.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            DeviceFrame::Hello(h) => {
                assert!(h.app_id.len() <= MAX_APP_ID && h.device_id.len() <= MAX_DEVICE_ID);
                let at = wire::begin(out, HELLO);
                wire::put_str8(out, h.app_id);
                wire::put_str8(out, h.device_id);
                out.extend_from_slice(&h.token);
                out.extend_from_slice(&h.last_acked_seq.to_be_bytes());
                out.extend_from_slice(&h.broadcast_cursor.to_be_bytes());
                out.extend_from_slice(&h.capabilities.to_be_bytes());
                wire::finish(out, at);
            }
            DeviceFrame::Welcome(w) => {
                let at = wire::begin(out, WELCOME);
                out.extend_from_slice(&w.heartbeat_ms.to_be_bytes());
                out.extend_from_slice(&w.max_frame.to_be_bytes());
                out.extend_from_slice(&w.server_time_ms.to_be_bytes());
                out.extend_from_slice(&w.acked_seq.to_be_bytes());
                out.extend_from_slice(&w.broadcast_cursor.to_be_bytes());
                out.extend_from_slice(&w.pending.to_be_bytes());
                wire::finish(out, at);
            }
            DeviceFrame::Message(m) => encode_message(out, m),
            DeviceFrame::Ack(a) => {
                let at = wire::begin(out, ACK);
                out.extend_from_slice(&a.seq.to_be_bytes());
                out.extend_from_slice(&a.broadcast_seq.to_be_bytes());
                wire::finish(out, at);
            }
            DeviceFrame::Ping(n) | DeviceFrame::Pong(n) => {
                let ty = if matches!(self, DeviceFrame::Ping(_)) { PING } else { PONG };
                let at = wire::begin(out, ty);
                out.extend_from_slice(&n.to_be_bytes());
                wire::finish(out, at);
            }
            DeviceFrame::Bye(b) => {
                let at = wire::begin(out, BYE);
                out.extend_from_slice(&b.reason.0.to_be_bytes());
                wire::put_str8(out, b.redirect);
                wire::finish(out, at);
            }
            DeviceFrame::Error(e) => {
                let at = wire::begin(out, ERROR);
                out.extend_from_slice(&e.code.0.to_be_bytes());
                wire::put_str8(out, e.message);
                wire::finish(out, at);
            }
        }
    }
}

/// Encodes a MESSAGE frame; the hot-path form that needs no `DeviceFrame` value.
pub fn encode_message(out: &mut Vec<u8>, m: &Message<'_>) {
    out.reserve(MESSAGE_OVERHEAD + m.payload.len());
    out.push(MESSAGE);
    let len = (MESSAGE_OVERHEAD - wire::HEADER_LEN + m.payload.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.push(m.flags);
    out.extend_from_slice(&m.seq.to_be_bytes());
    out.extend_from_slice(&m.push_id.to_be_bytes());
    out.extend_from_slice(&m.expiry_ms.to_be_bytes());
    out.extend_from_slice(m.payload);
}
