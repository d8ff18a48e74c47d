//! L1 and L2 table entries, standard (64-bit) and extended (128-bit).
//!
//! Decoding an entry yields what the guest sees for that cluster
//! ([`Cluster`]) and fails, with the entry's file offset, on anything a
//! reader must not act on: reserved bits, unaligned host offsets, offsets
//! at or above 2^56, compressed entries with the copied flag or a subcluster
//! bitmap, and subcluster bitmaps that are self-contradictory.

use crate::bounds::{host_pointer, is_aligned};
use crate::compressed::{Descriptor, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::error::{Error, Result, What};
use crate::header::Geometry;
use crate::source::span;

/// Bits 9..55: host offset of an L2 table or data cluster.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero: 0..8 and 56..62.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 descriptor bits that must be zero: 1..8 and 56..61.
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Bit 0 of a standard L2 entry: reads as zeros (v3, standard L2 only).
pub const OFLAG_ZERO: u64 = 1;

/// Whether the standard L2 entry `raw` sets bit 0, the zero flag, which
/// a version 2 image reserves (QEMU reads it as "zero" all the same, and
/// so does [`Cluster::decode`]; `check` reports it). Compressed entries
/// and extended L2 entries have no zero flag.
pub fn zero_flag_in_v2(raw: u64, g: &Geometry) -> bool {
    !g.extended_l2 && raw & OFLAG_ZERO != 0 && raw & OFLAG_COMPRESSED == 0
}

/// A decoded L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry {
    /// Host offset of the L2 table, or `None` when unallocated.
    pub l2_offset: Option<u64>,
    /// Bit 63: the L2 table's refcount is exactly one.
    pub copied: bool,
}

impl L1Entry {
    /// Decode the L1 entry `raw` found at file offset `at`.
    pub fn decode(raw: u64, at: u64, g: &Geometry) -> Result<L1Entry> {
        let l2_offset = host_pointer(
            What::L1Entry,
            raw,
            at,
            L1_RESERVED_MASK,
            OFFSET_MASK,
            g.cluster_size,
        )?;
        // Flag bits with offset 0: QEMU's read path calls the entry
        // unallocated, but `qemu-img check` takes every non-zero entry as
        // an L2 table at its offset and walks cluster 0 (the header) as
        // one, reporting corruption. The stricter side wins.
        if raw != 0 && l2_offset.is_none() {
            return Err(Error::MetadataOverlap {
                what: What::L1Entry,
                offset: at,
                target: 0,
                other: What::Header,
            });
        }
        Ok(L1Entry {
            l2_offset,
            copied: raw & OFLAG_COPIED != 0,
        })
    }

    /// Encode (for building images).
    pub fn encode(&self) -> u64 {
        self.l2_offset.unwrap_or(0) & OFFSET_MASK | if self.copied { OFLAG_COPIED } else { 0 }
    }
}

/// What one guest cluster maps to, from its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated: reads from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros. `host` is a preallocated cluster, if any.
    Zero {
        /// Host offset of the preallocated cluster; `None` when there is none.
        host: Option<u64>,
        /// Bit 63: the host cluster's refcount is exactly one.
        copied: bool,
    },
    /// Guest data at `host .. host + cluster_size`.
    Data {
        /// Host offset of the data cluster (cluster aligned).
        host: u64,
        /// Bit 63: the data cluster's refcount is exactly one.
        copied: bool,
    },
    /// Compressed guest data.
    Compressed(Descriptor),
    /// Extended L2: each of 32 subclusters is allocated (data at
    /// `host + i * subcluster_size`), zero, or unallocated.
    Subclusters {
        /// Host offset of the cluster, if any (required when `alloc` is non-zero).
        host: Option<u64>,
        /// Bit 63: the host cluster's refcount is exactly one.
        copied: bool,
        /// Bit i: subcluster i holds data.
        alloc: u32,
        /// Bit i: subcluster i reads as zeros.
        zero: u32,
    },
}

/// The state of one subcluster (or whole cluster without extended L2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    /// Read from the backing file, or zeros.
    Unallocated,
    /// Zeros.
    Zero,
    /// Data at this host offset.
    Data(u64),
    /// Compressed cluster (the whole cluster).
    Compressed(Descriptor),
}

impl Cluster {
    /// Decode the L2 entry `raw` (and its subcluster `bitmap` when the image
    /// has extended L2 entries) found at file offset `at`.
    ///
    /// Like QEMU, bit 0 means "zero" in v2 images too (`check` flags it).
    /// `data_file` says whether the image keeps its guest data in an
    /// external data file: offset 0 with the copied bit then means host
    /// offset 0, and a compressed cluster cannot exist.
    pub fn decode(
        raw: u64,
        bitmap: Option<u64>,
        at: u64,
        g: &Geometry,
        data_file: bool,
    ) -> Result<Cluster> {
        let copied = raw & OFLAG_COPIED != 0;
        if raw & OFLAG_COMPRESSED != 0 {
            if copied {
                return Err(Error::InvalidCompressedEntry {
                    offset: at,
                    reason: "compressed entry has the copied flag (bit 63) set",
                });
            }
            if bitmap.unwrap_or(0) != 0 {
                return Err(Error::InvalidCompressedEntry {
                    offset: at,
                    reason: "compressed entry has a non-zero subcluster bitmap",
                });
            }
            if data_file {
                return Err(Error::InvalidCompressedEntry {
                    offset: at,
                    reason: "compressed cluster in an image with an external data file",
                });
            }
            return Ok(Cluster::Compressed(Descriptor::decode(raw, g)));
        }
        // Bit 0 is the zero flag in standard entries; with extended L2 the
        // spec makes it reserved ("always 0"; the bitmap says what reads as
        // zero). QEMU ignores it there; we refuse it (SECURITY.md).
        let reserved = if bitmap.is_some() {
            L2_RESERVED_MASK | OFLAG_ZERO
        } else {
            L2_RESERVED_MASK
        };
        if raw & reserved != 0 {
            return Err(Error::ReservedBits {
                what: What::L2Entry,
                offset: at,
                value: raw,
            });
        }
        let off = raw & OFFSET_MASK;
        if !is_aligned(off, g.cluster_size) {
            return Err(Error::Unaligned {
                what: What::L2Entry,
                offset: at,
                value: off,
            });
        }
        let host = (off != 0 || (data_file && copied)).then_some(off);
        match bitmap {
            // The zero flag comes first, as in QEMU's
            // `qcow2_get_cluster_type`: offset 0 is then "no host
            // cluster", external data file or not.
            None => Ok(if raw & OFLAG_ZERO != 0 {
                Cluster::Zero {
                    host: (off != 0).then_some(off),
                    copied,
                }
            } else {
                match host {
                    None => Cluster::Unallocated,
                    Some(host) => Cluster::Data { host, copied },
                }
            }),
            Some(bits) => {
                let alloc = u32::try_from(bits & 0xffff_ffff).unwrap_or(0);
                let zero = u32::try_from(bits >> 32).unwrap_or(0);
                let bad = |reason| Error::InvalidSubclusterBitmap {
                    offset: at.saturating_add(8),
                    bitmap: bits,
                    reason,
                };
                if alloc & zero != 0 {
                    return Err(bad("a subcluster is marked both allocated and zero"));
                }
                if alloc != 0 && host.is_none() {
                    return Err(bad("subclusters allocated without a host cluster"));
                }
                Ok(Cluster::Subclusters {
                    host,
                    copied,
                    alloc,
                    zero,
                })
            }
        }
    }

    /// In an image with an external data file (plain or raw), a
    /// cluster's data sits at its own guest offset in that file: QEMU
    /// reads any other host offset as EIO and marks the image corrupt
    /// (`qcow2_get_host_offset`, measured with qemu-img 10.0.2; `qemu-img
    /// check` does not look). `guest` is the guest offset of the cluster
    /// that the entry at `at` maps. Entries without a host offset pass.
    pub fn check_data_file_host(&self, guest: u64, at: u64) -> Result<()> {
        let host = match *self {
            Cluster::Data { host, .. }
            | Cluster::Zero {
                host: Some(host), ..
            }
            | Cluster::Subclusters {
                host: Some(host), ..
            } => host,
            _ => return Ok(()),
        };
        if host == guest {
            Ok(())
        } else {
            Err(Error::DataFileOffsetMismatch {
                offset: at,
                host,
                guest,
            })
        }
    }

    /// In an image with an external data file of `file_len` bytes and a
    /// virtual disk of `disk` bytes: every guest byte the cluster holds
    /// (its [`Cluster::data_extent`], which starts at its guest offset,
    /// see [`Cluster::check_data_file_host`]) up to the end of the disk
    /// must lie in the data file, else `past_eof` (what: data file) at
    /// `at`. QEMU reads zeros past the data file's end and `qemu-img
    /// check` does not look (measured with qemu-img 10.0.2): we refuse
    /// those bytes as lost, as for the image file (SECURITY.md). Bytes
    /// past the end of the disk are never read: `qemu-img resize
    /// --shrink` truncates the data file to the new size inside a mapped
    /// cluster. Reads, the audit and conversion all call this one rule.
    pub fn check_data_file_reach(
        &self,
        g: &Geometry,
        disk: u64,
        file_len: u64,
        at: u64,
    ) -> Result<()> {
        let Some((host, len)) = self.data_extent(g) else {
            return Ok(());
        };
        let reach = len.min(disk.saturating_sub(host));
        if reach == 0 {
            return Ok(());
        }
        span(What::DataFile, at, host, reach, file_len).map(|_| ())
    }

    /// Encode as (L2 entry, bitmap) for building images.
    pub fn encode(&self, g: &Geometry) -> (u64, u64) {
        let copied_bit = |c: bool| if c { OFLAG_COPIED } else { 0 };
        match *self {
            Cluster::Unallocated => (0, 0),
            Cluster::Zero { host, copied } => {
                if g.extended_l2 {
                    (host.unwrap_or(0) | copied_bit(copied), 0xffff_ffff << 32)
                } else {
                    (host.unwrap_or(0) | copied_bit(copied) | OFLAG_ZERO, 0)
                }
            }
            Cluster::Data { host, copied } => (
                host | copied_bit(copied),
                if g.extended_l2 { 0xffff_ffff } else { 0 },
            ),
            Cluster::Compressed(d) => (d.encode(g), 0),
            Cluster::Subclusters {
                host,
                copied,
                alloc,
                zero,
            } => (
                host.unwrap_or(0) | copied_bit(copied),
                u64::from(alloc) | u64::from(zero) << 32,
            ),
        }
    }

    /// The host cluster this entry holds a reference to, if any (for
    /// refcount accounting and overlap checks; compressed clusters may span
    /// two and are handled through their [`Descriptor`]).
    pub fn host_cluster(&self) -> Option<u64> {
        match *self {
            Cluster::Zero { host, .. } | Cluster::Subclusters { host, .. } => host,
            Cluster::Data { host, .. } => Some(host),
            Cluster::Unallocated | Cluster::Compressed(_) => None,
        }
    }

    /// The host bytes a guest read of this cluster reaches, as (start,
    /// length): the whole cluster for standard data, and up to the end of
    /// the last allocated subcluster for extended entries (QEMU allocates
    /// subclusters lazily and does not extend the file past the last one it
    /// wrote). `None` when no host data is read (unallocated, zero,
    /// compressed: see [`Descriptor`] for those ranges).
    pub fn data_extent(&self, g: &Geometry) -> Option<(u64, u64)> {
        match *self {
            Cluster::Data { host, .. } => Some((host, g.cluster_size)),
            Cluster::Subclusters {
                host: Some(host),
                alloc,
                ..
            } if alloc != 0 => {
                let used = u32::BITS.saturating_sub(alloc.leading_zeros());
                Some((host, u64::from(used).saturating_mul(g.subcluster_size)))
            }
            _ => None,
        }
    }

    /// Whether bit 63 is set.
    pub fn copied(&self) -> bool {
        match *self {
            Cluster::Zero { copied, .. }
            | Cluster::Data { copied, .. }
            | Cluster::Subclusters { copied, .. } => copied,
            Cluster::Unallocated | Cluster::Compressed(_) => false,
        }
    }

    /// The state of subcluster `index` (0 for images without extended L2).
    pub fn subcluster(&self, index: u32, g: &Geometry) -> SubclusterState {
        match *self {
            Cluster::Unallocated => SubclusterState::Unallocated,
            Cluster::Zero { .. } => SubclusterState::Zero,
            Cluster::Data { host, .. } => SubclusterState::Data(host),
            Cluster::Compressed(d) => SubclusterState::Compressed(d),
            Cluster::Subclusters {
                host, alloc, zero, ..
            } => {
                let bit = 1u32.checked_shl(index).unwrap_or(0);
                if alloc & bit != 0 {
                    let start = u64::from(index).saturating_mul(g.subcluster_size);
                    SubclusterState::Data(host.unwrap_or(0).saturating_add(start))
                } else if zero & bit != 0 {
                    SubclusterState::Zero
                } else {
                    SubclusterState::Unallocated
                }
            }
        }
    }
}

/// One L2 table, read whole (one cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Table {
    /// File offset of the table.
    pub offset: u64,
    words: Vec<u64>,
    extended: bool,
}

impl L2Table {
    /// Wrap the big-endian words of a table read from `offset`.
    pub fn new(offset: u64, bytes: &[u8], g: &Geometry) -> L2Table {
        L2Table {
            offset,
            words: crate::source::be_u64s(bytes),
            extended: g.extended_l2,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        if self.extended {
            self.words.len() / 2
        } else {
            self.words.len()
        }
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry in order, as [`L2Table::raw`] gives it.
    pub fn entries(&self) -> impl Iterator<Item = (u64, Option<u64>, u64)> + '_ {
        let per = if self.extended { 2 } else { 1 };
        let step = 8u64.saturating_mul(per);
        self.words
            .chunks_exact(usize::try_from(per).unwrap_or(1))
            .zip((0u64..).map(move |i| self.offset.saturating_add(i.saturating_mul(step))))
            .map(|(w, at)| {
                let raw = w.first().copied().unwrap_or(0);
                (raw, w.get(1).copied(), at)
            })
    }

    /// The raw entry, its bitmap (extended L2) and its file offset.
    #[inline]
    pub fn raw(&self, index: usize) -> Option<(u64, Option<u64>, u64)> {
        let per = if self.extended { 2 } else { 1 };
        let word = index.checked_mul(per)?;
        let raw = *self.words.get(word)?;
        let bitmap = if self.extended {
            Some(*self.words.get(word.checked_add(1)?)?)
        } else {
            None
        };
        let at = u64::try_from(word)
            .ok()?
            .checked_mul(8)?
            .checked_add(self.offset)?;
        Some((raw, bitmap, at))
    }

    /// Decode entry `index`.
    pub fn entry(&self, index: usize, g: &Geometry, data_file: bool) -> Option<Result<Cluster>> {
        let (raw, bitmap, at) = self.raw(index)?;
        Some(Cluster::decode(raw, bitmap, at, g, data_file))
    }

    /// Bytes held in memory.
    pub fn memory(&self) -> usize {
        self.words.len().saturating_mul(8)
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn l1_entries() {
        let g = Geometry::new(16, false, 4);
        let e = L1Entry::decode(0x8000_0000_0003_0000, 40, &g).unwrap();
        assert_eq!(
            e,
            L1Entry {
                l2_offset: Some(0x30000),
                copied: true
            }
        );
        assert_eq!(e.encode(), 0x8000_0000_0003_0000);
        assert_eq!(
            L1Entry::decode(0x30001, 8, &g).unwrap_err().code(),
            "reserved_bits"
        );
        assert_eq!(
            L1Entry::decode(1 << 60, 8, &g).unwrap_err().code(),
            "reserved_bits"
        );
        assert_eq!(
            L1Entry::decode(0x30200, 8, &g).unwrap_err().code(),
            "unaligned"
        );
    }

    #[test]
    fn standard_l2_entries() {
        let g = Geometry::new(16, false, 4);
        let d = |raw| Cluster::decode(raw, None, 0x100, &g, false);
        assert_eq!(d(0).unwrap(), Cluster::Unallocated);
        assert_eq!(
            d(1).unwrap(),
            Cluster::Zero {
                host: None,
                copied: false
            }
        );
        assert_eq!(
            d(OFLAG_COPIED | 0x50000).unwrap(),
            Cluster::Data {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(d(0x50002).unwrap_err().code(), "reserved_bits");
        assert_eq!(d(0x50200).unwrap_err().code(), "unaligned");
        assert_eq!(
            d(OFLAG_COPIED | OFLAG_COMPRESSED).unwrap_err().code(),
            "invalid_compressed_entry"
        );
        // Offset 0 with the copied bit means host offset 0 only with a data file.
        assert_eq!(d(OFLAG_COPIED).unwrap(), Cluster::Unallocated);
        assert_eq!(
            Cluster::decode(OFLAG_COPIED, None, 0, &g, true).unwrap(),
            Cluster::Data {
                host: 0,
                copied: true
            }
        );
        // No compressed clusters with a data file.
        assert!(matches!(
            d(OFLAG_COMPRESSED | 0x50000),
            Ok(Cluster::Compressed(_))
        ));
        assert_eq!(
            Cluster::decode(OFLAG_COMPRESSED | 0x50000, None, 0, &g, true)
                .unwrap_err()
                .code(),
            "invalid_compressed_entry"
        );
    }

    #[test]
    fn extended_l2_entries() {
        let g = Geometry::new(16, true, 4);
        let d = |raw, bm| Cluster::decode(raw, Some(bm), 0x100, &g, false);
        let c = d(0x50000, 0x0000_0002_0000_0001).unwrap();
        assert_eq!(c.subcluster(0, &g), SubclusterState::Data(0x50000));
        assert_eq!(c.subcluster(1, &g), SubclusterState::Zero);
        assert_eq!(c.subcluster(2, &g), SubclusterState::Unallocated);
        assert_eq!(
            d(0x50000, 0x0000_0001_0000_0001).unwrap_err().code(),
            "invalid_subcluster_bitmap"
        );
        assert_eq!(d(0, 1).unwrap_err().code(), "invalid_subcluster_bitmap");
        assert_eq!(
            d(OFLAG_COMPRESSED, 1).unwrap_err().code(),
            "invalid_compressed_entry"
        );
        assert_eq!(c.encode(&g), (0x50000, 0x0000_0002_0000_0001));
        // Reads reach up to the last allocated subcluster only.
        assert_eq!(c.data_extent(&g), Some((0x50000, 2048)));
        let top = d(0x50000, 0x8000_0000).unwrap();
        assert_eq!(top.data_extent(&g), Some((0x50000, 0x10000)));
        assert_eq!(
            d(0x50000, 0xffff_ffff_0000_0000).unwrap().data_extent(&g),
            None
        );
    }
}
