//! `qcow2-guard convert IMAGE OUTPUT`: write the raw guest disk of an
//! untrusted image, without QEMU.
//!
//! The conversion engine (policy, audit, chunks, workers, sinks) is the
//! library's `qcow2_guard::convert`; this file opens the files, creates
//! OUTPUT, shows progress and turns outcomes into messages and exit codes.
//!
//! A new OUTPUT has no name until it is complete and synced
//! (`crate::output`), so a failed or killed conversion leaves nothing. With OUTPUT `-` the disk goes to stdout and nothing else does;
//! an existing OUTPUT that is not a regular file (a device, a FIFO) is
//! written in place.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use qcow2_guard::convert::{
    self, prepare, Conversion, ConvertError, ConvertOptions, FileSink, Input, Inputs, Sink,
    StreamConversion, WriteSink,
};
use qcow2_guard::snapshot::SnapshotSelector;
use qcow2_guard::stream::SpoolFile;
use qcow2_guard::{FileSource, Verdict};

use crate::check::{pump_stdin, spool_file, Pump};
use crate::exit::Exit;
use crate::output::NewFile;
use crate::report;
use crate::{ImageArg, PolicyArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    image: ImageArg,
    /// Where to write the raw disk; `-` for stdout.
    output: PathBuf,
    /// With IMAGE `-` (standard input, converted as it arrives): keep a
    /// copy of the stream in FILE, which also serves to read back what a
    /// layout that does not stream needs (without it such an image is
    /// refused as soon as that is known).
    #[arg(long, value_name = "FILE")]
    spool: Option<PathBuf>,
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
    /// Refuse an image that maps more than N guest bytes per byte of file
    /// (allocated data and compressed clusters; default 4096).
    #[arg(long, value_name = "N")]
    max_amplification: Option<u64>,
    /// Refuse an image whose output would hold more than SIZE bytes of
    /// data (e.g. 100G; with --backing, the whole virtual disk counts).
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_size)]
    max_output: Option<u64>,
    /// Do not fsync OUTPUT and its directory before reporting success.
    #[arg(long)]
    no_sync: bool,
    /// Workers reading and decompressing (qemu-img's -m; 1-64, default:
    /// the available cores, at most 4). The output is the same for any
    /// value.
    #[arg(short = 'm', long = "threads", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: Option<u16>,
    #[command(flatten)]
    qemu: QemuConvertArgs,
}

/// qemu-img convert's flags, as Nova, Glance, Cinder and ironic-python-agent
/// pass them.
#[derive(Debug, clap::Args)]
struct QemuConvertArgs {
    /// Input format: only qcow2 is read.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format: raw (a file, or `-`) or host_device (an existing
    /// block or character device at least as large as the disk).
    #[arg(short = 'O', value_name = "FMT", value_parser = ["raw", "host_device"])]
    output_format: Option<String>,
    /// Convert this internal snapshot (ID or name, or
    /// snapshot.id=ID,snapshot.name=NAME) instead of the active disk.
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Output cache mode: accepted (the output is written through a
    /// temporary file and renamed, or written in place on a device).
    #[arg(short = 't', value_name = "CACHE", value_parser = CACHE_MODES)]
    cache: Option<String>,
    /// Source cache mode: accepted, no effect.
    #[arg(short = 'T', value_name = "SRC_CACHE", value_parser = CACHE_MODES)]
    src_cache: Option<String>,
    /// Sparse threshold: accepted; zero ranges are holes in a new file and
    /// written as zeros on a device, whatever the value.
    #[arg(short = 'S', value_name = "SIZE", value_parser = crate::parse_size)]
    sparse_size: Option<u64>,
    /// Out-of-order writes: accepted (the workers write in any order).
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Progress: accepted (the bar shows on a terminal unless --quiet).
    #[arg(short = 'p')]
    progress: bool,
    /// Accepted, no effect: nothing is locked.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
}

/// qemu-img's cache modes.
const CACHE_MODES: [&str; 5] = ["none", "writeback", "writethrough", "directsync", "unsafe"];

/// Why a conversion stopped, beyond the library's own errors.
enum Failure {
    Convert(ConvertError),
    /// Opening an input or creating the output failed: a message.
    Io(String),
}

impl From<ConvertError> for Failure {
    fn from(e: ConvertError) -> Failure {
        Failure::Convert(e)
    }
}

impl Args {
    fn path_of(&self, input: Input) -> &Path {
        match input {
            Input::Image => &self.image.image,
            Input::Backing => self.backing.as_deref().unwrap_or(&self.image.image),
            Input::DataFile => self.data_file.as_deref().unwrap_or(&self.image.image),
        }
    }
}

pub fn run(args: &Args) -> Exit {
    if let Some(f) = args.qemu.format.as_deref().filter(|f| *f != "qcow2") {
        errln!(
            "qcow2-guard: {}: -f {f}: only qcow2 images are read (qemu-img would use its {f} driver)",
            args.image.image.display()
        );
        return Exit::NotChecked;
    }
    let e = match convert(args) {
        Ok(()) => return Exit::Ok,
        Err(Failure::Io(msg)) => {
            errln!("qcow2-guard: {msg}");
            return Exit::NotChecked;
        }
        Err(Failure::Convert(e)) => e,
    };
    match e {
        ConvertError::Image { input, error } => report::fatal(args.path_of(input), &error, false),
        ConvertError::Refused { input, findings }
            if findings
                .iter()
                .all(|f| f.code == convert::code::SNAPSHOT_NOT_FOUND) =>
        {
            let snap = args.qemu.snapshot.as_deref().unwrap_or("");
            errln!(
                "qcow2-guard: {}: Failed to load snapshot {snap:?}: Can't find snapshot",
                args.path_of(input).display()
            );
            Exit::NotChecked
        }
        ConvertError::Refused { input, findings } => {
            let path = args.path_of(input).display();
            errln!("qcow2-guard: refused by policy:");
            for f in &findings {
                errln!("  {path}: {f}");
                if f.code == convert::code::DATA_FILE_MISSING {
                    errln!("  (pass the data file with --data-file FILE)");
                }
            }
            Exit::Refused
        }
        ConvertError::Audit { input, report } => {
            let exit = report::audit_refusal(args.path_of(input), &report);
            if report.verdict == Verdict::NeedsRandomAccess {
                errln!(
                    "  (the layout does not stream: give --spool FILE, or convert the stored file)"
                );
            }
            exit
        }
        ConvertError::Sink(e) => {
            let what = if args.output.as_os_str() == "-" {
                "stdout".to_owned()
            } else {
                args.output.display().to_string()
            };
            errln!("qcow2-guard: writing {what}: {e}");
            Exit::NotChecked
        }
        // `ConvertError` may grow variants.
        #[allow(unreachable_patterns)]
        e => {
            errln!("qcow2-guard: {e}");
            Exit::NotChecked
        }
    }
}

fn open_file(path: &Path) -> Result<FileSource, Failure> {
    FileSource::open(path).map_err(|e| Failure::Io(format!("{}: cannot open: {e}", path.display())))
}

/// Open the inputs and prepare the conversion (policy, audit): nothing
/// is written before this succeeds.
fn prepare_conversion(args: &Args) -> Result<Conversion<FileSource>, Failure> {
    let mut inputs = Inputs::new(open_file(&args.image.image)?);
    if let Some(b) = &args.backing {
        inputs = inputs.with_backing(open_file(b)?);
    }
    if let Some(d) = &args.data_file {
        inputs = inputs.with_data_file(open_file(d)?);
    }
    if let Some(sel) = &args.qemu.snapshot {
        inputs = inputs.with_snapshot(SnapshotSelector::parse(sel));
    }
    let conversion = prepare(inputs, &options(args))?;
    warn(args, conversion.warnings());
    Ok(conversion)
}

fn options(args: &Args) -> ConvertOptions {
    let defaults = ConvertOptions::default();
    ConvertOptions {
        policy: args.policy.policy(),
        limits: args.policy.limits(),
        max_amplification: args.max_amplification.unwrap_or(defaults.max_amplification),
        max_output: args.max_output,
        threads: args.threads.map_or(defaults.threads, usize::from),
        ..defaults
    }
}

fn warn(args: &Args, warnings: &[qcow2_guard::Finding]) {
    let path = args.image.image.display();
    for w in warnings {
        if w.code == convert::code::NO_BACKING {
            errln!(
                "qcow2-guard: {path}: no --backing given: unallocated clusters are written as zeros"
            );
        }
    }
}

/// `convert - OUTPUT`: the raw disk written from standard input as it
/// arrives ([`StreamConversion`]) into the unnamed new OUTPUT, named only
/// once the whole stream passed the audit. A refusal (policy, malformed
/// header, a layout that needs random access without `--spool`) stops
/// reading at once.
fn convert_stream(args: &Args) -> Result<(), Failure> {
    let unsupported = [
        (args.backing.is_some(), "--backing"),
        (args.data_file.is_some(), "--data-file"),
        (args.qemu.snapshot.is_some(), "-l"),
    ];
    if let Some((_, flag)) = unsupported.iter().find(|(given, _)| *given) {
        return Err(Failure::Io(format!(
            "-: {flag} is not supported with IMAGE `-` (convert a stored file)"
        )));
    }
    let existing = std::fs::metadata(&args.output).ok();
    if args.output.as_os_str() == "-" || existing.is_some_and(|m| !m.file_type().is_file()) {
        return Err(Failure::Io(format!(
            "{}: IMAGE `-` is converted while it arrives, into a new regular file named only              once the whole stream is checked: OUTPUT cannot be stdout or a device",
            args.output.display()
        )));
    }
    let spool = match args.spool.as_deref().map(spool_file).transpose() {
        Ok(s) => s,
        Err((p, e)) => {
            return Err(Failure::Io(format!(
                "{}: cannot create the spool: {e}",
                p.display()
            )))
        }
    };
    let out = NewFile::create(&args.output).map_err(|e| {
        Failure::Io(format!(
            "{}: cannot create the output: {e}",
            args.output.display()
        ))
    })?;
    let sink = FileSink::new(out.file());
    let opts = options(args);
    let mut conversion = match &spool {
        Some(tmp) => {
            let f = tmp
                .as_file()
                .try_clone()
                .map_err(|e| Failure::Io(format!("{}: {e}", tmp.path().display())))?;
            StreamConversion::with_spool(&opts, &sink, Arc::new(SpoolFile::new(f)))?
        }
        None => StreamConversion::new(&opts, &sink)?,
    };
    // On a refusal, reading stops at once: nothing is named.
    match pump_stdin(spool.as_ref(), |chunk| conversion.feed(chunk)) {
        Ok(()) => {}
        Err(Pump::Stop(e)) => return Err(Failure::Convert(e)),
        Err(Pump::Read(e)) => return Err(Failure::Io(format!("-: cannot read: {e}"))),
        Err(Pump::Spool(p, e)) => return Err(Failure::Io(format!("{}: {e}", p.display()))),
    }
    let done = conversion.finish()?;
    warn(args, &done.warnings);
    if let (Some(tmp), Some(target)) = (spool, args.spool.as_deref()) {
        tmp.persist(target)
            .map_err(|e| Failure::Io(format!("{}: {}", target.display(), e.error)))?;
    }
    out.commit(!args.no_sync)
        .map_err(|e| Failure::Convert(ConvertError::Sink(e)))?;
    Ok(())
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

fn run_into(
    conversion: &Conversion<FileSource>,
    sink: &dyn Sink,
    progress: &ProgressBar,
) -> Result<(), Failure> {
    let tick = |n: u64| progress.inc(n);
    conversion.run(sink, Some(&tick))?;
    Ok(())
}

fn convert(args: &Args) -> Result<(), Failure> {
    if args.image.image.as_os_str() == "-" {
        return convert_stream(args);
    }
    if args.spool.is_some() {
        return Err(Failure::Io(
            "--spool goes with IMAGE `-` (standard input)".to_owned(),
        ));
    }
    let to_stdout = args.output.as_os_str() == "-";
    // The disk goes to a duplicate of descriptor 1, unbuffered, whose
    // errors (EPIPE, ENOSPC) stop the conversion; std's stdout would
    // line-buffer it and drop EBADF silently. (A descriptor 1 closed at
    // start is /dev/null: Rust's runtime reopens it there, so no file the
    // conversion opens can take its place.)
    let stdout = if to_stdout {
        let fd = rustix::io::dup(io::stdout().as_fd())
            .map_err(|e| Failure::Io(format!("stdout: {}", io::Error::from(e))))?;
        Some(std::fs::File::from(fd))
    } else {
        refuse_output_over_input(args)?;
        None
    };
    let conversion = prepare_conversion(args)?;
    let progress = progress_bar(conversion.size(), args.quiet);

    // An existing OUTPUT that is not a regular file (a device, a FIFO) is
    // written in place: renaming over it would replace it.
    let existing = (!to_stdout)
        .then(|| std::fs::metadata(&args.output).ok())
        .flatten()
        .filter(|m| !m.file_type().is_file());
    if args.qemu.output_format.as_deref() == Some("host_device") {
        check_device(&args.output, existing.as_ref(), conversion.size())?;
    }
    if let Some(out) = &stdout {
        run_into(&conversion, &WriteSink::new(out), &progress)?;
    } else if let Some(meta) = existing {
        // Never replaced, never renamed over: /dev/null stays /dev/null.
        use std::os::unix::fs::FileTypeExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&args.output)
            .map_err(|e| Failure::Io(format!("{}: cannot open: {e}", args.output.display())))?;
        if meta.file_type().is_block_device() {
            let sink = FileSink::overwrite(&f);
            let sink = if args.no_sync {
                sink
            } else {
                sink.write_behind()
            };
            run_into(&conversion, &sink, &progress)?;
            if !args.no_sync {
                f.sync_all()
                    .map_err(|e| Failure::Convert(ConvertError::Sink(e)))?;
            }
        } else {
            run_into(&conversion, &WriteSink::new(&f), &progress)?;
        }
    } else {
        let out = NewFile::create(&args.output).map_err(|e| {
            Failure::Io(format!(
                "{}: cannot create the output: {e}",
                args.output.display()
            ))
        })?;
        // Synced at the end: the disk writes start while converting.
        let sink = FileSink::new(out.file());
        let sink = if args.no_sync {
            sink
        } else {
            sink.write_behind()
        };
        run_into(&conversion, &sink, &progress)?;
        out.commit(!args.no_sync)
            .map_err(|e| Failure::Convert(ConvertError::Sink(e)))?;
    }
    progress.finish_and_clear();
    Ok(())
}

/// `-O host_device`: OUTPUT must be an existing block or character device
/// that holds the whole disk (qemu-img: "Cannot grow device files").
fn check_device(output: &Path, meta: Option<&std::fs::Metadata>, size: u64) -> Result<(), Failure> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let is_device = meta.is_some_and(|m| {
        let t = m.file_type();
        t.is_block_device() || t.is_char_device()
    });
    if !is_device {
        return Err(Failure::Io(format!(
            "{}: -O host_device needs an existing block or character device",
            output.display()
        )));
    }
    let held = std::fs::File::open(output)
        .and_then(|mut f| f.seek(io::SeekFrom::End(0)))
        .map_err(|e| Failure::Io(format!("{}: cannot open: {e}", output.display())))?;
    if held < size {
        return Err(Failure::Io(format!(
            "{}: Cannot grow device files (the device holds {held} bytes, the disk is {size})",
            output.display()
        )));
    }
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
