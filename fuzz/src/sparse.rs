//! An in-memory [`Source`] that behaves like a sparse file: every
//! all-zero [`BLOCK`]-byte block is a hole (`SEEK_DATA`/`SEEK_HOLE` skip
//! it, it occupies no storage), the rest is data. Holes read as zeros,
//! exactly as a sparse file's do, so everything read through it must be
//! what the same bytes in a plain slice give; only what depends on the
//! storage may differ (`qemu-img map`'s zero flag for data in a hole of
//! a metadata-preallocated image, the conversion's hole detection).

use std::io;

use qcow2_guard::Source;

/// The file system's block: holes are whole blocks.
pub const BLOCK: usize = 4096;

/// Bytes with the holes of a sparse file.
#[derive(Debug, Clone)]
pub struct Sparse {
    bytes: Vec<u8>,
    /// Per block, whether it holds data (a non-zero byte).
    data: Vec<bool>,
}

impl Sparse {
    /// `bytes` as a sparse file.
    pub fn new(bytes: Vec<u8>) -> Sparse {
        let data = bytes
            .chunks(BLOCK)
            .map(|b| b.iter().any(|&x| x != 0))
            .collect();
        Sparse { bytes, data }
    }

    fn len64(&self) -> u64 {
        self.bytes.len() as u64
    }
}

impl Source for Sparse {
    fn len(&self) -> u64 {
        self.len64()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.bytes.as_slice().read_exact_at(offset, buf)
    }

    fn data_run(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.len64();
        if offset >= len {
            return Ok(None);
        }
        let first = offset as usize / BLOCK;
        let Some(s) = (first..self.data.len()).find(|&b| self.data[b]) else {
            return Ok(None);
        };
        let e = (s..self.data.len())
            .find(|&b| !self.data[b])
            .unwrap_or(self.data.len());
        let start = ((s * BLOCK) as u64).max(offset);
        let end = ((e * BLOCK) as u64).min(len);
        Ok(Some((start, end)))
    }

    fn allocated_bytes(&self) -> Option<u64> {
        Some((self.data.iter().filter(|&&d| d).count() * BLOCK) as u64)
    }
}
