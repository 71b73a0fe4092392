//! `ringpush doctor`: checks the box it runs on and prints, for each check, what is
//! expected, what is there, OK/WARN/FAIL, and the fix.
//!
//! Everything is read from files (`/proc`, `/sys`, `/etc`, all under a configurable
//! root so tests can use a fake tree) and syscalls (getrlimit, io_uring probe,
//! adjtimex, statvfs, stat) behind the [`Host`] trait; never by parsing another
//! program's output. Exit status is non-zero when any check FAILs. WARN marks tuning
//! that limits scale but lets the box run.

use crate::config::DeviceSteering;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The sysctl file shipped in `kernel-tuning/`, checked key by key.
pub const SYSCTL_CONF: &str = include_str!("../kernel-tuning/sysctl.d/60-ringpush.conf");

/// io_uring opcodes the engine uses (glommio's reactor and the store).
const OPCODES: [(&str, u8); 10] = [
    ("POLL_ADD", io_uring::opcode::PollAdd::CODE),
    ("ACCEPT", io_uring::opcode::Accept::CODE),
    ("RECV", io_uring::opcode::Recv::CODE),
    ("SEND", io_uring::opcode::Send::CODE),
    ("READ", io_uring::opcode::Read::CODE),
    ("WRITE", io_uring::opcode::Write::CODE),
    ("FSYNC", io_uring::opcode::Fsync::CODE),
    ("TIMEOUT", io_uring::opcode::Timeout::CODE),
    ("ASYNC_CANCEL", io_uring::opcode::AsyncCancel::CODE),
    ("PROVIDE_BUFFERS", io_uring::opcode::ProvideBuffers::CODE),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub check: String,
    pub expected: String,
    pub actual: String,
    pub status: Status,
    pub fix: String,
}

fn check(
    name: impl Into<String>,
    expected: impl Into<String>,
    actual: impl Into<String>,
    status: Status,
    fix: &str,
) -> Check {
    Check { check: name.into(), expected: expected.into(), actual: actual.into(), status, fix: fix.to_string() }
}

/// What doctor reads from the machine. [`RealHost`] reads this machine; tests use a fake.
pub trait Host {
    /// Contents of a file below the root (e.g. `proc/sys/fs/file-max`).
    fn read(&self, rel: &str) -> Option<String>;
    /// Soft and hard RLIMIT_NOFILE of this process.
    fn nofile(&self) -> (u64, u64);
    /// Soft and hard RLIMIT_MEMLOCK in bytes (`u64::MAX`: unlimited).
    fn memlock(&self) -> (u64, u64);
    /// Names of the needed io_uring opcodes the kernel lacks, or why no ring was set up.
    fn io_uring_missing(&self) -> Result<Vec<&'static str>, String>;
    /// Whether the kernel clock is synchronised (adjtimex), if it can tell.
    fn clock_synced(&self) -> Option<bool>;
    fn cpus(&self) -> usize;
    /// Free bytes on the filesystem holding `path`.
    fn free_bytes(&self, path: &Path) -> Option<u64>;
    /// Block device (major, minor) holding `path`.
    fn device_of(&self, path: &Path) -> Option<(u32, u32)>;
    /// Names in a directory below the root (e.g. `sys/class/net`), sorted; empty if absent.
    fn list(&self, rel: &str) -> Vec<String>;
}

/// Sorted entry names of `root/rel`, for [`Host::list`].
fn list_dir(root: &Path, rel: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join(rel))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// This machine, with files read below `root` (normally `/`).
pub struct RealHost {
    pub root: PathBuf,
}

fn rlimit(res: libc::__rlimit_resource_t) -> (u64, u64) {
    // SAFETY: getrlimit fills a zeroed struct of the right type.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(res, &mut r) != 0 {
            return (0, 0);
        }
        let conv = |v: libc::rlim_t| if v == libc::RLIM_INFINITY { u64::MAX } else { v };
        (conv(r.rlim_cur), conv(r.rlim_max))
    }
}

impl Host for RealHost {
    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(rel)).ok()
    }

    fn nofile(&self) -> (u64, u64) {
        rlimit(libc::RLIMIT_NOFILE)
    }

    fn memlock(&self) -> (u64, u64) {
        rlimit(libc::RLIMIT_MEMLOCK)
    }

    fn io_uring_missing(&self) -> Result<Vec<&'static str>, String> {
        let ring = io_uring::IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(|e| format!("io_uring probe failed: {e}"))?;
        // The device ring as the shards set it up: multishot receive into a
        // provided-buffer ring, registered eventfd.
        crate::uring::SessionRing::new().map_err(|e| format!("device ring setup failed: {e}"))?;
        Ok(OPCODES.iter().filter(|(_, code)| !probe.is_supported(*code)).map(|(n, _)| *n).collect())
    }

    fn clock_synced(&self) -> Option<bool> {
        // SAFETY: adjtimex with modes 0 only reads the kernel clock state.
        unsafe {
            let mut t: libc::timex = std::mem::zeroed();
            let state = libc::adjtimex(&mut t);
            if state < 0 {
                return None;
            }
            Some(state != libc::TIME_ERROR && t.status & libc::STA_UNSYNC == 0)
        }
    }

    fn cpus(&self) -> usize {
        crate::server::affinity_cpus().len().max(1)
    }

    fn free_bytes(&self, path: &Path) -> Option<u64> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: statvfs fills a zeroed struct for a valid C string.
        unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            (libc::statvfs(c.as_ptr(), &mut s) == 0).then(|| s.f_bavail * s.f_frsize)
        }
    }

    fn list(&self, rel: &str) -> Vec<String> {
        list_dir(&self.root, rel)
    }

    fn device_of(&self, path: &Path) -> Option<(u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(path).ok()?.dev();
        Some((libc::major(dev), libc::minor(dev)))
    }
}

/// What the box is configured to do.
pub struct Plan {
    pub data_dir: PathBuf,
    pub shards: usize,
    pub device_steering: DeviceSteering,
}

/// Keys whose value is a floor (or, for `tcp_fin_timeout`, a ceiling).
fn comparison(key: &str) -> &'static str {
    match key {
        "net.ipv4.tcp_fin_timeout" => "at most",
        "fs.file-max"
        | "fs.nr_open"
        | "net.core.somaxconn"
        | "net.ipv4.tcp_max_syn_backlog"
        | "net.core.netdev_max_backlog"
        | "net.ipv4.tcp_max_tw_buckets"
        | "net.ipv4.tcp_mem"
        | "vm.max_map_count" => "at least",
        _ => "exactly",
    }
}

/// `(key, value)` for every setting in a sysctl.d file.
pub fn sysctl_settings(conf: &str) -> Vec<(String, String)> {
    conf.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect()
}

fn numbers(s: &str) -> Option<Vec<u64>> {
    s.split_whitespace().map(|w| w.parse().ok()).collect()
}

fn sysctl_check(host: &dyn Host, key: &str, want: &str) -> Check {
    let rel = format!("proc/sys/{}", key.replace('.', "/"));
    let cmp = comparison(key);
    let fix = format!("sysctl -w {key}=\"{want}\"; persist with kernel-tuning/sysctl.d/60-ringpush.conf");
    let Some(raw) = host.read(&rel) else {
        return check(key, format!("{cmp} {want}"), "unreadable", Status::Warn, &fix);
    };
    let have = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    let ok = match (cmp, numbers(&have), numbers(want)) {
        ("at least", Some(h), Some(w)) if h.len() == w.len() => h.iter().zip(&w).all(|(h, w)| h >= w),
        ("at most", Some(h), Some(w)) if h.len() == w.len() => h.iter().zip(&w).all(|(h, w)| h <= w),
        _ => have == want,
    };
    let status = if ok { Status::Ok } else { Status::Warn };
    check(key, format!("{cmp} {want}"), have, status, if ok { "" } else { &fix })
}

fn human(bytes: u64) -> String {
    match bytes {
        u64::MAX => "unlimited".into(),
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{b} B"),
    }
}

/// A `Key=value` line of a systemd unit file.
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines().find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('=')).map(str::trim)
}

fn has_cap_ipc_lock(host: &dyn Host) -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    host.read("proc/self/status")
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:")).map(|v| v.trim().to_string()))
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Runs every check.
pub fn run_checks(host: &dyn Host, plan: &Plan) -> Vec<Check> {
    let mut out: Vec<Check> = sysctl_settings(SYSCTL_CONF).iter().map(|(k, v)| sysctl_check(host, k, v)).collect();

    let (soft, _) = host.nofile();
    let nofile_fix = "raise LimitNOFILE in the systemd unit (ansible sets 4000000) or install kernel-tuning/limits.d";
    out.push(match soft {
        s if s < 4096 => {
            check("open files limit (this process)", "at least 1000000", s.to_string(), Status::Fail, nofile_fix)
        }
        s if s < 1_000_000 => {
            check("open files limit (this process)", "at least 1000000", s.to_string(), Status::Warn, nofile_fix)
        }
        s => check("open files limit (this process)", "at least 1000000", s.to_string(), Status::Ok, ""),
    });

    let (lock, _) = host.memlock();
    let cap = has_cap_ipc_lock(host);
    let lock_fix = "set LimitMEMLOCK=infinity in the systemd unit or install kernel-tuning/limits.d";
    let actual = format!("{}{}", human(lock), if cap { " (CAP_IPC_LOCK: not enforced)" } else { "" });
    out.push(match lock {
        _ if cap || lock >= 64 << 20 => {
            check("locked memory limit (this process)", "at least 64 MiB", actual, Status::Ok, "")
        }
        l if l < 8 << 20 => {
            check("locked memory limit (this process)", "at least 64 MiB", actual, Status::Fail, lock_fix)
        }
        _ => check("locked memory limit (this process)", "at least 64 MiB", actual, Status::Warn, lock_fix),
    });

    match host.read("etc/systemd/system/ringpush.service") {
        None => out.push(check("systemd unit", "installed by ansible", "not installed", Status::Ok, "")),
        Some(unit) => {
            let nofile = unit_value(&unit, "LimitNOFILE").unwrap_or("unset");
            let ok = nofile.parse::<u64>().is_ok_and(|n| n >= 1_000_000) || nofile == "infinity";
            out.push(check(
                "systemd LimitNOFILE",
                "at least 1000000",
                nofile,
                if ok { Status::Ok } else { Status::Warn },
                if ok { "" } else { "set LimitNOFILE=4000000 in ringpush.service" },
            ));
            let memlock = unit_value(&unit, "LimitMEMLOCK").unwrap_or("unset");
            let ok = memlock == "infinity";
            out.push(check(
                "systemd LimitMEMLOCK",
                "infinity",
                memlock,
                if ok { Status::Ok } else { Status::Warn },
                if ok { "" } else { "set LimitMEMLOCK=infinity in ringpush.service" },
            ));
        }
    }

    out.push(match host.io_uring_missing() {
        Err(e) => check(
            "io_uring",
            "available",
            e,
            Status::Fail,
            "use Linux 6.0+ with io_uring enabled (kernel.io_uring_disabled = 0; seccomp must allow it)",
        ),
        Ok(missing) if missing.is_empty() => check(
            "io_uring opcodes",
            "all of POLL_ADD ACCEPT RECV SEND READ WRITE FSYNC TIMEOUT ASYNC_CANCEL PROVIDE_BUFFERS",
            "all supported",
            Status::Ok,
            "",
        ),
        Ok(missing) => check(
            "io_uring opcodes",
            "all needed opcodes",
            format!("missing {}", missing.join(" ")),
            Status::Fail,
            "upgrade the kernel (6.0+)",
        ),
    });

    let release = host.read("proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let version: Vec<u32> = release.split(['.', '-']).take(2).filter_map(|p| p.parse().ok()).collect();
    out.push(match version.as_slice() {
        [maj, min] if (*maj, *min) >= (6, 0) => check("kernel version", "6.0 or newer", release, Status::Ok, ""),
        _ => check(
            "kernel version",
            "6.0 or newer",
            if release.is_empty() { "unknown" } else { release },
            Status::Fail,
            "device sessions need multishot receive and provided-buffer rings (Linux 6.0+)",
        ),
    });

    let cpus = host.cpus();
    let shards = if plan.shards == 0 { cpus } else { plan.shards };
    out.push(if shards <= cpus {
        check(
            "shards vs CPUs",
            format!("at most {cpus} shards"),
            format!("{shards} shards on {cpus} CPUs"),
            Status::Ok,
            "",
        )
    } else {
        check(
            "shards vs CPUs",
            format!("at most {cpus} shards"),
            format!("{shards} shards on {cpus} CPUs"),
            Status::Warn,
            "use --shards 0 (one per CPU): more shards than CPUs share cores",
        )
    });

    out.push(steering_check(host, plan.device_steering, shards, cpus));

    // The data dir may not exist yet: look at its nearest existing ancestor.
    let mut dir = plan.data_dir.clone();
    while !dir.exists() {
        if !dir.pop() {
            dir = PathBuf::from(".");
            break;
        }
    }
    out.push(match host.free_bytes(&dir) {
        None => check("data dir free space", "at least 10 GiB", "unknown", Status::Warn, "check the data dir path"),
        Some(b) if b < 1 << 30 => {
            check("data dir free space", "at least 10 GiB", human(b), Status::Fail, "free disk space or move data_dir")
        }
        Some(b) if b < 10 << 30 => check(
            "data dir free space",
            "at least 10 GiB",
            human(b),
            Status::Warn,
            "offline messages need room: free disk space",
        ),
        Some(b) => check("data dir free space", "at least 10 GiB", human(b), Status::Ok, ""),
    });
    let rotational = host.device_of(&dir).and_then(|(maj, min)| {
        let base = format!("sys/dev/block/{maj}:{min}");
        host.read(&format!("{base}/queue/rotational")).or_else(|| host.read(&format!("{base}/../queue/rotational")))
    });
    out.push(match rotational.as_deref().map(str::trim) {
        Some("0") => check("data dir device", "non-rotational (SSD)", "SSD", Status::Ok, ""),
        Some("1") => check(
            "data dir device",
            "non-rotational (SSD)",
            "rotational disk",
            Status::Warn,
            "put data_dir on an SSD: recovery and offline reads are random I/O",
        ),
        _ => check(
            "data dir device",
            "non-rotational (SSD)",
            "unknown (virtual or network filesystem)",
            Status::Warn,
            "put data_dir on a local SSD",
        ),
    });

    out.push(match host.clock_synced() {
        Some(true) => check("clock sync", "synchronised", "synchronised", Status::Ok, ""),
        Some(false) => check(
            "clock sync",
            "synchronised",
            "not synchronised",
            Status::Warn,
            "run chrony or systemd-timesyncd: TTLs and token expiry use wall time",
        ),
        None => check("clock sync", "synchronised", "unknown", Status::Warn, "run chrony or systemd-timesyncd"),
    });
    out
}

/// With `device_steering = "cpu"` a device is accepted by the shard on the CPU that
/// processed its SYN, so SYNs have to arrive on many CPUs: behind a NIC with one receive
/// queue and no RPS, one shard would accept every device (sessions still go to their
/// owner shards, but every handshake runs on that one core).
fn steering_check(host: &dyn Host, steering: DeviceSteering, shards: usize, cpus: usize) -> Check {
    const NAME: &str = "device accept steering";
    const WANT: &str = "SYNs spread over CPUs";
    if steering == DeviceSteering::Hash {
        return check(NAME, WANT, "by hash (device_steering = \"hash\")", Status::Ok, "");
    }
    if shards <= 1 || shards > cpus {
        return check(NAME, WANT, "by hash (not one shard per CPU)", Status::Ok, "");
    }
    // Physical NICs only (they have a `device` link): virtual ones (bridges, veth, ifb)
    // take their packets on the CPU of whatever sent them.
    let single: Vec<String> = host
        .list("sys/class/net")
        .into_iter()
        .filter(|nic| host.list(&format!("sys/class/net/{nic}")).iter().any(|e| e == "device"))
        .filter(|nic| {
            let rx: Vec<String> = host
                .list(&format!("sys/class/net/{nic}/queues"))
                .into_iter()
                .filter(|q| q.starts_with("rx-"))
                .collect();
            let rps = host.read(&format!("sys/class/net/{nic}/queues/rx-0/rps_cpus")).unwrap_or_default();
            rx.len() == 1 && rps.trim().chars().all(|c| c == '0' || c == ',')
        })
        .collect();
    if single.is_empty() {
        return check(NAME, WANT, "by CPU; NICs have several RX queues or RPS", Status::Ok, "");
    }
    let mask = cpu_mask(cpus);
    check(
        NAME,
        WANT,
        format!("one RX queue, RPS off: {}", single.join(" ")),
        Status::Warn,
        &format!(
            "run ringpush-nic-affinity --apply {nic} (kernel-tuning/nic-affinity.sh; RPS: echo {mask} > /sys/class/net/{nic}/queues/rx-0/rps_cpus) or set device_steering = \"hash\"",
            nic = single[0]
        ),
    )
}

/// The mask of CPUs 0..n as sysfs writes it: hex, in comma-separated 32-bit words.
fn cpu_mask(n: usize) -> String {
    let mut words: Vec<String> = vec!["ffffffff".into(); n / 32];
    if !n.is_multiple_of(32) || n == 0 {
        words.push(format!("{:x}", (1u64 << (n % 32)) - 1));
    }
    words.reverse();
    words.join(",")
}

/// Prints the checks as a table.
pub fn table(checks: &[Check]) -> String {
    let w = checks.iter().map(|c| c.check.len()).max().unwrap_or(5).max(5);
    let we = checks.iter().map(|c| c.expected.chars().count()).max().unwrap_or(8).clamp(8, 40);
    let mut s = format!("{:<w$}  {:<we$}  {:<28}  {:<6}  fix\n", "check", "expected", "actual", "status");
    for c in checks {
        let status = match c.status {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        s.push_str(&format!("{:<w$}  {:<we$}  {:<28}  {:<6}  {}\n", c.check, c.expected, c.actual, status, c.fix));
    }
    let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
    s.push_str(&format!(
        "\n{} checks: {} OK, {warns} WARN, {fails} FAIL\n",
        checks.len(),
        checks.len() - warns - fails
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake machine: files under a temp root, syscall answers fixed by the test.
    struct Fake {
        root: tempfile::TempDir,
        nofile: u64,
        memlock: u64,
        uring: Result<Vec<&'static str>, String>,
        synced: Option<bool>,
        cpus: usize,
        free: Option<u64>,
        dev: Option<(u32, u32)>,
    }

    impl Fake {
        fn good() -> Fake {
            let f = Fake {
                root: tempfile::tempdir().unwrap(),
                nofile: 4_000_000,
                memlock: u64::MAX,
                uring: Ok(vec![]),
                synced: Some(true),
                cpus: 4,
                free: Some(100 << 30),
                dev: Some((8, 1)),
            };
            for (k, v) in sysctl_settings(SYSCTL_CONF) {
                f.put(&format!("proc/sys/{}", k.replace('.', "/")), &v.replace(' ', "\t"));
            }
            f.put("proc/sys/kernel/osrelease", "6.1.0-13-amd64\n");
            f.put("proc/self/status", "Name:\tringpush\nCapEff:\t0000000000000000\n");
            // As in sysfs: dev/block/MAJ:MIN are links into devices/, a partition
            // sits inside its disk, and only the disk has queue/rotational.
            f.put("sys/devices/virtual/sda/queue/rotational", "0\n");
            std::fs::create_dir_all(f.root.path().join("sys/devices/virtual/sda/sda1")).unwrap();
            std::fs::create_dir_all(f.root.path().join("sys/dev/block")).unwrap();
            let link = |target: &str, name: &str| {
                std::os::unix::fs::symlink(target, f.root.path().join("sys/dev/block").join(name)).unwrap()
            };
            link("../../devices/virtual/sda", "8:0");
            link("../../devices/virtual/sda/sda1", "8:1");
            // A NIC with two receive queues (RSS) and the loopback, which has no device.
            for q in ["rx-0", "rx-1"] {
                f.put(&format!("sys/class/net/eth0/queues/{q}/rps_cpus"), "0\n");
            }
            std::fs::create_dir_all(f.root.path().join("sys/class/net/eth0/device")).unwrap();
            f.put("sys/class/net/lo/queues/rx-0/rps_cpus", "0\n");
            f
        }

        fn put(&self, rel: &str, text: &str) {
            let p = self.root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }

        fn status_of(&self, name: &str) -> (Status, String) {
            let plan =
                Plan { data_dir: self.root.path().join("data"), shards: 0, device_steering: DeviceSteering::Cpu };
            let checks = run_checks(self, &plan);
            let c = checks.iter().find(|c| c.check == name).unwrap_or_else(|| panic!("no check {name}"));
            (c.status, c.actual.clone())
        }
    }

    impl Host for Fake {
        fn read(&self, rel: &str) -> Option<String> {
            std::fs::read_to_string(self.root.path().join(rel)).ok()
        }
        fn nofile(&self) -> (u64, u64) {
            (self.nofile, self.nofile)
        }
        fn memlock(&self) -> (u64, u64) {
            (self.memlock, self.memlock)
        }
        fn io_uring_missing(&self) -> Result<Vec<&'static str>, String> {
            self.uring.clone()
        }
        fn clock_synced(&self) -> Option<bool> {
            self.synced
        }
        fn cpus(&self) -> usize {
            self.cpus
        }
        fn free_bytes(&self, _: &Path) -> Option<u64> {
            self.free
        }
        fn device_of(&self, _: &Path) -> Option<(u32, u32)> {
            self.dev
        }
        fn list(&self, rel: &str) -> Vec<String> {
            list_dir(self.root.path(), rel)
        }
    }

    #[test]
    fn a_tuned_box_passes_every_check() {
        let f = Fake::good();
        let plan = Plan { data_dir: f.root.path().join("data"), shards: 2, device_steering: DeviceSteering::Cpu };
        let checks = run_checks(&f, &plan);
        let bad: Vec<_> = checks.iter().filter(|c| c.status != Status::Ok).collect();
        assert!(bad.is_empty(), "{bad:#?}");
        assert!(checks.len() > 25);
        assert!(table(&checks).contains("0 WARN, 0 FAIL"));
    }

    #[test]
    fn sysctls_compare_as_floor_ceiling_or_exact() {
        let f = Fake::good();
        f.put("proc/sys/fs/file-max", "9999999999");
        assert_eq!(f.status_of("fs.file-max").0, Status::Ok, "above a floor is fine");
        f.put("proc/sys/fs/file-max", "1000");
        assert_eq!(f.status_of("fs.file-max").0, Status::Warn);
        f.put("proc/sys/net/ipv4/tcp_fin_timeout", "10");
        assert_eq!(f.status_of("net.ipv4.tcp_fin_timeout").0, Status::Ok, "below a ceiling is fine");
        f.put("proc/sys/net/ipv4/tcp_fin_timeout", "60");
        assert_eq!(f.status_of("net.ipv4.tcp_fin_timeout").0, Status::Warn);
        f.put("proc/sys/net/ipv4/tcp_mem", "1 9999999 9999999");
        assert_eq!(f.status_of("net.ipv4.tcp_mem").0, Status::Warn, "every field of a triple counts");
        f.put("proc/sys/net/ipv4/tcp_tw_reuse", "2");
        assert_eq!(f.status_of("net.ipv4.tcp_tw_reuse").0, Status::Warn, "flags must match exactly");
        std::fs::remove_file(f.root.path().join("proc/sys/vm/swappiness")).unwrap();
        assert_eq!(f.status_of("vm.swappiness"), (Status::Warn, "unreadable".into()));
    }

    #[test]
    fn limits_and_capabilities() {
        let mut f = Fake::good();
        f.nofile = 1024;
        assert_eq!(f.status_of("open files limit (this process)").0, Status::Fail);
        f.nofile = 20_000; // a capacity limit, not a broken box
        assert_eq!(f.status_of("open files limit (this process)").0, Status::Warn);
        f.memlock = 64 << 10;
        assert_eq!(f.status_of("locked memory limit (this process)").0, Status::Fail);
        f.memlock = 16 << 20;
        assert_eq!(f.status_of("locked memory limit (this process)").0, Status::Warn);
        f.memlock = 64 << 10;
        f.put("proc/self/status", "CapEff:\t0000000000004000\n");
        assert_eq!(f.status_of("locked memory limit (this process)").0, Status::Ok, "CAP_IPC_LOCK lifts the limit");
    }

    #[test]
    fn systemd_unit_is_checked_when_installed() {
        let f = Fake::good();
        assert_eq!(f.status_of("systemd unit"), (Status::Ok, "not installed".into()));
        f.put("etc/systemd/system/ringpush.service", "[Service]\nLimitNOFILE=4000000\nLimitMEMLOCK=infinity\n");
        assert_eq!(f.status_of("systemd LimitNOFILE").0, Status::Ok);
        assert_eq!(f.status_of("systemd LimitMEMLOCK").0, Status::Ok);
        f.put("etc/systemd/system/ringpush.service", "[Service]\nLimitNOFILE=1024\n");
        assert_eq!(f.status_of("systemd LimitNOFILE").0, Status::Warn);
        assert_eq!(f.status_of("systemd LimitMEMLOCK"), (Status::Warn, "unset".into()));
    }

    #[test]
    fn io_uring_and_kernel_version() {
        let mut f = Fake::good();
        f.uring = Err("io_uring_setup failed: Operation not permitted".into());
        assert_eq!(f.status_of("io_uring").0, Status::Fail);
        f.uring = Ok(vec!["PROVIDE_BUFFERS"]);
        assert_eq!(f.status_of("io_uring opcodes"), (Status::Fail, "missing PROVIDE_BUFFERS".into()));
        f.put("proc/sys/kernel/osrelease", "5.10.0\n");
        assert_eq!(f.status_of("kernel version").0, Status::Fail);
        f.put("proc/sys/kernel/osrelease", "4.19.0\n");
        assert_eq!(f.status_of("kernel version").0, Status::Fail);
    }

    #[test]
    fn shards_disk_and_clock() {
        let mut f = Fake::good();
        let plan = Plan { data_dir: f.root.path().join("data"), shards: 8, device_steering: DeviceSteering::Cpu };
        let c = run_checks(&f, &plan);
        assert_eq!(c.iter().find(|c| c.check == "shards vs CPUs").unwrap().status, Status::Warn);
        f.free = Some(5 << 30);
        assert_eq!(f.status_of("data dir free space").0, Status::Warn);
        f.free = Some(100 << 20);
        assert_eq!(f.status_of("data dir free space").0, Status::Fail);
        f.put("sys/devices/virtual/sda/queue/rotational", "1\n");
        assert_eq!(f.status_of("data dir device").0, Status::Warn, "partition resolves to its disk");
        f.dev = Some((0, 42));
        assert_eq!(f.status_of("data dir device").0, Status::Warn);
        f.synced = Some(false);
        assert_eq!(f.status_of("clock sync").0, Status::Warn);
        f.synced = None;
        assert_eq!(f.status_of("clock sync").0, Status::Warn);
    }

    #[test]
    fn cpu_steering_wants_syns_spread_over_cpus() {
        let f = Fake::good();
        const NAME: &str = "device accept steering";
        assert_eq!(f.status_of(NAME).0, Status::Ok, "two receive queues");
        std::fs::remove_dir_all(f.root.path().join("sys/class/net/eth0/queues/rx-1")).unwrap();
        let plan = |device_steering| Plan { data_dir: f.root.path().join("data"), shards: 0, device_steering };
        let checks = run_checks(&f, &plan(DeviceSteering::Cpu));
        let c = checks.iter().find(|c| c.check == NAME).unwrap();
        assert_eq!((c.status, c.actual.as_str()), (Status::Warn, "one RX queue, RPS off: eth0"));
        assert!(
            c.fix.contains("--apply eth0") && c.fix.contains("echo f > /sys/class/net/eth0/queues/rx-0/rps_cpus"),
            "{}",
            c.fix
        );
        let checks = run_checks(&f, &plan(DeviceSteering::Hash));
        assert_eq!(checks.iter().find(|c| c.check == NAME).unwrap().status, Status::Ok, "hash needs no spread");
        f.put("sys/class/net/eth0/queues/rx-0/rps_cpus", "00000000,0000000f\n");
        assert_eq!(f.status_of(NAME).0, Status::Ok, "RPS spreads one queue");
        f.put("sys/class/net/veth0/queues/rx-0/rps_cpus", "0\n");
        assert_eq!(f.status_of(NAME).0, Status::Ok, "a virtual NIC takes packets on the sender's CPU");
    }

    #[test]
    fn cpu_masks_are_written_in_32_bit_words() {
        assert_eq!(cpu_mask(2), "3");
        assert_eq!(cpu_mask(4), "f");
        assert_eq!(cpu_mask(32), "ffffffff");
        assert_eq!(cpu_mask(36), "f,ffffffff");
        assert_eq!(cpu_mask(64), "ffffffff,ffffffff");
    }

    #[test]
    fn every_sysctl_line_has_a_comment_above_it() {
        let lines: Vec<&str> = SYSCTL_CONF.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if !l.trim().is_empty() && !l.starts_with('#') {
                let above = lines[..i].iter().rev().take_while(|p| !p.trim().is_empty()).any(|p| p.starts_with('#'));
                assert!(above, "no explanation for `{l}`");
            }
        }
    }
}
