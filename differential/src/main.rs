//! qcow2-differential: structure-aware mutants of qemu-img images, judged
//! by qemu-img and by qcow2-guard's command-line tool, both run as black
//! boxes. Four properties:
//!
//! - P1: `check` and `convert` never crash, hang, or pass their memory bound;
//! - P2: if `check` exits 0, `qemu-img check` reports no corruption,
//!   `qemu-img info` opens it, `qemu-img convert -O raw` succeeds and its
//!   output equals ours, and each internal snapshot is read (`convert -l`)
//!   by both or by neither;
//! - P3: if `qemu-img check` reports corruption or cannot open the image,
//!   `check` does not exit 0;
//! - P4: whenever both convert (the disk, or a snapshot), the outputs
//!   are identical.
//!
//! Where `convert -O raw` does not cover the disk (one side cannot convert
//! it, or the outputs were not compared), random guest ranges (unaligned,
//! up to three clusters) are read by `qemu-io -r` and by our read API
//! (`Image::read_at`, in process): when both read a range the bytes must
//! be equal (P4); ranges only one side reads are counted and sampled.
//!
//! Seeded and reproducible: mutant `i` of seed `s` is the same on every
//! machine for the same seed list. Each failure prints its mutations and
//! keeps the mutant image with a text file saying how to replay it.
//!
//! ```text
//! qcow2-differential [--guard PATH] [--mutants N] [--seed S] [--jobs J]
//!                    [--work DIR] [--failures DIR] [--index I]
//!                    [--seeds NAME,NAME...] [--memory MIB] [--timeout SECS]
//!                    [--breakdown]
//! ```
//!
//! `--breakdown` adds, at the end, the causes of the two soft disagreements
//! (we refuse what `qemu-img check` calls clean; we find only leaks where
//! it finds corruption): mutants per first error code of our `check`,
//! whether `qemu-img convert` could read them, and per mutation kind.

mod locate;
mod mutate;
mod seeds;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use locate::Layout;
use mutate::{mutate, Mutation, Rng};

struct Args {
    guard: PathBuf,
    mutants: u64,
    seed: u64,
    jobs: u64,
    work: PathBuf,
    failures: PathBuf,
    index: Option<u64>,
    seeds: Vec<String>,
    memory_mib: u64,
    timeout: u64,
    breakdown: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        guard: PathBuf::from("target/release/qcow2-guard"),
        mutants: 2000,
        seed: 1,
        jobs: 2,
        work: std::env::temp_dir().join("qcow2-differential"),
        failures: PathBuf::from("differential-failures"),
        index: None,
        seeds: Vec::new(),
        memory_mib: 1024,
        timeout: 60,
        breakdown: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
        match flag.as_str() {
            "--guard" => a.guard = PathBuf::from(val()?),
            "--mutants" => a.mutants = num(val()?)?,
            "--seed" => a.seed = num(val()?)?,
            "--jobs" => a.jobs = num(val()?)?.max(1),
            "--work" => a.work = PathBuf::from(val()?),
            "--failures" => a.failures = PathBuf::from(val()?),
            "--index" => a.index = Some(num(val()?)?),
            "--seeds" => a.seeds = val()?.split(',').map(String::from).collect(),
            "--memory" => a.memory_mib = num(val()?)?,
            "--timeout" => a.timeout = num(val()?)?,
            "--breakdown" => a.breakdown = true,
            "-h" | "--help" => {
                // The usage block of this file's documentation.
                let usage = include_str!("main.rs")
                    .lines()
                    .skip_while(|l| *l != "//! ```text")
                    .skip(1)
                    .take_while(|l| *l != "//! ```")
                    .map(|l| l.trim_start_matches("//! "))
                    .collect::<Vec<_>>();
                println!("{}", usage.join("\n"));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// How one process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Exit(i32),
    /// Killed by the deadline (`timeout -s KILL`) or a signal.
    Killed,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Exit(c) => write!(f, "exit {c}"),
            End::Killed => write!(f, "killed (timeout or signal)"),
        }
    }
}

fn run(a: &Args, limit_memory: bool, prog: &Path, args: &[&str]) -> (End, String) {
    let mut c = Command::new("timeout");
    c.args(["-s", "KILL", &a.timeout.to_string()]);
    if limit_memory {
        c.arg("prlimit")
            .arg(format!("--as={}", a.memory_mib << 20))
            .arg("--");
    }
    c.arg(prog).args(args).stdin(Stdio::null());
    match c.output() {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let end = match o.status.code() {
                Some(137) | None => End::Killed,
                Some(c) => End::Exit(c),
            };
            (end, text)
        }
        Err(e) => (End::Exit(-1), format!("cannot run {}: {e}", prog.display())),
    }
}

/// Whether two files have the same bytes (read in 1 MiB chunks).
fn same_file(x: &Path, y: &Path) -> bool {
    use std::io::Read;
    let (Ok(mut f), Ok(mut g)) = (std::fs::File::open(x), std::fs::File::open(y)) else {
        return false;
    };
    let (Ok(mx), Ok(my)) = (f.metadata(), g.metadata()) else {
        return false;
    };
    if mx.len() != my.len() {
        return false;
    }
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut a) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 {
            return true;
        }
        if g.read_exact(&mut b[..n]).is_err() || a[..n] != b[..n] {
            return false;
        }
    }
}

/// The verdicts on one mutant.
struct Verdicts {
    ours_check: End,
    ours_convert: End,
    ours_info: End,
    qemu_check: End,
    qemu_check_text: String,
    qemu_convert: End,
    qemu_info: End,
    identical: Option<bool>,
    /// Per internal snapshot (when our convert accepted the image):
    /// (ID, ours, qemu-img, identical when both converted).
    snapshots: Vec<(String, End, End, Option<bool>)>,
    ours_text: String,
    /// The code of the first error our `check` printed (`error [code] ...`).
    ours_code: Option<String>,
    /// Random ranges, where convert did not compare the disk.
    ranges: Ranges,
}

/// The arguments our commands take for mutants of one seed, and the
/// snapshots whose data is compared.
struct SeedArgs<'a> {
    policy: &'a [String],
    convert: &'a [String],
    /// `--image-opts` options for qemu-img (empty: plain `-f qcow2 IMG`).
    qemu: &'a [String],
    snapshots: &'a [String],
}

/// Whether image `b` sets incompatible bit 2 (external data file).
fn has_data_file_bit(b: &[u8]) -> bool {
    b.get(4..8) == Some(&[0, 0, 0, 3][..]) && b.get(79).is_some_and(|x| x & 4 != 0)
}

/// qemu-img's image argument(s) for `img`.
fn qemu_image(img: &str, sa: &SeedArgs) -> Vec<String> {
    if sa.qemu.is_empty() {
        vec!["-f".into(), "qcow2".into(), img.into()]
    } else {
        let mut o = format!(
            "driver=qcow2,file.driver=file,file.filename={}",
            img.replace(',', ",,")
        );
        for x in sa.qemu {
            o.push(',');
            o.push_str(x);
        }
        vec!["--image-opts".into(), o]
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Our `convert` and `qemu-img convert -O raw` of the active disk (no
/// snapshot) or of snapshot `ID`; whether the outputs are identical
/// when both succeed.
fn convert_both(
    a: &Args,
    dir: &Path,
    img: &Path,
    sa: &SeedArgs,
    snapshot: Option<&str>,
) -> (End, String, End, Option<bool>) {
    let s = |p: &Path| p.display().to_string();
    let (ours_g, ours_q) = (dir.join("ours.raw"), dir.join("qemu.raw"));
    let _ = std::fs::remove_file(&ours_g);
    let _ = std::fs::remove_file(&ours_q);
    let sel = snapshot.map(|id| format!("snapshot.id={id}"));
    let mut ours: Vec<String> = vec!["convert".into(), "-q".into()];
    let mut qemu: Vec<String> = ["convert", "-O", "raw"].map(String::from).to_vec();
    if let Some(sel) = &sel {
        ours.extend(["-l".into(), sel.clone()]);
        qemu.extend(["-l".into(), sel.clone()]);
    }
    ours.extend(sa.policy.iter().chain(sa.convert).cloned());
    ours.extend([s(img), s(&ours_g)]);
    qemu.extend(qemu_image(&s(img), sa));
    qemu.push(s(&ours_q));
    let (ours_end, text) = run(a, true, &a.guard, &strs(&ours));
    let (qemu_end, _) = run(a, false, Path::new("qemu-img"), &strs(&qemu));
    let identical =
        (ours_end == End::Exit(0) && qemu_end == End::Exit(0)).then(|| same_file(&ours_g, &ours_q));
    let _ = std::fs::remove_file(&ours_g);
    let _ = std::fs::remove_file(&ours_q);
    (ours_end, text, qemu_end, identical)
}

fn judge(a: &Args, dir: &Path, img: &Path, sa: &SeedArgs) -> Verdicts {
    let path = img.display().to_string();
    let ours = |cmd: &str| {
        let mut v = vec![cmd];
        v.extend(sa.policy.iter().map(String::as_str));
        v.push(&path);
        run(a, true, &a.guard, &v)
    };
    let qemu = |cmd: &str| {
        let mut v = vec![cmd.to_string()];
        v.extend(qemu_image(&path, sa));
        run(a, false, Path::new("qemu-img"), &strs(&v))
    };
    let (ours_check, ours_text) = ours("check");
    let (ours_info, _) = ours("info");
    let (qemu_check, qemu_check_text) = qemu("check");
    let (qemu_info, _) = qemu("info");
    let (ours_convert, conv_text, qemu_convert, identical) = convert_both(a, dir, img, sa, None);
    let snapshots = if ours_convert == End::Exit(0) {
        sa.snapshots
            .iter()
            .map(|id| {
                let (o, _, q, same) = convert_both(a, dir, img, sa, Some(id));
                (id.clone(), o, q, same)
            })
            .collect()
    } else {
        Vec::new()
    };
    Verdicts {
        ours_check,
        ours_convert,
        ours_info,
        qemu_check,
        qemu_check_text,
        qemu_convert,
        qemu_info,
        identical,
        snapshots,
        ours_code: first_error_code(&ours_text),
        ours_text: format!("{ours_text}{conv_text}"),
        ranges: Ranges::default(),
    }
}

/// Random guest ranges read by `qemu-io -r` and by our `Image::read_at`.
#[derive(Default)]
struct Ranges {
    /// Both read the range: (offset, length, identical).
    both: Vec<(u64, u64, bool)>,
    /// Only qemu-io read it (we return an error).
    only_qemu: Vec<(u64, u64, String)>,
    /// Only we read it (qemu-io: read failed).
    only_ours: Vec<(u64, u64)>,
}

/// The reads of one `qemu-io -c 'read -v O L'...` run, in order: the
/// bytes, or `None` for "read failed".
fn parse_qemu_io(text: &str) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for line in text.lines() {
        if line.starts_with("read failed") {
            out.push(None);
            cur.clear();
        } else if line.starts_with("read ") && line.contains(" bytes at offset ") {
            out.push(Some(std::mem::take(&mut cur)));
        } else if let Some((addr, rest)) = line.split_once(":  ") {
            if addr.len() == 8 && addr.bytes().all(|c| c.is_ascii_hexdigit()) {
                // Up to 16 "xx " groups, then the characters.
                for tok in rest.split(' ').take(16) {
                    match u8::from_str_radix(tok, 16) {
                        Ok(b) if tok.len() == 2 => cur.push(b),
                        _ => break,
                    }
                }
            }
        }
    }
    out
}

/// Read `count` random ranges of `img` with qemu-io and with our library.
fn read_ranges(a: &Args, img: &Path, r: &mut Rng, count: u64) -> Ranges {
    use qcow2_guard::{FileSource, Image};
    let mut out = Ranges::default();
    let Ok(src) = FileSource::open(img) else {
        return out;
    };
    let Ok(image) = Image::open(src) else {
        return out;
    };
    let (size, cs) = (image.virtual_size(), image.geometry().cluster_size);
    if size == 0 {
        return out;
    }
    let ranges: Vec<(u64, u64)> = (0..count)
        .map(|_| {
            let off = r.below(size);
            let len = 1 + r.below((3 * cs).min(256 << 10).min(size - off));
            (off, len)
        })
        .collect();
    let mut args = vec!["-r".to_string(), "-f".into(), "qcow2".into()];
    for (off, len) in &ranges {
        args.push("-c".into());
        args.push(format!("read -v {off} {len}"));
    }
    args.push(img.display().to_string());
    let (end, text) = run(a, false, Path::new("qemu-io"), &strs(&args));
    if end != End::Exit(0) {
        return out;
    }
    let qemu = parse_qemu_io(&text);
    if qemu.len() != ranges.len() {
        return out;
    }
    for ((off, len), q) in ranges.into_iter().zip(qemu) {
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let ours = image.read_at(off, &mut buf);
        match (q, ours) {
            (Some(q), Ok(())) => out.both.push((off, len, q == buf)),
            (Some(_), Err(e)) => out.only_qemu.push((off, len, e.code().to_string())),
            (None, Ok(())) => out.only_ours.push((off, len)),
            (None, Err(_)) => {}
        }
    }
    out
}

/// The properties a mutant breaks.
fn failures(v: &Verdicts) -> Vec<&'static str> {
    let ok = |e: End| matches!(e, End::Exit(0..=4));
    let mut f = Vec::new();
    if !ok(v.ours_check) || !ok(v.ours_convert) || !ok(v.ours_info) {
        f.push("P1: check, info or convert crashed, hung or ran out of memory");
    }
    if v.snapshots.iter().any(|s| !ok(s.1)) {
        f.push("P1: convert -l (a snapshot) crashed, hung or ran out of memory");
    }
    // qemu-img check: 0 clean, 3 leaks only (no corruption), 2 corrupt,
    // 1 could not check (e.g. the image does not open).
    let qemu_clean = matches!(v.qemu_check, End::Exit(0 | 3));
    if v.ours_check == End::Exit(0) {
        if !qemu_clean {
            f.push("P2: check accepted; qemu-img check reports corruption or cannot open it");
        } else if v.qemu_convert != End::Exit(0) {
            f.push("P2: check accepted; qemu-img convert fails");
        } else if v.ours_convert != End::Exit(0) {
            f.push("P2: check accepted; our convert refuses what qemu-img converts");
        }
        if v.qemu_info != End::Exit(0) {
            f.push("P2: check accepted; qemu-img info cannot open it");
        }
        if v.snapshots
            .iter()
            .any(|s| (s.1 == End::Exit(0)) != (s.2 == End::Exit(0)))
        {
            f.push("P2: check accepted; our convert -l and qemu-img convert -l disagree on reading a snapshot");
        }
    }
    if !qemu_clean && v.ours_check == End::Exit(0) {
        f.push("P3: qemu-img check calls it corrupt or cannot open it; check exits 0");
    }
    if v.identical == Some(false) {
        f.push("P4: both convert, outputs differ");
    }
    if v.snapshots.iter().any(|s| s.3 == Some(false)) {
        f.push("P4: both convert a snapshot (-l), outputs differ");
    }
    if v.ranges.both.iter().any(|r| !r.2) {
        f.push("P4: qemu-io and our read_at read a range differently");
    }
    f
}

/// The code of the first `error [code]` line of our human output.
fn first_error_code(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("error ["))
        .and_then(|l| l.split(']').next())
        .map(String::from)
}

struct Seed {
    name: String,
    bytes: Vec<u8>,
    layout: Layout,
    policy: Vec<String>,
    convert: Vec<String>,
    qemu: Vec<String>,
}

impl Seed {
    /// The arguments for a mutant `bytes` of this seed: files the image
    /// needs are handed to both sides (see `seeds::Seed::qemu`).
    fn args(&self, bytes: &[u8]) -> SeedArgs<'_> {
        let hand_in = self.qemu.is_empty() || has_data_file_bit(bytes);
        let none: &[String] = &[];
        SeedArgs {
            policy: &self.policy,
            convert: if hand_in { &self.convert } else { none },
            qemu: if hand_in { &self.qemu } else { none },
            snapshots: &self.layout.snapshot_ids,
        }
    }
}

/// Mutant `index`: (seed index, bytes, mutations).
fn mutant(seeds: &[Seed], seed: u64, index: u64) -> (usize, Vec<u8>, Vec<Mutation>) {
    let mut r = Rng::new(
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    r.next();
    let s = usize::try_from(r.below(seeds.len() as u64)).unwrap_or(0);
    let mut bytes = seeds[s].bytes.clone();
    let muts = mutate(&mut r, &mut bytes, &seeds[s].layout);
    (s, bytes, muts)
}

#[derive(Default)]
struct Stats {
    done: u64,
    failed: u64,
    both_accept: u64,
    both_refuse: u64,
    we_refuse_qemu_clean: u64,
    both_converted_identical: u64,
    leak_disagreements: u64,
    matrix: std::collections::BTreeMap<String, u64>,
    /// Our `info` and `qemu-img info`: did each open the image?
    info_matrix: std::collections::BTreeMap<String, u64>,
    /// Snapshot conversions compared (both read them, identically).
    snapshots_identical: u64,
    /// Random ranges: both read identically; only qemu-io; only we.
    ranges_identical: u64,
    ranges_only_qemu: std::collections::BTreeMap<String, (u64, Vec<u64>)>,
    ranges_only_ours: (u64, Vec<u64>),
    /// Mutants of the soft disagreements, for `--breakdown`.
    soft: Vec<Soft>,
}

/// The soft disagreements `--breakdown` explains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SoftClass {
    /// Our check refuses (exit 1, 2 or 4), `qemu-img check` exits 0.
    WeRefuseQemuClean,
    /// Our check finds only leaks (exit 3), `qemu-img check` corruption.
    WeLeaksQemuCorrupt,
}

impl SoftClass {
    fn of(v: &Verdicts) -> Option<SoftClass> {
        match (v.ours_check, v.qemu_check) {
            (End::Exit(1 | 2 | 4), End::Exit(0)) => Some(SoftClass::WeRefuseQemuClean),
            (End::Exit(3), End::Exit(2)) => Some(SoftClass::WeLeaksQemuCorrupt),
            _ => None,
        }
    }
    fn title(self) -> &'static str {
        match self {
            SoftClass::WeRefuseQemuClean => "we refuse, qemu-img check clean",
            SoftClass::WeLeaksQemuCorrupt => "we find only leaks, qemu-img check finds corruption",
        }
    }
}

struct Soft {
    class: SoftClass,
    index: u64,
    /// Our first error code (for leaks-only mutants: `leaked_cluster`).
    code: String,
    qemu_reads: bool,
    /// What was mutated, without table indexes (`l2[][]: set a reserved bit (1..8)`).
    kinds: Vec<String>,
}

/// A mutation's kind: its description without the indexes and values.
fn kind_of(m: &Mutation) -> String {
    if m.width == 0 {
        return format!(
            "{} ({})",
            m.what,
            if m.new < m.old { "cut" } else { "extended" }
        );
    }
    let mut out = String::new();
    let mut in_index = false;
    for c in m.what.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// `--breakdown`: per class, mutants per first error code (with whether
/// `qemu-img convert` read them and a few replayable indexes), then the
/// mutation kinds behind each code.
fn print_breakdown(soft: &mut [Soft]) {
    use std::collections::BTreeMap;
    soft.sort_by_key(|s| (s.class, s.index));
    let mut classes: BTreeMap<SoftClass, Vec<&Soft>> = BTreeMap::new();
    for s in soft.iter() {
        classes.entry(s.class).or_default().push(s);
    }
    for (class, all) in classes {
        println!("breakdown: {} ({} mutants)", class.title(), all.len());
        println!("  mutants  qemu-img convert reads / fails  our first error code  (sample --index: read by qemu-img; not read)");
        let mut by_code: BTreeMap<&str, Vec<&Soft>> = BTreeMap::new();
        for s in &all {
            by_code.entry(s.code.as_str()).or_default().push(s);
        }
        let mut codes: Vec<_> = by_code.into_iter().collect();
        codes.sort_by(|x, y| y.1.len().cmp(&x.1.len()).then(x.0.cmp(y.0)));
        for (code, ms) in &codes {
            let reads = ms.iter().filter(|s| s.qemu_reads).count();
            let samples = |read: bool| {
                ms.iter()
                    .filter(|s| s.qemu_reads == read)
                    .take(3)
                    .map(|s| s.index.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "  {:>7}  {:>6} / {:<6}                   {code}  ({}; {})",
                ms.len(),
                reads,
                ms.len() - reads,
                samples(true),
                samples(false)
            );
            let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
            for s in ms {
                *kinds.entry(s.kinds.join(" + ")).or_default() += 1;
            }
            let mut kinds: Vec<_> = kinds.into_iter().collect();
            kinds.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
            for (k, n) in kinds.iter().take(8) {
                println!("           {n:>6}  {k}");
            }
            if kinds.len() > 8 {
                let rest: u64 = kinds.iter().skip(8).map(|(_, n)| n).sum();
                println!(
                    "           {rest:>6}  ({} other combinations)",
                    kinds.len() - 8
                );
            }
        }
    }
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("qcow2-differential: {e}");
            std::process::exit(1);
        }
    };
    if !a.guard.exists() {
        eprintln!(
            "qcow2-differential: {} not found (cargo build --release)",
            a.guard.display()
        );
        std::process::exit(1);
    }
    let started = Instant::now();
    let made = match seeds::make(&a.work.join("seeds"), &a.seeds) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("qcow2-differential: {e}");
            std::process::exit(1);
        }
    };
    let seeds: Vec<Seed> = made
        .into_iter()
        .map(|m| {
            let layout = Layout::of(&m.bytes);
            let seed = Seed {
                name: m.name,
                bytes: m.bytes,
                layout,
                policy: m.policy,
                convert: m.convert,
                qemu: m.qemu,
            };
            // A seed must be clean for both, or mutants prove nothing.
            let v = judge(&a, &a.work, &m.path, &seed.args(&seed.bytes));
            if v.ours_check != End::Exit(0)
                || v.qemu_check != End::Exit(0)
                || v.identical != Some(true)
                || !failures(&v).is_empty()
                || v.snapshots.iter().any(|s| s.3 != Some(true))
            {
                eprintln!(
                    "seed {} is not clean for both: ours {} / qemu {} / identical {:?} / snapshots {:?}\n{}{}",
                    seed.name, v.ours_check, v.qemu_check, v.identical, v.snapshots, v.ours_text, v.qemu_check_text
                );
                std::process::exit(1);
            }
            seed
        })
        .collect();
    let fields: usize = seeds.iter().map(|s| s.layout.fields.len()).sum();
    println!(
        "{} seeds, {fields} located fields, made in {:.1} s; seed {} mutants {} jobs {}",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        a.seed,
        a.mutants,
        a.jobs
    );

    let range: Vec<u64> = match a.index {
        Some(i) => vec![i],
        None => (0..a.mutants).collect(),
    };
    let next = AtomicU64::new(0);
    let stats = Mutex::new(Stats::default());
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for job in 0..a.jobs.min(range.len() as u64).max(1) {
            let (a, seeds, range, next, stats) = (&a, &seeds, &range, &next, &stats);
            scope.spawn(move || {
                let dir = a.work.join(format!("job{job}"));
                let _ = std::fs::create_dir_all(&dir);
                let img = dir.join("mutant.qcow2");
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&index) = range.get(usize::try_from(k).unwrap_or(usize::MAX)) else {
                        break;
                    };
                    let (s, bytes, muts) = mutant(seeds, a.seed, index);
                    if std::fs::write(&img, &bytes).is_err() {
                        eprintln!("cannot write {}", img.display());
                        break;
                    }
                    let mut v = judge(a, &dir, &img, &seeds[s].args(&bytes));
                    // Ranges where convert did not compare the disk (seeds
                    // needing no other file: the library is given none).
                    if v.identical.is_none()
                        && seeds[s].policy.is_empty()
                        && v.qemu_info == End::Exit(0)
                    {
                        let mut r =
                            Rng::new(a.seed ^ index.wrapping_mul(0xd6e8_feb8_6659_fd93) ^ 0x5eed);
                        v.ranges = read_ranges(a, &img, &mut r, 4);
                    }
                    let broken = failures(&v);
                    let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
                    st.done += 1;
                    let key = format!(
                        "ours check {} / qemu-img check {}",
                        v.ours_check, v.qemu_check
                    );
                    *st.matrix.entry(key).or_default() += 1;
                    let opened = |e: End, policy: bool| match e {
                        End::Exit(0) => "opens",
                        End::Exit(4) if policy => "opens (policy refusal)",
                        _ => "does not open",
                    };
                    let key = format!(
                        "ours info {} ({}) / qemu-img info {}",
                        opened(v.ours_info, true),
                        v.ours_info,
                        opened(v.qemu_info, false)
                    );
                    *st.info_matrix.entry(key).or_default() += 1;
                    st.snapshots_identical +=
                        v.snapshots.iter().filter(|s| s.3 == Some(true)).count() as u64;
                    st.ranges_identical += v.ranges.both.iter().filter(|r| r.2).count() as u64;
                    for (_, _, code) in &v.ranges.only_qemu {
                        let e = st.ranges_only_qemu.entry(code.clone()).or_default();
                        e.0 += 1;
                        if e.1.len() < 3 && !e.1.contains(&index) {
                            e.1.push(index);
                        }
                    }
                    if !v.ranges.only_ours.is_empty() {
                        st.ranges_only_ours.0 += v.ranges.only_ours.len() as u64;
                        if st.ranges_only_ours.1.len() < 5 {
                            st.ranges_only_ours.1.push(index);
                        }
                    }
                    match (v.ours_check, v.qemu_check) {
                        (End::Exit(0), End::Exit(0)) => st.both_accept += 1,
                        (End::Exit(0), End::Exit(3)) => st.leak_disagreements += 1,
                        (End::Exit(_), End::Exit(0)) => st.we_refuse_qemu_clean += 1,
                        _ => st.both_refuse += 1,
                    }
                    if v.identical == Some(true) {
                        st.both_converted_identical += 1;
                    }
                    if let Some(class) = SoftClass::of(&v).filter(|_| a.breakdown) {
                        st.soft.push(Soft {
                            class,
                            index,
                            code: v.ours_code.clone().unwrap_or_else(|| match v.ours_check {
                                End::Exit(3) => "(leaks only: warnings, no error)".into(),
                                e => format!("(no error line; {e})"),
                            }),
                            qemu_reads: v.qemu_convert == End::Exit(0),
                            kinds: muts.iter().map(kind_of).collect(),
                        });
                    }
                    if st.done % 1000 == 0 {
                        println!(
                            "  {} mutants, {} failures, {:.0} s",
                            st.done,
                            st.failed,
                            t0.elapsed().as_secs_f64()
                        );
                    }
                    if broken.is_empty() && a.index.is_none() {
                        continue;
                    }
                    if !broken.is_empty() {
                        st.failed += 1;
                    }
                    drop(st);
                    report(a, &seeds[s].name, index, &bytes, &muts, &v, &broken);
                }
            });
        }
    });
    let mut st = stats.into_inner().unwrap_or_else(|e| e.into_inner());
    println!(
        "{} mutants in {:.0} s: {} failures (P1-P4)",
        st.done,
        t0.elapsed().as_secs_f64(),
        st.failed
    );
    println!(
        "  both accept: {}; both refuse: {}; we refuse, qemu-img check clean: {}; we accept, qemu-img check finds only leaks: {}; both convert identically: {}",
        st.both_accept, st.both_refuse, st.we_refuse_qemu_clean, st.leak_disagreements, st.both_converted_identical
    );
    for (k, n) in &st.matrix {
        println!("  {n:>6}  {k}");
    }
    for (k, n) in &st.info_matrix {
        println!("  {n:>6}  {k}");
    }
    println!(
        "  snapshots converted identically (convert -l): {}",
        st.snapshots_identical
    );
    println!(
        "  random ranges (qemu-io -r vs read_at, where convert did not compare): {} read identically; {} read only by us (sample --index {:?})",
        st.ranges_identical, st.ranges_only_ours.0, st.ranges_only_ours.1
    );
    for (code, (n, samples)) in &st.ranges_only_qemu {
        println!("  {n:>6}  ranges read only by qemu-io; our read_at: {code} (sample --index {samples:?})");
    }
    if a.breakdown {
        print_breakdown(&mut st.soft);
    }
    if st.failed > 0 {
        std::process::exit(2);
    }
}

fn report(
    a: &Args,
    seed_name: &str,
    index: u64,
    bytes: &[u8],
    muts: &[Mutation],
    v: &Verdicts,
    broken: &[&str],
) {
    let mut text = format!(
        "mutant {index} of seed {} (base image {seed_name}):\n",
        a.seed
    );
    for m in muts {
        text.push_str(&format!("  mutation: {m}\n"));
    }
    text.push_str(&format!(
        "  ours: check {}, info {}, convert {}; qemu-img: check {}, info {}, convert {}; outputs identical: {:?}\n",
        v.ours_check, v.ours_info, v.ours_convert, v.qemu_check, v.qemu_info, v.qemu_convert, v.identical
    ));
    for (off, len, same) in &v.ranges.both {
        if !same {
            text.push_str(&format!(
                "  range {off:#x}+{len:#x}: qemu-io and read_at differ\n"
            ));
        }
    }
    for (off, len, code) in &v.ranges.only_qemu {
        text.push_str(&format!(
            "  range {off:#x}+{len:#x}: qemu-io reads; read_at: {code}\n"
        ));
    }
    for (off, len) in &v.ranges.only_ours {
        text.push_str(&format!(
            "  range {off:#x}+{len:#x}: read_at reads; qemu-io: read failed\n"
        ));
    }
    for (id, o, q, same) in &v.snapshots {
        text.push_str(&format!(
            "  snapshot {id}: ours convert -l {o}; qemu-img convert -l {q}; identical: {same:?}\n"
        ));
    }
    for b in broken {
        text.push_str(&format!("  FAILED {b}\n"));
    }
    let first = |s: &str| s.lines().take(6).collect::<Vec<_>>().join("\n    ");
    text.push_str(&format!("  ours says:\n    {}\n", first(&v.ours_text)));
    text.push_str(&format!(
        "  qemu-img check says:\n    {}\n",
        first(&v.qemu_check_text)
    ));
    text.push_str(&format!(
        "  replay: qcow2-differential --seed {} --index {index}{}\n",
        a.seed,
        if a.seeds.is_empty() {
            String::new()
        } else {
            format!(" --seeds {}", a.seeds.join(","))
        }
    ));
    // Failures, and a replayed mutant (`--index`), are kept.
    if !broken.is_empty() || a.index.is_some() {
        let _ = std::fs::create_dir_all(&a.failures);
        let base = a.failures.join(format!("seed{}-mutant{index}", a.seed));
        let _ = std::fs::write(base.with_extension("qcow2"), bytes);
        let _ = std::fs::write(base.with_extension("txt"), &text);
        text.push_str(&format!(
            "  reproducer: {}\n",
            base.with_extension("qcow2").display()
        ));
    }
    print!("{text}");
}
