//! `qcow2-guard check`: audit an image completely (see the library's
//! `check` module for what is checked).
//!
//! # JSON schema (`--json`), stable
//!
//! ```text
//! {
//!   "filename":  string,
//!   "format":    "qcow2",
//!   "verdict":   "ok" | "leaks" | "unsafe" | "corrupt" | "invalid"
//!                | "needs_random_access",   // check - without --spool
//!   "exit-code": 0 | 3 | 4 | 2 | 1,     // the process exit status
//!   "findings": [                        // walk order, at most 1000
//!     { "code": string,                  // stable snake_case identifier
//!       "severity": "error" | "warning" | "info",
//!       "offset": integer,               // byte offset in the image file
//!       "message": string }
//!   ],
//!   "findings-omitted": integer,         // findings past the cap
//!   "finding-counts": { code: integer }, // every finding, per code
//!   "image": {                           // absent when verdict is "invalid"
//!     "virtual-size", "file-length", "cluster-size": integer,
//!     "compat": "0.10" | "1.1", "refcount-bits": integer,
//!     "compression-type": "zlib" | "zstd", "extended-l2": bool,
//!     "lazy-refcounts": bool, "dirty": bool, "snapshots": integer,
//!     "bitmaps": integer, "backing-file": bool, "data-file": bool,
//!     "encrypted": bool
//!   },
//!   "stats": {                           // absent when verdict is "invalid"
//!     "total-clusters", "host-clusters", "allocated-clusters",
//!     "compressed-clusters", "fragmented-clusters", "image-end-offset",
//!     "corruptions", "leaks", "l2-tables", "decompressed-clusters": integer
//!   },
//!   "metadata-only": bool
//! }
//! ```
//!
//! Verdict precedence: `invalid` > `corrupt` > `unsafe` > `leaks` > `ok`.
//! A corrupt image that the policy also refuses is `corrupt` (exit 2) and
//! lists both kinds of findings: corruption is a property of the bytes no
//! `--allow-*` flag can relax, so an import service must not be invited
//! to retry with a relaxed policy. `invalid` means the image could not be
//! opened (exit 2 for a malformed qcow2 header, 1 when the file is not
//! qcow2, unreadable, or too large to check).

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use qcow2_guard::check::{self, CheckOptions, Report, Verdict};
use qcow2_guard::stream::{Inspector, SpoolFile};
use qcow2_guard::{FileSource, Image, Source};

use crate::exit::Exit;
use crate::open;
use crate::qemu::QemuArgs;
use crate::report;
use crate::{ImageArg, PolicyArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    image: ImageArg,
    /// Print JSON (schema in the documentation of `check`); the same as
    /// --output=json.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    qemu: QemuArgs,
    /// Print nothing; the exit status tells (qemu-img's -q).
    #[arg(short, long)]
    quiet: bool,
    /// Check metadata only: do not decompress compressed clusters.
    #[arg(long)]
    metadata_only: bool,
    /// Threads decompressing payloads (1-64; default: the available
    /// cores, at most 4). The report is the same for any value.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: Option<u16>,
    /// With IMAGE `-` (standard input, inspected as a stream): keep a copy
    /// of the stream in FILE, which also serves to read back tables that
    /// point backwards.
    #[arg(long, value_name = "FILE")]
    spool: Option<PathBuf>,
    /// External data file of IMAGE (needs --allow-data-file): the check
    /// then also finds guest data mapped past its end. Never opened
    /// unless given: without it, the image's tables are checked alone.
    #[arg(long, value_name = "FILE", requires = "allow_data_file")]
    data_file: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
}

pub fn run(args: &Args) -> Exit {
    let path = &args.image.image;
    let json = args.qemu.json(args.json);
    if let Err(e) = args.qemu.require_qcow2(path) {
        return e;
    }
    if path.as_os_str() == "-" {
        return run_stream(args);
    }
    if args.spool.is_some() {
        errln!("qcow2-guard: --spool goes with IMAGE `-` (standard input)");
        return Exit::NotChecked;
    }
    let data_file = match args.data_file.as_deref().map(|d| open::open_file(d, json)) {
        Some(Err(e)) => return e,
        Some(Ok(df)) => Some(Arc::new(df)),
        None => None,
    };
    let src = match FileSource::open(path) {
        Ok(s) => s,
        Err(e) => return report::unreadable(path, &e, json),
    };
    let opts = options(args);
    let (rep, image) = match Image::open_with(src, args.policy.limits()) {
        Ok(mut image) => {
            if let Some(df) = data_file {
                if !image.header().has_data_file() {
                    errln!(
                        "qcow2-guard: {}: --data-file given but the image has no external data file",
                        path.display()
                    );
                    return Exit::NotChecked;
                }
                image.set_data_file(df);
            }
            (check::check(&image, &opts), Some(image))
        }
        Err(e) => (Report::from_open_error(&e), None),
    };
    emit(args, path, image.as_ref(), &rep)
}

/// Print the report as asked (nothing with -q) and return the exit status.
fn emit<S: Source>(args: &Args, path: &Path, image: Option<&Image<S>>, rep: &Report) -> Exit {
    if args.quiet {
        // qemu-img check -q: the exit status only.
    } else if args.qemu.json(args.json) {
        report::print_json(&report_json(path, image, rep, args.metadata_only));
    } else {
        print_human(path, image, rep);
    }
    Exit::for_report(rep)
}

/// The check's options from the command line. The cores are counted only
/// when payloads will be decompressed (`--threads` unset): a metadata-only
/// check has no use for threads.
fn options(args: &Args) -> CheckOptions {
    let threads = match args.threads {
        Some(n) => usize::from(n),
        None if args.metadata_only => 1,
        None => qcow2_guard::parallel::default_threads(),
    };
    CheckOptions {
        policy: args.policy.policy(),
        decompress: !args.metadata_only,
        ..CheckOptions::with_threads(threads)
    }
}

/// `check -`: inspect standard input as it arrives ([`Inspector`]), with
/// `--spool FILE` keeping a copy (written beside FILE, renamed at the end).
fn run_stream(args: &Args) -> Exit {
    let path = Path::new("-");
    if args.data_file.is_some() {
        errln!("qcow2-guard: --data-file does not go with IMAGE `-` (standard input)");
        return Exit::NotChecked;
    }
    let opts = options(args);
    let limits = args.policy.limits();
    let spool = match args.spool.as_deref().map(spool_file).transpose() {
        Ok(s) => s,
        Err((p, e)) => return report::unreadable(&p, &e, args.qemu.json(args.json)),
    };
    let mut inspector = match &spool {
        Some(tmp) => match tmp.as_file().try_clone() {
            Ok(f) => Inspector::with_spool(limits, opts, Arc::new(SpoolFile::new(f))),
            Err(e) => return report::unreadable(tmp.path(), &e, args.qemu.json(args.json)),
        },
        None => Inspector::new(limits, opts),
    };
    let fed = pump_stdin(spool.as_ref(), |chunk| {
        inspector.feed(chunk);
        Ok::<(), std::convert::Infallible>(())
    });
    match fed {
        Ok(()) | Err(Pump::Stop(_)) => {}
        Err(Pump::Read(e)) => return report::unreadable(path, &e, args.qemu.json(args.json)),
        Err(Pump::Spool(p, e)) => return report::unreadable(&p, &e, args.qemu.json(args.json)),
    }
    let done = inspector.finish();
    if let (Some(tmp), Some(target)) = (spool, args.spool.as_deref()) {
        if let Err(e) = tmp.persist(target) {
            return report::unreadable(target, &e.error, args.qemu.json(args.json));
        }
    }
    emit(args, path, done.image.as_ref(), &done.report)
}

/// Why [`pump_stdin`] stopped early.
pub(crate) enum Pump<E> {
    /// Reading standard input failed.
    Read(io::Error),
    /// Writing the spool (this file) failed.
    Spool(PathBuf, io::Error),
    /// The consumer refused the stream.
    Stop(E),
}

/// Read standard input in 64 KiB pieces until its end, copying each to
/// `spool` first and then handing it to `feed`; an error from `feed`
/// stops reading at once.
pub(crate) fn pump_stdin<E>(
    spool: Option<&tempfile::NamedTempFile>,
    mut feed: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), Pump<E>> {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Pump::Read(e)),
        };
        let chunk = buf.get(..n).unwrap_or(&[]);
        if let Some(tmp) = spool {
            tmp.as_file()
                .write_all(chunk)
                .map_err(|e| Pump::Spool(tmp.path().to_path_buf(), e))?;
        }
        feed(chunk).map_err(Pump::Stop)?;
    }
}

/// A temporary file beside `target` (removed unless persisted).
pub(crate) fn spool_file(target: &Path) -> Result<tempfile::NamedTempFile, (PathBuf, io::Error)> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "spool".to_owned());
    tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o666))
        .prefix(&format!(".{name}."))
        .suffix(".qcow2-guard-tmp")
        .tempfile_in(&dir)
        .map_err(|e| (dir, e))
}

fn report_json<S: Source>(
    path: &Path,
    image: Option<&Image<S>>,
    rep: &Report,
    metadata_only: bool,
) -> Value {
    let name = path.display().to_string();
    let mut v = qcow2_guard::json::check(&name, image, rep, metadata_only);
    if let Some(obj) = v.as_object_mut() {
        // After "verdict", as the schema lists it.
        obj.shift_insert(3, "exit-code".into(), json!(Exit::for_report(rep).code()));
    }
    v
}

fn pct(n: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        n as f64 * 100.0 / total as f64
    }
}

fn print_human<S: Source>(path: &Path, image: Option<&Image<S>>, rep: &Report) {
    // One write for the whole report (standard output is line-buffered:
    // one system call a line otherwise).
    let mut out = Vec::new();
    human(&mut out, path, image, rep);
    let _ = io::stdout().write_all(&out);
}

fn human<S: Source>(out: &mut Vec<u8>, path: &Path, image: Option<&Image<S>>, rep: &Report) {
    macro_rules! outln {
        ($($t:tt)*) => {{
            let _ = writeln!(out, $($t)*);
        }};
    }
    for f in &rep.findings {
        outln!("{f}");
    }
    if rep.omitted > 0 {
        outln!("... {} more findings not shown", rep.omitted);
    }
    if rep.verdict == Verdict::Invalid {
        outln!("{}: not checked (invalid image)", path.display());
        return;
    }
    let s = &rep.stats;
    let errors: u64 = rep
        .findings
        .iter()
        .filter(|f| f.severity == qcow2_guard::Severity::Error)
        .count()
        .try_into()
        .unwrap_or(u64::MAX);
    match rep.verdict {
        Verdict::Ok => outln!("No errors were found on the image."),
        Verdict::Leaks => {
            if s.corruptions > 0 {
                outln!(
                    "{} stale refcounts were found on the dirty (lazy refcounts) image.\nqemu-img check -r all repairs them; the data is not harmed.",
                    s.corruptions
                );
            }
            if s.leaks > 0 || s.corruptions == 0 {
                outln!(
                    "{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                    s.leaks
                );
            }
        }
        Verdict::Unsafe => outln!("The image is refused by the safety policy."),
        Verdict::NeedsRandomAccess => outln!(
            "The stream could not be checked without random access (give --spool FILE)."
        ),
        Verdict::Corrupt | Verdict::Invalid => outln!(
            "{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            errors.saturating_add(rep.omitted)
        ),
    }
    if image.is_some() {
        outln!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            s.allocated_clusters,
            s.total_clusters,
            pct(s.allocated_clusters, s.total_clusters),
            pct(s.fragmented_clusters, s.allocated_clusters),
            pct(s.compressed_clusters, s.allocated_clusters),
        );
        outln!("Image end offset: {}", s.image_end_offset);
    }
}
