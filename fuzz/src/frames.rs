//! Built compressed streams for the `decompress` target: a valid zstd frame
//! or raw-deflate stream made from the fuzz input by the C libraries QEMU
//! links (libzstd, zlib), with its content length, block boundaries, frame
//! header flags (content size, checksum), concatenated frames and trailing
//! bytes drawn from the input, then one edit near a decision point (the
//! end cut by a few bytes, bytes appended, a header or checksum byte
//! changed).
//!
//! libzstd and zlib are C: libFuzzer sees no edges inside them, so random
//! bytes almost never become a frame whose end, size or checksum sits at
//! one of the decoder's decisions. Built here, every input is such a frame.
//!
//! Oracles, on the stream alone and on the stream placed in a file behind
//! a compressed-cluster descriptor written from the format's definition:
//! - the differential against QEMU's call sequence on the C libraries
//!   ([`qemu_decompress::differential`]);
//! - ground truth the recipe knows without any decoder: a complete stream
//!   whose content is exactly one cluster (one frame or several, any
//!   blocks, trailing bytes after its end or not) decodes to that content;
//!   a zstd stream whose content is not exactly one cluster, or whose end
//!   is cut by one byte or more, is refused (QEMU insists that the frame
//!   filling the cluster ends there); a stream whose content is shorter
//!   than the cluster is refused (either kind); deflate content longer
//!   than the cluster is refused (the documented stricter class: the parser
//!   does not drop the excess as QEMU does).

use arbitrary::Arbitrary;
use flate2::{Compress, Compression, FlushCompress};
use qcow2_guard::compressed::{self, Descriptor};
use qcow2_guard::{CompressionType, Geometry};
use zstd_safe::zstd_sys::ZSTD_EndDirective as EndDirective;
use zstd_safe::{CCtx, CParameter, InBuffer, OutBuffer};

use crate::qemu_decompress;

/// How one stream is built and edited.
#[derive(Debug, Arbitrary)]
pub struct Recipe {
    /// Content length: one cluster plus `len_delta` folded to -3..=3
    /// (mostly exactly one cluster), or, when `far`, a length anywhere
    /// in 0..2 clusters.
    len_delta: i8,
    far: Option<u16>,
    /// Content: these bytes repeated, each round shifted by `step`.
    data: Vec<u8>,
    step: u8,
    /// Compression level (folded; negative levels are libzstd's fast ones).
    level: u8,
    /// Zstd: the content checksum flag, the content size flag.
    checksum: bool,
    content_size: bool,
    /// Zstd: split the content into two frames at this point (folded).
    split: Option<u16>,
    /// Flush (end a block) at these content offsets (folded; at most 8).
    flushes: Vec<u16>,
    /// Deflate: a full flush (else a sync flush) at the flush points.
    full_flush: bool,
    /// Where the stream starts in the host file (folded to 0..2048).
    offset: u16,
    /// The one edit.
    edit: FrameEdit,
    /// Cut the file at the stream end (QEMU does not pad the last
    /// compressed write), else pad it to the descriptor's sector end with
    /// `pad`.
    cut_file: bool,
    pad: u8,
}

/// One edit of the built stream.
#[derive(Debug, Arbitrary)]
pub enum FrameEdit {
    /// None: the stream as built.
    None,
    /// Cut the last `n % 8 + 1` bytes.
    CutEnd(u8),
    /// Append bytes after the stream's end.
    Append(Vec<u8>),
    /// Zstd: a skippable frame of `len % 16` bytes before, between the
    /// frames or after the stream.
    Skippable { len: u8, place: u8 },
    /// Set the byte at `at` (folded: mostly in the first 16 bytes or the
    /// last 8, where the frame header, block headers and checksum are).
    Set { at: u16, from_end: bool, value: u8 },
    /// Flip bits of the byte at `at` (as `Set`).
    Xor { at: u16, from_end: bool, mask: u8 },
}

fn zstd_level(b: u8) -> i32 {
    [1, 1, 3, 3, 6, 9, -1, -5][usize::from(b % 8)]
}

/// A zstd frame of `content` (flushing at `flushes`), `None` when libzstd
/// refuses a parameter.
fn zstd_frame(content: &[u8], r: &Recipe, flushes: &[usize]) -> Option<Vec<u8>> {
    let mut cctx = CCtx::try_create()?;
    cctx.set_parameter(CParameter::CompressionLevel(zstd_level(r.level)))
        .ok()?;
    cctx.set_parameter(CParameter::ChecksumFlag(r.checksum))
        .ok()?;
    cctx.set_parameter(CParameter::ContentSizeFlag(r.content_size))
        .ok()?;
    cctx.set_pledged_src_size(Some(content.len() as u64)).ok()?;
    let mut out: Vec<u8> = Vec::with_capacity(zstd_safe::compress_bound(content.len()) + 256);
    for (at, p, last) in pieces(content.len(), flushes) {
        let directive = if last {
            EndDirective::ZSTD_e_end
        } else {
            EndDirective::ZSTD_e_flush
        };
        let mut input = InBuffer::around(&content[at..p]);
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity().max(4096));
            }
            let pos = out.len();
            let mut o = OutBuffer::around_pos(&mut out, pos);
            let left = cctx.compress_stream2(&mut o, &mut input, directive).ok()?;
            if left == 0 && input.pos == input.src.len() {
                break;
            }
        }
    }
    Some(out)
}

/// The pieces `(start, end, last)` of a `len`-byte content cut at the
/// flush points `flushes` (in order; clamped into the content), the last
/// piece ending at `len`.
fn pieces(len: usize, flushes: &[usize]) -> Vec<(usize, usize, bool)> {
    let mut out = Vec::new();
    let mut at = 0;
    for p in flushes.iter().copied().chain(std::iter::once(len)) {
        let p = p.clamp(at, len);
        let last = p == len;
        out.push((at, p, last));
        at = p;
        if last {
            break;
        }
    }
    out
}

/// A raw-deflate stream (4 KiB window, as QEMU writes) of `content`.
fn deflate_stream(content: &[u8], r: &Recipe, flushes: &[usize]) -> Option<Vec<u8>> {
    let mut z =
        Compress::new_with_window_bits(Compression::new(u32::from(r.level % 10)), false, 12);
    let mut out: Vec<u8> = Vec::with_capacity(content.len() + content.len() / 8 + 1024);
    for (at, p, last) in pieces(content.len(), flushes) {
        let flush = match (last, r.full_flush) {
            (true, _) => FlushCompress::Finish,
            (false, true) => FlushCompress::Full,
            (false, false) => FlushCompress::Sync,
        };
        let mut input = &content[at..p];
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity().max(4096));
            }
            let before = z.total_in();
            let status = z.compress_vec(input, &mut out, flush).ok()?;
            let used = usize::try_from(z.total_in() - before).ok()?;
            input = &input[used..];
            let room = out.capacity() - out.len();
            match status {
                flate2::Status::StreamEnd => break,
                _ if !last && input.is_empty() && room > 0 => break,
                _ => {}
            }
        }
    }
    Some(out)
}

/// A skippable zstd frame with `len` bytes of data.
fn skippable(len: usize) -> Vec<u8> {
    let mut f = 0x184D_2A50u32.to_le_bytes().to_vec();
    f.extend_from_slice(&(len as u32).to_le_bytes());
    f.extend(std::iter::repeat_n(0xA5, len));
    f
}

/// The position an edit at `at` names in a stream of `len` bytes.
fn edit_at(at: u16, from_end: bool, len: usize) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let at = usize::from(at);
    // Mostly the first 16 / last 8 bytes; every position now and then.
    let i = if at & 0x8000 != 0 {
        at % len
    } else if from_end {
        len.saturating_sub(1 + at % 8)
    } else {
        at % 16 % len
    };
    Some(i)
}

/// What the recipe says the parser must do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    /// Decode to the content.
    Accept,
    /// Refuse.
    Refuse,
    /// Not known without a decoder (the differential alone).
    Unknown,
}

/// Build the stream that `cluster_bits`, `kind` and `recipe` describe and
/// hold the parser to QEMU's decoders and to what the recipe knows.
pub fn built(cluster_bits: u32, kind: CompressionType, r: &Recipe) {
    let g = Geometry::new(cluster_bits, false, 4);
    let cluster = g.cluster_size as usize;
    let len = match r.far {
        Some(n) => usize::from(n) % (2 * cluster),
        None => cluster.saturating_add_signed(isize::from(r.len_delta % 4)),
    };
    let content: Vec<u8> = if r.data.is_empty() {
        vec![0; len]
    } else {
        (0..len)
            .map(|i| {
                let round = (i / r.data.len()) as u8;
                r.data[i % r.data.len()].wrapping_add(round.wrapping_mul(r.step))
            })
            .collect()
    };
    let mut flushes: Vec<usize> = r
        .flushes
        .iter()
        .take(8)
        .map(|&f| usize::from(f) % (len + 1))
        .collect();
    flushes.sort_unstable();

    let zstd = kind == CompressionType::Zstd;
    let split = r.split.filter(|_| zstd).map(|s| usize::from(s) % (len + 1));
    let mut stream = Vec::new();
    let mut between = None;
    let parts: Vec<&[u8]> = match split {
        Some(s) => vec![&content[..s], &content[s..]],
        None => vec![&content[..]],
    };
    // Where (in the stream) the frame whose content ends exactly at the
    // cluster's end ends: QEMU stops there, the rest is trailing bytes.
    let mut fills_at = None;
    let mut base = 0;
    for part in parts {
        let local: Vec<usize> = flushes
            .iter()
            .filter(|&&f| f > base && f < base + part.len())
            .map(|&f| f - base)
            .collect();
        let built = if zstd {
            zstd_frame(part, r, &local)
        } else {
            deflate_stream(part, r, &local)
        };
        let Some(built) = built else { return };
        stream.extend_from_slice(&built);
        base += part.len();
        between.get_or_insert(stream.len());
        if base == cluster && fills_at.is_none() {
            fills_at = Some(stream.len());
        }
    }

    // Accepted iff a frame (deflate: the one stream) ends exactly when the
    // cluster is full; else the content is shorter than the cluster (never
    // fills it) or longer (zstd's frame does not end with the cluster,
    // deflate's excess is the stricter class).
    let mut truth = if fills_at.is_some() {
        Truth::Accept
    } else {
        Truth::Refuse
    };
    // Bytes after the stream: ignored once the cluster is full, but a
    // stream that has not filled it goes on into them.
    let after = |truth: Truth| {
        if truth == Truth::Accept {
            truth
        } else {
            Truth::Unknown
        }
    };
    match &r.edit {
        FrameEdit::None => {}
        FrameEdit::CutEnd(n) => {
            let n = usize::from(n % 8) + 1;
            stream.truncate(stream.len().saturating_sub(n));
            // The stream's last bytes carry its end: a zstd frame's last
            // block or checksum, deflate's final end-of-block code. Cut
            // past the frame that fills the cluster, only trailing bytes
            // are lost.
            if fills_at.is_none_or(|at| stream.len() < at) {
                truth = Truth::Refuse;
            }
        }
        FrameEdit::Append(tail) => {
            stream.extend_from_slice(tail);
            truth = after(truth);
        }
        FrameEdit::Skippable { len: n, place } => {
            if !zstd {
                return;
            }
            let f = skippable(usize::from(n % 16));
            let at = match place % 3 {
                0 => 0,
                1 => between.unwrap_or(0),
                _ => stream.len(),
            };
            stream.splice(at..at, f);
            truth = if place % 3 == 2 {
                after(truth)
            } else {
                Truth::Unknown
            };
        }
        FrameEdit::Set {
            at,
            from_end,
            value,
        } => {
            if let Some(i) = edit_at(*at, *from_end, stream.len()) {
                if stream[i] != *value {
                    stream[i] = *value;
                    truth = Truth::Unknown;
                }
            }
        }
        FrameEdit::Xor { at, from_end, mask } => {
            if let Some(i) = edit_at(*at, *from_end, stream.len()) {
                if *mask != 0 {
                    stream[i] ^= *mask;
                    truth = Truth::Unknown;
                }
            }
        }
    }

    let judge = |stream: &[u8], what: &str| {
        qemu_decompress::differential(kind, stream, cluster);
        let mut out = vec![0u8; cluster];
        let got = compressed::decompress(kind, stream, &mut out);
        match truth {
            Truth::Accept => {
                if let Err(e) = got {
                    panic!(
                        "{kind:?}, {cluster}-byte cluster, {what}: a complete stream of one cluster's content ({} bytes, {r:?}) is refused: {e}",
                        stream.len()
                    );
                }
                assert!(
                    out[..] == content[..cluster],
                    "{kind:?}, {cluster}-byte cluster, {what}: decodes to other bytes than its content ({r:?})"
                );
            }
            Truth::Refuse => assert!(
                got.is_err(),
                "{kind:?}, {cluster}-byte cluster, {what}: accepted, yet its content is {len} bytes or its end is cut ({} bytes, {r:?})",
                stream.len()
            ),
            Truth::Unknown => {}
        }
    };
    judge(&stream, "the stream alone");

    // The same stream in a host file, behind a descriptor written from the
    // format's definition: x = 62 - (cluster_bits - 8) offset bits, then the
    // count of 512-byte sectors after the first.
    let offset = u64::from(r.offset % 2048);
    let end = offset + stream.len() as u64;
    let sectors = end.div_ceil(512) - offset / 512;
    let count_bits = cluster_bits - 8;
    if stream.is_empty() || sectors > 1 << count_bits {
        return;
    }
    let shift = 62 - count_bits;
    let entry = (1u64 << 62) | ((sectors - 1) << shift) | offset;
    let mut file = vec![r.pad; offset as usize];
    file.extend_from_slice(&stream);
    if !r.cut_file {
        file.resize(end.next_multiple_of(512) as usize, r.pad);
    }
    let d = Descriptor::decode(entry, &g);
    assert_eq!(d.start(), offset, "descriptor {entry:#x}: start");
    assert_eq!(
        d.end(),
        end.next_multiple_of(512),
        "descriptor {entry:#x}: end"
    );
    let within = d.span() <= g.cluster_size + 511;
    match d.validate(0, &g, file.len() as u64) {
        Ok(()) => {
            assert!(within, "descriptor {entry:#x}: span {} accepted", d.span());
            let from = d.start() as usize;
            let to = d.readable_end(file.len() as u64) as usize;
            assert!(
                to >= end as usize,
                "descriptor {entry:#x}: readable to {to}, the stream ends at {end}"
            );
            let span = &file[from..to];
            // The span holds the stream and then padding: for a stream the
            // recipe knows to be complete, padding is trailing bytes.
            // The span holds the stream, then padding to the sector's end:
            // bytes after a complete stream are ignored (zlib and QEMU's
            // zstd loop stop at the end that fills the cluster), but the
            // padding may put back what a cut took.
            if span.len() > stream.len() && matches!(r.edit, FrameEdit::CutEnd(_)) {
                return;
            }
            judge(span, "behind its descriptor");
        }
        Err(e) => assert!(
            !within,
            "descriptor {entry:#x} over a {}-byte file ({} sectors from {offset}): refused: {e}",
            file.len(),
            sectors
        ),
    }
}
