//! The exit codes shared by every command.

use std::process::ExitCode;

use qcow2_guard::Error;

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
    /// The exit status for a library error.
    pub fn for_error(e: &Error) -> Exit {
        if e.is_not_qcow2() || e.is_io() {
            Exit::NotChecked
        } else if e.is_refusal() {
            Exit::Refused
        } else {
            Exit::Corrupt
        }
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
