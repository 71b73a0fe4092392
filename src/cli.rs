//! The `ringpush` command line: `serve`, `token`, `device`, `push`.
//! Every setting has a default, so `ringpush serve` runs a working box with no file.

use crate::client::{
    unix_ms, AckPolicy, Acker, AppClient, ClientError, DeviceClient, DeviceEvent, PushOutcome, PushTarget,
};
use crate::config::Config;
use crate::duration;
use clap::{Args, Parser, Subcommand};
use ringpush_protocol::{DeviceToken, ErrorCode};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "ringpush", version, about = "A thread-per-core push appliance")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a push box (defaults: devices on :7000, apps on :7100, data in ./ringpush-data).
    Serve(ServeArgs),
    /// Print a device token for an app secret.
    Token(TokenArgs),
    /// Connect as a device and print each payload received, one per line.
    Device(DeviceArgs),
    /// Push a message to one device, a list of devices, or every device of an app.
    Push(PushArgs),
    /// Show a running box's sessions, push rates and latencies (from its HTTP port).
    Stats(StatsArgs),
    /// Check this machine: sysctls, limits, io_uring, kernel, CPUs, data disk, clock.
    Doctor(DoctorArgs),
    /// Load-test a box (unicast, broadcast, idle, offline, storm, store), beside Redis, mosquitto and the raw limit.
    Bench(crate::bench::BenchArgs),
    /// One load-generator process of `ringpush bench` (started by it).
    #[command(hide = true)]
    BenchWorker(crate::bench::WorkerArgs),
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The box's config file (for data_dir and shards).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub shards: Option<usize>,
    /// Read /proc, /sys and /etc below this directory instead of /.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// HTTP port of the box, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:7200")]
    pub server: String,
    /// Print one summary and exit (the default when stdout is not a terminal).
    #[arg(long)]
    pub once: bool,
    /// Time between samples; rates are computed over it.
    #[arg(long, default_value = "1s", value_parser = duration::parse)]
    pub interval: Duration,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML config file; flags override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub device_listen: Option<SocketAddr>,
    #[arg(long)]
    pub app_listen: Option<SocketAddr>,
    /// HTTP port for /healthz and /readyz.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Number of shards (0: one per CPU in the affinity mask).
    #[arg(long)]
    pub shards: Option<usize>,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[arg(long)]
    pub app: String,
    #[arg(long)]
    pub secret: String,
    #[arg(long)]
    pub device: String,
    /// How long the token is valid, e.g. 30d.
    #[arg(long, default_value = "30d", value_parser = duration::parse)]
    pub ttl: Duration,
}

#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// Device port of the box, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub server: String,
    #[arg(long)]
    pub app: String,
    #[arg(long)]
    pub device: String,
    /// Device token (80 hex digits).
    #[arg(long, conflicts_with = "secret", required_unless_present = "secret")]
    pub token: Option<String>,
    /// App secret, to mint a token locally instead.
    #[arg(long)]
    pub secret: Option<String>,
    /// Print JSON lines with seq, push id and timing instead of bare payloads.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many messages (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// App port of the box, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:7100")]
    pub server: String,
    #[arg(long)]
    pub app: String,
    #[arg(long)]
    pub secret: String,
    /// Target device; repeat for a multicast.
    #[arg(long = "device", conflicts_with = "all", required_unless_present = "all")]
    pub devices: Vec<String>,
    /// Broadcast to every device of the app.
    #[arg(long)]
    pub all: bool,
    /// How long the message may wait for an offline device (default: the server's).
    #[arg(long, value_parser = duration::parse)]
    pub ttl: Option<Duration>,
    pub payload: String,
}

/// Runs the command; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Token(a) => {
            let expiry = unix_ms() / 1000 + a.ttl.as_secs();
            println!("{}", DeviceToken::mint(a.secret.as_bytes(), &a.app, &a.device, expiry).to_hex());
            Ok(())
        }
        Command::Device(a) => on_executor(device(a)),
        Command::Push(a) => on_executor(push(a)),
        Command::Stats(a) => crate::stats_cli::run(&a.server, a.once, a.interval),
        Command::Bench(a) => crate::bench::run(a),
        Command::Doctor(a) => doctor(a),
        Command::BenchWorker(a) => crate::bench::worker(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ringpush: {e}");
            1
        }
    }
}

fn on_executor<F: std::future::Future<Output = Result<(), String>> + 'static>(f: F) -> Result<(), String> {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .map_err(|e| format!("cannot start the executor: {e}"))?
        .run(f)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

fn serve(a: ServeArgs) -> Result<(), String> {
    init_logging();
    let nofile = crate::server::raise_nofile();
    // Before the shards' threads exist; a failure only costs the storm its stalls.
    if let Err(e) = crate::server::presize_fd_table(crate::server::FD_TABLE_PRESIZE_MAX) {
        tracing::warn!("cannot presize the descriptor table: {e}");
    }
    let mut cfg = match &a.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(v) = a.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = a.device_listen {
        cfg.device_listen = v;
    }
    if let Some(v) = a.app_listen {
        cfg.app_listen = v;
    }
    if let Some(v) = a.http_listen {
        cfg.http_listen = v;
    }
    if let Some(v) = a.shards {
        cfg.shards = v;
    }
    if let Some(secret) = cfg.ensure_demo_app()? {
        tracing::info!("app \"demo\" secret: {secret} (kept in {})", cfg.data_dir.join("demo.secret").display());
    }
    cfg.validate()?;
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&shutdown)).map_err(|e| format!("cannot handle signals: {e}"))?;
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        open_files_limit = nofile,
        profile = if cfg!(debug_assertions) { "debug" } else { "release" },
        "starting ringpush"
    );
    let recovering = |http: std::net::SocketAddr| {
        tracing::info!(http = %http, "recovering the store; /healthz and /readyz answer meanwhile");
        println!("ringpush recovering http={http}");
        let _ = std::io::stdout().flush();
    };
    crate::server::run(cfg, shutdown, recovering, |r| {
        tracing::info!(
            shards = r.shards, cpus = ?r.cpus, device = %r.device_addr, app = %r.app_addr,
            http = %r.http_addr, "ready"
        );
        println!("ringpush ready device={} app={} http={} shards={}", r.device_addr, r.app_addr, r.http_addr, r.shards);
        let _ = std::io::stdout().flush();
    })?;
    tracing::info!("stopped cleanly");
    Ok(())
}

fn doctor(a: DoctorArgs) -> Result<(), String> {
    use crate::doctor::{run_checks, table, Plan, RealHost, Status};
    let cfg = match &a.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    // A config the server would refuse to start with fails the check at once.
    cfg.validate()?;
    let plan = Plan {
        data_dir: a.data_dir.unwrap_or(cfg.data_dir),
        shards: a.shards.unwrap_or(cfg.shards),
        device_steering: cfg.device_steering,
    };
    let checks = run_checks(&RealHost { root: a.root }, &plan);
    let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
    if a.json {
        let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
        println!("{}", serde_json::json!({ "checks": checks, "fail": fails, "warn": warns }));
    } else {
        print!("{}", table(&checks));
    }
    if fails > 0 {
        Err(format!("{fails} check(s) failed"))
    } else {
        Ok(())
    }
}

async fn device(a: DeviceArgs) -> Result<(), String> {
    let token = match (&a.token, &a.secret) {
        (Some(t), _) => DeviceToken::from_hex(t).map_err(|e| e.to_string())?,
        (None, Some(s)) => DeviceToken::mint(s.as_bytes(), &a.app, &a.device, unix_ms() / 1000 + 86_400),
        (None, None) => return Err("give --token or --secret".into()),
    };
    // Highest unicast and broadcast seq processed, stated on every reconnect; acks go
    // out once per burst of messages read together.
    let mut acker = Acker::new(AckPolicy { every: 1, delay: Duration::ZERO }, 0, 0);
    let mut received = 0u64;
    let mut backoff = Duration::from_millis(100);
    // Where to connect: `--server`, until a node of a fleet sends the device to its own.
    let mut server = a.server.clone();
    let mut redirects = 0;
    loop {
        let connecting = DeviceClient::connect_resume(server.as_str(), &a.app, &a.device, token, acker.seq, acker.bseq);
        let mut dev = match connecting.await {
            Ok(d) => d,
            Err(ClientError::Server { code: ErrorCode::REDIRECT, message }) if redirects < 3 => {
                eprintln!("ringpush: {server} says the device belongs to the node at {message}; connecting there");
                (server, redirects) = (message, redirects + 1);
                continue;
            }
            Err(ClientError::Server { code, message }) => return Err(format!("server refused: {code}: {message}")),
            Err(e) => {
                eprintln!("ringpush: connect failed ({e}); retrying in {backoff:?}");
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        (backoff, redirects) = (Duration::from_millis(100), 0);
        acker.resume(&dev.welcome);
        let heartbeat = Duration::from_millis(dev.welcome.heartbeat_ms as u64);
        loop {
            let ev = glommio::timer::timeout(heartbeat, async { Ok(dev.next_event().await) }).await;
            let ev = match ev {
                Err(_) => {
                    // Idle for a heartbeat interval: tell the server we are alive.
                    if dev.ping(unix_ms()).await.is_err() {
                        break;
                    }
                    continue;
                }
                Ok(Err(e)) => {
                    eprintln!("ringpush: connection lost ({e}); reconnecting");
                    break;
                }
                Ok(Ok(ev)) => ev,
            };
            match ev {
                DeviceEvent::Message(m) => {
                    if !acker.received(&m) {
                        continue; // a redelivery we already printed
                    }
                    received += 1;
                    let mut out = std::io::stdout().lock();
                    if a.json {
                        let line = serde_json::json!({
                            "seq": m.seq, "broadcast": m.broadcast, "push_id": m.push_id, "expiry_ms": m.expiry_ms,
                            "received_ms": unix_ms(), "payload": String::from_utf8_lossy(&m.payload),
                        });
                        let _ = writeln!(out, "{line}");
                    } else {
                        let _ = writeln!(out, "{}", String::from_utf8_lossy(&m.payload));
                    }
                    let _ = out.flush();
                    if !dev.has_buffered_frame() && acker.due() && acker.ack(&mut dev).await.is_err() {
                        break;
                    }
                    if a.count.is_some_and(|c| received >= c) {
                        let _ = acker.ack(&mut dev).await;
                        let _ = dev.close().await;
                        return Ok(());
                    }
                }
                DeviceEvent::Pong(_) => {}
                DeviceEvent::Bye(reason, redirect) => {
                    eprintln!("ringpush: server said BYE ({reason}) {redirect}");
                    if reason == ErrorCode::REDIRECT && !redirect.is_empty() {
                        server = redirect;
                    }
                    break;
                }
            }
        }
        glommio::timer::sleep(backoff).await;
    }
}

async fn push(a: PushArgs) -> Result<(), String> {
    let mut app = AppClient::connect(a.server.as_str(), &a.app, a.secret.as_bytes())
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", a.server))?;
    let ttl = a.ttl.map_or(0, |d| d.as_secs().clamp(1, u32::MAX as u64) as u32);
    let target = match (a.all, a.devices.len()) {
        (true, _) => PushTarget::App,
        (false, 1) => PushTarget::Device(&a.devices[0]),
        (false, _) => PushTarget::List(&a.devices),
    };
    let mut outcome = app.push(target, ttl, a.payload.as_bytes()).await.map_err(|e| e.to_string())?;
    if let (PushOutcome::Rejected(ErrorCode::REDIRECT, node), PushTarget::Device(_)) = (&outcome, target) {
        // The device belongs to another node of the fleet: push there, once.
        eprintln!("ringpush: the device belongs to the node at {node}; pushing there");
        let mut there = AppClient::connect(node.as_str(), &a.app, a.secret.as_bytes())
            .await
            .map_err(|e| format!("cannot connect to {node}: {e}"))?;
        outcome = there.push(target, ttl, a.payload.as_bytes()).await.map_err(|e| e.to_string())?;
    }
    match outcome {
        PushOutcome::Accepted(id) => {
            println!("{id}");
            Ok(())
        }
        PushOutcome::Rejected(ErrorCode::REDIRECT, node) => Err(format!(
            "push rejected: redirect: a listed device belongs to the node at {node}; push each node its own devices"
        )),
        PushOutcome::Rejected(code, reason) => Err(format!("push rejected: {code}: {reason}")),
        PushOutcome::Busy(ms) => Err(format!("server busy, retry after {ms} ms")),
    }
}
