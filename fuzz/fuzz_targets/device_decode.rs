//! Feeds arbitrary bytes to the device decoder (preamble first, then frames), split at
//! a fuzzer-chosen point, and checks that whatever decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringpush_protocol::{DeviceFrame, Limits, Preamble};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_frame: 4096, max_targets: 64 };
    let _ = Preamble::decode(data);
    let mut rest = data;
    while let Ok(Some((frame, n))) = DeviceFrame::decode(rest, &limits) {
        let mut out = Vec::new();
        frame.encode(&mut out);
        assert_eq!(&out[..], &rest[..n], "re-encoding a decoded frame changed it");
        rest = &rest[n..];
    }
});
