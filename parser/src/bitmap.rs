//! The persistent bitmap directory and bitmap tables.

use crate::bounds::{host_pointer, placed};
use crate::codec::{Need, Reader, Writer};
use crate::error::{Error, Result, What};
use crate::extensions::BitmapsExt;
use crate::header::Geometry;
use crate::limits::Limits;
use crate::qemu;
use crate::source::{read_vec, Source};

/// Flag bit 0: the bitmap was not saved cleanly.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap tracks every write.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag bit 2: unknown extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Flags this reader understands.
pub const FLAGS_KNOWN: u32 = 0x7;
/// Bitmap table entry bits that must be zero (1..8 and 56..63).
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Size of the fixed part of a directory entry.
pub const FIXED_ENTRY_BYTES: usize = 24;

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// File offset of the directory entry.
    pub entry_offset: u64,
    /// File offset of the bitmap table (cluster aligned; 0 with no table).
    pub table_offset: u64,
    /// Entries in the bitmap table; must match the virtual size and granularity.
    pub table_size: u32,
    /// `FLAG_*` bits; bits outside [`FLAGS_KNOWN`] are refused.
    pub flags: u32,
    /// Bitmap type; 1 (dirty tracking) is the only one defined.
    pub bitmap_type: u8,
    /// log2 of the bytes of guest disk one bit covers (9..=31).
    pub granularity_bits: u8,
    /// The bitmap's name, decoded lossily as UTF-8.
    pub name: String,
    /// Bytes of extra data after the fixed part, skipped unread.
    pub extra_data_size: u32,
}

impl Bitmap {
    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1u64.checked_shl(u32::from(self.granularity_bits))
            .unwrap_or(0)
    }

    /// Flag names as qemu-img prints them.
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            v.push("in-use");
        }
        if self.flags & FLAG_AUTO != 0 {
            v.push("auto");
        }
        v
    }

    /// Bitmap table entries needed for a disk of `size` bytes.
    pub fn expected_table_size(&self, size: u64, g: &Geometry) -> u64 {
        let gran = self.granularity();
        if gran == 0 {
            return 0;
        }
        let bits = size.div_ceil(gran);
        let bytes = bits.div_ceil(8);
        bytes.div_ceil(g.cluster_size)
    }

    /// Encode as a directory entry (for building images).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.table_offset)
            .u32(self.table_size)
            .u32(self.flags)
            .u8(self.bitmap_type)
            .u8(self.granularity_bits)
            .u16(u16::try_from(self.name.len()).unwrap_or(u16::MAX))
            .u32(0)
            .bytes(self.name.as_bytes())
            .pad_to(8);
        w.buf
    }
}

/// Read and check the bitmap directory the extension points to.
pub fn read_directory<S: Source + ?Sized>(
    src: &S,
    ext: &BitmapsExt,
    virtual_size: u64,
    g: &Geometry,
    limits: &Limits,
) -> Result<Vec<Bitmap>> {
    let count = u64::from(ext.nb_bitmaps);
    if count > limits.max_bitmaps {
        return Err(Error::LimitExceeded {
            what: What::BitmapDirectory,
            offset: ext.offset,
            value: count,
            limit: limits.max_bitmaps,
        });
    }
    let dir = read_vec(
        src,
        What::BitmapDirectory,
        ext.offset.saturating_add(16),
        ext.directory_offset,
        ext.directory_size,
        limits.max_bitmap_directory_bytes,
    )?;
    let mut r = Reader::new(&dir, ext.directory_offset);
    let mut out: Vec<Bitmap> = Vec::new();
    while r.remaining() > 0 {
        let at = r.offset();
        let bad = |reason| Error::InvalidBitmap { offset: at, reason };
        if u64::try_from(out.len()).unwrap_or(u64::MAX) >= count {
            return Err(Error::InvalidBitmapsExtension {
                offset: ext.offset,
                reason: "bitmap directory holds more entries than nb_bitmaps",
            });
        }
        let t = Need(What::BitmapDirectory, at);
        let table_offset = t.get(r.u64())?;
        let table_size = t.get(r.u32())?;
        let flags = t.get(r.u32())?;
        let bitmap_type = t.get(r.u8())?;
        let granularity_bits = t.get(r.u8())?;
        let name_size = t.get(r.u16())?;
        let extra_data_size = t.get(r.u32())?;
        let _extra = t.get(r.take(usize::try_from(extra_data_size).unwrap_or(usize::MAX)))?;
        let name = t.get(r.take(usize::from(name_size)))?;
        let pad_start = r.offset();
        let before = r.remaining();
        t.get(r.align(8))?;
        let pad = dir
            .get(usize::try_from(pad_start.saturating_sub(ext.directory_offset)).unwrap_or(0)..)
            .and_then(|p| p.get(..before.saturating_sub(r.remaining())))
            .unwrap_or(&[]);
        if pad.iter().any(|&b| b != 0) {
            return Err(bad("non-zero padding"));
        }
        if flags & !FLAGS_KNOWN != 0 {
            return Err(Error::ReservedBits {
                what: What::BitmapDirectory,
                offset: at.saturating_add(12),
                value: u64::from(flags),
            });
        }
        if bitmap_type != 1 {
            return Err(bad("type is not 1 (dirty tracking bitmap)"));
        }
        if !(9..=31).contains(&granularity_bits) {
            return Err(bad("granularity_bits outside QEMU's range 9..=31"));
        }
        if name_size == 0 || u64::from(name_size) > qemu::MAX_BITMAP_NAME {
            return Err(bad("name is empty or longer than 1023 bytes"));
        }
        if extra_data_size != 0 && flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Err(bad(
                "unknown extra data without the extra_data_compatible flag",
            ));
        }
        let bitmap = Bitmap {
            entry_offset: at,
            table_offset,
            table_size,
            flags,
            bitmap_type,
            granularity_bits,
            name: String::from_utf8_lossy(name).into_owned(),
            extra_data_size,
        };
        if out.iter().any(|b| b.name == bitmap.name) {
            return Err(bad("duplicate bitmap name"));
        }
        if u64::from(table_size) != bitmap.expected_table_size(virtual_size, g) {
            return Err(bad(
                "bitmap table size does not match the virtual size and granularity",
            ));
        }
        placed(
            What::BitmapTable,
            at,
            table_offset,
            u64::from(table_size).saturating_mul(8),
            table_size > 0,
            g.cluster_size,
            src.len(),
        )?;
        out.push(bitmap);
    }
    if u64::try_from(out.len()).unwrap_or(u64::MAX) != count {
        return Err(Error::InvalidBitmapsExtension {
            offset: ext.offset,
            reason: "nb_bitmaps does not match the bitmap directory",
        });
    }
    Ok(out)
}

/// Decode bitmap table entry `raw` at file offset `at`: the data cluster's
/// offset, or `None` for an unallocated cluster (all zeros or all ones).
pub fn table_entry(raw: u64, at: u64, g: &Geometry) -> Result<Option<u64>> {
    // Bit 0 ("all ones") is meaningful only for an unallocated cluster.
    let off = raw & crate::l1l2::OFFSET_MASK;
    let reserved = if off != 0 {
        TABLE_RESERVED_MASK | 1
    } else {
        TABLE_RESERVED_MASK
    };
    host_pointer(
        What::BitmapTable,
        raw,
        at,
        reserved,
        crate::l1l2::OFFSET_MASK,
        g.cluster_size,
    )
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn bm(name: &str) -> Bitmap {
        Bitmap {
            entry_offset: 0,
            table_offset: 0x3000,
            table_size: 1,
            flags: FLAG_AUTO,
            bitmap_type: 1,
            granularity_bits: 16,
            name: name.into(),
            extra_data_size: 0,
        }
    }

    fn file_with(entries: &[Vec<u8>]) -> (Vec<u8>, BitmapsExt) {
        let dir: Vec<u8> = entries.concat();
        let mut file = vec![0u8; 0x4000];
        file[0x2000..0x2000 + dir.len()].copy_from_slice(&dir);
        let ext = BitmapsExt {
            offset: 0x80,
            nb_bitmaps: u32::try_from(entries.len()).unwrap(),
            directory_size: dir.len() as u64,
            directory_offset: 0x2000,
        };
        (file, ext)
    }

    #[test]
    fn directory_round_trip_and_checks() {
        let g = Geometry::new(12, false, 4);
        let (file, ext) = file_with(&[bm("a").encode(), bm("b").encode()]);
        let got = read_directory(&file, &ext, 1 << 20, &g, &Limits::default()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].name, "b");
        assert_eq!(got[1].entry_offset, 0x2000 + 32);

        let (file, ext) = file_with(&[bm("a").encode(), bm("a").encode()]);
        let e = read_directory(&file, &ext, 1 << 20, &g, &Limits::default()).unwrap_err();
        assert_eq!((e.code(), e.offset()), ("invalid_bitmap", 0x2020));

        let mut b = bm("a");
        b.table_size = 5;
        let (file, ext) = file_with(&[b.encode()]);
        let e = read_directory(&file, &ext, 1 << 20, &g, &Limits::default()).unwrap_err();
        assert_eq!(e.code(), "invalid_bitmap");

        let (file, mut ext) = file_with(&[bm("a").encode()]);
        ext.nb_bitmaps = 2;
        let e = read_directory(&file, &ext, 1 << 20, &g, &Limits::default()).unwrap_err();
        assert_eq!(e.code(), "invalid_bitmaps_extension");
    }

    #[test]
    fn table_entries() {
        let g = Geometry::new(12, false, 4);
        assert_eq!(table_entry(1, 0, &g).unwrap(), None);
        assert_eq!(table_entry(0x3000, 0, &g).unwrap(), Some(0x3000));
        assert_eq!(
            table_entry(0x3001, 0, &g).unwrap_err().code(),
            "reserved_bits"
        );
        assert_eq!(table_entry(0x3200, 0, &g).unwrap_err().code(), "unaligned");
    }
}
