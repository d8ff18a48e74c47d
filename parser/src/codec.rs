//! A bounded cursor for decoding, and a small writer for encoding.
//!
//! [`Reader`] never panics: every take returns `None` when the bytes run out,
//! and [`Reader::need`] turns that into a typed [`Error::Truncated`] that
//! names the structure and its absolute file offset.

use crate::error::{Error, Result, What};

/// A cursor over bytes that were read from absolute file offset `base`.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], base: u64) -> Self {
        Reader { buf, pos: 0, base }
    }

    /// Absolute file offset of the next byte.
    pub(crate) fn offset(&self) -> u64 {
        u64::try_from(self.pos)
            .ok()
            .and_then(|p| self.base.checked_add(p))
            .unwrap_or(u64::MAX)
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Some(out)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// Skip forward so that the position is a multiple of `align` relative
    /// to the start of the buffer.
    pub(crate) fn align(&mut self, align: usize) -> Option<()> {
        let rem = self.pos.checked_rem(align)?;
        if rem != 0 {
            self.take(align.checked_sub(rem)?)?;
        }
        Some(())
    }

    /// Wrap an `Option` from a take into a truncation error for `what`,
    /// reported at the offset where the structure starts.
    pub(crate) fn need<T>(v: Option<T>, what: What, at: u64) -> Result<T> {
        v.ok_or(Error::Truncated { what, offset: at })
    }
}

/// Turns a failed take into [`Error::Truncated`] for one structure.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Need(pub What, pub u64);

impl Need {
    pub(crate) fn get<T>(self, v: Option<T>) -> Result<T> {
        Reader::need(v, self.0, self.1)
    }
}

/// A growable big-endian writer used by the encoders.
#[derive(Debug, Default, Clone)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// Zero-pad to a multiple of `align`.
    pub(crate) fn pad_to(&mut self, align: usize) -> &mut Self {
        while self.buf.len().checked_rem(align).unwrap_or(0) != 0 {
            self.buf.push(0);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_never_panics() {
        let mut r = Reader::new(&[0, 1, 2], 100);
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.offset(), 102);
        assert_eq!(r.u32(), None);
        assert_eq!(r.u8(), Some(2));
        assert_eq!(r.u8(), None);
        assert_eq!(r.take(usize::MAX), None);
        let e = Reader::need::<u8>(None, What::Header, 7).unwrap_err();
        assert_eq!((e.code(), e.offset()), ("truncated", 7));
    }
}
