//! Streaming inspection: the full [`check`] verdict while an upload is
//! still arriving, in memory bounded by [`Limits::max_retained_bytes`].
//!
//! An [`Inspector`] is fed the file's bytes in order, in chunks of any
//! size. It keeps only what the check will read: the header cluster, the
//! L1, refcount, snapshot and bitmap tables, L2 tables and refcount
//! blocks, and compressed payloads until they have been decompressed
//! (never data clusters). What it needs is found by decoding what it has
//! kept with the library's own decoders ([`Header::decode`],
//! [`Extensions::decode`], [`L1Entry::decode`], [`Cluster::decode`],
//! [`refcount::table_entry`], [`snapshot::read_table`],
//! [`bitmap::read_directory`]); each compressed payload is decompressed by
//! [`compressed::decompress`] as soon as it has passed, and only the
//! outcome is kept.
//!
//! [`Inspector::finish`] then runs the ordinary [`Image::open_with`] and
//! [`check`] over the kept bytes ([`Retained`], a sparse [`Source`]): the
//! verdict comes from the same walker as a random-access check, by
//! construction, and equals it whenever everything the check reads was
//! kept.
//!
//! Tables may point backwards (an L2 table or refcount block written
//! before the table that references it, as after snapshots or refcount
//! table growth). What the stream had already passed is read back from a
//! spool when the caller gives one ([`Inspector::with_spool`]: the file
//! the upload is being written to); without one the inspection ends with
//! [`Verdict::NeedsRandomAccess`] and a `needs_random_access` finding per
//! byte range, never with a verdict built on missing bytes.
//!
//! [`Inspector::early`] says, once the header cluster has passed, whether
//! the image is already refused (malformed header or extensions, tables
//! over QEMU's caps or the limits, or the safety policy: backing file,
//! data file, encryption, unknown features), so an upload can be aborted.
//!
//! ```
//! use qcow2_guard::build::{GuestCluster, ImageModel};
//! use qcow2_guard::stream::{Early, Inspector};
//! use qcow2_guard::{check, CheckOptions, Image, Limits, Verdict};
//!
//! let bytes = ImageModel {
//!     cluster_bits: 12,
//!     clusters: vec![GuestCluster::Data(1), GuestCluster::Compressed(2)],
//!     ..ImageModel::default()
//! }
//! .build()?
//! .bytes;
//!
//! let mut inspector = Inspector::new(Limits::default(), CheckOptions::default());
//! for chunk in bytes.chunks(4096) {
//!     inspector.feed(chunk);
//!     if let Early::Refused(findings) = inspector.early() {
//!         panic!("refused early: {findings:?}");
//!     }
//! }
//! let streamed = inspector.finish();
//! let whole = check(&Image::open(bytes.as_slice())?, &CheckOptions::default());
//! assert_eq!(streamed.report, whole);
//! assert_eq!(streamed.report.verdict, Verdict::Ok);
//! assert!(streamed.read_back.is_empty()); // every table came before its data
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`check`]: crate::check()
//! [`Header::decode`]: crate::Header::decode
//! [`Extensions::decode`]: crate::extensions::Extensions::decode
//! [`L1Entry::decode`]: crate::l1l2::L1Entry::decode
//! [`Cluster::decode`]: crate::l1l2::Cluster::decode
//! [`refcount::table_entry`]: crate::refcount::table_entry
//! [`snapshot::read_table`]: crate::snapshot::read_table
//! [`bitmap::read_directory`]: crate::bitmap::read_directory
//! [`compressed::decompress`]: crate::compressed::decompress

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use crate::bitmap;
use crate::check::{code, CheckOptions, Report, Stats, Verdict};
use crate::compressed;
use crate::error::Error;
use crate::extensions::Extensions;
use crate::finding::{Category, Finding, Severity};
use crate::header::{CompressionType, Geometry, Header, AUTOCLEAR_BITMAPS};
use crate::l1l2::{Cluster, L1Entry, L2Table};
use crate::limits::Limits;
use crate::refcount;
use crate::snapshot;
use crate::source::{be_u64s, Source};
use crate::Image;

mod decoders;
use decoders::{Decoders, Done, Job};

/// Bytes the fixed header decoder reads (as [`Image::open_with`] does).
const HEADER_PROBE: u64 = 112;

/// Bookkeeping bytes counted against the budget per pending structure,
/// per L2 table seen and per decompressed payload remembered.
const PENDING_COST: u64 = 64;
const SEEN_COST: u64 = 16;
const MEMO_COST: u64 = 16;

/// Ranges not kept that are remembered with their reason, at most (fewer
/// under a small budget: as many as fit in a quarter of it, and at least
/// one); their room is set aside in the budget, so remembering one never
/// takes the inspector past it.
const MAX_MISSES: usize = 4096;
/// Bytes counted per remembered miss.
const MISS_COST: u64 = 24;

/// The length of byte range `(start, end)`.
fn span(key: (u64, u64)) -> u64 {
    key.1.saturating_sub(key.0)
}

/// Ranges the read-back log holds apart, at most (fewer under a small
/// budget: a quarter of it); past that the two closest are merged, so a
/// layout that sends every read to the spool cannot grow it.
const MAX_READ_BACK: usize = 4096;
/// Bookkeeping bytes counted per read-back range. With a spool the log's
/// whole capacity is set aside in the budget, as it grows inside reads.
const READ_BACK_COST: u64 = 32;

/// Compressed payloads that may be arriving at the same time.
const MAX_IN_FLIGHT: usize = 4096;

/// What can be said before the stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Early {
    /// The header cluster has not passed yet.
    Pending,
    /// Header, extensions and the safety policy raise no objection so far
    /// (the final verdict may still refuse the image).
    Clear,
    /// Already refused: the image cannot open (the error, as
    /// [`Report::from_open_error`] words it) or the safety policy refuses
    /// it (its error findings). The final verdict will not be `ok`.
    Refused(Vec<Finding>),
}

/// The outcome of a streamed inspection.
#[derive(Debug)]
pub struct Finished {
    /// The report: the same as [`crate::check()`] on the whole file, or
    /// [`Verdict::NeedsRandomAccess`] without a spool when the check
    /// needed bytes the stream had passed.
    pub report: Report,
    /// The image over the kept bytes (header facts, tables), when it
    /// opened and the report is not `needs_random_access`.
    pub image: Option<Image<Retained>>,
    /// Byte ranges (start, end) the check needed after the stream had
    /// passed them: read back from the spool, or, without one, the reason
    /// for `needs_random_access`. Empty for a layout that streams. At most
    /// 4,096 ranges (fewer under a retention budget below 512 KiB: one per
    /// 128 bytes of it): past that, neighbours are merged into one range
    /// that covers both.
    pub read_back: Vec<(u64, u64)>,
}

/// Why a needed range was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// It had passed before anything said it was needed.
    Passed,
    /// Keeping it would have gone over the retention budget.
    Budget,
}

/// A structure still to come, and what to do with it once it is whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// The fixed header fields.
    Probe,
    /// The first cluster: header extensions.
    FirstCluster,
    /// The active L1 table (`active`), or a snapshot's: its L2 tables.
    L1 { active: bool },
    /// The refcount table: its blocks.
    RefcountTable,
    /// Snapshot table entry `index`, starting at `pos`.
    Snapshot { pos: u64, index: u32 },
    /// The bitmap directory: the bitmap tables.
    BitmapDirectory,
    /// An L2 table: its compressed payloads.
    L2,
    /// Only kept (refcount blocks, bitmap tables).
    Keep,
}

/// The chunk being fed: in hand until `feed` returns.
#[derive(Clone, Copy)]
struct Chunk<'a> {
    start: u64,
    bytes: &'a [u8],
}

impl Chunk<'_> {
    fn end(&self) -> u64 {
        self.start.saturating_add(len64(self.bytes))
    }

    /// The chunk's bytes of `start .. end` (clipped to the chunk).
    fn part(&self, start: u64, end: u64) -> &[u8] {
        let s = start.max(self.start).saturating_sub(self.start);
        let e = end.min(self.end()).saturating_sub(self.start);
        match (usize::try_from(s), usize::try_from(e)) {
            (Ok(s), Ok(e)) if s < e => self.bytes.get(s..e).unwrap_or(&[]),
            _ => &[],
        }
    }
}

fn len64(b: &[u8]) -> u64 {
    u64::try_from(b.len()).unwrap_or(u64::MAX)
}

/// Kept byte ranges, without overlaps, appended to as the stream passes.
#[derive(Debug, Default)]
struct Extents {
    map: BTreeMap<u64, Vec<u8>>,
    bytes: u64,
}

impl Extents {
    /// The extent holding byte `p`: (start, bytes).
    fn at(&self, p: u64) -> Option<(u64, &Vec<u8>)> {
        let (&s, v) = self.map.range(..=p).next_back()?;
        (s.saturating_add(len64(v)) > p).then_some((s, v))
    }

    /// Start of the first extent after `p`, or `limit`.
    fn next_start(&self, p: u64, limit: u64) -> u64 {
        self.map
            .range(p.saturating_add(1)..)
            .next()
            .map_or(limit, |(&s, _)| s.min(limit))
    }

    /// Whether every byte of `start .. end` is kept.
    fn covers(&self, start: u64, end: u64) -> bool {
        let mut p = start;
        while p < end {
            match self.at(p) {
                Some((s, v)) => p = s.saturating_add(len64(v)),
                None => return false,
            }
        }
        true
    }

    /// Bytes of `start .. end` not kept yet.
    fn missing(&self, start: u64, end: u64) -> u64 {
        let mut p = start;
        let mut n = 0u64;
        while p < end {
            match self.at(p) {
                Some((s, v)) => p = s.saturating_add(len64(v)),
                None => {
                    let q = self.next_start(p, end);
                    n = n.saturating_add(q.saturating_sub(p));
                    p = q;
                }
            }
        }
        n
    }

    /// Keep `data` (the bytes at `start`), skipping what is kept already.
    fn insert(&mut self, start: u64, data: &[u8]) {
        let end = start.saturating_add(len64(data));
        let mut p = start;
        while p < end {
            if let Some((s, v)) = self.at(p) {
                p = s.saturating_add(len64(v));
                continue;
            }
            let q = self.next_start(p, end);
            let from = usize::try_from(p.saturating_sub(start)).unwrap_or(usize::MAX);
            let to = usize::try_from(q.saturating_sub(start)).unwrap_or(usize::MAX);
            let piece = data.get(from..to).unwrap_or(&[]);
            self.bytes = self.bytes.saturating_add(len64(piece));
            // The stream arrives in order: usually this extends the last
            // extent.
            let before = self
                .map
                .range_mut(..p)
                .next_back()
                .filter(|(&s, v)| s.saturating_add(len64(v)) == p);
            match before {
                Some((_, v)) => v.extend_from_slice(piece),
                None => {
                    self.map.insert(p, piece.to_vec());
                }
            }
            p = q;
        }
    }

    /// Copy what is kept of `start .. start + buf.len()` into `buf`; the
    /// ranges not kept go to `gaps`.
    fn fill(&self, start: u64, buf: &mut [u8], gaps: &mut Vec<(u64, u64)>) {
        let end = start.saturating_add(len64(buf));
        let mut p = start;
        while p < end {
            let (q, src) = match self.at(p) {
                Some((s, v)) => {
                    let q = s.saturating_add(len64(v)).min(end);
                    let from = usize::try_from(p.saturating_sub(s)).unwrap_or(usize::MAX);
                    let to = usize::try_from(q.saturating_sub(s)).unwrap_or(usize::MAX);
                    (q, v.get(from..to))
                }
                None => {
                    let q = self.next_start(p, end);
                    gaps.push((p, q));
                    (q, None)
                }
            };
            if let Some(src) = src {
                let from = usize::try_from(p.saturating_sub(start)).unwrap_or(usize::MAX);
                let to = usize::try_from(q.saturating_sub(start)).unwrap_or(usize::MAX);
                if let Some(dst) = buf.get_mut(from..to) {
                    dst.copy_from_slice(src);
                }
            }
            p = q;
        }
    }
}

/// Outcomes of the payloads decompressed as they passed, by (start, len).
#[derive(Debug, Default)]
struct Memo {
    /// Sorted (start, len) of payloads that decompressed to one cluster.
    ok: Vec<(u64, u64)>,
    failed: BTreeMap<(u64, u64), String>,
}

impl Memo {
    fn knows(&self, key: (u64, u64)) -> bool {
        self.ok.binary_search(&key).is_ok() || self.failed.contains_key(&key)
    }

    fn record(&mut self, key: (u64, u64), outcome: std::result::Result<(), String>) {
        match outcome {
            Ok(()) => {
                // Payloads complete in stream order, so this is almost
                // always an append.
                let i = self.ok.partition_point(|k| *k < key);
                if self.ok.get(i) != Some(&key) {
                    self.ok.insert(i, key);
                }
            }
            Err(reason) => {
                self.failed.insert(key, reason);
            }
        }
    }

    fn get(&self, key: (u64, u64)) -> Option<std::result::Result<(), String>> {
        if self.ok.binary_search(&key).is_ok() {
            return Some(Ok(()));
        }
        self.failed.get(&key).map(|r| Err(r.clone()))
    }

    fn len(&self) -> u64 {
        u64::try_from(self.ok.len().saturating_add(self.failed.len())).unwrap_or(u64::MAX)
    }
}

/// What the header cluster said.
#[derive(Debug, Clone)]
struct Format {
    header: Header,
    geometry: Geometry,
}

/// A streaming inspector: [`Inspector::feed`] the file in order, then
/// [`Inspector::finish`].
pub struct Inspector {
    limits: Limits,
    opts: CheckOptions,
    spool: Option<Arc<dyn Source>>,
    pos: u64,
    store: Extents,
    /// Structures still to come: (end, start) -> what to do when whole.
    pending: BTreeMap<(u64, u64), Vec<Need>>,
    /// The bytes still to come that they need, as disjoint ranges
    /// (start -> end): each chunk is matched against these, not against
    /// every structure, so overlapping structures cost nothing per chunk.
    wanted: BTreeMap<u64, u64>,
    pending_count: u64,
    /// Compressed payloads arriving: (start, end) -> bytes so far.
    payloads: BTreeMap<(u64, u64), Vec<u8>>,
    /// The whole spans of `payloads`: a payload's room is taken in the
    /// budget when it is admitted, not as its bytes arrive (payloads
    /// admitted one after another would otherwise overcommit it).
    payload_bytes: u64,
    memo: Memo,
    seen_l2: HashSet<u64>,
    format: Option<Format>,
    extensions: Option<Extensions>,
    refused: Option<Vec<Finding>>,
    open_error: Option<Report>,
    missed: Vec<(u64, u64, Why)>,
    /// How many misses `missed` holds at most (see [`MAX_MISSES`]).
    miss_cap: usize,
    over_budget: bool,
    decompressed: u64,
    out_buf: Vec<u8>,
    /// Worker threads decompressing payloads (`CheckOptions::threads` > 1),
    /// made with the first payload once the cluster size is known.
    decoders: Option<Decoders>,
    decoders_made: bool,
    /// Memo keys of the payloads out with the decoders.
    in_flight: BTreeSet<(u64, u64)>,
    /// The last bytes fed (see `window`) and where they start.
    hand: Vec<u8>,
    hand_start: u64,
    /// Ranges read from the spool, or (at the end, without one) needed
    /// and not kept.
    read_back: Arc<Mutex<ReadBackLog>>,
}

/// Ranges read back from the spool (or, at the end without one, needed
/// and not kept), at most `cap` of them.
#[derive(Debug)]
pub(crate) struct ReadBackLog {
    ranges: BTreeSet<(u64, u64)>,
    cap: usize,
}

impl ReadBackLog {
    /// A log that takes at most a quarter of `budget`.
    fn within(budget: u64) -> ReadBackLog {
        let cap = budget / 4 / READ_BACK_COST;
        ReadBackLog {
            ranges: BTreeSet::new(),
            cap: usize::try_from(cap)
                .unwrap_or(MAX_READ_BACK)
                .clamp(1, MAX_READ_BACK),
        }
    }

    fn insert(&mut self, range: (u64, u64)) {
        self.ranges.insert(range);
        if self.ranges.len() > self.cap {
            self.merge_closest();
        }
    }

    /// Replace the two ranges with the smallest gap between them by one
    /// range covering both.
    fn merge_closest(&mut self) {
        let closest = self
            .ranges
            .iter()
            .zip(self.ranges.iter().skip(1))
            .map(|(&a, &b)| (b.0.saturating_sub(a.1), a, b))
            .min_by_key(|c| c.0);
        if let Some((_, a, b)) = closest {
            self.ranges.remove(&a);
            self.ranges.remove(&b);
            self.ranges.insert((a.0.min(b.0), a.1.max(b.1)));
        }
    }

    fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Room left before ranges are merged.
    fn room(&self) -> usize {
        self.cap.saturating_sub(self.ranges.len())
    }

    fn ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().copied().collect()
    }
}

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspector")
            .field("position", &self.pos)
            .field("retained", &self.retained_bytes())
            .field("spool", &self.spool.is_some())
            .finish_non_exhaustive()
    }
}

impl Inspector {
    /// An inspector without a spool: a backward reference ends it with
    /// [`Verdict::NeedsRandomAccess`].
    pub fn new(limits: Limits, opts: CheckOptions) -> Inspector {
        let log = ReadBackLog::within(limits.max_retained_bytes);
        let miss_cap = usize::try_from(limits.max_retained_bytes / 4 / MISS_COST)
            .unwrap_or(MAX_MISSES)
            .clamp(1, MAX_MISSES);
        let mut me = Inspector {
            limits,
            opts,
            spool: None,
            pos: 0,
            store: Extents::default(),
            pending: BTreeMap::new(),
            wanted: BTreeMap::new(),
            pending_count: 0,
            payloads: BTreeMap::new(),
            payload_bytes: 0,
            memo: Memo::default(),
            seen_l2: HashSet::new(),
            format: None,
            extensions: None,
            refused: None,
            open_error: None,
            missed: Vec::new(),
            miss_cap,
            over_budget: false,
            decompressed: 0,
            out_buf: Vec::new(),
            decoders: None,
            decoders_made: false,
            in_flight: BTreeSet::new(),
            hand: Vec::new(),
            hand_start: 0,
            read_back: Arc::new(Mutex::new(log)),
        };
        me.pending.insert((HEADER_PROBE, 0), vec![Need::Probe]);
        me.wanted.insert(0, HEADER_PROBE);
        me.pending_count = 1;
        me
    }

    /// An inspector that reads what the stream has passed back from
    /// `spool`: a source holding at least every byte fed before the
    /// current [`Inspector::feed`] call (the file the caller writes the
    /// upload to; see [`SpoolFile`]), and the whole stream at
    /// [`Inspector::finish`].
    pub fn with_spool(limits: Limits, opts: CheckOptions, spool: Arc<dyn Source>) -> Inspector {
        let mut me = Inspector::new(limits, opts);
        me.spool = Some(spool);
        me
    }

    /// Bytes fed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Bytes kept now, bookkeeping included (bounded by
    /// [`Limits::max_retained_bytes`]). Besides these the inspector holds
    /// the last two clusters of the stream (at most 4 MiB) and the chunk
    /// being fed.
    pub fn retained_bytes(&self) -> u64 {
        self.store
            .bytes
            .saturating_add(self.payload_bytes)
            .saturating_add(self.pending_count.saturating_mul(PENDING_COST))
            .saturating_add(len64_count(self.seen_l2.len()).saturating_mul(SEEN_COST))
            .saturating_add(
                self.memo
                    .len()
                    .saturating_add(len64_count(self.in_flight.len()))
                    .saturating_mul(MEMO_COST),
            )
            .saturating_add(
                len64_count(self.payloads.len())
                    .saturating_mul(PENDING_COST)
                    .saturating_add(len64_count(self.missed.len()).saturating_mul(MISS_COST)),
            )
            .saturating_add(
                self.read_back
                    .lock()
                    .map_or(0, |l| len64_count(l.len()))
                    .saturating_mul(READ_BACK_COST),
            )
    }

    /// Whether `extra` more bytes fit in the budget. The room of the
    /// misses not yet remembered is set aside (a miss is remembered
    /// exactly when something did not fit), and so, with a spool, is the
    /// read-back log's unused capacity: it grows inside reads, where the
    /// budget is not consulted.
    fn fits(&self, extra: u64) -> bool {
        let log_room = if self.spool.is_some() {
            let room = self.read_back.lock().map_or(0, |l| l.room());
            len64_count(room).saturating_mul(READ_BACK_COST)
        } else {
            0
        };
        let miss_room =
            len64_count(self.miss_cap.saturating_sub(self.missed.len())).saturating_mul(MISS_COST);
        self.retained_bytes()
            .saturating_add(extra)
            .saturating_add(log_room)
            .saturating_add(miss_room)
            <= self.limits.max_retained_bytes
    }

    /// What can be said now (see [`Early`]).
    pub fn early(&self) -> Early {
        if let Some(f) = &self.refused {
            return Early::Refused(f.clone());
        }
        if self.extensions.is_some() {
            Early::Clear
        } else {
            Early::Pending
        }
    }

    /// The next bytes of the file.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.feed_with(bytes, &mut NoTap);
    }

    /// [`Inspector::feed`], telling `tap` what passes (a streaming
    /// conversion).
    pub(crate) fn feed_with(&mut self, bytes: &[u8], tap: &mut dyn Tap) {
        // The last bytes fed stay in hand with the new ones (see `window`).
        let mut hand = std::mem::take(&mut self.hand);
        hand.extend_from_slice(bytes);
        let chunk = Chunk {
            start: self.hand_start,
            bytes: &hand,
        };
        let end = chunk.end();
        let mut ready = Vec::new();

        // The bytes still wanted take their part of the chunk.
        let due: Vec<(u64, u64)> = self.wanted.range(..end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in due {
            self.wanted.remove(&s);
            // Not kept (over the budget without a spool): the miss is
            // recorded, and whatever needs the bytes will not find them.
            self.keep(s, e, chunk);
            if e > end {
                self.wanted.insert(end, e);
            }
        }
        // Structures now whole.
        while let Some((&(e, s), _)) = self.pending.first_key_value() {
            if e > end {
                break;
            }
            if let Some(needs) = self.pending.remove(&(e, s)) {
                self.pending_count = self.pending_count.saturating_sub(len64_count(needs.len()));
                ready.extend(needs.into_iter().map(|n| ((s, e), n)));
            }
        }
        // Payloads in flight. QEMU's overlap by at most a sector; many
        // at once are hostile, and past MAX_IN_FLIGHT are not kept.
        let flying: Vec<(u64, u64)> = self.payloads.range(..(end, 0)).map(|(k, _)| *k).collect();
        for (n, key) in flying.into_iter().enumerate() {
            if n >= MAX_IN_FLIGHT {
                if self.payloads.remove(&key).is_some() {
                    self.payload_bytes = self.payload_bytes.saturating_sub(span(key));
                }
                if self.spool.is_none() {
                    self.miss(key.0, key.1, Why::Budget);
                }
                continue;
            }
            if let Some(buf) = self.payloads.get_mut(&key) {
                // Only bytes not taken from earlier chunks.
                let have = key.0.saturating_add(len64(buf));
                let take = chunk.part(have.max(chunk.start), key.1);
                buf.extend_from_slice(take);
                if key.0.saturating_add(len64(buf)) >= key.1 {
                    if let Some(buf) = self.payloads.remove(&key) {
                        self.payload_bytes = self.payload_bytes.saturating_sub(span(key));
                        self.verify(key, buf, tap);
                    }
                }
            }
        }

        while let Some((key, need)) = ready.pop() {
            self.act(key, need, chunk, &mut ready, tap);
        }
        // Outcomes the decoders have ready.
        self.settle(tap, false);
        self.pos = end;
        // Trim the hand to the window once it holds twice as much (each
        // byte is moved at most once per window's worth of stream).
        let window = self.window();
        if hand.len() > window.saturating_mul(2) {
            let cut = hand.len().saturating_sub(window);
            hand.drain(..cut);
            self.hand_start = self
                .hand_start
                .saturating_add(u64::try_from(cut).unwrap_or(u64::MAX));
        }
        self.hand = hand;
    }

    /// Bytes kept in hand behind the stream position: two clusters. QEMU
    /// packs compressed clusters into the partly used cluster it was
    /// filling, also after it has allocated a new L2 table behind it: the
    /// payloads that table maps can start up to a cluster before it.
    fn window(&self) -> usize {
        self.format.as_ref().map_or(0, |f| {
            usize::try_from(f.geometry.cluster_size.saturating_mul(2)).unwrap_or(usize::MAX)
        })
    }

    /// Keep the chunk's part of `start .. end`. False when it cannot be
    /// kept and there is no spool to read it back from (recorded).
    fn keep(&mut self, start: u64, end: u64, chunk: Chunk<'_>) -> bool {
        let part = chunk.part(start, end);
        if part.is_empty() {
            return true;
        }
        let from = start.max(chunk.start);
        let to = from.saturating_add(len64(part));
        let new = self.store.missing(from, to);
        if !self.fits(new) {
            if self.spool.is_some() {
                return true;
            }
            self.miss(from, to, Why::Budget);
            return false;
        }
        self.store.insert(from, part);
        true
    }

    /// Ask for `start .. end`, to be handled as `need` once whole.
    fn want(
        &mut self,
        start: u64,
        end: u64,
        need: Need,
        chunk: Chunk<'_>,
        ready: &mut Vec<((u64, u64), Need)>,
    ) {
        if end <= start {
            return;
        }
        if start < chunk.start {
            let back = end.min(chunk.start);
            if self.spool.is_none() && !self.store.covers(start, back) {
                self.miss(start, back, Why::Passed);
                return;
            }
        }
        if !self.keep(start, end, chunk) {
            return;
        }
        if end <= chunk.end() {
            ready.push(((start, end), need));
            return;
        }
        if !self.fits(PENDING_COST) {
            // With a spool the check reads it back at the end (and a
            // streaming conversion finds it unwritten and converts from
            // the spool).
            if self.spool.is_none() {
                self.miss(start, end, Why::Budget);
            }
            return;
        }
        let needs = self.pending.entry((end, start)).or_default();
        if !needs.contains(&need) {
            needs.push(need);
            self.pending_count = self.pending_count.saturating_add(1);
        }
        self.add_wanted(start.max(chunk.end()), end);
    }

    /// Add `start .. end` to the bytes still wanted, merged with the
    /// ranges it touches.
    fn add_wanted(&mut self, mut start: u64, mut end: u64) {
        if end <= start {
            return;
        }
        if let Some((&s, &e)) = self.wanted.range(..=start).next_back() {
            if e >= start {
                self.wanted.remove(&s);
                start = s;
                end = end.max(e);
            }
        }
        while let Some((&s, &e)) = self.wanted.range(start..).next() {
            if s > end {
                break;
            }
            self.wanted.remove(&s);
            end = end.max(e);
        }
        self.wanted.insert(start, end);
    }

    /// A compressed payload at `start .. end`: decompressed once whole.
    fn want_payload(&mut self, start: u64, end: u64, chunk: Chunk<'_>, tap: &mut dyn Tap) {
        let key = (start, end);
        let len = end.saturating_sub(start);
        if end <= start || self.payloads.contains_key(&key) {
            return;
        }
        if self.in_flight.contains(&(start, len)) {
            self.settle(tap, true);
        }
        if self.memo.knows((start, len)) {
            // Decompressed already for another table: again only for a
            // conversion that maps it here too, if it can still be read.
            if tap.wants(key) {
                if let Some(buf) = self.view(chunk).read(start, len) {
                    self.decompress(key, &buf, tap);
                }
            }
            return;
        }
        if !self.fits(len.saturating_add(MEMO_COST)) {
            if self.spool.is_none() {
                self.miss(start, end, Why::Budget);
            }
            return;
        }
        let mut buf = Vec::new();
        if start < chunk.start {
            let back = end.min(chunk.start);
            match self.view(chunk).read(start, back.saturating_sub(start)) {
                Some(b) => buf = b,
                None => {
                    self.miss(start, back, Why::Passed);
                    return;
                }
            }
        }
        let from = start.saturating_add(len64(&buf));
        buf.extend_from_slice(chunk.part(from, end));
        if start.saturating_add(len64(&buf)) >= end {
            self.verify(key, buf, tap);
        } else {
            self.payload_bytes = self.payload_bytes.saturating_add(len);
            self.payloads.insert(key, buf);
        }
    }

    /// Decompress a whole payload (`buf`, the bytes of `key` up to the
    /// end of the stream) and remember the outcome (or keep its bytes
    /// when the decompression budget is spent); `tap` gets the cluster.
    fn verify(&mut self, key: (u64, u64), buf: Vec<u8>, tap: &mut dyn Tap) {
        let cs = self.format.as_ref().map_or(0, |f| f.geometry.cluster_size);
        if self.decompressed.saturating_add(cs) > self.opts.max_decompressed_bytes {
            self.store.insert(key.0, &buf);
            return;
        }
        self.decompressed = self.decompressed.saturating_add(cs);
        let memo = (key.0, len64(&buf));
        let Some(buf) = self.dispatch(key, memo, buf, tap) else {
            return;
        };
        if let Some(outcome) = self.decompress(key, &buf, tap) {
            self.memo.record(memo, outcome);
        }
    }

    /// Hand a whole payload to the decoder threads; the bytes back when
    /// it is to be decompressed here (one thread, none started, or
    /// before the header has passed).
    fn dispatch(
        &mut self,
        key: (u64, u64),
        memo: (u64, u64),
        buf: Vec<u8>,
        tap: &mut dyn Tap,
    ) -> Option<Vec<u8>> {
        let Some(f) = self.format.as_ref() else {
            return Some(buf);
        };
        let kind = f.header.compression().unwrap_or(CompressionType::Deflate);
        let cs = f.geometry.cluster_size;
        if !self.decoders_made {
            self.decoders_made = true;
            self.decoders = Decoders::new(self.opts.threads, cs);
        }
        if self.decoders.is_none() {
            return Some(buf);
        }
        // Room first: take back what is done, then wait while full.
        self.settle(tap, false);
        while self.decoders.as_ref().is_some_and(Decoders::full) {
            if !self.settle_one(tap, true) {
                break;
            }
        }
        let Some(d) = self.decoders.as_mut() else {
            return Some(buf);
        };
        let out = d.buffer(usize::try_from(cs).unwrap_or(usize::MAX));
        match d.send(Job {
            key,
            memo,
            kind,
            buf,
            out,
        }) {
            Ok(()) => {
                self.in_flight.insert(memo);
                None
            }
            Err(job) => {
                d.recycle(job.out);
                Some(job.buf)
            }
        }
    }

    /// Take back one decoder outcome (waiting for it with `wait`) and do
    /// what [`Inspector::verify`] does inline: the tap gets the cluster,
    /// the memo the outcome. False when there was none.
    fn settle_one(&mut self, tap: &mut dyn Tap, wait: bool) -> bool {
        let Some(Done { job, outcome }) = self.decoders.as_mut().and_then(|d| d.next(wait)) else {
            return false;
        };
        self.in_flight.remove(&job.memo);
        let outcome = match outcome {
            Some(o) => {
                if o.is_ok() {
                    tap.payload(job.key, &job.out);
                }
                Some(o)
            }
            // The worker could not: here, then.
            None => self.decompress(job.key, &job.buf, tap),
        };
        if let Some(o) = outcome {
            self.memo.record(job.memo, o);
        }
        if let Some(d) = self.decoders.as_mut() {
            d.recycle(job.out);
        }
        true
    }

    /// Take back the outcomes ready (`all`: every one out).
    fn settle(&mut self, tap: &mut dyn Tap, all: bool) {
        while self.settle_one(tap, all) {}
    }

    /// Decompress payload `key` (`buf`) into one cluster, which `tap`
    /// gets when it decompressed; `None` before the header has passed.
    fn decompress(
        &mut self,
        key: (u64, u64),
        buf: &[u8],
        tap: &mut dyn Tap,
    ) -> Option<std::result::Result<(), String>> {
        let f = self.format.as_ref()?;
        let kind = f.header.compression().unwrap_or(CompressionType::Deflate);
        let cs = usize::try_from(f.geometry.cluster_size).unwrap_or(usize::MAX);
        self.out_buf.resize(cs, 0);
        let outcome = compressed::decompress(kind, buf, &mut self.out_buf);
        if outcome.is_ok() {
            tap.payload(key, &self.out_buf);
        }
        Some(outcome)
    }

    fn view<'a>(&'a self, chunk: Chunk<'a>) -> View<'a> {
        View {
            store: &self.store,
            chunk,
            spool: self.spool.as_deref(),
            missing: Mutex::new(None),
            from_chunk: Mutex::new(Vec::new()),
            read_back: &self.read_back,
        }
    }

    /// Run a library decoder over the view; keep what it read from the
    /// chunk in hand (the check will read it too). Also returns the first
    /// read of bytes still to come: what to wait for.
    fn decode<T>(
        &mut self,
        chunk: Chunk<'_>,
        decoder: impl FnOnce(&View<'_>, &Limits) -> T,
    ) -> (T, Option<(u64, u64)>) {
        let view = self.view(chunk);
        let got = decoder(&view, &self.limits);
        let missing = view.missing();
        let read = view.read_from_chunk();
        for (s, e) in read {
            self.keep(s, e, chunk);
        }
        (got, missing)
    }

    /// Remember why `start .. end` was not kept (the first
    /// [`MAX_MISSES`] ranges, fewer under a small budget: to word the
    /// findings, and for a streaming conversion to know that a range was
    /// passed).
    fn miss(&mut self, start: u64, end: u64, why: Why) {
        if why == Why::Budget {
            self.over_budget = true;
        }
        if self.missed.len() < self.miss_cap {
            self.missed.push((start, end, why));
        }
    }

    fn refuse(&mut self, e: &Error) {
        if self.refused.is_none() {
            let report = Report::from_open_error(e);
            self.refused = Some(report.findings.clone());
            self.open_error = Some(report);
        }
    }

    /// When the image is already refused because it cannot open: the
    /// report [`Report::from_open_error`] gives.
    pub(crate) fn open_error(&self) -> Option<&Report> {
        self.open_error.as_ref()
    }

    /// A structure is whole: decode it and ask for what it points to.
    fn act(
        &mut self,
        key: (u64, u64),
        need: Need,
        chunk: Chunk<'_>,
        ready: &mut Vec<((u64, u64), Need)>,
        tap: &mut dyn Tap,
    ) {
        let (start, end) = key;
        let Some(bytes) = self.view(chunk).read(start, end.saturating_sub(start)) else {
            return;
        };
        match need {
            Need::Probe => self.header(&bytes, chunk, ready),
            Need::FirstCluster => self.first_cluster(&bytes, chunk, ready),
            Need::L1 { active } => {
                let Some(g) = self.format.as_ref().map(|f| f.geometry) else {
                    return;
                };
                for (i, raw) in (0u64..).zip(be_u64s(&bytes)) {
                    let at = start.saturating_add(i.saturating_mul(8));
                    if let Ok(L1Entry {
                        l2_offset: Some(l2),
                        ..
                    }) = L1Entry::decode(raw, at, &g)
                    {
                        let l2_end = l2.saturating_add(g.cluster_size);
                        if active {
                            tap.active_l2(i, l2);
                        }
                        if self.seen_l2.contains(&l2) {
                            if active && self.store.covers(l2, l2_end) {
                                // Whole already (a snapshot's L1 table came first).
                                self.tap_l2(l2, chunk, tap);
                            }
                        } else if !self.fits(SEEN_COST) {
                            if self.spool.is_none() {
                                self.miss(l2, l2_end, Why::Budget);
                            }
                        } else if self.seen_l2.insert(l2) {
                            self.want(l2, l2_end, Need::L2, chunk, ready);
                        } else if active && self.store.covers(l2, l2_end) {
                            // Whole already (a snapshot's L1 table came first).
                            self.tap_l2(l2, chunk, tap);
                        }
                    }
                }
            }
            Need::RefcountTable => {
                let Some(g) = self.format.as_ref().map(|f| f.geometry) else {
                    return;
                };
                for (i, raw) in (0u64..).zip(be_u64s(&bytes)) {
                    let at = start.saturating_add(i.saturating_mul(8));
                    if let Ok(Some(block)) = refcount::table_entry(raw, at, &g) {
                        let block_end = block.saturating_add(g.cluster_size);
                        self.want(block, block_end, Need::Keep, chunk, ready);
                    }
                }
            }
            Need::Snapshot { pos, index } => self.snapshot(key, pos, index, chunk, ready),
            Need::BitmapDirectory => self.bitmap_directory(chunk, ready),
            Need::L2 => self.l2_table(start, &bytes, chunk, tap),
            Need::Keep => {}
        }
    }

    fn header(&mut self, bytes: &[u8], chunk: Chunk<'_>, ready: &mut Vec<((u64, u64), Need)>) {
        let header = match Header::decode(bytes) {
            Ok(h) => h,
            Err(e) => return self.refuse(&e),
        };
        // The file length is not known yet: only what holds for any
        // length is judged now; the check judges the rest.
        let geometry = match header.validate(u64::MAX, &self.limits) {
            Ok(g) => g,
            Err(e) => return self.refuse(&e),
        };
        let cs = geometry.cluster_size;
        self.format = Some(Format { header, geometry });
        self.want(0, cs, Need::FirstCluster, chunk, ready);
    }

    fn first_cluster(
        &mut self,
        bytes: &[u8],
        chunk: Chunk<'_>,
        ready: &mut Vec<((u64, u64), Need)>,
    ) {
        let Some(Format {
            header: h,
            geometry: g,
        }) = self.format.clone()
        else {
            return;
        };
        let ext = match Extensions::decode(&h, bytes) {
            Ok(x) => x,
            Err(e) => return self.refuse(&e),
        };
        // The same evaluation as Image::policy_findings.
        let refusals: Vec<Finding> = self
            .opts
            .policy
            .evaluate(&h, &ext)
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .collect();
        if !refusals.is_empty() && self.refused.is_none() {
            self.refused = Some(refusals);
        }
        let cs = g.cluster_size;
        // The backing file name lies inside the first cluster (validated).
        let l1_end = h
            .l1_table_offset
            .saturating_add(u64::from(h.l1_size).saturating_mul(8));
        self.want(
            h.l1_table_offset,
            l1_end,
            Need::L1 { active: true },
            chunk,
            ready,
        );
        let rt_end = h
            .refcount_table_offset
            .saturating_add(u64::from(h.refcount_table_clusters).saturating_mul(cs));
        self.want(
            h.refcount_table_offset,
            rt_end,
            Need::RefcountTable,
            chunk,
            ready,
        );
        if h.nb_snapshots > 0 {
            let pos = h.snapshots_offset;
            let fixed_end = pos.saturating_add(snapshot::FIXED_ENTRY_BYTES);
            self.want(
                pos,
                fixed_end,
                Need::Snapshot { pos, index: 0 },
                chunk,
                ready,
            );
        }
        if let Some(b) = ext.bitmaps {
            if h.autoclear_features & AUTOCLEAR_BITMAPS != 0
                && b.directory_size <= self.limits.max_bitmap_directory_bytes
            {
                let dir_end = b.directory_offset.saturating_add(b.directory_size);
                self.want(
                    b.directory_offset,
                    dir_end,
                    Need::BitmapDirectory,
                    chunk,
                    ready,
                );
            }
        }
        self.extensions = Some(ext);
    }

    fn snapshot(
        &mut self,
        key: (u64, u64),
        pos: u64,
        index: u32,
        chunk: Chunk<'_>,
        ready: &mut Vec<((u64, u64), Need)>,
    ) {
        let Some(Format {
            header: h,
            geometry: g,
        }) = self.format.clone()
        else {
            return;
        };
        // One entry at a time through the table reader itself; what it
        // could not read yet is what to wait for.
        let (got, missing) = self.decode(chunk, |view, limits| {
            snapshot::read_table(view, pos, 1, h.version, &g, limits)
        });
        let snap = match got {
            Ok(v) => v.into_iter().next(),
            Err(e) => {
                match missing {
                    Some(range) if range != key => {
                        let need = Need::Snapshot { pos, index };
                        self.want(range.0, range.1, need, chunk, ready);
                    }
                    Some(_) => {}
                    None => self.refuse(&e),
                }
                return;
            }
        };
        let Some(s) = snap else { return };
        let l1_bytes = u64::from(s.l1_size)
            .saturating_mul(8)
            .min(self.limits.max_l1_entries.saturating_mul(8));
        let l1_end = s.l1_table_offset.saturating_add(l1_bytes);
        let need = Need::L1 { active: false };
        self.want(s.l1_table_offset, l1_end, need, chunk, ready);
        let next_index = index.saturating_add(1);
        if next_index < h.nb_snapshots {
            let next = s.entry_offset.saturating_add(s.entry_len);
            let fixed_end = next.saturating_add(snapshot::FIXED_ENTRY_BYTES);
            let need = Need::Snapshot {
                pos: next,
                index: next_index,
            };
            self.want(next, fixed_end, need, chunk, ready);
        }
    }

    fn bitmap_directory(&mut self, chunk: Chunk<'_>, ready: &mut Vec<((u64, u64), Need)>) {
        let (Some(f), Some(ext)) = (self.format.clone(), self.extensions.clone()) else {
            return;
        };
        let Some(b) = ext.bitmaps else { return };
        let (got, missing) = self.decode(chunk, |view, limits| {
            bitmap::read_directory(view, &b, f.header.size, &f.geometry, limits)
        });
        let bitmaps = match got {
            Ok(list) => list,
            Err(e) => {
                if missing.is_none() {
                    self.refuse(&e);
                }
                return;
            }
        };
        for bm in bitmaps {
            let end = bm
                .table_offset
                .saturating_add(u64::from(bm.table_size).saturating_mul(8));
            self.want(bm.table_offset, end, Need::Keep, chunk, ready);
        }
    }

    /// Show the whole L2 table at `start` to `tap`.
    fn tap_l2(&self, start: u64, chunk: Chunk<'_>, tap: &mut dyn Tap) {
        let Some(f) = &self.format else { return };
        let view = self.view(chunk);
        if let Some(bytes) = view.read(start, f.geometry.cluster_size) {
            tap.l2_table(start, &bytes, &f.geometry, f.header.size, &view);
        }
    }

    fn l2_table(&mut self, start: u64, bytes: &[u8], chunk: Chunk<'_>, tap: &mut dyn Tap) {
        let Some(Format {
            header: h,
            geometry: g,
        }) = self.format.clone()
        else {
            return;
        };
        tap.l2_table(start, bytes, &g, h.size, &self.view(chunk));
        // What the check decompresses (CheckOptions::decompress, not
        // encrypted, no external data file).
        if !self.opts.decompress || h.crypt_method != 0 || h.has_data_file() {
            return;
        }
        let table = L2Table::new(start, bytes, &g);
        for i in 0..table.len() {
            let Some((raw, bm, at)) = table.raw(i) else {
                break;
            };
            if let Ok(Cluster::Compressed(d)) = Cluster::decode(raw, bm, at, &g, false) {
                if d.validate(at, &g, u64::MAX).is_ok() {
                    self.want_payload(d.start(), d.end(), chunk, tap);
                }
            }
        }
    }

    /// The stream has ended: what was kept, as a [`Source`] of the whole
    /// stream's length. Payloads cut by the end of the file are
    /// decompressed as they are (what the check reads of them).
    pub(crate) fn retained(&mut self, tap: &mut dyn Tap) -> Retained {
        self.settle(tap, true);
        for (key, buf) in std::mem::take(&mut self.payloads) {
            self.payload_bytes = self.payload_bytes.saturating_sub(span(key));
            self.verify(key, buf, tap);
        }
        self.settle(tap, true);
        let format = self.format.as_ref();
        Retained {
            store: std::mem::take(&mut self.store),
            len: self.pos,
            spool: self.spool.clone(),
            memo: std::mem::take(&mut self.memo),
            kind: format.and_then(|f| f.header.compression()),
            cluster_size: format.map_or(0, |f| f.geometry.cluster_size),
            read_back: Arc::clone(&self.read_back),
        }
    }

    /// The ranges read back from the spool, or (without one) needed and
    /// not kept, so far.
    pub(crate) fn read_back(&self) -> Vec<(u64, u64)> {
        self.read_back
            .lock()
            .map(|log| log.ranges())
            .unwrap_or_default()
    }

    /// `range` could not be kept within the budget (a conversion's
    /// bookkeeping): worded so in [`Inspector::needs_random_access`].
    pub(crate) fn note_over_budget(&mut self, range: (u64, u64)) {
        self.miss(range.0, range.1, Why::Budget);
    }

    /// Whether a spool was given.
    pub(crate) fn has_spool(&self) -> bool {
        self.spool.is_some()
    }

    /// Ranges the stream had passed before they were known to be needed
    /// (without a spool: the inspection will end `needs_random_access`
    /// if the check reads them).
    pub(crate) fn passed(&self) -> Vec<(u64, u64)> {
        self.missed
            .iter()
            .filter(|m| m.2 == Why::Passed)
            .map(|m| (m.0, m.1))
            .collect()
    }

    /// The stream has ended: check what was kept.
    pub fn finish(mut self) -> Finished {
        let src = self.retained(&mut NoTap);
        let log = Arc::clone(&self.read_back);
        let (report, image) = match Image::open_with(src, self.limits.clone()) {
            Ok(image) => (crate::check(&image, &self.opts), Some(image)),
            Err(e) => (Report::from_open_error(&e), None),
        };
        drop(log);
        let read_back = self.read_back();
        if self.spool.is_none() && !read_back.is_empty() {
            return Finished {
                report: self.needs_random_access(&read_back),
                image: None,
                read_back,
            };
        }
        Finished {
            report,
            image,
            read_back,
        }
    }

    /// The `needs_random_access` report for `ranges`, each worded with
    /// why it was not kept.
    pub(crate) fn needs_random_access(&self, ranges: &[(u64, u64)]) -> Report {
        let mut findings = Vec::new();
        for &(start, end) in ranges.iter().take(self.opts.max_findings) {
            let known = self
                .missed
                .iter()
                .find(|&&(s, e, _)| s < end && start < e)
                .map(|m| m.2);
            let budget = match known {
                Some(why) => why == Why::Budget,
                None => self.over_budget && self.missed.len() >= self.miss_cap,
            };
            let why = if budget {
                format!(
                    "keeping them would have gone over the retention budget of {} bytes",
                    self.limits.max_retained_bytes
                )
            } else {
                "the reference to them comes later in the file".to_string()
            };
            findings.push(Finding::new(
                code::NEEDS_RANDOM_ACCESS,
                Severity::Error,
                Category::Other,
                start,
                format!(
                    "bytes {start:#x}..{end:#x} were needed after the stream had passed them ({why}); inspect with a spool, or check the stored file"
                ),
            ));
        }
        let total = len64_count(ranges.len());
        let stored = len64_count(findings.len());
        Report {
            verdict: Verdict::NeedsRandomAccess,
            checked: false,
            findings,
            counts: [(code::NEEDS_RANDOM_ACCESS, total)].into_iter().collect(),
            omitted: total.saturating_sub(stored),
            stats: Stats::default(),
        }
    }
}

/// What a streaming conversion is told as the stream passes.
pub(crate) trait Tap {
    /// Entry `index` of the active L1 table points at the L2 table at
    /// `table`.
    fn active_l2(&mut self, index: u64, table: u64);
    /// The L2 table at `offset` is whole (`bytes`); `view` reads what has
    /// passed (from the spool) and what is in hand, and fails for bytes
    /// still to come (and passed ones without a spool).
    fn l2_table(&mut self, offset: u64, bytes: &[u8], g: &Geometry, size: u64, view: &View<'_>);
    /// The compressed payload at `key` (start, end) decompressed to
    /// `cluster`.
    fn payload(&mut self, key: (u64, u64), cluster: &[u8]);
    /// Whether the payload at `key` is still wanted (decompressed
    /// already, it is decompressed again for the tap).
    fn wants(&self, key: (u64, u64)) -> bool;
}

/// An inspection without a conversion.
struct NoTap;

impl Tap for NoTap {
    fn active_l2(&mut self, _: u64, _: u64) {}
    fn l2_table(&mut self, _: u64, _: &[u8], _: &Geometry, _: u64, _: &View<'_>) {}
    fn payload(&mut self, _: (u64, u64), _: &[u8]) {}
    fn wants(&self, _: (u64, u64)) -> bool {
        false
    }
}

fn len64_count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// What the inspector can read while the stream is passing: what it
/// kept, the chunk in hand, and the spool for what has passed. Its
/// length is unknown (`u64::MAX`); a read of bytes still to come fails
/// and is remembered, so the decoders say themselves what they need.
pub(crate) struct View<'a> {
    store: &'a Extents,
    chunk: Chunk<'a>,
    spool: Option<&'a dyn Source>,
    missing: Mutex<Option<(u64, u64)>>,
    /// Ranges read from the chunk in hand: to be kept, as the check will
    /// read them too.
    from_chunk: Mutex<Vec<(u64, u64)>>,
    /// Ranges read from the spool.
    read_back: &'a Mutex<ReadBackLog>,
}

impl View<'_> {
    /// The `len` bytes at `start`, if kept, in hand or spooled.
    pub(crate) fn read(&self, start: u64, len: u64) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        self.read_exact_at(start, &mut buf).ok()?;
        Some(buf)
    }

    /// One past the last byte in hand: later bytes are still to come.
    pub(crate) fn arrived(&self) -> u64 {
        self.chunk.end()
    }

    /// The first read that asked for bytes still to come.
    fn missing(&self) -> Option<(u64, u64)> {
        self.missing.lock().ok().and_then(|m| *m)
    }

    /// Ranges read from the chunk in hand.
    fn read_from_chunk(&self) -> Vec<(u64, u64)> {
        self.from_chunk
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }
}

impl Source for View<'_> {
    fn len(&self) -> u64 {
        u64::MAX
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.saturating_add(len64(buf));
        let mut gaps = Vec::new();
        self.store.fill(offset, buf, &mut gaps);
        for (s, e) in gaps {
            let mut p = s;
            // Passed: the spool.
            if p < self.chunk.start {
                let q = e.min(self.chunk.start);
                let spool = self.spool.ok_or_else(not_kept)?;
                read_back(spool, self.read_back, (buf, offset), p, q)?;
                p = q;
            }
            // In hand: the chunk.
            if p < e && p < self.chunk.end() {
                let q = e.min(self.chunk.end());
                let src = self.chunk.part(p, q);
                let dst = slice_of(buf, offset, p, q).ok_or_else(not_kept)?;
                if dst.len() != src.len() {
                    return Err(not_kept());
                }
                dst.copy_from_slice(src);
                if let Ok(mut v) = self.from_chunk.lock() {
                    v.push((p, q));
                }
                p = q;
            }
            // Still to come.
            if p < e {
                if let Ok(mut m) = self.missing.lock() {
                    m.get_or_insert((offset, end));
                }
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "not arrived yet"));
            }
        }
        Ok(())
    }
}

/// `buf`'s part for file bytes `p .. q`, `buf` holding bytes from `base`.
fn slice_of(buf: &mut [u8], base: u64, p: u64, q: u64) -> Option<&mut [u8]> {
    let from = usize::try_from(p.checked_sub(base)?).ok()?;
    let to = usize::try_from(q.checked_sub(base)?).ok()?;
    buf.get_mut(from..to)
}

/// Read file bytes `p .. q` from the spool into their part of `buf`
/// (which holds the bytes from `base`), and log the range.
fn read_back(
    spool: &dyn Source,
    log: &Mutex<ReadBackLog>,
    (buf, base): (&mut [u8], u64),
    p: u64,
    q: u64,
) -> io::Result<()> {
    let dst = slice_of(buf, base, p, q).ok_or_else(not_kept)?;
    spool.read_exact_at(p, dst)?;
    if let Ok(mut l) = log.lock() {
        l.insert((p, q));
    }
    Ok(())
}

fn not_kept() -> io::Error {
    io::Error::other("not kept by the streamed inspection")
}

/// The bytes a streamed inspection kept, as a sparse [`Source`] of the
/// whole stream's length: what [`Inspector::finish`] checks. Bytes not
/// kept are read from the spool, or fail; either way the range is logged
/// ([`Finished::read_back`]). Compressed payloads report the outcome of
/// their decompression in the stream ([`Source::payload_outcome`]).
pub struct Retained {
    store: Extents,
    len: u64,
    spool: Option<Arc<dyn Source>>,
    memo: Memo,
    kind: Option<CompressionType>,
    cluster_size: u64,
    read_back: Arc<Mutex<ReadBackLog>>,
}

impl std::fmt::Debug for Retained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retained")
            .field("len", &self.len)
            .field("kept", &self.store.bytes)
            .finish_non_exhaustive()
    }
}

impl Source for Retained {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.checked_add(len64(buf));
        if end.is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the stream",
            ));
        }
        let mut gaps = Vec::new();
        self.store.fill(offset, buf, &mut gaps);
        for (s, e) in gaps {
            let Some(spool) = self.spool.as_deref() else {
                // Logged all the same: why the report needs random access.
                if let Ok(mut log) = self.read_back.lock() {
                    log.insert((s, e));
                }
                return Err(not_kept());
            };
            read_back(spool, &self.read_back, (buf, offset), s, e)?;
        }
        Ok(())
    }

    fn payload_outcome(
        &self,
        kind: CompressionType,
        offset: u64,
        len: u64,
        cluster_size: u64,
    ) -> Option<std::result::Result<(), String>> {
        if self.kind != Some(kind) || self.cluster_size != cluster_size {
            return None;
        }
        self.memo.get((offset, len))
    }
}

/// A spool file that is still being written: its length is asked for at
/// every read (a [`crate::FileSource`] takes it once, at open).
#[derive(Debug)]
pub struct SpoolFile {
    file: File,
}

impl SpoolFile {
    /// Read the spool through `file` (opened for reading; the caller
    /// appends to it, through this or another handle).
    pub fn new(file: File) -> SpoolFile {
        SpoolFile { file }
    }
}

impl Source for SpoolFile {
    fn len(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{GuestCluster, ImageModel, SnapshotModel};

    fn whole(bytes: &[u8], opts: &CheckOptions) -> Report {
        match Image::open_with(bytes, Limits::default()) {
            Ok(image) => crate::check(&image, opts),
            Err(e) => Report::from_open_error(&e),
        }
    }

    fn streamed(bytes: &[u8], chunk: usize, spool: bool, limits: Limits) -> Finished {
        let opts = CheckOptions::default();
        let mut i = if spool {
            Inspector::with_spool(limits, opts, Arc::new(bytes.to_vec()))
        } else {
            Inspector::new(limits, opts)
        };
        for c in bytes.chunks(chunk.max(1)) {
            i.feed(c);
        }
        assert_eq!(i.position(), len64(bytes));
        i.finish()
    }

    fn model() -> Vec<u8> {
        ImageModel {
            cluster_bits: 9,
            clusters: vec![
                GuestCluster::Data(1),
                GuestCluster::Compressed(2),
                GuestCluster::Zero,
                GuestCluster::Compressed(3),
                GuestCluster::Unallocated,
                GuestCluster::Data(4),
            ],
            snapshots: vec![SnapshotModel { name: "s".into() }],
            ..ImageModel::default()
        }
        .build()
        .unwrap()
        .bytes
    }

    fn sample() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/sample.qcow2"
        ))
        .unwrap()
    }

    #[test]
    fn any_chunking_gives_the_whole_file_report() {
        let bytes = model();
        let want = whole(&bytes, &CheckOptions::default());
        assert_eq!(want.verdict, Verdict::Ok);
        assert!(want.stats.decompressed_clusters > 0);
        for chunk in [1, 7, 512, 513, 4096, bytes.len()] {
            for spool in [false, true] {
                let got = streamed(&bytes, chunk, spool, Limits::default());
                assert_eq!(got.report, want, "chunk {chunk} spool {spool}");
                assert!(got.read_back.is_empty(), "chunk {chunk}");
                assert!(got.image.is_some());
            }
        }
    }

    #[test]
    fn backward_tables_need_the_spool() {
        // The sample's L2 tables (0x3000, 0x4000) come before the L1
        // table (0x28000) that points at them: written before a snapshot.
        let bytes = sample();
        let want = whole(&bytes, &CheckOptions::default());
        let got = streamed(&bytes, 4096, false, Limits::default());
        assert_eq!(got.report.verdict, Verdict::NeedsRandomAccess);
        assert!(!got.report.checked);
        // Both L2 tables of the L1 table at 0x28000 (the snapshot's L1
        // table at 0x39000 is within two clusters of the snapshot table
        // at 0x3a000 that points at it: still in hand).
        assert_eq!(got.read_back, vec![(0x3000, 0x4000), (0x4000, 0x5000)]);
        let f = &got.report.findings;
        assert_eq!(f.len(), 2);
        assert_eq!(
            (f[0].code, f[0].offset),
            (code::NEEDS_RANDOM_ACCESS, 0x3000)
        );
        assert!(f[0].message.contains("comes later in the file"), "{}", f[0]);
        assert!(!got.report.verdict.passes());
        // With a spool: read back (the tables, then the compressed
        // payloads they map, which had passed too), the same report.
        let got = streamed(&bytes, 4096, true, Limits::default());
        assert_eq!(got.report, want);
        assert_eq!(
            got.read_back[..3],
            [(0x3000, 0x4000), (0x4000, 0x5000), (0x5000, 0x5200)]
        );
        // In one chunk nothing has passed before it is known to be needed.
        let got = streamed(&bytes, bytes.len(), false, Limits::default());
        assert_eq!(got.report, want);
        assert!(got.read_back.is_empty());
    }

    #[test]
    fn memory_stays_in_the_budget() {
        let bytes = model();
        let want = whole(&bytes, &CheckOptions::default());
        // What the inspection holds at most with room to spare...
        let mut i = Inspector::new(Limits::default(), CheckOptions::default());
        let mut peak = 0;
        for c in bytes.chunks(100) {
            i.feed(c);
            peak = peak.max(i.retained_bytes());
        }
        assert_eq!(i.finish().report, want);
        // ...is more than it may hold under a budget one byte smaller.
        let budget = peak - 1;
        let limits = Limits {
            max_retained_bytes: budget,
            ..Limits::default()
        };
        let got = streamed(&bytes, 100, false, limits.clone());
        assert_eq!(got.report.verdict, Verdict::NeedsRandomAccess);
        let msg = format!("retention budget of {budget} bytes");
        assert!(
            got.report.findings.iter().any(|f| f.message.contains(&msg)),
            "{:?}",
            got.report.findings
        );
        let got = streamed(&bytes, 100, true, limits.clone());
        assert_eq!(got.report, want);
        assert!(!got.read_back.is_empty());
        let mut i = Inspector::new(limits, CheckOptions::default());
        for c in bytes.chunks(100) {
            i.feed(c);
            assert!(i.retained_bytes() <= budget, "{}", i.retained_bytes());
        }
    }

    #[test]
    fn a_spool_keeps_the_bookkeeping_in_the_budget_too() {
        // 48 L2 tables ahead of the L1 table that names them, each a
        // pending structure and an L2 seen: over a 2 KiB budget. With a
        // spool they are read back at the end instead of remembered, and
        // the read-back log stays at its 16 ranges (a quarter of 2 KiB).
        let bytes = ImageModel {
            cluster_bits: 9,
            clusters: (0..48 * 64u32)
                .map(|i| match i % 64 {
                    0 => GuestCluster::Data(u8::try_from(i / 64).unwrap()),
                    _ => GuestCluster::Unallocated,
                })
                .collect(),
            ..ImageModel::default()
        }
        .build()
        .unwrap()
        .bytes;
        let want = whole(&bytes, &CheckOptions::default());
        assert_eq!(want.verdict, Verdict::Ok);
        let budget = 2048;
        let limits = Limits {
            max_retained_bytes: budget,
            ..Limits::default()
        };
        for chunk in [1, 100, 512, 4096] {
            let mut i = Inspector::with_spool(
                limits.clone(),
                CheckOptions::default(),
                Arc::new(bytes.clone()),
            );
            for c in bytes.chunks(chunk) {
                i.feed(c);
                assert!(i.retained_bytes() <= budget, "chunk {chunk}: {i:?}");
            }
            let got = i.finish();
            assert_eq!(got.report, want, "chunk {chunk}");
            assert!(!got.read_back.is_empty() && got.read_back.len() <= 16);
        }
    }

    #[test]
    fn the_read_back_log_merges_the_closest_ranges() {
        let mut log = ReadBackLog::within(2048);
        for i in 0..16 {
            log.insert((i * 100, i * 100 + 10));
        }
        assert_eq!((log.len(), log.room()), (16, 0));
        log.insert((1_015, 1_020)); // 5 bytes after (1000, 1010)
        assert_eq!(log.len(), 16);
        assert!(log.ranges().contains(&(1_000, 1_020)));
        assert!(log.ranges().contains(&(1_100, 1_110)));
    }

    #[test]
    fn payloads_are_decompressed_as_they_pass_and_dropped() {
        let bytes = ImageModel {
            cluster_bits: 12,
            clusters: (0..64).map(GuestCluster::Compressed).collect(),
            ..ImageModel::default()
        }
        .build()
        .unwrap()
        .bytes;
        let one = CheckOptions {
            threads: 1,
            ..CheckOptions::default()
        };
        let mut i = Inspector::new(Limits::default(), one.clone());
        i.feed(&bytes);
        // Header cluster, L1 and refcount tables, blocks, L2 tables: a few
        // clusters, none of the compressed payloads.
        assert!(i.store.bytes <= 6 * 4096, "{}", i.store.bytes);
        assert_eq!(i.memo.ok.len(), 64);
        let got = i.finish();
        assert_eq!(got.report, whole(&bytes, &one));
        assert_eq!(got.report.stats.decompressed_clusters, 64);
        // On two decoder threads: at most two payloads each still out when
        // the feed returns, the rest known; the same report.
        let two = CheckOptions {
            threads: 2,
            ..CheckOptions::default()
        };
        let mut i = Inspector::new(Limits::default(), two.clone());
        i.feed(&bytes);
        assert!(i.store.bytes <= 6 * 4096, "{}", i.store.bytes);
        assert!(i.in_flight.len() <= 4, "{}", i.in_flight.len());
        assert_eq!(i.memo.ok.len() + i.in_flight.len(), 64);
        assert_eq!(i.finish().report, whole(&bytes, &two));
    }

    #[test]
    fn a_corrupt_payload_is_reported_like_the_whole_file_check() {
        let built = ImageModel {
            cluster_bits: 12,
            clusters: vec![GuestCluster::Compressed(1), GuestCluster::Compressed(2)],
            ..ImageModel::default()
        }
        .build()
        .unwrap();
        let image = Image::open(built.bytes.as_slice()).unwrap();
        let Ok(Cluster::Compressed(d)) = image.cluster(0) else {
            panic!("not compressed")
        };
        let mut bytes = built.bytes.clone();
        let at = usize::try_from(d.start()).unwrap();
        bytes[at..at + 8].copy_from_slice(&[0xff; 8]);
        let want = whole(&bytes, &CheckOptions::default());
        assert!(
            want.has("decompress_failed") || want.verdict == Verdict::Corrupt,
            "{want:?}"
        );
        for chunk in [1, 100, bytes.len()] {
            assert_eq!(
                streamed(&bytes, chunk, false, Limits::default()).report,
                want
            );
        }
    }

    #[test]
    fn early_verdicts() {
        let bytes = model();
        let mut i = Inspector::new(Limits::default(), CheckOptions::default());
        i.feed(&bytes[..100]);
        assert_eq!(i.early(), Early::Pending);
        i.feed(&bytes[100..600]);
        assert_eq!(i.early(), Early::Clear);

        // A backing file: refused once the header cluster has passed.
        let mut b = ImageModel::default().build().unwrap().bytes;
        let name = b"/etc/passwd";
        b[0x8000..0x8000 + name.len()].copy_from_slice(name);
        b[8..16].copy_from_slice(&0x8000u64.to_be_bytes());
        b[16..20].copy_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
        let mut i = Inspector::new(Limits::default(), CheckOptions::default());
        i.feed(&b[..0x8000]);
        assert_eq!(i.early(), Early::Pending);
        i.feed(&b[0x8000..0x10000]);
        let Early::Refused(f) = i.early() else {
            panic!("not refused: {:?}", i.early())
        };
        assert_eq!(f[0].code, "policy_backing_file");
        i.feed(&b[0x10000..]);
        let r = i.finish().report;
        assert_eq!(r.verdict, Verdict::Unsafe);
        assert_eq!(r, whole(&b, &CheckOptions::default()));

        // Not qcow2: refused from the first bytes.
        let mut i = Inspector::new(Limits::default(), CheckOptions::default());
        i.feed(&[0u8; 200]);
        let Early::Refused(f) = i.early() else {
            panic!("not refused")
        };
        assert_eq!(f[0].code, "bad_magic");
        assert_eq!(i.finish().report.verdict, Verdict::Invalid);
    }

    #[test]
    fn short_and_empty_streams() {
        let bytes = model();
        for n in [0, 3, 50, 111, 112, 300, 512, 1000] {
            let part = &bytes[..n];
            let want = whole(part, &CheckOptions::default());
            assert_eq!(
                streamed(part, 1, false, Limits::default()).report,
                want,
                "{n}"
            );
        }
    }

    #[test]
    fn extents_keep_bytes_once() {
        let mut e = Extents::default();
        e.insert(10, &[1, 2, 3]);
        e.insert(13, &[4, 5]);
        e.insert(8, &[9, 9, 7, 7, 7, 7, 7, 7, 6]);
        assert_eq!(e.bytes, 9);
        assert!(e.covers(8, 17) && !e.covers(7, 9) && !e.covers(16, 18));
        let mut buf = [0u8; 11];
        let mut gaps = Vec::new();
        e.fill(7, &mut buf, &mut gaps);
        assert_eq!(buf, [0, 9, 9, 1, 2, 3, 4, 5, 7, 6, 0]);
        assert_eq!(gaps, vec![(7, 8), (17, 18)]);
        assert_eq!(e.missing(0, 20), 11);
    }
}
