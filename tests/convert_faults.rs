//! `convert` under hostile input and faults (issue 11): bounded output,
//! no conversion without the audit, nothing left behind (errors, full
//! disks, vanished or read-only directories, SIGTERM, SIGINT, SIGHUP,
//! SIGKILL), durable success, special outputs.
//!
//! Faults that need a file system of their own (a full disk, a read-only
//! directory) mount a small tmpfs in a private mount namespace
//! (`unshare -m`, as root; CI runs as root). Block devices are loop
//! devices over a scratch file; /dev/null is only ever written through,
//! and checked to still be the null device afterwards.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use qcow2_guard::convert::{
    code as ccode, prepare, ConvertError, ConvertOptions, Inputs, WriteSink,
};
use qcow2_guard::FileSource;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A small image with `data` MiB of incompressible data from guest 0.
fn data_image(dir: &Path, name: &str, size: &str, data_mib: usize) -> PathBuf {
    let raw = dir.join(format!("{name}.src"));
    write_raw(&raw, data_mib << 20, 7);
    let img = dir.join(name);
    qemu_img(&["convert", "-q", "-O", "qcow2", s(&raw), s(&img)]);
    fs::remove_file(&raw).unwrap();
    if !size.is_empty() {
        qemu_img(&["resize", "-q", "-f", "qcow2", s(&img), size]);
    }
    img
}

/// The amplification image: a 64 TiB disk whose every L1 entry
/// points at one L2 table whose every entry points at one data cluster.
fn amplification_image(dir: &Path) -> PathBuf {
    let img = create(dir, "amp.qcow2", "", "64T");
    qemu_io(&img, &["write -P 0x5a 0 64k"]);
    let l1 = be64(&img, 40);
    let l1_size = u64::from(be32(&img, 36));
    let e1 = be64(&img, l1);
    let l2 = e1 & 0x00ff_ffff_ffff_fe00;
    let e2 = be64(&img, l2);
    let l2_bytes: Vec<u8> = (0..8192).flat_map(|_| e2.to_be_bytes()).collect();
    patch(&img, l2, &l2_bytes);
    let l1_bytes: Vec<u8> = (0..l1_size).flat_map(|_| e1.to_be_bytes()).collect();
    patch(&img, l1, &l1_bytes);
    img
}

/// Issue 11's image: 1.3 MiB mapping 64 TiB of non-zero data. Refused with
/// exit 4 with a stable code, nothing written (how fast is a benchmark's
/// business, not a test's: 0.03 s in release, SECURITY.md).
#[test]
fn amplification_is_refused_before_writing() {
    let d = tmpdir();
    let img = amplification_image(d.path());
    let len = fs::metadata(&img).unwrap().len();
    assert!(len < 2 << 20, "image is {len} bytes");
    let out = d.path().join("out.raw");
    let o = guard(&["convert", "-q", s(&img), s(&out)]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("[convert_amplification]"),
        "{}",
        stderr(&o)
    );
    assert_eq!(names(d.path()), ["amp.qcow2"]);
    // To a pipe too: not one byte.
    let o = guard(&["convert", "-q", s(&img), "-"]);
    assert_eq!(code(&o), 4);
    assert!(o.stdout.is_empty());
}

/// The same structure in a sparse file longer than the audit can track:
/// the old converter skipped the refcount rebuild with a warning and
/// converted; now it is refused, naming the bound.
#[test]
fn no_conversion_without_the_audit() {
    let d = tmpdir();
    let img = amplification_image(d.path());
    // 2 TiB of file: 32 Mi host clusters, over the audit's 20 Mi, and
    // enough length that the amplification bound alone would pass it.
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(2 << 40)
        .unwrap();
    let out = d.path().join("out.raw");
    let o = guard(&["convert", "-q", s(&img), s(&out)]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("[convert_audit_too_large]"),
        "{}",
        stderr(&o)
    );
    assert_eq!(names(d.path()), ["amp.qcow2"]);
}

/// Real compressed images pass the default bound (qemu-img convert -c of
/// maximally compressible data), and the bound is tunable both ways;
/// `--max-output` refuses what would exceed a quota.
#[test]
fn amplification_bound_and_output_quota() {
    let d = tmpdir();
    let raw = d.path().join("a.raw");
    fs::write(&raw, vec![b'a'; 64 << 20]).unwrap();
    let img = d.path().join("c.qcow2");
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", s(&raw), s(&img)]);
    let out = d.path().join("c.raw");
    let o = guard(&["convert", "-q", s(&img), s(&out)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(fs::read(&out).unwrap(), fs::read(&raw).unwrap());
    fs::remove_file(&out).unwrap();
    // 64 MiB from a file of a few hundred KiB: over 100 bytes per byte.
    let o = guard(&[
        "convert",
        "-q",
        "--max-amplification",
        "100",
        s(&img),
        s(&out),
    ]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("[convert_amplification]"));
    assert!(!out.exists());
    // The quota counts the data the output holds: 64 MiB.
    let o = guard(&["convert", "-q", "--max-output", "63M", s(&img), s(&out)]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("[convert_output_too_large]"));
    assert!(!out.exists());
    let o = guard(&["convert", "-q", "--max-output", "64M", s(&img), s(&out)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // The library refuses the same way, with the finding typed.
    let opts = ConvertOptions {
        max_amplification: 100,
        ..ConvertOptions::default()
    };
    match prepare(Inputs::new(FileSource::open(&img).unwrap()), &opts) {
        Err(ConvertError::Refused { findings, .. }) => {
            assert_eq!(findings[0].code, ccode::AMPLIFICATION)
        }
        other => panic!("expected a refusal: {other:?}"),
    }
}

/// Run `script` (sh) in a private mount namespace; stdout and exit code.
fn in_namespace(script: &str) -> (String, i32) {
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", script])
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o),
        o.status.code().unwrap_or(-1),
    )
}

/// The disk fills up: a clear error, exit 1, nothing left on the full
/// file system (and its space given back).
#[test]
fn disk_full() {
    let d = tmpdir();
    let img = data_image(d.path(), "d.qcow2", "", 4);
    // A stream to a full device.
    let o = guard(&["convert", "-q", s(&img), "/dev/full"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("No space left on device"),
        "{}",
        stderr(&o)
    );
    if !is_root() {
        eprintln!("disk_full: not root, no tmpfs mount: only /dev/full tested");
        return;
    }
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let (out, rc) = in_namespace(&format!(
        "mount -t tmpfs -o size=1m none {m} || exit 99; {b} convert -q {i} {m}/out.raw; \
         echo rc=$?; echo files=$(ls -A {m}); df -k --output=used {m} | tail -1",
        m = s(&mnt),
        b = bin(),
        i = s(&img)
    ));
    assert_eq!(rc, 0, "mount in a namespace failed: {out}");
    assert!(out.contains("No space left on device"), "{out}");
    assert!(out.contains("rc=1\n"), "{out}");
    assert!(out.contains("files=\n"), "{out}");
    let used: u64 = out
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no df figure: {out}"));
    assert!(used < 64, "{used} KiB still used: {out}");
}

/// OUTPUT's directory is read-only: exit 1, nothing written.
#[test]
fn read_only_directory() {
    if !is_root() {
        eprintln!("read_only_directory: not root, skipped");
        return;
    }
    let d = tmpdir();
    let img = data_image(d.path(), "d.qcow2", "", 1);
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let (out, rc) = in_namespace(&format!(
        "mount -t tmpfs -o ro,size=1m none {m} || exit 99; {b} convert -q {i} {m}/out.raw; \
         echo rc=$?; echo files=$(ls -A {m})",
        m = s(&mnt),
        b = bin(),
        i = s(&img)
    ));
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.contains("rc=1\n") && out.contains("files=\n"), "{out}");
}

/// A slow conversion: 1 GiB of compressed clusters whose data is one
/// non-zero byte per cluster (tiny file, tiny output on disk, seconds of
/// inflating). Made once, kept in cargo's target tmpdir, shared
/// read-only.
fn slow_image() -> &'static Path {
    static SLOW: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SLOW.get_or_init(|| {
        let img = Path::new(env!("CARGO_TARGET_TMPDIR")).join("convert-faults-slow.qcow2");
        if img.exists() {
            return img;
        }
        let dir = tmpdir();
        let raw = dir.path().join("slow.src");
        let f = fs::File::create(&raw).unwrap();
        f.set_len(1 << 30).unwrap();
        use std::os::unix::fs::FileExt;
        for k in 0..(1u64 << 14) {
            f.write_all_at(&[0x42], k << 16).unwrap();
        }
        drop(f);
        let made = dir.path().join("slow.qcow2");
        qemu_img(&["convert", "-q", "-c", "-O", "qcow2", s(&raw), s(&made)]);
        // Complete before it has its name.
        fs::copy(&made, img.with_extension("part")).unwrap();
        fs::rename(img.with_extension("part"), &img).unwrap();
        img
    })
}

/// Start `convert -q IMG OUT` with `env`; returns once the child holds
/// the output open (a descriptor on a file in OUT's directory) and has
/// been writing for a moment.
fn start(img: &Path, out: &Path, env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(bin());
    cmd.args(["convert", "-q", s(img), s(out)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let dir = out.parent().unwrap().canonicalize().unwrap();
    let fds = PathBuf::from(format!("/proc/{}/fd", child.id()));
    let t = Instant::now();
    loop {
        let holds = fs::read_dir(&fds).into_iter().flatten().any(|e| {
            fs::read_link(e.unwrap().path())
                .is_ok_and(|l| l.parent() == Some(dir.as_path()) && l != img)
        });
        if holds {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("convert finished before it could be stopped: {st}");
        }
        assert!(t.elapsed() < Duration::from_secs(30), "output never opened");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "conversion too fast to interrupt"
    );
    child
}

fn kill(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// SIGTERM, SIGINT, SIGHUP and SIGKILL during a conversion leave nothing
/// in OUTPUT's directory: with O_TMPFILE the output has no name until it
/// is complete (even SIGKILL leaves nothing); on the temporary-plus-rename
/// path (file systems without O_TMPFILE) the three catchable signals
/// remove the temporary and exit 128 + signal.
#[test]
fn signals_leave_nothing_behind() {
    use std::os::unix::process::ExitStatusExt;
    let d = tmpdir();
    let img = slow_image();
    let outdir = d.path().join("out");
    fs::create_dir(&outdir).unwrap();
    let out = outdir.join("disk.raw");
    for sig in ["TERM", "KILL"] {
        let mut child = start(img, &out, &[]);
        kill(&child, sig);
        let st = child.wait().unwrap();
        assert!(st.signal().is_some(), "SIG{sig}: {st}");
        assert_eq!(names(&outdir), Vec::<String>::new(), "after SIG{sig}");
    }
    for (sig, n) in [("TERM", 15), ("INT", 2), ("HUP", 1)] {
        let mut child = start(img, &out, &[("QCOW2_GUARD_NO_TMPFILE", "1")]);
        // The fallback's temporary is visible while it is written.
        assert_eq!(names(&outdir).len(), 1);
        kill(&child, sig);
        let st = child.wait().unwrap();
        assert_eq!(st.code(), Some(128 + n), "SIG{sig}: {st}");
        assert_eq!(names(&outdir), Vec::<String>::new(), "after SIG{sig}");
    }
}

/// OUTPUT's directory is removed while the conversion runs: it can be
/// (nothing visible is in it), and the conversion fails cleanly.
#[test]
fn output_directory_vanishes() {
    let d = tmpdir();
    let img = slow_image();
    let outdir = d.path().join("out");
    fs::create_dir(&outdir).unwrap();
    let out = outdir.join("disk.raw");
    let child = start(img, &out, &[]);
    kill(&child, "STOP");
    let removed = fs::remove_dir(&outdir);
    kill(&child, "CONT");
    removed.expect("the output directory holds a visible file during the conversion");
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("No such file or directory"),
        "{}",
        stderr(&o)
    );
    assert!(!outdir.exists());
    assert_eq!(names(d.path()), Vec::<String>::new());
}

/// The image file is truncated under a running conversion: an error, not
/// a disk whose tail silently reads as zeros.
#[test]
fn input_shrinks_while_read() {
    let d = tmpdir();
    let img = data_image(d.path(), "d.qcow2", "", 4);
    let conversion = prepare(
        Inputs::new(FileSource::open(&img).unwrap()),
        &ConvertOptions::default(),
    )
    .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sink = WriteSink::new(Vec::new());
    let err = conversion.run(&sink, None).unwrap_err();
    assert!(
        matches!(&err, ConvertError::Image { error, .. } if error.is_io()),
        "{err}"
    );
    assert!(err.to_string().contains("shrank"), "{err}");
}

/// OUTPUT /dev/null is written through, never replaced; a FIFO is written
/// in place; a block device (a loop device over a file full of 0xff)
/// receives the disk with zeros for holes, and one too small is an error.
#[test]
fn special_outputs() {
    let d = tmpdir();
    let img = data_image(d.path(), "d.qcow2", "4M", 1);
    let want = {
        let o = d.path().join("oracle.raw");
        qemu_img(&["convert", "-O", "raw", s(&img), s(&o)]);
        fs::read(&o).unwrap()
    };
    let null = fs::metadata("/dev/null").unwrap();
    let o = guard(&["convert", "-q", s(&img), "/dev/null"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let after = fs::metadata("/dev/null").unwrap();
    assert!(after.file_type().is_char_device());
    assert_eq!((after.rdev(), after.ino()), (null.rdev(), null.ino()));

    let fifo = d.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let copy = d.path().join("from-fifo.raw");
    let mut reader = Command::new("sh")
        .args(["-c", &format!("cat {} > {}", s(&fifo), s(&copy))])
        .spawn()
        .unwrap();
    let o = guard(&["convert", "-q", s(&img), s(&fifo)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(reader.wait().unwrap().success());
    assert_eq!(fs::read(&copy).unwrap(), want);
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());

    if !is_root() {
        eprintln!("special_outputs: not root, no loop device");
        return;
    }
    for (mib, ok) in [(6usize, true), (2, false)] {
        let backing = d.path().join(format!("dev{mib}.img"));
        fs::write(&backing, vec![0xffu8; mib << 20]).unwrap();
        let lo = Command::new("losetup")
            .args(["-f", "--show", s(&backing)])
            .output()
            .unwrap();
        assert!(lo.status.success(), "losetup: {}", stderr(&lo));
        let dev = String::from_utf8(lo.stdout).unwrap().trim().to_owned();
        let o = guard(&["convert", "-q", s(&img), &dev]);
        let _ = Command::new("losetup").args(["-d", &dev]).status();
        assert!(fs::metadata(&dev).unwrap().file_type().is_block_device());
        let got = fs::read(&backing).unwrap();
        if ok {
            assert_eq!(code(&o), 0, "{}", stderr(&o));
            assert_eq!(
                &got[..4 << 20],
                &want[..],
                "holes must be zeros on a device"
            );
            assert!(got[4 << 20..].iter().all(|&b| b == 0xff));
        } else {
            assert_eq!(code(&o), 1, "{}", stderr(&o));
            assert!(
                stderr(&o).contains("No space left on device"),
                "{}",
                stderr(&o)
            );
        }
    }
}

/// A reader that goes away (`convert IMG - | head -c 10`): exit 1 with
/// the error, no panic.
#[test]
fn stdout_closed() {
    let d = tmpdir();
    let img = data_image(d.path(), "d.qcow2", "", 4);
    let o = Command::new("sh")
        .args([
            "-c",
            &format!("{} convert -q {} - | head -c 10 >/dev/null", bin(), s(&img)),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(stderr(&o).contains("Broken pipe"), "{}", stderr(&o));
    let mut child = Command::new(bin())
        .args(["convert", "-q", s(&img), "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    // Descriptor 1 closed from the start: Rust's runtime reopens it on
    // /dev/null, so the disk goes nowhere and no file takes its place.
    let o = Command::new("sh")
        .args(["-c", &format!("{} convert -q {} - >&-", bin(), s(&img))])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(names(d.path()), ["d.qcow2"]);
}

/// Success is durable: the data is fsynced before OUTPUT gets its name
/// and the directory after; `--no-sync` skips both (seen with strace).
#[test]
fn durable_success() {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is needed (.ci/run installs it)");
    }
    let d = tmpdir();
    let img = data_image(d.path(), "d.qcow2", "", 1);
    let trace = |extra: &[&str], out: &str| {
        let log = d.path().join("trace");
        let mut args = vec![
            "-f",
            "-qq",
            "-o",
            s(&log),
            "-e",
            "trace=fsync,fdatasync,linkat,rename,renameat,renameat2",
            bin(),
            "convert",
            "-q",
        ];
        args.extend_from_slice(extra);
        let o = d.path().join(out);
        args.extend_from_slice(&[s(&img), s(&o)]);
        let st = Command::new("strace").args(&args).status().unwrap();
        assert!(st.success());
        let t = fs::read_to_string(&log).unwrap();
        fs::remove_file(&log).unwrap();
        t.lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|c| c.split('(').next().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(trace(&[], "a.raw"), ["fsync", "linkat", "fsync"]);
    assert_eq!(trace(&["--no-sync"], "b.raw"), ["linkat"]);
    // Replacing an existing OUTPUT: the link to its name fails (EEXIST),
    // so it is linked under a hidden name and renamed over it.
    assert_eq!(
        trace(&[], "a.raw"),
        ["fsync", "linkat", "linkat", "rename", "fsync"]
    );
    assert_eq!(names(d.path()), ["a.raw", "b.raw", "d.qcow2"]);
}
