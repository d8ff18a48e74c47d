//! Oracles shared by the targets: what must hold of an opened image,
//! whatever bytes it came from (the tables walked without a failing
//! disagreement, read paths agreeing with each other and with the file's
//! bytes, a clean check reading back).

use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use qcow2_guard::check::{code, CheckOptions, Report, Verdict};
use qcow2_guard::compare::{compare, Outcome, Side};
use qcow2_guard::convert::{
    code as convert_code, Conversion, ConvertError, ConvertOptions, FileSink, Sink,
    StreamConversion, Streamed, WriteSink,
};
use qcow2_guard::extensions::FeatureKind;
use qcow2_guard::l1l2::Cluster;
use qcow2_guard::qemu_map::{MapFile, MapLayer as _, Qcow2Layer};
use qcow2_guard::read::RawBacking;
use qcow2_guard::stream::SpoolFile;
use qcow2_guard::walker::{self, Item, L2Entry};
use qcow2_guard::{qemu_map, Error, ExtentKind, Header, Image, Limits, Policy, Severity, Source};

use crate::sparse::Sparse;
use crate::{check_options, consume, WORK};

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

/// FNV-1a of `data`: the `tables` target's draws (no input format of its
/// own: the input is the image).
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An image `img` opened from `data` with [`Limits::fuzzing`], opened
/// again under tighter limits drawn from the bytes:
/// - a total budget ([`Limits::max_total_bytes`]) below what the open
///   charged is refused with `total_limit_exceeded` (budgets just short
///   of each structure's charge, and one drawn from the bytes); exactly
///   what it charged opens;
/// - each cap in turn lowered to just below or at what the image needs
///   (drawn from the bytes): the image opens with the same header,
///   snapshots and bitmaps, or is refused (`Error::is_refusal`: over a
///   limit, never "malformed"). With a lowered cache budget the tables
///   walk again (one input in four) with the same failures (the L2 cache
///   evicts, the answers do not change); so they do with a cache of one
///   table, when the L1 table has several entries.
pub fn tighter_limits<S: Source>(img: &Image<S>, data: &[u8], failures: u64) {
    let h = fnv(data);
    let charged = img.charged_bytes();
    let hd = img.header();
    let g = img.geometry();
    // Budgets just short of where each structure's charge ends, in the
    // order the format lists them (the first cluster, the backing file
    // name, the L1 and refcount tables, the snapshot table, the bitmap
    // directory; then the caches), so every charge is the one that fails
    // for some budget; and one drawn below the total. Any budget below
    // the total must be refused, whatever the order.
    let mut ends = vec![img.file_len().min(g.cluster_size)];
    for n in [
        u64::from(hd.backing_file_size),
        u64::from(hd.l1_size) * 8,
        u64::from(hd.refcount_table_clusters) * g.cluster_size,
        img.snapshots().iter().map(|s| s.entry_len).sum(),
        img.extensions()
            .bitmaps
            .as_ref()
            .filter(|_| !img.bitmaps().is_empty())
            .map_or(0, |b| b.directory_size),
    ] {
        let last = ends.last().copied().unwrap_or(0);
        ends.push(last.saturating_add(n));
    }
    let mut budgets: Vec<u64> = ends.iter().map(|e| e.saturating_sub(1)).collect();
    budgets.extend([ends.last().copied().unwrap_or(0), charged.saturating_sub(1)]);
    budgets.extend(h.checked_rem(charged));
    budgets.sort_unstable();
    budgets.dedup();
    for below in budgets.into_iter().filter(|&b| b < charged) {
        let mut l = Limits::fuzzing();
        l.max_total_bytes = below;
        match Image::open_with(data, l.clone()) {
            Ok(_) => panic!("opened under a total budget of {below} < {charged} charged"),
            Err(e) => {
                consume(&e);
                assert!(e.is_refusal(), "{e}");
                assert_eq!(e.code(), "total_limit_exceeded", "{e}");
            }
        }
    }
    let mut l = Limits::fuzzing();
    l.max_total_bytes = charged;
    if let Err(e) = Image::open_with(data, l) {
        panic!("refused under a total budget of exactly what it charged: {e}");
    }
    let v = h >> 8;
    // Each cap in turn, near what the image needs: just below it, or at
    // it (drawn); the cache budget drawn below 4 clusters.
    for cap in 0..9 {
        let near = |need: u64| need.saturating_sub(1 - ((v >> cap) & 1));
        let mut l = Limits::fuzzing();
        match cap {
            0 => l.max_l1_entries = near(u64::from(hd.l1_size)),
            1 => {
                l.max_refcount_table_bytes =
                    near(u64::from(hd.refcount_table_clusters).saturating_mul(g.cluster_size))
            }
            2 => l.max_snapshots = near(u64::from(hd.nb_snapshots)),
            3 => {
                l.max_snapshot_table_bytes =
                    near(img.snapshots().iter().map(|s| s.entry_len).sum::<u64>())
            }
            4 => l.max_snapshot_extra_data = (v >> 9) & 0x3f,
            5 => l.max_bitmaps = near(img.bitmaps().len() as u64),
            6 => l.max_bitmap_directory_bytes = (v >> 15) & 0xff,
            7 => l.max_backing_file_name = near(u64::from(hd.backing_file_size)),
            _ => l.max_cache_bytes = (v >> 23) % (4 * g.cluster_size),
        }
        match Image::open_with(data, l.clone()) {
            Ok(tight) => {
                assert_eq!(tight.header(), hd, "under {l:?}");
                assert_eq!(tight.snapshots(), img.snapshots(), "under {l:?}");
                assert_eq!(tight.bitmaps(), img.bitmaps(), "under {l:?}");
                if cap == 8 && v.is_multiple_of(4) {
                    assert_eq!(walk(&tight), failures, "walked with a cache of {l:?}");
                }
            }
            Err(e) => {
                consume(&e);
                assert!(e.is_refusal(), "under {l:?}: {e}");
            }
        }
    }
    // A cache of one L2 table, when there are several: it opens (it
    // charges less), and the walk evicts and fails where it failed.
    if hd.l1_size >= 2 {
        let one = Limits::fuzzing().with_max_cache_bytes(g.cluster_size);
        match Image::open_with(data, one) {
            Ok(tight) => assert_eq!(walk(&tight), failures, "walked with one cached table"),
            Err(e) => panic!("refused with one cached table: {e}"),
        }
    }
}

/// `data` as a [`Source`] whose read number `fail_at` (from 0) fails with
/// an I/O error: the OS failing once.
pub struct Flaky<'a> {
    data: &'a [u8],
    reads: AtomicU64,
    fail_at: u64,
}

impl<'a> Flaky<'a> {
    /// `data`, failing its read number `fail_at`.
    pub fn new(data: &'a [u8], fail_at: u64) -> Flaky<'a> {
        Flaky {
            data,
            reads: AtomicU64::new(0),
            fail_at,
        }
    }

    /// Reads asked of it so far (the failed one included).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
}

impl Source for Flaky<'_> {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if self.reads.fetch_add(1, Ordering::Relaxed) == self.fail_at {
            return Err(std::io::Error::other("injected I/O failure"));
        }
        Source::read_exact_at(&self.data, offset, buf)
    }
}

/// An image `img` opened from `data`, opened again over a source whose
/// read number k fails ([`Flaky`]): when k is one of the reads the open
/// makes (each of the first 16 in turn), the open fails with an I/O error
/// (never a format error, never success); when it comes later (k drawn
/// from the bytes), reading the first
/// 256 KiB of the disk gives the bytes `img` gives, or an I/O error, or
/// the error `img` gives (a failure is never read as other bytes).
pub fn io_failures_surface<S: Source>(img: &Image<S>, data: &[u8]) {
    let h = fnv(data).rotate_left(29);
    let counting = Flaky::new(data, u64::MAX);
    let opened = Image::open_with(&counting, Limits::fuzzing());
    assert!(opened.is_ok(), "a counting source does not open");
    let n = counting.reads();
    for k in 0..n.min(16) {
        match Image::open_with(Flaky::new(data, k), Limits::fuzzing()) {
            Ok(_) => panic!("opened though read {k} of {n} failed"),
            Err(e) => assert!(e.is_io(), "read {k} of {n} failed: {e}"),
        }
    }
    let k = n + (h >> 32) % 8;
    let flaky = match Image::open_with(Flaky::new(data, k), Limits::fuzzing()) {
        Ok(f) => f,
        Err(e) => panic!("opened, then not when read {k} (after {n}) fails: {e}"),
    };
    let len = img.virtual_size().min(256 << 10) as usize;
    let (mut want, mut got) = (vec![0u8; len], vec![0u8; len]);
    let want_r = img.read_at(0, &mut want).map_err(|e| e.code());
    match flaky.read_at(0, &mut got) {
        Ok(()) => {
            assert_eq!(want_r, Ok(()), "read {k} failing, the read succeeds");
            assert!(want == got, "read {k} failing, the read gives other bytes");
        }
        Err(e) if e.is_io() => {}
        Err(e) => assert_eq!(want_r, Err(e.code()), "read {k} failing: {e}"),
    }
}

/// qemu-img's snapshot selectors (`-l`) over the snapshots of `img`:
/// `snapshot.id=ID`, `snapshot.name=NAME` and both together select the
/// first snapshot with that ID, name, or both; a bare `ID` the first with
/// that ID (else the first with that name); a `snapshot.` form that is
/// not `key=value` is taken as a bare ID or name; an exact selector with
/// neither selects nothing. (A value holding a comma is left out: the
/// form has no quoting.)
pub fn snapshot_selectors<S: Source>(img: &Image<S>) {
    use qcow2_guard::snapshot::SnapshotSelector;
    let snaps = img.snapshots();
    let find = |sel: &str| SnapshotSelector::parse(sel).find(snaps);
    let first = |f: &dyn Fn(&qcow2_guard::snapshot::Snapshot) -> bool| snaps.iter().position(f);
    let none = SnapshotSelector::Exact {
        id: None,
        name: None,
    };
    assert_eq!(none.find(snaps), None, "an exact selector with neither");
    for s in snaps.iter().take(8) {
        let by_id = first(&|t| t.id == s.id);
        let by_name = first(&|t| t.name == s.name);
        if !s.id.contains(',') {
            assert_eq!(find(&format!("snapshot.id={}", s.id)), by_id, "{s:?}");
            if !s.name.contains(',') {
                let both = first(&|t| t.id == s.id && t.name == s.name);
                let sel = format!("snapshot.id={},snapshot.name={}", s.id, s.name);
                assert_eq!(find(&sel), both, "{sel}");
            }
        }
        if !s.name.contains(',') {
            assert_eq!(find(&format!("snapshot.name={}", s.name)), by_name, "{s:?}");
        }
        if !s.id.starts_with("snapshot.") {
            assert_eq!(find(&s.id), by_id, "{s:?}");
        }
        let odd = format!("snapshot.{}", s.name);
        if !s.name.starts_with("id=") && !s.name.starts_with("name=") {
            let want = first(&|t| t.id == odd).or_else(|| first(&|t| t.name == odd));
            assert_eq!(find(&odd), want, "{odd}");
        }
    }
}

/// The bitmap directory entries of an image opened from `data` encode
/// back to the bytes they were read from (an entry without extra data,
/// whose name is valid UTF-8: the parser keeps it lossily).
pub fn bitmaps_encode<S: Source>(img: &Image<S>, data: &[u8]) {
    for b in img.bitmaps() {
        if b.extra_data_size != 0 || b.name.contains('\u{fffd}') {
            continue;
        }
        let enc = b.encode();
        let at = usize::try_from(b.entry_offset).expect("an offset in memory");
        let stored = data.get(at..at + enc.len());
        assert_eq!(stored, Some(&enc[..]), "bitmap entry at {at:#x}: {b:?}");
    }
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
/// - the `GuestReader`, seeked to `off` (from the start, the end or the
///   current position, by `chunk`) and read in `chunk`-byte reads,
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

    // Seek to `off` from the start, from the end, or from the current
    // position (after a refused seek before the start), by `chunk`.
    let mut reader = img.reader();
    let from_end = i64::try_from(off)
        .ok()
        .zip(i64::try_from(img.virtual_size()).ok())
        .map(|(o, s)| o - s);
    let at = match (chunk % 3, from_end, i64::try_from(off)) {
        (1, Some(back), _) => reader.seek(SeekFrom::End(back)),
        (2, _, Ok(fwd)) => {
            assert!(
                reader.seek(SeekFrom::Current(-1)).is_err(),
                "a seek before the start succeeds"
            );
            reader.seek(SeekFrom::Current(fwd))
        }
        _ => reader.seek(SeekFrom::Start(off)),
    };
    assert_eq!(at.expect("seek"), off, "{range}: seek");
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
                if e.is_zero_without_backing() && img.backing().is_none() {
                    assert!(got.iter().all(|&b| b == 0), "{range}: {e:?} not zeros");
                }
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

/// A positional [`Sink`] in memory, as a new file: holes are left as they
/// are (zeros), and every range handed to it is recorded, so the oracle
/// can check that the conversion covered the disk exactly once.
struct MemorySink {
    state: Mutex<Written>,
}

/// The disk's bytes, and the `(offset, len)` ranges written.
type Written = (Vec<u8>, Vec<(u64, u64)>);

impl MemorySink {
    fn new(size: u64) -> MemorySink {
        MemorySink {
            state: Mutex::new((vec![0; size as usize], Vec::new())),
        }
    }

    fn record(&self, offset: u64, len: u64, data: Option<&[u8]>) -> std::io::Result<()> {
        let mut st = self.state.lock().expect("sink lock");
        let end = offset.checked_add(len).expect("sink range overflows");
        assert!(
            end <= st.0.len() as u64,
            "positional write {offset:#x}+{len:#x} past the disk's end {:#x}",
            st.0.len()
        );
        if let Some(d) = data {
            st.0[offset as usize..end as usize].copy_from_slice(d);
        }
        st.1.push((offset, len));
        Ok(())
    }
}

impl Sink for MemorySink {
    fn sequential(&self) -> bool {
        false
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.record(offset, data.len() as u64, Some(data))
    }

    fn write_zeros(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.record(offset, len, None)
    }

    fn finish(&self, size: u64) -> std::io::Result<()> {
        let st = self.state.lock().expect("sink lock");
        assert_eq!(size, st.0.len() as u64, "finish with another size");
        let mut ranges = st.1.clone();
        ranges.sort_unstable();
        let mut pos = 0;
        for (at, len) in ranges {
            assert_eq!(
                at, pos,
                "positional writes leave a gap or overlap at {pos:#x}"
            );
            pos = at + len;
        }
        assert_eq!(pos, size, "positional writes stop short of the disk's end");
        Ok(())
    }
}

/// Whether the image, opened as a conversion opens it
/// ([`ConvertOptions::limits`]), checks clean (verdict `ok` or `leaks`,
/// every compressed payload verified) under the conversion's policy: then
/// the conversion, with no backing image, data file or snapshot handed
/// in, must be accepted and must succeed.
pub fn clean_without_backing(image: &[u8], opts: &ConvertOptions) -> bool {
    let Ok(img) = Image::open_with(image, opts.limits()) else {
        return false;
    };
    let report = qcow2_guard::check(
        &img,
        &CheckOptions {
            decompress: true,
            policy: opts.policy.clone(),
            ..check_options()
        },
    );
    matches!(report.verdict, Verdict::Ok | Verdict::Leaks) && !report.has(code::DECOMPRESS_BUDGET)
}

/// A refused conversion: the refusal is typed, with error findings (or a
/// failing audit); an image that checks clean ([`clean_without_backing`])
/// is refused only by the output bounds. Nothing can have been written:
/// without a [`Conversion`] there is nothing to run.
pub fn refusal_is_typed(e: &ConvertError, clean: bool) {
    let _ = e.to_string();
    match e {
        ConvertError::Refused { findings, .. } => {
            assert!(!findings.is_empty(), "refused without a finding");
            for f in findings {
                assert_eq!(f.severity, Severity::Error, "refused by a non-error: {f}");
                assert!(
                    !clean
                        || [
                            convert_code::AMPLIFICATION,
                            convert_code::OUTPUT_TOO_LARGE,
                            convert_code::AUDIT_TOO_LARGE,
                        ]
                        .contains(&f.code),
                    "a clean image is refused: {f}"
                );
            }
        }
        ConvertError::Audit { report, .. } => {
            assert!(
                !matches!(report.verdict, Verdict::Ok | Verdict::Leaks),
                "the audit refuses a {:?} image",
                report.verdict
            );
            assert!(
                !clean,
                "the audit refuses a clean image: {:?}",
                report.findings
            );
        }
        ConvertError::Image { error, .. } => {
            consume(error);
            assert!(!clean, "a clean image fails to prepare: {error}");
        }
        ConvertError::Sink(err) => panic!("prepare fails with a sink error: {err}"),
    }
}

/// The `convert` oracle on an accepted conversion: the positional sink
/// ([`MemorySink`], holes skipped), the sequential sink
/// ([`WriteSink`], holes written as zeros) and one [`Image::read_at`] of
/// the whole disk all succeed or all fail (an image error, never a sink
/// error), and a clean image (`clean`) succeeds. On success the three
/// copies are equal byte for byte, the positional writes tile the disk
/// exactly once, the progress callback adds up to the disk's size,
/// `compare` (as `qemu-img compare`) finds the image and the output
/// identical, and the image's `qemu-img map` records agree with the
/// output (zero records read as zeros, data records in the image file as
/// the file's bytes at their offset).
pub fn conversions_agree<S: Source>(conversion: &Conversion<S>, clean: bool) -> Option<Vec<u8>> {
    let img = conversion.image();
    let size = conversion.size();
    assert!(
        size <= crate::targets::MAX_CONVERT_DISK,
        "policy lets {size:#x} bytes through"
    );
    for w in conversion.warnings() {
        assert_ne!(w.severity, Severity::Error, "a warning is an error: {w}");
    }
    let mut reference = vec![0u8; size as usize];
    let read = img.read_at(0, &mut reference);

    let positional = MemorySink::new(size);
    let pos_result = conversion.run(&positional, None);
    let sequential = WriteSink::new(Vec::new());
    let done = AtomicU64::new(0);
    let progress = |n: u64| {
        done.fetch_add(n, Ordering::Relaxed);
    };
    let seq_result = conversion.run(&sequential, Some(&progress));
    let outcome = |r: &Result<(), ConvertError>, sink: &str| match r {
        Ok(()) => true,
        Err(ConvertError::Image { error, .. }) => {
            consume(error);
            false
        }
        Err(e) => panic!("{sink} conversion fails with {e}"),
    };
    let (p, s) = (
        outcome(&pos_result, "positional"),
        outcome(&seq_result, "sequential"),
    );
    assert!(
        p == s && s == read.is_ok(),
        "positional {pos_result:?}, sequential {seq_result:?}, read_at {read:?}"
    );
    if let Err(e) = &read {
        assert!(!clean, "a clean image fails to convert: {e}");
        return None;
    }
    // The sequential sink now holds the whole disk: a write anywhere but
    // at its end, and a finish at another size, are refused (and write
    // nothing); a streaming conversion refuses it outright.
    if size > 0 {
        assert!(
            sequential.write_at(0, &[1]).is_err(),
            "a write out of order"
        );
    }
    assert!(
        sequential.finish(size + 1).is_err(),
        "a finish short of the size"
    );
    assert!(
        matches!(
            StreamConversion::new(&ConvertOptions::default(), &sequential),
            Err(ConvertError::Sink(_))
        ),
        "a streaming conversion into a sequential sink"
    );
    let out = sequential.into_inner().expect("sequential sink");
    assert!(out == reference, "sequential output differs from read_at");
    let (mem, _) = positional.state.into_inner().expect("sink lock");
    assert!(mem == reference, "positional output differs from read_at");
    assert_eq!(
        done.into_inner(),
        size,
        "progress does not add up to the disk"
    );

    let raw = RawBacking(out);
    let layer = Qcow2Layer::new(img);
    let cmp = compare(
        Side {
            map: &layer,
            data: img,
        },
        Side {
            map: &raw,
            data: &raw,
        },
        false,
    )
    .unwrap_or_else(|e| panic!("compare fails on a converted image: {e}"));
    assert_eq!(cmp.outcome, Outcome::Identical, "compare: {cmp:?}");
    assert!(!cmp.size_mismatch);
    compare_variants(img, &layer, &raw);

    let file = img.source();
    let mut records = 0u64;
    let mapped = qemu_map(&[&layer], 0, size, |e| {
        records += 1;
        let got = &raw.0[e.start as usize..e.end() as usize];
        // The chain is the image alone: without a backing image,
        // unallocated ranges read as zeros; with one, they are its bytes.
        // A present record flagged zero reads as zeros, data or not (data
        // in a hole of a metadata-preallocated image's file).
        let zeros = if e.present {
            e.zero
        } else {
            img.backing().is_none()
        };
        if zeros {
            assert!(got.iter().all(|&b| b == 0), "map record {e:?} is not zeros");
        } else if let (Some(host), Some((_, MapFile::Image)), false) =
            (e.offset, e.file, e.compressed)
        {
            if e.data && !e.zero {
                let mut want = vec![0u8; got.len()];
                if file.read_exact_at(host, &mut want).is_ok() {
                    assert!(want == got, "map record {e:?} differs from the file");
                }
            }
        }
        records < CHECK_EXTENTS
    });
    mapped.unwrap_or_else(|e| panic!("qemu_map fails on a converted image: {e}"));
    Some(raw.0)
}

/// The `compare` oracles on an image and its raw conversion `out` (the
/// disk's bytes, already known equal to `read_at`'s), beyond the plain
/// comparison [`conversions_agree`] makes:
/// - strict (`qemu-img compare -s`): the image with itself is identical;
///   with its raw conversion identical or a status mismatch, never a
///   content mismatch; the other way round (raw first) not strict,
///   identical;
/// - one byte of the output flipped: a content mismatch reported at the
///   start of that byte's sector;
/// - without a backing image, the output cut to half its size (in whole
///   sectors): the sizes differ; strict, a size mismatch; not strict,
///   identical exactly when the cut part of the disk reads as zeros, else
///   a content mismatch at or past the cut and at most at the first
///   non-zero byte's sector.
fn raw(r: &RawBacking<Vec<u8>>) -> Side<'_> {
    Side { map: r, data: r }
}

fn compare_variants<S: Source>(
    img: &Image<S>,
    layer: &Qcow2Layer<'_, S>,
    out: &RawBacking<Vec<u8>>,
) {
    let image = Side {
        map: layer,
        data: img,
    };
    let cmp = |a: Side<'_>, b: Side<'_>, strict: bool| {
        compare(a, b, strict).unwrap_or_else(|e| panic!("compare fails on a converted image: {e}"))
    };
    let _ = format!("{image:?}");
    let size = out.0.len() as u64;

    let itself = cmp(image, image, true);
    assert_eq!(itself.outcome, Outcome::Identical, "strict, with itself");
    match cmp(image, raw(out), true).outcome {
        Outcome::Identical => {}
        Outcome::StatusMismatch(at) => assert!(at < size, "status mismatch at {at:#x}"),
        o => panic!("strict compare with the raw conversion: {o:?}"),
    }
    let back = cmp(raw(out), image, false);
    assert_eq!(back.outcome, Outcome::Identical, "raw first: {back:?}");
    assert!(!back.common_part_equal_sizes_differ());

    if size == 0 {
        return;
    }
    let k = out
        .0
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(out.0.len() / 2);
    let mut flipped = out.0.clone();
    flipped[k] ^= 1;
    let flipped = RawBacking(flipped);
    match cmp(image, raw(&flipped), false).outcome {
        Outcome::ContentMismatch(at) => assert!(
            at <= k as u64 && k as u64 - at < 512,
            "byte {k:#x} flipped, mismatch reported at {at:#x}"
        ),
        o => panic!("byte {k:#x} flipped: {o:?}"),
    }
    drop(flipped);

    // The cut, with or without a backing image handed in (its unallocated
    // ranges read the backing image's bytes: `MapLayer::reads_below`
    // keeps `compare` from taking them for zeros).
    let cut = (size / 2) & !511;
    let short = RawBacking(out.0[..cut as usize].to_vec());
    assert_eq!(
        cmp(image, raw(&short), true).outcome,
        Outcome::SizeMismatch,
        "strict, cut to {cut:#x}"
    );
    let c = cmp(image, raw(&short), false);
    assert!(c.size_mismatch && c.common_size == cut, "{c:?}");
    let first = out.0[cut as usize..].iter().position(|&b| b != 0);
    match (c.outcome, first) {
        (Outcome::Identical, None) => assert!(c.common_part_equal_sizes_differ()),
        (Outcome::ContentMismatch(at), Some(i)) => {
            let i = cut + i as u64;
            assert!(
                at >= cut && at <= i && i - at < 512,
                "cut to {cut:#x}: first non-zero byte past it at {i:#x}, mismatch at {at:#x}"
            );
            assert!(c.common_part_equal_sizes_differ());
        }
        (o, first) => panic!("cut to {cut:#x}: {o:?}, first non-zero byte past the cut {first:?}"),
    }
}

/// A positional sink in memory that behaves as a new file of at most
/// `cap` bytes: holes are not written (they read as zeros), a write past
/// `cap` fails (an image refused by the policy may be written into
/// before it is refused; a file would grow, this sink refuses), and no
/// write may end past the size [`Sink::finish`] is given.
struct BoundedSink {
    cap: u64,
    /// The bytes, and the end of the furthest write.
    state: Mutex<(Vec<u8>, u64)>,
}

impl BoundedSink {
    fn new(cap: u64) -> BoundedSink {
        BoundedSink {
            cap,
            state: Mutex::new((Vec::new(), 0)),
        }
    }

    fn bound(&self, offset: u64, len: u64) -> std::io::Result<u64> {
        offset
            .checked_add(len)
            .filter(|&end| end <= self.cap)
            .ok_or_else(|| std::io::Error::other("a write past the sink's bound"))
    }
}

impl Sink for BoundedSink {
    fn sequential(&self) -> bool {
        false
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = self.bound(offset, data.len() as u64)?;
        let mut st = self.state.lock().expect("sink lock");
        if st.0.len() < end as usize {
            st.0.resize(end as usize, 0);
        }
        st.0[offset as usize..end as usize].copy_from_slice(data);
        st.1 = st.1.max(end);
        Ok(())
    }

    fn write_zeros(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let end = self.bound(offset, len)?;
        let mut st = self.state.lock().expect("sink lock");
        st.1 = st.1.max(end);
        Ok(())
    }

    fn finish(&self, size: u64) -> std::io::Result<()> {
        let mut st = self.state.lock().expect("sink lock");
        assert!(
            st.1 <= size,
            "a write ends at {:#x}, past the disk's end {size:#x}",
            st.1
        );
        st.0.resize(size as usize, 0);
        Ok(())
    }
}

/// An accepted conversion run into [`FileSink::overwrite`] (a block
/// device's sink: holes written as zeros, the size left alone; with
/// [`FileSink::write_behind`], as the CLI writes) over a
/// file of the disk's size full of old bytes gives the disk `want`
/// exactly: every old byte overwritten.
pub fn overwrite_agrees<S: Source>(conversion: &Conversion<S>, want: &[u8]) {
    with_output_file(|file| {
        file.write_all_at(&vec![0xa5; want.len()], 0)
            .expect("fill the output file");
        conversion
            .run(&FileSink::overwrite(file).write_behind(), None)
            .unwrap_or_else(|e| panic!("converts into memory, fails over old bytes: {e}"));
        let len = file.metadata().expect("output metadata").len();
        assert_eq!(len, want.len() as u64, "the device's size changed");
        let mut disk = vec![0u8; want.len()];
        file.read_exact_at(&mut disk, 0)
            .expect("read the output back");
        assert!(
            disk == want,
            "old bytes left, or other bytes, after an overwrite"
        );
    });
}

/// The `qemu-img map` records of the chain `img` over the raw backing
/// image `backing` (the bytes `img` was given as its backing image) agree
/// with the converted disk `out`: they tile the disk in order; a record
/// flagged zero reads as zeros; a data record of the image's own file
/// (depth 0, not compressed) reads as the image file's bytes at its
/// offset, one of the backing image (depth 1) as the backing bytes at
/// its offset (the same guest offset: a raw image maps itself).
pub fn chain_map_agrees<S: Source>(img: &Image<S>, backing: &Sparse, out: &[u8]) {
    let layer = Qcow2Layer::new(img);
    let raw = RawBacking(backing);
    let size = out.len() as u64;
    let (mut records, mut pos) = (0u64, 0u64);
    let mapped = qemu_map(&[&layer, &raw], 0, size, |e| {
        records += 1;
        assert_eq!(e.start, pos, "chain map records do not tile: {e:?}");
        pos = e.end();
        let got = &out[e.start as usize..e.end() as usize];
        if e.zero {
            assert!(
                got.iter().all(|&b| b == 0),
                "chain map record {e:?} is not zeros"
            );
        } else if let (Some(host), Some((depth, file)), false) = (e.offset, e.file, e.compressed) {
            let mut want = vec![0u8; got.len()];
            let read = match (depth, file) {
                (0, MapFile::Image) => img.source().read_exact_at(host, &mut want).is_ok(),
                (1, _) => {
                    assert_eq!(host, e.start, "a raw backing image maps itself: {e:?}");
                    backing.read_exact_at(host, &mut want).is_ok()
                }
                _ => false,
            };
            if read && e.data {
                assert!(want == got, "chain map record {e:?} differs from its file");
            }
        }
        records < CHECK_EXTENTS
    });
    mapped.unwrap_or_else(|e| panic!("qemu_map fails on a converted chain: {e}"));
    assert!(
        records >= CHECK_EXTENTS || pos == layer.map_size(),
        "chain map stops at {pos:#x}"
    );
}

/// The one output file of the [`FileSink`] runs ([`streaming_agrees`],
/// [`overwrite_agrees`]): a
/// new file in the temporary directory, unlinked at once (as the CLI's
/// output is unnamed until it is committed), truncated to empty before
/// each use (a new, sparse file again). One per process, so a fuzzing
/// run does not create a file per input.
fn with_output_file<R>(f: impl FnOnce(&std::fs::File) -> R) -> R {
    static OUT: OnceLock<Mutex<std::fs::File>> = OnceLock::new();
    let out = OUT.get_or_init(|| Mutex::new(unlinked_file("output")));
    let file = out.lock().unwrap_or_else(PoisonError::into_inner);
    file.set_len(0).expect("truncate the output file");
    f(&file)
}

/// A spool as the CLI keeps one ([`SpoolFile`]: a file it writes the
/// stream into), holding `image`: a second unlinked file per process,
/// rewritten for each input. Called only inside [`with_output_file`],
/// whose lock keeps two users from sharing it.
fn spool_file(image: &[u8]) -> Arc<dyn Source> {
    static SPOOL: OnceLock<Mutex<std::fs::File>> = OnceLock::new();
    let f = SPOOL.get_or_init(|| Mutex::new(unlinked_file("spool")));
    let f = f.lock().unwrap_or_else(PoisonError::into_inner);
    f.set_len(0).expect("truncate the spool");
    f.write_all_at(image, 0).expect("write the spool");
    Arc::new(SpoolFile::new(f.try_clone().expect("clone the spool")))
}

/// A new file in the temporary directory, unlinked at once.
fn unlinked_file(what: &str) -> std::fs::File {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = std::env::temp_dir().join(format!(
        "qcow2-guard-fuzz-{what}-{}-{nanos}",
        std::process::id()
    ));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file
}

/// What a streamed conversion gave: the disk's bytes and the report.
type StreamOutcome = Result<(Vec<u8>, Streamed), ConvertError>;

/// Feed `image` to `conversion` in pieces of `sizes` bytes, then finish.
fn stream_into(
    mut conversion: StreamConversion<'_>,
    image: &[u8],
    sizes: &[usize],
) -> Result<Streamed, ConvertError> {
    let mut at = 0usize;
    for &n in sizes {
        let end = at.saturating_add(n).min(image.len());
        conversion.feed(&image[at..end])?;
        at = end;
        assert_eq!(conversion.position(), at as u64, "position after a feed");
        let _ = conversion.retained_bytes();
    }
    if !sizes.is_empty() {
        let _ = format!("{conversion:?}");
    }
    conversion.finish()
}

/// The streaming conversion ([`StreamConversion`], what `convert -`
/// runs) of `image` fed in pieces of `sizes` bytes, with `opts`, against
/// the positional conversion of the same image with the same options
/// (`positional`: the disk's bytes when it was accepted and ran, `None`
/// when it was refused or failed):
/// - with a spool (into a [`FileSink`] over a new file when the header
///   names a disk of at most [`crate::MAX_CONVERT_DISK`] bytes, else into
///   a bounded memory sink): it succeeds exactly when the positional
///   conversion does, with the same bytes, the right size and an audit
///   verdict `ok` or `leaks`;
/// - without a spool (bounded memory sink): when the spooled run read
///   nothing back and did not write the disk again from the spool, it
///   succeeds with the same bytes; otherwise it gives the same bytes or
///   refuses with a `needs_random_access` audit (a backward reference:
///   the layout does not stream); it never succeeds where the spooled
///   run failed.
///
/// A sink error is allowed only when the positional conversion refused
/// (a disk larger than the bound, written into before the refusal).
pub fn streaming_agrees(
    image: &[u8],
    opts: &ConvertOptions,
    sizes: &[usize],
    positional: Option<&[u8]>,
) {
    let size = Header::decode(image).map(|h| h.size).ok();
    let spooled: StreamOutcome = if size.is_some_and(|s| s <= crate::MAX_CONVERT_DISK) {
        with_output_file(|file| {
            let sink = FileSink::new(file);
            let c = StreamConversion::with_spool(opts, &sink, spool_file(image))?;
            let done = stream_into(c, image, sizes)?;
            let len = file.metadata().expect("output metadata").len();
            assert_eq!(len, done.size, "the output file's size");
            let mut disk = vec![0u8; len as usize];
            file.read_exact_at(&mut disk, 0)
                .expect("read the output back");
            Ok((disk, done))
        })
    } else {
        let sink = BoundedSink::new(crate::MAX_CONVERT_DISK);
        StreamConversion::with_spool(opts, &sink, Arc::new(image.to_vec()))
            .and_then(|c| stream_into(c, image, sizes))
            .map(|done| (sink.state.into_inner().expect("sink").0, done))
    };
    let unspooled: StreamOutcome = {
        let sink = BoundedSink::new(crate::MAX_CONVERT_DISK);
        StreamConversion::new(opts, &sink)
            .and_then(|c| stream_into(c, image, sizes))
            .map(|done| (sink.state.into_inner().expect("sink").0, done))
    };
    let sink_error = |r: &StreamOutcome, what: &str| {
        if let Err(ConvertError::Sink(e)) = r {
            assert!(
                positional.is_none(),
                "{what}: a sink error ({e}), the positional conversion converts"
            );
        }
    };
    sink_error(&spooled, "streamed with a spool");
    sink_error(&unspooled, "streamed without a spool");
    match (positional, &spooled) {
        (Some(want), Ok((disk, done))) => {
            assert!(
                disk == want,
                "streamed with a spool: bytes differ from the positional conversion"
            );
            assert_eq!(done.size, want.len() as u64);
            assert!(
                matches!(done.audit.verdict, Verdict::Ok | Verdict::Leaks),
                "streamed with a {:?} audit",
                done.audit.verdict
            );
            for w in &done.warnings {
                assert_ne!(w.severity, Severity::Error, "a warning is an error: {w}");
            }
        }
        (Some(_), Err(e)) => {
            panic!("streamed with a spool fails ({e}), the positional conversion converts")
        }
        (None, Ok(_)) => {
            panic!("streamed with a spool converts, the positional conversion does not")
        }
        (None, Err(e)) => {
            let _ = e.to_string();
        }
    }
    match (&spooled, &unspooled) {
        (Ok((disk, _)), Ok((again, without))) => {
            assert!(again == disk, "streamed without a spool: bytes differ");
            assert!(!without.respooled && without.read_back.is_empty());
        }
        (Ok((_, done)), Err(e)) => {
            let nra = matches!(e, ConvertError::Audit { report, .. }
                if report.verdict == Verdict::NeedsRandomAccess && report.has(code::NEEDS_RANDOM_ACCESS));
            assert!(
                nra,
                "streamed: with a spool converts, without one fails with {e}"
            );
            assert!(
                done.respooled || !done.read_back.is_empty(),
                "without a spool needs random access ({e}), with one nothing was read back"
            );
        }
        (Err(e), Ok(_)) => panic!("streamed: without a spool converts, with one fails ({e})"),
        (Err(_), Err(e)) => {
            let _ = e.to_string();
        }
    }
}
