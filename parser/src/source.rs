//! Positional reads over an image file or an in-memory byte slice.
//!
//! A [`Source`] knows its length up front and reads exact byte ranges at
//! absolute offsets. Everything above it goes through `span` and
//! `read_vec`, which check `offset + len <= file length` with checked
//! arithmetic *before* anything is allocated, so a header that claims a
//! terabyte table costs nothing but an error.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result, What};
use crate::header::CompressionType;

/// Random-access, read-only bytes of known length.
///
/// Implementations must be safe to share between threads: reads take
/// `&self` and carry their own offset.
pub trait Source: Send + Sync {
    /// Total length in bytes.
    fn len(&self) -> u64;

    /// Whether the source holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fill `buf` from `offset`. Fails (never zero-fills) when the range is
    /// not entirely inside the source.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// The next run of data at or after `offset`, for sources that know
    /// where their holes are (sparse files): `Some((start, end))` with
    /// `offset <= start < end <= len`, or `None` when nothing at or after
    /// `offset` holds data. Holes read as zeros, so a reader may skip
    /// them. The default knows no holes: everything is data.
    fn data_run(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.len();
        Ok((offset < len).then_some((offset, len)))
    }

    /// What [`crate::compressed::decompress`] gave for the `len` bytes at
    /// `offset` (`kind`, one cluster of `cluster_size` bytes), for sources
    /// that already decompressed them: a streamed inspection
    /// ([`crate::stream`]) verifies each compressed payload as it passes
    /// and keeps only the outcome. `None` (the default): not known, the
    /// reader reads the bytes and decompresses them itself.
    fn payload_outcome(
        &self,
        kind: CompressionType,
        offset: u64,
        len: u64,
        cluster_size: u64,
    ) -> Option<std::result::Result<(), String>> {
        let _ = (kind, offset, len, cluster_size);
        None
    }

    /// Bytes the source occupies on its storage (a sparse file's
    /// allocated blocks), when known. The default does not know.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
}

/// A file opened read-only, with its length taken once at open time.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    /// Open `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::new(File::open(path)?)
    }

    /// Wrap an already opened file.
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }
}

impl FileSource {
    /// Fail when the file is now shorter than when it was opened.
    fn still_whole(&self) -> io::Result<()> {
        let now = self.file.metadata()?.len();
        if now < self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file shrank from {} to {now} bytes while being read",
                    self.len
                ),
            ));
        }
        Ok(())
    }
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = u64::try_from(buf.len())
            .ok()
            .and_then(|n| offset.checked_add(n));
        match end {
            Some(end) if end <= self.len => self.file.read_exact_at(buf, offset),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            )),
        }
    }

    /// `lseek(SEEK_DATA)` then `lseek(SEEK_HOLE)` (reads are positional,
    /// so moving the file offset disturbs nothing), clipped to the length
    /// taken at open time. A file system without hole information reports
    /// everything as data.
    fn data_run(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        use rustix::fs::{seek, SeekFrom};
        if offset >= self.len {
            return Ok(None);
        }
        let start = match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(s) => s.max(offset),
            Err(rustix::io::Errno::NXIO) => {
                // No data up to the end: a hole at the end of the file, or
                // the file shrank since it was opened (its tail would
                // then read as zeros instead of failing).
                self.still_whole()?;
                return Ok(None);
            }
            Err(_) => return Ok(Some((offset, self.len))),
        };
        if start >= self.len {
            return Ok(None);
        }
        let end = match seek(&self.file, SeekFrom::Hole(start)) {
            Ok(e) if e > start => e,
            _ => self.len,
        };
        if end < self.len {
            // A hole, or the end of a file that shrank.
            self.still_whole()?;
        }
        Ok(Some((start, end.min(self.len))))
    }

    /// `st_blocks * 512`, as QEMU's `bdrv_get_allocated_file_size`.
    fn allocated_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata().ok()?;
        Some(m.blocks().saturating_mul(512))
    }
}

fn slice_read(data: &[u8], offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let src = usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(buf.len())?))
        .and_then(|range| data.get(range))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the data",
            )
        })?;
    buf.copy_from_slice(src);
    Ok(())
}

fn slice_len(data: &[u8]) -> u64 {
    u64::try_from(data.len()).unwrap_or(u64::MAX)
}

impl Source for [u8] {
    fn len(&self) -> u64 {
        slice_len(self)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        slice_read(self, offset, buf)
    }
}

impl Source for Vec<u8> {
    fn len(&self) -> u64 {
        slice_len(self)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        slice_read(self, offset, buf)
    }
}

/// A reference or smart pointer to a source is that source: every method
/// forwards, the provided ones included (a wrapper that fell back to a
/// default would hide a streamed source's payload outcomes).
macro_rules! forward_source {
    ($($ptr:ty),*) => {$(
        impl<T: Source + ?Sized> Source for $ptr {
            fn len(&self) -> u64 {
                (**self).len()
            }
            fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
                (**self).read_exact_at(offset, buf)
            }
            fn data_run(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
                (**self).data_run(offset)
            }
            fn payload_outcome(
                &self,
                kind: CompressionType,
                offset: u64,
                len: u64,
                cluster_size: u64,
            ) -> Option<std::result::Result<(), String>> {
                (**self).payload_outcome(kind, offset, len, cluster_size)
            }
            fn allocated_bytes(&self) -> Option<u64> {
                (**self).allocated_bytes()
            }
        }
    )*};
}

forward_source!(&T, Arc<T>, Box<T>);

/// Check that `start .. start + len` lies inside a file of `file_len` bytes
/// and return its end. `field` is where the reference to it was found.
pub(crate) fn span(what: What, field: u64, start: u64, len: u64, file_len: u64) -> Result<u64> {
    // `let else`, not `ok_or`: this runs for every cluster read, and an
    // eagerly built error would be dropped each time.
    let Some(end) = start.checked_add(len) else {
        return Err(Error::Overflow {
            what,
            offset: field,
        });
    };
    if end > file_len {
        return Err(Error::PastEof {
            what,
            offset: field,
            start,
            len,
            file_len,
        });
    }
    Ok(end)
}

/// `count * size` in bytes, or an overflow error.
pub(crate) fn table_bytes(what: What, field: u64, count: u64, size: u64) -> Result<u64> {
    count.checked_mul(size).ok_or(Error::Overflow {
        what,
        offset: field,
    })
}

/// Read `len` bytes at `start` into a new buffer, after checking the range
/// against the file and `len` against `cap` (the caller's bound for this
/// structure).
pub(crate) fn read_vec<S: Source + ?Sized>(
    src: &S,
    what: What,
    field: u64,
    start: u64,
    len: u64,
    cap: u64,
) -> Result<Vec<u8>> {
    if len > cap {
        return Err(Error::LimitExceeded {
            what,
            offset: field,
            value: len,
            limit: cap,
        });
    }
    span(what, field, start, len, src.len())?;
    let n = usize::try_from(len).map_err(|_| Error::Overflow {
        what,
        offset: field,
    })?;
    let mut buf = vec![0u8; n];
    read_into(src, start, &mut buf)?;
    Ok(buf)
}

/// Fill `buf` from `start`, mapping I/O failures to [`Error::Io`].
pub(crate) fn read_into<S: Source + ?Sized>(src: &S, start: u64, buf: &mut [u8]) -> Result<()> {
    src.read_exact_at(start, buf).map_err(|source| Error::Io {
        offset: start,
        len: u64::try_from(buf.len()).unwrap_or(u64::MAX),
        source,
    })
}

/// Decode big-endian u64 words from a byte buffer (trailing bytes ignored).
pub(crate) fn be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_be_bytes(w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_reads_are_bounded() {
        let data = vec![1u8, 2, 3, 4];
        let mut b = [0u8; 2];
        data.read_exact_at(2, &mut b).unwrap();
        assert_eq!(b, [3, 4]);
        assert!(data.read_exact_at(3, &mut b).is_err());
        assert!(data.read_exact_at(u64::MAX, &mut b).is_err());
    }

    #[test]
    fn read_vec_checks_before_allocating() {
        let data = vec![0u8; 16];
        let e = read_vec(&data, What::L1Table, 40, 8, 16, 1 << 20).unwrap_err();
        assert_eq!(e.code(), "past_eof");
        assert_eq!(e.offset(), 40);
        let e = read_vec(&data, What::L1Table, 40, u64::MAX, 16, u64::MAX).unwrap_err();
        assert_eq!(e.code(), "offset_overflow");
        let e = read_vec(&data, What::L1Table, 40, 0, 1 << 40, 1 << 20).unwrap_err();
        assert_eq!(e.code(), "limit_exceeded");
    }
}
