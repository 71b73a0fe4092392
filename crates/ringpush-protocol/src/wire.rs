//! Frame header, limits and the bounds-checked field reader shared by both protocols.
//!
//! Every frame is `type: u8 | len: u32 BE | body: len bytes`. Integers are big-endian
//! and fixed-width; an id or short text is `str8` (`u8` length, then that many UTF-8
//! bytes); a payload is whatever remains of the body after the fixed fields.

use crate::error::{DecodeError, ErrorCode};

/// Bytes in a frame header (type byte and the big-endian body length).
pub const HEADER_LEN: usize = 5;
/// Longest app id, in bytes.
pub const MAX_APP_ID: usize = 64;
/// Longest device id, in bytes.
pub const MAX_DEVICE_ID: usize = 128;
/// Hard ceiling for any configured frame size (16 MiB); configs above it are clamped.
pub const MAX_FRAME_CEILING: u32 = 16 << 20;

/// Limits enforced while decoding. Both sides announce theirs (WELCOME / AUTH_OK).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted frame body, in bytes. Checked as soon as the header is read.
    pub max_frame: u32,
    /// Largest accepted multicast list.
    pub max_targets: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_frame: 64 * 1024, max_targets: 1000 }
    }
}

/// Checks whether `buf` starts with a whole frame, without allocating.
///
/// Returns `Ok(Some(total_len))` with the header included, `Ok(None)` when more bytes
/// are needed, or an error as soon as the header shows an unknown type (per `known`)
/// or a body longer than `limits.max_frame`.
pub fn check_frame(buf: &[u8], limits: &Limits, known: fn(u8) -> bool) -> Result<Option<usize>, DecodeError> {
    let Some(&ty) = buf.first() else {
        return Ok(None);
    };
    if !known(ty) {
        return Err(DecodeError::new(ErrorCode::UNKNOWN_FRAME_TYPE, "unknown frame type"));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len > limits.max_frame.min(MAX_FRAME_CEILING) {
        return Err(DecodeError::new(ErrorCode::OVERSIZE, "declared frame length exceeds the maximum"));
    }
    let total = HEADER_LEN + len as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// Writes a frame header with a placeholder length; returns the offset to patch.
pub(crate) fn begin(out: &mut Vec<u8>, ty: u8) -> usize {
    out.push(ty);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}

/// Patches the length written by [`begin`] now that the body is complete.
pub(crate) fn finish(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a `str8`. Panics if `s` is longer than 255 bytes: callers encode only
/// validated ids and messages truncated with [`truncate_str8`].
pub(crate) fn put_str8(out: &mut Vec<u8>, s: &str) {
    let len = u8::try_from(s.len()).expect("str8 field longer than 255 bytes");
    out.push(len);
    out.extend_from_slice(s.as_bytes());
}

/// Cuts `s` to at most 255 bytes on a char boundary, so it fits a `str8`.
pub fn truncate_str8(s: &str) -> &str {
    if s.len() <= 255 {
        return s;
    }
    let mut end = 255;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Validates an id: 1..=max bytes of UTF-8 with no control characters.
pub fn check_id(s: &str, max: usize) -> Result<(), DecodeError> {
    if s.is_empty() || s.len() > max || s.chars().any(char::is_control) {
        return Err(DecodeError::new(ErrorCode::BAD_ID, "id is empty, too long or has control characters"));
    }
    Ok(())
}

const SHORT: DecodeError = DecodeError::new(ErrorCode::BAD_FRAME, "frame body too short");

/// Bounds-checked reader over one frame body. Every read fails with `bad_frame` instead
/// of panicking when the body is too short.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(SHORT);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn str8(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.bytes(n)?)
            .map_err(|_| DecodeError::new(ErrorCode::BAD_FRAME, "text field is not UTF-8"))
    }

    pub(crate) fn id(&mut self, max: usize) -> Result<&'a str, DecodeError> {
        let s = self.str8()?;
        check_id(s, max)?;
        Ok(s)
    }

    /// The rest of the body (a payload).
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Fails if any bytes are left: fixed-layout frames must be exact.
    pub(crate) fn end(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::new(ErrorCode::BAD_FRAME, "trailing bytes after the last field"))
        }
    }
}

/// Splits a checked frame into its type byte and body.
pub(crate) fn split(frame: &[u8]) -> (u8, &[u8]) {
    (frame[0], &frame[HEADER_LEN..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: u8) -> bool {
        true
    }

    #[test]
    fn oversize_is_rejected_from_the_header_alone() {
        let limits = Limits { max_frame: 10, max_targets: 1 };
        let e = check_frame(&[1, 0, 0, 0, 11], &limits, any).unwrap_err();
        assert_eq!(e.code, ErrorCode::OVERSIZE);
        assert_eq!(check_frame(&[1, 0, 0, 0, 10], &limits, any).unwrap(), None);
        // A 4 GiB declared length is rejected, never allocated.
        let e = check_frame(&[1, 0xff, 0xff, 0xff, 0xff], &limits, any).unwrap_err();
        assert_eq!(e.code, ErrorCode::OVERSIZE);
    }

    #[test]
    fn unknown_type_is_rejected_from_the_first_byte() {
        let e = check_frame(&[9], &Limits::default(), |t| t == 1).unwrap_err();
        assert_eq!(e.code, ErrorCode::UNKNOWN_FRAME_TYPE);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let s = "é".repeat(200);
        let t = truncate_str8(&s);
        assert!(t.len() <= 255 && t.len().is_multiple_of(2));
        assert_eq!(truncate_str8("abc"), "abc");
    }

    #[test]
    fn ids_are_validated() {
        assert!(check_id("", 8).is_err());
        assert!(check_id("a\nb", 8).is_err());
        assert!(check_id("123456789", 8).is_err());
        assert!(check_id("dev-1", 8).is_ok());
    }
}
