//! The refcount table and refcount blocks, for every width from 1 to 64 bits.
//!
//! Widths below 8 bits are packed LSB first within each byte; wider ones
//! are big-endian integers.

use crate::bounds::host_pointer;
use crate::error::{Result, What};
use crate::header::Geometry;

/// Refcount table entry bits that must be zero.
pub const REFTABLE_RESERVED_MASK: u64 = 0x1ff;

/// Decode refcount table entry `raw` at file offset `at`: the refcount
/// block's offset, or `None` when not allocated.
pub fn table_entry(raw: u64, at: u64, g: &Geometry) -> Result<Option<u64>> {
    // Bits 9..63 are the offset: only the low reserved bits can be wrong.
    host_pointer(
        What::RefcountTable,
        raw,
        at,
        REFTABLE_RESERVED_MASK,
        !REFTABLE_RESERVED_MASK,
        g.cluster_size,
    )
}

/// Read refcount `index` from a refcount block's bytes.
pub fn get(block: &[u8], order: u32, index: u64) -> Option<u64> {
    match order {
        0..=2 => {
            let bits = 1u32 << order;
            let per_byte = 8 >> order;
            let byte = *block.get(usize::try_from(index.checked_div(per_byte)?).ok()?)?;
            let shift = u32::try_from(index.checked_rem(per_byte)?)
                .ok()?
                .checked_mul(bits)?;
            let mask = (1u8 << bits).wrapping_sub(1);
            Some(u64::from(byte.checked_shr(shift)? & mask))
        }
        3..=6 => {
            let width = 1usize << order.saturating_sub(3);
            let start = usize::try_from(index).ok()?.checked_mul(width)?;
            let bytes = block.get(start..start.checked_add(width)?)?;
            Some(bytes.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b)))
        }
        _ => None,
    }
}

/// Append the first `count` refcounts of a refcount block to `out`, each
/// clamped to `u32::MAX` (what [`get`] gives, a block at a time: whole
/// bytes are decoded a word at a time). Entries missing from a short
/// block, or of an unsupported order, read as zero.
pub fn decode_block(block: &[u8], order: u32, count: u64, out: &mut Vec<u32>) {
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let start = out.len();
    match order {
        3 => out.extend(block.iter().take(count).map(|&b| u32::from(b))),
        4 => out.extend(block.chunks_exact(2).take(count).map(|w| {
            u32::from(u16::from_be_bytes([
                w.first().copied().unwrap_or(0),
                w.last().copied().unwrap_or(0),
            ]))
        })),
        5..=6 => {
            let width = 1usize << order.saturating_sub(3);
            out.extend(
                block
                    .chunks_exact(width)
                    .take(count)
                    .map(|w| clamp(w.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b)))),
            );
        }
        _ => {
            let n = u64::try_from(count).unwrap_or(u64::MAX);
            out.extend((0..n).map(|j| clamp(get(block, order, j).unwrap_or(0))));
        }
    }
    let want = start.saturating_add(count);
    if out.len() < want {
        out.resize(want, 0);
    }
}

/// Write refcount `index` into a refcount block's bytes (for building
/// images). Values wider than the entry are truncated to its width.
pub fn set(block: &mut [u8], order: u32, index: u64, value: u64) -> Option<()> {
    match order {
        0..=2 => {
            let bits = 1u32 << order;
            let per_byte = 8 >> order;
            let byte = block.get_mut(usize::try_from(index.checked_div(per_byte)?).ok()?)?;
            let shift = u32::try_from(index.checked_rem(per_byte)?)
                .ok()?
                .checked_mul(bits)?;
            let mask = (1u8 << bits).wrapping_sub(1);
            let v = u8::try_from(value & u64::from(mask)).ok()?;
            *byte = (*byte & !(mask << shift)) | v << shift;
            Some(())
        }
        3..=6 => {
            let width = 1usize << order.saturating_sub(3);
            let start = usize::try_from(index).ok()?.checked_mul(width)?;
            let bytes = block.get_mut(start..start.checked_add(width)?)?;
            let be = value.to_be_bytes();
            bytes.copy_from_slice(be.get(8usize.checked_sub(width)?..)?);
            Some(())
        }
        _ => None,
    }
}

/// Largest refcount a width can hold.
pub fn max_value(order: u32) -> u64 {
    1u64.checked_shl(1u32 << order.min(6))
        .map_or(u64::MAX, |v| v.wrapping_sub(1))
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 64];
            let entries = (64 * 8) >> order;
            let max = max_value(order);
            for i in 0..entries {
                set(&mut block, order, i, (i * 7 + 1) & max).unwrap();
            }
            for i in 0..entries {
                assert_eq!(
                    get(&block, order, i),
                    Some((i * 7 + 1) & max),
                    "order {order} index {i}"
                );
            }
            assert_eq!(get(&block, order, entries), None);
        }
    }

    #[test]
    fn sub_byte_widths_are_lsb_first() {
        assert_eq!(get(&[0b0000_0010], 0, 1), Some(1));
        assert_eq!(get(&[0b0000_0010], 0, 0), Some(0));
        assert_eq!(get(&[0b1110_0100], 1, 0), Some(0));
        assert_eq!(get(&[0b1110_0100], 1, 1), Some(1));
        assert_eq!(get(&[0b1110_0100], 1, 3), Some(3));
        assert_eq!(get(&[0x21], 2, 0), Some(1));
        assert_eq!(get(&[0x00, 0x01], 4, 0), Some(1));
    }

    #[test]
    fn table_entries() {
        let g = Geometry::new(16, false, 4);
        assert_eq!(table_entry(0x10000, 0, &g).unwrap(), Some(0x10000));
        assert_eq!(table_entry(0, 0, &g).unwrap(), None);
        assert_eq!(
            table_entry(0x10001, 0, &g).unwrap_err().code(),
            "reserved_bits"
        );
        assert_eq!(table_entry(0x10200, 0, &g).unwrap_err().code(), "unaligned");
    }
}
