//! Sample frames shared by the codec tests and the spec-vector test.

#![allow(dead_code)]

use ringpush_protocol::app::{encode_push_list, AppFrame, Auth, AuthOk, Push, Receipt, Rejected, Target};
use ringpush_protocol::device::{Ack, Bye, DeviceFrame, Hello, Message, Welcome};
use ringpush_protocol::{token, DeviceToken, ErrorCode, ErrorFrame, Limits};

pub const SECRET: &[u8] = b"s3cret";
pub const TOKEN_EXPIRY: u64 = 1_900_000_000;

pub fn token() -> DeviceToken {
    DeviceToken::mint(SECRET, "demo", "dev-1", TOKEN_EXPIRY)
}

pub fn device_samples() -> Vec<(&'static str, DeviceFrame<'static>)> {
    let token = token().0;
    vec![
        (
            "device.hello",
            DeviceFrame::Hello(Hello {
                app_id: "demo",
                device_id: "dev-1",
                token,
                last_acked_seq: 41,
                broadcast_cursor: 7,
                capabilities: 0,
            }),
        ),
        (
            "device.welcome",
            DeviceFrame::Welcome(Welcome {
                heartbeat_ms: 30_000,
                max_frame: 65_536,
                server_time_ms: 1_800_000_000_000,
                acked_seq: 41,
                broadcast_cursor: 7,
                pending: 2,
            }),
        ),
        (
            "device.message",
            DeviceFrame::Message(Message {
                flags: 0,
                seq: 42,
                push_id: 0x0001_0000_0000_0005,
                expiry_ms: 1_800_000_060_000,
                payload: b"hello",
            }),
        ),
        (
            "device.message.broadcast",
            DeviceFrame::Message(Message { flags: 1, seq: 8, push_id: 9, expiry_ms: 1_800_000_060_000, payload: b"" }),
        ),
        ("device.ack", DeviceFrame::Ack(Ack { seq: 42, broadcast_seq: 8 })),
        ("device.ping", DeviceFrame::Ping(1)),
        ("device.pong", DeviceFrame::Pong(1)),
        ("device.bye", DeviceFrame::Bye(Bye { reason: ErrorCode::REDIRECT, redirect: "10.0.0.2:7000" })),
        ("device.error", DeviceFrame::Error(ErrorFrame { code: ErrorCode::BAD_TOKEN, message: "bad token" })),
    ]
}

/// The list form is only produced by decoding, so its bytes are built with the
/// client-side encoder.
pub fn list_push_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    encode_push_list(&mut out, 2, 60, &["dev-1", "dev-2"], b"hi");
    out
}

pub fn app_samples() -> Vec<(&'static str, AppFrame<'static>)> {
    vec![
        (
            "app.auth",
            AppFrame::Auth(Auth {
                app_id: "demo",
                timestamp_ms: 1_800_000_000_000,
                proof: token::auth_proof(SECRET, "demo", 1_800_000_000_000),
            }),
        ),
        (
            "app.auth_ok",
            AppFrame::AuthOk(AuthOk {
                max_frame: 1_048_576,
                max_targets: 1000,
                server_time_ms: 1_800_000_000_000,
                shard: 1,
                shards: 4,
            }),
        ),
        (
            "app.push.device",
            AppFrame::Push(Push {
                request_id: 1,
                ttl_secs: 3600,
                flags: 0,
                target: Target::Device("dev-1"),
                payload: b"hello",
            }),
        ),
        (
            "app.push.app",
            AppFrame::Push(Push { request_id: 3, ttl_secs: 0, flags: 0, target: Target::App, payload: b"all" }),
        ),
        ("app.accepted", AppFrame::Accepted { request_id: 1, push_id: 0x0001_0000_0000_0005 }),
        (
            "app.rejected",
            AppFrame::Rejected(Rejected { request_id: 1, code: ErrorCode::STORAGE_FULL, reason: "queue full" }),
        ),
        ("app.busy", AppFrame::Busy { request_id: 1, retry_after_ms: 50 }),
        ("app.receipt_query", AppFrame::ReceiptQuery { request_id: 4, push_id: 5 }),
        (
            "app.receipt",
            AppFrame::Receipt(Receipt { request_id: 4, push_id: 5, targeted: 3, delivered: 2, stored: 1, expired: 0 }),
        ),
        ("app.ping", AppFrame::Ping(2)),
        ("app.pong", AppFrame::Pong(2)),
        ("app.error", AppFrame::Error(ErrorFrame { code: ErrorCode::NOT_AUTHORIZED, message: "bad proof" })),
    ]
}

pub fn limits() -> Limits {
    Limits::default()
}

pub fn encode_device(f: &DeviceFrame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

pub fn encode_app(f: &AppFrame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

/// Splits `bytes` into pieces of `piece` bytes and feeds them to an accumulating
/// buffer, calling `decode_one` whenever bytes arrive; returns each decoded frame
/// re-encoded (so frames that borrow the buffer can be compared after it moves).
pub fn feed_split(
    bytes: &[u8],
    piece: usize,
    mut decode_one: impl FnMut(&[u8]) -> Option<(Vec<u8>, usize)>,
) -> Vec<Vec<u8>> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for chunk in bytes.chunks(piece) {
        buf.extend_from_slice(chunk);
        while let Some((frame, used)) = decode_one(&buf) {
            out.push(frame);
            buf.drain(..used);
        }
    }
    assert!(buf.is_empty(), "bytes left over after the last frame");
    out
}
