//! [`prepare`]: open, judge and audit the inputs before anything is
//! written.

use std::sync::Arc;

use super::{code, ConvertError, Input};
use crate::check::{self, check, CheckOptions, Report, Verdict};
use crate::finding::{Category, Finding, Severity};
use crate::header::{self, field};
use crate::read::RawBacking;
use crate::source::Source;
use crate::{Image, Limits, Policy};

/// L2 cache budget of a conversion (the walk is sequential, so a small
/// cache suffices).
const CACHE_BYTES: u64 = 4 << 20;

/// Host clusters the pre-conversion audit may track: about 2.25 bytes
/// each in the check's refcount rebuild, so 20 Mi clusters (a 1.25 TiB
/// file of 64 KiB clusters) stay near 45 MiB, freed before the conversion
/// starts.
pub(super) const AUDIT_TRACKED_CLUSTERS: u64 = 20 << 20;

/// What a conversion accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertOptions {
    /// The safety policy, applied to the image and to a backing image.
    pub policy: Policy,
    /// The caller's limits; the conversion tightens tables, caches and
    /// directories further ([`ConvertOptions::limits`]).
    pub limits: Limits,
}

impl ConvertOptions {
    /// The limits images are opened with: the caller's, with tables,
    /// caches and directories small enough that peak memory stays bounded
    /// whatever the image claims (an image needing more is refused with
    /// `limit_exceeded`).
    pub fn limits(&self) -> Limits {
        let mut l = self.limits.clone().with_max_cache_bytes(CACHE_BYTES);
        // 2 MiB of L1 maps 16 TiB with 64 KiB clusters (8 GiB with 512 bytes).
        l.max_l1_entries = l.max_l1_entries.min(256 << 10);
        l.max_refcount_table_bytes = l.max_refcount_table_bytes.min(2 << 20);
        l.max_snapshots = l.max_snapshots.min(4096);
        l.max_snapshot_table_bytes = l.max_snapshot_table_bytes.min(4 << 20);
        l.max_bitmaps = l.max_bitmaps.min(4096);
        l.max_bitmap_directory_bytes = l.max_bitmap_directory_bytes.min(4 << 20);
        l
    }
}

/// The inputs of a conversion, opened by the caller: the image, and the
/// backing image (qcow2 or raw, told apart by its magic) and external data
/// file when the image needs them. Paths named inside the image are never
/// opened.
pub struct Inputs<S> {
    /// The image to convert.
    pub image: S,
    /// Guest data for unallocated clusters (needs
    /// [`Policy::allow_backing`]). Without one, they are written as zeros.
    pub backing: Option<Arc<dyn Source>>,
    /// The external data file (needs [`Policy::allow_data_file`]).
    pub data_file: Option<Arc<dyn Source>>,
}

impl<S> Inputs<S> {
    /// Only the image.
    pub fn new(image: S) -> Inputs<S> {
        Inputs {
            image,
            backing: None,
            data_file: None,
        }
    }

    /// Hand in a backing image.
    pub fn with_backing(mut self, backing: impl Source + 'static) -> Inputs<S> {
        self.backing = Some(Arc::new(backing));
        self
    }

    /// Hand in an external data file.
    pub fn with_data_file(mut self, data_file: impl Source + 'static) -> Inputs<S> {
        self.data_file = Some(Arc::new(data_file));
        self
    }
}

impl<S> std::fmt::Debug for Inputs<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("backing", &self.backing.is_some())
            .field("data_file", &self.data_file.is_some())
            .finish_non_exhaustive()
    }
}

/// A conversion that passed every rule and the audit, ready to
/// [`run`](Conversion::run).
pub struct Conversion<S> {
    pub(super) image: Image<S>,
    audit: Report,
    warnings: Vec<Finding>,
}

impl<S: Source> std::fmt::Debug for Conversion<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversion")
            .field("image", &self.image)
            .field("audit", &self.audit.verdict)
            .field("warnings", &self.warnings)
            .finish()
    }
}

impl<S: Source> Conversion<S> {
    /// The opened image (with its backing image and data file attached).
    pub fn image(&self) -> &Image<S> {
        &self.image
    }

    /// The audit's report (verdict `ok` or `leaks`).
    pub fn audit(&self) -> &Report {
        &self.audit
    }

    /// Warnings for the caller to show: policy warnings (dirty bit,
    /// unknown autoclear bits) and conversion warnings ([`code`]).
    pub fn warnings(&self) -> &[Finding] {
        &self.warnings
    }

    /// Bytes the sink receives: the virtual size.
    pub fn size(&self) -> u64 {
        self.image.virtual_size()
    }
}

fn refusal(code: &'static str, offset: u64, message: String) -> Finding {
    Finding::new(code, Severity::Error, Category::Policy, offset, message)
}

/// The policy's error findings for `image`, as a refusal of `input`.
fn refuse_on_policy<T: Source>(
    input: Input,
    image: &Image<T>,
    policy: &Policy,
    warnings: &mut Vec<Finding>,
) -> Result<(), ConvertError> {
    let (errors, others): (Vec<_>, Vec<_>) = image
        .policy_findings(policy)
        .into_iter()
        .partition(|f| f.severity == Severity::Error);
    if !errors.is_empty() {
        return Err(ConvertError::Refused {
            input,
            findings: errors,
        });
    }
    warnings.extend(others);
    Ok(())
}

/// The metadata check `check` runs, without decompression, before
/// anything is written: error findings and policy violations refuse the
/// image; leaks and warnings do not.
fn audit<T: Source>(
    image: &Image<T>,
    policy: &Policy,
    warnings: &mut Vec<Finding>,
) -> Result<Report, ConvertError> {
    let opts = CheckOptions {
        max_tracked_clusters: AUDIT_TRACKED_CLUSTERS,
        ..CheckOptions::metadata_only(policy.clone())
    };
    let report = check(image, &opts);
    let blocks = matches!(
        report.verdict,
        Verdict::Corrupt | Verdict::Unsafe | Verdict::Invalid
    );
    if !blocks {
        return Ok(report);
    }
    let mut errors = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error);
    let only_too_large = errors
        .clone()
        .next()
        .is_some_and(|_| errors.all(|f| f.code == check::code::TOO_LARGE_TO_CHECK));
    if only_too_large {
        warnings.push(Finding::new(
            code::AUDIT_TOO_LARGE,
            Severity::Warning,
            Category::Other,
            0,
            "too many host clusters for the pre-conversion audit; refcounts are not rebuilt, entries are still validated as they are read",
        ));
        return Ok(report);
    }
    Err(ConvertError::Audit {
        input: Input::Image,
        report: Box::new(report),
    })
}

/// Open `inputs.image`, apply the policy and the conversion rules, attach
/// the backing image and data file, and audit the metadata. Nothing is
/// written; an `Err` means the conversion must not run.
pub fn prepare<S: Source>(
    inputs: Inputs<S>,
    opts: &ConvertOptions,
) -> Result<Conversion<S>, ConvertError> {
    let limits = opts.limits();
    let policy = &opts.policy;
    let mut warnings = Vec::new();
    let mut image = Image::open_with(inputs.image, limits.clone()).map_err(ConvertError::image)?;
    refuse_on_policy(Input::Image, &image, policy, &mut warnings)?;
    let report = audit(&image, policy, &mut warnings)?;

    let needs_data_file = image.header().has_data_file();
    match inputs.data_file {
        Some(df) if needs_data_file => image.set_data_file(df),
        None if needs_data_file => {
            return Err(ConvertError::Refused {
                input: Input::Image,
                findings: vec![refusal(
                    code::DATA_FILE_MISSING,
                    field::INCOMPATIBLE_FEATURES,
                    "guest data lives in an external data file that was not handed in".to_owned(),
                )],
            })
        }
        Some(_) => {
            return Err(ConvertError::Refused {
                input: Input::DataFile,
                findings: vec![refusal(
                    code::DATA_FILE_UNEXPECTED,
                    field::INCOMPATIBLE_FEATURES,
                    "a data file was handed in but the image has no external data file".to_owned(),
                )],
            })
        }
        None => {}
    }

    match inputs.backing {
        Some(src) => {
            let mut magic = [0u8; 4];
            let is_qcow2 = src.read_exact_at(0, &mut magic).is_ok()
                && u32::from_be_bytes(magic) == header::MAGIC;
            if is_qcow2 {
                let backing =
                    Image::open_with(src, limits).map_err(|error| ConvertError::Image {
                        input: Input::Backing,
                        error,
                    })?;
                // The backing image must pass the same policy; its own
                // backing chain is not followed.
                refuse_on_policy(Input::Backing, &backing, policy, &mut warnings)?;
                if backing.header().has_data_file() {
                    return Err(ConvertError::Refused {
                        input: Input::Backing,
                        findings: vec![refusal(
                            code::BACKING_DATA_FILE,
                            field::INCOMPATIBLE_FEATURES,
                            "a backing image with an external data file is not supported"
                                .to_owned(),
                        )],
                    });
                }
                image.set_backing(Arc::new(backing));
            } else {
                image.set_backing(Arc::new(RawBacking(src)));
            }
        }
        None if image.header().has_backing_file() => warnings.push(Finding::new(
            code::NO_BACKING,
            Severity::Warning,
            Category::Other,
            field::BACKING_FILE_OFFSET,
            "no backing image handed in: unallocated clusters are written as zeros",
        )),
        None => {}
    }
    Ok(Conversion {
        image,
        audit: report,
        warnings,
    })
}
