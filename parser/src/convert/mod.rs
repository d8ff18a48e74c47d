//! Conversion to a raw disk: the engine behind `qcow2-guard convert`, for
//! any embedding service.
//!
//! Two steps. [`prepare`] opens the image from any [`Source`](crate::Source) under
//! conversion [`Limits`](crate::Limits) (tighter than the defaults, so
//! peak memory stays bounded whatever the image claims), applies the
//! safety [`Policy`](crate::Policy) to it and to a backing image, checks
//! that the backing and data-file inputs the caller opened are the ones
//! the image needs, and runs the metadata audit (what `check
//! --metadata-only` does): any error finding refuses the conversion
//! before anything is written. [`Conversion::run`] then writes the guest
//! disk into a [`Sink`]: a [`FileSink`] takes chunks in any order from
//! several workers (positional writes; holes are skipped in a new file),
//! a [`WriteSink`] takes them in order over any [`std::io::Write`] (holes
//! are written as zeros).
//!
//! Failures are typed ([`ConvertError`]): refused by policy or by a
//! conversion rule (findings with stable [`code`]s), refused by the audit
//! (its [`Report`]), an image error, or a sink error.
//!
//! ```
//! use qcow2_guard::build::{GuestCluster, ImageModel};
//! use qcow2_guard::convert::{prepare, ConvertOptions, Inputs, WriteSink};
//!
//! let built = ImageModel {
//!     cluster_bits: 12,
//!     clusters: vec![GuestCluster::Data(1), GuestCluster::Compressed(2)],
//!     ..ImageModel::default()
//! }
//! .build()?;
//! let conversion = prepare(Inputs::new(built.bytes.as_slice()), &ConvertOptions::default())?;
//! let sink = WriteSink::new(Vec::new());
//! conversion.run(&sink, None)?;
//! assert_eq!(sink.into_inner()?, built.guest);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io;

use crate::error::Error;
use crate::finding::Finding;
use crate::Report;

mod chunks;
mod pipeline;
mod prepare;
mod sink;
mod streaming;

pub use pipeline::Progress;
pub use prepare::{
    data_file_rule, prepare, Conversion, ConvertOptions, Inputs, AUDIT_TRACKED_CLUSTERS,
    DEFAULT_MAX_AMPLIFICATION,
};
pub use sink::{FileSink, Sink, WriteSink};
pub use streaming::{StreamConversion, Streamed};

/// Finding codes of the conversion rules (policy findings keep their
/// [`crate::policy::code`], audit findings their [`crate::check::code`]).
pub mod code {
    /// Refused: guest data lives in an external data file that was not
    /// handed in ([`super::Inputs::data_file`]).
    pub const DATA_FILE_MISSING: &str = "convert_data_file_missing";
    /// Refused: a data file was handed in but the image has none.
    pub const DATA_FILE_UNEXPECTED: &str = "convert_data_file_unexpected";
    /// Refused: the qcow2 backing image has an external data file itself.
    pub const BACKING_DATA_FILE: &str = "convert_backing_data_file";
    /// Warning: the image names a backing file but none was handed in:
    /// unallocated clusters are written as zeros.
    pub const NO_BACKING: &str = "convert_no_backing";
    /// Refused: the file has more host clusters than the audit's refcount
    /// rebuild may track ([`super::ConvertOptions::max_audit_clusters`]).
    pub const AUDIT_TOO_LARGE: &str = "convert_audit_too_large";
    /// Refused: the internal snapshot asked for
    /// ([`super::Inputs::snapshot`]) is not in the image.
    pub const SNAPSHOT_NOT_FOUND: &str = "convert_snapshot_not_found";
    /// Refused: the image maps more guest bytes per file byte than
    /// [`super::ConvertOptions::max_amplification`].
    pub const AMPLIFICATION: &str = "convert_amplification";
    /// Refused: the output would hold more data than
    /// [`super::ConvertOptions::max_output`].
    pub const OUTPUT_TOO_LARGE: &str = "convert_output_too_large";
}

/// Which input of a conversion an error concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Input {
    /// The image being converted.
    Image,
    /// The backing image handed in with [`Inputs::backing`].
    Backing,
    /// The external data file handed in with [`Inputs::data_file`].
    DataFile,
}

impl Input {
    /// `image`, `backing image` or `data file`.
    pub fn as_str(self) -> &'static str {
        match self {
            Input::Image => "image",
            Input::Backing => "backing image",
            Input::DataFile => "data file",
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a conversion did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Refused before anything was written, by the safety policy or a
    /// conversion rule: the error findings, each with its stable code.
    #[error("{input}: refused: {}", first(findings))]
    Refused {
        /// The input refused.
        input: Input,
        /// The error findings (at least one).
        findings: Vec<Finding>,
    },
    /// The metadata audit found errors (verdict corrupt, unsafe or
    /// invalid): nothing was written.
    #[error("{input}: refused: the metadata check says {}", report.verdict.as_str())]
    Audit {
        /// The input audited.
        input: Input,
        /// The audit's report.
        report: Box<Report>,
    },
    /// An input is malformed, or reading it failed.
    #[error("{input}: {error}")]
    Image {
        /// The input concerned.
        input: Input,
        /// The error, with its code and offset.
        #[source]
        error: Error,
    },
    /// Writing to the sink failed.
    #[error("writing the output: {0}")]
    Sink(#[source] io::Error),
}

fn first(findings: &[Finding]) -> String {
    findings
        .first()
        .map_or_else(|| "no finding".to_owned(), ToString::to_string)
}

impl ConvertError {
    fn image(error: Error) -> ConvertError {
        ConvertError::Image {
            input: Input::Image,
            error,
        }
    }
}
