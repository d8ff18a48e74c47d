//! A check or conversion on several threads returns only after its
//! workers' thread-local decoder states are freed: a scope's implicit join
//! returns as soon as each closure is done, before the thread's
//! thread-local destructors run, and LeakSanitizer (the fuzz targets under
//! ASan) then reports the per-thread decoder contexts as leaked. One test
//! per file: no other test may be decoding in this process.

mod common;

use common::*;
use qcow2_guard::compressed::live_decoder_states;
use qcow2_guard::convert::{prepare, ConvertOptions, Inputs, WriteSink};
use qcow2_guard::{check, CheckOptions, FileSource, Image};

/// The calling thread may keep its own: one state per compression kind.
const OWN: usize = 2;

/// Threads of this process still running user code (a thread that has
/// left it, thread-local destructors done, has no memory map in /proc
/// while the kernel finishes it).
fn user_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter(|status| status.contains("VmRSS"))
        .count()
}

/// Waits up to two seconds for the count to come back to `expected`: the
/// kernel wakes a joiner (clearing the thread id) just before it drops the
/// exiting thread's memory map, so a joined worker can still show VmRSS for
/// a moment (CI saw 3 for 2 once). A worker that is still running user code
/// never leaves, and fails here.
fn settled_user_threads(expected: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let n = user_threads();
        if n == expected || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn no_worker_state_outlives_the_call() {
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
        let threads = user_threads();
        let opts = CheckOptions {
            threads: 2,
            ..CheckOptions::default()
        };
        for round in 0..100 {
            let r = check(&image, &opts);
            assert!(r.stats.decompressed_clusters > 30, "{:?}", r.stats);
            let alive = live_decoder_states();
            assert!(alive <= OWN, "{kind}, check round {round}: {alive} states");
            assert_eq!(
                settled_user_threads(threads),
                threads,
                "{kind}, check round {round}"
            );
        }
        // The sequential sink (a pipe): workers fill, this thread writes.
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
            let alive = live_decoder_states();
            assert!(
                alive <= OWN,
                "{kind}, convert round {round}: {alive} states"
            );
            assert_eq!(
                settled_user_threads(threads),
                threads,
                "{kind}, convert round {round}"
            );
        }
    }
}
