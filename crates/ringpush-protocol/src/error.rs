//! The single error-code table shared by the device and app protocols.
//!
//! Codes travel as big-endian `u16` in ERROR, BYE and REJECTED frames. Code 0 (`ok`) is
//! only used as a BYE reason for a normal close.

use std::fmt;

/// A wire error code. Unknown codes decode fine (a newer server may send them) and
/// display as `unknown(N)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ErrorCode(pub u16);

macro_rules! codes {
    ($( $(#[$doc:meta])* $name:ident = $val:expr, $text:expr; )*) => {
        impl ErrorCode {
            $( $(#[$doc])* pub const $name: ErrorCode = ErrorCode($val); )*

            /// Every code in the table, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The snake_case wire name of this code (used in logs, metrics and docs).
            pub fn name(self) -> &'static str {
                match self.0 {
                    $( $val => $text, )*
                    _ => "unknown",
                }
            }
        }
    };
}

codes! {
    /// Normal close (BYE reason only).
    OK = 0, "ok";
    /// A frame's fields do not match its declared length or are malformed.
    BAD_FRAME = 1, "bad_frame";
    /// The frame type byte is not one this protocol knows.
    UNKNOWN_FRAME_TYPE = 2, "unknown_frame_type";
    /// A declared frame length is larger than the negotiated maximum.
    OVERSIZE = 3, "oversize";
    /// No protocol version both sides support.
    UNSUPPORTED_VERSION = 4, "unsupported_version";
    /// The connection did not start with the ringpush preamble (HTTP, TLS, noise).
    BAD_MAGIC = 5, "bad_magic";
    /// The device token's MAC does not verify.
    BAD_TOKEN = 6, "bad_token";
    /// The device token verified but its expiry has passed.
    EXPIRED_TOKEN = 7, "expired_token";
    /// The app id is not configured on this server.
    UNKNOWN_APP = 8, "unknown_app";
    /// App authentication failed, or the frame is not allowed for this connection.
    NOT_AUTHORIZED = 9, "not_authorized";
    /// The server cannot store the message (queue or disk full).
    STORAGE_FULL = 10, "storage_full";
    /// Overloaded: retry later.
    BUSY = 11, "busy";
    /// The server is shutting down.
    SHUTTING_DOWN = 12, "shutting_down";
    /// A well-formed frame that is not valid in this state or direction.
    UNEXPECTED_FRAME = 13, "unexpected_frame";
    /// A multicast list has more targets than allowed.
    TOO_MANY_TARGETS = 14, "too_many_targets";
    /// A TTL larger than the server's maximum.
    BAD_TTL = 15, "bad_ttl";
    /// The same device logged in again elsewhere; this session is replaced.
    REPLACED = 16, "replaced";
    /// No traffic within the heartbeat timeout.
    IDLE_TIMEOUT = 17, "idle_timeout";
    /// The device stopped reading and its outbound queue overflowed.
    SLOW_CONSUMER = 18, "slow_consumer";
    /// The device should reconnect to the host:port given in the BYE frame.
    REDIRECT = 19, "redirect";
    /// An internal server error.
    INTERNAL = 20, "internal";
    /// A RECEIPT query for a push id the server does not know (or no longer keeps).
    UNKNOWN_PUSH = 21, "unknown_push";
    /// An id (app or device) is empty, too long or not UTF-8.
    BAD_ID = 22, "bad_id";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            "unknown" => write!(f, "unknown({})", self.0),
            n => f.write_str(n),
        }
    }
}

/// Why a byte sequence could not be decoded. `code` is what goes in the ERROR frame sent
/// back before the connection is closed; `what` is a short human reason.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DecodeError {
    pub code: ErrorCode,
    pub what: &'static str,
}

impl DecodeError {
    pub(crate) const fn new(code: ErrorCode, what: &'static str) -> Self {
        DecodeError { code, what }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.what)
    }
}

impl std::error::Error for DecodeError {}

/// ERROR frame body, shared by both protocols: a code and a short UTF-8 message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ErrorFrame<'a> {
    pub code: ErrorCode,
    pub message: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_dense_and_named() {
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(c.0 as usize, i, "codes must stay dense and in order");
            assert_ne!(c.name(), "unknown");
        }
        assert_eq!(ErrorCode(999).to_string(), "unknown(999)");
        assert_eq!(ErrorCode::BAD_TOKEN.to_string(), "bad_token");
    }
}
