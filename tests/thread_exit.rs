//! A check or conversion on several threads returns only after its
//! workers have exited,
//! thread-local decoder state freed: a scope's implicit join returns as
//! soon as each closure is done, before the thread's thread-local
//! destructors run, and LeakSanitizer (the fuzz targets under ASan) then
//! reports the per-thread decoder contexts as leaked. One test per file:
//! no other test's workers may be alive in this process.

mod common;

use common::*;
use qcow2_guard::convert::{prepare, ConvertOptions, Inputs, WriteSink};
use qcow2_guard::{check, CheckOptions, FileSource, Image};

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

#[test]
fn no_worker_outlives_the_check() {
    let dir = tmpdir();
    let raw = dir.path().join("d.raw");
    write_raw(&raw, 1 << 20, 3);
    for kind in ["zlib", "zstd"] {
        let p = compress(
            &raw,
            &dir.path().join(format!("{kind}.qcow2")),
            &format!("cluster_size=4096,compression_type={kind}"),
        );
        let image = Image::open(FileSource::open(&p).expect("open")).expect("image");
        let before = threads();
        let opts = CheckOptions {
            threads: 2,
            ..CheckOptions::default()
        };
        for round in 0..100 {
            let r = check(&image, &opts);
            assert!(r.stats.decompressed_clusters > 30, "{:?}", r.stats);
            assert_eq!(
                threads(),
                before,
                "{kind}, check round {round}: workers alive"
            );
        }
        // The sequential sink (a pipe): chunks written in order by this
        // thread, filled by workers.
        let opts = ConvertOptions {
            threads: 2,
            ..ConvertOptions::default()
        };
        let conversion =
            prepare(Inputs::new(FileSource::open(&p).expect("open")), &opts).expect("prepare");
        for round in 0..100 {
            conversion
                .run(&WriteSink::new(std::io::sink()), None)
                .expect("run");
            assert_eq!(
                threads(),
                before,
                "{kind}, convert round {round}: workers alive"
            );
        }
    }
}
