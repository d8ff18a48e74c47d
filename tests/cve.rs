//! Public qcow2 vulnerabilities, one test per row of the table in
//! SECURITY.md. Each test builds the reproducer from a real qemu-img image
//! by patching bytes, and asserts what `info`, `check` and `convert` do
//! with it: exact codes, offsets and exit statuses, and that a refused
//! conversion leaves no output behind.
//!
//! Host-file reads are proved impossible with FIFOs: an image names a FIFO
//! in the test directory as its backing or data file. Opening a FIFO for
//! reading blocks until a writer appears, so a command that opened it
//! would hang; every command runs with a deadline and a hang fails the
//! test. `fifo_detector_catches_an_opener` shows the deadline does catch
//! a process that opens the FIFO.
//!
//! Memory bounds are proved the way tests/hostile.rs does: the command
//! runs under `ulimit -v`, so an allocation sized from the header would
//! kill it.

mod common;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// How long any single command may take. Far above what these tiny images
/// need (milliseconds), far below "forever" for a process blocked on a FIFO.
const DEADLINE: Duration = Duration::from_secs(30);

const DATA_FILE_EXT: u32 = 0x4441_5441;
const FEATURE_TABLE_EXT: u32 = 0x6803_F857;

/// A finished command.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Run `program args` with stdout and stderr in files; kill it and fail
/// when it has not finished by `deadline`. `Err` carries what it printed
/// before it was killed.
fn run_with_deadline(
    program: &str,
    args: &[&str],
    dir: &Path,
    deadline: Duration,
) -> Result<Ran, String> {
    let (out_path, err_path) = (dir.join(".stdout"), dir.join(".stderr"));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&std::fs::read(&out_path).unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&std::fs::read(&err_path).unwrap()).into_owned();
    match status {
        None => Err(format!("stdout: {stdout}\nstderr: {stderr}")),
        Some(status) => Ok(Ran {
            code: status
                .code()
                .unwrap_or_else(|| panic!("{program} {args:?} died from a signal: {stderr}")),
            stdout,
            stderr,
        }),
    }
}

/// Run `qcow2-guard args`; a hang is a test failure.
fn guard_timed(dir: &Path, args: &[&str]) -> Ran {
    run_with_deadline(bin(), args, dir, DEADLINE).unwrap_or_else(|out| {
        panic!(
            "qcow2-guard {args:?} did not finish within {DEADLINE:?}: it opened a FIFO \
             named inside the image (or looped)\n{out}"
        )
    })
}

/// Run `qcow2-guard args` under an address space limit of `kib` KiB.
fn guard_ulimit(dir: &Path, kib: u32, args: &[&str]) -> Ran {
    let script = format!("ulimit -v {kib} && exec \"$0\" \"$@\"");
    let mut full = vec!["-c", script.as_str(), bin()];
    full.extend_from_slice(args);
    run_with_deadline("sh", &full, dir, DEADLINE)
        .unwrap_or_else(|out| panic!("qcow2-guard {args:?} timed out\n{out}"))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned())
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success(), "mkfifo {}", path.display());
}

/// Everything in `dir` whose name starts with `prefix` (a refused convert
/// must leave neither OUTPUT nor its temporary file).
fn leftovers(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix) || n.starts_with(&format!(".{prefix}")))
        .collect()
}

/// Header extensions of `p`: (type, data).
fn read_extensions(p: &Path) -> Vec<(u32, Vec<u8>)> {
    let mut at = u64::from(be32(p, 100));
    let bytes = std::fs::read(p).unwrap();
    let mut out = Vec::new();
    loop {
        let (ty, len) = (be32(p, at), be32(p, at + 4));
        if ty == 0 {
            return out;
        }
        let start = usize::try_from(at + 8).unwrap();
        out.push((ty, bytes[start..start + len as usize].to_vec()));
        at += 8 + u64::from(len).next_multiple_of(8);
    }
}

/// Rewrite the extension area of a v3 image (no backing file) with
/// `records`, end marker added.
fn write_extensions(p: &Path, records: &[(u32, Vec<u8>)]) {
    assert_eq!(be64(p, 8), 0, "image has a backing file name");
    patch(p, u64::from(be32(p, 100)), &ext_records(records));
}

/// Replace the external data file name of `p` with `name`; returns the
/// file offset of the name (where the policy finding points).
fn set_data_file_name(p: &Path, name: &str) -> u64 {
    let mut exts = read_extensions(p);
    let mut found = false;
    let mut at = u64::from(be32(p, 100));
    let mut name_at = 0;
    for (ty, data) in &mut exts {
        if *ty == DATA_FILE_EXT {
            *data = name.as_bytes().to_vec();
            name_at = at + 8;
            found = true;
        }
        at += 8 + u64::try_from(data.len()).unwrap().next_multiple_of(8);
    }
    assert!(found, "{}: no data file extension", p.display());
    write_extensions(p, &exts);
    name_at
}

/// Replace the backing file name of `p` with `name` (in place, at the
/// same offset).
fn set_backing_name(p: &Path, name: &str) {
    let at = be64(p, 8);
    assert!(at > 0, "no backing file");
    patch(p, at, name.as_bytes());
    patch(p, 16, &u32::try_from(name.len()).unwrap().to_be_bytes());
}

/// A v3 image with 64 KiB of 0xaa at guest 0 whose guest data lives in
/// the external data file `data`, which is then replaced by a FIFO.
/// Returns (image, a regular copy of the data file's contents).
fn image_with_fifo_data_file(dir: &Path, data: &Path) -> (PathBuf, PathBuf) {
    let image = create(
        dir,
        "data-file.qcow2",
        &format!("data_file={}", s(data)),
        "1M",
    );
    qemu_io(&image, &["write -P 0xaa 0 64k"]);
    let copy = dir.join("supplied.raw");
    std::fs::rename(data, &copy).unwrap();
    mkfifo(data);
    (image, copy)
}

/// `info` and `check` refuse `image` on policy grounds alone: exit 4,
/// exactly the findings `codes` (all at `offset`); `convert` refuses it
/// with exit 4 naming `codes[0]`, leaving no output file.
fn assert_policy_refuses(dir: &Path, image: &Path, codes: &[&str], offset: u64, extra: &[&str]) {
    assert_info_check_refuse(dir, image, codes, offset, extra);
    assert_convert_refused(dir, image, 4, codes[0], extra);
}

/// The `info` and `check` half of [`assert_policy_refuses`].
fn assert_info_check_refuse(dir: &Path, image: &Path, codes: &[&str], offset: u64, extra: &[&str]) {
    let name = image.display();
    if extra.is_empty() {
        export(
            image,
            &format!("cve: {} ({})", file_name(image), codes.join(", ")),
        );
    }
    let info = guard_timed(dir, &[&["info", "--json", s(image)], extra].concat());
    let v = info.json();
    let got: Vec<(&str, u64)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["code"].as_str().unwrap(), f["offset"].as_u64().unwrap()))
        .collect();
    let want: Vec<(&str, u64)> = codes.iter().map(|c| (*c, offset)).collect();
    assert_eq!((info.code, got), (4, want.clone()), "info {name}: {v}");
    assert_eq!(v["exit-code"], 4);

    let check = guard_timed(dir, &[&["check", "--json", s(image)], extra].concat());
    let v = check.json();
    let got: Vec<(&str, u64)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["code"].as_str().unwrap(), f["offset"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        (check.code, v["verdict"].as_str(), got),
        (4, Some("unsafe"), want),
        "check {name}: {v}"
    );
}

/// `convert` exits `exit`, names `code` on stderr, and leaves nothing.
fn assert_convert_refused(dir: &Path, image: &Path, exit: i32, code: &str, extra: &[&str]) {
    let out = dir.join("out.raw");
    let conv = guard_timed(
        dir,
        &[&["convert", "-q", s(image), s(&out)], extra].concat(),
    );
    assert_eq!(
        conv.code,
        exit,
        "convert {}: {}",
        image.display(),
        conv.stderr
    );
    assert!(
        conv.stderr.contains(&format!("[{code}]")),
        "convert {}: stderr does not name [{code}]: {}",
        image.display(),
        conv.stderr
    );
    assert!(conv.stdout.is_empty());
    assert_eq!(leftovers(dir, "out.raw"), Vec::<String>::new());
}

/// `info` and `check` report the open error `code` at `offset` (exit 2,
/// verdict invalid), and `convert` refuses with it, leaving nothing.
fn assert_malformed(dir: &Path, image: &Path, code: &str, offset: u64) {
    let name = image.display();
    export(image, &format!("{} ({code})", file_name(image)));
    let info = guard_timed(dir, &["info", "--json", s(image)]);
    let v = info.json();
    assert_eq!(
        (
            info.code,
            v["error"]["code"].as_str(),
            v["error"]["offset"].as_u64()
        ),
        (2, Some(code), Some(offset)),
        "info {name}: {v}"
    );
    let check = guard_timed(dir, &["check", "--json", s(image)]);
    let v = check.json();
    assert_eq!(
        (
            check.code,
            v["verdict"].as_str(),
            v["findings"][0]["code"].as_str(),
            v["findings"][0]["offset"].as_u64(),
            v["findings"].as_array().map(Vec::len),
        ),
        (2, Some("invalid"), Some(code), Some(offset), Some(1)),
        "check {name}: {v}"
    );
    assert_convert_refused(dir, image, 2, code, &[]);
}

/// The detector itself: a process that opens the FIFO does not finish.
#[test]
fn fifo_detector_catches_an_opener() {
    let dir = tmpdir();
    let fifo = dir.path().join("secret");
    mkfifo(&fifo);
    let r = run_with_deadline(
        "head",
        &["-c1", s(&fifo)],
        dir.path(),
        Duration::from_secs(1),
    );
    assert!(r.is_err(), "head returned although it opened a FIFO");
}

/// OpenStack OSSA-2024-001: a qcow2 image whose external data file names a
/// host file; Glance/Cinder/Nova ran `qemu-img convert` on it and copied the
/// host file into the volume or image.
#[test]
fn cve_2024_32498_data_file_names_host_file() {
    let dir = tmpdir();
    let d = dir.path();
    let fifo = d.join("host-secret");
    let (image, supplied) = image_with_fifo_data_file(d, &fifo);
    let name_at = u64::from(be32(&image, 100)) + 8;
    assert_eq!(
        set_data_file_name(&image, s(&fifo)),
        name_at,
        "the data file extension comes first"
    );
    assert_policy_refuses(d, &image, &["policy_external_data_file"], name_at, &[]);

    // Allowed: info and check still never open it.
    let info = guard_timed(d, &["info", "--json", "--allow-data-file", s(&image)]);
    let v = info.json();
    assert_eq!(info.code, 0, "{v}");
    assert_eq!(v["format-specific"]["data"]["data-file"], s(&fifo));
    let check = guard_timed(d, &["check", "--json", "--allow-data-file", s(&image)]);
    assert_eq!(check.code, 0, "{}", check.stdout);
    // convert needs the data file handed in; the named one is never used.
    let out = d.join("out.raw");
    let conv = guard_timed(
        d,
        &["convert", "-q", "--allow-data-file", s(&image), s(&out)],
    );
    assert_eq!(conv.code, 4, "{}", conv.stderr);
    assert!(conv.stderr.contains("--data-file"), "{}", conv.stderr);
    assert_eq!(leftovers(d, "out.raw"), Vec::<String>::new());
    let conv = guard_timed(
        d,
        &[
            "convert",
            "-q",
            "--allow-data-file",
            "--data-file",
            s(&supplied),
            s(&image),
            s(&out),
        ],
    );
    assert_eq!(conv.code, 0, "{}", conv.stderr);
    let disk = std::fs::read(&out).unwrap();
    assert_eq!(disk.len(), 1 << 20);
    assert!(disk[..64 << 10].iter().all(|&b| b == 0xaa));
    assert!(disk[64 << 10..].iter().all(|&b| b == 0));
}

/// QEMU CVE-2024-4467: `qemu-img info` on an image whose data file name is a
/// `json:{...}` block device spec opened (and could write) any file the spec
/// named, or exhausted memory and CPU. The spec here points at a FIFO.
#[test]
fn cve_2024_4467_json_data_file_spec() {
    let dir = tmpdir();
    let d = dir.path();
    let fifo = d.join("host-secret");
    let (image, _) = image_with_fifo_data_file(d, &fifo);
    let spec = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{}"}}}}"#,
        s(&fifo)
    );
    let name_at = set_data_file_name(&image, &spec);
    assert_policy_refuses(d, &image, &["policy_external_data_file"], name_at, &[]);
    let info = guard_timed(d, &["info", "--json", "--allow-data-file", s(&image)]);
    let v = info.json();
    assert_eq!(info.code, 0, "{v}");
    // Shown verbatim, never parsed as a spec.
    assert_eq!(v["format-specific"]["data"]["data-file"], spec.as_str());
    let check = guard_timed(d, &["check", "--allow-data-file", s(&image)]);
    assert_eq!(check.code, 0, "{}", check.stdout);
    let conv = guard_timed(
        d,
        &[
            "convert",
            "-q",
            "--allow-data-file",
            s(&image),
            s(&d.join("out.raw")),
        ],
    );
    assert_eq!(conv.code, 4, "{}", conv.stderr);
    assert_eq!(leftovers(d, "out.raw"), Vec::<String>::new());
}

/// OpenStack OSSA-2015-014 (Cinder upload-to-image): a volume holding a
/// qcow2 header whose backing file names a host file; qemu-img followed it
/// and the host file ended up in the uploaded image. The same image with a
/// `json:{...}` backing spec too.
#[test]
fn cve_2015_1850_backing_file_names_host_file() {
    let dir = tmpdir();
    let d = dir.path();
    let fifo = d.join("host-secret");
    qemu_img(&["create", "-q", "-f", "raw", s(&fifo), "1M"]);
    let image = create(
        d,
        "backing.qcow2",
        &format!("backing_file={},backing_fmt=raw", s(&fifo)),
        "1M",
    );
    qemu_io(&image, &["write -P 0x55 64k 64k"]);
    std::fs::remove_file(&fifo).unwrap();
    mkfifo(&fifo);
    let spec = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{}"}}}}"#,
        s(&fifo)
    );
    let json_image = copy(&image, d, "json-backing.qcow2");
    set_backing_name(&json_image, &spec);

    for (img, name) in [(&image, s(&fifo)), (&json_image, spec.as_str())] {
        assert_policy_refuses(d, img, &["policy_backing_file"], 8, &[]);
        let info = guard_timed(d, &["info", "--json", "--allow-backing", s(img)]);
        let v = info.json();
        assert_eq!((info.code, v["backing-filename"].as_str()), (0, Some(name)));
        let check = guard_timed(d, &["check", "--allow-backing", s(img)]);
        assert_eq!(check.code, 0, "{}", check.stdout);
        // Allowed without --backing: unallocated clusters read as zeros,
        // the named file is never opened.
        let out = d.join("out.raw");
        let conv = guard_timed(d, &["convert", "-q", "--allow-backing", s(img), s(&out)]);
        assert_eq!(conv.code, 0, "{}", conv.stderr);
        assert!(conv.stderr.contains("no --backing"), "{}", conv.stderr);
        let disk = std::fs::read(&out).unwrap();
        assert!(disk[64 << 10..128 << 10].iter().all(|&b| b == 0x55));
        assert!(disk[..64 << 10].iter().all(|&b| b == 0));
        std::fs::remove_file(&out).unwrap();
    }
}

/// OSSA-2023-002 (Glance/Cinder/Nova): a VMDK whose flat-extent descriptor
/// names a host file. Not qcow2: qcow2-guard reads nothing but qcow2, so
/// the descriptor is refused as "not a qcow2 image" without following it.
#[test]
fn cve_2022_47951_vmdk_descriptor_is_not_qcow2() {
    let dir = tmpdir();
    let d = dir.path();
    let vmdk = d.join("descriptor.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&vmdk),
        "1M",
    ]);
    let fifo = d.join("host-secret");
    mkfifo(&fifo);
    let text = std::fs::read_to_string(&vmdk).unwrap();
    let flat = text
        .lines()
        .find(|l| l.starts_with("RW "))
        .and_then(|l| l.split('"').nth(1))
        .expect("flat extent line")
        .to_owned();
    std::fs::write(&vmdk, text.replace(&flat, s(&fifo))).unwrap();
    for cmd in ["info", "check"] {
        let r = guard_timed(d, &[cmd, "--json", s(&vmdk)]);
        let v = r.json();
        let code = v["error"]["code"]
            .as_str()
            .or(v["findings"][0]["code"].as_str());
        assert_eq!((r.code, code), (1, Some("bad_magic")), "{cmd}: {v}");
    }
    let out = d.join("out.raw");
    let conv = guard_timed(d, &["convert", "-q", s(&vmdk), s(&out)]);
    assert_eq!(conv.code, 1, "{}", conv.stderr);
    assert!(conv.stderr.contains("[bad_magic]"), "{}", conv.stderr);
    assert_eq!(leftovers(d, "out.raw"), Vec::<String>::new());
}

/// A v3 image with some data and two internal snapshots.
fn snapshot_image(dir: &Path) -> PathBuf {
    let image = create(dir, "snap.qcow2", "", "1M");
    qemu_io(&image, &["write -P 0xaa 0 64k", "write -P 0x55 512k 4k"]);
    qemu_img(&["snapshot", "-c", "one", s(&image)]);
    qemu_img(&["snapshot", "-c", "two", s(&image)]);
    image
}

/// QEMU CVE-2014-0143, the qcow2 parts: integer overflows and huge
/// allocations from a snapshot's L1 size (qcow2_snapshot_load_tmp:
/// "Check maximum L1 size"), the L1 size of a growing disk ("Fix new L1
/// table size check"), refcount indexes (get_refcount), and the snapshot
/// count ("Limit snapshot table size", same series).
#[test]
fn cve_2014_0143_l1_and_refcount_overflows() {
    let dir = tmpdir();
    let d = dir.path();
    let base = snapshot_image(d);
    let snap = be64(&base, 64);
    // (what, patch given the first snapshot entry -> offset, code)
    type Case = (&'static str, fn(&Path, u64) -> u64, &'static str);
    let cases: [Case; 6] = [
        // Snapshot L1 size above QEMU's 4 Mi entries.
        (
            "snapshot l1_size 2^22+1",
            |p, e| {
                patch(p, e + 8, &((4u32 << 20) + 1).to_be_bytes());
                e + 8
            },
            "too_large",
        ),
        (
            "snapshot l1_size 2^32-1",
            |p, e| {
                patch(p, e + 8, &u32::MAX.to_be_bytes());
                e + 8
            },
            "too_large",
        ),
        // Active l1_size whose byte count overflows 32 bits.
        (
            "l1_size 2^29",
            |p, _| {
                patch(p, 36, &(1u32 << 29).to_be_bytes());
                36
            },
            "too_large",
        ),
        // A virtual size no L1 table can map (the L1 size computation
        // overflows).
        (
            "virtual size 2^63",
            |p, _| {
                patch(p, 24, &(1u64 << 63).to_be_bytes());
                24
            },
            "virtual_size_too_large",
        ),
        // A refcount table of 2^32-1 clusters (index arithmetic overflow).
        (
            "refcount_table_clusters 2^32-1",
            |p, _| {
                patch(p, 56, &u32::MAX.to_be_bytes());
                56
            },
            "too_large",
        ),
        (
            "nb_snapshots 2^32-1",
            |p, _| {
                patch(p, 60, &u32::MAX.to_be_bytes());
                60
            },
            "too_large",
        ),
    ];
    for (n, (what, f, code)) in cases.iter().enumerate() {
        let image = copy(&base, d, &format!("c{n}.qcow2"));
        let offset = f(&image, snap);
        eprintln!("{what}");
        assert_malformed(d, &image, code, offset);
    }
}

/// QEMU CVE-2014-0144, the qcow2 parts: header fields used without
/// validation ("Check header_length", "Check backing_file_offset", "Check
/// refcount table size", "Validate refcount table offset", "Validate
/// snapshot table offset/size", "Validate active L1 table offset and
/// size", "Fix backing file name length check"), plus header extension
/// lengths running off the first cluster.
#[test]
fn cve_2014_0144_unvalidated_header_fields() {
    let dir = tmpdir();
    let d = dir.path();
    let base = create(d, "base.qcow2", "", "1M");
    qemu_io(&base, &["write -P 0xaa 0 64k"]);
    let len = std::fs::metadata(&base).unwrap().len();
    let past = (len | 0xffff) + 1 + 0x10000;
    let backing = create(
        d,
        "b.qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "1M",
    );
    #[rustfmt::skip]
    // (what, base image, patch -> offset, code)
    type Case<'a> = (&'static str, &'a Path, Box<dyn Fn(&Path) -> u64>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "header_length 2^32-8",
            &base,
            Box::new(|p| {
                patch(p, 100, &0xffff_fff8u32.to_be_bytes());
                100
            }),
            "past_eof",
        ),
        (
            "header_length 0x10008 (past the cluster)",
            &base,
            Box::new(move |p| {
                patch(p, 100, &0x10008u32.to_be_bytes());
                100
            }),
            "invalid_header_length",
        ),
        (
            "backing_file_offset past the first cluster",
            &backing,
            Box::new(|p| {
                patch(p, 8, &0x20000u64.to_be_bytes());
                8
            }),
            "invalid_backing_file",
        ),
        (
            "backing_file_offset near 2^64",
            &backing,
            Box::new(|p| {
                patch(p, 8, &(u64::MAX - 3).to_be_bytes());
                8
            }),
            "invalid_backing_file",
        ),
        (
            "backing_file_size 1024",
            &backing,
            Box::new(|p| {
                patch(p, 16, &1024u32.to_be_bytes());
                16
            }),
            "too_large",
        ),
        (
            "refcount_table_clusters 129 (8 MiB + 64 KiB)",
            &base,
            Box::new(|p| {
                patch(p, 56, &129u32.to_be_bytes());
                56
            }),
            "too_large",
        ),
        (
            "refcount table offset unaligned",
            &base,
            Box::new(|p| {
                patch(p, 48, &(be64(p, 48) + 8).to_be_bytes());
                48
            }),
            "unaligned",
        ),
        (
            "refcount table past EOF",
            &base,
            Box::new(move |p| {
                patch(p, 48, &past.to_be_bytes());
                48
            }),
            "past_eof",
        ),
        (
            "snapshot table past EOF",
            &base,
            Box::new(move |p| {
                patch(p, 60, &1u32.to_be_bytes());
                patch(p, 64, &past.to_be_bytes());
                64
            }),
            "past_eof",
        ),
        (
            "snapshot table unaligned",
            &base,
            Box::new(|p| {
                patch(p, 60, &1u32.to_be_bytes());
                patch(p, 64, &0x10200u64.to_be_bytes());
                64
            }),
            "unaligned",
        ),
        (
            "L1 table past EOF",
            &base,
            Box::new(move |p| {
                patch(p, 40, &past.to_be_bytes());
                40
            }),
            "past_eof",
        ),
        (
            "L1 table unaligned",
            &base,
            Box::new(|p| {
                patch(p, 40, &(be64(p, 40) + 512).to_be_bytes());
                40
            }),
            "unaligned",
        ),
        (
            "l1_size above 32 MiB",
            &base,
            Box::new(|p| {
                patch(p, 36, &((4u32 << 20) + 1).to_be_bytes());
                36
            }),
            "too_large",
        ),
        (
            "extension length 2^32-1",
            &base,
            Box::new(|p| {
                let at = u64::from(be32(p, 100));
                patch(p, at + 4, &u32::MAX.to_be_bytes());
                at
            }),
            "extension_too_large",
        ),
    ];
    for (n, (what, from, f, code)) in cases.iter().enumerate() {
        let image = copy(from, d, &format!("c{n}.qcow2"));
        let offset = f(&image);
        eprintln!("{what}");
        assert_malformed(d, &image, code, offset);
    }
}

/// QEMU CVE-2014-0145, the qcow2 part ("Fix L1 allocation size in
/// qcow2_snapshot_load_tmp"): QEMU allocated a snapshot's L1 table with the
/// active table's size and read the snapshot's size into it, a heap
/// overflow. Here a snapshot claims a larger L1 table than the active one;
/// qcow2-guard sizes every table from its own entry and bounds it by the
/// file.
#[test]
fn cve_2014_0145_snapshot_l1_larger_than_active() {
    let dir = tmpdir();
    let d = dir.path();
    let base = snapshot_image(d);
    let e = be64(&base, 64);
    assert_eq!(be32(&base, 36), 1, "active L1 has one entry");

    // Larger than the active table and past the end of the file.
    let image = copy(&base, d, "past.qcow2");
    patch(&image, e + 8, &(1u32 << 20).to_be_bytes());
    assert_malformed(d, &image, "past_eof", e);

    // Two entries, the second (past the active table's one entry)
    // pointing past the end of the file: a reader that sized the snapshot
    // table from the active one would never see it; check must.
    let image = copy(&base, d, "inside.qcow2");
    patch(&image, e + 8, &2u32.to_be_bytes());
    let snap_l1 = be64(&image, e);
    let len = std::fs::metadata(&image).unwrap().len();
    patch(
        &image,
        snap_l1 + 8,
        &((len | 0xffff) + 1 + 0x10000).to_be_bytes(),
    );
    let info = guard_timed(d, &["info", "--json", s(&image)]);
    assert_eq!(info.code, 0, "{}", info.stdout);
    let check = guard_timed(d, &["check", "--json", s(&image)]);
    let v = check.json();
    assert_eq!(
        (check.code, v["verdict"].as_str()),
        (2, Some("corrupt")),
        "check: {v}"
    );
    let hit = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["code"] == "past_eof" && f["offset"] == snap_l1 + 8);
    assert!(hit, "no past_eof at the snapshot's second L1 entry: {v}");
    // convert audits the metadata (snapshot tables included) first.
    assert_convert_refused(d, &image, 2, "past_eof", &[]);
}

/// QEMU CVE-2014-0146 ("Fix NULL dereference in qcow2_open() error path"):
/// an image with snapshots whose open fails after the snapshot count was
/// read crashed QEMU while freeing the snapshot list. Here: two snapshots
/// and an unaligned L1 table.
#[test]
fn cve_2014_0146_open_error_with_snapshots() {
    let dir = tmpdir();
    let d = dir.path();
    let image = snapshot_image(d);
    assert_eq!(be32(&image, 60), 2);
    patch(&image, 40, &(be64(&image, 40) + 512).to_be_bytes());
    assert_malformed(d, &image, "unaligned", 40);
    // And with the snapshot table itself broken after the count was read.
    let image = snapshot_image(&{
        let sub = d.join("b");
        std::fs::create_dir(&sub).unwrap();
        sub
    });
    let e = be64(&image, 64);
    patch(&image, e, &(be64(&image, e) + 8).to_be_bytes());
    assert_malformed(d, &image, "unaligned", e);
}

/// QEMU CVE-2014-0147, the qcow2 part ("Don't rely on free_cluster_index
/// in alloc_refcount_block()"): a write path bug, where allocating a
/// refcount block for a crafted image overwrote metadata. qcow2-guard
/// never writes or allocates; the crafted layouts that misled QEMU (a
/// refcount block placed on other metadata) are corruption to `check`,
/// and `convert`, which runs the metadata check first, refuses them.
#[test]
fn cve_2014_0147_refcount_block_on_metadata() {
    let dir = tmpdir();
    let d = dir.path();
    let base = create(d, "base.qcow2", "", "1M");
    qemu_io(&base, &["write -P 0xaa 0 64k"]);
    let rt = be64(&base, 48);
    // (case, refcount table entry 0, where the overlap is reported: the
    // table entry, or the header field of the table it overlaps)
    for (name, target, at) in [("on-l1", be64(&base, 40), rt), ("on-itself", rt, 48)] {
        let image = copy(&base, d, &format!("{name}.qcow2"));
        patch(&image, rt, &target.to_be_bytes());
        let check = guard_timed(d, &["check", "--json", s(&image)]);
        let v = check.json();
        assert_eq!(
            (check.code, v["verdict"].as_str()),
            (2, Some("corrupt")),
            "{name}: {v}"
        );
        // The overlap is reported at the refcount table entry.
        let hit = v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["code"] == "metadata_overlap" && f["offset"] == at);
        assert!(hit, "{name}: no metadata_overlap at {at:#x}: {v}");
        assert!(
            v["finding-counts"]["refcount_too_low"].as_u64() >= Some(1),
            "{name}: {v}"
        );
        assert_convert_refused(d, &image, 2, "metadata_overlap", &[]);
    }
}

/// QEMU CVE-2015-5162 / OpenStack OSSA-2016-xxx ("tiny petabyte"): a few
/// KiB file claiming a petabyte disk and the largest tables QEMU allows
/// made `qemu-img info` take gigabytes and minutes; OpenStack's fix was
/// to run qemu-img under prlimit. qcow2-guard runs here under a 16 MiB
/// (info) or 64 MiB (check, convert) address-space limit.
#[test]
fn cve_2015_5162_tiny_petabyte() {
    let dir = tmpdir();
    let d = dir.path();
    let base = create(d, "base.qcow2", "", "1M");
    qemu_io(&base, &["write -P 0xaa 0 64k"]);
    // 1 PiB with 64 KiB clusters: 2 Mi L1 entries (16 MiB) in a 256 KiB file.
    let tiny = copy(&base, d, "tiny.qcow2");
    patch(&tiny, 24, &(1u64 << 50).to_be_bytes());
    patch(&tiny, 36, &(2u32 << 20).to_be_bytes());
    let allow = ["--max-virtual-size", "2P"];
    let r = guard_ulimit(d, 16384, &["info", "--json", s(&tiny)]);
    let v = r.json();
    assert_eq!(
        (
            r.code,
            v["error"]["code"].as_str(),
            v["error"]["offset"].as_u64()
        ),
        (2, Some("past_eof"), Some(40)),
        "{v}"
    );
    let r = guard_ulimit(
        d,
        65536,
        &[&["check", "--json", s(&tiny)][..], &allow].concat(),
    );
    let v = r.json();
    assert_eq!(
        (r.code, v["findings"][0]["code"].as_str()),
        (2, Some("past_eof")),
        "{v}"
    );
    // convert allows itself 256 Ki L1 entries (2 MiB): refused before
    // the table is even looked for, exit 4.
    let out = d.join("out.raw");
    let r = guard_ulimit(
        d,
        65536,
        &[&["convert", "-q", s(&tiny), s(&out)][..], &allow].concat(),
    );
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("[limit_exceeded] at offset 0x24"),
        "{}",
        r.stderr
    );
    assert_eq!(leftovers(d, "out.raw"), Vec::<String>::new());

    // A real 1 PiB image from qemu-img (16 MiB of L1 table, all zero).
    let peta = create(d, "peta.qcow2", "", "1P");
    // Refused by the default policy (64 TiB); convert's own L1 limit
    // (256 Ki entries, 2 MiB) refuses it even before the policy.
    assert_info_check_refuse(d, &peta, &["policy_virtual_size"], 24, &[]);
    assert_convert_refused(d, &peta, 4, "limit_exceeded", &[]);
    // Accepted when allowed: info and check stay within 64 MiB and
    // finish, and check reads the 16 MiB table cluster by cluster.
    let r = guard_ulimit(
        d,
        65536,
        &[&["info", "--json", s(&peta)][..], &allow].concat(),
    );
    assert_eq!(
        (r.code, r.json()["virtual-size"].as_u64()),
        (0, Some(1 << 50))
    );
    let r = guard_ulimit(
        d,
        65536,
        &[&["check", "--json", s(&peta)][..], &allow].concat(),
    );
    let v = r.json();
    assert_eq!((r.code, v["verdict"].as_str()), (0, Some("ok")), "{v}");
    // convert keeps its L1 table under 2 MiB: refused, exit 4.
    let r = guard_ulimit(
        d,
        65536,
        &[&["convert", "-q", s(&peta), s(&out)][..], &allow].concat(),
    );
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("[limit_exceeded]"), "{}", r.stderr);
    assert_eq!(leftovers(d, "out.raw"), Vec::<String>::new());
}

/// Panics and huge allocations in other qcow2 readers: a one-byte feature
/// name table (an index computed as `len / 48 - 1` style underflows),
/// cluster_bits >= 40 (shift overflow, e.g. ublk-org/qcow2-rs#8), and a
/// 120-byte file whose header extension claims 4 GiB (google/osv-scalibr
/// #1997). All refused with a code, under a 16 MiB address-space limit.
#[test]
fn peer_reader_panics_on_tiny_headers() {
    let dir = tmpdir();
    let d = dir.path();
    let base = create(d, "base.qcow2", "", "1M");

    let one_byte = copy(&base, d, "feature-table.qcow2");
    write_extensions(&one_byte, &[(FEATURE_TABLE_EXT, vec![0])]);
    assert_malformed(
        d,
        &one_byte,
        "invalid_extension_length",
        u64::from(be32(&base, 100)),
    );

    for bits in [40u32, 63, 64, 255] {
        let image = copy(&base, d, &format!("bits{bits}.qcow2"));
        patch(&image, 20, &bits.to_be_bytes());
        assert_malformed(d, &image, "invalid_cluster_bits", 20);
    }

    // The first 120 bytes of a qemu-img image, claiming a 32 MiB L1
    // table, then an 8 MiB refcount table (each checked against the file
    // length before anything is allocated).
    let tiny = copy(&base, d, "tiny-l1.qcow2");
    File::options()
        .write(true)
        .open(&tiny)
        .unwrap()
        .set_len(120)
        .unwrap();
    patch(&tiny, 24, &(1u64 << 51).to_be_bytes());
    patch(&tiny, 36, &(4u32 << 20).to_be_bytes());
    // convert's own L1 limit (256 Ki entries) refuses it first.
    assert_tiny(d, &tiny, ("past_eof", 40), (4, "limit_exceeded", 36));
    let tiny = copy(&tiny, d, "tiny-refcount.qcow2");
    patch(&tiny, 24, &0u64.to_be_bytes());
    patch(&tiny, 36, &0u32.to_be_bytes());
    patch(&tiny, 56, &128u32.to_be_bytes());
    // convert's refcount table limit (2 MiB) refuses it first.
    assert_tiny(d, &tiny, ("past_eof", 48), (4, "limit_exceeded", 56));
    // Two 512-byte clusters (header, refcount table) whose first header
    // extension claims 4 GiB.
    let ext = copy(&base, d, "tiny-extension.qcow2");
    File::options()
        .write(true)
        .open(&ext)
        .unwrap()
        .set_len(1024)
        .unwrap();
    patch(&ext, 20, &9u32.to_be_bytes());
    patch(&ext, 24, &0u64.to_be_bytes());
    patch(&ext, 36, &[0; 12]);
    patch(&ext, 48, &512u64.to_be_bytes());
    patch(&ext, 56, &1u32.to_be_bytes());
    patch(&ext, 112, &[0x12, 0x34, 0x56, 0x78, 0xff, 0xff, 0xff, 0xff]);
    let want = ("extension_too_large", 112);
    assert_tiny(d, &ext, want, (2, want.0, want.1));
}

/// info and check under 16 MiB of address space exit 2 with `code` at
/// `offset`; convert, under 64 MiB (it reserves stacks for its workers),
/// exits as `convert` says.
fn assert_tiny(d: &Path, image: &Path, (code, offset): (&str, u64), convert: (i32, &str, u64)) {
    for cmd in ["info", "check"] {
        let r = guard_ulimit(d, 16384, &[cmd, "--json", s(image)]);
        let v = r.json();
        let e = if cmd == "info" {
            &v["error"]
        } else {
            &v["findings"][0]
        };
        assert_eq!(
            (r.code, e["code"].as_str(), e["offset"].as_u64()),
            (2, Some(code), Some(offset)),
            "{cmd} {}: {v}",
            image.display()
        );
    }
    let out = d.join("out.raw");
    let r = guard_ulimit(d, 65536, &["convert", "-q", s(image), s(&out)]);
    let (exit, code, offset) = convert;
    assert_eq!(r.code, exit, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("[{code}] at offset {offset:#x}")),
        "{}",
        r.stderr
    );
    assert_eq!(leftovers(d, "out.raw"), Vec::<String>::new());
}

/// Bytes, mtime and ctime of a file.
fn fingerprint(p: &Path) -> (Vec<u8>, i64, i64, i64, i64) {
    let m = std::fs::metadata(p).unwrap();
    (
        std::fs::read(p).unwrap(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// Never writes the input: after every command, on a healthy image with
/// compressed clusters, snapshots and bitmaps and on a corrupt one, the
/// input's bytes, mtime and ctime are unchanged.
#[test]
fn input_is_never_written() {
    let dir = tmpdir();
    let d = dir.path();
    let raw = d.join("src.raw");
    write_raw(&raw, 1 << 20, 7);
    let good = d.join("good.qcow2");
    compress(&raw, &good, "");
    qemu_img(&["snapshot", "-c", "s1", s(&good)]);
    qemu_img(&["bitmap", "--add", s(&good), "b0"]);
    qemu_io(&good, &["write -P 0x11 0 4k"]);
    // Dirty, with a leaked cluster and a refcount that is too low: a
    // writer would "repair" these.
    let bad = copy(&good, d, "bad.qcow2");
    patch(&bad, 72, &1u64.to_be_bytes());
    let rb = be64(&bad, be64(&bad, 48)) & !0x1ff;
    patch(&bad, rb, &0u16.to_be_bytes());
    for image in [&good, &bad] {
        // Old timestamps, so any write would move them.
        let st = Command::new("touch")
            .args(["-d", "2001-02-03 04:05:06", s(image)])
            .status()
            .unwrap();
        assert!(st.success());
        let before = fingerprint(image);
        let out = d.join("out.raw");
        let runs: Vec<Vec<&str>> = vec![
            vec!["info", s(image)],
            vec!["info", "--json", s(image)],
            vec!["check", s(image)],
            vec!["check", "--json", s(image)],
            vec!["check", "--metadata-only", s(image)],
            vec!["convert", "-q", s(image), s(&out)],
            vec!["convert", "-q", s(image), "-"],
        ];
        for args in runs {
            let r = guard_timed(d, &args);
            assert!((0..=4).contains(&r.code), "{args:?}: {}", r.stderr);
            assert!(
                fingerprint(image) == before,
                "{args:?} changed {}",
                image.display()
            );
        }
        let _ = std::fs::remove_file(&out);
    }
}

/// `convert IMAGE IMAGE` must not replace the input with the raw disk.
#[test]
fn convert_refuses_to_replace_its_input() {
    let dir = tmpdir();
    let d = dir.path();
    let image = create(d, "in.qcow2", "", "1M");
    qemu_io(&image, &["write -P 0xaa 0 64k"]);
    let before = std::fs::read(&image).unwrap();
    let same = d.join(".").join("in.qcow2");
    for out in [image.clone(), same] {
        let r = guard_timed(d, &["convert", "-q", s(&image), s(&out)]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert_eq!(std::fs::read(&image).unwrap(), before, "input replaced");
    }
}

/// A reader that stops early (`qcow2-guard check IMAGE | head`) must not
/// make the tool panic (exit 101): a panic is a bug on any input.
#[test]
fn closed_stdout_is_not_a_panic() {
    let dir = tmpdir();
    let d = dir.path();
    // 512-byte clusters, 1 MiB written: 2048 data clusters, every one of
    // them refcount_too_low once the refcount block is zeroed, so the
    // human output (1000 findings) is larger than a pipe buffer.
    let image = create(d, "many.qcow2", "cluster_size=512", "1M");
    qemu_io(&image, &["write -P 0xaa 0 1M"]);
    let rb = be64(&image, be64(&image, 48));
    patch(&image, rb, &[0; 512]);
    for args in [["check", s(&image)], ["info", s(&image)]] {
        let mut child = Command::new(bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let status = child.wait().unwrap();
        assert_ne!(status.code(), Some(101), "{args:?} panicked");
        assert!(status.code().is_some(), "{args:?} died from a signal");
    }
}
