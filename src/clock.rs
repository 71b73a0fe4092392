//! Injected time. Everything that decides behaviour by time (TTLs, heartbeats, token
//! expiry, slow-device timeouts) reads a [`Clock`], so tests can drive it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time in unix milliseconds.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system clock, read coarsely (`CLOCK_REALTIME_COARSE`: the kernel's last tick,
/// a few ms of resolution, no hardware timer read). TTLs, heartbeats and token expiry
/// need no finer, and sessions read the clock on every poll.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we pass.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
            return ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000;
        }
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_system_clock_agrees_with_the_fine_one() {
        let fine = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let coarse = SystemClock.now_ms();
        assert!(coarse.abs_diff(fine) < 50, "coarse {coarse} vs fine {fine}");
    }
}

/// A clock tests set and advance by hand.
#[derive(Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ms: u64) -> Arc<Self> {
        Arc::new(ManualClock(AtomicU64::new(start_ms)))
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Monotonic microseconds since the first call in this process: for latency
/// histograms only, never for behaviour (that reads a [`Clock`]).
pub fn mono_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_micros() as u64
}
