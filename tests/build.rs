//! The image encoder (`qcow2_guard::build`) against QEMU: every model it
//! encodes must pass `qemu-img check`, convert to raw as exactly the
//! model's guest bytes, and open cleanly in qcow2-guard.

mod common;

use qcow2_guard::build::{GuestCluster, ImageModel, SnapshotModel};
use qcow2_guard::{CompressionType, Image, Limits};

use GuestCluster::{Compressed, Data, Subclusters, Unallocated, Zero};

fn mixed() -> Vec<GuestCluster> {
    vec![
        Data(1),
        Unallocated,
        Zero,
        Compressed(2),
        Compressed(3),
        Data(4),
        Compressed(5),
        Unallocated,
        Data(6),
    ]
}

/// Build `m`, then check it with qemu-img and compare the raw conversion.
fn qemu_accepts(name: &str, m: &ImageModel) {
    let built = m.build().unwrap_or_else(|e| panic!("{name}: {e}"));
    let image = Image::open_with(built.bytes.clone(), Limits::default())
        .unwrap_or_else(|e| panic!("{name}: qcow2-guard cannot open it: {e}"));
    assert_eq!(image.virtual_size(), built.guest.len() as u64, "{name}");

    let dir = common::tmpdir();
    let path = dir.path().join(format!("{name}.qcow2"));
    std::fs::write(&path, &built.bytes).unwrap();
    let p = path.to_str().unwrap();
    let check = common::qemu_img_status(&["check", "-f", "qcow2", p]);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && report.contains("No errors"),
        "{name}: qemu-img check: {report} {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let raw = dir.path().join(format!("{name}.raw"));
    common::qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        p,
        raw.to_str().unwrap(),
    ]);
    let got = std::fs::read(&raw).unwrap();
    assert!(got == built.guest, "{name}: guest content differs");
}

#[test]
fn versions_and_cluster_sizes() {
    for version in [2, 3] {
        for cluster_bits in [9, 10, 12, 16, 21] {
            let m = ImageModel {
                version,
                cluster_bits,
                clusters: mixed(),
                ..ImageModel::default()
            };
            qemu_accepts(&format!("v{version}-cb{cluster_bits}"), &m);
        }
    }
}

#[test]
fn every_refcount_width() {
    for refcount_order in 0..=6 {
        let m = ImageModel {
            cluster_bits: 12,
            refcount_order,
            clusters: mixed(),
            ..ImageModel::default()
        };
        qemu_accepts(&format!("refcount-order-{refcount_order}"), &m);
    }
}

#[test]
fn zstd_and_lazy_refcounts() {
    for cluster_bits in [9, 12, 16] {
        let m = ImageModel {
            cluster_bits,
            compression: CompressionType::Zstd,
            lazy_refcounts: true,
            clusters: mixed(),
            ..ImageModel::default()
        };
        qemu_accepts(&format!("zstd-cb{cluster_bits}"), &m);
    }
}

#[test]
fn many_small_compressed_streams_share_clusters() {
    for (refcount_order, snapshots) in [(1, 0), (1, 2), (4, 3), (2, 0)] {
        let m = ImageModel {
            cluster_bits: 16,
            refcount_order,
            clusters: (0..40).map(|i| Compressed(i as u8)).collect(),
            snapshots: (0..snapshots)
                .map(|i| SnapshotModel {
                    name: format!("snap{i}"),
                })
                .collect(),
            ..ImageModel::default()
        };
        qemu_accepts(&format!("streams-r{refcount_order}-s{snapshots}"), &m);
    }
}

#[test]
fn extended_l2_subclusters() {
    for compression in [CompressionType::Deflate, CompressionType::Zstd] {
        let mut clusters = mixed();
        clusters.extend([
            Subclusters {
                alloc: 0x0000_ffff,
                zero: 0xffff_0000,
                seed: 7,
            },
            Subclusters {
                alloc: 0x8000_0001,
                zero: 0x0000_0ff0,
                seed: 8,
            },
            Subclusters {
                alloc: 0,
                zero: 0x00ff_00ff,
                seed: 9,
            },
        ]);
        let m = ImageModel {
            cluster_bits: 14,
            extended_l2: true,
            compression,
            clusters,
            snapshots: vec![SnapshotModel { name: "one".into() }],
            ..ImageModel::default()
        };
        qemu_accepts(&format!("extl2-{}", compression.as_str()), &m);
    }
}

#[test]
fn snapshots_and_several_l2_tables() {
    for version in [2, 3] {
        // 512-byte clusters: 64 entries per L2 table, so 150 clusters need 3.
        let m = ImageModel {
            version,
            cluster_bits: 9,
            clusters: (0..150)
                .map(|i| match i % 4 {
                    0 => Data(i as u8),
                    1 => Compressed(i as u8),
                    2 => Zero,
                    _ => Unallocated,
                })
                .collect(),
            snapshots: vec![
                SnapshotModel {
                    name: "first".into(),
                },
                SnapshotModel {
                    name: "second one".into(),
                },
            ],
            ..ImageModel::default()
        };
        qemu_accepts(&format!("snapshots-v{version}"), &m);
    }
}

#[test]
fn empty_and_no_feature_table() {
    let m = ImageModel {
        feature_table: false,
        clusters: vec![],
        ..ImageModel::default()
    };
    qemu_accepts("empty", &m);
}
