//! Where the fields of a valid image are. This is the only format
//! knowledge of the engine, and it goes no further than locating: which
//! bytes hold the header fields, extension records, L1/L2/refcount
//! entries, snapshot and bitmap table fields, compressed descriptors and
//! payloads. Nothing here judges a value; qcow2-guard and qemu-img do that.

/// What a located field is, which decides the edits tried on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A header or table field holding a host offset.
    Offset,
    /// A size or count.
    Count,
    /// A feature bit mask or an enumerated value (version, crypt method,
    /// compression type, refcount order, cluster bits...).
    Bits,
    /// An L1 entry, refcount table entry or bitmap table entry: a host
    /// pointer with flag and reserved bits.
    Pointer,
    /// A standard L2 entry (data, zero, compressed descriptor).
    L2,
    /// The subcluster bitmap word of an extended L2 entry.
    SubclusterBitmap,
    /// A refcount block entry of `bits` bits (sub-byte widths are edited
    /// through the byte that holds them).
    Refcount { bits: u32 },
    /// Compressed payload bytes (`zstd` says which compression).
    Payload { zstd: bool },
}

/// One located field.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub at: u64,
    /// Bytes: 1, 2, 4 or 8 (payloads: the range length).
    pub width: u64,
    pub kind: Kind,
}

/// The located image.
#[derive(Debug, Default)]
pub struct Layout {
    pub fields: Vec<Field>,
    pub cluster_size: u64,
    /// Host offsets of metadata and data clusters, for re-pointing.
    pub targets: Vec<u64>,
    /// The internal snapshots' IDs (whose data `convert -l` reads).
    pub snapshot_ids: Vec<String>,
}

fn be(b: &[u8], at: u64, n: u64) -> u64 {
    let (Ok(at), Ok(n)) = (usize::try_from(at), usize::try_from(n)) else {
        return 0;
    };
    b.get(at..at.saturating_add(n))
        .map_or(0, |s| s.iter().fold(0u64, |v, &x| v << 8 | u64::from(x)))
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

impl Layout {
    fn add(&mut self, name: impl Into<String>, at: u64, width: u64, kind: Kind) {
        self.fields.push(Field {
            name: name.into(),
            at,
            width,
            kind,
        });
    }

    /// [`Layout::add`] each `(name, at, width, kind)`.
    fn add_all(&mut self, fields: &[(&str, u64, u64, Kind)]) {
        for &(name, at, width, kind) in fields {
            self.add(name, at, width, kind);
        }
    }

    /// Locate the fields of `b`, a valid image made by qemu-img.
    pub fn of(b: &[u8]) -> Layout {
        let mut l = Layout::default();
        let version = be(b, 4, 4);
        let cluster_bits = be(b, 20, 4).clamp(9, 21);
        let cs = 1u64 << cluster_bits;
        l.cluster_size = cs;
        use Kind::*;
        l.add_all(&[
            ("header.version", 4, 4, Bits),
            ("header.backing_file_offset", 8, 8, Offset),
            ("header.backing_file_size", 16, 4, Count),
            ("header.cluster_bits", 20, 4, Bits),
            ("header.size", 24, 8, Count),
            ("header.crypt_method", 32, 4, Bits),
            ("header.l1_size", 36, 4, Count),
            ("header.l1_table_offset", 40, 8, Offset),
            ("header.refcount_table_offset", 48, 8, Offset),
            ("header.refcount_table_clusters", 56, 4, Count),
            ("header.nb_snapshots", 60, 4, Count),
            ("header.snapshots_offset", 64, 8, Offset),
        ]);
        let mut ext_start = 72;
        let mut incompat = 0;
        if version >= 3 {
            l.add_all(&[
                ("header.incompatible_features", 72, 8, Bits),
                ("header.compatible_features", 80, 8, Bits),
                ("header.autoclear_features", 88, 8, Bits),
                ("header.refcount_order", 96, 4, Bits),
                ("header.header_length", 100, 4, Count),
                ("header.compression_type", 104, 1, Bits),
            ]);
            ext_start = be(b, 100, 4);
            incompat = be(b, 72, 8);
        }
        let extended = incompat & (1 << 4) != 0;
        let zstd = version >= 3 && be(b, 104, 1) == 1;
        let refcount_order = if version >= 3 { be(b, 96, 4).min(6) } else { 4 };

        // Header extensions.
        let mut at = ext_start;
        let mut bitmaps_ext = None;
        for i in 0..64 {
            if at.saturating_add(8) > cs {
                break;
            }
            let ty = be(b, at, 4);
            let len = be(b, at.saturating_add(4), 4);
            l.add(format!("ext[{i}].type"), at, 4, Bits);
            l.add(format!("ext[{i}].length"), at.saturating_add(4), 4, Count);
            if ty == 0 {
                break;
            }
            let data = at.saturating_add(8);
            match ty {
                0x2385_2875 => {
                    l.add("ext.bitmaps.nb_bitmaps", data, 4, Count);
                    l.add("ext.bitmaps.reserved", data.saturating_add(4), 4, Bits);
                    l.add(
                        "ext.bitmaps.directory_size",
                        data.saturating_add(8),
                        8,
                        Count,
                    );
                    l.add(
                        "ext.bitmaps.directory_offset",
                        data.saturating_add(16),
                        8,
                        Offset,
                    );
                    bitmaps_ext = Some((be(b, data, 4), be(b, data.saturating_add(16), 8)));
                }
                0x6803_f857 => {
                    for e in 0..len / 48 {
                        let f = data.saturating_add(e.saturating_mul(48));
                        l.add(format!("ext.feature_name[{e}].type"), f, 1, Bits);
                        l.add(
                            format!("ext.feature_name[{e}].bit"),
                            f.saturating_add(1),
                            1,
                            Bits,
                        );
                    }
                }
                _ => {}
            }
            at = data.saturating_add(len.next_multiple_of(8));
        }

        l.targets
            .extend([0, cs, be(b, 40, 8), be(b, 48, 8), be(b, 64, 8)]);
        l.targets.push(b.len() as u64);

        // Refcount table and blocks.
        let rt = be(b, 48, 8);
        let rt_bytes = be(b, 56, 4).saturating_mul(cs).min(1 << 20);
        let refcount_bits = 1u32 << refcount_order;
        for i in 0..rt_bytes / 8 {
            let e_at = rt.saturating_add(i * 8);
            let e = be(b, e_at, 8);
            if e == 0 {
                continue;
            }
            l.add(format!("refcount_table[{i}]"), e_at, 8, Pointer);
            let block = e & !0x1ff;
            l.targets.push(block);
            // Entries of clusters inside the file (at most 512 per block);
            // sub-byte widths are edited through the byte holding them.
            let entries = cs.saturating_mul(8) / u64::from(refcount_bits);
            let used = (b.len() as u64 / cs + 1).min(entries).min(512);
            let width = u64::from((refcount_bits / 8).max(1));
            let bytes = if refcount_bits >= 8 {
                used
            } else {
                (used * u64::from(refcount_bits)).div_ceil(8)
            };
            for j in 0..bytes {
                l.add(
                    format!("refcount_block[{i}][{j}]"),
                    block.saturating_add(j.saturating_mul(width)),
                    width,
                    Refcount {
                        bits: refcount_bits,
                    },
                );
            }
        }

        // Active L1/L2, then snapshot L1/L2.
        let mut l1s = vec![("l1".to_string(), be(b, 40, 8), be(b, 36, 4))];
        let nb_snap = be(b, 60, 4).min(64);
        let mut sn = be(b, 64, 8);
        for s in 0..nb_snap {
            let p = |name: &str| format!("snapshot[{s}].{name}");
            l.add(p("l1_table_offset"), sn, 8, Offset);
            l.add(p("l1_size"), sn.saturating_add(8), 4, Count);
            l.add(p("id_str_size"), sn.saturating_add(12), 2, Count);
            l.add(p("name_size"), sn.saturating_add(14), 2, Count);
            l.add(p("date_sec"), sn.saturating_add(16), 4, Count);
            l.add(p("vm_state_size"), sn.saturating_add(32), 4, Count);
            l.add(p("extra_data_size"), sn.saturating_add(36), 4, Count);
            let extra = be(b, sn.saturating_add(36), 4);
            if extra >= 8 {
                l.add(
                    p("extra.vm_state_size_large"),
                    sn.saturating_add(40),
                    8,
                    Count,
                );
            }
            if extra >= 16 {
                l.add(p("extra.disk_size"), sn.saturating_add(48), 8, Count);
            }
            if extra >= 24 {
                l.add(p("extra.icount"), sn.saturating_add(56), 8, Count);
            }
            l1s.push((
                format!("snapshot[{s}].l1"),
                be(b, sn, 8),
                be(b, sn.saturating_add(8), 4),
            ));
            l.targets.push(be(b, sn, 8));
            let id = be(b, sn.saturating_add(12), 2);
            let name = be(b, sn.saturating_add(14), 2);
            let id_at = sn.saturating_add(40).saturating_add(extra);
            if let (Ok(from), Ok(to)) = (
                usize::try_from(id_at),
                usize::try_from(id_at.saturating_add(id)),
            ) {
                if let Some(text) = b.get(from..to) {
                    l.snapshot_ids
                        .push(String::from_utf8_lossy(text).into_owned());
                }
            }
            sn = sn
                .saturating_add(40)
                .saturating_add(extra)
                .saturating_add(id)
                .saturating_add(name)
                .next_multiple_of(8);
        }
        let entry_bytes = if extended { 16 } else { 8 };
        let count_bits = u32::try_from(cluster_bits).unwrap_or(16).saturating_sub(8);
        let shift = 62u32.saturating_sub(count_bits);
        let mut seen = std::collections::HashSet::new();
        for (name, l1, size) in l1s {
            for i in 0..size.min(1 << 16) {
                let e_at = l1.saturating_add(i * 8);
                let e = be(b, e_at, 8);
                // Empty entries too: flag bits on an empty entry are a class.
                l.add(format!("{name}[{i}]"), e_at, 8, Pointer);
                let l2 = e & OFFSET_MASK;
                if l2 == 0 || !seen.insert(l2) {
                    continue;
                }
                l.targets.push(l2);
                for j in 0..cs / entry_bytes {
                    let at = l2.saturating_add(j * entry_bytes);
                    let raw = be(b, at, 8);
                    let bitmap = if extended {
                        be(b, at.saturating_add(8), 8)
                    } else {
                        0
                    };
                    if raw == 0 && bitmap == 0 && j % 64 != 0 {
                        continue;
                    }
                    l.add(format!("{name}[{i}].l2[{j}]"), at, 8, L2);
                    if extended {
                        l.add(
                            format!("{name}[{i}].l2[{j}].bitmap"),
                            at.saturating_add(8),
                            8,
                            SubclusterBitmap,
                        );
                    }
                    if raw & (1 << 62) != 0 {
                        let host = raw & ((1u64 << shift) - 1);
                        let sectors = ((raw >> shift) & ((1u64 << count_bits) - 1)) + 1;
                        let end = (host & !511)
                            .saturating_add(sectors * 512)
                            .min(b.len() as u64);
                        l.add(
                            format!("{name}[{i}].l2[{j}].payload"),
                            host,
                            end.saturating_sub(host),
                            Payload { zstd },
                        );
                    } else if raw & OFFSET_MASK != 0 {
                        l.targets.push(raw & OFFSET_MASK);
                    }
                }
            }
        }

        // Bitmap directory and bitmap tables.
        if let Some((nb, mut dir)) = bitmaps_ext {
            for k in 0..nb.min(16) {
                let p = |name: &str| format!("bitmap[{k}].{name}");
                l.add(p("table_offset"), dir, 8, Offset);
                l.add(p("table_size"), dir.saturating_add(8), 4, Count);
                l.add(p("flags"), dir.saturating_add(12), 4, Bits);
                l.add(p("type"), dir.saturating_add(16), 1, Bits);
                l.add(p("granularity_bits"), dir.saturating_add(17), 1, Bits);
                l.add(p("name_size"), dir.saturating_add(18), 2, Count);
                l.add(p("extra_data_size"), dir.saturating_add(20), 4, Count);
                let table = be(b, dir, 8);
                let size = be(b, dir.saturating_add(8), 4);
                l.targets.push(table);
                for t in 0..size.min(64) {
                    l.add(
                        format!("bitmap[{k}].table[{t}]"),
                        table.saturating_add(t * 8),
                        8,
                        Pointer,
                    );
                }
                let name = be(b, dir.saturating_add(18), 2);
                let extra = be(b, dir.saturating_add(20), 4);
                dir = dir
                    .saturating_add(24)
                    .saturating_add(extra)
                    .saturating_add(name)
                    .next_multiple_of(8);
            }
        }
        l.targets.sort_unstable();
        l.targets.dedup();
        l
    }
}
