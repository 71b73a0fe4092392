//! Server configuration: TOML file, command-line overrides, and a default for every key,
//! so `ringpush serve` runs with no file at all. `docs/configuration.md` lists each key.

use crate::duration::serde_str;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One application allowed to push, and the secret its servers and tokens use.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub id: String,
    pub secret: String,
}

/// When the app's ACCEPTED is sent, relative to the disk.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Each push is flushed (`fdatasync`) before its reply; concurrent pushes share
    /// a flush.
    Sync,
    /// Pushes accepted within `group_commit` share one flush; replies wait for it.
    Batched,
    /// No flush before the reply: survives a process crash (the page cache holds
    /// the writes), not a power loss or kernel crash. For benchmarks.
    Memory,
}

/// Which shard accepts a new device connection (the owner shard is the device's hash
/// either way; the accepting shard hands the others over).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSteering {
    /// The shard pinned to the CPU that processed the connection's SYN, so the accept
    /// and the handshake run where the kernel's half of it ran (the kernel's hash for a
    /// CPU without a shard, or when shards are not one per CPU).
    Cpu,
    /// The kernel's hash of the connection's addresses and ports.
    Hash,
}

/// One node of a fleet, as every node's config lists it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetNode {
    /// Unique name; placement depends on it (renaming a node moves its devices).
    pub name: String,
    /// `host:port` devices are told to connect to (a name or an address).
    pub device_addr: String,
    /// `host:port` apps are told to push to.
    pub app_addr: String,
    /// The node's HTTP address, probed at `/readyz`.
    pub http_addr: SocketAddr,
    /// Relative share of the devices (1..=1000).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    100
}

/// The fleet this box belongs to: which devices are its own, and where the others go.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// This box's name among `nodes`.
    pub node: String,
    /// Every node of the fleet, this one included; empty = this box alone.
    pub nodes: Vec<FleetNode>,
    /// How often shard 0 probes every other node's `/readyz`.
    #[serde(with = "serde_str")]
    pub probe_interval: Duration,
    /// A probe not answered 200 within this long failed.
    #[serde(with = "serde_str")]
    pub probe_timeout: Duration,
    /// Failed probes in a row that take a node down.
    pub fall: u32,
    /// Good probes in a row that bring it back.
    pub rise: u32,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            node: "local".into(),
            nodes: Vec::new(),
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            fall: 3,
            rise: 2,
        }
    }
}

impl FleetConfig {
    /// Checks the node list, with a message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = |n: &str| {
            !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !name_ok(&self.node) {
            return Err(format!("fleet.node {:?} must be 1 to 64 of A-Z a-z 0-9 - _ .", self.node));
        }
        let mut names = std::collections::HashSet::new();
        for n in &self.nodes {
            if !name_ok(&n.name) {
                return Err(format!("fleet.nodes: name {:?} must be 1 to 64 of A-Z a-z 0-9 - _ .", n.name));
            }
            if !names.insert(n.name.as_str()) {
                return Err(format!("fleet.nodes: {:?} is listed twice", n.name));
            }
            if !(1..=1000).contains(&n.weight) {
                return Err(format!("fleet.nodes: weight of {:?} must be 1 to 1000", n.name));
            }
            for (key, addr) in [("device_addr", &n.device_addr), ("app_addr", &n.app_addr)] {
                let port = addr.rsplit_once(':').map(|(host, port)| (host, port.parse::<u16>()));
                if addr.len() > 255 || !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0) {
                    return Err(format!(
                        "fleet.nodes: {key} of {:?} must be host:port (at most 255 bytes), got {addr:?}",
                        n.name
                    ));
                }
            }
        }
        if !self.nodes.is_empty() && !names.contains(self.node.as_str()) {
            return Err(format!("fleet.node {:?} is not among fleet.nodes", self.node));
        }
        let checks = [
            ("fleet.probe_interval", self.probe_interval >= Duration::from_millis(100)),
            ("fleet.probe_timeout", !self.probe_timeout.is_zero() && self.probe_timeout <= self.probe_interval),
            ("fleet.fall", self.fall >= 1),
            ("fleet.rise", self.rise >= 1),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((key, _)) => Err(format!("config key {key} has an unusable value")),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the box keeps its state (the generated `demo` secret, later the store).
    pub data_dir: PathBuf,
    /// Device protocol listener; every shard accepts on it with SO_REUSEPORT.
    pub device_listen: SocketAddr,
    /// App protocol listener.
    pub app_listen: SocketAddr,
    /// HTTP listener for /healthz and /readyz (served by shard 0).
    pub http_listen: SocketAddr,
    /// Shards (one pinned executor each); 0 = one per CPU in the affinity mask.
    pub shards: usize,
    /// Interval devices must send at least one frame in; silent for twice this = closed.
    #[serde(with = "serde_str")]
    pub heartbeat: Duration,
    /// TTL of a push that does not give one.
    #[serde(with = "serde_str")]
    pub default_ttl: Duration,
    /// Largest TTL a push may ask for (`bad_ttl` above it).
    #[serde(with = "serde_str")]
    pub max_ttl: Duration,
    /// Largest device→server frame body.
    pub max_device_frame: u32,
    /// Largest app→server frame body (bounds the payload).
    pub max_app_frame: u32,
    /// Largest multicast list.
    pub max_targets: u16,
    /// Messages sent to a device and not yet acked, at most.
    pub window: u32,
    /// Messages queued for one device (sent or not), at most; more = `storage_full`.
    pub max_queued_per_device: u32,
    /// Payload bytes queued for one device, at most; more = `storage_full`.
    pub max_queued_bytes_per_device: u64,
    /// A device whose socket accepts no bytes for this long is disconnected.
    #[serde(with = "serde_str")]
    pub slow_device_timeout: Duration,
    /// TCP Fast Open queue of the device listener (0: off): returning devices send
    /// their HELLO in the SYN and save a round trip per reconnect.
    pub device_fastopen: u32,
    /// Which shard accepts a device connection: the one on the CPU that took its SYN,
    /// or the kernel's hash.
    pub device_steering: DeviceSteering,
    /// Time a new connection has to complete the preamble and HELLO/AUTH.
    #[serde(with = "serde_str")]
    pub handshake_timeout: Duration,
    /// Capacity of each shard-to-shard channel; a full channel answers BUSY.
    pub shard_queue: usize,
    /// Requests in flight on one app connection, at most; more = BUSY.
    pub max_inflight_per_app: u32,
    /// Push receipts each shard remembers (oldest forgotten first).
    pub receipts_per_shard: usize,
    /// Allowed skew between an app's AUTH timestamp and the server clock.
    #[serde(with = "serde_str")]
    pub auth_skew: Duration,
    /// Record latency histograms (counters are always kept). Off only to measure
    /// what the histograms cost.
    pub metrics: bool,
    /// Time to finish in-flight work after SIGTERM before exiting anyway.
    #[serde(with = "serde_str")]
    pub shutdown_grace: Duration,
    /// When an accepted push is on disk: `sync`, `batched` (group commit) or `memory`.
    pub durability: Durability,
    /// `batched`: how long a flush waits to gather more pushes (replies wait for it).
    #[serde(with = "serde_str")]
    pub group_commit: Duration,
    /// Size of one store segment file.
    pub segment_bytes: u64,
    /// Disk the store may use over all shards (0: as much as the disk has).
    pub store_max_bytes: u64,
    /// Heap for queued-message references over all shards; devices beyond it are
    /// evicted (least recently used first) and read back from the store when needed.
    pub cache_bytes: u64,
    /// Apps allowed to push. When none is configured, an app `demo` is added, with a
    /// secret generated and kept in the data dir, so a box runs with no config at all.
    pub apps: Vec<AppConfig>,
    /// The fleet of push boxes this one belongs to (none: it serves every device).
    pub fleet: FleetConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./ringpush-data"),
            device_listen: "0.0.0.0:7000".parse().expect("valid literal"),
            app_listen: "0.0.0.0:7100".parse().expect("valid literal"),
            http_listen: "0.0.0.0:7200".parse().expect("valid literal"),
            shards: 0,
            heartbeat: Duration::from_secs(30),
            default_ttl: Duration::from_secs(3 * 86_400),
            max_ttl: Duration::from_secs(28 * 86_400),
            max_device_frame: 64 * 1024,
            max_app_frame: 1024 * 1024,
            max_targets: 1000,
            window: 64,
            max_queued_per_device: 4096,
            max_queued_bytes_per_device: 4 * 1024 * 1024,
            slow_device_timeout: Duration::from_secs(10),
            device_fastopen: 4096,
            device_steering: DeviceSteering::Cpu,
            handshake_timeout: Duration::from_secs(10),
            shard_queue: 4096,
            max_inflight_per_app: 8192,
            receipts_per_shard: 65_536,
            auth_skew: Duration::from_secs(300),
            metrics: true,
            shutdown_grace: Duration::from_secs(5),
            durability: Durability::Batched,
            group_commit: Duration::from_millis(2),
            segment_bytes: 64 * 1024 * 1024,
            store_max_bytes: 0,
            cache_bytes: 256 * 1024 * 1024,
            apps: Vec::new(),
            fleet: FleetConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown keys are errors so typos do not pass silently.
    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Checks values that would make the box misbehave, with a message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let mut ids = std::collections::HashSet::new();
        for a in &self.apps {
            ringpush_protocol::wire::check_id(&a.id, ringpush_protocol::wire::MAX_APP_ID)
                .map_err(|e| format!("apps: id {:?}: {}", a.id, e.what))?;
            if a.secret.len() < 16 {
                return Err(format!("apps: secret of {:?} must be at least 16 bytes", a.id));
            }
            if !ids.insert(&a.id) {
                return Err(format!("apps: {:?} is configured twice", a.id));
            }
        }
        if self.apps.len() > u16::MAX as usize {
            return Err("apps: at most 65535 apps".into());
        }
        let record_max = self.max_app_frame as u64 + 1024;
        if self.segment_bytes < (64 * 1024).max(2 * record_max) || self.segment_bytes > u32::MAX as u64 {
            return Err(format!(
                "config key segment_bytes must be between 64 KiB and 4 GiB and hold two of the largest records \
                 (2 × (max_app_frame + 1024) = {} bytes)",
                2 * record_max
            ));
        }
        let checks: [(&str, bool); 9] = [
            ("group_commit", self.group_commit <= Duration::from_secs(1)),
            ("heartbeat", self.heartbeat >= Duration::from_millis(100)),
            ("window", self.window >= 1),
            ("max_queued_per_device", self.max_queued_per_device >= self.window),
            ("shard_queue", self.shard_queue >= 1),
            ("max_targets", self.max_targets >= 1),
            ("max_device_frame", self.max_device_frame >= 256),
            ("max_app_frame", self.max_app_frame >= 256),
            ("default_ttl", self.default_ttl <= self.max_ttl && self.default_ttl.as_secs() >= 1),
        ];
        for (key, ok) in checks {
            if !ok {
                return Err(format!("config key {key} has an unusable value"));
            }
        }
        self.fleet.validate()
    }

    /// Adds the `demo` app when no app is configured: its secret is read from
    /// `<data_dir>/demo.secret`, or generated and written there on first start.
    /// Returns the secret when it came from the data dir, so startup can print it.
    /// A box whose config lists its apps gets no app it was not told about.
    pub fn ensure_demo_app(&mut self) -> Result<Option<String>, String> {
        if !self.apps.is_empty() {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.data_dir)
            .map_err(|e| format!("cannot create data dir {}: {e}", self.data_dir.display()))?;
        let path = self.data_dir.join("demo.secret");
        let secret = match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().len() >= 16 => s.trim().to_string(),
            Ok(_) => return Err(format!("{} is too short to be a secret", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let s = hex::encode(rand::random::<[u8; 16]>());
                write_private(&path, &s).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                s
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        self.apps.push(AppConfig { id: "demo".into(), secret: secret.clone() });
        Ok(Some(secret))
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults_and_valid() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.device_listen.port(), 7000);
        assert_eq!(c.app_listen.port(), 7100);
        assert_eq!(c.http_listen.port(), 7200);
        assert_eq!(c.default_ttl, Duration::from_secs(259_200));
        c.validate().unwrap();
    }

    #[test]
    fn parses_durations_and_apps_and_rejects_typos() {
        let c: Config =
            toml::from_str("heartbeat = \"5s\"\n[[apps]]\nid = \"news\"\nsecret = \"0123456789abcdef\"\n").unwrap();
        assert_eq!(c.heartbeat, Duration::from_secs(5));
        assert_eq!(c.apps[0].id, "news");
        c.validate().unwrap();
        assert!(toml::from_str::<Config>("hartbeat = \"5s\"").is_err());
        assert!(toml::from_str::<Config>("heartbeat = \"5\"").is_err());
    }

    #[test]
    fn device_steering_is_by_cpu_unless_the_config_says_hash() {
        assert_eq!(Config::default().device_steering, DeviceSteering::Cpu);
        let c: Config = toml::from_str("device_steering = \"hash\"").unwrap();
        assert_eq!(c.device_steering, DeviceSteering::Hash);
        let e = toml::from_str::<Config>("device_steering = \"rss\"").unwrap_err().to_string();
        assert!(e.contains("cpu") && e.contains("hash"), "the error names the choices: {e}");
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config::default();
        c.apps.push(AppConfig { id: "a".into(), secret: "short".into() });
        assert!(c.validate().unwrap_err().contains("at least 16"));
        let c = Config { window: 0, ..Config::default() };
        assert!(c.validate().unwrap_err().contains("window"));
    }

    #[test]
    fn a_fleet_is_read_and_checked() {
        let text = "[fleet]\nnode = \"a\"\nprobe_interval = \"2s\"\n\
                    [[fleet.nodes]]\nname = \"a\"\ndevice_addr = \"push-a.example:7000\"\napp_addr = \"10.0.0.1:7100\"\nhttp_addr = \"10.0.0.1:7200\"\n\
                    [[fleet.nodes]]\nname = \"b\"\ndevice_addr = \"10.0.0.2:7000\"\napp_addr = \"10.0.0.2:7100\"\nhttp_addr = \"10.0.0.2:7200\"\nweight = 50\n";
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.fleet.nodes.len(), 2);
        assert_eq!((c.fleet.nodes[0].weight, c.fleet.nodes[1].weight), (100, 50), "weight defaults to 100");
        assert_eq!(c.fleet.probe_interval, Duration::from_secs(2));
        let bad = |f: &dyn Fn(&mut FleetConfig), want: &str| {
            let mut c = c.clone();
            f(&mut c.fleet);
            let e = c.validate().unwrap_err();
            assert!(e.contains(want), "{e:?} should name {want:?}");
        };
        bad(&|f| f.node = "c".into(), "not among fleet.nodes");
        bad(&|f| f.nodes[1].name = "a".into(), "listed twice");
        bad(&|f| f.nodes[1].weight = 0, "weight");
        bad(&|f| f.nodes[1].device_addr = "10.0.0.2".into(), "device_addr");
        bad(&|f| f.nodes[1].app_addr = ":7100".into(), "app_addr");
        bad(&|f| f.nodes[1].name = "b c".into(), "name");
        bad(&|f| f.probe_timeout = Duration::from_secs(5), "fleet.probe_timeout");
        bad(&|f| f.fall = 0, "fleet.fall");
        assert!(toml::from_str::<Config>("[fleet]\nnodes = [{ name = \"a\" }]").is_err(), "addresses are required");
        Config::default().validate().unwrap();
    }

    #[test]
    fn demo_secret_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        let s1 = c.ensure_demo_app().unwrap().unwrap();
        let mut c2 = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        let s2 = c2.ensure_demo_app().unwrap().unwrap();
        assert_eq!(s1, s2);
        assert_eq!(s1.len(), 32);
        assert_eq!(c2.ensure_demo_app().unwrap(), None, "already configured");
    }

    #[test]
    fn no_demo_app_when_the_config_lists_apps() {
        let dir = tempfile::tempdir().unwrap();
        let news = AppConfig { id: "news".into(), secret: "0123456789abcdef".into() };
        let mut c = Config { data_dir: dir.path().to_path_buf(), apps: vec![news], ..Config::default() };
        assert_eq!(c.ensure_demo_app().unwrap(), None);
        assert_eq!(c.apps.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["news"]);
        assert!(!dir.path().join("demo.secret").exists(), "no secret written for an app that is not added");
    }
}
