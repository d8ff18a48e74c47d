//! External data files shorter than what the image maps. QEMU (10.0.2)
//! reads zeros past the data file's end on every path (`qemu-io`,
//! `qemu-img convert`, `compare`), and `qemu-img check` does not look at
//! the data file's length. We refuse a guest byte mapped past the data
//! file's end as lost (`past_eof`, as for the image file: SECURITY.md),
//! with one rule (`Cluster::check_data_file_reach`) that reads, the
//! check and the conversion (its audit) all call; bytes past the end of
//! the virtual disk are never read, so a data file that `qemu-img resize
//! --shrink` cut inside a mapped cluster is accepted.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use qcow2_guard::check::{check, CheckOptions, Verdict};
use qcow2_guard::convert::{prepare, ConvertError, ConvertOptions, Inputs};
use qcow2_guard::{FileSource, Image, Policy};

fn policy() -> Policy {
    Policy {
        allow_data_file: true,
        ..Policy::default()
    }
}

/// An image with an external data file (`data_file_raw=RAW`), `cluster`
/// bytes a cluster, `size` long, with `writes` done by qemu-io; returns
/// (image, data file).
fn image(dir: &Path, raw: &str, cluster: u32, size: &str, writes: &[&str]) -> (PathBuf, PathBuf) {
    let data = dir.join(format!("data-{raw}.raw"));
    let opts = format!(
        "data_file={},data_file_raw={raw},cluster_size={cluster}",
        data.display()
    );
    let img = create(dir, &format!("img-{raw}.qcow2"), &opts, size);
    qemu_io(&img, writes);
    (img, data)
}

fn truncate(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .and_then(|f| f.set_len(len))
        .expect("truncate data file");
}

fn open(img: &Path, data: &Path) -> Image<FileSource> {
    let mut image = Image::open(FileSource::open(img).expect("open image")).expect("open qcow2");
    image.set_data_file(Arc::new(FileSource::open(data).expect("open data file")));
    image
}

/// The library's full check with the data file handed in: (verdict,
/// finding codes).
fn our_check(img: &Path, data: &Path) -> (Verdict, Vec<String>) {
    let opts = CheckOptions {
        policy: policy(),
        ..CheckOptions::default()
    };
    let r = check(&open(img, data), &opts);
    (
        r.verdict,
        r.findings.iter().map(|f| f.code.to_string()).collect(),
    )
}

/// Our `check` CLI with `--data-file`: (exit status, finding codes).
fn cli_check(img: &Path, data: &Path) -> (i32, Vec<String>) {
    let out = guard(&[
        "check",
        "--json",
        "--allow-data-file",
        "--data-file",
        s(data),
        s(img),
    ]);
    let codes = json(&out)["findings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["code"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (code(&out), codes)
}

/// `qemu-img check` finds the image clean.
fn qemu_check_clean(img: &Path) {
    let out = qemu_img_status(&["check", s(img)]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}",
        img.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `qemu-img convert -O raw` of `img`, read back.
fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu.raw");
    qemu_img(&["convert", "-O", "raw", s(img), s(&out)]);
    std::fs::read(&out).expect("read qemu-img output")
}

/// Our `convert` CLI: (exit status, output bytes if written).
fn our_convert(img: &Path, data: &Path, dir: &Path) -> (i32, Option<Vec<u8>>) {
    let out = dir.join("ours.raw");
    let _ = std::fs::remove_file(&out);
    let run = guard(&[
        "convert",
        "-q",
        "--allow-data-file",
        "--data-file",
        s(data),
        s(img),
        s(&out),
    ]);
    (code(&run), std::fs::read(&out).ok())
}

/// The library's conversion of the whole disk, into memory.
fn library_convert(img: &Path, data: &Path) -> Result<Vec<u8>, ConvertError> {
    let src = FileSource::open(img).expect("open image");
    let inputs = Inputs::new(src).with_data_file(FileSource::open(data).expect("open data file"));
    let opts = ConvertOptions {
        policy: policy(),
        ..ConvertOptions::default()
    };
    let conversion = prepare(inputs, &opts)?;
    let sink = qcow2_guard::convert::WriteSink::new(Vec::new());
    conversion.run(&sink, None)?;
    Ok(sink.into_inner().expect("sink"))
}

/// The fuzz finding's shape on qemu-img images: the second L2 table
/// (512-byte clusters: 32 KiB of guest per table) maps only clusters past
/// the end of the truncated data file. QEMU reads them as zeros and
/// `qemu-img check` is clean; we refuse them on every path. Before the
/// one rule, the conversion skipped that table as a hole of the data file
/// (both sinks succeeded) while `read_at` refused.
#[test]
fn whole_table_past_data_file_end_is_refused_everywhere() {
    let dir = tmpdir();
    for raw in ["off", "on"] {
        let (img, data) = image(
            dir.path(),
            raw,
            512,
            "1M",
            &["write -P 0xaa 0 4k", "write -P 0xbb 512k 4k"],
        );
        truncate(&data, 64 * 1024);
        qemu_check_clean(&img);
        qemu_io(&img, &["read -P 0 512k 4k"]);
        assert_eq!(qemu_raw(&img, dir.path()).get(512 * 1024), Some(&0));

        match library_convert(&img, &data) {
            Err(ConvertError::Audit { report, .. }) => {
                assert!(report.findings.iter().any(|f| f.code == "past_eof"));
            }
            other => panic!("raw={raw}: conversion not refused by its audit: {other:?}"),
        }
        let image = open(&img, &data);
        let mut disk = vec![0u8; 1 << 20];
        let err = image.read_at(0, &mut disk).expect_err("read_at refuses");
        assert_eq!(err.code(), "past_eof", "raw={raw}");
        let (verdict, codes) = our_check(&img, &data);
        assert_eq!(verdict, Verdict::Corrupt, "raw={raw}: {codes:?}");
        assert!(
            codes.iter().all(|c| c == "past_eof"),
            "raw={raw}: {codes:?}"
        );
        assert_eq!(cli_check(&img, &data), (2, codes), "raw={raw}");
        assert_eq!(our_convert(&img, &data, dir.path()), (2, None), "raw={raw}");
    }
}

/// A cluster cut by the data file's end inside the virtual disk: the
/// guest bytes past the cut are lost (QEMU reads zeros there, check
/// clean). The check with the data file finds it (before the one rule it
/// did not look), reads and the conversion refuse.
#[test]
fn cluster_cut_by_data_file_end_is_refused() {
    let dir = tmpdir();
    for raw in ["off", "on"] {
        let (img, data) = image(
            dir.path(),
            raw,
            65536,
            "1M",
            &["write -P 0xaa 0 64k", "write -P 0xbb 128k 4k"],
        );
        truncate(&data, 132 * 1024);
        qemu_check_clean(&img);
        qemu_io(&img, &["read -P 0xbb 128k 4k", "read -P 0 132k 60k"]);

        let (verdict, codes) = our_check(&img, &data);
        assert_eq!(verdict, Verdict::Corrupt, "raw={raw}: {codes:?}");
        assert!(
            codes.contains(&"past_eof".to_string()),
            "raw={raw}: {codes:?}"
        );
        assert_eq!(cli_check(&img, &data), (2, codes), "raw={raw}");
        let mut buf = vec![0u8; 4096];
        let err = open(&img, &data)
            .read_at(128 * 1024, &mut buf)
            .expect_err("refused");
        assert_eq!(err.code(), "past_eof");
        assert!(matches!(
            library_convert(&img, &data),
            Err(ConvertError::Audit { .. })
        ));
        assert_eq!(our_convert(&img, &data, dir.path()), (2, None), "raw={raw}");
    }
}

/// `qemu-img resize --shrink` to 100 KiB truncates the data file to
/// exactly 100 KiB while L2 entry 1 still maps guest 64..128 KiB: every
/// byte of the disk is in the data file. Accepted, and read byte for byte
/// as QEMU does (before the rule clipped to the disk, `read_at` refused
/// the cluster).
#[test]
fn shrunk_disk_cuts_its_last_cluster_and_is_accepted() {
    let dir = tmpdir();
    for raw in ["off", "on"] {
        let (img, data) = image(dir.path(), raw, 65536, "1M", &["write -P 0xaa 0 1M"]);
        qemu_img(&["resize", "-q", "--shrink", s(&img), "100k"]);
        assert_eq!(
            std::fs::metadata(&data).map(|m| m.len()).ok(),
            Some(102_400)
        );
        qemu_check_clean(&img);
        let expected = qemu_raw(&img, dir.path());
        assert_eq!(expected.len(), 102_400);

        assert_eq!(our_check(&img, &data), (Verdict::Ok, vec![]), "raw={raw}");
        assert_eq!(cli_check(&img, &data), (0, vec![]), "raw={raw}");
        let mut disk = vec![0u8; expected.len()];
        open(&img, &data).read_at(0, &mut disk).expect("read_at");
        assert!(disk == expected, "raw={raw}: read_at differs from qemu-img");
        assert!(library_convert(&img, &data).expect("library convert") == expected);
        assert_eq!(
            our_convert(&img, &data, dir.path()),
            (0, Some(expected)),
            "raw={raw}"
        );
        let map = guard(&["map", "--allow-data-file", "--data-file", s(&data), s(&img)]);
        assert_eq!(code(&map), 0, "raw={raw}");
    }
}

/// A data file shorter than the virtual disk whose mapped clusters all
/// lie inside it: accepted, the same bytes as `qemu-img convert`.
#[test]
fn short_data_file_with_every_mapped_cluster_inside_is_accepted() {
    let dir = tmpdir();
    let (img, data) = image(
        dir.path(),
        "off",
        65536,
        "1M",
        &["write -P 0xaa 0 64k", "write -P 0xbb 128k 4k"],
    );
    truncate(&data, 192 * 1024);
    qemu_check_clean(&img);
    let expected = qemu_raw(&img, dir.path());
    assert_eq!(our_check(&img, &data), (Verdict::Ok, vec![]));
    let mut disk = vec![0u8; expected.len()];
    open(&img, &data).read_at(0, &mut disk).expect("read_at");
    assert!(disk == expected);
    assert_eq!(our_convert(&img, &data, dir.path()), (0, Some(expected)));
}
