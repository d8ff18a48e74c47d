//! Output helpers shared by the commands: errors and findings, human and JSON.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use qcow2_guard::{Error, Report, Severity};

use crate::exit::Exit;

/// Report a fatal error for `path`: one line on stderr, or with `json` an
/// error object on stdout. Returns the exit status.
pub fn fatal(path: &Path, e: &Error, json: bool) -> Exit {
    let exit = Exit::for_error(e);
    if json {
        let v = json!({
            "filename": path.display().to_string(),
            "error": qcow2_guard::json::error(e),
            "exit-code": exit.code(),
        });
        print_json(&v);
    } else {
        errln!(
            "qcow2-guard: {}: {} [{}] at offset {:#x}",
            path.display(),
            e,
            e.code(),
            e.offset()
        );
    }
    exit
}

/// Report a file that could not be opened at all.
pub fn unreadable(path: &Path, e: &std::io::Error, json: bool) -> Exit {
    if json {
        print_json(&json!({
            "filename": path.display().to_string(),
            "error": { "code": "unreadable", "offset": 0, "message": e.to_string() },
            "exit-code": Exit::NotChecked.code(),
        }));
    } else {
        errln!("qcow2-guard: {}: cannot open: {e}", path.display());
    }
    Exit::NotChecked
}

/// Report a refusal by the metadata check on stderr (the verdict and the
/// first ten error findings); returns the exit status.
pub fn audit_refusal(path: &Path, rep: &Report) -> Exit {
    let errors: Vec<_> = rep
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect();
    errln!(
        "qcow2-guard: {}: refused: the metadata check says {} ({} error finding(s); run `qcow2-guard check` for all of them)",
        path.display(),
        rep.verdict.as_str(),
        errors.len()
    );
    for f in errors.iter().take(10) {
        errln!("  {f}");
    }
    Exit::for_report(rep)
}

/// Pretty-print JSON on stdout, ignoring a closed pipe.
pub fn print_json(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, v);
    let _ = writeln!(out);
}
