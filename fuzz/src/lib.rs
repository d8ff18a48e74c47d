//! Bodies of the qcow2-guard fuzz targets.
//!
//! Each `pub fn <target>(data: &[u8])` is what the libFuzzer binary
//! `fuzz_targets/<target>.rs` runs, and what the corpus replay tests (here
//! and at the repository root, `tests/fuzz_corpus.rs`) run over every file
//! of `corpus/<target>/` and `corpus/regressions/<target>/` under plain
//! `cargo test`. A body panics only when an oracle fails.
//!
//! Every body caps its input at [`MAX_INPUT`] and opens images with
//! [`Limits::fuzzing`].

#![forbid(unsafe_code)]

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use qcow2_guard::build::{GuestCluster, ImageModel, SnapshotModel};
use qcow2_guard::check::{code, CheckOptions, Report, Verdict};
use qcow2_guard::compressed::Descriptor;
use qcow2_guard::extensions::{Extensions, FeatureKind};
use qcow2_guard::l1l2::Cluster;
use qcow2_guard::read::RawBacking;
use qcow2_guard::walker::{self, Item, L2Entry};
use qcow2_guard::{refcount, CompressionType, Geometry, Header, Image, Limits, Policy};
use qcow2_guard::{Error, ExtentKind, FileSource, Source};

pub mod mutate;
pub mod qemu_decompress;

/// Inputs longer than this are ignored.
pub const MAX_INPUT: usize = 1 << 20;

/// Most L2 entries, refcounts and table entries one input may make a body
/// visit (an L1 table may point many entries at one large L2 table).
const WORK: u64 = 1 << 16;

/// A target body.
pub type Body = fn(&[u8]);

/// The targets, by name.
pub const TARGETS: &[(&str, Body)] = &[
    ("header", header),
    ("tables", tables),
    ("decompress", decompress),
    ("structured", structured),
    ("read", read),
    ("check", check),
    ("mutate", mutate::mutate),
    ("stream", stream),
];

/// Run target `name` on `data`; false when there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, body)) => {
            body(data);
            true
        }
        None => false,
    }
}

/// The check's work bounds for fuzzing: the default options with a
/// 64 MiB decompression budget (one L2 table can name one payload
/// thousands of times).
pub fn check_options() -> CheckOptions {
    CheckOptions {
        max_decompressed_bytes: 64 << 20,
        ..CheckOptions::default()
    }
}

/// Touch everything an error offers (code, offset, message).
fn consume(e: &Error) {
    let _ = (
        e.code(),
        e.offset(),
        e.to_string(),
        e.is_not_qcow2(),
        e.is_io(),
    );
}

/// `header`: the fixed header and the extensions, from raw bytes.
///
/// Oracle: a decoded header encodes back to bytes that decode to the same
/// header.
pub fn header(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let h = match Header::decode(data) {
        Ok(h) => h,
        Err(e) => return consume(&e),
    };
    let again = Header::decode(&h.encode()).expect("an encoded header decodes");
    assert_eq!(again, h, "header round trip");
    let limits = Limits::fuzzing();
    let file_len = data.len() as u64;
    // QEMU's own caps (the default limits) first, then the fuzzing ones.
    if let Err(e) = h.validate(file_len, &Limits::default()) {
        consume(&e);
    }
    // Against the real length first; when only the file length fails
    // (the input is a header cut from a larger image), against an
    // unbounded one, so the extensions are decoded either way.
    let g = match h.validate(file_len, &limits) {
        Ok(g) => g,
        Err(e) => {
            consume(&e);
            match h.validate(u64::MAX, &limits) {
                Ok(g) => g,
                Err(e) => return consume(&e),
            }
        }
    };
    let first = &data[..data.len().min(g.cluster_size as usize)];
    match Extensions::decode(&h, first) {
        Ok(ext) => {
            let _ = ext.encode();
            let _ = Policy::default().evaluate(&h, &ext);
        }
        Err(e) => consume(&e),
    }
}

/// `tables`: an image opened from bytes, with its L1/L2, refcount,
/// snapshot and bitmap tables walked.
pub fn tables(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    match Image::open_with(data, Limits::fuzzing()) {
        Ok(img) => {
            walk(&img);
        }
        Err(e) => consume(&e),
    }
}

/// Walk every table of an open image, with a bounded amount of work.
/// Returns how many guest clusters failed to map.
pub fn walk<S: Source>(img: &Image<S>) -> u64 {
    let g = *img.geometry();
    let size = img.virtual_size();
    let mut work = WORK;
    let mut failures = 0u64;
    let _ = img.metadata().len();
    for f in img.policy_findings(&Policy::default()) {
        let _ = f.to_string();
    }
    let _ = img.bitmaps_stale();
    if let Some(b) = img.backing_file() {
        let _ = b.lossy();
    }
    // What a front end prints for feature bits: their names, if the image
    // has a feature name table.
    let ext = img.extensions();
    let h = img.header();
    for (kind, bits) in [
        (FeatureKind::Incompatible, h.incompatible_features),
        (FeatureKind::Compatible, h.compatible_features),
        (FeatureKind::Autoclear, h.autoclear_features),
    ] {
        for bit in (0..64u8).filter(|b| bits >> b & 1 != 0) {
            let _ = ext.feature_name(kind, bit);
        }
    }
    let m = img.metadata();
    let _ = (m.is_empty(), m.ranges().len());

    // Every table, through the library's one walker; the clusters of the
    // active tables also through the read path's checks (`Image::cluster`).
    walker::walk(img, &mut |item: Item<'_>| match item {
        Item::Error(e) | Item::RefcountBlock { block: Err(e), .. } => {
            consume(&e);
            failures += 1;
        }
        Item::L2(L2Entry {
            table,
            index,
            cluster,
            ..
        }) => {
            let guest = table.guest_offset(index, &g);
            if let Err(e) = &cluster {
                consume(e);
                failures += 1;
            }
            let Some(w) = work.checked_sub(1) else {
                return;
            };
            work = w;
            if table.active == 0 || guest >= size {
                return;
            }
            match img.cluster(guest) {
                Ok(c) => {
                    // The read path decodes the same entry with the same
                    // rules, and checks more.
                    match &cluster {
                        Ok(w) => assert_eq!(c, *w, "walker and Image::cluster at {guest:#x}"),
                        Err(e) => panic!("walker fails ({e}), Image::cluster maps {guest:#x}"),
                    }
                    let _ = (c.host_cluster(), c.copied());
                    for s in 0..g.subclusters as u32 {
                        let _ = c.subcluster(s, &g);
                    }
                    if let Cluster::Compressed(d) = c {
                        let _ = d.host_clusters(&g).count();
                    }
                }
                Err(e) => {
                    consume(&e);
                    failures += 1;
                }
            }
        }
        Item::Bitmap(b) => {
            let _ = (
                b.granularity(),
                b.flag_names(),
                b.expected_table_size(size, &g),
            );
        }
        _ => {}
    });

    // Refcount table, blocks, and the refcount of every host cluster.
    for i in 0..img.refcount_table().len() as u64 {
        if let Err(e) = img.refcount_block(i) {
            consume(&e);
        }
    }
    let host_clusters = g.clusters_for(img.file_len()).min(work);
    for c in 0..host_clusters {
        if let Err(e) = img.refcount(c) {
            consume(&e);
        }
    }
    failures
}

/// Longest guest range the `read` target reads.
pub const MAX_READ: u64 = 256 << 10;

/// Length of the `read` target's trailer (see [`read`]).
pub const READ_TRAILER: usize = 16;

/// `read`: guest reads at fuzzer-chosen ranges.
///
/// Input format: the image, then a 16-byte trailer:
/// - bytes 0..8: guest offset (big-endian);
/// - bytes 8..12: length (big-endian), at most [`MAX_READ`];
/// - byte 12: bit 0 set = use offset and length as given (a range past the
///   end of the disk must be refused), clear = fold the offset into the
///   disk and the length into what is left of it; bit 1 set = supply the
///   image bytes themselves as a raw backing image; bit 2 set = supply
///   them as the external data file;
/// - bytes 13..15: chunk size of the [`qcow2_guard::GuestReader`] reads,
///   `1 + value % 8192` (big-endian);
/// - byte 15: unused.
///
/// Oracles on a range inside the disk (see [`compare_reads`]): one
/// `read_at`, one `read_at` per cluster, the `GuestReader` and the `map`
/// extents agree.
pub fn read(data: &[u8]) {
    if data.len() > MAX_INPUT || data.len() < READ_TRAILER {
        return;
    }
    let (file, t) = data.split_at(data.len() - READ_TRAILER);
    let offset = u64::from_be_bytes(t[0..8].try_into().expect("8 bytes"));
    let len = u64::from(u32::from_be_bytes(t[8..12].try_into().expect("4 bytes"))).min(MAX_READ);
    let raw = t[12] & 1 != 0;
    let chunk = usize::from(u16::from_be_bytes([t[13], t[14]])) % 8192 + 1;
    let mut img = match Image::open_with(file, Limits::fuzzing()) {
        Ok(img) => img,
        Err(e) => return consume(&e),
    };
    if t[12] & 2 != 0 {
        img.set_backing(Arc::new(RawBacking(file.to_vec())));
    }
    if t[12] & 4 != 0 {
        img.set_data_file(Arc::new(file.to_vec()));
    }
    let size = img.virtual_size();
    let (offset, len) = if raw {
        if offset.checked_add(len).is_none_or(|end| end > size) {
            let mut buf = vec![0u8; len as usize];
            let e = img
                .read_at(offset, &mut buf)
                .expect_err("a read past the end of the disk succeeds");
            assert_eq!(e.code(), "out_of_virtual_bounds", "{e}");
            assert!(img.map(offset, len).is_err(), "map past the end");
            return;
        }
        (offset, len)
    } else {
        let offset = offset.checked_rem(size).unwrap_or(0);
        (offset, len.min(size - offset))
    };
    compare_reads(&img, file, offset, len, chunk);
}

/// The oracles of the `read` target on guest range `off .. off + len`
/// (inside the disk) of `img`, opened from `file`, with no backing image or
/// `file` itself as a raw backing image, and with no data file or `file`
/// itself as the data file.
///
/// Let A be one `read_at` of the range, and P the `read_at`s of its
/// pieces, split at cluster boundaries, in order:
/// - A succeeds iff every P succeeds, and then the bytes are equal;
/// - when both fail, A's error has the code of the first failing P (the
///   read walks the range in order and stops at the first error);
/// - the `GuestReader`, seeked to `off` and read in `chunk`-byte reads,
///   never ends early; when it succeeds, A succeeds with the same bytes;
///   when A succeeds and it fails, the failure is in the clusters it reads
///   beyond the range (it buffers whole clusters): a `read_at` of the
///   range widened to whole clusters fails too;
/// - when A succeeds, `map` succeeds and its extents tile the range, zero
///   extents read as zeros, unallocated ones as the backing bytes at the
///   same guest offset (zeros past its end or without one), and data
///   extents as the file bytes at their host offset; when `map` fails, A
///   fails.
///
/// An empty range has no pieces: only `map` is checked (no extents).
pub fn compare_reads<S: Source>(img: &Image<S>, file: &[u8], off: u64, len: u64, chunk: usize) {
    let g = *img.geometry();
    let n = len as usize;
    let end = off + len;
    let range = format!("guest range {off:#x}+{len:#x}");

    let mut whole = vec![0u8; n];
    let one = img.read_at(off, &mut whole);

    let mut pieces = vec![0u8; n];
    let mut first_err: Option<(u64, Error)> = None;
    let mut pos = off;
    while pos < end {
        let next = (g.cluster_start(pos) + g.cluster_size).min(end);
        let piece = &mut pieces[(pos - off) as usize..(next - off) as usize];
        if let Err(e) = img.read_at(pos, piece) {
            first_err.get_or_insert((pos, e));
        }
        pos = next;
    }
    if len == 0 {
        // No pieces to compare with: an empty read may still be refused
        // (an encrypted image), and map with it.
        if let Ok(extents) = img.map(off, 0) {
            assert_eq!(extents.count(), 0, "{range}: extents of an empty range");
        }
        return;
    }
    match (&one, &first_err) {
        (Ok(()), None) => assert!(whole == pieces, "{range}: per-cluster bytes differ"),
        (Ok(()), Some((at, e))) => {
            panic!("{range} reads in one call, the cluster piece at {at:#x} fails: {e}")
        }
        (Err(e), None) => panic!("{range} fails in one call ({e}), every cluster piece reads"),
        (Err(e), Some((at, p))) => assert_eq!(
            e.code(),
            p.code(),
            "{range}: one call fails with {e}, the first failing piece (at {at:#x}) with {p}"
        ),
    }

    let mut reader = img.reader();
    assert_eq!(reader.seek(SeekFrom::Start(off)).expect("seek"), off);
    let mut via = vec![0u8; n];
    let mut done = 0;
    let mut reader_err = None;
    while done < n {
        let to = (done + chunk).min(n);
        match reader.read(&mut via[done..to]) {
            Ok(0) => panic!("{range}: GuestReader ends at {:#x}", off + done as u64),
            Ok(k) => done += k,
            Err(e) => {
                reader_err = Some(e);
                break;
            }
        }
    }
    match (&one, reader_err) {
        (Ok(()), None) => assert!(whole == via, "{range}: GuestReader bytes differ"),
        (Err(e), None) => panic!("{range}: GuestReader reads, read_at fails: {e}"),
        (Ok(()), Some(e)) => {
            let start = g.cluster_start(off);
            let stop = if end == off {
                end
            } else {
                (g.cluster_start(end - 1) + g.cluster_size).min(img.virtual_size())
            };
            let mut wide = vec![0u8; (stop - start) as usize];
            assert!(
                img.read_at(start, &mut wide).is_err(),
                "{range} reads, GuestReader fails ({e}), whole clusters {start:#x}..{stop:#x} read"
            );
        }
        (Err(_), Some(_)) => {}
    }

    match img.map(off, len) {
        Ok(extents) => {
            let mut pos = off;
            let mut failed = None;
            for e in extents {
                let e = match e {
                    Ok(e) => e,
                    Err(err) => {
                        failed = Some(err);
                        break;
                    }
                };
                assert_eq!(e.guest_offset, pos, "{range}: extents do not tile");
                assert!(e.len > 0 && e.end() <= end, "{range}: extent {e:?}");
                pos = e.end();
                if one.is_err() {
                    continue;
                }
                let got = &whole[(e.guest_offset - off) as usize..(e.end() - off) as usize];
                match e.kind {
                    ExtentKind::Zero => {
                        assert!(got.iter().all(|&b| b == 0), "{range}: {e:?} not zeros")
                    }
                    ExtentKind::Unallocated => {
                        let backing = if img.backing().is_some() { file } else { &[] };
                        let from = usize::try_from(e.guest_offset).unwrap_or(usize::MAX);
                        let want = backing.get(from..).unwrap_or(&[]);
                        let want = &want[..want.len().min(got.len())];
                        let (head, tail) = got.split_at(want.len());
                        assert!(
                            head == want && tail.iter().all(|&b| b == 0),
                            "{range}: {e:?} differs from the backing image"
                        );
                    }
                    ExtentKind::Data { host } => {
                        let want = usize::try_from(host)
                            .ok()
                            .and_then(|h| file.get(h..h.checked_add(got.len())?));
                        assert!(want == Some(got), "{range}: {e:?} differs from the file");
                    }
                    _ => {}
                }
            }
            match failed {
                Some(err) => assert!(one.is_err(), "{range} reads, map fails: {err}"),
                None => assert_eq!(pos, end, "{range}: extents stop short"),
            }
        }
        Err(e) => assert!(one.is_err(), "{range} reads, map refuses it: {e}"),
    }
}

/// `check`: the full check ([`CheckOptions`] with decompression) of an
/// image opened from raw bytes; see [`checked_reads`] for the oracle.
pub fn check(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    match Image::open_with(data, Limits::fuzzing()) {
        Ok(img) => {
            let full = checked_reads(&img);
            let _ = full.verdict.passes();
            // Metadata only (what convert runs first), and with room to
            // track a single host cluster: refused unless the file has at
            // most one cluster.
            let _ = qcow2_guard::check_metadata(&img, &Policy::default())
                .verdict
                .passes();
            let tiny = CheckOptions {
                max_tracked_clusters: 1,
                ..check_options()
            };
            if img.file_len() > img.geometry().cluster_size {
                let r = qcow2_guard::check(&img, &tiny);
                assert!(r.verdict == Verdict::Invalid && r.has(code::TOO_LARGE_TO_CHECK));
            }
        }
        Err(e) => {
            let r = Report::from_open_error(&e);
            assert_ne!(r.verdict, Verdict::Ok, "an image that fails to open is ok");
            consume(&e);
        }
    }
}

/// `stream`, in the spirit of wasm-tools' `incremental_parse`: the image
/// after a 4-byte seed, fed to [`qcow2_guard::stream::Inspector`] in
/// chunks whose sizes (1 byte to 8 KiB) the seed draws. The report must
/// equal the whole-file check's: always with a spool, and in one chunk
/// without one; chunked without a spool, it equals it or is
/// `needs_random_access`, and then the same chunking with a spool did
/// read passed bytes back (a backward reference was followed). An early
/// refusal is never followed by `ok` or `leaks`; the inspector never
/// holds more than [`Limits::max_retained_bytes`].
pub fn stream(data: &[u8]) {
    use qcow2_guard::stream::{Early, Finished, Inspector};
    if data.len() > MAX_INPUT.saturating_add(4) {
        return;
    }
    let (seed, image) = data.split_at(data.len().min(4));
    let mut x = seed.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let mut sizes = Vec::new();
    let mut total = 0usize;
    while total < image.len() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Mostly small pieces, sometimes up to 8 KiB.
        let n = 1 + (x % (1u64 << (x >> 60).min(13))) as usize;
        sizes.push(n);
        total += n;
    }
    let limits = Limits::fuzzing();
    let opts = check_options();
    let whole = match Image::open_with(image, limits.clone()) {
        Ok(img) => qcow2_guard::check(&img, &opts),
        Err(e) => Report::from_open_error(&e),
    };
    let run = |chunks: &[usize], spool: bool| -> Finished {
        let mut i = if spool {
            Inspector::with_spool(limits.clone(), opts.clone(), Arc::new(image.to_vec()))
        } else {
            Inspector::new(limits.clone(), opts.clone())
        };
        let mut at = 0;
        let mut refused = false;
        for &n in chunks {
            let end = (at + n).min(image.len());
            i.feed(&image[at..end]);
            at = end;
            assert!(i.retained_bytes() <= limits.max_retained_bytes);
            match i.early() {
                Early::Refused(f) => {
                    assert!(!f.is_empty());
                    refused = true;
                }
                _ => assert!(!refused, "an early refusal was withdrawn"),
            }
        }
        let done = i.finish();
        if refused {
            assert!(
                !matches!(done.report.verdict, Verdict::Ok | Verdict::Leaks),
                "refused early, then {:?}",
                done.report.verdict
            );
        }
        done
    };
    let one = run(&[image.len().max(1)], false);
    assert_eq!(one.report, whole, "in one chunk");
    assert!(
        one.read_back.is_empty(),
        "in one chunk: {:?}",
        one.read_back
    );
    let with = run(&sizes, true);
    assert_eq!(with.report, whole, "chunked, with a spool");
    let without = run(&sizes, false);
    if without.report.verdict == Verdict::NeedsRandomAccess {
        assert!(!without.read_back.is_empty() && !with.read_back.is_empty());
        assert!(!without.report.checked);
        assert!(without.report.has(code::NEEDS_RANDOM_ACCESS));
    } else {
        assert_eq!(without.report, whole, "chunked, without a spool");
        assert!(without.read_back.is_empty());
    }
}

/// Most guest bytes [`checked_reads`] reads back.
const CHECK_READ: u64 = 32 << 20;

/// Most extents [`checked_reads`] walks.
const CHECK_EXTENTS: u64 = 1 << 18;

/// Check `img`; when the verdict is `ok` or `leaks`, the whole virtual
/// disk must read without error: `map` over the whole disk succeeds and
/// tiles it, and every data and compressed extent reads with `read_at`
/// (zero and unallocated extents are not read, so huge sparse disks stay
/// fast; at most [`CHECK_READ`] bytes and [`CHECK_EXTENTS`] extents;
/// compressed extents are skipped when the check's decompression budget
/// ran out, as the check did not verify them then).
pub fn checked_reads<S: Source>(img: &Image<S>) -> Report {
    let opts = CheckOptions {
        decompress: true,
        ..check_options()
    };
    let report = qcow2_guard::check(img, &opts);
    for f in &report.findings {
        let _ = f.to_string();
    }
    // Only `invalid` may leave the image unjudged or not; a stream that
    // needed random access never judged it; every other verdict did.
    let consistent = match report.verdict {
        Verdict::Invalid => true,
        Verdict::NeedsRandomAccess => !report.checked,
        _ => report.checked,
    };
    assert!(
        consistent,
        "{:?} checked={}",
        report.verdict, report.checked
    );
    if !matches!(report.verdict, Verdict::Ok | Verdict::Leaks) {
        return report;
    }
    let verdict = report.verdict.as_str();
    let skip_compressed = report.has(code::DECOMPRESS_BUDGET);
    let size = img.virtual_size();
    let extents = img
        .map(0, size)
        .unwrap_or_else(|e| panic!("verdict {verdict}, but map refuses the disk: {e}"));
    let (mut budget, mut steps, mut pos) = (CHECK_READ, CHECK_EXTENTS, 0u64);
    let mut buf = Vec::new();
    for e in extents {
        let e =
            e.unwrap_or_else(|err| panic!("verdict {verdict}, but map fails at {pos:#x}: {err}"));
        assert_eq!(e.guest_offset, pos, "extents do not tile the disk");
        pos = e.end();
        steps -= 1;
        if steps == 0 {
            return report;
        }
        match e.kind {
            ExtentKind::Zero | ExtentKind::Unallocated => continue,
            ExtentKind::Compressed(_) if skip_compressed => continue,
            _ => {}
        }
        let mut at = e.guest_offset;
        while at < e.end() {
            let n = (e.end() - at).min(1 << 20).min(budget);
            if n == 0 {
                return report;
            }
            budget -= n;
            buf.resize(n as usize, 0);
            if let Err(err) = img.read_at(at, &mut buf) {
                panic!("verdict {verdict}, but guest {at:#x}+{n:#x} ({e:?}) fails: {err}");
            }
            at += n;
        }
    }
    assert_eq!(pos, size, "extents stop short of the disk's end");
    report
}

/// `decompress`: the compressed-cluster path alone.
///
/// Input format (documented for seed makers):
/// - byte 0: cluster_bits = 9 + (byte % 13), i.e. 9..=21;
/// - byte 1: bit 0 set = zstd, clear = deflate;
/// - bytes 2..10: an L2 entry (big-endian) whose descriptor bits are decoded;
/// - the rest: the host file the descriptor points into (offset 0 = the
///   first byte after the 10-byte prefix).
///
/// The descriptor is validated against that file; when it is valid its
/// range is decompressed into exactly one cluster. The whole rest is also
/// decompressed on its own, so the decoders are fuzzed even when the
/// descriptor is not.
pub fn decompress(data: &[u8]) {
    if data.len() > MAX_INPUT || data.len() < 10 {
        return;
    }
    let cluster_bits = 9 + u32::from(data[0] % 13);
    let kind = if data[1] & 1 != 0 {
        CompressionType::Zstd
    } else {
        CompressionType::Deflate
    };
    let entry = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
    let file = &data[10..];
    let g = Geometry::new(cluster_bits, false, 4);
    let cluster = g.cluster_size as usize;

    let d = Descriptor::decode(entry, &g);
    assert_eq!(
        Descriptor::decode(d.encode(&g), &g),
        d,
        "descriptor round trip"
    );
    let _ = d.host_clusters(&g).count();
    let len = file.len() as u64;
    if d.validate(0, &g, len).is_ok() {
        assert!(d.span() <= Descriptor::max_span(&g));
        // The file may end inside the range's last sector (QEMU does not
        // pad a compressed write at the end of the file), never earlier.
        let end = d.readable_end(len);
        assert!(end <= len && d.end() - end < 512, "readable range");
        let stream = &file[d.start() as usize..end as usize];
        qemu_decompress::differential(kind, stream, cluster);
    }
    qemu_decompress::differential(kind, file, cluster);
}

/// A guest cluster of the structured model.
#[derive(Debug, Arbitrary)]
enum FuzzCluster {
    Unallocated,
    Zero,
    Data(u8),
    Compressed(u8),
    Subclusters { alloc: u32, zero: u32, seed: u8 },
}

/// One edit of the encoded image.
#[derive(Debug, Arbitrary)]
enum Edit {
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
}

/// The structured target's input: an image model plus edits.
#[derive(Debug, Arbitrary)]
struct FuzzImage {
    v2: bool,
    cluster_bits: u8,
    refcount_order: u8,
    extended_l2: bool,
    zstd: bool,
    lazy_refcounts: bool,
    feature_table: bool,
    clusters: Vec<FuzzCluster>,
    snapshots: u8,
    edits: Vec<Edit>,
}

impl FuzzImage {
    /// The valid model this input stands for (out-of-range choices are
    /// folded into range).
    fn model(&self) -> ImageModel {
        let v3 = !self.v2;
        let extended_l2 = v3 && self.extended_l2;
        // 512 B..64 KiB clusters keep images (and runs) small.
        let mut cluster_bits = 9 + u32::from(self.cluster_bits % 8);
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
            snapshots: (0..u64::from(self.snapshots % 5).min(max_snapshots))
                .map(|i| SnapshotModel {
                    name: format!("snap{i}"),
                })
                .collect(),
        }
    }
}

/// `structured`: an arbitrary valid image written by the project's encoder
/// ([`qcow2_guard::build`]), then edited.
///
/// Oracles: with no edits the image opens with [`Limits::fuzzing`], every
/// guest cluster maps without error, every host cluster is referenced, the
/// full check is clean (verdict `ok`, exit 0), and `read_at` over the whole
/// disk and the `GuestReader` give [`qcow2_guard::build::BuiltImage::guest`]
/// byte for byte. With edits: the [`checked_reads`] oracle, no panic, and
/// the bounded memory every target has.
pub fn structured(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let Ok(input) = FuzzImage::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let model = input.model();
    let built = model
        .build()
        .unwrap_or_else(|e| panic!("the encoder rejects a folded model: {e}\n{model:?}"));
    if input.edits.is_empty() {
        let img = Image::open_with(&built.bytes[..], Limits::fuzzing())
            .unwrap_or_else(|e| panic!("a built image does not open: {e}\n{model:?}"));
        assert_eq!(img.virtual_size(), built.guest.len() as u64);
        assert_eq!(img.snapshots().len(), model.snapshots.len());
        let cs = img.geometry().cluster_size;
        for i in 0..model.clusters.len() as u64 {
            if let Err(e) = img.cluster(i * cs) {
                panic!("guest cluster {i} of a built image: {e}\n{model:?}");
            }
        }
        assert_eq!(
            walk(&img),
            0,
            "a built image has tables that fail\n{model:?}"
        );
        for c in 0..built.bytes.len() as u64 / cs {
            assert!(
                img.refcount(c).expect("refcount") >= 1,
                "host cluster {c} unreferenced\n{model:?}"
            );
        }
        let report = checked_reads(&img);
        assert!(
            report.verdict == Verdict::Ok && report.checked,
            "a built image does not check clean: {:?} {:?}\n{model:?}",
            report.verdict,
            report.findings
        );
        let mut guest = vec![0u8; built.guest.len()];
        if let Err(e) = img.read_at(0, &mut guest) {
            panic!("a built image does not read: {e}\n{model:?}");
        }
        if let Some(i) = (0..guest.len()).find(|&i| guest[i] != built.guest[i]) {
            panic!("guest byte {i:#x} of a built image differs\n{model:?}");
        }
        let mut via = Vec::new();
        img.reader()
            .read_to_end(&mut via)
            .unwrap_or_else(|e| panic!("GuestReader on a built image: {e}\n{model:?}"));
        assert!(via == built.guest, "GuestReader differs\n{model:?}");
        return;
    }
    let mut bytes = built.bytes;
    for edit in input.edits.iter().take(16) {
        apply(&mut bytes, &built.fields, edit);
    }
    match Image::open_with(&bytes[..], Limits::fuzzing()) {
        Ok(img) => {
            walk(&img);
            checked_reads(&img);
        }
        Err(e) => consume(&e),
    }
}

fn apply(bytes: &mut Vec<u8>, fields: &[qcow2_guard::build::Field], edit: &Edit) {
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
        Edit::Truncate { at } => {
            if !bytes.is_empty() {
                bytes.truncate(at as usize % bytes.len());
            }
        }
    }
}

/// Files of `dir`, sorted (none when it does not exist).
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Replay `corpus/<target>/*` and `corpus/regressions/<target>/*` under
/// `corpus` through every target body; returns (target, files replayed).
/// Panics (naming the file) when a body panics.
pub fn replay_corpus(corpus: &Path) -> Vec<(&'static str, usize)> {
    let mut counts = Vec::new();
    for (name, body) in TARGETS {
        let mut n = 0;
        for dir in [corpus.join(name), corpus.join("regressions").join(name)] {
            for f in files(&dir) {
                let data = std::fs::read(&f).expect("read corpus file");
                let r = std::panic::catch_unwind(|| body(&data));
                assert!(r.is_ok(), "target {name} panics on {}", f.display());
                if *name == "tables" {
                    file_and_memory_agree(&f, &data);
                }
                n += 1;
            }
        }
        counts.push((*name, n));
    }
    counts
}

/// The same image opened from a file ([`FileSource`]) and from memory gives
/// the same outcome: the same error code, or the same tables failing.
pub fn file_and_memory_agree(path: &Path, data: &[u8]) {
    let src = FileSource::open(path).expect("open corpus file");
    let outcome = |r: qcow2_guard::Result<u64>| match r {
        Ok(failures) => format!("ok, {failures} failures"),
        Err(e) => format!("error {} at {:#x}", e.code(), e.offset()),
    };
    let from_file = outcome(Image::open_with(src, Limits::fuzzing()).map(|img| walk(&img)));
    let from_memory = outcome(Image::open_with(data, Limits::fuzzing()).map(|img| walk(&img)));
    assert_eq!(from_file, from_memory, "{}", path.display());
}
