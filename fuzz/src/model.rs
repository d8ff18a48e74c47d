//! The structured model: an [`Arbitrary`] description of a valid image
//! (folded into range by [`FuzzImage::model`] and written by the
//! project's encoder, [`qcow2_guard::build`]), and the field edits the
//! `structured` target applies to the encoded bytes.

use arbitrary::Arbitrary;
use qcow2_guard::build::{Field, GuestCluster, ImageModel, SnapshotModel};
use qcow2_guard::{refcount, CompressionType};

/// A guest cluster of the structured model.
#[derive(Debug, Arbitrary)]
pub enum FuzzCluster {
    /// Unallocated.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data from a seed.
    Data(u8),
    /// Compressed data from a seed (at most 4 per image).
    Compressed(u8),
    /// Extended L2 subclusters (allocation and zero bitmaps).
    Subclusters {
        /// Allocated subclusters.
        alloc: u32,
        /// Zero subclusters.
        zero: u32,
        /// Data seed.
        seed: u8,
    },
}

/// One edit of the encoded image.
#[derive(Debug, Arbitrary)]
pub enum Edit {
    /// Set field `field % fields.len()` to `value` (truncated to its width).
    Set { field: u16, value: u64 },
    /// Flip bits of a field.
    Xor { field: u16, mask: u64 },
    /// Add to a field (wrapping).
    Add { field: u16, delta: u64 },
    /// Set a byte anywhere in the file.
    Byte { at: u32, value: u8 },
    /// Cut the file at `at % len`.
    Truncate { at: u32 },
    /// Add a small signed delta, `delta % 9` (-8..=8), to header field
    /// `field % header fields` (the fields named `header.*`): values next
    /// to the valid ones (refcount_order 4 + 3, l1_size - 1) are where
    /// off-by-one rules break, and a random 64-bit value almost never
    /// lands there (nor a random `i8`: 1 in 256 for a given delta).
    Nudge { field: u8, delta: i8 },
}

/// Cluster bits a model draws, by `FuzzImage::cluster_bits % 16`: every
/// size from 512 B to 64 KiB, small ones more often. A run's work grows
/// with the cluster size, not the guest data: every L2 table and refcount
/// block is walked whole (8,192 entries at 64 KiB) by the walker, the
/// check and the oracles, so a 64 KiB image costs about six times a
/// 512 B one (callgrind, non-ASan: 1.1 M instructions per run at 512 B,
/// 6.5 M at 64 KiB). Drawn uniformly, the 14..=16 sizes took over half
/// the time.
const CLUSTER_BITS: [u32; 16] = [9, 9, 9, 9, 10, 10, 10, 11, 11, 12, 12, 13, 13, 14, 15, 16];

/// Snapshot counts a model draws, by `FuzzImage::snapshots % 8`. Each
/// snapshot's L1 table names every L2 table again, so the walker, the
/// metadata map, the check and the oracles walk them all once more: with
/// 0..=4 drawn uniformly, a run walked each table three times on average.
const SNAPSHOTS: [u64; 8] = [0, 0, 0, 1, 1, 2, 3, 4];

/// The structured target's input: an image model plus edits.
#[derive(Debug, Arbitrary)]
pub struct FuzzImage {
    /// Version 2 (else 3).
    pub v2: bool,
    /// Cluster bits, drawn from `CLUSTER_BITS` (9..=16, small ones more
    /// often; at least 14 with extended L2).
    pub cluster_bits: u8,
    /// Refcount order, folded into 0..=6 (4 for v2).
    pub refcount_order: u8,
    /// Extended L2 entries (v3 only).
    pub extended_l2: bool,
    /// Zstd compression (v3 only), else deflate.
    pub zstd: bool,
    /// The lazy-refcounts feature (v3 only).
    pub lazy_refcounts: bool,
    /// Write a feature name table.
    pub feature_table: bool,
    /// The guest clusters, in order.
    pub clusters: Vec<FuzzCluster>,
    /// Internal snapshots, drawn from `SNAPSHOTS` (0..=4, few more often).
    pub snapshots: u8,
    /// Edits of the encoded bytes (`structured` only).
    pub edits: Vec<Edit>,
}

impl FuzzImage {
    /// The valid model this input stands for (out-of-range choices are
    /// folded into range).
    pub fn model(&self) -> ImageModel {
        let v3 = !self.v2;
        let extended_l2 = v3 && self.extended_l2;
        let mut cluster_bits = CLUSTER_BITS[usize::from(self.cluster_bits) % CLUSTER_BITS.len()];
        if extended_l2 {
            cluster_bits = cluster_bits.max(14);
        }
        let refcount_order = if v3 {
            u32::from(self.refcount_order % 7)
        } else {
            4
        };
        let max_snapshots = refcount::max_value(refcount_order).saturating_sub(1).min(4);
        // Compressing is the slow part of building (most of a run's time):
        // at most 4 compressed clusters, the rest become data clusters.
        let mut compressed = 0;
        let clusters = self
            .clusters
            .iter()
            // At most 160 clusters and 128 KiB of guest data (three L2
            // tables with 512-byte clusters): keeps runs fast.
            .take(160.min((128usize << 10) >> cluster_bits))
            .map(|c| match *c {
                FuzzCluster::Unallocated => GuestCluster::Unallocated,
                FuzzCluster::Zero => GuestCluster::Zero,
                FuzzCluster::Data(s) => GuestCluster::Data(s),
                FuzzCluster::Compressed(s) if compressed < 4 => {
                    compressed += 1;
                    GuestCluster::Compressed(s)
                }
                FuzzCluster::Compressed(s) => GuestCluster::Data(s),
                FuzzCluster::Subclusters { alloc, zero, seed } if extended_l2 => {
                    GuestCluster::Subclusters { alloc, zero, seed }
                }
                FuzzCluster::Subclusters { seed, .. } => GuestCluster::Data(seed),
            })
            .collect();
        ImageModel {
            version: if v3 { 3 } else { 2 },
            cluster_bits,
            refcount_order,
            extended_l2,
            compression: if v3 && self.zstd {
                CompressionType::Zstd
            } else {
                CompressionType::Deflate
            },
            lazy_refcounts: v3 && self.lazy_refcounts,
            feature_table: self.feature_table,
            clusters,
            snapshots: (0..SNAPSHOTS[usize::from(self.snapshots) % SNAPSHOTS.len()]
                .min(max_snapshots))
                .map(|i| SnapshotModel {
                    name: format!("snap{i}"),
                })
                .collect(),
        }
    }
}

impl FuzzImage {
    /// The model as drawn, nothing folded into range (raw cluster bits,
    /// refcount order and snapshot count; version 2 with whatever else was
    /// drawn; subclusters without extended L2), or `None` when it is
    /// valid by [`model_rules`] (then [`FuzzImage::model`] builds the same
    /// kind of image, and building this one could take a 2 MiB-cluster
    /// disk). The guest clusters are the folded model's.
    pub fn unfolded(&self, folded: &ImageModel) -> Option<(ImageModel, &'static str)> {
        let v3 = !self.v2;
        let mut clusters = folded.clusters.clone();
        if let Some(FuzzCluster::Subclusters { alloc, zero, seed }) = self.clusters.first() {
            if let Some(c) = clusters.first_mut() {
                *c = GuestCluster::Subclusters {
                    alloc: *alloc,
                    zero: *zero,
                    seed: *seed,
                };
            }
        }
        let m = ImageModel {
            version: if v3 { 3 } else { 2 },
            cluster_bits: u32::from(self.cluster_bits),
            refcount_order: u32::from(self.refcount_order),
            extended_l2: self.extended_l2,
            compression: if self.zstd {
                CompressionType::Zstd
            } else {
                CompressionType::Deflate
            },
            lazy_refcounts: self.lazy_refcounts,
            feature_table: self.feature_table,
            clusters,
            snapshots: (0..self.snapshots)
                .map(|i| SnapshotModel {
                    name: format!("snap{i}"),
                })
                .collect(),
        };
        model_rules(&m).map(|rule| (m, rule))
    }
}

/// The encoder's rules for a model, stated again from the format (the
/// header rules and the refcount width), not from `build.rs`: the first
/// one `m` breaks, or `None`.
pub fn model_rules(m: &ImageModel) -> Option<&'static str> {
    let v2 = m.version == 2;
    let subclusters = m
        .clusters
        .iter()
        .any(|c| matches!(c, GuestCluster::Subclusters { .. }));
    // References to a data cluster: the active L1 table and each snapshot.
    let refs = m.snapshots.len() as u64 + 1;
    [
        (m.version != 2 && m.version != 3, "version"),
        (!(9..=21).contains(&m.cluster_bits), "cluster_bits"),
        (m.refcount_order > 6, "refcount_order"),
        (
            v2 && (m.refcount_order != 4
                || m.extended_l2
                || m.compression != CompressionType::Deflate
                || m.lazy_refcounts),
            "version 2 features",
        ),
        (
            m.extended_l2 && m.cluster_bits < 14,
            "extended L2 cluster size",
        ),
        (
            !m.extended_l2 && subclusters,
            "subclusters without extended L2",
        ),
        (
            m.refcount_order <= 6 && refs > refcount::max_value(m.refcount_order),
            "refcount width",
        ),
        (
            m.snapshots.iter().any(|s| s.name.len() > 1024),
            "snapshot name",
        ),
    ]
    .into_iter()
    .find_map(|(broken, rule)| broken.then_some(rule))
}

pub fn apply(bytes: &mut Vec<u8>, fields: &[Field], edit: &Edit) {
    let field = |i: u16| fields.get(usize::from(i) % fields.len().max(1));
    let update = |bytes: &mut Vec<u8>, i: u16, f: &dyn Fn(u64) -> u64| {
        let Some(fld) = field(i) else { return };
        let (at, w) = (fld.offset as usize, usize::from(fld.width));
        let Some(slot) = bytes.get_mut(at..at + w) else {
            return;
        };
        let mut be = [0u8; 8];
        be[8 - w..].copy_from_slice(slot);
        let v = f(u64::from_be_bytes(be)).to_be_bytes();
        slot.copy_from_slice(&v[8 - w..]);
    };
    match *edit {
        Edit::Set { field, value } => update(bytes, field, &|_| value),
        Edit::Xor { field, mask } => update(bytes, field, &|v| v ^ mask),
        Edit::Add { field, delta } => update(bytes, field, &|v| v.wrapping_add(delta)),
        Edit::Byte { at, value } => {
            if !bytes.is_empty() {
                let i = at as usize % bytes.len();
                bytes[i] = value;
            }
        }
        Edit::Nudge { field, delta } => {
            let header: Vec<usize> = (0..fields.len())
                .filter(|&i| fields[i].name.starts_with("header."))
                .collect();
            if let Some(&i) = header.get(usize::from(field) % header.len().max(1)) {
                let add = i64::from(delta % 9) as u64;
                update(bytes, i as u16, &|v| v.wrapping_add(add));
            }
        }
        Edit::Truncate { at } => {
            if !bytes.is_empty() {
                bytes.truncate(at as usize % bytes.len());
            }
        }
    }
}
