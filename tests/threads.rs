//! Decompression on several threads gives the single-thread results: the
//! check's report (findings, their order, what is stored and omitted,
//! statistics) and the converted disk, on images made by qemu-img and then
//! damaged (payloads, descriptors and other entries), for zlib and zstd.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qcow2_guard::convert::{prepare, ConvertOptions, FileSink, Inputs, WriteSink};
use qcow2_guard::l1l2::Cluster;
use qcow2_guard::walker::{walk, Item};
use qcow2_guard::{check, CheckOptions, FileSource, Image, Report};

/// `qemu-img convert -c` of 6 MiB of mixed data (text, random, zeros) with
/// 4 KiB clusters: 384 compressed clusters in three L2 tables.
fn compressed(dir: &Path, kind: &str) -> PathBuf {
    let raw = dir.join(format!("{kind}.raw"));
    write_raw(&raw, 6 << 20, 11);
    let opts = format!("cluster_size=4096,compression_type={kind}");
    compress(&raw, &dir.join(format!("{kind}.qcow2")), &opts)
}

/// Every L2 entry: (file offset, raw word, compressed).
fn entries(p: &Path) -> Vec<(u64, u64, Option<u64>)> {
    let image = Image::open(FileSource::open(p).expect("open")).expect("image");
    let mut out = Vec::new();
    walk(&image, &mut |item: Item<'_>| {
        if let Item::L2(e) = item {
            let host = match e.cluster {
                Ok(Cluster::Compressed(d)) => Some(d.start()),
                _ => None,
            };
            out.push((e.at, e.raw, host));
        }
    });
    out
}

/// Damage a copy of `p`: garbage in every 7th compressed payload, an
/// inflating descriptor on every 23rd, a reserved bit on every 11th data
/// entry, so payload failures and other findings interleave.
fn damaged(p: &Path, dir: &Path) -> PathBuf {
    let q = copy(p, dir, "damaged.qcow2");
    let mut compressed = 0;
    let mut data = 0;
    for (at, raw, host) in entries(&q) {
        match host {
            Some(h) => {
                compressed += 1;
                if compressed % 7 == 0 {
                    patch(&q, h + 6, &[0xa5; 24]);
                } else if compressed % 23 == 0 {
                    // The count of additional sectors at its maximum.
                    let shift = 62 - (12 - 8);
                    patch(&q, at, &(raw | (0xf << shift)).to_be_bytes());
                }
            }
            None if raw != 0 => {
                data += 1;
                if data % 11 == 0 {
                    patch(&q, at, &(raw | 0x2).to_be_bytes());
                }
            }
            None => {}
        }
    }
    assert!(compressed > 300 && data > 20, "{compressed} {data}");
    q
}

fn report(p: &Path, opts: &CheckOptions) -> Report {
    let image = Image::open(FileSource::open(p).expect("open")).expect("image");
    check(&image, opts)
}

/// The report of every thread count equals the single-thread one.
fn same_for_all_threads(p: &Path, base: CheckOptions) -> Report {
    let one = report(
        p,
        &CheckOptions {
            threads: 1,
            ..base.clone()
        },
    );
    for threads in [2, 3, 8, 2] {
        let many = report(
            p,
            &CheckOptions {
                threads,
                ..base.clone()
            },
        );
        assert_eq!(many, one, "{threads} threads");
    }
    one
}

fn check_kind(kind: &str) {
    let dir = tmpdir();
    let clean = compressed(dir.path(), kind);
    let r = same_for_all_threads(&clean, CheckOptions::default());
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    assert!(r.stats.decompressed_clusters > 300, "{:?}", r.stats);

    let bad = damaged(&clean, dir.path());
    let r = same_for_all_threads(&bad, CheckOptions::default());
    let codes: Vec<_> = r.findings.iter().map(|f| f.code).collect();
    // Payload failures, inflating descriptors and reserved bits, mixed.
    for c in ["decompress_failed", "compressed_inflation", "reserved_bits"] {
        assert!(r.has(c), "{c} missing: {codes:?}");
    }
    let first_payload = codes.iter().position(|c| *c == "decompress_failed");
    let last_other = codes.iter().rposition(|c| *c == "reserved_bits");
    assert!(first_payload < last_other, "{codes:?}");

    // A small cap: which findings are stored depends on their order.
    let capped = same_for_all_threads(
        &bad,
        CheckOptions {
            max_findings: 7,
            ..CheckOptions::default()
        },
    );
    assert_eq!(capped.findings.len(), 7);
    assert!(capped.omitted > 0);
    assert_eq!(capped.findings[..], r.findings[..7]);

    // A budget that runs out half-way.
    let budget = same_for_all_threads(
        &bad,
        CheckOptions {
            max_decompressed_bytes: 200 * 4096,
            ..CheckOptions::default()
        },
    );
    assert!(budget.has("decompress_budget_exhausted"));
    assert!(budget.stats.decompressed_clusters < r.stats.decompressed_clusters);

    // The CLI's option gives the same document.
    let json_of = |threads: &str| {
        let out = guard(&["check", "--output=json", "--threads", threads, s(&bad)]);
        assert_eq!(code(&out), 2, "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    assert_eq!(json_of("1"), json_of("4"));
}

#[test]
fn zlib_check_is_the_same_on_any_thread_count() {
    check_kind("zlib");
}

#[test]
fn zstd_check_is_the_same_on_any_thread_count() {
    check_kind("zstd");
}

/// Convert with 1..=5 workers, into a file and into a stream: the disk
/// qemu-img writes, every time.
#[test]
fn convert_is_the_same_on_any_thread_count() {
    let dir = tmpdir();
    for kind in ["zlib", "zstd"] {
        let p = compressed(dir.path(), kind);
        let want_path = dir.path().join(format!("{kind}-qemu.raw"));
        qemu_img(&["convert", "-O", "raw", s(&p), s(&want_path)]);
        let want = std::fs::read(&want_path).expect("read");
        for threads in 1..=5 {
            let opts = ConvertOptions {
                threads,
                ..ConvertOptions::default()
            };
            let conversion =
                prepare(Inputs::new(FileSource::open(&p).expect("open")), &opts).expect("prepare");
            let sink = WriteSink::new(Vec::new());
            conversion.run(&sink, None).expect("run");
            assert!(
                sink.into_inner().expect("sink") == want,
                "{kind}, {threads} threads, stream"
            );
            let out = dir.path().join(format!("{kind}-{threads}.raw"));
            let file = std::fs::File::create(&out).expect("create");
            conversion.run(&FileSink::new(&file), None).expect("run");
            assert!(
                std::fs::read(&out).expect("read") == want,
                "{kind}, {threads} threads, file"
            );
        }
        // The CLI: qemu-img's -m.
        let out = dir.path().join(format!("{kind}-cli.raw"));
        let o = guard(&["convert", "-q", "-m", "3", s(&p), s(&out)]);
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        assert!(std::fs::read(&out).expect("read") == want, "{kind}, -m 3");
    }
}

/// The streamed check and conversion (`check -`, `convert -`) decompress
/// on worker threads: with a spool, the report is the stored file's and
/// the disk qemu-img's; without one (this layout needs bytes after the
/// stream passed them), the one-thread answer; for clean and damaged
/// payloads, on any thread count, fed in 4 KiB and 64 KiB pieces.
#[test]
fn streamed_check_and_convert_are_the_same_on_any_thread_count() {
    use std::sync::Arc;

    use qcow2_guard::convert::StreamConversion;
    use qcow2_guard::stream::Inspector;
    use qcow2_guard::{Limits, Source};
    let dir = tmpdir();
    for kind in ["zlib", "zstd"] {
        let clean = compressed(dir.path(), kind);
        let bad = damaged(&clean, dir.path());
        for p in [&clean, &bad] {
            let bytes = std::fs::read(p).expect("read");
            let one = CheckOptions {
                threads: 1,
                ..CheckOptions::default()
            };
            let stored = report(p, &one);
            let streamed = |threads: usize, piece: usize, spool: bool| {
                let opts = CheckOptions {
                    threads,
                    ..CheckOptions::default()
                };
                let mut i = if spool {
                    let spool: Arc<dyn Source> = Arc::new(bytes.clone());
                    Inspector::with_spool(Limits::default(), opts, spool)
                } else {
                    Inspector::new(Limits::default(), opts)
                };
                for c in bytes.chunks(piece) {
                    i.feed(c);
                }
                i.finish().report
            };
            for piece in [4096, 65536] {
                let alone = streamed(1, piece, false);
                for threads in [1, 2, 8] {
                    let what = format!("{kind}, {threads} threads, {piece}-byte pieces");
                    assert_eq!(streamed(threads, piece, true), stored, "{what}, spool");
                    assert_eq!(streamed(threads, piece, false), alone, "{what}");
                }
            }
        }
        let want_path = dir.path().join(format!("{kind}-qemu.raw"));
        qemu_img(&["convert", "-O", "raw", s(&clean), s(&want_path)]);
        let want = std::fs::read(&want_path).expect("read");
        let convert = |p: &Path, threads: usize, piece: usize, spool: bool| {
            let bytes = std::fs::read(p).expect("read");
            let out = dir
                .path()
                .join(format!("{kind}-stream-{threads}-{piece}.raw"));
            let file = std::fs::File::create(&out).expect("create");
            let sink = FileSink::new(&file);
            let opts = ConvertOptions {
                threads,
                ..ConvertOptions::default()
            };
            let mut c = if spool {
                let spool: Arc<dyn Source> = Arc::new(bytes.clone());
                StreamConversion::with_spool(&opts, &sink, spool)
            } else {
                StreamConversion::new(&opts, &sink)
            }
            .expect("positional");
            let fed = bytes
                .chunks(piece)
                .try_for_each(|b| c.feed(b))
                .and_then(|()| c.finish().map(|_| ()));
            (
                fed.map_err(|e| e.to_string()),
                std::fs::read(&out).expect("read"),
            )
        };
        for piece in [4096, 65536] {
            let (alone, _) = convert(&clean, 1, piece, false);
            for threads in 1..=3 {
                let what = format!("{kind}, {threads} threads, {piece}-byte pieces");
                let (r, disk) = convert(&clean, threads, piece, true);
                assert_eq!(r, Ok(()), "{what}");
                assert!(disk == want, "{what}");
                assert_eq!(convert(&clean, threads, piece, false).0, alone, "{what}");
            }
        }
        // The damaged image is refused the same way on any thread count.
        let (refused, _) = convert(&bad, 1, 65536, true);
        assert!(refused.is_err(), "{kind}: damaged image converted");
        for threads in [2, 3] {
            let (r, _) = convert(&bad, threads, 65536, true);
            assert_eq!(r, refused, "{kind}, {threads} threads");
        }
    }
}

/// A positional sink that records what was written and, on each
/// `settled(end)`, that every byte below `end` had arrived.
struct Settling {
    disk: std::sync::Mutex<(Vec<u8>, Vec<bool>)>,
    /// Every `settled` end, and the prefix found written so far.
    settled: std::sync::Mutex<(Vec<u64>, usize)>,
}

impl Settling {
    fn mark(&self, offset: u64, data: Option<&[u8]>, len: usize) {
        let mut d = self.disk.lock().unwrap();
        let at = offset as usize;
        if let Some(data) = data {
            d.0[at..at + len].copy_from_slice(data);
        }
        d.1[at..at + len].iter_mut().for_each(|b| *b = true);
    }
}

impl qcow2_guard::convert::Sink for Settling {
    fn sequential(&self) -> bool {
        false
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.mark(offset, Some(data), data.len());
        Ok(())
    }
    fn settled(&self, end: u64) {
        let d = self.disk.lock().unwrap();
        let mut s = self.settled.lock().unwrap();
        let from = s.1.min(end as usize);
        let missing = d.1[from..end as usize].iter().position(|&b| !b);
        assert_eq!(
            missing, None,
            "settled({end:#x}) before the byte was written"
        );
        s.0.push(end);
        s.1 = s.1.max(end as usize);
    }
    fn write_zeros(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.mark(offset, None, len as usize);
        Ok(())
    }
    fn finish(&self, _size: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a positional sink hears as settled (where `FileSink::write_behind`
/// starts the disk writes) has been written, whatever the worker count:
/// 12 MiB of data, zero, unallocated and compressed clusters, 4 KiB
/// clusters (48 chunks).
#[test]
fn settled_ranges_are_written_on_any_thread_count() {
    use qcow2_guard::build::{GuestCluster, ImageModel};
    let clusters = (0..3072u32)
        .map(|c| match c % 7 {
            0 | 3 => GuestCluster::Data(c as u8),
            1 => GuestCluster::Zero,
            2 => GuestCluster::Unallocated,
            _ => GuestCluster::Compressed(c as u8),
        })
        .collect();
    let built = ImageModel {
        cluster_bits: 12,
        clusters,
        ..ImageModel::default()
    }
    .build()
    .expect("build");
    for threads in 1..=4 {
        let opts = ConvertOptions {
            threads,
            ..ConvertOptions::default()
        };
        let conversion = prepare(Inputs::new(built.bytes.as_slice()), &opts).expect("prepare");
        let size = built.guest.len();
        let sink = Settling {
            disk: std::sync::Mutex::new((vec![0; size], vec![false; size])),
            settled: std::sync::Mutex::new((Vec::new(), 0)),
        };
        conversion.run(&sink, None).expect("run");
        let (disk, seen) = sink.disk.into_inner().unwrap();
        assert!(disk == built.guest, "{threads} threads");
        assert!(seen.iter().all(|&b| b), "{threads} threads");
        let (settled, _) = sink.settled.into_inner().unwrap();
        // Reported as it goes, up to the last chunk's start.
        let top = settled.iter().max().copied().unwrap_or(0);
        assert!(
            top >= size as u64 - (1 << 20),
            "{threads} threads: {top:#x}"
        );
        assert!(settled.len() >= 40, "{threads} threads: {}", settled.len());
    }
}

/// Hostile variations of built images (random bytes overwritten anywhere,
/// tables included): the report never depends on the thread count.
#[test]
fn mutated_images_report_the_same_on_any_thread_count() {
    use qcow2_guard::build::{GuestCluster, ImageModel, SnapshotModel};
    use qcow2_guard::CompressionType;

    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut payload_failures = 0;
    for (i, compression) in [CompressionType::Deflate, CompressionType::Zstd]
        .into_iter()
        .cycle()
        .take(8)
        .enumerate()
    {
        let clusters = (0..120u32)
            .map(|c| match c % 5 {
                0 => GuestCluster::Data(c as u8),
                1 => GuestCluster::Zero,
                _ => GuestCluster::Compressed(c as u8),
            })
            .collect();
        let built = ImageModel {
            cluster_bits: 9 + (i as u32 % 4),
            compression,
            clusters,
            snapshots: if i % 3 == 0 {
                vec![SnapshotModel { name: "s".into() }]
            } else {
                Vec::new()
            },
            ..ImageModel::default()
        }
        .build()
        .expect("build");
        for round in 0..25 {
            let mut bytes = built.bytes.clone();
            for _ in 0..1 + round % 8 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let Ok(image) = Image::open(bytes.as_slice()) else {
                continue;
            };
            let base = CheckOptions {
                max_findings: 1 + round % 20,
                ..CheckOptions::default()
            };
            let one = check(
                &image,
                &CheckOptions {
                    threads: 1,
                    ..base.clone()
                },
            );
            let three = check(&image, &CheckOptions { threads: 3, ..base });
            assert_eq!(one, three, "model {i}, round {round}");
            payload_failures += usize::from(one.has("decompress_failed"));
        }
    }
    // The mutations do reach payloads.
    assert!(payload_failures > 5, "{payload_failures}");
}

/// Peak RSS (KiB) of `qcow2-guard ARGS`, through python's `wait4`.
fn peak_rss_kib(args: &[&str]) -> u64 {
    let script = "import os, sys\n\
        pid = os.fork()\n\
        if pid == 0:\n    \
            fd = os.open(os.devnull, os.O_WRONLY); os.dup2(fd, 1)\n    \
            os.execv(sys.argv[1], sys.argv[1:])\n\
        _, st, ru = os.wait4(pid, 0)\n\
        assert os.waitstatus_to_exitcode(st) == 0, st\n\
        print(ru.ru_maxrss)\n";
    let out = std::process::Command::new("python3")
        .args(["-S", "-c", script, bin()])
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("rss")
}

/// 2 MiB clusters (the largest QEMU allows) and 64 threads asked for:
/// the workers' buffers stay within `parallel::WORKER_MEMORY` (without
/// the cut, 32 workers of 8 MiB each).
#[test]
fn large_clusters_start_fewer_workers() {
    let dir = tmpdir();
    let raw = dir.path().join("big.raw");
    write_raw(&raw, 64 << 20, 5);
    let p = compress(
        &raw,
        &dir.path().join("big.qcow2"),
        "cluster_size=2M,compression_type=zstd",
    );
    let convert = peak_rss_kib(&["convert", "-q", "-m", "64", s(&p), "-"]);
    let check = peak_rss_kib(&["check", "--threads", "64", s(&p)]);
    // Measured: 27 and 30 MiB; without the cut 101 and 75 MiB.
    assert!(convert < 40 << 10, "convert: {convert} KiB");
    assert!(check < 40 << 10, "check: {check} KiB");
}
