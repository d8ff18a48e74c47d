//! The one error type of the crate.
//!
//! Every variant names the on-disk structure it concerns, carries the byte
//! offset in the image file that an auditor should look at (the field or
//! table entry holding the bad value), and maps to a stable snake_case
//! [`Error::code`] that tools and tests can match on.

use std::fmt;

/// The on-disk structure an error or finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum What {
    /// The fixed qcow2 header.
    Header,
    /// A header extension.
    HeaderExtension,
    /// The backing file name stored after the header.
    BackingFileName,
    /// The active L1 table.
    L1Table,
    /// One entry of an L1 table.
    L1Entry,
    /// An L2 table.
    L2Table,
    /// One entry of an L2 table.
    L2Entry,
    /// A standard (uncompressed) data cluster.
    DataCluster,
    /// A compressed cluster descriptor or its payload.
    CompressedCluster,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// The L1 table of an internal snapshot.
    SnapshotL1Table,
    /// The bitmap directory.
    BitmapDirectory,
    /// A bitmap table.
    BitmapTable,
    /// A bitmap data cluster.
    BitmapData,
    /// The full disk encryption header area.
    CryptoHeader,
    /// The virtual disk (guest address space).
    VirtualDisk,
    /// The external data file.
    DataFile,
}

impl What {
    /// A short, stable, human-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            What::Header => "header",
            What::HeaderExtension => "header extension",
            What::BackingFileName => "backing file name",
            What::L1Table => "L1 table",
            What::L1Entry => "L1 entry",
            What::L2Table => "L2 table",
            What::L2Entry => "L2 entry",
            What::DataCluster => "data cluster",
            What::CompressedCluster => "compressed cluster",
            What::RefcountTable => "refcount table",
            What::RefcountBlock => "refcount block",
            What::SnapshotTable => "snapshot table",
            What::SnapshotL1Table => "snapshot L1 table",
            What::BitmapDirectory => "bitmap directory",
            What::BitmapTable => "bitmap table",
            What::BitmapData => "bitmap data",
            What::CryptoHeader => "encryption header",
            What::VirtualDisk => "virtual disk",
            What::DataFile => "external data file",
        }
    }
}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong while decoding an image.
///
/// `offset` is always a byte offset in the image file, except for
/// [`Error::OutOfVirtualBounds`] and an [`Error::Overflow`] about
/// [`What::VirtualDisk`], where it is a guest offset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the underlying file failed.
    #[error("I/O error reading {len} bytes at {offset:#x}: {source}")]
    Io {
        /// File offset of the failed read.
        offset: u64,
        /// Bytes requested.
        len: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the qcow2 magic.
    #[error("not a qcow2 image: magic is {found:#010x}, expected 0x514649fb")]
    BadMagic {
        /// The first four bytes, big-endian.
        found: u32,
    },
    /// The file is shorter than the fixed header.
    #[error("file of {file_len} bytes is too short for a qcow2 header")]
    FileTooShort {
        /// Length of the file in bytes.
        file_len: u64,
    },
    /// A structure extends past the end of the file.
    #[error("{what} at {start:#x} (+{len:#x} bytes, referenced at {offset:#x}) runs past the end of the file at {file_len:#x}")]
    PastEof {
        /// The structure concerned.
        what: What,
        /// File offset of the field or entry that references the structure.
        offset: u64,
        /// File offset where the structure starts.
        start: u64,
        /// Its length in bytes.
        len: u64,
        /// Length of the file in bytes.
        file_len: u64,
    },
    /// A size or count exceeds what QEMU itself accepts.
    #[error("{what} at {offset:#x}: {value} exceeds QEMU's limit of {limit}")]
    TooLarge {
        /// The structure concerned.
        what: What,
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The size or count found.
        value: u64,
        /// QEMU's maximum for it.
        limit: u64,
    },
    /// A size or count exceeds a caller-supplied [`crate::Limits`] value.
    #[error("{what} at {offset:#x}: {value} exceeds the configured limit of {limit}")]
    LimitExceeded {
        /// The structure concerned.
        what: What,
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The size or count found.
        value: u64,
        /// The caller's maximum for it.
        limit: u64,
    },
    /// The bytes an opened image holds would exceed the caller's total
    /// [`crate::Limits::max_total_bytes`], although `what` is within its
    /// own limit.
    #[error(
        "{what} at {offset:#x}: {value} more bytes would bring the image's allocations to {total}, over the configured total of {limit}"
    )]
    TotalLimitExceeded {
        /// The structure whose allocation tipped the total over.
        what: What,
        /// File offset of the field holding its size or location.
        offset: u64,
        /// Bytes it needs.
        value: u64,
        /// The total with it.
        total: u64,
        /// The caller's total ([`crate::Limits::max_total_bytes`]).
        limit: u64,
    },
    /// An offset + length computation overflows 64 bits.
    #[error("{what} at {offset:#x}: offset/size arithmetic overflows")]
    Overflow {
        /// The structure concerned.
        what: What,
        /// File offset of the field holding the offset or size (a guest offset
        /// when `what` is [`What::VirtualDisk`]).
        offset: u64,
    },
    /// A host offset that must be cluster aligned is not.
    #[error("{what} at {offset:#x}: host offset {value:#x} is not cluster aligned")]
    Unaligned {
        /// The structure concerned.
        what: What,
        /// File offset of the field or entry holding the host offset.
        offset: u64,
        /// The unaligned host offset.
        value: u64,
    },
    /// Reserved bits are set.
    #[error("{what} at {offset:#x}: reserved bits set in {value:#018x}")]
    ReservedBits {
        /// The structure concerned.
        what: What,
        /// File offset of the field or entry.
        offset: u64,
        /// The whole raw value, reserved bits included.
        value: u64,
    },
    /// A structure ends before all its fields were read.
    #[error("{what} at {offset:#x} is truncated")]
    Truncated {
        /// The structure concerned.
        what: What,
        /// File offset where the structure starts.
        offset: u64,
    },
    /// Header version other than 2 or 3.
    #[error("unsupported qcow2 version {version} (field at {offset:#x})")]
    UnsupportedVersion {
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The version found.
        version: u32,
    },
    /// cluster_bits outside 9..=21.
    #[error("cluster_bits {bits} (field at {offset:#x}) is outside QEMU's range 9..=21")]
    InvalidClusterBits {
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The cluster_bits found.
        bits: u32,
    },
    /// Extended L2 entries need clusters of at least 16 KiB.
    #[error(
        "extended L2 entries need cluster_bits >= 14, image has {bits} (field at {offset:#x})"
    )]
    ExtendedL2ClusterTooSmall {
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The cluster_bits found.
        bits: u32,
    },
    /// header_length is too small, not a multiple of 8, or larger than a cluster.
    #[error("header_length {length} (field at {offset:#x}) is invalid: {reason}")]
    InvalidHeaderLength {
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The header_length found.
        length: u32,
        /// What exactly is wrong.
        reason: &'static str,
    },
    /// refcount_order above 6.
    #[error("refcount_order {order} (field at {offset:#x}) is invalid: must be at most 6")]
    InvalidRefcountOrder {
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The refcount_order found.
        order: u32,
    },
    /// crypt_method other than 0, 1 or 2.
    #[error("unknown encryption method {method} (field at {offset:#x})")]
    UnknownCryptMethod {
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The crypt_method found.
        method: u32,
    },
    /// compression_type other than 0 (deflate) or 1 (zstd).
    #[error("unknown compression type {value} (field at {offset:#x})")]
    UnknownCompressionType {
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The compression_type found.
        value: u8,
    },
    /// compression_type and incompatible bit 3 disagree.
    #[error(
        "compression type {value} disagrees with incompatible feature bit 3 (field at {offset:#x})"
    )]
    CompressionTypeMismatch {
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The compression_type found.
        value: u8,
    },
    /// The active L1 table cannot map the whole virtual disk.
    #[error(
        "L1 table has {l1_size} entries (field at {offset:#x}) but the virtual size needs {needed}"
    )]
    L1TooSmall {
        /// File offset of the field holding the bad value.
        offset: u64,
        /// Entries the L1 table has.
        l1_size: u64,
        /// Entries the virtual size needs.
        needed: u64,
    },
    /// The virtual size cannot be represented by any L1 table QEMU accepts.
    #[error("virtual size {size} (field at {offset:#x}) is too large for qcow2")]
    VirtualSizeTooLarge {
        /// File offset of the field holding the bad value.
        offset: u64,
        /// The virtual size found, in bytes.
        size: u64,
    },
    /// The refcount table has no clusters.
    #[error("image has no refcount table (field at {offset:#x})")]
    MissingRefcountTable {
        /// File offset of refcount_table_clusters.
        offset: u64,
    },
    /// The backing file name lies outside the first cluster or overlaps the header.
    #[error(
        "backing file name at {start:#x} (+{len} bytes, field at {offset:#x}) is invalid: {reason}"
    )]
    InvalidBackingFile {
        /// File offset of backing_file_offset.
        offset: u64,
        /// File offset of the name (backing_file_offset).
        start: u64,
        /// Length of the name (backing_file_size).
        len: u64,
        /// What exactly is wrong.
        reason: &'static str,
    },
    /// Autoclear bit 1 (raw external data) without incompatible bit 2.
    #[error("raw external data bit set without an external data file (field at {offset:#x})")]
    DataFileRawWithoutDataFile {
        /// File offset of autoclear_features.
        offset: u64,
    },
    /// LUKS encryption without the full disk encryption header extension.
    #[error("LUKS encryption without the encryption header extension (field at {offset:#x})")]
    MissingCryptoHeader {
        /// File offset of crypt_method.
        offset: u64,
    },
    /// A full disk encryption header extension on an image that is not LUKS.
    #[error("encryption header extension at {offset:#x} on an image that is not LUKS encrypted")]
    UnexpectedCryptoHeader {
        /// File offset of the extension's data.
        offset: u64,
    },
    /// A header extension runs past the end of the extension area.
    #[error("header extension {ext_type:#010x} at {offset:#x} with length {len} runs past the end of the extension area at {end:#x}")]
    ExtensionTooLarge {
        /// File offset of the extension's type field.
        offset: u64,
        /// The extension's type code.
        ext_type: u32,
        /// The length the extension claims.
        len: u32,
        /// File offset where the extension area ends.
        end: u64,
    },
    /// A known header extension appears twice.
    #[error("header extension {ext_type:#010x} at {offset:#x} appears more than once")]
    DuplicateExtension {
        /// File offset of the second occurrence.
        offset: u64,
        /// The extension's type code.
        ext_type: u32,
    },
    /// A known header extension has the wrong length.
    #[error("header extension {ext_type:#010x} at {offset:#x} has invalid length {len}: {reason}")]
    InvalidExtensionLength {
        /// File offset of the extension's type field.
        offset: u64,
        /// The extension's type code.
        ext_type: u32,
        /// The length found.
        len: u32,
        /// What exactly is wrong.
        reason: &'static str,
    },
    /// The bitmaps extension is inconsistent.
    #[error("bitmaps extension at {offset:#x} is invalid: {reason}")]
    InvalidBitmapsExtension {
        /// File offset of the extension's data.
        offset: u64,
        /// What exactly is wrong.
        reason: &'static str,
    },
    /// A snapshot table entry is malformed.
    #[error("snapshot table entry at {offset:#x} is invalid: {reason}")]
    InvalidSnapshot {
        /// File offset of the table entry.
        offset: u64,
        /// What exactly is wrong.
        reason: &'static str,
    },
    /// A bitmap directory entry is malformed.
    #[error("bitmap directory entry at {offset:#x} is invalid: {reason}")]
    InvalidBitmap {
        /// File offset of the directory entry.
        offset: u64,
        /// What exactly is wrong.
        reason: &'static str,
    },
    /// A compressed cluster descriptor has bits above 55 set in its offset.
    #[error("compressed cluster descriptor at {offset:#x}: host offset {host_offset:#x} uses bits above 55")]
    CompressedOffsetTooHigh {
        /// File offset of the L2 entry.
        offset: u64,
        /// The host offset decoded from the descriptor.
        host_offset: u64,
    },
    /// A compressed cluster's host range runs past the end of the file.
    #[error("compressed cluster descriptor at {offset:#x}: host range {start:#x}..{end:#x} runs past the end of the file at {file_len:#x}")]
    CompressedPastEof {
        /// File offset of the L2 entry.
        offset: u64,
        /// First host byte of the compressed data.
        start: u64,
        /// One past its last host byte.
        end: u64,
        /// Length of the file in bytes.
        file_len: u64,
    },
    /// A compressed cluster's host range is longer than QEMU ever writes.
    #[error("compressed cluster descriptor at {offset:#x}: span of {span} bytes exceeds the permitted {max} bytes (cluster size + 511)")]
    CompressedInflation {
        /// File offset of the L2 entry.
        offset: u64,
        /// Host bytes the descriptor covers.
        span: u64,
        /// The most QEMU writes: cluster size + 511.
        max: u64,
    },
    /// A compressed entry with the copied flag (bit 63) or a subcluster bitmap.
    #[error("compressed cluster descriptor at {offset:#x}: {reason}")]
    InvalidCompressedEntry {
        /// File offset of the L2 entry.
        offset: u64,
        /// What exactly is wrong.
        reason: &'static str,
    },
    /// A compressed payload did not decompress to exactly one cluster.
    #[error("compressed cluster for guest offset {guest_offset:#x} at host {offset:#x}: {reason}")]
    Decompress {
        /// File offset where the compressed data starts.
        offset: u64,
        /// Guest offset of the cluster.
        guest_offset: u64,
        /// What the decompressor reported.
        reason: String,
    },
    /// An extended L2 entry marks a subcluster both allocated and zero, or
    /// allocates subclusters without a host cluster.
    #[error(
        "extended L2 entry at {offset:#x}: invalid subcluster bitmap {bitmap:#018x}: {reason}"
    )]
    InvalidSubclusterBitmap {
        /// File offset of the bitmap (second half of the L2 entry).
        offset: u64,
        /// The raw 64-bit bitmap.
        bitmap: u64,
        /// What exactly is wrong.
        reason: &'static str,
    },
    /// A table entry points into another metadata structure.
    #[error("{what} at {offset:#x} points to {target:#x}, inside the {other}")]
    MetadataOverlap {
        /// The entry or table whose offset points there.
        what: What,
        /// File offset of the entry (or header field).
        offset: u64,
        /// The host offset it points to.
        target: u64,
        /// The metadata structure found there.
        other: What,
    },
    /// In an image with an external data file, an L2 entry whose host
    /// offset is not the guest offset of its cluster.
    #[error("L2 entry at {offset:#x} maps guest cluster {guest:#x} to host {host:#x} of the external data file; they must be equal")]
    DataFileOffsetMismatch {
        /// File offset of the L2 entry.
        offset: u64,
        /// The host offset it names.
        host: u64,
        /// The guest offset of its cluster.
        guest: u64,
    },
    /// Guest data lives in an external data file the caller did not supply.
    #[error(
        "image at {offset:#x} stores guest data in an external data file that was not supplied"
    )]
    DataFileRequired {
        /// File offset of the field that says so.
        offset: u64,
    },
    /// Guest data is encrypted and cannot be read.
    #[error("image is encrypted (field at {offset:#x}); guest data cannot be read")]
    Encrypted {
        /// File offset of crypt_method.
        offset: u64,
    },
    /// A guest read outside the virtual disk.
    #[error("guest range {offset:#x}+{len:#x} lies outside the virtual disk of {size} bytes")]
    OutOfVirtualBounds {
        /// Guest offset where the read starts.
        offset: u64,
        /// Bytes requested.
        len: u64,
        /// Virtual disk size (for [`crate::Image::read_extent`], the extent's
        /// length).
        size: u64,
    },
    /// The image uses incompatible features this reader cannot interpret.
    #[error("image uses unknown incompatible features {bits:#x} (field at {offset:#x})")]
    UnknownIncompatibleFeatures {
        /// File offset of incompatible_features.
        offset: u64,
        /// The unknown bits.
        bits: u64,
    },
}

impl Error {
    /// A stable snake_case identifier for the kind of problem.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io_error",
            Error::BadMagic { .. } => "bad_magic",
            Error::FileTooShort { .. } => "file_too_short",
            Error::PastEof { .. } => "past_eof",
            Error::TooLarge { .. } => "too_large",
            Error::LimitExceeded { .. } => "limit_exceeded",
            Error::TotalLimitExceeded { .. } => "total_limit_exceeded",
            Error::Overflow { .. } => "offset_overflow",
            Error::Unaligned { .. } => "unaligned",
            Error::ReservedBits { .. } => "reserved_bits",
            Error::Truncated { .. } => "truncated",
            Error::UnsupportedVersion { .. } => "unsupported_version",
            Error::InvalidClusterBits { .. } => "invalid_cluster_bits",
            Error::ExtendedL2ClusterTooSmall { .. } => "extended_l2_cluster_too_small",
            Error::InvalidHeaderLength { .. } => "invalid_header_length",
            Error::InvalidRefcountOrder { .. } => "invalid_refcount_order",
            Error::UnknownCryptMethod { .. } => "unknown_crypt_method",
            Error::UnknownCompressionType { .. } => "unknown_compression_type",
            Error::CompressionTypeMismatch { .. } => "compression_type_mismatch",
            Error::L1TooSmall { .. } => "l1_too_small",
            Error::VirtualSizeTooLarge { .. } => "virtual_size_too_large",
            Error::MissingRefcountTable { .. } => "missing_refcount_table",
            Error::InvalidBackingFile { .. } => "invalid_backing_file",
            Error::DataFileRawWithoutDataFile { .. } => "data_file_raw_without_data_file",
            Error::MissingCryptoHeader { .. } => "missing_crypto_header",
            Error::UnexpectedCryptoHeader { .. } => "unexpected_crypto_header",
            Error::ExtensionTooLarge { .. } => "extension_too_large",
            Error::DuplicateExtension { .. } => "duplicate_extension",
            Error::InvalidExtensionLength { .. } => "invalid_extension_length",
            Error::InvalidBitmapsExtension { .. } => "invalid_bitmaps_extension",
            Error::InvalidSnapshot { .. } => "invalid_snapshot",
            Error::InvalidBitmap { .. } => "invalid_bitmap",
            Error::CompressedOffsetTooHigh { .. } => "compressed_offset_too_high",
            Error::CompressedPastEof { .. } => "compressed_past_eof",
            Error::CompressedInflation { .. } => "compressed_inflation",
            Error::InvalidCompressedEntry { .. } => "invalid_compressed_entry",
            Error::Decompress { .. } => "decompress_failed",
            Error::InvalidSubclusterBitmap { .. } => "invalid_subcluster_bitmap",
            Error::MetadataOverlap { .. } => "metadata_overlap",
            Error::DataFileOffsetMismatch { .. } => "data_file_offset_mismatch",
            Error::DataFileRequired { .. } => "data_file_required",
            Error::Encrypted { .. } => "encrypted",
            Error::OutOfVirtualBounds { .. } => "out_of_virtual_bounds",
            Error::UnknownIncompatibleFeatures { .. } => "unknown_incompatible_features",
        }
    }

    /// The byte offset the error concerns (in the image file, except for
    /// [`Error::OutOfVirtualBounds`] and an [`Error::Overflow`] about
    /// [`What::VirtualDisk`], where it is a guest offset).
    pub fn offset(&self) -> u64 {
        match self {
            Error::BadMagic { .. } | Error::FileTooShort { .. } => 0,
            Error::Io { offset, .. }
            | Error::PastEof { offset, .. }
            | Error::TooLarge { offset, .. }
            | Error::LimitExceeded { offset, .. }
            | Error::TotalLimitExceeded { offset, .. }
            | Error::Overflow { offset, .. }
            | Error::Unaligned { offset, .. }
            | Error::ReservedBits { offset, .. }
            | Error::Truncated { offset, .. }
            | Error::UnsupportedVersion { offset, .. }
            | Error::InvalidClusterBits { offset, .. }
            | Error::ExtendedL2ClusterTooSmall { offset, .. }
            | Error::InvalidHeaderLength { offset, .. }
            | Error::InvalidRefcountOrder { offset, .. }
            | Error::UnknownCryptMethod { offset, .. }
            | Error::UnknownCompressionType { offset, .. }
            | Error::CompressionTypeMismatch { offset, .. }
            | Error::L1TooSmall { offset, .. }
            | Error::VirtualSizeTooLarge { offset, .. }
            | Error::MissingRefcountTable { offset }
            | Error::InvalidBackingFile { offset, .. }
            | Error::DataFileRawWithoutDataFile { offset }
            | Error::MissingCryptoHeader { offset }
            | Error::UnexpectedCryptoHeader { offset }
            | Error::ExtensionTooLarge { offset, .. }
            | Error::DuplicateExtension { offset, .. }
            | Error::InvalidExtensionLength { offset, .. }
            | Error::InvalidBitmapsExtension { offset, .. }
            | Error::InvalidSnapshot { offset, .. }
            | Error::InvalidBitmap { offset, .. }
            | Error::CompressedOffsetTooHigh { offset, .. }
            | Error::CompressedPastEof { offset, .. }
            | Error::CompressedInflation { offset, .. }
            | Error::InvalidCompressedEntry { offset, .. }
            | Error::Decompress { offset, .. }
            | Error::InvalidSubclusterBitmap { offset, .. }
            | Error::MetadataOverlap { offset, .. }
            | Error::DataFileOffsetMismatch { offset, .. }
            | Error::DataFileRequired { offset }
            | Error::Encrypted { offset }
            | Error::OutOfVirtualBounds { offset, .. }
            | Error::UnknownIncompatibleFeatures { offset, .. } => *offset,
        }
    }

    /// Whether this error means "not a qcow2 image at all" rather than a
    /// malformed one: the image was not judged ([`crate::Report::checked`]
    /// is false).
    pub fn is_not_qcow2(&self) -> bool {
        matches!(self, Error::BadMagic { .. } | Error::FileTooShort { .. })
    }

    /// Whether this error refuses an image rather than calling it
    /// malformed: it exceeds the caller's [`crate::Limits`], or reading it
    /// needs something the caller did not hand in (the external data file,
    /// a key for encrypted data), or it uses incompatible features this
    /// reader cannot interpret. Verdict `unsafe`, like the safety policy.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::LimitExceeded { .. }
                | Error::TotalLimitExceeded { .. }
                | Error::DataFileRequired { .. }
                | Error::Encrypted { .. }
                | Error::UnknownIncompatibleFeatures { .. }
        )
    }

    /// Whether this error comes from the underlying I/O rather than the
    /// image contents.
    pub fn is_io(&self) -> bool {
        matches!(self, Error::Io { .. })
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
