//! The pointer and table rules every structure shares: sizes against
//! QEMU's caps and the caller's limits, table offsets (aligned, not the
//! header, inside the file), and table entries that point at a host
//! cluster. The structure modules call these; none writes its own.

use crate::error::{Error, Result, What};
use crate::source::{span, table_bytes};

/// The rule every size read from an image obeys: QEMU's cap first (past it
/// QEMU refuses the image: [`Error::TooLarge`]), then the caller's limit
/// ([`Error::LimitExceeded`]). `offset` is the field holding `value`.
pub(crate) fn bound(what: What, offset: u64, value: u64, qemu_cap: u64, limit: u64) -> Result<()> {
    if value > qemu_cap {
        return Err(Error::TooLarge {
            what,
            offset,
            value,
            limit: qemu_cap,
        });
    }
    if value > limit {
        return Err(Error::LimitExceeded {
            what,
            offset,
            value,
            limit,
        });
    }
    Ok(())
}

/// The shared shape of the L1, refcount and snapshot table checks: count
/// times entry size against QEMU's cap, the caller's limit and the file,
/// and a cluster-aligned offset whenever the table is not empty.
#[allow(clippy::too_many_arguments)]
pub(crate) fn table_check(
    what: What,
    count_field: u64,
    offset_field: u64,
    offset: u64,
    count: u64,
    entry_bytes: u64,
    qemu_cap: u64,
    limit: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    let bytes = table_bytes(what, count_field, count, entry_bytes)?;
    bound(what, count_field, bytes, qemu_cap, limit)?;
    // QEMU validates the offset of an empty table too (alignment, and
    // offset + size <= i64::MAX) and refuses to open the image otherwise,
    // e.g. "Snapshot table offset invalid" with nb_snapshots == 0.
    if !is_aligned(offset, cluster_size) {
        return Err(Error::Unaligned {
            what,
            offset: offset_field,
            value: offset,
        });
    }
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > i64::MAX.unsigned_abs())
    {
        return Err(Error::Overflow {
            what,
            offset: offset_field,
        });
    }
    if count == 0 {
        return Ok(());
    }
    if offset == 0 {
        return Err(Error::MetadataOverlap {
            what,
            offset: offset_field,
            target: 0,
            other: What::Header,
        });
    }
    span(what, offset_field, offset, bytes, file_len)?;
    Ok(())
}

/// Decode a table entry that points at a host cluster (L1 entries,
/// refcount table entries, bitmap table entries): bits in `reserved` must
/// be clear, the offset (`raw & offset_mask`) cluster aligned, and 0 means
/// "not allocated". `at` is the entry's file offset.
pub(crate) fn host_pointer(
    what: What,
    raw: u64,
    at: u64,
    reserved: u64,
    offset_mask: u64,
    cluster_size: u64,
) -> Result<Option<u64>> {
    if raw & reserved != 0 {
        return Err(Error::ReservedBits {
            what,
            offset: at,
            value: raw,
        });
    }
    let off = raw & offset_mask;
    if !is_aligned(off, cluster_size) {
        return Err(Error::Unaligned {
            what,
            offset: at,
            value: off,
        });
    }
    Ok((off != 0).then_some(off))
}

/// Whether `value` is a multiple of the power of two `align`.
pub(crate) fn is_aligned(value: u64, align: u64) -> bool {
    value & align.wrapping_sub(1) == 0
}

/// A structure of `len` bytes at `offset`, named at `at` (snapshot L1
/// tables, bitmap tables, the encryption header): cluster aligned, not at
/// offset 0 when `nonzero` (offset 0 is the header), inside the file.
pub(crate) fn placed(
    what: What,
    at: u64,
    offset: u64,
    len: u64,
    nonzero: bool,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    if !is_aligned(offset, cluster_size) || (nonzero && offset == 0) {
        return Err(Error::Unaligned {
            what,
            offset: at,
            value: offset,
        });
    }
    span(what, at, offset, len, file_len).map(|_| ())
}

/// The running total of the bytes an opened image holds, against
/// [`crate::Limits::max_total_bytes`]: every structure sized from the file
/// is charged before it is read (after its own cap and the file length
/// were checked), so a file whose structures each pass their cap but
/// together exceed the total is refused ([`Error::TotalLimitExceeded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    used: u64,
    limit: u64,
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Budget {
        Budget { used: 0, limit }
    }

    /// Charge `bytes` for `what` (its size or location is the field at
    /// `offset`).
    pub(crate) fn charge(&mut self, what: What, offset: u64, bytes: u64) -> Result<()> {
        let total = self.used.saturating_add(bytes);
        if total > self.limit {
            return Err(Error::TotalLimitExceeded {
                what,
                offset,
                value: bytes,
                total,
                limit: self.limit,
            });
        }
        self.used = total;
        Ok(())
    }

    /// Give back `bytes` charged earlier (a table that was replaced).
    pub(crate) fn release(&mut self, bytes: u64) {
        self.used = self.used.saturating_sub(bytes);
    }

    /// Bytes charged so far.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_charges_up_to_the_limit() {
        let mut b = Budget::new(100);
        assert!(b.charge(What::L1Table, 36, 60).is_ok());
        assert!(b.charge(What::RefcountTable, 56, 40).is_ok());
        let e = b.charge(What::SnapshotTable, 64, 1).unwrap_err();
        assert_eq!((e.code(), e.offset()), ("total_limit_exceeded", 64));
        assert!(e.is_refusal());
        assert_eq!(b.used(), 100);
        b.release(40);
        assert!(b.charge(What::SnapshotTable, 64, 40).is_ok());
    }
}
