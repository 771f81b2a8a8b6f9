//! A checked binary record: the encoding of the state a running device hands to the
//! process that takes it over (`outboard vsock --take-over`).
//!
//! The format is deliberately plain: fields one after the other, integers
//! little-endian (the only byte order this crate compiles for), byte strings as a
//! `u32` length then the bytes. There are no field names and no optional fields: each
//! record type documents its fields in order and starts with a version number, and a
//! reader that meets a version it does not know refuses the whole record. Every read
//! is bounds-checked ([`RecordError::Short`]), every length is checked against the
//! bytes that are left before anything is allocated, and [`RecordReader::finish`]
//! refuses bytes left over, so a record that is cut short, padded or of another layout
//! never half-loads.
//!
//! ```
//! use outboard_protocol::record::{RecordReader, RecordWriter};
//!
//! let mut w = RecordWriter::new();
//! w.u32(1).u64(3).bytes(b"hello");
//! let bytes = w.into_bytes()?;
//!
//! let mut r = RecordReader::new(&bytes);
//! assert_eq!(r.u32("version")?, 1);
//! assert_eq!(r.u64("guest cid")?, 3);
//! assert_eq!(r.bytes("greeting", 64)?, b"hello");
//! r.finish()?;
//! # Ok::<(), outboard_protocol::record::RecordError>(())
//! ```

extern crate std;

use std::string::String;
use std::vec::Vec;

/// Why a record could not be read.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// A value is not one the record type allows.
    #[error("state record: {field} has the value {value}, which is not allowed: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The value read.
        value: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// Bytes are left after the last field.
    #[error("state record: {left} bytes after the last field")]
    Long {
        /// How many.
        left: usize,
    },
    /// The record ends inside a field.
    #[error("state record: it ends inside {field} ({need} bytes needed, {left} left)")]
    Short {
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes that were left.
        left: usize,
    },
    /// A length is larger than the record type allows.
    #[error("state record: {field} is {len} bytes long, more than the {max} allowed")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The length read.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A record of a version (or of a kind) this reader does not know.
    #[error("state record: {what} version {found} is not one this build reads (it reads {known})")]
    Version {
        /// What the record is.
        what: &'static str,
        /// The version found.
        found: u32,
        /// The versions this build reads, in words.
        known: String,
    },
}

/// Builds a record (see the [module docs](self)).
#[derive(Debug, Default, Clone)]
pub struct RecordWriter {
    buf: Vec<u8>,
    /// A length or count that did not fit in a `u32` (the record is refused).
    overflow: Option<usize>,
}

impl RecordWriter {
    /// An empty record.
    pub fn new() -> Self {
        RecordWriter::default()
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a `bool` as one byte (0 or 1).
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Appends a `u16`, little-endian.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a `u32`, little-endian.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a `u64`, little-endian.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a byte string: its length as a `u32`, then the bytes. A string of
    /// 4 GiB or more makes [`RecordWriter::into_bytes`] fail.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.count(v.len());
        self.buf.extend_from_slice(v);
        self
    }

    /// Appends bytes of a length the record type fixes (no length prefix).
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// A count of items to follow, as a `u32`. A count that does not fit makes
    /// [`RecordWriter::into_bytes`] fail.
    pub fn count(&mut self, n: usize) -> &mut Self {
        match u32::try_from(n) {
            Ok(n) => self.u32(n),
            Err(_) => {
                self.overflow.get_or_insert(n);
                self.u32(u32::MAX)
            }
        }
    }

    /// The record's bytes so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The record; fails if a length or count did not fit in a `u32`.
    pub fn into_bytes(self) -> Result<Vec<u8>, RecordError> {
        match self.overflow {
            None => Ok(self.buf),
            Some(len) => Err(RecordError::TooLong {
                field: "a length or count",
                len,
                max: u32::MAX as usize,
            }),
        }
    }
}

/// Reads a record field by field (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct RecordReader<'a> {
    buf: &'a [u8],
}

impl<'a> RecordReader<'a> {
    /// A reader of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        RecordReader { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(RecordError::Short {
                field,
                need: n,
                left: self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], RecordError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    /// Reads a byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, RecordError> {
        Ok(self.array::<1>(field)?[0])
    }

    /// Reads a `bool` (a byte that must be 0 or 1).
    pub fn bool(&mut self, field: &'static str) -> Result<bool, RecordError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(RecordError::Invalid {
                field,
                value: u64::from(v),
                why: "a flag is 0 or 1",
            }),
        }
    }

    /// Reads a `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    /// Reads a `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// Reads a `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// Reads `n` bytes of a length the record type fixes.
    pub fn raw(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], RecordError> {
        self.take(n, field)
    }

    /// Reads a byte string of at most `max` bytes.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], RecordError> {
        let len = self.u32(field)? as usize;
        if len > max {
            return Err(RecordError::TooLong { field, len, max });
        }
        self.take(len, field)
    }

    /// Reads a count of items of at least `item_size` bytes each (at most `max`
    /// items): a count the remaining bytes cannot hold is refused before the caller
    /// allocates for it.
    pub fn count(
        &mut self,
        field: &'static str,
        max: usize,
        item_size: usize,
    ) -> Result<usize, RecordError> {
        let n = self.u32(field)? as usize;
        if n > max {
            return Err(RecordError::TooLong { field, len: n, max });
        }
        let need = n.saturating_mul(item_size);
        if need > self.buf.len() {
            return Err(RecordError::Short {
                field,
                need,
                left: self.buf.len(),
            });
        }
        Ok(n)
    }

    /// Checks that every byte was read.
    pub fn finish(self) -> Result<(), RecordError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(RecordError::Long {
                left: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut w = RecordWriter::new();
        w.u8(7)
            .bool(true)
            .u16(0xbeef)
            .u32(0xdead_beef)
            .u64(u64::MAX - 1)
            .bytes(b"abc")
            .count(2);
        let b = w.into_bytes().unwrap();
        let mut r = RecordReader::new(&b);
        assert_eq!(r.u8("a"), Ok(7));
        assert_eq!(r.bool("b"), Ok(true));
        assert_eq!(r.u16("c"), Ok(0xbeef));
        assert_eq!(r.u32("d"), Ok(0xdead_beef));
        assert_eq!(r.u64("e"), Ok(u64::MAX - 1));
        assert_eq!(r.bytes("f", 3), Ok(&b"abc"[..]));
        assert_eq!(r.u32("g"), Ok(2));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn short_long_and_oversized_fields_are_refused() {
        let mut r = RecordReader::new(&[1, 2, 3]);
        assert_eq!(
            r.u32("port"),
            Err(RecordError::Short {
                field: "port",
                need: 4,
                left: 3
            })
        );
        let r = RecordReader::new(&[1]);
        assert_eq!(r.finish(), Err(RecordError::Long { left: 1 }));
        let mut w = RecordWriter::new();
        w.bytes(&[0; 10]);
        let b = w.into_bytes().unwrap();
        assert_eq!(
            RecordReader::new(&b).bytes("buf", 9),
            Err(RecordError::TooLong {
                field: "buf",
                len: 10,
                max: 9
            })
        );
        // A length that claims more than is there.
        let mut r = RecordReader::new(&[5, 0, 0, 0, 1]);
        assert!(matches!(
            r.bytes("buf", 100),
            Err(RecordError::Short { .. })
        ));
        // A count the bytes cannot hold is refused before anything is allocated.
        let mut r = RecordReader::new(&[0xff, 0xff, 0, 0, 1, 2]);
        assert!(matches!(
            r.count("conns", 1 << 20, 8),
            Err(RecordError::Short { .. })
        ));
        let mut r = RecordReader::new(&[2]);
        assert!(matches!(r.bool("flag"), Err(RecordError::Invalid { .. })));
    }
}
