//! What `qemu-img map` reports for an image chain: one record per run of
//! guest bytes with the same block status (start, length, depth, present,
//! zero, data, compressed, and the host offset when QEMU knows one).
//!
//! The rules, measured with qemu-img 10.0.2 (and read in QEMU's
//! `qcow2_co_block_status`, `bdrv_co_block_status` and `img_map`):
//! - a qcow2 layer reports data clusters and allocated subclusters as data
//!   with their host offset; zero clusters and zero subclusters as zero,
//!   with the host offset when a host cluster is still allocated
//!   (`ZERO_ALLOC`); compressed clusters as data and compressed, without an
//!   offset; an unallocated subcluster of an allocated cluster as
//!   unallocated but with its host offset (`UNALLOCATED_ALLOC`);
//! - a range a layer does not allocate is asked of the next layer down,
//!   limited to that layer's size (`depth` counts the layers passed), and
//!   the host offset is the last layer's; the bottom layer, or a layer
//!   whose backing image ends before the range, reports it as zero and not
//!   present;
//! - a raw layer reports file data as data and file holes as zero, both at
//!   the same offset as the guest's;
//! - adjacent records merge when every field is equal, they come from the
//!   same file, and their host offsets (if any) are contiguous; an empty
//!   range gives one record of length 0.
//!
//! - QEMU guesses that an image is "metadata preallocated" when its
//!   refcounted clusters reach `max(allocated * 10 / 9, allocated + 2)`,
//!   `allocated` being the clusters' worth of blocks the image file
//!   occupies (`qcow2_detect_metadata_preallocation`; QEMU's own writes
//!   leave holes in partly written clusters, so ordinary images can
//!   qualify). In such an image a data range is also looked up in the file
//!   that holds it: a hole there (or the end of the file) is reported as
//!   data *and* zero, and a record never spans a data/hole boundary of
//!   that file.
//!
//! Every table entry is read through [`Image::cluster`], the same checked
//! path as guest reads.

use crate::error::{Error, Result};
use crate::header::{field, CryptMethod};
use crate::image::Image;
use crate::l1l2::Cluster;
use crate::read::RawBacking;
use crate::refcount;
use crate::source::Source;

/// Which file of a layer holds a record's host offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapFile {
    /// The layer's own file (the qcow2 image, or the raw file).
    Image,
    /// The external data file of a qcow2 layer.
    DataFile,
}

/// One record of `qemu-img map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes (0 only for an empty range).
    pub length: u64,
    /// Layers passed before the one that answered (0 = the top image).
    pub depth: usize,
    /// Whether that layer allocates the range (data or zero).
    pub present: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether the range holds data.
    pub data: bool,
    /// Whether the data is compressed.
    pub compressed: bool,
    /// Host offset of `start`, when QEMU reports one.
    pub offset: Option<u64>,
    /// Where `offset` lies: the layer (index in the chain) and which of its
    /// files; `None` without an offset.
    pub file: Option<(usize, MapFile)>,
}

impl MapEntry {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.length)
    }

    /// qemu-img's `entry_mergeable`: `next` continues this record.
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.length != 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.file == next.file
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// What one layer says about the bytes at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerStatus {
    /// Bytes of the same status from the offset (at least 1).
    pub len: u64,
    /// The layer holds data there.
    pub data: bool,
    /// The range reads as zeros.
    pub zero: bool,
    /// The data is compressed.
    pub compressed: bool,
    /// Host offset of the first byte, when known.
    pub offset: Option<u64>,
    /// Which file `offset` is in.
    pub file: MapFile,
}

impl LayerStatus {
    fn unallocated(len: u64, offset: Option<u64>, file: MapFile) -> LayerStatus {
        LayerStatus {
            len,
            data: false,
            zero: false,
            compressed: false,
            offset,
            file,
        }
    }
}

/// A layer of an image chain, as `qemu-img map` sees it.
pub trait MapLayer {
    /// The guest size QEMU exposes (whole 512-byte sectors for qcow2).
    fn map_size(&self) -> u64;

    /// The status of the bytes from `offset` (below [`MapLayer::map_size`]),
    /// for at most `max` bytes (`max >= 1`).
    fn block_status(&self, offset: u64, max: u64) -> Result<LayerStatus>;

    /// Whether the layer's guest reads fall through to a backing image of
    /// its own where it holds nothing (a qcow2 image opened with a backing
    /// image attached). Where such a layer is the last of a chain, an
    /// unallocated range is not known to read as zeros: the backing
    /// image's bytes are read there.
    fn reads_below(&self) -> bool {
        false
    }
}

/// A qcow2 image as a [`MapLayer`].
pub struct Qcow2Layer<'a, S> {
    image: &'a Image<S>,
    /// QEMU's "metadata preallocated" guess (see the module documentation).
    preallocated: bool,
}

impl<S: Source> std::fmt::Debug for Qcow2Layer<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Layer")
            .field("preallocated", &self.preallocated)
            .finish_non_exhaustive()
    }
}

impl<'a, S: Source> Qcow2Layer<'a, S> {
    /// Wrap `image`, making QEMU's preallocation guess once (it reads the
    /// refcount blocks covering the file, up to the threshold).
    pub fn new(image: &'a Image<S>) -> Qcow2Layer<'a, S> {
        Qcow2Layer {
            image,
            preallocated: metadata_preallocated(image),
        }
    }

    /// Whether QEMU would treat the image as metadata preallocated.
    pub fn preallocated(&self) -> bool {
        self.preallocated
    }
}

/// `qcow2_detect_metadata_preallocation`: whether the clusters with a
/// non-zero refcount reach the threshold. Errors reading refcounts mean
/// "no", as in QEMU.
pub fn metadata_preallocated<S: Source>(image: &Image<S>) -> bool {
    let Some(real) = image.source().allocated_bytes() else {
        return false;
    };
    let g = image.geometry();
    let real_clusters = real.checked_div(g.cluster_size).unwrap_or(0);
    let threshold = (real_clusters.saturating_mul(10) / 9).max(real_clusters.saturating_add(2));
    let end_cluster = image.file_len().div_ceil(g.cluster_size.max(1));
    let per = g.refcount_block_entries.max(1);
    let (mut count, mut i) = (0u64, 0u64);
    while i < end_cluster && count < threshold {
        let table_index = i.checked_div(per).unwrap_or(0);
        let block_end = table_index
            .saturating_add(1)
            .saturating_mul(per)
            .min(end_cluster);
        match image.refcount_block(table_index) {
            Err(_) => return false,
            Ok(None) => i = block_end,
            Ok(Some(block)) => {
                while i < block_end && count < threshold {
                    let n =
                        refcount::get(&block, g.refcount_order, i.checked_rem(per).unwrap_or(0))
                            .unwrap_or(0);
                    count = count.saturating_add(u64::from(n != 0));
                    i = i.saturating_add(1);
                }
            }
        }
    }
    count >= threshold
}

impl<S: Source> MapLayer for Qcow2Layer<'_, S> {
    fn map_size(&self) -> u64 {
        self.image.virtual_size() & !511
    }

    fn reads_below(&self) -> bool {
        self.image.backing().is_some()
    }

    fn block_status(&self, pos: u64, max: u64) -> Result<LayerStatus> {
        let st = self.image_status(pos, max)?;
        if !(self.preallocated && st.data && !st.zero) {
            return Ok(st);
        }
        let Some(host) = st.offset else {
            return Ok(st);
        };
        // QEMU's BDRV_BLOCK_RECURSE: ask the file holding the data.
        let file_len = match self.image.data_file() {
            Some(df) if self.image.header().has_data_file() => df.len(),
            _ => self.image.file_len(),
        };
        if host >= file_len {
            return Ok(LayerStatus { zero: true, ..st });
        }
        Ok(match self.image.host_data_run(host)? {
            Some((s, e)) if s <= host => LayerStatus {
                len: st.len.min(e.saturating_sub(host)).max(1),
                ..st
            },
            Some((s, _)) => LayerStatus {
                len: st.len.min(s.saturating_sub(host)).max(1),
                zero: true,
                ..st
            },
            // A hole up to the end of the file.
            None => LayerStatus { zero: true, ..st },
        })
    }
}

impl<S: Source> Qcow2Layer<'_, S> {
    /// What the image's own tables say about the bytes at `pos`.
    fn image_status(&self, pos: u64, max: u64) -> Result<LayerStatus> {
        let image = self.image;
        if image.header().crypt() != Some(CryptMethod::None) {
            return Err(Error::Encrypted {
                offset: field::CRYPT_METHOD,
            });
        }
        let g = *image.geometry();
        let end = pos.saturating_add(max).min(self.map_size());
        let file = if image.header().has_data_file() {
            MapFile::DataFile
        } else {
            MapFile::Image
        };
        let l1_index = pos >> g.l2_span_bits();
        if image.l1_entry(l1_index)?.l2_offset.is_none() {
            let span_end = l1_index.saturating_add(1).saturating_mul(g.l2_span());
            let len = span_end.min(end).saturating_sub(pos);
            return Ok(LayerStatus::unallocated(len, None, file));
        }
        let start = g.cluster_start(pos);
        let within = g.offset_in_cluster(pos);
        let cluster_len = start
            .saturating_add(g.cluster_size)
            .min(end)
            .saturating_sub(pos);
        let at = |host: u64| host.saturating_add(within);
        let st = match image.cluster(pos)? {
            Cluster::Unallocated => LayerStatus::unallocated(cluster_len, None, file),
            Cluster::Zero { host, .. } => LayerStatus {
                zero: true,
                offset: host.map(at),
                ..LayerStatus::unallocated(cluster_len, None, file)
            },
            Cluster::Data { host, .. } => LayerStatus {
                data: true,
                offset: Some(at(host)),
                ..LayerStatus::unallocated(cluster_len, None, file)
            },
            Cluster::Compressed(_) => LayerStatus {
                data: true,
                compressed: true,
                ..LayerStatus::unallocated(cluster_len, None, file)
            },
            Cluster::Subclusters {
                host, alloc, zero, ..
            } => {
                // The run of subclusters in the same state as the one
                // holding `pos`.
                let sc_bits = g.subcluster_size.trailing_zeros();
                let first = u32::try_from(within >> sc_bits).unwrap_or(u32::MAX);
                let state = |i: u32| {
                    let bit = 1u32.checked_shl(i).unwrap_or(0);
                    (alloc & bit != 0, zero & bit != 0)
                };
                let mine = state(first);
                let count = u32::try_from(g.subclusters).unwrap_or(1);
                let mut last = first.saturating_add(1);
                while last < count && state(last) == mine {
                    last = last.saturating_add(1);
                }
                let run_end = start.saturating_add(u64::from(last) << sc_bits);
                let len = run_end.min(end).saturating_sub(pos);
                LayerStatus {
                    data: mine.0,
                    zero: mine.1,
                    offset: host.map(at),
                    ..LayerStatus::unallocated(len, None, file)
                }
            }
        };
        Ok(st)
    }
}

impl<S: Source> MapLayer for RawBacking<S> {
    fn map_size(&self) -> u64 {
        self.0.len()
    }

    fn block_status(&self, pos: u64, max: u64) -> Result<LayerStatus> {
        let end = pos.saturating_add(max).min(self.0.len());
        let run = self.0.data_run(pos).map_err(|source| Error::Io {
            offset: pos,
            len: 0,
            source,
        })?;
        let (data, until) = match run {
            Some((s, e)) if s <= pos => (true, e),
            Some((s, _)) => (false, s),
            None => (false, end),
        };
        Ok(LayerStatus {
            len: until.min(end).saturating_sub(pos).max(1),
            data,
            zero: !data,
            compressed: false,
            offset: Some(pos),
            file: MapFile::Image,
        })
    }
}

/// The record for the bytes at `pos` (below `end`), asking the layers of
/// `chain` (top first) in turn, as qemu-img's `get_block_status` does.
pub(crate) fn entry_at(chain: &[&dyn MapLayer], pos: u64, end: u64) -> Result<MapEntry> {
    let mut bytes = end.saturating_sub(pos);
    for (depth, layer) in chain.iter().enumerate() {
        let st = layer.block_status(pos, bytes)?;
        bytes = st.len.clamp(1, bytes.max(1));
        let present = st.data || st.zero;
        let below = chain
            .get(depth.saturating_add(1))
            .map(|next| next.map_size())
            .filter(|&size| pos < size);
        if let (false, Some(size)) = (present, below) {
            bytes = bytes.min(size.saturating_sub(pos));
            continue;
        }
        return Ok(MapEntry {
            start: pos,
            length: bytes,
            depth,
            present,
            // Not allocated anywhere below: reads as zeros, unless the
            // last layer reads from a backing image the chain leaves out.
            zero: st.zero || (!present && !layer.reads_below()),
            data: st.data,
            compressed: st.compressed,
            offset: st.offset,
            file: st.offset.map(|_| (depth, st.file)),
        });
    }
    Err(Error::OutOfVirtualBounds {
        offset: pos,
        len: bytes,
        size: 0,
    })
}

/// The `qemu-img map` records of guest range `start .. start + len` of the
/// image chain `chain` (the top image first, then its backing images),
/// clipped to the top image's size, each passed to `emit` in order as soon
/// as it is complete (memory does not grow with the image). `emit` returns
/// `false` to stop early. A range past the end gives one empty record, as
/// qemu-img prints.
pub fn qemu_map(
    chain: &[&dyn MapLayer],
    start: u64,
    len: u64,
    mut emit: impl FnMut(&MapEntry) -> bool,
) -> Result<()> {
    let Some(top) = chain.first() else {
        return Ok(());
    };
    let end = start.saturating_add(len).min(top.map_size());
    let mut curr = MapEntry {
        start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
        file: None,
    };
    while curr.end() < end {
        let next = entry_at(chain, curr.end(), end)?;
        if curr.mergeable(&next) {
            curr.length = curr.length.saturating_add(next.length);
            continue;
        }
        if curr.length > 0 && !emit(&curr) {
            return Ok(());
        }
        curr = next;
    }
    emit(&curr);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{GuestCluster, ImageModel};

    fn records(bytes: &[u8]) -> Vec<MapEntry> {
        let image = Image::open(bytes).unwrap();
        let layer = Qcow2Layer::new(&image);
        let mut out = Vec::new();
        qemu_map(&[&layer], 0, u64::MAX, |e| {
            out.push(*e);
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn kinds_and_merging() {
        let built = ImageModel {
            cluster_bits: 12,
            clusters: vec![
                GuestCluster::Data(1),
                GuestCluster::Data(2),
                GuestCluster::Zero,
                GuestCluster::Compressed(3),
                GuestCluster::Compressed(4),
                GuestCluster::Unallocated,
            ],
            ..ImageModel::default()
        }
        .build()
        .unwrap();
        let r = records(&built.bytes);
        let kinds: Vec<_> = r
            .iter()
            .map(|e| (e.start, e.length, e.present, e.zero, e.data, e.compressed))
            .collect();
        assert_eq!(kinds[0], (0, 8192, true, false, true, false));
        assert!(r[0].offset.is_some());
        assert_eq!(kinds[1], (8192, 4096, true, true, false, false));
        // Compressed clusters have no offset, so adjacent ones merge.
        assert_eq!(kinds[2], (12_288, 8192, true, false, true, true));
        assert_eq!(r[2].offset, None);
        assert_eq!(kinds[3].0..kinds[3].0 + kinds[3].1, 20_480..r[3].end());
        assert_eq!((kinds[3].2, kinds[3].3, kinds[3].4), (false, true, false));
        assert_eq!(
            r.last().unwrap().end(),
            Image::open(&built.bytes[..]).unwrap().virtual_size()
        );
    }

    #[test]
    fn empty_range_gives_one_empty_record() {
        let built = ImageModel::default().build().unwrap();
        let image = Image::open(built.bytes.as_slice()).unwrap();
        let mut out = Vec::new();
        qemu_map(&[&Qcow2Layer::new(&image)], image.virtual_size(), 10, |e| {
            out.push(*e);
            true
        })
        .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].length, out[0].present, out[0].zero),
            (0, false, false)
        );
    }

    #[test]
    fn backing_layer_answers_unallocated_ranges() {
        let top = ImageModel {
            cluster_bits: 12,
            clusters: vec![GuestCluster::Unallocated, GuestCluster::Data(1)],
            ..ImageModel::default()
        }
        .build()
        .unwrap();
        let top = Image::open(top.bytes.as_slice()).unwrap();
        let base = RawBacking(vec![7u8; 4096]);
        let mut out = Vec::new();
        qemu_map(&[&Qcow2Layer::new(&top), &base], 0, u64::MAX, |e| {
            out.push(*e);
            true
        })
        .unwrap();
        assert_eq!((out[0].depth, out[0].length, out[0].data), (1, 4096, true));
        assert_eq!(out[0].file, Some((1, MapFile::Image)));
        assert_eq!((out[1].depth, out[1].start, out[1].data), (0, 4096, true));
        // Past the raw backing's end: zero at depth 0, not present.
        if let Some(rest) = out.get(2) {
            assert_eq!((rest.depth, rest.present, rest.zero), (0, false, true));
        }
    }
}
