//! Decoder parity, measured: crafted deflate and zstd streams are put into
//! the compressed cluster of a qemu-img image, and qemu-img's reading of
//! them (the oracle) is compared with ours. Each case states what QEMU does
//! (asserted, so a case fails if QEMU moves); ours must then agree: when
//! QEMU reads the cluster, `check` and `convert` accept it and produce the
//! same bytes; when QEMU fails (EIO), we refuse. The few cases where we are
//! deliberately stricter say so (SECURITY.md lists them).

mod common;

use std::path::{Path, PathBuf};

use common::*;

const CLUSTER: usize = 65536;

/// The guest data every crafted stream encodes: compressible, not trivial.
fn data() -> Vec<u8> {
    (0..CLUSTER)
        .map(|i| (((i >> 8) ^ (i.wrapping_mul(31) >> 3)) & 0xff) as u8)
        .collect()
}

/// An image with one compressed cluster whose stream is large (40 KiB of
/// noise then zeros), so crafted streams fit in its host range. Returns the
/// image, the stream's host offset and the bytes its descriptor covers.
fn carrier(dir: &Path, compression: &str) -> (PathBuf, u64, u64) {
    let raw = dir.join("carrier.raw");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut bytes = vec![0u8; CLUSTER];
    for b in bytes.iter_mut().take(40 << 10) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&raw, &bytes).unwrap();
    let img = dir.join(format!("carrier-{compression}.qcow2"));
    compress(
        &raw,
        &img,
        &format!("cluster_size={CLUSTER},compression_type={compression}"),
    );
    let l1 = be64(&img, 40);
    let l2 = be64(&img, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(&img, l2);
    assert_ne!(entry & (1 << 62), 0, "cluster 0 is compressed");
    // cluster_bits 16: offset in bits 0..53, additional sectors above.
    let shift = 62 - (16 - 8);
    let host = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & 0xff) + 1;
    let end = (host & !511) + sectors * 512;
    let len = std::fs::metadata(&img).unwrap().len();
    (img, host, end.min(len) - host)
}

/// What a reader made of the image: `Some(first cluster)` or `None`.
type Reading = Option<Vec<u8>>;

fn qemu_reads(img: &Path, dir: &Path) -> Reading {
    let out = dir.join("qemu.raw");
    let st = qemu_img_status(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    st.status
        .success()
        .then(|| std::fs::read(&out).unwrap()[..CLUSTER].to_vec())
}

fn we_read(img: &Path, dir: &Path) -> Reading {
    let check = guard(&["check", img.to_str().unwrap()]);
    let check_ok = code(&check) == 0;
    let out = dir.join("ours.raw");
    let _ = std::fs::remove_file(&out);
    let conv = guard(&[
        "convert",
        "-q",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let conv_ok = code(&conv) == 0;
    assert_eq!(
        check_ok,
        conv_ok,
        "check and convert disagree: {} / {}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&conv.stderr)
    );
    conv_ok.then(|| std::fs::read(&out).unwrap()[..CLUSTER].to_vec())
}

/// QEMU's verdict on a case, as measured with qemu-img 10.0.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qemu {
    /// Reads the cluster; we must too, with the same bytes.
    Reads,
    /// Fails with EIO; we must refuse.
    Eio,
    /// Reads it, and we deliberately refuse (SECURITY.md).
    ReadsWeRefuse,
}

fn run_cases(compression: &str, cases: Vec<(&str, Vec<u8>, Qemu)>) {
    let dir = tmpdir();
    let (base, host, room) = carrier(dir.path(), compression);
    let mut failures = Vec::new();
    for (name, stream, expect) in cases {
        assert!(
            stream.len() as u64 <= room,
            "{name}: {} bytes do not fit in {room}",
            stream.len()
        );
        let img = copy(&base, dir.path(), "case.qcow2");
        let mut body = stream.clone();
        body.resize(room as usize, 0);
        patch(&img, host, &body);
        let theirs = qemu_reads(&img, dir.path());
        let ours = we_read(&img, dir.path());
        // The fuzz oracle's model of QEMU's decompression
        // (fuzz/src/qemu_decompress.rs) must read the stream as qemu-img
        // did: same verdict, same bytes.
        let kind = if compression == "zstd" {
            qcow2_guard::CompressionType::Zstd
        } else {
            qcow2_guard::CompressionType::Deflate
        };
        let mut cluster = vec![0u8; CLUSTER];
        let model = qcow2_guard_fuzz::qemu_decompress::qemu_decompress(kind, &body, &mut cluster)
            .ok()
            .map(|_| cluster);
        if model != theirs {
            failures.push(format!(
                "{name}: the fuzz oracle's QEMU model {}, qemu-img {}",
                if model.is_some() { "reads" } else { "fails" },
                if theirs.is_some() { "reads" } else { "EIO" },
            ));
        }
        let measured = match (&theirs, &ours) {
            (Some(_), Some(_)) => Qemu::Reads,
            (Some(_), None) => Qemu::ReadsWeRefuse,
            (None, _) => Qemu::Eio,
        };
        if measured != expect
            || (theirs.is_none() && ours.is_some())
            || ours.is_some() && ours != theirs
        {
            failures.push(format!(
                "{name}: expected {expect:?}; qemu {}, ours {}{}",
                if theirs.is_some() { "reads" } else { "EIO" },
                if ours.is_some() { "reads" } else { "refuses" },
                if ours.is_some() && theirs.is_some() && ours != theirs {
                    " DIFFERENT BYTES"
                } else {
                    ""
                }
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- zstd --------------------------------------------------------------

fn zstd(data: &[u8], params: &[zstd_safe::CParameter]) -> Vec<u8> {
    let mut cctx = zstd_safe::CCtx::create();
    for p in params {
        cctx.set_parameter(*p).unwrap();
    }
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data).unwrap();
    out
}

/// Offsets of the frame header fields: (FHD, window descriptor, FCS field
/// and its length) for the frame at the start of `f`.
fn header_fields(f: &[u8]) -> (usize, Option<usize>, usize, usize) {
    let fhd = f[4];
    let single = fhd & 0x20 != 0;
    let did_len = [0, 1, 2, 4][(fhd & 3) as usize];
    let fcs_len = match fhd >> 6 {
        0 if single => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let wd = (!single).then_some(5);
    let fcs_at = 5 + usize::from(!single) + did_len;
    (4, wd, fcs_at, fcs_len)
}

/// A frame of RLE blocks of `block` bytes of `byte`, `total` bytes in all,
/// with window descriptor `wd` (not single segment, no content size).
fn rle_frame(wd: u8, byte: u8, block: u32, total: u32) -> Vec<u8> {
    let mut f = 0xFD2F_B528u32.to_le_bytes().to_vec();
    f.extend([0x00, wd]);
    let mut left = total;
    while left > 0 {
        let n = left.min(block);
        left -= n;
        let h = u32::from(left == 0) | (1 << 1) | (n << 3);
        f.extend_from_slice(&h.to_le_bytes()[..3]);
        f.push(byte);
    }
    f
}

#[test]
fn zstd_streams_read_as_qemu_reads_them() {
    use zstd_safe::CParameter::*;
    let d = data();
    // QEMU's own shape: level 1 frame with the content size, single segment.
    let qemu_like = zstd(&d, &[CompressionLevel(1), ContentSizeFlag(true)]);
    let with_sum = zstd(
        &d,
        &[
            CompressionLevel(3),
            ChecksumFlag(true),
            ContentSizeFlag(true),
        ],
    );
    let (fhd, _, fcs_at, fcs_len) = header_fields(&with_sum);
    assert_eq!(fcs_len, 2, "content size in a 2-byte field");
    let fcs = |delta: i32| {
        let mut f = with_sum.clone();
        let v = u16::from_le_bytes([f[fcs_at], f[fcs_at + 1]]);
        let v = (i32::from(v) + delta) as u16;
        f[fcs_at..fcs_at + 2].copy_from_slice(&v.to_le_bytes());
        f
    };
    let bad_sum = {
        let mut f = with_sum.clone();
        let n = f.len();
        f[n - 1] ^= 0x01;
        f
    };
    let fhd_bit = |bit: u8| {
        let mut f = with_sum.clone();
        f[fhd] ^= bit;
        f
    };
    // A dictionary ID (1 byte) inserted after the frame header descriptor.
    let dict_id = {
        let mut f = with_sum.clone();
        f[fhd] |= 1;
        f.insert(fhd + 1 + usize::from(f[fhd] & 0x20 == 0), 7);
        f
    };
    let skippable = {
        let mut f = 0x184D_2A53u32.to_le_bytes().to_vec();
        f.extend(16u32.to_le_bytes());
        f.extend([0xee; 16]);
        f.extend(&with_sum);
        f
    };
    let two_frames = {
        let mut f = zstd(&d[..CLUSTER / 2], &[ChecksumFlag(true)]);
        f.extend(zstd(&d[CLUSTER / 2..], &[ChecksumFlag(true)]));
        f
    };
    let trailing = {
        let mut f = with_sum.clone();
        f.extend([0xab; 100]);
        f
    };
    let long = {
        let mut long = d.clone();
        long.extend_from_slice(&d[..4096]);
        zstd(&long, &[ChecksumFlag(true)])
    };
    let short = {
        let mut f = zstd(&d[..CLUSTER - 1], &[ChecksumFlag(true)]);
        f.extend([0; 32]);
        f
    };
    let cli = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/zstd-cli-window-8m.zst"
    ))
    .unwrap();
    // A QEMU frame (no checksum) with one byte changed by the differential
    // engine (seed 2, mutant 570): libzstd 1.5.4 (QEMU's here) and 1.5.7
    // (zstd-sys's bundled copy) both decode it, to different bytes. Only
    // linking the libzstd QEMU links gives the same reading
    // (.cargo/config.toml).
    let versions = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/zstd-libzstd-version-differential.zst"
    ))
    .unwrap();
    // Window descriptor exponent e: window 2^(10+e).
    let rle = |e: u8| rle_frame(e << 3, 0x5a, 65536, 65536);
    run_cases(
        "zstd",
        vec![
            ("QEMU's own frame shape", qemu_like, Qemu::Reads),
            ("checksum and content size", with_sum.clone(), Qemu::Reads),
            ("content checksum wrong", bad_sum, Qemu::Eio),
            ("declared content size one less", fcs(-1), Qemu::Eio),
            ("declared content size one more", fcs(1), Qemu::Eio),
            ("frame header: reserved bit 3 set", fhd_bit(0x08), Qemu::Eio),
            ("frame header: unused bit 4 set", fhd_bit(0x10), Qemu::Reads),
            (
                "frame header: checksum flag cleared (its 4 bytes trail)",
                fhd_bit(0x04),
                Qemu::Reads,
            ),
            ("dictionary ID without a dictionary", dict_id, Qemu::Eio),
            ("skippable frame first", skippable, Qemu::Reads),
            ("two frames fill the cluster", two_frames, Qemu::Reads),
            ("bytes after the frame", trailing, Qemu::Reads),
            ("frame inflates past the cluster", long, Qemu::Eio),
            ("frame ends one byte short", short, Qemu::Eio),
            ("the zstd CLI's frame (8 MiB window)", cli, Qemu::Reads),
            (
                "corrupt frame libzstd versions disagree on",
                versions,
                Qemu::Reads,
            ),
            ("RLE frame, 64 KiB window", rle(6), Qemu::Reads),
            ("RLE frame, 128 MiB window", rle(17), Qemu::Reads),
            ("RLE frame, 256 MiB window", rle(18), Qemu::Eio),
            ("RLE block larger than a 1 KiB window", rle(0), Qemu::Eio),
        ],
    );
}

/// A frame declaring a 128 MiB window (libzstd's limit, which QEMU
/// accepts) must not make us reserve 128 MiB: `check` and `convert` run
/// in 24 MiB of address space.
#[test]
fn zstd_large_window_in_bounded_memory() {
    let dir = tmpdir();
    let (img, host, room) = carrier(dir.path(), "zstd");
    let mut body = rle_frame(17 << 3, 0x5a, 65536, 65536);
    body.resize(room as usize, 0);
    patch(&img, host, &body);
    assert!(qemu_reads(&img, dir.path()).is_some());
    let out = dir.path().join("out.raw");
    for args in [
        vec!["check", img.to_str().unwrap()],
        vec![
            "convert",
            "-q",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    ] {
        let r = std::process::Command::new("sh")
            .arg("-c")
            .arg("ulimit -v 24576 && exec \"$0\" \"$@\"")
            .arg(bin())
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            code(&r),
            0,
            "{args:?}: {}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
    assert!(std::fs::read(&out).unwrap()[..CLUSTER]
        .iter()
        .all(|&b| b == 0x5a));
}

// ---- deflate -----------------------------------------------------------

/// A raw-deflate bit writer for fixed-Huffman blocks, enough to say exactly
/// which symbols a stream holds (literals, matches, end of block, and
/// symbols no encoder would write).
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    /// `n` bits of `v`, least significant first (deflate's bit order).
    fn put(&mut self, v: u64, n: u32) -> &mut Self {
        self.acc |= v << self.n;
        self.n += n;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
        self
    }
    /// A Huffman code of `n` bits, most significant first.
    fn code(&mut self, c: u32, n: u32) -> &mut Self {
        let rev = c.reverse_bits() >> (32 - n);
        self.put(u64::from(rev), n)
    }
    /// Fixed-Huffman literal/length symbol.
    fn sym(&mut self, s: u32) -> &mut Self {
        match s {
            0..=143 => self.code(0x30 + s, 8),
            144..=255 => self.code(0x190 + s - 144, 9),
            256..=279 => self.code(s - 256, 7),
            _ => self.code(0xc0 + s - 280, 8),
        }
    }
    /// Block header: final flag and type (1 fixed, 0 stored, 3 reserved).
    fn block(&mut self, last: bool, ty: u64) -> &mut Self {
        self.put(u64::from(last), 1).put(ty, 2)
    }
    /// A match of `len` (3..=10 or 258) at distance `dist`.
    fn copy(&mut self, len: u32, dist: u32) -> &mut Self {
        match len {
            3..=10 => self.sym(254 + len),
            258 => self.sym(285),
            _ => panic!("length {len} not supported by this writer"),
        };
        self.dist(dist)
    }
    /// Distance `d` (1..=32768): 5-bit code, then its extra bits.
    fn dist(&mut self, d: u32) -> &mut Self {
        let (code, base, extra) = if d <= 4 {
            (d - 1, d, 0)
        } else {
            let e = 31 - (d - 1).leading_zeros() - 1; // extra bits
            let half = ((d - 1) >> e) & 1;
            let code = 2 * e + 2 + half;
            (code, (1 << (e + 1)) + half * (1 << e) + 1, e)
        };
        self.code(code, 5);
        self.put(u64::from(d - base), extra)
    }
    fn finish(&mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        std::mem::take(&mut self.out)
    }
}

/// A fixed block: literal `b'a'`, then matches of 258 at distance 1 up to
/// `upto` output bytes (a multiple of 258 plus one), then `tail` and the
/// end-of-block symbol unless `eob` is false.
fn fixed_a(upto: u32, tail: impl FnOnce(&mut Bits), eob: bool) -> Vec<u8> {
    let mut w = Bits::default();
    w.block(true, 1).sym(u32::from(b'a'));
    let mut n = 1;
    while n + 258 <= upto {
        w.copy(258, 1);
        n += 258;
    }
    tail(&mut w);
    if eob {
        w.sym(256);
    }
    w.finish()
}

#[test]
fn deflate_streams_read_as_qemu_reads_them() {
    use miniz_oxide::deflate::compress_to_vec;
    let d = data();
    // 64 KiB with 16 KiB noise repeated 32 KiB later: a level-9 deflate
    // of it uses distances near 32 KiB (QEMU writes with a 4 KiB window).
    let far = {
        let mut x = 0x9e37_79b9u32;
        let noise: Vec<u8> = (0..16384)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let mut v = noise.clone();
        v.extend(std::iter::repeat_n(7u8, 16384));
        v.extend(&noise);
        v.extend(std::iter::repeat_n(9u8, 16384));
        v
    };
    let full = 1 + 254 * 258; // 65533: three bytes short of the cluster
    let stored = |len: u16, nlen: u16, last: bool| {
        let mut w = Bits::default();
        w.block(last, 0);
        let mut v = w.finish();
        v.extend(len.to_le_bytes());
        v.extend(nlen.to_le_bytes());
        v.extend(std::iter::repeat_n(b'z', usize::from(len)));
        v
    };
    let stored_then_fixed = {
        let mut v = stored(3, !3, false);
        v.extend(fixed_a(full, |_| {}, true));
        v
    };
    let mut trailing = compress_to_vec(&d, 6);
    trailing.extend([0xff; 64]);
    run_cases(
        "zlib",
        vec![
            ("miniz level 6", compress_to_vec(&d, 6), Qemu::Reads),
            (
                "level 9: distances near 32 KiB",
                compress_to_vec(&far, 9),
                Qemu::Reads,
            ),
            ("bytes after the final block", trailing, Qemu::Reads),
            (
                "stored block, then a fixed block",
                stored_then_fixed,
                Qemu::Reads,
            ),
            (
                "stored block: LEN/NLEN mismatch",
                stored(3, 0, true),
                Qemu::Eio,
            ),
            (
                "fixed block fills the cluster",
                fixed_a(
                    full,
                    |w| {
                        w.copy(3, 1);
                    },
                    true,
                ),
                Qemu::Reads,
            ),
            (
                "distance 32768 after 32 KiB of output",
                fixed_a(
                    full,
                    |w| {
                        w.copy(3, 32768);
                    },
                    true,
                ),
                Qemu::Reads,
            ),
            (
                "distance before the start of the output",
                fixed_a(
                    1 + 100 * 258,
                    |w| {
                        w.copy(3, 30000);
                    },
                    true,
                ),
                Qemu::Eio,
            ),
            (
                "distance code 30",
                fixed_a(
                    full,
                    |w| {
                        w.sym(257).code(30, 5);
                    },
                    true,
                ),
                Qemu::Eio,
            ),
            (
                "length code 286",
                fixed_a(
                    full,
                    |w| {
                        w.sym(286);
                    },
                    true,
                ),
                Qemu::Eio,
            ),
            (
                "reserved block type 3",
                {
                    let mut w = Bits::default();
                    w.block(true, 3).put(0, 13);
                    w.finish()
                },
                Qemu::Eio,
            ),
            (
                "stream ends three bytes short",
                fixed_a(full, |_| {}, true),
                Qemu::Eio,
            ),
            // zlib accepts a full output buffer (Z_BUF_ERROR) even when
            // the stream goes on; we refuse: the data would end at a place
            // the stream does not say.
            (
                "inflates past the cluster",
                fixed_a(
                    full,
                    |w| {
                        w.copy(3, 1).copy(258, 1);
                    },
                    true,
                ),
                Qemu::ReadsWeRefuse,
            ),
        ],
    );
}
