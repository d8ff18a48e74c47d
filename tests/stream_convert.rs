//! `qcow2-guard convert - OUTPUT`: the raw disk written from a pipe as the
//! qcow2 passes, against `qemu-img convert -O raw` of the same file; and
//! hostile streams, refused with nothing written and reading stopped.
//! (The layout catalogue, converted through the library at 4 KiB and 64
//! KiB chunks, is in tests/stream.rs.)

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use qcow2_guard::l1l2::Cluster;
use qcow2_guard::Image;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `sh -c "{feed} | qcow2-guard convert {args} - OUT"`, under a 120 s
/// timeout (a conversion that kept reading an endless feed is killed:
/// exit 124).
fn piped(feed: &str, args: &str, out: &Path) -> Output {
    let cmd = format!(
        "{feed} | timeout 120 '{}' convert -q {args} - '{}'",
        bin(),
        s(out)
    );
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh")
}

fn qemu_raw(image: &Path, dir: &Path) -> Vec<u8> {
    let p = dir.join("qemu.raw");
    qemu_img(&["convert", "-O", "raw", s(image), s(&p)]);
    std::fs::read(&p).expect("read qemu-img's output")
}

/// Names in `dir` besides the ones given (a temporary output or spool left
/// behind would show here).
fn others(dir: &Path, known: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !known.contains(&n.as_str()))
        .collect();
    v.sort();
    v
}

fn image(dir: &Path, name: &str, opts: &[&str]) -> PathBuf {
    let r = dir.join("src.raw");
    write_raw(&r, 4 << 20, 7);
    let p = dir.join(name);
    let mut a = vec!["convert", "-O", "qcow2"];
    a.extend_from_slice(opts);
    a.extend([s(&r), s(&p)]);
    qemu_img(&a);
    p
}

#[test]
fn forward_layouts_convert_from_a_pipe() {
    let d = tmpdir();
    for (name, opts) in [
        ("plain.qcow2", &[][..]),
        ("c.qcow2", &["-c"][..]),
        ("zstd.qcow2", &["-c", "-o", "compression_type=zstd"][..]),
        ("ext.qcow2", &["-o", "extended_l2=on"][..]),
    ] {
        let p = image(d.path(), name, opts);
        let want = qemu_raw(&p, d.path());
        let out = d.path().join("out.raw");
        let o = piped(&format!("cat '{}'", s(&p)), "", &out);
        assert_eq!(
            code(&o),
            0,
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(std::fs::read(&out).unwrap() == want, "{name}: differs");
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn backward_layout_refused_without_spool_converted_with_one() {
    let d = tmpdir();
    // The sample's L2 tables come before the L1 table that points at them.
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sample.qcow2");
    let p = copy(&sample, d.path(), "in.qcow2");
    let want = qemu_raw(&p, d.path());
    let out = d.path().join("out.raw");
    let feed = format!("cat '{}'", s(&p));

    let o = piped(&feed, "", &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 1, "{err}");
    assert!(
        err.contains("[needs_random_access] at 0x4000: bytes 0x4000..0x5000"),
        "{err}"
    );
    assert_eq!(
        others(d.path(), &["in.qcow2", "qemu.raw"]),
        Vec::<String>::new()
    );

    let spool = d.path().join("spool.qcow2");
    let o = piped(&feed, &format!("--spool '{}'", s(&spool)), &out);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == want);
    assert!(std::fs::read(&spool).unwrap() == std::fs::read(&p).unwrap());
}

#[test]
fn refused_early_stops_reading_and_writes_nothing() {
    let d = tmpdir();
    let base = image(d.path(), "base.qcow2", &[]);
    let top = overlay(d.path(), "top.qcow2", &base, "qcow2");
    let out = d.path().join("out.raw");
    let spool = d.path().join("spool.qcow2");
    let known = ["base.qcow2", "top.qcow2", "src.raw"];
    // A backing file, then endless zeros: refused once the header cluster
    // has passed, so the endless feed ends (no timeout, exit 124).
    for args in [String::new(), format!("--spool '{}'", s(&spool))] {
        let o = piped(&format!("cat '{}' /dev/zero", s(&top)), &args, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(code(&o), 4, "{args}: {err}");
        assert!(err.contains("policy_backing_file"), "{err}");
        assert_eq!(others(d.path(), &known), Vec::<String>::new(), "{args}");
    }
    // Not qcow2 at all.
    let o = piped("cat /dev/zero", "", &out);
    assert_eq!(code(&o), 1, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad_magic"));
    assert_eq!(others(d.path(), &known), Vec::<String>::new());
}

/// The exit code and stderr of converting the stored file.
fn stored(p: &Path, out: &Path) -> i32 {
    let o = guard(&["convert", "-q", s(p), s(out)]);
    assert!(!out.exists(), "converted a hostile image");
    code(&o)
}

#[test]
fn refused_at_the_end_like_the_stored_file() {
    let d = tmpdir();
    let out = d.path().join("out.raw");

    // A refcount of zero for a cluster in use: the metadata audit refuses.
    let p = image(d.path(), "rc.qcow2", &[]);
    let rt = be64(&p, 48);
    let block = be64(&p, rt);
    let last = std::fs::metadata(&p).unwrap().len() / 65536 - 1;
    patch(&p, block + 2 * last, &[0, 0]);
    let want = stored(&p, &out);
    assert_eq!(want, 2);
    let o = piped(&format!("cat '{}'", s(&p)), "", &out);
    assert_eq!(code(&o), want, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.exists());

    // A compressed payload that does not decompress.
    let p = image(d.path(), "z.qcow2", &["-c"]);
    let img = Image::open(qcow2_guard::FileSource::open(&p).unwrap()).unwrap();
    let Ok(Cluster::Compressed(desc)) = img.cluster(0) else {
        panic!("cluster 0 is not compressed")
    };
    drop(img);
    patch(&p, desc.start(), &[0xff; 16]);
    let want = stored(&p, &out);
    assert_ne!(want, 0);
    let o = piped(&format!("cat '{}'", s(&p)), "", &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), want, "{err}");
    assert!(err.contains("decompress"), "{err}");
    assert!(!out.exists());
}

#[test]
fn outputs_that_cannot_wait_are_refused() {
    let d = tmpdir();
    let p = image(d.path(), "a.qcow2", &[]);
    let feed = format!("cat '{}'", s(&p));
    for (args, out) in [
        ("", Path::new("-")),
        ("", Path::new("/dev/null")),
        (
            "--allow-backing --backing /dev/null",
            &d.path().join("o.raw"),
        ),
        ("-l s1", &d.path().join("o.raw")),
    ] {
        let o = piped(&feed, args, out);
        assert_eq!(code(&o), 1, "{args} {}", out.display());
        assert!(o.stdout.is_empty());
    }
    assert!(!d.path().join("o.raw").exists());
}
