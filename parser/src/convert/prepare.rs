//! [`prepare`]: open, judge and audit the inputs before anything is
//! written.

use std::sync::Arc;

use super::{code, ConvertError, Input};
use crate::check::{check_judged, CheckOptions, Report, TableUses};
use crate::finding::{Category, Finding, Severity};
use crate::header::{self, field, Header};
use crate::l1l2::L1Entry;
use crate::read::RawBacking;
use crate::snapshot::SnapshotSelector;
use crate::source::Source;
use crate::{Image, Limits, Policy};

/// L2 cache budget of a conversion (the walk is sequential, so a small
/// cache suffices).
const CACHE_BYTES: u64 = 4 << 20;

/// Default [`ConvertOptions::max_audit_clusters`]: about 2.25 bytes each
/// in the check's refcount rebuild, so 20 Mi clusters (a 1.25 TiB file of
/// 64 KiB clusters) stay near 45 MiB, freed before the conversion starts.
pub const AUDIT_TRACKED_CLUSTERS: u64 = 20 << 20;

/// Default [`ConvertOptions::max_amplification`]: guest bytes mapped per
/// byte of file. Real images stay far below it: uncompressed data maps at
/// most one guest byte per file byte in the active layer (internal
/// snapshots only add file bytes), and `qemu-img convert -c` of maximally
/// compressible data (1 GiB of one repeated byte) measured 1488 with zstd
/// and 636 with zlib at 64 KiB clusters, less at any other cluster size
/// (SECURITY.md, "Output bounds"). 4096 leaves room above that.
pub const DEFAULT_MAX_AMPLIFICATION: u64 = 1 << 12;

/// What a conversion accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// The safety policy, applied to the image and to a backing image.
    pub policy: Policy,
    /// The caller's limits; the conversion tightens tables, caches and
    /// directories further ([`ConvertOptions::limits`]).
    pub limits: Limits,
    /// Most guest bytes the image may map (allocated: data and compressed
    /// clusters, not zero, not unallocated) per byte of image file; above
    /// it the image is refused ([`code::AMPLIFICATION`]). One small file
    /// whose tables all point at the same clusters would otherwise make
    /// terabytes of output.
    pub max_amplification: u64,
    /// Most bytes of data the output may hold: the guest bytes the image
    /// maps (with a backing image, the whole virtual disk); above it the
    /// image is refused ([`code::OUTPUT_TOO_LARGE`]). For a service with a
    /// disk quota. `None`: no bound beyond the amplification.
    pub max_output: Option<u64>,
    /// Most host clusters (file length / cluster size) the audit's
    /// refcount rebuild may track (about 2.25 bytes of memory each); a
    /// larger file is refused ([`code::AUDIT_TOO_LARGE`]): nothing is
    /// converted without the audit.
    pub max_audit_clusters: u64,
    /// Workers reading and decompressing chunks (default
    /// [`crate::parallel::default_threads`]; fewer with clusters so large
    /// that their buffers would pass [`crate::parallel::WORKER_MEMORY`]);
    /// the output is the same for any value.
    pub threads: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            policy: Policy::default(),
            limits: Limits::default(),
            max_amplification: DEFAULT_MAX_AMPLIFICATION,
            max_output: None,
            max_audit_clusters: AUDIT_TRACKED_CLUSTERS,
            threads: crate::parallel::default_threads(),
        }
    }
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
    /// Convert this internal snapshot instead of the active disk
    /// (`qemu-img convert -l`).
    pub snapshot: Option<SnapshotSelector>,
}

impl<S> Inputs<S> {
    /// Only the image.
    pub fn new(image: S) -> Inputs<S> {
        Inputs {
            image,
            backing: None,
            data_file: None,
            snapshot: None,
        }
    }

    /// Convert an internal snapshot instead of the active disk.
    pub fn with_snapshot(mut self, snapshot: SnapshotSelector) -> Inputs<S> {
        self.snapshot = Some(snapshot);
        self
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
    /// Per active L1 entry: its span reads as zeros with nothing to read
    /// (see `hole_spans`).
    pub(super) holes: Vec<bool>,
    pub(super) threads: usize,
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

/// The policy's findings on `image` (evaluated once: the audit reuses
/// them); its error findings refuse `input`, the others are warnings.
fn refuse_on_policy<T: Source>(
    input: Input,
    image: &Image<T>,
    policy: &Policy,
    warnings: &mut Vec<Finding>,
) -> Result<Vec<Finding>, ConvertError> {
    let findings = image.policy_findings(policy);
    let errors: Vec<_> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .cloned()
        .collect();
    if !errors.is_empty() {
        return Err(ConvertError::Refused {
            input,
            findings: errors,
        });
    }
    warnings.extend(findings.iter().cloned());
    Ok(findings)
}

/// The metadata check `check` runs, without decompression, before
/// anything is written: error findings and policy violations refuse the
/// image; leaks and warnings do not. A file with more host clusters than
/// the audit may track is refused: no conversion without the audit.
/// `policy` is [`refuse_on_policy`]'s findings on `image`; `input` says
/// which input it is (the image, or a qcow2 backing image: both pass the
/// same audit, as for `map` and `compare`).
fn audit<T: Source>(
    input: Input,
    image: &Image<T>,
    opts: &ConvertOptions,
    policy: Vec<Finding>,
) -> Result<(Report, TableUses), ConvertError> {
    let g = image.geometry();
    let clusters = image.file_len().div_ceil(g.cluster_size);
    if clusters > opts.max_audit_clusters {
        return Err(ConvertError::Refused {
            input,
            findings: vec![refusal(
                code::AUDIT_TOO_LARGE,
                0,
                format!(
                    "file has {clusters} host clusters; the pre-conversion audit tracks at most {} \
                     (nothing is converted without it)",
                    opts.max_audit_clusters
                ),
            )],
        });
    }
    let check_opts = CheckOptions {
        max_tracked_clusters: opts.max_audit_clusters,
        ..CheckOptions::metadata_only(opts.policy.clone())
    };
    Ok(check_judged(image, &check_opts, policy))
}

/// Refuse an input whose audit found errors.
fn audit_passed(input: Input, report: Report) -> Result<Report, ConvertError> {
    if report.verdict.passes() {
        Ok(report)
    } else {
        Err(ConvertError::Audit {
            input,
            report: Box::new(report),
        })
    }
}

/// Guest bytes the active layer maps to host data (data and compressed
/// clusters, allocated subclusters), from what the audit's walk found in
/// each table (`uses`), counting a table once per L1 entry naming it;
/// stops as soon as the sum passes `stop_above`. Entries that fail to
/// decode, and tables that could not be walked, count nothing (the audit
/// reports them).
fn mapped_bytes<T: Source>(image: &Image<T>, uses: &TableUses, stop_above: u64) -> u64 {
    let g = *image.geometry();
    let size = image.virtual_size();
    let mut total = 0u64;
    for i in 0..g.l1_entries_for(size) {
        let Ok(L1Entry {
            l2_offset: Some(l2),
            ..
        }) = image.l1_entry(i)
        else {
            continue;
        };
        let mapped = uses.get(&l2).map_or(0, |u| u.mapped);
        // The last table may map past the end of the disk.
        let covered = size.saturating_sub(i.saturating_mul(g.l2_span()));
        total = total.saturating_add(mapped.min(covered));
        if total > stop_above {
            break;
        }
    }
    total
}

/// Per active L1 entry, whether its whole guest span reads as zeros and
/// holds nothing to read: every entry of its table is zero, unallocated
/// (without a backing image) or uncompressed data lying in a hole of the
/// host file (checked once per table, over the host range its data
/// spans). The conversion writes such spans as one hole, without mapping
/// them cluster by cluster.
fn hole_spans<T: Source>(image: &Image<T>, uses: &TableUses) -> Vec<bool> {
    let backing = image.backing().is_some();
    // A host range known to be a hole, from the last look-up.
    let mut known = (0u64, 0u64);
    let mut in_hole = |lo: u64, hi: u64| -> bool {
        if known.0 <= lo && hi <= known.1 {
            return true;
        }
        match image.host_data_run(lo) {
            Ok(None) => {
                known = (lo, u64::MAX);
                true
            }
            Ok(Some((s, _))) if s > lo => {
                known = (lo, s);
                hi <= s
            }
            _ => false,
        }
    };
    (0u64..)
        .zip(image.l1_table())
        .map(|(i, _)| {
            let Ok(L1Entry {
                l2_offset: Some(l2),
                ..
            }) = image.l1_entry(i)
            else {
                return false;
            };
            uses.get(&l2).is_some_and(|u| {
                let must_read = u.compressed || (backing && u.unallocated);
                !must_read && u.data.is_none_or(|(lo, hi)| in_hole(lo, hi))
            })
        })
        .collect()
}

/// Refuse an image that maps far more guest data than its file holds
/// ([`ConvertOptions::max_amplification`]) or more than the caller's
/// quota ([`ConvertOptions::max_output`]), before the audit and before
/// anything is written.
fn bound_output<T: Source>(
    image: &Image<T>,
    uses: &TableUses,
    opts: &ConvertOptions,
    backing: bool,
) -> Result<(), ConvertError> {
    let file_len = image.file_len();
    let allowed = file_len.saturating_mul(opts.max_amplification);
    let quota = opts.max_output.unwrap_or(u64::MAX);
    let mapped = mapped_bytes(image, uses, allowed.min(quota));
    if mapped > allowed {
        return Err(ConvertError::Refused {
            input: Input::Image,
            findings: vec![refusal(
                code::AMPLIFICATION,
                field::L1_TABLE_OFFSET,
                format!(
                    "the active L1 table maps more than {allowed} guest bytes ({mapped} counted \
                     before stopping) from a {file_len}-byte file: over {} guest bytes per \
                     file byte",
                    opts.max_amplification
                ),
            )],
        });
    }
    // With a backing image, unallocated clusters are data too.
    let output = if backing {
        image.virtual_size()
    } else {
        mapped
    };
    if output > quota {
        return Err(ConvertError::Refused {
            input: Input::Image,
            findings: vec![refusal(
                code::OUTPUT_TOO_LARGE,
                field::L1_TABLE_OFFSET,
                format!("the output would hold more than {quota} bytes of data ({output} counted)"),
            )],
        });
    }
    Ok(())
}

/// The rule for the caller's external data file: an image whose guest data
/// lives in one needs it handed in ([`code::DATA_FILE_MISSING`]), and one
/// handed in for an image without one is refused
/// ([`code::DATA_FILE_UNEXPECTED`], input [`Input::DataFile`]). `given`:
/// whether the caller has one. Paths named inside the image are never
/// opened.
pub fn data_file_rule(h: &Header, given: bool) -> Result<(), ConvertError> {
    let (code, input, message) = match (h.has_data_file(), given) {
        (true, true) | (false, false) => return Ok(()),
        (true, false) => (
            code::DATA_FILE_MISSING,
            Input::Image,
            "guest data lives in an external data file that was not handed in",
        ),
        (false, true) => (
            code::DATA_FILE_UNEXPECTED,
            Input::DataFile,
            "a data file was handed in but the image has no external data file",
        ),
    };
    Err(ConvertError::Refused {
        input,
        findings: vec![refusal(
            code,
            field::INCOMPATIBLE_FEATURES,
            message.to_owned(),
        )],
    })
}

/// Open `inputs.image`, apply the policy and the conversion rules, attach
/// the backing image and data file, and audit the metadata (of the image,
/// and of a qcow2 backing image, which passes the same policy and audit
/// as the image: the rule `map` and `compare` apply). Nothing is
/// written; an `Err` means the conversion must not run.
pub fn prepare<S: Source>(
    inputs: Inputs<S>,
    opts: &ConvertOptions,
) -> Result<Conversion<S>, ConvertError> {
    let limits = opts.limits();
    let policy = &opts.policy;
    let mut warnings = Vec::new();
    let mut image = Image::open_with(inputs.image, limits.clone()).map_err(ConvertError::image)?;
    let judged = refuse_on_policy(Input::Image, &image, policy, &mut warnings)?;
    // The data file before the audit, which then also judges where the
    // clusters lie in it (whether one may be given is judged after it).
    let data_file_given = inputs.data_file.is_some();
    if let Some(df) = inputs.data_file.filter(|_| image.header().has_data_file()) {
        image.set_data_file(df);
    }
    // One walk of the tables: the audit, and what each table maps (for
    // the bounds and for skipping holes). The bounds are judged first.
    let (report, uses) = audit(Input::Image, &image, opts, judged)?;
    bound_output(&image, &uses, opts, inputs.backing.is_some())?;
    let report = audit_passed(Input::Image, report)?;
    if let Some(sel) = &inputs.snapshot {
        let Some(index) = sel.find(image.snapshots()) else {
            return Err(ConvertError::Refused {
                input: Input::Image,
                findings: vec![refusal(
                    code::SNAPSHOT_NOT_FOUND,
                    field::SNAPSHOTS_OFFSET,
                    "the image has no such internal snapshot".to_owned(),
                )],
            });
        };
        image = image.into_snapshot(index).map_err(ConvertError::image)?;
    }
    data_file_rule(image.header(), data_file_given)?;

    match inputs.backing {
        Some(src) => {
            if header::has_magic(&*src) {
                let backing =
                    Image::open_with(src, limits).map_err(|error| ConvertError::Image {
                        input: Input::Backing,
                        error,
                    })?;
                // The backing image must pass the same policy and the
                // same audit (its bytes are guest data too); its own
                // backing chain is not followed.
                let judged = refuse_on_policy(Input::Backing, &backing, policy, &mut warnings)?;
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
                let (report, _) = audit(Input::Backing, &backing, opts, judged)?;
                audit_passed(Input::Backing, report)?;
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
    // The walk saw the active tables: a snapshot is converted without
    // skipping.
    let holes = if inputs.snapshot.is_none() {
        hole_spans(&image, &uses)
    } else {
        Vec::new()
    };
    Ok(Conversion {
        image,
        audit: report,
        warnings,
        holes,
        threads: opts.threads,
    })
}
