//! Replay of the committed corpus through the target bodies, for plain
//! `cargo test` (no libFuzzer).

use std::path::{Path, PathBuf};

use std::os::unix::fs::FileExt as _;

use qcow2_guard::qemu_map::Qcow2Layer;
use qcow2_guard::read::RawBacking;
use qcow2_guard::{qemu_map, FileSource, Image, Limits, MapEntry, MapLayer, Source};

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
/// allocated blocks, memory does not); as raw images, the file and a
/// sparse copy of it map their holes as zeros.
pub fn file_and_memory_agree(path: &Path, data: &[u8]) {
    let src = FileSource::open(path).expect("open corpus file");
    let file = Image::open_with(src, Limits::fuzzing());
    if data.len() as u64 <= FILE_READ {
        sparse_copy_reads_as_zeros(path, data);
    }
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

/// A sparse copy of the file (every all-zero 4 KiB block left a hole) and
/// the file itself, as raw images ([`raw_map_reads_as_zeros`]).
fn sparse_copy_reads_as_zeros(path: &Path, data: &[u8]) {
    let name = format!(
        "qcow2-guard-replay-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    );
    let tmp = std::env::temp_dir().join(name);
    {
        let f = std::fs::File::create(&tmp).expect("create the sparse copy");
        for (i, block) in data.chunks(crate::sparse::BLOCK).enumerate() {
            if block.iter().any(|&b| b != 0) {
                f.write_all_at(block, (i * crate::sparse::BLOCK) as u64)
                    .expect("write the sparse copy");
            }
        }
        f.set_len(data.len() as u64).expect("size the sparse copy");
    }
    let src = FileSource::open(&tmp).expect("open the sparse copy");
    let shrink = std::fs::OpenOptions::new()
        .write(true)
        .open(&tmp)
        .expect("open the sparse copy for writing");
    let cut = FileSource::open(&tmp).expect("open the sparse copy again");
    let _ = std::fs::remove_file(&tmp);
    raw_map_reads_as_zeros(path, src, data);
    // The copy cut in half while open: its holes are no longer found,
    // its tail no longer read (an I/O error, never zeros).
    if data.len() >= 2 {
        shrink
            .set_len(data.len() as u64 / 2)
            .expect("cut the sparse copy");
        let (r, _) = map_records(&RawBacking(&cut), data.len() as u64);
        assert_eq!(
            r,
            Err("io_error"),
            "{}: map of a file that shrank",
            path.display()
        );
        let mut last = [0u8];
        assert!(
            cut.read_exact_at(data.len() as u64 - 1, &mut last).is_err(),
            "{}: read of a byte the file no longer has",
            path.display()
        );
    }
    raw_map_reads_as_zeros(
        path,
        FileSource::open(path).expect("open corpus file"),
        data,
    );
}

/// `src` (a file holding `data`, with holes or not), as a raw image
/// ([`RawBacking`]: its holes found with `SEEK_DATA`/`SEEK_HOLE`): it reads
/// back `data`, and its `qemu-img map` records tile it with every record
/// flagged zero reading as zeros in `data`.
fn raw_map_reads_as_zeros(path: &Path, src: FileSource, data: &[u8]) {
    let mut back = vec![0u8; data.len()];
    src.read_exact_at(0, &mut back).expect("read the file");
    // Past the end: a read fails, no data run.
    let len = data.len() as u64;
    assert!(
        src.read_exact_at(len, &mut [0u8]).is_err(),
        "{}: read past the end",
        path.display()
    );
    assert_eq!(
        src.data_run(len).ok(),
        Some(None),
        "{}: data past the end",
        path.display()
    );
    assert!(
        back == data,
        "{}: the file reads back other bytes",
        path.display()
    );
    let raw = RawBacking(src);
    let (r, records) = map_records(&raw, data.len() as u64);
    assert_eq!(r, Ok(()), "{}: map of the sparse copy", path.display());
    let mut pos = 0u64;
    for e in &records {
        assert_eq!(e.start, pos, "{}: records do not tile", path.display());
        pos = e.end();
        if e.zero {
            let got = &data[e.start as usize..e.end() as usize];
            assert!(
                got.iter().all(|&b| b == 0),
                "{}: {e:?} is not zeros",
                path.display()
            );
        }
    }
    assert!(
        records.len() >= 4096 || pos == data.len() as u64,
        "{}: records stop short",
        path.display()
    );
}
