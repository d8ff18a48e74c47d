//! Caller-tunable bounds on everything an image can make us allocate.
//!
//! These sit on top of two other bounds that always apply: the file length
//! (no table may claim more bytes than the file has) and QEMU's own caps
//! (see [`crate::qemu`]). Defaults equal QEMU's caps, so an image QEMU opens
//! is accepted; a caller facing hostile uploads can tighten any of them.

/// Bounds on allocations sized from the image. What the caller accepts is
/// [`crate::Policy`] (the virtual size among it); how much a check may
/// decompress is [`crate::CheckOptions`].
///
/// The struct is `#[non_exhaustive]`: start from [`Limits::default`] (or
/// [`Limits::fuzzing`]) and set fields.
///
/// ```
/// use qcow2_guard::build::{ImageModel, SnapshotModel};
/// use qcow2_guard::header::field;
/// use qcow2_guard::{Image, Limits, Policy};
///
/// let bytes = ImageModel {
///     snapshots: vec![SnapshotModel { name: "before-upgrade".into() }],
///     ..ImageModel::default() // one 64 KiB cluster of virtual disk
/// }
/// .build()?
/// .bytes;
///
/// // A service that accepts no internal snapshots: open refuses the image
/// // before reading the snapshot table.
/// let mut limits = Limits::default();
/// limits.max_snapshots = 0;
/// let err = Image::open_with(bytes.as_slice(), limits).unwrap_err();
/// assert_eq!((err.code(), err.offset()), ("limit_exceeded", field::NB_SNAPSHOTS));
/// assert!(err.is_refusal()); // over the caller's limits, not malformed
///
/// // The virtual size is the safety policy's: the image opens, and the
/// // policy refuses it.
/// let image = Image::open_with(bytes.as_slice(), Limits::default())?;
/// let findings = image.policy_findings(&Policy::default().with_max_virtual_size(32 << 10));
/// assert_eq!(findings[0].code, "policy_virtual_size");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Entries in any L1 table (active or snapshot). QEMU: 4 Mi (32 MiB).
    pub max_l1_entries: u64,
    /// Bytes of the refcount table. QEMU: 8 MiB.
    pub max_refcount_table_bytes: u64,
    /// Number of internal snapshots. QEMU: 65536.
    pub max_snapshots: u64,
    /// Bytes of the whole snapshot table. QEMU: 64 MiB.
    pub max_snapshot_table_bytes: u64,
    /// Extra data bytes in one snapshot table entry. QEMU: 1024.
    pub max_snapshot_extra_data: u64,
    /// Number of persistent bitmaps. QEMU: 65535.
    pub max_bitmaps: u64,
    /// Bytes of the bitmap directory. QEMU: 64 MiB (65535 x 1 KiB).
    pub max_bitmap_directory_bytes: u64,
    /// Bytes of the backing file name. QEMU: 1023.
    pub max_backing_file_name: u64,
    /// Byte budget for metadata caches (L2 tables, refcount blocks).
    pub max_cache_bytes: u64,
    /// Total bytes an opened [`crate::Image`] may hold, beside the caps
    /// above (image-png's single budget): the first cluster, the backing
    /// file name, the L1, refcount and snapshot tables, the bitmap
    /// directory, the L2 cache's capacity and the metadata map's upper
    /// bound (32 bytes per region it may hold), each charged as the image
    /// opens (a snapshot's L1 table replaces the active one's charge in
    /// [`crate::Image::into_snapshot`]). An image whose structures each
    /// pass their cap but together exceed it is refused
    /// (`total_limit_exceeded`, a refusal). Default 256 MiB: real images
    /// charge 16 to 50 MiB ([`crate::Image::charged_bytes`]; 50 MiB for
    /// an L1 table at QEMU's 32 MiB cap, `qemu-img create -f qcow2 -o
    /// cluster_size=512 x.qcow2 128G`), and the largest qemu-img can make
    /// (the same with `preallocation=metadata`) about 216 MiB, scaled
    /// from a measured 4 GiB one (SECURITY.md, "Limits").
    pub max_total_bytes: u64,
    /// Bytes a streamed inspection ([`crate::stream`]) may keep in memory:
    /// the tables, refcount blocks and compressed payloads it still needs,
    /// and its bookkeeping. Past it, what is needed is read back from the
    /// spool, or the inspection ends needing random access.
    pub max_retained_bytes: u64,
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_l1_entries: 4 * MIB,
            max_refcount_table_bytes: 8 * MIB,
            max_snapshots: 65536,
            max_snapshot_table_bytes: 64 * MIB,
            max_snapshot_extra_data: KIB,
            max_bitmaps: 65535,
            max_bitmap_directory_bytes: 65535 * KIB,
            max_backing_file_name: 1023,
            max_cache_bytes: 16 * MIB,
            max_total_bytes: 256 * MIB,
            max_retained_bytes: 256 * MIB,
        }
    }
}

impl Limits {
    /// Set [`Limits::max_cache_bytes`].
    pub fn with_max_cache_bytes(mut self, bytes: u64) -> Self {
        self.max_cache_bytes = bytes;
        self
    }

    /// Tight limits for fuzzing: small tables, small caches.
    pub fn fuzzing() -> Self {
        Limits {
            max_l1_entries: 64 * KIB,
            max_refcount_table_bytes: MIB,
            max_snapshots: 256,
            max_snapshot_table_bytes: MIB,
            max_snapshot_extra_data: KIB,
            max_bitmaps: 256,
            max_bitmap_directory_bytes: MIB,
            max_backing_file_name: 1023,
            max_cache_bytes: 4 * MIB,
            max_total_bytes: 16 * MIB,
            max_retained_bytes: 16 * MIB,
        }
    }
}
