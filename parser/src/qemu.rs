//! The caps QEMU itself enforces when it opens an image (block/qcow2.h).
//! A value past one of these is an image QEMU refuses, so we refuse it too,
//! whatever the caller's [`crate::Limits`] allow.

/// Smallest cluster_bits QEMU accepts (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU accepts (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest cluster_bits with extended L2 entries (16 KiB clusters).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Largest L1 table, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table, in bytes.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// Largest snapshot table, in bytes.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Most extra data bytes in a snapshot table entry.
pub const MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;
/// Most persistent bitmaps.
pub const MAX_BITMAPS: u64 = 65535;
/// Largest bitmap directory, in bytes.
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS;
/// Longest bitmap name.
pub const MAX_BITMAP_NAME: u64 = 1023;
/// Longest backing file name.
pub const MAX_BACKING_FILE_NAME: u64 = 1023;
/// Host offsets in L1/L2 entries must stay below 2^56.
pub const MAX_HOST_OFFSET_BITS: u32 = 56;
/// Largest virtual disk (BDRV_MAX_LENGTH is about INT64_MAX).
pub const MAX_VIRTUAL_SIZE: u64 = i64::MAX as u64;
