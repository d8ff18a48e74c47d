//! qcow2-differential: structure-aware mutants of qemu-img images, judged
//! by qemu-img and by qcow2-guard's command-line tool, both run as black
//! boxes. Four properties:
//!
//! - P1: `check` and `convert` never crash, hang, or pass their memory bound;
//! - P2: if `check` exits 0, `qemu-img check` reports no corruption,
//!   `qemu-img convert -O raw` succeeds and its output equals ours;
//! - P3: if `qemu-img check` reports corruption or cannot open the image,
//!   `check` does not exit 0;
//! - P4: whenever both convert, the outputs are identical.
//!
//! Seeded and reproducible: mutant `i` of seed `s` is the same on every
//! machine for the same seed list. Each failure prints its mutations and
//! keeps the mutant image with a text file saying how to replay it.
//!
//! ```text
//! qcow2-differential [--guard PATH] [--mutants N] [--seed S] [--jobs J]
//!                    [--work DIR] [--failures DIR] [--index I]
//!                    [--seeds NAME,NAME...] [--memory MIB] [--timeout SECS]
//! ```

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
            "-h" | "--help" => {
                println!(
                    "{}",
                    include_str!("main.rs")
                        .lines()
                        .skip(17)
                        .take(4)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
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
    qemu_check: End,
    qemu_check_text: String,
    qemu_convert: End,
    identical: Option<bool>,
    ours_text: String,
}

fn judge(a: &Args, dir: &Path, img: &Path) -> Verdicts {
    let s = |p: &Path| p.display().to_string();
    let (ours_g, ours_q) = (dir.join("ours.raw"), dir.join("qemu.raw"));
    let _ = std::fs::remove_file(&ours_g);
    let _ = std::fs::remove_file(&ours_q);
    let (ours_check, ours_text) = run(a, true, &a.guard, &["check", &s(img)]);
    let (ours_convert, conv_text) =
        run(a, true, &a.guard, &["convert", "-q", &s(img), &s(&ours_g)]);
    let (qemu_check, qemu_check_text) = run(
        a,
        false,
        Path::new("qemu-img"),
        &["check", "-f", "qcow2", &s(img)],
    );
    let (qemu_convert, _) = run(
        a,
        false,
        Path::new("qemu-img"),
        &["convert", "-f", "qcow2", "-O", "raw", &s(img), &s(&ours_q)],
    );
    let identical = (ours_convert == End::Exit(0) && qemu_convert == End::Exit(0))
        .then(|| same_file(&ours_g, &ours_q));
    let _ = std::fs::remove_file(&ours_g);
    let _ = std::fs::remove_file(&ours_q);
    Verdicts {
        ours_check,
        ours_convert,
        qemu_check,
        qemu_check_text,
        qemu_convert,
        identical,
        ours_text: format!("{ours_text}{conv_text}"),
    }
}

/// The properties a mutant breaks.
fn failures(v: &Verdicts) -> Vec<&'static str> {
    let ok = |e: End| matches!(e, End::Exit(0..=4));
    let mut f = Vec::new();
    if !ok(v.ours_check) || !ok(v.ours_convert) {
        f.push("P1: check or convert crashed, hung or ran out of memory");
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
    }
    if !qemu_clean && v.ours_check == End::Exit(0) {
        f.push("P3: qemu-img check calls it corrupt or cannot open it; check exits 0");
    }
    if v.identical == Some(false) {
        f.push("P4: both convert, outputs differ");
    }
    f
}

struct Seed {
    name: String,
    bytes: Vec<u8>,
    layout: Layout,
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
        .map(|(name, path, bytes)| {
            // A seed must be clean for both, or mutants prove nothing.
            let v = judge(&a, &a.work, &path);
            if v.ours_check != End::Exit(0)
                || v.qemu_check != End::Exit(0)
                || v.identical != Some(true)
            {
                eprintln!(
                    "seed {name} is not clean for both: ours {} / qemu {} / identical {:?}\n{}{}",
                    v.ours_check, v.qemu_check, v.identical, v.ours_text, v.qemu_check_text
                );
                std::process::exit(1);
            }
            let layout = Layout::of(&bytes);
            Seed {
                name,
                bytes,
                layout,
            }
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
                    let v = judge(a, &dir, &img);
                    let broken = failures(&v);
                    let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
                    st.done += 1;
                    let key = format!(
                        "ours check {} / qemu-img check {}",
                        v.ours_check, v.qemu_check
                    );
                    *st.matrix.entry(key).or_default() += 1;
                    match (v.ours_check, v.qemu_check) {
                        (End::Exit(0), End::Exit(0)) => st.both_accept += 1,
                        (End::Exit(0), End::Exit(3)) => st.leak_disagreements += 1,
                        (End::Exit(_), End::Exit(0)) => st.we_refuse_qemu_clean += 1,
                        _ => st.both_refuse += 1,
                    }
                    if v.identical == Some(true) {
                        st.both_converted_identical += 1;
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
    let st = stats.into_inner().unwrap_or_else(|e| e.into_inner());
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
        "  ours: check {}, convert {}; qemu-img: check {}, convert {}; outputs identical: {:?}\n",
        v.ours_check, v.ours_convert, v.qemu_check, v.qemu_convert, v.identical
    ));
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
    if !broken.is_empty() {
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
