//! Human durations (`250ms`, `30s`, `5m`, `1h`, `3d`) for flags and config keys.

use std::time::Duration;

/// Parses `<integer><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} needs a unit: ms, s, m, h or d (e.g. 30s)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("duration {s:?} must start with a whole number"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(format!("duration {s:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    }
    .ok_or_else(|| format!("duration {s:?} is too large"))?;
    Ok(Duration::from_millis(ms))
}

/// Formats a duration in the largest unit that divides it exactly.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms > 0 && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// serde adapter: durations in config files are strings like `"30s"`.
pub mod serde_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse("3d").unwrap(), Duration::from_secs(3 * 86400));
    }

    #[test]
    fn rejects_bad_input_clearly() {
        assert!(parse("30").unwrap_err().contains("needs a unit"));
        assert!(parse("s").unwrap_err().contains("whole number"));
        assert!(parse("3w").unwrap_err().contains("unknown unit"));
        assert!(parse("99999999999999999d").unwrap_err().contains("too large"));
    }

    #[test]
    fn formats_round_trip() {
        for s in ["250ms", "30s", "5m", "1h", "3d", "90s"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
