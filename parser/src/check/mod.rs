//! `check`: walk every piece of metadata of an opened image, rebuild the
//! refcount of every host cluster, and report what is wrong.
//!
//! Stricter than `qemu-img check`, which never decompresses payloads, never
//! looks for overlaps between metadata structures, and never compares
//! ranges with the end of the file. Where `qemu-img check` reports a
//! corruption we report one too; where it reports only leaks we report
//! leaks (the same definitions: a stored refcount lower than the number of
//! references, or a referenced cluster the refcount table does not cover,
//! is a corruption; a stored refcount higher than needed is a leak; bit 63
//! of active L1 and L2 entries must say "refcount is exactly one").
//!
//! Decoding stays in the structure modules ([`crate::l1l2`],
//! [`crate::refcount`], [`crate::bitmap`], [`crate::compressed`]); this
//! module judges the decoded values against each other.
//!
//! Bounds: the rebuilt and stored refcounts are tracked per host cluster
//! of the *file* (`file length / cluster size`, rounded up), never a count
//! the header claims, in pages allocated where the tables reference
//! clusters (a sparse file costs what it holds, not its length). A file
//! of more than [`MAX_HOST_CLUSTERS`] clusters (QEMU's own bound), or
//! tables touching more pages than [`CheckOptions::max_tracked_clusters`]
//! allow, is refused (`too_large_to_check`, verdict `invalid`, not
//! [`Report::checked`]). Each distinct L1, L2, bitmap and refcount
//! table is read once, one cluster at a time, so time is linear in the
//! metadata plus the compressed data. Findings are capped
//! ([`CheckOptions::max_findings`]); past the cap only per-code counts grow.
//!
//! Dirty images (incompatible bit 0, lazy refcounts): their refcounts are
//! stale by design and QEMU rebuilds them on the next read-write open, so
//! refcount mismatches and copied-flag mismatches in a dirty image are
//! reported as `warning`s that count towards the `leaks` verdict
//! ("repairable with `qemu-img check -r all`") rather than `corrupt`.
//! Structural problems (overlaps, bad entries, bad payloads) stay errors.

use std::collections::BTreeMap;

use crate::error::Error;
use crate::finding::{Category, Finding, Severity};
use crate::policy::Policy;
use crate::source::Source;
use crate::Image;

mod payloads;
mod tracked;
mod walk;

pub(crate) use walk::TableUses;

/// Finding codes of the check (decode errors keep their [`Error::code`],
/// policy findings their [`crate::policy::code`]).
pub mod code {
    /// A host cluster is referenced more often than its stored refcount says.
    pub const REFCOUNT_TOO_LOW: &str = "refcount_too_low";
    /// A referenced host cluster is not covered by the refcount table.
    pub const REFCOUNT_BEYOND_TABLE: &str = "refcount_beyond_table";
    /// A host cluster's stored refcount is higher than its references.
    pub const LEAKED_CLUSTER: &str = "leaked_cluster";
    /// Bit 63 of an active L1 or L2 entry disagrees with the refcount.
    pub const COPIED_FLAG_MISMATCH: &str = "copied_flag_mismatch";
    /// Two metadata structures share host clusters.
    pub const METADATA_OVERLAP: &str = "metadata_overlap";
    /// A data cluster or compressed range lies in a metadata cluster.
    pub const DATA_OVERLAPS_METADATA: &str = "data_overlaps_metadata";
    /// One L2 table is referenced by several entries of the same L1 table.
    pub const L2_TABLE_SHARED: &str = "l2_table_shared";
    /// A snapshot L1 table too small for the snapshot's disk size.
    pub const SNAPSHOT_L1_TOO_SMALL: &str = "snapshot_l1_too_small";
    /// Two snapshots have the same ID.
    pub const DUPLICATE_SNAPSHOT_ID: &str = "duplicate_snapshot_id";
    /// A persistent bitmap is marked in use (not saved cleanly).
    pub const BITMAP_IN_USE: &str = "bitmap_in_use";
    /// The bitmaps extension is present but stale and was ignored.
    pub const STALE_BITMAPS: &str = "stale_bitmaps";
    /// Bit 0 (zero flag) of a standard L2 entry in a version 2 image.
    pub const ZERO_FLAG_IN_V2: &str = "zero_flag_in_v2";
    /// A compressed range whose last sector is cut by the end of the file
    /// (QEMU writes these; the payload itself is verified).
    pub const COMPRESSED_TAIL_PAST_EOF: &str = "compressed_tail_past_eof";
    /// The decompression budget ([`super::CheckOptions::max_decompressed_bytes`]) ran out.
    pub const DECOMPRESS_BUDGET: &str = "decompress_budget_exhausted";
    /// The file has more clusters than the check may track.
    pub const TOO_LARGE_TO_CHECK: &str = "too_large_to_check";
    /// A streamed inspection without a spool needed bytes the stream had
    /// already passed (a backward reference, or over the retention budget).
    pub const NEEDS_RANDOM_ACCESS: &str = "needs_random_access";
}

/// Most host clusters (file length / cluster size, rounded up) a file may
/// have: `qemu-img check` refuses a longer file ("File too large": its
/// refcount rebuild indexes clusters with an `int`), so neither can we
/// call one clean.
pub const MAX_HOST_CLUSTERS: u64 = 0x7fff_ffff;

/// What to check and how much to spend on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// The safety policy to apply (its findings decide `unsafe`).
    pub policy: Policy,
    /// Decompress every compressed payload (the default). Off: only the
    /// descriptors are checked ("metadata only").
    pub decompress: bool,
    /// Findings stored in the report; later ones are only counted.
    pub max_findings: usize,
    /// Most host clusters the refcount rebuild may track: its arrays are
    /// allocated in pages of 64 Ki clusters where the tables reference
    /// clusters, and the clusters of each array's pages stay within this
    /// (1 to 4 bytes of memory each for the counts, 2 bits for the rest).
    /// A file no longer than this many clusters always fits.
    pub max_tracked_clusters: u64,
    /// Total bytes the check may decompress; past this, compressed
    /// payloads are no longer verified and a finding says so.
    pub max_decompressed_bytes: u64,
    /// Threads verifying compressed payloads (default
    /// [`crate::parallel::default_threads`]; 1: the calling thread alone;
    /// fewer with clusters so large that their buffers would pass
    /// [`crate::parallel::WORKER_MEMORY`]). The report is the same for any
    /// value.
    pub threads: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions::with_threads(crate::parallel::default_threads())
    }
}

impl CheckOptions {
    /// The defaults, with `threads` instead of asking the system how many
    /// cores there are (which reads cgroup files: a start-up cost worth
    /// saving when nothing will be decompressed).
    pub fn with_threads(threads: usize) -> Self {
        CheckOptions {
            policy: Policy::default(),
            decompress: true,
            max_findings: 1000,
            max_tracked_clusters: 1 << 26,
            max_decompressed_bytes: 1 << 50,
            threads,
        }
    }

    /// Metadata checks only (no decompression), under `policy`: what
    /// `convert` runs before it writes.
    pub fn metadata_only(policy: Policy) -> Self {
        CheckOptions {
            policy,
            decompress: false,
            ..CheckOptions::default()
        }
    }
}

/// The overall outcome, worst first: `invalid` > `corrupt` > `unsafe` >
/// `leaks` > `ok`.
///
/// A corrupt image that is also refused by the policy is `corrupt`, with
/// both kinds of findings listed: corruption is a property of the bytes
/// that no `--allow-*` flag can relax, so an import service must not be
/// invited to retry with a relaxed policy.
///
/// The verdict and [`Report::checked`] are the library's whole answer;
/// the command-line tool maps them to its exit status in one function
/// (`src/exit.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Consistent (warnings allowed).
    Ok,
    /// Only leaked clusters (or stale refcounts of a dirty image).
    Leaks,
    /// Well formed but refused by the safety policy (or over the
    /// caller's [`crate::Limits`]).
    Unsafe,
    /// Corrupt.
    Corrupt,
    /// Could not be opened or checked at all: a qcow2 image too malformed
    /// to open ([`Report::checked`]), or a file that is not a qcow2
    /// image, could not be read, or is too large to check (not
    /// [`Report::checked`]).
    Invalid,
    /// A streamed inspection without a spool could not finish: the check
    /// needed bytes the stream had already passed ([`crate::stream`]).
    /// Never [`Report::checked`]; the findings name the byte ranges.
    NeedsRandomAccess,
}

impl Verdict {
    /// `ok`, `leaks`, `unsafe`, `corrupt` or `invalid`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Leaks => "leaks",
            Verdict::Unsafe => "unsafe",
            Verdict::Corrupt => "corrupt",
            Verdict::Invalid => "invalid",
            Verdict::NeedsRandomAccess => "needs_random_access",
        }
    }

    /// Whether the image may be read and converted: `ok` or `leaks`
    /// (leaked clusters waste space but harm no data). Every other
    /// verdict refuses the conversion.
    pub fn passes(self) -> bool {
        matches!(self, Verdict::Ok | Verdict::Leaks)
    }
}

/// Numbers about the image, in the spirit of `qemu-img check`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Host clusters of the file (rounded up).
    pub host_clusters: u64,
    /// Guest clusters of the active L1 table backed by a host cluster
    /// (data, preallocated zero, compressed).
    pub allocated_clusters: u64,
    /// Of those, compressed.
    pub compressed_clusters: u64,
    /// Of those, not contiguous with the previous one (compressed clusters
    /// always count, as in QEMU).
    pub fragmented_clusters: u64,
    /// One past the last host cluster with a stored or needed refcount.
    pub image_end_offset: u64,
    /// Host clusters whose stored refcount is too low (or uncovered).
    pub corruptions: u64,
    /// Host clusters whose stored refcount is too high.
    pub leaks: u64,
    /// Distinct L2 tables walked.
    pub l2_tables: u64,
    /// Compressed payloads decompressed and verified.
    pub decompressed_clusters: u64,
}

/// The result of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The overall outcome, decided by the worst finding.
    pub verdict: Verdict,
    /// Whether the bytes were judged. `false` when the file is not a
    /// qcow2 image, could not be read, is too large to check, or (a
    /// stream) needed random access: verdict `invalid` or
    /// `needs_random_access` then says nothing about the image's
    /// contents. `true` for every other report, including `invalid` for a
    /// qcow2 image too malformed to open.
    pub checked: bool,
    /// The first [`CheckOptions::max_findings`] findings, in walk order.
    pub findings: Vec<Finding>,
    /// Number of findings per code, including those not stored.
    pub counts: BTreeMap<&'static str, u64>,
    /// Findings counted but not stored.
    pub omitted: u64,
    /// Counts about the image; all zero when it could not be opened.
    pub stats: Stats,
}

impl Report {
    /// The report for an image that could not be opened.
    pub fn from_open_error(err: &Error) -> Report {
        let mut f = Findings::new(1);
        if err.is_refusal() {
            // Well formed as far as it was read, but over the caller's
            // limits: unsafe, like a policy refusal.
            f.push(Finding::new(
                err.code(),
                Severity::Error,
                Category::Policy,
                err.offset(),
                err.to_string(),
            ));
            return f.into_report(Stats::default(), false);
        }
        f.push(Finding::corruption(err));
        let mut r = f.into_report(Stats::default(), true);
        r.checked = !(err.is_not_qcow2() || err.is_io());
        r
    }

    /// Whether any finding has `code`.
    pub fn has(&self, code: &str) -> bool {
        self.counts.contains_key(code)
    }
}

/// Findings with a storage cap and per-code counts.
struct Findings {
    list: Vec<Finding>,
    counts: BTreeMap<&'static str, u64>,
    omitted: u64,
    cap: usize,
    corrupt: bool,
    unsafe_: bool,
    leaks: bool,
    not_checked: bool,
}

impl Findings {
    fn new(cap: usize) -> Findings {
        Findings {
            list: Vec::new(),
            counts: BTreeMap::new(),
            omitted: 0,
            cap,
            corrupt: false,
            unsafe_: false,
            leaks: false,
            not_checked: false,
        }
    }

    fn push(&mut self, f: Finding) {
        match (f.category, f.severity) {
            (Category::Corruption, Severity::Error) => self.corrupt = true,
            (Category::Policy, Severity::Error) => self.unsafe_ = true,
            (Category::Leak, _) => self.leaks = true,
            (Category::Other, Severity::Error) => self.not_checked = true,
            _ => {}
        }
        let n = self.counts.entry(f.code).or_insert(0);
        *n = n.saturating_add(1);
        if self.list.len() < self.cap {
            self.list.push(f);
        } else {
            self.omitted = self.omitted.saturating_add(1);
        }
    }

    /// A decode error: corruption, except I/O failures, which mean the
    /// image could not be checked.
    fn error(&mut self, e: &Error) {
        if e.is_io() {
            self.push(Finding::new(
                e.code(),
                Severity::Error,
                Category::Other,
                e.offset(),
                e.to_string(),
            ));
        } else {
            self.push(Finding::corruption(e));
        }
    }

    /// Whether the next finding will be stored (not only counted).
    fn storing(&self) -> bool {
        self.list.len() < self.cap
    }

    /// The report; `invalid` says the image could not be opened.
    fn into_report(self, stats: Stats, invalid: bool) -> Report {
        let verdict = if invalid || self.not_checked {
            Verdict::Invalid
        } else if self.corrupt {
            Verdict::Corrupt
        } else if self.unsafe_ {
            Verdict::Unsafe
        } else if self.leaks {
            Verdict::Leaks
        } else {
            Verdict::Ok
        };
        Report {
            verdict,
            checked: !self.not_checked,
            findings: self.list,
            counts: self.counts,
            omitted: self.omitted,
            stats,
        }
    }
}

/// Check `image` completely: policy, every metadata structure, refcounts,
/// overlaps, and (with [`CheckOptions::decompress`]) every compressed
/// payload.
///
/// Never fails: problems are findings, summed up in [`Report::verdict`].
///
/// ```
/// use qcow2_guard::build::{GuestCluster, ImageModel};
/// use qcow2_guard::{check, CheckOptions, Image, Verdict};
///
/// let built = ImageModel {
///     cluster_bits: 12,
///     clusters: vec![GuestCluster::Data(1), GuestCluster::Compressed(2)],
///     ..ImageModel::default()
/// }
/// .build()?;
/// let report = check(&Image::open(built.bytes.as_slice())?, &CheckOptions::default());
/// assert_eq!((report.verdict, report.checked), (Verdict::Ok, true));
/// assert_eq!(report.stats.decompressed_clusters, 1);
///
/// // Point guest cluster 0 at the L1 table: a reader trusting it would
/// // return metadata as guest data.
/// let l1_offset = Image::open(built.bytes.as_slice())?.header().l1_table_offset;
/// let entry = built.fields.iter().find(|f| f.name == "l2_entry").ok_or("no L2 entry")?;
/// let at = entry.offset as usize;
/// let mut bytes = built.bytes.clone();
/// bytes[at..at + 8].copy_from_slice(&l1_offset.to_be_bytes());
///
/// let report = check(&Image::open(bytes)?, &CheckOptions::default());
/// assert_eq!((report.verdict, report.checked), (Verdict::Corrupt, true));
/// assert_eq!(
///     report.findings[0].to_string(),
///     "error [data_overlaps_metadata] at 0x4000: data cluster at 0x1000 \
///      (entry at 0x4000) lies in a cluster of the L1 table",
/// );
/// // The second reference to the L1 table's cluster also breaks refcounts.
/// assert!(report.has("refcount_too_low") && report.has("leaked_cluster"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn check<S: Source>(image: &Image<S>, opts: &CheckOptions) -> Report {
    check_judged(image, opts, image.policy_findings(&opts.policy)).0
}

/// [`check`], with `policy` the findings of [`CheckOptions::policy`] on
/// `image`, already evaluated by the caller (convert judges the policy
/// before its audit); and what each walked L2 table of the active layer
/// maps (for a conversion, which then needs no pass of its own over the
/// tables; empty when the walk did not run).
pub(crate) fn check_judged<S: Source>(
    image: &Image<S>,
    opts: &CheckOptions,
    policy: Vec<Finding>,
) -> (Report, TableUses) {
    let mut findings = Findings::new(opts.max_findings);
    let g = image.geometry();
    let nb = image.file_len().div_ceil(g.cluster_size);
    let stats = Stats {
        total_clusters: image.virtual_size().div_ceil(g.cluster_size),
        host_clusters: nb,
        ..Stats::default()
    };
    let too_large = |message: String| {
        let mut f = Findings::new(opts.max_findings);
        for p in &policy {
            f.push(p.clone());
        }
        f.push(Finding::new(
            code::TOO_LARGE_TO_CHECK,
            Severity::Error,
            Category::Other,
            0,
            message,
        ));
        (f.into_report(stats.clone(), false), TableUses::new())
    };
    let clusters = match usize::try_from(nb) {
        Ok(n) if nb <= MAX_HOST_CLUSTERS => n,
        _ => {
            return too_large(format!(
                "file has {nb} host clusters; `qemu-img check` checks at most {MAX_HOST_CLUSTERS} (\"File too large\")"
            ))
        }
    };
    for f in &policy {
        findings.push(f.clone());
    }
    match walk::run(image, opts, findings, stats.clone(), clusters) {
        Some((findings, stats, uses)) => (findings.into_report(stats, false), uses),
        None => too_large(format!(
            "the tables reference host clusters in more pages of {} clusters than the check tracks ({} clusters)",
            tracked::PAGE,
            opts.max_tracked_clusters
        )),
    }
}

/// The metadata-only check `convert` runs before writing: everything
/// [`check`] does except decompressing payloads. Refuse the image unless
/// its verdict [`passes`](Verdict::passes).
pub fn check_metadata<S: Source>(image: &Image<S>, policy: &Policy) -> Report {
    check(image, &CheckOptions::metadata_only(policy.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(code: &'static str, severity: Severity, category: Category) -> Finding {
        Finding::new(code, severity, category, 0, "")
    }

    fn verdict(list: &[Finding]) -> (Verdict, bool) {
        let mut all = Findings::new(2);
        for x in list {
            all.push(x.clone());
        }
        let r = all.into_report(Stats::default(), false);
        (r.verdict, r.checked)
    }

    #[test]
    fn verdict_precedence() {
        let corrupt = f("refcount_too_low", Severity::Error, Category::Corruption);
        let unsafe_ = f("policy_backing_file", Severity::Error, Category::Policy);
        let leak = f("leaked_cluster", Severity::Warning, Category::Leak);
        let warn = f("dirty_bit", Severity::Warning, Category::Other);
        assert_eq!(verdict(&[]), (Verdict::Ok, true));
        assert_eq!(verdict(std::slice::from_ref(&warn)), (Verdict::Ok, true));
        assert_eq!(verdict(&[leak.clone(), warn]), (Verdict::Leaks, true));
        assert_eq!(
            verdict(&[leak.clone(), unsafe_.clone()]),
            (Verdict::Unsafe, true)
        );
        assert_eq!(verdict(&[unsafe_, corrupt, leak]), (Verdict::Corrupt, true));
        let io = f("io_error", Severity::Error, Category::Other);
        assert_eq!(verdict(&[io]), (Verdict::Invalid, false));
    }

    #[test]
    fn findings_are_capped_and_counted() {
        let mut all = Findings::new(2);
        for _ in 0..5 {
            all.push(f("reserved_bits", Severity::Error, Category::Corruption));
        }
        let r = all.into_report(Stats::default(), false);
        assert_eq!(r.findings.len(), 2);
        assert_eq!(r.omitted, 3);
        assert_eq!(r.counts.get("reserved_bits"), Some(&5));
    }

    #[test]
    fn open_errors() {
        let r = Report::from_open_error(&Error::BadMagic { found: 0 });
        assert_eq!((r.verdict, r.checked), (Verdict::Invalid, false));
        let r = Report::from_open_error(&Error::MissingRefcountTable { offset: 56 });
        assert_eq!((r.verdict, r.checked), (Verdict::Invalid, true));
        assert!(!r.verdict.passes());
    }
}
