//! Streaming inspection (`stream::Inspector`, `check -`) on real layouts:
//! images made by qemu-img / qemu-io, fed in chunks, against the
//! random-access check of the same file. Each case states whether its
//! layout streams without a spool (measured; the README's table).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use qcow2_guard::check::Verdict;
use qcow2_guard::convert::{ConvertError, ConvertOptions, FileSink, StreamConversion};
use qcow2_guard::source::Source;
use qcow2_guard::stream::{Early, Inspector};
use qcow2_guard::{check, CheckOptions, Image, Limits, Report};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn whole(bytes: &[u8]) -> Report {
    match Image::open(bytes) {
        Ok(image) => check(&image, &CheckOptions::default()),
        Err(e) => Report::from_open_error(&e),
    }
}

/// Feed `bytes` in `chunk`-byte pieces: (report, ranges read back).
fn stream(bytes: &[u8], chunk: usize, spool: bool) -> (Report, Vec<(u64, u64)>) {
    let opts = CheckOptions::default();
    let mut i = if spool {
        Inspector::with_spool(Limits::default(), opts, Arc::new(bytes.to_vec()))
    } else {
        Inspector::new(Limits::default(), opts)
    };
    let mut peak = 0;
    for c in bytes.chunks(chunk) {
        i.feed(c);
        peak = peak.max(i.retained_bytes());
    }
    assert_eq!(i.early(), Early::Clear);
    let done = i.finish();
    (done.report, done.read_back)
}

/// Stream `p` at 4 KiB (oslo's InspectWrapper) and 64 KiB chunks, with and
/// without a spool; returns whether it streamed without one at each.
fn measure(p: &Path) -> (bool, bool) {
    let bytes = std::fs::read(p).expect("read image");
    let want = whole(&bytes);
    assert_eq!(want.verdict, Verdict::Ok, "{}: {want:?}", p.display());
    // In one chunk nothing has passed before it is known to be needed.
    assert_eq!(stream(&bytes, bytes.len(), false), (want.clone(), vec![]));
    let mut streams = Vec::new();
    for chunk in [4096, 65536] {
        let (with, back_with) = stream(&bytes, chunk, true);
        assert_eq!(with, want, "{} chunk {chunk} with a spool", p.display());
        let (without, back) = stream(&bytes, chunk, false);
        if without.verdict == Verdict::NeedsRandomAccess {
            assert!(!back.is_empty() && !back_with.is_empty());
            assert!(!without.checked);
            eprintln!(
                "{} chunk {chunk}: {} ranges read back, first {:x?}",
                p.display(),
                back_with.len(),
                back_with.first()
            );
            streams.push(false);
        } else {
            assert_eq!(
                without,
                want,
                "{} chunk {chunk} without a spool",
                p.display()
            );
            assert!(back.is_empty() && back_with.is_empty());
            streams.push(true);
        }
    }
    (streams[0], streams[1])
}

/// `convert -` in the library: feed `bytes` in `chunk`-byte pieces into a
/// new file. Ok((disk, written again from the spool)), or the error and
/// the bytes fed before it.
fn stream_convert(
    bytes: &[u8],
    chunk: usize,
    spool: bool,
) -> Result<(Vec<u8>, bool), (ConvertError, usize)> {
    let out = tempfile::tempfile().expect("temp file");
    let sink = FileSink::new(&out);
    let opts = ConvertOptions::default();
    let mut c = if spool {
        let spool: Arc<dyn Source> = Arc::new(bytes.to_vec());
        StreamConversion::with_spool(&opts, &sink, spool)
    } else {
        StreamConversion::new(&opts, &sink)
    }
    .expect("a positional sink");
    let mut fed = 0;
    for piece in bytes.chunks(chunk) {
        c.feed(piece).map_err(|e| (e, fed))?;
        fed += piece.len();
    }
    let done = c.finish().map_err(|e| (e, fed))?;
    let mut disk = Vec::new();
    std::io::Read::read_to_end(&mut &out, &mut disk).expect("read the output");
    assert_eq!(disk.len() as u64, done.size);
    Ok((disk, done.respooled))
}

/// Convert `p` from a stream at 4 KiB and 64 KiB chunks, with and without
/// a spool, against `qemu-img convert -O raw`; returns whether it was
/// written as it passed, without a spool, at each.
fn measure_convert(p: &Path) -> (bool, bool) {
    let bytes = std::fs::read(p).expect("read image");
    let d = tmpdir();
    let want_path = d.path().join("want.raw");
    qemu_img(&["convert", "-O", "raw", s(p), s(&want_path)]);
    let want = std::fs::read(&want_path).expect("read qemu-img's output");
    let name = p.display();
    // In one chunk everything is in hand when its table arrives.
    match stream_convert(&bytes, bytes.len(), false) {
        Ok((disk, respooled)) => assert!(disk == want && !respooled, "{name}: one chunk"),
        Err((e, _)) => panic!("{name}: one chunk: {e}"),
    }
    let mut streams = Vec::new();
    for chunk in [4096, 65536] {
        match stream_convert(&bytes, chunk, true) {
            Ok((disk, _)) => assert!(disk == want, "{name}: chunk {chunk} with a spool"),
            Err((e, _)) => panic!("{name}: chunk {chunk} with a spool: {e}"),
        }
        match stream_convert(&bytes, chunk, false) {
            Ok((disk, respooled)) => {
                assert!(disk == want && !respooled, "{name}: chunk {chunk}");
                streams.push(true);
            }
            Err((ConvertError::Audit { report, .. }, fed)) => {
                assert_eq!(report.verdict, Verdict::NeedsRandomAccess, "{name}");
                assert!(report.has("needs_random_access"));
                eprintln!(
                    "{name} chunk {chunk}: convert refused after {fed} of {} bytes: {}",
                    bytes.len(),
                    report.findings[0]
                );
                streams.push(false);
            }
            Err((e, _)) => panic!("{name}: chunk {chunk}: {e}"),
        }
    }
    (streams[0], streams[1])
}

fn raw(dir: &Path) -> PathBuf {
    let r = dir.join("src.raw");
    write_raw(&r, 4 << 20, 11);
    r
}

fn convert(dir: &Path, name: &str, opts: &[&str]) -> PathBuf {
    let r = raw(dir);
    let p = dir.join(name);
    let mut a = vec!["convert", "-O", "qcow2"];
    a.extend_from_slice(opts);
    a.extend([s(&r), s(&p)]);
    qemu_img(&a);
    p
}

/// Check and convert `p` from a stream; `streams`: whether the check
/// needs no spool at (4 KiB, 64 KiB) chunks; `converts`: whether the
/// conversion writes the disk as it passes without one.
fn case(name: &str, p: &Path, streams: (bool, bool), converts: (bool, bool)) {
    let got = measure(p);
    let conv = measure_convert(p);
    eprintln!(
        "layout {name}: streams without a spool at 4 KiB {} / 64 KiB {}; converts {} / {}",
        got.0, got.1, conv.0, conv.1
    );
    assert_eq!(got, streams, "{name}: check measured (4 KiB, 64 KiB)");
    assert_eq!(conv, converts, "{name}: convert measured (4 KiB, 64 KiB)");
}

#[test]
fn convert_default() {
    let d = tmpdir();
    case(
        "convert",
        &convert(d.path(), "a.qcow2", &[]),
        (true, true),
        (true, true),
    );
}

#[test]
fn convert_compressed_zlib() {
    let d = tmpdir();
    case(
        "convert -c",
        &convert(d.path(), "a.qcow2", &["-c"]),
        (true, true),
        (true, true),
    );
}

#[test]
fn convert_compressed_4k() {
    // With 4 KiB clusters qemu-img writes the payloads of the first
    // clusters an L2 table maps before the table (here up to ~270 KiB
    // before it, with zstd): they have passed when the table arrives.
    let d = tmpdir();
    let p = convert(d.path(), "a.qcow2", &["-c", "-o", "cluster_size=4k"]);
    case("convert -c 4k", &p, (false, false), (false, false));
    let p = convert(
        d.path(),
        "b.qcow2",
        &["-c", "-o", "compression_type=zstd,cluster_size=4k"],
    );
    case("convert -c zstd 4k", &p, (false, false), (false, false));
    let p = convert(
        d.path(),
        "c.qcow2",
        &["-c", "-o", "compression_type=zstd,cluster_size=16k"],
    );
    case("convert -c zstd 16k", &p, (true, true), (true, true));
}

#[test]
fn convert_compressed_across_l2_tables() {
    // 64 KiB clusters: one L2 table maps 512 MiB. Data on both sides of
    // the 512 MiB boundary: the second table is allocated while QEMU is
    // still filling the cluster of packed payloads before it.
    let d = tmpdir();
    let r = raw(d.path());
    let big = d.path().join("big.raw");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    for mib in ["508", "512"] {
        let out = std::process::Command::new("dd")
            .args([
                &format!("if={}", s(&r)),
                &format!("of={}", s(&big)),
                "bs=1M",
                &format!("seek={mib}"),
                "conv=notrunc",
                "status=none",
            ])
            .status()
            .unwrap();
        assert!(out.success());
    }
    let p = d.path().join("a.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&big), s(&p)]);
    case("convert -c, two L2 tables", &p, (true, true), (true, true));
}

#[test]
fn convert_compressed_512() {
    let d = tmpdir();
    let p = convert(d.path(), "a.qcow2", &["-c", "-o", "cluster_size=512"]);
    case("convert -c 512", &p, (true, true), (true, true));
}

#[test]
fn convert_extended_l2_compat_0_10() {
    let d = tmpdir();
    let p = convert(
        d.path(),
        "a.qcow2",
        &["-o", "extended_l2=on,cluster_size=64k"],
    );
    case("convert extended_l2", &p, (true, true), (true, true));
    let p = convert(d.path(), "b.qcow2", &["-o", "compat=0.10,refcount_bits=16"]);
    case("convert compat=0.10", &p, (true, true), (true, true));
    let p = convert(
        d.path(),
        "c.qcow2",
        &["-o", "refcount_bits=1,cluster_size=4k"],
    );
    case("convert refcount_bits=1", &p, (true, true), (true, true));
}

#[test]
fn convert_preallocation_metadata() {
    let d = tmpdir();
    let p = convert(d.path(), "a.qcow2", &["-o", "preallocation=metadata"]);
    case(
        "convert preallocation=metadata",
        &p,
        (true, true),
        (true, true),
    );
}

#[test]
fn create_then_writes() {
    let d = tmpdir();
    let p = create(d.path(), "a.qcow2", "", "8M");
    qemu_io(&p, &["write -P 0x11 0 1M", "write -P 0x22 4M 512k"]);
    case("create + sequential writes", &p, (true, true), (true, true));
    let p = create(d.path(), "b.qcow2", "cluster_size=4k", "8M");
    qemu_io(
        &p,
        &[
            "write -P 0x11 6M 256k",
            "write -P 0x22 0 64k",
            "write -z 1M 64k",
            "write -P 0x33 3M 1M",
            "discard 3M 64k",
        ],
    );
    case(
        "create + scattered writes, zero, discard",
        &p,
        (true, true),
        (true, true),
    );
}

#[test]
fn snapshot_then_writes() {
    let d = tmpdir();
    let p = convert(d.path(), "a.qcow2", &["-o", "cluster_size=4k"]);
    qemu_img(&["snapshot", "-c", "s1", s(&p)]);
    case("convert + snapshot", &p, (true, true), (true, true));
    qemu_io(&p, &["write -P 0x44 0 64k"]);
    case(
        "convert + snapshot + write",
        &p,
        (false, false),
        (false, false),
    );
    qemu_img(&["snapshot", "-c", "s2", s(&p)]);
    case(
        "convert + snapshot + write + snapshot",
        &p,
        (false, false),
        (false, false),
    );
}

#[test]
fn resize_then_writes() {
    let d = tmpdir();
    let p = convert(d.path(), "a.qcow2", &["-o", "cluster_size=4k"]);
    qemu_img(&["resize", "-q", "-f", "qcow2", s(&p), "64M"]);
    case("convert + resize", &p, (false, false), (false, false));
    qemu_io(&p, &["write -P 0x55 60M 64k"]);
    case(
        "convert + resize + write",
        &p,
        (false, false),
        (false, false),
    );
}

#[test]
fn refcount_table_growth() {
    let d = tmpdir();
    // 512-byte clusters with 64-bit refcounts: one refcount block covers
    // 64 clusters, so writing 4 MiB grows the refcount table.
    let p = create(
        d.path(),
        "a.qcow2",
        "cluster_size=512,refcount_bits=64",
        "8M",
    );
    qemu_io(&p, &["write -P 0x66 0 4M"]);
    case(
        "create + writes growing the refcount table",
        &p,
        (false, false),
        (false, false),
    );
}

#[test]
fn bitmaps() {
    let d = tmpdir();
    let p = convert(d.path(), "a.qcow2", &[]);
    qemu_img(&["bitmap", "--add", s(&p), "b1"]);
    case("convert + bitmap --add", &p, (true, true), (true, true));
}

#[test]
fn amend_refcount_bits() {
    let d = tmpdir();
    let p = convert(d.path(), "a.qcow2", &["-o", "cluster_size=4k"]);
    qemu_img(&["amend", "-f", "qcow2", "-o", "refcount_bits=4", s(&p)]);
    case(
        "convert + amend refcount_bits",
        &p,
        (true, true),
        (true, true),
    );
}

/// `cat IMAGE | qcow2-guard check -`, through a real pipe.
fn piped(image: &Path, args: &str) -> std::process::Output {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("cat '{}' | '{}' check {args} -", s(image), bin()))
        .output()
        .expect("run sh")
}

#[test]
fn cli_reads_a_pipe() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sample.qcow2");
    // Without a spool: the README's output, exit 1.
    let out = piped(&sample, "");
    assert_eq!(code(&out), 1);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        "error [needs_random_access] at 0x3000: bytes 0x3000..0x4000 were needed after the stream had passed them (the reference to them comes later in the file); inspect with a spool, or check the stored file\n\
         error [needs_random_access] at 0x4000: bytes 0x4000..0x5000 were needed after the stream had passed them (the reference to them comes later in the file); inspect with a spool, or check the stored file\n\
         The stream could not be checked without random access (give --spool FILE).\n"
    );
    // With one: the same JSON as `check IMAGE`, and a copy of the stream.
    let d = tmpdir();
    let spool = d.path().join("upload.qcow2");
    let out = piped(&sample, &format!("--json --spool '{}'", s(&spool)));
    assert_eq!(code(&out), 0);
    let mut streamed = json(&out);
    let mut whole = json(&guard(&["check", "--json", s(&sample)]));
    streamed.as_object_mut().unwrap().remove("filename");
    whole.as_object_mut().unwrap().remove("filename");
    assert_eq!(streamed, whole);
    assert_eq!(
        std::fs::read(&spool).unwrap(),
        std::fs::read(&sample).unwrap()
    );
    // Nothing else left beside it.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    // A forward layout needs no spool.
    let p = convert(d.path(), "c.qcow2", &["-c"]);
    let out = piped(&p, "");
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("No errors were found on the image.\n")
    );
    // --spool belongs to `-`.
    let out = guard(&["check", "--spool", s(&spool), s(&sample)]);
    assert_eq!(code(&out), 1);
}

#[test]
fn fuzz_body_on_a_backward_layout() {
    // The stream fuzz target's oracle on the sample (tables before the
    // L1 table pointing at them), with a few chunkings.
    let sample =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sample.qcow2"))
            .unwrap();
    for seed in [*b"seed", [0; 4], [0xff; 4], *b"\x01\x02\x03\x04"] {
        let mut input = seed.to_vec();
        input.extend_from_slice(&sample);
        qcow2_guard_fuzz::stream(&input);
    }
}

#[test]
fn the_inspector_can_move_between_threads() {
    fn send<T: Send>() {}
    send::<Inspector>();
    send::<qcow2_guard::stream::Finished>();
}
