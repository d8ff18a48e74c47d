//! The qcow2-guard fuzz targets, as a library.
//!
//! - [`targets`]: the target bodies. Each `pub fn <target>(data: &[u8])`
//!   (re-exported here) is what the libFuzzer binary
//!   `fuzz_targets/<target>.rs` runs, and what the corpus replay tests
//!   (here and at the repository root, `tests/fuzz_corpus.rs`) run over
//!   every file of `corpus/<target>/` and `corpus/regressions/<target>/`
//!   under plain `cargo test`. A body panics only when an oracle fails.
//! - [`oracles`]: what must hold of any opened image; [`qemu_decompress`]:
//!   QEMU's decompression on the C libraries; [`mutate`]: the model-driven
//!   `mutate` target and its known mutations.
//! - [`reference`]: a second, table-driven statement of the acceptance
//!   rules for header fields and entry bits (`header`, `tables`).
//! - [`frames`]: zstd frames and deflate streams built from the input
//!   (`decompress`'s built mode) and what each must decode to.
//! - [`model`]: the structured model the `structured` and `mutate`
//!   targets draw.
//! - [`replay`]: the corpus replay.
//!
//! Every body caps its input at [`MAX_INPUT`] and opens images with
//! [`Limits::fuzzing`](qcow2_guard::Limits::fuzzing).

#![forbid(unsafe_code)]

use qcow2_guard::check::CheckOptions;
use qcow2_guard::Error;

pub mod frames;
pub mod model;
pub mod mutate;
pub mod oracles;
pub mod qemu_decompress;
pub mod reference;
pub mod replay;
pub mod sparse;
pub mod targets;

pub use oracles::{checked_reads, compare_reads, conversions_agree, streaming_agrees, walk};
pub use replay::{file_and_memory_agree, files, replay_corpus};
pub use targets::{
    check, convert, decompress, header, read, stream, structured, tables, MAX_CONVERT_DISK,
    MAX_READ, READ_TRAILER,
};

/// Inputs longer than this are ignored.
pub const MAX_INPUT: usize = 1 << 20;

/// Most L2 entries, refcounts and table entries one input may make a body
/// visit (an L1 table may point many entries at one large L2 table).
pub(crate) const WORK: u64 = 1 << 16;

/// A target body.
pub type Body = fn(&[u8]);

/// The targets, by name.
pub const TARGETS: &[(&str, Body)] = &[
    ("header", header),
    ("tables", tables),
    ("decompress", decompress),
    ("structured", structured),
    ("read", read),
    ("check", check),
    ("mutate", mutate::mutate),
    ("stream", stream),
    ("convert", convert),
];

/// Run target `name` on `data`; false when there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, body)) => {
            body(data);
            true
        }
        None => false,
    }
}

/// The check's work bounds for fuzzing: the default options with a
/// 64 MiB decompression budget (one L2 table can name one payload
/// thousands of times), on the calling thread alone: the same run on
/// any machine, and no thread started per run (under ASan, starting the
/// payload workers took about a quarter of a `structured` run). The
/// `check` target runs the threaded check as well and asserts the same
/// report.
pub fn check_options() -> CheckOptions {
    CheckOptions {
        max_decompressed_bytes: 64 << 20,
        threads: 1,
        ..CheckOptions::default()
    }
}

/// Touch everything an error offers (code, offset, message).
pub(crate) fn consume(e: &Error) {
    let _ = (
        e.code(),
        e.offset(),
        e.to_string(),
        e.is_not_qcow2(),
        e.is_io(),
    );
}
