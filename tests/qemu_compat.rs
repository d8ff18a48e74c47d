//! The exact `qemu-img` command lines that OpenStack services run on
//! uploaded images, run against qemu-img and against qcow2-guard with the
//! program name changed: on valid images both must give the same exit
//! status and the same answer (the fields qemu-img prints with the same
//! values, the same `map` bytes, the same raw disk), with nothing on our
//! stderr (Glance fails a conversion on any stderr output); on unsafe
//! images qcow2-guard must refuse, naming its finding, and write nothing.
//!
//! Where each line comes from (read in the services' source):
//! - Nova, `nova/privsep/qemu.py` (openstack/nova):
//!   `unprivileged_qemu_img_info` runs `qemu-img info PATH --force-share
//!   --output=json -f FMT`; `unprivileged_convert_image` runs `qemu-img
//!   convert -t CACHE -O FMT -f FMT SRC DST` with CACHE `none` (or
//!   `writeback` where O_DIRECT is not supported).
//! - Glance, `glance/async_/flows/plugins/image_conversion.py`
//!   (openstack/glance, image conversion plugin): `qemu-img info -f FMT
//!   --output=json SRC`, then `qemu-img convert -f FMT -O FMT SRC DST`.
//! - Cinder, `cinder/image/image_utils.py` (openstack/cinder):
//!   `qemu_img_info` runs `qemu-img info -f FMT --output=json
//!   [--force-share] PATH`; `_get_qemu_convert_cmd` builds `qemu-img
//!   convert -O FMT [-t none] [-S 0] -f FMT SRC DST`.
//! - ironic-python-agent, `ironic_python_agent/qemu_img.py`
//!   (openstack/ironic-python-agent): `image_info` runs `qemu-img info
//!   PATH --output=json -f FMT`; `convert_image` builds `qemu-img convert
//!   -O FMT [-t CACHE] [-S SIZE] -f FMT [-W] SRC DST`, which
//!   `extensions/standby.py` calls with `-O host_device -t directsync -S 0
//!   -W` and a block device as DST.
//! - Issue 16 itself: `qemu-img check --output=json IMG` and `qemu-img map
//!   --output=json IMG`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use serde_json::Value;

/// What a command line answers with.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// `info --output=json`: every field qemu-img prints, same value.
    InfoJson,
    /// `check --output=json`: likewise.
    CheckJson,
    /// `map --output=json`: the same bytes.
    MapJson,
    /// `convert`: the same raw disk in DST.
    Convert,
    /// `convert` onto a device too small: both fail, DST untouched.
    ConvertFails,
}

/// One command line: who runs it, and its arguments with `IMG` for the
/// image and `DST` for the output.
struct Line {
    service: &'static str,
    args: &'static [&'static str],
    answer: Answer,
}

const LINES: &[Line] = &[
    Line {
        service: "Nova unprivileged_qemu_img_info",
        args: &[
            "info",
            "IMG",
            "--force-share",
            "--output=json",
            "-f",
            "qcow2",
        ],
        answer: Answer::InfoJson,
    },
    Line {
        service: "Nova unprivileged_convert_image (O_DIRECT)",
        args: &[
            "convert", "-t", "none", "-O", "raw", "-f", "qcow2", "IMG", "DST",
        ],
        answer: Answer::Convert,
    },
    Line {
        service: "Nova unprivileged_convert_image (no O_DIRECT)",
        args: &[
            "convert",
            "-t",
            "writeback",
            "-O",
            "raw",
            "-f",
            "qcow2",
            "IMG",
            "DST",
        ],
        answer: Answer::Convert,
    },
    Line {
        service: "Glance image_conversion info",
        args: &["info", "-f", "qcow2", "--output=json", "IMG"],
        answer: Answer::InfoJson,
    },
    Line {
        service: "Glance image_conversion convert",
        args: &["convert", "-f", "qcow2", "-O", "raw", "IMG", "DST"],
        answer: Answer::Convert,
    },
    Line {
        service: "Cinder qemu_img_info (force_share)",
        args: &[
            "info",
            "-f",
            "qcow2",
            "--output=json",
            "--force-share",
            "IMG",
        ],
        answer: Answer::InfoJson,
    },
    Line {
        service: "Cinder qemu_img_info",
        args: &["info", "-f", "qcow2", "--output=json", "IMG"],
        answer: Answer::InfoJson,
    },
    Line {
        service: "Cinder _get_qemu_convert_cmd (block device, sparse off)",
        args: &[
            "convert", "-O", "raw", "-t", "none", "-S", "0", "-f", "qcow2", "IMG", "DST",
        ],
        answer: Answer::Convert,
    },
    Line {
        service: "Cinder _get_qemu_convert_cmd (file)",
        args: &["convert", "-O", "raw", "-f", "qcow2", "IMG", "DST"],
        answer: Answer::Convert,
    },
    Line {
        service: "ironic-python-agent image_info",
        args: &["info", "IMG", "--output=json", "-f", "qcow2"],
        answer: Answer::InfoJson,
    },
    Line {
        service: "ironic-python-agent convert_image (standby, raw file)",
        args: &[
            "convert",
            "-O",
            "raw",
            "-t",
            "directsync",
            "-S",
            "0",
            "-f",
            "qcow2",
            "-W",
            "IMG",
            "DST",
        ],
        answer: Answer::Convert,
    },
    Line {
        service: "ironic-python-agent convert_image (standby, device too small)",
        args: &[
            "convert",
            "-O",
            "host_device",
            "-t",
            "directsync",
            "-S",
            "0",
            "-f",
            "qcow2",
            "-W",
            "IMG",
            "/dev/null",
        ],
        answer: Answer::ConvertFails,
    },
    Line {
        service: "issue 16: check",
        args: &["check", "--output=json", "IMG"],
        answer: Answer::CheckJson,
    },
    Line {
        service: "issue 16: map",
        args: &["map", "--output=json", "IMG"],
        answer: Answer::MapJson,
    },
];

/// Fields of `qemu-img info` we do not show: the external data file's
/// node (never opened) and LUKS header details (never parsed).
const INFO_QEMU_ONLY: &[&str] = &["/children/1"];

fn fill(args: &[&str], img: &Path, dst: &Path) -> Vec<String> {
    args.iter()
        .map(|a| match *a {
            "IMG" => img.display().to_string(),
            "DST" => dst.display().to_string(),
            a => a.to_owned(),
        })
        .collect()
}

fn run(prog: &str, args: &[String]) -> Output {
    std::process::Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run `line` on the valid image `img` with both tools and compare.
fn same_answer(line: &Line, img: &Path, dir: &Path) {
    let (qdst, odst) = (dir.join("qemu.raw"), dir.join("ours.raw"));
    let _ = std::fs::remove_file(&qdst);
    let _ = std::fs::remove_file(&odst);
    let qemu = run("qemu-img", &fill(line.args, img, &qdst));
    let ours = run(bin(), &fill(line.args, img, &odst));
    let what = format!("{} on {}: {:?}", line.service, img.display(), line.args);
    assert_eq!(
        code(&ours),
        qemu.status.code().unwrap(),
        "{what}: exit status\nqemu-img {}\nours {}",
        text(&qemu),
        text(&ours)
    );
    match line.answer {
        Answer::ConvertFails => {
            assert!(!ours.status.success(), "{what}");
            return;
        }
        _ => assert!(qemu.status.success(), "{what}: {}", text(&qemu)),
    }
    assert!(
        ours.stderr.is_empty(),
        "{what}: our stderr: {}",
        text(&ours)
    );
    match line.answer {
        Answer::InfoJson | Answer::CheckJson => {
            let q: Value = serde_json::from_slice(&qemu.stdout).unwrap();
            let o: Value = serde_json::from_slice(&ours.stdout).unwrap();
            let skip = match line.answer {
                Answer::InfoJson => INFO_QEMU_ONLY,
                _ => &[],
            };
            let (mut errors, mut compared) = (Vec::new(), Vec::new());
            walk(&q, &o, "", skip, true, &mut errors, &mut compared);
            assert!(errors.is_empty(), "{what}:\n  {}", errors.join("\n  "));
            assert!(compared.len() > 3, "{what}: nothing compared");
        }
        Answer::MapJson => assert!(qemu.stdout == ours.stdout, "{what}:\n{}", text(&ours)),
        Answer::Convert => {
            let (q, o) = (std::fs::read(&qdst).unwrap(), std::fs::read(&odst).unwrap());
            assert!(q == o, "{what}: the raw disks differ");
        }
        Answer::ConvertFails => {}
    }
}

/// Run `line` with qcow2-guard on the unsafe image `img`: refused, the
/// finding named, nothing written.
fn refused(line: &Line, img: &Path, dir: &Path, finding: &str) {
    let dst = dir.join("refused.raw");
    let _ = std::fs::remove_file(&dst);
    let ours = run(bin(), &fill(line.args, img, &dst));
    let what = format!("{} on {}: {:?}", line.service, img.display(), line.args);
    let status = code(&ours);
    assert!(
        status == 4 || status == 2 || status == 1,
        "{what}: exit {status}"
    );
    if !matches!(line.answer, Answer::ConvertFails) {
        assert_ne!(status, 1, "{what}: {}", text(&ours));
        assert!(
            text(&ours).contains(finding),
            "{what}: no {finding}: {}",
            text(&ours)
        );
    }
    assert!(!dst.exists(), "{what}: wrote {}", dst.display());
}

/// Valid images of several kinds, made with qemu-img.
fn valid_images(d: &Path) -> Vec<PathBuf> {
    let plain = create(d, "plain.qcow2", "", "4M");
    qemu_io(
        &plain,
        &[
            "write -P 0xaa 0 64k",
            "write -z 1M 64k",
            "write -P 1 3M 100k",
        ],
    );
    let small = create(d, "small.qcow2", "cluster_size=4k,refcount_bits=8", "2M");
    qemu_io(
        &small,
        &["write -P 2 8k 20k", "write -z 1M 8k", "discard 16k 4k"],
    );
    let ext = create(d, "ext.qcow2", "extended_l2=on,cluster_size=32k", "2M");
    qemu_io(&ext, &["write -P 3 2k 1k", "write -z 64k 4k"]);
    let v2 = create(d, "v2.qcow2", "compat=0.10", "1M");
    qemu_io(&v2, &["write -P 4 0 128k"]);
    let snap = create(d, "snap.qcow2", "cluster_size=4k", "1M");
    qemu_io(&snap, &["write -P 5 0 64k"]);
    qemu_img(&["snapshot", "-c", "s1", snap.to_str().unwrap()]);
    qemu_io(&snap, &["write -P 6 0 8k"]);
    let raw = d.join("src.raw");
    write_raw(&raw, 1 << 20, 9);
    let zlib = compress(&raw, &d.join("zlib.qcow2"), "cluster_size=4k");
    let zstd = compress(&raw, &d.join("zstd.qcow2"), "compression_type=zstd");
    vec![plain, small, ext, v2, snap, zlib, zstd]
}

#[test]
fn service_command_lines_match_qemu_img_on_valid_images() {
    let dir = tmpdir();
    let d = dir.path();
    for img in valid_images(d) {
        // Flush delayed allocation: map asks the file system for holes.
        std::fs::File::open(&img).unwrap().sync_all().unwrap();
        for line in LINES {
            same_answer(line, &img, d);
        }
    }
}

#[test]
fn service_command_lines_refuse_unsafe_images() {
    let dir = tmpdir();
    let d = dir.path();
    // A backing file naming a host file (CVE-2022-47951 family).
    let passwd = d.join("passwd.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        passwd.to_str().unwrap(),
        "1M",
    ]);
    // An external data file naming a host file (CVE-2024-32498).
    let df = d.join("df.qcow2");
    let opts = format!("data_file={}", d.join("df.data").display());
    create(d, "df.qcow2", &opts, "1M");
    // Refcounts pointing into the L1 table: corrupt.
    let bad = create(d, "bad.qcow2", "", "1M");
    qemu_io(&bad, &["write -P 1 0 64k"]);
    let l1 = be64(&bad, 40);
    let l2 = be64(&bad, l1) & 0x00ff_ffff_ffff_fe00;
    let rt = be64(&bad, 48);
    patch(&bad, l2, &(rt | 1 << 63).to_be_bytes());
    let cases: [(&Path, &str); 3] = [
        (&passwd, "policy_backing_file"),
        (&df, "policy_external_data_file"),
        (&bad, "data_overlaps_metadata"),
    ];
    for (img, finding) in cases {
        for line in LINES {
            // info reads the header only: the corrupt L2 entry is check's
            // and convert's business (info itself says exit 0).
            if finding == "data_overlaps_metadata" && matches!(line.answer, Answer::InfoJson) {
                continue;
            }
            refused(line, img, d, finding);
        }
    }
}

/// `convert -l` converts an internal snapshot, chosen by ID or name, as
/// qemu-img does (the snapshot's tables, the image's current size).
#[test]
fn convert_snapshot_like_qemu_img() {
    let dir = tmpdir();
    let d = dir.path();
    let img = create(d, "s.qcow2", "cluster_size=4k", "1M");
    qemu_io(&img, &["write -P 1 0 64k", "write -P 9 900k 4k"]);
    let p = img.to_str().unwrap();
    qemu_img(&["snapshot", "-c", "first", p]);
    qemu_io(&img, &["write -P 2 0 8k", "write -z 900k 4k"]);
    qemu_img(&["snapshot", "-c", "second", p]);
    qemu_io(&img, &["write -P 3 4k 4k"]);
    // Grown after the snapshots: their L1 tables cover less than the disk.
    qemu_img(&["resize", "-q", p, "5M"]);
    for sel in [
        "first",
        "1",
        "second",
        "2",
        "snapshot.id=1",
        "snapshot.name=second",
        "snapshot.id=2,snapshot.name=second",
    ] {
        let (q, o) = (d.join("q.raw"), d.join("o.raw"));
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&o);
        qemu_img(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "-l",
            sel,
            p,
            q.to_str().unwrap(),
        ]);
        let out = guard(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "-l",
            sel,
            p,
            o.to_str().unwrap(),
        ]);
        assert_eq!(
            code(&out),
            0,
            "{sel}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::read(&q).unwrap() == std::fs::read(&o).unwrap(),
            "-l {sel}"
        );
    }
    // The snapshots differ from each other and from the active disk.
    let raw = |args: &[&str], name: &str| {
        let o = d.join(name);
        let out = guard(&[&["convert", "-q"], args, &[p, o.to_str().unwrap()]].concat());
        assert_eq!(code(&out), 0);
        std::fs::read(o).unwrap()
    };
    let (a, b, c) = (
        raw(&["-l", "1"], "1.raw"),
        raw(&["-l", "2"], "2.raw"),
        raw(&[], "c.raw"),
    );
    assert!(a != b && b != c && a != c);
    // A snapshot that is not there: qemu-img's exit status 1, no output.
    for sel in ["third", "snapshot.id=1,snapshot.name=second"] {
        let o = d.join("none.raw");
        let q = qemu_img_status(&["convert", "-O", "raw", "-l", sel, p, o.to_str().unwrap()]);
        assert_eq!(q.status.code(), Some(1));
        let out = guard(&["convert", "-O", "raw", "-l", sel, p, o.to_str().unwrap()]);
        assert_eq!(code(&out), 1, "{sel}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Can't find snapshot"));
        assert!(!o.exists());
    }
}

/// Formats other than qcow2 are refused, whatever the command.
#[test]
fn other_formats_are_refused() {
    let dir = tmpdir();
    let img = create(dir.path(), "a.qcow2", "", "1M");
    let p = img.to_str().unwrap();
    let dst = dir.path().join("o.raw");
    for args in [
        vec!["info", "-f", "raw", p],
        vec!["check", "-f", "vmdk", p],
        vec!["map", "-f", "raw", p],
        vec![
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            p,
            dst.to_str().unwrap(),
        ],
    ] {
        let out = guard(&args);
        assert_eq!(code(&out), 1, "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("only qcow2"));
        assert!(!dst.exists());
    }
    let out = guard(&["convert", "-O", "qcow2", p, dst.to_str().unwrap()]);
    assert_eq!(code(&out), 1);
    let out = guard(&["convert", "-t", "bogus", p, dst.to_str().unwrap()]);
    assert_eq!(code(&out), 1);
}
