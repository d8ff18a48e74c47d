//! QEMU parity: disagreement classes found by the differential engine
//! (`differential/`), each reproduced on a qemu-img image patched by hand.
//! Every case asserts what QEMU does (the oracle) and what we do, so a
//! case fails when either side moves.

mod common;

use std::path::Path;

use common::*;

fn set64(p: &Path, off: u64, v: u64) {
    patch(p, off, &v.to_be_bytes());
}

/// `qemu-img check` exit status and whether it could open the image.
fn qemu_check(p: &Path) -> (i32, String) {
    let out = qemu_img_status(&["check", p.to_str().expect("utf-8")]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("qemu-img exit code"), text)
}

/// Our `check` exit status and its JSON findings' codes.
fn our_check(p: &Path) -> (i32, Vec<String>) {
    our_check_with(p, &[])
}

/// [`our_check`] with more arguments (policy flags).
fn our_check_with(p: &Path, args: &[&str]) -> (i32, Vec<String>) {
    let mut all = vec!["check", "--json"];
    all.extend_from_slice(args);
    all.push(p.to_str().expect("utf-8"));
    let out = guard(&all);
    let v = json(&out);
    let mut codes: Vec<String> = v["findings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["code"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if let Some(c) = v["error"]["code"].as_str() {
        codes.push(c.to_string());
    }
    (code(&out), codes)
}

/// An L1 entry of 0x8000000000000000 (copied flag, offset 0) where the
/// entry was empty. QEMU's read path calls it unallocated, but `qemu-img
/// check` walks cluster 0 as an L2 table and reports corruption: the
/// stricter side wins, `check` must not exit 0.
#[test]
fn l1_entry_with_flags_and_offset_zero() {
    let dir = tmpdir();
    let img = create(dir.path(), "a.qcow2", "cluster_size=512", "4M");
    qemu_io(&img, &["write -P 0xaa 0 4k"]);
    let l1 = be64(&img, 40);
    assert_eq!(be64(&img, l1 + 8), 0, "second L1 entry starts empty");
    set64(&img, l1 + 8, 1 << 63);
    let (q, text) = qemu_check(&img);
    assert_eq!(q, 2, "qemu-img check calls it corrupt: {text}");
    let (ours, codes) = our_check(&img);
    assert_eq!(ours, 2, "{codes:?}");
    assert!(codes.iter().any(|c| c == "metadata_overlap"), "{codes:?}");
}

/// `snapshots_offset` unaligned or beyond i64::MAX with `nb_snapshots` 0:
/// QEMU validates the offset anyway ("snapshot table offset invalid").
/// An aligned offset inside i64 range is fine for both.
#[test]
fn snapshots_offset_checked_with_no_snapshots() {
    let dir = tmpdir();
    let base = create(dir.path(), "base.qcow2", "", "1M");
    for (value, qemu_ok, code) in [
        (0x200u64, false, Some("unaligned")),
        (0x8000_0000_0000_0000, false, Some("offset_overflow")),
        (0xffff_ffff_ffff_0000, false, Some("offset_overflow")),
        (0x7fff_ffff_ffff_0000, true, None),
        (0x10_0000_0000, true, None),
    ] {
        let img = copy(&base, dir.path(), "s.qcow2");
        assert_eq!(be32(&img, 60), 0);
        set64(&img, 64, value);
        let (q, text) = qemu_check(&img);
        assert_eq!(
            !text.contains("offset invalid") && q == 0,
            qemu_ok,
            "{value:#x}: {text}"
        );
        let (ours, codes) = our_check(&img);
        match code {
            Some(c) => {
                assert_eq!(ours, 2, "{value:#x}: {codes:?}");
                assert_eq!(codes, [c], "{value:#x}");
            }
            None => assert_eq!(ours, 0, "{value:#x}: {codes:?}"),
        }
    }
}

/// The active L1 table of a zero-sized disk (l1_size 0): QEMU still
/// refuses an unaligned l1_table_offset ("Active L1 table offset invalid").
#[test]
fn empty_l1_table_offset_must_be_aligned() {
    let dir = tmpdir();
    let img = create(dir.path(), "z.qcow2", "", "0");
    assert_eq!(be32(&img, 36), 0, "l1_size");
    set64(&img, 40, 0x200);
    let (q, text) = qemu_check(&img);
    assert_ne!(q, 0, "{text}");
    assert!(text.contains("Active L1 table offset invalid"), "{text}");
    let (ours, codes) = our_check(&img);
    assert_eq!((ours, codes), (2, vec!["unaligned".to_string()]));
}

/// With extended L2 the standard entry's bit 0 is reserved ("always 0").
/// QEMU ignores it (check clean, reads the data); we refuse it, a
/// deliberate difference written in SECURITY.md.
#[test]
fn extended_l2_entry_bit_0_is_reserved() {
    let dir = tmpdir();
    let img = create(
        dir.path(),
        "e.qcow2",
        "extended_l2=on,cluster_size=64k",
        "4M",
    );
    qemu_io(&img, &["write -P 0xaa 0 64k"]);
    let l1 = be64(&img, 40);
    let l2 = be64(&img, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(&img, l2);
    assert_eq!(entry & 1, 0);
    set64(&img, l2, entry | 1);
    let (q, text) = qemu_check(&img);
    assert_eq!(q, 0, "QEMU ignores the bit: {text}");
    let (ours, codes) = our_check(&img);
    assert_eq!(ours, 2, "{codes:?}");
    assert_eq!(codes.first().map(String::as_str), Some("reserved_bits"));
    let out = dir.path().join("out.raw");
    let conv = guard(&[
        "convert",
        "-q",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(code(&conv), 2);
    assert!(!out.exists());
}

/// A virtual size that is not a multiple of 512: QEMU exposes size / 512
/// whole sectors and `qemu-img convert` writes that many bytes; so do we.
#[test]
fn unaligned_virtual_size_reads_whole_sectors() {
    let dir = tmpdir();
    let img = create(dir.path(), "v.qcow2", "", "1M");
    qemu_io(&img, &["write -P 0xaa 0 1M"]);
    set64(&img, 24, (1 << 20) - 100);
    let (q, text) = qemu_check(&img);
    assert_eq!(q, 0, "{text}");
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("qemu.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        theirs.to_str().unwrap(),
    ]);
    let conv = guard(&[
        "convert",
        "-q",
        img.to_str().unwrap(),
        ours.to_str().unwrap(),
    ]);
    assert_eq!(code(&conv), 0, "{}", String::from_utf8_lossy(&conv.stderr));
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert_eq!(b.len(), (1 << 20) - 512);
    assert_eq!(a.len(), b.len());
    assert!(a == b, "outputs differ");
}

/// The end-of-extensions record's length is checked by QEMU before its
/// type: a length past the extension area makes the image unopenable
/// ("Header extension too large"). Found by the differential engine.
#[test]
fn end_of_extensions_length_is_checked() {
    let dir = tmpdir();
    let base = create(dir.path(), "x.qcow2", "", "1M");
    // Find the end marker (type 0) after the 112-byte header.
    let mut at = 112;
    while be32(&base, at) != 0 {
        at += 8 + u64::from(be32(&base, at + 4)).next_multiple_of(8);
    }
    for (len, qemu_opens) in [(0x400_0000u32, false), (8, true)] {
        let img = copy(&base, dir.path(), "e.qcow2");
        patch(&img, at + 4, &len.to_be_bytes());
        let (q, text) = qemu_check(&img);
        assert_eq!(
            !text.contains("Header extension too large") && q == 0,
            qemu_opens,
            "{text}"
        );
        let (ours, codes) = our_check(&img);
        if qemu_opens {
            assert_eq!(ours, 0, "{codes:?}");
        } else {
            assert_eq!((ours, codes), (2, vec!["extension_too_large".to_string()]));
        }
    }
}

/// An image with an external data file (plain and raw): an L2 entry whose
/// host offset is not its cluster's guest offset. `qemu-img check` finds
/// nothing, but QEMU's read path refuses the cluster (EIO, "External data
/// file host cluster offset ... does not match guest cluster offset") and
/// marks the image corrupt: the stricter side wins. With the zero flag and
/// offset 0 the entry has no host cluster (QEMU tests the zero flag first)
/// and reads as zeros. Found by the differential engine's data-file seeds.
#[test]
fn data_file_host_offset_must_equal_guest_offset() {
    let dir = tmpdir();
    for raw in ["off", "on"] {
        let data = dir.path().join(format!("d-{raw}.data"));
        let opts = format!(
            "data_file={},data_file_raw={raw},cluster_size=4096",
            data.display()
        );
        let base = create(dir.path(), &format!("base-{raw}.qcow2"), &opts, "1M");
        qemu_io(&base, &["write -P 0xaa 0 12k"]);
        let l2 = be64(&base, be64(&base, 40)) & 0x00ff_ffff_ffff_fe00;
        // Entry 1 maps guest 0x1000 to host 0x1000 of the data file.
        assert_eq!(be64(&base, l2 + 8), 0x8000_0000_0000_1000);
        for (entry, qemu_reads) in [
            (0x8000_0000_0000_2000u64, false), // data at another cluster
            (0x8000_0000_0000_2001, false),    // preallocated zeros, wrong host
            (0x8000_0000_0000_0000, false),    // copied + offset 0: host 0
            (0x8000_0000_0000_1001, true),     // zeros at the right host
            (0x8000_0000_0000_0001, true),     // zeros, no host cluster
        ] {
            let img = copy(&base, dir.path(), "m.qcow2");
            set64(&img, l2 + 8, entry);
            let (q, text) = qemu_check(&img);
            assert_eq!(q, 0, "qemu-img check finds nothing ({entry:#x}): {text}");
            let qemu_raw = dir.path().join("qemu.raw");
            let p = |x: &Path| x.to_str().expect("utf-8").to_string();
            let qc = qemu_img_status(&["convert", "-O", "raw", &p(&img), &p(&qemu_raw)]);
            assert_eq!(
                qc.status.success(),
                qemu_reads,
                "qemu-img convert of {entry:#x}"
            );
            let (ours, codes) = our_check_with(&img, &["--allow-data-file"]);
            if qemu_reads {
                assert_eq!((ours, codes), (0, vec![]), "{entry:#x}");
                let ours_raw = dir.path().join("ours.raw");
                let out = guard(&[
                    "convert",
                    "-q",
                    "--allow-data-file",
                    "--data-file",
                    &p(&data),
                    &p(&img),
                    &p(&ours_raw),
                ]);
                assert_eq!(code(&out), 0);
                assert_eq!(std::fs::read(&ours_raw).ok(), std::fs::read(&qemu_raw).ok());
            } else {
                assert_eq!(ours, 2, "{entry:#x}: {codes:?}");
                assert!(
                    codes.iter().any(|c| c == "data_file_offset_mismatch"),
                    "{entry:#x}: {codes:?}"
                );
            }
        }
    }
}
