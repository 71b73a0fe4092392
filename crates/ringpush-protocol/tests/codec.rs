//! Codec tests: every frame round-trips, decoding is identical whatever the input
//! split, hostile input errors cleanly, and proptest checks both properties broadly.

mod common;

use common::*;
use proptest::prelude::*;
use ringpush_protocol::app::{AppFrame, Push, Target};
use ringpush_protocol::device::{DeviceFrame, Message};
use ringpush_protocol::{ErrorCode, Limits};

const PIECES: [usize; 6] = [1, 2, 3, 5, 7, 64];

fn decode_device(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    DeviceFrame::decode(buf, &limits()).expect("valid stream").map(|(f, n)| (encode_device(&f), n))
}

fn decode_app(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    AppFrame::decode(buf, &limits()).expect("valid stream").map(|(f, n)| (encode_app(&f), n))
}

#[test]
fn every_device_frame_round_trips_at_every_split() {
    for (name, frame) in device_samples() {
        let bytes = encode_device(&frame);
        let (decoded, used) = DeviceFrame::decode(&bytes, &limits()).unwrap().unwrap();
        assert_eq!(decoded, frame, "{name}");
        assert_eq!(used, bytes.len(), "{name}");
        for piece in PIECES {
            assert_eq!(feed_split(&bytes, piece, decode_device), vec![bytes.clone()], "{name} split {piece}");
        }
        // Every strict prefix is "incomplete", never an error.
        for cut in 0..bytes.len() {
            assert_eq!(DeviceFrame::decode(&bytes[..cut], &limits()).unwrap(), None, "{name} cut {cut}");
        }
    }
}

#[test]
fn every_app_frame_round_trips_at_every_split() {
    let mut all: Vec<(String, Vec<u8>)> = app_samples()
        .into_iter()
        .map(|(n, f)| {
            let b = encode_app(&f);
            let (decoded, used) = AppFrame::decode(&b, &limits()).unwrap().unwrap();
            assert_eq!(decoded, f, "{n}");
            assert_eq!(used, b.len());
            (n.to_string(), b)
        })
        .collect();
    all.push(("app.push.list".into(), list_push_bytes()));
    for (name, bytes) in &all {
        for piece in PIECES {
            assert_eq!(feed_split(bytes, piece, decode_app), vec![bytes.clone()], "{name} split {piece}");
        }
        for cut in 0..bytes.len() {
            assert_eq!(AppFrame::decode(&bytes[..cut], &limits()).unwrap(), None, "{name} cut {cut}");
        }
    }
}

#[test]
fn a_stream_of_all_frames_decodes_identically_at_every_split() {
    let dev: Vec<Vec<u8>> = device_samples().iter().map(|(_, f)| encode_device(f)).collect();
    let stream = dev.concat();
    for piece in PIECES {
        assert_eq!(feed_split(&stream, piece, decode_device), dev, "split {piece}");
    }
    let mut app: Vec<Vec<u8>> = app_samples().iter().map(|(_, f)| encode_app(f)).collect();
    app.push(list_push_bytes());
    let stream = app.concat();
    for piece in PIECES {
        assert_eq!(feed_split(&stream, piece, decode_app), app, "split {piece}");
    }
}

#[test]
fn list_push_decodes_its_targets() {
    let bytes = list_push_bytes();
    let (f, _) = AppFrame::decode(&bytes, &limits()).unwrap().unwrap();
    let AppFrame::Push(Push { target: Target::List(l), payload, ttl_secs, .. }) = f else {
        panic!("not a list push: {f:?}")
    };
    assert_eq!(l.iter().collect::<Vec<_>>(), ["dev-1", "dev-2"]);
    assert_eq!((payload, ttl_secs, l.len()), (&b"hi"[..], 60, 2));
}

#[test]
fn too_many_targets_is_rejected() {
    let ids: Vec<String> = (0..11).map(|i| format!("d{i}")).collect();
    let mut out = Vec::new();
    ringpush_protocol::app::encode_push_list(&mut out, 1, 0, &ids, b"x");
    let small = Limits { max_frame: 65536, max_targets: 10 };
    assert_eq!(AppFrame::decode(&out, &small).unwrap_err().code, ErrorCode::TOO_MANY_TARGETS);
    let ten = Limits { max_targets: 11, ..small };
    assert!(AppFrame::decode(&out, &ten).unwrap().is_some());
}

#[test]
fn malformed_frames_get_the_right_code() {
    let l = limits();
    // Oversize declared length: rejected from the header, whatever follows.
    assert_eq!(DeviceFrame::decode(&[3, 0, 1, 0, 1], &l).unwrap_err().code, ErrorCode::OVERSIZE);
    // Unknown type.
    assert_eq!(DeviceFrame::decode(&[0x42], &l).unwrap_err().code, ErrorCode::UNKNOWN_FRAME_TYPE);
    assert_eq!(AppFrame::decode(&[0x01], &l).unwrap_err().code, ErrorCode::UNKNOWN_FRAME_TYPE);
    // ACK with a short body.
    assert_eq!(DeviceFrame::decode(&[4, 0, 0, 0, 1, 0], &l).unwrap_err().code, ErrorCode::BAD_FRAME);
    // PING with trailing bytes.
    assert_eq!(
        DeviceFrame::decode(&[5, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0], &l).unwrap_err().code,
        ErrorCode::BAD_FRAME
    );
    // HELLO with an empty app id.
    let mut hello = encode_device(&device_samples()[0].1);
    hello[5] = 0;
    assert!(DeviceFrame::decode(&hello, &l).is_err());
    // PUSH with an unknown target kind.
    let mut push = encode_app(&app_samples()[2].1);
    push[5 + 8 + 4 + 1] = 9;
    assert_eq!(AppFrame::decode(&push, &l).unwrap_err().code, ErrorCode::BAD_FRAME);
    // Non-UTF-8 device id.
    let mut push = encode_app(&app_samples()[2].1);
    push[5 + 8 + 4 + 1 + 1 + 1] = 0xff;
    assert!(AppFrame::decode(&push, &l).is_err());
}

#[test]
fn decode_borrows_the_payload() {
    let bytes = encode_device(&device_samples()[2].1);
    let (f, _) = DeviceFrame::decode(&bytes, &limits()).unwrap().unwrap();
    let DeviceFrame::Message(Message { payload, .. }) = f else { panic!() };
    let range = bytes.as_ptr_range();
    assert!(range.contains(&payload.as_ptr()), "payload must point into the input buffer");
}

fn arb_id(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9_.:-]{{1,{max}}}")).unwrap()
}

proptest! {
    #[test]
    fn message_round_trip(flags in any::<u8>(), seq in any::<u64>(), push_id in any::<u64>(),
                          expiry in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let f = DeviceFrame::Message(Message { flags, seq, push_id, expiry_ms: expiry, payload: &payload });
        let b = encode_device(&f);
        let (d, n) = DeviceFrame::decode(&b, &limits()).unwrap().unwrap();
        prop_assert_eq!(d, f);
        prop_assert_eq!(n, b.len());
    }

    #[test]
    fn hello_round_trip(app in arb_id(64), dev in arb_id(128), token in any::<[u8; 32]>(),
                        expiry in any::<u64>(), acked in any::<u64>(), cursor in any::<u64>(), caps in any::<u32>()) {
        let mut t = [0u8; 40];
        t[..8].copy_from_slice(&expiry.to_be_bytes());
        t[8..].copy_from_slice(&token);
        let f = DeviceFrame::Hello(ringpush_protocol::Hello {
            app_id: &app, device_id: &dev, token: t, last_acked_seq: acked, broadcast_cursor: cursor, capabilities: caps,
        });
        let b = encode_device(&f);
        prop_assert_eq!(DeviceFrame::decode(&b, &limits()).unwrap().unwrap().0, f);
    }

    #[test]
    fn push_round_trip(req in any::<u64>(), ttl in any::<u32>(), dev in arb_id(128),
                       list in proptest::collection::vec(arb_id(128), 1..50),
                       kind in 0..3u8, payload in proptest::collection::vec(any::<u8>(), 0..500)) {
        let mut b = Vec::new();
        match kind {
            0 => AppFrame::Push(Push { request_id: req, ttl_secs: ttl, flags: 0, target: Target::Device(&dev), payload: &payload }).encode(&mut b),
            1 => ringpush_protocol::app::encode_push_list(&mut b, req, ttl, &list, &payload),
            _ => AppFrame::Push(Push { request_id: req, ttl_secs: ttl, flags: 0, target: Target::App, payload: &payload }).encode(&mut b),
        }
        let (d, n) = AppFrame::decode(&b, &limits()).unwrap().unwrap();
        prop_assert_eq!(n, b.len());
        let AppFrame::Push(p) = d else { panic!("not a push") };
        prop_assert_eq!((p.request_id, p.ttl_secs, p.payload), (req, ttl, &payload[..]));
        match (kind, p.target) {
            (0, Target::Device(d)) => prop_assert_eq!(d, dev.as_str()),
            (1, Target::List(l)) => prop_assert_eq!(l.iter().collect::<Vec<_>>(), list.iter().map(String::as_str).collect::<Vec<_>>()),
            (2, Target::App) => {}
            (k, t) => prop_assert!(false, "kind {} decoded as {:?}", k, t),
        }
        // Re-encoding the decoded frame gives the same bytes.
        prop_assert_eq!(encode_app(&d), b);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let l = Limits { max_frame: 256, max_targets: 8 };
        let mut rest = &bytes[..];
        while let Ok(Some((_, n))) = DeviceFrame::decode(rest, &l) { rest = &rest[n..]; }
        let mut rest = &bytes[..];
        while let Ok(Some((_, n))) = AppFrame::decode(rest, &l) { rest = &rest[n..]; }
        let _ = ringpush_protocol::Preamble::decode(&bytes);
    }

    #[test]
    fn valid_header_with_arbitrary_body_never_panics(ty in prop_oneof![1u8..=7, Just(0x0f), 0x21u8..=0x28],
                                                      body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut b = vec![ty];
        b.extend_from_slice(&(body.len() as u32).to_be_bytes());
        b.extend_from_slice(&body);
        let _ = DeviceFrame::decode(&b, &limits());
        let _ = AppFrame::decode(&b, &limits());
    }
}
