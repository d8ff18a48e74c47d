//! `qcow2-guard convert` and the library's guest reader, against
//! `qemu-img convert -O raw` as the oracle.
//!
//! Catalogue: an image matrix made by qemu-img/qemu-io (cluster sizes,
//! compat, refcount widths, compression types, extended L2, lazy
//! refcounts, snapshots, discards, odd virtual sizes); a property check of
//! `read_at` and the `Read + Seek` adapter on random ranges; hostile images
//! made by patching bytes, each a clean error with no output left behind;
//! the safety policy for backing and external data files.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use qcow2_guard::compressed::Descriptor;
use qcow2_guard::{ExtentKind, FileSource, Image};

// ---------------------------------------------------------------- helpers

/// qemu-img's raw rendering of `img` (written beside it).
fn oracle(img: &Path) -> Vec<u8> {
    let out = img.with_extension("oracle.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let data = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    data
}

fn convert(img: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "convert",
        "-q",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    guard(&args)
}

/// Convert `img` with qcow2-guard and qemu-img; the outputs must be
/// identical and ours sized to the virtual disk. Also checks `read_at` on
/// random ranges against the oracle. Returns the raw disk.
fn assert_converts(img: &Path, extra: &[&str]) -> Vec<u8> {
    let expect = oracle(img);
    let out = img.with_extension("guard.raw");
    let o = convert(img, &out, extra);
    assert_eq!(
        code(&o),
        0,
        "convert {} failed: {}",
        img.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stdout.is_empty(),
        "stdout must stay empty when writing a file"
    );
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len(), expect.len(), "{}: output length", img.display());
    assert!(
        got == expect,
        "{}: output differs from qemu-img",
        img.display()
    );
    fs::remove_file(&out).unwrap();
    if extra.is_empty() {
        check_reads(img, &expect, 0x5eed ^ expect.len() as u64);
        // From a pipe: the same disk with a spool; without one the same
        // disk, or a needs_random_access refusal that writes nothing.
        let (c, err, got) = convert_streamed(img, true);
        assert!(
            c == 0 && got.as_ref() == Some(&expect),
            "{}: convert --spool -: {err}",
            img.display()
        );
        let (c, err, got) = convert_streamed(img, false);
        if c == 0 {
            assert!(
                got.as_ref() == Some(&expect),
                "{}: convert -",
                img.display()
            );
        } else {
            assert!(
                c == 1 && err.contains("needs_random_access") && got.is_none(),
                "{}: {err}",
                img.display()
            );
        }
    }
    expect
}

/// `cat IMG | qcow2-guard convert -q [--spool S] - OUT`: exit code,
/// stderr, and OUT's bytes if it was written (the spool must then be a
/// copy of IMG).
fn convert_streamed(img: &Path, spool: bool) -> (i32, String, Option<Vec<u8>>) {
    let dir = tmpdir();
    let out = dir.path().join("out.raw");
    let sp = dir.path().join("spool.qcow2");
    let flag = if spool {
        format!("--spool '{}'", sp.display())
    } else {
        String::new()
    };
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat '{}' | '{}' convert -q {flag} - '{}'",
            img.display(),
            bin(),
            out.display()
        ))
        .output()
        .unwrap();
    let got = fs::read(&out).ok();
    if got.is_some() && spool {
        assert!(
            fs::read(&sp).unwrap() == fs::read(img).unwrap(),
            "the spool is a copy"
        );
    }
    let left = leftovers(dir.path(), &[&out, &sp]);
    assert!(left.is_empty(), "left behind: {left:?}");
    (
        code(&o),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        got,
    )
}

/// Property: for random guest ranges `read_at` and the `Read + Seek`
/// adapter return exactly the oracle's bytes; the extents tile the disk.
fn check_reads(img: &Path, expect: &[u8], seed: u64) {
    let image = Image::open(FileSource::open(img).unwrap()).unwrap();
    let size = image.virtual_size();
    assert_eq!(size as usize, expect.len());
    let mut rng = Rng(seed | 1);
    let mut buf = Vec::new();
    for _ in 0..200 {
        let off = rng.below(size);
        let cap = if rng.below(4) == 0 { 1 << 20 } else { 5000 };
        let len = rng.below((size - off).min(cap) + 1);
        buf.resize(len as usize, 0xee);
        image.read_at(off, &mut buf).unwrap();
        assert!(
            buf[..] == expect[off as usize..(off + len) as usize],
            "{}: read_at({off:#x}, {len:#x}) differs",
            img.display()
        );
    }
    // Past the end is an error, not a short read.
    assert_eq!(
        image.read_at(size - 1, &mut [0u8; 2]).unwrap_err().code(),
        "out_of_virtual_bounds"
    );
    // The reader: seek around and read in odd sizes.
    let mut r = image.reader();
    for _ in 0..50 {
        let off = rng.below(size);
        r.seek(SeekFrom::Start(off)).unwrap();
        let mut b = vec![0u8; rng.below(3000) as usize + 1];
        let n = r.read(&mut b).unwrap();
        assert!(n > 0);
        assert!(b[..n] == expect[off as usize..off as usize + n]);
    }
    r.seek(SeekFrom::Start(0)).unwrap();
    let mut all = Vec::new();
    r.read_to_end(&mut all).unwrap();
    assert!(all == expect, "{}: read_to_end differs", img.display());
    // The map tiles the disk in order.
    let mut pos = 0;
    for e in image.map(0, size).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.guest_offset, pos);
        assert!(e.len > 0);
        pos = e.end();
    }
    assert_eq!(pos, size);
}

/// xorshift64: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Make an image of `size` with `opts` and run qemu-io `cmds` on it.
fn image(dir: &Path, name: &str, opts: &str, size: &str, cmds: &[&str]) -> PathBuf {
    let img = create(dir, name, opts, size);
    if !cmds.is_empty() {
        qemu_io(&img, cmds);
    }
    img
}

/// `qemu-img convert [-c] -O qcow2 -o OPTS raw img`.
fn from_raw(dir: &Path, name: &str, raw: &Path, opts: &str, compress: bool) -> PathBuf {
    let img = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", opts];
    if compress {
        args.push("-c");
    }
    args.extend([raw.to_str().unwrap(), img.to_str().unwrap()]);
    qemu_img(&args);
    img
}

/// qemu-io writes that leave data, zeros, holes and discards behind.
const MIXED: &[&str] = &[
    "write -P 0x11 0 96k",
    "write -P 0x22 200k 1k",
    "write -z 300k 64k",
    "write -P 0x33 511k 2k",
    "write -P 0x44 1M 1M",
    "discard 1088k 128k",
    "write -z 1600k 4k",
];

/// Files left in `dir` other than `keep`.
fn leftovers(dir: &Path, keep: &[&Path]) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !keep.contains(&p.as_path()))
        .collect()
}

/// The first compressed extent of `img`.
fn first_compressed(img: &Path) -> (u64, Descriptor) {
    let image = Image::open(FileSource::open(img).unwrap()).unwrap();
    for e in image.map(0, image.virtual_size()).unwrap() {
        let e = e.unwrap();
        if let ExtentKind::Compressed(d) = e.kind {
            return (e.guest_offset, d);
        }
    }
    panic!("{}: no compressed cluster", img.display());
}

/// File offset of the L2 entry mapping `guest` (standard L2, L1 entry 0).
fn l2_entry_at(img: &Path, guest: u64) -> u64 {
    let image = Image::open(FileSource::open(img).unwrap()).unwrap();
    let g = *image.geometry();
    let l1 = image.l1_entry(guest >> g.l2_span_bits()).unwrap();
    l1.l2_offset.unwrap() + g.cluster_index(guest) % g.l2_entries * g.l2_entry_bytes
}

/// Run convert on a broken image: exit `want`, stderr names `code`, no
/// output and no temporary file left. With /usr/bin/time, also bound the
/// peak RSS.
fn assert_refused(img: &Path, want: i32, code_str: &str, extra: &[&str]) {
    let dir = img.parent().unwrap();
    let before = leftovers(dir, &[]);
    let out = dir.join("out.raw");
    let o = convert(img, &out, extra);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), want, "{}: {stderr}", img.display());
    assert!(stderr.contains(code_str), "expected {code_str}: {stderr}");
    assert!(!out.exists(), "output left behind");
    assert_eq!(leftovers(dir, &[]), before, "temporary file left behind");
    if extra.is_empty() {
        // From a pipe, with a spool: refused the same way, nothing written.
        let (c, err, got) = convert_streamed(img, true);
        assert!(
            got.is_none(),
            "{}: convert --spool - wrote a refused image",
            img.display()
        );
        assert_eq!(
            (c, err.contains(code_str)),
            (want, true),
            "{}: convert --spool -: {err}",
            img.display()
        );
    }
    if Path::new("/usr/bin/time").exists() {
        let t = std::process::Command::new("/usr/bin/time")
            .args(["-f", "%M", bin(), "convert", "-q"])
            .arg(img)
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&t.stderr);
        let kib: u64 = err.lines().last().unwrap().trim().parse().unwrap();
        assert!(kib < 64 * 1024, "peak RSS {kib} KiB");
    }
}

// ---------------------------------------------------------------- matrix

#[test]
fn cluster_sizes() {
    let d = tmpdir();
    for cs in ["512", "4k", "64k", "2M"] {
        let img = image(
            d.path(),
            &format!("cs{cs}.qcow2"),
            &format!("cluster_size={cs}"),
            "5M",
            MIXED,
        );
        assert_converts(&img, &[]);
    }
}

#[test]
fn compat_and_refcount_widths() {
    let d = tmpdir();
    for (name, opts) in [
        ("v2.qcow2", "compat=0.10"),
        ("v2-4k.qcow2", "compat=0.10,cluster_size=4k"),
        ("rc1.qcow2", "refcount_bits=1"),
        ("rc16.qcow2", "refcount_bits=16,cluster_size=4k"),
        ("rc64.qcow2", "refcount_bits=64"),
        ("lazy.qcow2", "lazy_refcounts=on"),
    ] {
        let img = image(d.path(), name, opts, "3M", MIXED);
        assert_converts(&img, &[]);
    }
}

#[test]
fn compressed_zlib_and_zstd() {
    let d = tmpdir();
    let raw = d.path().join("src.raw");
    write_raw(&raw, 3 << 20, 7);
    for (cs, ct) in [
        ("512", "zlib"),
        ("4k", "zlib"),
        ("64k", "zlib"),
        ("2M", "zlib"),
        ("4k", "zstd"),
        ("64k", "zstd"),
    ] {
        let name = format!("c{cs}-{ct}.qcow2");
        let img = from_raw(
            d.path(),
            &name,
            &raw,
            &format!("cluster_size={cs},compression_type={ct}"),
            true,
        );
        first_compressed(&img);
        let disk = assert_converts(&img, &[]);
        assert!(disk == fs::read(&raw).unwrap());
    }
}

/// A compressed write that is the last allocation: QEMU does not pad the
/// file to the end of the stream's last sector, so the descriptor's range
/// runs past the end of the file by less than a sector. QEMU reads it; so
/// must we (decompression decides whether the stream is complete).
#[test]
fn compressed_write_at_end_of_file() {
    let d = tmpdir();
    for (opts, cmds) in [
        ("", &["write -P 1 0 64k", "write -c -P 0x11 1M 64k"][..]),
        ("compression_type=zstd", &["write -c -P 0x22 64k 64k"][..]),
        ("cluster_size=4k", &["write -c -P 0x33 8k 4k"][..]),
    ] {
        let img = image(d.path(), "tail.qcow2", opts, "4M", cmds);
        let (_, desc) = first_compressed(&img);
        let len = fs::metadata(&img).unwrap().len();
        assert!(
            desc.end() > len,
            "{opts}: the stream's last sector is cut by EOF"
        );
        assert_converts(&img, &[]);
        fs::remove_file(&img).unwrap();
    }
}

/// 512-byte clusters compressed from a repeating 8-byte pattern: streams
/// start late in a sector and spill into the next (one additional sector
/// in a one-bit count field), as the notes describe.
#[test]
fn compressed_512_byte_clusters_cross_sectors() {
    let d = tmpdir();
    let raw = d.path().join("pattern.raw");
    let pattern: Vec<u8> = (0..1u32 << 17).flat_map(|_| 1u8..=8).collect();
    fs::write(&raw, &pattern).unwrap();
    for ct in ["zlib", "zstd"] {
        let opts = format!("cluster_size=512,compression_type={ct}");
        let img = from_raw(d.path(), &format!("p-{ct}.qcow2"), &raw, &opts, true);
        let image = Image::open(FileSource::open(&img).unwrap()).unwrap();
        let crossing = image
            .map(0, image.virtual_size())
            .unwrap()
            .filter_map(|e| match e.unwrap().kind {
                ExtentKind::Compressed(d) => Some(d),
                _ => None,
            })
            .filter(|d| d.sectors == 2)
            .count();
        assert!(crossing > 0, "{ct}: no stream crosses a sector boundary");
        assert!(assert_converts(&img, &[]) == pattern);
    }
}

#[test]
fn extended_l2_subclusters() {
    let d = tmpdir();
    // 64k clusters: 2k subclusters. Partial writes, zero subclusters inside
    // allocated clusters, discards of a few subclusters.
    let img = image(
        d.path(),
        "extl2.qcow2",
        "extended_l2=on,cluster_size=64k",
        "4M",
        &[
            "write -P 0xaa 0 4k",
            "write -P 0xbb 70k 3k",
            "write -P 0xcc 192k 64k",
            "write -z 200k 8k",
            "discard 220k 4k",
            "write -z 300k 64k",
            "write -P 0xdd 1M 1M",
            "write -z 1100k 6k",
            "discard 1500k 100k",
        ],
    );
    let disk = assert_converts(&img, &[]);
    let image = Image::open(FileSource::open(&img).unwrap()).unwrap();
    let kinds: Vec<_> = image
        .map(0, 256 << 10)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert!(kinds
        .iter()
        .any(|e| e.kind == ExtentKind::Zero && e.len < 65536));
    assert!(disk[200 << 10..208 << 10].iter().all(|&b| b == 0));
    // Compressed clusters with extended L2 (bitmap must be zero).
    let raw = d.path().join("src.raw");
    write_raw(&raw, 2 << 20, 3);
    let c = from_raw(
        d.path(),
        "extl2c.qcow2",
        &raw,
        "extended_l2=on,cluster_size=32k",
        true,
    );
    assert_converts(&c, &[]);
}

#[test]
fn snapshots_convert_the_active_layer() {
    let d = tmpdir();
    let img = image(d.path(), "snap.qcow2", "cluster_size=4k", "2M", MIXED);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    qemu_io(
        &img,
        &["write -P 0x99 0 8k", "discard 1M 64k", "write -z 20k 4k"],
    );
    qemu_img(&["snapshot", "-c", "s2", img.to_str().unwrap()]);
    qemu_io(&img, &["write -P 0x77 4k 4k"]);
    let disk = assert_converts(&img, &[]);
    assert!(disk[4096..8192].iter().all(|&b| b == 0x77));
}

#[test]
fn odd_virtual_sizes_and_sparse_output() {
    let d = tmpdir();
    // 3 MiB + 3 KiB: the last 64k cluster is partial.
    for (name, opts) in [
        ("odd64k.qcow2", "cluster_size=64k"),
        ("odd2m.qcow2", "cluster_size=2M"),
    ] {
        let img = image(
            d.path(),
            name,
            opts,
            "3148800",
            &["write -P 0x5c 3070k 5k", "write -P 0x5d 0 4k"],
        );
        assert_converts(&img, &[]);
    }
    // Compressed last cluster of a disk that is not a cluster multiple.
    let raw = d.path().join("odd.raw");
    write_raw(&raw, (1 << 20) + 2048, 11);
    let img = from_raw(d.path(), "oddc.qcow2", &raw, "cluster_size=64k", true);
    assert!(assert_converts(&img, &[]) == fs::read(&raw).unwrap());

    // Holes: a 64 MiB disk with 1 MiB of data occupies little space, and
    // an all-zero data cluster is not written either.
    let img = image(
        d.path(),
        "sparse.qcow2",
        "",
        "64M",
        &["write -P 0x42 32M 1M", "write -P 0 40M 1M"],
    );
    let out = d.path().join("sparse.raw");
    assert_eq!(code(&convert(&img, &out, &[])), 0);
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(&out).unwrap();
    assert_eq!(m.len(), 64 << 20);
    use std::os::unix::fs::PermissionsExt;
    assert_ne!(m.permissions().mode() & 0o077, 0, "not tempfile's 0600");
    assert!(
        m.blocks() * 512 <= 2 << 20,
        "{} bytes allocated",
        m.blocks() * 512
    );
    assert!(fs::read(&out).unwrap() == oracle(&img));
}

/// Data clusters whose host clusters are holes of the image file
/// (`preallocation=metadata`, and the rest of partly written clusters)
/// are not read but left as holes: the output is byte-identical to
/// qemu-img's, into a file and into a stream, and sparse.
#[test]
fn data_in_holes_of_the_image_file() {
    let d = tmpdir();
    for (name, opts) in [
        ("pre64k.qcow2", "cluster_size=64k,preallocation=metadata"),
        ("pre4k.qcow2", "cluster_size=4k,preallocation=metadata"),
        (
            "prel2.qcow2",
            "cluster_size=64k,extended_l2=on,preallocation=metadata",
        ),
        ("falloc.qcow2", "cluster_size=64k,preallocation=falloc"),
    ] {
        let img = image(
            d.path(),
            name,
            opts,
            "24M",
            &[
                "write -P 0x61 1M 4k",
                "write -P 0x62 5180k 200k",
                "write -P 0 8M 64k",
                "write -P 0x63 24572k 4k",
                "write -z 12M 1M",
            ],
        );
        let expect = assert_converts(&img, &[]);
        let o = guard(&["convert", "-q", img.to_str().unwrap(), "-"]);
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout == expect, "{name}: stream output differs");

        let out = d.path().join("pre.raw");
        assert_eq!(code(&convert(&img, &out, &[])), 0);
        use std::os::unix::fs::MetadataExt;
        let image_blocks = fs::metadata(&img).unwrap().blocks();
        if image_blocks * 512 < 4 << 20 {
            // The file system keeps the image sparse: so is the output.
            let m = fs::metadata(&out).unwrap();
            assert!(
                m.blocks() * 512 <= 1 << 20,
                "{name}: {} bytes allocated",
                m.blocks() * 512
            );
        }
        fs::remove_file(&out).unwrap();
    }
}

#[test]
fn stdout_carries_only_the_disk() {
    let d = tmpdir();
    let img = image(d.path(), "s.qcow2", "cluster_size=4k", "3M", MIXED);
    let o = guard(&["convert", img.to_str().unwrap(), "-"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == oracle(&img));

    // An OUTPUT that exists and is not a regular file (here a FIFO; the same
    // path protects /dev/null and devices) is written in place, never
    // replaced by a rename.
    let fifo = d.path().join("fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read(fifo).unwrap())
    };
    let o = convert(&img, &fifo, &[]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(reader.join().unwrap() == oracle(&img));
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn map_offsets_match_qemu_img_map() {
    let d = tmpdir();
    let img = image(d.path(), "m.qcow2", "cluster_size=4k", "3M", MIXED);
    let out = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    let qmap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let image = Image::open(FileSource::open(&img).unwrap()).unwrap();
    for q in qmap.as_array().unwrap() {
        let start = q["start"].as_u64().unwrap();
        let len = q["length"].as_u64().unwrap();
        for e in image.map(start, len).unwrap() {
            let e = e.unwrap();
            match e.kind {
                ExtentKind::Data { host } => {
                    assert!(q["data"].as_bool().unwrap(), "{q}");
                    assert_eq!(host, q["offset"].as_u64().unwrap() + e.guest_offset - start);
                }
                ExtentKind::Zero | ExtentKind::Unallocated => {
                    assert!(q["zero"].as_bool().unwrap(), "{q}");
                }
                ExtentKind::Compressed(_) => panic!("no compression here"),
            }
        }
    }
}

// ---------------------------------------------------------------- hostile

/// A compressed 64k-cluster image whose first compressed stream is long
/// (about half a cluster), for payload patches.
fn compressed_image(d: &Path, ct: &str) -> (PathBuf, u64, Descriptor) {
    let raw = d.join(format!("half-{ct}.raw"));
    // Half random, half zeros per 64 KiB: compresses to about 32 KiB.
    let mut data = vec![0u8; 256 << 10];
    let mut rng = Rng(99);
    for (i, b) in data.iter_mut().enumerate() {
        if i % 65536 < 32768 {
            *b = rng.next() as u8;
        }
    }
    fs::write(&raw, &data).unwrap();
    let img = from_raw(
        d,
        &format!("half-{ct}.qcow2"),
        &raw,
        &format!("cluster_size=64k,compression_type={ct}"),
        true,
    );
    let (guest, desc) = first_compressed(&img);
    assert!(desc.span() > 16 << 10);
    (img, guest, desc)
}

/// A zstd frame with a 64 KiB window and no content size, made of
/// `blocks` 64 KiB RLE blocks.
fn zstd_bomb(blocks: usize) -> Vec<u8> {
    let mut f = 0xFD2F_B528u32.to_le_bytes().to_vec();
    f.extend([0x00, 6 << 3]);
    for i in 0..blocks {
        let h = u32::from(i + 1 == blocks) | 1 << 1 | 65536 << 3;
        f.extend_from_slice(&h.to_le_bytes()[..3]);
        f.push(0x41);
    }
    f
}

#[test]
fn garbage_and_truncated_compressed_streams() {
    let d = tmpdir();
    for ct in ["zlib", "zstd"] {
        let (img, _, desc) = compressed_image(d.path(), ct);
        let garbage = copy(&img, d.path(), &format!("garbage-{ct}.qcow2"));
        patch(&garbage, desc.start(), &[0xff; 4096]);
        assert_refused(&garbage, 2, "decompress_failed", &[]);

        // Truncated: the descriptor claims only the first sector.
        let truncated = copy(&img, d.path(), &format!("trunc-{ct}.qcow2"));
        let at = l2_entry_at(&truncated, first_compressed(&img).0);
        let g = Image::open(FileSource::open(&img).unwrap())
            .unwrap()
            .geometry()
            .to_owned();
        let short = Descriptor {
            host_offset: desc.host_offset,
            sectors: 1,
        };
        patch(&truncated, at, &short.encode(&g).to_be_bytes());
        assert_refused(&truncated, 2, "decompress_failed", &[]);
        fs::remove_file(&garbage).unwrap();
        fs::remove_file(&truncated).unwrap();
    }
}

/// Streams that would inflate to megabytes inside a 64k-cluster image:
/// an error naming the guest and host offsets, never a silent truncation
/// (QEMU keeps the first cluster of a deflate bomb), bounded memory.
#[test]
fn inflation_bombs() {
    let d = tmpdir();
    let (img, guest, desc) = compressed_image(d.path(), "zlib");
    let bomb = miniz_oxide::deflate::compress_to_vec(&vec![0x41u8; 16 << 20], 10);
    assert!((bomb.len() as u64) < desc.span(), "{}", bomb.len());
    patch(&img, desc.start(), &bomb);
    assert_refused(&img, 2, "decompress_failed", &[]);
    let image = Image::open(FileSource::open(&img).unwrap()).unwrap();
    let e = image.read_at(guest, &mut [0u8; 512]).unwrap_err();
    assert_eq!(e.code(), "decompress_failed");
    let msg = e.to_string();
    assert!(msg.contains(&format!("{guest:#x}")) && msg.contains(&format!("{:#x}", desc.start())));
    assert!(msg.contains("past one cluster"), "{msg}");

    let (img, guest, desc) = compressed_image(d.path(), "zstd");
    patch(&img, desc.start(), &zstd_bomb(64));
    assert_refused(&img, 2, "decompress_failed", &[]);
    let image = Image::open(FileSource::open(&img).unwrap()).unwrap();
    let e = image.read_at(guest, &mut [0u8; 512]).unwrap_err();
    assert!(e.to_string().contains("past one cluster"), "{e}");
}

#[test]
fn descriptors_and_entries_pointing_where_they_must_not() {
    let d = tmpdir();
    let (img, guest, desc) = compressed_image(d.path(), "zlib");
    let g = *Image::open(FileSource::open(&img).unwrap())
        .unwrap()
        .geometry();
    let at = l2_entry_at(&img, guest);
    let len = fs::metadata(&img).unwrap().len();

    // Compressed data past the end of the file.
    let past = copy(&img, d.path(), "past.qcow2");
    let p = Descriptor {
        host_offset: len - 100,
        sectors: desc.sectors,
    };
    patch(&past, at, &p.encode(&g).to_be_bytes());
    assert_refused(&past, 2, "compressed_past_eof", &[]);

    // Compressed data inside the header.
    let hdr = copy(&img, d.path(), "hdr.qcow2");
    let h = Descriptor {
        host_offset: 0x48,
        sectors: 2,
    };
    patch(&hdr, at, &h.encode(&g).to_be_bytes());
    assert_refused(&hdr, 2, "data_overlaps_metadata", &[]);

    // A data cluster in the L1 table.
    let l1_off = be64(&img, 40);
    let l1 = copy(&img, d.path(), "l1.qcow2");
    patch(&l1, at, &(l1_off | 1 << 63).to_be_bytes());
    assert_refused(&l1, 2, "data_overlaps_metadata", &[]);

    // A data cluster past the end of the file; unaligned; reserved bits.
    for (name, entry, want) in [
        ("eof.qcow2", (len + (1 << 20)) & !0xffff, "past_eof"),
        ("unaligned.qcow2", 0x30200, "unaligned"),
        ("reserved.qcow2", 0x30000 | 1 << 57, "reserved_bits"),
    ] {
        let p = copy(&img, d.path(), name);
        patch(&p, at, &entry.to_be_bytes());
        assert_refused(&p, 2, want, &[]);
    }

    // An L1 entry pointing into the refcount table.
    let rt = be64(&img, 48);
    let l1bad = copy(&img, d.path(), "l1bad.qcow2");
    patch(&l1bad, l1_off, &rt.to_be_bytes());
    assert_refused(&l1bad, 2, "metadata_overlap", &[]);
}

/// Before writing, convert runs the metadata check: error findings refuse
/// the image even where every entry would read fine; leaks do not.
#[test]
fn metadata_check_before_writing() {
    let d = tmpdir();
    // A cleared L2 entry leaves its cluster leaked: still converts.
    let leak = image(d.path(), "leak.qcow2", "", "4M", &["write -P 7 0 128k"]);
    patch(&leak, l2_entry_at(&leak, 0), &[0; 8]);
    let qemu = qemu_img_status(&["check", "-f", "qcow2", leak.to_str().unwrap()]);
    assert_eq!(qemu.status.code(), Some(3), "qemu-img check: leaks only");
    assert_converts(&leak, &[]);
    // Refcounts zeroed: a corruption qemu-img check reports too.
    let rc = image(d.path(), "rc.qcow2", "", "4M", &["write -P 7 0 128k"]);
    let block = be64(&rc, be64(&rc, 48));
    patch(&rc, block, &[0u8; 65536]);
    let qemu = qemu_img_status(&["check", "-f", "qcow2", rc.to_str().unwrap()]);
    assert_eq!(qemu.status.code(), Some(2), "qemu-img check: corrupt");
    assert_refused(&rc, 2, "refcount_too_low", &[]);
}

// ---------------------------------------------------------------- policy

#[test]
fn backing_files_only_when_handed_in() {
    let d = tmpdir();
    let base = image(d.path(), "base.qcow2", "", "3M", &["write -P 0x61 0 3M"]);
    let top = overlay(d.path(), "top.qcow2", &base, "qcow2");
    qemu_io(&top, &["write -P 0x62 1M 64k", "write -z 2M 4k"]);
    // Refused by default, before anything is written.
    assert_refused(&top, 4, "policy_backing_file", &[]);
    // Explicitly handed in: identical to qemu-img, which follows the chain.
    assert_converts(
        &top,
        &["--allow-backing", "--backing", base.to_str().unwrap()],
    );
    // A raw backing file works the same.
    let raw = d.path().join("base.raw");
    fs::write(&raw, oracle(&base)).unwrap();
    assert_converts(
        &top,
        &["--allow-backing", "--backing", raw.to_str().unwrap()],
    );
    // Allowed but not handed in: unallocated clusters read as zeros.
    let out = d.path().join("nobacking.raw");
    let o = convert(&top, &out, &["--allow-backing"]);
    assert_eq!(code(&o), 0);
    let got = fs::read(&out).unwrap();
    assert!(got[..4096].iter().all(|&b| b == 0));
    assert!(got[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0x62));
    // --backing without --allow-backing is a usage error.
    let o = convert(
        &top,
        &d.path().join("x.raw"),
        &["--backing", base.to_str().unwrap()],
    );
    assert_eq!(code(&o), 1);
}

#[test]
fn external_data_files_only_when_handed_in() {
    let d = tmpdir();
    let data = d.path().join("data.raw");
    let img = image(
        d.path(),
        "ext.qcow2",
        &format!("data_file={}", data.display()),
        "3M",
        MIXED,
    );
    assert_refused(&img, 4, "policy_external_data_file", &[]);
    assert_refused(&img, 4, "--data-file", &["--allow-data-file"]);
    assert_converts(
        &img,
        &["--allow-data-file", "--data-file", data.to_str().unwrap()],
    );
}

/// Memory and time do not grow with the virtual size: a 1 TiB disk with a
/// few MiB of data converts to a sparse file, within 64 MiB of RSS.
#[test]
fn huge_sparse_disk() {
    let d = tmpdir();
    let img = image(
        d.path(),
        "huge.qcow2",
        "",
        "1T",
        &["write -P 0x17 700G 3M", "write -P 0x18 1023G 64k"],
    );
    let out = d.path().join("huge.raw");
    assert_converts_within_64m(&img, &out);
    let f = fs::File::open(&out).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 40);
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; 3 << 20];
    f.read_exact_at(&mut b, 700 << 30).unwrap();
    assert!(b.iter().all(|&x| x == 0x17));
    f.read_exact_at(&mut b[..4096], (700 << 30) - 4096).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0));
    f.read_exact_at(&mut b[..65536], 1023 << 30).unwrap();
    assert!(b[..65536].iter().all(|&x| x == 0x18));
}

/// Convert successfully, bounding peak RSS when /usr/bin/time exists.
fn assert_converts_within_64m(img: &Path, out: &Path) {
    if Path::new("/usr/bin/time").exists() {
        let t = std::process::Command::new("/usr/bin/time")
            .args(["-f", "%M", bin(), "convert", "-q"])
            .arg(img)
            .arg(out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&t.stderr);
        assert_eq!(code(&t), 0, "{err}");
        let kib: u64 = err.lines().last().unwrap().trim().parse().unwrap();
        assert!(kib < 64 * 1024, "peak RSS {kib} KiB");
    } else {
        assert_eq!(code(&convert(img, out, &[])), 0);
    }
}
