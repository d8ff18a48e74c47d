//! `qcow2-guard info` against `qemu-img info`, over a matrix of images made
//! at test time with qemu-img and qemu-io.
//!
//! Each case builds one image (cluster sizes 512 B..2 MiB, compat 0.10 and
//! 1.1, refcount widths 1..64, zlib and zstd with compressed clusters,
//! extended L2, lazy refcounts and the dirty bit, internal snapshots,
//! persistent bitmaps, backing files, external data files, LUKS and legacy
//! AES encryption) and then checks:
//!
//! - every field both JSON documents show is equal, and every field
//!   `qemu-img info` shows is in ours (except the few listed in
//!   [`QEMU_ONLY`]), and every qemu-style field we show is in qemu's;
//! - the exit code and policy findings under the default policy, and exit 0
//!   with the matching `--allow-*` flag;
//! - the library opens the image, and `Image::cluster` maps a few guest
//!   offsets of each extent of `qemu-img map` the same way qemu does.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use qcow2_guard::l1l2::SubclusterState;
use qcow2_guard::{FileSource, Image, Source};
use serde_json::Value;

/// Fields qemu-img shows that we do not: the protocol-layer child node, and
/// the LUKS header details (we never parse the LUKS header itself).
const QEMU_ONLY: &[&str] = &[
    // The external data file's node: never opened, so not shown.
    "/children/1",
    "/format-specific/data/encrypt/ivgen-alg",
    "/format-specific/data/encrypt/ivgen-hash-alg",
    "/format-specific/data/encrypt/hash-alg",
    "/format-specific/data/encrypt/cipher-alg",
    "/format-specific/data/encrypt/cipher-mode",
    "/format-specific/data/encrypt/uuid",
    "/format-specific/data/encrypt/slots",
    "/format-specific/data/encrypt/payload-offset",
    "/format-specific/data/encrypt/master-key-iters",
    "/format-specific/data/encrypt/detached-header",
];

/// Top-level fields of ours that qemu-img does not have.
const OURS_ONLY: &[&str] = &[
    "/header-virtual-size",
    "/file-length",
    "/features",
    "/findings",
    "/exit-code",
    "/unknown-extensions",
    "/bitmaps-stale",
];

/// Fields that must be compared for every image (so the walk cannot pass
/// by comparing nothing).
const ALWAYS: &[&str] = &[
    "/filename",
    "/format",
    "/virtual-size",
    "/actual-size",
    "/cluster-size",
    "/dirty-flag",
    "/format-specific/type",
    "/format-specific/data/compat",
    "/format-specific/data/compression-type",
    "/format-specific/data/refcount-bits",
];

/// `qemu-img info` and `qcow2-guard info --json` agree on `image`.
fn assert_info_agrees(image: &Path, allow: &[&str]) -> Value {
    let p = image.to_str().unwrap();
    let ours_out = guard(&[&["info", "--json"], allow, &[p]].concat());
    let ours = json(&ours_out);
    let qemu = serde_json::from_slice::<Value>(
        &qemu_img(&["info", "--output=json", "-f", "qcow2", p]).stdout,
    )
    .unwrap();
    let (mut errors, mut compared) = (Vec::new(), Vec::new());
    walk(
        &qemu,
        &ours,
        "",
        QEMU_ONLY,
        true,
        &mut errors,
        &mut compared,
    );
    let mut unused = Vec::new();
    walk(&ours, &qemu, "", OURS_ONLY, false, &mut errors, &mut unused);
    assert!(
        errors.is_empty(),
        "{}: info disagrees:\n  {}\nqemu-img: {qemu:#}\nours: {ours:#}",
        image.display(),
        errors.join("\n  ")
    );
    for key in ALWAYS {
        assert!(
            compared.iter().any(|c| c == key),
            "{key} was not compared for {}",
            image.display()
        );
    }
    ours
}

/// Compare `Image::cluster` with `qemu-img map` at both ends and the middle
/// of every extent qemu reports.
fn assert_map_agrees(image: &Path, data_file: Option<&Path>) {
    let mut img = Image::open(FileSource::open(image).unwrap()).unwrap();
    if let Some(df) = data_file {
        img.set_data_file(Arc::new(FileSource::open(df).unwrap()));
    }
    let g = *img.geometry();
    let map: Value = serde_json::from_slice(
        &qemu_img(&[
            "map",
            "--output=json",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
        ])
        .stdout,
    )
    .unwrap();
    let extents = map.as_array().unwrap();
    assert!(!extents.is_empty());
    let mut seen = [0usize; 4];
    for e in extents {
        let n = |k: &str| e[k].as_u64().unwrap();
        let b = |k: &str| e[k].as_bool().unwrap();
        let (start, len) = (n("start"), n("length"));
        for off in [start, start + len / 2, start + len - 1] {
            let c = img
                .cluster(off)
                .unwrap_or_else(|err| panic!("{}: cluster({off:#x}): {err}", image.display()));
            let index = u32::try_from(g.offset_in_cluster(off) / g.subcluster_size).unwrap();
            let state = c.subcluster(index, &g);
            let what = format!(
                "{} at guest {off:#x}: qemu {e}, ours {c:?}",
                image.display()
            );
            if n("depth") > 0 || !b("present") {
                assert_eq!(state, SubclusterState::Unallocated, "{what}");
                seen[0] += 1;
            } else if b("compressed") {
                assert!(matches!(state, SubclusterState::Compressed(_)), "{what}");
                seen[1] += 1;
            } else if b("data") {
                let SubclusterState::Data(host) = state else {
                    panic!("{what}: expected data");
                };
                let in_sub = off & (g.subcluster_size - 1);
                assert_eq!(host + in_sub, n("offset") + (off - start), "{what}");
                seen[2] += 1;
            } else {
                assert_eq!(state, SubclusterState::Zero, "{what}");
                seen[3] += 1;
            }
        }
    }
    // Every image of the matrix has data somewhere.
    assert!(
        seen[1] + seen[2] > 0,
        "{}: no data extents",
        image.display()
    );
}

/// One image of the matrix, as built.
struct Built {
    image: PathBuf,
    data_file: Option<PathBuf>,
    /// Exit code under the default policy.
    exit: i32,
    /// Policy findings (errors) expected under the default policy.
    refused: &'static [&'static str],
    /// Flags that make the policy accept it.
    allow: &'static [&'static str],
    /// Whether `qemu-img map` can read it without a key.
    map: bool,
}

impl Built {
    fn plain(image: PathBuf) -> Built {
        Built {
            image,
            data_file: None,
            exit: 0,
            refused: &[],
            allow: &[],
            map: true,
        }
    }
}

/// Data written to each image: a pattern, zeroes, a small write and a
/// discard, spread over more than one L2 table with small clusters.
const WRITES: &[&str] = &[
    "write -P 0xaa 0 64k",
    "write -z 128k 64k",
    "write -P 0x55 300k 4k",
    "write -P 0x11 900k 100k",
    "discard 960k 64k",
];

fn with_data(dir: &Path, name: &str, opts: &str) -> Built {
    let image = create(dir, name, opts, "1M");
    qemu_io(&image, WRITES);
    Built::plain(image)
}

/// A compressed image: `qemu-img convert -c` from a raw file.
fn compressed(dir: &Path, opts: &str) -> Built {
    let raw = dir.join("src.raw");
    write_raw(&raw, 1 << 20, 7);
    let image = dir.join("c.qcow2");
    let mut args = vec!["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([raw.to_str().unwrap(), image.to_str().unwrap()]);
    qemu_img(&args);
    // Some uncompressed data on top.
    qemu_io(&image, &["write -P 0x33 4k 4k"]);
    Built::plain(image)
}

fn check(build: impl FnOnce(&Path) -> Built) {
    let dir = tmpdir();
    let b = build(dir.path());
    let p = b.image.to_str().unwrap();

    // Default policy.
    let out = guard(&["info", "--json", p]);
    assert_eq!(
        code(&out),
        b.exit,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["exit-code"], b.exit);
    let errors: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "error")
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    assert_eq!(errors, b.refused);

    // With the matching --allow-* flags: accepted, and agreeing with qemu.
    let ours = assert_info_agrees(&b.image, b.allow);
    assert_eq!(ours["exit-code"], 0);
    let out = guard(&[&["info", "--json"], b.allow, &[p]].concat());
    assert_eq!(code(&out), 0);
    // The human output works too.
    let out = guard(&[&["info"], b.allow, &[p]].concat());
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("cluster_size: "));

    // The library opens it and maps guest offsets like qemu-img map.
    let img = Image::open(FileSource::open(&b.image).unwrap()).unwrap();
    assert_eq!(img.virtual_size(), ours["virtual-size"].as_u64().unwrap());
    assert_eq!(img.file_len(), img.source().len());
    if b.map {
        assert_map_agrees(&b.image, b.data_file.as_deref());
        assert_map_identical(&b);
        assert_check_agrees(&b);
    }
}

/// `qcow2-guard check --output=json` has every field of `qemu-img check
/// --output=json`, with the same value, and the same exit status (the
/// policy relaxed with the image's --allow-* flags).
fn assert_check_agrees(b: &Built) {
    let p = b.image.to_str().unwrap();
    let qemu = qemu_img_status(&["check", "--output=json", "-f", "qcow2", p]);
    let qv: Value = serde_json::from_slice(&qemu.stdout).unwrap();
    let ours = guard(&[&["check", "--output=json", "-f", "qcow2"], b.allow, &[p]].concat());
    let ov = json(&ours);
    // A deliberate difference (README, check): in a dirty image with lazy
    // refcounts, stale refcounts are repairable (exit 3, counted as
    // leaks), where qemu-img check counts them as corruptions (exit 2).
    let dirty = be32(&b.image, 4) >= 3 && be64(&b.image, 72) & 1 == 1;
    let (qemu_code, skip): (i32, &[&str]) = if dirty {
        assert_eq!(qemu.status.code(), Some(2), "{p}: {qv:#}");
        (3, &["/corruptions", "/leaks"])
    } else {
        (qemu.status.code().unwrap(), &[])
    };
    assert_eq!(code(&ours), qemu_code, "{p}: check exit: {ov:#}");
    let qv = match qv {
        Value::Object(mut o) => {
            for k in skip {
                o.remove(&k[1..]);
            }
            Value::Object(o)
        }
        other => other,
    };
    let (mut errors, mut compared) = (Vec::new(), Vec::new());
    walk(&qv, &ov, "", &[], true, &mut errors, &mut compared);
    assert!(
        errors.is_empty(),
        "{p}: check disagrees:\n  {}\nqemu-img: {qv:#}\nours: {ov:#}",
        errors.join("\n  ")
    );
    assert!(
        compared.iter().any(|c| c == "/image-end-offset"),
        "{p}: nothing compared"
    );
    // -q prints nothing, as qemu-img's.
    let quiet = guard(&[&["check", "-q", "--output=json"], b.allow, &[p]].concat());
    assert!(quiet.stdout.is_empty());
    assert_eq!(code(&quiet), code(&ours));
}

/// The backing chain below `image` as qemu-img resolves it (top first,
/// the image itself left out).
fn backing_chain(image: &Path) -> Vec<String> {
    let out = qemu_img(&[
        "info",
        "--backing-chain",
        "--output=json",
        "-U",
        image.to_str().unwrap(),
    ]);
    let chain: Value = serde_json::from_slice(&out.stdout).unwrap();
    chain.as_array().unwrap()[1..]
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_owned())
        .collect()
}

/// `qcow2-guard map` prints exactly what `qemu-img map` prints, in JSON
/// and human form (exit code, stdout, and the error line qemu-img gives
/// for compressed clusters), with the backing chain and data file handed
/// in explicitly.
fn assert_map_identical(b: &Built) {
    let p = b.image.to_str().unwrap();
    // Both tools ask the file system where the image has holes (QEMU's
    // preallocation heuristic); flush delayed allocation first so that
    // writeback between the two runs cannot change the answer.
    for f in std::iter::once(&b.image).chain(&b.data_file) {
        std::fs::File::open(f).unwrap().sync_all().unwrap();
    }
    let chain = backing_chain(&b.image);
    let mut extra: Vec<&str> = b.allow.to_vec();
    for layer in &chain {
        extra.extend(["--backing", layer.as_str()]);
    }
    let df = b.data_file.as_ref().map(|d| d.to_str().unwrap().to_owned());
    if let Some(df) = &df {
        extra.extend(["--data-file", df.as_str()]);
    }
    for output in ["--output=json", "--output=human"] {
        let qemu = qemu_img_status(&["map", output, "-f", "qcow2", p]);
        let ours = guard(&[&["map", output, "-f", "qcow2"], &extra[..], &[p]].concat());
        let show = |o: &std::process::Output| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        assert_eq!(
            code(&ours),
            qemu.status.code().unwrap(),
            "{p} map {output}: qemu-img:\n{}\nours:\n{}",
            show(&qemu),
            show(&ours)
        );
        assert!(
            ours.stdout == qemu.stdout,
            "{p} map {output} differs:\nqemu-img:\n{}\nours:\n{}",
            show(&qemu),
            show(&ours)
        );
        if !qemu.status.success() {
            let tail = |o: &std::process::Output| {
                let e = String::from_utf8_lossy(&o.stderr).into_owned();
                e.split_once(": ").map(|(_, m)| m.to_owned()).unwrap_or(e)
            };
            assert_eq!(tail(&ours), tail(&qemu), "{p} map {output}: error message");
        }
    }
}

macro_rules! matrix {
    ($($name:ident => $build:expr;)*) => {
        $( #[test] fn $name() { check($build) } )*
    };
}

matrix! {
    cluster_512 => |d| with_data(d, "a.qcow2", "cluster_size=512");
    cluster_4k => |d| with_data(d, "a.qcow2", "cluster_size=4k");
    cluster_64k => |d| with_data(d, "a.qcow2", "");
    cluster_2m => |d| {
        let image = create(d, "a.qcow2", "cluster_size=2M", "8M");
        qemu_io(&image, &["write -P 0xaa 0 1M", "write -z 4M 2M"]);
        Built::plain(image)
    };
    compat_010 => |d| with_data(d, "a.qcow2", "compat=0.10");
    compat_010_512 => |d| with_data(d, "a.qcow2", "compat=0.10,cluster_size=512");
    refcount_1 => |d| with_data(d, "a.qcow2", "refcount_bits=1");
    refcount_2 => |d| with_data(d, "a.qcow2", "refcount_bits=2,cluster_size=512");
    refcount_4 => |d| with_data(d, "a.qcow2", "refcount_bits=4");
    refcount_8 => |d| with_data(d, "a.qcow2", "refcount_bits=8,cluster_size=4k");
    refcount_32 => |d| with_data(d, "a.qcow2", "refcount_bits=32");
    refcount_64 => |d| with_data(d, "a.qcow2", "refcount_bits=64");
    refcount_64_512 => |d| with_data(d, "a.qcow2", "refcount_bits=64,cluster_size=512");
    zstd_type => |d| with_data(d, "a.qcow2", "compression_type=zstd");
    compressed_zlib => |d| compressed(d, "");
    compressed_zlib_512 => |d| compressed(d, "cluster_size=512");
    compressed_zstd => |d| compressed(d, "compression_type=zstd,cluster_size=4k");
    compressed_v2 => |d| compressed(d, "compat=0.10");
    compressed_2m => |d| compressed(d, "cluster_size=2M,compression_type=zstd");
    extended_l2_16k => |d| with_data(d, "a.qcow2", "extended_l2=on,cluster_size=16k");
    extended_l2_64k => |d| with_data(d, "a.qcow2", "extended_l2=on");
    extended_l2_2m => |d| {
        let image = create(d, "a.qcow2", "extended_l2=on,cluster_size=2M", "4M");
        qemu_io(&image, &["write -P 0xaa 0 64k", "write -z 1M 64k", "write -P 1 3M 200k"]);
        Built::plain(image)
    };
    extended_l2_compressed => |d| compressed(d, "extended_l2=on,compression_type=zstd");
    lazy_refcounts => |d| with_data(d, "a.qcow2", "lazy_refcounts=on");
    dirty => |d| {
        // qemu-io aborts with lazy refcounts on: the dirty bit stays set.
        let image = create(d, "a.qcow2", "lazy_refcounts=on,cluster_size=4k", "1M");
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 7 0 64k", "-c", "abort"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(!st.status.success());
        assert_eq!(be64(&image, 72) & 1, 1, "dirty bit not set");
        Built::plain(image)
    };
    snapshots => |d| {
        let b = with_data(d, "a.qcow2", "cluster_size=4k");
        let p = b.image.to_str().unwrap();
        qemu_img(&["snapshot", "-c", "first", p]);
        qemu_io(&b.image, &["write -P 0xbb 0 8k"]);
        qemu_img(&["snapshot", "-c", "second one", p]);
        qemu_img(&["snapshot", "-c", "third", p]);
        qemu_img(&["snapshot", "-d", "second one", p]);
        b
    };
    snapshot_table_at_eof => |d| {
        // QEMU does not pad the last snapshot table entry: a table written
        // last ends the file mid-padding.
        let b = with_data(d, "a.qcow2", "");
        qemu_img(&["snapshot", "-c", "one", b.image.to_str().unwrap()]);
        qemu_img(&["snapshot", "-c", "two", b.image.to_str().unwrap()]);
        let file_len = std::fs::metadata(&b.image).unwrap().len();
        assert_ne!(file_len % 8, 0, "snapshot table not at the end of the file");
        b
    };
    snapshots_v2 => |d| {
        let b = with_data(d, "a.qcow2", "compat=0.10");
        qemu_img(&["snapshot", "-c", "s1", b.image.to_str().unwrap()]);
        qemu_io(&b.image, &["write -P 0xbb 0 8k"]);
        b
    };
    bitmaps => |d| {
        let b = with_data(d, "a.qcow2", "cluster_size=4k");
        let p = b.image.to_str().unwrap();
        qemu_img(&["bitmap", "--add", p, "b0"]);
        qemu_img(&["bitmap", "--add", "-g", "512", p, "fine"]);
        qemu_img(&["bitmap", "--add", "-g", "1M", "--disable", p, "off"]);
        qemu_io(&b.image, &["write -P 0xcc 200k 16k"]);
        b
    };
    backing => |d| {
        let base = create(d, "base.qcow2", "", "1M");
        qemu_io(&base, &["write -P 0x42 0 512k"]);
        let image = create(d, "top.qcow2", "backing_file=base.qcow2,backing_fmt=qcow2", "1M");
        qemu_io(&image, &["write -P 0xaa 64k 64k", "write -z 256k 64k"]);
        Built {
            exit: 4,
            refused: &["policy_backing_file"],
            allow: &["--allow-backing"],
            ..Built::plain(image)
        }
    };
    backing_v2 => |d| {
        let base = create(d, "base.qcow2", "compat=0.10", "1M");
        qemu_io(&base, &["write -P 0x42 0 512k"]);
        let image = create(d, "top.qcow2", "compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2", "1M");
        qemu_io(&image, &["write -P 0xaa 64k 64k"]);
        Built {
            exit: 4,
            refused: &["policy_backing_file"],
            allow: &["--allow-backing"],
            ..Built::plain(image)
        }
    };
    backing_raw_absolute => |d| {
        let base = d.join("base.raw");
        write_raw(&base, 1 << 20, 3);
        let image = d.join("top.qcow2");
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", base.to_str().unwrap(), "-F", "raw",
            "-o", "cluster_size=4k", image.to_str().unwrap(),
        ]);
        qemu_io(&image, &["write -P 0xaa 8k 8k"]);
        Built {
            exit: 4,
            refused: &["policy_backing_file"],
            allow: &["--allow-backing"],
            ..Built::plain(image)
        }
    };
    data_file => |d| {
        let opts = format!("data_file={}", d.join("a.data").display());
        let image = create(d, "a.qcow2", &opts, "1M");
        qemu_io(&image, &["write -P 0xaa 0 64k", "write -P 0x55 512k 4k"]);
        Built {
            data_file: Some(d.join("a.data")),
            exit: 4,
            refused: &["policy_external_data_file"],
            allow: &["--allow-data-file"],
            ..Built::plain(image)
        }
    };
    data_file_raw => |d| {
        let opts = format!(
            "data_file={},data_file_raw=on,cluster_size=4k",
            d.join("a.data").display()
        );
        let image = create(d, "a.qcow2", &opts, "1M");
        qemu_io(&image, &["write -P 0xaa 0 64k", "write -P 0x55 512k 4k"]);
        Built {
            data_file: Some(d.join("a.data")),
            exit: 4,
            refused: &["policy_external_data_file"],
            allow: &["--allow-data-file"],
            ..Built::plain(image)
        }
    };
    data_file_extended_l2 => |d| {
        let opts = format!(
            "data_file={},extended_l2=on,cluster_size=32k",
            d.join("a.data").display()
        );
        let image = create(d, "a.qcow2", &opts, "1M");
        qemu_io(&image, &["write -P 0xaa 0 4k", "write -z 8k 4k", "write -P 0x55 512k 40k"]);
        Built {
            data_file: Some(d.join("a.data")),
            exit: 4,
            refused: &["policy_external_data_file"],
            allow: &["--allow-data-file"],
            ..Built::plain(image)
        }
    };
    luks => |d| {
        let image = create_encrypted(
            d,
            "a.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4k",
            "1M",
        );
        let p = image.to_str().unwrap();
        let opts = format!("driver=qcow2,file.filename={p},encrypt.key-secret=sec0");
        let out = std::process::Command::new("qemu-io")
            .args(["--object", SECRET, "--image-opts", &opts])
            .args(["-c", "write -P 0xaa 0 64k"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Built {
            exit: 4,
            refused: &["policy_encryption"],
            allow: &["--allow-encryption"],
            map: false,
            ..Built::plain(image)
        }
    };
    aes => |d| {
        let image = create_encrypted(
            d,
            "a.qcow2",
            "encrypt.format=aes,encrypt.key-secret=sec0",
            "1M",
        );
        Built {
            exit: 4,
            refused: &["policy_encryption"],
            allow: &["--allow-encryption"],
            map: false,
            ..Built::plain(image)
        }
    };
    zero_alloc => |d| {
        // Zeroing allocated clusters keeps their host clusters (qemu-img
        // map shows an offset for them); -u gives them up.
        let image = create(d, "a.qcow2", "cluster_size=4k", "1M");
        qemu_io(&image, &["write -P 1 0 64k", "write -z 0 16k", "write -z -u 16k 16k", "write -z 40k 4k"]);
        Built::plain(image)
    };
    preallocation_metadata => |d| {
        let image = create(d, "a.qcow2", "preallocation=metadata,cluster_size=4k", "2M");
        qemu_io(&image, &["write -P 1 8k 4k", "write -P 2 1M 6k", "write -z 64k 8k"]);
        Built::plain(image)
    };
    chain_of_three => |d| {
        let base = create(d, "base.qcow2", "cluster_size=4k", "1M");
        qemu_io(&base, &["write -P 1 0 512k", "write -z 600k 8k"]);
        let mid = overlay(d, "mid.qcow2", &base, "qcow2");
        qemu_io(&mid, &["write -P 2 64k 64k", "write -z 200k 16k", "discard 300k 64k"]);
        let image = create(d, "top.qcow2", "backing_file=mid.qcow2,backing_fmt=qcow2,extended_l2=on,cluster_size=32k", "1M");
        qemu_io(&image, &["write -P 3 4k 4k", "write -P 4 100k 40k", "write -z 480k 32k"]);
        Built {
            exit: 4,
            refused: &["policy_backing_file"],
            allow: &["--allow-backing"],
            ..Built::plain(image)
        }
    };
    short_backing => |d| {
        // The backing image is smaller than the overlay: past its end the
        // overlay's unallocated ranges read as zeros at depth 0.
        let base = create(d, "base.qcow2", "", "256k");
        qemu_io(&base, &["write -P 1 0 256k"]);
        let image = create(d, "top.qcow2", "backing_file=base.qcow2,backing_fmt=qcow2", "1M");
        qemu_io(&image, &["write -P 2 128k 4k", "write -P 3 768k 4k"]);
        Built {
            exit: 4,
            refused: &["policy_backing_file"],
            allow: &["--allow-backing"],
            ..Built::plain(image)
        }
    };
    everything => |d| {
        // Many features at once: v3, 16k extended L2, zstd, lazy refcounts,
        // refcount_bits=8, backing file, snapshots and bitmaps.
        let base = create(d, "base.qcow2", "", "2M");
        qemu_io(&base, &["write -P 0x42 0 2M"]);
        let image = create(
            d,
            "top.qcow2",
            "backing_file=base.qcow2,backing_fmt=qcow2,extended_l2=on,cluster_size=16k,\
             compression_type=zstd,lazy_refcounts=on,refcount_bits=8",
            "2M",
        );
        let p = image.to_str().unwrap();
        qemu_io(&image, &["write -P 0xaa 4k 8k", "write -c -P 0xbb 64k 16k", "write -z 1M 32k"]);
        qemu_img(&["snapshot", "-c", "snap", p]);
        qemu_img(&["bitmap", "--add", p, "bm"]);
        qemu_io(&image, &["write -P 0xcc 512k 4k"]);
        Built {
            exit: 4,
            refused: &["policy_backing_file"],
            allow: &["--allow-backing"],
            ..Built::plain(image)
        }
    };
}

/// The committed sample opens, and matches qemu-img.
#[test]
fn sample_image() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sample.qcow2");
    let img = Image::open(FileSource::open(&sample).unwrap()).unwrap();
    assert!(img.virtual_size() > 0);
    let dir = tmpdir();
    let copy = copy(&sample, dir.path(), "sample.qcow2");
    let out = guard(&["info", "--json", copy.to_str().unwrap()]);
    let allow: Vec<&str> = json(&out)["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| match f["code"].as_str().unwrap() {
            "policy_backing_file" => Some("--allow-backing"),
            "policy_external_data_file" => Some("--allow-data-file"),
            "policy_encryption" => Some("--allow-encryption"),
            _ => None,
        })
        .collect();
    assert_info_agrees(&copy, &allow);
    if img.header().has_backing_file() || img.header().has_data_file() {
        return;
    }
    assert_map_agrees(&copy, None);
    assert_map_identical(&Built::plain(copy));
}

/// `full-backing-filename` resolves a relative name against the image's
/// directory, whatever the name looks like (qemu only treats a colon
/// before the first slash as a protocol prefix).
#[test]
fn backing_names() {
    let dir = tmpdir();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    create(d, "sub/base.qcow2", "", "1M");
    let names = [
        "base.qcow2",
        "./base.qcow2",
        "../sub/base.qcow2",
        "x/a:b.qcow2",
        "a:b",
        "file:base.qcow2",
        "/absolute/base.qcow2",
        "json:{\"file.filename\":\"/etc/passwd\"}",
    ];
    for name in names {
        let image = d.join("sub/top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            name,
            "-F",
            "qcow2",
            image.to_str().unwrap(),
            "1M",
        ]);
        let ours = assert_info_agrees(&image, &["--allow-backing"]);
        assert_eq!(ours["backing-filename"], name);
        std::fs::remove_file(&image).unwrap();
    }
}

/// Images patched into states qemu-img cannot create but still opens:
/// both must still agree.
#[test]
fn patched_images_agree() {
    /// Offset of the first snapshot table entry.
    fn snap(p: &Path) -> u64 {
        be64(p, 64)
    }
    /// Offset of the bitmaps extension's data.
    fn bitmaps_ext(p: &Path) -> u64 {
        let mut at = u64::from(be32(p, 100));
        while be32(p, at) != 0x2385_2875 {
            at += 8 + u64::from(be32(p, at + 4)).next_multiple_of(8);
        }
        at + 8
    }
    /// Offset of the bitmap directory.
    fn bitmap_dir(p: &Path) -> u64 {
        be64(p, bitmaps_ext(p) + 16)
    }
    #[allow(clippy::type_complexity)]
    let cases: &[(&str, fn(&Path), &[&str])] = &[
        (
            "snapshot vm_state_size_large",
            |p| patch(p, snap(p) + 40, &12345u64.to_be_bytes()),
            &[],
        ),
        (
            "snapshot vm_state_size 32-bit",
            |p| patch(p, snap(p) + 32, &777u32.to_be_bytes()),
            &[],
        ),
        (
            "snapshot vm_clock",
            |p| patch(p, snap(p) + 24, &3_500_000_001u64.to_be_bytes()),
            &[],
        ),
        (
            "snapshot icount 42",
            |p| patch(p, snap(p) + 56, &42u64.to_be_bytes()),
            &[],
        ),
        (
            "snapshot icount -1",
            |p| patch(p, snap(p) + 56, &u64::MAX.to_be_bytes()),
            &[],
        ),
        ("corrupt bit", |p| patch(p, 79, &[2]), &[]),
        (
            "dirty bit without lazy refcounts",
            |p| patch(p, 79, &[1]),
            &[],
        ),
        ("unknown autoclear bit", |p| patch(p, 95, &[0x81]), &[]),
        // QEMU ignores the contents of a stale bitmaps extension.
        (
            "stale bitmaps extension with invalid fields",
            |p| {
                patch(p, 95, &[0]);
                let e = bitmaps_ext(p);
                patch(p, e, &[0; 8]); // nb_bitmaps 0, reserved 0
                patch(p, e + 4, &[1]); // reserved 0x01000000
                patch(p, e + 8, &u64::MAX.to_be_bytes()); // directory size
                patch(p, e + 16, &7u64.to_be_bytes()); // unaligned directory
            },
            &[],
        ),
        ("stale bitmaps", |p| patch(p, 95, &[0]), &[]),
        ("bitmap in use", |p| patch(p, bitmap_dir(p) + 15, &[3]), &[]),
        (
            "header_length 104",
            |p| patch(p, 100, &104u32.to_be_bytes()),
            &[],
        ),
        (
            "virtual size 1 MiB + 1",
            |p| patch(p, 24, &((1u64 << 20) + 1).to_be_bytes()),
            &[],
        ),
        (
            "virtual size 1 MiB - 1",
            |p| patch(p, 24, &((1u64 << 20) - 1).to_be_bytes()),
            &[],
        ),
    ];
    let dir = tmpdir();
    let base = create(dir.path(), "base.qcow2", "cluster_size=4k", "1M");
    qemu_io(&base, &["write -P 0xaa 0 64k"]);
    qemu_img(&["snapshot", "-c", "s", base.to_str().unwrap()]);
    qemu_img(&["bitmap", "--add", base.to_str().unwrap(), "bm"]);
    qemu_io(&base, &["write -P 0xbb 0 4k"]);
    assert_eq!(
        be32(&base, snap(&base) + 36),
        24,
        "expected 24 bytes of snapshot extra data"
    );
    for (n, (name, f, allow)) in cases.iter().enumerate() {
        let image = copy(&base, dir.path(), &format!("p{n}.qcow2"));
        f(&image);
        let v = assert_info_agrees(&image, allow);
        assert!(v.get("error").is_none(), "{name}: {v}");
        assert_eq!(
            v.get("bitmaps-stale").is_some(),
            name.starts_with("stale"),
            "{name}: {v}"
        );
    }
}

/// Backing names QEMU does not treat as a backing file: an empty name, and
/// a backing format extension without a name.
#[test]
fn no_backing_file_after_all() {
    let dir = tmpdir();
    let d = dir.path();
    create(d, "base.qcow2", "", "1M");
    let top = create(
        d,
        "top.qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "1M",
    );
    patch(&top, 16, &0u32.to_be_bytes());
    let v = assert_info_agrees(&top, &["--allow-backing"]);
    assert!(v.get("backing-filename").is_none(), "{v}");
    // An empty name can open nothing: like QEMU, the policy sees no backing
    // file, and the default policy accepts the image.
    let out = guard(&["info", "--json", top.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));

    let plain = create(d, "plain.qcow2", "", "1M");
    // A backing format record in place of the feature name table.
    let mut rec = Vec::new();
    rec.extend_from_slice(&0xE279_2ACAu32.to_be_bytes());
    rec.extend_from_slice(&5u32.to_be_bytes());
    rec.extend_from_slice(b"qcow2\0\0\0");
    rec.extend_from_slice(&[0; 8]);
    patch(&plain, 112, &rec);
    let v = assert_info_agrees(&plain, &[]);
    assert!(v.get("backing-filename-format").is_none(), "{v}");
}
