//! Black-box test harness: starts the real `ringpush` binary on loopback with
//! ephemeral ports and a temp data dir, and stops it by its PID.

#![allow(dead_code)]

use ringpush::client::{AppClient, ClientError, DeviceClient, DeviceEvent, Received};
use ringpush::protocol::DeviceToken;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "test-secret-0123456789";
pub const APP: &str = "demo";

pub struct Server {
    child: Child,
    pub device: SocketAddr,
    pub app: SocketAddr,
    pub http: SocketAddr,
    pub dir: tempfile::TempDir,
    stderr_path: std::path::PathBuf,
}

/// A started `ringpush serve` whose ready line has not been read yet.
pub struct Starting {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    /// The HTTP address, known as soon as the store recovery starts.
    pub http: SocketAddr,
    dir: tempfile::TempDir,
    stderr_path: std::path::PathBuf,
}

fn addr_field(line: &str, k: &str) -> Option<SocketAddr> {
    line.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok())
}

impl Starting {
    /// Waits for the ready line.
    pub fn ready(mut self) -> Server {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read ready line");
        let fields = (addr_field(&line, "device="), addr_field(&line, "app="), addr_field(&line, "http="));
        let (Some(device), Some(app), Some(http)) = fields else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "server did not become ready: {line:?}\n{}",
                std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
            );
        };
        let Starting { child, dir, stderr_path, .. } = self;
        Server { device, app, http, child, dir, stderr_path }
    }
}

impl Server {
    /// Starts a server with `shards` shards and extra TOML config lines.
    pub fn start(shards: usize, extra: &str) -> Server {
        Self::launch(tempfile::tempdir().expect("temp dir"), shards, extra).ready()
    }

    /// Starts a server on `dir` (its config is written there, its data dir is
    /// `dir/data`), returning once the store recovery began.
    pub fn launch(dir: tempfile::TempDir, shards: usize, extra: &str) -> Starting {
        Self::launch_on(dir, shards, extra, ["127.0.0.1:0"; 3])
    }

    /// [`Server::launch`] with the device, app and HTTP listen addresses given.
    pub fn launch_on(dir: tempfile::TempDir, shards: usize, extra: &str, listen: [&str; 3]) -> Starting {
        let cfg = dir.path().join("ringpush.toml");
        std::fs::write(
            &cfg,
            format!(
                "{extra}\n[[apps]]\nid = \"{APP}\"\nsecret = \"{SECRET}\"\n[[apps]]\nid = \"other\"\nsecret = \"other-secret-0123456789\"\n"
            ),
        )
        .expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&stderr_path).expect("stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringpush"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--device-listen", listen[0], "--app-listen", listen[1]])
            .args(["--http-listen", listen[2]])
            .args(["--shards", &shards.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start ringpush");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read first line");
        let Some(http) = addr_field(&line, "http=").filter(|_| line.starts_with("ringpush recovering")) else {
            // Never leak a half-started server.
            let _ = child.kill();
            let _ = child.wait();
            panic!("server did not start: {line:?}\n{}", std::fs::read_to_string(&stderr_path).unwrap_or_default());
        };
        Starting { child, out, http, dir, stderr_path }
    }

    /// Kills the server with SIGKILL (no shutdown of any kind) and returns its
    /// directory, to start again on the same data.
    pub fn kill(mut self) -> tempfile::TempDir {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        drop(self);
        dir
    }

    /// Stops the server with SIGTERM and returns its directory (see [`Server::kill`]).
    pub fn stop_keep(mut self, limit: Duration) -> tempfile::TempDir {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        while self.child.try_wait().expect("wait").is_none() {
            assert!(start.elapsed() < limit, "server did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        drop(self);
        dir
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's PID.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill failed");
    }

    /// Sends SIGTERM and waits up to `limit` for the exit.
    pub fn stop(self, limit: Duration) -> ExitStatus {
        self.stop_with_log(limit).0
    }

    /// [`Server::stop`], and what the server logged, its last words included.
    pub fn stop_with_log(mut self, limit: Duration) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return (s, self.log());
            }
            assert!(start.elapsed() < limit, "server did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn token(&self, device: &str) -> DeviceToken {
        token_for(device, 3600)
    }

    pub async fn device(&self, id: &str) -> DeviceClient {
        DeviceClient::connect(self.device, APP, id, self.token(id), 0)
            .await
            .unwrap_or_else(|e| panic!("device {id} failed to connect: {e}"))
    }

    pub async fn app(&self) -> AppClient {
        AppClient::connect(self.app, APP, SECRET.as_bytes()).await.expect("app connects")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read http reply");
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status code");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Sum over shards (and any labels) of the samples on `/metrics` whose line starts with
/// `prefix` (e.g. `ringpush_queued_messages{`).
pub fn metric_sum(addr: SocketAddr, prefix: &str) -> f64 {
    let (_, text) = http_get(addr, "/metrics");
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).expect("a sample value"))
        .sum()
}

pub fn token_for(device: &str, ttl_secs: i64) -> DeviceToken {
    let now = (ringpush::client::unix_ms() / 1000) as i64;
    DeviceToken::mint(SECRET.as_bytes(), APP, device, (now + ttl_secs).max(0) as u64)
}

/// Runs a test body on a glommio executor.
pub fn run<F: Future<Output = ()>>(f: impl FnOnce() -> F) {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().expect("executor").run(f());
}

/// The next event within `limit`, or a panic that says what was awaited.
pub async fn next(dev: &mut DeviceClient, limit: Duration) -> Result<DeviceEvent, ClientError> {
    match glommio::timer::timeout(limit, async { Ok(dev.next_event().await) }).await {
        Ok(r) => r,
        Err(_) => panic!("no event within {limit:?}"),
    }
}

/// The next message within 5 s.
pub async fn message(dev: &mut DeviceClient) -> Received {
    match next(dev, Duration::from_secs(5)).await {
        Ok(DeviceEvent::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Asserts that nothing arrives within `wait`.
pub async fn quiet(dev: &mut DeviceClient, wait: Duration) {
    if let Ok(r) = glommio::timer::timeout(wait, async { Ok(dev.next_event().await) }).await {
        panic!("expected silence, got {r:?}");
    }
}
