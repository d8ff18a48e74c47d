//! Replay of the committed corpus through the target bodies, for plain
//! `cargo test` (no libFuzzer).

use std::path::{Path, PathBuf};

use qcow2_guard::{FileSource, Image, Limits};

use crate::oracles::walk;
use crate::TARGETS;

/// Files of `dir`, sorted (none when it does not exist).
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Replay `corpus/<target>/*` and `corpus/regressions/<target>/*` under
/// `corpus` through every target body; returns (target, files replayed).
/// Panics (naming the file) when a body panics.
pub fn replay_corpus(corpus: &Path) -> Vec<(&'static str, usize)> {
    let mut counts = Vec::new();
    for (name, body) in TARGETS {
        let mut n = 0;
        for dir in [corpus.join(name), corpus.join("regressions").join(name)] {
            for f in files(&dir) {
                let data = std::fs::read(&f).expect("read corpus file");
                let r = std::panic::catch_unwind(|| body(&data));
                assert!(r.is_ok(), "target {name} panics on {}", f.display());
                if *name == "tables" {
                    file_and_memory_agree(&f, &data);
                }
                n += 1;
            }
        }
        counts.push((*name, n));
    }
    counts
}

/// The same image opened from a file ([`FileSource`]) and from memory gives
/// the same outcome: the same error code, or the same tables failing.
pub fn file_and_memory_agree(path: &Path, data: &[u8]) {
    let src = FileSource::open(path).expect("open corpus file");
    let outcome = |r: qcow2_guard::Result<u64>| match r {
        Ok(failures) => format!("ok, {failures} failures"),
        Err(e) => format!("error {} at {:#x}", e.code(), e.offset()),
    };
    let from_file = outcome(Image::open_with(src, Limits::fuzzing()).map(|img| walk(&img)));
    let from_memory = outcome(Image::open_with(data, Limits::fuzzing()).map(|img| walk(&img)));
    assert_eq!(from_file, from_memory, "{}", path.display());
}
