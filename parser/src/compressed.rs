//! Compressed cluster descriptors and their payloads.
//!
//! Layout (x = 62 - (cluster_bits - 8)): bits 0..x-1 are the host *byte*
//! offset of the stream, bits x..61 the number of *additional* 512-byte
//! sectors after the one holding that offset. The host range is therefore
//! `offset .. (offset & !511) + (additional + 1) * 512`, which can cross a
//! host cluster boundary (with 512-byte clusters the count is a single bit
//! and a stream starting at byte 510 of a sector needs the next one).
//!
//! QEMU only writes a compressed cluster whose data is smaller than one
//! cluster, so a range longer than cluster_size + 511 is never QEMU's
//! doing: we call that inflation and reject it.

use crate::error::{Error, Result};
use crate::header::{CompressionType, Geometry};
use crate::qemu;

/// Bit 62 of an L2 entry: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 63 of an L2 entry: refcount is exactly one (never for compressed).
pub const OFLAG_COPIED: u64 = 1 << 63;

const SECTOR: u64 = 512;

/// A decoded compressed cluster descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Host byte offset where the compressed stream starts.
    pub host_offset: u64,
    /// Number of 512-byte sectors the stream may occupy, counting the
    /// sector that holds `host_offset` (the stored field plus one).
    pub sectors: u64,
}

impl Descriptor {
    /// Decode the descriptor bits (0..61) of an L2 entry.
    ///
    /// With 512-byte clusters the count of additional sectors is the single
    /// bit 61; `qemu-img convert -c` writes streams such as this one, which
    /// starts 2 bytes before a sector boundary and so needs the next sector:
    ///
    /// ```
    /// use qcow2_guard::compressed::{Descriptor, OFLAG_COMPRESSED};
    /// use qcow2_guard::Geometry;
    ///
    /// let g = Geometry::new(9, false, 4); // 512-byte clusters
    /// let entry = OFLAG_COMPRESSED | 1 << 61 | 0xbfe;
    /// let d = Descriptor::decode(entry, &g);
    /// assert_eq!(d, Descriptor { host_offset: 0xbfe, sectors: 2 });
    /// // Host bytes 0xbfe..0xe00: the end of cluster 5 and most of cluster 6.
    /// assert_eq!((d.start(), d.end(), d.span()), (0xbfe, 0xe00, 0x202));
    /// assert_eq!(d.host_clusters(&g), 5..=6);
    /// assert_eq!(d.encode(&g), entry);
    /// // Within cluster size + 511 bytes, and inside a file of 0xe00 bytes.
    /// d.validate(0x400, &g, 0xe00)?;
    /// # Ok::<(), qcow2_guard::Error>(())
    /// ```
    pub fn decode(entry: u64, g: &Geometry) -> Descriptor {
        // cluster_bits is 9..=21 for a valid geometry, so the shift is 49..=61.
        let count_bits = g.cluster_bits.saturating_sub(8);
        let shift = 62u32.saturating_sub(count_bits);
        let offset_mask = low_mask(shift);
        let count_mask = low_mask(count_bits);
        let extra = entry.checked_shr(shift).unwrap_or(0) & count_mask;
        Descriptor {
            host_offset: entry & offset_mask,
            sectors: extra.saturating_add(1),
        }
    }

    /// Encode as L2 entry bits (with bit 62 set). The caller must keep
    /// `sectors` in 1..=2^(cluster_bits-8).
    pub fn encode(&self, g: &Geometry) -> u64 {
        let count_bits = g.cluster_bits.saturating_sub(8);
        let shift = 62u32.saturating_sub(count_bits);
        let extra = self.sectors.saturating_sub(1) & low_mask(count_bits);
        OFLAG_COMPRESSED
            | (self.host_offset & low_mask(shift))
            | extra.checked_shl(shift).unwrap_or(0)
    }

    /// First host byte of the range.
    pub fn start(&self) -> u64 {
        self.host_offset
    }

    /// One past the last host byte the descriptor covers (saturating).
    pub fn end(&self) -> u64 {
        (self.host_offset & !(SECTOR - 1)).saturating_add(self.sectors.saturating_mul(SECTOR))
    }

    /// Length of the host range in bytes.
    pub fn span(&self) -> u64 {
        self.end().saturating_sub(self.start())
    }

    /// The longest span QEMU ever writes: one cluster plus the head of a
    /// sector.
    pub fn max_span(g: &Geometry) -> u64 {
        g.cluster_size.saturating_add(SECTOR - 1)
    }

    /// Check the descriptor found at file offset `entry_at` against the
    /// format and the file: offset bits above 55, a range past the end of
    /// the file, or inflation beyond `max_span`.
    pub fn validate(&self, entry_at: u64, g: &Geometry, file_len: u64) -> Result<()> {
        if self.host_offset >> qemu::MAX_HOST_OFFSET_BITS != 0 {
            return Err(Error::CompressedOffsetTooHigh {
                offset: entry_at,
                host_offset: self.host_offset,
            });
        }
        let max = Self::max_span(g);
        if self.span() > max {
            return Err(Error::CompressedInflation {
                offset: entry_at,
                span: self.span(),
                max,
            });
        }
        if self.end() > file_len && !self.tail_cut_by_eof(file_len) {
            return Err(Error::CompressedPastEof {
                offset: entry_at,
                start: self.start(),
                end: self.end(),
                file_len,
            });
        }
        Ok(())
    }

    /// Whether the file ends inside the last sector of the range. QEMU
    /// rounds the range up to whole sectors but does not pad the file after
    /// a compressed write at its end, so this is its own doing and is
    /// accepted; whether the stream is complete is for decompression to say.
    pub fn tail_cut_by_eof(&self, file_len: u64) -> bool {
        self.start() < file_len
            && self.end() > file_len
            && self.end().saturating_sub(file_len) < SECTOR
    }

    /// One past the last host byte that can be read for this stream in a
    /// file of `file_len` bytes (the range end, or the file end when
    /// [`Descriptor::tail_cut_by_eof`]).
    pub fn readable_end(&self, file_len: u64) -> u64 {
        self.end().min(file_len)
    }

    /// Host clusters the range touches (for refcount accounting).
    pub fn host_clusters(&self, g: &Geometry) -> std::ops::RangeInclusive<u64> {
        let first = g.cluster_index(self.start());
        let last = g.cluster_index(self.end().saturating_sub(1).max(self.start()));
        first..=last
    }
}

fn low_mask(bits: u32) -> u64 {
    1u64.checked_shl(bits)
        .map_or(u64::MAX, |v| v.wrapping_sub(1))
}

/// Decompress `input` into `out`, which must be exactly one cluster long.
///
/// The stream must fill `out` completely. A stream that ends early or is
/// corrupt is an error; a stream that would produce more than `out.len()`
/// bytes is an error too (QEMU silently drops the excess for deflate; a
/// hardened reader reports it). Never allocates more than `out`.
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

/// Decoder states alive in any thread (one per kind per thread that
/// decoded); for the test that every worker's state is freed before a
/// check or conversion returns.
static LIVE_STATES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A per-thread decoder state, counted in [`LIVE_STATES`].
struct Counted<T>(T);

impl<T> Counted<T> {
    fn new(state: T) -> Counted<T> {
        LIVE_STATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Counted(state)
    }
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        LIVE_STATES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How many per-thread decoder states are alive in the process.
#[doc(hidden)]
pub fn live_decoder_states() -> usize {
    LIVE_STATES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Inflate a raw deflate stream as QEMU does (`qcow2_zlib_decompress`:
/// `inflateInit2(-12)`, one `inflate(Z_FINISH)` into the cluster), with
/// zlib-rs, a port of zlib's inflate (see SECURITY.md for why not
/// miniz_oxide any more): the same block, code and distance rules as the
/// zlib QEMU links, distances checked against what the call has written.
/// QEMU also takes a stream that still has output when the cluster is
/// full (`Z_BUF_ERROR` with the output full); we refuse it.
fn inflate(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use zlib_rs::{Inflate, InflateFlush, Status};

    // The decoder state (about 7 KiB plus QEMU's 4 KiB window) is made
    // once per thread and reset per stream.
    thread_local! {
        static STATE: std::cell::RefCell<Option<Counted<Inflate>>> =
            const { std::cell::RefCell::new(None) };
    }
    let want = out.len();
    let (result, written) = STATE.with(|cell| {
        let mut run = |z: &mut Inflate| {
            let r = z.decompress(input, out, InflateFlush::Finish);
            (r, usize::try_from(z.total_out()).unwrap_or(usize::MAX))
        };
        match cell.try_borrow_mut() {
            Ok(mut slot) => {
                let z = match slot.as_mut() {
                    Some(z) => {
                        z.0.reset(false);
                        &mut z.0
                    }
                    None => &mut slot.insert(Counted::new(Inflate::new(false, 12))).0,
                };
                run(z)
            }
            // Not reachable (nothing here re-enters), but never worth a panic.
            Err(_) => run(&mut Inflate::new(false, 12)),
        }
    });
    match result {
        Ok(Status::StreamEnd) if written == want => Ok(()),
        Ok(Status::StreamEnd) => Err(format!(
            "deflate stream ended after {written} of {want} bytes"
        )),
        // The cluster is full and the stream still has symbols to emit.
        // QEMU silently drops them; we call it what it is.
        Ok(Status::Ok | Status::BufError) if written >= want => Err(format!(
            "deflate stream inflates past one cluster ({want} bytes)"
        )),
        Ok(Status::Ok | Status::BufError) => Err(format!(
            "deflate stream truncated after {written} of {want} bytes"
        )),
        Err(e) => Err(format!(
            "corrupt deflate stream ({}) after {written} bytes",
            e.as_str()
        )),
    }
}

/// Decode zstd frames the way QEMU does (`qcow2_zstd_decompress`), with
/// the same library: libzstd's streaming decoder, called until the cluster
/// is full; every call must make progress, and the call that fills the
/// cluster must end a frame. So libzstd decides frame headers, reserved
/// bits, dictionary IDs, skippable frames, window sizes (up to its default
/// 128 MiB limit, as in QEMU), declared content sizes and content
/// checksums, exactly as in QEMU; bytes after the frame that fills the
/// cluster are ignored, as in QEMU. See SECURITY.md for why libzstd and not
/// a pure-Rust decoder.
///
/// Memory: the output buffer is declared stable (`ZSTD_d_stableOutBuffer`),
/// so libzstd decodes straight into `out` and allocates no window buffer,
/// whatever window a frame declares; the context itself is about 160 KiB
/// plus one 128 KiB input block, reused per thread.
fn unzstd(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use zstd_safe::{get_error_name, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};

    thread_local! {
        static DCTX: std::cell::RefCell<Option<Counted<DCtx<'static>>>> =
            const { std::cell::RefCell::new(None) };
    }
    let want = out.len();
    DCTX.with(|cell| {
        let mut slot = cell
            .try_borrow_mut()
            .map_err(|_| "zstd context busy".to_string())?;
        let err = |what: &str, code: usize| format!("{what}: {}", get_error_name(code));
        if slot.is_none() {
            // Parameters survive a session reset: set once per context.
            let mut dctx =
                DCtx::try_create().ok_or_else(|| "cannot allocate a zstd context".to_string())?;
            dctx.set_parameter(DParameter::StableOutBuffer(true))
                .map_err(|c| err("zstd parameter", c))?;
            *slot = Some(Counted::new(dctx));
        }
        let dctx = &mut slot
            .as_mut()
            .ok_or_else(|| "cannot allocate a zstd context".to_string())?
            .0;
        dctx.reset(ResetDirective::SessionOnly)
            .map_err(|c| err("zstd reset", c))?;
        let mut output = OutBuffer::around(out);
        let mut src = InBuffer::around(input);
        let mut hint = 0usize;
        while output.pos() < want {
            let (in_before, out_before) = (src.pos(), output.pos());
            hint = dctx.decompress_stream(&mut output, &mut src).map_err(|c| {
                // With a stable output buffer, libzstd reports a frame
                // that needs more room than the cluster this way.
                if get_error_name(c) == "Destination buffer is too small" {
                    return format!("zstd stream inflates past one cluster ({want} bytes)");
                }
                let filled = output.pos();
                err(&format!("corrupt zstd stream after {filled} of {want} bytes"), c)
            })?;
            if src.pos() <= in_before && output.pos() <= out_before {
                return Err(format!(
                    "zstd stream ended after {} of {want} bytes",
                    output.pos()
                ));
            }
        }
        if hint != 0 {
            return Err(format!(
                "zstd frame does not end with the cluster ({want} bytes): it inflates past it or is cut"
            ));
        }
        Ok(())
    })
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn one_bit_count_of_512_byte_clusters() {
        let g = Geometry::new(9, false, 4);
        // offset 0xbfe, one additional sector: bit 61 set.
        let entry = OFLAG_COMPRESSED | (1 << 61) | 0xbfe;
        let d = Descriptor::decode(entry, &g);
        assert_eq!(
            d,
            Descriptor {
                host_offset: 0xbfe,
                sectors: 2
            }
        );
        assert_eq!((d.start(), d.end(), d.span()), (0xbfe, 0xe00, 0x202));
        assert_eq!(d.encode(&g), entry);
        assert_eq!(d.host_clusters(&g), 5..=6);
        d.validate(0, &g, 0xe00).unwrap();
        // The file may end inside the last sector (QEMU does not pad).
        d.validate(8, &g, 0xdff).unwrap();
        d.validate(8, &g, 0xc01).unwrap();
        assert!(d.tail_cut_by_eof(0xc01));
        assert_eq!(d.readable_end(0xc01), 0xc01);
        // Not when a whole sector is missing, or the stream starts past EOF.
        assert_eq!(
            d.validate(8, &g, 0xc00).unwrap_err().code(),
            "compressed_past_eof"
        );
        assert_eq!(
            d.validate(8, &g, 0xbfe).unwrap_err().code(),
            "compressed_past_eof"
        );
    }

    #[test]
    fn count_field_width_follows_cluster_bits() {
        for bits in 9..=21 {
            let g = Geometry::new(bits, false, 4);
            let max_sectors = 1u64 << (bits - 8);
            let d = Descriptor {
                host_offset: 0x1234567,
                sectors: max_sectors,
            };
            let aligned = Descriptor {
                host_offset: 0x1234400,
                sectors: max_sectors,
            };
            let e = d.encode(&g);
            assert_eq!(Descriptor::decode(e, &g), d, "cluster_bits {bits}");
            // The largest field value describes two clusters: inflation.
            assert_eq!(d.span(), 2 * g.cluster_size - 0x167);
            assert_eq!(aligned.span(), 2 * g.cluster_size);
            assert_eq!(
                aligned.validate(0, &g, u64::MAX).unwrap_err().code(),
                "compressed_inflation"
            );
            // One sector more than a cluster, from mid-sector: what QEMU writes.
            let qemu = Descriptor {
                host_offset: 0x1234567,
                sectors: (g.cluster_size >> 9) + 1,
            };
            assert!(qemu.span() <= Descriptor::max_span(&g));
            qemu.validate(0, &g, u64::MAX).unwrap();
        }
    }

    /// A zstd frame declaring a `window`-byte window and no content size,
    /// made of `blocks` RLE blocks of `block` bytes each.
    fn zstd_rle_frame(window_exp: u8, block: u32, blocks: usize) -> Vec<u8> {
        let mut f = 0xFD2F_B528u32.to_le_bytes().to_vec();
        f.push(0x00); // no content size, not single segment, no checksum
        f.push(window_exp << 3); // window 2^(10 + exp)
        for i in 0..blocks {
            let last = u32::from(i + 1 == blocks);
            let h = last | (1 << 1) | (block << 3);
            f.extend_from_slice(&h.to_le_bytes()[..3]);
            f.push(0x5a);
        }
        f
    }

    #[test]
    fn deflate_must_fill_exactly_one_cluster() {
        use miniz_oxide::deflate::compress_to_vec;
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let stream = compress_to_vec(&data, 6);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Deflate, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        // Trailing bytes after the final block (sector padding) are fine.
        let mut padded = stream.clone();
        padded.extend_from_slice(&[0xff; 300]);
        decompress(CompressionType::Deflate, &padded, &mut out).unwrap();
        // Too short: the stream ends before the cluster is full.
        let short = compress_to_vec(&data[..1000], 6);
        let e = decompress(CompressionType::Deflate, &short, &mut out).unwrap_err();
        assert!(e.contains("ended after 1000"), "{e}");
        // Cut off: the input ends mid-stream.
        let e = decompress(
            CompressionType::Deflate,
            &stream[..stream.len() / 2],
            &mut out,
        )
        .unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        // A bomb: 8 MiB of zeros in about 8 KiB, into a 64 KiB cluster.
        let bomb = compress_to_vec(&vec![0u8; 8 << 20], 10);
        assert!(bomb.len() < 65536);
        let e = decompress(CompressionType::Deflate, &bomb, &mut out).unwrap_err();
        assert!(e.contains("past one cluster"), "{e}");
        // Garbage.
        let e = decompress(CompressionType::Deflate, &[0xff; 512], &mut out).unwrap_err();
        assert!(e.contains("corrupt") || e.contains("truncated"), "{e}");
    }

    #[test]
    fn zstd_must_fill_exactly_one_cluster() {
        let mut out = vec![0u8; 65536];
        // Exactly one cluster in one 64 KiB RLE block.
        decompress(
            CompressionType::Zstd,
            &zstd_rle_frame(6, 65536, 1),
            &mut out,
        )
        .unwrap();
        assert!(out.iter().all(|&b| b == 0x5a));
        // Two frames filling it together, as QEMU accepts.
        let mut two = zstd_rle_frame(6, 32768, 1);
        two.extend(zstd_rle_frame(6, 32768, 1));
        decompress(CompressionType::Zstd, &two, &mut out).unwrap();
        // A bomb: 16 blocks of 64 KiB (1 MiB) into a 64 KiB cluster.
        let e = decompress(
            CompressionType::Zstd,
            &zstd_rle_frame(6, 65536, 16),
            &mut out,
        )
        .unwrap_err();
        assert!(e.contains("past one cluster"), "{e}");
        // Windows up to libzstd's default limit of 128 MiB decode, as in
        // QEMU (the `zstd` CLI writes 8 MiB windows); 256 MiB is refused.
        for exp in [13, 17] {
            decompress(
                CompressionType::Zstd,
                &zstd_rle_frame(exp, 65536, 1),
                &mut out,
            )
            .unwrap();
        }
        let e = decompress(
            CompressionType::Zstd,
            &zstd_rle_frame(18, 65536, 1),
            &mut out,
        )
        .unwrap_err();
        assert!(e.contains("Frame requires too much memory"), "{e}");
        // Ends early, then padding that is no frame.
        let mut short = zstd_rle_frame(6, 4096, 1);
        short.extend_from_slice(&[0; 64]);
        let e = decompress(CompressionType::Zstd, &short, &mut out).unwrap_err();
        assert!(e.contains("corrupt zstd stream after 4096"), "{e}");
        // Input cut mid-frame; garbage.
        let full = zstd_rle_frame(6, 8192, 8);
        let e = decompress(CompressionType::Zstd, &full[..full.len() - 6], &mut out).unwrap_err();
        assert!(!e.is_empty());
        let e = decompress(CompressionType::Zstd, &[0xff; 512], &mut out).unwrap_err();
        assert!(e.contains("corrupt"), "{e}");
    }

    #[test]
    fn offset_bits_above_55() {
        let g = Geometry::new(9, false, 4);
        let d = Descriptor::decode(OFLAG_COMPRESSED | (1 << 58), &g);
        assert_eq!(d.host_offset, 1 << 58);
        assert_eq!(
            d.validate(0, &g, u64::MAX).unwrap_err().code(),
            "compressed_offset_too_high"
        );
    }
}
