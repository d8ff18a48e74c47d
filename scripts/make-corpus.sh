#!/usr/bin/env bash
# Regenerate the fuzz seed corpus under corpus/ from small qemu-img images
# of every configuration. Needs qemu-img, qemu-io and python3.
#
#   corpus/tables/      whole images (v2/v3, 512 B..64 KiB clusters, refcount
#                       widths, zlib/zstd compressed, extended L2, snapshots,
#                       bitmaps, backing file, data file, lazy refcounts)
#   corpus/header/      the first cluster (at most 4 KiB) of each image
#   corpus/decompress/  compressed clusters found in those images, in the
#                       decompress target's format (see fuzz/src/lib.rs)
#   corpus/structured/  a few deterministic byte strings for the model
#   corpus/read/        the tables images but the 64 KiB-cluster one, with
#                       the read target's 16-byte trailer (whole disk; an
#                       unaligned range too for images under 10 KB)
#   corpus/check/       the tables images but the 64 KiB-cluster one
#   corpus/stream/      every corpus/check/ input after a 4-byte seed (the
#                       stream target draws its chunk sizes from it)
#   corpus/convert/     the named tables images after a flags byte (0; the
#                       backing, data-file and snapshot images also with
#                       the flag that hands the input in; 0xa0 streamed in
#                       pieces; 0x10 sparse for clusters of 4 KiB and up)
#
# Files it makes are overwritten; other files are kept: inputs a fuzzer
# found that add coverage (merged with -merge=1, named by their SHA-1) and
# corpus/regressions/, which holds every input that ever crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$out/tables" "$out/header" "$out/decompress" "$out/structured" "$out/read" "$out/check" "$out/stream" "$out/convert"

io() { # io IMAGE CMD...: run qemu-io commands, quietly
    local img=$1; shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
}

writes() { # a mix of data, zero and discarded clusters in the first 16 KiB
    io "$1" 'write -P 0xaa 0 1k' 'write -P 0x55 3k 2k' 'write -z 8k 1k' \
        'write -P 0x11 12k 512' 'discard 12k 512'
}

mk() { # mk NAME OPTIONS SIZE: create, fill, keep
    local name=$1 opts=$2 size=$3
    qemu-img create -q -f qcow2 -o "$opts" "$work/$name.qcow2" "$size"
    writes "$work/$name.qcow2"
    cp "$work/$name.qcow2" "$out/tables/$name.qcow2"
}

mk v3-c512        cluster_size=512                        32k
mk v2-c512        cluster_size=512,compat=0.10            32k
mk v3-c4k         cluster_size=4096                       64k
mk v3-c512-rc1    cluster_size=512,refcount_bits=1        32k
mk v3-c512-rc2    cluster_size=512,refcount_bits=2        32k
mk v3-c512-rc8    cluster_size=512,refcount_bits=8        32k
mk v3-c512-rc64   cluster_size=512,refcount_bits=64       32k
mk v3-c512-lazy   cluster_size=512,lazy_refcounts=on      32k
mk v3-c16k-extl2  cluster_size=16384,extended_l2=on       64k
mk v3-c64k        cluster_size=65536                      64k

# Compressed clusters, zlib and zstd, 512 B and 4 KiB clusters.
qemu-img create -q -f raw "$work/src.raw" 32k
qemu-io -f raw -c 'write -P 0x61 0 5k' -c 'write -P 0x62 9k 3k' -c 'write -P 0x63 20k 4k' "$work/src.raw" >/dev/null
for ct in zlib zstd; do
    for cs in 512 4096; do
        qemu-img convert -c -f raw -O qcow2 -o "cluster_size=$cs,compression_type=$ct" \
            "$work/src.raw" "$out/tables/v3-c$cs-$ct.qcow2"
    done
done
qemu-img convert -c -f raw -O qcow2 -o cluster_size=512,compat=0.10 \
    "$work/src.raw" "$out/tables/v2-c512-zlib.qcow2"

# Snapshots.
qemu-img create -q -f qcow2 -o cluster_size=512 "$work/snap.qcow2" 32k
io "$work/snap.qcow2" 'write -P 0x01 0 2k'
qemu-img snapshot -c first "$work/snap.qcow2"
io "$work/snap.qcow2" 'write -P 0x02 1k 2k'
qemu-img snapshot -c second "$work/snap.qcow2"
cp "$work/snap.qcow2" "$out/tables/v3-c512-snapshots.qcow2"

# Persistent bitmaps.
qemu-img create -q -f qcow2 -o cluster_size=4096 "$work/bm.qcow2" 64k
qemu-img bitmap --add "$work/bm.qcow2" b0
qemu-img bitmap --add -g 65536 "$work/bm.qcow2" b1
io "$work/bm.qcow2" 'write -P 0x05 0 4k'
cp "$work/bm.qcow2" "$out/tables/v3-c4k-bitmaps.qcow2"

qemu-img create -q -f qcow2 -o cluster_size=512 "$work/bm512.qcow2" 16k
qemu-img bitmap --add -g 4096 "$work/bm512.qcow2" small
qemu-img bitmap --add --disable "$work/bm512.qcow2" off
cp "$work/bm512.qcow2" "$out/tables/v3-c512-bitmaps.qcow2"

# Backing file (named, never opened by the parser) and external data file,
# by relative names so the seeds do not depend on the temporary folder.
qemu-img create -q -f raw "$work/base.raw" 32k
(cd "$work" && qemu-img create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw overlay.qcow2)
(cd "$work" && io overlay.qcow2 'write -P 0x07 0 1k')
cp "$work/overlay.qcow2" "$out/tables/v3-c512-backing.qcow2"
(cd "$work" && qemu-img create -q -f qcow2 \
    -o cluster_size=512,data_file=data.raw,data_file_raw=on df.qcow2 32k)
(cd "$work" && io df.qcow2 'write -P 0x09 0 1k')
cp "$work/df.qcow2" "$out/tables/v3-c512-datafile.qcow2"

# LUKS encryption (header only: its key slots take 2 MiB).
qemu-img create -q -f qcow2 --object secret,id=sec0,data=123456 \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=512 \
    "$work/luks.qcow2" 32k
head -c 512 "$work/luks.qcow2" >"$out/header/v3-c512-luks.qcow2"

# Over the default 64 TiB virtual size policy (header only).
qemu-img create -q -f qcow2 -o cluster_size=2M "$work/huge.qcow2" 65T
head -c 4096 "$work/huge.qcow2" >"$out/header/v3-c2m-65t.qcow2"

python3 - "$out" <<'PY'
import os, struct, sys, zlib

out = sys.argv[1]
tables = os.path.join(out, "tables")
for name in sorted(n for n in os.listdir(tables) if n.endswith(".qcow2")):
    data = open(os.path.join(tables, name), "rb").read()
    cb = struct.unpack(">I", data[20:24])[0]
    cs = 1 << cb
    # header: the first cluster, at most 4 KiB.
    open(os.path.join(out, "header", name), "wb").write(data[: min(cs, 4096)])
    version = struct.unpack(">I", data[4:8])[0]
    l1_size, l1_off = struct.unpack(">IQ", data[36:48])
    incompat = struct.unpack(">Q", data[72:80])[0] if version >= 3 else 0
    hlen = struct.unpack(">I", data[100:104])[0] if version >= 3 else 72
    kind = data[104] if hlen > 104 else 0
    ext = bool(incompat & 16)
    esize = 16 if ext else 8
    shift = 62 - (cb - 8)
    found = 0
    for i in range(l1_size):
        l2 = struct.unpack(">Q", data[l1_off + 8 * i : l1_off + 8 * i + 8])[0] & 0x00FFFFFFFFFFFE00
        if not l2:
            continue
        for j in range(cs // esize):
            e = struct.unpack(">Q", data[l2 + esize * j : l2 + esize * j + 8])[0]
            if not e & (1 << 62) or found >= 3:
                continue
            off = e & ((1 << shift) - 1)
            extra = (e >> shift) & ((1 << (cb - 8)) - 1)
            start = off & ~511
            stream = data[start : start + (extra + 1) * 512]
            entry = (1 << 62) | (off & 511) | (extra << shift)
            seed = bytes([cb - 9, kind]) + struct.pack(">Q", entry) + stream
            base = os.path.splitext(name)[0]
            open(os.path.join(out, "decompress", f"{base}-{found}"), "wb").write(seed)
            found += 1
# A few decompress edge cases made here: deflate that ends early, that
# inflates past the cluster, and an empty zstd frame.
def raw_deflate(b):
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    return c.compress(b) + c.flush()
def seed(name, cb_minus_9, kind, entry, stream):
    open(os.path.join(out, "decompress", name), "wb").write(
        bytes([cb_minus_9, kind]) + struct.pack(">Q", entry) + stream)
seed("deflate-short", 0, 0, 1 << 62, raw_deflate(b"a" * 100))
seed("deflate-long", 0, 0, (1 << 62) | (1 << 61), raw_deflate(b"b" * 4096))
seed("deflate-exact-4k", 3, 0, 1 << 62, raw_deflate(bytes(range(256)) * 16))
seed("zstd-empty-frame", 0, 1, 1 << 62, bytes.fromhex("28b52ffd2000010000"))
# structured: deterministic byte strings of several lengths.
import random
rng = random.Random(5)
for n in (0, 8, 32, 64, 128, 256, 512, 1024):
    open(os.path.join(out, "structured", f"random-{n}"), "wb").write(
        bytes(rng.getrandbits(8) for _ in range(n)))
# read and check: the tables images (not the 384 KiB 64k-cluster one).
# read's trailer: [offset u64] [len u32] [flags u8] [reader chunk u16] [0].
for name in sorted(n for n in os.listdir(tables) if n.endswith(".qcow2")):
    if name == "v3-c64k.qcow2":
        continue
    data = open(os.path.join(tables, name), "rb").read()
    open(os.path.join(out, "check", name), "wb").write(data)
    if "bitmaps" in name:
        continue
    base = name[: -len(".qcow2")]
    ranges = [("all", 0, 0xFFFFFFFF, 0)]
    if len(data) <= 10000:
        ranges.append(("mid", 700, 5000, 0))
    for tag, off, ln, flags in ranges:
        open(os.path.join(out, "read", f"{base}-{tag}"), "wb").write(
            data + struct.pack(">QIBHB", off, ln, flags, 999, 0))
# Flags 2 and 4: the image bytes as backing image and as data file.
for name, flags, tag in (("v3-c512-backing", 2, "with-backing"),
                         ("v3-c512-datafile", 4, "with-datafile"),
                         ("v3-c512", 2, "with-backing")):
    data = open(os.path.join(tables, name + ".qcow2"), "rb").read()
    open(os.path.join(out, "read", f"{name}-{tag}"), "wb").write(
        data + struct.pack(">QIBHB", 0, 0xFFFFFFFF, flags, 999, 0))
data = open(os.path.join(tables, "v3-c512.qcow2"), "rb").read()
open(os.path.join(out, "read", "v3-c512-past-end"), "wb").write(
    data + struct.pack(">QIBHB", 32768 - 100, 200, 1, 0, 0))
# stream: the check inputs (made here or merged) after a 4-byte seed.
check = os.path.join(out, "check")
for name in sorted(os.listdir(check)):
    data = open(os.path.join(check, name), "rb").read()
    seed = struct.pack(">I", zlib.crc32(name.encode()))
    open(os.path.join(out, "stream", name), "wb").write(seed + data)
# convert: [flags] [image]; bit 0/1 the image as a qcow2/raw backing
# image, bit 2 as its data file, bit 3 convert snapshot "1", bit 4 the
# image as a sparse file; bits 5..8 (with 0..4 clear) also streamed, in
# pieces drawn from that seed (0xa0: seed 5) -- every image but the 64 KiB
# cluster one; sparse for the images with clusters of 4 KiB and up.
for name in sorted(n for n in os.listdir(tables) if n.endswith(".qcow2")):
    data = open(os.path.join(tables, name), "rb").read()
    base = name[: -len(".qcow2")]
    flags = [0]
    if "c64k" not in name:
        flags += [0xa0]
    if any(c in name for c in ("c4k", "c4096", "c16k")):
        flags += [0x10]
    if "backing" in name:
        flags += [1, 2]
    if "datafile" in name:
        flags += [4]
    if "snapshots" in name:
        flags += [8]
    for f in flags:
        open(os.path.join(out, "convert", f"{base}-f{f}"), "wb").write(bytes([f]) + data)
PY

# Patched and unusual images (hostile bitmaps, shared tables, a resized
# and a metadata-preallocated image, refused convert flag combinations).
bash scripts/corpus-hostile.sh

du -sh "$out"
for d in tables header decompress structured read check stream convert; do
    echo "$d: $(ls "$out/$d" | wc -l) files, $(du -sb "$out/$d" | cut -f1) bytes"
done
