#!/usr/bin/env bash
# Seeds for the paths plain qemu-img images do not reach (run by
# scripts/make-corpus.sh, or alone). Needs qemu-img, qemu-io and python3.
#
#   tables/, check/, read/, stream/, convert/: v3-c512-resized (grown with
#       qemu-img resize: the L1 table moves past the data), v3-c512-shared-l2
#       (every L1 entry points at one L2 table, every entry of it at one
#       data cluster: 81,920 references, shared-table warnings)
#   tables/, check/ (stream/ follows check/): v3-c512-bitmaps-bm-* -- the
#       bitmap directory patched one rule at a time (granularity, name,
#       type, flags, extra data, duplicate name, table size/place,
#       nb_bitmaps, padding, a cut directory, a table entry with a
#       reserved bit or pointing past the end, two bitmaps on one table)
#   tables/, check/, read/, stream/, convert/: v3-c512-luks (crypt_method
#       LUKS and a crypto header extension: the header placed, never
#       parsed; tables/ and check/ also with it past the end of the file
#       and off a cluster boundary, and of length 0);
#       v3-c512-incompat-bit40 (an unknown incompatible feature);
#       v3-c512-four-l2 (four L2 tables: the
#       tables target's one-table cache evicts)
#   tables/, check/, read/, stream/, convert/: v3-c512-snapshots-disk-1m
#       (a snapshot whose disk size needs more L1 entries than it has;
#       convert/ also converts that snapshot, flags 8)
#   convert/: v3-c4k-prealloc (preallocation=metadata: data clusters in
#       holes) as flags 0, 0x10 (sparse file, tight bounds) and 0xa0
#       (streamed); the v3-c512 image with a data file and a snapshot that
#       it does not have (flags 4, 8, 0x18); the data-file image as its own
#       qcow2 backing image (flags 5), and padded to its 32 KiB disk so that
#       its bytes serve as its data file (flags 4, and 5: a backing image
#       with a data file, refused); the
#       snapshot image with its snapshot named snapshot.id=1 (0x18); the
#       backing image over itself as a sparse raw backing image (0x12: the
#       two-layer map chain); v3-c512-shared-l2-4m* (flag 0x10: over the
#       tight amplification, output and audit bounds); a few images streamed
#       with a 2 KiB retention budget (0x20)
set -euo pipefail
cd "$(dirname "$0")/.."
out=corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
io() { local img=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io -f qcow2 "${a[@]}" "$img" >/dev/null; }

qemu-img create -q -f qcow2 -o cluster_size=512 "$work/resized.qcow2" 32k
io "$work/resized.qcow2" 'write -P 0x21 0 2k'
qemu-img resize -q "$work/resized.qcow2" 4M
io "$work/resized.qcow2" 'write -P 0x22 1M 1k' 'write -P 0x23 1k 512'

qemu-img create -q -f qcow2 -o cluster_size=512 "$work/shared.qcow2" 40M
io "$work/shared.qcow2" 'write -P 0x41 0 512'

qemu-img create -q -f qcow2 -o cluster_size=512 "$work/shared4m.qcow2" 4M
io "$work/shared4m.qcow2" 'write -P 0x42 0 512'

qemu-img create -q -f qcow2 -o cluster_size=4096,preallocation=metadata "$work/prealloc.qcow2" 64k
io "$work/prealloc.qcow2" 'write -P 0x33 4k 4k' 'write -z 32k 4k'

qemu-img create -q -f qcow2 -o cluster_size=512 "$work/four-l2.qcow2" 128k
io "$work/four-l2.qcow2" 'write -P 0x51 0 512' 'write -P 0x52 32k 512' \
    'write -P 0x53 64k 512' 'write -P 0x54 96k 512'

python3 - "$out" "$work" <<'PY'
import os, struct, sys, zlib
out, work = sys.argv[1], sys.argv[2]
u32 = lambda d, o: struct.unpack(">I", d[o:o + 4])[0]
u64 = lambda d, o: struct.unpack(">Q", d[o:o + 8])[0]
def put(d, name, *dirs):
    for sub in dirs:
        open(os.path.join(out, sub, name), "wb").write(d)
    if "check" in dirs:  # stream: the check input after a 4-byte seed
        seed = struct.pack(">I", zlib.crc32(name.encode()))
        open(os.path.join(out, "stream", name), "wb").write(seed + d)
def image(d, name):  # a whole image: every target that takes one
    put(d, name + ".qcow2", "tables", "check")
    put(d + struct.pack(">QIBHB", 0, 0xFFFFFFFF, 0, 999, 0), name + "-all", "read")
    for f in (0, 0xa0):
        put(bytes([f]) + d, f"{name}-f{f}", "convert")

image(open(os.path.join(work, "resized.qcow2"), "rb").read(), "v3-c512-resized")
image(open(os.path.join(work, "four-l2.qcow2"), "rb").read(), "v3-c512-four-l2")

# shared-l2: every L1 entry -> L1[0]'s table (copied flag clear), every
# entry of it -> the first data cluster.
d = bytearray(open(os.path.join(work, "shared.qcow2"), "rb").read())
l1_size, l1_off = struct.unpack(">IQ", d[36:48])
l2 = u64(d, l1_off) & 0x00FFFFFFFFFFFE00
data = u64(d, l2) & ~(1 << 63)
for i in range(l1_size):
    struct.pack_into(">Q", d, l1_off + 8 * i, l2)
for j in range(64):
    struct.pack_into(">Q", d, l2 + 8 * j, data)
image(bytes(d), "v3-c512-shared-l2")

# shared-l2-4m: the same with a 4 MiB disk (128 L1 entries, 4 MiB mapped
# from a few KiB), for convert's bounds with flag bit 4 (64 guest bytes per
# file byte, 1 MiB of output, 256 audited clusters): as it is (over the
# amplification), padded to 64 KiB (over the output), to 160 KiB (more
# clusters than the audit tracks).
d = bytearray(open(os.path.join(work, "shared4m.qcow2"), "rb").read())
l1_size, l1_off = struct.unpack(">IQ", d[36:48])
l2 = u64(d, l1_off) & 0x00FFFFFFFFFFFE00
data = u64(d, l2) & ~(1 << 63)
for i in range(l1_size):
    struct.pack_into(">Q", d, l1_off + 8 * i, l2)
for j in range(64):
    struct.pack_into(">Q", d, l2 + 8 * j, data)
for tag, pad in (("", 0), ("-64k", 64 << 10), ("-160k", 160 << 10)):
    b = bytes(d) + bytes(max(0, pad - len(d)))
    put(bytes([0x10]) + b, f"v3-c512-shared-l2-4m{tag}-f16", "convert")

# bitmaps: the directory of v3-c512-bitmaps rebuilt with one rule broken.
src = open(os.path.join(out, "tables", "v3-c512-bitmaps.qcow2"), "rb").read()
o = u32(src, 100)
while True:
    t, ln = struct.unpack(">II", src[o:o + 8])
    if t == 0x23852875:
        break
    o += 8 + ((ln + 7) & ~7)
ext = o + 8
nb, _, dsz, doff = struct.unpack(">IIQQ", src[ext:ext + 24])
ents, p = [], doff
for _ in range(nb):
    to, ts, fl, ty, gb, ns, es = struct.unpack(">QIIBBHI", src[p:p + 24])
    ents.append(dict(to=to, ts=ts, fl=fl, ty=ty, gb=gb, extra=b"",
                     name=src[p + 24 + es:p + 24 + es + ns]))
    p += (24 + es + ns + 7) & ~7
def build(es, nb=None, pad=b"\0", base=src):
    dirb = b""
    for e in es:
        b = struct.pack(">QIIBBHI", e["to"], e["ts"], e["fl"], e["ty"], e["gb"],
                        len(e["name"]), len(e["extra"])) + e["extra"] + e["name"]
        dirb += b + pad * (-len(b) % 8)
    img = bytearray(base[:doff]) + dirb
    struct.pack_into(">IIQQ", img, ext, len(es) if nb is None else nb, 0, len(dirb), doff)
    return bytes(img)
def first(**kw):
    es = [dict(e) for e in ents]
    es[0].update(kw)
    return es
f0 = ents[0]["fl"]
def entry0(raw):  # the first bitmap's first table entry set to raw
    b = bytearray(src)
    struct.pack_into(">Q", b, ents[0]["to"], raw)
    return build(ents, base=bytes(b))
variants = {
    "gran8": build(first(gb=8)), "gran32": build(first(gb=32)),
    "noname": build(first(name=b"")), "type2": build(first(ty=2)),
    "inuse": build(first(fl=f0 | 1)), "reserved-flag": build(first(fl=f0 | 8)),
    "extra-unknown": build(first(extra=b"\1" * 8)),
    "extra-compatible": build(first(extra=b"\1" * 8, fl=f0 | 4)),
    "dup-name": build([ents[0], dict(ents[1], name=ents[0]["name"])]),
    "table-size": build(first(ts=ents[0]["ts"] + 1)),
    "table-past-eof": build(first(to=1 << 40)),
    "table-unaligned": build(first(to=ents[0]["to"] + 8)),
    "nb-fewer": build(ents, nb=1), "nb-more": build(ents, nb=3),
    "nb-limit": build(ents, nb=300), "pad-nonzero": build(ents, pad=b"\1"),
    "dir-cut": build(ents)[:-4],
    "entry-reserved": entry0(2), "entry-past-eof": entry0(1 << 40),
    "shared-table": build([ents[0], dict(ents[1], to=ents[0]["to"])]),
}
for k, v in variants.items():
    put(v, f"v3-c512-bitmaps-bm-{k}", "tables", "check")

# snapshot-disk-1m: the first snapshot's extra data says its disk was
# 1 MiB, its L1 table has the one entry a 32 KiB disk needs
# (snapshot_l1_too_small); converting that snapshot (flags 8) is refused.
snap = bytearray(open(os.path.join(out, "tables", "v3-c512-snapshots.qcow2"), "rb").read())
s0 = u64(snap, 64)
assert u32(snap, s0 + 36) >= 16  # extra data: vm_state_size, disk_size
struct.pack_into(">Q", snap, s0 + 40 + 8, 1 << 20)
image(bytes(snap), "v3-c512-snapshots-disk-1m")
put(bytes([8]) + bytes(snap), "v3-c512-snapshots-disk-1m-f8", "convert")

# luks: v3-c512 marked LUKS-encrypted (crypt_method 2) with a crypto
# header extension naming one cluster appended at the end of the file
# (a LUKS magic, nothing else: the encryption header is placed, never
# parsed, and the policy refuses the image).
d = bytearray(open(os.path.join(out, "tables", "v3-c512.qcow2"), "rb").read())
o = u32(d, 100)
while True:
    t, ln = struct.unpack(">II", d[o:o + 8])
    if t == 0:
        break
    o += 8 + ((ln + 7) & ~7)
assert o + 32 <= 512 and not any(d[o:o + 32])
hdr = (len(d) + 511) & ~511
struct.pack_into(">I", d, 32, 2)
d += bytes(hdr - len(d)) + b"LUKS\xba\xbe" + bytes(506)
def luks(at, length):
    b = bytearray(d)
    struct.pack_into(">IIQQ", b, o, 0x0537BE77, 16, at, length)
    return bytes(b)
image(luks(hdr, 512), "v3-c512-luks")
# The encryption header placed past the end of the file, or off a
# cluster boundary: refused on open.
put(luks(hdr, 1024), "v3-c512-luks-past-eof", "tables", "check")
put(luks(hdr + 8, 256), "v3-c512-luks-unaligned", "tables", "check")
put(luks(hdr, 0), "v3-c512-luks-empty", "tables", "check")
# An incompatible feature bit no version defines (bit 40): refused.
b = bytearray(open(os.path.join(out, "tables", "v3-c512.qcow2"), "rb").read())
struct.pack_into(">Q", b, 72, u64(b, 72) | 1 << 40)
put(bytes(b), "v3-c512-incompat-bit40", "tables", "check")

# convert: [flags] [image].
pre = open(os.path.join(work, "prealloc.qcow2"), "rb").read()
for f in (0, 0x10, 0xa0):
    put(bytes([f]) + pre, f"v3-c4k-prealloc-f{f}", "convert")
plain = open(os.path.join(out, "tables", "v3-c512.qcow2"), "rb").read()
for f in (4, 8, 0x18):
    put(bytes([f]) + plain, f"v3-c512-f{f}", "convert")
df = open(os.path.join(out, "tables", "v3-c512-datafile.qcow2"), "rb").read()
put(bytes([5]) + df, "v3-c512-datafile-f5", "convert")
# The same padded to its 32 KiB disk, so that its own bytes serve as its
# (raw) data file: converted with it (flags 4; without it, refused as
# missing), and handed in as its own backing image too (flags 5: a
# backing image with a data file, refused).
df32 = df + bytes(max(0, (32 << 10) - len(df)))
for f in (4, 5):
    put(bytes([f]) + df32, f"v3-c512-datafile-32k-f{f}", "convert")
snap = open(os.path.join(out, "tables", "v3-c512-snapshots.qcow2"), "rb").read()
put(bytes([0x18]) + snap, "v3-c512-snapshots-f24", "convert")
bk = open(os.path.join(out, "tables", "v3-c512-backing.qcow2"), "rb").read()
put(bytes([0x12]) + bk, "v3-c512-backing-f18", "convert")
# Streamed in pieces with a 2 KiB retention budget (seed 1: flags 0x20).
for name in ("v3-c512", "v3-c512-snapshots", "v3-c512-zlib", "v3-c4k", "v3-c512-resized"):
    img = open(os.path.join(out, "tables", name + ".qcow2"), "rb").read()
    put(bytes([0x20]) + img, f"{name}-f32", "convert")
PY
