//! `qcow2-guard compare` against `qemu-img compare`: the same message on
//! stdout and the same exit status for each pair of images (qcow2 and raw,
//! equal and different contents and sizes, strict mode, quiet mode), and
//! a refusal (exit 2, with our finding) where the policy or the metadata
//! check refuses an image.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Run both tools with `args` and require the same stdout and exit status.
fn same(args: &[&str]) -> String {
    let qemu = qemu_img_status(&[&["compare"], args].concat());
    let ours = guard(&[&["compare"], args].concat());
    let (q, o) = (
        String::from_utf8_lossy(&qemu.stdout).into_owned(),
        String::from_utf8_lossy(&ours.stdout).into_owned(),
    );
    assert_eq!(
        (code(&ours), o.as_str()),
        (qemu.status.code().unwrap(), q.as_str()),
        "compare {args:?}: ours (left) vs qemu-img (right); our stderr: {}",
        String::from_utf8_lossy(&ours.stderr)
    );
    q
}

fn img(dir: &Path, name: &str, opts: &str, size: &str, writes: &[&str]) -> PathBuf {
    let p = create(dir, name, opts, size);
    if !writes.is_empty() {
        qemu_io(&p, writes);
    }
    p
}

#[test]
fn messages_and_statuses_match_qemu_img() {
    let dir = tmpdir();
    let d = dir.path();
    let base = &[
        "write -P 1 0 64k",
        "write -P 2 200k 8k",
        "write -z 512k 64k",
    ];
    let a = img(d, "a.qcow2", "cluster_size=4k", "1M", base);
    let same_data = img(d, "b.qcow2", "extended_l2=on,cluster_size=64k", "1M", base);
    let byte = img(
        d,
        "c.qcow2",
        "",
        "1M",
        &[base, &["write -P 9 70000 1"][..]].concat(),
    );
    let first = img(d, "f.qcow2", "", "1M", &["write -P 7 0 1"]);
    let longer_zero = img(d, "l.qcow2", "", "2M", base);
    let longer_data = img(
        d,
        "m.qcow2",
        "",
        "2M",
        &[base, &["write -P 3 1500000 1"][..]].concat(),
    );
    let common_diff = img(
        d,
        "n.qcow2",
        "",
        "2M",
        &["write -P 3 1000 1", "write -P 4 1500000 1"],
    );
    let raw = d.join("a.raw");
    qemu_img(&["convert", "-q", "-O", "raw", s(&a), s(&raw)]);
    let zraw = d.join("c.qcow2z");
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", s(&raw), s(&zraw)]);

    assert_eq!(same(&[s(&a), s(&a)]), "Images are identical.\n");
    assert_eq!(same(&[s(&a), s(&same_data)]), "Images are identical.\n");
    assert_eq!(
        same(&[s(&a), s(&byte)]),
        "Content mismatch at offset 69632!\n"
    );
    assert_eq!(same(&[s(&a), s(&first)]), "Content mismatch at offset 0!\n");
    same(&[s(&byte), s(&a)]);
    assert_eq!(
        same(&[s(&a), s(&longer_zero)]),
        "Warning: Image size mismatch!\nImages are identical.\n"
    );
    assert_eq!(
        same(&[s(&longer_data), s(&a)]),
        "Warning: Image size mismatch!\nContent mismatch at offset 1499648!\n"
    );
    assert_eq!(
        same(&[s(&a), s(&common_diff)]),
        "Content mismatch at offset 0!\n"
    );
    same(&[s(&first), s(&common_diff)]);
    assert_eq!(
        same(&["-s", s(&a), s(&longer_zero)]),
        "Strict mode: Image size mismatch!\n"
    );
    same(&["-s", s(&a), s(&a)]);
    same(&["-s", s(&a), s(&same_data)]);
    // Raw on either side, probed or named; compressed clusters.
    assert_eq!(same(&[s(&raw), s(&a)]), "Images are identical.\n");
    same(&["-f", "raw", "-F", "qcow2", s(&raw), s(&a)]);
    same(&["-s", s(&raw), s(&a)]);
    same(&[s(&zraw), s(&raw)]);
    same(&[s(&zraw), s(&byte)]);
    // qemu-img reads a qcow2 file named as raw as raw bytes.
    same(&["-f", "raw", s(&a), s(&a)]);
    same(&["-f", "raw", s(&a), s(&raw)]);
    // Quiet: nothing printed, the same status.
    assert_eq!(same(&["-q", s(&a), s(&byte)]), "");
    same(&["-q", "-U", "-p", s(&a), s(&a)]);
    // A missing file: exit 2.
    same(&[s(&a), s(&d.join("missing.qcow2"))]);
}

#[test]
fn unsafe_images_are_refused_with_the_finding() {
    let dir = tmpdir();
    let d = dir.path();
    let base = img(d, "base.qcow2", "", "1M", &["write -P 1 0 64k"]);
    let top = overlay(d, "top.qcow2", &base, "qcow2");
    // qemu-img opens the backing file and finds the images identical.
    assert_eq!(same(&[s(&base), s(&base)]), "Images are identical.\n");
    let q = qemu_img_status(&["compare", s(&top), s(&base)]);
    assert_eq!(q.status.code(), Some(0));
    let ours = guard(&["compare", s(&top), s(&base)]);
    assert_eq!(code(&ours), 2);
    assert!(ours.stdout.is_empty());
    let err = String::from_utf8_lossy(&ours.stderr);
    assert!(err.contains("policy_backing_file"), "{err}");

    // An L2 entry pointing into the refcount table: refused by the
    // metadata check before anything is compared.
    let bad = copy(&base, d, "bad.qcow2");
    let l1 = be64(&bad, 40);
    let l2 = be64(&bad, l1) & 0x00ff_ffff_ffff_fe00;
    let rt = be64(&bad, 48);
    patch(&bad, l2, &(rt | 1 << 63).to_be_bytes());
    let ours = guard(&["compare", s(&bad), s(&base)]);
    assert_eq!(code(&ours), 2, "{}", String::from_utf8_lossy(&ours.stderr));
    assert!(String::from_utf8_lossy(&ours.stderr).contains("error ["));
    // Formats other than qcow2 and raw are refused.
    let ours = guard(&["compare", "-f", "vmdk", s(&base), s(&base)]);
    assert_eq!(code(&ours), 2);
}
