//! `qcow2-guard check`: a catalogue of images, what was done to them, and
//! what must come out. Images are made by qemu-img / qemu-io at test time;
//! `qemu-img check` is the differential oracle.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

// ---------------------------------------------------------------- helpers

/// Run `qcow2-guard check --json` with extra flags: (exit code, JSON).
fn guard_check(p: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["check", "--json"];
    args.extend_from_slice(extra);
    args.push(s(p));
    let out = guard(&args);
    let v = json(&out);
    let c = code(&out);
    assert_eq!(v["exit-code"].as_i64(), Some(i64::from(c)), "{v:#}");
    if extra.is_empty() {
        let name = p
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        export(
            p,
            &format!("{name} ({})", v["verdict"].as_str().unwrap_or("")),
        );
    }
    // Every image of this catalogue, also inspected as a stream.
    assert_streams_like(p, extra, &v);
    (c, v)
}

/// `qemu-img check` exit code (0 clean, 2 corrupt, 3 leaks).
fn qemu_check(p: &Path) -> i32 {
    qemu_img_status(&["check", "-f", "qcow2", s(p)])
        .status
        .code()
        .expect("qemu-img check exit code")
}

fn has(v: &Value, code: &str) -> bool {
    v["finding-counts"].get(code).is_some()
}

fn assert_has(v: &Value, code: &str) {
    assert!(has(v, code), "expected finding {code}: {v:#}");
}

fn cluster_size(p: &Path) -> u64 {
    1 << be32(p, 20)
}

fn l1_offset(p: &Path) -> u64 {
    be64(p, 40)
}

fn l2_offset(p: &Path, l1_index: u64) -> u64 {
    be64(p, l1_offset(p) + 8 * l1_index) & OFFSET_MASK
}

fn l2_entry_at(p: &Path, l1_index: u64, index: u64) -> u64 {
    let per = if extended_l2(p) { 16 } else { 8 };
    l2_offset(p, l1_index) + per * index
}

fn extended_l2(p: &Path) -> bool {
    be32(p, 4) >= 3 && be64(p, 72) & (1 << 4) != 0
}

fn refcount_bits(p: &Path) -> u64 {
    if be32(p, 4) >= 3 {
        1 << be32(p, 96)
    } else {
        16
    }
}

/// File offset of the 16-bit refcount of host cluster `c`.
fn refcount_at(p: &Path, c: u64) -> u64 {
    assert_eq!(refcount_bits(p), 16, "helper handles 16-bit refcounts");
    let cs = cluster_size(p);
    let per = cs / 2;
    let rt = be64(p, 48);
    let block = be64(p, rt + 8 * (c / per));
    assert_ne!(block, 0, "cluster {c} has no refcount block");
    block + 2 * (c % per)
}

fn set_refcount(p: &Path, c: u64, v: u16) {
    patch(p, refcount_at(p, c), &v.to_be_bytes());
}

fn put64(p: &Path, at: u64, v: u64) {
    patch(p, at, &v.to_be_bytes());
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").len()
}

fn set_len(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open")
        .set_len(len)
        .expect("set_len");
}

/// Raw deflate (4 KiB window, as QEMU writes) of `n` zero bytes.
fn deflate_zeros(n: usize) -> Vec<u8> {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import sys,zlib; c=zlib.compressobj(9, zlib.DEFLATED, -12); \
                 sys.stdout.buffer.write(c.compress(bytes({n})) + c.flush())"
            ),
        ])
        .output()
        .expect("python3");
    assert!(out.status.success());
    out.stdout
}

/// A 64 KiB-cluster, 1 GiB image (two L1 entries) with three data
/// clusters at guest 0: L1[1] and L2 entries from 3 on are free.
fn base(dir: &Path, name: &str) -> PathBuf {
    let p = create(dir, name, "cluster_size=65536", "1G");
    qemu_io(&p, &["write -P 0xaa 0 192k"]);
    p
}

/// A 64 KiB-cluster image converted with -c from text (every cluster
/// compressed); returns it and the first compressed L2 entry's offset.
fn compressed_image(dir: &Path, name: &str) -> (PathBuf, u64) {
    let raw = dir.join(format!("{name}.raw"));
    let text: Vec<u8> = b"qcow2-guard test pattern "
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    std::fs::write(&raw, text).expect("write raw");
    let p = dir.join(name);
    compress(&raw, &p, "cluster_size=65536");
    let at = l2_entry_at(&p, 0, 0);
    assert_eq!(be64(&p, at) >> 62, 1, "entry 0 is compressed");
    (p, at)
}

/// Host offset of the compressed entry at `at` (64 KiB clusters).
fn compressed_host(p: &Path, at: u64) -> u64 {
    let bits = be32(p, 20);
    let shift = 62 - (bits - 8);
    be64(p, at) & ((1u64 << shift) - 1)
}

// ------------------------------------------------------------- the matrix

/// Make an image of the matrix, check that qemu-img calls it clean, that
/// we do too (exit 0, verdict ok), and that our statistics equal qemu-img's.
fn matrix(name: &str, opts: &str, compress: bool, steps: &[&[&str]]) {
    let dir = tmpdir();
    let raw = dir.path().join("src.raw");
    write_raw(&raw, 2 << 20, 7);
    let p = dir.path().join(name);
    let mut args = vec!["convert", "-O", "qcow2", "-o", opts];
    if compress {
        args.push("-c");
    }
    args.extend([s(&raw), s(&p)]);
    qemu_img(&args);
    for step in steps {
        match step.first() {
            Some(&"resize") => {
                qemu_img(&["resize", "-q", "-f", "qcow2", s(&p), step[1]]);
            }
            Some(&"snapshot") => {
                qemu_img(&["snapshot", "-c", step[1], s(&p)]);
            }
            Some(&"bitmap") => {
                // `qemu-img bitmap OPTS FILE NAME`: the step lists the
                // options and the bitmap name.
                let opts: Vec<&str> = step[1..]
                    .iter()
                    .copied()
                    .filter(|x| x.starts_with('-'))
                    .collect();
                let name = step[1..]
                    .iter()
                    .copied()
                    .find(|x| !x.starts_with('-'))
                    .unwrap();
                let mut a = vec!["bitmap"];
                a.extend(opts);
                a.push(s(&p));
                a.push(name);
                qemu_img(&a);
            }
            _ => qemu_io(&p, step),
        }
    }
    let q = qemu_img(&["check", "--output=json", s(&p)]);
    let qv: Value = serde_json::from_slice(&q.stdout).expect("qemu-img check json");
    let (c, v) = guard_check(&p, &[]);
    assert_eq!((c, v["verdict"].as_str()), (0, Some("ok")), "{name}: {v:#}");
    for f in v["findings"].as_array().unwrap() {
        assert_ne!(f["severity"], "error", "{name}: {f}");
    }
    let st = &v["stats"];
    for key in [
        "allocated-clusters",
        "compressed-clusters",
        "fragmented-clusters",
        "image-end-offset",
        "total-clusters",
    ] {
        assert_eq!(
            st[key].as_u64(),
            qv[key].as_u64().or(Some(0)),
            "{name}: {key}: ours {st:#} qemu {qv:#}"
        );
    }
    if compress {
        assert!(st["decompressed-clusters"].as_u64().unwrap() > 0, "{name}");
    }
    // Metadata only agrees.
    let (c, _) = guard_check(&p, &["--metadata-only"]);
    assert_eq!(c, 0, "{name} --metadata-only");
}

#[test]
fn matrix_512_compat_0_10_zlib_snapshots() {
    matrix(
        "m512.qcow2",
        "cluster_size=512,compat=0.10",
        true,
        &[
            &["snapshot", "s1"],
            &["write -P 0x11 64k 8k"],
            &["snapshot", "s2"],
        ],
    );
}

#[test]
fn matrix_4k_refcount_bits_1_zlib() {
    matrix("m4k.qcow2", "cluster_size=4096,refcount_bits=1", true, &[]);
}

#[test]
fn matrix_4k_compat_0_10_snapshot() {
    matrix(
        "m4k-v2.qcow2",
        "cluster_size=4096,compat=0.10",
        true,
        &[&["snapshot", "s1"], &["write -P 0x22 0 16k"]],
    );
}

#[test]
fn matrix_64k_refcount_bits_64_zstd_snapshots() {
    matrix(
        "m64k.qcow2",
        "cluster_size=65536,refcount_bits=64,compression_type=zstd",
        true,
        &[
            &["resize", "8M"],
            &["snapshot", "s1"],
            &["write -P 0x33 0 128k", "write -c -P 0x44 4M 64k"],
        ],
    );
}

#[test]
fn matrix_2m_clusters_zlib() {
    matrix("m2m.qcow2", "cluster_size=2M", true, &[]);
}

#[test]
fn matrix_extended_l2_subclusters() {
    matrix(
        "mext.qcow2",
        "cluster_size=65536,extended_l2=on",
        false,
        &[
            &["resize", "8M"],
            &[
                "write -P 0x55 3145728 4096",
                "write -z 3153920 8192",
                "write -c -P 0x66 4M 64k",
                "discard 64k 64k",
                "write -P 0x77 5244928 2048",
            ],
        ],
    );
}

#[test]
fn matrix_lazy_refcounts() {
    matrix(
        "mlazy.qcow2",
        "lazy_refcounts=on",
        false,
        &[&["write -P 0x12 0 256k", "write -z 1M 64k"]],
    );
}

#[test]
fn matrix_bitmaps() {
    matrix(
        "mbm.qcow2",
        "cluster_size=65536",
        false,
        &[
            &["bitmap", "--add", "b1"],
            &["bitmap", "--add", "--disable", "b2"],
            &["write -P 0x13 0 1M"],
        ],
    );
}

#[test]
fn matrix_zstd_extended_l2_snapshots_bitmaps() {
    matrix(
        "mall.qcow2",
        "cluster_size=16384,extended_l2=on,compression_type=zstd,refcount_bits=16",
        true,
        &[
            &["resize", "8M"],
            &["snapshot", "s1"],
            &["bitmap", "--add", "b1"],
            &["write -P 0x14 0 20k", "write -c -P 0x15 4M 16k"],
            &["snapshot", "s2"],
        ],
    );
}

/// A compressed write at the end of the file leaves the last sector of its
/// range cut by the end of the file: QEMU's own doing, checked by payload.
#[test]
fn compressed_write_at_end_of_file_is_clean() {
    let dir = tmpdir();
    let p = create(dir.path(), "tail.qcow2", "", "4M");
    qemu_io(&p, &["write -P 1 0 64k", "write -c -P 0x11 1M 64k"]);
    assert_eq!(qemu_check(&p), 0);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 0, "{v:#}");
    assert_has(&v, "compressed_tail_past_eof");
}

/// A subcluster write allocates a cluster but QEMU extends the file only
/// to the end of the subcluster.
#[test]
fn extended_l2_subcluster_write_at_end_of_file_is_clean() {
    let dir = tmpdir();
    let p = create(dir.path(), "sub.qcow2", "extended_l2=on", "8M");
    qemu_io(&p, &["write -z 2M 2k", "write -P 3 3M 2k"]);
    assert_ne!(file_len(&p) % cluster_size(&p), 0, "file ends mid-cluster");
    assert_eq!(qemu_check(&p), 0);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 0, "{v:#}");
    // Allocating the last subcluster too reaches past the end of the file.
    let at = l2_entry_at(&p, 0, 3 * 16) + 8;
    put64(&p, at, be64(&p, at) | 1 << 31);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "past_eof");
}

// ------------------------------------ differential: qemu-img says corrupt

/// qemu-img and we both report corruption.
fn both_corrupt(p: &Path, code: &str) -> Value {
    assert_eq!(qemu_check(p), 2, "qemu-img check should report corruption");
    let (c, v) = guard_check(p, &[]);
    assert_eq!((c, v["verdict"].as_str()), (2, Some("corrupt")), "{v:#}");
    assert_has(&v, code);
    v
}

#[test]
fn refcounts_zeroed() {
    let dir = tmpdir();
    let p = base(dir.path(), "rc0.qcow2");
    let cs = cluster_size(&p);
    let data = be64(&p, l2_entry_at(&p, 0, 1)) & OFFSET_MASK;
    set_refcount(&p, data / cs, 0);
    let v = both_corrupt(&p, "refcount_too_low");
    assert_has(&v, "copied_flag_mismatch");
}

#[test]
fn all_refcounts_of_a_block_zeroed() {
    let dir = tmpdir();
    let p = base(dir.path(), "rcall.qcow2");
    let block = be64(&p, be64(&p, 48));
    patch(&p, block, &vec![0u8; cluster_size(&p) as usize]);
    let v = both_corrupt(&p, "refcount_too_low");
    assert!(v["stats"]["corruptions"].as_u64().unwrap() >= 6, "{v:#}");
}

#[test]
fn l2_entry_into_l1_table() {
    let dir = tmpdir();
    let p = base(dir.path(), "l2l1.qcow2");
    put64(&p, l2_entry_at(&p, 0, 5), l1_offset(&p) | COPIED);
    let v = both_corrupt(&p, "data_overlaps_metadata");
    assert_has(&v, "refcount_too_low");
}

#[test]
fn one_l2_table_shared_by_several_l1_entries() {
    let dir = tmpdir();
    let p = base(dir.path(), "shared.qcow2");
    let l1 = l1_offset(&p);
    put64(&p, l1 + 8, be64(&p, l1));
    let v = both_corrupt(&p, "refcount_too_low");
    assert_has(&v, "l2_table_shared");
}

#[test]
fn l1_entry_into_refcount_table() {
    let dir = tmpdir();
    let p = base(dir.path(), "l1rt.qcow2");
    put64(&p, l1_offset(&p) + 8, be64(&p, 48) | COPIED);
    both_corrupt(&p, "metadata_overlap");
}

#[test]
fn refcount_block_past_end_of_file() {
    let dir = tmpdir();
    let p = base(dir.path(), "rbeof.qcow2");
    put64(&p, be64(&p, 48) + 8, 1 << 40);
    let v = both_corrupt(&p, "past_eof");
    assert!(v["findings"][0]["message"]
        .as_str()
        .unwrap()
        .contains("refcount block"));
}

#[test]
fn l2_table_past_end_of_file() {
    let dir = tmpdir();
    let p = base(dir.path(), "l2eof.qcow2");
    put64(&p, l1_offset(&p) + 8, COPIED | 1 << 40);
    both_corrupt(&p, "past_eof");
}

#[test]
fn refcount_block_unaligned() {
    let dir = tmpdir();
    let p = base(dir.path(), "rbal.qcow2");
    put64(&p, be64(&p, 48) + 8, 0x50200);
    both_corrupt(&p, "unaligned");
}

#[test]
fn copied_flag_cleared() {
    let dir = tmpdir();
    let p = base(dir.path(), "copied.qcow2");
    let at = l2_entry_at(&p, 0, 0);
    put64(&p, at, be64(&p, at) & !COPIED);
    let v = both_corrupt(&p, "copied_flag_mismatch");
    assert_eq!(v["finding-counts"].as_object().unwrap().len(), 1, "{v:#}");
}

#[test]
fn data_cluster_past_end_of_file() {
    let dir = tmpdir();
    let p = base(dir.path(), "dataeof.qcow2");
    let cs = cluster_size(&p);
    let far = (file_len(&p).div_ceil(cs) + 10) * cs;
    put64(&p, l2_entry_at(&p, 0, 5), far | COPIED);
    both_corrupt(&p, "past_eof");
}

#[test]
fn referenced_cluster_beyond_refcount_table() {
    let dir = tmpdir();
    let p = create(
        dir.path(),
        "beyond.qcow2",
        "cluster_size=512,refcount_bits=64",
        "1M",
    );
    qemu_io(&p, &["write -P 1 0 4k"]);
    let cs = cluster_size(&p);
    let covered = u64::from(be32(&p, 56)) * cs / 8 * (cs * 8 / 64);
    assert!(covered * cs <= 64 << 20, "coverage {covered} clusters");
    set_len(&p, (covered + 1) * cs);
    put64(&p, l2_entry_at(&p, 0, 20), (covered * cs) | COPIED);
    assert_eq!(qemu_check(&p), 2);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "refcount_beyond_table");
}

// ------------------------------------- differential: qemu-img says leaks

#[test]
fn leaked_clusters() {
    let dir = tmpdir();
    let p = base(dir.path(), "leak.qcow2");
    let cs = cluster_size(&p);
    let end = file_len(&p).div_ceil(cs);
    set_len(&p, (end + 2) * cs);
    set_refcount(&p, end, 1);
    set_refcount(&p, end + 1, 1);
    assert_eq!(qemu_check(&p), 3);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!((c, v["verdict"].as_str()), (3, Some("leaks")), "{v:#}");
    assert_eq!(v["finding-counts"]["leaked_cluster"], 2);
    assert_eq!(v["stats"]["leaks"], 2);
}

/// Deliberate divergence: a dirty lazy-refcounts image has stale
/// refcounts by design, which QEMU rebuilds on its next read-write open;
/// qemu-img check (which opens without repairing) says corrupt, we say
/// "leaks" (exit 3: repairable) and keep the findings as warnings.
#[test]
fn dirty_lazy_refcount_errors_are_repairable() {
    let dir = tmpdir();
    let p = create(dir.path(), "dirty.qcow2", "lazy_refcounts=on", "16M");
    qemu_io(&p, &["write -P 1 0 128k"]);
    let inc = be64(&p, 72);
    put64(&p, 72, inc | 1);
    let cs = cluster_size(&p);
    let data = be64(&p, l2_entry_at(&p, 0, 0)) & OFFSET_MASK;
    set_refcount(&p, data / cs, 0);
    assert_eq!(qemu_check(&p), 2);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!((c, v["verdict"].as_str()), (3, Some("leaks")), "{v:#}");
    assert_has(&v, "refcount_too_low");
    assert_has(&v, "dirty_bit");
}

// ----------------------------- stricter than qemu-img: it says clean

#[test]
fn compressed_garbage() {
    let dir = tmpdir();
    let (p, at) = compressed_image(dir.path(), "garbage.qcow2");
    patch(&p, compressed_host(&p, at), &[0xff; 48]);
    assert_eq!(qemu_check(&p), 0);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "decompress_failed");
    let (c, _) = guard_check(&p, &["--metadata-only"]);
    assert_eq!(c, 0);
}

#[test]
fn compressed_short_stream() {
    let dir = tmpdir();
    let (p, at) = compressed_image(dir.path(), "short.qcow2");
    patch(&p, compressed_host(&p, at), &deflate_zeros(1000));
    assert_eq!(qemu_check(&p), 0);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "decompress_failed");
}

#[test]
fn compressed_inflation_bomb() {
    let dir = tmpdir();
    let (p, at) = compressed_image(dir.path(), "bomb.qcow2");
    let bomb = deflate_zeros(4 << 20);
    let host = compressed_host(&p, at);
    // Give the stream room: one more sector than the stream needs.
    let sectors = (host % 512 + bomb.len() as u64).div_ceil(512);
    let shift = 62 - (16 - 8);
    put64(&p, at, COMPRESSED | (sectors - 1) << shift | host);
    patch(&p, host, &bomb);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    let f = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "decompress_failed")
        .unwrap_or_else(|| panic!("{v:#}"));
    assert!(f["message"].as_str().unwrap().contains("past one cluster"));
}

#[test]
fn compressed_descriptor_inflation() {
    let dir = tmpdir();
    let (p, at) = compressed_image(dir.path(), "infl.qcow2");
    let host = compressed_host(&p, at);
    let shift = 62 - (16 - 8);
    put64(&p, at, COMPRESSED | 255 << shift | host);
    let (c, v) = guard_check(&p, &["--metadata-only"]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "compressed_inflation");
}

#[test]
fn compressed_range_past_end_of_file() {
    let dir = tmpdir();
    let raw = dir.path().join("half.raw");
    // Half random, half zeros: compresses to about half a cluster.
    write_raw(&raw, 64 << 10, 3);
    let mut bytes = std::fs::read(&raw).unwrap();
    for (i, b) in bytes.iter_mut().enumerate() {
        if i >= 24 << 10 {
            *b = 0;
        } else if i % 4096 < 512 {
            *b = (i * 7 % 251) as u8;
        }
    }
    std::fs::write(&raw, bytes).unwrap();
    let p = dir.path().join("eof.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&raw), s(&p)]);
    let at = l2_entry_at(&p, 0, 0);
    assert_eq!(be64(&p, at) >> 62, 1);
    let len = file_len(&p);
    set_len(&p, len - 1024);
    assert_eq!(qemu_check(&p), 0);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "compressed_past_eof");
}

#[test]
fn data_cluster_in_l1_table_with_consistent_refcounts() {
    let dir = tmpdir();
    let p = base(dir.path(), "ovl.qcow2");
    let cs = cluster_size(&p);
    let l1 = l1_offset(&p);
    put64(&p, l2_entry_at(&p, 0, 7), l1);
    set_refcount(&p, l1 / cs, 2);
    assert_eq!(qemu_check(&p), 0);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "data_overlaps_metadata");
}

#[test]
fn backing_file_refused_by_default() {
    let dir = tmpdir();
    let base = create(dir.path(), "base.qcow2", "", "4M");
    let p = overlay(dir.path(), "overlay.qcow2", &base, "qcow2");
    qemu_io(&p, &["write -P 1 0 64k"]);
    assert_eq!(qemu_check(&p), 0);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!((c, v["verdict"].as_str()), (4, Some("unsafe")), "{v:#}");
    assert_has(&v, "policy_backing_file");
    let (c, _) = guard_check(&p, &["--allow-backing"]);
    assert_eq!(c, 0);
}

#[test]
fn data_file_refused_by_default() {
    let dir = tmpdir();
    let p = create(
        dir.path(),
        "df.qcow2",
        &format!("data_file={}", s(&dir.path().join("df.raw"))),
        "4M",
    );
    qemu_io(&p, &["write -P 1 0 128k"]);
    assert_eq!(qemu_check(&p), 0);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 4, "{v:#}");
    assert_has(&v, "policy_external_data_file");
    let (c, v) = guard_check(&p, &["--allow-data-file"]);
    assert_eq!(c, 0, "{v:#}");
}

#[test]
fn encryption_refused_by_default() {
    let dir = tmpdir();
    let p = create_encrypted(
        dir.path(),
        "luks.qcow2",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        "4M",
    );
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 4, "{v:#}");
    assert_has(&v, "policy_encryption");
    let (c, v) = guard_check(&p, &["--allow-encryption"]);
    assert_eq!(c, 0, "{v:#}");
}

#[test]
fn virtual_size_over_the_maximum() {
    let dir = tmpdir();
    let p = create(dir.path(), "big.qcow2", "", "16M");
    let (c, v) = guard_check(&p, &["--max-virtual-size", "1M"]);
    assert_eq!(c, 4, "{v:#}");
    assert_has(&v, "policy_virtual_size");
    assert_eq!(guard_check(&p, &["--max-virtual-size", "16M"]).0, 0);
}

#[test]
fn header_feature_bits() {
    let dir = tmpdir();
    let p = base(dir.path(), "bits.qcow2");
    let (inc, auto) = (be64(&p, 72), be64(&p, 88));
    // (field, bit, exit code, finding)
    for (field, bit, exit, code) in [
        (72, 1 << 1, 4, "policy_corrupt_bit"),
        (72, 1 << 7, 4, "policy_unknown_incompatible_features"),
        (88, 1 << 5, 0, "unknown_autoclear_features"),
    ] {
        put64(&p, 72, inc);
        put64(&p, 88, auto);
        put64(&p, field, be64(&p, field) | bit);
        let (c, v) = guard_check(&p, &[]);
        assert_eq!(c, exit, "{code}: {v:#}");
        assert_has(&v, code);
    }
}

/// Corrupt wins over unsafe (exit 2), and both findings are listed.
#[test]
fn corrupt_and_unsafe() {
    let dir = tmpdir();
    let base = create(dir.path(), "base.qcow2", "", "4M");
    let p = overlay(dir.path(), "overlay.qcow2", &base, "qcow2");
    qemu_io(&p, &["write -P 1 0 64k"]);
    let cs = cluster_size(&p);
    let data = be64(&p, l2_entry_at(&p, 0, 0)) & OFFSET_MASK;
    set_refcount(&p, data / cs, 0);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!((c, v["verdict"].as_str()), (2, Some("corrupt")), "{v:#}");
    assert_has(&v, "policy_backing_file");
    assert_has(&v, "refcount_too_low");
}

// ----------------------------------------------- entries and structures

#[test]
fn l2_entry_reserved_bits() {
    let dir = tmpdir();
    let p = base(dir.path(), "resv.qcow2");
    let at = l2_entry_at(&p, 0, 1);
    put64(&p, at, be64(&p, at) | 2);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "reserved_bits");
    // The rest of the table is still audited: the skipped entry's cluster
    // is unreferenced now.
    assert_has(&v, "leaked_cluster");
}

#[test]
fn l2_entry_unaligned() {
    let dir = tmpdir();
    let p = base(dir.path(), "unal.qcow2");
    let at = l2_entry_at(&p, 0, 1);
    put64(&p, at, be64(&p, at) | 0x200);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "unaligned");
}

#[test]
fn extended_l2_allocated_and_zero() {
    let dir = tmpdir();
    let p = create(dir.path(), "ext.qcow2", "extended_l2=on", "4M");
    qemu_io(&p, &["write -P 1 0 64k"]);
    let at = l2_entry_at(&p, 0, 0) + 8;
    put64(&p, at, 0x0000_0001_ffff_ffff);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "invalid_subcluster_bitmap");
}

#[test]
fn compressed_entry_with_copied_flag() {
    let dir = tmpdir();
    let (p, at) = compressed_image(dir.path(), "ccopied.qcow2");
    put64(&p, at, be64(&p, at) | COPIED);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "invalid_compressed_entry");
}

#[test]
fn compressed_offset_above_bit_55() {
    let dir = tmpdir();
    let raw = dir.path().join("t.raw");
    std::fs::write(&raw, b"qcow2-guard ".repeat(400)).unwrap();
    let p = dir.path().join("c512.qcow2");
    compress(&raw, &p, "cluster_size=512");
    let at = l2_entry_at(&p, 0, 0);
    assert_eq!(be64(&p, at) >> 62, 1);
    put64(&p, at, be64(&p, at) | 1 << 58);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "compressed_offset_too_high");
}

#[test]
fn zero_flag_in_version_2_image() {
    let dir = tmpdir();
    let p = create(dir.path(), "v2.qcow2", "compat=0.10", "4M");
    qemu_io(&p, &["write -P 1 0 64k"]);
    let at = l2_entry_at(&p, 0, 0);
    put64(&p, at, be64(&p, at) | 1);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "zero_flag_in_v2");
}

/// Offsets of the snapshot table entries.
fn snapshot_entries(p: &Path) -> Vec<u64> {
    let mut at = be64(p, 64);
    let mut out = Vec::new();
    for _ in 0..be32(p, 60) {
        out.push(at);
        let id = u64::from(u16::from_be_bytes(peek::<2>(p, at + 12)));
        let name = u64::from(u16::from_be_bytes(peek::<2>(p, at + 14)));
        let extra = u64::from(be32(p, at + 36));
        at += (40 + extra + id + name).div_ceil(8) * 8;
    }
    out
}

#[test]
fn duplicate_snapshot_ids() {
    let dir = tmpdir();
    let p = create(dir.path(), "snap.qcow2", "", "4M");
    qemu_io(&p, &["write -P 1 0 64k"]);
    qemu_img(&["snapshot", "-c", "one", s(&p)]);
    qemu_img(&["snapshot", "-c", "two", s(&p)]);
    let e = snapshot_entries(&p);
    let id0 = peek::<1>(&p, e[0] + 40 + u64::from(be32(&p, e[0] + 36)));
    patch(&p, e[1] + 40 + u64::from(be32(&p, e[1] + 36)), &id0);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "duplicate_snapshot_id");
}

#[test]
fn snapshot_l1_table_too_small() {
    let dir = tmpdir();
    let p = create(dir.path(), "snapl1.qcow2", "cluster_size=4096", "64M");
    qemu_io(&p, &["write -P 1 0 64k"]);
    qemu_img(&["snapshot", "-c", "one", s(&p)]);
    let e = snapshot_entries(&p);
    patch(&p, e[0] + 8, &1u32.to_be_bytes());
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2, "{v:#}");
    assert_has(&v, "snapshot_l1_too_small");
}

fn bitmap_image(dir: &Path) -> PathBuf {
    let p = create(dir, "bm.qcow2", "", "4M");
    qemu_img(&["bitmap", "--add", s(&p), "b1"]);
    qemu_io(&p, &["write -P 1 0 1M"]);
    p
}

#[test]
fn bitmap_in_use() {
    let dir = tmpdir();
    let p = bitmap_image(dir.path());
    // Bitmaps extension: after the header, find its directory offset.
    let mut at = u64::from(be32(&p, 100));
    while be32(&p, at) != 0x2385_2875 {
        at += 8 + u64::from(be32(&p, at + 4)).div_ceil(8) * 8;
    }
    let dir_off = be64(&p, at + 8 + 16);
    let flags = be32(&p, dir_off + 12);
    patch(&p, dir_off + 12, &(flags | 1).to_be_bytes());
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 0, "{v:#}");
    assert_has(&v, "bitmap_in_use");
}

#[test]
fn stale_bitmaps_extension() {
    let dir = tmpdir();
    let p = bitmap_image(dir.path());
    put64(&p, 88, be64(&p, 88) & !1);
    let (c, v) = guard_check(&p, &[]);
    assert_has(&v, "stale_bitmaps");
    // Its clusters are no longer metadata: leaked, as far as refcounts go.
    assert_eq!(c, 3, "{v:#}");
    assert_has(&v, "leaked_cluster");
}

// ----------------------------------------------- opening, caps, the API

#[test]
fn not_qcow2_is_not_checked() {
    let dir = tmpdir();
    let p = dir.path().join("raw.img");
    std::fs::write(&p, vec![0u8; 4096]).unwrap();
    let (c, v) = guard_check(&p, &[]);
    assert_eq!((c, v["verdict"].as_str()), (1, Some("invalid")), "{v:#}");
    assert_has(&v, "bad_magic");
}

/// `qemu-img check --output=json` of `p`: (exit code, JSON).
fn qemu_check_json(p: &Path) -> (i32, Value) {
    let out = qemu_img_status(&["check", "-f", "qcow2", "--output=json", s(p)]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().expect("qemu-img check exit code"), v)
}

/// A sparse file far longer than what it holds (8 TiB of 64 KiB clusters:
/// 128 Mi host clusters, twice what the check once tracked by file
/// length): checked clean, like `qemu-img check` does, with its numbers.
/// Not streamed (8 TiB through a pipe) nor exported.
#[test]
fn sparse_file_of_terabytes_checks() {
    let dir = tmpdir();
    let p = create(dir.path(), "sparse.qcow2", "cluster_size=65536", "1G");
    qemu_io(&p, &["write -P 7 0 1M", "write -P 9 512M 64k"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(8 << 40)
        .unwrap();
    let (qc, q) = qemu_check_json(&p);
    assert_eq!(qc, 0, "{q:#}");
    for extra in [&[][..], &["--metadata-only"]] {
        let mut args = vec!["check", "--json"];
        args.extend_from_slice(extra);
        args.push(s(&p));
        let out = guard(&args);
        let v = json(&out);
        assert_eq!(
            (code(&out), v["verdict"].as_str()),
            (0, Some("ok")),
            "{v:#}"
        );
        assert_eq!(v["stats"]["host-clusters"], 2u64 << 26);
        for k in ["image-end-offset", "allocated-clusters", "total-clusters"] {
            assert_eq!(v["stats"][k], q[k], "{k}: {v:#} vs {q:#}");
        }
    }
}

/// QEMU refuses to check a file of more than `INT_MAX` clusters ("File
/// too large"), so it cannot be called clean: refused too, before any
/// table is read, whatever the tables hold.
#[test]
fn file_of_more_clusters_than_qemu_checks_is_refused() {
    let dir = tmpdir();
    let p = create(dir.path(), "huge.qcow2", "cluster_size=512", "64M");
    qemu_io(&p, &["write -P 7 0 64k"]);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(512 << 31).unwrap();
    let out = qemu_img_status(&["check", "-f", "qcow2", s(&p)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("File too large"));
    let out = guard(&["check", "--json", s(&p)]);
    let v = json(&out);
    assert_eq!(
        (code(&out), v["verdict"].as_str()),
        (1, Some("invalid")),
        "{v:#}"
    );
    assert_has(&v, "too_large_to_check");
    // One cluster less: QEMU checks it (slowly: 30 s, 4 GiB); so do we.
    f.set_len((512 << 31) - 512).unwrap();
    let out = guard(&["check", "--json", s(&p)]);
    let v = json(&out);
    assert_eq!(
        (code(&out), v["verdict"].as_str()),
        (0, Some("ok")),
        "{v:#}"
    );
}

#[test]
fn l1_table_past_end_of_file_is_invalid() {
    let dir = tmpdir();
    let p = base(dir.path(), "l1eof.qcow2");
    put64(&p, 40, 1 << 40);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!((c, v["verdict"].as_str()), (2, Some("invalid")), "{v:#}");
    assert_has(&v, "past_eof");
    assert!(v.get("stats").is_none());
}

#[test]
fn findings_are_capped_but_counted() {
    let dir = tmpdir();
    let p = base(dir.path(), "many.qcow2");
    let l2 = l2_offset(&p, 0);
    // 8192 L2 entries with reserved bits: one finding each.
    let bad: Vec<u8> = (0..8192u64).flat_map(|_| 2u64.to_be_bytes()).collect();
    patch(&p, l2, &bad);
    let (c, v) = guard_check(&p, &[]);
    assert_eq!(c, 2);
    assert_eq!(v["finding-counts"]["reserved_bits"], 8192);
    assert_eq!(v["findings"].as_array().unwrap().len(), 1000);
    assert!(v["findings-omitted"].as_u64().unwrap() > 7000);
}

#[test]
fn human_output_like_qemu_img() {
    let dir = tmpdir();
    let p = base(dir.path(), "human.qcow2");
    let out = guard(&["check", s(&p)]);
    assert_eq!(code(&out), 0);
    let text = String::from_utf8_lossy(&out.stdout);
    let q = qemu_img(&["check", s(&p)]);
    assert_eq!(text, String::from_utf8_lossy(&q.stdout));
}

mod library {
    use super::*;
    use qcow2_guard::check::{check, check_metadata, CheckOptions, Verdict};
    use qcow2_guard::{FileSource, Image, Limits, Policy};

    fn open(p: &Path, limits: Limits) -> Image<FileSource> {
        Image::open_with(FileSource::open(p).unwrap(), limits).unwrap()
    }

    #[test]
    fn decompression_budget() {
        let dir = tmpdir();
        let (p, _) = compressed_image(dir.path(), "budget.qcow2");
        let opts = CheckOptions {
            max_decompressed_bytes: 2 << 16,
            ..CheckOptions::default()
        };
        let r = check(&open(&p, Limits::default()), &opts);
        assert_eq!(r.verdict, Verdict::Ok, "{r:#?}");
        assert!(r.has("decompress_budget_exhausted"));
        assert_eq!(r.stats.decompressed_clusters, 2);
    }

    #[test]
    fn too_large_to_check() {
        let dir = tmpdir();
        let p = base(dir.path(), "large.qcow2");
        let opts = CheckOptions {
            max_tracked_clusters: 4,
            ..CheckOptions::default()
        };
        let r = check(&open(&p, Limits::default()), &opts);
        assert_eq!((r.verdict, r.checked), (Verdict::Invalid, false));
        assert!(r.has("too_large_to_check"));
    }

    /// The tracking bound counts the pages of clusters the tables touch,
    /// not the file length: 40 MiB of 512-byte clusters touch two pages of
    /// 64 Ki clusters (32 MiB each); room for one is refused, room for two
    /// (or the file's length) gives the default report, and a file
    /// far longer than the bound with nothing past its data needs no more.
    #[test]
    fn tracking_bound_counts_touched_pages() {
        let dir = tmpdir();
        let p = create(dir.path(), "pages.qcow2", "cluster_size=512", "64M");
        qemu_io(&p, &["write -P 5 0 40M"]);
        let page = 1u64 << 16;
        let with = |max| CheckOptions {
            max_tracked_clusters: max,
            ..CheckOptions::metadata_only(Policy::default())
        };
        let want = check(&open(&p, Limits::default()), &with(1 << 26));
        assert_eq!((want.verdict, want.checked), (Verdict::Ok, true));
        let r = check(&open(&p, Limits::default()), &with(page));
        assert_eq!((r.verdict, r.checked), (Verdict::Invalid, false), "{r:#?}");
        assert!(r.has("too_large_to_check"));
        assert_eq!(r.findings.len(), 1);
        let len = std::fs::metadata(&p).unwrap().len();
        let r = check(&open(&p, Limits::default()), &with(len.div_ceil(512)));
        assert_eq!(r, want);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(100 << 30)
            .unwrap();
        let r = check(&open(&p, Limits::default()), &with(2 * page));
        assert_eq!((r.verdict, r.checked), (Verdict::Ok, true), "{r:#?}");
        assert_eq!(r.findings, want.findings);
        assert_eq!(r.stats.image_end_offset, want.stats.image_end_offset);
    }

    /// What convert calls: leaks and garbage payloads do not block it
    /// (it decompresses while copying), corruption and policy do.
    #[test]
    fn metadata_check_for_convert() {
        let dir = tmpdir();
        let (p, at) = compressed_image(dir.path(), "conv.qcow2");
        patch(&p, compressed_host(&p, at), &[0xff; 48]);
        let r = check_metadata(&open(&p, Limits::default()), &Policy::default());
        assert!(r.verdict.passes(), "{r:#?}");

        let leak = base(dir.path(), "leak.qcow2");
        let cs = cluster_size(&leak);
        let end = file_len(&leak).div_ceil(cs);
        set_len(&leak, (end + 1) * cs);
        set_refcount(&leak, end, 1);
        let r = check_metadata(&open(&leak, Limits::default()), &Policy::default());
        assert_eq!(r.verdict, Verdict::Leaks);
        assert!(r.verdict.passes());

        let bad = base(dir.path(), "bad.qcow2");
        put64(&bad, l2_entry_at(&bad, 0, 5), l1_offset(&bad) | COPIED);
        let r = check_metadata(&open(&bad, Limits::default()), &Policy::default());
        assert!(!r.verdict.passes());
    }
}
