//! The HTTP port: health endpoints for load balancers and orchestration.
//!
//! Runs on: shard 0 only (cheap, rare requests). Requests are parsed with `httparse`,
//! answered, and the connection closed.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /healthz` | 200 `ok` while the process runs |
//! | `GET /readyz` | 200 `ready` once every shard accepts connections; 503 while starting or shutting down |
//!
//! Metrics (`/metrics`) arrive with the observability work.

use crate::shard::ShardCore;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Serves the HTTP listener until the task is cancelled.
pub async fn serve(core: Rc<ShardCore>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(handle(Rc::clone(&core), stream)).detach();
            }
            Err(e) => {
                tracing::warn!("http accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Status line and body for a request, by method and path.
pub fn route(method: &str, path: &str, ready: bool) -> (u16, &'static str) {
    match (method, path) {
        ("GET" | "HEAD", "/healthz") => (200, "ok\n"),
        ("GET" | "HEAD", "/readyz") if ready => (200, "ready\n"),
        ("GET" | "HEAD", "/readyz") => (503, "not ready\n"),
        ("GET" | "HEAD", _) => (404, "not found\n"),
        _ => (405, "method not allowed\n"),
    }
}

async fn handle(core: Rc<ShardCore>, mut stream: TcpStream) {
    let _ = glommio::timer::timeout(Duration::from_secs(5), async {
        let mut buf = vec![0u8; 8192];
        let mut len = 0;
        let (status, body) = loop {
            let n = match stream.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => n,
            };
            len += n;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[..len]) {
                Ok(httparse::Status::Complete(_)) => {
                    let ready = core.shared.ready.load(Ordering::Relaxed) && !core.draining.get();
                    break route(req.method.unwrap_or(""), req.path.unwrap_or(""), ready);
                }
                Ok(httparse::Status::Partial) if len < buf.len() => continue,
                _ => break (400, "bad request\n"),
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
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.close().await;
        Ok(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/healthz", false).0, 200);
        assert_eq!(route("GET", "/readyz", true).0, 200);
        assert_eq!(route("GET", "/readyz", false).0, 503);
        assert_eq!(route("GET", "/nope", true).0, 404);
        assert_eq!(route("POST", "/healthz", true).0, 405);
    }
}
