//! Findings: what `check` and the safety policy report.
//!
//! A finding is an [`Error`] or a policy rule turned into
//! data: a stable code, a severity, the file offset, and a message.

use std::fmt;

use crate::error::Error;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Worth knowing; never changes the verdict.
    Info,
    /// Suspicious but readable; the image is still accepted.
    Warning,
    /// The image is corrupt, malformed, or refused.
    Error,
}

impl Severity {
    /// `info`, `warning` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// Which verdict a finding counts towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    /// The image structure is broken (corrupt).
    Corruption,
    /// Clusters allocated but unused (qemu-img check's leaks).
    Leak,
    /// Refused by the safety policy.
    Policy,
    /// Anything else (informational, warnings).
    Other,
}

/// One problem or observation, with the file offset it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Stable snake_case identifier.
    pub code: &'static str,
    /// How bad it is.
    pub severity: Severity,
    /// Which verdict it counts towards.
    pub category: Category,
    /// Byte offset in the image file.
    pub offset: u64,
    /// Human-readable description, with the offsets involved.
    pub message: String,
}

impl Finding {
    /// A finding of any kind.
    pub fn new(
        code: &'static str,
        severity: Severity,
        category: Category,
        offset: u64,
        message: impl Into<String>,
    ) -> Finding {
        Finding {
            code,
            severity,
            category,
            offset,
            message: message.into(),
        }
    }

    /// A corruption error from a decoding [`Error`].
    pub fn corruption(err: &Error) -> Finding {
        Finding::new(
            err.code(),
            Severity::Error,
            Category::Corruption,
            err.offset(),
            err.to_string(),
        )
    }
}

impl From<&Error> for Finding {
    fn from(err: &Error) -> Finding {
        Finding::corruption(err)
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}] at {:#x}: {}",
            self.severity.as_str(),
            self.code,
            self.offset,
            self.message
        )
    }
}
