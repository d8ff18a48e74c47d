//! The fixed qcow2 header (versions 2 and 3) and the geometry derived from it.
//!
//! [`Header::decode`] only turns bytes into fields; [`Header::validate`]
//! applies every check QEMU makes at open time plus the stricter ones a
//! hardened reader needs (tables against the file length), and returns the
//! [`Geometry`]: the derived sizes every other module uses.

use crate::bounds::{bound, table_check};
use crate::codec::{Need, Reader, Writer};
use crate::error::{Error, Result, What};
use crate::limits::Limits;
use crate::qemu;
use crate::source::span;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Whether `src` starts with [`MAGIC`]: how a file handed in as a backing
/// image (or compared) is told apart from a raw one.
pub fn has_magic<S: crate::Source + ?Sized>(src: &S) -> bool {
    let mut magic = [0u8; 4];
    src.read_exact_at(0, &mut magic).is_ok() && u32::from_be_bytes(magic) == MAGIC
}
/// Length of a version 2 header.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Length of the header QEMU writes today (with compression_type and padding).
pub const V3_DEFAULT_HEADER_LENGTH: u32 = 112;

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: QEMU found corruption; open read-only only.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression_type field is in use.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended (128-bit) L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this reader understands.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Every autoclear bit this reader understands.
pub const AUTOCLEAR_KNOWN: u64 = 0x3;

/// Header field offsets, for error reporting.
pub mod field {
    /// `magic` (u32): `QFI\xfb`.
    pub const MAGIC: u64 = 0;
    /// `version` (u32): 2 or 3.
    pub const VERSION: u64 = 4;
    /// `backing_file_offset` (u64): where the backing file name is; 0 for none.
    pub const BACKING_FILE_OFFSET: u64 = 8;
    /// `backing_file_size` (u32): length of the backing file name.
    pub const BACKING_FILE_SIZE: u64 = 16;
    /// `cluster_bits` (u32): log2 of the cluster size.
    pub const CLUSTER_BITS: u64 = 20;
    /// `size` (u64): virtual disk size in bytes.
    pub const SIZE: u64 = 24;
    /// `crypt_method` (u32): 0 none, 1 AES, 2 LUKS.
    pub const CRYPT_METHOD: u64 = 32;
    /// `l1_size` (u32): entries in the active L1 table.
    pub const L1_SIZE: u64 = 36;
    /// `l1_table_offset` (u64).
    pub const L1_TABLE_OFFSET: u64 = 40;
    /// `refcount_table_offset` (u64).
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    /// `refcount_table_clusters` (u32): refcount table size in clusters.
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    /// `nb_snapshots` (u32).
    pub const NB_SNAPSHOTS: u64 = 60;
    /// `snapshots_offset` (u64): the snapshot table.
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    /// `incompatible_features` (u64, v3).
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    /// `compatible_features` (u64, v3).
    pub const COMPATIBLE_FEATURES: u64 = 80;
    /// `autoclear_features` (u64, v3).
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    /// `refcount_order` (u32, v3): log2 of the refcount width in bits.
    pub const REFCOUNT_ORDER: u64 = 96;
    /// `header_length` (u32, v3).
    pub const HEADER_LENGTH: u64 = 100;
    /// `compression_type` (u8, v3 with header_length > 104).
    pub const COMPRESSION_TYPE: u64 = 104;
}

/// Encryption method (header field `crypt_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptMethod {
    /// Not encrypted.
    None,
    /// Legacy AES-CBC (insecure; QEMU only reads it for data liberation).
    Aes,
    /// LUKS, with its header in the full disk encryption extension.
    Luks,
}

/// Compression algorithm for compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (QEMU writes it with a 4 KiB window; distances are
    /// checked against the one-cluster output, as zlib does).
    Deflate,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses.
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Every field of the fixed header, as stored (big-endian decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3 once validated.
    pub version: u32,
    /// File offset of the backing file name; 0 when there is none.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes (not NUL terminated).
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21 once validated).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 (none), 1 (AES) or 2 (LUKS); see [`Header::crypt`].
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// File offset of the active L1 table.
    pub l1_table_offset: u64,
    /// File offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// v3 only (0 for v2).
    pub incompatible_features: u64,
    /// v3 only (0 for v2).
    pub compatible_features: u64,
    /// v3 only (0 for v2).
    pub autoclear_features: u64,
    /// v3 only (4 for v2).
    pub refcount_order: u32,
    /// v3 only (72 for v2).
    pub header_length: u32,
    /// Byte 104, present when header_length > 104 (0 otherwise).
    pub compression_type: u8,
}

impl Header {
    /// Decode the header from the first bytes of the file. No semantic
    /// checks beyond the magic and enough bytes to read every field.
    pub fn decode(bytes: &[u8]) -> Result<Header> {
        let mut r = Reader::new(bytes, 0);
        let t = Need(What::Header, 0);
        let magic = t.get(r.u32())?;
        if magic != MAGIC {
            return Err(Error::BadMagic { found: magic });
        }
        let mut h = Header {
            version: t.get(r.u32())?,
            backing_file_offset: t.get(r.u64())?,
            backing_file_size: t.get(r.u32())?,
            cluster_bits: t.get(r.u32())?,
            size: t.get(r.u64())?,
            crypt_method: t.get(r.u32())?,
            l1_size: t.get(r.u32())?,
            l1_table_offset: t.get(r.u64())?,
            refcount_table_offset: t.get(r.u64())?,
            refcount_table_clusters: t.get(r.u32())?,
            nb_snapshots: t.get(r.u32())?,
            snapshots_offset: t.get(r.u64())?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: 0,
        };
        if h.version >= 3 {
            h.incompatible_features = t.get(r.u64())?;
            h.compatible_features = t.get(r.u64())?;
            h.autoclear_features = t.get(r.u64())?;
            h.refcount_order = t.get(r.u32())?;
            h.header_length = t.get(r.u32())?;
            if h.header_length > V3_MIN_HEADER_LENGTH {
                h.compression_type = t.get(r.u8())?;
            }
        }
        Ok(h)
    }

    /// Encode the header (header_length bytes, at most 2 MiB; 72 for v2).
    /// Used to build test and fuzz images; decode(encode(h)) == h.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(MAGIC)
            .u32(self.version)
            .u64(self.backing_file_offset)
            .u32(self.backing_file_size)
            .u32(self.cluster_bits)
            .u64(self.size)
            .u32(self.crypt_method)
            .u32(self.l1_size)
            .u64(self.l1_table_offset)
            .u64(self.refcount_table_offset)
            .u32(self.refcount_table_clusters)
            .u32(self.nb_snapshots)
            .u64(self.snapshots_offset);
        if self.version >= 3 {
            w.u64(self.incompatible_features)
                .u64(self.compatible_features)
                .u64(self.autoclear_features)
                .u32(self.refcount_order)
                .u32(self.header_length);
            if self.header_length > V3_MIN_HEADER_LENGTH {
                w.u8(self.compression_type);
            }
            // Pad to header_length, but never past the largest cluster: a
            // decoded hostile header may claim 4 GiB.
            let max = 1u32 << qemu::MAX_CLUSTER_BITS;
            let len = usize::try_from(self.header_length.min(max)).unwrap_or(0);
            if w.buf.len() < len {
                w.buf.resize(len, 0);
            }
        }
        w.buf
    }

    /// The header's own length in the file (72 for v2).
    pub fn length(&self) -> u64 {
        u64::from(self.header_length)
    }

    /// Encryption method, if known.
    pub fn crypt(&self) -> Option<CryptMethod> {
        match self.crypt_method {
            0 => Some(CryptMethod::None),
            1 => Some(CryptMethod::Aes),
            2 => Some(CryptMethod::Luks),
            _ => None,
        }
    }

    /// Compression type, if known.
    pub fn compression(&self) -> Option<CompressionType> {
        match self.compression_type {
            0 => Some(CompressionType::Deflate),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }

    /// Whether the image uses extended (128-bit) L2 entries.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Whether the image is marked dirty (incompatible bit 0): its
    /// refcounts may be stale (lazy refcounts).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// Whether the image names a backing file.
    pub fn has_backing_file(&self) -> bool {
        self.backing_file_offset != 0
    }

    /// Check every field, alone and against the file length and `limits`.
    /// Extension-dependent checks live in [`crate::extensions`].
    pub fn validate(&self, file_len: u64, limits: &Limits) -> Result<Geometry> {
        if self.version != 2 && self.version != 3 {
            return Err(Error::UnsupportedVersion {
                offset: field::VERSION,
                version: self.version,
            });
        }
        if !(qemu::MIN_CLUSTER_BITS..=qemu::MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Error::InvalidClusterBits {
                offset: field::CLUSTER_BITS,
                bits: self.cluster_bits,
            });
        }
        let cluster_size = 1u64 << self.cluster_bits;
        if self.version >= 3 {
            let len = self.header_length;
            let reason = if len < V3_MIN_HEADER_LENGTH {
                Some("shorter than 104 bytes")
            } else if !len.is_multiple_of(8) {
                Some("not a multiple of 8")
            } else if u64::from(len) > cluster_size {
                Some("larger than one cluster")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(Error::InvalidHeaderLength {
                    offset: field::HEADER_LENGTH,
                    length: len,
                    reason,
                });
            }
        }
        if self.refcount_order > 6 {
            return Err(Error::InvalidRefcountOrder {
                offset: field::REFCOUNT_ORDER,
                order: self.refcount_order,
            });
        }
        if self.compression().is_none() {
            return Err(Error::UnknownCompressionType {
                offset: field::COMPRESSION_TYPE,
                value: self.compression_type,
            });
        }
        let bit3 = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        if bit3 != (self.compression_type != 0) {
            return Err(Error::CompressionTypeMismatch {
                offset: field::COMPRESSION_TYPE,
                value: self.compression_type,
            });
        }
        let extended_l2 = self.extended_l2();
        if extended_l2 && self.cluster_bits < qemu::MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(Error::ExtendedL2ClusterTooSmall {
                offset: field::CLUSTER_BITS,
                bits: self.cluster_bits,
            });
        }
        if self.crypt().is_none() {
            return Err(Error::UnknownCryptMethod {
                offset: field::CRYPT_METHOD,
                method: self.crypt_method,
            });
        }
        if self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 && !self.has_data_file() {
            return Err(Error::DataFileRawWithoutDataFile {
                offset: field::AUTOCLEAR_FEATURES,
            });
        }
        self.validate_backing_name(cluster_size, file_len, limits)?;

        let geometry = Geometry::new(self.cluster_bits, extended_l2, self.refcount_order);

        // Virtual size and the L1 table that must map it.
        if self.size > qemu::MAX_VIRTUAL_SIZE {
            return Err(Error::VirtualSizeTooLarge {
                offset: field::SIZE,
                size: self.size,
            });
        }
        let needed = geometry.l1_entries_for(self.size);
        if needed > u64::from(i32::MAX.unsigned_abs()) {
            return Err(Error::VirtualSizeTooLarge {
                offset: field::SIZE,
                size: self.size,
            });
        }
        let l1_size = u64::from(self.l1_size);
        table_check(
            What::L1Table,
            field::L1_SIZE,
            field::L1_TABLE_OFFSET,
            self.l1_table_offset,
            l1_size,
            8,
            qemu::MAX_L1_BYTES,
            limits.max_l1_entries.saturating_mul(8),
            cluster_size,
            file_len,
        )?;
        if l1_size < needed {
            return Err(Error::L1TooSmall {
                offset: field::L1_SIZE,
                l1_size,
                needed,
            });
        }

        // Refcount table: it must exist, and is counted in clusters.
        if self.refcount_table_clusters == 0 {
            return Err(Error::MissingRefcountTable {
                offset: field::REFCOUNT_TABLE_CLUSTERS,
            });
        }
        table_check(
            What::RefcountTable,
            field::REFCOUNT_TABLE_CLUSTERS,
            field::REFCOUNT_TABLE_OFFSET,
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters),
            cluster_size,
            qemu::MAX_REFCOUNT_TABLE_BYTES,
            limits.max_refcount_table_bytes,
            cluster_size,
            file_len,
        )?;

        // Snapshot table: at least 40 bytes per entry must be in the file.
        let nb = u64::from(self.nb_snapshots);
        bound(
            What::SnapshotTable,
            field::NB_SNAPSHOTS,
            nb,
            qemu::MAX_SNAPSHOTS,
            limits.max_snapshots,
        )?;
        table_check(
            What::SnapshotTable,
            field::NB_SNAPSHOTS,
            field::SNAPSHOTS_OFFSET,
            self.snapshots_offset,
            nb,
            crate::snapshot::FIXED_ENTRY_BYTES,
            qemu::MAX_SNAPSHOT_TABLE_BYTES,
            limits.max_snapshot_table_bytes,
            cluster_size,
            file_len,
        )?;
        Ok(geometry)
    }

    fn validate_backing_name(
        &self,
        cluster_size: u64,
        file_len: u64,
        limits: &Limits,
    ) -> Result<()> {
        if !self.has_backing_file() {
            return Ok(());
        }
        let start = self.backing_file_offset;
        let len = u64::from(self.backing_file_size);
        let bad = |reason| Error::InvalidBackingFile {
            offset: field::BACKING_FILE_OFFSET,
            start,
            len,
            reason,
        };
        if start < self.length() {
            return Err(bad("starts inside the header"));
        }
        bound(
            What::BackingFileName,
            field::BACKING_FILE_SIZE,
            len,
            qemu::MAX_BACKING_FILE_NAME,
            limits.max_backing_file_name,
        )?;
        match start.checked_add(len) {
            Some(end) if end <= cluster_size => {}
            _ => return Err(bad("not inside the first cluster")),
        }
        span(
            What::BackingFileName,
            field::BACKING_FILE_OFFSET,
            start,
            len,
            file_len,
        )?;
        Ok(())
    }
}

/// Sizes derived from a validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Whether L2 entries are 128-bit with subcluster bitmaps.
    pub extended_l2: bool,
    /// Bytes per L2 entry (8 or 16).
    pub l2_entry_bytes: u64,
    /// log2 of the number of entries in one L2 table.
    pub l2_bits: u32,
    /// Entries in one L2 table.
    pub l2_entries: u64,
    /// Subclusters per cluster (32 with extended L2, else 1).
    pub subclusters: u64,
    /// Subcluster size in bytes (the cluster size without extended L2).
    pub subcluster_size: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Refcount entries in one refcount block.
    pub refcount_block_entries: u64,
}

impl Geometry {
    /// Derive the geometry. Callers must have checked cluster_bits in 9..=21
    /// (>= 14 with extended L2) and refcount_order <= 6; out-of-range values
    /// are clamped rather than trusted.
    pub fn new(cluster_bits: u32, extended_l2: bool, refcount_order: u32) -> Geometry {
        let cluster_bits = cluster_bits.clamp(qemu::MIN_CLUSTER_BITS, qemu::MAX_CLUSTER_BITS);
        let refcount_order = refcount_order.min(6);
        let cluster_size = 1u64 << cluster_bits;
        let (entry_shift, subcluster_shift) = if extended_l2 { (4, 5) } else { (3, 0) };
        let l2_bits = cluster_bits.saturating_sub(entry_shift);
        let refcount_bits = 1u32 << refcount_order;
        Geometry {
            cluster_bits,
            cluster_size,
            extended_l2,
            l2_entry_bytes: 1 << entry_shift,
            l2_bits,
            l2_entries: 1 << l2_bits,
            subclusters: 1 << subcluster_shift,
            subcluster_size: cluster_size >> subcluster_shift,
            refcount_order,
            refcount_bits,
            // cluster_size * 8 / refcount_bits, as shifts.
            refcount_block_entries: 1u64
                << cluster_bits
                    .saturating_add(3)
                    .saturating_sub(refcount_order),
        }
    }

    /// log2 of the guest bytes mapped by one L2 table (at most 21 + 18).
    pub fn l2_span_bits(&self) -> u32 {
        self.cluster_bits.saturating_add(self.l2_bits)
    }

    /// Guest bytes mapped by one L2 table.
    pub fn l2_span(&self) -> u64 {
        1u64 << self.l2_span_bits()
    }

    /// L1 entries needed to map `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let shift = self.l2_span_bits();
        let full = size >> shift;
        if size & (1u64 << shift).wrapping_sub(1) != 0 {
            full.saturating_add(1)
        } else {
            full
        }
    }

    /// Offset of `offset` within its cluster.
    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & self.cluster_size.wrapping_sub(1)
    }

    /// Start of the cluster holding `offset`.
    pub fn cluster_start(&self, offset: u64) -> u64 {
        offset & !self.cluster_size.wrapping_sub(1)
    }

    /// Host cluster index of `offset`.
    pub fn cluster_index(&self, offset: u64) -> u64 {
        offset >> self.cluster_bits
    }

    /// Number of clusters needed to hold `bytes` (rounded up).
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        let full = bytes >> self.cluster_bits;
        if self.offset_in_cluster(bytes) != 0 {
            full.saturating_add(1)
        } else {
            full
        }
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
        }
    }

    #[test]
    fn encode_caps_a_hostile_header_length() {
        // Fuzzer find: a decoded header_length of 0xffffffff made encode
        // pad 4 GiB.
        let h = Header {
            header_length: u32::MAX,
            ..sample()
        };
        let bytes = h.encode();
        assert_eq!(bytes.len(), 1 << qemu::MAX_CLUSTER_BITS);
        assert_eq!(Header::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let bytes = h.encode();
        assert_eq!(bytes.len(), 112);
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        let mut v2 = sample();
        v2.version = 2;
        v2.header_length = 72;
        let bytes = v2.encode();
        assert_eq!(bytes.len(), 72);
        assert_eq!(Header::decode(&bytes).unwrap(), v2);
    }

    #[test]
    fn geometry() {
        let g = Geometry::new(16, false, 4);
        assert_eq!(g.l2_entries, 8192);
        assert_eq!(g.l2_span(), 512 << 20);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for((1 << 30) + 1), 3);
        assert_eq!(g.refcount_block_entries, 32768);
        let x = Geometry::new(14, true, 0);
        assert_eq!((x.l2_entries, x.subcluster_size), (1024, 512));
        assert_eq!(x.refcount_block_entries, 16384 * 8);
        assert_eq!(Geometry::new(9, false, 6).refcount_block_entries, 64);
    }

    #[test]
    fn validate_catches_each_field() {
        let ok = sample();
        let len = 0x40000;
        ok.validate(len, &Limits::default()).unwrap();
        type Case = (fn(&mut Header), &'static str, u64);
        let cases: Vec<Case> = vec![
            (|h| h.version = 4, "unsupported_version", 4),
            (|h| h.cluster_bits = 22, "invalid_cluster_bits", 20),
            (|h| h.cluster_bits = 8, "invalid_cluster_bits", 20),
            (|h| h.header_length = 100, "invalid_header_length", 100),
            (|h| h.header_length = 108, "invalid_header_length", 100),
            (|h| h.refcount_order = 7, "invalid_refcount_order", 96),
            (|h| h.compression_type = 2, "unknown_compression_type", 104),
            (|h| h.compression_type = 1, "compression_type_mismatch", 104),
            (|h| h.crypt_method = 3, "unknown_crypt_method", 32),
            (|h| h.l1_size = 1, "l1_too_small", 36),
            (|h| h.l1_table_offset = 0x30001, "unaligned", 40),
            (|h| h.l1_table_offset = 0x40000, "past_eof", 40),
            (|h| h.l1_size = (4 << 20) + 1, "too_large", 36),
            (
                |h| h.refcount_table_clusters = 0,
                "missing_refcount_table",
                56,
            ),
            (|h| h.refcount_table_clusters = 129, "too_large", 56),
            (|h| h.nb_snapshots = 70000, "too_large", 60),
            (
                |h| {
                    h.nb_snapshots = 1;
                    h.snapshots_offset = 0x40000
                },
                "past_eof",
                64,
            ),
            (
                |h| h.autoclear_features = 2,
                "data_file_raw_without_data_file",
                88,
            ),
            (
                |h| {
                    h.incompatible_features = INCOMPAT_EXTL2;
                    h.cluster_bits = 13
                },
                "extended_l2_cluster_too_small",
                20,
            ),
            (
                |h| {
                    h.backing_file_offset = 0x70;
                    h.backing_file_size = 1024
                },
                "too_large",
                16,
            ),
            (
                |h| {
                    h.backing_file_offset = 0x10;
                    h.backing_file_size = 8
                },
                "invalid_backing_file",
                8,
            ),
            (
                |h| {
                    h.backing_file_offset = 0xfff0;
                    h.backing_file_size = 32
                },
                "invalid_backing_file",
                8,
            ),
            (|h| h.size = u64::MAX, "virtual_size_too_large", 24),
        ];
        for (edit, code, offset) in cases {
            let mut h = sample();
            edit(&mut h);
            let e = h.validate(len, &Limits::default()).unwrap_err();
            assert_eq!((e.code(), e.offset()), (code, offset), "{h:?}: {e}");
        }
    }
}
