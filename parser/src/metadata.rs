//! Where the metadata lives: a sorted map of host byte ranges, used to
//! refuse table entries that point into other metadata (QEMU only checks
//! overlaps before it writes; a reader that trusts them can be made to
//! return its own tables as guest data, or to chase loops).

use crate::error::What;

/// One metadata range in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// File offset of the first byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The structure stored there.
    pub what: What,
}

/// A set of metadata ranges, searchable by host offset.
#[derive(Debug, Clone, Default)]
pub struct MetadataMap {
    ranges: Vec<Range>,
    /// `max_end[i]` = largest `end` among `ranges[..=i]`, once sorted.
    max_end: Vec<u64>,
    sorted: bool,
}

impl MetadataMap {
    /// Add `start .. start + len` as `what` (empty ranges are ignored).
    pub fn add(&mut self, what: What, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.ranges.push(Range {
            start,
            end: start.saturating_add(len),
            what,
        });
        self.sorted = false;
    }

    /// Sort for lookups. Must be called after the last `add`.
    pub fn finish(&mut self) {
        self.ranges.sort_by_key(|r| (r.start, r.end));
        // Many entries naming the same table (hostile L1 tables do) cost
        // one range.
        self.ranges.dedup();
        let mut max = 0;
        self.max_end = self
            .ranges
            .iter()
            .map(|r| {
                max = max.max(r.end);
                max
            })
            .collect();
        self.sorted = true;
    }

    /// All ranges, sorted by start once [`MetadataMap::finish`] ran.
    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The first range overlapping `start .. start + len` whose kind is not
    /// in `except`.
    pub fn find(&self, start: u64, len: u64, except: &[What]) -> Option<Range> {
        let end = start.saturating_add(len.max(1));
        if !self.sorted {
            return self
                .ranges
                .iter()
                .find(|r| r.start < end && start < r.end && !except.contains(&r.what))
                .copied();
        }
        // Walk back from the last range starting before `end`; once no
        // earlier range reaches past `start` (prefix max of ends), stop.
        let upto = self.ranges.partition_point(|r| r.start < end);
        let mut i = upto;
        while let Some(j) = i.checked_sub(1) {
            i = j;
            if self.max_end.get(j).is_none_or(|&m| m <= start) {
                break;
            }
            match self.ranges.get(j) {
                Some(r) if r.end > start && !except.contains(&r.what) => return Some(*r),
                _ => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let mut m = MetadataMap::default();
        m.add(What::Header, 0, 0x10000);
        m.add(What::L1Table, 0x30000, 8);
        m.add(What::L2Table, 0x40000, 0x10000);
        m.add(What::RefcountTable, 0x10000, 0x10000);
        m.finish();
        assert_eq!(
            m.find(0x30000, 0x10000, &[]).map(|r| r.what),
            Some(What::L1Table)
        );
        assert_eq!(m.find(0x50000, 0x10000, &[]), None);
        assert_eq!(
            m.find(0x4fff0, 0x20, &[]).map(|r| r.what),
            Some(What::L2Table)
        );
        assert_eq!(m.find(0x40000, 0x10000, &[What::L2Table]), None);
        assert_eq!(m.find(0x0, 1, &[]).map(|r| r.what), Some(What::Header));
        assert_eq!(m.find(0x20000, 0x10000, &[]), None);
    }
}
