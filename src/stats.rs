//! Per-shard statistics: plain counters and hdrhistogram latencies that only their
//! shard writes (no shared atomics on the hot path), gathered on demand.
//!
//! A scrape asks every shard for a [`ShardSnapshot`] over the request mesh and merges
//! the answers on the shard serving HTTP ([`crate::export`] renders them).

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded, in microseconds (60 s); larger values are clamped.
const MAX_US: u64 = 60_000_000;

/// A latency histogram in microseconds, or nothing when metrics are off.
#[derive(Clone, Debug)]
pub struct Hist(Option<Box<Histogram<u64>>>);

impl Hist {
    pub fn new(enabled: bool) -> Self {
        Hist(
            enabled.then(|| {
                Box::new(Histogram::new_with_bounds(1, MAX_US, 2).expect("static histogram bounds are valid"))
            }),
        )
    }

    #[inline]
    pub fn record(&mut self, us: u64) {
        if let Some(h) = &mut self.0 {
            h.saturating_record(us.clamp(1, MAX_US));
        }
    }

    pub fn merge(&mut self, other: &Hist) {
        match (&mut self.0, &other.0) {
            (Some(a), Some(b)) => {
                let _ = a.add(b.as_ref());
            }
            (None, Some(b)) => self.0 = Some(b.clone()),
            _ => {}
        }
    }

    pub fn count(&self) -> u64 {
        self.0.as_ref().map_or(0, |h| h.len())
    }

    /// p50, p90, p99, p99.9 and max, in microseconds (zeros when empty or off).
    pub fn summary(&self) -> Quantiles {
        match &self.0 {
            Some(h) if !h.is_empty() => Quantiles {
                count: h.len(),
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
                mean: h.mean(),
            },
            _ => Quantiles::default(),
        }
    }
}

/// A latency summary in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Quantiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// Stages with a latency histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Push taken by the owner shard → MESSAGE written to the device socket.
    Write,
    /// Push taken by the owner shard → device ack.
    Ack,
    /// Device connection accepted → WELCOME queued.
    Handshake,
    /// PUSH request decoded → reply queued to the app.
    Push,
    /// A push share written to the owner shard's store.
    Append,
    /// One store flush (`fdatasync`).
    Flush,
}

impl Stage {
    pub const ALL: [Stage; 6] = [Stage::Write, Stage::Ack, Stage::Handshake, Stage::Push, Stage::Append, Stage::Flush];

    pub fn metric(self) -> &'static str {
        match self {
            Stage::Write => "ringpush_push_to_write_seconds",
            Stage::Ack => "ringpush_push_to_ack_seconds",
            Stage::Handshake => "ringpush_handshake_seconds",
            Stage::Push => "ringpush_push_reply_seconds",
            Stage::Append => "ringpush_store_append_seconds",
            Stage::Flush => "ringpush_store_flush_seconds",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Stage::Write => "Time from a push taken by the owner shard to its MESSAGE written to the device socket.",
            Stage::Ack => "Time from a push taken by the owner shard to the device's ack of it.",
            Stage::Handshake => "Time from a device connection accepted to its WELCOME queued.",
            Stage::Push => "Time from a PUSH request decoded to its reply queued to the app.",
            Stage::Append => "Time to write one push's records into the owner shard's store.",
            Stage::Flush => "Time of one store flush (fdatasync of the segments written since the last).",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Stage::Write => "push_to_write",
            Stage::Ack => "push_to_ack",
            Stage::Handshake => "handshake",
            Stage::Push => "push_reply",
            Stage::Append => "store_append",
            Stage::Flush => "store_flush",
        }
    }
}

/// Push kinds, for counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushKind {
    Unicast = 0,
    Multicast = 1,
    Broadcast = 2,
}

/// Push results, for counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushResult {
    Accepted = 0,
    Rejected = 1,
    Busy = 2,
}

pub const KINDS: [&str; 3] = ["unicast", "multicast", "broadcast"];
pub const RESULTS: [&str; 3] = ["accepted", "rejected", "busy"];

/// One counter sample: metric name, labels (without `shard`), value.
pub type CounterRow = (&'static str, Vec<(&'static str, &'static str)>, u64);

/// Everything one shard reports, as of one moment.
#[derive(Clone, Debug, Serialize)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub sessions: u64,
    pub app_connections: u64,
    pub devices: u64,
    pub queued_messages: u64,
    /// Further gauges (store, cache), by metric name.
    pub gauges: Vec<(&'static str, u64)>,
    pub counters: Vec<CounterRow>,
    pub latency_us: Vec<(&'static str, Quantiles)>,
    #[serde(skip)]
    pub hists: Vec<(Stage, Hist)>,
}
