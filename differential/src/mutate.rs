//! Structure-aware mutations: field-level edits chosen by what the field
//! is (offsets re-pointed at other structures, counts at edges, flag and
//! reserved bits set, compressed descriptors and payload bytes changed),
//! plus a few plain byte flips and truncations.

use crate::locate::{Field, Kind, Layout};

/// A small, seedable PRNG (splitmix64): the same seed gives the same
/// mutants on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        v.get(usize::try_from(self.below(v.len() as u64)).ok()?)
    }
}

/// One applied mutation, printable.
#[derive(Debug, Clone)]
pub struct Mutation {
    pub what: String,
    pub at: u64,
    pub old: u64,
    pub new: u64,
    pub width: u64,
}

impl std::fmt::Display for Mutation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.width == 0 {
            write!(
                f,
                "{} (file length {:#x} -> {:#x})",
                self.what, self.old, self.new
            )
        } else {
            write!(
                f,
                "{} at {:#x} ({} bytes): {:#x} -> {:#x}",
                self.what, self.at, self.width, self.old, self.new
            )
        }
    }
}

fn get(b: &[u8], at: u64, w: u64) -> u64 {
    let (Ok(at), Ok(w)) = (usize::try_from(at), usize::try_from(w)) else {
        return 0;
    };
    b.get(at..at.saturating_add(w))
        .map_or(0, |s| s.iter().fold(0u64, |v, &x| v << 8 | u64::from(x)))
}

fn put(b: &mut [u8], at: u64, w: u64, v: u64) -> bool {
    let (Ok(at), Ok(w)) = (usize::try_from(at), usize::try_from(w)) else {
        return false;
    };
    let Some(s) = b.get_mut(at..at.saturating_add(w)) else {
        return false;
    };
    for (i, x) in s.iter_mut().enumerate() {
        let shift = (w - 1 - i) * 8;
        *x = (v >> shift) as u8;
    }
    true
}

fn mask(width: u64) -> u64 {
    if width >= 8 {
        u64::MAX
    } else {
        (1u64 << (width * 8)) - 1
    }
}

/// A new value for a field of `kind` holding `old`.
fn edit(r: &mut Rng, f: &Field, old: u64, l: &Layout, file_len: u64) -> (String, u64) {
    let cs = l.cluster_size;
    let target = r.pick(&l.targets).copied().unwrap_or(0);
    let bit = |r: &mut Rng, n: u64| 1u64 << r.below(n);
    let m = mask(f.width);
    let (how, v) = match f.kind {
        Kind::Offset | Kind::Pointer => match r.below(12) {
            0 => ("zero", 0),
            1 => (
                "re-point at another structure",
                (old & !0x00ff_ffff_ffff_fe00) | target,
            ),
            2 => (
                "re-point, keep flags",
                (old & 0xff00_0000_0000_01ff) | target,
            ),
            3 => ("+512 (unaligned)", old.wrapping_add(512)),
            4 => ("+1 cluster", old.wrapping_add(cs)),
            5 => ("-1 cluster", old.wrapping_sub(cs)),
            6 => ("file end", file_len.next_multiple_of(cs)),
            7 => (
                "set a flag or reserved bit (56..63)",
                old | 1u64 << (56 + r.below(8)),
            ),
            8 => ("set a low reserved bit (0..8)", old | bit(r, 9)),
            9 => ("huge offset", 1u64 << (40 + r.below(24))),
            10 => ("copied flag only", 1 << 63),
            _ => ("flip a bit", old ^ bit(r, 64)),
        },
        Kind::L2 => match r.below(16) {
            0 => ("zero", 0),
            1 => ("re-point data", (old & 0xff00_0000_0000_01ff) | target),
            2 => ("set zero flag (bit 0)", old | 1),
            3 => ("set compressed flag (bit 62)", old | 1 << 62),
            4 => ("clear compressed flag", old & !(1 << 62)),
            5 => ("toggle copied flag (bit 63)", old ^ 1 << 63),
            6 => ("set a reserved bit (1..8)", old | 1 << (1 + r.below(8))),
            7 => ("set a reserved bit (56..61)", old | 1 << (56 + r.below(6))),
            8 => (
                "descriptor: +1 sector count bit",
                old.wrapping_add(1u64 << (62 - (cs.trailing_zeros() as u64 - 8))),
            ),
            9 => ("descriptor: offset +1", old.wrapping_add(1)),
            10 => ("descriptor: offset -1", old.wrapping_sub(1)),
            11 => ("descriptor: offset +512", old.wrapping_add(512)),
            12 => ("+1 cluster", old.wrapping_add(cs)),
            13 => ("copied flag only", 1 << 63),
            14 => (
                "past the file end",
                (old & 0xff00_0000_0000_01ff) | file_len.next_multiple_of(cs).wrapping_add(cs),
            ),
            _ => ("flip a bit", old ^ bit(r, 64)),
        },
        Kind::SubclusterBitmap => match r.below(6) {
            0 => ("zero", 0),
            1 => ("all allocated", 0xffff_ffff),
            2 => ("all zero", 0xffff_ffff_0000_0000),
            3 => (
                "allocated and zero overlap",
                old | (old & 0xffff_ffff) << 32 | 1 | 1 << 32,
            ),
            4 => ("flip an allocation bit", old ^ bit(r, 32)),
            _ => ("flip a zero bit", old ^ bit(r, 32) << 32),
        },
        Kind::Refcount { bits } => {
            let w = u64::from(bits.min(64));
            match r.below(5) {
                0 => ("zero", 0),
                1 => ("+1", old.wrapping_add(1)),
                2 => ("-1", old.wrapping_sub(1)),
                3 => ("all ones", u64::MAX),
                _ => ("flip a bit", old ^ bit(r, w.clamp(8, 64))),
            }
        }
        Kind::Count => match r.below(10) {
            0 => ("zero", 0),
            1 => ("+1", old.wrapping_add(1)),
            2 => ("-1", old.wrapping_sub(1)),
            3 => ("max", u64::MAX),
            4 => ("double", old.wrapping_mul(2)),
            5 => ("+511", old.wrapping_add(511)),
            6 => ("x cluster size", old.wrapping_mul(cs)),
            7 => ("power of two", 1u64 << r.below(f.width * 8)),
            8 => ("+8", old.wrapping_add(8)),
            _ => ("flip a bit", old ^ bit(r, f.width * 8)),
        },
        Kind::Bits | Kind::Payload { .. } => match r.below(6) {
            0 => ("zero", 0),
            1 => ("+1", old.wrapping_add(1)),
            2 => ("-1", old.wrapping_sub(1)),
            3 => ("all ones", u64::MAX),
            _ => ("flip a bit", old ^ bit(r, f.width.min(8) * 8)),
        },
    };
    (how.to_string(), v & m)
}

/// Byte edits inside a compressed payload: the stream's head (zstd frame
/// header descriptor, window descriptor; deflate block headers), its
/// tail (zstd content checksum: the last non-zero bytes), or anywhere.
fn payload_edit(r: &mut Rng, b: &mut [u8], f: &Field, zstd: bool) -> Option<Mutation> {
    let len = f.width;
    if len == 0 {
        return None;
    }
    let slice = b.get(usize::try_from(f.at).ok()?..usize::try_from(f.at + len).ok()?)?;
    let last_nz = slice.iter().rposition(|&x| x != 0).unwrap_or(0) as u64;
    let (where_, off) = match r.below(4) {
        0 if zstd => ("zstd frame header byte", 4 + r.below(4)),
        0 => ("deflate head byte", r.below(4)),
        1 => ("stream tail byte", last_nz.saturating_sub(r.below(8))),
        2 => (
            "byte after the stream end",
            (last_nz + 1 + r.below(8)).min(len - 1),
        ),
        _ => ("payload byte", r.below(len)),
    };
    let at = f.at + off.min(len - 1);
    let old = get(b, at, 1);
    let new = match r.below(3) {
        0 => old ^ (1 << r.below(8)),
        1 => r.below(256),
        _ => old ^ 0xff,
    };
    put(b, at, 1, new);
    Some(Mutation {
        what: format!("{}: {where_}", f.name),
        at,
        old,
        new,
        width: 1,
    })
}

/// Apply one to three mutations to `b` (a copy of a seed image).
pub fn mutate(r: &mut Rng, b: &mut Vec<u8>, l: &Layout) -> Vec<Mutation> {
    let n = match r.below(10) {
        0..=5 => 1,
        6..=8 => 2,
        _ => 3,
    };
    let mut out = Vec::new();
    for _ in 0..n {
        let file_len = b.len() as u64;
        // Mostly fields; a few blind byte flips and length changes.
        let roll = r.below(100);
        if roll < 4 {
            let at = r.below(file_len);
            let old = get(b, at, 1);
            let new = old ^ (1 << r.below(8));
            put(b, at, 1, new);
            out.push(Mutation {
                what: "random byte flip".into(),
                at,
                old,
                new,
                width: 1,
            });
            continue;
        }
        if roll < 7 {
            let cut = match r.below(3) {
                0 => file_len.saturating_sub(1 + r.below(600)),
                1 => file_len.saturating_sub(l.cluster_size),
                _ => file_len + 1 + r.below(4096),
            };
            b.resize(usize::try_from(cut).unwrap_or(0), 0);
            out.push(Mutation {
                what: "file length".into(),
                at: 0,
                old: file_len,
                new: cut,
                width: 0,
            });
            continue;
        }
        // Payloads and L2 entries are many; pick the kind first so that
        // header and table fields get their share.
        let kinds: [fn(&Kind) -> bool; 6] = [
            |k| matches!(k, Kind::Offset | Kind::Count | Kind::Bits),
            |k| matches!(k, Kind::Pointer),
            |k| matches!(k, Kind::L2 | Kind::SubclusterBitmap),
            |k| matches!(k, Kind::Refcount { .. }),
            |k| matches!(k, Kind::Payload { .. }),
            |k| matches!(k, Kind::L2),
        ];
        let Some(want) = r.pick(&kinds) else { continue };
        let pool: Vec<&Field> = l.fields.iter().filter(|f| want(&f.kind)).collect();
        let Some(f) = r.pick(&pool).copied() else {
            continue;
        };
        if let Kind::Payload { zstd } = f.kind {
            if let Some(m) = payload_edit(r, b, f, zstd) {
                out.push(m);
            }
            continue;
        }
        let old = get(b, f.at, f.width);
        let (how, new) = edit(r, f, old, l, file_len);
        if put(b, f.at, f.width, new) {
            out.push(Mutation {
                what: format!("{}: {how}", f.name),
                at: f.at,
                old,
                new,
                width: f.width,
            });
        }
    }
    out
}
