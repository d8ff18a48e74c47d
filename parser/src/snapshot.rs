//! The internal snapshot table.
//!
//! Entries are variable length (40 fixed bytes, extra data, id, name,
//! padding to 8), so the table is read entry by entry, each read checked
//! against the file and the running total against the table limits.

use crate::bounds::{bound, placed};
use crate::codec::{Need, Reader, Writer};
use crate::error::{Error, Result, What};
use crate::header::Geometry;
use crate::limits::Limits;
use crate::qemu;
use crate::source::{read_vec, Source};

/// Size of the fixed part of a snapshot table entry.
pub const FIXED_ENTRY_BYTES: u64 = 40;
/// Extra data a version 3 image must carry (vm_state_size_large, disk_size).
pub const V3_MIN_EXTRA_DATA: u32 = 16;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// File offset of this table entry.
    pub entry_offset: u64,
    /// File offset of the snapshot's L1 table (a copy of the active one).
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string (QEMU numbers them "1", "2", ...), decoded lossily.
    pub id: String,
    /// Name (tag), decoded lossily as UTF-8.
    pub name: String,
    /// Creation time: seconds since the Unix epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds within the second.
    pub date_nsec: u32,
    /// Guest clock at snapshot time, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit extra field when present).
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time, when the extra data holds it.
    pub disk_size: Option<u64>,
    /// Record/replay instruction count, when present (-1 when disabled).
    pub icount: Option<u64>,
    /// Length of the extra data.
    pub extra_data_size: u32,
    /// Length of the whole table entry, padding included.
    pub entry_len: u64,
}

impl Snapshot {
    /// Encode as a table entry (for building images).
    pub fn encode(&self) -> Vec<u8> {
        let mut extra = Writer::default();
        extra
            .u64(self.vm_state_size)
            .u64(self.disk_size.unwrap_or(0));
        if let Some(ic) = self.icount {
            extra.u64(ic);
        }
        let mut w = Writer::default();
        let len16 = |s: &str| u16::try_from(s.len()).unwrap_or(u16::MAX);
        w.u64(self.l1_table_offset)
            .u32(self.l1_size)
            .u16(len16(&self.id))
            .u16(len16(&self.name))
            .u32(self.date_sec)
            .u32(self.date_nsec)
            .u64(self.vm_clock_nsec)
            .u32(u32::try_from(self.vm_state_size).unwrap_or(0))
            .u32(u32::try_from(extra.buf.len()).unwrap_or(0))
            .bytes(&extra.buf)
            .bytes(self.id.as_bytes())
            .bytes(self.name.as_bytes())
            .pad_to(8);
        w.buf
    }
}

/// Which internal snapshot to read, in qemu-img's `-l` syntax:
/// `snapshot.id=ID,snapshot.name=NAME` (either part may be left out; both
/// must match when both are given), or a bare `ID_OR_NAME`, looked up as
/// an ID first and then as a name (QEMU's
/// `bdrv_snapshot_load_tmp_by_id_or_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSelector {
    /// By ID and/or name.
    Exact {
        /// The snapshot's ID, if given.
        id: Option<String>,
        /// The snapshot's name, if given.
        name: Option<String>,
    },
    /// By ID, else by name.
    IdOrName(String),
}

impl SnapshotSelector {
    /// Parse qemu-img's `-l` argument.
    pub fn parse(s: &str) -> SnapshotSelector {
        if !s.starts_with("snapshot.") {
            return SnapshotSelector::IdOrName(s.to_owned());
        }
        let (mut id, mut name) = (None, None);
        for part in s.split(',') {
            if let Some(v) = part.strip_prefix("snapshot.id=") {
                id = Some(v.to_owned());
            } else if let Some(v) = part.strip_prefix("snapshot.name=") {
                name = Some(v.to_owned());
            } else {
                // Not the key=value form after all: a name.
                return SnapshotSelector::IdOrName(s.to_owned());
            }
        }
        SnapshotSelector::Exact { id, name }
    }

    /// The index in `snapshots` of the snapshot selected.
    pub fn find(&self, snapshots: &[Snapshot]) -> Option<usize> {
        let by = |id: Option<&str>, name: Option<&str>| {
            if id.is_none() && name.is_none() {
                return None;
            }
            snapshots
                .iter()
                .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
        };
        match self {
            SnapshotSelector::Exact { id, name } => by(id.as_deref(), name.as_deref()),
            SnapshotSelector::IdOrName(x) => by(Some(x), None).or_else(|| by(None, Some(x))),
        }
    }
}

/// Read and check the snapshot table: `count` entries from `offset`.
pub fn read_table<S: Source + ?Sized>(
    src: &S,
    offset: u64,
    count: u32,
    version: u32,
    g: &Geometry,
    limits: &Limits,
) -> Result<Vec<Snapshot>> {
    let file_len = src.len();
    let mut out = Vec::new();
    let mut pos = offset;
    for _ in 0..count {
        let at = pos;
        let bad = |reason| Error::InvalidSnapshot { offset: at, reason };
        let fixed = read_vec(
            src,
            What::SnapshotTable,
            at,
            at,
            FIXED_ENTRY_BYTES,
            FIXED_ENTRY_BYTES,
        )?;
        let mut r = Reader::new(&fixed, at);
        let t = Need(What::SnapshotTable, at);
        let l1_table_offset = t.get(r.u64())?;
        let l1_size = t.get(r.u32())?;
        let id_len = t.get(r.u16())?;
        let name_len = t.get(r.u16())?;
        let date_sec = t.get(r.u32())?;
        let date_nsec = t.get(r.u32())?;
        let vm_clock_nsec = t.get(r.u64())?;
        let vm_state_32 = t.get(r.u32())?;
        let extra_data_size = t.get(r.u32())?;

        bound(
            What::SnapshotTable,
            at.saturating_add(36),
            u64::from(extra_data_size),
            qemu::MAX_SNAPSHOT_EXTRA_DATA,
            limits.max_snapshot_extra_data,
        )?;
        if version >= 3 && extra_data_size < V3_MIN_EXTRA_DATA {
            return Err(bad(
                "version 3 snapshot without vm_state_size_large and disk_size",
            ));
        }
        let var_len = u64::from(extra_data_size)
            .saturating_add(u64::from(id_len))
            .saturating_add(u64::from(name_len));
        let var_at = at.saturating_add(FIXED_ENTRY_BYTES);
        let var = read_vec(
            src,
            What::SnapshotTable,
            at,
            var_at,
            var_len,
            qemu::MAX_SNAPSHOT_EXTRA_DATA.saturating_add(2 * u64::from(u16::MAX)),
        )?;
        let mut r = Reader::new(&var, var_at);
        let extra = t.get(r.take(usize::try_from(extra_data_size).unwrap_or(usize::MAX)))?;
        let id = t.get(r.take(usize::from(id_len)))?;
        let name = t.get(r.take(usize::from(name_len)))?;
        let mut x = Reader::new(extra, var_at);
        let vm_state_size = x.u64().unwrap_or(u64::from(vm_state_32));
        let disk_size = x.u64();
        let icount = x.u64();

        // Entry length rounded up to 8.
        let entry_len = FIXED_ENTRY_BYTES.saturating_add(var_len).saturating_add(7) & !7;
        pos = at.checked_add(entry_len).ok_or(Error::Overflow {
            what: What::SnapshotTable,
            offset: at,
        })?;
        bound(
            What::SnapshotTable,
            at,
            pos.saturating_sub(offset),
            qemu::MAX_SNAPSHOT_TABLE_BYTES,
            limits.max_snapshot_table_bytes,
        )?;

        // The snapshot's L1 table: QEMU's cap, alignment, inside the file,
        // then the caller's limit (a table past the end of the file is
        // malformed, not merely large).
        let l1_bytes = u64::from(l1_size).saturating_mul(8);
        let l1_bound = |limit| {
            bound(
                What::SnapshotL1Table,
                at.saturating_add(8),
                l1_bytes,
                qemu::MAX_L1_BYTES,
                limit,
            )
        };
        l1_bound(u64::MAX)?;
        if l1_size > 0 {
            placed(
                What::SnapshotL1Table,
                at,
                l1_table_offset,
                l1_bytes,
                true,
                g.cluster_size,
                file_len,
            )?;
        }
        l1_bound(limits.max_l1_entries.saturating_mul(8))?;
        out.push(Snapshot {
            entry_offset: at,
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
            extra_data_size,
            entry_len,
        });
    }
    // Every entry was read from the file above. The padding after the last
    // entry need not be there: QEMU pads only between entries, and a table
    // at the end of the file ends with the last name.
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            entry_offset: 0x1000,
            l1_table_offset: 0x2000,
            l1_size: 2,
            id: "1".into(),
            name: "before upgrade".into(),
            date_sec: 1,
            date_nsec: 2,
            vm_clock_nsec: 3,
            vm_state_size: 0,
            disk_size: Some(1 << 20),
            icount: Some(u64::MAX),
            extra_data_size: 24,
            entry_len: 80,
        }
    }

    #[test]
    fn round_trip() {
        let g = Geometry::new(12, false, 4);
        let mut file = vec![0u8; 0x3000];
        let e = snap().encode();
        file[0x1000..0x1000 + e.len()].copy_from_slice(&e);
        let got = read_table(&file, 0x1000, 1, 3, &g, &Limits::default()).unwrap();
        assert_eq!(got, vec![snap()]);
    }

    #[test]
    fn snapshot_l1_tables_obey_the_callers_limit() {
        let g = Geometry::new(12, false, 4);
        let mut file = vec![0u8; 0x3000];
        let e = snap().encode();
        file[0x1000..0x1000 + e.len()].copy_from_slice(&e);
        let mut limits = Limits {
            max_l1_entries: 1,
            ..Limits::default()
        };
        let err = read_table(&file, 0x1000, 1, 3, &g, &limits).unwrap_err();
        assert_eq!((err.code(), err.offset()), ("limit_exceeded", 0x1008));
        assert!(err.is_refusal());
        limits.max_l1_entries = 2;
        read_table(&file, 0x1000, 1, 3, &g, &limits).unwrap();
    }

    #[test]
    fn last_entry_unpadded_at_eof() {
        // QEMU does not pad the last entry: a table at the end of the file
        // ends with the last name.
        let g = Geometry::new(12, false, 4);
        let s = Snapshot {
            entry_offset: 0x2000,
            l1_table_offset: 0x1000,
            ..snap()
        };
        let e = s.encode();
        let unpadded = 40 + 24 + 1 + "before upgrade".len();
        assert!(unpadded < e.len());
        let mut file = vec![0u8; 0x3000];
        file[0x2000..0x2000 + e.len()].copy_from_slice(&e);
        file.truncate(0x2000 + unpadded);
        let got = read_table(&file, 0x2000, 1, 3, &g, &Limits::default()).unwrap();
        assert_eq!(got, vec![s]);
        file.pop();
        let err = read_table(&file, 0x2000, 1, 3, &g, &Limits::default()).unwrap_err();
        assert_eq!((err.code(), err.offset()), ("past_eof", 0x2000));
    }

    #[test]
    fn hostile_entries() {
        let g = Geometry::new(12, false, 4);
        let mut file = vec![0u8; 0x3000];
        let mut e = snap().encode();
        e[36..40].copy_from_slice(&2000u32.to_be_bytes());
        file[0x1000..0x1000 + e.len()].copy_from_slice(&e);
        let err = read_table(&file, 0x1000, 1, 3, &g, &Limits::default()).unwrap_err();
        assert_eq!((err.code(), err.offset()), ("too_large", 0x1000 + 36));
        let mut e = snap().encode();
        e[36..40].copy_from_slice(&8u32.to_be_bytes());
        file[0x1000..0x1000 + e.len()].copy_from_slice(&e);
        let err = read_table(&file, 0x1000, 1, 3, &g, &Limits::default()).unwrap_err();
        assert_eq!(err.code(), "invalid_snapshot");
        let mut e = snap().encode();
        e[0..8].copy_from_slice(&0x100_0000u64.to_be_bytes());
        file[0x1000..0x1000 + e.len()].copy_from_slice(&e);
        let err = read_table(&file, 0x1000, 1, 3, &g, &Limits::default()).unwrap_err();
        assert_eq!(err.code(), "past_eof");
        // Many entries claimed, few present.
        let err = read_table(&file, 0x1000, 65536, 3, &g, &Limits::default()).unwrap_err();
        assert!(matches!(
            err.code(),
            "past_eof" | "invalid_snapshot" | "too_large"
        ));
    }
}
