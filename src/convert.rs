//! `qcow2-guard convert IMAGE OUTPUT`: write the raw guest disk of an
//! untrusted image, without QEMU.
//!
//! The safety policy is applied before anything is written. The output
//! goes to a temporary file beside OUTPUT that is renamed at the end and
//! removed on any error, so a failed conversion leaves no OUTPUT. With
//! OUTPUT `-` the disk goes to stdout and nothing else does.
//!
//! Work is split in guest chunks of 256 KiB or one cluster (one chunk for
//! a run of unallocated L1 entries). Two workers take chunks in turn
//! (worker `w` takes chunks `w, w + 2, ...`): each maps its chunk, reads
//! contiguous host ranges with one positional read, decompresses, and
//! marks zero and unallocated ranges and all-zero 4 KiB blocks as holes.
//! Into a file, the workers write their chunks themselves with positional
//! writes, skipping holes (the file is then sized to the virtual disk);
//! into a stream, the main thread writes the chunks in order, with zeros
//! for holes. At most a few chunks are in flight, so memory does not grow
//! with the image.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use qcow2_guard::check::code as check_code;
use qcow2_guard::read::RawBacking;
use qcow2_guard::{
    check, CheckOptions, Error, ExtentKind, FileSource, Image, Limits, Report, Severity,
};

use crate::exit::Exit;
use crate::report;
use crate::{ImageArg, PolicyArgs};

/// Guest bytes per unit of work (at least one cluster). Small enough that
/// a chunk is still in the CPU cache when it is written (4 MiB chunks cost
/// twice the system time on a compressed image), large enough for
/// efficient positional reads and writes.
const CHUNK: u64 = 256 << 10;
/// Granularity of zero detection in data: holes smaller than a file system
/// block gain nothing.
const ZERO_BLOCK: usize = 4096;
/// Workers filling chunks.
const WORKERS: usize = 2;
/// Chunk buffers per worker.
const BUFFERS: usize = 3;
/// L2 cache budget for a conversion (the walk is sequential, so a small
/// cache suffices).
const CACHE_BYTES: u64 = 4 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    image: ImageArg,
    /// Where to write the raw disk; `-` for stdout.
    output: PathBuf,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Backing image (qcow2 or raw) to read unallocated clusters from.
    /// Needs --allow-backing. Without it, unallocated clusters read as
    /// zeros; the backing file named inside the image is never opened.
    #[arg(long, value_name = "FILE", requires = "allow_backing")]
    backing: Option<PathBuf>,
    /// External data file holding the guest data. Needs --allow-data-file;
    /// the data file named inside the image is never opened.
    #[arg(long, value_name = "FILE", requires = "allow_data_file")]
    data_file: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// Why a conversion stopped.
enum Failure {
    /// The image (or the backing image) is broken.
    Image(PathBuf, Error),
    /// Refused: a message for stderr.
    Refused(String),
    /// The metadata check found errors (or the policy refused the image).
    Audit(PathBuf, Box<Report>),
    /// Reading an input file or writing the output failed.
    Io(String),
}

impl From<(PathBuf, Error)> for Failure {
    fn from((p, e): (PathBuf, Error)) -> Failure {
        Failure::Image(p, e)
    }
}

pub fn run(args: &Args) -> Exit {
    match convert(args) {
        Ok(()) => Exit::Ok,
        Err(Failure::Image(path, e)) => report::fatal(&path, &e, false),
        Err(Failure::Audit(path, r)) => {
            let errors: Vec<_> = r
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .collect();
            errln!(
                "qcow2-guard: {}: refused: the metadata check says {} ({} error finding(s); run `qcow2-guard check` for all of them)",
                path.display(),
                r.verdict.as_str(),
                errors.len()
            );
            for f in errors.iter().take(10) {
                errln!("  {f}");
            }
            match r.exit_code {
                0 | 3 => Exit::Corrupt,
                1 => Exit::NotChecked,
                4 => Exit::Refused,
                _ => Exit::Corrupt,
            }
        }
        Err(Failure::Refused(msg)) => {
            errln!("qcow2-guard: {msg}");
            Exit::Refused
        }
        Err(Failure::Io(msg)) => {
            errln!("qcow2-guard: {msg}");
            Exit::NotChecked
        }
    }
}

/// Limits for a conversion: the caller's, with tables, caches and
/// directories small enough that peak memory stays bounded whatever the
/// image claims (an image needing more is refused, exit 4).
fn convert_limits(policy: &PolicyArgs) -> Limits {
    let mut l = policy.limits().with_max_cache_bytes(CACHE_BYTES);
    // 2 MiB of L1 maps 16 TiB with 64 KiB clusters (8 GiB with 512 bytes).
    l.max_l1_entries = l.max_l1_entries.min(256 << 10);
    l.max_refcount_table_bytes = l.max_refcount_table_bytes.min(2 << 20);
    l.max_snapshots = l.max_snapshots.min(4096);
    l.max_snapshot_table_bytes = l.max_snapshot_table_bytes.min(4 << 20);
    l.max_bitmaps = l.max_bitmaps.min(4096);
    l.max_bitmap_directory_bytes = l.max_bitmap_directory_bytes.min(4 << 20);
    l
}

fn open_file(path: &Path) -> Result<FileSource, Failure> {
    FileSource::open(path).map_err(|e| Failure::Io(format!("{}: cannot open: {e}", path.display())))
}

fn open_image(args: &Args) -> Result<Image<FileSource>, Failure> {
    let path = &args.image.image;
    let policy = args.policy.policy();
    let limits = convert_limits(&args.policy);
    let mut image =
        Image::open_with(open_file(path)?, limits.clone()).map_err(|e| (path.clone(), e))?;
    refuse_on_policy(path, &image, &policy)?;
    audit(path, &image, &policy)?;

    if image.header().has_data_file() {
        let Some(df) = &args.data_file else {
            return Err(Failure::Refused(format!(
                "{}: guest data lives in an external data file; pass it with --data-file FILE",
                path.display()
            )));
        };
        image.set_data_file(Arc::new(open_file(df)?));
    } else if args.data_file.is_some() {
        return Err(Failure::Refused(format!(
            "{}: --data-file given but the image has no external data file",
            path.display()
        )));
    }

    match &args.backing {
        Some(b) => {
            let src = open_file(b)?;
            let mut magic = [0u8; 4];
            let is_qcow2 = qcow2_guard::Source::read_exact_at(&src, 0, &mut magic).is_ok()
                && u32::from_be_bytes(magic) == qcow2_guard::header::MAGIC;
            if is_qcow2 {
                let backing = Image::open_with(src, limits).map_err(|e| (b.clone(), e))?;
                // The backing image must pass the same policy; its own
                // backing chain is not followed.
                refuse_on_policy(b, &backing, &policy)?;
                if backing.header().has_data_file() {
                    return Err(Failure::Refused(format!(
                        "{}: backing image with an external data file is not supported",
                        b.display()
                    )));
                }
                image.set_backing(Arc::new(backing));
            } else {
                image.set_backing(Arc::new(RawBacking(src)));
            }
        }
        None if image.header().has_backing_file() => {
            errln!(
                "qcow2-guard: {}: no --backing given: unallocated clusters are written as zeros",
                path.display()
            );
        }
        None => {}
    }
    Ok(image)
}

fn refuse_on_policy(
    path: &Path,
    image: &Image<FileSource>,
    policy: &qcow2_guard::Policy,
) -> Result<(), Failure> {
    let refusals: Vec<_> = image
        .policy_findings(policy)
        .into_iter()
        .filter(|f| f.severity == Severity::Error)
        .collect();
    if refusals.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = refusals
        .iter()
        .map(|f| format!("{}: {f}", path.display()))
        .collect();
    Err(Failure::Refused(format!(
        "refused by policy:\n  {}",
        lines.join("\n  ")
    )))
}

/// Host clusters the pre-conversion audit may track: about 2.25 bytes
/// each in check's refcount rebuild, so 20 Mi clusters (a 1.25 TiB file of
/// 64 KiB clusters) stay near 45 MiB, freed before conversion starts.
const AUDIT_TRACKED_CLUSTERS: u64 = 20 << 20;

/// The metadata check `check` runs, without decompression, before anything
/// is written: error findings and policy violations refuse the image;
/// leaks and warnings do not. A file with more host clusters than the
/// audit can track in bounded memory is converted without the refcount
/// rebuild: every L1/L2 entry is still validated as it is read.
fn audit(
    path: &Path,
    image: &Image<FileSource>,
    policy: &qcow2_guard::Policy,
) -> Result<(), Failure> {
    let opts = CheckOptions {
        max_tracked_clusters: AUDIT_TRACKED_CLUSTERS,
        ..CheckOptions::metadata_only(policy.clone())
    };
    let report = check(image, &opts);
    if !report.blocks_convert() {
        return Ok(());
    }
    let only_too_large = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .all(|f| f.code == check_code::TOO_LARGE_TO_CHECK);
    if only_too_large {
        errln!(
            "qcow2-guard: {}: warning: too many host clusters for the pre-conversion audit; refcounts are not rebuilt, entries are still validated as they are read",
            path.display()
        );
        return Ok(());
    }
    Err(Failure::Audit(path.to_path_buf(), Box::new(report)))
}

/// Refuse an OUTPUT that is one of the inputs (by device and inode, so
/// `./in.qcow2`, hard links and symlinks are caught): the final rename
/// would replace the input with the raw disk.
fn refuse_output_over_input(args: &Args) -> Result<(), Failure> {
    use std::os::unix::fs::MetadataExt;
    let Ok(out) = std::fs::metadata(&args.output) else {
        return Ok(());
    };
    let inputs = std::iter::once(&args.image.image)
        .chain(args.backing.as_ref())
        .chain(args.data_file.as_ref());
    for input in inputs {
        if let Ok(m) = std::fs::metadata(input) {
            if (m.dev(), m.ino()) == (out.dev(), out.ino()) {
                return Err(Failure::Io(format!(
                    "{}: OUTPUT is the input file {}; refusing to replace it",
                    args.output.display(),
                    input.display()
                )));
            }
        }
    }
    Ok(())
}

fn convert(args: &Args) -> Result<(), Failure> {
    if args.output.as_os_str() != "-" {
        refuse_output_over_input(args)?;
    }
    let image = open_image(args)?;
    let to_stdout = args.output.as_os_str() == "-";
    let size = image.virtual_size();
    let progress = progress_bar(size, args.quiet);

    // An existing OUTPUT that is not a regular file (a device, a FIFO) is
    // written in place as a stream: renaming over it would replace it.
    let special =
        !to_stdout && std::fs::metadata(&args.output).is_ok_and(|m| !m.file_type().is_file());
    if to_stdout || special {
        let (sink, what): (Box<dyn Write>, String) = if to_stdout {
            (Box::new(io::stdout().lock()), "stdout".to_owned())
        } else {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&args.output)
                .map_err(|e| Failure::Io(format!("{}: cannot open: {e}", args.output.display())))?;
            (Box::new(f), args.output.display().to_string())
        };
        let mut out = Output::Stream(sink);
        pump(&image, &args.image.image, &mut out, &progress)?;
        if let Output::Stream(s) = &mut out {
            s.flush()
                .map_err(|e| Failure::Io(format!("writing {what}: {e}")))?;
        }
    } else {
        let target = &args.output;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".to_owned());
        // Removed when dropped, i.e. on every error path.
        let tmp = tempfile::Builder::new()
            // Like any new file (the umask applies), not tempfile's 0600.
            .permissions(std::fs::Permissions::from_mode(0o666))
            .prefix(&format!(".{name}."))
            .suffix(".qcow2-guard-tmp")
            .tempfile_in(&dir)
            .map_err(|e| Failure::Io(format!("{}: cannot create a file: {e}", dir.display())))?;
        let werr = |e: io::Error| Failure::Io(format!("writing {}: {e}", target.display()));
        {
            let mut out = Output::File(tmp.as_file());
            pump(&image, &args.image.image, &mut out, &progress)?;
        }
        tmp.as_file().set_len(size).map_err(werr)?;
        tmp.persist(target).map_err(|e| werr(e.error))?;
    }
    progress.finish_and_clear();
    Ok(())
}

fn progress_bar(size: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    // Draws only when stderr is a terminal.
    let pb = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style);
    }
    pb
}

enum Output<'a> {
    /// A new regular file: holes are skipped.
    File(&'a File),
    /// Sequential output: holes are written as zeros.
    Stream(Box<dyn Write + 'a>),
}

/// A filled chunk: guest bytes `start .. start + len`, with the ranges
/// (relative to `start`) that read as zeros. `data` is empty for a chunk
/// that is one hole.
struct Chunk {
    start: u64,
    len: usize,
    data: Vec<u8>,
    /// Sorted, disjoint `(offset, len)` ranges of zeros.
    holes: Vec<(usize, usize)>,
}

/// The guest chunks of an image, in order: `(start, end, hole)`. A run of
/// unallocated L1 entries (without a backing image) is one hole chunk of
/// any length; everything else is cut at multiples of the chunk size.
/// Derived from the L1 table alone, so every worker can walk the same
/// sequence and take its share.
struct Chunks<'a> {
    image: &'a Image<FileSource>,
    chunk: u64,
    pos: u64,
}

impl Iterator for Chunks<'_> {
    type Item = (u64, u64, bool);

    fn next(&mut self) -> Option<(u64, u64, bool)> {
        let image = self.image;
        let (pos, size) = (self.pos, image.virtual_size());
        if pos >= size {
            return None;
        }
        let bits = image.geometry().l2_span_bits();
        let unallocated = |i: u64| matches!(image.l1_entry(i), Ok(e) if e.l2_offset.is_none());
        let mut l1 = pos >> bits;
        let (end, hole) = if unallocated(l1) && image.backing().is_none() {
            while (l1 + 1) << bits < size && unallocated(l1 + 1) {
                l1 += 1;
            }
            (((l1 + 1) << bits).min(size), true)
        } else {
            (((pos / self.chunk + 1) * self.chunk).min(size), false)
        };
        self.pos = end;
        Some((pos, end, hole))
    }
}

fn chunks(image: &Image<FileSource>) -> Chunks<'_> {
    Chunks {
        image,
        chunk: CHUNK.max(image.geometry().cluster_size),
        pos: 0,
    }
}

/// Fill every chunk with the workers and write it.
fn pump(
    image: &Image<FileSource>,
    path: &Path,
    out: &mut Output<'_>,
    progress: &ProgressBar,
) -> Result<(), Failure> {
    match out {
        Output::File(f) => pump_to_file(image, path, f, progress),
        Output::Stream(s) => pump_to_stream(image, path, s.as_mut(), progress),
    }
}

/// Into a regular file order does not matter: each worker fills its
/// chunks and writes them itself with positional writes, reusing one
/// buffer. No hand-offs, so many small hole chunks cost nothing.
fn pump_to_file(
    image: &Image<FileSource>,
    path: &Path,
    file: &File,
    progress: &ProgressBar,
) -> Result<(), Failure> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let stop = &stop;
                s.spawn(move || -> Result<(), Failure> {
                    let mut buf = Vec::new();
                    let mut runs = HostRun::default();
                    for (k, (start, end, hole)) in chunks(image).enumerate() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if k % WORKERS != w {
                            continue;
                        }
                        if !hole {
                            let r =
                                fill_chunk(image, start, end, std::mem::take(&mut buf), &mut runs)
                                    .map_err(|e| Failure::Image(path.to_path_buf(), e))
                                    .and_then(|c| write_to_file(file, &c).map(|_| c));
                            match r {
                                Ok(c) => buf = c.data,
                                Err(e) => {
                                    stop.store(true, Ordering::Relaxed);
                                    return Err(e);
                                }
                            }
                        }
                        progress.inc(end - start);
                    }
                    Ok(())
                })
            })
            .collect();
        let mut result = Ok(());
        for h in workers {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Failure::Io("a worker panicked".to_owned())));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// Into a stream the chunks must go in order: worker `w` fills chunks
/// `w, w + 2, ...` and hands them over; this thread writes them, with
/// zeros for holes.
fn pump_to_stream(
    image: &Image<FileSource>,
    path: &Path,
    out: &mut dyn Write,
    progress: &ProgressBar,
) -> Result<(), Failure> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut results = Vec::with_capacity(WORKERS);
        let mut recycle = Vec::with_capacity(WORKERS);
        for w in 0..WORKERS {
            let (tx, rx) = mpsc::sync_channel::<Result<Chunk, Failure>>(1);
            let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
            results.push(rx);
            recycle.push(back_tx);
            let stop = &stop;
            s.spawn(move || {
                let mut buffers = 0;
                let mut runs = HostRun::default();
                for (k, (start, end, hole)) in chunks(image).enumerate() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if k % WORKERS != w {
                        continue;
                    }
                    let len = (end - start) as usize;
                    let r = if hole {
                        Ok(Chunk {
                            start,
                            len,
                            data: Vec::new(),
                            holes: vec![(0, len)],
                        })
                    } else {
                        // Reuse written buffers; at most BUFFERS per
                        // worker: one being filled, one queued, one being
                        // written.
                        let buf = match back_rx.try_recv() {
                            Ok(b) => b,
                            Err(_) if buffers < BUFFERS => {
                                buffers += 1;
                                Vec::new()
                            }
                            Err(_) => match back_rx.recv() {
                                Ok(b) => b,
                                Err(_) => return,
                            },
                        };
                        fill_chunk(image, start, end, buf, &mut runs)
                            .map_err(|e| Failure::Image(path.to_path_buf(), e))
                    };
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                }
            });
        }
        let zeros = vec![0u8; 1 << 16];
        let size = image.virtual_size();
        let mut pos = 0;
        let mut k = 0;
        let mut result = Ok(());
        while pos < size {
            let w = k % WORKERS;
            let chunk = match results[w].recv() {
                Ok(Ok(c)) if c.start == pos => c,
                Ok(Ok(_)) => {
                    result = Err(Failure::Io("chunks out of order".to_owned()));
                    break;
                }
                Ok(Err(e)) => {
                    result = Err(e);
                    break;
                }
                Err(_) => {
                    result = Err(Failure::Io("a worker stopped unexpectedly".to_owned()));
                    break;
                }
            };
            if let Err(e) = write_to_stream(out, &chunk, &zeros) {
                result = Err(e);
                break;
            }
            pos += chunk.len as u64;
            k += 1;
            progress.inc(chunk.len as u64);
            if !chunk.data.is_empty() {
                // The worker may be gone already; then the buffer is freed.
                let _ = recycle[w].send(chunk.data);
            }
        }
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // Dropping the receivers unblocks any worker waiting to send.
        drop(results);
        result
    })
}

/// The pieces of a chunk in order: `(offset, len, hole)`.
fn pieces(c: &Chunk) -> Vec<(usize, usize, bool)> {
    let mut pos = 0usize;
    let mut out = Vec::with_capacity(c.holes.len() * 2 + 1);
    for &(off, len) in &c.holes {
        if off > pos {
            out.push((pos, off - pos, false));
        }
        out.push((off, len, true));
        pos = off + len;
    }
    if pos < c.len {
        out.push((pos, c.len - pos, false));
    }
    out
}

fn write_error(e: io::Error) -> Failure {
    Failure::Io(format!("writing output: {e}"))
}

/// Write a chunk into a new file: skipping a hole leaves it unallocated.
fn write_to_file(f: &File, c: &Chunk) -> Result<(), Failure> {
    for (off, len, hole) in pieces(c) {
        if !hole {
            f.write_all_at(&c.data[off..off + len], c.start + off as u64)
                .map_err(write_error)?;
        }
    }
    Ok(())
}

/// Write a chunk into a stream, holes as zeros.
fn write_to_stream(s: &mut dyn Write, c: &Chunk, zeros: &[u8]) -> Result<(), Failure> {
    for (off, len, hole) in pieces(c) {
        if !hole {
            s.write_all(&c.data[off..off + len]).map_err(write_error)?;
            continue;
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len());
            s.write_all(&zeros[..n]).map_err(write_error)?;
            left -= n;
        }
    }
    Ok(())
}

/// What a worker last learnt about the holes of the host file:
/// `start .. end` is all data (`data`) or all hole. Data extents of one
/// worker mostly follow each other on the host, so one `lseek` pair
/// answers for many chunks.
#[derive(Clone, Copy, Default)]
struct HostRun {
    start: u64,
    end: u64,
    data: bool,
}

impl HostRun {
    /// The run holding host offset `host`, asking the file when unknown.
    fn at(&mut self, image: &Image<FileSource>, host: u64) -> Result<HostRun, Error> {
        if !(self.start..self.end).contains(&host) {
            *self = match image.host_data_run(host)? {
                None => HostRun {
                    start: host,
                    end: u64::MAX,
                    data: false,
                },
                Some((s, _)) if s > host => HostRun {
                    start: host,
                    end: s,
                    data: false,
                },
                Some((_, e)) => HostRun {
                    start: host,
                    end: e,
                    data: true,
                },
            };
        }
        Ok(*self)
    }
}

/// Read guest range `start .. end` into `buf` (reused), noting its holes:
/// zero and unallocated ranges, data in holes of the host file (not
/// read), and all-zero blocks of what was read.
fn fill_chunk(
    image: &Image<FileSource>,
    start: u64,
    end: u64,
    mut buf: Vec<u8>,
    runs: &mut HostRun,
) -> Result<Chunk, Error> {
    let len = end - start;
    buf.resize(len as usize, 0);
    let mut holes = Vec::new();
    let backing = image.backing().is_some();
    for e in image.map(start, len)? {
        let e = e?;
        let off = (e.guest_offset - start) as usize;
        let n = e.len as usize;
        match e.kind {
            ExtentKind::Zero => push_hole(&mut holes, off, n),
            ExtentKind::Unallocated if !backing => push_hole(&mut holes, off, n),
            ExtentKind::Data { host } => {
                // Piece by piece along the data runs and holes of the file.
                let mut done = 0u64;
                while done < e.len {
                    let h = host + done;
                    let run = runs.at(image, h)?;
                    let piece = (run.end - h).min(e.len - done);
                    let p_off = off + done as usize;
                    let p_len = piece as usize;
                    if run.data {
                        let sub = qcow2_guard::Extent {
                            guest_offset: e.guest_offset + done,
                            len: piece,
                            kind: ExtentKind::Data { host: h },
                        };
                        let part = &mut buf[p_off..p_off + p_len];
                        image.read_extent(&sub, part)?;
                        find_zero_blocks(part, p_off, &mut holes);
                    } else {
                        push_hole(&mut holes, p_off, p_len);
                    }
                    done += piece;
                }
            }
            ExtentKind::Unallocated | ExtentKind::Compressed(_) => {
                let part = &mut buf[off..off + n];
                image.read_extent(&e, part)?;
                find_zero_blocks(part, off, &mut holes);
            }
        }
    }
    Ok(Chunk {
        start,
        len: len as usize,
        data: buf,
        holes,
    })
}

/// Add `(off, len)` to the sorted hole list, merging with the last hole.
fn push_hole(holes: &mut Vec<(usize, usize)>, off: usize, len: usize) {
    if let Some(last) = holes.last_mut() {
        if last.0 + last.1 == off {
            last.1 += len;
            return;
        }
    }
    holes.push((off, len));
}

/// Record the all-zero `ZERO_BLOCK`s of `data` (at chunk offset `base`;
/// blocks aligned to the chunk) as holes. Partial blocks at either end are
/// checked too: a short zero range costs nothing to skip.
fn find_zero_blocks(data: &[u8], base: usize, holes: &mut Vec<(usize, usize)>) {
    let mut pos = 0;
    while pos < data.len() {
        let abs = base + pos;
        let block_end = (abs / ZERO_BLOCK + 1) * ZERO_BLOCK;
        let n = (block_end - abs).min(data.len() - pos);
        if is_zero(&data[pos..pos + n]) {
            push_hole(holes, abs, n);
        }
        pos += n;
    }
}

/// Whether `b` is all zeros, a word at a time.
fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    let body = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    body && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_merge() {
        let mut data = vec![0u8; 3 * ZERO_BLOCK];
        data[ZERO_BLOCK + 5] = 1;
        let mut holes = vec![(0, 100)];
        find_zero_blocks(&data, 100, &mut holes);
        assert_eq!(
            holes,
            vec![(0, ZERO_BLOCK), (2 * ZERO_BLOCK, ZERO_BLOCK + 100)]
        );
        assert!(is_zero(&[0; 37]));
        assert!(!is_zero(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]));
    }
}
