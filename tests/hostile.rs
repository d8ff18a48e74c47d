//! Hostile images: real qemu-img images with bytes patched, one case for
//! each open-time check QEMU makes and each stricter check qcow2-guard
//! adds. Every case asserts the exact error code, the exact file offset,
//! and the exit code of `qcow2-guard info --json`, and the same code and
//! offset from `qcow2_guard::Image::open`.
//!
//! The catalogue reads as: base image, what was patched (the patch function
//! returns the offset the error must point at), expected code, expected
//! exit code, and a word the message must contain when a code has several
//! reasons.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use qcow2_guard::{FileSource, Image, Limits, Policy};
use serde_json::Value;

/// The unpatched images every case starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// compat 1.1, 64 KiB clusters, 1 MiB, some data.
    V3,
    /// compat 0.10, 64 KiB clusters, 1 MiB, some data.
    V2,
    /// compat 1.1, 4 KiB clusters.
    Small,
    /// V3 with two internal snapshots.
    Snap,
    /// V3 with two persistent bitmaps, "b0" and "b1".
    Bitmaps,
    /// V3 with a backing file "base.qcow2" (format qcow2).
    Backing,
    /// LUKS encrypted, 4 KiB clusters.
    Luks,
}

const BASES: [Base; 7] = [
    Base::V3,
    Base::V2,
    Base::Small,
    Base::Snap,
    Base::Bitmaps,
    Base::Backing,
    Base::Luks,
];

fn build(base: Base, dir: &Path) -> PathBuf {
    let name = format!("{base:?}.qcow2");
    let writes = ["write -P 0xaa 0 64k", "write -P 0x55 512k 4k"];
    let image = match base {
        Base::V3 => create(dir, &name, "", "1M"),
        Base::V2 => create(dir, &name, "compat=0.10", "1M"),
        Base::Small => create(dir, &name, "cluster_size=4k", "1M"),
        Base::Snap => {
            let i = create(dir, &name, "", "1M");
            qemu_io(&i, &writes);
            qemu_img(&["snapshot", "-c", "one", i.to_str().unwrap()]);
            qemu_img(&["snapshot", "-c", "two", i.to_str().unwrap()]);
            i
        }
        Base::Bitmaps => {
            let i = create(dir, &name, "", "1M");
            qemu_img(&["bitmap", "--add", i.to_str().unwrap(), "b0"]);
            qemu_img(&["bitmap", "--add", i.to_str().unwrap(), "b1"]);
            i
        }
        Base::Backing => {
            create(dir, "base.qcow2", "", "1M");
            create(
                dir,
                &name,
                "backing_file=base.qcow2,backing_fmt=qcow2",
                "1M",
            )
        }
        Base::Luks => {
            return create_encrypted(
                dir,
                &name,
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,\
                 cluster_size=4k",
                "1M",
            );
        }
    };
    if base != Base::Snap {
        qemu_io(&image, &writes);
    }
    image
}

fn set8(p: &Path, off: u64, v: u8) {
    patch(p, off, &[v]);
}
fn set16(p: &Path, off: u64, v: u16) {
    patch(p, off, &v.to_be_bytes());
}
fn set32(p: &Path, off: u64, v: u32) {
    patch(p, off, &v.to_be_bytes());
}
fn set64(p: &Path, off: u64, v: u64) {
    patch(p, off, &v.to_be_bytes());
}
fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}
/// A cluster-aligned offset past the end of the file.
fn past_end(p: &Path) -> u64 {
    (len(p) | 0xffff) + 1 + 0x10000
}

/// Header extensions of `p`: (type, offset of the record, length).
fn extensions(p: &Path) -> Vec<(u32, u64, u32)> {
    let mut at = if be32(p, 4) >= 3 {
        u64::from(be32(p, 100))
    } else {
        72
    };
    let mut out = Vec::new();
    loop {
        let (ty, l) = (be32(p, at), be32(p, at + 4));
        if ty == 0 {
            return out;
        }
        out.push((ty, at, l));
        at += 8 + u64::from(l).next_multiple_of(8);
    }
}

/// Offset of the record of extension `ty`.
fn ext(p: &Path, ty: u32) -> u64 {
    extensions(p)
        .into_iter()
        .find(|e| e.0 == ty)
        .unwrap_or_else(|| panic!("{}: no extension {ty:#x}", p.display()))
        .1
}

const BACKING_FORMAT: u32 = 0xE279_2ACA;
const FEATURE_TABLE: u32 = 0x6803_F857;
const BITMAPS: u32 = 0x2385_2875;
const CRYPTO: u32 = 0x0537_BE77;

/// Offset of the bitmap directory.
fn bitmap_dir(p: &Path) -> u64 {
    be64(p, ext(p, BITMAPS) + 8 + 16)
}

/// Replace the extension area (at 112) with `records`, end marker added.
fn rewrite_extensions(p: &Path, records: &[(u32, &[u8])]) {
    assert_eq!(be32(p, 100), 112);
    patch(p, 112, &ext_records(records));
}

/// One hostile image.
struct Case {
    name: &'static str,
    base: Base,
    /// Patch the copy of the base image; return the offset the error must
    /// report.
    patch: fn(&Path) -> u64,
    code: &'static str,
    exit: i32,
    /// A word the message must contain ("" for none).
    says: &'static str,
}

const fn case(
    name: &'static str,
    base: Base,
    patch: fn(&Path) -> u64,
    code: &'static str,
    says: &'static str,
) -> Case {
    Case {
        name,
        base,
        patch,
        code,
        exit: 2,
        says,
    }
}

use Base::*;

#[rustfmt::skip]
fn catalogue() -> Vec<Case> {
    vec![
        // --- Not qcow2 at all: exit 1. ---
        Case { exit: 1, ..case("bad magic", V3, |p| { set32(p, 0, 0x5146_49fa); 0 }, "bad_magic", "") },
        Case { exit: 1, ..case("three-byte file", V3, |p| { std::fs::write(p, b"QFI").unwrap(); 0 }, "file_too_short", "") },
        Case { exit: 1, ..case("empty file", V3, |p| { std::fs::write(p, b"").unwrap(); 0 }, "file_too_short", "") },
        // --- Truncated headers. ---
        case("header truncated after the magic", V3, |p| { std::fs::write(p, b"QFI\xfb\0\0").unwrap(); 0 }, "truncated", ""),
        case("v3 header cut at 100 bytes", V3, |p| { truncate(p, 100); 0 }, "truncated", ""),
        case("v3 header cut inside header_length", V3, |p| { truncate(p, 106); 100 }, "past_eof", ""),
        case("v2 header cut at 64 bytes", V2, |p| { truncate(p, 64); 0 }, "truncated", ""),
        // --- Fixed header fields. ---
        case("version 1", V3, |p| { set32(p, 4, 1); 4 }, "unsupported_version", ""),
        case("version 4", V3, |p| { set32(p, 4, 4); 4 }, "unsupported_version", ""),
        case("cluster_bits 8", V3, |p| { set32(p, 20, 8); 20 }, "invalid_cluster_bits", ""),
        case("cluster_bits 22", V3, |p| { set32(p, 20, 22); 20 }, "invalid_cluster_bits", ""),
        case("cluster_bits 40 (peer readers panicked)", V3, |p| { set32(p, 20, 40); 20 }, "invalid_cluster_bits", ""),
        case("cluster_bits 64", V2, |p| { set32(p, 20, 64); 20 }, "invalid_cluster_bits", ""),
        case("cluster_bits 0xffffffff", V3, |p| { set32(p, 20, u32::MAX); 20 }, "invalid_cluster_bits", ""),
        case("header_length 100", V3, |p| { set32(p, 100, 100); 100 }, "invalid_header_length", "shorter than 104"),
        case("header_length 108", V3, |p| { set32(p, 100, 108); 100 }, "invalid_header_length", "multiple of 8"),
        case("header_length above the cluster", Small, |p| { set32(p, 100, 4104); 100 }, "invalid_header_length", "larger than one cluster"),
        case("header_length 0xfffffff8", V3, |p| { set32(p, 100, 0xffff_fff8); 100 }, "past_eof", ""),
        case("refcount_order 7", V3, |p| { set32(p, 96, 7); 96 }, "invalid_refcount_order", ""),
        case("refcount_order 0xffffffff", V3, |p| { set32(p, 96, u32::MAX); 96 }, "invalid_refcount_order", ""),
        case("compression_type 2", V3, |p| { set8(p, 104, 2); 104 }, "unknown_compression_type", ""),
        case("compression_type 1 without incompatible bit 3", V3, |p| { set8(p, 104, 1); 104 }, "compression_type_mismatch", ""),
        case("incompatible bit 3 with compression_type 0", V3, |p| { set64(p, 72, 1 << 3); 104 }, "compression_type_mismatch", ""),
        case("extended L2 with 4 KiB clusters", Small, |p| { set64(p, 72, 1 << 4); 20 }, "extended_l2_cluster_too_small", ""),
        case("crypt_method 3", V3, |p| { set32(p, 32, 3); 32 }, "unknown_crypt_method", ""),
        case("raw external data bit without a data file", V3, |p| { set64(p, 88, 1 << 1); 88 }, "data_file_raw_without_data_file", ""),
        case("virtual size above 2^63", V3, |p| { set64(p, 24, 1 << 63); 24 }, "virtual_size_too_large", ""),
        // --- L1 table. ---
        case("l1_size 0 for a 1 MiB disk", V3, |p| { set32(p, 36, 0); 36 }, "l1_too_small", ""),
        case("l1_size 0 (v2)", V2, |p| { set32(p, 36, 0); 36 }, "l1_too_small", ""),
        case("virtual size beyond the L1 table", V3, |p| { set64(p, 24, 1 << 30); 36 }, "l1_too_small", ""),
        case("L1 table unaligned", V3, |p| { set64(p, 40, be64(p, 40) + 512); 40 }, "unaligned", ""),
        case("L1 table at offset 0", V3, |p| { set64(p, 40, 0); 40 }, "metadata_overlap", ""),
        case("L1 table past EOF", V3, |p| { set64(p, 40, past_end(p)); 40 }, "past_eof", ""),
        case("L1 table straddling EOF", V3, |p| { set64(p, 40, len(p) - 0x10000); set32(p, 36, 8193); 40 }, "past_eof", ""),
        case("l1_size above QEMU's 32 MiB", V3, |p| { set32(p, 36, (4 << 20) + 1); 36 }, "too_large", "limit of 33554432"),
        case("l1_size 0xffffffff", V3, |p| { set32(p, 36, u32::MAX); 36 }, "too_large", ""),
        // --- Refcount table. ---
        case("refcount_table_clusters 0", V3, |p| { set32(p, 56, 0); 56 }, "missing_refcount_table", ""),
        case("refcount table unaligned", V3, |p| { set64(p, 48, be64(p, 48) + 8); 48 }, "unaligned", ""),
        case("refcount table past EOF", V3, |p| { set64(p, 48, past_end(p)); 48 }, "past_eof", ""),
        case("refcount table above QEMU's 8 MiB", V3, |p| { set32(p, 56, 129); 56 }, "too_large", "limit of 8388608"),
        case("refcount_table_clusters 0xffffffff", V3, |p| { set32(p, 56, u32::MAX); 56 }, "too_large", ""),
        case("refcount table of 100 clusters past EOF", V3, |p| { set32(p, 56, 100); 48 }, "past_eof", ""),
        // --- Snapshot table (header fields). ---
        case("snapshot table unaligned", V3, |p| { set32(p, 60, 1); set64(p, 64, 0x10200); 64 }, "unaligned", ""),
        case("snapshot table past EOF", V3, |p| { set32(p, 60, 1); set64(p, 64, past_end(p)); 64 }, "past_eof", ""),
        case("nb_snapshots 65537", V3, |p| { set32(p, 60, 65537); 60 }, "too_large", "limit of 65536"),
        case("nb_snapshots 0xffffffff", Snap, |p| { set32(p, 60, u32::MAX); 60 }, "too_large", ""),
        case("nb_snapshots 65536 from a small table", Snap, |p| { set32(p, 60, 65536); 64 }, "past_eof", ""),
        // --- Snapshot table entries. ---
        case("v3 snapshot extra data of 8 bytes", Snap, |p| { let e = be64(p, 64); set32(p, e + 36, 8); e }, "invalid_snapshot", "vm_state_size_large"),
        case("snapshot extra data of 1025 bytes", Snap, |p| { let e = be64(p, 64); set32(p, e + 36, 1025); e + 36 }, "too_large", "limit of 1024"),
        case("snapshot extra data 0xffffffff", Snap, |p| { let e = be64(p, 64); set32(p, e + 36, u32::MAX); e + 36 }, "too_large", ""),
        case("snapshot L1 table unaligned", Snap, |p| { let e = be64(p, 64); set64(p, e, be64(p, e) + 8); e }, "unaligned", ""),
        case("snapshot L1 table past EOF", Snap, |p| { let e = be64(p, 64); set64(p, e, past_end(p)); e }, "past_eof", ""),
        case("second snapshot L1 table past EOF", Snap, |p| {
            let first = be64(p, 64);
            let second = first + entry_len(p, first);
            set64(p, second, past_end(p));
            second
        }, "past_eof", ""),
        case("snapshot l1_size above QEMU's cap", Snap, |p| { let e = be64(p, 64); set32(p, e + 8, (4 << 20) + 1); e + 8 }, "too_large", ""),
        case("snapshot name running past EOF", Snap, |p| {
            let e = be64(p, 64);
            let second = e + entry_len(p, e);
            set16(p, second + 14, u16::MAX);
            truncate(p, second + 100);
            second
        }, "past_eof", ""),
        // --- Backing file name. ---
        case("backing name inside the header", Backing, |p| { set64(p, 8, 16); 8 }, "invalid_backing_file", "inside the header"),
        case("backing name past the first cluster", Backing, |p| { set64(p, 8, 0xfffa); 8 }, "invalid_backing_file", "first cluster"),
        case("backing name offset beyond the first cluster", Backing, |p| { set64(p, 8, 0x20000); 8 }, "invalid_backing_file", "first cluster"),
        case("backing name offset near 2^64", Backing, |p| { set64(p, 8, u64::MAX - 3); 8 }, "invalid_backing_file", "first cluster"),
        case("backing_file_size 1024", Backing, |p| { set32(p, 16, 1024); 16 }, "too_large", "limit of 1023"),
        case("backing_file_size 0xffffffff", Backing, |p| { set32(p, 16, u32::MAX); 16 }, "too_large", ""),
        case("backing name past EOF", Backing, |p| { let o = be64(p, 8); truncate(p, o + 4); 8 }, "past_eof", ""),
        // --- Header extensions. ---
        case("extension length 0xffffffff", V3, |p| { set32(p, 116, u32::MAX); 112 }, "extension_too_large", ""),
        case("extension running off the first cluster", V3, |p| { set32(p, 116, 0x10000 - 120 + 1); 112 }, "extension_too_large", ""),
        case("backing format extension twice", V3, |p| {
            rewrite_extensions(p, &[(BACKING_FORMAT, b"raw"), (BACKING_FORMAT, b"raw")]);
            128
        }, "duplicate_extension", ""),
        case("feature name table of 1 byte (peer readers panicked)", V3, |p| {
            rewrite_extensions(p, &[(FEATURE_TABLE, &[0])]);
            112
        }, "invalid_extension_length", "multiple of 48"),
        case("feature name table of 47 bytes", V3, |p| { let e = ext(p, FEATURE_TABLE); set32(p, e + 4, 47); e }, "invalid_extension_length", "multiple of 48"),
        case("backing format of 16 bytes", V3, |p| {
            rewrite_extensions(p, &[(BACKING_FORMAT, b"qcow2qcow2qcow2!")]);
            112
        }, "invalid_extension_length", "15 bytes"),
        case("bitmaps extension of 16 bytes", V3, |p| {
            rewrite_extensions(p, &[(BITMAPS, &[0; 16])]);
            112
        }, "invalid_extension_length", "24 bytes"),
        case("encryption extension of 8 bytes", Luks, |p| { let e = ext(p, CRYPTO); set32(p, e + 4, 8); e }, "invalid_extension_length", "16 bytes"),
        case("LUKS without the encryption extension", V3, |p| { set32(p, 32, 2); 32 }, "missing_crypto_header", ""),
        case("encryption extension on a plain image", Luks, |p| { set32(p, 32, 0); ext(p, CRYPTO) + 8 }, "unexpected_crypto_header", ""),
        case("encryption extension on an AES image", Luks, |p| { set32(p, 32, 1); ext(p, CRYPTO) + 8 }, "unexpected_crypto_header", ""),
        case("LUKS header unaligned", Luks, |p| { let d = ext(p, CRYPTO) + 8; set64(p, d, be64(p, d) + 8); d }, "unaligned", ""),
        case("LUKS header at offset 0", Luks, |p| { let d = ext(p, CRYPTO) + 8; set64(p, d, 0); d }, "unaligned", ""),
        case("LUKS header past EOF", Luks, |p| { let d = ext(p, CRYPTO) + 8; set64(p, d + 8, 1 << 40); d }, "past_eof", ""),
        // --- Bitmaps extension. ---
        case("nb_bitmaps 0", Bitmaps, |p| { let d = ext(p, BITMAPS) + 8; set32(p, d, 0); d }, "invalid_bitmaps_extension", "zero bitmaps"),
        case("nb_bitmaps 3 for two entries", Bitmaps, |p| { let d = ext(p, BITMAPS) + 8; set32(p, d, 3); d }, "invalid_bitmaps_extension", "does not match"),
        case("nb_bitmaps 1 for two entries", Bitmaps, |p| { let d = ext(p, BITMAPS) + 8; set32(p, d, 1); d }, "invalid_bitmaps_extension", "more entries"),
        case("nb_bitmaps 65536", Bitmaps, |p| { let d = ext(p, BITMAPS) + 8; set32(p, d, 65536); d }, "too_large", "limit of 65535"),
        case("bitmaps extension reserved field", Bitmaps, |p| { let d = ext(p, BITMAPS) + 8; set32(p, d + 4, 1); d + 4 }, "reserved_bits", ""),
        case("bitmap directory size above QEMU's cap", Bitmaps, |p| { let d = ext(p, BITMAPS) + 8; set64(p, d + 8, 1 << 40); d + 8 }, "too_large", ""),
        case("bitmap directory unaligned", Bitmaps, |p| { let d = ext(p, BITMAPS) + 8; set64(p, d + 16, be64(p, d + 16) + 8); d + 16 }, "unaligned", ""),
        case("bitmap directory past EOF", Bitmaps, |p| { let d = ext(p, BITMAPS) + 8; set64(p, d + 16, past_end(p)); d + 16 }, "past_eof", ""),
        case("bitmap directory cut short", Bitmaps, |p| { let d = ext(p, BITMAPS) + 8; set64(p, d + 8, 40); bitmap_dir(p) + 32 }, "truncated", ""),
        // --- Bitmap directory entries. ---
        case("bitmap type 2", Bitmaps, |p| { let d = bitmap_dir(p); set8(p, d + 16, 2); d }, "invalid_bitmap", "type"),
        case("bitmap granularity_bits 8", Bitmaps, |p| { let d = bitmap_dir(p); set8(p, d + 17, 8); d }, "invalid_bitmap", "granularity"),
        case("bitmap granularity_bits 32", Bitmaps, |p| { let d = bitmap_dir(p); set8(p, d + 17, 32); d }, "invalid_bitmap", "granularity"),
        case("bitmap granularity_bits 255", Bitmaps, |p| { let d = bitmap_dir(p); set8(p, d + 17, 255); d }, "invalid_bitmap", "granularity"),
        case("duplicate bitmap name", Bitmaps, |p| { let d = bitmap_dir(p); set8(p, d + 32 + 24 + 1, b'0'); d + 32 }, "invalid_bitmap", "duplicate"),
        case("bitmap table size 5", Bitmaps, |p| { let d = bitmap_dir(p); set32(p, d + 8, 5); d }, "invalid_bitmap", "table size"),
        case("bitmap unknown flag", Bitmaps, |p| { let d = bitmap_dir(p); set32(p, d + 12, be32(p, d + 12) | 1 << 8); d + 12 }, "reserved_bits", ""),
        case("bitmap name empty", Bitmaps, |p| { let d = bitmap_dir(p); set16(p, d + 18, 0); d }, "invalid_bitmap", "name"),
        case("bitmap non-zero padding", Bitmaps, |p| { let d = bitmap_dir(p); set8(p, d + 24 + 2, 1); d }, "invalid_bitmap", "padding"),
        case("bitmap table unaligned", Bitmaps, |p| { let d = bitmap_dir(p); set64(p, d, 0x10008); d }, "unaligned", ""),
        case("bitmap table past EOF", Bitmaps, |p| { let d = bitmap_dir(p); set64(p, d, past_end(p)); d }, "past_eof", ""),
    ]
}

/// Length of the snapshot table entry at `e`, padding included.
fn entry_len(p: &Path, e: u64) -> u64 {
    let id = u64::from(u16::from_be_bytes(peek(p, e + 12)));
    let name = u64::from(u16::from_be_bytes(peek(p, e + 14)));
    let extra = u64::from(be32(p, e + 36));
    (40 + extra + id + name).next_multiple_of(8)
}

fn truncate(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Run one case; return a description of what went wrong, if anything.
fn run(c: &Case, base: &Path, dir: &Path, n: usize) -> Option<String> {
    let image = copy(base, dir, &format!("case{n}.qcow2"));
    let want_offset = (c.patch)(&image);
    export(&image, &format!("{} ({})", c.name, c.code));
    let p = image.to_str().unwrap();
    let out = guard(&["info", "--json", p]);
    let v = json(&out);
    let got = (
        v["error"]["code"].as_str().unwrap_or("<none>").to_owned(),
        v["error"]["offset"].as_u64(),
        code(&out),
    );
    let msg = v["error"]["message"].as_str().unwrap_or("");
    let mut problems = Vec::new();
    if got != (c.code.to_owned(), Some(want_offset), c.exit) || v["exit-code"] != c.exit {
        problems.push(format!(
            "CLI: want {} at {want_offset:#x} exit {}, got {} at {:#x?} exit {}: {msg}",
            c.code, c.exit, got.0, got.1, got.2
        ));
    }
    if !msg.contains(c.says) {
        problems.push(format!("message {msg:?} does not say {:?}", c.says));
    }
    match Image::open(FileSource::open(&image).unwrap()) {
        Ok(_) => problems.push("library: opened".into()),
        Err(e) if (e.code(), e.offset()) != (c.code, want_offset) => problems.push(format!(
            "library: want {} at {want_offset:#x}, got {} at {:#x}: {e}",
            c.code,
            e.code(),
            e.offset()
        )),
        Err(_) => {}
    }
    (!problems.is_empty()).then(|| format!("{}: {}", c.name, problems.join("; ")))
}

#[test]
fn catalogue_of_hostile_images() {
    let dir = tmpdir();
    let bases: Vec<(Base, PathBuf)> = BASES.iter().map(|&b| (b, build(b, dir.path()))).collect();
    // Every base is itself accepted (exit 0 or refused by policy only).
    for (b, p) in &bases {
        let out = guard(&[
            "info",
            "--json",
            "--allow-backing",
            "--allow-encryption",
            p.to_str().unwrap(),
        ]);
        assert_eq!(
            code(&out),
            0,
            "base {b:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let cases = catalogue();
    let mut failures = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (n, c) in cases.iter().enumerate() {
        assert!(seen.insert(c.name), "duplicate case name {}", c.name);
        let base = &bases.iter().find(|b| b.0 == c.base).unwrap().1;
        failures.extend(run(c, base, dir.path(), n));
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Policy verdicts: well-formed images the default policy refuses (exit 4)
/// or warns about (exit 0).
#[test]
fn policy_catalogue() {
    /// (description, patch, extra arguments, code, severity, offset, exit)
    type PolicyCase = (
        &'static str,
        fn(&Path),
        &'static [&'static str],
        &'static str,
        &'static str,
        u64,
        i32,
    );
    #[rustfmt::skip]
    let cases: &[PolicyCase] = &[
        ("unknown incompatible bit 5", |p| set64(p, 72, 1 << 5), &[], "policy_unknown_incompatible_features", "error", 72, 4),
        ("unknown incompatible bit 63", |p| set64(p, 72, 1 << 63), &[], "policy_unknown_incompatible_features", "error", 72, 4),
        ("corrupt bit", |p| set64(p, 72, 1 << 1), &[], "policy_corrupt_bit", "error", 72, 4),
        ("virtual size above --max-virtual-size", |_| {}, &["--max-virtual-size", "512K"], "policy_virtual_size", "error", 24, 4),
        ("dirty bit", |p| set64(p, 72, 1), &[], "dirty_bit", "warning", 72, 0),
        ("unknown autoclear bit", |p| set64(p, 88, 1 << 7), &[], "unknown_autoclear_features", "warning", 88, 0),
    ];
    let dir = tmpdir();
    let base = build(Base::V3, dir.path());
    let mut failures = Vec::new();
    for (n, (name, f, args, want, severity, offset, exit)) in cases.iter().enumerate() {
        let image = copy(&base, dir.path(), &format!("policy{n}.qcow2"));
        f(&image);
        if args.is_empty() {
            export(&image, &format!("{name} ({want})"));
        }
        let out = guard(&[&["info", "--json"], *args, &[image.to_str().unwrap()]].concat());
        let v = json(&out);
        let findings = v["findings"].as_array().cloned().unwrap_or_default();
        let expected = serde_json::json!({"code": want, "severity": severity, "offset": offset});
        let matching = findings
            .iter()
            .filter(|f| {
                f["code"] == expected["code"]
                    && f["severity"] == expected["severity"]
                    && f["offset"] == expected["offset"]
            })
            .count();
        if code(&out) != *exit || v["exit-code"] != *exit || matching != 1 || findings.len() != 1 {
            failures.push(format!(
                "{name}: want {expected} exit {exit}, got exit {} findings {}",
                code(&out),
                Value::Array(findings)
            ));
        }
        // The library opens it; the policy finds the same.
        let policy = if args.is_empty() {
            Policy::default()
        } else {
            Policy::default().with_max_virtual_size(512 << 10)
        };
        let img = Image::open(FileSource::open(&image).unwrap()).unwrap();
        let codes: Vec<&str> = img
            .policy_findings(&policy)
            .iter()
            .map(|f| f.code)
            .collect();
        if codes != [*want] {
            failures.push(format!("{name}: library policy findings {codes:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Tiny files whose headers claim the largest tables QEMU allows must be
/// refused before anything is allocated: run under a 16 MiB address space
/// limit (the CLI itself runs in 8 MiB; the tables claimed here need 8 to
/// 32 MiB).
#[test]
fn tiny_files_with_huge_tables() {
    let dir = tmpdir();
    // A v3 header in a file of `len` bytes, with 512-byte clusters and a
    // refcount table at 512 when the file is long enough to hold one.
    let mk = |name: &str, len: usize, f: fn(&mut [u8])| {
        let mut h = vec![0u8; len];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&9u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        if len >= 1024 {
            h[48..56].copy_from_slice(&512u64.to_be_bytes());
            h[56..60].copy_from_slice(&1u32.to_be_bytes());
        }
        f(&mut h);
        let p = dir.path().join(name);
        std::fs::write(&p, h).unwrap();
        p
    };
    let cases: Vec<(PathBuf, &str, u64)> = vec![
        (
            mk("l1.qcow2", 120, |h| {
                h[20..24].copy_from_slice(&16u32.to_be_bytes());
                h[24..32].copy_from_slice(&(1u64 << 51).to_be_bytes()); // 2 PiB
                h[36..40].copy_from_slice(&(4u32 << 20).to_be_bytes()); // 32 MiB of L1
                h[40..48].copy_from_slice(&0x10000u64.to_be_bytes());
            }),
            "past_eof",
            40,
        ),
        (
            mk("refcount.qcow2", 120, |h| {
                h[20..24].copy_from_slice(&16u32.to_be_bytes());
                h[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
                h[56..60].copy_from_slice(&128u32.to_be_bytes()); // 8 MiB
            }),
            "past_eof",
            48,
        ),
        (
            mk("snapshots.qcow2", 1024, |h| {
                h[60..64].copy_from_slice(&65536u32.to_be_bytes()); // 2.5 MiB
                h[64..72].copy_from_slice(&512u64.to_be_bytes());
            }),
            "past_eof",
            64,
        ),
        (
            mk("extension.qcow2", 1024, |h| {
                h[112..116].copy_from_slice(&0x1234_5678u32.to_be_bytes());
                h[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
            }),
            "extension_too_large",
            112,
        ),
    ];
    for (p, want, offset) in cases {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -v 16384 && exec {} info --json {}",
                bin(),
                p.display()
            ))
            .output()
            .unwrap();
        let v = json(&out);
        assert_eq!(
            (
                v["error"]["code"].as_str(),
                v["error"]["offset"].as_u64(),
                code(&out)
            ),
            (Some(want), Some(offset), 2),
            "{}: {v}",
            p.display()
        );
    }
}

/// Caller limits below QEMU's caps give limit_exceeded, at the field.
#[test]
fn caller_limits() {
    let dir = tmpdir();
    let snap = build(Base::Snap, dir.path());
    let bitmaps = build(Base::Bitmaps, dir.path());
    let open = |p: &Path, f: fn(&mut Limits)| {
        let mut limits = Limits::default();
        f(&mut limits);
        let e = Image::open_with(FileSource::open(p).unwrap(), limits).unwrap_err();
        (e.code(), e.offset())
    };
    assert_eq!(open(&snap, |l| l.max_snapshots = 1), ("limit_exceeded", 60));
    assert_eq!(
        open(&snap, |l| l.max_l1_entries = 0),
        ("limit_exceeded", 36)
    );
    assert_eq!(
        open(&snap, |l| l.max_refcount_table_bytes = 4096),
        ("limit_exceeded", 56)
    );
    let bitmaps_ext = ext(&bitmaps, BITMAPS) + 8;
    assert_eq!(
        open(&bitmaps, |l| l.max_bitmaps = 1),
        ("limit_exceeded", bitmaps_ext)
    );
    // Fuzzing limits still open every base image.
    for p in [&snap, &bitmaps] {
        Image::open_with(FileSource::open(p).unwrap(), Limits::fuzzing()).unwrap();
    }
}

/// One total beside the per-structure caps (`Limits::max_total_bytes`):
/// a qemu-img image whose L1 table is patched up to QEMU's cap (4 Mi
/// entries, 32 MiB, the file grown to hold it) passes every cap and opens
/// (QEMU opens it too), but a caller whose total is 32 MiB refuses it at
/// the L1 size field, as a refusal; the same total with the table QEMU
/// wrote opens.
#[test]
fn total_budget() {
    let dir = tmpdir();
    let p = create(dir.path(), "wide.qcow2", "cluster_size=65536", "1G");
    let plain = copy(&p, dir.path(), "plain.qcow2");
    let l1 = be64(&p, 40);
    patch(&p, 36, &(4u32 << 20).to_be_bytes());
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(l1 + (32 << 20)).unwrap();
    drop(f);
    // Refcount 1 (16-bit entries) for the table's new clusters, so that
    // qemu-img check finds the image clean.
    let block = be64(&p, be64(&p, 48));
    let (first, end) = (l1 / 65536 + 1, (l1 + (32 << 20)) / 65536);
    let ones: Vec<u8> = (first..end).flat_map(|_| 1u16.to_be_bytes()).collect();
    patch(&p, block + 2 * first, &ones);
    let out = qemu_img_status(&["check", p.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let total = |bytes: u64| {
        let mut l = Limits::default().with_max_cache_bytes(0);
        l.max_total_bytes = bytes;
        l
    };
    let open = |p: &Path, limits| Image::open_with(FileSource::open(p).unwrap(), limits);
    let wide = open(&p, Limits::default()).unwrap();
    assert!(wide.charged_bytes() > 32 << 20);
    let e = open(&p, total(32 << 20)).unwrap_err();
    assert_eq!((e.code(), e.offset()), ("total_limit_exceeded", 36));
    assert!(e.is_refusal(), "{e}");
    let small = open(&plain, total(32 << 20)).unwrap();
    assert!(small.charged_bytes() < 1 << 20);
}

/// A first cluster full of unknown extensions: accepted, and only the first
/// 64 are kept.
#[test]
fn many_unknown_extensions() {
    let dir = tmpdir();
    let mut h = vec![0u8; 8192];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&12u32.to_be_bytes());
    h[48..56].copy_from_slice(&4096u64.to_be_bytes());
    h[56..60].copy_from_slice(&1u32.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&112u32.to_be_bytes());
    for r in h[112..4096].chunks_exact_mut(8) {
        r[..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    }
    let p = dir.path().join("many.qcow2");
    std::fs::write(&p, h).unwrap();
    let out = guard(&["info", "--json", p.to_str().unwrap()]);
    assert_eq!(code(&out), 0);
    let v = json(&out);
    let unknown = v["unknown-extensions"].as_array().unwrap();
    assert_eq!(unknown.len(), 64);
    assert_eq!(unknown[63]["offset"], 112 + 63 * 8 + 8);
    let img = Image::open(FileSource::open(&p).unwrap()).unwrap();
    assert_eq!(img.extensions().unknown_count, (4096 - 112) / 8);
    assert!(!img.extensions().terminated);
}

/// Deterministic mutation smoke test: thousands of single-field and
/// random-byte corruptions of every base image, opened in memory. Nothing
/// may panic (debug builds also trap arithmetic overflow), and whatever
/// opens must answer `cluster` for every guest cluster without panicking.
#[test]
fn mutations_do_not_panic() {
    let dir = tmpdir();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let interesting: [u64; 8] = [0, 1, 0x7f, 0xff, 0x200, 0x8000_0000, u64::MAX / 2, u64::MAX];
    let mut opened = 0;
    for base in BASES {
        let original = std::fs::read(build(base, dir.path())).unwrap();
        // Where the metadata lives: the header and its extensions, and the
        // first entries of the L1, refcount and snapshot tables.
        let p = dir.path().join(format!("{base:?}.qcow2"));
        let hot: Vec<(u64, u64)> = vec![
            (0, 512),
            (be64(&p, 40), 64),
            (be64(&p, 48), 64),
            (be64(&p, 64), 128),
        ];
        for _ in 0..250 {
            let mut img = original.clone();
            for _ in 0..1 + rand() % 3 {
                let (start, len) = hot[usize::try_from(rand() % 4).unwrap()];
                let at = usize::try_from(start + rand() % len).unwrap();
                if at + 8 > img.len() {
                    continue;
                }
                match rand() % 3 {
                    0 => img[at] = rand() as u8,
                    1 => {
                        let v = interesting[usize::try_from(rand() % 8).unwrap()];
                        img[at & !7..(at & !7) + 8].copy_from_slice(&v.to_be_bytes());
                    }
                    _ => {
                        let v = interesting[usize::try_from(rand() % 8).unwrap()] as u32;
                        img[at & !3..(at & !3) + 4].copy_from_slice(&v.to_be_bytes());
                    }
                }
            }
            let Ok(image) = Image::open_with(img, Limits::fuzzing()) else {
                continue;
            };
            opened += 1;
            let g = *image.geometry();
            let size = image.virtual_size().min(4 << 20);
            let mut off = 0;
            while off < size {
                let _ = image.cluster(off);
                off += g.cluster_size;
            }
            let _ = image.metadata();
            for i in 0..image.refcount_table().len().min(4) as u64 {
                let _ = image.refcount_block(i);
            }
            let _ = image.refcount(0);
        }
    }
    // Most mutants are refused; enough open to exercise the mapping code.
    assert!(
        (100..1600).contains(&opened),
        "{opened} of 1750 mutants opened"
    );
}

/// Hostile L1 and L2 entries, seen through `Image::cluster(0)`: the image
/// opens (entries are checked when used) and mapping guest offset 0 fails
/// with the exact code at the entry's file offset.
#[test]
fn cluster_catalogue() {
    /// (description, extended L2, patch returning the expected offset, code)
    type ClusterCase = (&'static str, bool, fn(&Path) -> u64, &'static str);
    fn l1(p: &Path) -> u64 {
        be64(p, 40)
    }
    fn l2(p: &Path) -> u64 {
        be64(p, l1(p)) & 0x00ff_ffff_ffff_fe00
    }
    #[rustfmt::skip]
    let cases: &[ClusterCase] = &[
        ("L1 entry reserved bit 1", false, |p| { set64(p, l1(p), be64(p, l1(p)) | 2); l1(p) }, "reserved_bits"),
        ("L1 entry reserved bit 56", false, |p| { set64(p, l1(p), be64(p, l1(p)) | 1 << 56); l1(p) }, "reserved_bits"),
        ("L1 entry unaligned", false, |p| { set64(p, l1(p), be64(p, l1(p)) + 0x200); l1(p) }, "unaligned"),
        ("L1 entry past EOF", false, |p| { set64(p, l1(p), past_end(p) | 1 << 63); l1(p) }, "past_eof"),
        ("L1 entry pointing at the refcount table", false, |p| { set64(p, l1(p), be64(p, 48) | 1 << 63); l1(p) }, "metadata_overlap"),
        ("L1 entry pointing at itself", false, |p| { set64(p, l1(p), l1(p) | 1 << 63); l1(p) }, "metadata_overlap"),
        ("L2 entry reserved bit 5", false, |p| { let e = l2(p); set64(p, e, be64(p, e) | 1 << 5); e }, "reserved_bits"),
        ("L2 entry host offset at 2^56", false, |p| { let e = l2(p); set64(p, e, 1 << 56 | 1 << 63); e }, "reserved_bits"),
        ("L2 entry unaligned", false, |p| { let e = l2(p); set64(p, e, be64(p, e) + 0x200); e }, "unaligned"),
        ("L2 entry past EOF", false, |p| { let e = l2(p); set64(p, e, past_end(p) | 1 << 63); e }, "past_eof"),
        ("L2 entry pointing at the L1 table", false, |p| { let e = l2(p); set64(p, e, l1(p) | 1 << 63); e }, "metadata_overlap"),
        ("L2 entry pointing at its own table", false, |p| { let e = l2(p); set64(p, e, e | 1 << 63); e }, "metadata_overlap"),
        ("compressed entry with the copied bit", false, |p| { let e = l2(p); set64(p, e, 3 << 62 | 0x50000); e }, "invalid_compressed_entry"),
        ("compressed entry past EOF", false, |p| { let e = l2(p); set64(p, e, 1 << 62 | (len(p) + 0x100)); e }, "compressed_past_eof"),
        ("compressed entry in the header", false, |p| { let e = l2(p); set64(p, e, 1 << 62 | 0x100); e }, "metadata_overlap"),
        ("subcluster allocated and zero", true, |p| { let e = l2(p); set64(p, e + 8, 1 << 32 | 1); e + 8 }, "invalid_subcluster_bitmap"),
        ("subclusters allocated without a host cluster", true, |p| { let e = l2(p); set64(p, e, 0); set64(p, e + 8, 1); e + 8 }, "invalid_subcluster_bitmap"),
        ("compressed entry with a subcluster bitmap", true, |p| { let e = l2(p); set64(p, e, 1 << 62 | 0x50000); set64(p, e + 8, 1); e }, "invalid_compressed_entry"),
    ];
    let dir = tmpdir();
    let plain = build(Base::V3, dir.path());
    let ext = create(dir.path(), "ext.qcow2", "extended_l2=on", "1M");
    qemu_io(&ext, &["write -P 0xaa 0 64k", "write -P 0x55 512k 4k"]);
    let mut failures = Vec::new();
    for (n, (name, extended, f, want)) in cases.iter().enumerate() {
        let base = if *extended { &ext } else { &plain };
        let image = copy(base, dir.path(), &format!("cluster{n}.qcow2"));
        let offset = f(&image);
        export(&image, &format!("{name} ({want})"));
        let img = match Image::open(FileSource::open(&image).unwrap()) {
            Ok(i) => i,
            Err(e) => {
                failures.push(format!("{name}: open failed: {e}"));
                continue;
            }
        };
        match img.cluster(0) {
            Err(e) if (e.code(), e.offset()) == (*want, offset) => {}
            other => failures.push(format!("{name}: want {want} at {offset:#x}, got {other:?}")),
        }
        // The rest of the disk still maps (another L2 entry).
        if let Err(e) = img.cluster(512 << 10) {
            if !name.starts_with("L1") {
                failures.push(format!("{name}: cluster(512k): {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Paths that are not images at all: exit 1 with a JSON error.
#[test]
fn not_images() {
    let dir = tmpdir();
    let missing = dir.path().join("missing.qcow2");
    let cases = [
        (missing.to_str().unwrap(), "unreadable"),
        (dir.path().to_str().unwrap(), "io_error"),
        ("/dev/null", "file_too_short"),
    ];
    for (path, want) in cases {
        let out = guard(&["info", "--json", path]);
        let v = json(&out);
        assert_eq!(
            (
                code(&out),
                v["error"]["code"].as_str(),
                v["exit-code"].as_u64()
            ),
            (1, Some(want), Some(1)),
            "{path}: {v}"
        );
        // Without --json: nothing on stdout, one line on stderr.
        let out = guard(&["info", path]);
        assert_eq!(code(&out), 1);
        assert!(out.stdout.is_empty());
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    }
}

/// Reads refuse guest data inside any metadata structure `check` knows
/// of, not only the active tables: here an active L2 entry names the L2
/// table only a snapshot uses (one metadata-region builder serves both).
#[test]
fn data_cluster_in_a_snapshot_l2_table() {
    let dir = tmpdir();
    let p = create(dir.path(), "snap-l2.qcow2", "cluster_size=65536", "1M");
    qemu_io(&p, &["write -P 0x11 0 64k"]);
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    // Copy-on-write gives the active table an L2 table of its own.
    qemu_io(&p, &["write -P 0x22 0 64k"]);
    let img = Image::open(FileSource::open(&p).unwrap()).unwrap();
    let active_l2 = img.l1_entry(0).unwrap().l2_offset.unwrap();
    let s = &img.snapshots()[0];
    let snap_l2 = be64(&p, s.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(active_l2, snap_l2);
    drop(img);
    set64(&p, active_l2, 1 << 63 | snap_l2);

    let img = Image::open(FileSource::open(&p).unwrap()).unwrap();
    let e = img.read_at(0, &mut [0u8; 512]).unwrap_err();
    assert_eq!((e.code(), e.offset()), ("metadata_overlap", active_l2));
    assert!(e.to_string().contains("L2 table"), "{e}");
    let out = guard(&["check", "--json", p.to_str().unwrap()]);
    let v = json(&out);
    assert_eq!(code(&out), 2, "{v}");
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["code"] == "data_overlaps_metadata" && f["offset"] == active_l2),
        "{v}"
    );
}
