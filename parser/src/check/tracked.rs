//! What the audit tracks per host cluster: the references it found, and
//! one bit each for "stored refcount is one" and "holds metadata".
//!
//! Memory follows what the tables name, not the file length: every array
//! is cut into pages of [`PAGE`] clusters, allocated when a cluster of the
//! page is first touched, so a sparse file of terabytes with a few
//! megabytes of data costs a few pages. The clusters of the allocated
//! pages are bounded ([`super::CheckOptions::max_tracked_clusters`]): an
//! array that would pass the bound refuses to grow and says so
//! ([`Counts::over`], [`Flags::over`]); the check is then not judged
//! (`too_large_to_check`). The page directories are dense, one slot per
//! page of the file: at most [`super::MAX_HOST_CLUSTERS`] / [`PAGE`] =
//! 32 Ki slots.

/// Host clusters per page.
const PAGE_BITS: u32 = 16;
pub(super) const PAGE: usize = 1 << PAGE_BITS;

/// The clusters of the allocated pages of one array, against the bound.
#[derive(Debug, Clone, Copy)]
struct Room {
    /// Clusters of the file.
    n: usize,
    used: u64,
    max: u64,
    over: bool,
}

impl Room {
    fn new(n: usize, max: u64) -> Room {
        Room {
            n,
            used: 0,
            max,
            over: false,
        }
    }

    /// Clusters in page `p`.
    fn page_len(&self, p: usize) -> usize {
        self.n.saturating_sub(p.saturating_mul(PAGE)).min(PAGE)
    }

    /// Room for page `p`: its length, or `None` (and `over`) past the bound.
    fn take(&mut self, p: usize) -> Option<usize> {
        let len = self.page_len(p);
        let used = self
            .used
            .saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
        if used > self.max {
            self.over = true;
            return None;
        }
        self.used = used;
        Some(len)
    }
}

/// References per host cluster, saturating at `u32::MAX`. A page holds
/// one byte a cluster until one of its counts passes `u8::MAX`, then two,
/// then four: 1 TiB of 64 KiB clusters referenced once each is 16 MiB.
pub(super) struct Counts {
    pages: Vec<Page>,
    room: Room,
}

enum Page {
    Empty,
    Narrow(Box<[u8]>),
    Mid(Box<[u16]>),
    Wide(Box<[u32]>),
}

impl Counts {
    /// Counts for `n` clusters, pages of at most `max` clusters in all.
    pub(super) fn new(n: usize, max: u64) -> Counts {
        let mut pages = Vec::new();
        pages.resize_with(n.div_ceil(PAGE), || Page::Empty);
        Counts {
            pages,
            room: Room::new(n, max),
        }
    }

    /// Whether a page was refused (the counts are then incomplete).
    pub(super) fn over(&self) -> bool {
        self.room.over
    }

    #[cfg(test)]
    fn get(&self, i: usize) -> u32 {
        let o = i & (PAGE - 1);
        match self.pages.get(i >> PAGE_BITS) {
            Some(Page::Narrow(v)) => v.get(o).copied().map_or(0, u32::from),
            Some(Page::Mid(v)) => v.get(o).copied().map_or(0, u32::from),
            Some(Page::Wide(v)) => v.get(o).copied().unwrap_or(0),
            Some(Page::Empty) | None => 0,
        }
    }

    /// Add `refs` to count `i` (ignored past the end).
    #[inline]
    pub(super) fn add(&mut self, i: usize, refs: u32) {
        let p = i >> PAGE_BITS;
        let o = i & (PAGE - 1);
        if let Some(Page::Narrow(v)) = self.pages.get_mut(p) {
            if let Some(x) = v.get_mut(o) {
                if let Ok(sum) = u8::try_from(u32::from(*x).saturating_add(refs)) {
                    *x = sum;
                    return;
                }
            }
        }
        self.add_slow(p, o, refs);
    }

    /// Add `refs` to counts `i .. i + n`, which lie in one page (`n` at
    /// most 64 and the run inside one aligned block of 64 clusters).
    #[inline]
    pub(super) fn add_run(&mut self, i: usize, n: usize, refs: u32) {
        let p = i >> PAGE_BITS;
        let o = i & (PAGE - 1);
        if let Some(Page::Narrow(v)) = self.pages.get_mut(p) {
            if let Some(run) = v.get_mut(o..o.saturating_add(n)) {
                // No count passes a byte: add in place.
                let top = u8::MAX.saturating_sub(u8::try_from(refs).unwrap_or(u8::MAX));
                if refs <= u32::from(u8::MAX) && run.iter().all(|&x| x <= top) {
                    let r = u8::try_from(refs).unwrap_or(0);
                    for x in run.iter_mut() {
                        *x = x.saturating_add(r);
                    }
                    return;
                }
            }
        }
        for j in i..i.saturating_add(n) {
            self.add(j, refs);
        }
    }

    fn add_slow(&mut self, p: usize, o: usize, refs: u32) {
        let len = self.room.page_len(p);
        if o >= len {
            return;
        }
        let Some(page) = self.pages.get_mut(p) else {
            return;
        };
        loop {
            match page {
                Page::Empty => match self.room.take(p) {
                    Some(len) => *page = Page::Narrow(vec![0u8; len].into_boxed_slice()),
                    None => return,
                },
                Page::Narrow(v) => match v.get_mut(o) {
                    Some(x) => match u8::try_from(u32::from(*x).saturating_add(refs)) {
                        Ok(sum) => {
                            *x = sum;
                            return;
                        }
                        Err(_) => *page = Page::Mid(v.iter().map(|&x| u16::from(x)).collect()),
                    },
                    None => return,
                },
                Page::Mid(v) => match v.get_mut(o) {
                    Some(x) => match u16::try_from(u32::from(*x).saturating_add(refs)) {
                        Ok(sum) => {
                            *x = sum;
                            return;
                        }
                        Err(_) => *page = Page::Wide(v.iter().map(|&x| u32::from(x)).collect()),
                    },
                    None => return,
                },
                Page::Wide(v) => {
                    if let Some(x) = v.get_mut(o) {
                        *x = x.saturating_add(refs);
                    }
                    return;
                }
            }
        }
    }

    /// The first cluster at or after `i` in an allocated page (`None`: no
    /// reference from `i` on). Cheap: one look per page.
    pub(super) fn next_page_from(&self, i: usize) -> Option<usize> {
        if i >= self.room.n {
            return None;
        }
        let first = i >> PAGE_BITS;
        let rest = self.pages.get(first..)?;
        let k = rest.iter().position(|p| !matches!(p, Page::Empty))?;
        let p = first.saturating_add(k);
        Some(if p == first {
            i
        } else {
            p.saturating_mul(PAGE)
        })
    }

    /// Whether no cluster of `start .. start + len` has a reference (cheap
    /// where the pages were never touched).
    pub(super) fn none_in(&self, start: usize, len: usize) -> bool {
        let end = start.saturating_add(len).min(self.room.n);
        let mut i = start;
        while i < end {
            let p = i >> PAGE_BITS;
            let page_end = p.saturating_add(1).saturating_mul(PAGE).min(end);
            let (a, b) = (
                i & (PAGE - 1),
                (page_end.saturating_sub(1) & (PAGE - 1)).saturating_add(1),
            );
            let zero = match self.pages.get(p) {
                Some(Page::Narrow(v)) => v.get(a..b).is_none_or(|s| s.iter().all(|&x| x == 0)),
                Some(Page::Mid(v)) => v.get(a..b).is_none_or(|s| s.iter().all(|&x| x == 0)),
                Some(Page::Wide(v)) => v.get(a..b).is_none_or(|s| s.iter().all(|&x| x == 0)),
                Some(Page::Empty) | None => true,
            };
            if !zero {
                return false;
            }
            i = page_end;
        }
        true
    }

    /// The counts of `start .. start + len` into `out` (zeros past the end).
    pub(super) fn segment(&self, start: usize, len: usize, out: &mut Vec<u32>) {
        out.clear();
        let end = start.saturating_add(len);
        let mut i = start;
        while i < end {
            let p = i >> PAGE_BITS;
            let page_end = p.saturating_add(1).saturating_mul(PAGE).min(end);
            let a = i & (PAGE - 1);
            let b = a.saturating_add(page_end.saturating_sub(i));
            let before = out.len();
            match self.pages.get(p) {
                Some(Page::Narrow(v)) => {
                    out.extend(part(v, a, b).iter().map(|&x| u32::from(x)));
                }
                Some(Page::Mid(v)) => out.extend(part(v, a, b).iter().map(|&x| u32::from(x))),
                Some(Page::Wide(v)) => out.extend_from_slice(part(v, a, b)),
                Some(Page::Empty) | None => {}
            }
            out.resize(before.saturating_add(page_end.saturating_sub(i)), 0);
            i = page_end;
        }
    }
}

/// `v[a..b]`, clipped to `v`.
fn part<T>(v: &[T], a: usize, b: usize) -> &[T] {
    v.get(a.min(v.len())..b.min(v.len())).unwrap_or(&[])
}

/// Words of one page of [`Flags`]: two per 64 clusters.
const PAGE_WORDS: usize = PAGE / 32;

/// Two bits per host cluster: "holds metadata" and "stored refcount is
/// one", read together by the audit's hot loop (one lookup for both). In
/// pages allocated when a bit is first set (16 KiB each, a whole page even
/// at the end of the file: indexes within a page need no bounds checks).
pub(super) struct Flags {
    pages: Vec<Option<Box<[u64; PAGE_WORDS]>>>,
    room: Room,
}

/// Bit offsets of the two flags' words in a page.
const META: usize = 0;
const ONE: usize = 1;

impl Flags {
    /// Flags for `n` clusters, pages of at most `max` clusters in all.
    pub(super) fn new(n: usize, max: u64) -> Flags {
        Flags {
            pages: vec![None; n.div_ceil(PAGE)],
            room: Room::new(n, max),
        }
    }

    /// Whether a page was refused (flags are then missing).
    pub(super) fn over(&self) -> bool {
        self.room.over
    }

    /// Cluster `i` holds metadata (ignored past the end).
    pub(super) fn set_meta(&mut self, i: u64) {
        self.set(i, META);
    }

    /// Cluster `i`'s stored refcount is one (ignored past the end).
    #[cfg(test)]
    fn set_one(&mut self, i: u64) {
        self.set(i, ONE);
    }

    /// Cluster `first + j` has stored refcount one for each `values[j]`
    /// that is 1 (a decoded refcount block; 64 clusters per word written).
    pub(super) fn set_ones(&mut self, first: u64, values: &[u32]) {
        let Ok(first) = usize::try_from(first) else {
            return;
        };
        let end = first.saturating_add(values.len()).min(self.room.n);
        let mut c = first;
        let mut rest = values;
        while c < end {
            // The clusters of `c`'s word.
            let take = 64usize.saturating_sub(c % 64).min(end.saturating_sub(c));
            let (now, later) = rest.split_at(take.min(rest.len()));
            let mut mask = 0u64;
            for (k, &v) in now.iter().enumerate() {
                if v == 1 {
                    mask |= 1u64 << ((c.saturating_add(k)) % 64);
                }
            }
            if mask != 0 {
                self.or(c, ONE, mask);
            }
            rest = later;
            c = c.saturating_add(take);
        }
    }

    #[inline]
    fn set(&mut self, i: u64, which: usize) {
        let Ok(i) = usize::try_from(i) else { return };
        self.or(i, which, 1u64 << (i % 64));
    }

    /// OR `mask` into the word of flag `which` holding cluster `i`
    /// (ignored past the end).
    #[inline]
    fn or(&mut self, i: usize, which: usize, mask: u64) {
        if i >= self.room.n {
            return;
        }
        let w = (((i & (PAGE - 1)) >> 6) << 1) | which;
        if let Some(Some(page)) = self.pages.get_mut(i >> PAGE_BITS) {
            if let Some(w) = page.get_mut(w) {
                *w |= mask;
            }
            return;
        }
        let p = i >> PAGE_BITS;
        if self.room.take(p).is_none() {
            return;
        }
        let mut page = Box::new([0u64; PAGE_WORDS]);
        if let Some(w) = page.get_mut(w) {
            *w |= mask;
        }
        if let Some(slot) = self.pages.get_mut(p) {
            *slot = Some(page);
        }
    }

    /// The (holds metadata, stored refcount is one) words of the 64
    /// clusters holding cluster `i`: bit `i % 64` of each is `i`'s flag.
    #[inline]
    pub(super) fn words(&self, i: u64) -> (u64, u64) {
        let Ok(i) = usize::try_from(i) else {
            return (0, 0);
        };
        let w = ((i & (PAGE - 1)) >> 6) << 1;
        match self.pages.get(i >> PAGE_BITS) {
            Some(Some(page)) => (
                page.get(w | META).copied().unwrap_or(0),
                page.get(w | ONE).copied().unwrap_or(0),
            ),
            _ => (0, 0),
        }
    }

    /// (holds metadata, stored refcount is one) of cluster `i`.
    #[inline]
    pub(super) fn get(&self, i: u64) -> (bool, bool) {
        let Ok(i) = usize::try_from(i) else {
            return (false, false);
        };
        let o = i & (PAGE - 1);
        let w = (o >> 6) << 1;
        let bit = 1u64 << (o % 64);
        match self.pages.get(i >> PAGE_BITS) {
            Some(Some(page)) => (
                page.get(w).is_some_and(|x| x & bit != 0),
                page.get(w | ONE).is_some_and(|x| x & bit != 0),
            ),
            _ => (false, false),
        }
    }

    /// Whether cluster `i` holds metadata.
    #[inline]
    pub(super) fn meta(&self, i: u64) -> bool {
        self.get(i).0
    }

    /// Whether cluster `i`'s stored refcount is one.
    #[inline]
    pub(super) fn one(&self, i: u64) -> bool {
        self.get(i).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_widen_per_page_and_saturate() {
        let mut c = Counts::new(PAGE + 3, u64::MAX);
        assert!(matches!(c.pages[..], [Page::Empty, Page::Empty]));
        c.add(1, 250);
        c.add(1, 5);
        assert!(matches!(c.pages[..], [Page::Narrow(_), Page::Empty]));
        assert_eq!(c.get(1), 255);
        c.add(PAGE + 2, 7);
        c.add(1, 65_000);
        assert!(matches!(c.pages[..], [Page::Mid(_), Page::Narrow(_)]));
        assert_eq!((c.get(0), c.get(1), c.get(PAGE + 2)), (0, 65_255, 7));
        c.add(1, 281);
        assert!(matches!(c.pages[..], [Page::Wide(_), Page::Narrow(_)]));
        assert_eq!(c.get(1), 65_536);
        c.add(1, u32::MAX);
        c.add(PAGE + 3, 1);
        c.add(usize::MAX, 1);
        assert_eq!((c.get(1), c.get(PAGE + 3)), (u32::MAX, 0));
        // The last page holds only the clusters the file has.
        assert!(matches!(&c.pages[1], Page::Narrow(v) if v.len() == 3));
        let mut seg = vec![9];
        c.segment(PAGE - 1, 5, &mut seg);
        assert_eq!(seg, [0, 0, 0, 7, 0]);
        assert!(c.none_in(2, PAGE - 2) && !c.none_in(0, 2) && !c.none_in(PAGE, 3));
        assert!(!c.over());
    }

    #[test]
    fn add_run_is_add_per_cluster() {
        // Runs on empty, narrow and wide pages, near a byte's limit, at the
        // file's end (the last page is short), with 1, 2 and 200 references.
        let n = PAGE + 40;
        let mut a = Counts::new(n, u64::MAX);
        let mut b = Counts::new(n, u64::MAX);
        let runs = [
            (0usize, 64usize, 1u32),
            (3, 61, 2),
            (10, 5, 200),
            (8, 8, 60),
            (128, 64, 1),
            (130, 2, 70_000),
            (130, 10, 1),
            (PAGE + 32, 8, 2),
            (PAGE + 38, 10, 1),
        ];
        for (i, len, refs) in runs {
            a.add_run(i, len, refs);
            for j in i..i + len {
                b.add(j, refs);
            }
            for j in 0..n {
                assert_eq!(a.get(j), b.get(j), "run {i}+{len}, cluster {j}");
            }
        }
    }

    #[test]
    fn pages_are_allocated_where_touched_within_the_bound() {
        // 4 pages of file; room for two full pages and the short last one.
        let n = 3 * PAGE + 10;
        let max = 2 * PAGE as u64 + 10;
        let mut c = Counts::new(n, max);
        assert_eq!(c.next_page_from(0), None);
        c.add(3 * PAGE + 9, 1);
        c.add(PAGE + 5, 2);
        assert_eq!(c.next_page_from(0), Some(PAGE));
        assert_eq!(c.next_page_from(PAGE + 7), Some(PAGE + 7));
        assert_eq!(c.next_page_from(2 * PAGE), Some(3 * PAGE));
        assert_eq!(c.next_page_from(n), None);
        assert!(!c.over());
        c.add(0, 1);
        assert!(!c.over());
        // A fourth page passes the bound: refused, and said so.
        c.add(2 * PAGE, 1);
        assert!(c.over());
        assert_eq!((c.get(2 * PAGE), c.get(PAGE + 5)), (0, 2));

        let mut f = Flags::new(n, max);
        let page = PAGE as u64;
        f.set_one(page + 1);
        f.set_meta(3 * page + 9);
        f.set_one(3 * page + 10);
        f.set_one(u64::MAX);
        assert_eq!(
            (f.get(page + 1), f.get(3 * page + 9)),
            ((false, true), (true, false))
        );
        assert!(!f.one(page) && !f.meta(page + 1) && !f.one(3 * page + 10) && !f.over());
        f.set_meta(0);
        f.set_one(2 * page);
        assert!(f.over() && f.meta(0) && !f.one(2 * page));
    }

    #[test]
    fn set_ones_is_set_one_per_value() {
        let n = PAGE + 300;
        let values: Vec<u32> = (0..n).map(|i| [1, 0, 2, 1, 1][i % 5]).collect();
        for first in [0usize, 1, 63, 64, PAGE - 70, PAGE + 200] {
            let mut a = Flags::new(n, u64::MAX);
            let mut b = Flags::new(n, u64::MAX);
            let len = values.len().min(n - first.min(n)).min(3000);
            a.set_ones(first as u64, &values[..len + 5]);
            for (j, &v) in values[..len + 5].iter().enumerate() {
                if v == 1 && first + j < n {
                    b.set_one((first + j) as u64);
                }
            }
            for c in 0..n as u64 + 64 {
                assert_eq!(a.get(c), b.get(c), "first {first}, cluster {c}");
            }
        }
    }

    #[test]
    fn flags() {
        let mut f = Flags::new(130, u64::MAX);
        f.set_meta(129);
        f.set_one(64);
        f.set_one(1000);
        assert_eq!(
            (f.get(129), f.get(64), f.get(128)),
            ((true, false), (false, true), (false, false))
        );
        assert!(!f.one(1000));
    }
}
