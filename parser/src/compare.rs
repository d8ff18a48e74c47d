//! Comparing the guest data of two images, as `qemu-img compare` does:
//! the first 512-byte sector whose contents differ, a size mismatch
//! (the longer image must read as zeros past the shorter one's end), and
//! in strict mode the first place where the block status differs.
//!
//! Memory stays bounded: ranges both images report as zero are skipped
//! without reading, the rest is read in chunks of at most [`CHUNK`]
//! bytes. Each side is a [`MapLayer`] (for the block status: a qcow2
//! image's tables, a raw file's holes) and a [`Backing`] (for its guest
//! data) over the same image.

use crate::error::{Error, Result, What};
use crate::qemu_map::{entry_at, MapEntry, MapLayer};
use crate::read::Backing;

/// Most bytes read from each side at a time (qemu-img's `IO_BUF_SIZE`).
pub const CHUNK: u64 = 2 << 20;
/// Granularity of the reported offset (qemu-img reports the sector).
pub const SECTOR: u64 = 512;

/// One image to compare.
#[derive(Clone, Copy)]
pub struct Side<'a> {
    /// Its block status. A qcow2 image with a backing image attached
    /// ([`crate::Image::set_backing`]) says so
    /// ([`MapLayer::reads_below`]): its unallocated ranges are then read
    /// and compared, not taken for zeros.
    pub map: &'a dyn MapLayer,
    /// Its guest data.
    pub data: &'a dyn Backing,
}

impl std::fmt::Debug for Side<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Side")
            .field("size", &self.data.size())
            .finish_non_exhaustive()
    }
}

/// How two images compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Same guest data (a longer image reads as zeros past the other's end).
    Identical,
    /// The sector at this guest offset differs (or, past the shorter
    /// image's end, is not zero).
    ContentMismatch(u64),
    /// Strict mode: the sizes differ.
    SizeMismatch,
    /// Strict mode: the block status differs from this guest offset on.
    StatusMismatch(u64),
}

/// The result of [`compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    /// Whether the guest sizes differ (qemu-img warns once the common part
    /// compared equal).
    pub size_mismatch: bool,
    /// What was found.
    pub outcome: Outcome,
    /// The size of the shorter image.
    pub common_size: u64,
}

impl Comparison {
    /// Whether the sizes differ and the common part compared equal: when
    /// qemu-img prints "Warning: Image size mismatch!" (before looking at
    /// the rest of the longer image).
    pub fn common_part_equal_sizes_differ(&self) -> bool {
        self.size_mismatch
            && match self.outcome {
                Outcome::Identical => true,
                Outcome::ContentMismatch(at) => at >= self.common_size,
                Outcome::SizeMismatch | Outcome::StatusMismatch(_) => false,
            }
    }
}

/// The block status flags strict mode compares (what qemu-img's
/// `bdrv_block_status_above` returns): allocated, zero, data, compressed,
/// offset known, and whether the run reaches the end of the image.
fn strict_flags(e: &MapEntry, size: u64) -> (bool, bool, bool, bool, bool, bool) {
    (
        e.present,
        e.zero,
        e.data,
        e.compressed,
        e.offset.is_some(),
        e.end() >= size,
    )
}

/// Why a comparison stopped: qemu-img tells the two apart by exit status
/// (3 and 4).
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// Finding out what a range maps to failed.
    #[error("cannot get the block status: {0}")]
    Status(Error),
    /// Reading guest data failed.
    #[error("cannot read guest data: {0}")]
    Read(Error),
}

/// Compare the guest data of `a` and `b` (see the module documentation).
pub fn compare(
    a: Side<'_>,
    b: Side<'_>,
    strict: bool,
) -> std::result::Result<Comparison, CompareError> {
    let (size_a, size_b) = (a.data.size(), b.data.size());
    let size_mismatch = size_a != size_b;
    let common = size_a.min(size_b);
    let done = |outcome| {
        Ok(Comparison {
            size_mismatch,
            outcome,
            common_size: common,
        })
    };
    if strict && size_mismatch {
        return done(Outcome::SizeMismatch);
    }
    let mut bufs = Buffers::default();
    let mut pos = 0u64;
    while pos < common {
        let ea = entry_at(&[a.map], pos, common).map_err(CompareError::Status)?;
        let eb = entry_at(&[b.map], pos, common).map_err(CompareError::Status)?;
        let end = ea
            .end()
            .min(eb.end())
            .min(common)
            .max(pos.saturating_add(1));
        if strict && strict_flags(&ea, size_a) != strict_flags(&eb, size_b) {
            return done(Outcome::StatusMismatch(pos));
        }
        if !(ea.zero && eb.zero) {
            let diff = bufs.first_difference(Some(a.data), Some(b.data), pos, end);
            if let Some(at) = diff.map_err(CompareError::Read)? {
                return done(Outcome::ContentMismatch(at));
            }
        }
        pos = end;
    }
    // Past the shorter image: the longer one must read as zeros.
    let longer = if size_a > size_b { a } else { b };
    let size = longer.data.size();
    while pos < size {
        let e = entry_at(&[longer.map], pos, size).map_err(CompareError::Status)?;
        let end = e.end().min(size).max(pos.saturating_add(1));
        if !e.zero {
            let diff = bufs.first_difference(Some(longer.data), None, pos, end);
            if let Some(at) = diff.map_err(CompareError::Read)? {
                return done(Outcome::ContentMismatch(at));
            }
        }
        pos = end;
    }
    done(Outcome::Identical)
}

/// The two read buffers, at most [`CHUNK`] bytes each.
#[derive(Default)]
struct Buffers {
    a: Vec<u8>,
    b: Vec<u8>,
}

impl Buffers {
    /// The sector of the first byte in `start .. end` where `a` and `b`
    /// differ (`None` for `b` means zeros).
    fn first_difference(
        &mut self,
        a: Option<&dyn Backing>,
        b: Option<&dyn Backing>,
        start: u64,
        end: u64,
    ) -> Result<Option<u64>> {
        let mut pos = start;
        while pos < end {
            let n = end.saturating_sub(pos).min(CHUNK);
            let len = usize::try_from(n).map_err(|_| Error::Overflow {
                what: What::VirtualDisk,
                offset: pos,
            })?;
            fill(&mut self.a, a, pos, len)?;
            fill(&mut self.b, b, pos, len)?;
            let diff = self
                .a
                .iter()
                .zip(self.b.iter())
                .position(|(x, y)| x != y)
                .and_then(|i| u64::try_from(i).ok());
            if let Some(i) = diff {
                let at = pos.saturating_add(i);
                // qemu-img compares sector by sector from the range start.
                let sector = at
                    .saturating_sub(start)
                    .checked_div(SECTOR)
                    .unwrap_or(0)
                    .saturating_mul(SECTOR);
                return Ok(Some(start.saturating_add(sector)));
            }
            pos = pos.saturating_add(n);
        }
        Ok(None)
    }
}

/// `buf` resized to `len` and filled from `src` at `pos` (zeros without one).
fn fill(buf: &mut Vec<u8>, src: Option<&dyn Backing>, pos: u64, len: usize) -> Result<()> {
    buf.clear();
    buf.resize(len, 0);
    match src {
        Some(s) => s.read_backing(pos, buf),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::RawBacking;

    fn raw_cmp(a: Vec<u8>, b: Vec<u8>, strict: bool) -> Comparison {
        let (ra, rb) = (RawBacking(a), RawBacking(b));
        compare(
            Side {
                map: &ra,
                data: &ra,
            },
            Side {
                map: &rb,
                data: &rb,
            },
            strict,
        )
        .unwrap()
    }

    #[test]
    fn first_differing_sector() {
        let a = vec![1u8; 8192];
        let mut b = a.clone();
        assert_eq!(
            raw_cmp(a.clone(), b.clone(), false).outcome,
            Outcome::Identical
        );
        b[5000] = 2;
        let c = raw_cmp(a, b, false);
        assert_eq!(c.outcome, Outcome::ContentMismatch(4608));
        assert!(!c.size_mismatch);
    }

    /// An image read through its backing image: its unallocated ranges
    /// are the backing image's bytes, not zeros, though its own tables
    /// hold nothing there (the side's map is the image alone). Before
    /// `MapLayer::reads_below`, both sides counted as zeros there and the
    /// comparison with an all-zero disk said "identical".
    #[test]
    fn an_image_reading_its_backing_image_is_not_zeros_where_unallocated() {
        use crate::build::{GuestCluster, ImageModel};
        use crate::qemu_map::Qcow2Layer;
        use std::sync::Arc;
        let built = ImageModel {
            cluster_bits: 12,
            clusters: vec![GuestCluster::Unallocated, GuestCluster::Zero],
            ..ImageModel::default()
        }
        .build()
        .unwrap();
        let mut top = crate::Image::open(built.bytes.as_slice()).unwrap();
        top.set_backing(Arc::new(RawBacking(vec![7u8; 8192])));
        let layer = Qcow2Layer::new(&top);
        let zeros = RawBacking(vec![0u8; 8192]);
        let sevens = RawBacking([vec![7u8; 4096], vec![0u8; 4096]].concat());
        let with = |other: &RawBacking<Vec<u8>>| {
            compare(
                Side {
                    map: &layer,
                    data: &top,
                },
                Side {
                    map: other,
                    data: other,
                },
                false,
            )
            .unwrap()
            .outcome
        };
        assert_eq!(with(&zeros), Outcome::ContentMismatch(0));
        assert_eq!(with(&sevens), Outcome::Identical);
        // Past the shorter side's end too: the longer one is read.
        let short = RawBacking(vec![0u8; 0]);
        assert_eq!(with(&short), Outcome::ContentMismatch(0));
    }

    #[test]
    fn sizes() {
        let a = vec![1u8; 4096];
        let mut b = a.clone();
        b.resize(8192, 0);
        let c = raw_cmp(a.clone(), b.clone(), false);
        assert_eq!((c.size_mismatch, c.outcome), (true, Outcome::Identical));
        assert_eq!(
            raw_cmp(a.clone(), b.clone(), true).outcome,
            Outcome::SizeMismatch
        );
        b[6000] = 1;
        assert_eq!(raw_cmp(b, a, false).outcome, Outcome::ContentMismatch(5632));
    }
}
