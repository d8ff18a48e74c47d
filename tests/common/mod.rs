//! Helpers shared by the integration tests: make images with qemu-img and
//! qemu-io, run the `qcow2-guard` binary, patch bytes.
//!
//! qemu-img is the oracle; it must be installed (CI has qemu-utils). A
//! missing qemu-img fails the tests rather than skipping them.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use tempfile::TempDir;

/// A fresh temporary directory.
pub fn tmpdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("qcow2-guard-test")
        .tempdir()
        .expect("create temp dir")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is qemu-utils installed?)"));
    out
}

/// Run `qemu-img` with `args`; panics with its stderr when it fails.
pub fn qemu_img(args: &[&str]) -> Output {
    let out = run(Command::new("qemu-img").args(args));
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `qemu-img` and return its output whatever the exit status.
pub fn qemu_img_status(args: &[&str]) -> Output {
    run(Command::new("qemu-img").args(args))
}

/// Run `qemu-io` commands (each a `-c` argument) on a qcow2 image.
pub fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(image);
    let out = run(&mut c);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("error") && !stdout.contains("failed"),
        "qemu-io {cmds:?} failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE`; returns PATH.
pub fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().expect("utf-8 path");
    if opts.is_empty() {
        qemu_img(&["create", "-q", "-f", "qcow2", p, size]);
    } else {
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p, size]);
    }
    path
}

/// `qemu-img convert -q -c -f raw -O qcow2 [-o OPTS] RAW PATH`: every
/// cluster of `raw` compressed; returns PATH.
pub fn compress(raw: &Path, path: &Path, opts: &str) -> PathBuf {
    let mut args = vec!["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(raw), s(path)]);
    qemu_img(&args);
    path.to_path_buf()
}

/// The path as a `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The `--object` of the secret [`create_encrypted`] encrypts with
/// (`encrypt.key-secret=sec0`).
pub const SECRET: &str = "secret,id=sec0,data=abc";

/// `qemu-img create -q -f qcow2 --object SECRET -o OPTS PATH SIZE` (OPTS
/// name `encrypt.format` and `encrypt.key-secret=sec0`); returns PATH.
pub fn create_encrypted(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        opts,
        s(&path),
        size,
    ]);
    path
}

/// Write a raw file of `len` bytes from a deterministic pattern generator.
pub fn write_raw(path: &Path, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = vec![0u8; len];
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        match i % 4 {
            // Compressible text.
            0 => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = b"qcow2-guard test pattern "[j % 25];
                }
            }
            // Incompressible.
            1 | 2 => {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            // Zeros.
            _ => {}
        }
    }
    std::fs::write(path, data).expect("write raw");
}

/// Path of the `qcow2-guard` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_qcow2-guard")
}

/// Run `qcow2-guard` with `args`.
pub fn guard(args: &[&str]) -> Output {
    run(Command::new(bin()).args(args))
}

/// Exit code of a finished process (panics on death by signal: a bug).
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or_else(|| {
        panic!(
            "qcow2-guard died from a signal: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Parse stdout as JSON.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Overwrite bytes at `offset` in `path`.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for patch");
    f.write_all_at(bytes, offset).expect("patch");
}

/// Read `N` bytes at `offset`.
pub fn peek<const N: usize>(path: &Path, offset: u64) -> [u8; N] {
    let f = std::fs::File::open(path).expect("open for peek");
    let mut b = [0u8; N];
    f.read_exact_at(&mut b, offset).expect("peek");
    b
}

/// Big-endian u64 at `offset`.
pub fn be64(path: &Path, offset: u64) -> u64 {
    u64::from_be_bytes(peek::<8>(path, offset))
}

/// Big-endian u32 at `offset`.
pub fn be32(path: &Path, offset: u64) -> u32 {
    u32::from_be_bytes(peek::<4>(path, offset))
}

/// Copy `src` to `dir/name` and return the new path.
pub fn copy(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    std::fs::copy(src, &dst).expect("copy image");
    dst
}

/// `qemu-img create -f qcow2 -b BASE -F BASE_FMT dir/name` (the virtual
/// size is the base's); returns the overlay's path.
pub fn overlay(dir: &Path, name: &str, base: &Path, base_fmt: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().expect("utf-8 path"),
        "-F",
        base_fmt,
        path.to_str().expect("utf-8 path"),
    ]);
    path
}

/// Header extension records (type, length, data padded to 8) followed by
/// the end marker, as raw bytes: lets tests write lengths and contents the
/// library's encoder never would.
pub fn ext_records<D: AsRef<[u8]>>(records: &[(u32, D)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (ty, data) in records {
        let data = data.as_ref();
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(
            &u32::try_from(data.len())
                .expect("record length")
                .to_be_bytes(),
        );
        b.extend_from_slice(data);
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b.extend_from_slice(&[0; 8]);
    b
}

/// `qcow2-guard check --json ARGS -` with `image` on standard input (read
/// as a stream), with `--spool` into `dir` when `spool`: (exit code, JSON).
pub fn guard_stream(image: &Path, args: &[&str], spool: Option<&Path>) -> (i32, serde_json::Value) {
    let mut c = Command::new(bin());
    c.args(["check", "--json"]).args(args);
    if let Some(sp) = spool {
        c.arg("--spool").arg(sp);
    }
    c.arg("-");
    c.stdin(std::fs::File::open(image).expect("open image"));
    let out = run(&mut c);
    let v = json(&out);
    (code(&out), v)
}

/// The streamed check of `image` (`check -`, with a spool and without)
/// against `whole`, the JSON of `check IMAGE` with the same `args`: equal
/// with a spool (and the spool a copy of the image); equal without one,
/// or `needs_random_access`. Returns whether it streamed without a spool.
pub fn assert_streams_like(image: &Path, args: &[&str], whole: &serde_json::Value) -> bool {
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("filename");
        }
        v
    };
    let dir = tmpdir();
    let spool = dir.path().join("spool.qcow2");
    let (_, with) = guard_stream(image, args, Some(&spool));
    assert_eq!(
        strip(&with),
        strip(whole),
        "streamed with a spool: {}",
        image.display()
    );
    assert_eq!(
        std::fs::read(&spool).expect("spool written"),
        std::fs::read(image).expect("image"),
        "the spool is a copy of the stream"
    );
    let (code, without) = guard_stream(image, args, None);
    if without["verdict"] == "needs_random_access" {
        assert_eq!(code, 1, "{without:#}");
        assert!(
            without["findings"][0]["code"] == "needs_random_access",
            "{without:#}"
        );
        return false;
    }
    assert_eq!(
        strip(&without),
        strip(whole),
        "streamed without a spool: {}",
        image.display()
    );
    true
}

/// With `QCOW2_GUARD_EXPORT_IMAGES=DIR` set, copy a test image into DIR
/// (as `NNNN.qcow2`, with `NNNN.txt` holding the test's name and
/// `label`): how the Python
/// tests (python/tests) get the hostile catalogue without rebuilding it.
/// Does nothing otherwise.
pub fn export(image: &Path, label: &str) {
    let Some(dir) = std::env::var_os("QCOW2_GUARD_EXPORT_IMAGES") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create export dir");
    // A free number, claimed by creating the label file exclusively (the
    // test binaries and threads export concurrently).
    for n in 0u32.. {
        let txt = dir.join(format!("{n:05}.txt"));
        let Ok(mut f) = OpenOptions::new().write(true).create_new(true).open(&txt) else {
            continue;
        };
        use std::io::Write as _;
        let test = std::thread::current().name().unwrap_or("").to_owned();
        f.write_all(format!("{test}: {label}").as_bytes())
            .expect("write export label");
        std::fs::copy(image, dir.join(format!("{n:05}.qcow2"))).expect("export image");
        return;
    }
}

/// Walk `a` and compare with `b` wherever `b` has the same key. A key of
/// `a` missing from `b` is an error unless `may_miss` lists it. Scalars are
/// compared (once, when `compare`). Returns the paths compared.
pub fn walk(
    a: &serde_json::Value,
    b: &serde_json::Value,
    path: &str,
    may_miss: &[&str],
    compare: bool,
    errors: &mut Vec<String>,
    compared: &mut Vec<String>,
) {
    match (a, b) {
        (serde_json::Value::Object(ao), serde_json::Value::Object(bo)) => {
            for (k, av) in ao {
                let p = format!("{path}/{k}");
                match bo.get(k) {
                    Some(bv) => walk(av, bv, &p, may_miss, compare, errors, compared),
                    None if may_miss.contains(&p.as_str()) => {}
                    None => errors.push(format!("{p}: missing (other side has {av})")),
                }
            }
        }
        (serde_json::Value::Array(aa), serde_json::Value::Array(ba)) => {
            if aa.len() != ba.len() {
                errors.push(format!("{path}: {} vs {} elements", aa.len(), ba.len()));
            }
            for (i, (av, bv)) in aa.iter().zip(ba).enumerate() {
                walk(
                    av,
                    bv,
                    &format!("{path}/{i}"),
                    may_miss,
                    compare,
                    errors,
                    compared,
                );
            }
        }
        _ if compare => {
            if a != b {
                errors.push(format!("{path}: qemu-img says {a}, qcow2-guard says {b}"));
            }
            compared.push(path.to_owned());
        }
        _ => {}
    }
}
