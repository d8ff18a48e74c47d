//! `qcow2-guard compare IMG1 IMG2`: qemu-img compare's messages and exit
//! statuses (the comparison itself is the library's `compare`).

use std::path::{Path, PathBuf};

use qcow2_guard::compare::{self, CompareError, Outcome, Side};
use qcow2_guard::qemu_map::Qcow2Layer;
use qcow2_guard::read::RawBacking;
use qcow2_guard::{FileSource, Image};

use crate::exit::CompareExit;
use crate::open;
use crate::PolicyArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// First image (qcow2 or raw).
    image1: PathBuf,
    /// Second image (qcow2 or raw).
    image2: PathBuf,
    /// Format of the first image: qcow2 or raw (default: qcow2 if it
    /// starts with the qcow2 magic, else raw).
    #[arg(short = 'f', value_name = "FMT")]
    format1: Option<String>,
    /// Format of the second image, like -f.
    #[arg(short = 'F', value_name = "FMT")]
    format2: Option<String>,
    /// Strict mode: fail on different sizes or block status.
    #[arg(short, long)]
    strict: bool,
    /// Print nothing; the exit status tells.
    #[arg(short, long)]
    quiet: bool,
    /// Accepted for qemu-img compatibility; no progress is shown.
    #[arg(short = 'p')]
    progress: bool,
    /// Accepted for qemu-img compatibility, no effect: nothing is locked
    /// or written.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// One opened side.
enum Opened {
    Qcow2(Box<Image<FileSource>>),
    Raw(RawBacking<FileSource>),
}

fn open_side(path: &Path, format: Option<&str>, policy: &PolicyArgs) -> Option<Opened> {
    let src = open::open_file(path, false).ok()?;
    let qcow2 = match format {
        Some("qcow2") => true,
        Some("raw") => false,
        None => open::is_qcow2(&src),
        Some(other) => {
            errln!(
                "qcow2-guard: {}: -f {other}: only qcow2 and raw images are compared",
                path.display()
            );
            return None;
        }
    };
    if !qcow2 {
        return Some(Opened::Raw(RawBacking(src)));
    }
    let image = open::open_qcow2(path, src, &policy.policy(), &policy.limits(), None).ok()?;
    if image.header().has_backing_file() {
        errln!(
            "qcow2-guard: {}: the backing file is not opened: unallocated ranges compare as zeros",
            path.display()
        );
    }
    Some(Opened::Qcow2(Box::new(image)))
}

/// An opened side seen as a block-status layer and guest data.
enum View<'a> {
    Qcow2(Qcow2Layer<'a, FileSource>, &'a Image<FileSource>),
    Raw(&'a RawBacking<FileSource>),
}

impl Opened {
    fn view(&self) -> View<'_> {
        match self {
            Opened::Qcow2(i) => View::Qcow2(Qcow2Layer::new(i), i),
            Opened::Raw(r) => View::Raw(r),
        }
    }
}

impl View<'_> {
    fn side(&self) -> Side<'_> {
        match self {
            View::Qcow2(l, i) => Side { map: l, data: *i },
            View::Raw(r) => Side { map: *r, data: *r },
        }
    }
}

pub fn run(args: &Args) -> CompareExit {
    let (Some(a), Some(b)) = (
        open_side(&args.image1, args.format1.as_deref(), &args.policy),
        open_side(&args.image2, args.format2.as_deref(), &args.policy),
    ) else {
        return CompareExit::OpenError;
    };
    let (va, vb) = (a.view(), b.view());
    let say = |msg: &str| {
        if !args.quiet {
            outln!("{msg}");
        }
    };
    match compare::compare(va.side(), vb.side(), args.strict) {
        Ok(c) => {
            if c.common_part_equal_sizes_differ() {
                say("Warning: Image size mismatch!");
            }
            match c.outcome {
                Outcome::Identical => {
                    say("Images are identical.");
                    CompareExit::Identical
                }
                Outcome::ContentMismatch(at) => {
                    say(&format!("Content mismatch at offset {at}!"));
                    CompareExit::Differ
                }
                Outcome::SizeMismatch => {
                    say("Strict mode: Image size mismatch!");
                    CompareExit::Differ
                }
                Outcome::StatusMismatch(at) => {
                    say(&format!("Strict mode: Offset {at} block status mismatch!"));
                    CompareExit::Differ
                }
            }
        }
        Err(e) => {
            errln!("qcow2-guard: compare: {e}");
            match e {
                CompareError::Status(_) => CompareExit::StatusError,
                CompareError::Read(_) => CompareExit::ReadError,
            }
        }
    }
}
