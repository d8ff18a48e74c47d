//! Replay of the committed corpus through the target bodies, for plain
//! `cargo test` (no libFuzzer).

use std::path::{Path, PathBuf};

use qcow2_guard::qemu_map::Qcow2Layer;
use qcow2_guard::{qemu_map, FileSource, Image, Limits, MapEntry, MapLayer};

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

/// Most guest bytes [`file_and_memory_agree`] reads.
const FILE_READ: u64 = 4 << 20;

/// The same image opened from a file ([`FileSource`]) and from memory gives
/// the same outcome: the same error code, or the same tables failing; and
/// when it opens, the same guest bytes (the first [`FILE_READ`] of them)
/// and the same `qemu-img map` records, unless the file's allocation makes
/// the image look metadata-preallocated (a file knows its holes and its
/// allocated blocks, memory does not).
pub fn file_and_memory_agree(path: &Path, data: &[u8]) {
    let src = FileSource::open(path).expect("open corpus file");
    let file = Image::open_with(src, Limits::fuzzing());
    let memory = Image::open_with(data, Limits::fuzzing());
    let (file, memory) = match (file, memory) {
        (Ok(f), Ok(m)) => (f, m),
        (f, m) => {
            let code = |e: Option<qcow2_guard::Error>| e.map(|e| (e.code(), e.offset()));
            assert_eq!(code(f.err()), code(m.err()), "{}", path.display());
            return;
        }
    };
    assert_eq!(
        walk(&file),
        walk(&memory),
        "{}: tables failing",
        path.display()
    );
    let n = memory.virtual_size().min(FILE_READ) as usize;
    let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
    let code = |r: qcow2_guard::Result<()>| r.map_err(|e| e.code());
    assert_eq!(
        code(file.read_at(0, &mut a)),
        code(memory.read_at(0, &mut b)),
        "{}: read_at",
        path.display()
    );
    assert!(a == b, "{}: guest bytes differ", path.display());
    let (fl, ml) = (Qcow2Layer::new(&file), Qcow2Layer::new(&memory));
    assert!(!ml.preallocated(), "memory knows no allocation");
    if !fl.preallocated() {
        assert_eq!(
            map_records(&fl, n as u64),
            map_records(&ml, n as u64),
            "{}: map records",
            path.display()
        );
    }
}

/// The first 4,096 `qemu-img map` records of `0 .. len`, or the error code.
fn map_records(layer: &dyn MapLayer, len: u64) -> (Result<(), &'static str>, Vec<MapEntry>) {
    let mut v = Vec::new();
    let r = qemu_map(&[layer], 0, len, |e| {
        v.push(*e);
        v.len() < 4096
    })
    .map_err(|e| e.code());
    (r, v)
}
