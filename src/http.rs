//! The HTTP port: health endpoints for load balancers and orchestration.
//!
//! Runs on: shard 0 only (cheap, rare requests). Requests are parsed with `httparse`,
//! answered, and the connection closed.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /healthz` | 200 `ok` while the process runs |
//! | `GET /readyz` | 200 `ready` once every shard accepts connections; 503 `recovering` while the store is being recovered, `starting` or `shutting down` otherwise |
//! | `GET /metrics` | Prometheus text: every shard's counters and gauges, merged latency summaries |
//! | `GET /stats` | the same as JSON, for `ringpush stats` |
//! | `GET /v1/dispatch?app=A&device=D[&failed=NODE]` | 200 JSON `{"node", "device_addr", "app_addr"}`: where the device connects (its node in the fleet); 503 `node_down` with `retry_after_ms` (and `Retry-After`) while that node is down; 400/404 JSON `{"error", "reason"}` for a bad query, id, app or node name. `failed` reports a node the device could not reach ([`crate::dispatch`]) |
//!
//! `/metrics` and `/stats` gather a snapshot from every shard over the request mesh.

use crate::shard::ShardCore;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A fixed answer: status and body.
    Fixed(u16, &'static str),
    Metrics,
    Stats,
    /// `/v1/dispatch` with its query string.
    Dispatch(String),
}

/// Whether the box takes traffic, for `/readyz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Shards are rebuilding their indexes from the store.
    Recovering,
    /// Recovered, listeners not all up yet.
    Starting,
    ShuttingDown,
}

impl Readiness {
    pub fn of(core: &ShardCore) -> Readiness {
        if core.draining.get() || core.shutdown_requested() {
            Readiness::ShuttingDown
        } else if !core.shared.all_recovered() {
            Readiness::Recovering
        } else if !core.shared.ready.load(Ordering::Relaxed) {
            Readiness::Starting
        } else {
            Readiness::Ready
        }
    }
}

/// Routes a request by method and path.
pub fn route(method: &str, target: &str, ready: Readiness) -> Route {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET" | "HEAD", "/healthz") => Route::Fixed(200, "ok\n"),
        ("GET" | "HEAD", "/readyz") => match ready {
            Readiness::Ready => Route::Fixed(200, "ready\n"),
            Readiness::Recovering => Route::Fixed(503, "recovering\n"),
            Readiness::Starting => Route::Fixed(503, "starting\n"),
            Readiness::ShuttingDown => Route::Fixed(503, "shutting down\n"),
        },
        ("GET" | "HEAD", "/metrics") => Route::Metrics,
        ("GET" | "HEAD", "/stats") => Route::Stats,
        ("GET" | "HEAD", "/v1/dispatch") => Route::Dispatch(query.to_string()),
        ("GET" | "HEAD", _) => Route::Fixed(404, "not found\n"),
        _ => Route::Fixed(405, "method not allowed\n"),
    }
}

/// Answers one HTTP request on `stream`, then closes it.
pub async fn handle(core: Rc<ShardCore>, mut stream: TcpStream) {
    let _ = glommio::timer::timeout(Duration::from_secs(5), async {
        let mut buf = vec![0u8; 8192];
        let mut len = 0;
        let route = loop {
            let n = match stream.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => n,
            };
            len += n;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[..len]) {
                Ok(httparse::Status::Complete(_)) => {
                    break route(req.method.unwrap_or(""), req.path.unwrap_or(""), Readiness::of(&core));
                }
                Ok(httparse::Status::Partial) if len < buf.len() => continue,
                _ => break Route::Fixed(400, "bad request\n"),
            }
        };
        let mut extra = String::new();
        let (status, ctype, body) = match route {
            Route::Fixed(status, body) => (status, "text/plain", body.to_string()),
            Route::Metrics => {
                let snaps = core.gather().await;
                let mut text = crate::export::prometheus(&snaps);
                let up = Readiness::of(&core) == Readiness::Ready;
                text.push_str(&crate::dispatch::prometheus(&core.shared.fleet, &core.health.borrow(), up));
                (200, "text/plain; version=0.0.4", text)
            }
            Route::Dispatch(query) => {
                let local = stream.local_addr().ok().map(|a| a.ip());
                let (status, body) = dispatch(&core, &query, local);
                if let Some(ms) = body["retry_after_ms"].as_u64() {
                    extra = format!("Retry-After: {}\r\n", ms.div_ceil(1000));
                }
                (status, "application/json", body.to_string())
            }
            Route::Stats => {
                let snaps = core.gather().await;
                (200, "application/json", crate::export::json(&snaps).to_string())
            }
        };
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Service Unavailable",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.close().await;
        Ok(())
    })
    .await;
}

/// Answers a dispatch query: status and JSON body. `local` is the address the request
/// reached this box on, answered for this box's own listeners when they are bound to
/// an unspecified address (0.0.0.0 or ::).
fn dispatch(core: &ShardCore, query: &str, local: Option<std::net::IpAddr>) -> (u16, serde_json::Value) {
    use crate::dispatch::{decide, Answer, Query};
    use serde_json::json;
    let fleet = &core.shared.fleet;
    let mut health = core.health.borrow_mut();
    let cfg = &core.cfg().fleet;
    let answer = match Query::parse(query) {
        Ok(q) => decide(
            fleet,
            &mut health,
            &q,
            |app| core.shared.app_index.contains_key(app),
            Readiness::of(core) == Readiness::Ready,
            cfg.probe_interval * cfg.rise,
            core.now_ms(),
        ),
        Err(reason) => Answer::Refused { status: 400, error: "bad_request", reason },
    };
    let own = |addr: &str| match (addr.parse::<std::net::SocketAddr>(), local) {
        (Ok(a), Some(ip)) if a.ip().is_unspecified() => std::net::SocketAddr::new(ip, a.port()).to_string(),
        _ => addr.to_string(),
    };
    match answer {
        Answer::Node { node } => {
            health.counts.answered += 1;
            let n = &fleet.nodes[node];
            let (device_addr, app_addr) = if fleet.is_shared() {
                (n.device_addr.clone(), n.app_addr.clone())
            } else {
                (own(&n.device_addr), own(&n.app_addr))
            };
            (200, json!({ "node": n.name, "device_addr": device_addr, "app_addr": app_addr }))
        }
        Answer::Down { node, retry_after_ms } => {
            health.counts.node_down += 1;
            let body = json!({
                "error": "node_down",
                "reason": "the device's node is down",
                "node": fleet.nodes[node].name,
                "retry_after_ms": retry_after_ms,
            });
            (503, body)
        }
        Answer::Refused { status, error, reason } => {
            health.counts.bad_request += 1;
            (status, json!({ "error": error, "reason": reason }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{route, Readiness, Route};

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/healthz", Readiness::Ready), Route::Fixed(200, "ok\n"));
        assert_eq!(route("GET", "/readyz", Readiness::Ready), Route::Fixed(200, "ready\n"));
        assert_eq!(route("GET", "/readyz", Readiness::Recovering), Route::Fixed(503, "recovering\n"));
        assert_eq!(route("GET", "/readyz", Readiness::ShuttingDown), Route::Fixed(503, "shutting down\n"));
        assert_eq!(route("GET", "/metrics", Readiness::Ready), Route::Metrics);
        assert_eq!(route("GET", "/stats", Readiness::Ready), Route::Stats);
        assert!(matches!(route("GET", "/nope", Readiness::Ready), Route::Fixed(404, _)));
        assert_eq!(route("GET", "/readyz?verbose=1", Readiness::Ready), Route::Fixed(200, "ready\n"));
        assert_eq!(
            route("GET", "/v1/dispatch?app=a&device=b", Readiness::Ready),
            Route::Dispatch("app=a&device=b".into())
        );
        assert_eq!(route("GET", "/v1/dispatch", Readiness::Starting), Route::Dispatch(String::new()));
        assert!(matches!(route("POST", "/healthz", Readiness::Ready), Route::Fixed(405, _)));
    }
}
