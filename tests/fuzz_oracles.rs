//! The fuzz crate's own pieces that a target relies on, tested where
//! `cargo test --workspace` runs them: the sparse-file model and the
//! streaming-conversion oracle (that it passes on a good conversion and
//! fails when the two conversions disagree).

use qcow2_guard::build::{GuestCluster, ImageModel};
use qcow2_guard::convert::ConvertOptions;
use qcow2_guard::Source;
use qcow2_guard_fuzz::sparse::{Sparse, BLOCK};
use qcow2_guard_fuzz::streaming_agrees;

#[test]
fn sparse_holes_are_zero_blocks() {
    let mut bytes = vec![0u8; 5 * BLOCK + 100];
    bytes[BLOCK + 7] = 1;
    bytes[2 * BLOCK] = 2;
    bytes[5 * BLOCK + 99] = 3;
    let s = Sparse::new(bytes.clone());
    assert_eq!(s.len(), bytes.len() as u64);
    let b = BLOCK as u64;
    assert_eq!(s.data_run(0).unwrap(), Some((b, 3 * b)));
    assert_eq!(s.data_run(b + 9).unwrap(), Some((b + 9, 3 * b)));
    assert_eq!(s.data_run(3 * b).unwrap(), Some((5 * b, 5 * b + 100)));
    assert_eq!(s.data_run(5 * b + 100).unwrap(), None);
    assert_eq!(s.allocated_bytes(), Some(3 * b));
    let mut buf = [9u8; 8];
    s.read_exact_at(3 * b, &mut buf).unwrap();
    assert_eq!(buf, [0; 8]);
    assert!(s.read_exact_at(5 * b + 95, &mut buf).is_err());
    assert_eq!(Sparse::new(vec![0; 10]).data_run(0).unwrap(), None);
}

fn built() -> qcow2_guard::build::BuiltImage {
    ImageModel {
        cluster_bits: 12,
        clusters: (0..12)
            .map(|i| match i % 4 {
                0 => GuestCluster::Data(i),
                1 => GuestCluster::Compressed(i),
                2 => GuestCluster::Zero,
                _ => GuestCluster::Unallocated,
            })
            .collect(),
        ..ImageModel::default()
    }
    .build()
    .unwrap()
}

#[test]
fn streaming_oracle_passes_on_agreeing_conversions() {
    let b = built();
    let opts = ConvertOptions::default();
    for seed in 0..4u8 {
        let sizes = qcow2_guard_fuzz::targets::chunk_sizes(&[seed], b.bytes.len());
        streaming_agrees(&b.bytes, &opts, &sizes, Some(&b.guest));
    }
    // Refused by both: a truncated header.
    streaming_agrees(&b.bytes[..50], &opts, &[50], None);
}

#[test]
#[should_panic(expected = "bytes differ from the positional conversion")]
fn streaming_oracle_fails_on_other_bytes() {
    let b = built();
    let mut other = b.guest.clone();
    other[5] ^= 1;
    streaming_agrees(
        &b.bytes,
        &ConvertOptions::default(),
        &[1000; 100],
        Some(&other),
    );
}

#[test]
#[should_panic(expected = "the positional conversion does not")]
fn streaming_oracle_fails_when_only_streaming_converts() {
    let b = built();
    streaming_agrees(&b.bytes, &ConvertOptions::default(), &[4096; 40], None);
}
