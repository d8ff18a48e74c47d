#!/usr/bin/env bash
# Instruction counts of the hot cases, qcow2-guard next to qemu-img doing
# the same work, under `valgrind --tool=callgrind` (every thread, the
# dynamic loader and start-up included): a figure that does not move with
# the machine's load, to judge a change on a busy machine where wall times
# mean nothing. A measurement, not a test: not part of CI's pass/fail.
#
# Cases (ours / qemu-img):
#   check --metadata-only, PREALLOC GiB preallocation=metadata / qemu-img check
#   check --metadata-only, SIZE of random data (start-up) / qemu-img check
#   check (every payload decompressed), mixed data, zlib / qemu-img convert -O raw
#   the same, zstd / qemu-img convert -O raw
#   convert, zstd / qemu-img convert -O raw
# Images are made with qemu-img under the names scripts/bench.sh uses
# (random, zlib, zstd, prealloc .qcow2) and the same mixed data; those
# already in WORKDIR are used as they are, so a directory kept by
# `KEEP=1 scripts/bench.sh DIR` serves both.
#
# Needs cargo, valgrind, qemu-img and python3. With the defaults it takes
# about 3 minutes on 2 cores (callgrind runs ~50x slower than native).
#
# Usage: scripts/instructions.sh [WORKDIR]   (default: a fresh temp dir)
# Env:   INSN_SIZE_MIB=128       SIZE above (compressed and random images)
#        INSN_PREALLOC_GIB=256   PREALLOC above
#        GUARD=path              the qcow2-guard binary (default: build
#                                the release binary and use it)
#        KEEP=1                  keep the images
set -euo pipefail

cd "$(dirname "$0")/.."
SIZE_MIB=${INSN_SIZE_MIB:-128}
PREALLOC_GIB=${INSN_PREALLOC_GIB:-256}
command -v valgrind >/dev/null || { echo "instructions.sh: needs valgrind" >&2; exit 1; }

WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/qcow2-guard-insns.XXXXXX")}
mkdir -p "$WORK"
made=()
cleanup() {
    rm -f "$WORK/insns-src.raw" "$WORK/insns-out.raw" "$WORK/insns-q.raw" "$WORK"/.*.qcow2-guard-tmp
    if [ "${KEEP:-0}" != 1 ]; then
        for f in "${made[@]}"; do rm -f "$f"; done
        rmdir "$WORK" 2>/dev/null || true
    fi
}
trap cleanup EXIT

if [ -z "${GUARD:-}" ]; then
    cargo build --release --quiet
    GUARD=$PWD/target/release/qcow2-guard
    built="built from $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
else
    built="GUARD"
fi

size=$((SIZE_MIB << 20))
if [ ! -f "$WORK/random.qcow2" ]; then
    head -c "$size" /dev/urandom >"$WORK/insns-src.raw"
    qemu-img convert -f raw -O qcow2 -o cluster_size=64k "$WORK/insns-src.raw" "$WORK/random.qcow2"
    made+=("$WORK/random.qcow2")
fi
if [ ! -f "$WORK/zlib.qcow2" ] || [ ! -f "$WORK/zstd.qcow2" ]; then
    python3 scripts/mixed-data.py "$WORK/insns-src.raw" "$size"
    for c in zlib zstd; do
        qemu-img convert -c -f raw -O qcow2 -o cluster_size=64k,compression_type=$c "$WORK/insns-src.raw" "$WORK/$c.qcow2"
        made+=("$WORK/$c.qcow2")
    done
fi
rm -f "$WORK/insns-src.raw"
if [ ! -f "$WORK/prealloc.qcow2" ]; then
    qemu-img create -q -f qcow2 -o cluster_size=64k,preallocation=metadata "$WORK/prealloc.qcow2" "${PREALLOC_GIB}G"
    made+=("$WORK/prealloc.qcow2")
fi

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "qemu-img: $(qemu-img --version | head -1)"
echo "qcow2-guard: $GUARD ($built)"
echo "valgrind: $(valgrind --version); images: $(du -h --apparent-size "$WORK/zstd.qcow2" | cut -f1) compressed, ${PREALLOC_GIB} GiB prealloc"
echo

# Instructions of one command (callgrind's "Collected", all threads).
insns() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" 2>&1 >/dev/null |
        sed -n 's/^==[0-9]*== Collected : \([0-9]*\)$/\1/p'
}

printf '%-46s %15s %15s %7s\n' case "ours Ir" "qemu-img Ir" ratio
row() {
    local name=$1 ours qemu
    shift
    # "$@" = our arguments, then `--`, then qemu-img's.
    local -a a=() b=()
    while [ "$1" != -- ]; do a+=("$1"); shift; done
    shift
    b=("$@")
    ours=$(insns "$GUARD" "${a[@]}")
    qemu=$(insns qemu-img "${b[@]}")
    rm -f "$WORK/insns-out.raw" "$WORK/insns-q.raw"
    python3 -c 'import sys; n, o, q = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]); print(f"{n:46} {o:15,} {q:15,} {o / q:7.2f}")' \
        "$name" "$ours" "$qemu"
}
row "check --metadata-only ${PREALLOC_GIB} GiB prealloc" check --metadata-only "$WORK/prealloc.qcow2" -- check "$WORK/prealloc.qcow2"
row "check --metadata-only random (start-up)" check --metadata-only "$WORK/random.qcow2" -- check "$WORK/random.qcow2"
row "check zlib / qemu-img convert" check "$WORK/zlib.qcow2" -- convert -O raw "$WORK/zlib.qcow2" "$WORK/insns-q.raw"
row "check zstd / qemu-img convert" check "$WORK/zstd.qcow2" -- convert -O raw "$WORK/zstd.qcow2" "$WORK/insns-q.raw"
row "convert zstd" convert -q "$WORK/zstd.qcow2" "$WORK/insns-out.raw" -- convert -O raw "$WORK/zstd.qcow2" "$WORK/insns-q.raw"
