//! Checks the hex test vectors in `docs/protocol.md` against the codec, so the spec
//! and the code cannot drift apart: encoding each sample frame must give the vector's
//! bytes, and decoding the vector must give the sample frame back.
//!
//! Vectors live in fenced blocks tagged `vectors`, one `name = hex` per line (spaces
//! inside the hex are ignored). On a mismatch the test prints the correct lines.

mod common;

use common::*;
use ringpush_protocol::app::AppFrame;
use ringpush_protocol::device::DeviceFrame;
use ringpush_protocol::{token, Preamble, Role};
use std::collections::BTreeMap;

fn spec_vectors() -> BTreeMap<String, Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md");
    let doc = std::fs::read_to_string(path).expect("docs/protocol.md is readable");
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in doc.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            inside = t == "```vectors";
            continue;
        }
        if inside && !t.is_empty() {
            let (name, hex) = t.split_once('=').expect("vector line is `name = hex`");
            let clean: String = hex.split_whitespace().collect();
            let bytes = hex::decode(&clean).unwrap_or_else(|e| panic!("{name}: bad hex: {e}"));
            assert!(out.insert(name.trim().to_string(), bytes).is_none(), "duplicate vector {name}");
        }
    }
    out
}

fn spaced(b: &[u8]) -> String {
    // Header (type and length) apart from the body, for readability.
    if b.len() > 5 {
        format!("{} {} {}", hex::encode(&b[..1]), hex::encode(&b[1..5]), hex::encode(&b[5..]))
    } else {
        hex::encode(b)
    }
}

#[test]
fn spec_vectors_match_the_codec() {
    let spec = spec_vectors();
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, f) in device_samples() {
        let bytes = encode_device(&f);
        if let Some(v) = spec.get(name) {
            let (d, n) = DeviceFrame::decode(v, &limits()).expect("vector decodes").expect("vector is whole");
            assert_eq!((d, n), (f, v.len()), "{name}: decoding the spec vector");
        }
        expected.push((name.into(), bytes));
    }
    for (name, f) in app_samples() {
        let bytes = encode_app(&f);
        if let Some(v) = spec.get(name) {
            let (d, n) = AppFrame::decode(v, &limits()).expect("vector decodes").expect("vector is whole");
            assert_eq!((d, n), (f, v.len()), "{name}: decoding the spec vector");
        }
        expected.push((name.into(), bytes));
    }
    expected.push(("app.push.list".into(), list_push_bytes()));
    expected.push(("preamble.device".into(), Preamble::client(Role::Device).encode().to_vec()));
    expected.push(("preamble.app".into(), Preamble::client(Role::App).encode().to_vec()));
    expected.push(("token.demo.dev-1".into(), token().0.to_vec()));
    expected.push(("auth_proof.demo".into(), token::auth_proof(SECRET, "demo", 1_800_000_000_000).to_vec()));

    let wrong: Vec<String> = expected
        .iter()
        .filter(|(name, bytes)| spec.get(name) != Some(bytes))
        .map(|(name, bytes)| format!("{name} = {}", spaced(bytes)))
        .collect();
    let extra: Vec<&String> = spec.keys().filter(|k| !expected.iter().any(|(n, _)| n == *k)).collect();
    assert!(
        wrong.is_empty() && extra.is_empty(),
        "docs/protocol.md vectors are out of date.\nCorrect lines:\n{}\nUnknown vectors: {extra:?}",
        wrong.join("\n")
    );
}
