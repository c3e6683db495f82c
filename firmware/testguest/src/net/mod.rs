//! The test guest's network stack: [`wire`] (addresses, checksums, frame
//! builders and parsers), [`stack`] (address configuration, neighbour
//! resolution, the background duties of a host: ARP / NDP / echo answers),
//! [`tcp`] (a one-exchange TCP client). The test modes that use it are in
//! `nettests.rs` and `imds.rs`.
pub mod stack;
pub mod tcp;
pub mod wire;

pub use stack::{Fail, Stack};

/// `core::fmt::Write` into a byte buffer (output beyond it is dropped and
/// `overflow` set).
pub struct ByteWriter<'a> {
    pub buf: &'a mut [u8],
    pub len: usize,
    pub overflow: bool,
}

impl<'a> ByteWriter<'a> {
    pub fn new(buf: &'a mut [u8]) -> ByteWriter<'a> {
        ByteWriter { buf, len: 0, overflow: false }
    }

    pub fn push(&mut self, b: &[u8]) {
        let k = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + k].copy_from_slice(&b[..k]);
        self.len += k;
        self.overflow |= k < b.len();
    }
}

impl core::fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

/// Bytes shown on one console line: printable ASCII as is, `\n`, `\r`, `\t`
/// and `\\` escaped, anything else as `\xHH`.
pub struct Escaped<'a>(pub &'a [u8]);

impl core::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use core::fmt::Write;
        for &b in self.0 {
            match b {
                b'\n' => f.write_str("\\n")?,
                b'\r' => f.write_str("\\r")?,
                b'\t' => f.write_str("\\t")?,
                b'\\' => f.write_str("\\\\")?,
                0x20..=0x7e => f.write_char(b as char)?,
                _ => write!(f, "\\x{b:02x}")?,
            }
        }
        Ok(())
    }
}
