//! The decompression oracle: QEMU's own call sequence on the C libraries
//! QEMU links (zlib and libzstd), and the differential that holds the
//! parser's decoders to it.
//!
//! QEMU (block/qcow2-threads.c) decompresses one compressed cluster into a
//! buffer of exactly one cluster:
//! - deflate: `inflateInit2(-12)` (raw deflate, 4 KiB window), one
//!   `inflate(Z_FINISH)` over the whole input; success iff it returned
//!   `Z_STREAM_END` or `Z_BUF_ERROR` *and* the output is full;
//! - zstd: a fresh `ZSTD_DCtx` with default parameters, and
//!   `ZSTD_decompressStream` in a loop while the output is not full; any
//!   error, or a call that consumes no input and produces no output, fails;
//!   after the loop the last return value must be 0 (the frame that filled
//!   the cluster ended exactly there).
//!
//! [`qemu_decompress`] is that sequence written here (not copied) on
//! `flate2` (zlib backend) and `zstd-safe` (libzstd): the C libraries, not a
//! second Rust decoder. `fuzz/tests/qemu_decompress.rs` checks the model
//! against `qemu-img convert` on crafted images.
//!
//! [`differential`] runs both decoders on one stream and asserts:
//! - the parser accepts ⇒ QEMU accepts, with the same bytes;
//! - QEMU accepts and the parser refuses ⇒ the stream is in one of the
//!   [`Stricter`] classes, each a deliberate, documented difference.

use flate2::{Decompress, FlushDecompress, Status};
use qcow2_guard::compressed;
use qcow2_guard::CompressionType;
use zstd_safe::{DCtx, InBuffer, OutBuffer};

/// What QEMU's decompression made of a stream that it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accepted {
    /// Deflate: the stream reached its end (`Z_STREAM_END`) exactly when
    /// the cluster was full; false when zlib stopped with the cluster full
    /// and the stream unfinished (`Z_BUF_ERROR`), which QEMU accepts.
    /// Always true for zstd (QEMU insists the frame ends there).
    pub stream_ended: bool,
    /// Zstd: the largest window (bytes) any frame QEMU started declared.
    pub max_window: u64,
    /// Zstd: a skippable frame was passed over.
    pub skippable: bool,
}

/// Decompress `src` into `dest` (one cluster) as QEMU does; `Err` with
/// QEMU's reason (it reports only EIO) when QEMU fails the read.
pub fn qemu_decompress(
    kind: CompressionType,
    src: &[u8],
    dest: &mut [u8],
) -> Result<Accepted, String> {
    match kind {
        CompressionType::Deflate => qemu_zlib(src, dest),
        CompressionType::Zstd => qemu_zstd(src, dest),
    }
}

fn qemu_zlib(src: &[u8], dest: &mut [u8]) -> Result<Accepted, String> {
    // Raw deflate (no zlib header), windowBits 12.
    let mut z = Decompress::new_with_window_bits(false, 12);
    let status = z
        .decompress(src, dest, FlushDecompress::Finish)
        .map_err(|e| format!("zlib: {e}"))?;
    let full = z.total_out() == dest.len() as u64;
    match status {
        Status::StreamEnd if full => Ok(Accepted {
            stream_ended: true,
            ..Accepted::default()
        }),
        Status::BufError if full => Ok(Accepted::default()),
        s => Err(format!("zlib: {s:?} with {} bytes out", z.total_out())),
    }
}

/// First four bytes (little-endian) of every zstd frame.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// The window a frame starting at `frame` declares (its content size for
/// a single-segment frame); `None` when it is no zstd frame or is cut.
pub fn zstd_window(frame: &[u8]) -> Option<u64> {
    let magic = u32::from_le_bytes(frame.get(..4)?.try_into().ok()?);
    if magic != ZSTD_MAGIC {
        return None;
    }
    let fhd = *frame.get(4)?;
    let single_segment = fhd & 0x20 != 0;
    if !single_segment {
        let wd = *frame.get(5)?;
        let log = 10 + u32::from(wd >> 3);
        let base = 1u64 << log;
        return Some(base + (base / 8) * u64::from(wd & 7));
    }
    // Single segment: the window is the content size, after the
    // dictionary ID field.
    let did_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_len = [1usize, 2, 4, 8][usize::from(fhd >> 6)];
    let at = 5 + did_len;
    let raw = frame.get(at..at + fcs_len)?;
    let mut le = [0u8; 8];
    le[..fcs_len].copy_from_slice(raw);
    let v = u64::from_le_bytes(le);
    Some(if fcs_len == 2 { v + 256 } else { v })
}

/// Whether the four bytes at `frame` are a skippable frame's magic.
fn skippable_magic(frame: &[u8]) -> bool {
    frame
        .get(..4)
        .and_then(|m| m.try_into().ok())
        .map(u32::from_le_bytes)
        .is_some_and(|m| m & 0xFFFF_FFF0 == 0x184D_2A50)
}

fn qemu_zstd(src: &[u8], dest: &mut [u8]) -> Result<Accepted, String> {
    let mut dctx = DCtx::create();
    let mut input = InBuffer::around(src);
    let size = dest.len();
    let mut output = OutBuffer::around(dest);
    let mut accepted = Accepted {
        stream_ended: true,
        ..Accepted::default()
    };
    // QEMU's `zstd_ret`: 0 when the last call finished a frame.
    let mut last = 0usize;
    while output.pos() < size {
        let (in_before, out_before) = (input.pos, output.pos());
        if last == 0 {
            // A frame starts here (the previous call finished one).
            let rest = src.get(in_before..).unwrap_or(&[]);
            accepted.skippable |= skippable_magic(rest);
            if let Some(w) = zstd_window(rest) {
                accepted.max_window = accepted.max_window.max(w);
            }
        }
        last = dctx
            .decompress_stream(&mut output, &mut input)
            .map_err(|code| format!("zstd: {}", zstd_safe::get_error_name(code)))?;
        if input.pos <= in_before && output.pos() <= out_before {
            return Err(format!("zstd: no progress at input {in_before}"));
        }
    }
    if last != 0 {
        return Err("zstd: the frame goes on past the cluster".into());
    }
    Ok(accepted)
}

/// Why the parser may refuse a stream QEMU accepts: each a deliberate
/// difference (SECURITY.md, "Where QEMU disagrees with itself, and where
/// we are stricter").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stricter {
    /// Deflate: the stream had not ended when the cluster was full (QEMU
    /// silently drops the rest).
    DeflateNotEnded,
}

/// The class, if any, that lets the parser refuse what QEMU accepted.
pub fn stricter_class(kind: CompressionType, got: &Accepted) -> Option<Stricter> {
    match kind {
        CompressionType::Deflate if !got.stream_ended => Some(Stricter::DeflateNotEnded),
        _ => None,
    }
}

/// How the two decoders judged one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agreement {
    /// Both accept, with the same bytes.
    BothAccept,
    /// Both refuse.
    BothRefuse,
    /// QEMU accepts, the parser refuses, for a documented reason.
    Stricter(Stricter),
    /// Only the parser ran (zstd while [`ZSTD_DIFFERENTIAL`] is off).
    NotCompared,
}

/// Whether [`differential`] holds zstd streams to libzstd. On since the
/// parser decodes zstd with libzstd in QEMU's own loop (issue 10): zstd has
/// no stricter class.
pub const ZSTD_DIFFERENTIAL: bool = true;

/// Decompress `stream` into one cluster of `cluster` bytes with the
/// parser and with QEMU's model; panics (the oracle failing) when the
/// parser accepts what QEMU refuses, when both accept with different bytes,
/// or when the parser refuses what QEMU accepts outside the [`Stricter`]
/// classes.
pub fn differential(kind: CompressionType, stream: &[u8], cluster: usize) -> Agreement {
    if kind == CompressionType::Zstd && !ZSTD_DIFFERENTIAL {
        let mut ours = vec![0u8; cluster];
        let _ = compressed::decompress(kind, stream, &mut ours);
        return Agreement::NotCompared;
    }
    let mut ours = vec![0u8; cluster];
    let mut theirs = vec![0u8; cluster];
    let parser = compressed::decompress(kind, stream, &mut ours);
    let qemu = qemu_decompress(kind, stream, &mut theirs);
    match (parser, qemu) {
        (Ok(()), Ok(_)) => {
            if let Some(i) = (0..cluster).find(|&i| ours[i] != theirs[i]) {
                panic!(
                    "{kind:?} stream of {} bytes: byte {i:#x} of the cluster is {:#04x} here, {:#04x} in QEMU",
                    stream.len(),
                    ours[i],
                    theirs[i]
                );
            }
            Agreement::BothAccept
        }
        (Ok(()), Err(q)) => panic!(
            "{kind:?} stream of {} bytes into {cluster}: the parser accepts, QEMU refuses ({q})",
            stream.len()
        ),
        (Err(e), Ok(got)) => match stricter_class(kind, &got) {
            Some(class) => Agreement::Stricter(class),
            None => panic!(
                "{kind:?} stream of {} bytes into {cluster}: QEMU accepts ({got:?}), the parser refuses: {e}",
                stream.len()
            ),
        },
        (Err(_), Err(_)) => Agreement::BothRefuse,
    }
}
