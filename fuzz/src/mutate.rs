//! The `mutate` target: an image built from the structured model, one
//! mutation whose effect the model knows, and a backing image; the verdict,
//! the finding codes and every guest byte are asserted against what the
//! model says, never only against another read path.
//!
//! The layout (where guest cluster `i`'s L2 entry is, where host cluster
//! `c`'s refcount is) is computed here from the format's definition
//! (docs/interop/qcow2.rst), not asked of the parser: a parser that
//! misplaces an entry disagrees with this module.

use arbitrary::{Arbitrary, Unstructured};
use qcow2_guard::build::GuestCluster;
use qcow2_guard::check::{code, Verdict};
use qcow2_guard::finding::Severity;
use qcow2_guard::read::RawBacking;
use qcow2_guard::{Image, Limits};
use std::sync::Arc;

use crate::model::FuzzImage;

/// One mutation whose effect on the verdict and on the guest data is known.
/// Indices are folded into range; a mutation that does not apply to the
/// image drawn (no such entry) leaves it unedited.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Known {
    /// No edit: verdict `ok`, guest data as the model says.
    None,
    /// Lower a non-zero refcount by one: `corrupt`, `refcount_too_low`.
    RefcountDown { cluster: u16 },
    /// Raise a refcount by one: `leaked_cluster` (plus
    /// `copied_flag_mismatch` when the cluster's entry has the copied flag).
    RefcountUp { cluster: u16 },
    /// Set a reserved bit of a non-compressed L2 entry: `reserved_bits`,
    /// that guest cluster unreadable with that code.
    ReservedL2 { guest: u16, bit: u8 },
    /// Set a reserved bit of an allocated L1 entry: `reserved_bits`.
    ReservedL1 { index: u16, bit: u8 },
    /// Point a data cluster's entry at another data cluster's host
    /// cluster: `corrupt` (`refcount_too_low`, and the old cluster leaks);
    /// the guest cluster reads the other's bytes.
    Share { from: u16, to: u16 },
    /// Set the zero flag of a v3 standard entry (data or unallocated):
    /// still `ok`, the cluster reads zeros (not the backing image).
    ZeroFlag { guest: u16 },
    /// Clear an allocated entry: `leaks`; the cluster reads the backing.
    Unmap { guest: u16 },
    /// Extended L2: set the zero bit of subcluster `sub`: reads zeros when
    /// it was not allocated (`ok`); `invalid_subcluster_bitmap` when it
    /// was; `invalid_compressed_entry` for a compressed cluster.
    SubclusterZero { guest: u16, sub: u8 },
    /// Move a compressed stream past the end of the file:
    /// `compressed_past_eof`.
    CompressedPastEof { guest: u16, sectors: u8 },
    /// Move a host offset off its cluster boundary by a multiple of 512
    /// (bits 9..cluster_bits-1; clusters over 512 bytes): an allocated L2
    /// table's offset in the L1 table (`l1`: open fails or the check has
    /// `unaligned`, its guest clusters fail with it), else a standard data
    /// entry's host offset (`corrupt` with `unaligned`, that cluster fails
    /// with it).
    Unaligned { l1: bool, index: u16, by: u16 },
    /// Set a header field just past the range QEMU opens (measured with
    /// qemu-img 10.0.2, see `crate::reference`): `field % 3` picks
    /// refcount_order (v3: 7 + `by % 4`; `invalid_refcount_order`),
    /// cluster_bits (8, or 22 + `by % 4`; `invalid_cluster_bits`) or
    /// version (1, or 4 + `by % 4`; `unsupported_version`): the image
    /// must not open, and fail with that code. Off-by-one acceptance at a
    /// bound is the bug; a random 32-bit value almost never sits next to
    /// one.
    HeaderPastBound { field: u8, by: u8 },
}

/// The target's input.
#[derive(Debug, Arbitrary)]
struct Input {
    image: FuzzImage,
    /// Seed and length (in 512-byte sectors) of the raw backing image.
    backing: Option<(u8, u16)>,
    known: Known,
}

/// What the guest must read for one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Bytes(Vec<u8>),
    /// The read fails with this error code.
    Fails(&'static str),
}

/// Where things are in the built image, from the format's definition.
struct Layout {
    cluster_size: u64,
    cluster_bits: u32,
    extended: bool,
    v3: bool,
    l1_offset: u64,
    l1_size: u64,
    refcount_table: u64,
    refcount_bits: u64,
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;

fn be(bytes: &[u8], at: u64, width: usize) -> u64 {
    let at = at as usize;
    bytes
        .get(at..at + width)
        .map_or(0, |b| b.iter().fold(0u64, |v, &x| v << 8 | u64::from(x)))
}

fn put_be(bytes: &mut [u8], at: u64, width: usize, v: u64) {
    let at = at as usize;
    if let Some(slot) = bytes.get_mut(at..at + width) {
        slot.copy_from_slice(&v.to_be_bytes()[8 - width..]);
    }
}

impl Layout {
    fn of(bytes: &[u8]) -> Layout {
        let version = be(bytes, 4, 4);
        let cluster_bits = be(bytes, 20, 4) as u32;
        let v3 = version >= 3;
        Layout {
            cluster_size: 1 << cluster_bits,
            cluster_bits,
            extended: v3 && be(bytes, 72, 8) & (1 << 4) != 0,
            v3,
            l1_size: be(bytes, 36, 4),
            l1_offset: be(bytes, 40, 8),
            refcount_table: be(bytes, 48, 8),
            refcount_bits: 1 << if v3 { be(bytes, 96, 4) } else { 4 },
        }
    }

    fn entry_bytes(&self) -> u64 {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// Guest clusters one L2 table maps.
    fn entries_per_table(&self) -> u64 {
        self.cluster_size / self.entry_bytes()
    }

    /// Every guest cluster that L1 entry `j` maps must fail with `code`.
    fn fail_table(&self, expect: &mut [Expect], j: u64, code: &'static str) {
        let per_table = self.entries_per_table() as usize;
        for e in expect
            .iter_mut()
            .skip(j as usize * per_table)
            .take(per_table)
        {
            *e = Expect::Fails(code);
        }
    }

    /// File offset of guest cluster `i`'s L2 entry (None: no L2 table).
    fn l2_entry_at(&self, bytes: &[u8], i: u64) -> Option<u64> {
        let per_table = self.entries_per_table();
        let l1_index = i / per_table;
        if l1_index >= self.l1_size {
            return None;
        }
        let l2 = be(bytes, self.l1_offset + 8 * l1_index, 8) & OFFSET_MASK;
        (l2 != 0).then(|| l2 + (i % per_table) * self.entry_bytes())
    }

    /// (byte offset, bit shift within the value read, width in bytes of
    /// that read) of host cluster `c`'s refcount; refcounts narrower than a
    /// byte are packed from the least significant bit.
    fn refcount_at(&self, bytes: &[u8], c: u64) -> Option<(u64, u32, usize)> {
        let per_block = self.cluster_size * 8 / self.refcount_bits;
        let block = be(bytes, self.refcount_table + 8 * (c / per_block), 8) & !0x1ff;
        if block == 0 {
            return None;
        }
        let bit = (c % per_block) * self.refcount_bits;
        if self.refcount_bits >= 8 {
            Some((block + bit / 8, 0, (self.refcount_bits / 8) as usize))
        } else {
            Some((block + bit / 8, (bit % 8) as u32, 1))
        }
    }

    fn refcount(&self, bytes: &[u8], c: u64) -> Option<u64> {
        let (at, shift, w) = self.refcount_at(bytes, c)?;
        let mask = if self.refcount_bits >= 64 {
            u64::MAX
        } else {
            (1 << self.refcount_bits) - 1
        };
        Some(be(bytes, at, w) >> shift & mask)
    }

    fn set_refcount(&self, bytes: &mut [u8], c: u64, v: u64) {
        let Some((at, shift, w)) = self.refcount_at(bytes, c) else {
            return;
        };
        let mask = if self.refcount_bits >= 64 {
            u64::MAX
        } else {
            (1 << self.refcount_bits) - 1
        };
        let old = be(bytes, at, w);
        put_be(bytes, at, w, old & !(mask << shift) | (v & mask) << shift);
    }
}

/// Guest bytes the model says cluster `i` holds with `backing` below it.
fn model_cluster(
    cluster: Option<&GuestCluster>,
    v3: bool,
    built_guest: &[u8],
    backing: &[u8],
    sub_size: usize,
) -> Vec<u8> {
    let from_backing = |range: std::ops::Range<usize>, base: usize| -> Vec<u8> {
        range
            .map(|k| backing.get(base + k).copied().unwrap_or(0))
            .collect()
    };
    let n = built_guest.len();
    match cluster {
        None | Some(GuestCluster::Unallocated) => from_backing(0..n, 0),
        Some(GuestCluster::Zero) if !v3 => from_backing(0..n, 0),
        Some(GuestCluster::Zero) => vec![0; n],
        Some(GuestCluster::Data(_)) | Some(GuestCluster::Compressed(_)) => built_guest.to_vec(),
        Some(GuestCluster::Subclusters { alloc, zero, .. }) => {
            let mut out = Vec::with_capacity(n);
            for s in 0..n / sub_size {
                let r = s * sub_size..(s + 1) * sub_size;
                if alloc >> s & 1 != 0 {
                    out.extend_from_slice(&built_guest[r]);
                } else if zero >> s & 1 != 0 {
                    out.extend(std::iter::repeat_n(0, sub_size));
                } else {
                    out.extend(from_backing(r, 0));
                }
            }
            out
        }
    }
}

/// What the check must say.
#[derive(Debug)]
enum Verdicts {
    /// Exactly this verdict, with these codes present (and, for `Ok`,
    /// no finding of error severity).
    Exactly(Verdict, &'static [&'static str]),
    /// `leaks`, or `corrupt` through `copied_flag_mismatch` only.
    LeakOrCopied,
    /// Open fails with this code, or the check is `corrupt`/`invalid` and
    /// has it.
    OpenOrCheck(&'static str),
}

/// `mutate`: see the module documentation.
pub fn mutate(data: &[u8]) {
    if data.len() > crate::MAX_INPUT {
        return;
    }
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let model = input.image.model();
    let built = model
        .build()
        .unwrap_or_else(|e| panic!("the encoder rejects a folded model: {e}\n{model:?}"));
    let lay = Layout::of(&built.bytes);
    let cs = lay.cluster_size as usize;
    let n_guest = built.guest.len() / cs;
    let backing: Vec<u8> = match input.backing {
        Some((seed, sectors)) => {
            let len = usize::from(sectors % 1024) * 512;
            qcow2_guard::build::pattern(seed, 0xbac, len)
        }
        None => Vec::new(),
    };
    let sub_size = if lay.extended { cs / 32 } else { cs };
    let mut expect: Vec<Expect> = (0..n_guest)
        .map(|i| {
            let slot = &built.guest[i * cs..(i + 1) * cs];
            let below = backing.get(i * cs..).unwrap_or(&[]);
            Expect::Bytes(model_cluster(
                model.clusters.get(i),
                lay.v3,
                slot,
                below,
                sub_size,
            ))
        })
        .collect();

    let mut bytes = built.bytes.clone();
    let host_clusters = (bytes.len() as u64).div_ceil(lay.cluster_size);
    let entry = |bytes: &[u8], i: u64| lay.l2_entry_at(bytes, i).map(|at| (at, be(bytes, at, 8)));
    let pick = |k: u16, n: usize| usize::from(k) % n.max(1);
    let mut verdict = Verdicts::Exactly(Verdict::Ok, &[]);
    match input.known {
        Known::None => {}
        Known::RefcountDown { cluster } => {
            let c = u64::from(cluster) % host_clusters;
            if let Some(r) = lay.refcount(&bytes, c).filter(|&r| r > 0) {
                lay.set_refcount(&mut bytes, c, r - 1);
                verdict = Verdicts::Exactly(Verdict::Corrupt, &[code::REFCOUNT_TOO_LOW]);
            }
        }
        Known::RefcountUp { cluster } => {
            let c = u64::from(cluster) % host_clusters;
            let max = if lay.refcount_bits >= 64 {
                u64::MAX
            } else {
                (1 << lay.refcount_bits) - 1
            };
            if let Some(r) = lay.refcount(&bytes, c).filter(|&r| r < max) {
                lay.set_refcount(&mut bytes, c, r + 1);
                verdict = Verdicts::LeakOrCopied;
            }
        }
        Known::ReservedL2 { guest, bit } => {
            let i = pick(guest, n_guest);
            if let Some((at, raw)) =
                entry(&bytes, i as u64).filter(|(_, raw)| raw & COMPRESSED == 0)
            {
                let mut bits: Vec<u32> = (1..=8).chain(56..=61).collect();
                if lay.extended {
                    bits.push(0);
                }
                let b = bits[usize::from(bit) % bits.len()];
                put_be(&mut bytes, at, 8, raw | 1 << b);
                expect[i] = Expect::Fails("reserved_bits");
                verdict = Verdicts::Exactly(Verdict::Corrupt, &["reserved_bits"]);
            }
        }
        Known::ReservedL1 { index, bit } => {
            let j = u64::from(index) % lay.l1_size.max(1);
            let at = lay.l1_offset + 8 * j;
            let raw = be(&bytes, at, 8);
            if j < lay.l1_size && raw & OFFSET_MASK != 0 {
                let bits: Vec<u32> = (0..=8).chain(56..=62).collect();
                let b = bits[usize::from(bit) % bits.len()];
                put_be(&mut bytes, at, 8, raw | 1 << b);
                lay.fail_table(&mut expect, j, "reserved_bits");
                verdict = Verdicts::OpenOrCheck("reserved_bits");
            }
        }
        Known::Share { from, to } => {
            // Both whole data clusters: standard entries with a host offset
            // and (extended L2) every subcluster allocated.
            let data: Vec<usize> = (0..n_guest)
                .filter(|&i| {
                    let whole = match model.clusters.get(i) {
                        Some(GuestCluster::Data(_)) => true,
                        Some(GuestCluster::Subclusters { alloc, .. }) => *alloc == u32::MAX,
                        _ => false,
                    };
                    whole
                        && entry(&bytes, i as u64)
                            .is_some_and(|(_, raw)| raw & COMPRESSED == 0 && raw & OFFSET_MASK != 0)
                })
                .collect();
            if data.len() >= 2 {
                let ia = pick(from, data.len());
                let ib = (ia + 1 + pick(to, data.len() - 1)) % data.len();
                let (a, b) = (data[ia], data[ib]);
                let (at_a, raw_a) = entry(&bytes, a as u64).expect("entry");
                let (_, raw_b) = entry(&bytes, b as u64).expect("entry");
                if a != b && raw_a & OFFSET_MASK != raw_b & OFFSET_MASK {
                    put_be(
                        &mut bytes,
                        at_a,
                        8,
                        raw_a & !OFFSET_MASK | raw_b & OFFSET_MASK,
                    );
                    expect[a] = expect[b].clone();
                    verdict = Verdicts::Exactly(
                        Verdict::Corrupt,
                        &[code::REFCOUNT_TOO_LOW, code::LEAKED_CLUSTER],
                    );
                }
            }
        }
        Known::ZeroFlag { guest } => {
            let i = pick(guest, n_guest);
            if let Some((at, raw)) = entry(&bytes, i as u64) {
                if raw & COMPRESSED == 0 && !lay.extended {
                    put_be(&mut bytes, at, 8, raw | 1);
                    if lay.v3 {
                        expect[i] = Expect::Bytes(vec![0; cs]);
                    } else {
                        verdict = Verdicts::Exactly(Verdict::Corrupt, &[code::ZERO_FLAG_IN_V2]);
                        // QEMU reads the v2 zero flag as zero too.
                        expect[i] = Expect::Bytes(vec![0; cs]);
                    }
                }
            }
        }
        Known::Unmap { guest } => {
            let i = pick(guest, n_guest);
            if let Some((at, raw)) = entry(&bytes, i as u64) {
                let allocated = raw & COMPRESSED != 0 || raw & OFFSET_MASK != 0;
                if allocated {
                    put_be(&mut bytes, at, 8, 0);
                    if lay.extended {
                        put_be(&mut bytes, at + 8, 8, 0);
                    }
                    expect[i] = Expect::Bytes(model_cluster(
                        None,
                        lay.v3,
                        &built.guest[i * cs..(i + 1) * cs],
                        backing.get(i * cs..).unwrap_or(&[]),
                        sub_size,
                    ));
                    verdict = Verdicts::Exactly(Verdict::Leaks, &[code::LEAKED_CLUSTER]);
                }
            }
        }
        Known::SubclusterZero { guest, sub } => {
            let i = pick(guest, n_guest);
            if let (true, Some((at, raw))) = (lay.extended, entry(&bytes, i as u64)) {
                let s = u32::from(sub % 32);
                let bitmap = be(&bytes, at + 8, 8);
                put_be(&mut bytes, at + 8, 8, bitmap | 1 << (32 + s));
                if raw & COMPRESSED != 0 {
                    expect[i] = Expect::Fails("invalid_compressed_entry");
                    verdict = Verdicts::Exactly(Verdict::Corrupt, &["invalid_compressed_entry"]);
                } else if bitmap >> s & 1 != 0 {
                    expect[i] = Expect::Fails("invalid_subcluster_bitmap");
                    verdict = Verdicts::Exactly(Verdict::Corrupt, &["invalid_subcluster_bitmap"]);
                } else if let Expect::Bytes(b) = &mut expect[i] {
                    let sub = cs / 32;
                    b[s as usize * sub..(s as usize + 1) * sub].fill(0);
                }
            }
        }
        Known::CompressedPastEof { guest, sectors } => {
            let i = pick(guest, n_guest);
            if let Some((at, raw)) =
                entry(&bytes, i as u64).filter(|(_, raw)| raw & COMPRESSED != 0)
            {
                let shift = 62 - (lay.cluster_bits - 8);
                // Keep the offset within its sector, so the span (and the
                // inflation bound) stays what it was.
                let mask = (1u64 << shift) - 1;
                let past = (bytes.len() as u64).next_multiple_of(512)
                    + 512 * u64::from(sectors)
                    + (raw & mask & 511);
                let moved = raw & !mask | past;
                put_be(&mut bytes, at, 8, moved);
                expect[i] = Expect::Fails("compressed_past_eof");
                verdict = Verdicts::Exactly(Verdict::Corrupt, &["compressed_past_eof"]);
            }
        }
        Known::Unaligned { l1, index, by } if lay.cluster_size > 512 => {
            let sectors = lay.cluster_size / 512;
            let delta = 512 * (1 + u64::from(by) % (sectors - 1));
            if l1 {
                let j = u64::from(index) % lay.l1_size.max(1);
                let at = lay.l1_offset + 8 * j;
                let raw = be(&bytes, at, 8);
                if j < lay.l1_size && raw & OFFSET_MASK != 0 {
                    put_be(&mut bytes, at, 8, raw + delta);
                    lay.fail_table(&mut expect, j, "unaligned");
                    verdict = Verdicts::OpenOrCheck("unaligned");
                }
            } else {
                let i = pick(index, n_guest);
                if let Some((at, raw)) = entry(&bytes, i as u64)
                    .filter(|(_, raw)| raw & COMPRESSED == 0 && raw & OFFSET_MASK != 0)
                {
                    put_be(&mut bytes, at, 8, raw + delta);
                    expect[i] = Expect::Fails("unaligned");
                    verdict = Verdicts::Exactly(Verdict::Corrupt, &["unaligned"]);
                }
            }
        }
        Known::Unaligned { .. } => {}
        Known::HeaderPastBound { field, by } => {
            let by = u64::from(by % 4);
            let low = by % 2 == 0;
            let (at, value, code) = match field % 3 {
                0 if lay.v3 => (96, 7 + by, "invalid_refcount_order"),
                0 => (0, 0, ""),
                1 => (20, if low { 8 } else { 22 + by }, "invalid_cluster_bits"),
                _ => (4, if low { 1 } else { 4 + by }, "unsupported_version"),
            };
            if !code.is_empty() {
                put_be(&mut bytes, at, 4, value);
                verdict = Verdicts::OpenOrCheck(code);
            }
        }
    }

    let ctx = || format!("{:?}\n{model:?}", input.known);
    let mut img = match Image::open_with(&bytes[..], Limits::fuzzing()) {
        Ok(img) => img,
        Err(e) => match verdict {
            Verdicts::OpenOrCheck(c) if e.code() == c => return,
            _ => panic!("the image does not open: {e}\n{}", ctx()),
        },
    };
    img.set_backing(Arc::new(RawBacking(backing.clone())));
    let report = crate::checked_reads(&img);
    let codes: Vec<&str> = report.findings.iter().map(|f| f.code).collect();
    let errors: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| f.code)
        .collect();
    match verdict {
        Verdicts::Exactly(v, want) => {
            assert!(
                report.verdict == v && want.iter().all(|c| report.has(c)),
                "verdict {:?} {codes:?}, want {v:?} with {want:?}\n{}",
                report.verdict,
                ctx()
            );
        }
        Verdicts::LeakOrCopied => {
            let only_copied = errors
                .iter()
                .all(|c| [code::LEAKED_CLUSTER, code::COPIED_FLAG_MISMATCH].contains(c));
            assert!(
                report.has(code::LEAKED_CLUSTER)
                    && only_copied
                    && matches!(report.verdict, Verdict::Leaks | Verdict::Corrupt),
                "verdict {:?} {codes:?}, want leaks\n{}",
                report.verdict,
                ctx()
            );
        }
        Verdicts::OpenOrCheck(c) => assert!(
            report.has(c) && matches!(report.verdict, Verdict::Corrupt | Verdict::Invalid),
            "verdict {:?} {codes:?}, want {c}\n{}",
            report.verdict,
            ctx()
        ),
    }
    // Every guest cluster against the model, one read each.
    let mut buf = vec![0u8; cs];
    for (i, want) in expect.iter().enumerate() {
        let got = img.read_at((i * cs) as u64, &mut buf);
        match (want, got) {
            (Expect::Bytes(b), Ok(())) => {
                if let Some(k) = (0..cs).find(|&k| b[k] != buf[k]) {
                    panic!(
                        "guest cluster {i} byte {k:#x}: read {:#04x}, the model says {:#04x}\n{}",
                        buf[k],
                        b[k],
                        ctx()
                    );
                }
            }
            (Expect::Bytes(_), Err(e)) => {
                panic!(
                    "guest cluster {i} fails ({e}), the model has data\n{}",
                    ctx()
                )
            }
            (Expect::Fails(c), Err(e)) => assert_eq!(e.code(), *c, "guest cluster {i}\n{}", ctx()),
            (Expect::Fails(c), Ok(())) => {
                panic!("guest cluster {i} reads, the model says {c}\n{}", ctx())
            }
        }
    }
}
