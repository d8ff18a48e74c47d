//! An opened image: the header, its extensions and the top-level tables,
//! tied together, with L2 tables loaded on demand through a bounded cache.
//!
//! Opening reads and checks everything that is small and fixed (header,
//! extensions, backing file name, L1 table, refcount table, snapshot table,
//! bitmap directory). Per-entry checks happen when an entry is used
//! ([`Image::cluster`]) or when `check` walks everything.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use crate::bitmap::{self, Bitmap};
use crate::bounds::{placed, Budget};
use crate::compressed::{self, Descriptor};
use crate::error::{Error, Result, What};
use crate::extensions::{Extensions, StoredString};
use crate::finding::Finding;
use crate::header::{field, CompressionType, Geometry, Header, AUTOCLEAR_BITMAPS};
use crate::l1l2::{Cluster, L1Entry, L2Table};
use crate::limits::Limits;
use crate::metadata::{MetadataMap, Range};
use crate::policy::Policy;
use crate::refcount;
use crate::snapshot::{self, Snapshot};
use crate::source::{be_u64s, read_into, read_vec, span, Source};
use crate::walker;

/// Bytes a metadata map region costs: the range and its running maximum.
const REGION_BYTES: u64 = (std::mem::size_of::<Range>() + std::mem::size_of::<u64>()) as u64;

/// The most regions [`Image::metadata`] can hold for these tables: the
/// fixed structures, one per refcount block, snapshot L1 table and bitmap
/// table, one per distinct L2 table (at most one per L1 entry, active or
/// snapshot, and one per host cluster) and one per bitmap data cluster
/// (at most one per bitmap table entry and one per host cluster).
fn metadata_regions(
    file_len: u64,
    cs: u64,
    l1: &[u64],
    refcount_table: &[u64],
    snapshots: &[Snapshot],
    bitmaps: &[Bitmap],
) -> u64 {
    let n = |len: usize| u64::try_from(len).unwrap_or(u64::MAX);
    let clusters = file_len.div_ceil(cs);
    let snapshot_l1 = snapshots
        .iter()
        .map(|s| u64::from(s.l1_size))
        .fold(0, u64::saturating_add);
    let bitmap_entries = bitmaps
        .iter()
        .map(|b| u64::from(b.table_size))
        .fold(0, u64::saturating_add);
    [
        8,
        n(refcount_table.len()),
        n(snapshots.len()),
        n(bitmaps.len()),
        clusters.min(n(l1.len()).saturating_add(snapshot_l1)),
        clusters.min(bitmap_entries),
    ]
    .into_iter()
    .fold(0, u64::saturating_add)
}

/// Bytes read up front to decode the fixed header (the longest v3 header
/// field ends at byte 105).
const HEADER_PROBE: u64 = 112;

/// An opened qcow2 image over a [`Source`].
pub struct Image<S> {
    src: S,
    file_len: u64,
    header: Header,
    geometry: Geometry,
    extensions: Extensions,
    backing_file: Option<StoredString>,
    l1: Vec<u64>,
    refcount_table: Vec<u64>,
    snapshots: Vec<Snapshot>,
    bitmaps: Vec<Bitmap>,
    limits: Limits,
    /// What the image holds, against [`Limits::max_total_bytes`].
    budget: Budget,
    data_file: Option<Arc<dyn Source>>,
    /// Guest data behind unallocated clusters, supplied by the caller
    /// (see [`Image::set_backing`]); read by [`crate::read`].
    backing: Option<Arc<dyn Backing>>,
    l2_cache: Mutex<L2Cache>,
    metadata: OnceLock<MetadataMap>,
}

impl<S: Source> std::fmt::Debug for Image<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("file_len", &self.file_len)
            .field("header", &self.header)
            .field("extensions", &self.extensions)
            .finish_non_exhaustive()
    }
}

impl<S: Source> Image<S> {
    /// Open with the default [`Limits`].
    pub fn open(src: S) -> Result<Self> {
        Self::open_with(src, Limits::default())
    }

    /// Open, bounding every allocation by `limits` (and the file length,
    /// and QEMU's caps).
    pub fn open_with(src: S, limits: Limits) -> Result<Self> {
        let file_len = src.len();
        if file_len < 4 {
            return Err(Error::FileTooShort { file_len });
        }
        let probe = read_vec(
            &src,
            What::Header,
            0,
            0,
            file_len.min(HEADER_PROBE),
            HEADER_PROBE,
        )?;
        let header = Header::decode(&probe)?;
        if file_len < header.length() {
            return Err(Error::PastEof {
                what: What::Header,
                offset: field::HEADER_LENGTH,
                start: 0,
                len: header.length(),
                file_len,
            });
        }
        let geometry = header.validate(file_len, &limits)?;
        let cs = geometry.cluster_size;
        // Sizes were checked against QEMU's caps, the limits and the file
        // by Header::validate; the total is charged before each read.
        let mut budget = Budget::new(limits.max_total_bytes);
        budget.charge(What::Header, field::CLUSTER_BITS, file_len.min(cs))?;
        let first = read_vec(
            &src,
            What::Header,
            0,
            0,
            file_len.min(geometry.cluster_size),
            geometry.cluster_size,
        )?;
        let extensions = Extensions::decode(&header, &first)?;

        let backing_file = if header.has_backing_file() {
            budget.charge(
                What::BackingFileName,
                field::BACKING_FILE_SIZE,
                u64::from(header.backing_file_size),
            )?;
            let bytes = read_vec(
                &src,
                What::BackingFileName,
                field::BACKING_FILE_OFFSET,
                header.backing_file_offset,
                u64::from(header.backing_file_size),
                limits.max_backing_file_name,
            )?;
            Some(StoredString {
                offset: header.backing_file_offset,
                bytes,
            })
        } else {
            None
        };

        if let Some(c) = &extensions.crypto {
            placed(
                What::CryptoHeader,
                c.offset,
                c.header_offset,
                c.header_length,
                true,
                geometry.cluster_size,
                file_len,
            )?;
        }

        let l1_bytes = u64::from(header.l1_size).saturating_mul(8);
        budget.charge(What::L1Table, field::L1_SIZE, l1_bytes)?;
        let l1 = be_u64s(&read_vec(
            &src,
            What::L1Table,
            field::L1_TABLE_OFFSET,
            header.l1_table_offset,
            l1_bytes,
            limits.max_l1_entries.saturating_mul(8),
        )?);
        let rt_bytes = u64::from(header.refcount_table_clusters).saturating_mul(cs);
        budget.charge(
            What::RefcountTable,
            field::REFCOUNT_TABLE_CLUSTERS,
            rt_bytes,
        )?;
        let refcount_table = be_u64s(&read_vec(
            &src,
            What::RefcountTable,
            field::REFCOUNT_TABLE_OFFSET,
            header.refcount_table_offset,
            rt_bytes,
            limits.max_refcount_table_bytes,
        )?);
        let snapshots = snapshot::read_table(
            &src,
            header.snapshots_offset,
            header.nb_snapshots,
            header.version,
            &geometry,
            &limits,
        )?;
        // Read entry by entry under its own cap, then charged.
        budget.charge(
            What::SnapshotTable,
            field::NB_SNAPSHOTS,
            snapshots
                .iter()
                .map(|s| s.entry_len)
                .fold(0, u64::saturating_add),
        )?;
        // Like QEMU, a bitmaps extension without autoclear bit 0 is stale
        // and ignored (a program without bitmap support wrote the image).
        let bitmaps = match &extensions.bitmaps {
            Some(ext) if header.autoclear_features & AUTOCLEAR_BITMAPS != 0 => {
                let dir = bitmap::read_directory(&src, ext, header.size, &geometry, &limits)?;
                budget.charge(What::BitmapDirectory, ext.offset, ext.directory_size)?;
                dir
            }
            _ => Vec::new(),
        };
        let cache = L2Cache::new(limits.max_cache_bytes, cs);
        budget.charge(
            What::L2Table,
            field::CLUSTER_BITS,
            u64::try_from(cache.capacity)
                .unwrap_or(u64::MAX)
                .saturating_mul(cs),
        )?;
        budget.charge(
            What::L2Table,
            field::L1_SIZE,
            metadata_regions(file_len, cs, &l1, &refcount_table, &snapshots, &bitmaps)
                .saturating_mul(REGION_BYTES),
        )?;
        Ok(Image {
            src,
            file_len,
            header,
            geometry,
            extensions,
            backing_file,
            l1,
            refcount_table,
            snapshots,
            bitmaps,
            limits,
            budget,
            data_file: None,
            backing: None,
            l2_cache: Mutex::new(cache),
            metadata: OnceLock::new(),
        })
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Sizes derived from the header.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The header extensions.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The backing file name, if the image names one. Never opened here.
    pub fn backing_file(&self) -> Option<&StoredString> {
        self.backing_file.as_ref()
    }

    /// Internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Persistent bitmaps (empty when the extension is absent or stale).
    pub fn bitmaps(&self) -> &[Bitmap] {
        &self.bitmaps
    }

    /// Whether a bitmaps extension is present but stale (autoclear bit 0
    /// clear), so its bitmaps were ignored.
    pub fn bitmaps_stale(&self) -> bool {
        self.extensions.bitmaps.is_some() && self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0
    }

    /// Length of the image file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Virtual disk size in bytes as QEMU exposes it: whole 512-byte
    /// sectors, so a header size that is not a multiple of 512 is rounded
    /// down (`qemu-img convert` writes that many bytes). The header's own
    /// value is [`Header::size`].
    pub fn virtual_size(&self) -> u64 {
        self.header.size & !511
    }

    /// The limits the image was opened with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes charged against [`Limits::max_total_bytes`]: what the open
    /// image holds (tables, names, cache capacity, the metadata map's
    /// bound).
    pub fn charged_bytes(&self) -> u64 {
        self.budget.used()
    }

    /// The underlying source.
    pub fn source(&self) -> &S {
        &self.src
    }

    /// Raw entries of the active L1 table.
    pub fn l1_table(&self) -> &[u64] {
        &self.l1
    }

    /// Raw entries of the refcount table.
    pub fn refcount_table(&self) -> &[u64] {
        &self.refcount_table
    }

    /// Apply a safety policy to this image's header.
    pub fn policy_findings(&self, policy: &Policy) -> Vec<Finding> {
        policy.evaluate(&self.header, &self.extensions)
    }

    /// Supply the external data file (the caller opened it; the library
    /// never opens a path named inside an image).
    pub fn set_data_file(&mut self, data_file: Arc<dyn Source>) {
        self.data_file = Some(data_file);
    }

    /// The external data file, if one was supplied.
    pub fn data_file(&self) -> Option<&Arc<dyn Source>> {
        self.data_file.as_ref()
    }

    /// Supply a backing image for unallocated clusters (the caller opened
    /// it; the library never opens the backing file an image names).
    /// Without one, unallocated clusters read as zeros.
    pub fn set_backing(&mut self, backing: Arc<dyn Backing>) {
        self.backing = Some(backing);
    }

    /// The backing image, if one was supplied.
    pub fn backing(&self) -> Option<&Arc<dyn Backing>> {
        self.backing.as_ref()
    }

    /// Decode active L1 entry `index`.
    pub fn l1_entry(&self, index: u64) -> Result<L1Entry> {
        let at = self.l1_entry_offset(index);
        let guest = index.saturating_mul(self.geometry.l2_span());
        let Some(raw) = usize::try_from(index).ok().and_then(|i| self.l1.get(i)) else {
            // Like QEMU, guest ranges past the L1 table are unallocated
            // (only a snapshot's table can be shorter than the disk: the
            // active one is checked to cover it on open).
            if guest < self.header.size {
                return Ok(L1Entry {
                    l2_offset: None,
                    copied: false,
                });
            }
            return Err(Error::OutOfVirtualBounds {
                offset: guest,
                len: 0,
                size: self.header.size,
            });
        };
        L1Entry::decode(*raw, at, &self.geometry)
    }

    /// The image as internal snapshot `index` (of [`Image::snapshots`])
    /// left it: the snapshot's L1 table takes the place of the active one
    /// (read through the same bounded, checked path, then every entry and
    /// table it leads to checked as it is used), and the virtual size stays
    /// the image's, as `qemu-img convert -l` reads it (measured with
    /// qemu-img 10.0.2: a snapshot taken before a resize converts to the
    /// current size, zeros past its table).
    pub fn into_snapshot(mut self, index: usize) -> Result<Image<S>> {
        let snap = self
            .snapshots
            .get(index)
            .cloned()
            .ok_or(Error::InvalidSnapshot {
                offset: self.header.snapshots_offset,
                reason: "no such snapshot",
            })?;
        let bytes = u64::from(snap.l1_size).saturating_mul(8);
        let raw = read_vec(
            &self.src,
            What::SnapshotL1Table,
            snap.entry_offset,
            snap.l1_table_offset,
            bytes,
            self.limits.max_l1_entries.saturating_mul(8),
        )?;
        self.budget.charge(
            What::SnapshotL1Table,
            snap.entry_offset.saturating_add(8),
            bytes,
        )?;
        let l1 = be_u64s(&raw);
        let old = std::mem::replace(&mut self.l1, l1);
        self.budget
            .release(u64::try_from(old.len()).unwrap_or(0).saturating_mul(8));
        self.header.l1_table_offset = snap.l1_table_offset;
        self.header.l1_size = snap.l1_size;
        Ok(self)
    }

    /// File offset of active L1 entry `index`.
    pub fn l1_entry_offset(&self, index: u64) -> u64 {
        self.header
            .l1_table_offset
            .saturating_add(index.saturating_mul(8))
    }

    /// Read (through the cache) the L2 table at `l2_offset`, referenced by
    /// the L1 entry at file offset `l1_at`. Checks that the table is inside
    /// the file and does not overlap other metadata.
    pub fn l2_table(&self, l2_offset: u64, l1_at: u64) -> Result<Arc<L2Table>> {
        if let Ok(cache) = self.l2_cache.lock() {
            if let Some(t) = cache.get(l2_offset) {
                return Ok(t);
            }
        }
        let g = &self.geometry;
        span(
            What::L2Table,
            l1_at,
            l2_offset,
            g.cluster_size,
            self.file_len,
        )?;
        if let Some(r) = self
            .metadata()
            .find(l2_offset, g.cluster_size, &[What::L2Table])
        {
            return Err(Error::MetadataOverlap {
                what: What::L1Entry,
                offset: l1_at,
                target: l2_offset,
                other: r.what,
            });
        }
        let bytes = read_vec(
            &self.src,
            What::L2Table,
            l1_at,
            l2_offset,
            g.cluster_size,
            g.cluster_size,
        )?;
        let table = Arc::new(L2Table::new(l2_offset, &bytes, g));
        if let Ok(mut cache) = self.l2_cache.lock() {
            cache.insert(l2_offset, Arc::clone(&table));
        }
        Ok(table)
    }

    /// What guest cluster containing `guest_offset` maps to, with every
    /// pointer it depends on checked: L1 and L2 entries well formed, the L2
    /// table and any data it points to inside the file (or the supplied
    /// data file) and outside other metadata, compressed ranges within the
    /// file and the permitted inflation.
    pub fn cluster(&self, guest_offset: u64) -> Result<Cluster> {
        self.cluster_via(guest_offset, &mut None)
    }

    /// [`Image::cluster`], reusing `table` (the L2 table last used, with
    /// its L1 index) when `guest_offset` maps through the same L1 entry, and
    /// leaving the table used in it. A sequential walk then takes the cache
    /// lock once per L2 table instead of once per cluster; every entry is
    /// still decoded and checked.
    pub(crate) fn cluster_via(
        &self,
        guest_offset: u64,
        table: &mut Option<(u64, Arc<L2Table>)>,
    ) -> Result<Cluster> {
        let g = self.geometry;
        if guest_offset >= self.virtual_size() {
            return Err(Error::OutOfVirtualBounds {
                offset: guest_offset,
                len: 1,
                size: self.virtual_size(),
            });
        }
        let l1_index = guest_offset >> g.l2_span_bits();
        let l2_index = g.cluster_index(guest_offset) & g.l2_entries.wrapping_sub(1);
        if !matches!(table, Some((i, _)) if *i == l1_index) {
            *table = None;
            let l1_at = self.l1_entry_offset(l1_index);
            let Some(l2_offset) = self.l1_entry(l1_index)?.l2_offset else {
                return Ok(Cluster::Unallocated);
            };
            *table = Some((l1_index, self.l2_table(l2_offset, l1_at)?));
        }
        let Some((_, t)) = table.as_ref() else {
            return Ok(Cluster::Unallocated);
        };
        let idx = usize::try_from(l2_index).unwrap_or(usize::MAX);
        let (raw, bitmap, at) = t.raw(idx).ok_or_else(|| Error::Truncated {
            what: What::L2Table,
            offset: t.offset,
        })?;
        let data_file = self.header.has_data_file();
        let cluster = Cluster::decode(raw, bitmap, at, &g, data_file)?;
        if data_file {
            cluster.check_data_file_host(guest_offset & !g.cluster_size.wrapping_sub(1), at)?;
        }
        self.check_data_pointer(&cluster, at)?;
        Ok(cluster)
    }

    /// Check that the data a cluster points to can be read safely.
    /// (Whether a compressed cluster may exist at all is decided by
    /// [`Cluster::decode`].)
    fn check_data_pointer(&self, cluster: &Cluster, at: u64) -> Result<()> {
        let g = &self.geometry;
        if let Cluster::Compressed(d) = *cluster {
            d.validate(at, g, self.file_len)?;
            if let Some(r) = self.metadata().find(d.start(), d.span(), &[]) {
                return Err(Error::MetadataOverlap {
                    what: What::CompressedCluster,
                    offset: at,
                    target: d.start(),
                    other: r.what,
                });
            }
            return Ok(());
        }
        let Some((host, len)) = cluster.data_extent(g) else {
            return Ok(());
        };
        if self.header.has_data_file() {
            let data_len = self.data_source()?.len();
            return cluster.check_data_file_reach(g, self.virtual_size(), data_len, at);
        }
        span(What::DataCluster, at, host, len, self.file_len)?;
        match self.metadata().find(host, g.cluster_size, &[]) {
            Some(r) => Err(Error::MetadataOverlap {
                what: What::L2Entry,
                offset: at,
                target: host,
                other: r.what,
            }),
            None => Ok(()),
        }
    }

    /// Where uncompressed guest data is read from: the external data file
    /// when the image has one (the caller must have supplied it, see
    /// [`Image::set_data_file`]), else the image file itself.
    pub fn data_source(&self) -> Result<&dyn Source> {
        if !self.header.has_data_file() {
            return Ok(&self.src);
        }
        match &self.data_file {
            Some(df) => Ok(df.as_ref()),
            None => Err(Error::DataFileRequired {
                offset: field::INCOMPATIBLE_FEATURES,
            }),
        }
    }

    /// The compression type of the image's compressed clusters.
    pub fn compression_type(&self) -> Result<CompressionType> {
        self.header
            .compression()
            .ok_or(Error::UnknownCompressionType {
                offset: field::COMPRESSION_TYPE,
                value: self.header.compression_type,
            })
    }

    /// Read compressed cluster `d` (guest cluster at `guest`) and
    /// decompress it into `out`, exactly one cluster long; `input` is
    /// scratch space for the stream (at most one cluster + 511 bytes).
    /// The descriptor must have passed [`Descriptor::validate`] (as
    /// [`Image::cluster`] and `check` do). The file may end inside the
    /// range's last sector (QEMU does not pad a compressed write at the end
    /// of the file).
    pub fn read_compressed(
        &self,
        d: &Descriptor,
        guest: u64,
        input: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<()> {
        let (kind, start, len) = self.compressed_stream(d)?;
        input.resize(usize::try_from(len).unwrap_or(0), 0);
        read_into(&self.src, start, input)?;
        let outcome = compressed::decompress(kind, input, out);
        decompress_error(outcome, start, guest)
    }

    /// Whether compressed cluster `d` decompresses to exactly one cluster:
    /// what a source that already decompressed it says (a streamed
    /// inspection, [`Source::payload_outcome`]), else
    /// [`Image::read_compressed`].
    pub fn verify_compressed(
        &self,
        d: &Descriptor,
        guest: u64,
        input: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<()> {
        let (kind, start, len) = self.compressed_stream(d)?;
        let cs = self.geometry.cluster_size;
        match self.src.payload_outcome(kind, start, len, cs) {
            Some(outcome) => decompress_error(outcome, start, guest),
            None => self.read_compressed(d, guest, input, out),
        }
    }

    /// The compression type, start and readable length of the stream of
    /// compressed cluster `d`.
    fn compressed_stream(&self, d: &Descriptor) -> Result<(CompressionType, u64, u64)> {
        let kind = self.compression_type()?;
        let start = d.start();
        let len = d.readable_end(self.file_len).saturating_sub(start);
        let max = Descriptor::max_span(&self.geometry);
        if len > max {
            return Err(Error::CompressedInflation {
                offset: start,
                span: len,
                max,
            });
        }
        span(What::CompressedCluster, start, start, len, self.file_len)?;
        Ok((kind, start, len))
    }

    /// Decode refcount table entry `index`: the block's offset, if any.
    pub fn refcount_block_offset(&self, index: u64) -> Result<Option<u64>> {
        let at = self.refcount_entry_offset(index);
        let raw = usize::try_from(index)
            .ok()
            .and_then(|i| self.refcount_table.get(i))
            .copied()
            .unwrap_or(0);
        refcount::table_entry(raw, at, &self.geometry)
    }

    /// File offset of refcount table entry `index`.
    fn refcount_entry_offset(&self, index: u64) -> u64 {
        self.header
            .refcount_table_offset
            .saturating_add(index.saturating_mul(8))
    }

    /// Read the refcount block for refcount table entry `index`.
    pub fn refcount_block(&self, index: u64) -> Result<Option<Vec<u8>>> {
        let Some(off) = self.refcount_block_offset(index)? else {
            return Ok(None);
        };
        let at = self.refcount_entry_offset(index);
        let cs = self.geometry.cluster_size;
        read_vec(&self.src, What::RefcountBlock, at, off, cs, cs).map(Some)
    }

    /// The stored refcount of host cluster `cluster_index`.
    pub fn refcount(&self, cluster_index: u64) -> Result<u64> {
        let per = self.geometry.refcount_block_entries;
        let (Some(table_index), Some(block_index)) = (
            cluster_index.checked_div(per),
            cluster_index.checked_rem(per),
        ) else {
            return Ok(0);
        };
        let block = self.refcount_block(table_index)?;
        Ok(block
            .and_then(|b| refcount::get(&b, self.geometry.refcount_order, block_index))
            .unwrap_or(0))
    }

    /// Metadata ranges of the image: every structure
    /// [`walker::walk_tables`] finds (header cluster, L1 tables, L2 tables
    /// of the active and snapshot L1 tables, refcount table and blocks,
    /// snapshot table, bitmap directory, tables and data, encryption
    /// header), the same set `check` judges overlaps against. Built once,
    /// on first use.
    pub fn metadata(&self) -> &MetadataMap {
        self.metadata.get_or_init(|| walker::metadata(self))
    }
}

/// [`Error::Decompress`] for a failed decompression of the stream at host
/// offset `start` (guest cluster at `guest`).
fn decompress_error(
    outcome: std::result::Result<(), String>,
    start: u64,
    guest: u64,
) -> Result<()> {
    outcome.map_err(|reason| Error::Decompress {
        offset: start,
        guest_offset: guest,
        reason,
    })
}

/// Guest data of a backing image, handed in by the caller (see
/// [`Image::set_backing`]). Reads past [`Backing::size`] are never made:
/// the reader supplies zeros there, as QEMU does.
pub trait Backing: Send + Sync {
    /// Virtual size of the backing image in bytes.
    fn size(&self) -> u64;

    /// Fill `buf` with guest data from `offset`; the range lies within
    /// [`Backing::size`].
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// A raw file (or any [`Source`]) used as a backing image.
#[derive(Debug)]
pub struct RawBacking<S>(pub S);

impl<S: Source> Backing for RawBacking<S> {
    fn size(&self) -> u64 {
        self.0.len()
    }

    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_into(&self.0, offset, buf)
    }
}

/// A FIFO cache of L2 tables bounded by a byte budget.
#[derive(Debug)]
struct L2Cache {
    capacity: usize,
    map: HashMap<u64, Arc<L2Table>>,
    order: VecDeque<u64>,
}

impl L2Cache {
    fn new(budget: u64, cluster_size: u64) -> L2Cache {
        let n = budget.checked_div(cluster_size).unwrap_or(0).max(2);
        L2Cache {
            capacity: usize::try_from(n).unwrap_or(usize::MAX),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, offset: u64) -> Option<Arc<L2Table>> {
        self.map.get(&offset).cloned()
    }

    fn insert(&mut self, offset: u64, table: Arc<L2Table>) {
        if self.map.insert(offset, table).is_none() {
            self.order.push_back(offset);
        }
        while self.map.len() > self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
    }
}
