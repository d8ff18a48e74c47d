//! An encoder of valid qcow2 images from a small model, for tests and
//! fuzzing.
//!
//! An [`ImageModel`] says what the image is (version, cluster size,
//! refcount width, features) and what each guest cluster holds (data, zeros,
//! compressed data, nothing, or a mix of subclusters); [`ImageModel::build`]
//! lays it out and returns the file bytes, the guest content a reader must
//! see, and a map of the fields it wrote (so a test can corrupt "the L2 entry
//! of guest cluster 3" by name).
//!
//! Layout, in host clusters: header and extensions, L1 table, refcount
//! table, refcount blocks, L2 tables, snapshot table, snapshot L1 tables,
//! data clusters, then the compressed area where streams are packed back to
//! back (crossing cluster boundaries as QEMU's do). Every refcount is exact
//! and every copied flag agrees with it, so `qemu-img check` finds nothing.
//!
//! Snapshots share the active L2 tables and data (as `qemu-img snapshot -c`
//! leaves an image): each one adds a reference to every L2 table and data
//! cluster, and copies the L1 table.

use std::cell::RefCell;

use miniz_oxide::deflate::core::{
    compress as deflate_step, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
    TDEFLStatus,
};
use std::collections::HashMap;
use std::fmt;

use crate::compressed::Descriptor;
use crate::extensions::{qemu_feature_names, Extensions};
use crate::header::{
    CompressionType, Geometry, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2,
    V2_HEADER_LENGTH, V3_DEFAULT_HEADER_LENGTH,
};
use crate::l1l2::{Cluster, L1Entry};
use crate::qemu;
use crate::refcount;
use crate::snapshot::Snapshot;

/// What one guest cluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCluster {
    /// No L2 entry: reads as zeros (there is no backing file).
    Unallocated,
    /// Reads as zeros through the zero flag (version 3; in a version 2
    /// image, which has no zero flag, it is left unallocated).
    Zero,
    /// A data cluster filled with [`pattern`]`(seed, index)`.
    Data(u8),
    /// The same content as `Data`, stored compressed. Content that does not
    /// compress below one cluster is stored as a data cluster instead.
    Compressed(u8),
    /// Extended L2 only: per subcluster, bit i of `alloc` holds data (from
    /// the cluster's [`pattern`]), bit i of `zero` reads as zeros, neither
    /// is unallocated. `zero` bits also set in `alloc` are ignored.
    Subclusters {
        /// Bit i: subcluster i holds data.
        alloc: u32,
        /// Bit i: subcluster i reads as zeros (unless also in `alloc`).
        zero: u32,
        /// Seed of the cluster's [`pattern`].
        seed: u8,
    },
}

/// One internal snapshot: a copy of the active L1 table sharing its L2
/// tables and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotModel {
    /// The snapshot's name (its ID is its 1-based position).
    pub name: String,
}

/// A valid image, described by what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageModel {
    /// 2 or 3.
    pub version: u32,
    /// 9..=21 (>= 14 with extended L2).
    pub cluster_bits: u32,
    /// 0..=6; must be 4 for version 2.
    pub refcount_order: u32,
    /// 128-bit L2 entries with subclusters (version 3).
    pub extended_l2: bool,
    /// Compression of `Compressed` clusters (zstd needs version 3).
    pub compression: CompressionType,
    /// Compatible bit 0 (version 3).
    pub lazy_refcounts: bool,
    /// Write QEMU's feature name table extension (version 3).
    pub feature_table: bool,
    /// Guest cluster i is `clusters[i]`; the virtual size is one cluster
    /// per entry (at least one).
    pub clusters: Vec<GuestCluster>,
    /// Internal snapshots, in table order.
    pub snapshots: Vec<SnapshotModel>,
}

impl Default for ImageModel {
    /// A version 3 image with 64 KiB clusters, 16-bit refcounts and one
    /// empty guest cluster.
    fn default() -> Self {
        ImageModel {
            version: 3,
            cluster_bits: 16,
            refcount_order: 4,
            extended_l2: false,
            compression: CompressionType::Deflate,
            lazy_refcounts: false,
            feature_table: true,
            clusters: vec![GuestCluster::Unallocated],
            snapshots: Vec::new(),
        }
    }
}

/// A model that cannot be encoded as a valid image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidModel(
    /// Why the model cannot be encoded.
    pub &'static str,
);

impl fmt::Display for InvalidModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid image model: {}", self.0)
    }
}

impl std::error::Error for InvalidModel {}

/// A field the encoder wrote, for tests and fuzzers that edit images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// What it is, e.g. "header.l1_size", "l2_entry", "refcount_table".
    pub name: &'static str,
    /// File offset.
    pub offset: u64,
    /// Width in bytes (1, 2, 4 or 8), big-endian.
    pub width: u8,
}

/// An encoded image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// The qcow2 file.
    pub bytes: Vec<u8>,
    /// What a reader must see: `virtual size` bytes of guest data.
    pub guest: Vec<u8>,
    /// The geometry of the image.
    pub geometry: Geometry,
    /// Header fields and table entries the encoder wrote.
    pub fields: Vec<Field>,
}

/// The content of guest cluster `index` for `seed`: a sequence with a
/// period of 251 bytes (short enough that deflate's 4 KiB window and any
/// zstd frame compress it well), different for each seed and index.
pub fn pattern(seed: u8, index: u64, len: usize) -> Vec<u8> {
    let base = seed
        ^ index
            .to_le_bytes()
            .iter()
            .fold(0u8, |a, b| a.rotate_left(3) ^ b);
    let period: Vec<u8> = (0..251u8)
        .map(|i| base.wrapping_add(i.wrapping_mul(7)) ^ i.rotate_left(4))
        .collect();
    let mut out = period.repeat(len.div_ceil(251));
    out.truncate(len);
    out
}

fn bad(reason: &'static str) -> InvalidModel {
    InvalidModel(reason)
}

fn add(a: u64, b: u64) -> Result<u64, InvalidModel> {
    a.checked_add(b).ok_or(bad("image too large"))
}

fn mul(a: u64, b: u64) -> Result<u64, InvalidModel> {
    a.checked_mul(b).ok_or(bad("image too large"))
}

fn to_usize(v: u64) -> Result<usize, InvalidModel> {
    usize::try_from(v).map_err(|_| bad("image too large"))
}

/// The file being laid out: a growing byte buffer written at offsets.
struct Out {
    buf: Vec<u8>,
    fields: Vec<Field>,
}

impl Out {
    fn put(&mut self, offset: u64, bytes: &[u8]) -> Result<(), InvalidModel> {
        let start = to_usize(offset)?;
        let end = start
            .checked_add(bytes.len())
            .ok_or(bad("image too large"))?;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf
            .get_mut(start..end)
            .ok_or(bad("image too large"))?
            .copy_from_slice(bytes);
        Ok(())
    }

    fn put_u64(&mut self, name: &'static str, offset: u64, v: u64) -> Result<(), InvalidModel> {
        self.fields.push(Field {
            name,
            offset,
            width: 8,
        });
        self.put(offset, &v.to_be_bytes())
    }
}

/// A cluster allocator: hands out consecutive host clusters.
struct Alloc {
    next: u64,
    cluster_size: u64,
}

impl Alloc {
    fn take(&mut self, clusters: u64) -> Result<u64, InvalidModel> {
        let at = mul(self.next, self.cluster_size)?;
        self.next = add(self.next, clusters)?;
        Ok(at)
    }
}

/// Most streams [`ImageModel::build`] keeps memoised per thread.
const MEMO_STREAMS: usize = 4096;

/// Bytes of memoised streams kept per thread (streams are under one
/// cluster, and patterns compress to a few hundred bytes).
const MEMO_BYTES: usize = 4 << 20;

/// Key: (zstd, seed, guest index, cluster size).
type StreamKey = (bool, u8, usize, u64);

/// The per-thread memo of compressed streams: the streams back to back
/// in one buffer, found by key. Both are allocated once, at full
/// capacity, and emptied (never shrunk or grown) when full, so a build
/// that compresses a new stream allocates nothing that outlives it:
/// libFuzzer runs an input a second time, to look for a leak, whenever a
/// run ends with more allocations than frees.
struct Memo {
    index: HashMap<StreamKey, (usize, usize)>,
    bytes: Vec<u8>,
}

impl Memo {
    fn new() -> Memo {
        Memo {
            index: HashMap::with_capacity(MEMO_STREAMS),
            bytes: Vec::with_capacity(MEMO_BYTES),
        }
    }

    fn get(&self, key: &StreamKey) -> Option<Vec<u8>> {
        let &(start, len) = self.index.get(key)?;
        self.bytes
            .get(start..start.saturating_add(len))
            .map(<[u8]>::to_vec)
    }

    fn insert(&mut self, key: StreamKey, stream: &[u8]) {
        if stream.len() > MEMO_BYTES {
            return;
        }
        if self.index.len() >= MEMO_STREAMS
            || self.bytes.len().saturating_add(stream.len()) > MEMO_BYTES
        {
            self.index.clear();
            self.bytes.clear();
        }
        self.index.insert(key, (self.bytes.len(), stream.len()));
        self.bytes.extend_from_slice(stream);
    }
}

thread_local! {
    static STREAMS: RefCell<Option<Memo>> = const { RefCell::new(None) };
}

/// Compress one cluster's content.
fn compress(kind: CompressionType, data: &[u8]) -> Vec<u8> {
    match kind {
        // Level 1 keeps every match at the most recent occurrence, so a
        // pattern with a period under 4 KiB never needs a distance QEMU's
        // 4 KiB window (windowBits -12) cannot reach.
        CompressionType::Deflate => deflate(data),
        CompressionType::Zstd => {
            // Level 1 with the thread's context, into a buffer of the
            // worst-case size; a failure leaves an empty stream (the
            // image then fails to read back, as any broken builder
            // output would).
            let mut buf = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
            let done = ZSTD.with(|cell| {
                let mut slot = cell.borrow_mut();
                slot.get_or_insert_with(zstd_safe::CCtx::create)
                    .compress(&mut buf, data, 1)
            });
            match done {
                Ok(_) => buf,
                Err(_) => Vec::new(),
            }
        }
    }
}

thread_local! {
    /// One raw-deflate compressor (level 1) per thread, reset for each
    /// stream: a new one allocates and zeroes its ~300 KiB of hash tables,
    /// which was most of the cost of compressing a small cluster.
    static DEFLATE: RefCell<Option<Box<CompressorOxide>>> = const { RefCell::new(None) };
    /// One zstd compression context per thread (a one-shot
    /// `ZSTD_compress` creates and frees one for each stream).
    static ZSTD: RefCell<Option<zstd_safe::CCtx<'static>>> = const { RefCell::new(None) };
}

/// Raw deflate at level 1 with the thread's compressor; the same bytes as
/// `miniz_oxide::deflate::compress_to_vec(data, 1)` (a unit test checks).
fn deflate(data: &[u8]) -> Vec<u8> {
    DEFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c = slot.get_or_insert_with(|| {
            // Window bits 0: no zlib wrapper.
            Box::new(CompressorOxide::new(create_comp_flags_from_zip_params(
                1, 0, 0,
            )))
        });
        c.reset();
        let mut out = vec![0u8; data.len().div_ceil(2).max(64)];
        let (mut input, mut done) = (data, 0usize);
        loop {
            let Some(room) = out.get_mut(done..) else {
                return Vec::new();
            };
            let (status, used, wrote) = deflate_step(c, input, room, TDEFLFlush::Finish);
            done = done.saturating_add(wrote);
            input = input.get(used..).unwrap_or(&[]);
            match status {
                TDEFLStatus::Done => {
                    out.truncate(done);
                    return out;
                }
                TDEFLStatus::Okay => {
                    let grown = out.len().saturating_mul(2);
                    out.resize(grown, 0);
                }
                // A failure leaves an empty stream, as for zstd.
                _ => return Vec::new(),
            }
        }
    })
}

/// One compressed stream placed in the compressed area.
struct Stream {
    guest_index: usize,
    /// Offset from the start of the area.
    rel: u64,
    data: Vec<u8>,
}

impl ImageModel {
    fn check(&self) -> Result<Geometry, InvalidModel> {
        if !(2..=3).contains(&self.version) {
            return Err(bad("version must be 2 or 3"));
        }
        if !(qemu::MIN_CLUSTER_BITS..=qemu::MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(bad("cluster_bits must be 9..=21"));
        }
        if self.refcount_order > 6 {
            return Err(bad("refcount_order must be 0..=6"));
        }
        if self.version == 2
            && (self.refcount_order != 4
                || self.extended_l2
                || self.compression != CompressionType::Deflate
                || self.lazy_refcounts)
        {
            return Err(bad(
                "version 2 has 16-bit refcounts, deflate, no extended L2 and no lazy refcounts",
            ));
        }
        if self.extended_l2 && self.cluster_bits < qemu::MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(bad("extended L2 needs cluster_bits >= 14"));
        }
        if !self.extended_l2
            && self
                .clusters
                .iter()
                .any(|c| matches!(c, GuestCluster::Subclusters { .. }))
        {
            return Err(bad("subclusters need extended L2"));
        }
        let refs = u64::try_from(self.snapshots.len())
            .ok()
            .and_then(|n| n.checked_add(1))
            .ok_or(bad("too many snapshots"))?;
        if refs > refcount::max_value(self.refcount_order) {
            return Err(bad(
                "snapshots need refcounts wider than the refcount width",
            ));
        }
        if self.snapshots.iter().any(|s| s.name.len() > 1024) {
            return Err(bad("snapshot name too long"));
        }
        Ok(Geometry::new(
            self.cluster_bits,
            self.extended_l2,
            self.refcount_order,
        ))
    }

    /// Guest cluster `index`'s content (before compression) if it holds data.
    fn content(&self, index: usize, g: &Geometry) -> Result<Vec<u8>, InvalidModel> {
        let cs = to_usize(g.cluster_size)?;
        let idx = u64::try_from(index).map_err(|_| bad("image too large"))?;
        let seed = match self.clusters.get(index) {
            Some(GuestCluster::Data(s) | GuestCluster::Compressed(s)) => *s,
            Some(GuestCluster::Subclusters { seed, .. }) => *seed,
            _ => return Ok(vec![0; cs]),
        };
        Ok(pattern(seed, idx, cs))
    }

    /// Guest cluster `index`'s compressed stream, memoised per thread:
    /// the stream depends only on the compression, the seed, the index and
    /// the cluster size, and fuzzing builds the same few thousand streams
    /// over and over (compressing was half of a build's time).
    fn compressed(&self, index: usize, g: &Geometry) -> Result<Vec<u8>, InvalidModel> {
        let seed = match self.clusters.get(index) {
            Some(GuestCluster::Compressed(s)) => *s,
            _ => return Err(bad("not a compressed cluster")),
        };
        let key = (
            self.compression == CompressionType::Zstd,
            seed,
            index,
            g.cluster_size,
        );
        let hit = STREAMS.with(|m| m.borrow().as_ref().and_then(|m| m.get(&key)));
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let stream = compress(self.compression, &self.content(index, g)?);
        STREAMS.with(|m| {
            m.borrow_mut()
                .get_or_insert_with(Memo::new)
                .insert(key, &stream);
        });
        Ok(stream)
    }

    /// Pack the compressed streams: back to back, but never letting a host
    /// cluster's refcount (streams touching it, times the references each
    /// snapshot adds) exceed the refcount width.
    fn pack_streams(&self, g: &Geometry) -> Result<(Vec<Stream>, Vec<u64>, u64), InvalidModel> {
        let refs = add(u64::try_from(self.snapshots.len()).unwrap_or(u64::MAX), 1)?;
        let per_cluster = refcount::max_value(self.refcount_order)
            .checked_div(refs)
            .unwrap_or(0);
        let mut streams = Vec::new();
        let mut touches: Vec<u64> = Vec::new();
        let mut pos = 0u64;
        for (i, c) in self.clusters.iter().enumerate() {
            if !matches!(c, GuestCluster::Compressed(_)) {
                continue;
            }
            let data = self.compressed(i, g)?;
            let len = u64::try_from(data.len()).map_err(|_| bad("image too large"))?;
            if len >= g.cluster_size {
                continue; // stored as a data cluster
            }
            loop {
                let first = g.cluster_index(pos);
                let end = add(pos, len)?.next_multiple_of(512);
                let last = g.cluster_index(end.saturating_sub(1));
                let full = (first..=last).any(|c| {
                    usize::try_from(c)
                        .ok()
                        .and_then(|c| touches.get(c))
                        .is_some_and(|&n| n >= per_cluster)
                });
                if !full {
                    for c in first..=last {
                        let c = to_usize(c)?;
                        if touches.len() <= c {
                            touches.resize(c.saturating_add(1), 0);
                        }
                        if let Some(n) = touches.get_mut(c) {
                            *n = n.saturating_add(1);
                        }
                    }
                    break;
                }
                pos = mul(add(first, 1)?, g.cluster_size)?;
            }
            streams.push(Stream {
                guest_index: i,
                rel: pos,
                data,
            });
            pos = add(pos, len)?;
        }
        let area_clusters = g.clusters_for(pos.next_multiple_of(512));
        Ok((streams, touches, area_clusters))
    }

    /// Encode the model.
    pub fn build(&self) -> Result<BuiltImage, InvalidModel> {
        let g = self.check()?;
        let cs = g.cluster_size;
        let n_guest = u64::try_from(self.clusters.len().max(1)).map_err(|_| bad("too large"))?;
        let size = mul(n_guest, cs)?;
        let l1_size = g.l1_entries_for(size);
        let l1_size_u32 = u32::try_from(l1_size).map_err(|_| bad("L1 table too large"))?;
        if mul(l1_size, 8)? > qemu::MAX_L1_BYTES {
            return Err(bad("L1 table too large"));
        }
        let l1_clusters = g.clusters_for(mul(l1_size, 8)?);
        let nsnap = u64::try_from(self.snapshots.len()).map_err(|_| bad("too many snapshots"))?;
        let refs = add(nsnap, 1)?;
        let shared = refs > 1;

        // Which L1 entries need an L2 table, and what each guest cluster is
        // once the version's limits are applied.
        let (streams, touches, area_clusters) = self.pack_streams(&g)?;
        let kind = |i: usize| -> GuestCluster {
            match self
                .clusters
                .get(i)
                .copied()
                .unwrap_or(GuestCluster::Unallocated)
            {
                GuestCluster::Zero if self.version < 3 => GuestCluster::Unallocated,
                GuestCluster::Compressed(s) if !streams.iter().any(|st| st.guest_index == i) => {
                    GuestCluster::Data(s)
                }
                GuestCluster::Subclusters { alloc, zero, seed } => GuestCluster::Subclusters {
                    alloc,
                    zero: zero & !alloc,
                    seed,
                },
                other => other,
            }
        };
        let l2_shift = g.l2_bits;
        let mut needs_l2 = vec![false; to_usize(l1_size)?];
        let mut data_clusters = 0u64;
        for i in 0..self.clusters.len() {
            let k = kind(i);
            if k != GuestCluster::Unallocated {
                let l1_index = to_usize(u64::try_from(i).unwrap_or(0) >> l2_shift)?;
                if let Some(n) = needs_l2.get_mut(l1_index) {
                    *n = true;
                }
            }
            if matches!(k, GuestCluster::Data(_))
                || matches!(k, GuestCluster::Subclusters { alloc, .. } if alloc != 0)
            {
                data_clusters = add(data_clusters, 1)?;
            }
        }
        let l2_tables = u64::try_from(needs_l2.iter().filter(|&&n| n).count()).unwrap_or(0);

        // Snapshot table: entries built with placeholder L1 offsets to size it.
        let snap_entry = |i: usize, s: &SnapshotModel, l1_offset: u64| Snapshot {
            entry_offset: 0,
            l1_table_offset: l1_offset,
            l1_size: l1_size_u32,
            id: i.saturating_add(1).to_string(),
            name: s.name.clone(),
            date_sec: 1_700_000_000u32.saturating_add(u32::try_from(i).unwrap_or(0)),
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(size),
            icount: None,
            extra_data_size: 16,
            entry_len: 0,
        };
        let snap_table_bytes = self
            .snapshots
            .iter()
            .enumerate()
            .map(|(i, s)| u64::try_from(snap_entry(i, s, 0).encode().len()).unwrap_or(u64::MAX))
            .fold(0u64, u64::saturating_add);
        let snap_table_clusters = g.clusters_for(snap_table_bytes);

        // Everything but the refcount structures, then size those.
        let fixed = [
            1,
            l1_clusters,
            l2_tables,
            snap_table_clusters,
            mul(nsnap, l1_clusters)?,
            data_clusters,
            area_clusters,
        ]
        .iter()
        .try_fold(0u64, |a, &b| add(a, b))?;
        let (mut blocks, mut table) = (1u64, 1u64);
        loop {
            let total = add(add(fixed, blocks)?, table)?;
            let nb = total.div_ceil(g.refcount_block_entries);
            let nt = g.clusters_for(mul(nb, 8)?);
            if (nb, nt) == (blocks, table) {
                break;
            }
            (blocks, table) = (nb, nt);
        }
        if mul(table, cs)? > qemu::MAX_REFCOUNT_TABLE_BYTES {
            return Err(bad("refcount table too large"));
        }

        let mut a = Alloc {
            next: 1,
            cluster_size: cs,
        };
        let l1_offset = a.take(l1_clusters)?;
        let reftable_offset = a.take(table)?;
        let blocks_offset = a.take(blocks)?;
        let mut l2_offsets = vec![None; needs_l2.len()];
        for (slot, &need) in l2_offsets.iter_mut().zip(&needs_l2) {
            if need {
                *slot = Some(a.take(1)?);
            }
        }
        let snap_table_offset = if nsnap > 0 {
            a.take(snap_table_clusters)?
        } else {
            0
        };
        let mut snap_l1_offsets = Vec::new();
        for _ in &self.snapshots {
            snap_l1_offsets.push(a.take(l1_clusters)?);
        }
        let data_start = a.next;
        a.next = add(a.next, data_clusters)?;
        let area_offset = a.take(area_clusters)?;
        let total_clusters = a.next;
        let file_len = mul(total_clusters, cs)?;

        let mut out = Out {
            buf: Vec::new(),
            fields: Vec::new(),
        };
        out.put(file_len.saturating_sub(1), &[0])?;
        let mut counts = vec![0u64; to_usize(total_clusters)?];
        let mut count = |cluster: u64, n: u64| {
            if let Some(c) = usize::try_from(cluster)
                .ok()
                .and_then(|c| counts.get_mut(c))
            {
                *c = c.saturating_add(n);
            }
        };
        // Unshared metadata: header, L1, refcount structures, snapshot
        // table and snapshot L1 tables.
        for c in 0..g.cluster_index(l1_offset) {
            count(c, 1);
        }
        for c in g.cluster_index(l1_offset)..g.cluster_index(blocks_offset) {
            count(c, 1);
        }
        for c in 0..blocks {
            count(add(g.cluster_index(blocks_offset), c)?, 1);
        }
        if nsnap > 0 {
            let first = g.cluster_index(snap_table_offset);
            let end = add(first, add(snap_table_clusters, mul(nsnap, l1_clusters)?)?)?;
            for c in first..end {
                count(c, 1);
            }
        }
        for &off in l2_offsets.iter().flatten() {
            count(g.cluster_index(off), refs);
        }
        for c in 0..area_clusters {
            let n = touches
                .get(to_usize(c)?)
                .copied()
                .unwrap_or(0)
                .saturating_mul(refs);
            count(add(g.cluster_index(area_offset), c)?, n);
        }

        // Guest clusters: data, L2 entries, expected content.
        let mut guest = vec![0u8; to_usize(size)?];
        let mut next_data = data_start;
        let copied = !shared;
        for i in 0..self.clusters.len() {
            let idx = u64::try_from(i).map_err(|_| bad("too large"))?;
            let content = self.content(i, &g)?;
            let guest_at = to_usize(mul(idx, cs)?)?;
            let guest_slot = guest
                .get_mut(guest_at..guest_at.saturating_add(content.len()))
                .ok_or(bad("too large"))?;
            let entry = match kind(i) {
                GuestCluster::Unallocated => continue,
                GuestCluster::Zero => Cluster::Zero {
                    host: None,
                    copied: false,
                },
                GuestCluster::Data(_) => {
                    let host = mul(next_data, cs)?;
                    count(next_data, refs);
                    next_data = add(next_data, 1)?;
                    out.put(host, &content)?;
                    guest_slot.copy_from_slice(&content);
                    Cluster::Data { host, copied }
                }
                GuestCluster::Compressed(_) => {
                    let st = streams
                        .iter()
                        .find(|s| s.guest_index == i)
                        .ok_or(bad("lost stream"))?;
                    let host = add(area_offset, st.rel)?;
                    out.put(host, &st.data)?;
                    guest_slot.copy_from_slice(&content);
                    let end = add(host, u64::try_from(st.data.len()).unwrap_or(u64::MAX))?;
                    let sectors = end
                        .next_multiple_of(512)
                        .saturating_sub(host & !511)
                        .checked_div(512)
                        .unwrap_or(0);
                    Cluster::Compressed(Descriptor {
                        host_offset: host,
                        sectors,
                    })
                }
                GuestCluster::Subclusters { alloc, zero, .. } => {
                    let host = if alloc != 0 {
                        let host = mul(next_data, cs)?;
                        count(next_data, refs);
                        next_data = add(next_data, 1)?;
                        Some(host)
                    } else {
                        None
                    };
                    let sub = to_usize(g.subcluster_size)?;
                    let mut host_bytes = vec![0u8; content.len()];
                    for (s, ((dst, src), hb)) in guest_slot
                        .chunks_mut(sub)
                        .zip(content.chunks(sub))
                        .zip(host_bytes.chunks_mut(sub))
                        .enumerate()
                    {
                        if alloc
                            & 1u32
                                .checked_shl(u32::try_from(s).unwrap_or(32))
                                .unwrap_or(0)
                            != 0
                        {
                            dst.copy_from_slice(src);
                            hb.copy_from_slice(src);
                        }
                    }
                    if let Some(h) = host {
                        out.put(h, &host_bytes)?;
                    }
                    Cluster::Subclusters {
                        host,
                        copied: copied && host.is_some(),
                        alloc,
                        zero,
                    }
                }
            };
            let l1_index = to_usize(idx >> l2_shift)?;
            let l2 = l2_offsets
                .get(l1_index)
                .copied()
                .flatten()
                .ok_or(bad("lost L2 table"))?;
            let slot = idx & g.l2_entries.saturating_sub(1);
            let at = add(l2, mul(slot, g.l2_entry_bytes)?)?;
            let (word, bitmap) = entry.encode(&g);
            out.put_u64("l2_entry", at, word)?;
            if g.extended_l2 {
                out.put_u64("l2_bitmap", add(at, 8)?, bitmap)?;
            }
        }

        // L1 tables.
        for (i, l2) in l2_offsets.iter().enumerate() {
            let at = add(l1_offset, mul(u64::try_from(i).unwrap_or(0), 8)?)?;
            let e = L1Entry {
                l2_offset: *l2,
                copied: l2.is_some() && copied,
            };
            out.put_u64("l1_entry", at, e.encode())?;
            for &sl1 in &snap_l1_offsets {
                let at = add(sl1, mul(u64::try_from(i).unwrap_or(0), 8)?)?;
                let e = L1Entry {
                    l2_offset: *l2,
                    copied: false,
                };
                out.put_u64("snapshot_l1_entry", at, e.encode())?;
            }
        }

        // Snapshot table.
        let mut at = snap_table_offset;
        for (i, (s, &sl1)) in self.snapshots.iter().zip(&snap_l1_offsets).enumerate() {
            let bytes = snap_entry(i, s, sl1).encode();
            out.fields.push(Field {
                name: "snapshot.l1_table_offset",
                offset: at,
                width: 8,
            });
            out.fields.push(Field {
                name: "snapshot.l1_size",
                offset: add(at, 8)?,
                width: 4,
            });
            out.fields.push(Field {
                name: "snapshot.extra_data_size",
                offset: add(at, 36)?,
                width: 4,
            });
            out.put(at, &bytes)?;
            at = add(at, u64::try_from(bytes.len()).unwrap_or(u64::MAX))?;
        }

        // Refcount table and blocks.
        let per_block = g.refcount_block_entries;
        for b in 0..blocks {
            let block_at = add(blocks_offset, mul(b, cs)?)?;
            out.put_u64(
                "refcount_table",
                add(reftable_offset, mul(b, 8)?)?,
                block_at,
            )?;
            let mut block = vec![0u8; to_usize(cs)?];
            // Entries past the last cluster of the file stay zero.
            let first = mul(b, per_block)?;
            for e in 0..per_block.min(total_clusters.saturating_sub(first)) {
                let cluster = add(mul(b, per_block)?, e)?;
                let n = usize::try_from(cluster)
                    .ok()
                    .and_then(|c| counts.get(c))
                    .copied()
                    .unwrap_or(0);
                if n > refcount::max_value(self.refcount_order) {
                    return Err(bad("a refcount overflows the refcount width"));
                }
                if n != 0 {
                    refcount::set(&mut block, self.refcount_order, e, n)
                        .ok_or(bad("refcount block"))?;
                }
            }
            out.put(block_at, &block)?;
        }

        // Header and extensions.
        let v3 = self.version >= 3;
        let mut incompatible = 0;
        if self.compression == CompressionType::Zstd {
            incompatible |= INCOMPAT_COMPRESSION;
        }
        if self.extended_l2 {
            incompatible |= INCOMPAT_EXTL2;
        }
        let header = Header {
            version: self.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: self.cluster_bits,
            size,
            crypt_method: 0,
            l1_size: l1_size_u32,
            l1_table_offset: l1_offset,
            refcount_table_offset: reftable_offset,
            refcount_table_clusters: u32::try_from(table).map_err(|_| bad("too large"))?,
            nb_snapshots: u32::try_from(nsnap).map_err(|_| bad("too many snapshots"))?,
            snapshots_offset: snap_table_offset,
            incompatible_features: incompatible,
            compatible_features: if self.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: 0,
            refcount_order: if v3 { self.refcount_order } else { 4 },
            header_length: if v3 {
                V3_DEFAULT_HEADER_LENGTH
            } else {
                V2_HEADER_LENGTH
            },
            compression_type: match self.compression {
                CompressionType::Deflate => 0,
                CompressionType::Zstd => 1,
            },
        };
        let hbytes = header.encode();
        let ext = Extensions {
            feature_names: if v3 && self.feature_table {
                qemu_feature_names()
            } else {
                Vec::new()
            },
            ..Extensions::default()
        };
        let ebytes = ext.encode();
        let hlen = u64::try_from(hbytes.len()).unwrap_or(u64::MAX);
        if add(hlen, u64::try_from(ebytes.len()).unwrap_or(u64::MAX))? > cs {
            return Err(bad("header extensions do not fit in the first cluster"));
        }
        out.put(0, &hbytes)?;
        out.put(hlen, &ebytes)?;
        for (name, offset, width) in HEADER_FIELDS {
            if v3 || *offset < u64::from(V2_HEADER_LENGTH) {
                out.fields.push(Field {
                    name,
                    offset: *offset,
                    width: *width,
                });
            }
        }
        out.fields.sort_by_key(|f| f.offset);
        Ok(BuiltImage {
            bytes: out.buf,
            guest,
            geometry: g,
            fields: out.fields,
        })
    }
}

use crate::header::field as hf;

/// Header fields recorded in [`BuiltImage::fields`].
const HEADER_FIELDS: &[(&str, u64, u8)] = &[
    ("header.magic", hf::MAGIC, 4),
    ("header.version", hf::VERSION, 4),
    ("header.backing_file_offset", hf::BACKING_FILE_OFFSET, 8),
    ("header.backing_file_size", hf::BACKING_FILE_SIZE, 4),
    ("header.cluster_bits", hf::CLUSTER_BITS, 4),
    ("header.size", hf::SIZE, 8),
    ("header.crypt_method", hf::CRYPT_METHOD, 4),
    ("header.l1_size", hf::L1_SIZE, 4),
    ("header.l1_table_offset", hf::L1_TABLE_OFFSET, 8),
    ("header.refcount_table_offset", hf::REFCOUNT_TABLE_OFFSET, 8),
    (
        "header.refcount_table_clusters",
        hf::REFCOUNT_TABLE_CLUSTERS,
        4,
    ),
    ("header.nb_snapshots", hf::NB_SNAPSHOTS, 4),
    ("header.snapshots_offset", hf::SNAPSHOTS_OFFSET, 8),
    ("header.incompatible_features", hf::INCOMPATIBLE_FEATURES, 8),
    ("header.compatible_features", hf::COMPATIBLE_FEATURES, 8),
    ("header.autoclear_features", hf::AUTOCLEAR_FEATURES, 8),
    ("header.refcount_order", hf::REFCOUNT_ORDER, 4),
    ("header.header_length", hf::HEADER_LENGTH, 4),
    ("header.compression_type", hf::COMPRESSION_TYPE, 1),
];

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::image::Image;

    fn every_kind() -> Vec<GuestCluster> {
        vec![
            GuestCluster::Data(1),
            GuestCluster::Unallocated,
            GuestCluster::Zero,
            GuestCluster::Compressed(2),
            GuestCluster::Compressed(3),
            GuestCluster::Data(4),
        ]
    }

    #[test]
    fn opens_and_maps_every_kind() {
        for version in [2, 3] {
            for cluster_bits in [9, 12, 16] {
                let m = ImageModel {
                    version,
                    cluster_bits,
                    clusters: every_kind(),
                    snapshots: vec![SnapshotModel { name: "s".into() }],
                    ..ImageModel::default()
                };
                let b = m.build().unwrap();
                let img = Image::open(b.bytes.clone()).unwrap();
                assert_eq!(img.virtual_size(), 6 << cluster_bits);
                assert_eq!(img.snapshots().len(), 1);
                for (i, c) in m.clusters.iter().enumerate() {
                    let got = img.cluster((i as u64) << cluster_bits).unwrap();
                    let ok = match c {
                        GuestCluster::Data(_) => matches!(got, Cluster::Data { .. }),
                        GuestCluster::Compressed(_) => matches!(got, Cluster::Compressed(_)),
                        GuestCluster::Zero if version == 3 => matches!(got, Cluster::Zero { .. }),
                        _ => got == Cluster::Unallocated,
                    };
                    assert!(ok, "v{version} cb{cluster_bits} cluster {i}: {got:?}");
                }
                for c in 0..(b.bytes.len() as u64 >> cluster_bits) {
                    assert!(img.refcount(c).unwrap() >= 1, "cluster {c} unreferenced");
                }
            }
        }
    }

    #[test]
    fn rejects_impossible_models() {
        let m = ImageModel {
            refcount_order: 0,
            snapshots: vec![SnapshotModel { name: "a".into() }],
            ..ImageModel::default()
        };
        assert!(m.build().is_err());
        let m = ImageModel {
            version: 2,
            refcount_order: 3,
            ..ImageModel::default()
        };
        assert!(m.build().is_err());
        let m = ImageModel {
            extended_l2: true,
            cluster_bits: 12,
            ..ImageModel::default()
        };
        assert!(m.build().is_err());
    }

    #[test]
    fn reused_compressors_write_what_fresh_ones_write() {
        for (seed, len) in [(0u8, 512usize), (7, 4096), (200, 65536), (3, 1), (9, 0)] {
            let data = pattern(seed, u64::from(seed), len);
            // Twice: the second call runs on the reset compressor.
            for _ in 0..2 {
                assert_eq!(
                    deflate(&data),
                    miniz_oxide::deflate::compress_to_vec(&data, 1)
                );
            }
        }
        let data = pattern(5, 5, 4096);
        for _ in 0..2 {
            let mut fresh = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
            zstd_safe::compress(&mut fresh, &data, 1).expect("zstd");
            assert_eq!(compress(CompressionType::Zstd, &data), fresh);
        }
        let noise: Vec<u8> = (0..70_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761).to_be_bytes()[1])
            .collect();
        assert_eq!(
            deflate(&noise),
            miniz_oxide::deflate::compress_to_vec(&noise, 1)
        );
    }

    #[test]
    fn memoised_streams_build_the_same_image() {
        for compression in [CompressionType::Deflate, CompressionType::Zstd] {
            let m = ImageModel {
                cluster_bits: 12,
                compression,
                clusters: every_kind(),
                ..ImageModel::default()
            };
            STREAMS.with(|m| *m.borrow_mut() = None);
            let fresh = m.build().unwrap();
            // The second build takes every stream from the memo.
            assert_eq!(m.build().unwrap(), fresh);
        }
    }

    #[test]
    fn the_memo_empties_itself_without_growing() {
        let mut memo = Memo::new();
        let (keys, bytes) = (memo.index.capacity(), memo.bytes.capacity());
        let stream = vec![7u8; 1000];
        for i in 0..=MEMO_STREAMS {
            memo.insert((false, 0, i, 512), &stream);
        }
        // Full at MEMO_STREAMS (or MEMO_BYTES): emptied, then the last one.
        assert_eq!(memo.get(&(false, 0, 0, 512)), None);
        assert_eq!(memo.get(&(false, 0, MEMO_STREAMS, 512)), Some(stream));
        assert_eq!(memo.index.capacity(), keys);
        assert_eq!(memo.bytes.capacity(), bytes);
        // A stream larger than the whole memo is not kept.
        memo.insert((true, 0, 0, 1 << 21), &vec![0u8; MEMO_BYTES + 1]);
        assert_eq!(memo.get(&(true, 0, 0, 1 << 21)), None);
    }

    #[test]
    fn one_bit_refcounts_keep_streams_apart() {
        let m = ImageModel {
            cluster_bits: 12,
            refcount_order: 0,
            clusters: vec![GuestCluster::Compressed(9); 8],
            ..ImageModel::default()
        };
        let b = m.build().unwrap();
        let img = Image::open(b.bytes).unwrap();
        for i in 0..8u64 {
            assert!(matches!(
                img.cluster(i << 12).unwrap(),
                Cluster::Compressed(_)
            ));
        }
    }
}
