//! ringpush: a thread-per-core push appliance.
//!
//! Module map:
//! - [`server`]: process boot: listeners (SO_REUSEPORT), channel mesh, one pinned
//!   glommio executor per shard, signal handling.
//! - [`shard`]: what one shard owns (state, scratch buffers, channel ends) and how it
//!   handles cross-shard requests, timers and shutdown.
//! - [`session`]: device connections: handshake, hand-over to the owner shard, the
//!   session loop (acks, pings, message writes).
//! - [`ingress`]: app connections: auth, pipelined pushes split by owner shard, replies.
//! - [`devices`]: the sans-IO device table: queues, seqs, acks, TTL expiry, receipts.
//! - [`routing`]: `shard_for(app, device)`, jump consistent hash with golden vectors.
//! - [`dispatch`]: the fleet: the weighted node ring, node health, `GET /v1/dispatch`.
//! - [`timer`]: the hashed timer wheel behind heartbeats and expiry.
//! - [`client`]: device and app clients on glommio (CLI, tests, load generator).
//! - [`config`], [`duration`], [`clock`]: settings with defaults, `30s`-style
//!   durations, injected time.
//! - [`http`]: the HTTP port (/healthz, /readyz, /metrics, /stats, /v1/dispatch).
//! - [`bench`]: the load generator (`ringpush bench`).
//! - [`doctor`]: `ringpush doctor`, checks of the box (sysctls, limits, io_uring, disk, clock).
//! - [`cli`]: the `ringpush` command line.
//!
//! The wire protocols live in the `ringpush-protocol` crate (sans-IO).

pub mod bench;
pub mod bench_rx;
pub mod chart;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod devices;
pub mod dispatch;
pub mod doctor;
pub mod duration;
pub mod export;
pub mod http;
pub mod ingress;
pub mod peers;
pub mod raw;
pub mod routing;
pub mod server;
pub mod session;
pub mod shard;
pub mod stats;
pub mod stats_cli;
pub mod store;
pub mod store_bench;
pub mod timer;
pub mod uring;

pub use ringpush_protocol as protocol;
