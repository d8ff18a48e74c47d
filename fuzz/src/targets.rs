//! The target bodies: `pub fn <target>(data: &[u8])`, what the libFuzzer
//! binary `fuzz_targets/<target>.rs` runs and the corpus replay runs over
//! every file of `corpus/<target>/`. Each decodes its input and hands the
//! result to the oracles ([`crate::oracles`], [`crate::qemu_decompress`]).

use std::io::Read as _;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use qcow2_guard::check::{code, CheckOptions, Report, Verdict};
use qcow2_guard::compressed::Descriptor;
use qcow2_guard::extensions::Extensions;
use qcow2_guard::read::RawBacking;
use qcow2_guard::{CompressionType, Geometry, Header, Image, Limits, Policy};

use crate::model::{apply, FuzzImage};
use crate::oracles::{
    bitmaps_encode, chain_map_agrees, checked_reads, clean_without_backing, compare_reads,
    conversions_agree, io_failures_surface, overwrite_agrees, refusal_is_typed, snapshot_selectors,
    streaming_agrees, tighter_limits, walk,
};
use crate::sparse::Sparse;
use crate::{check_options, consume, frames, qemu_decompress, reference, MAX_INPUT};

/// `header`: the fixed header and the extensions, from raw bytes.
///
/// Oracle: a decoded header encodes back to bytes that decode to the same
/// header, and its compression type has qemu-img's name; the acceptance
/// reference agrees with the parser.
///
/// Model mode: input without the qcow2 magic is a [`FuzzImage`] (at most
/// 8 guest clusters), built by the encoder and edited (its `Nudge` edits
/// put header fields a few steps past their valid values, where
/// off-by-one bounds break): every header then starts valid, and only
/// the edited fields are near a bound, which raw bytes reach slowly (every
/// other field has to be valid at the same time).
pub fn header(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    if data.len() >= 4 && data[..4] != *b"QFI\xfb" {
        let Ok(input) = FuzzImage::arbitrary_take_rest(Unstructured::new(data)) else {
            return;
        };
        let mut model = input.model();
        model.clusters.truncate(8);
        let built = model
            .build()
            .unwrap_or_else(|e| panic!("the encoder rejects a folded model: {e}\n{model:?}"));
        let mut bytes = built.bytes;
        for edit in input.edits.iter().take(16) {
            apply(&mut bytes, &built.fields, edit);
        }
        header_bytes(&bytes);
        return;
    }
    header_bytes(data);
}

fn header_bytes(data: &[u8]) {
    reference::header_agrees(data);
    let h = match Header::decode(data) {
        Ok(h) => h,
        Err(e) => return consume(&e),
    };
    let again = Header::decode(&h.encode()).expect("an encoded header decodes");
    assert_eq!(again, h, "header round trip");
    // The compression type byte as qemu-img names it (docs/interop/
    // qcow2.rst: 0 zlib, 1 zstd, no other).
    let named = match h.compression_type {
        0 => Some("zlib"),
        1 => Some("zstd"),
        _ => None,
    };
    assert_eq!(h.compression().map(CompressionType::as_str), named);
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
            reference::entries_agree(&img, data);
            let failures = walk(&img);
            bitmaps_encode(&img, data);
            tighter_limits(&img, data, failures);
            io_failures_surface(&img, data);
            snapshot_selectors(&img);
        }
        Err(e) => consume(&e),
    }
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
            consume(&e);
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
            // The payloads verified on worker threads: the same report
            // (only images with compressed payloads start workers).
            if full.stats.compressed_clusters > 0 || full.stats.decompressed_clusters > 0 {
                let threaded = CheckOptions {
                    decompress: true,
                    threads: 3,
                    ..check_options()
                };
                assert_eq!(
                    qcow2_guard::check(&img, &threaded),
                    full,
                    "the threaded check reports otherwise"
                );
            }
            // A decompression budget of k < n clusters, where n payloads
            // verified: the budget runs out (reported once, as a warning)
            // and at most k are verified.
            let n = full.stats.decompressed_clusters;
            if n > 0 && !full.has(code::DECOMPRESS_BUDGET) {
                let k = data.len() as u64 % n;
                let small = CheckOptions {
                    max_decompressed_bytes: k * img.geometry().cluster_size,
                    ..check_options()
                };
                let r = qcow2_guard::check(&img, &small);
                assert_eq!(
                    r.counts.get(code::DECOMPRESS_BUDGET),
                    Some(&1),
                    "budget of {k} of {n}"
                );
                assert!(r.stats.decompressed_clusters <= k, "budget of {k} of {n}");
            }
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
/// holds more than [`Limits::max_retained_bytes`]. With a spool and a
/// retention budget of 1 KiB to 128 KiB (drawn from the seed), the report
/// is the same again; without a spool, the same or `needs_random_access`.
///
/// Model mode: when the bytes after the seed are not a qcow2 file (no
/// magic), they are a [`FuzzImage`]: the image is built by the project's
/// encoder (L2 tables before the data and compressed payloads, as QEMU
/// writes them), edited, and fed in the seed's chunks cut once more
/// inside every compressed payload (one byte in, and in the middle), so
/// payloads that arrive over several chunks come from mutation alone,
/// without a committed seed. Unedited, the report must also be `ok`.
pub fn stream(data: &[u8]) {
    if data.len() > MAX_INPUT.saturating_add(4) {
        return;
    }
    let (seed, image) = data.split_at(data.len().min(4));
    if image.len() >= 4 && image[..4] != *b"QFI\xfb" {
        let Ok(input) = FuzzImage::arbitrary_take_rest(Unstructured::new(image)) else {
            return;
        };
        let model = input.model();
        let built = model
            .build()
            .unwrap_or_else(|e| panic!("the encoder rejects a folded model: {e}\n{model:?}"));
        let g = built.geometry;
        let cuts: Vec<u64> = built
            .fields
            .iter()
            .filter(|f| f.name == "l2_entry")
            .filter_map(|f| {
                let at = usize::try_from(f.offset).ok()?;
                let word = u64::from_be_bytes(built.bytes.get(at..at + 8)?.try_into().ok()?);
                (word & (1 << 62) != 0).then(|| Descriptor::decode(word, &g))
            })
            .flat_map(|d| [d.start() + 1, d.start() + d.span() / 2])
            .collect();
        let mut bytes = built.bytes;
        for edit in input.edits.iter().take(16) {
            apply(&mut bytes, &built.fields, edit);
        }
        let cuts: Vec<u64> = cuts
            .into_iter()
            .filter(|&c| c < bytes.len() as u64)
            .collect();
        let sizes = cut_sizes(&chunk_sizes(seed, bytes.len()), &cuts);
        let report = stream_in(seed, &bytes, &sizes, input.edits.is_empty());
        if input.edits.is_empty() {
            assert!(
                report.verdict == Verdict::Ok,
                "a built image does not check clean: {:?} {:?}\n{model:?}",
                report.verdict,
                report.findings
            );
        }
        return;
    }
    stream_in(seed, image, &chunk_sizes(seed, image.len()), false);
}

/// Chunk sizes `sizes` with the stream also cut at the offsets `cuts`.
fn cut_sizes(sizes: &[usize], cuts: &[u64]) -> Vec<usize> {
    let mut ends: Vec<u64> = sizes
        .iter()
        .scan(0u64, |at, &n| {
            *at += n as u64;
            Some(*at)
        })
        .chain(cuts.iter().copied())
        .collect();
    ends.sort_unstable();
    ends.dedup();
    let mut at = 0;
    ends.into_iter()
        .filter(|&e| e > 0)
        .map(|e| {
            let n = (e - at) as usize;
            at = e;
            n
        })
        .collect()
}

/// The body of `stream` on one image fed in chunks of `sizes`; the
/// whole-file check's report, which every run matched. `forward`: the
/// image is laid out as QEMU writes one (every table before what it
/// points to, compressed payloads after their L2 table), so it streams
/// without a spool: no byte is read back, the report is the whole
/// check's.
fn stream_in(seed: &[u8], image: &[u8], sizes: &[usize], forward: bool) -> Report {
    use qcow2_guard::stream::{Early, Finished, Inspector};
    let limits = Limits::fuzzing();
    let opts = check_options();
    let whole = match Image::open_with(image, limits.clone()) {
        Ok(img) => qcow2_guard::check(&img, &opts),
        Err(e) => Report::from_open_error(&e),
    };
    let run_with = |limits: &Limits, chunks: &[usize], spool: bool| -> Finished {
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
    let run = |chunks: &[usize], spool: bool| run_with(&limits, chunks, spool);
    let one = run(&[image.len().max(1)], false);
    assert_eq!(one.report, whole, "in one chunk");
    assert!(
        one.read_back.is_empty(),
        "in one chunk: {:?}",
        one.read_back
    );
    let with = run(sizes, true);
    assert_eq!(with.report, whole, "chunked, with a spool");
    let without = run(sizes, false);
    assert!(
        !forward || without.read_back.is_empty(),
        "an image in QEMU's order needs bytes back without a spool: {:?} ({:?})",
        without.read_back,
        without.report.verdict
    );
    if without.report.verdict == Verdict::NeedsRandomAccess {
        assert!(!without.read_back.is_empty() && !with.read_back.is_empty());
        assert!(!without.report.checked);
        assert!(without.report.has(code::NEEDS_RANDOM_ACCESS));
    } else {
        assert_eq!(without.report, whole, "chunked, without a spool");
        assert!(without.read_back.is_empty());
    }
    // A retention budget of 1 KiB to 128 KiB (the seed's first byte): with
    // a spool, what does not fit is read back, the report is the same and
    // the inspector never holds more than the budget.
    let mut budget = limits.clone();
    budget.max_retained_bytes = 1 << (10 + seed.first().map_or(0, |b| b % 8));
    let small = run_with(&budget, sizes, true);
    assert_eq!(
        small.report, whole,
        "chunked, with a spool, retaining at most {} bytes",
        budget.max_retained_bytes
    );
    // The same budget without a spool: what does not fit is lost, so the
    // report is the whole-file check's or `needs_random_access` (nothing
    // judged), never another verdict.
    let lost = run_with(&budget, sizes, false);
    if lost.report.verdict == Verdict::NeedsRandomAccess {
        assert!(!lost.report.checked && lost.report.has(code::NEEDS_RANDOM_ACCESS));
    } else {
        assert_eq!(
            lost.report, whole,
            "chunked, without a spool, retaining at most {} bytes",
            budget.max_retained_bytes
        );
    }
    whole
}

/// The piece sizes of a stream of `len` bytes, drawn from `seed`: mostly
/// small pieces (1 byte and up), sometimes up to 8 KiB; they add up to at
/// least `len` (the last piece may reach past the end).
pub fn chunk_sizes(seed: &[u8], len: usize) -> Vec<usize> {
    let mut x = seed.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let mut sizes = Vec::new();
    let mut total = 0usize;
    while total < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = 1 + (x % (1u64 << (x >> 60).min(13))) as usize;
        sizes.push(n);
        total += n;
    }
    sizes
}

/// `decompress`: the compressed-cluster path alone.
///
/// Input format (documented for seed makers):
/// - byte 0: cluster_bits = 9 + (byte % 13), i.e. 9..=21;
/// - byte 1: bit 0 set = zstd, clear = deflate; bit 1 set = built mode:
///   the rest is a [`frames::Recipe`] (cluster_bits 9 + (byte 0 % 8)), a
///   valid frame or stream built by the C library and edited near its end,
///   header or checksum, judged by [`frames::built`];
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
    let kind = if data[1] & 1 != 0 {
        CompressionType::Zstd
    } else {
        CompressionType::Deflate
    };
    if data[1] & 2 != 0 {
        let cluster_bits = 9 + u32::from(data[0] % 8);
        if let Ok(recipe) = frames::Recipe::arbitrary_take_rest(Unstructured::new(&data[2..])) {
            frames::built(cluster_bits, kind, &recipe);
        }
        return;
    }
    let cluster_bits = 9 + u32::from(data[0] % 13);
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

/// `structured`: an arbitrary valid image written by the project's encoder
/// ([`qcow2_guard::build`]), then edited.
///
/// Oracles: with no edits the image opens with [`Limits::fuzzing`], every
/// guest cluster maps without error, every host cluster is referenced, the
/// full check is clean (verdict `ok`, exit 0), and `read_at` over the whole
/// disk and the `GuestReader` give [`qcow2_guard::build::BuiltImage::guest`]
/// byte for byte. With edits: the acceptance reference agrees with the
/// parser on the header and every table entry ([`crate::reference`]), the
/// [`checked_reads`] oracle, no panic, and the bounded memory every target
/// has.
pub fn structured(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let Ok(input) = FuzzImage::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let model = input.model();
    // The model as drawn, when it breaks a rule: the encoder refuses it.
    if let Some((raw, rule)) = input.unfolded(&model) {
        match raw.build() {
            Ok(_) => panic!("the encoder builds a model that breaks \"{rule}\"\n{raw:?}"),
            Err(e) => assert!(e.to_string().starts_with("invalid image model: "), "{e}"),
        }
    }
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
        // Compare whole (memcmp) first; find the byte only on a failure.
        if guest != built.guest {
            let i = (0..guest.len()).find(|&i| guest[i] != built.guest[i]);
            panic!("guest byte {i:#x?} of a built image differs\n{model:?}");
        }
        // Room for the whole disk: read_to_end then never grows the buffer.
        let mut via = Vec::with_capacity(built.guest.len());
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
    reference::header_agrees(&bytes);
    match Image::open_with(&bytes[..], Limits::fuzzing()) {
        Ok(img) => {
            reference::entries_agree(&img, &bytes);
            walk(&img);
            checked_reads(&img);
        }
        Err(e) => consume(&e),
    }
}

/// Largest virtual disk the `convert` target converts: larger ones are
/// refused by the policy ([`Policy::max_virtual_size`]), which keeps the
/// three copies of the disk each run makes small and the target fast.
pub const MAX_CONVERT_DISK: u64 = 4 << 20;

/// `convert`: the library's conversion ([`qcow2_guard::convert`]) of an
/// image given as raw bytes after a flags byte:
/// - bit 0: hand in the image bytes themselves as the backing image (a
///   qcow2 one: they start with the magic) and allow backing files;
/// - bit 1: as bit 0, but as a raw backing image (byte 0 flipped);
/// - bit 2: hand in the image bytes as the external data file and allow
///   data files;
/// - bit 3: convert the internal snapshot with ID `1` (with bit 4: named
///   as `snapshot.id=1`);
/// - bit 4: the image is a sparse file ([`Sparse`]: its all-zero 4 KiB
///   blocks are holes), the bounds are tight ([`TIGHT_OUTPUT`],
///   [`TIGHT_AMPLIFICATION`], [`TIGHT_AUDIT_CLUSTERS`]), and an accepted
///   conversion is also run into
///   [`qcow2_guard::convert::FileSink::overwrite`] over a file full of old
///   bytes ([`overwrite_agrees`]); with bit 1 too, the `qemu-img map`
///   records of the two-layer chain (the image over its raw backing image,
///   as a sparse file) agree with the output ([`chain_map_agrees`]);
/// - bits 5..8: with bits 0..4 clear, the image is also converted as a
///   stream ([`qcow2_guard::convert::StreamConversion`], `convert -`): 0
///   feeds it in one piece, any other value seeds the piece sizes
///   ([`chunk_sizes`]); an odd value also bounds the stream's retention
///   to `2^(10 + value)` bytes (the conversion writes from the spool
///   again, or refuses without one).
///
/// Limits: [`Limits::fuzzing`], [`MAX_CONVERT_DISK`] of virtual disk and
/// of output. See [`conversions_agree`] and [`streaming_agrees`] for the
/// oracles.
pub fn convert(data: &[u8]) {
    use qcow2_guard::convert::{
        code as convert_code, prepare, ConvertError, ConvertOptions, Inputs,
    };
    use qcow2_guard::snapshot::SnapshotSelector;
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    if image.len() > MAX_INPUT {
        return;
    }
    let mut policy = Policy::default().with_max_virtual_size(MAX_CONVERT_DISK);
    let mut backing = None;
    if flags & 3 != 0 {
        policy.allow_backing = true;
        let mut b = image.to_vec();
        if flags & 2 != 0 {
            if let Some(b) = b.first_mut() {
                *b ^= 0xff;
            }
        }
        backing = Some(b);
    }
    if flags & 4 != 0 {
        policy.allow_data_file = true;
    }
    fn add<S>(
        mut inputs: Inputs<S>,
        flags: u8,
        image: &[u8],
        backing: Option<&Vec<u8>>,
    ) -> Inputs<S> {
        if let Some(b) = backing {
            inputs = inputs.with_backing(b.clone());
        }
        if flags & 4 != 0 {
            inputs = inputs.with_data_file(image.to_vec());
        }
        if flags & 0x18 == 0x18 {
            inputs = inputs.with_snapshot(SnapshotSelector::parse("snapshot.id=1"));
        } else if flags & 8 != 0 {
            inputs = inputs.with_snapshot(SnapshotSelector::IdOrName("1".to_owned()));
        }
        inputs
    }
    let opts = ConvertOptions {
        policy,
        limits: Limits::fuzzing(),
        max_output: Some(MAX_CONVERT_DISK),
        ..ConvertOptions::default()
    };
    let checked_clean = flags & 0x0f == 0 && clean_without_backing(image, &opts);
    let converted = if flags & 0x10 != 0 {
        let tight = ConvertOptions {
            max_output: Some(TIGHT_OUTPUT),
            max_amplification: TIGHT_AMPLIFICATION,
            max_audit_clusters: TIGHT_AUDIT_CLUSTERS,
            ..opts.clone()
        };
        let sparse = Inputs::new(Sparse::new(image.to_vec()));
        match prepare(add(sparse, flags, image, backing.as_ref()), &tight) {
            Ok(conversion) => {
                let out = conversions_agree(&conversion, checked_clean);
                if let Some(want) = &out {
                    overwrite_agrees(&conversion, want);
                    if let (Some(b), true) = (&backing, flags & 2 != 0) {
                        chain_map_agrees(conversion.image(), &Sparse::new(b.clone()), want);
                    }
                }
                out
            }
            Err(e) => {
                refusal_is_typed(&e, checked_clean);
                None
            }
        }
    } else {
        match prepare(
            add(Inputs::new(image), flags, image, backing.as_ref()),
            &opts,
        ) {
            Ok(conversion) => {
                // Accepted with its external data file handed in: the same
                // inputs without it are refused for that, whatever the
                // policy allows.
                if flags & 4 != 0 && conversion.image().header().has_data_file() {
                    let without = add(Inputs::new(image), flags & !4, image, backing.as_ref());
                    match prepare(without, &opts) {
                        Err(ConvertError::Refused { findings, .. }) => assert_eq!(
                            findings.first().map(|f| f.code),
                            Some(convert_code::DATA_FILE_MISSING)
                        ),
                        Err(e) => panic!("without its data file: {e}"),
                        Ok(_) => panic!("accepted without its data file"),
                    }
                }
                conversions_agree(&conversion, checked_clean)
            }
            Err(e) => {
                refusal_is_typed(&e, checked_clean);
                None
            }
        }
    };
    if flags & 0x1f == 0 {
        let seed = flags >> 5;
        let sizes = match seed {
            0 => vec![image.len()],
            _ => chunk_sizes(&[seed], image.len()),
        };
        let mut streamed = opts;
        if seed & 1 != 0 {
            streamed.limits.max_retained_bytes = 1 << (10 + seed);
        }
        streaming_agrees(image, &streamed, &sizes, converted.as_deref());
    }
}

/// The `convert` target's output bound with flag bit 4 (below
/// [`MAX_CONVERT_DISK`], so a disk the policy lets through can be refused
/// for its output).
pub const TIGHT_OUTPUT: u64 = 1 << 20;

/// The `convert` target's amplification bound with flag bit 4 (guest
/// bytes mapped per file byte).
pub const TIGHT_AMPLIFICATION: u64 = 64;

/// The `convert` target's audit bound with flag bit 4 (host clusters the
/// refcount rebuild may track).
pub const TIGHT_AUDIT_CLUSTERS: u64 = 256;
