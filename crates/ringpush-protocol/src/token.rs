//! Device tokens and app auth proofs (HMAC-SHA256 with the app secret).
//!
//! Device token, 40 bytes: `expiry (u64 BE, unix seconds) | mac (32 bytes)` where
//! `mac = HMAC-SHA256(secret, len(app) u8 | app | len(device) u8 | device | expiry u64 BE)`.
//! App servers mint tokens without calling ringpush; the connector verifies them
//! without a lookup. The text form (CLI, config) is the 40 bytes in lowercase hex.
//!
//! App auth proof, 32 bytes:
//! `HMAC-SHA256(secret, "ringpush-auth-v1" | len(app) u8 | app | timestamp_ms u64 BE)`.
//! MACs are compared in constant time (`hmac::Mac::verify_slice`).

use crate::error::{DecodeError, ErrorCode};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes in a binary device token.
pub const TOKEN_LEN: usize = 40;
const AUTH_DOMAIN: &[u8] = b"ringpush-auth-v1";

/// A device token: when it expires and its MAC.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DeviceToken(pub [u8; TOKEN_LEN]);

fn mac_for(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length")
}

fn device_mac(secret: &[u8], app: &str, device: &str, expiry: u64) -> HmacSha256 {
    let mut m = mac_for(secret);
    m.update(&[app.len() as u8]);
    m.update(app.as_bytes());
    m.update(&[device.len() as u8]);
    m.update(device.as_bytes());
    m.update(&expiry.to_be_bytes());
    m
}

impl DeviceToken {
    /// Mints a token valid until `expiry` (unix seconds).
    pub fn mint(secret: &[u8], app: &str, device: &str, expiry: u64) -> Self {
        let tag = device_mac(secret, app, device, expiry).finalize().into_bytes();
        let mut t = [0; TOKEN_LEN];
        t[..8].copy_from_slice(&expiry.to_be_bytes());
        t[8..].copy_from_slice(&tag);
        DeviceToken(t)
    }

    pub fn expiry(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"))
    }

    /// Checks the MAC in constant time, then the expiry against `now_secs`.
    pub fn verify(&self, secret: &[u8], app: &str, device: &str, now_secs: u64) -> Result<(), DecodeError> {
        device_mac(secret, app, device, self.expiry())
            .verify_slice(&self.0[8..])
            .map_err(|_| DecodeError::new(ErrorCode::BAD_TOKEN, "device token does not verify"))?;
        if self.expiry() <= now_secs {
            return Err(DecodeError::new(ErrorCode::EXPIRED_TOKEN, "device token has expired"));
        }
        Ok(())
    }

    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(TOKEN_LEN * 2);
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }

    pub fn from_hex(s: &str) -> Result<Self, DecodeError> {
        const BAD: DecodeError = DecodeError::new(ErrorCode::BAD_TOKEN, "token must be 80 hex digits");
        let s = s.trim().as_bytes();
        if s.len() != TOKEN_LEN * 2 {
            return Err(BAD);
        }
        let nib = |c: u8| (c as char).to_digit(16).map(|d| d as u8).ok_or(BAD);
        let mut t = [0; TOKEN_LEN];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            t[i] = nib(pair[0])? << 4 | nib(pair[1])?;
        }
        Ok(DeviceToken(t))
    }
}

/// The AUTH proof an app sends for `app` at `timestamp_ms`.
pub fn auth_proof(secret: &[u8], app: &str, timestamp_ms: u64) -> [u8; 32] {
    auth_mac(secret, app, timestamp_ms).finalize().into_bytes().into()
}

fn auth_mac(secret: &[u8], app: &str, timestamp_ms: u64) -> HmacSha256 {
    let mut m = mac_for(secret);
    m.update(AUTH_DOMAIN);
    m.update(&[app.len() as u8]);
    m.update(app.as_bytes());
    m.update(&timestamp_ms.to_be_bytes());
    m
}

/// Verifies an AUTH proof in constant time and that its timestamp is within
/// `max_skew_ms` of `now_ms`.
pub fn verify_auth(
    secret: &[u8],
    app: &str,
    timestamp_ms: u64,
    proof: &[u8; 32],
    now_ms: u64,
    max_skew_ms: u64,
) -> Result<(), DecodeError> {
    auth_mac(secret, app, timestamp_ms)
        .verify_slice(proof)
        .map_err(|_| DecodeError::new(ErrorCode::NOT_AUTHORIZED, "app proof does not verify"))?;
    if now_ms.abs_diff(timestamp_ms) > max_skew_ms {
        return Err(DecodeError::new(ErrorCode::NOT_AUTHORIZED, "app proof timestamp too far from server time"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_mint_verify_expire_tamper() {
        let t = DeviceToken::mint(b"s3cret", "demo", "dev-1", 2_000_000_000);
        assert_eq!(t.expiry(), 2_000_000_000);
        t.verify(b"s3cret", "demo", "dev-1", 1_900_000_000).unwrap();
        let e = t.verify(b"s3cret", "demo", "dev-1", 2_000_000_000).unwrap_err();
        assert_eq!(e.code, ErrorCode::EXPIRED_TOKEN);
        for (secret, app, dev) in
            [(&b"other"[..], "demo", "dev-1"), (b"s3cret", "demx", "dev-1"), (b"s3cret", "demo", "dev-2")]
        {
            let e = t.verify(secret, app, dev, 0).unwrap_err();
            assert_eq!(e.code, ErrorCode::BAD_TOKEN);
        }
        // Moving the expiry forward breaks the MAC.
        let mut forged = t;
        forged.0[7] ^= 1;
        assert_eq!(forged.verify(b"s3cret", "demo", "dev-1", 0).unwrap_err().code, ErrorCode::BAD_TOKEN);
    }

    #[test]
    fn length_prefixes_prevent_field_shifting() {
        // ("ab", "c") and ("a", "bc") must not share a MAC.
        let a = DeviceToken::mint(b"k", "ab", "c", 1);
        let b = DeviceToken::mint(b"k", "a", "bc", 1);
        assert_ne!(a, b);
    }

    #[test]
    fn hex_round_trip() {
        let t = DeviceToken::mint(b"k", "a", "b", 7);
        assert_eq!(DeviceToken::from_hex(&t.to_hex()).unwrap(), t);
        assert!(DeviceToken::from_hex("zz").is_err());
        assert!(DeviceToken::from_hex(&"g".repeat(80)).is_err());
    }

    #[test]
    fn auth_proof_checks() {
        let p = auth_proof(b"k", "demo", 1000);
        verify_auth(b"k", "demo", 1000, &p, 1500, 1000).unwrap();
        assert!(verify_auth(b"k", "demo", 1000, &p, 5000, 1000).is_err());
        assert!(verify_auth(b"x", "demo", 1000, &p, 1000, 1000).is_err());
        assert!(verify_auth(b"k", "demo", 1001, &p, 1000, 1000).is_err());
    }
}
