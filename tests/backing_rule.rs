//! One rule for what a qcow2 backing image handed in must pass: the
//! image's own policy and metadata audit, for `convert --backing` as for
//! `map --backing` (its bytes become guest data). QEMU disagrees with
//! itself on a backing image whose refcounts are corrupt: `qemu-img
//! check` calls it corrupt, `qemu-img convert` of the overlay reads it;
//! we take the stricter side. A backing image with only leaks passes.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qcow2_guard::convert::{prepare, ConvertError, ConvertOptions, Input, Inputs};
use qcow2_guard::{FileSource, Policy};

const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;

/// A base image (64 KiB clusters) with data at 0 and 128K, and an overlay
/// with data at 64K; returns (base, top).
fn chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = create(dir, "base.qcow2", "", "1M");
    qemu_io(&base, &["write -P 0xaa 0 64k", "write -P 0xbb 128k 64k"]);
    let top = overlay(dir, "top.qcow2", &base, "qcow2");
    qemu_io(&top, &["write -P 0xcc 64k 64k"]);
    (base, top)
}

/// Set the 16-bit refcount of the host cluster of guest cluster 0 of
/// `img` to `value`.
fn set_refcount_of_first_data_cluster(img: &Path, value: u16) {
    let l2 = be64(img, be64(img, 40)) & OFFSET;
    let host = be64(img, l2) & OFFSET;
    assert_ne!(host, 0);
    let block = be64(img, be64(img, 48)) & OFFSET;
    patch(img, block + (host >> 16) * 2, &value.to_be_bytes());
}

/// Clear the L2 entry of guest cluster 2 of `img`: its host cluster keeps
/// refcount 1 with no reference (a leak).
fn leak_third_cluster(img: &Path) {
    let l2 = be64(img, be64(img, 40)) & OFFSET;
    assert_ne!(be64(img, l2 + 16), 0);
    patch(img, l2 + 16, &0u64.to_be_bytes());
}

fn qemu_check_code(img: &Path) -> i32 {
    qemu_img_status(&["check", s(img)])
        .status
        .code()
        .expect("exit code")
}

/// `convert --backing` and `map --backing` on `top`: (exit statuses,
/// whether the output was written).
fn ours(top: &Path, base: &Path, dir: &Path) -> (i32, i32, bool) {
    let out = dir.join("ours.raw");
    let _ = std::fs::remove_file(&out);
    let conv = guard(&[
        "convert",
        "-q",
        "--allow-backing",
        "--backing",
        s(base),
        s(top),
        s(&out),
    ]);
    let map = guard(&["map", "--allow-backing", "--backing", s(base), s(top)]);
    (code(&conv), code(&map), out.exists())
}

fn library(top: &Path, base: &Path) -> Result<(), ConvertError> {
    let inputs = Inputs::new(FileSource::open(top).expect("open top"))
        .with_backing(FileSource::open(base).expect("open base"));
    let opts = ConvertOptions {
        policy: Policy {
            allow_backing: true,
            ..Policy::default()
        },
        ..ConvertOptions::default()
    };
    prepare(inputs, &opts).map(|_| ())
}

#[test]
fn corrupt_backing_image_is_refused_by_convert_as_by_map() {
    let dir = tmpdir();
    let (base, top) = chain(dir.path());
    set_refcount_of_first_data_cluster(&base, 0);
    // QEMU: check says corrupt, yet converting the overlay reads it.
    assert_eq!(qemu_check_code(&base), 2);
    let qemu_out = dir.path().join("qemu.raw");
    qemu_img(&["convert", "-O", "raw", s(&top), s(&qemu_out)]);
    // Before the one rule, convert wrote it (exit 0) while map refused.
    assert_eq!(ours(&top, &base, dir.path()), (2, 2, false));
    match library(&top, &base) {
        Err(ConvertError::Audit { input, report }) => {
            assert_eq!(input, Input::Backing);
            let codes: Vec<_> = report.findings.iter().map(|f| f.code).collect();
            assert!(codes.contains(&"refcount_too_low"), "{codes:?}");
        }
        other => panic!("not refused by the backing image's audit: {other:?}"),
    }
}

#[test]
fn leaky_backing_image_passes_convert_and_map() {
    let dir = tmpdir();
    let (base, top) = chain(dir.path());
    leak_third_cluster(&base);
    assert_eq!(qemu_check_code(&base), 3, "qemu-img check: leaks");
    let qemu_out = dir.path().join("qemu.raw");
    qemu_img(&["convert", "-O", "raw", s(&top), s(&qemu_out)]);
    assert_eq!(ours(&top, &base, dir.path()), (0, 0, true));
    assert_eq!(
        std::fs::read(dir.path().join("ours.raw")).ok(),
        std::fs::read(&qemu_out).ok()
    );
    library(&top, &base).expect("a leaky backing image passes");
}
