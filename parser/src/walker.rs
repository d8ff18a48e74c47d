//! One traversal of an image's tables: every metadata structure and every
//! table entry, decoded once, typed and located.
//!
//! [`walk`] visits, in this order: the refcount table (its blocks), the
//! fixed structures (header cluster, L1 table, refcount table, snapshot
//! table, bitmap directory, encryption header), the active L1 table, the
//! snapshots and their L1 tables, the L2 tables those name, the bitmaps and
//! their tables, then ([`Item::TablesDone`]) the entries of every distinct
//! L2 table. Each item goes to the caller's visitor; nothing is judged
//! here beyond what decoding an entry checks (the rules of
//! [`crate::l1l2`], [`crate::refcount`], [`crate::bitmap`]) and whether a
//! structure lies inside the file.
//!
//! Its consumers: [`Image::metadata`] (the metadata regions reads refuse
//! to treat as guest data, from [`walk_tables`]), [`crate::check()`] (the
//! audit) and the fuzz targets. Work is bounded by the file: each distinct
//! table is read once, snapshot L1 tables that overlap an earlier one are
//! not walked again, and tables that do not lie in the file are reported,
//! never remembered.
//!
//! ```
//! use qcow2_guard::build::{GuestCluster, ImageModel};
//! use qcow2_guard::walker::{walk, Item};
//! use qcow2_guard::{Image, What};
//!
//! let built = ImageModel {
//!     cluster_bits: 12,
//!     clusters: vec![GuestCluster::Data(1), GuestCluster::Zero],
//!     ..ImageModel::default()
//! }
//! .build()?;
//! let image = Image::open(built.bytes.as_slice())?;
//! let (mut l2_tables, mut entries, mut errors) = (0, 0, 0);
//! walk(&image, &mut |item: Item<'_>| match item {
//!     Item::Region(r) if r.what == What::L2Table => l2_tables += 1,
//!     Item::L2(_) => entries += 1,
//!     Item::Error(_) => errors += 1,
//!     _ => {}
//! });
//! // One L2 table of 512 entries (4 KiB clusters), all of it walked.
//! assert_eq!((l2_tables, entries, errors), (1, 512, 0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;

use crate::bitmap::{self, Bitmap};
use crate::error::{Error, Result, What};
use crate::header::{field, Geometry};
use crate::l1l2::{Cluster, L1Entry};
use crate::metadata::MetadataMap;
use crate::snapshot::Snapshot;
use crate::source::{be_u64s, read_into, span, Source};
use crate::Image;

/// A metadata structure in the image file, inside the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// What is stored there.
    pub what: What,
    /// File offset of the first byte.
    pub start: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// File offset of the reference to it (a header field, an extension,
    /// a table entry); the first one when several name it.
    pub at: u64,
    /// How many references name it: L2 tables named by several L1 entries
    /// and snapshot L1 tables shared by several snapshots are walked once,
    /// with their multiplicity here. 1 for everything else.
    pub refs: u32,
}

/// Which L1 table an entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Table {
    /// The active L1 table.
    Active,
    /// A snapshot's L1 table (identical tables are walked once).
    Snapshot,
}

/// A distinct L2 table, named by one or more L1 entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Ref {
    /// File offset of the table.
    pub offset: u64,
    /// References from all L1 tables (snapshot tables count with their
    /// multiplicity).
    pub refs: u32,
    /// References from the active L1 table.
    pub active: u32,
    /// File offset of the first L1 entry naming it.
    pub at: u64,
    /// L1 index of that entry (for guest offsets).
    pub l1_index: u64,
}

impl L2Ref {
    /// Guest offset mapped by entry `index`, through the first L1 entry
    /// naming the table.
    pub fn guest_offset(&self, index: u64, g: &Geometry) -> u64 {
        self.l1_index
            .saturating_mul(g.l2_span())
            .saturating_add(index.saturating_mul(g.cluster_size))
    }
}

/// An entry of an L2 table.
#[derive(Debug)]
pub struct L2Entry {
    /// The table.
    pub table: L2Ref,
    /// Index in the table.
    pub index: u64,
    /// File offset of the entry.
    pub at: u64,
    /// The raw (first) word of the entry.
    pub raw: u64,
    /// The decoded entry.
    pub cluster: Result<Cluster>,
}

/// What the walk hands its items to. Any `FnMut(Item)` closure is one.
pub trait Visitor<'a> {
    /// One item, in walk order.
    fn item(&mut self, item: Item<'a>);

    /// One L2 entry: [`Item::L2`] to [`Visitor::item`] unless overridden
    /// (a visitor with a hot path of its own keeps it out of the large
    /// match).
    fn l2_entry(&mut self, table: &L2Ref, index: u64, at: u64, raw: u64, cluster: Result<Cluster>) {
        self.item(Item::L2(L2Entry {
            table: *table,
            index,
            at,
            raw,
            cluster,
        }));
    }

    /// All entries of one L2 table, `words` being its big-endian words
    /// (two per entry with extended L2): unless overridden, each entry is
    /// decoded and handed to [`Visitor::l2_entry`] in order
    /// ([`decode_entries`]). A visitor may judge the common entries of a
    /// whole table in one tight loop, as long as it sees what
    /// [`decode_entries`] would have shown it.
    fn l2_entries(&mut self, table: &L2Ref, words: &[u64], g: &Geometry, data_file: bool) {
        decode_entries(self, table, words, g, data_file);
    }
}

/// Decode every entry of an L2 table (`words`, as [`Visitor::l2_entries`]
/// receives them) and hand each to `visit`'s [`Visitor::l2_entry`].
pub fn decode_entries<'a, V: Visitor<'a> + ?Sized>(
    visit: &mut V,
    table: &L2Ref,
    words: &[u64],
    g: &Geometry,
    data_file: bool,
) {
    let per = if g.extended_l2 { 2 } else { 1 };
    let step = 8u64.saturating_mul(u64::try_from(per).unwrap_or(1));
    let mut at = table.offset;
    for (index, w) in (0u64..).zip(words.chunks_exact(per)) {
        let raw = w.first().copied().unwrap_or(0);
        let bitmap = if g.extended_l2 {
            w.get(1).copied()
        } else {
            None
        };
        let cluster = Cluster::decode(raw, bitmap, at, g, data_file).and_then(|c| {
            if data_file {
                c.check_data_file_host(table.guest_offset(index, g), at)?;
            }
            Ok(c)
        });
        visit.l2_entry(table, index, at, raw, cluster);
        at = at.saturating_add(step);
    }
}

impl<'a, F: FnMut(Item<'a>)> Visitor<'a> for F {
    fn item(&mut self, item: Item<'a>) {
        self(item)
    }
}

/// One thing the walk found.
#[derive(Debug)]
pub enum Item<'a> {
    /// A metadata structure, inside the file (one that is not is an
    /// [`Item::Error`] instead).
    Region(Region),
    /// A refcount table entry naming a refcount block inside the file
    /// (`Ok`, after its [`Item::Region`]), or one that fails to decode or
    /// lies outside the file (`Err`).
    RefcountBlock {
        /// Index in the refcount table.
        index: u64,
        /// File offset of the entry.
        at: u64,
        /// The block's file offset.
        block: Result<u64>,
    },
    /// The bitmaps extension at `at` is stale (autoclear bit 0 clear): its
    /// directory is neither read nor walked.
    StaleBitmaps {
        /// File offset of the extension.
        at: u64,
    },
    /// An allocated L1 entry whose L2 table lies in the file.
    L1 {
        /// Active or snapshot table.
        table: L1Table,
        /// Index in its table.
        index: u64,
        /// File offset of the entry.
        at: u64,
        /// The decoded entry.
        entry: L1Entry,
        /// The L2 table it names.
        l2: u64,
        /// File offset of an earlier entry of the same table naming the
        /// same L2 table.
        shared_with: Option<u64>,
    },
    /// An internal snapshot, in table order (before the L1 tables).
    Snapshot(&'a Snapshot),
    /// A persistent bitmap, in order of table offset, before its table.
    Bitmap(&'a Bitmap),
    /// Every structure and L1 entry has been visited; L2 entries follow.
    TablesDone,
    /// A distinct L2 table, before its entries.
    L2Table(L2Ref),
    /// An entry of an L2 table (see [`Visitor::l2_entry`]).
    L2(L2Entry),
    /// A table or entry that failed to decode, or a structure outside the
    /// file.
    Error(Error),
}

/// Walk every table of `image`, handing each [`Item`] to `visit`.
pub fn walk<'a, S: Source>(image: &'a Image<S>, visit: &mut impl Visitor<'a>) {
    let l2 = walk_tables(image, visit);
    visit.item(Item::TablesDone);
    walk_l2(image, &l2, visit);
}

/// Everything [`walk`] visits before [`Item::TablesDone`]; returns the
/// distinct L2 tables, in the order they were first named.
pub fn walk_tables<'a, S: Source>(image: &'a Image<S>, visit: &mut impl Visitor<'a>) -> Vec<L2Ref> {
    let mut w = Tables {
        img: image,
        file_len: image.file_len(),
        cs: image.geometry().cluster_size,
        l2s: HashMap::new(),
        order: Vec::new(),
    };
    w.run(visit);
    w.order
        .iter()
        .filter_map(|off| w.l2s.get(off).copied())
        .collect()
}

/// Most bytes of L2 tables read with one positional read: tables that
/// follow each other in the file (as QEMU allocates them when it writes
/// sequentially) are read as a run.
const RUN_BYTES: u64 = 1 << 20;

/// The entries of the L2 tables `tables` (from [`walk_tables`]), table by
/// table in that order; runs of tables adjacent in the file are read with
/// one read. Buffers are reused: nothing is allocated per table or entry.
pub fn walk_l2<'a, S: Source>(image: &'a Image<S>, tables: &[L2Ref], visit: &mut impl Visitor<'a>) {
    let g = *image.geometry();
    let data_file = image.header().has_data_file();
    let cs = g.cluster_size;
    let Ok(cs_bytes) = usize::try_from(cs) else {
        return;
    };
    let per_run = usize::try_from(RUN_BYTES.checked_div(cs).unwrap_or(1))
        .unwrap_or(1)
        .max(1);
    let mut bytes: Vec<u8> = Vec::new();
    let mut words: Vec<u64> = Vec::with_capacity(cs_bytes / 8);
    let mut rest = tables;
    while let Some(first) = rest.first() {
        // How many of the next tables follow each other in the file.
        let mut n = 1usize;
        let mut next = first.offset.saturating_add(cs);
        while n < per_run && rest.get(n).is_some_and(|t| t.offset == next) {
            n = n.saturating_add(1);
            next = next.saturating_add(cs);
        }
        let (run, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        bytes.resize(cs_bytes.saturating_mul(run.len()), 0);
        // One read for the run; table by table (each with its own error)
        // only when that fails.
        let whole = read_into(image.source(), first.offset, &mut bytes).is_ok();
        for (t, chunk) in run.iter().zip(bytes.chunks_exact_mut(cs_bytes)) {
            visit.item(Item::L2Table(*t));
            if !whole {
                if let Err(e) = read_into(image.source(), t.offset, chunk) {
                    visit.item(Item::Error(e));
                    continue;
                }
            }
            words.clear();
            words.extend(chunk.chunks_exact(8).map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_be_bytes(w)
            }));
            visit.l2_entries(t, &words, &g, data_file);
        }
    }
}

/// The metadata regions of `image`, for lookups by host offset: every
/// [`Item::Region`] of [`walk_tables`].
pub(crate) fn metadata<S: Source>(image: &Image<S>) -> MetadataMap {
    let mut m = MetadataMap::default();
    walk_tables(image, &mut |item: Item<'_>| {
        if let Item::Region(r) = item {
            m.add(r.what, r.start, r.len);
        }
    });
    m.finish();
    m
}

struct Tables<'a, S> {
    img: &'a Image<S>,
    file_len: u64,
    cs: u64,
    l2s: HashMap<u64, L2Ref>,
    order: Vec<u64>,
}

impl<'a, S: Source> Tables<'a, S> {
    fn run(&mut self, visit: &mut impl Visitor<'a>) {
        let img = self.img;
        let h = img.header();
        let cs = self.cs;
        self.refcount_blocks(visit);

        // Fixed structures.
        self.region(visit, What::Header, 0, cs, 0, 1);
        self.region(
            visit,
            What::L1Table,
            h.l1_table_offset,
            u64::from(h.l1_size).saturating_mul(8),
            field::L1_TABLE_OFFSET,
            1,
        );
        self.region(
            visit,
            What::RefcountTable,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters).saturating_mul(cs),
            field::REFCOUNT_TABLE_OFFSET,
            1,
        );
        if let Some(last) = img.snapshots().last() {
            // The padding after the last entry may lie past the end of
            // the file (QEMU does not write it).
            let end = last
                .entry_offset
                .saturating_add(last.entry_len)
                .min(self.file_len);
            self.region(
                visit,
                What::SnapshotTable,
                h.snapshots_offset,
                end.saturating_sub(h.snapshots_offset),
                field::SNAPSHOTS_OFFSET,
                1,
            );
        }
        let ext = img.extensions();
        match &ext.bitmaps {
            Some(b) if img.bitmaps_stale() => visit.item(Item::StaleBitmaps { at: b.offset }),
            Some(b) => self.region(
                visit,
                What::BitmapDirectory,
                b.directory_offset,
                b.directory_size,
                b.offset,
                1,
            ),
            None => {}
        }
        if let Some(c) = &ext.crypto {
            self.region(
                visit,
                What::CryptoHeader,
                c.header_offset,
                c.header_length,
                c.offset,
                1,
            );
        }

        self.l1_entries(visit, img.l1_table(), h.l1_table_offset, 1, L1Table::Active);
        self.snapshots(visit);
        for i in 0..self.order.len() {
            let Some(r) = self.order.get(i).and_then(|o| self.l2s.get(o)).copied() else {
                continue;
            };
            self.region(visit, What::L2Table, r.offset, cs, r.at, r.refs);
        }
        self.bitmaps(visit);
    }

    /// A structure at `start .. start + len`, referenced at `at`: a region
    /// when it lies in the file, an error when it does not.
    fn region(
        &self,
        visit: &mut impl Visitor<'a>,
        what: What,
        start: u64,
        len: u64,
        at: u64,
        refs: u32,
    ) {
        if len == 0 {
            return;
        }
        match span(what, at, start, len, self.file_len) {
            Ok(_) => visit.item(Item::Region(Region {
                what,
                start,
                len,
                at,
                refs,
            })),
            Err(e) => visit.item(Item::Error(e)),
        }
    }

    fn refcount_blocks(&self, visit: &mut impl Visitor<'a>) {
        let table_at = self.img.header().refcount_table_offset;
        for (index, &raw) in (0u64..).zip(self.img.refcount_table()) {
            if raw == 0 {
                // No block (what `refcount_block_offset` says of it).
                continue;
            }
            let at = table_at.saturating_add(index.saturating_mul(8));
            let block = match self.img.refcount_block_offset(index) {
                Ok(None) => continue,
                Ok(Some(off)) => {
                    span(What::RefcountBlock, at, off, self.cs, self.file_len).map(|_| off)
                }
                Err(e) => Err(e),
            };
            if let Ok(off) = block {
                visit.item(Item::Region(Region {
                    what: What::RefcountBlock,
                    start: off,
                    len: self.cs,
                    at,
                    refs: 1,
                }));
            }
            visit.item(Item::RefcountBlock { index, at, block });
        }
    }

    /// The entries of an L1 table at `table_at`, named `refs` times.
    fn l1_entries(
        &mut self,
        visit: &mut impl Visitor<'a>,
        entries: &[u64],
        table_at: u64,
        refs: u32,
        table: L1Table,
    ) {
        let g = *self.img.geometry();
        let mut seen_here: HashMap<u64, u64> = HashMap::new();
        for (index, &raw) in (0u64..).zip(entries) {
            let at = table_at.saturating_add(index.saturating_mul(8));
            let entry = match L1Entry::decode(raw, at, &g) {
                Ok(e) => e,
                Err(e) => {
                    visit.item(Item::Error(e));
                    continue;
                }
            };
            let Some(l2) = entry.l2_offset else { continue };
            // Tables past the end of the file are reported here and never
            // remembered: the map stays bounded by the file length.
            if let Err(e) = span(What::L2Table, at, l2, self.cs, self.file_len) {
                visit.item(Item::Error(e));
                continue;
            }
            let shared_with = seen_here.insert(l2, at);
            visit.item(Item::L1 {
                table,
                index,
                at,
                entry,
                l2,
                shared_with,
            });
            let order = &mut self.order;
            let r = self.l2s.entry(l2).or_insert_with(|| {
                order.push(l2);
                L2Ref {
                    offset: l2,
                    refs: 0,
                    active: 0,
                    at,
                    l1_index: index,
                }
            });
            r.refs = r.refs.saturating_add(refs);
            if table == L1Table::Active {
                r.active = r.active.saturating_add(1);
            }
        }
    }

    fn snapshots(&mut self, visit: &mut impl Visitor<'a>) {
        let img = self.img;
        let snaps = img.snapshots();
        for s in snaps {
            visit.item(Item::Snapshot(s));
        }
        // Identical tables are walked once, with their multiplicity;
        // overlapping different ones are reported by whoever compares
        // regions, and only the first is walked (bounds the work by the
        // file length).
        let mut tables: Vec<(u64, u64, u64, u32)> = Vec::new(); // start, bytes, at, refs
        let mut index: HashMap<(u64, u64), usize> = HashMap::new();
        for s in snaps {
            let bytes = u64::from(s.l1_size).saturating_mul(8);
            if bytes == 0 {
                continue;
            }
            let key = (s.l1_table_offset, bytes);
            match index.get(&key).and_then(|&i| tables.get_mut(i)) {
                Some(t) => t.3 = t.3.saturating_add(1),
                None => {
                    index.insert(key, tables.len());
                    tables.push((s.l1_table_offset, bytes, s.entry_offset, 1));
                }
            }
        }
        tables.sort_by_key(|t| t.0);
        let mut walked_end = 0u64;
        let max = img.limits().max_l1_entries.saturating_mul(8);
        for (start, bytes, at, refs) in tables {
            self.region(visit, What::SnapshotL1Table, start, bytes, at, refs);
            let end = start.saturating_add(bytes);
            if start < walked_end || end > self.file_len {
                continue;
            }
            walked_end = end;
            // Bounded at open (`limits::bound`); the cap is a second guard.
            let mut raw = vec![0u8; usize::try_from(bytes.min(max)).unwrap_or(0)];
            if let Err(e) = read_into(img.source(), start, &mut raw) {
                visit.item(Item::Error(e));
                continue;
            }
            self.l1_entries(visit, &be_u64s(&raw), start, refs, L1Table::Snapshot);
        }
    }

    fn bitmaps(&self, visit: &mut impl Visitor<'a>) {
        let img = self.img;
        let g = *img.geometry();
        let cs = self.cs;
        let mut bitmaps: Vec<&'a Bitmap> = img.bitmaps().iter().collect();
        bitmaps.sort_by_key(|b| b.table_offset);
        let mut walked_end = 0u64;
        let mut chunk = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        for b in bitmaps {
            visit.item(Item::Bitmap(b));
            let bytes = u64::from(b.table_size).saturating_mul(8);
            if bytes == 0 {
                continue;
            }
            self.region(
                visit,
                What::BitmapTable,
                b.table_offset,
                bytes,
                b.entry_offset,
                1,
            );
            let end = b.table_offset.saturating_add(bytes);
            if end > self.file_len || b.table_offset < walked_end {
                continue;
            }
            walked_end = end;
            let mut pos = b.table_offset;
            while pos < end {
                let n = end.saturating_sub(pos).min(cs);
                let Some(buf) = usize::try_from(n).ok().and_then(|n| chunk.get_mut(..n)) else {
                    break;
                };
                if let Err(e) = read_into(img.source(), pos, buf) {
                    visit.item(Item::Error(e));
                    break;
                }
                for (k, raw) in (0u64..).zip(be_u64s(buf)) {
                    let at = pos.saturating_add(k.saturating_mul(8));
                    match bitmap::table_entry(raw, at, &g) {
                        Ok(Some(off)) => self.region(visit, What::BitmapData, off, cs, at, 1),
                        Ok(None) => {}
                        Err(e) => visit.item(Item::Error(e)),
                    }
                }
                pos = pos.saturating_add(n);
            }
        }
    }
}
