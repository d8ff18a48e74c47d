//! The audit behind [`super::check`]: a visitor of [`crate::walker`]'s
//! single traversal that judges what it finds (the refcount rebuild,
//! copied flags, overlaps, payloads). Decoding stays in the structure
//! modules and the traversal in the walker; this judges decoded values
//! against each other.

use std::collections::{HashMap, HashSet};

use super::payloads::{self, Budget, Verifier};
use super::tracked::{Counts, Flags};
use super::{code, CheckOptions, Findings, Stats};
use crate::bitmap::{self, Bitmap};
use crate::compressed::Descriptor;
use crate::compressed::OFLAG_COPIED;
use crate::error::{Result, What};
use crate::finding::{Category, Finding, Severity};
use crate::header::Geometry;
use crate::l1l2::{Cluster, OFFSET_MASK, OFLAG_ZERO};
use crate::metadata::MetadataMap;
use crate::refcount;
use crate::snapshot::Snapshot;
use crate::source::{read_into, span, Source};
use crate::walker::{self, Item, L1Table, L2Ref, Region, Visitor};
use crate::Image;

/// Walk `image`, adding to `findings`; `tracked` host clusters (the file
/// length in clusters, already bounded by the caller). `None` when the
/// clusters the tables touch need more pages than
/// [`CheckOptions::max_tracked_clusters`] ([`super::tracked`]): nothing was
/// judged.
pub(super) fn run<S: Source>(
    image: &Image<S>,
    opts: &CheckOptions,
    findings: Findings,
    stats: Stats,
    tracked: usize,
) -> Option<(Findings, Stats, TableUses)> {
    let g = *image.geometry();
    let mut walk = Walk {
        img: image,
        g,
        file_len: image.file_len(),
        nb: u64::try_from(tracked).unwrap_or(u64::MAX),
        dirty: image.header().is_dirty(),
        data_file: image.header().has_data_file(),
        data_file_len: image
            .data_file()
            .filter(|_| image.header().has_data_file())
            .map(|df| df.len()),
        v2: image.header().version < 3,
        computed: Counts::new(tracked, opts.max_tracked_clusters),
        block_offsets: Vec::new(),
        unknown_blocks: HashSet::new(),
        block: vec![0u8; idx(g.cluster_size)],
        values: Vec::new(),
        meta: Vec::new(),
        flags: Flags::new(tracked, opts.max_tracked_clusters),
        map: MetadataMap::default(),
        f: findings,
        stats,
        ids: HashMap::new(),
        decompress: opts.decompress && image.header().crypt_method == 0,
        budget: Budget::new(opts.max_decompressed_bytes),
        budget_spent_reported: false,
        ready: None,
        in_buf: Vec::new(),
        out_buf: Vec::new(),
        next_contiguous: None,
        uses: TableUses::new(),
        cur: TableUse::default(),
    };
    let tables = walker::walk_tables(image, &mut walk);
    if walk.over() {
        return None;
    }
    // Every metadata structure is known: overlaps between them.
    walk.metadata_overlaps();
    let (verify, budget) = (walk.decompress, walk.budget);
    payloads::walk_l2(image, &tables, &mut walk, verify, budget, opts.threads);
    if walk.over() {
        return None;
    }
    walk.compare_refcounts();
    Some((walk.f, walk.stats, walk.uses))
}

/// What one L2 table of the active layer maps, gathered by the audit's
/// walk for a conversion (which then needs no pass of its own over the
/// tables): keyed by table offset, for tables whose entries were walked.
pub(crate) type TableUses = HashMap<u64, TableUse>;

/// See [`TableUses`]. Entries that fail to decode count nothing (the
/// audit reports them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TableUse {
    /// Guest bytes mapped to host data: data and compressed clusters, and
    /// allocated subclusters.
    pub mapped: u64,
    /// Lowest start and highest end of the host bytes its uncompressed
    /// data is read from (`None`: no such data).
    pub data: Option<(u64, u64)>,
    /// Whether an entry is compressed.
    pub compressed: bool,
    /// Whether a cluster or subcluster is unallocated (read from a backing
    /// image, when there is one).
    pub unallocated: bool,
}

impl TableUse {
    /// Uncompressed data read from `host .. host + len`.
    #[inline]
    fn data(&mut self, host: u64, len: u64) {
        let end = host.saturating_add(len);
        self.data = Some(match self.data {
            Some((lo, hi)) => (lo.min(host), hi.max(end)),
            None => (host, end),
        });
    }

    fn note(&mut self, c: &Cluster, g: &Geometry) {
        match *c {
            Cluster::Data { .. } => self.mapped = self.mapped.saturating_add(g.cluster_size),
            Cluster::Compressed(_) => {
                self.mapped = self.mapped.saturating_add(g.cluster_size);
                self.compressed = true;
            }
            Cluster::Subclusters { alloc, zero, .. } => {
                self.mapped = self.mapped.saturating_add(
                    u64::from(alloc.count_ones()).saturating_mul(g.subcluster_size),
                );
                let count = u32::try_from(g.subclusters).unwrap_or(32);
                if (alloc | zero).count_ones() < count {
                    self.unallocated = true;
                }
            }
            Cluster::Unallocated => self.unallocated = true,
            Cluster::Zero { .. } => {}
        }
        if let Some((host, len)) = c.data_extent(g) {
            self.data(host, len);
        }
    }
}

/// A metadata structure found during the walk.
#[derive(Debug, Clone, Copy)]
struct Meta {
    what: What,
    start: u64,
    len: u64,
    /// Where the reference to it was found.
    at: u64,
}

struct Walk<'a, S> {
    img: &'a Image<S>,
    g: Geometry,
    file_len: u64,
    nb: u64,
    dirty: bool,
    data_file: bool,
    /// The external data file's length, when the caller handed it in
    /// ([`Image::set_data_file`]).
    data_file_len: Option<u64>,
    v2: bool,
    /// References found, per host cluster (saturating).
    computed: Counts,
    /// Per host cluster: whether it holds metadata, and whether its
    /// stored refcount is one (for the copied flags; the refcounts
    /// themselves are compared block by block at the end).
    flags: Flags,
    /// (refcount table index, block offset) of every block read, in index
    /// order (the walk visits the table in order).
    block_offsets: Vec<(u64, u64)>,
    /// Refcount table indexes whose block could not be read.
    unknown_blocks: HashSet<u64>,
    /// Scratch for one refcount block and its decoded values.
    block: Vec<u8>,
    values: Vec<u32>,
    meta: Vec<Meta>,
    map: MetadataMap,
    f: Findings,
    stats: Stats,
    /// Snapshot IDs seen, with their entry offsets.
    ids: HashMap<&'a str, u64>,
    decompress: bool,
    budget: Budget,
    budget_spent_reported: bool,
    /// The outcome of the next compressed entry's payload, verified on
    /// another thread ([`payloads`]).
    ready: Option<(u64, Result<()>)>,
    in_buf: Vec<u8>,
    out_buf: Vec<u8>,
    next_contiguous: Option<u64>,
    /// What the active tables map (for a conversion), and the table being
    /// walked.
    uses: TableUses,
    cur: TableUse,
}

fn idx(i: u64) -> usize {
    usize::try_from(i).unwrap_or(usize::MAX)
}

impl<'a, S: Source> Visitor<'a> for Walk<'a, S> {
    fn item(&mut self, item: Item<'a>) {
        match item {
            Item::Region(r) => self.region(r),
            Item::RefcountBlock { index, block, .. } => match block {
                Ok(off) => self.stored_refcounts(index, off),
                Err(e) => {
                    self.f.error(&e);
                    self.unknown_blocks.insert(index);
                }
            },
            Item::StaleBitmaps { at } => self.f.push(Finding::new(
                code::STALE_BITMAPS,
                Severity::Info,
                Category::Other,
                at,
                "bitmaps extension without autoclear bit 0: stale, ignored",
            )),
            Item::L1 {
                table,
                at,
                entry,
                l2,
                shared_with,
                ..
            } => {
                if let Some(first) = shared_with {
                    self.f.push(Finding::new(
                        code::L2_TABLE_SHARED,
                        Severity::Warning,
                        Category::Other,
                        at,
                        format!(
                            "L1 entry at {at:#x} points to the L2 table at {l2:#x}, like the entry at {first:#x}"
                        ),
                    ));
                }
                if table == L1Table::Active {
                    self.copied_check(entry.copied, l2, at, "L1 entry (L2 table)");
                }
            }
            Item::Snapshot(s) => self.snapshot(s),
            Item::Bitmap(b) => self.bitmap(b),
            Item::TablesDone => {}
            Item::L2Table(_) => {
                self.stats.l2_tables = self.stats.l2_tables.saturating_add(1);
                // Contiguity is counted within one L2 table, as QEMU does.
                self.next_contiguous = None;
            }
            Item::L2(e) => self.l2_entry(&e.table, e.index, e.at, e.raw, e.cluster),
            Item::Error(e) => self.f.error(&e),
        }
    }

    #[inline]
    fn l2_entry(&mut self, table: &L2Ref, index: u64, at: u64, raw: u64, cluster: Result<Cluster>) {
        match cluster {
            Ok(c) => {
                if table.active > 0 {
                    self.cur.note(&c, &self.g);
                }
                self.l2_entry_ok(table, index, at, raw, c)
            }
            Err(e) => self.f.error(&e),
        }
    }

    /// The common entries of standard tables (unallocated, v3 zero
    /// without a host cluster, and data clusters that pass every rule with
    /// nothing to report) in one tight loop, with exactly the effects
    /// [`Visitor::l2_entry`] would have; every other entry goes through
    /// it.
    fn l2_entries(&mut self, t: &L2Ref, words: &[u64], g: &Geometry, data_file: bool) {
        self.cur = TableUse::default();
        if g.extended_l2 || data_file || tests::general_only() {
            walker::decode_entries(self, t, words, g, data_file);
        } else {
            self.standard_entries(t, words, g);
        }
        if t.active > 0 {
            self.uses.insert(t.offset, self.cur);
        }
    }
}

impl<'a, S: Source> Verifier<'a> for Walk<'a, S> {
    fn precomputed(&mut self, at: u64, outcome: Result<()>) {
        self.ready = Some((at, outcome));
    }
}

impl<'a, S: Source> Walk<'a, S> {
    /// Whether a tracking array was refused a page: the walk's judgement
    /// would be incomplete.
    fn over(&self) -> bool {
        self.computed.over() || self.flags.over()
    }

    fn downgradable(&self, code: &'static str, offset: u64, msg: String) -> Finding {
        if self.dirty {
            Finding::new(
                code,
                Severity::Warning,
                Category::Leak,
                offset,
                format!("{msg} (image is dirty: refcounts are rebuilt by `qemu-img check -r all`)"),
            )
        } else {
            Finding::new(code, Severity::Error, Category::Corruption, offset, msg)
        }
    }

    /// Load the stored refcounts of refcount block `t` at `off` (the
    /// clusters with refcount one, for the copied flags).
    fn stored_refcounts(&mut self, t: u64, off: u64) {
        let per = self.g.refcount_block_entries;
        let first = t.saturating_mul(per);
        if first >= self.nb {
            return;
        }
        if let Err(e) = read_into(self.img.source(), off, &mut self.block) {
            self.f.error(&e);
            self.unknown_blocks.insert(t);
            return;
        }
        self.block_offsets.push((t, off));
        let n = per.min(self.nb.saturating_sub(first));
        self.values.clear();
        refcount::decode_block(&self.block, self.g.refcount_order, n, &mut self.values);
        self.flags.set_ones(first, &self.values);
    }

    /// The offset of refcount block `t`, if it was read.
    fn block_offset(&self, t: u64) -> Option<u64> {
        let i = self
            .block_offsets
            .binary_search_by_key(&t, |&(t, _)| t)
            .ok()?;
        self.block_offsets.get(i).map(|&(_, off)| off)
    }

    /// The first `count` stored refcounts of refcount block `t` (clamped
    /// to `u32::MAX`) into `out`, or `false` when they are unknown (a block
    /// that could not be read). A table index without a block, or past
    /// the table, reads as zeros. Only the entries asked for are decoded
    /// (a block of 1-bit refcounts covers 2^19 clusters at 64 KiB).
    fn stored_block(&mut self, t: u64, count: u64, block: &mut [u8], out: &mut Vec<u32>) -> bool {
        let per = self.g.refcount_block_entries.min(count);
        out.clear();
        if self.unknown_blocks.contains(&t) {
            return false;
        }
        let Some(off) = self.block_offset(t) else {
            out.resize(idx(per), 0);
            return true;
        };
        if let Err(e) = read_into(self.img.source(), off, block) {
            self.f.error(&e);
            self.unknown_blocks.insert(t);
            return false;
        }
        refcount::decode_block(block, self.g.refcount_order, per, out);
        true
    }

    /// Stored refcount of host cluster `c`, or `None` when unknown. Reads
    /// its refcount block: for findings only.
    fn stored(&mut self, c: u64) -> Option<u32> {
        let per = self.g.refcount_block_entries;
        let t = c.checked_div(per)?;
        let mut block = vec![0u8; idx(self.g.cluster_size)];
        let mut values = Vec::new();
        let j = c.checked_rem(per)?;
        if !self.stored_block(t, j.saturating_add(1), &mut block, &mut values) {
            return None;
        }
        values.get(idx(j)).copied()
    }

    /// Count one reference (times `refs`) to the cluster holding `offset`.
    fn reference(&mut self, offset: u64, refs: u32) {
        let c = self.g.cluster_index(offset);
        self.computed.add(idx(c), refs);
    }

    /// Count references to every cluster of `start .. start + len`.
    fn reference_range(&mut self, start: u64, len: u64, refs: u32) {
        if len == 0 {
            return;
        }
        let first = self.g.cluster_index(start);
        let last = self
            .g
            .cluster_index(start.saturating_add(len).saturating_sub(1))
            .min(self.nb.saturating_sub(1));
        let mut c = first;
        while c <= last {
            self.computed.add(idx(c), refs);
            c = c.saturating_add(1);
            if c == u64::MAX {
                break;
            }
        }
    }

    /// A metadata structure (inside the file: the walker checked): its
    /// clusters are referenced once per reference, and data must not lie
    /// in them.
    fn region(&mut self, r: Region) {
        let Region {
            what,
            start,
            len,
            at,
            refs,
        } = r;
        self.reference_range(start, len, 1);
        match what {
            // An L2 table is one cluster; a shared snapshot L1 table is
            // referenced once per snapshot.
            What::L2Table if refs > 1 => self.reference(start, refs.saturating_sub(1)),
            What::SnapshotL1Table if refs > 1 => {
                self.reference_range(start, len, refs.saturating_sub(1))
            }
            _ => {}
        }
        self.meta.push(Meta {
            what,
            start,
            len,
            at,
        });
        self.map.add(what, start, len);
        let first = self.g.cluster_index(start);
        let last = self
            .g
            .cluster_index(start.saturating_add(len).saturating_sub(1));
        let mut c = first;
        while c <= last && c < self.nb {
            self.flags.set_meta(c);
            c = c.saturating_add(1);
        }
    }

    /// Bit 63 must be set exactly when the stored refcount is one. Checked
    /// for the active tables only, like QEMU.
    fn copied_check(&mut self, copied: bool, host: u64, at: u64, what: &str) {
        let c = self.g.cluster_index(host);
        if c >= self.nb {
            return;
        }
        let t = c.checked_div(self.g.refcount_block_entries);
        if copied == self.flags.one(c)
            || t.is_none_or(|t| !self.unknown_blocks.is_empty() && self.unknown_blocks.contains(&t))
        {
            return;
        }
        let Some(stored) = self.stored(c) else { return };
        if copied != (stored == 1) {
            let msg = format!(
                "{what} at {at:#x}: copied flag is {} but the refcount of {host:#x} is {stored}",
                u8::from(copied)
            );
            let f = self.downgradable(code::COPIED_FLAG_MISMATCH, at, msg);
            self.f.push(f);
        }
    }

    fn snapshot(&mut self, s: &'a Snapshot) {
        if let Some(first) = self.ids.insert(s.id.as_str(), s.entry_offset) {
            self.f.push(Finding::new(
                code::DUPLICATE_SNAPSHOT_ID,
                Severity::Error,
                Category::Corruption,
                s.entry_offset,
                format!(
                    "snapshot ID {:?} at {:#x} is also used at {first:#x}",
                    s.id, s.entry_offset
                ),
            ));
        }
        if let Some(size) = s.disk_size {
            let needed = self.g.l1_entries_for(size);
            if u64::from(s.l1_size) < needed {
                self.f.push(Finding::new(
                    code::SNAPSHOT_L1_TOO_SMALL,
                    Severity::Error,
                    Category::Corruption,
                    s.entry_offset.saturating_add(8),
                    format!(
                        "snapshot {:?}: L1 table has {} entries, its disk size {size} needs {needed}",
                        s.id, s.l1_size
                    ),
                ));
            }
        }
    }

    fn bitmap(&mut self, b: &Bitmap) {
        if b.flags & bitmap::FLAG_IN_USE != 0 {
            self.f.push(Finding::new(
                code::BITMAP_IN_USE,
                Severity::Warning,
                Category::Other,
                b.entry_offset,
                format!("bitmap {:?} is marked in use (inconsistent)", b.name),
            ));
        }
    }

    fn metadata_overlaps(&mut self) {
        self.map.finish();
        let cs = self.g.cluster_size;
        let mut meta = std::mem::take(&mut self.meta);
        meta.sort_by_key(|m| (m.start, m.len));
        // Cluster-granular: QEMU gives every structure clusters of its own.
        let mut widest: Option<(Meta, u64)> = None;
        for m in &meta {
            let first = self.g.cluster_start(m.start);
            let end = m
                .start
                .saturating_add(m.len)
                .saturating_add(cs.saturating_sub(1))
                & !cs.saturating_sub(1);
            if let Some((w, wend)) = widest {
                if first < wend {
                    self.f.push(Finding::new(
                        code::METADATA_OVERLAP,
                        Severity::Error,
                        Category::Corruption,
                        m.at,
                        format!(
                            "{} at {:#x} (+{:#x}, referenced at {:#x}) shares host clusters with the {} at {:#x} (+{:#x}, referenced at {:#x})",
                            m.what, m.start, m.len, m.at, w.what, w.start, w.len, w.at
                        ),
                    ));
                }
                if end > wend {
                    widest = Some((*m, end));
                }
            } else {
                widest = Some((*m, end));
            }
        }
        self.meta = meta;
    }

    /// Data at host cluster `c` (referenced at `at`) must not be metadata.
    fn data_cluster_ok(&mut self, what: What, host: u64, len: u64, at: u64) {
        let first = self.g.cluster_index(host);
        let last = self
            .g
            .cluster_index(host.saturating_add(len).saturating_sub(1));
        let mut c = first;
        while c <= last {
            if self.flags.meta(c) {
                // Name the structure only for findings that are stored
                // (the lookup is not constant time).
                let other = if !self.f.storing() {
                    "metadata"
                } else {
                    self.map
                        .find(
                            self.g.cluster_start(host),
                            len.max(1).saturating_add(self.g.offset_in_cluster(host)),
                            &[],
                        )
                        .map_or("metadata", |r| r.what.as_str())
                };
                self.f.push(Finding::new(
                    code::DATA_OVERLAPS_METADATA,
                    Severity::Error,
                    Category::Corruption,
                    at,
                    format!(
                        "{what} at {host:#x} (entry at {at:#x}) lies in a cluster of the {other}"
                    ),
                ));
                return;
            }
            c = c.saturating_add(1);
        }
    }

    fn standard_entries(&mut self, t: &L2Ref, words: &[u64], g: &Geometry) {
        let cs = g.cluster_size;
        let in_cluster = cs.saturating_sub(1);
        let active = t.active > 0;
        // A data cluster at `host <= last` lies in the file.
        let last = self.file_len.checked_sub(cs);
        let zero_ok = !self.v2;
        // A plain data entry: no reserved or compressed bit, aligned, in
        // the file.
        let plain = |raw: u64| {
            let host = raw & OFFSET_MASK;
            raw & !(OFFSET_MASK | OFLAG_COPIED) == 0
                && host & in_cluster == 0
                && host != 0
                && last.is_some_and(|l| host <= l)
        };
        let mut i = 0usize;
        while let Some(&raw) = words.get(i) {
            let index = u64::try_from(i).unwrap_or(u64::MAX);
            let here = t.offset.saturating_add(index.saturating_mul(8));
            if raw == 0 || (raw == OFLAG_ZERO && zero_ok) {
                if raw == 0 && active {
                    self.cur.unallocated = true;
                }
                i = i.saturating_add(1);
                continue;
            }
            if plain(raw) {
                let host = raw & OFFSET_MASK;
                let c = g.cluster_index(host);
                // The run of entries naming the next host clusters with
                // the same flags, within the 64 clusters of one flags
                // word: judged together by the same rules (tables written
                // in order, and preallocated ones, are mostly such runs).
                let room = 64usize.saturating_sub(usize::try_from(c % 64).unwrap_or(0));
                let rest = words.get(i..).unwrap_or(&[]);
                let mut n = 1usize;
                let mut next = raw;
                for &w in rest.iter().take(room).skip(1) {
                    match next.checked_add(cs) {
                        Some(x) if x == w => {
                            next = x;
                            n = n.saturating_add(1);
                        }
                        _ => break,
                    }
                }
                // The last entry is plain, so are those between.
                if n > 1 && !plain(next) {
                    n = 1;
                }
                let copied = raw & OFLAG_COPIED != 0;
                let (meta, one) = self.flags.words(c);
                let mask = u64::MAX
                    .checked_shr(64u32.saturating_sub(u32::try_from(n).unwrap_or(64)))
                    .unwrap_or(0)
                    .checked_shl(u32::try_from(c % 64).unwrap_or(0))
                    .unwrap_or(0);
                let one_ok = if copied {
                    one & mask == mask
                } else {
                    one & mask == 0
                };
                if meta & mask == 0 && (!active || one_ok) {
                    let len = u64::try_from(n).unwrap_or(u64::MAX).saturating_mul(cs);
                    if active {
                        self.stats.allocated_clusters = self
                            .stats
                            .allocated_clusters
                            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
                        if self.next_contiguous.is_some_and(|x| x != host) {
                            self.stats.fragmented_clusters =
                                self.stats.fragmented_clusters.saturating_add(1);
                        }
                        self.next_contiguous = Some(host.saturating_add(len));
                        self.cur.mapped = self.cur.mapped.saturating_add(len);
                        self.cur.data(host, len);
                    }
                    self.computed.add_run(idx(c), n, t.refs);
                    i = i.saturating_add(n);
                    continue;
                }
            }
            let cluster = Cluster::decode(raw, None, here, g, false);
            self.l2_entry(t, index, here, raw, cluster);
            i = i.saturating_add(1);
        }
    }

    #[inline]
    fn l2_entry_ok(&mut self, r: &L2Ref, index: u64, at: u64, raw: u64, cluster: Cluster) {
        let g = self.g;
        let guest = r.guest_offset(index, &g);
        let active = r.active > 0;
        if self.v2 && crate::l1l2::zero_flag_in_v2(raw, &g) {
            self.f.push(Finding::new(
                code::ZERO_FLAG_IN_V2,
                Severity::Error,
                Category::Corruption,
                at,
                format!(
                    "L2 entry at {at:#x} sets the zero flag (bit 0), reserved in version 2 images"
                ),
            ));
        }
        match cluster {
            Cluster::Unallocated | Cluster::Zero { host: None, .. } => {}
            Cluster::Compressed(d) => self.compressed(d, at, guest, r.active > 0, r.refs),
            Cluster::Data { host, copied }
            | Cluster::Zero {
                host: Some(host),
                copied,
            }
            | Cluster::Subclusters {
                host: Some(host),
                copied,
                ..
            } => {
                if active {
                    self.stats.allocated_clusters = self.stats.allocated_clusters.saturating_add(1);
                    if self.next_contiguous.is_some_and(|n| n != host) {
                        self.stats.fragmented_clusters =
                            self.stats.fragmented_clusters.saturating_add(1);
                    }
                    self.next_contiguous = Some(host.saturating_add(g.cluster_size));
                }
                if self.data_file {
                    // Data lives in the external file: no refcount here.
                    if active && !copied {
                        let f = self.downgradable(
                            code::COPIED_FLAG_MISMATCH,
                            at,
                            format!("L2 entry at {at:#x}: clusters in an external data file must have the copied flag"),
                        );
                        self.f.push(f);
                    }
                    if let Some(len) = self.data_file_len {
                        let disk = self.img.virtual_size();
                        if let Err(e) = cluster.check_data_file_reach(&g, disk, len, at) {
                            self.f.error(&e);
                        }
                    }
                    return;
                }
                // The bytes a guest read can reach must be in the file:
                // the whole cluster for standard entries, up to the last
                // allocated subcluster for extended ones (QEMU does not
                // extend the file past a subcluster write), and only the
                // cluster's start for preallocated zeros (never read).
                let reached = cluster.data_extent(&g).map_or(1, |(_, len)| len);
                if let Err(e) = span(What::DataCluster, at, host, reached, self.file_len) {
                    self.f.error(&e);
                    return;
                }
                self.reference(host, r.refs);
                self.data_cluster_ok(What::DataCluster, host, g.cluster_size, at);
                if active {
                    self.copied_check(copied, host, at, "L2 entry (data cluster)");
                }
            }
            Cluster::Subclusters { host: None, .. } => {}
        }
    }

    fn compressed(&mut self, d: Descriptor, at: u64, guest: u64, active: bool, refs: u32) {
        let g = self.g;
        if active {
            self.stats.allocated_clusters = self.stats.allocated_clusters.saturating_add(1);
            self.stats.compressed_clusters = self.stats.compressed_clusters.saturating_add(1);
            // Fragmented by nature (QEMU's count); the contiguity of the
            // standard clusters around it is unaffected.
            self.stats.fragmented_clusters = self.stats.fragmented_clusters.saturating_add(1);
        }
        // Count the references first, like QEMU, whatever is wrong with
        // the range (clusters past the end of the file are findings).
        if d.start() >> crate::qemu::MAX_HOST_OFFSET_BITS == 0 {
            for c in d.host_clusters(&g) {
                if c >= self.nb {
                    break;
                }
                self.computed.add(idx(c), refs);
            }
        }
        if let Err(e) = d.validate(at, &g, self.file_len) {
            self.f.error(&e);
            return;
        }
        if d.tail_cut_by_eof(self.file_len) {
            self.f.push(Finding::new(
                code::COMPRESSED_TAIL_PAST_EOF,
                Severity::Info,
                Category::Other,
                at,
                format!(
                    "compressed cluster at {:#x}: the last sector of its range ends at {:#x}, past the end of the file at {:#x} (QEMU does not pad compressed writes)",
                    d.start(),
                    d.end(),
                    self.file_len
                ),
            ));
        }
        self.data_cluster_ok(What::CompressedCluster, d.start(), d.span(), at);
        if !self.decompress {
            return;
        }
        if !self.budget.take(g.cluster_size) {
            if !self.budget_spent_reported {
                self.budget_spent_reported = true;
                let budget = self.budget.max();
                self.f.push(Finding::new(
                    code::DECOMPRESS_BUDGET,
                    Severity::Warning,
                    Category::Other,
                    at,
                    format!("decompression budget of {budget} bytes spent; later compressed clusters were not verified"),
                ));
            }
            return;
        }
        let outcome = match self.ready.take() {
            Some((a, outcome)) if a == at => outcome,
            _ => {
                self.out_buf.resize(idx(g.cluster_size), 0);
                self.img
                    .verify_compressed(&d, guest, &mut self.in_buf, &mut self.out_buf)
            }
        };
        match outcome {
            Ok(()) => {
                self.stats.decompressed_clusters =
                    self.stats.decompressed_clusters.saturating_add(1);
            }
            Err(e) => self.f.error(&e),
        }
    }

    /// Rebuilt against stored refcounts, one refcount block at a time
    /// (equal blocks cost a comparison of two slices; blocks nothing
    /// references and the file does not store are skipped).
    fn compare_refcounts(&mut self) {
        let per = self.g.refcount_block_entries.max(1);
        let table_len = u64::try_from(self.img.refcount_table().len()).unwrap_or(u64::MAX);
        let cs = self.g.cluster_size;
        let mut highest: Option<u64> = None;
        let mut block = std::mem::take(&mut self.block);
        // The last block the walk read is still decoded (one read less:
        // small images have one block).
        let last = std::mem::take(&mut self.values);
        let last_block = self.block_offsets.last().map(|&(t, _)| t);
        let (mut values, mut needs) = (Vec::new(), Vec::new());
        // The blocks the file stores (or failed to), in order: with the
        // pages of references, the only blocks to look at (a sparse file
        // of terabytes is not walked block by block).
        let mut stored: Vec<u64> = self
            .block_offsets
            .iter()
            .map(|&(t, _)| t)
            .chain(self.unknown_blocks.iter().copied())
            .collect();
        stored.sort_unstable();
        stored.dedup();
        let mut next_stored = stored.iter().copied().peekable();
        let mut first = 0u64;
        while first < self.nb {
            let t = first.checked_div(per).unwrap_or(0);
            let count = per.min(self.nb.saturating_sub(first));
            let next = first.saturating_add(count);
            while next_stored.next_if(|&s| s < t).is_some() {}
            let stored_here = next_stored.peek() == Some(&t);
            if !stored_here && self.computed.none_in(idx(first), idx(count)) {
                // On to the next block stored or referenced.
                let referenced = self
                    .computed
                    .next_page_from(idx(next))
                    .and_then(|c| u64::try_from(c).ok())
                    .map(|c| c.checked_div(per).unwrap_or(0).saturating_mul(per));
                let stored_at = next_stored.peek().map(|s| s.saturating_mul(per));
                first = match (referenced, stored_at) {
                    (Some(a), Some(b)) => a.min(b),
                    (a, b) => a.or(b).unwrap_or(self.nb),
                }
                .max(next);
                continue;
            }
            let cached = last_block == Some(t) && u64::try_from(last.len()) == Ok(count);
            let known = cached || self.stored_block(t, count, &mut block, &mut values);
            let values: &[u32] = if cached { &last } else { &values };
            self.computed.segment(idx(first), idx(count), &mut needs);
            let at = |j: usize| first.saturating_add(u64::try_from(j).unwrap_or(u64::MAX));
            if !known {
                if let Some(j) = needs.iter().rposition(|&n| n > 0) {
                    highest = Some(at(j));
                }
                first = next;
                continue;
            }
            if let Some(j) = needs
                .iter()
                .zip(values)
                .rposition(|(&n, &h)| n > 0 || h > 0)
            {
                highest = Some(at(j));
            }
            if needs != values {
                for (j, (&need, &have)) in needs.iter().zip(values).enumerate() {
                    if need != have {
                        self.mismatch(at(j), need, have, table_len);
                    }
                }
            }
            first = next;
        }
        self.stats.image_end_offset = highest.map_or(0, |c| c.saturating_add(1).saturating_mul(cs));
    }

    /// Host cluster `c` is referenced `need` times; its stored refcount
    /// is `have`.
    fn mismatch(&mut self, c: u64, need: u32, have: u32, table_len: u64) {
        let per = self.g.refcount_block_entries;
        let offset = c.saturating_mul(self.g.cluster_size);
        if need > have && have < u32::MAX {
            self.stats.corruptions = self.stats.corruptions.saturating_add(1);
            let beyond = c.checked_div(per).is_none_or(|t| t >= table_len);
            let (code, msg) = if beyond {
                (
                    code::REFCOUNT_BEYOND_TABLE,
                    format!("cluster at {offset:#x} is referenced {need} times but the refcount table does not cover it"),
                )
            } else {
                (
                    code::REFCOUNT_TOO_LOW,
                    format!("cluster at {offset:#x}: refcount {have}, referenced {need} times"),
                )
            };
            let f = self.downgradable(code, offset, msg);
            self.f.push(f);
        } else if have > need && need < u32::MAX {
            self.stats.leaks = self.stats.leaks.saturating_add(1);
            self.f.push(Finding::new(
                code::LEAKED_CLUSTER,
                Severity::Warning,
                Category::Leak,
                offset,
                format!(
                    "cluster at {offset:#x}: refcount {have}, referenced {need} times (leaked)"
                ),
            ));
        }
    }
}

/// Without `cfg(test)`: the fast loop is always taken where it applies.
#[cfg(not(test))]
mod tests {
    #[inline(always)]
    pub(super) fn general_only() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::build::{GuestCluster, ImageModel, SnapshotModel};
    use crate::check::{check_judged, CheckOptions, Report};
    use crate::compressed::OFLAG_COMPRESSED;
    use crate::l1l2::L1Entry;

    thread_local! {
        /// Set by [`fast_and_general_paths_agree_on_hostile_tables`]: every
        /// standard entry through [`Visitor::l2_entry`].
        static GENERAL_ONLY: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn general_only() -> bool {
        GENERAL_ONLY.with(Cell::get)
    }

    /// The audit of `bytes` (one thread, so the walk runs here) through
    /// the fast loop or only the general path: its report and table uses.
    fn audit(bytes: &[u8], general: bool) -> Option<(Report, Vec<(u64, TableUse)>)> {
        let image = Image::open(bytes).ok()?;
        let opts = CheckOptions {
            threads: 1,
            ..CheckOptions::default()
        };
        GENERAL_ONLY.with(|g| g.set(general));
        let (report, uses) = check_judged(&image, &opts, image.policy_findings(&opts.policy));
        GENERAL_ONLY.with(|g| g.set(false));
        let mut uses: Vec<_> = uses.into_iter().collect();
        uses.sort_by_key(|(k, _)| *k);
        Some((report, uses))
    }

    /// The fast loop of standard tables restates which entries the audit
    /// has nothing to say about; the general path is the rule. On built
    /// images whose L2 entries are replaced by hostile words (reserved
    /// bits, zero and compressed flags, copied flag flipped, unaligned,
    /// past or at the end of the file, into metadata, onto another data
    /// cluster, offset 0 with flags), in v2 and v3, with and without a
    /// snapshot (tables with several references), both give the same
    /// findings (code, offset, message, in order), counts, statistics,
    /// verdict and table uses.
    #[test]
    fn fast_and_general_paths_agree_on_hostile_tables() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut compared = 0;
        for round in 0..160u64 {
            let version = if round % 4 == 3 { 2 } else { 3 };
            let cluster_bits = [9, 12, 16][usize::try_from(round % 3).unwrap_or(0)];
            let clusters = (0..24u8)
                .map(|i| match next() % 5 {
                    0 => GuestCluster::Unallocated,
                    1 if version == 3 => GuestCluster::Zero,
                    2 => GuestCluster::Compressed(i),
                    _ => GuestCluster::Data(i),
                })
                .collect();
            let snapshots = if round % 2 == 1 {
                vec![SnapshotModel { name: "s".into() }]
            } else {
                Vec::new()
            };
            let model = ImageModel {
                version,
                cluster_bits,
                feature_table: version == 3,
                clusters,
                snapshots,
                ..ImageModel::default()
            };
            let Ok(built) = model.build() else { continue };
            let mut bytes = built.bytes;
            let Ok(image) = Image::open(bytes.as_slice()) else {
                continue;
            };
            let g = *image.geometry();
            let Ok(L1Entry {
                l2_offset: Some(l2),
                ..
            }) = image.l1_entry(0)
            else {
                continue;
            };
            let len = u64::try_from(bytes.len()).unwrap_or(0);
            let cs = g.cluster_size;
            let l1 = image.header().l1_table_offset;
            let rt = image.header().refcount_table_offset;
            drop(image);
            let at = |i: u64| usize::try_from(l2 + 8 * i).unwrap_or(usize::MAX);
            let word = |b: &[u8], i: u64| {
                b.get(at(i)..at(i) + 8)
                    .and_then(|w| w.try_into().ok())
                    .map_or(0, u64::from_be_bytes)
            };
            let hosts: Vec<u64> = (0..24).map(|i| word(&bytes, i) & OFFSET_MASK).collect();
            let put = |b: &mut Vec<u8>, i: u64, w: u64| {
                if let Some(slot) = b.get_mut(at(i)..at(i) + 8) {
                    slot.copy_from_slice(&w.to_be_bytes());
                }
            };
            for i in 0..24u64 {
                if next() % 3 != 0 {
                    continue;
                }
                // Runs of entries naming consecutive clusters (the fast
                // loop judges such runs together): from an existing
                // cluster, over whatever follows it (data of other
                // entries, metadata, clusters with other refcounts), or
                // from the file's second-to-last cluster on past its end.
                if next() % 6 == 0 {
                    let copied = if next() % 3 == 0 { 0 } else { OFLAG_COPIED };
                    let from = if next() % 2 == 0 {
                        hosts[usize::try_from(next() % 24).unwrap_or(0)].max(cs)
                    } else {
                        (len.saturating_sub(2 * cs) & !(cs - 1)).max(cs)
                    };
                    for j in 0..(2 + next() % 6).min(24 - i) {
                        put(&mut bytes, i + j, copied | (from + j * cs));
                    }
                    continue;
                }
                let raw = word(&bytes, i);
                let other = hosts[usize::try_from(next() % 24).unwrap_or(0)];
                let copied = if next() % 2 == 0 { OFLAG_COPIED } else { 0 };
                let hostile = match next() % 14 {
                    0 => raw | 1 << (1 + next() % 8),
                    1 => raw | 1 << (56 + next() % 6),
                    2 => raw ^ OFLAG_COPIED,
                    3 => raw | OFLAG_ZERO,
                    4 => raw | OFLAG_COMPRESSED,
                    5 => (raw & !OFFSET_MASK) | ((raw & OFFSET_MASK) + 512),
                    6 => copied | (len - len % cs),
                    7 => copied | (len.saturating_sub(cs) & !(cs - 1)),
                    8 => copied | (l1 & !(cs - 1)),
                    9 => copied | rt,
                    10 => copied | l2,
                    11 => (raw & !OFFSET_MASK) | other,
                    12 => OFLAG_COPIED,
                    _ => [OFLAG_ZERO, OFLAG_ZERO | OFLAG_COPIED, OFLAG_ZERO | other]
                        [usize::try_from(next() % 3).unwrap_or(0)],
                };
                put(&mut bytes, i, hostile);
            }
            let (Some(fast), Some(general)) = (audit(&bytes, false), audit(&bytes, true)) else {
                continue;
            };
            let show = |r: &Report| {
                r.findings
                    .iter()
                    .map(|f| format!("{} {:#x} {}", f.code, f.offset, f.message))
                    .collect::<Vec<_>>()
            };
            assert_eq!(show(&fast.0), show(&general.0), "round {round}");
            assert_eq!(fast.0.counts, general.0.counts, "round {round}");
            assert_eq!(fast.0.stats, general.0.stats, "round {round}");
            assert_eq!(fast.0.verdict, general.0.verdict, "round {round}");
            assert_eq!(fast.1, general.1, "round {round}");
            compared += 1;
        }
        assert!(compared > 100, "only {compared} images compared");
    }

    #[test]
    fn decode_block_agrees_with_get() {
        let block: Vec<u8> = (0..=255u8)
            .cycle()
            .take(512)
            .map(|b| b.wrapping_mul(37).wrapping_add(11))
            .collect();
        for order in 0..=7 {
            let per: usize = (512 * 8) >> order.min(6);
            let mut out = vec![9];
            refcount::decode_block(&block, order, per as u64 + 3, &mut out);
            assert_eq!(out.len(), 1 + per + 3);
            for (j, &got) in out[1..].iter().enumerate() {
                let want = refcount::get(&block, order, j as u64)
                    .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
                assert_eq!(got, want, "order {order} entry {j}");
            }
        }
    }
}
