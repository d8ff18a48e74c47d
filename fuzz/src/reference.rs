//! A second, independent statement of the acceptance rules for the header
//! fields and the table-entry bits: small tables of rules, each written
//! from the specification (qemu/qemu docs/interop/qcow2.rst), from
//! measuring qemu-img 10.0.2 on patched images, or from a stricter rule of
//! SECURITY.md, never from the parser's code. Fields are read here from
//! the raw bytes at the spec's offsets, and entries at the places the spec
//! puts them; the `header` and `tables` targets assert that the parser
//! agrees on accept/refuse (see [`header_agrees`], [`entries_agree`]).
//!
//! Measurements (a 512-byte-cluster v3 image from `qemu-img create`, one
//! field patched, `qemu-img info` / `qemu-img check`): every row marked
//! "measured" made qemu-img refuse to open the image (or, for the
//! data-file-raw row, made `qemu-img check` fail), and the value one below
//! the bound opened: version 1 and 4; cluster_bits 8 and 22;
//! header_length 100 and 520 (106 opens: the spec's "multiple of 8" is
//! ours); refcount_order 7 (6 opens); crypt_method 3; incompatible bit 5;
//! bit 3 with compression type 0, type 1 without bit 3, type 2; extended
//! L2 with 512-byte clusters ("Unsupported subcluster size"); size above
//! 0x3fffffff8000 with 512-byte clusters (2^31 - 1 L1 entries; "Image is
//! too big") and above 2^63 - 1 with 2 MiB clusters; l1_size below the
//! disk's need and above 4 Mi; refcount_table_clusters 0 and above 8 MiB
//! of table; nb_snapshots above 65536; unaligned L1, refcount and
//! snapshot table offsets (the last with no snapshots too); backing file
//! offset above the cluster; backing name above 1023 bytes or past the
//! cluster. Opened although odd: the dirty and corrupt bits, unknown
//! compatible and autoclear bits, tables past the end of the file.

use qcow2_guard::header::Header;
use qcow2_guard::{Error, Image, Policy, Severity, Source};

use crate::WORK;

/// Where a rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// qemu-img 10.0.2 refuses it (measured, see the module docs).
    Measured,
    /// The specification says "must" (QEMU may be laxer).
    Spec,
    /// A deliberate stricter rule of SECURITY.md.
    Stricter,
}

/// The fields of the fixed header, read at the spec's offsets.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw {
    /// Bytes 0..4.
    pub magic: u32,
    /// 4..8.
    pub version: u32,
    /// 8..16.
    pub backing_file_offset: u64,
    /// 16..20.
    pub backing_file_size: u32,
    /// 20..24.
    pub cluster_bits: u32,
    /// 24..32.
    pub size: u64,
    /// 32..36.
    pub crypt_method: u32,
    /// 36..40.
    pub l1_size: u32,
    /// 40..48.
    pub l1_table_offset: u64,
    /// 48..56.
    pub refcount_table_offset: u64,
    /// 56..60.
    pub refcount_table_clusters: u32,
    /// 60..64.
    pub nb_snapshots: u32,
    /// 64..72.
    pub snapshots_offset: u64,
    /// v3: 72..80 (0 in v2).
    pub incompatible: u64,
    /// v3: 80..88.
    pub compatible: u64,
    /// v3: 88..96.
    pub autoclear: u64,
    /// v3: 96..100 (4 in v2).
    pub refcount_order: u32,
    /// v3: 100..104 (72 in v2).
    pub header_length: u32,
    /// v3 with header_length above 104: byte 104 (0 otherwise).
    pub compression_type: u8,
}

fn be(data: &[u8], at: usize, n: usize) -> u64 {
    data.get(at..at + n)
        .map_or(0, |b| b.iter().fold(0u64, |v, &x| v << 8 | u64::from(x)))
}

impl Raw {
    /// The fields of `data`, or `None` when it is shorter than the fixed
    /// header of its version (72 bytes; 104 for version 3).
    pub fn read(data: &[u8]) -> Option<Raw> {
        if data.len() < 72 {
            return None;
        }
        let u32_at = |at| be(data, at, 4) as u32;
        let mut r = Raw {
            magic: u32_at(0),
            version: u32_at(4),
            backing_file_offset: be(data, 8, 8),
            backing_file_size: u32_at(16),
            cluster_bits: u32_at(20),
            size: be(data, 24, 8),
            crypt_method: u32_at(32),
            l1_size: u32_at(36),
            l1_table_offset: be(data, 40, 8),
            refcount_table_offset: be(data, 48, 8),
            refcount_table_clusters: u32_at(56),
            nb_snapshots: u32_at(60),
            snapshots_offset: be(data, 64, 8),
            refcount_order: 4,
            header_length: 72,
            ..Raw::default()
        };
        if r.version == 3 {
            if data.len() < 104 {
                return None;
            }
            r.incompatible = be(data, 72, 8);
            r.compatible = be(data, 80, 8);
            r.autoclear = be(data, 88, 8);
            r.refcount_order = u32_at(96);
            r.header_length = u32_at(100);
            if r.header_length > 104 {
                r.compression_type = data.get(104).copied().unwrap_or(0);
            }
        }
        Some(r)
    }

    fn v3(&self) -> bool {
        self.version == 3
    }

    fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }

    fn extended_l2(&self) -> bool {
        self.incompatible & 1 << 4 != 0
    }

    /// Guest bytes one L2 table maps.
    fn l2_span(&self) -> u128 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        u128::from(self.cluster_size()) * u128::from(self.cluster_size() / entry)
    }

    /// L1 entries the virtual disk needs.
    fn l1_needed(&self) -> u128 {
        u128::from(self.size).div_ceil(self.l2_span())
    }
}

/// One rule: refused when `broken` holds.
pub struct Rule {
    /// What it says.
    pub name: &'static str,
    /// Where it comes from.
    pub source: Origin,
    /// Whether the header breaks it (only called when the rules above it
    /// hold: cluster_bits is in range from the third row on).
    pub broken: fn(&Raw) -> bool,
}

const I64_MAX: u128 = i64::MAX as u128;

/// `offset + bytes` past `i64::MAX`, or `offset` not cluster aligned
/// (QEMU's check of every table offset).
fn bad_table(r: &Raw, offset: u64, bytes: u128) -> bool {
    !offset.is_multiple_of(r.cluster_size()) || u128::from(offset) + bytes > I64_MAX
}

/// The header rules, in the order QEMU applies them (the order matters
/// only for which rule is named).
pub const HEADER_RULES: &[Rule] = &[
    Rule {
        name: "magic is QFI\\xfb",
        source: Origin::Measured,
        broken: |r| r.magic != 0x5146_49fb,
    },
    Rule {
        name: "version is 2 or 3",
        source: Origin::Measured,
        broken: |r| r.version != 2 && r.version != 3,
    },
    Rule {
        name: "cluster_bits in 9..=21",
        source: Origin::Measured,
        broken: |r| !(9..=21).contains(&r.cluster_bits),
    },
    Rule {
        name: "v3 header_length at least 104",
        source: Origin::Measured,
        broken: |r| r.v3() && r.header_length < 104,
    },
    Rule {
        name: "v3 header_length a multiple of 8",
        source: Origin::Spec,
        broken: |r| r.v3() && r.header_length % 8 != 0,
    },
    Rule {
        name: "v3 header_length within the first cluster",
        source: Origin::Measured,
        broken: |r| r.v3() && u64::from(r.header_length) > r.cluster_size(),
    },
    Rule {
        name: "backing file offset within the first cluster",
        source: Origin::Measured,
        broken: |r| r.backing_file_offset > r.cluster_size(),
    },
    Rule {
        name: "unknown incompatible bits (5..63) clear",
        source: Origin::Measured,
        broken: |r| r.incompatible & !0x1f != 0,
    },
    Rule {
        name: "corrupt bit clear",
        source: Origin::Stricter,
        broken: |r| r.incompatible & 1 << 1 != 0,
    },
    Rule {
        name: "refcount_order at most 6",
        source: Origin::Measured,
        broken: |r| r.refcount_order > 6,
    },
    Rule {
        name: "compression type 0 or 1",
        source: Origin::Measured,
        broken: |r| r.compression_type > 1,
    },
    Rule {
        name: "incompatible bit 3 set iff compression type is not 0",
        source: Origin::Measured,
        broken: |r| (r.incompatible & 1 << 3 != 0) != (r.compression_type != 0),
    },
    Rule {
        name: "extended L2 needs clusters of 16 KiB or more",
        source: Origin::Measured,
        broken: |r| r.extended_l2() && r.cluster_bits < 14,
    },
    Rule {
        name: "crypt_method 0, 1 or 2",
        source: Origin::Measured,
        broken: |r| r.crypt_method > 2,
    },
    Rule {
        name: "autoclear bit 1 (raw data file) needs incompatible bit 2",
        source: Origin::Measured,
        broken: |r| r.autoclear & 1 << 1 != 0 && r.incompatible & 1 << 2 == 0,
    },
    Rule {
        name: "virtual size at most 2^63 - 1, and 2^31 - 1 L1 entries map it",
        source: Origin::Measured,
        broken: |r| u128::from(r.size) > I64_MAX || r.l1_needed() > 0x7fff_ffff,
    },
    Rule {
        name: "l1_size covers the disk",
        source: Origin::Measured,
        broken: |r| u128::from(r.l1_size) < r.l1_needed(),
    },
    Rule {
        name: "l1_size at most 4 Mi entries",
        source: Origin::Measured,
        broken: |r| r.l1_size > 4 << 20,
    },
    Rule {
        name: "L1 table offset aligned, table below 2^63",
        source: Origin::Measured,
        broken: |r| bad_table(r, r.l1_table_offset, u128::from(r.l1_size) * 8),
    },
    Rule {
        name: "refcount table present",
        source: Origin::Measured,
        broken: |r| r.refcount_table_clusters == 0,
    },
    Rule {
        name: "refcount table at most 8 MiB",
        source: Origin::Measured,
        broken: |r| u64::from(r.refcount_table_clusters) * r.cluster_size() > 8 << 20,
    },
    Rule {
        name: "refcount table offset aligned, table below 2^63",
        source: Origin::Measured,
        broken: |r| {
            let bytes = u128::from(r.refcount_table_clusters) * u128::from(r.cluster_size());
            bad_table(r, r.refcount_table_offset, bytes)
        },
    },
    Rule {
        name: "at most 65536 snapshots",
        source: Origin::Measured,
        broken: |r| r.nb_snapshots > 65536,
    },
    Rule {
        name: "snapshot table offset aligned (with no snapshots too), below 2^63",
        source: Origin::Measured,
        broken: |r| bad_table(r, r.snapshots_offset, 0),
    },
    Rule {
        name: "backing file name at most 1023 bytes, inside the first cluster",
        source: Origin::Measured,
        broken: |r| {
            r.backing_file_offset != 0
                && (r.backing_file_size > 1023
                    || r.backing_file_offset + u64::from(r.backing_file_size) > r.cluster_size())
        },
    },
    Rule {
        name: "backing file name not inside the header",
        source: Origin::Stricter,
        broken: |r| {
            r.backing_file_offset != 0 && r.backing_file_offset < u64::from(r.header_length)
        },
    },
];

/// What the reference says of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// Every rule holds.
    Accept,
    /// The first rule broken.
    Refuse(&'static str),
    /// Outside what the reference states (an input too short for its
    /// header, or a snapshot table ending within 64 MiB of 2^63, whose
    /// entry size the header does not give).
    Unjudged,
}

/// Judge the header at the start of `data` (tables are not compared
/// with the file's length: that is [`entries_agree`]'s side).
pub fn judge_header(data: &[u8]) -> Judgement {
    let Some(r) = Raw::read(data) else {
        return Judgement::Unjudged;
    };
    if r.v3() && (data.len() as u64) < u64::from(r.header_length).min(r.cluster_size()) {
        return Judgement::Unjudged;
    }
    for rule in HEADER_RULES {
        if (rule.broken)(&r) {
            return Judgement::Refuse(rule.name);
        }
    }
    if r.nb_snapshots > 0 && u128::from(r.snapshots_offset) + (64 << 20) > I64_MAX {
        return Judgement::Unjudged;
    }
    Judgement::Accept
}

/// The policy the reference is compared under: backing files, data files,
/// encryption and any virtual size allowed (what is left refuses what
/// QEMU refuses, or is stricter on purpose).
pub fn open_policy() -> Policy {
    Policy {
        allow_backing: true,
        allow_data_file: true,
        allow_encryption: true,
        max_virtual_size: u64::MAX,
    }
}

/// The parser's answer for a header: decoded, validated against an
/// unbounded file with the default (QEMU's) limits, and no error from
/// [`open_policy`]. `Err` holds the code.
pub fn parser_accepts(data: &[u8]) -> Result<(), String> {
    use qcow2_guard::extensions::Extensions;
    use qcow2_guard::Limits;
    let h = Header::decode(data).map_err(|e| e.code().to_owned())?;
    let g = h
        .validate(u64::MAX, &Limits::default())
        .map_err(|e| e.code().to_owned())?;
    let first = &data[..data.len().min(g.cluster_size as usize)];
    let ext = Extensions::decode(&h, first).unwrap_or_default();
    match open_policy()
        .evaluate(&h, &ext)
        .into_iter()
        .find(|f| f.severity == Severity::Error)
    {
        Some(f) => Err(f.code.to_owned()),
        None => Ok(()),
    }
}

/// The `header` target's acceptance oracle: the reference and the parser
/// agree on accept/refuse, except that the parser may refuse tables that
/// overlap each other or the header (`metadata_overlap`: QEMU opens an
/// image whose L1 table is at offset 0; the reference does not state
/// where tables may lie).
pub fn header_agrees(data: &[u8]) {
    let parser = parser_accepts(data);
    match judge_header(data) {
        Judgement::Unjudged => {}
        Judgement::Accept => assert!(
            parser
                .as_ref()
                .map_or_else(|c| c == "metadata_overlap", |()| true),
            "the reference accepts the header, the parser refuses it: {parser:?}"
        ),
        Judgement::Refuse(rule) => assert!(
            parser.is_err(),
            "the parser accepts a header that breaks \"{rule}\""
        ),
    }
}

/// Bits of a host offset in L1, L2 and refcount table entries (9..55).
const OFFSET_BITS: u64 = 0x00ff_ffff_ffff_fe00;

/// What the reference says of one table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Its bits are valid.
    Valid,
    /// It breaks this rule.
    Invalid(&'static str),
    /// Not stated here (a compressed descriptor's range: the decompress
    /// target's).
    Unjudged,
}

/// An L1 entry (spec: bits 0..8 and 56..62 reserved, bits 9..55 the L2
/// table's offset, cluster aligned; SECURITY.md: flag bits with offset 0
/// refused, as `qemu-img check` walks cluster 0 as an L2 table).
pub fn judge_l1(raw: u64, cluster_size: u64) -> Entry {
    let off = raw & OFFSET_BITS;
    if raw & 0x7f00_0000_0000_01ff != 0 {
        Entry::Invalid("L1 reserved bits (0..8, 56..62) clear")
    } else if !off.is_multiple_of(cluster_size) {
        Entry::Invalid("L2 table offset cluster aligned")
    } else if off == 0 && raw != 0 {
        Entry::Invalid("no flags on an unallocated L1 entry")
    } else {
        Entry::Valid
    }
}

/// An L2 entry, with its subcluster bitmap when L2 entries are extended.
/// Spec: bit 62 compressed, bit 63 copied (never with compressed); a
/// standard entry has bits 1..8 and 56..61 reserved (bit 0 too with
/// extended L2 and in version 2: "always 0"), and a cluster-aligned host
/// offset in bits 9..55; a compressed entry has an all-zero bitmap and
/// cannot exist with an external data file; a subcluster is never both
/// allocated and zero, and none is allocated without a host cluster.
pub fn judge_l2(
    raw: u64,
    bitmap: Option<u64>,
    cluster_size: u64,
    v3: bool,
    data_file: bool,
) -> Entry {
    let copied = raw & 1 << 63 != 0;
    if raw & 1 << 62 != 0 {
        return if copied {
            Entry::Invalid("no copied flag on a compressed entry")
        } else if bitmap.is_some_and(|b| b != 0) {
            Entry::Invalid("zero subcluster bitmap on a compressed entry")
        } else if data_file {
            Entry::Invalid("no compressed cluster with an external data file")
        } else {
            Entry::Unjudged
        };
    }
    // Bit 0 with extended L2 is reserved. In version 2 the spec says
    // "always 0" too, but there the parser's rule is the check's
    // (`zero_flag_in_v2`), not the entry's: not judged here.
    if !v3 && bitmap.is_none() && raw & 1 != 0 {
        return Entry::Unjudged;
    }
    let mut reserved = 0x3f00_0000_0000_01fe;
    if bitmap.is_some() {
        reserved |= 1;
    }
    let off = raw & OFFSET_BITS;
    if raw & reserved != 0 {
        return Entry::Invalid("L2 reserved bits clear");
    }
    if !off.is_multiple_of(cluster_size) {
        return Entry::Invalid("host offset cluster aligned");
    }
    if let Some(b) = bitmap {
        let (alloc, zero) = (b & 0xffff_ffff, b >> 32);
        if alloc & zero != 0 {
            return Entry::Invalid("no subcluster both allocated and zero");
        }
        let host = off != 0 || data_file && copied;
        if alloc != 0 && !host {
            return Entry::Invalid("no allocated subcluster without a host cluster");
        }
    }
    Entry::Valid
}

/// A refcount table entry (spec: bits 0..8 reserved, the block's offset
/// cluster aligned).
pub fn judge_refcount_entry(raw: u64, cluster_size: u64) -> Entry {
    if raw & 0x1ff != 0 {
        Entry::Invalid("refcount table reserved bits (0..8) clear")
    } else if !raw.is_multiple_of(cluster_size) {
        Entry::Invalid("refcount block offset cluster aligned")
    } else {
        Entry::Valid
    }
}

/// Codes the parser may refuse a valid entry with: rules about where the
/// entry points (past the file, into other metadata, beyond the caller's
/// limits), which this reference does not state.
const LOCATION_CODES: &[&str] = &[
    "past_eof",
    "metadata_overlap",
    "limit_exceeded",
    "too_large",
    "offset_overflow",
    "io_error",
    "data_file_required",
    "truncated",
];

fn agree(what: &str, at: u64, raw: u64, reference: Entry, parser: Result<(), &Error>) {
    match (reference, parser) {
        (Entry::Unjudged, _) | (Entry::Valid, Ok(())) | (Entry::Invalid(_), Err(_)) => {}
        (Entry::Invalid(rule), Ok(())) => {
            panic!("{what} {raw:#018x} at {at:#x} breaks \"{rule}\", the parser accepts it")
        }
        (Entry::Valid, Err(e)) => assert!(
            LOCATION_CODES.contains(&e.code()),
            "{what} {raw:#018x} at {at:#x} is valid, the parser refuses it: {e}"
        ),
    }
}

/// The `tables` target's acceptance oracle on an image the parser opened
/// from `data`: the reference accepts its header (see [`judge_header`]),
/// and agrees with the parser on every active L1 entry, the L2 entries of
/// the tables they point to and every refcount table entry, read here
/// from `data` at the places the spec gives (at most [`WORK`] entries).
pub fn entries_agree<S: Source>(img: &Image<S>, data: &[u8]) {
    if let Judgement::Refuse(rule) = judge_header(data) {
        // Opening does not apply the policy: the refusal may be its.
        let refused = img
            .policy_findings(&open_policy())
            .iter()
            .any(|f| f.severity == Severity::Error);
        assert!(
            refused,
            "the parser opens an image whose header breaks \"{rule}\""
        );
    }
    let Some(r) = Raw::read(data) else { return };
    let cs = r.cluster_size();
    let data_file = r.incompatible & 1 << 2 != 0;
    let extended = r.extended_l2();
    let at_u64 = |at: u64| -> Option<u64> {
        let i = usize::try_from(at).ok()?;
        data.get(i..i.checked_add(8)?).map(|_| be(data, i, 8))
    };
    let mut work = WORK;
    for i in 0..u64::from(r.l1_size) {
        let at = r.l1_table_offset + i * 8;
        let Some(raw) = at_u64(at) else { break };
        work = work.saturating_sub(1);
        if work == 0 {
            return;
        }
        let reference = judge_l1(raw, cs);
        let parser = img.l1_entry(i);
        agree("L1 entry", at, raw, reference, parser.as_ref().map(|_| ()));
        let off = raw & OFFSET_BITS;
        if reference != Entry::Valid || off == 0 || parser.is_err() {
            continue;
        }
        let Ok(table) = img.l2_table(off, at) else {
            continue;
        };
        let g = img.geometry();
        let per = if extended { 16 } else { 8 };
        // The parser's table holds the cluster's words as they are: one
        // entry per `per` bytes, each the file's bytes at its offset.
        assert_eq!(
            table.len() as u64,
            cs / per,
            "L2 table at {off:#x}: entries"
        );
        assert!(!table.is_empty());
        assert_eq!(
            table.memory() as u64,
            cs,
            "L2 table at {off:#x}: bytes held"
        );
        let mut words = table.entries();
        for j in 0..cs / per {
            let e_at = off + j * per;
            let (Some(raw), bitmap) = (at_u64(e_at), extended.then(|| at_u64(e_at + 8))) else {
                break;
            };
            let Some(bitmap) = bitmap.map_or(Some(None), |b| b.map(Some)) else {
                break;
            };
            assert_eq!(
                words.next(),
                Some((raw, bitmap, e_at)),
                "the parser's L2 table at {off:#x}, entry {j}"
            );
            work = work.saturating_sub(1);
            if work == 0 {
                return;
            }
            let Some(parser) = table.entry(j as usize, g, data_file) else {
                panic!("the parser's L2 table at {off:#x} has no entry {j}");
            };
            let reference = judge_l2(raw, bitmap, cs, r.v3(), data_file);
            agree(
                "L2 entry",
                e_at,
                raw,
                reference,
                parser.as_ref().map(|_| ()),
            );
        }
    }
    let entries = u64::from(r.refcount_table_clusters) * cs / 8;
    for i in 0..entries.min(work) {
        let at = r.refcount_table_offset + i * 8;
        let Some(raw) = at_u64(at) else { break };
        let parser = img.refcount_block_offset(i);
        agree(
            "refcount table entry",
            at,
            raw,
            judge_refcount_entry(raw, cs),
            parser.as_ref().map(|_| ()),
        );
    }
}
