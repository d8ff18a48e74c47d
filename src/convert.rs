//! `qcow2-guard convert IMAGE OUTPUT`: write the raw guest disk of an
//! untrusted image, without QEMU.
//!
//! The conversion engine (policy, audit, chunks, workers, sinks) is the
//! library's `qcow2_guard::convert`; this file opens the files, creates
//! OUTPUT, shows progress and turns outcomes into messages and exit codes.
//!
//! The output goes to a temporary file beside OUTPUT that is renamed at
//! the end and removed on any error, so a failed conversion leaves no
//! OUTPUT. With OUTPUT `-` the disk goes to stdout and nothing else does;
//! an existing OUTPUT that is not a regular file (a device, a FIFO) is
//! written in place.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use qcow2_guard::convert::{
    self, prepare, Conversion, ConvertError, ConvertOptions, FileSink, Input, Inputs, Sink,
    WriteSink,
};
use qcow2_guard::{FileSource, Severity, Verdict};

use crate::exit::Exit;
use crate::report;
use crate::{ImageArg, PolicyArgs};

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
            let errors: Vec<_> = report
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .collect();
            errln!(
                "qcow2-guard: {}: refused: the metadata check says {} ({} error finding(s); run `qcow2-guard check` for all of them)",
                args.path_of(input).display(),
                report.verdict.as_str(),
                errors.len()
            );
            for f in errors.iter().take(10) {
                errln!("  {f}");
            }
            match report.verdict {
                Verdict::Invalid => Exit::NotChecked,
                Verdict::Unsafe => Exit::Refused,
                _ => Exit::Corrupt,
            }
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
    let opts = ConvertOptions {
        policy: args.policy.policy(),
        limits: args.policy.limits(),
    };
    let conversion = prepare(inputs, &opts)?;
    let path = args.image.image.display();
    for w in conversion.warnings() {
        match w.code {
            convert::code::NO_BACKING => errln!(
                "qcow2-guard: {path}: no --backing given: unallocated clusters are written as zeros"
            ),
            convert::code::AUDIT_TOO_LARGE => errln!("qcow2-guard: {path}: warning: {}", w.message),
            _ => {}
        }
    }
    Ok(conversion)
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
    let to_stdout = args.output.as_os_str() == "-";
    if !to_stdout {
        refuse_output_over_input(args)?;
    }
    let conversion = prepare_conversion(args)?;
    let progress = progress_bar(conversion.size(), args.quiet);

    // An existing OUTPUT that is not a regular file (a device, a FIFO) is
    // written in place: renaming over it would replace it.
    let existing = (!to_stdout)
        .then(|| std::fs::metadata(&args.output).ok())
        .flatten()
        .filter(|m| !m.file_type().is_file());
    if to_stdout {
        run_into(&conversion, &WriteSink::new(io::stdout()), &progress)?;
    } else if let Some(meta) = existing {
        use std::os::unix::fs::FileTypeExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&args.output)
            .map_err(|e| Failure::Io(format!("{}: cannot open: {e}", args.output.display())))?;
        if meta.file_type().is_block_device() {
            run_into(&conversion, &FileSink::overwrite(&f), &progress)?;
        } else {
            run_into(&conversion, &WriteSink::new(&f), &progress)?;
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
        run_into(&conversion, &FileSink::new(tmp.as_file()), &progress)?;
        tmp.persist(target)
            .map_err(|e| Failure::Convert(ConvertError::Sink(e.error)))?;
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
