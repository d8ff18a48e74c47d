//! Units of work: guest chunks, their holes, and how a chunk is filled.
//!
//! Work is split in guest chunks of 256 KiB or one cluster (one chunk for
//! a run of unallocated L1 entries without a backing image). Filling a
//! chunk maps it, reads contiguous host ranges with one positional read,
//! decompresses, and marks as holes the zero and unallocated ranges, data
//! lying in holes of the host file (not read), and all-zero 4 KiB blocks.

use crate::error::{Error, Result, What};
use crate::read::{Extent, ExtentKind};
use crate::source::Source;
use crate::Image;

/// Guest bytes per unit of work (at least one cluster). Small enough that
/// a chunk is still in the CPU cache when it is written (4 MiB chunks cost
/// twice the system time on a compressed image), large enough for
/// efficient positional reads and writes.
const CHUNK: u64 = 256 << 10;
/// Granularity of zero detection in data: holes smaller than a file
/// system block gain nothing.
const ZERO_BLOCK: usize = 4096;

/// A filled chunk: guest bytes `start .. start + len`, with the ranges
/// (relative to `start`) that read as zeros. `data` is empty for a chunk
/// that is one hole.
#[derive(Debug)]
pub(super) struct Chunk {
    pub start: u64,
    pub len: usize,
    pub data: Vec<u8>,
    /// Sorted, disjoint `(offset, len)` ranges of zeros.
    pub holes: Vec<(usize, usize)>,
}

/// One piece of a chunk, in order.
pub(super) enum Piece<'a> {
    /// Guest bytes at this guest offset.
    Data(u64, &'a [u8]),
    /// `len` zeros at this guest offset.
    Hole(u64, u64),
}

fn overflow(offset: u64) -> Error {
    Error::Overflow {
        what: What::L2Table,
        offset,
    }
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Chunk {
    /// A chunk that is one hole.
    pub fn hole(start: u64, len: usize) -> Chunk {
        Chunk {
            start,
            len,
            data: Vec::new(),
            holes: vec![(0, len)],
        }
    }

    /// The data and hole pieces, in guest order.
    pub fn pieces(&self) -> Vec<Piece<'_>> {
        let mut pos = 0usize;
        let mut out = Vec::with_capacity(self.holes.len().saturating_mul(2).saturating_add(1));
        let at = |off: usize| self.start.saturating_add(to_u64(off));
        let data = |from: usize, to: usize| self.data.get(from..to).unwrap_or(&[]);
        for &(off, len) in &self.holes {
            if off > pos {
                out.push(Piece::Data(at(pos), data(pos, off)));
            }
            out.push(Piece::Hole(at(off), to_u64(len)));
            pos = off.saturating_add(len);
        }
        if pos < self.len {
            out.push(Piece::Data(at(pos), data(pos, self.len)));
        }
        out
    }
}

/// The guest chunks of an image, in order: `(start, end, hole)`. A run of
/// unallocated L1 entries (without a backing image) or of entries whose
/// span is a hole is one hole chunk of any length; everything else is cut at multiples of the chunk size.
/// Derived from the L1 table and the hole spans alone, so every worker can walk the same
/// sequence and take its share.
pub(super) struct Chunks<'a, S> {
    image: &'a Image<S>,
    /// Per L1 entry: its span reads as zeros with nothing to read
    /// (`Conversion::holes`, from the audit's walk), like an unallocated
    /// entry without a backing image.
    holes: &'a [bool],
    chunk: u64,
    pos: u64,
}

pub(super) fn chunks<'a, S: Source>(image: &'a Image<S>, holes: &'a [bool]) -> Chunks<'a, S> {
    Chunks {
        image,
        holes,
        chunk: chunk_size(image),
        pos: 0,
    }
}

/// Guest bytes of a (non-hole) chunk: [`CHUNK`], or one cluster if larger.
pub(super) fn chunk_size<S: Source>(image: &Image<S>) -> u64 {
    CHUNK.max(image.geometry().cluster_size)
}

impl<S: Source> Iterator for Chunks<'_, S> {
    type Item = (u64, u64, bool);

    fn next(&mut self) -> Option<(u64, u64, bool)> {
        let image = self.image;
        let (pos, size) = (self.pos, image.virtual_size());
        if pos >= size {
            return None;
        }
        let bits = image.geometry().l2_span_bits();
        let span = image.geometry().l2_span();
        let backing = image.backing().is_some();
        let holes = self.holes;
        let unallocated = |i: u64| {
            usize::try_from(i)
                .ok()
                .and_then(|i| holes.get(i))
                .copied()
                .unwrap_or(false)
                || (!backing && matches!(image.l1_entry(i), Ok(e) if e.l2_offset.is_none()))
        };
        // End of the L2 span of L1 entry `i`, clipped to the disk.
        let span_end = |i: u64| {
            i.checked_add(1)
                .and_then(|n| n.checked_mul(span))
                .map_or(size, |e| e.min(size))
        };
        let mut l1 = pos >> bits;
        let (end, hole) = if unallocated(l1) {
            let mut end = span_end(l1);
            while end < size && unallocated(l1.saturating_add(1)) {
                l1 = l1.saturating_add(1);
                end = span_end(l1);
            }
            (end, true)
        } else {
            let next = pos
                .checked_div(self.chunk)
                .and_then(|k| k.checked_add(1))
                .and_then(|k| k.checked_mul(self.chunk))
                .unwrap_or(size);
            (next.min(size), false)
        };
        if end <= pos {
            // Cannot happen with the geometries QEMU allows; end the walk
            // rather than loop.
            self.pos = size;
            return Some((pos, size, false));
        }
        self.pos = end;
        Some((pos, end, hole))
    }
}

/// What a worker last learnt about the holes of the host file:
/// `start .. end` is all data (`data`) or all hole. Data extents of one
/// worker mostly follow each other on the host, so one `lseek` pair
/// answers for many chunks.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct HostRun {
    start: u64,
    end: u64,
    data: bool,
}

impl HostRun {
    /// The run holding host offset `host`, asking the file when unknown.
    fn at<S: Source>(&mut self, image: &Image<S>, host: u64) -> Result<HostRun> {
        if !(self.start..self.end).contains(&host) {
            *self = match image.host_data_run(host)? {
                None => HostRun {
                    start: host,
                    end: u64::MAX,
                    data: false,
                },
                Some((s, _)) if s > host => HostRun {
                    start: host,
                    end: s,
                    data: false,
                },
                Some((_, e)) => HostRun {
                    start: host,
                    end: e.max(host.saturating_add(1)),
                    data: true,
                },
            };
        }
        Ok(*self)
    }
}

/// What a worker keeps from one chunk to the next: where the host file's
/// holes are, and the scratch space for one compressed stream (reused, so
/// a compressed cluster costs no allocation and no zero-filling).
#[derive(Debug, Default)]
pub(super) struct Worker {
    runs: HostRun,
    stream: Vec<u8>,
}

/// Read guest range `start .. end` into `buf` (reused), noting its holes.
pub(super) fn fill<S: Source>(
    image: &Image<S>,
    start: u64,
    end: u64,
    mut buf: Vec<u8>,
    worker: &mut Worker,
) -> Result<Chunk> {
    let g = image.geometry();
    let cs = g.cluster_size;
    let len = end.checked_sub(start).ok_or_else(|| overflow(start))?;
    let n = usize::try_from(len).map_err(|_| overflow(start))?;
    // No clearing: every byte outside `holes` is overwritten below, and
    // bytes under holes are never written out (`Chunk::pieces`), so a
    // reused buffer is only resized (zero-filling a chunk per chunk cost
    // 80 % of a preallocated image's conversion).
    buf.resize(n, 0);
    let mut holes = Vec::new();
    let backing = image.backing().is_some();
    for e in image.map(start, len)? {
        let e = e?;
        let off = e
            .guest_offset
            .checked_sub(start)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(|| overflow(e.guest_offset))?;
        let elen = usize::try_from(e.len).map_err(|_| overflow(e.guest_offset))?;
        match e.kind {
            ExtentKind::Zero => push_hole(&mut holes, off, elen),
            ExtentKind::Unallocated if !backing => push_hole(&mut holes, off, elen),
            ExtentKind::Data { host } => {
                // Piece by piece along the data runs and holes of the file.
                let mut done = 0u64;
                while done < e.len {
                    let h = host.checked_add(done).ok_or_else(|| overflow(host))?;
                    let run = worker.runs.at(image, h)?;
                    let piece = run.end.saturating_sub(h).min(e.len.saturating_sub(done));
                    let p_off = usize::try_from(done)
                        .ok()
                        .and_then(|d| off.checked_add(d))
                        .ok_or_else(|| overflow(h))?;
                    let p_len = usize::try_from(piece).map_err(|_| overflow(h))?;
                    if run.data {
                        let sub = Extent {
                            guest_offset: e.guest_offset.saturating_add(done),
                            len: piece,
                            kind: ExtentKind::Data { host: h },
                        };
                        let part = slice(&mut buf, p_off, p_len, h)?;
                        image.read_extent(&sub, part)?;
                        find_zero_blocks(part, p_off, &mut holes);
                    } else {
                        push_hole(&mut holes, p_off, p_len);
                    }
                    done = done.saturating_add(piece);
                }
            }
            ExtentKind::Compressed(d)
                if e.len == cs && g.offset_in_cluster(e.guest_offset) == 0 =>
            {
                let part = slice(&mut buf, off, elen, e.guest_offset)?;
                image.read_compressed(&d, e.guest_offset, &mut worker.stream, part)?;
                find_zero_blocks(part, off, &mut holes);
            }
            ExtentKind::Unallocated | ExtentKind::Compressed(_) => {
                let part = slice(&mut buf, off, elen, e.guest_offset)?;
                image.read_extent(&e, part)?;
                find_zero_blocks(part, off, &mut holes);
            }
        }
    }
    Ok(Chunk {
        start,
        len: n,
        data: buf,
        holes,
    })
}

fn slice(buf: &mut [u8], off: usize, len: usize, at: u64) -> Result<&mut [u8]> {
    off.checked_add(len)
        .and_then(|end| buf.get_mut(off..end))
        .ok_or_else(|| overflow(at))
}

/// Add `(off, len)` to the sorted hole list, merging with the last hole.
fn push_hole(holes: &mut Vec<(usize, usize)>, off: usize, len: usize) {
    if let Some(last) = holes.last_mut() {
        if last.0.checked_add(last.1) == Some(off) {
            last.1 = last.1.saturating_add(len);
            return;
        }
    }
    holes.push((off, len));
}

/// Record the all-zero `ZERO_BLOCK`s of `data` (at chunk offset `base`;
/// blocks aligned to the chunk) as holes. Partial blocks at either end are
/// checked too: a short zero range costs nothing to skip.
fn find_zero_blocks(data: &[u8], base: usize, holes: &mut Vec<(usize, usize)>) {
    // The first block ends at the next multiple of ZERO_BLOCK after `base`.
    let first = ZERO_BLOCK
        .saturating_sub(base.checked_rem(ZERO_BLOCK).unwrap_or(0))
        .min(data.len());
    let (head, rest) = data.split_at(first);
    let mut at = base;
    for block in std::iter::once(head).chain(rest.chunks(ZERO_BLOCK)) {
        if !block.is_empty() && is_zero(block) {
            push_hole(holes, at, block.len());
        }
        at = at.saturating_add(block.len());
    }
}

/// Whether `b` is all zeros, a word at a time.
pub(super) fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    let body = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    body && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    fn zero_blocks_merge() {
        let mut data = vec![0u8; 3 * ZERO_BLOCK];
        data[ZERO_BLOCK + 5] = 1;
        let mut holes = vec![(0, 100)];
        find_zero_blocks(&data, 100, &mut holes);
        assert_eq!(
            holes,
            vec![(0, ZERO_BLOCK), (2 * ZERO_BLOCK, ZERO_BLOCK + 100)]
        );
        assert!(is_zero(&[0; 37]));
        assert!(!is_zero(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]));
    }
}
