//! Sans-IO codec for the two ringpush wire protocols.
//!
//! This crate has no I/O and no runtime: bytes in, frames out; frames in, bytes out.
//! An app SDK on any runtime can depend on it alone; the appliance moves bytes between
//! it and its sockets. `docs/protocol.md` in the repository is the byte-exact spec and
//! carries the hex test vectors that `tests/vectors.rs` checks against this code.
//!
//! Module map:
//! - [`error`]: the one error-code table both protocols share, and [`DecodeError`].
//! - [`wire`]: the frame header, limits, and the bounds-checked field reader/writer.
//! - [`preamble`]: the 8-byte magic/version handshake that opens every connection.
//! - [`device`]: device frames (HELLO, WELCOME, MESSAGE, ACK, PING/PONG, BYE, ERROR).
//! - [`app`]: app frames (AUTH, PUSH, ACCEPTED, REJECTED, BUSY, RECEIPT, ...).
//! - [`token`]: device tokens and app auth proofs (HMAC-SHA256, constant-time checks).
//!
//! Decoding is two-step in spirit (`check` then `parse`): [`wire::check_frame`] says
//! whether a whole frame is buffered without allocating, rejecting an oversize declared
//! length as soon as the 5-byte header is read; `decode` then parses the frame with
//! borrowed fields. `Ok(None)` ("incomplete") is normal flow, not an error.

pub mod app;
pub mod device;
pub mod error;
pub mod preamble;
pub mod token;
pub mod wire;

pub use app::{AppFrame, Auth, AuthOk, Push, Receipt, Rejected, Target};
pub use device::{Ack, Bye, DeviceFrame, Hello, Message, Welcome};
pub use error::{DecodeError, ErrorCode, ErrorFrame};
pub use preamble::{Preamble, Role, PREAMBLE_LEN, VERSION};
pub use token::{DeviceToken, TOKEN_LEN};
pub use wire::Limits;
