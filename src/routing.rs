//! Device placement: which shard owns a device.
//!
//! `shard_for(app, device, shards)` is a pure function every core evaluates the same
//! way: a 64-bit FNV-1a hash of the length-prefixed app and device ids, fed to jump
//! consistent hash (Lamping & Veach). Growing from N to N+1 shards moves only about
//! 1/(N+1) of the devices. Golden vectors below pin the placement: a change that moves
//! devices fails the tests instead of silently stranding stored messages.

/// FNV-1a over `len(app) | app | len(device) | device`.
pub fn device_hash(app: &str, device: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(PRIME);
    };
    eat(app.len() as u8);
    app.bytes().for_each(&mut eat);
    eat(device.len() as u8);
    device.bytes().for_each(&mut eat);
    h
}

/// Jump consistent hash: maps `key` to a bucket in `0..buckets`.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    assert!(buckets > 0, "jump_hash needs at least one bucket");
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The shard that owns `device` of `app` when the box runs `shards` shards.
pub fn shard_for(app: &str, device: &str, shards: usize) -> usize {
    jump_hash(device_hash(app, device), shards as u32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placement_vectors_in_the_protocol_doc_hold() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
        let block = doc.split("```placement\n").nth(1).expect("a placement block").split("```").next().unwrap();
        let mut n = 0;
        for line in block.lines().filter(|l| !l.trim().is_empty()) {
            let (lhs, want) = line.split_once('=').expect("`app device shards = shard`");
            let f: Vec<&str> = lhs.split_whitespace().collect();
            let (app, dev, shards) = (f[0], f[1], f[2].parse().unwrap());
            assert_eq!(shard_for(app, dev, shards), want.trim().parse::<usize>().unwrap(), "{line}");
            n += 1;
        }
        assert!(n >= 8, "only {n} placement vectors");
        assert!(doc.contains(&format!("{:016x}", device_hash("demo", "dev-1"))));
    }

    #[test]
    fn golden_placement_never_changes() {
        // (device, shards) -> shard, for app "demo". Regenerating these is a breaking
        // change for every box with stored messages.
        let golden: [(&str, usize, usize); 8] = [
            ("dev-1", 2, 1),
            ("dev-2", 2, 0),
            ("dev-3", 2, 0),
            ("dev-1", 4, 2),
            ("dev-2", 4, 3),
            ("phone-42", 8, 2),
            ("phone-42", 16, 8),
            ("sensor/7", 3, 2),
        ];
        for (dev, n, want) in golden {
            assert_eq!(shard_for("demo", dev, n), want, "{dev} over {n} shards");
        }
        assert_eq!(device_hash("demo", "dev-1"), 0xf385_342a_5036_ad00);
    }

    #[test]
    fn one_shard_takes_everything_and_spread_is_even() {
        let mut counts = [0usize; 4];
        for i in 0..40_000 {
            assert_eq!(shard_for("a", &i.to_string(), 1), 0);
            counts[shard_for("a", &i.to_string(), 4)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn growing_moves_few_devices() {
        let moved =
            (0..10_000).filter(|i| shard_for("a", &i.to_string(), 4) != shard_for("a", &i.to_string(), 5)).count();
        assert!((1_500..2_500).contains(&moved), "moved {moved} of 10000");
    }
}
