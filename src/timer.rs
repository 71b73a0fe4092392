//! A hashed timer wheel: one per shard for session deadlines, one for message expiry.
//!
//! Each entry is a key and a deadline in milliseconds; `advance(now)` returns the keys
//! whose deadline has passed. Inserting is O(1); advancing touches only the slots the
//! clock moved over. Entries are never cancelled: owners store their real deadline and
//! re-check it when a key fires (lazy deletion), so a busy session costs one entry per
//! timeout period instead of one per frame, and the wheel never grows past one entry
//! per armed key plus stale ones that fire once and are dropped.

/// A fired or pending timer entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry<K> {
    key: K,
    deadline: u64,
}

pub struct TimerWheel<K> {
    slots: Vec<Vec<Entry<K>>>,
    tick_ms: u64,
    /// The last tick whose slot has been drained.
    current: u64,
    len: usize,
}

impl<K: Copy> TimerWheel<K> {
    /// A wheel with `slots` slots of `tick_ms` each, starting at `now_ms`.
    pub fn new(slots: usize, tick_ms: u64, now_ms: u64) -> Self {
        assert!(slots > 0 && tick_ms > 0);
        TimerWheel { slots: (0..slots).map(|_| Vec::new()).collect(), tick_ms, current: now_ms / tick_ms, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Arms `key` for `deadline_ms`. A deadline already past fires on the next advance.
    pub fn insert(&mut self, key: K, deadline_ms: u64) {
        // The first tick boundary at or after the deadline: visiting it fires the entry.
        let tick = deadline_ms.div_ceil(self.tick_ms).max(self.current + 1);
        let n = self.slots.len() as u64;
        self.slots[(tick % n) as usize].push(Entry { key, deadline: deadline_ms });
        self.len += 1;
    }

    /// Moves the wheel to `now_ms`, appending every key whose deadline is ≤ `now_ms`
    /// to `fired`.
    pub fn advance(&mut self, now_ms: u64, fired: &mut Vec<K>) {
        let target = now_ms / self.tick_ms;
        let n = self.slots.len() as u64;
        // Past a full turn every slot is visited once.
        let steps = (target.saturating_sub(self.current)).min(n);
        for i in 1..=steps {
            let slot = &mut self.slots[((self.current + i) % n) as usize];
            let before = slot.len();
            slot.retain(|e| {
                if e.deadline <= now_ms {
                    fired.push(e.key);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
        }
        self.current = self.current.max(target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_time_not_before() {
        let mut w = TimerWheel::new(8, 100, 1_000);
        w.insert(1u32, 1_250);
        w.insert(2, 1_900);
        w.insert(3, 5_000); // beyond one turn: waits for its round
        let mut f = Vec::new();
        w.advance(1_200, &mut f);
        assert!(f.is_empty());
        w.advance(1_300, &mut f);
        assert_eq!(f, [1]);
        f.clear();
        w.advance(2_000, &mut f);
        assert_eq!(f, [2]);
        f.clear();
        w.advance(4_999, &mut f);
        assert!(f.is_empty(), "fired early: {f:?}");
        w.advance(5_000, &mut f);
        assert_eq!(f, [3]);
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadlines_fire_on_next_advance() {
        let mut w = TimerWheel::new(4, 10, 1_000);
        w.insert(7u8, 10);
        let mut f = Vec::new();
        w.advance(1_010, &mut f);
        assert_eq!(f, [7]);
    }

    #[test]
    fn long_jumps_visit_every_slot_once() {
        let mut w = TimerWheel::new(16, 10, 0);
        for k in 0..100u32 {
            w.insert(k, 10 + k as u64 * 7);
        }
        let mut f = Vec::new();
        w.advance(1_000_000, &mut f);
        f.sort();
        assert_eq!(f, (0..100).collect::<Vec<_>>());
        assert_eq!(w.len(), 0);
    }
}
