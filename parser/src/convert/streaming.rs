//! Streaming conversion: the raw disk written from a pipe while the qcow2
//! passes, without staging it.
//!
//! A [`StreamConversion`] feeds the stream to a streaming
//! [`Inspector`](crate::stream::Inspector) (which keeps the tables and
//! decompresses each compressed payload as it passes) and writes guest
//! data into a positional [`Sink`] as soon as both the L2 table that maps
//! it and the data itself have passed: data clusters are written, never
//! kept. That works when guest data arrives after the L2 table that maps
//! it, as `qemu-img convert` and writes into a new image lay it out.
//!
//! Data that passed before its L2 table (snapshots, resizes, refcount
//! growth) is read back from the spool, when one was given; without one
//! the conversion stops at once with a `needs_random_access` audit
//! report that names the byte ranges: reading the pipe can stop there.
//! An image refused as soon as its header cluster has passed (the safety
//! policy, a malformed header) stops the stream the same way.
//!
//! Nothing the sink holds may be shown before [`StreamConversion::finish`]
//! succeeds: the sink is the temporary output (an unnamed file) that the
//! caller names only then. `finish` runs the ordinary [`super::prepare`]
//! (policy, conversion rules, metadata audit) over the kept bytes, then
//! checks every extent of the image's map ([`crate::Image::map`], the
//! reader's own mapping) against what was written: the right host bytes
//! at each data extent, the right payload at each compressed one, nothing
//! at zero and unallocated ones. Anything else is written again from the
//! spool by the ordinary engine ([`super::Conversion::run`]), or, without
//! a spool, refuses the conversion: the output is what `qemu-img convert
//! -O raw` gives, or nothing.
//!
//! ```
//! use std::sync::Arc;
//! use qcow2_guard::build::{GuestCluster, ImageModel};
//! use qcow2_guard::convert::{ConvertOptions, FileSink, StreamConversion};
//!
//! let built = ImageModel {
//!     cluster_bits: 12,
//!     clusters: vec![GuestCluster::Data(1), GuestCluster::Compressed(2)],
//!     ..ImageModel::default()
//! }
//! .build()?;
//! let path = std::env::temp_dir().join(format!("qcow2-guard-doc-{}", std::process::id()));
//! let out = std::fs::File::options().read(true).write(true).create_new(true).open(&path)?;
//! std::fs::remove_file(&path)?; // unnamed: shown only once finished
//! let sink = FileSink::new(&out);
//! let mut conversion = StreamConversion::new(&ConvertOptions::default(), &sink)?;
//! for chunk in built.bytes.chunks(4096) {
//!     conversion.feed(chunk)?; // an error: stop reading, discard `out`
//! }
//! let done = conversion.finish()?;
//! assert!(!done.respooled); // every cluster was written as it passed
//! let mut raw = Vec::new();
//! std::io::Read::read_to_end(&mut &out, &mut raw)?;
//! assert_eq!(raw, built.guest);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use super::chunks::is_zero;
use super::{prepare, ConvertError, ConvertOptions, Input, Inputs, Sink};
use crate::check::{CheckOptions, Report};
use crate::error::Error;
use crate::finding::Finding;
use crate::header::Geometry;
use crate::l1l2::{Cluster, L2Table};
use crate::read::ExtentKind;
use crate::source::Source;
use crate::stream::{Early, Inspector, Retained, Tap, View};
use crate::Image;

/// Bookkeeping bytes counted against [`crate::Limits::max_retained_bytes`]
/// per planned write, payload target, pending table and write recorded.
const ENTRY_COST: u64 = 64;
/// Granularity of zero detection: all-zero blocks are not written (a new
/// file reads zeros there, and stays sparse).
const ZERO_BLOCK: usize = 4096;
/// Ranges named in a `needs_random_access` refusal at most.
const MAX_RANGES: usize = 64;

/// A conversion from a stream into a positional sink: [`feed`] the
/// file's bytes in order, then [`finish`].
///
/// [`feed`]: StreamConversion::feed
/// [`finish`]: StreamConversion::finish
pub struct StreamConversion<'s> {
    inspector: Inspector,
    writer: Writer<'s>,
    opts: ConvertOptions,
}

impl std::fmt::Debug for StreamConversion<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConversion")
            .field("inspector", &self.inspector)
            .field("written", &self.writer.written.len())
            .finish_non_exhaustive()
    }
}

/// A finished streaming conversion.
#[derive(Debug)]
pub struct Streamed {
    /// The metadata audit's report (verdict `ok` or `leaks`).
    pub audit: Report,
    /// Warnings for the caller to show ([`super::Conversion::warnings`]).
    pub warnings: Vec<Finding>,
    /// Bytes of the raw disk (the virtual size).
    pub size: u64,
    /// Whether the disk was written again from the spool at the end (the
    /// layout did not stream, or the bookkeeping went over the budget).
    pub respooled: bool,
    /// File ranges read back from the spool.
    pub read_back: Vec<(u64, u64)>,
}

/// Where written guest bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    /// Host bytes from this offset on.
    Host(u64),
    /// The compressed payload starting here.
    Payload(u64),
}

/// The tap: turns what passes into writes.
struct Writer<'s> {
    sink: &'s dyn Sink,
    /// Active L2 tables not yet whole: table offset -> L1 indices.
    tables: BTreeMap<u64, Vec<u64>>,
    /// Data still to come: (host start, guest start) -> host end.
    plan: BTreeMap<(u64, u64), u64>,
    /// Compressed payloads still to come: (start, end) -> (guest, len).
    payloads: BTreeMap<(u64, u64), Vec<(u64, u64)>>,
    /// What was written: guest start -> (guest end, source).
    written: BTreeMap<u64, (u64, From)>,
    /// Host ranges mapped by the active tables that had passed (and could
    /// not be read back).
    passed: Vec<(u64, u64)>,
    error: Option<io::Error>,
    /// Over the budget with a spool: nothing more is written while the
    /// stream passes; `finish` writes the disk from the spool.
    stopped: bool,
}

impl Writer<'_> {
    fn bytes(&self) -> u64 {
        let n = self
            .tables
            .values()
            .map(Vec::len)
            .chain(self.payloads.values().map(Vec::len))
            .fold(0usize, usize::saturating_add)
            .saturating_add(self.plan.len())
            .saturating_add(self.written.len())
            .saturating_add(self.passed.len());
        u64::try_from(n)
            .unwrap_or(u64::MAX)
            .saturating_mul(ENTRY_COST)
    }

    fn stop(&mut self) {
        self.stopped = true;
        self.tables.clear();
        self.plan.clear();
        self.payloads.clear();
    }

    /// Write `data` at guest offset `guest`, skipping all-zero blocks, and
    /// record it.
    fn write(&mut self, guest: u64, data: &[u8], from: From) {
        if self.error.is_some() || self.stopped || data.is_empty() {
            return;
        }
        let mut run: Option<usize> = None;
        let blocks = data.chunks(ZERO_BLOCK).count();
        for (k, block) in data.chunks(ZERO_BLOCK).enumerate() {
            let at = k.saturating_mul(ZERO_BLOCK);
            let zero = is_zero(block);
            if !zero && run.is_none() {
                run = Some(at);
            }
            let last = k.saturating_add(1) == blocks;
            if let Some(s) = run.filter(|_| zero || last) {
                let e = if zero { at } else { data.len() };
                let piece = data.get(s..e).unwrap_or(&[]);
                let off = guest.saturating_add(u64::try_from(s).unwrap_or(u64::MAX));
                if let Err(err) = self.sink.write_at(off, piece) {
                    self.error = Some(err);
                    return;
                }
                run = None;
            }
        }
        self.record(guest, len64(data), from);
    }

    fn record(&mut self, guest: u64, len: u64, from: From) {
        let end = guest.saturating_add(len);
        if let From::Host(h) = from {
            let before = self.written.range_mut(..guest).next_back();
            if let Some((&g0, (e0, From::Host(h0)))) = before {
                if *e0 == guest && h0.checked_add(guest.saturating_sub(g0)) == Some(h) {
                    *e0 = end;
                    return;
                }
            }
        }
        self.written.insert(guest, (end, from));
    }

    /// Guest range `guest .. guest + len` is host data at `host`.
    fn data(&mut self, host: u64, guest: u64, len: u64, view: &View<'_>) {
        let end = host.saturating_add(len);
        let arrived = view.arrived();
        if host < arrived {
            let to = end.min(arrived);
            match view.read(host, to.saturating_sub(host)) {
                Some(bytes) => self.write(guest, &bytes, From::Host(host)),
                None => self.passed.push((host, to)),
            }
        }
        let from = host.max(arrived);
        if from < end {
            let g = guest.saturating_add(from.saturating_sub(host));
            self.plan.insert((from, g), end);
        }
    }

    /// The stream's bytes `start .. start + bytes.len()` have arrived:
    /// write the planned data they hold.
    fn pass(&mut self, start: u64, bytes: &[u8]) {
        let end = start.saturating_add(len64(bytes));
        let due: Vec<((u64, u64), u64)> =
            self.plan.range(..(end, 0)).map(|(&k, &e)| (k, e)).collect();
        for ((h, g), e) in due {
            self.plan.remove(&(h, g));
            if h < start {
                // Cannot happen: planned writes start at bytes to come.
                self.passed.push((h, e.min(start)));
            }
            let from = h.max(start);
            let to = e.min(end);
            let s = usize::try_from(from.saturating_sub(start)).unwrap_or(usize::MAX);
            let t = usize::try_from(to.saturating_sub(start)).unwrap_or(usize::MAX);
            if let Some(part) = bytes.get(s..t) {
                self.write(
                    g.saturating_add(from.saturating_sub(h)),
                    part,
                    From::Host(from),
                );
            }
            if e > end {
                self.plan
                    .insert((end, g.saturating_add(end.saturating_sub(h))), e);
            }
        }
    }
}

impl Tap for Writer<'_> {
    fn active_l2(&mut self, index: u64, table: u64) {
        if !self.stopped {
            self.tables.entry(table).or_default().push(index);
        }
    }

    fn l2_table(&mut self, offset: u64, bytes: &[u8], g: &Geometry, size: u64, view: &View<'_>) {
        let Some(indices) = self.tables.remove(&offset) else {
            return;
        };
        let table = L2Table::new(offset, bytes, g);
        let cs = g.cluster_size;
        for i in indices {
            let Some(base) = i.checked_mul(g.l2_span()) else {
                continue;
            };
            for j in 0..table.len() {
                let guest = u64::try_from(j)
                    .ok()
                    .and_then(|j| j.checked_mul(cs))
                    .and_then(|o| o.checked_add(base));
                let Some(guest) = guest.filter(|&o| o < size) else {
                    break;
                };
                let len = cs.min(size.saturating_sub(guest));
                // Entries that do not decode are the audit's to refuse.
                match table.entry(j, g, false) {
                    Some(Ok(Cluster::Data { host, .. })) => self.data(host, guest, len, view),
                    Some(Ok(Cluster::Subclusters {
                        host: Some(host),
                        alloc,
                        ..
                    })) => {
                        let sc = g.subcluster_size;
                        for k in (0..32u64).filter(|k| alloc & (1 << k) != 0) {
                            let off = k.saturating_mul(sc);
                            if off < len {
                                let n = sc.min(len.saturating_sub(off));
                                let h = host.saturating_add(off);
                                self.data(h, guest.saturating_add(off), n, view);
                            }
                        }
                    }
                    Some(Ok(Cluster::Compressed(d))) => {
                        let key = (d.start(), d.end());
                        self.payloads.entry(key).or_default().push((guest, len));
                    }
                    _ => {}
                }
            }
        }
    }

    fn payload(&mut self, key: (u64, u64), cluster: &[u8]) {
        for (guest, len) in self.payloads.remove(&key).unwrap_or_default() {
            let n = usize::try_from(len).unwrap_or(usize::MAX);
            if let Some(part) = cluster.get(..n) {
                self.write(guest, part, From::Payload(key.0));
            }
        }
    }

    fn wants(&self, key: (u64, u64)) -> bool {
        self.payloads.contains_key(&key)
    }
}

fn len64(b: &[u8]) -> u64 {
    u64::try_from(b.len()).unwrap_or(u64::MAX)
}

impl<'s> StreamConversion<'s> {
    /// A conversion into `sink` without a spool: a layout that does not
    /// stream stops it with a `needs_random_access` report. `sink` must
    /// be positional (a [`super::FileSink`] over a new, unnamed file);
    /// nothing in it may be shown unless [`StreamConversion::finish`]
    /// succeeds.
    pub fn new(opts: &ConvertOptions, sink: &'s dyn Sink) -> Result<Self, ConvertError> {
        Self::build(opts, sink, None)
    }

    /// A conversion that reads what the stream has passed back from
    /// `spool` (as [`Inspector::with_spool`]: every byte fed before the
    /// current [`StreamConversion::feed`] call, and the whole stream at
    /// [`StreamConversion::finish`]).
    pub fn with_spool(
        opts: &ConvertOptions,
        sink: &'s dyn Sink,
        spool: Arc<dyn Source>,
    ) -> Result<Self, ConvertError> {
        Self::build(opts, sink, Some(spool))
    }

    fn build(
        opts: &ConvertOptions,
        sink: &'s dyn Sink,
        spool: Option<Arc<dyn Source>>,
    ) -> Result<Self, ConvertError> {
        if sink.sequential() {
            return Err(ConvertError::Sink(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a streaming conversion writes in stream order, not guest order: it needs a \
                 positional sink",
            )));
        }
        // What the audit checks, and every payload decompressed (they are
        // written).
        let check = CheckOptions {
            decompress: true,
            max_decompressed_bytes: u64::MAX,
            max_tracked_clusters: opts.max_audit_clusters,
            threads: opts.threads,
            ..CheckOptions::metadata_only(opts.policy.clone())
        };
        let limits = opts.limits();
        let inspector = match spool {
            Some(s) => Inspector::with_spool(limits, check, s),
            None => Inspector::new(limits, check),
        };
        Ok(StreamConversion {
            inspector,
            writer: Writer {
                sink,
                tables: BTreeMap::new(),
                plan: BTreeMap::new(),
                payloads: BTreeMap::new(),
                written: BTreeMap::new(),
                passed: Vec::new(),
                error: None,
                stopped: false,
            },
            opts: opts.clone(),
        })
    }

    /// Bytes fed so far.
    pub fn position(&self) -> u64 {
        self.inspector.position()
    }

    /// Bytes kept now, the inspection's and the conversion's bookkeeping
    /// (bounded by [`crate::Limits::max_retained_bytes`]).
    pub fn retained_bytes(&self) -> u64 {
        self.inspector
            .retained_bytes()
            .saturating_add(self.writer.bytes())
    }

    /// The next bytes of the file. An error ends the conversion: the
    /// image is refused already (policy, malformed header), its layout
    /// does not stream and there is no spool (`needs_random_access`), or
    /// the sink failed. Stop reading and discard the sink.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), ConvertError> {
        let start = self.inspector.position();
        self.inspector.feed_with(bytes, &mut self.writer);
        self.writer.pass(start, bytes);
        if let Some(e) = self.writer.error.take() {
            return Err(ConvertError::Sink(e));
        }
        if let Some(report) = self.inspector.open_error() {
            return Err(audit(report.clone()));
        }
        if let Early::Refused(findings) = self.inspector.early() {
            return Err(ConvertError::Refused {
                input: Input::Image,
                findings,
            });
        }
        let spool = self.inspector.has_spool();
        if !spool {
            let mut passed = self.inspector.passed();
            passed.extend_from_slice(&self.writer.passed);
            if !passed.is_empty() {
                return Err(self.needs_random_access(passed));
            }
        }
        if self.retained_bytes() > self.opts.limits.max_retained_bytes && !self.writer.stopped {
            if !spool {
                let at = (start, self.inspector.position());
                self.inspector.note_over_budget(at);
                return Err(self.needs_random_access(vec![at]));
            }
            self.writer.stop();
        }
        Ok(())
    }

    fn needs_random_access(&self, mut ranges: Vec<(u64, u64)>) -> ConvertError {
        ranges.sort_unstable();
        ranges.dedup();
        ranges.truncate(MAX_RANGES);
        audit(self.inspector.needs_random_access(&ranges))
    }

    /// The stream has ended: audit the image as [`super::prepare`] does,
    /// check what was written against the image's map, write the disk
    /// again from the spool if anything is missing (or refuse without
    /// one), and finish the sink. Only an `Ok` means the sink holds the
    /// disk.
    pub fn finish(mut self) -> Result<Streamed, ConvertError> {
        let src = self.inspector.retained(&mut self.writer);
        let prepared = prepare(Inputs::new(src), &self.opts);
        let spool = self.inspector.has_spool();
        let read_back = self.inspector.read_back();
        if !spool && !read_back.is_empty() {
            return Err(self.needs_random_access(read_back));
        }
        let conversion = prepared?;
        if let Some(e) = self.writer.error.take() {
            return Err(ConvertError::Sink(e));
        }
        let missing = if self.writer.stopped {
            vec![(0, self.inspector.position())]
        } else {
            unwritten(conversion.image(), &self.writer.written)?
        };
        let respooled = !missing.is_empty();
        if respooled {
            if !spool {
                return Err(self.needs_random_access(missing));
            }
            // Clear what was written (the sink reads zeros where the
            // engine writes holes), then the ordinary engine over the kept
            // tables and the spool.
            for (&g, &(e, _)) in &self.writer.written {
                zero_out(self.writer.sink, g, e.saturating_sub(g))?;
            }
            conversion.run(self.writer.sink, None)?;
        } else {
            self.writer
                .sink
                .finish(conversion.size())
                .map_err(ConvertError::Sink)?;
        }
        Ok(Streamed {
            audit: conversion.audit().clone(),
            warnings: conversion.warnings().to_vec(),
            size: conversion.size(),
            respooled,
            read_back: self.inspector.read_back(),
        })
    }
}

fn audit(report: Report) -> ConvertError {
    ConvertError::Audit {
        input: Input::Image,
        report: Box::new(report),
    }
}

/// Write `len` zeros at `offset` (positional sinks skip holes in
/// `write_zeros`).
fn zero_out(sink: &dyn Sink, offset: u64, len: u64) -> Result<(), ConvertError> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut done = 0u64;
    while done < len {
        let n = len.saturating_sub(done).min(len64(&ZEROS));
        let piece = ZEROS.get(..usize::try_from(n).unwrap_or(0)).unwrap_or(&[]);
        sink.write_at(offset.saturating_add(done), piece)
            .map_err(ConvertError::Sink)?;
        done = done.saturating_add(n);
    }
    Ok(())
}

/// File ranges whose guest bytes the image maps but `written` does not
/// hold exactly (data from the wrong place, a payload missing, data where
/// the disk reads zeros); empty when the sink holds the whole disk.
fn unwritten(
    image: &Image<Retained>,
    written: &BTreeMap<u64, (u64, From)>,
) -> Result<Vec<(u64, u64)>, ConvertError> {
    let size = image.virtual_size();
    let mut missing = Vec::new();
    if size == 0 {
        return Ok(missing);
    }
    for e in image.map(0, size).map_err(ConvertError::image)? {
        if missing.len() >= MAX_RANGES {
            break;
        }
        let e = e.map_err(ConvertError::image)?;
        let (g, end) = (e.guest_offset, e.end());
        match e.kind {
            ExtentKind::Data { host } => {
                let mut p = g;
                while p < end {
                    let want = host.saturating_add(p.saturating_sub(g));
                    match written.range(..=p).next_back() {
                        Some((&g0, &(e0, From::Host(h0))))
                            if e0 > p && h0.saturating_add(p.saturating_sub(g0)) == want =>
                        {
                            p = e0;
                        }
                        _ => {
                            missing.push((want, host.saturating_add(e.len)));
                            break;
                        }
                    }
                }
            }
            ExtentKind::Compressed(d) => {
                let ok = matches!(
                    written.range(..=g).next_back(),
                    Some((_, &(e0, From::Payload(s)))) if e0 >= end && s == d.start()
                );
                if !ok {
                    // Not written: a payload that does not decompress
                    // fails the conversion as the engine's read would.
                    let cs = usize::try_from(image.geometry().cluster_size).unwrap_or(0);
                    let (mut input, mut out) = (Vec::new(), vec![0u8; cs]);
                    match image.verify_compressed(&d, g, &mut input, &mut out) {
                        Err(e @ Error::Decompress { .. }) => return Err(ConvertError::image(e)),
                        _ => missing.push((d.start(), d.end())),
                    }
                }
            }
            ExtentKind::Zero | ExtentKind::Unallocated => {
                if let Some((&g0, &(e0, _))) = written.range(..end).next_back() {
                    if e0 > g {
                        // Data written where the disk reads zeros.
                        missing.push((g0, e0));
                    }
                }
            }
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{GuestCluster, ImageModel};
    use crate::convert::{FileSink, WriteSink};
    use crate::Limits;

    fn unnamed() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "qcow2-guard-streaming-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn run(
        bytes: &[u8],
        opts: &ConvertOptions,
        spool: bool,
    ) -> Result<(Vec<u8>, Streamed), ConvertError> {
        let out = unnamed();
        let sink = FileSink::new(&out);
        let mut c = if spool {
            StreamConversion::with_spool(opts, &sink, Arc::new(bytes.to_vec()))?
        } else {
            StreamConversion::new(opts, &sink)?
        };
        for piece in bytes.chunks(1000) {
            c.feed(piece)?;
        }
        let done = c.finish()?;
        let mut disk = Vec::new();
        std::io::Read::read_to_end(&mut &out, &mut disk).unwrap();
        Ok((disk, done))
    }

    fn model() -> crate::build::BuiltImage {
        ImageModel {
            cluster_bits: 12,
            clusters: (0..24)
                .map(|i| match i % 4 {
                    0 => GuestCluster::Data(i),
                    1 => GuestCluster::Compressed(i),
                    2 => GuestCluster::Zero,
                    _ => GuestCluster::Unallocated,
                })
                .collect(),
            ..ImageModel::default()
        }
        .build()
        .unwrap()
    }

    #[test]
    fn written_as_it_passes() {
        let built = model();
        let (disk, done) = run(&built.bytes, &ConvertOptions::default(), false).unwrap();
        assert_eq!(disk, built.guest);
        assert!(!done.respooled && done.read_back.is_empty());
    }

    #[test]
    fn over_the_budget_respools_or_refuses() {
        let built = model();
        let opts = ConvertOptions {
            limits: Limits {
                max_retained_bytes: 1,
                ..Limits::default()
            },
            ..ConvertOptions::default()
        };
        // With a spool: written again from it at the end (what was
        // written while streaming is cleared first).
        let (disk, done) = run(&built.bytes, &opts, true).unwrap();
        assert_eq!(disk, built.guest);
        assert!(done.respooled);
        // Without: refused, the budget named.
        match run(&built.bytes, &opts, false) {
            Err(ConvertError::Audit { report, .. }) => {
                assert!(report.has(crate::check::code::NEEDS_RANDOM_ACCESS));
                assert!(
                    report.findings[0]
                        .message
                        .contains("retention budget of 1 bytes"),
                    "{}",
                    report.findings[0]
                );
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn sequential_sinks_are_refused() {
        let sink = WriteSink::new(Vec::new());
        assert!(matches!(
            StreamConversion::new(&ConvertOptions::default(), &sink),
            Err(ConvertError::Sink(_))
        ));
    }
}
