//! The exit codes shared by every command.
//!
//! The library answers with a [`Verdict`] and whether the image was
//! judged ([`Report::checked`]); [`Exit::for_verdict`] is the one place
//! that turns that answer into a process exit status.

use std::process::ExitCode;

use qcow2_guard::check::Report;
use qcow2_guard::{Error, Verdict};

/// Process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exit {
    /// Success: the image is accepted.
    Ok = 0,
    /// Not checked: usage error, unreadable file, not a qcow2 image.
    NotChecked = 1,
    /// Corrupt or malformed qcow2.
    Corrupt = 2,
    /// Leaked clusters only.
    Leaks = 3,
    /// Well formed, but refused by the safety policy.
    Refused = 4,
}

impl Exit {
    /// The exit status for the library's answer: `verdict`, and whether
    /// the image was judged at all (`checked`).
    pub fn for_verdict(verdict: Verdict, checked: bool) -> Exit {
        match verdict {
            _ if !checked => Exit::NotChecked,
            Verdict::Ok => Exit::Ok,
            Verdict::Leaks => Exit::Leaks,
            Verdict::Unsafe => Exit::Refused,
            Verdict::Corrupt | Verdict::Invalid => Exit::Corrupt,
            Verdict::NeedsRandomAccess => Exit::NotChecked,
        }
    }

    /// The exit status for a check's report.
    pub fn for_report(rep: &Report) -> Exit {
        Exit::for_verdict(rep.verdict, rep.checked)
    }

    /// The exit status for a library error: that of the report on an
    /// image the error kept from being opened.
    pub fn for_error(e: &Error) -> Exit {
        Exit::for_report(&Report::from_open_error(e))
    }

    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// `compare`'s exit status: qemu-img compare's own table (its 1 means
/// "the images differ", not "not checked").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareExit {
    /// The images are identical.
    Identical = 0,
    /// The images differ.
    Differ = 1,
    /// An image could not be opened, or was refused (policy, metadata
    /// check, unsupported format).
    OpenError = 2,
    /// The block status of a range could not be found.
    StatusError = 3,
    /// Guest data could not be read.
    ReadError = 4,
}

impl From<CompareExit> for ExitCode {
    fn from(e: CompareExit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented table (README, `check --json`'s "exit-code").
    #[test]
    fn exit_table() {
        let code = |v, checked| Exit::for_verdict(v, checked).code();
        assert_eq!(code(Verdict::Ok, true), 0);
        assert_eq!(code(Verdict::Leaks, true), 3);
        assert_eq!(code(Verdict::Unsafe, true), 4);
        assert_eq!(code(Verdict::Corrupt, true), 2);
        assert_eq!(code(Verdict::Invalid, true), 2);
        assert_eq!(code(Verdict::Invalid, false), 1);
        assert_eq!(code(Verdict::NeedsRandomAccess, false), 1);
        assert_eq!(code(Verdict::NeedsRandomAccess, true), 1);
    }

    #[test]
    fn errors() {
        let code = |e| Exit::for_error(&e).code();
        assert_eq!(code(Error::BadMagic { found: 0 }), 1);
        assert_eq!(code(Error::MissingRefcountTable { offset: 56 }), 2);
        let io = std::io::Error::other("gone");
        assert_eq!(
            code(Error::Io {
                offset: 0,
                len: 1,
                source: io
            }),
            1
        );
    }
}
