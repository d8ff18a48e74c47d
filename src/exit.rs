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
