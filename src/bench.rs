//! `ringpush bench`: the load generator.
//!
//! The parent process starts (or targets) a box, spreads the devices over worker
//! processes (`ringpush bench-worker`, at most `--per-process` devices each, so no
//! process nears the open-files limit), pushes from an app connection on its own
//! glommio executor, then collects each worker's counts and latency histogram
//! (hdrhistogram, V2-serialized) and merges them.
//!
//! Latency is end to end: the app writes its send time (unix µs) in the first 8 bytes
//! of the payload; the device records `now - send time` when it reads the message.
//!
//! Scenarios: `unicast` (M pushes to random devices, acked by the devices), `broadcast`
//! (K pushes to every device of the app), `idle` (connect N devices and hold: connect
//! rate, server RSS and kernel memory per connection), `offline` (M pushes to devices that
//! are not connected yet, then connect them all: how fast the queued messages drain; only
//! ringpush keeps messages for offline devices, so peers are skipped), `storm` (every
//! device connects at once; a spawned box is then restarted on the same ports and every
//! device connects again: handshakes/s both times).

use crate::bench_rx::{Phase, Receiver, Sink, Wire};
use crate::client::{dup_socket, unix_ms, AckPolicy, Acker, AppClient, AppReply, PushOutcome, PushTarget};
use crate::peers::{self, Peer, System};
use crate::raw::RawServer;
use clap::{Args, ValueEnum};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use ringpush_protocol::DeviceToken;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const APP: &str = "bench";
/// How the bench's devices ack: cumulatively, once 32 messages (half the default
/// window) are unacked or a message arrives 500 ms or more after the first unacked
/// one, so acks add well under one packet per message.
const DEVICE_ACKS: AckPolicy = AckPolicy { every: 32, delay: Duration::from_millis(500) };
const SECRET: &str = "bench-secret-0123456789abcdef";

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Scenario {
    Unicast,
    Broadcast,
    Idle,
    /// Push to devices that are not connected, then connect them: the drain rate.
    Offline,
    /// Every device connects at once (handshakes/s), then again after the box restarts
    /// (a spawned box; with --server, the first connect only).
    Storm,
    /// One shard's store, in process: append rate per durability policy, disk bytes
    /// per message, recovery time, heap per stored message.
    Store,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Devices to connect.
    #[arg(long, default_value_t = 10_000)]
    pub devices: usize,
    /// Pushes to send (unicast: one device each; broadcast: to every device); with
    /// --duration, the most to send. Default: 20 for broadcast (20 x N deliveries),
    /// 100000 otherwise.
    #[arg(long)]
    pub messages: Option<u64>,
    /// Stop issuing pushes after this long (e.g. 30s); in-flight ones still finish.
    #[arg(long, value_parser = crate::duration::parse)]
    pub duration: Option<Duration>,
    /// Payload bytes per message (at least 8: the send timestamp).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Pushes per second (0: as fast as the box accepts). The pushers send what is due
    /// when they wake, at least every 100 µs; the raw limit always sends at full speed.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Pushes in flight on the app connection.
    #[arg(long, default_value_t = 4096)]
    pub inflight: usize,
    /// Start a box for the run (temp data dir) and stop it by PID: the default unless
    /// --server is given.
    #[arg(long, conflicts_with = "server")]
    pub spawn: bool,
    /// Target a running box (its device port); the box must have the app `bench` with
    /// the secret given by --secret.
    #[arg(long)]
    pub server: Option<SocketAddr>,
    /// The running box's app port (with --server).
    #[arg(long)]
    pub app_server: Option<SocketAddr>,
    /// Secret of the app `bench` on a running box.
    #[arg(long, default_value = SECRET)]
    pub secret: String,
    /// Shards of the spawned box (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub shards: usize,
    /// Extra config lines for the spawned box, e.g. --set 'metrics = false'.
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// Devices per load-generator process at most (spread evenly over the processes).
    #[arg(long, default_value_t = 8000)]
    pub per_process: usize,
    /// How long the idle scenario holds the connections.
    #[arg(long, default_value = "3s", value_parser = crate::duration::parse)]
    pub hold: Duration,
    /// Also run the same scenario against these systems (redis, mosquitto), started on
    /// loopback by the bench.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub compare: Vec<System>,
    /// Where the store scenario writes (a temp dir inside it; default: the system's).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// (internal) Store scenario: recover this partition in a fresh process and report.
    #[arg(long, hide = true)]
    pub recover_only: Option<std::path::PathBuf>,
    /// (internal) Store scenario: the cache bound for --recover-only (0: cold).
    #[arg(long, hide = true, default_value_t = 0)]
    pub cache_msgs: usize,
    /// Print one JSON object per system instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write summary.json, summary.txt and chart.svg (latency percentiles and
    /// throughput over time, every system) into this directory.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("static histogram bounds are valid")
}

/// A box started for the run, stopped by its PID.
struct Spawned {
    child: Child,
    device: SocketAddr,
    app: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Spawned {
    /// Starts a box on device and app ports outside the kernel's ephemeral range: the
    /// storm scenario restarts it on the same ports, and in the moment between the two
    /// any client connecting anywhere on this machine could take an ephemeral port
    /// number as its source port and hold it (seen in CI: "Address already in use").
    fn start(shards: usize, set: &[String]) -> Result<Spawned, String> {
        let mut last = String::new();
        for _ in 0..5 {
            let (device, app) = (quiet_port()?, quiet_port()?);
            match Self::start_at(shards, set, &format!("127.0.0.1:{device}"), &format!("127.0.0.1:{app}")) {
                Ok(s) => return Ok(s),
                // Taken by another box in between: pick again.
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Starts a box on the given device and app addresses (a restart reuses them).
    fn start_at(shards: usize, set: &[String], device: &str, app: &str) -> Result<Spawned, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let cfg = dir.path().join("bench.toml");
        let mut text = set.join("\n");
        text.push_str(&format!("\n[[apps]]\nid = \"{APP}\"\nsecret = \"{SECRET}\"\n"));
        std::fs::write(&cfg, text).map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--device-listen", device, "--app-listen", app, "--http-listen", "127.0.0.1:0"])
            .args(["--shards", &shards.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the box: {e}"))?;
        // The box says "recovering" first, then "ready" with its addresses.
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        while !line.starts_with("ringpush ready") {
            line.clear();
            if out.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                break;
            }
        }
        let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok());
        match (field("device="), field("app=")) {
            (Some(device), Some(app)) => Ok(Spawned { child, device, app, _dir: dir }),
            _ => {
                let _ = child.kill();
                Err(format!("the box did not start: {line:?}"))
            }
        }
    }
}

/// A free port that no socket is given as its ephemeral source port: below the
/// kernel's `ip_local_port_range` (above it when the range starts low).
fn quiet_port() -> Result<u16, String> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().filter_map(|v| v.parse::<u32>().ok());
    let (lo, hi) = (bounds.next().unwrap_or(32_768), bounds.next().unwrap_or(60_999));
    let (from, to) = if lo >= 2_048 { (1_024, lo) } else { (hi + 1, 65_536) };
    if from >= to {
        return Err(format!("no port outside the ephemeral range {lo}-{hi}"));
    }
    for _ in 0..100 {
        let port = (from + rand::random::<u32>() % (to - from)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(format!("no free port in {from}-{}", to - 1))
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) and RSS bytes of a process, from /proc.
pub fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some((proc_cpu(pid)?, rss_kb * 1024))
}

/// CPU seconds (user + system) of a process, every thread it ever had, from /proc.
fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks / hz)
}

/// How often [`CpuTrace`] reads the server's CPU time.
const CPU_SAMPLE: Duration = Duration::from_millis(10);

/// A process's CPU seconds, sampled every [`CPU_SAMPLE`] by a thread of its own, so the
/// CPU of a window known only afterwards (the first push to the last delivery) can be
/// read off: the push phase ends before a broadcast's deliveries do, and the workers'
/// drain after the last delivery is not part of it.
struct CpuTrace {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u64, f64)>>,
}

impl CpuTrace {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            loop {
                if let Some(cpu) = proc_cpu(pid) {
                    samples.push((unix_us(), cpu));
                }
                if done.load(Ordering::Relaxed) {
                    return samples;
                }
                std::thread::sleep(CPU_SAMPLE);
            }
        });
        CpuTrace { stop, thread }
    }

    /// The samples: (unix µs, CPU seconds so far), in time order.
    fn finish(self) -> Vec<(u64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// CPU seconds so far at unix µs `at`, interpolated between the samples around it.
fn cpu_at(samples: &[(u64, f64)], at: u64) -> f64 {
    let i = samples.partition_point(|s| s.0 <= at);
    match (i.checked_sub(1).map(|j| samples[j]), samples.get(i)) {
        (Some(a), Some(b)) => a.1 + (b.1 - a.1) * (at - a.0) as f64 / (b.0 - a.0).max(1) as f64,
        (Some(a), None) => a.1,
        (None, Some(b)) => b.1,
        (None, None) => 0.0,
    }
}

/// Kernel memory that grows with sockets: TCP buffer pages (sockstat) plus slab.
pub fn kernel_socket_bytes() -> u64 {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pages: u64 = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let slab_kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096 + slab_kb * 1024
}

struct Worker {
    /// The devices `from..from + count` are this worker's.
    from: usize,
    count: usize,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// Starts the device workers; `since` is when the run began (unix µs, before any push):
/// what a device receives that was pushed earlier is an earlier run's, not this one's.
fn spawn_workers(args: &BenchArgs, system: System, device: SocketAddr, since: u64) -> Result<Vec<Worker>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // As few processes as --per-process allows, with the devices spread evenly over
    // them (10 000 devices: 5 000 + 5 000, not 8 000 + 2 000, so no worker is the
    // bottleneck of a fan-out).
    let procs = args.devices.div_ceil(args.per_process.max(1)).max(1);
    let mut workers = Vec::new();
    let mut from = 0;
    for w in 0..procs {
        let count = args.devices / procs + usize::from(w < args.devices % procs);
        let mut child = Command::new(&exe)
            .arg("bench-worker")
            .args(["--server", &device.to_string(), "--secret", &args.secret, "--system", system.name()])
            .args(["--payload", &args.payload.max(8).to_string()])
            .args(["--from", &from.to_string(), "--count", &count.to_string()])
            .args(["--since", &since.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start a load-generator process: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        workers.push(Worker { from, count, child, stdin, stdout });
        from += count;
    }
    Ok(workers)
}

/// The devices connected by the workers, and the connect window's length: from the
/// first connect attempt of any worker to the last handshake done in any of them (so
/// starting the worker processes and their executors is not counted as connecting).
struct Ready {
    connected: u64,
    secs: f64,
    /// The window in unix µs, to line a profile up with it.
    first_us: u64,
    last_us: u64,
}

/// Waits for every worker's `ready N FIRST_US LAST_US` line.
fn wait_ready(workers: &mut [Worker]) -> Result<Ready, String> {
    let (mut connected, mut first, mut last) = (0, u64::MAX, 0);
    for w in workers.iter_mut() {
        let line = read_line(w)?;
        let field = |i: usize| -> Result<u64, String> {
            line.split_whitespace().nth(i).and_then(|v| v.parse().ok()).ok_or(format!("bad worker line {line:?}"))
        };
        connected += field(1)?;
        first = first.min(field(2)?);
        last = last.max(field(3)?);
    }
    Ok(Ready { connected, secs: (last.saturating_sub(first) as f64 / 1e6).max(1e-6), first_us: first, last_us: last })
}

/// Fails the run unless every device connected (`when` says when, after "connected").
fn everyone(connected: u64, devices: usize, when: &str) -> Result<(), String> {
    if connected < devices as u64 {
        return Err(format!("only {connected} of {devices} devices connected{when}"));
    }
    Ok(())
}

/// What the workers saw, merged.
struct Collected {
    hist: Histogram<u64>,
    delivered: u64,
    duplicates: u64,
    /// Messages left over from an earlier run on the same box (not counted).
    stale: u64,
    last_us: u64,
    /// Messages per 100 ms bucket (unix time / 100 ms).
    timeline: std::collections::BTreeMap<u64, Bucket>,
}

/// What arrived in one 100 ms bucket: messages, those slower than [`SLOW_US`], the
/// slowest one. Where in a run the slow messages fall says more about their cause than
/// the run's percentiles do.
#[derive(Default, Clone, Copy, Debug, PartialEq)]
struct Bucket {
    n: u64,
    slow: u64,
    max_us: u64,
}

/// The latency target's bound: a message slower than this counts in its bucket's `slow`.
const SLOW_US: u64 = 1000;

impl Bucket {
    fn add(&mut self, latency_us: u64) {
        self.n += 1;
        self.slow += u64::from(latency_us > SLOW_US);
        self.max_us = self.max_us.max(latency_us);
    }

    fn merge(&mut self, o: Bucket) {
        self.n += o.n;
        self.slow += o.slow;
        self.max_us = self.max_us.max(o.max_us);
    }

    /// As a worker reports it: `[bucket, n, slow, max_us]`.
    fn to_json(self, key: u64) -> Value {
        json!([key, self.n, self.slow, self.max_us])
    }

    fn from_json(v: &Value) -> Option<(u64, Bucket)> {
        let f = |i: usize| v.get(i).and_then(Value::as_u64);
        Some((f(0)?, Bucket { n: f(1)?, slow: f(2)?, max_us: f(3)? }))
    }
}

/// Tells each worker how many messages to wait for, then merges their reports.
fn stop_workers(workers: &mut [Worker], push: &PushSide) -> Result<Collected, String> {
    let mut c = Collected {
        hist: new_hist(),
        delivered: 0,
        duplicates: 0,
        stale: 0,
        last_us: 0,
        timeline: std::collections::BTreeMap::new(),
    };
    for w in workers.iter_mut() {
        let expect = push.expected(w.from, w.count);
        let _ = writeln!(w.stdin, "stop {expect}");
        let _ = w.stdin.flush();
    }
    for w in workers.iter_mut() {
        let line = read_line(w)?;
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("bad worker report: {e}"))?;
        c.delivered += v["received"].as_u64().unwrap_or(0);
        c.duplicates += v["duplicates"].as_u64().unwrap_or(0);
        c.stale += v["stale"].as_u64().unwrap_or(0);
        c.last_us = c.last_us.max(v["last_us"].as_u64().unwrap_or(0));
        for (t, b) in v["timeline"].as_array().into_iter().flatten().filter_map(Bucket::from_json) {
            c.timeline.entry(t).or_default().merge(b);
        }
        let bytes = hex::decode(v["hist"].as_str().unwrap_or("")).map_err(|e| e.to_string())?;
        let h: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..]).map_err(|e| format!("{e:?}"))?;
        c.hist.add(&h).map_err(|e| format!("{e:?}"))?;
        let _ = w.child.wait();
    }
    Ok(c)
}

fn read_line(w: &mut Worker) -> Result<String, String> {
    let mut line = String::new();
    match w.stdout.read_line(&mut line) {
        Ok(0) => Err("a load-generator process exited early".into()),
        Ok(_) => Ok(line),
        Err(e) => Err(e.to_string()),
    }
}

/// What the pushing side saw.
#[derive(Default)]
struct PushSide {
    accepted: u64,
    rejected: u64,
    busy_retries: u64,
    elapsed: Duration,
    /// Accepted pushes per device index (unicast), so each worker knows what to expect.
    hits: Vec<u64>,
    /// Accepted broadcasts (every device expects each).
    broadcasts: u64,
}

impl PushSide {
    /// Adds what another connection of the same pusher saw.
    fn merge(&mut self, o: PushSide) {
        self.accepted += o.accepted;
        self.rejected += o.rejected;
        self.busy_retries += o.busy_retries;
        self.elapsed = self.elapsed.max(o.elapsed);
        self.broadcasts += o.broadcasts;
        if self.hits.len() < o.hits.len() {
            self.hits.resize(o.hits.len(), 0);
        }
        self.hits.iter_mut().zip(&o.hits).for_each(|(a, b)| *a += b);
    }

    fn count(&mut self, target: Option<usize>) {
        match target {
            Some(i) => {
                if self.hits.len() <= i {
                    self.hits.resize(i + 1, 0);
                }
                self.hits[i] += 1;
            }
            None => self.broadcasts += 1,
        }
    }

    /// Messages the devices `from..from + count` should receive.
    fn expected(&self, from: usize, count: usize) -> u64 {
        let unicast: u64 = self.hits.iter().skip(from).take(count).sum();
        unicast + self.broadcasts * count as u64
    }
}

/// A one-line progress bar on stderr when it is a terminal; silent otherwise.
struct Progress {
    label: &'static str,
    total: u64,
    on: bool,
    last: Instant,
    /// Counted by [`Progress::advance`] (several connections share one bar).
    done: u64,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Self {
        use std::io::IsTerminal;
        Progress { label, total, on: std::io::stderr().is_terminal(), last: Instant::now(), done: 0 }
    }

    fn advance(&mut self) {
        self.done += 1;
        self.show(self.done);
    }

    fn show(&mut self, done: u64) {
        if !self.on || self.last.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last = Instant::now();
        let width = 30;
        let filled = (done.min(self.total) * width / self.total.max(1)) as usize;
        eprint!(
            "\r{:<10} [{}{}] {done}/{}",
            self.label,
            "#".repeat(filled),
            ".".repeat(width as usize - filled),
            self.total
        );
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.on {
            eprint!("\r{:<60}\r", "");
        }
    }
}

/// Picks the next push target: a random device, or `None` for a broadcast.
struct Targets {
    rng: u64,
    devices: usize,
    broadcast: bool,
}

impl Targets {
    fn next(&mut self) -> Option<usize> {
        if self.broadcast {
            return None;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        Some((self.rng % self.devices as u64) as usize)
    }
}

impl BenchArgs {
    /// Pushes to send: --messages, or the scenario's default.
    pub fn messages(&self) -> u64 {
        self.messages.unwrap_or(if self.scenario == Scenario::Broadcast { 20 } else { 100_000 })
    }

    /// Whether push number `issued` (0-based) may still be issued at `elapsed`.
    fn more(&self, issued: u64, elapsed: Duration) -> bool {
        issued < self.messages() && self.duration.is_none_or(|d| elapsed < d)
    }
}

/// The shortest wait of a pusher at a set rate: what came due meanwhile leaves in one
/// write, as an app server sending on a timer would send it, instead of one wake-up
/// (and, for ringpush, one cancelled read) per push.
const PACE_TICK: Duration = Duration::from_micros(100);

/// When push number `n` (0-based) is due at `rate` pushes/s (rounded up to the
/// nanosecond, so [`due_by`] counts it at that moment).
fn due_at(n: u64, rate: u64) -> Duration {
    let ns = (n as u128 * 1_000_000_000).div_ceil(rate.max(1) as u128);
    Duration::from_nanos(ns.min(u64::MAX as u128) as u64)
}

/// How many pushes are due at `elapsed` at `rate` pushes/s (all of them at rate 0).
fn due_by(elapsed: Duration, rate: u64) -> u64 {
    if rate == 0 {
        return u64::MAX;
    }
    (elapsed.as_nanos() * rate as u128 / 1_000_000_000).min(u64::MAX as u128 - 1) as u64 + 1
}

/// Sleeps until push number `n` is due at `rate` pushes/s, at least [`PACE_TICK`]
/// when it has to wait at all (0: never waits).
async fn pace(start: Instant, n: u64, rate: u64) {
    if rate > 0 {
        if let Some(wait) = due_at(n, rate).checked_sub(start.elapsed()) {
            glommio::timer::sleep(wait.max(PACE_TICK)).await;
        }
    }
}

async fn push_load(args: &BenchArgs, system: System, addr: SocketAddr) -> Result<PushSide, String> {
    match system {
        System::Ringpush => push_ringpush(args, addr).await,
        System::Redis | System::Mosquitto => push_peer(args, system, addr).await,
        System::Raw => Err("the raw limit pushes from RawServer::send".into()),
    }
}

/// Pushes to Redis (pipelined PUBLISH, replies counted to bound what is in flight) or
/// MQTT (QoS 0 PUBLISH, fire-and-forget).
async fn push_peer(args: &BenchArgs, system: System, addr: SocketAddr) -> Result<PushSide, String> {
    let mut stream = glommio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(1 << 20);
    let mut inbuf = vec![0u8; 1 << 16];
    let mut pending = Vec::new();
    if system == System::Mosquitto {
        peers::mqtt_connect(&mut out, &format!("bench-app-{}", std::process::id()), 600);
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        out.clear();
    }
    let mut targets = Targets {
        rng: rand::random::<u64>() | 1,
        devices: args.devices,
        broadcast: args.scenario == Scenario::Broadcast,
    };
    let mut payload = vec![0x2au8; args.payload.max(8)];
    let (mut sent, mut answered) = (0u64, 0u64);
    let mut side = PushSide::default();
    let mut progress = Progress::new(system.name(), args.messages());
    let start = Instant::now();
    while args.more(sent, start.elapsed()) {
        pace(start, sent, args.rate).await;
        // What is due now, 256 at most per write (all of it at full speed).
        let due = due_by(start.elapsed(), args.rate).saturating_sub(sent).max(1);
        let batch = (args.messages() - sent).min(256).min(due);
        for _ in 0..batch {
            let target = targets.next();
            side.count(target);
            let channel = match target {
                Some(i) => format!("d{i}"),
                None => peers::ALL.to_string(),
            };
            payload[..8].copy_from_slice(&unix_us().to_be_bytes());
            match system {
                System::Redis => peers::resp_publish(&mut out, &channel, &payload),
                _ => peers::mqtt_publish(&mut out, &channel, &payload),
            }
        }
        sent += batch;
        progress.show(sent);
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        out.clear();
        // Redis answers every PUBLISH: keep at most --inflight unanswered, and read
        // every answer before closing (unread bytes make close() a reset, and the
        // server would drop what it had not read yet).
        let limit = if args.more(sent, start.elapsed()) { args.inflight as u64 } else { 0 };
        while system == System::Redis && sent - answered > limit {
            let n = stream.read(&mut inbuf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("redis closed the connection".into());
            }
            pending.extend_from_slice(&inbuf[..n]);
            let mut pos = 0;
            while let Some((used, _)) = peers::resp_next(&pending[pos..])? {
                pos += used;
                answered += 1;
            }
            pending.drain(..pos);
        }
    }
    if system == System::Mosquitto {
        // DISCONNECT, then wait for the broker to close: everything sent was read.
        stream.write_all(&[0xe0, 0x00]).await.map_err(|e| e.to_string())?;
        while stream.read(&mut inbuf).await.map_err(|e| e.to_string())? > 0 {}
    }
    side.accepted = sent;
    side.elapsed = start.elapsed();
    Ok(side)
}

/// Pushes to ringpush as a shard-aware app server would: unicast goes out on one
/// connection per shard (each steered to its shard by source port), each carrying the
/// pushes for the devices that shard owns, so no push crosses cores on the server.
/// Messages, in-flight window and rate are split by each shard's share of the devices.
/// Broadcasts (every shard takes part anyway) use one connection.
async fn push_ringpush(args: &BenchArgs, app_addr: SocketAddr) -> Result<PushSide, String> {
    let secret = args.secret.as_bytes();
    let first = AppClient::connect(app_addr, APP, secret).await.map_err(|e| e.to_string())?;
    let progress = Rc::new(RefCell::new(Progress::new("ringpush", args.messages())));
    let n = usize::from(first.shards.max(1));
    if args.scenario == Scenario::Broadcast || n == 1 {
        return push_ringpush_on(args, first, (0..args.devices).collect(), progress).await;
    }
    let mut owned: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in 0..args.devices {
        owned[crate::routing::shard_for(APP, &format!("d{i}"), n)].push(i);
    }
    let owned: Vec<(usize, Vec<usize>)> = owned.into_iter().enumerate().filter(|(_, d)| !d.is_empty()).collect();
    let (mut first, connections) = (Some(first), owned.len());
    let (mut tasks, mut given) = (Vec::new(), 0u64);
    for (k, (shard, devices)) in owned.into_iter().enumerate() {
        let app = match first.take_if(|a| usize::from(a.shard) == shard) {
            Some(a) => a,
            None => AppClient::connect_to_shard(app_addr, APP, secret, shard as u16, n as u16)
                .await
                .map_err(|e| e.to_string())?,
        };
        let share = |v: u64| (v as f64 * devices.len() as f64 / args.devices as f64).round() as u64;
        let mut a = args.clone();
        // The last connection takes what rounding left over.
        let messages = if k + 1 == connections {
            args.messages() - given
        } else {
            share(args.messages()).min(args.messages() - given)
        };
        given += messages;
        a.messages = Some(messages);
        a.inflight = (share(args.inflight as u64) as usize).max(1);
        a.rate = if args.rate > 0 { share(args.rate).max(1) } else { 0 };
        let progress = Rc::clone(&progress);
        tasks.push(glommio::spawn_local(async move { push_ringpush_on(&a, app, devices, progress).await }));
    }
    let mut out = PushSide::default();
    for t in tasks {
        out.merge(t.await?);
    }
    Ok(out)
}

/// One pusher connection: pushes to random devices among `devices` (or broadcasts).
async fn push_ringpush_on(
    args: &BenchArgs,
    mut app: AppClient,
    devices: Vec<usize>,
    progress: Rc<RefCell<Progress>>,
) -> Result<PushSide, String> {
    let names: Vec<String> = devices.iter().map(|i| format!("d{i}")).collect();
    let mut payload = vec![0x2au8; args.payload.max(8)];
    let mut out = PushSide::default();
    let mut inflight: HashMap<u64, Option<usize>> = HashMap::new();
    let mut retry: Vec<Option<usize>> = Vec::new();
    let mut queued = 0u64;
    let mut targets = Targets {
        rng: rand::random::<u64>() | 1,
        devices: devices.len(),
        broadcast: args.scenario == Scenario::Broadcast,
    };
    let start = Instant::now();
    loop {
        let more = args.more(queued, start.elapsed());
        if !more && inflight.is_empty() && retry.is_empty() {
            break;
        }
        while inflight.len() < args.inflight && (args.more(queued, start.elapsed()) || !retry.is_empty()) {
            if args.rate > 0 && start.elapsed() < due_at(out.accepted + inflight.len() as u64, args.rate) {
                break;
            }
            let target = if let Some(t) = retry.pop() {
                t
            } else {
                queued += 1;
                targets.next()
            };
            payload[..8].copy_from_slice(&unix_us().to_be_bytes());
            let t = match target {
                Some(i) => PushTarget::Device(&names[i]),
                None => PushTarget::App,
            };
            let id = app.queue_push(t, 0, &payload);
            inflight.insert(id, target);
        }
        app.flush().await.map_err(|e| e.to_string())?;
        // At a set rate, sleep until the next push is due (a tick at least) and then take
        // whatever replies came meanwhile, so pushes leave on time, not in bursts
        // released by the replies of each group flush (a burst queues behind itself all
        // the way to the devices), and no read is armed and cancelled at every tick.
        let next_due = (args.rate > 0 && args.more(queued, start.elapsed())).then(|| {
            let due = due_at(out.accepted + inflight.len() as u64, args.rate);
            due.saturating_sub(start.elapsed()).max(PACE_TICK)
        });
        let first = match next_due {
            Some(wait) => {
                glommio::timer::sleep(wait).await;
                app.read_available().map_err(|e| e.to_string())?;
                app.try_reply().map_err(|e| e.to_string())?
            }
            // Only retries left to send, waiting for their turn.
            None if inflight.is_empty() => {
                glommio::timer::sleep(Duration::from_micros(200)).await;
                continue;
            }
            None => Some(app.next_reply().await.map_err(|e| e.to_string())?),
        };
        // Take every reply that arrived with this one before queueing more: the pushes
        // they free go out in one write, as a pipelining app server would send them
        // (the peers' pushers write 256 at a time), not one segment per reply.
        let mut reply = first;
        let mut busy_ms = 0;
        while let Some(r) = reply {
            busy_ms = busy_ms.max(settle(r, &devices, &mut out, &mut inflight, &mut retry, &progress)?);
            reply = app.try_reply().map_err(|e| e.to_string())?;
        }
        if busy_ms > 0 {
            glommio::timer::sleep(Duration::from_millis(busy_ms as u64)).await;
        }
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

/// Books one reply of the ringpush pusher (its target a position in `devices`); returns
/// how long the server asked it to wait before retrying (0 unless BUSY).
fn settle(
    reply: AppReply,
    devices: &[usize],
    out: &mut PushSide,
    inflight: &mut HashMap<u64, Option<usize>>,
    retry: &mut Vec<Option<usize>>,
    progress: &RefCell<Progress>,
) -> Result<u32, String> {
    let AppReply::Push(id, outcome) = reply else {
        return Err(format!("unexpected reply {reply:?}"));
    };
    let target = inflight.remove(&id).ok_or("reply for an unknown request")?;
    match outcome {
        PushOutcome::Accepted(_) => {
            out.accepted += 1;
            out.count(target.map(|i| devices[i]));
            progress.borrow_mut().advance();
        }
        PushOutcome::Rejected(code, reason) => {
            out.rejected += 1;
            if out.rejected == 1 {
                eprintln!("ringpush bench: push rejected: {code}: {reason}");
            }
        }
        PushOutcome::Busy(ms) => {
            out.busy_retries += 1;
            retry.push(target);
            return Ok(ms);
        }
    }
    Ok(0)
}

/// How many times a run connects every device: once per system, twice for a ringpush
/// box the run spawns in a storm (again after its restart), plus the storm's untimed
/// raw round.
fn connect_rounds(scenario: Scenario, systems: &[System], spawned: bool) -> u64 {
    let storm = scenario == Scenario::Storm;
    let per = |s: &System| if storm && spawned && *s == System::Ringpush { 2 } else { 1 };
    systems.iter().map(per).sum::<u64>() + u64::from(storm)
}

/// How many ephemeral ports outgoing connections get (`ip_local_port_range`).
fn ephemeral_ports() -> Option<u64> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = range.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    Some(hi.saturating_sub(lo) + 1)
}

/// Why `connects` connections in one run are too many for `ports` ephemeral ports, if
/// they are. Past the range, connects reuse the ports of connections closed moments
/// before (whose ends may still linger in TIME_WAIT), and handshakes slow down:
/// measured here, a storm's after-restart round ran 12.6–13.5 k/s against 78.6 k/s with
/// the range of `kernel-tuning/` (10240–65535).
fn port_warning(connects: u64, ports: u64) -> Option<String> {
    (connects > ports).then(|| {
        format!(
            "this run opens {connects} connections but net.ipv4.ip_local_port_range has {ports} ports: \
             ports of connections closed moments before are reused and connects slow down; \
             apply kernel-tuning/sysctl.d/60-ringpush.conf (10240-65535)"
        )
    })
}

/// Runs `ringpush bench`: ringpush, then every `--compare` system; prints one table
/// row (or JSON object) per system.
pub fn run(args: BenchArgs) -> Result<(), String> {
    if args.scenario == Scenario::Store {
        return crate::store_bench::run(&args);
    }
    crate::server::raise_nofile();
    // The raw sink accepts every device in this process: its table is grown up front,
    // as the box's and the workers' are.
    presize_fd_table(args.devices);
    let mut systems = vec![System::Ringpush];
    systems.extend(args.compare.iter().copied().filter(|s| *s != System::Ringpush));
    if args.scenario == Scenario::Offline && systems.len() > 1 {
        eprintln!("ringpush bench: offline: only ringpush keeps messages for offline devices; peers skipped");
        systems.truncate(1);
    }
    let rounds = connect_rounds(args.scenario, &systems, args.server.is_none());
    if let Some(w) = ephemeral_ports().and_then(|ports| port_warning(args.devices as u64 * rounds, ports)) {
        eprintln!("ringpush bench: warning: {w}");
    }
    let mut warm_up_per_sec = None;
    if args.scenario == Scenario::Storm {
        // The first storm of a run pays alone for the kernel's first growth of its
        // socket, file and inode caches (and here, on a VM, for pages the host had taken
        // back), which every storm after it finds ready: measured, the raw limit ran
        // 72-88 k/s first and 96-109 k/s after ringpush. So one untimed raw round
        // first, and every system is measured on a warm kernel.
        let warm_up = run_one(&args, System::Raw).map_err(|e| format!("storm warm-up: {e}"))?;
        warm_up_per_sec = warm_up["connect_per_sec"].as_f64();
    }
    let mut results = Vec::new();
    for system in systems {
        let mut r = run_one(&args, system)?;
        if let Some(v) = warm_up_per_sec {
            // Shown so a reader sees what a cold kernel costs the first storm.
            r["warm_up_connect_per_sec"] = json!(v.round());
        }
        results.push(r);
    }
    // Every system's rate as a share of the physical limit, when it was measured: for
    // a storm, connects (handshakes included) against raw TCP accept+connect.
    let rate_key = if args.scenario == Scenario::Storm { "connect_per_sec" } else { "delivered_per_sec" };
    let raw = results.iter().find(|r| r["system"] == "raw").and_then(|r| r[rate_key].as_f64());
    if let Some(raw) = raw.filter(|v| *v > 0.0) {
        for r in results.iter_mut() {
            let ratio = r[rate_key].as_f64().unwrap_or(0.0) / raw;
            r["ratio_to_raw"] = json!((ratio * 1000.0).round() / 1000.0);
        }
    }
    let table = table(&results);
    if args.json {
        for r in &results {
            println!("{r}");
        }
    } else {
        print!("{table}");
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))
        };
        write("summary.json", serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?)?;
        write("summary.txt", table)?;
        write("chart.svg", crate::chart::svg(&results))?;
    }
    nothing_lost(&results)
}

/// Fails the run when ringpush lost a message it accepted (after the report is out).
/// Peers are only reported: Redis pub/sub and MQTT QoS 0 promise no delivery.
fn nothing_lost(results: &[Value]) -> Result<(), String> {
    let lost: u64 = results.iter().filter(|r| r["system"] == "ringpush").filter_map(|r| r["lost"].as_u64()).sum();
    if lost > 0 {
        return Err(format!("ringpush lost {lost} accepted messages"));
    }
    Ok(())
}

/// What a run targets: a ringpush box (spawned or running) or a peer server.
enum Under {
    Ringpush(Option<Spawned>),
    Peer(Peer),
    Raw(RawServer),
}

fn run_one(args: &BenchArgs, system: System) -> Result<Value, String> {
    // Every push of this run is stamped after this (offline pushes before connecting).
    let began_us = unix_us();
    let mut under = match (system, args.server) {
        (System::Ringpush, Some(_)) => Under::Ringpush(None),
        (System::Ringpush, None) => Under::Ringpush(Some(Spawned::start(args.shards, &args.set)?)),
        (System::Raw, _) => Under::Raw(RawServer::start()?),
        (peer, _) => Under::Peer(Peer::start(peer, args.devices)?),
    };
    let (device_addr, app_addr, server_pid) = match (&under, args.server, args.app_server) {
        (Under::Ringpush(Some(s)), _, _) => (s.device, s.app, Some(s.child.id())),
        (Under::Ringpush(None), Some(d), Some(a)) => (d, a, None),
        (Under::Ringpush(None), _, _) => return Err("--server needs --app-server too".into()),
        (Under::Peer(p), _, _) => (p.addr, p.addr, Some(p.child.id())),
        (Under::Raw(r), _, _) => (r.addr, r.addr, Some(std::process::id())),
    };
    let usage = || server_pid.and_then(proc_usage);
    let (_, rss_before) = usage().unwrap_or((0.0, 0));
    let kernel_before = kernel_socket_bytes();

    // Offline: every push is accepted before any device connects.
    let mut push = PushSide::default();
    if args.scenario == Scenario::Offline {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .map_err(|e| format!("cannot start the executor: {e}"))?;
        let a = args.clone();
        push = ex.run(async move { push_load(&a, system, app_addr).await })?;
    }
    let connect_start = Instant::now();
    let connect_start_us = unix_us();
    let (cpu_at_connect, _) = usage().unwrap_or((0.0, 0));
    // Only scenarios that deliver read their CPU off a trace (see `server_cpu` below).
    let delivers = matches!(args.scenario, Scenario::Unicast | Scenario::Broadcast | Scenario::Offline);
    let trace = server_pid.filter(|_| delivers).map(CpuTrace::start);
    let mut workers = spawn_workers(args, system, device_addr, began_us)?;
    let Ready { connected, secs: mut connect_secs, first_us: window_from, last_us: mut window_to } =
        wait_ready(&mut workers)?;
    // A ringpush handshake is done when its WELCOME arrives, so the box accepted it. A
    // raw connect is done when the client's connect is, while the sink's accept of it
    // may still be queued: raw accept+connect ends when both are done.
    if let (Under::Raw(raw), Scenario::Storm) = (&mut under, args.scenario) {
        raw.wait_for(args.devices)?;
        window_to = window_to.max(raw.last_accept_us());
        connect_secs = (window_to.saturating_sub(window_from) as f64 / 1e6).max(1e-6);
    }
    // The storm scenario's CPU is the connect phase's (its box is restarted afterwards),
    // over the whole wait, worker start-up included, when the server is mostly idle.
    let (cpu_connected, rss_connected) = usage().unwrap_or((0.0, 0));
    let connect_cpu = 100.0 * (cpu_connected - cpu_at_connect) / connect_start.elapsed().as_secs_f64().max(1e-6);
    everyone(connected, args.devices, "")?;

    // Offline measures from the first connect (the drain); the others after connecting.
    let t0 = if args.scenario == Scenario::Offline { connect_start } else { Instant::now() };
    // The idle hold's CPU is read directly; the scenarios that deliver use the trace.
    let cpu0 = usage().unwrap_or((0.0, 0)).0;
    let mut idle = json!({});
    match args.scenario {
        // The store scenario returned at the top of `run`.
        Scenario::Offline | Scenario::Store => {}
        Scenario::Storm => {
            // Restart a spawned box on the same ports and connect everyone again.
            if let Under::Ringpush(slot @ Some(_)) = &mut under {
                stop_workers(&mut workers, &push)?;
                let old = slot.take().expect("matched Some");
                let (device, app) = (old.device.to_string(), old.app.to_string());
                drop(old); // SIGTERM: devices get BYE; the ports are free again
                *slot = Some(Spawned::start_at(args.shards, &args.set, &device, &app)?);
                workers = spawn_workers(args, system, device_addr, began_us)?;
                let again = wait_ready(&mut workers)?;
                everyone(again.connected, args.devices, " again after the restart")?;
                idle = json!({ "reconnected": again.connected, "reconnect_per_sec": again.connected as f64 / again.secs,
                        "reconnect_window_us": [again.first_us, again.last_us] });
            }
        }
        Scenario::Idle => {
            std::thread::sleep(args.hold);
            let (_, rss) = usage().unwrap_or((0.0, 0));
            let kernel = kernel_socket_bytes();
            idle = json!({
                "connect_per_sec": connected as f64 / connect_secs,
                "rss_per_device_bytes": rss.saturating_sub(rss_before) / connected.max(1),
                // Both ends of each loopback connection live in this kernel.
                "kernel_bytes_per_socket": kernel.saturating_sub(kernel_before) / (2 * connected.max(1)),
            });
        }
        Scenario::Unicast | Scenario::Broadcast if system == System::Raw => {
            let Under::Raw(raw) = &mut under else { unreachable!("raw runs on a RawServer") };
            raw.wait_for(args.devices)?;
            let mut targets = Targets {
                rng: rand::random::<u64>() | 1,
                devices: args.devices,
                broadcast: args.scenario == Scenario::Broadcast,
            };
            let started = Instant::now();
            let mut side = PushSide::default();
            let sent = raw.send(
                args.messages(),
                args.duration.map(|d| started + d),
                args.payload.max(8),
                || {
                    let t = targets.next();
                    side.count(t);
                    t
                },
                unix_us,
            )?;
            side.accepted = sent;
            side.elapsed = started.elapsed();
            push = side;
        }
        Scenario::Unicast | Scenario::Broadcast => {
            let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .make()
                .map_err(|e| format!("cannot start the executor: {e}"))?;
            let a = args.clone();
            push = ex.run(async move { push_load(&a, system, app_addr).await })?;
        }
    }
    let (cpu1, rss_after) = usage().unwrap_or((0.0, 0));
    let held = t0.elapsed().as_secs_f64().max(1e-6);

    let Collected { hist, delivered, duplicates, stale, last_us, timeline } = stop_workers(&mut workers, &push)?;
    if stale > 0 {
        eprintln!(
            "ringpush bench: {stale} messages pushed before this run began (an earlier run's, unacked when it \
             ended) were delivered too; they are not counted"
        );
    }
    let cpu = trace.map(CpuTrace::finish).unwrap_or_default();
    let expected = match args.scenario {
        Scenario::Unicast | Scenario::Offline => push.accepted,
        Scenario::Broadcast => push.accepted * connected,
        Scenario::Idle | Scenario::Storm | Scenario::Store => 0,
    };
    let start_us = match args.scenario {
        Scenario::Offline => connect_start_us,
        _ => unix_us() - t0.elapsed().as_micros() as u64,
    };
    let drained = last_us.saturating_sub(start_us) as f64 / 1e6;
    let window = match args.scenario {
        Scenario::Offline => drained,
        _ => drained.max(push.elapsed.as_secs_f64()),
    }
    .max(1e-6);
    let server_cpu = match args.scenario {
        Scenario::Storm => connect_cpu,
        Scenario::Idle => 100.0 * (cpu1 - cpu0) / held,
        // From the first push (or connect) to the last delivery.
        _ => {
            let end_us = start_us + (window * 1e6) as u64;
            100.0 * (cpu_at(&cpu, end_us) - cpu_at(&cpu, start_us)) / window
        }
    };
    let q = |p: f64| if hist.is_empty() { 0 } else { hist.value_at_quantile(p) };
    let mut result = json!({
        "scenario": format!("{:?}", args.scenario).to_lowercase(),
        "system": system.name(),
        "devices": connected,
        "payload_bytes": args.payload.max(8),
        "sent": push.accepted,
        "rejected": push.rejected,
        "busy_retries": push.busy_retries,
        "delivered": delivered,
        "lost": expected.saturating_sub(delivered),
        "duplicates": duplicates,
        "stale": stale,
        "delivered_per_sec": if args.scenario == Scenario::Idle { 0.0 } else { delivered as f64 / window },
        "latency_us": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": hist.max()},
        "server_rss_bytes": if args.scenario == Scenario::Storm { rss_connected } else { rss_after },
        "server_cpu_percent": server_cpu,
        "connect_per_sec": connected as f64 / connect_secs,
        // The first connect's window, [first attempt, last handshake] in unix µs (a
        // profile taken with `perf record -k CLOCK_REALTIME` can be cut to it).
        "connect_window_us": [window_from, window_to],
        "set": args.set,
        // Deliveries per second over time: [ms since the measured phase began, rate].
        "timeline": timeline
            .iter()
            .map(|(bucket, b)| json!([(bucket * 100).saturating_sub(start_us / 1000), b.n * 10]))
            .collect::<Vec<_>>(),
        // Per 100 ms: [ms since the measured phase began, messages slower than 1 ms,
        // the slowest message's µs].
        "latency_timeline": timeline
            .iter()
            .map(|(bucket, b)| json!([(bucket * 100).saturating_sub(start_us / 1000), b.slow, b.max_us]))
            .collect::<Vec<_>>(),
    });
    if let (Some(r), Value::Object(extra)) = (result.as_object_mut(), idle) {
        r.extend(extra);
    }
    drop(under);
    Ok(result)
}

/// The results as a text table, one row per system.
fn table(results: &[Value]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let Some(first) = results.first() else { return out };
    let _ = writeln!(
        out,
        "scenario {}  devices {}  payload {} B  {}",
        first["scenario"], first["devices"], first["payload_bytes"], first["set"]
    );
    let _ = writeln!(
        out,
        "{:<10} {:>10} {:>10} {:>6} {:>6} {:>14} {:>8} {:>8} {:>8} {:>9} {:>12} {:>8} {:>7}",
        "system",
        "sent",
        "delivered",
        "lost",
        "dups",
        "delivered/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "rss MB",
        "connect/s",
        "cpu %",
        "vs raw"
    );
    for r in results {
        row(&mut out, r);
    }
    out
}

fn row(out: &mut String, r: &Value) {
    use std::fmt::Write as _;
    let l = &r["latency_us"];
    let _ = writeln!(
        out,
        "{:<10} {:>10} {:>10} {:>6} {:>6} {:>14.0} {:>8} {:>8} {:>8} {:>9.1} {:>12.0} {:>8.0} {:>7}",
        r["system"].as_str().unwrap_or(""),
        r["sent"].as_u64().unwrap_or(0),
        r["delivered"].as_u64().unwrap_or(0),
        r["lost"].as_u64().unwrap_or(0),
        r["duplicates"].as_u64().unwrap_or(0),
        r["delivered_per_sec"].as_f64().unwrap_or(0.0),
        l["p50"].as_u64().unwrap_or(0),
        l["p99"].as_u64().unwrap_or(0),
        l["max"].as_u64().unwrap_or(0),
        r["server_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        r["connect_per_sec"].as_f64().unwrap_or(0.0),
        r["server_cpu_percent"].as_f64().unwrap_or(0.0),
        r["ratio_to_raw"].as_f64().map_or("-".to_string(), |v| format!("{v:.2}")),
    );
    if r.get("rss_per_device_bytes").is_some() {
        let _ = writeln!(
            out,
            "{:<10} idle: {} B server RSS per device, {} B kernel per socket",
            "", r["rss_per_device_bytes"], r["kernel_bytes_per_socket"]
        );
    }
}

/// Arguments of the hidden worker subcommand.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[arg(long)]
    pub server: SocketAddr,
    #[arg(long)]
    pub secret: String,
    #[arg(long)]
    pub from: usize,
    #[arg(long)]
    pub count: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// What the devices connect to.
    #[arg(long, value_enum, default_value = "ringpush")]
    pub system: System,
    /// Message size, for the raw limit's fixed-size frames.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Unix µs when the run began: a message sent before it is left over from an
    /// earlier run on the same box (delivered again because that run ended before
    /// acking it) and is counted as stale, not as a delivery of this run.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
}

#[derive(Default)]
struct WorkerStats {
    received: u64,
    duplicates: u64,
    /// Messages sent before the run began (see [`WorkerArgs::since`]).
    stale: u64,
    failed: u64,
    connected: u64,
    /// Unix µs of the last handshake completed.
    last_connected_us: u64,
    last_us: u64,
    /// Messages received per 100 ms, keyed by unix time / 100 ms (for the chart).
    timeline: std::collections::BTreeMap<u64, Bucket>,
}

impl WorkerStats {
    /// Counts a device that failed for good; the first failure's reason is printed.
    fn give_up(&mut self, device: usize, why: &dyn std::fmt::Display) {
        if self.failed == 0 {
            eprintln!("ringpush bench-worker: device d{device}: {why}");
        }
        self.failed += 1;
    }
}

/// Where a worker's devices record what they receive.
struct Received {
    stats: Rc<RefCell<WorkerStats>>,
    hist: Rc<RefCell<Histogram<u64>>>,
    /// Connects that may start now (a device's permit comes back once it is connected
    /// or has failed for good).
    permits: Rc<RefCell<usize>>,
    /// Devices whose handshake failed on the receive ring: attempts so far, and those
    /// to connect again (device, attempt) with [`HANDSHAKE_ATTEMPTS`] at most.
    attempts: RefCell<HashMap<usize, u32>>,
    again: RefCell<Vec<(usize, u32)>>,
    /// Unix µs when the run began ([`WorkerArgs::since`]).
    since: u64,
}

/// Attempts at a device's connection before it counts as failed (a storm of connects
/// can overflow accept queues, and a busy owner shard refuses with BUSY, retry).
const HANDSHAKE_ATTEMPTS: u32 = 5;

/// How long a device waits before its connect attempt `attempt` (1 is the first retry).
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50 << attempt.saturating_sub(1).min(6))
}

impl Sink for Received {
    fn record(&self, payload: &[u8], duplicate: bool) {
        Received::record(self, payload, duplicate);
    }

    fn connected(&self) {
        Received::connected(self);
    }

    fn failed(&self, device: usize, why: &str) {
        let mut attempts = self.attempts.borrow_mut();
        let n = attempts.entry(device).or_insert(1);
        if *n < HANDSHAKE_ATTEMPTS {
            // The device keeps its permit while it waits to try again.
            self.again.borrow_mut().push((device, *n));
            *n += 1;
            return;
        }
        *self.permits.borrow_mut() += 1;
        self.stats.borrow_mut().give_up(device, &why);
    }
}

impl Received {
    /// Records one message: its end-to-end latency from the send time in its first 8
    /// bytes, and whether it was a duplicate.
    fn record(&self, payload: &[u8], duplicate: bool) {
        let now = unix_us();
        let sent = payload.get(..8).map_or(now, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
        let mut st = self.stats.borrow_mut();
        if sent < self.since {
            st.stale += 1;
            return;
        }
        let latency = now.saturating_sub(sent).max(1);
        self.hist.borrow_mut().saturating_record(latency);
        if duplicate {
            st.duplicates += 1;
        } else {
            st.received += 1;
        }
        st.last_us = now;
        st.timeline.entry(now / 100_000).or_default().add(latency);
    }

    fn connected(&self) {
        *self.permits.borrow_mut() += 1;
        let mut st = self.stats.borrow_mut();
        st.connected += 1;
        st.last_connected_us = unix_us();
    }
}

/// Connects with up to 5 attempts and growing back-off (a storm of connects can
/// overflow accept queues). On failure the connect permit is returned.
async fn with_retries<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    permits: &RefCell<usize>,
    mut connect: impl FnMut() -> F,
) -> Result<T, String> {
    let mut attempt = 1;
    loop {
        match connect().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt == HANDSHAKE_ATTEMPTS => {
                *permits.borrow_mut() += 1;
                return Err(e.to_string());
            }
            Err(_) => glommio::timer::sleep(backoff(attempt)).await,
        }
        attempt += 1;
    }
}

/// Grows this process's descriptor table for `sockets` sockets and the few descriptors
/// around them, before it has threads (see [`crate::server::presize_fd_table`]), so a
/// storm of connects is not stalled by the table's growth on either side.
fn presize_fd_table(sockets: usize) {
    if let Err(e) = crate::server::presize_fd_table(sockets as u64 + 256) {
        eprintln!("ringpush bench: cannot presize the descriptor table: {e}");
    }
}

/// A ringpush device's first bytes: preamble and HELLO with its token (minted with the
/// app's secret, valid for a day). A device holds its token before it connects, so the
/// worker makes every HELLO before its first connect and none inside the storm.
fn device_hello(secret: &str, i: usize, expiry: u64) -> Vec<u8> {
    let id = format!("d{i}");
    let token = DeviceToken::mint(secret.as_bytes(), APP, &id, expiry);
    crate::client::hello_bytes(APP, &id, &token, 0, 0)
}

/// One ringpush device: connect sending its `hello` (in the SYN, with Fast Open), with
/// retries while the connect itself fails; the process's receive ring takes the socket
/// at once and sees the WELCOME, then reads and acks until it closes:
/// messages are handled in place a received batch at a time, one ack decision per batch
/// (cumulative, by DEVICE_ACKS). What is unacked when the run ends stays on the server,
/// as it would for a device that went away.
async fn ringpush_device(
    server: SocketAddr,
    hello: &[u8],
    i: usize,
    receiver: &Receiver<Received>,
    permits: &RefCell<usize>,
) -> Result<(), String> {
    let (fd, sent) =
        with_retries(permits, || std::future::ready(crate::client::open_sending(server, hello, None))).await?;
    let wire = Wire::Ringpush(Acker::new(DEVICE_ACKS, 0, 0));
    receiver.open(fd, wire, Phase::Greeting { preamble: false }, &hello[sent..], i);
    Ok(())
}

/// One raw-limit receiver: a non-blocking connect (with retries while it fails at
/// once); the receive ring sees it complete and then counts fixed-size messages.
async fn raw_device(
    server: SocketAddr,
    i: usize,
    size: usize,
    receiver: &Receiver<Received>,
    permits: &RefCell<usize>,
) -> Result<(), String> {
    let (fd, done) = with_retries(permits, || std::future::ready(crate::bench_rx::connect_raw(server))).await?;
    if done {
        receiver.sink().connected();
        receiver.add(fd, Wire::Raw(size), &[]);
    } else {
        receiver.open(fd, Wire::Raw(size), Phase::Connecting, &[], i);
    }
    Ok(())
}

/// One Redis or MQTT subscriber: its own channel/topic and `all`; once both are
/// confirmed the receive ring reads it.
async fn peer_device(
    system: System,
    server: SocketAddr,
    i: usize,
    receiver: &Receiver<Received>,
    permits: &RefCell<usize>,
) -> Result<(), String> {
    let id = format!("d{i}");
    let mut stream = with_retries(permits, || glommio::net::TcpStream::connect(server)).await?;
    let mut out = Vec::new();
    match system {
        System::Redis => peers::resp_subscribe(&mut out, &[&id, peers::ALL]),
        _ => {
            peers::mqtt_connect(&mut out, &id, 600);
            peers::mqtt_subscribe(&mut out, 1, &[&id, peers::ALL]);
        }
    }
    // Subscribed once the server confirmed both subscriptions (Redis) or the
    // connection and the subscription (MQTT): pushes before that would be lost.
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let subscribed = async {
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut confirmations = 0;
        while confirmations < 2 {
            read_packets(system, &mut stream, &mut buf, &mut |p| match p {
                None => confirmations += 1,
                Some(p) => receiver.sink().record(p, false),
            })
            .await?;
        }
        Ok::<(), String>(())
    }
    .await;
    if let Err(e) = subscribed {
        *permits.borrow_mut() += 1;
        return Err(e);
    }
    receiver.sink().connected();
    let wire = if system == System::Redis { Wire::Redis } else { Wire::Mqtt };
    receiver.add(dup_socket(&stream).map_err(|e| e.to_string())?, wire, &buf);
    Ok(())
}

/// Reads once from a peer connection and hands every whole packet to `each`
/// (`Some(payload)` for a message, `None` for anything else). `Ok(false)` on EOF.
async fn read_packets(
    system: System,
    stream: &mut glommio::net::TcpStream,
    buf: &mut Vec<u8>,
    each: &mut dyn FnMut(Option<&[u8]>),
) -> Result<bool, String> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(false);
    }
    buf.extend_from_slice(&chunk[..n]);
    let mut pos = 0;
    loop {
        let next = match system {
            System::Redis => peers::resp_next(&buf[pos..])?,
            _ => peers::mqtt_next(&buf[pos..])?,
        };
        let Some((used, payload)) = next else { break };
        each(payload);
        pos += used;
    }
    buf.drain(..pos);
    Ok(true)
}

/// Runs one load-generator process: connect devices, report, receive until told to
/// stop, then report counts and the latency histogram as one JSON line.
pub fn worker(args: WorkerArgs) -> Result<(), String> {
    crate::server::raise_nofile();
    presize_fd_table(args.count);
    let stop = Arc::new(AtomicBool::new(false));
    let expect = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (s, e) = (Arc::clone(&stop), Arc::clone(&expect));
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        // "stop N": N messages were accepted for this worker's devices.
        let n = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        e.store(n, Ordering::Relaxed);
        s.store(true, Ordering::Relaxed);
    });
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .map_err(|e| format!("cannot start the executor: {e}"))?;
    let receiver = ex.run(async move {
        let stats = Rc::new(RefCell::new(WorkerStats::default()));
        let hist = Rc::new(RefCell::new(new_hist()));
        let expiry = unix_ms() / 1000 + 86_400;
        let permits = Rc::new(RefCell::new(args.concurrency.max(1)));
        let sink = Received {
            stats: Rc::clone(&stats),
            hist: Rc::clone(&hist),
            permits: Rc::clone(&permits),
            attempts: RefCell::default(),
            again: RefCell::default(),
            since: args.since,
        };
        let receiver = match Receiver::start(sink) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("ringpush bench-worker: cannot set up the receive ring: {e}");
                std::process::exit(1);
            }
        };
        let hellos: Rc<Vec<Vec<u8>>> = Rc::new(match args.system {
            System::Ringpush => {
                (args.from..args.from + args.count).map(|i| device_hello(&args.secret, i, expiry)).collect()
            }
            _ => Vec::new(),
        });
        // Connects device `i` after `delay` (a retry's back-off), holding a permit.
        let launch = {
            let (stats, permits, receiver) = (Rc::clone(&stats), Rc::clone(&permits), Rc::clone(&receiver));
            let (server, from, system, size) = (args.server, args.from, args.system, args.payload);
            move |i: usize, delay: Duration| {
                let (stats, permits, receiver) = (Rc::clone(&stats), Rc::clone(&permits), Rc::clone(&receiver));
                let hellos = Rc::clone(&hellos);
                glommio::spawn_local(async move {
                    if !delay.is_zero() {
                        glommio::timer::sleep(delay).await;
                    }
                    let r = &*receiver;
                    let connected = match system {
                        System::Ringpush => ringpush_device(server, &hellos[i - from], i, r, &permits).await,
                        System::Raw => raw_device(server, i, size, r, &permits).await,
                        // Boxed: its read buffer would make every device's task (a raw
                        // or ringpush one too) tens of KiB, copied when spawned.
                        peer => Box::pin(peer_device(peer, server, i, r, &permits)).await,
                    };
                    if let Err(e) = connected {
                        stats.borrow_mut().give_up(i, &e);
                    }
                })
                .detach();
            }
        };
        let launch = Rc::new(launch);
        // Devices whose handshake the receive ring saw fail connect again, backing off.
        let (r, l) = (Rc::clone(&receiver), Rc::clone(&launch));
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(5)).await;
                let again = std::mem::take(&mut *r.sink().again.borrow_mut());
                for (i, attempt) in again {
                    l(i, backoff(attempt));
                }
            }
        })
        .detach();
        let first_us = unix_us();
        for i in args.from..args.from + args.count {
            while *permits.borrow() == 0 {
                glommio::timer::sleep(Duration::from_micros(200)).await;
            }
            *permits.borrow_mut() -= 1;
            launch(i, Duration::ZERO);
        }
        while {
            let st = stats.borrow();
            st.connected + st.failed < args.count as u64
        } {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        // The parent may be gone (it stops at its first error): nothing to tell then.
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready {} {first_us} {}", stats.borrow().connected, stats.borrow().last_connected_us);
        let _ = out.flush();
        receiver
    });
    // Every device is connected or has failed for good (no retry is pending): from here
    // the process only receives and acks, on this thread, without glommio's loop.
    let received = |r: &Received| r.stats.borrow().received;
    receiver.run_blocking(TICK, |_| stop.load(Ordering::Relaxed));
    // Drain: until every expected message arrived (30 s at most), then a little longer
    // to catch duplicates.
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = expect.load(Ordering::Relaxed);
    receiver.run_blocking(TICK, |r| Instant::now() >= deadline || received(r) >= want);
    receiver.ack_all();
    let until = Instant::now() + Duration::from_millis(100);
    receiver.run_blocking(TICK, |_| Instant::now() >= until);
    let mut bytes = Vec::new();
    let sink = receiver.sink();
    V2Serializer::new().serialize(&sink.hist.borrow(), &mut bytes).expect("serializing to memory works");
    let st = sink.stats.borrow();
    let report = json!({
        "received": st.received, "duplicates": st.duplicates, "stale": st.stale, "failed": st.failed,
        "last_us": st.last_us, "hist": hex::encode(bytes),
        "timeline": st.timeline.iter().map(|(k, b)| b.to_json(*k)).collect::<Vec<_>>(),
    });
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{report}");
    let _ = out.flush();
    // The executor still holds the connect tasks: leave without tearing it down.
    std::process::exit(0)
}

/// The longest a worker's receiving thread sleeps before it looks at its stop flag.
const TICK: Duration = Duration::from_millis(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_needs_more_ephemeral_ports_than_the_range_has_is_warned_about() {
        let storm = connect_rounds(Scenario::Storm, &[System::Ringpush, System::Raw], true);
        assert_eq!(storm, 4, "warm-up, ringpush twice, raw");
        assert_eq!(connect_rounds(Scenario::Storm, &[System::Ringpush], false), 2, "a running box is not restarted");
        assert_eq!(connect_rounds(Scenario::Unicast, &[System::Ringpush, System::Redis], true), 2);
        // The kernel's default range (32768-60999) against the storm of the report.
        let w = port_warning(10_000 * storm, 60_999 - 32_768 + 1).expect("40000 connects > 28232 ports");
        assert!(w.contains("40000 connections") && w.contains("28232 ports"), "{w}");
        assert_eq!(port_warning(40_000, 65_535 - 10_240 + 1), None, "kernel-tuning's range holds them");
    }

    #[test]
    fn pushes_fall_due_at_the_rate() {
        assert_eq!(due_by(Duration::ZERO, 1000), 1, "the first at once");
        assert_eq!(due_by(Duration::from_micros(999), 1000), 1);
        assert_eq!(due_by(Duration::from_millis(1), 1000), 2);
        assert_eq!(due_by(Duration::from_secs(2), 67_000), 134_001);
        assert_eq!(due_by(Duration::from_secs(2), 0), u64::MAX, "rate 0: all of them");
        assert_eq!(due_at(67_000, 67_000), Duration::from_secs(1));
        // A push is due by the time due_by counts it.
        for n in [0, 1, 99, 12_345] {
            assert!(due_by(due_at(n, 3_000), 3_000) > n);
        }
    }

    #[test]
    fn a_bucket_counts_slow_messages_keeps_the_slowest_and_survives_the_report() {
        let mut a = Bucket::default();
        for us in [120, 1000, 1001, 40] {
            a.add(us);
        }
        assert_eq!(a, Bucket { n: 4, slow: 1, max_us: 1001 }, "1 ms itself is within the bound");
        let mut b = Bucket::default();
        b.add(7000);
        a.merge(b);
        assert_eq!(a, Bucket { n: 5, slow: 2, max_us: 7000 });
        assert_eq!(Bucket::from_json(&a.to_json(17_000)), Some((17_000, a)));
        assert_eq!(Bucket::from_json(&json!([1, 2])), None, "a short entry is not a bucket");
    }

    #[test]
    fn cpu_is_read_off_the_trace_between_samples() {
        let samples = [(1_000, 1.0), (2_000, 1.5), (3_000, 1.5)];
        assert_eq!(cpu_at(&samples, 1_000), 1.0);
        assert_eq!(cpu_at(&samples, 1_500), 1.25, "halfway between two samples");
        assert_eq!(cpu_at(&samples, 2_500), 1.5);
        assert_eq!((cpu_at(&samples, 0), cpu_at(&samples, 9_000)), (1.0, 1.5), "clamped to the ends");
        assert_eq!(cpu_at(&[], 5), 0.0);
        // A trace of this process sees the CPU it burns.
        let me = std::process::id();
        let trace = CpuTrace::start(me);
        let (before, deadline) = (proc_cpu(me).unwrap(), Instant::now() + Duration::from_secs(10));
        let mut x = 0u64;
        // Spin until /proc counts 30 ms more (its clock ticks are 10 ms).
        while proc_cpu(me).unwrap() < before + 0.03 && Instant::now() < deadline {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let got = trace.finish();
        assert!(got.len() >= 2, "{got:?}");
        assert!(got.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1), "{got:?}");
        assert!(got.last().unwrap().1 > got[0].1, "the spin shows: {got:?}");
    }

    #[test]
    fn a_run_fails_when_ringpush_loses_a_message_and_not_for_a_peer() {
        let ok = [json!({"system": "ringpush", "lost": 0}), json!({"system": "redis", "lost": 12})];
        assert_eq!(nothing_lost(&ok), Ok(()));
        let lost = [json!({"system": "ringpush", "lost": 3}), json!({"system": "raw", "lost": 0})];
        assert_eq!(nothing_lost(&lost), Err("ringpush lost 3 accepted messages".to_string()));
    }

    #[test]
    fn a_storm_fails_unless_every_device_connects_in_each_phase() {
        assert_eq!(everyone(300, 300, ""), Ok(()));
        assert_eq!(everyone(299, 300, ""), Err("only 299 of 300 devices connected".to_string()));
        assert_eq!(
            everyone(0, 300, " again after the restart"),
            Err("only 0 of 300 devices connected again after the restart".to_string())
        );
    }

    /// A worker's sink with no permits, for a run that began at `since`.
    fn sink_since(since: u64) -> Received {
        Received {
            stats: Rc::default(),
            hist: Rc::new(RefCell::new(new_hist())),
            permits: Rc::new(RefCell::new(0)),
            attempts: RefCell::default(),
            again: RefCell::default(),
            since,
        }
    }

    #[test]
    fn a_message_pushed_before_the_run_began_is_stale_not_a_delivery() {
        let sink = sink_since(unix_us() - 1_000_000);
        let stamped = |us: u64| {
            let mut p = us.to_be_bytes().to_vec();
            p.resize(64, 0);
            p
        };
        sink.record(&stamped(sink.since - 5_000_000), false);
        sink.record(&stamped(sink.since + 10), false);
        let st = sink.stats.borrow();
        assert_eq!((st.stale, st.received), (1, 1));
        assert_eq!(sink.hist.borrow().len(), 1, "only this run's message has a latency");
        assert_eq!(st.timeline.values().map(|b| b.n).sum::<u64>(), 1);
    }

    #[test]
    fn a_device_refused_on_the_ring_connects_again_then_counts_as_failed() {
        let sink = sink_since(0);
        for _ in 1..HANDSHAKE_ATTEMPTS {
            sink.failed(7, "busy");
        }
        // Four retries, backing off, with the permit kept.
        assert_eq!(*sink.again.borrow(), [(7, 1), (7, 2), (7, 3), (7, 4)]);
        assert_eq!((*sink.permits.borrow(), sink.stats.borrow().failed), (0, 0));
        assert!(backoff(1) < backoff(2) && backoff(4) == Duration::from_millis(400));
        sink.failed(7, "busy");
        assert_eq!(sink.again.borrow().len(), 4, "no fifth retry");
        assert_eq!((*sink.permits.borrow(), sink.stats.borrow().failed), (1, 1));
    }

    #[test]
    fn a_spawned_box_gets_ports_no_client_is_given_as_its_source_port() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let b: Vec<u16> = range.split_whitespace().map(|v| v.parse().unwrap()).collect();
        for _ in 0..20 {
            let p = quiet_port().unwrap();
            assert!(p >= 1024 && !(b[0]..=b[1]).contains(&p), "{p} is in the ephemeral range {range}");
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("and it is free");
        }
    }
}
