//! The connection preamble: 8 bytes that open every connection in each direction.
//!
//! ```text
//! offset 0  4  magic "RPSH" (52 50 53 48)
//! offset 4  1  role: 0x44 'D' device connection, 0x41 'A' app connection
//! offset 5  1  lowest protocol version the sender speaks
//! offset 6  1  highest protocol version the sender speaks
//! offset 7  1  reserved, 0
//! ```
//! The client sends its range; the server answers with `min == max ==` the chosen
//! version, or with an ERROR frame (`unsupported_version`, `bad_magic`) and closes.
//! A wrong client (HTTP, TLS ClientHello, noise) is detected on its first byte that
//! differs from the magic, so it is told and closed without waiting for 8 bytes.

use crate::error::{DecodeError, ErrorCode};

/// The four magic bytes.
pub const MAGIC: [u8; 4] = *b"RPSH";
/// Bytes in a preamble.
pub const PREAMBLE_LEN: usize = 8;
/// The protocol version this crate implements.
pub const VERSION: u8 = 1;

/// Which protocol a connection speaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    Device,
    App,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Device => b'D',
            Role::App => b'A',
        }
    }
}

/// A decoded preamble.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Preamble {
    pub role: Role,
    pub min_version: u8,
    pub max_version: u8,
}

impl Preamble {
    /// The preamble a client of this crate sends.
    pub fn client(role: Role) -> Self {
        Preamble { role, min_version: VERSION, max_version: VERSION }
    }

    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let m = MAGIC;
        [m[0], m[1], m[2], m[3], self.role.byte(), self.min_version, self.max_version, 0]
    }

    /// `Ok(None)` while fewer than 8 bytes are buffered and those match so far.
    pub fn decode(buf: &[u8]) -> Result<Option<Preamble>, DecodeError> {
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            return Err(DecodeError::new(ErrorCode::BAD_MAGIC, "not a ringpush client: expected preamble \"RPSH\""));
        }
        if buf.len() < PREAMBLE_LEN {
            if buf.len() > 4 && buf[4] != b'D' && buf[4] != b'A' {
                return Err(BAD_ROLE);
            }
            return Ok(None);
        }
        let role = match buf[4] {
            b'D' => Role::Device,
            b'A' => Role::App,
            _ => return Err(BAD_ROLE),
        };
        if buf[7] != 0 || buf[5] > buf[6] {
            return Err(DecodeError::new(ErrorCode::BAD_MAGIC, "malformed preamble"));
        }
        Ok(Some(Preamble { role, min_version: buf[5], max_version: buf[6] }))
    }

    /// Picks the highest version both this crate and the peer speak.
    pub fn negotiate(&self) -> Result<u8, DecodeError> {
        if (self.min_version..=self.max_version).contains(&VERSION) {
            Ok(VERSION)
        } else {
            Err(DecodeError::new(ErrorCode::UNSUPPORTED_VERSION, "no common protocol version (server speaks 1)"))
        }
    }
}

const BAD_ROLE: DecodeError = DecodeError::new(ErrorCode::BAD_MAGIC, "unknown role in preamble");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_negotiate() {
        let p = Preamble::client(Role::Device);
        let b = p.encode();
        assert_eq!(&b, b"RPSHD\x01\x01\x00");
        for cut in 0..PREAMBLE_LEN {
            assert_eq!(Preamble::decode(&b[..cut]).unwrap(), None);
        }
        let d = Preamble::decode(&b).unwrap().unwrap();
        assert_eq!(d, p);
        assert_eq!(d.negotiate().unwrap(), VERSION);
    }

    #[test]
    fn wrong_clients_fail_on_first_differing_byte() {
        assert_eq!(Preamble::decode(b"G").unwrap_err().code, ErrorCode::BAD_MAGIC);
        assert!(Preamble::decode(b"GET / HTTP/1.1\r\n").is_err());
        assert!(Preamble::decode(&[0x16, 0x03, 0x01]).is_err()); // TLS ClientHello
        assert!(Preamble::decode(b"RPSHX").is_err());
    }

    #[test]
    fn version_mismatch() {
        let p = Preamble::decode(b"RPSHA\x02\x03\x00").unwrap().unwrap();
        assert_eq!(p.negotiate().unwrap_err().code, ErrorCode::UNSUPPORTED_VERSION);
        assert!(Preamble::decode(b"RPSHA\x03\x02\x00").is_err());
    }
}
