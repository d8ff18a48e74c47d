//! Guest data: what the virtual disk of an opened image contains.
//!
//! Three ways in, all built on the same mapping walk:
//! - [`Image::map`]: an iterator of [`Extent`]s over a guest range (data,
//!   zero, unallocated, compressed, with host offsets), the equivalent of
//!   `qemu-img map`. Adjacent clusters of the same kind are merged, data
//!   extents only while their host ranges are contiguous, so one extent is
//!   one positional read.
//! - [`Image::read_at`]: fill a buffer from a guest offset.
//! - [`GuestReader`]: an `io::Read + io::Seek` adapter.
//!
//! Every cluster the walk touches goes through [`Image::cluster`], which
//! validates the L1 and L2 entries and the host range they point to before
//! anything is read. Unallocated clusters read as zeros unless the caller
//! supplied a backing image with [`Image::set_backing`]; the library never
//! opens a backing file named inside an image. A compressed cluster must
//! decompress to exactly one cluster, into a buffer of exactly one cluster.
//!
//! ```
//! use std::io::{Read, Seek, SeekFrom};
//!
//! use qcow2_guard::build::{GuestCluster, ImageModel};
//! use qcow2_guard::{ExtentKind, Image};
//!
//! let built = ImageModel {
//!     cluster_bits: 12, // 4 KiB clusters
//!     clusters: vec![
//!         GuestCluster::Data(1),
//!         GuestCluster::Data(2),
//!         GuestCluster::Zero,
//!         GuestCluster::Compressed(3),
//!         GuestCluster::Unallocated,
//!     ],
//!     ..ImageModel::default()
//! }
//! .build()?;
//! // `built.guest` is what the virtual disk must contain.
//! let image = Image::open(built.bytes.as_slice())?;
//!
//! // Any range, across cluster boundaries.
//! let mut buf = vec![0u8; 10_000];
//! image.read_at(3000, &mut buf)?;
//! assert_eq!(buf, built.guest[3000..13_000]);
//!
//! // The two data clusters are contiguous on the host: one extent.
//! let extents = image.map(0, image.virtual_size())?.collect::<Result<Vec<_>, _>>()?;
//! let kinds: Vec<_> = extents.iter().map(|e| (e.guest_offset, e.len, e.kind)).collect();
//! assert!(matches!(kinds[0], (0, 8192, ExtentKind::Data { .. })));
//! assert_eq!(kinds[1], (8192, 4096, ExtentKind::Zero));
//! assert!(matches!(kinds[2], (12_288, 4096, ExtentKind::Compressed(_))));
//! assert_eq!(kinds[3], (16_384, 4096, ExtentKind::Unallocated));
//!
//! // io::Read + io::Seek over the whole disk.
//! let mut disk = Vec::new();
//! image.reader().read_to_end(&mut disk)?;
//! assert_eq!(disk, built.guest);
//! let mut reader = image.reader();
//! reader.seek(SeekFrom::Start(12_288))?;
//! let mut head = [0u8; 16];
//! reader.read_exact(&mut head)?;
//! assert_eq!(head, built.guest[12_288..12_304]);
//!
//! // Reads outside the virtual disk are errors, never short reads.
//! let err = image.read_at(image.virtual_size() - 1, &mut [0u8; 2]).unwrap_err();
//! assert_eq!(err.code(), "out_of_virtual_bounds");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;
use std::sync::Arc;

use crate::compressed::Descriptor;
use crate::error::{Error, Result, What};
use crate::header::{field, CryptMethod};
use crate::image::Image;
pub use crate::image::{Backing, RawBacking};
use crate::l1l2::{Cluster, L2Table, SubclusterState};
use crate::source::{read_into, Source};

/// What a guest range maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Guest data stored uncompressed at `host` (in the image file, or in
    /// the external data file when the image has one), contiguous for the
    /// whole extent.
    Data {
        /// Host offset of the extent's first guest byte.
        host: u64,
    },
    /// Reads as zeros (v3 zero flag, or zero subclusters).
    Zero,
    /// Not allocated: reads from the backing image if one was supplied,
    /// else as zeros.
    Unallocated,
    /// Part or all of one compressed cluster (never merged with anything).
    Compressed(Descriptor),
}

/// A guest range of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First guest byte.
    pub guest_offset: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// What the range maps to.
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.guest_offset.saturating_add(self.len)
    }

    /// Whether the range reads as zeros without a backing image (zero or
    /// unallocated).
    pub fn is_zero_without_backing(&self) -> bool {
        matches!(self.kind, ExtentKind::Zero | ExtentKind::Unallocated)
    }
}

impl<S: Source> Backing for Image<S> {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(offset, buf)
    }
}

/// Iterator over the [`Extent`]s of a guest range; see [`Image::map`].
///
/// Stops after the first error.
pub struct Map<'a, S> {
    image: &'a Image<S>,
    pos: u64,
    end: u64,
    failed: bool,
    /// The L2 table last used and its L1 index (see [`Image::cluster`]).
    table: Option<(u64, Arc<L2Table>)>,
}

impl<S: Source> std::fmt::Debug for Map<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map")
            .field("pos", &self.pos)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl<S: Source> Iterator for Map<'_, S> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Result<Extent>> {
        if self.failed || self.pos >= self.end {
            return None;
        }
        match self.extent_at(self.pos) {
            Ok(e) => {
                self.pos = e.end();
                Some(Ok(e))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl<S: Source> Map<'_, S> {
    /// The longest extent starting at `pos`, clipped to the range.
    fn extent_at(&mut self, pos: u64) -> Result<Extent> {
        let (kind, run_end) = self.image.run_at(pos, &mut self.table)?;
        let mut e = Extent {
            guest_offset: pos,
            len: run_end.min(self.end).saturating_sub(pos),
            kind,
        };
        if matches!(kind, ExtentKind::Compressed(_)) {
            return Ok(e);
        }
        // Merge following runs of the same kind. A run that fails to
        // decode ends the extent; the error surfaces on the next call.
        while e.end() < self.end {
            let Ok((next, next_end)) = self.image.run_at(e.end(), &mut self.table) else {
                break;
            };
            let joins = match (e.kind, next) {
                (ExtentKind::Zero, ExtentKind::Zero)
                | (ExtentKind::Unallocated, ExtentKind::Unallocated) => true,
                (ExtentKind::Data { host: a }, ExtentKind::Data { host: b }) => {
                    a.checked_add(e.len) == Some(b)
                }
                _ => false,
            };
            if !joins {
                break;
            }
            e.len = next_end.min(self.end).saturating_sub(e.guest_offset);
        }
        Ok(e)
    }
}

impl<S: Source> Image<S> {
    /// The extents of guest range `offset .. offset + len`, in order.
    /// The range must lie within the virtual disk.
    pub fn map(&self, offset: u64, len: u64) -> Result<Map<'_, S>> {
        let end = self.check_guest_range(offset, len)?;
        self.check_readable()?;
        Ok(Map {
            image: self,
            pos: offset,
            end,
            failed: false,
            table: None,
        })
    }

    /// Fill `buf` with guest data from `guest_offset`. The range must lie
    /// within the virtual disk.
    pub fn read_at(&self, guest_offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = u64::try_from(buf.len()).map_err(|_| Error::Overflow {
            what: What::VirtualDisk,
            offset: guest_offset,
        })?;
        for e in self.map(guest_offset, len)? {
            let e = e?;
            let start = usize::try_from(e.guest_offset.saturating_sub(guest_offset));
            let n = usize::try_from(e.len);
            let part = match (start, n) {
                (Ok(s), Ok(n)) => s.checked_add(n).and_then(|end| buf.get_mut(s..end)),
                _ => None,
            }
            .ok_or(Error::Overflow {
                what: What::VirtualDisk,
                offset: e.guest_offset,
            })?;
            self.read_extent(&e, part)?;
        }
        Ok(())
    }

    /// Fill `buf` with the first `buf.len()` guest bytes of extent `e` (as
    /// returned by [`Image::map`]); `buf` must not be longer than the
    /// extent.
    pub fn read_extent(&self, e: &Extent, buf: &mut [u8]) -> Result<()> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if len > e.len {
            return Err(Error::OutOfVirtualBounds {
                offset: e.guest_offset,
                len,
                size: e.len,
            });
        }
        match e.kind {
            ExtentKind::Zero => {
                buf.fill(0);
                Ok(())
            }
            ExtentKind::Unallocated => self.read_backing_range(e.guest_offset, buf),
            ExtentKind::Data { host } => read_into(self.data_source()?, host, buf),
            ExtentKind::Compressed(d) => {
                let g = self.geometry();
                let cluster = g.cluster_start(e.guest_offset);
                let within = g.offset_in_cluster(e.guest_offset);
                if within == 0 && len == g.cluster_size {
                    return self.read_compressed(&d, cluster, &mut Vec::new(), buf);
                }
                // A partial cluster (a short read, or the last cluster of a
                // disk whose size is not a multiple of the cluster size).
                let cs = usize::try_from(g.cluster_size).map_err(|_| Error::Overflow {
                    what: What::CompressedCluster,
                    offset: d.start(),
                })?;
                let mut whole = vec![0u8; cs];
                self.read_compressed(&d, cluster, &mut Vec::new(), &mut whole)?;
                let from = usize::try_from(within).unwrap_or(usize::MAX);
                let src = from
                    .checked_add(buf.len())
                    .and_then(|to| whole.get(from..to))
                    .ok_or_else(|| Error::Overflow {
                        what: What::CompressedCluster,
                        offset: d.start(),
                    })?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// The next run of data at or after host offset `host` in the file
    /// holding uncompressed guest data (the image file, or the external
    /// data file): `Some((start, end))`, or `None` when nothing there
    /// holds data. Guest data of a [`ExtentKind::Data`] extent that lies
    /// in a hole of that file reads as zeros, so a converter may skip
    /// reading it (as `qemu-img convert` does). Sources that do not know
    /// their holes report everything as data.
    pub fn host_data_run(&self, host: u64) -> Result<Option<(u64, u64)>> {
        self.data_source()?
            .data_run(host)
            .map_err(|source| Error::Io {
                offset: host,
                len: 0,
                source,
            })
    }

    /// A reader over the whole virtual disk, starting at guest offset 0.
    pub fn reader(&self) -> GuestReader<'_, S> {
        GuestReader {
            image: self,
            pos: 0,
            buf: Vec::new(),
            buf_start: 0,
        }
    }

    /// `offset + len`, if the range lies within the virtual disk.
    fn check_guest_range(&self, offset: u64, len: u64) -> Result<u64> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(end),
            _ => Err(Error::OutOfVirtualBounds { offset, len, size }),
        }
    }

    /// Guest data cannot be read from encrypted images.
    fn check_readable(&self) -> Result<()> {
        match self.header().crypt() {
            Some(CryptMethod::None) => Ok(()),
            _ => Err(Error::Encrypted {
                offset: field::CRYPT_METHOD,
            }),
        }
    }

    /// The kind of the guest bytes at `pos` and where that run ends: within
    /// one cluster, or a whole L2 span when the L1 entry is unallocated.
    fn run_at(
        &self,
        pos: u64,
        table: &mut Option<(u64, Arc<L2Table>)>,
    ) -> Result<(ExtentKind, u64)> {
        let g = *self.geometry();
        let size = self.virtual_size();
        let l1_index = pos >> g.l2_span_bits();
        if self.l1_entry(l1_index)?.l2_offset.is_none() {
            let span_end = l1_index
                .saturating_add(1)
                .saturating_mul(g.l2_span())
                .min(size);
            return Ok((ExtentKind::Unallocated, span_end));
        }
        let cluster = self.cluster_via(pos, table)?;
        let start = g.cluster_start(pos);
        let within = g.offset_in_cluster(pos);
        let cluster_end = start.saturating_add(g.cluster_size).min(size);
        let kind = match cluster {
            Cluster::Unallocated => ExtentKind::Unallocated,
            Cluster::Zero { .. } => ExtentKind::Zero,
            Cluster::Data { host, .. } => ExtentKind::Data {
                host: host.saturating_add(within),
            },
            Cluster::Compressed(d) => ExtentKind::Compressed(d),
            Cluster::Subclusters { .. } => {
                // Walk the subclusters from the one holding `pos` while
                // they stay of the same kind (data subclusters of one
                // cluster are contiguous on the host).
                let sc_bits = g.subcluster_size.trailing_zeros();
                let first = u32::try_from(within >> sc_bits).unwrap_or(u32::MAX);
                let state = cluster.subcluster(first, &g);
                let same = |i: u32| {
                    matches!(
                        (state, cluster.subcluster(i, &g)),
                        (SubclusterState::Zero, SubclusterState::Zero)
                            | (SubclusterState::Unallocated, SubclusterState::Unallocated)
                            | (SubclusterState::Data(_), SubclusterState::Data(_))
                    )
                };
                let count = u32::try_from(g.subclusters).unwrap_or(1);
                let mut last = first.saturating_add(1);
                while last < count && same(last) {
                    last = last.saturating_add(1);
                }
                let run_end = start
                    .saturating_add(u64::from(last) << sc_bits)
                    .min(cluster_end);
                let kind = match state {
                    SubclusterState::Unallocated => ExtentKind::Unallocated,
                    SubclusterState::Zero => ExtentKind::Zero,
                    SubclusterState::Data(h) => ExtentKind::Data {
                        host: h.saturating_add(pos.saturating_sub(start) & !(u64::MAX << sc_bits)),
                    },
                    SubclusterState::Compressed(d) => ExtentKind::Compressed(d),
                };
                return Ok((kind, run_end));
            }
        };
        Ok((kind, cluster_end))
    }

    /// Fill `buf` from the backing image at guest `offset`, with zeros past
    /// its end (or everywhere without one).
    fn read_backing_range(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(backing) = self.backing() else {
            buf.fill(0);
            return Ok(());
        };
        let avail = backing.size().saturating_sub(offset);
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        if !head.is_empty() {
            backing.read_backing(offset, head)?;
        }
        tail.fill(0);
        Ok(())
    }
}

/// `io::Read + io::Seek` over the virtual disk of an image, reading whole
/// clusters into a one-cluster buffer when asked for less (so small reads
/// of a compressed cluster decompress it once). Errors surface as
/// `io::ErrorKind::InvalidData` wrapping the [`Error`].
pub struct GuestReader<'a, S> {
    image: &'a Image<S>,
    pos: u64,
    /// Guest bytes `buf_start .. buf_start + buf.len()`.
    buf: Vec<u8>,
    buf_start: u64,
}

impl<S: Source> GuestReader<'_, S> {
    /// Current guest offset.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Bytes already buffered at the current position.
    fn buffered(&self) -> Option<&[u8]> {
        let off = self.pos.checked_sub(self.buf_start)?;
        let off = usize::try_from(off).ok()?;
        self.buf.get(off..).filter(|b| !b.is_empty())
    }
}

impl<S: Source> std::fmt::Debug for GuestReader<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestReader")
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

fn to_io(e: Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: Source> io::Read for GuestReader<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let size = self.image.virtual_size();
        let left = size.saturating_sub(self.pos);
        if left == 0 || out.is_empty() {
            return Ok(0);
        }
        let mut n = usize::try_from(left).unwrap_or(usize::MAX).min(out.len());
        if let Some(b) = self.buffered() {
            n = n.min(b.len());
            let (dst, src) = (out.get_mut(..n), b.get(..n));
            if let (Some(dst), Some(src)) = (dst, src) {
                dst.copy_from_slice(src);
            }
        } else {
            let g = self.image.geometry();
            let start = g.cluster_start(self.pos);
            let end = start.saturating_add(g.cluster_size).min(size);
            let cluster_left = usize::try_from(end.saturating_sub(self.pos)).unwrap_or(0);
            if n >= cluster_left {
                // At least the rest of this cluster: read straight through.
                let dst = out.get_mut(..n).unwrap_or(&mut []);
                self.image.read_at(self.pos, dst).map_err(to_io)?;
            } else {
                let len = usize::try_from(end.saturating_sub(start)).unwrap_or(0);
                self.buf.resize(len, 0);
                self.buf_start = start;
                if let Err(e) = self.image.read_at(start, &mut self.buf) {
                    self.buf.clear();
                    return Err(to_io(e));
                }
                let from = usize::try_from(self.pos.saturating_sub(start)).unwrap_or(0);
                let src = from.checked_add(n).and_then(|to| self.buf.get(from..to));
                match (out.get_mut(..n), src) {
                    (Some(dst), Some(src)) => dst.copy_from_slice(src),
                    _ => return Ok(0),
                }
            }
        }
        self.pos = self
            .pos
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        Ok(n)
    }
}

impl<S: Source> io::Seek for GuestReader<'_, S> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let (base, delta) = match to {
            io::SeekFrom::Start(n) => {
                self.pos = n;
                return Ok(n);
            }
            io::SeekFrom::End(d) => (self.image.virtual_size(), d),
            io::SeekFrom::Current(d) => (self.pos, d),
        };
        match base.checked_add_signed(delta) {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }
}
