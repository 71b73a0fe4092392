//! The systems `ringpush bench --compare` measures ringpush against, driven through
//! the same load-generator code path: Redis pub/sub (each device subscribes to its own
//! channel and to `all`) and an MQTT broker (each device subscribes to its own topic
//! and to `all`), both fire-and-forget. Minimal RESP and MQTT 3.1.1 encoders/decoders,
//! and starting/stopping the peer servers on loopback.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    Ringpush,
    Redis,
    Mosquitto,
    /// The physical limit: no protocol, one message per socket write, batched io_uring
    /// sends from the bench process itself.
    Raw,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Ringpush => "ringpush",
            System::Redis => "redis",
            System::Mosquitto => "mosquitto",
            System::Raw => "raw",
        }
    }
}

/// The channel/topic every device also subscribes to, for broadcasts.
pub const ALL: &str = "all";

/// A peer server started for the run, stopped by its PID.
pub struct Peer {
    pub child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn need(binary: &str, package: &str) -> Result<PathBuf, String> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| PathBuf::from(d).join(binary))
        .find(|p| p.exists())
        .ok_or_else(|| format!("{binary} is not installed: apt-get install -y {package}"))
}

impl Peer {
    /// Starts `system` on a free loopback port, sized for `devices` clients, tuned as
    /// docs/performance.md describes (no persistence, unlimited pub/sub buffers).
    pub fn start(system: System, devices: usize) -> Result<Peer, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = free_port()?;
        let mut cmd = match system {
            System::Ringpush | System::Raw => return Err(format!("{} is not a peer server", system.name())),
            System::Redis => {
                let mut c = Command::new(need("redis-server", "redis-server")?);
                c.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                    .args(["--maxclients", &(devices + 100).to_string()])
                    .args(["--client-output-buffer-limit", "pubsub 0 0 0", "--tcp-backlog", "4096"])
                    .args(["--protected-mode", "no", "--dir"])
                    .arg(dir.path());
                c
            }
            System::Mosquitto => {
                let conf = dir.path().join("mosquitto.conf");
                let text = format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nset_tcp_nodelay true\npersistence false\nmax_connections -1\n"
                );
                std::fs::write(&conf, text).map_err(|e| e.to_string())?;
                let mut c = Command::new(need("mosquitto", "mosquitto")?);
                c.arg("-c").arg(&conf);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", system.name()))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let peer = Peer { child, addr, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                return Err(format!("{} did not start listening on {addr}", system.name()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(peer)
    }
}

/// A decoded peer packet: bytes used, and the payload when it carries a message.
pub type Packet<'a> = (usize, Option<&'a [u8]>);

/// RESP: `PUBLISH channel payload` as an array of bulk strings.
pub fn resp_publish(out: &mut Vec<u8>, channel: &str, payload: &[u8]) {
    out.extend_from_slice(b"*3\r\n$7\r\nPUBLISH\r\n");
    for part in [channel.as_bytes(), payload] {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
}

/// RESP: `SUBSCRIBE channels...`.
pub fn resp_subscribe(out: &mut Vec<u8>, channels: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n$9\r\nSUBSCRIBE\r\n", channels.len() + 1).as_bytes());
    for c in channels {
        out.extend_from_slice(format!("${}\r\n{c}\r\n", c.len()).as_bytes());
    }
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn number(b: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).ok_or_else(|| "bad RESP number".into())
}

/// One RESP value from `buf`: `Ok(None)` when incomplete; otherwise the bytes used and,
/// for a pub/sub `message` push, its payload.
pub fn resp_next(buf: &[u8]) -> Result<Option<Packet<'_>>, String> {
    let Some((head, mut pos)) = line(buf) else { return Ok(None) };
    match head.first() {
        Some(b':' | b'+') => Ok(Some((pos, None))),
        Some(b'-') => Err(format!("redis error: {}", String::from_utf8_lossy(&head[1..]))),
        Some(b'*') => {
            let n = number(&head[1..])?;
            let mut parts: Vec<&[u8]> = Vec::new();
            for _ in 0..n {
                let Some((h, used)) = line(&buf[pos..]) else { return Ok(None) };
                match h.first() {
                    Some(b'$') => {
                        let len = number(&h[1..])? as usize;
                        let start = pos + used;
                        if buf.len() < start + len + 2 {
                            return Ok(None);
                        }
                        parts.push(&buf[start..start + len]);
                        pos = start + len + 2;
                    }
                    Some(b':') => pos += used,
                    _ => return Err("unexpected RESP element".into()),
                }
            }
            let payload = (parts.first() == Some(&&b"message"[..])).then(|| parts.get(2).copied()).flatten();
            Ok(Some((pos, payload)))
        }
        _ => Err("unexpected RESP type".into()),
    }
}

fn mqtt_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn mqtt_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// MQTT 3.1.1 CONNECT with a clean session.
pub fn mqtt_connect(out: &mut Vec<u8>, client_id: &str, keepalive_secs: u16) {
    let mut body = Vec::new();
    mqtt_str(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0x02]);
    body.extend_from_slice(&keepalive_secs.to_be_bytes());
    mqtt_str(&mut body, client_id);
    out.push(0x10);
    mqtt_len(out, body.len());
    out.extend_from_slice(&body);
}

/// MQTT SUBSCRIBE (QoS 0) to `topics`.
pub fn mqtt_subscribe(out: &mut Vec<u8>, packet_id: u16, topics: &[&str]) {
    let mut body = packet_id.to_be_bytes().to_vec();
    for t in topics {
        mqtt_str(&mut body, t);
        body.push(0);
    }
    out.push(0x82);
    mqtt_len(out, body.len());
    out.extend_from_slice(&body);
}

/// MQTT PUBLISH, QoS 0.
pub fn mqtt_publish(out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    out.push(0x30);
    mqtt_len(out, 2 + topic.len() + payload.len());
    mqtt_str(out, topic);
    out.extend_from_slice(payload);
}

/// One MQTT packet from `buf`: `Ok(None)` when incomplete; otherwise the bytes used
/// and, for a PUBLISH, its payload.
pub fn mqtt_next(buf: &[u8]) -> Result<Option<Packet<'_>>, String> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        len += (b & 0x7f) as usize * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err("bad MQTT length".into());
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let body = &buf[i..i + len];
    match first >> 4 {
        3 => {
            let tl = u16::from_be_bytes([*body.first().ok_or("short publish")?, *body.get(1).ok_or("short publish")?])
                as usize;
            let skip = 2 + tl + if first & 0x06 != 0 { 2 } else { 0 };
            Ok(Some((i + len, Some(body.get(skip..).ok_or("short publish")?))))
        }
        2 if body.get(1).is_some_and(|&rc| rc != 0) => Err(format!("MQTT CONNACK refused: {}", body[1])),
        _ => Ok(Some((i + len, None))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_round_trip_at_every_split() {
        let mut b = Vec::new();
        b.extend_from_slice(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nd1\r\n:1\r\n");
        b.extend_from_slice(b"*3\r\n$7\r\nmessage\r\n$2\r\nd1\r\n$5\r\nhe\r\nl\r\n");
        b.extend_from_slice(b":7\r\n");
        let mut got = Vec::new();
        for cut in 0..b.len() {
            assert!(resp_next(&b[..cut]).unwrap().is_none_or(|(n, _)| n <= cut));
        }
        let mut rest = &b[..];
        while let Some((n, p)) = resp_next(rest).unwrap() {
            got.push(p.map(|p| p.to_vec()));
            rest = &rest[n..];
        }
        assert_eq!(got, vec![None, Some(b"he\r\nl".to_vec()), None]);
        assert!(resp_next(b"-ERR no\r\n").is_err());
        let mut p = Vec::new();
        resp_publish(&mut p, "d1", b"x");
        assert_eq!(p, b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nd1\r\n$1\r\nx\r\n");
    }

    #[test]
    fn mqtt_publish_decodes_and_lengths_span_bytes() {
        let payload = vec![9u8; 300];
        let mut b = Vec::new();
        mqtt_publish(&mut b, "d42", &payload);
        assert_eq!(&b[..3], &[0x30, 0xb1, 0x02], "305 = 0x31 + 2*128");
        for cut in 0..b.len() {
            assert!(mqtt_next(&b[..cut]).unwrap().is_none());
        }
        let (n, p) = mqtt_next(&b).unwrap().unwrap();
        assert_eq!((n, p), (b.len(), Some(&payload[..])));
        assert!(mqtt_next(&[0x20, 2, 0, 5]).is_err(), "refused CONNACK");
        assert_eq!(mqtt_next(&[0x90, 3, 0, 1, 0]).unwrap(), Some((5, None)), "SUBACK");
    }
}
