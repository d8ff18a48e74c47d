#!/usr/bin/env bash
# Throughput and peak RSS of `qcow2-guard convert` next to
# `qemu-img convert -O raw`, measured in one run.
#
# Builds the release binary, makes a 1 GiB qcow2 image (64 KiB clusters,
# incompressible data from /dev/urandom), then runs both converters
# alternately RUNS times (default 5) and prints the median wall time,
# throughput and peak RSS of each, and the ratios. With COMPRESSED=1 it also
# benchmarks a zlib-compressed image of compressible data.
#
# Not part of CI: it takes a minute or more and needs ~4 GiB of disk.
# Usage: scripts/bench-convert.sh [WORKDIR]   (default: a fresh temp dir)
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
SIZE_MIB=${SIZE_MIB:-1024}
WORK=${1:-$(mktemp -d /tmp/qcow2-guard-bench.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -f "$WORK"/out.raw "$WORK"/src.raw' EXIT

cargo build --release --quiet
GUARD=$PWD/target/release/qcow2-guard

# Peak RSS (KiB) and wall time of a command: /usr/bin/time if present, else
# getrusage(RUSAGE_CHILDREN) from a tiny python wrapper.
measure() {
    if [ -x /usr/bin/time ]; then
        /usr/bin/time -f '%e %M' -o "$WORK/time.txt" "$@" >/dev/null
        cat "$WORK/time.txt"
    else
        python3 - "$@" <<'EOF'
import resource, subprocess, sys, time
t = time.monotonic()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(f"{time.monotonic() - t:.2f} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
EOF
    fi
}

bench() {
    local img=$1 label=$2
    local g=() q=()
    echo "== $label: $(du -h --apparent-size "$img" | cut -f1) image, $SIZE_MIB MiB virtual, $RUNS runs each, alternating"
    for i in $(seq "$RUNS"); do
        rm -f "$WORK/out.raw"
        g+=("$(measure "$GUARD" convert -q "$img" "$WORK/out.raw")")
        rm -f "$WORK/out.raw"
        q+=("$(measure qemu-img convert -O raw "$img" "$WORK/out.raw")")
    done
    # Sanity: the last outputs agree.
    "$GUARD" convert -q "$img" "$WORK/guard.raw"
    cmp -s "$WORK/guard.raw" "$WORK/out.raw" || { echo "OUTPUTS DIFFER"; exit 1; }
    rm -f "$WORK/guard.raw"
    python3 - "$SIZE_MIB" "${g[*]}" "${q[*]}" <<'EOF'
import statistics, sys
size = float(sys.argv[1])
def parse(s):
    v = s.split()
    return [float(x) for x in v[0::2]], [int(x) for x in v[1::2]]
gt, gm = parse(sys.argv[2])
qt, qm = parse(sys.argv[3])
med = statistics.median
print(f"{'':24}{'wall s (median)':>16}{'MiB/s':>10}{'peak RSS MiB':>14}")
for name, t, m in (("qcow2-guard convert", gt, gm), ("qemu-img convert", qt, qm)):
    print(f"{name:24}{med(t):>16.2f}{size / med(t):>10.0f}{med(m) / 1024:>14.1f}")
print(f"{'ratio guard/qemu-img':24}{med(gt) / med(qt):>16.2f}{med(qt) / med(gt):>10.2f}{med(gm) / med(qm):>14.2f}")
print(f"runs (wall s): guard {gt}  qemu-img {qt}")
EOF
}

echo "qemu-img: $(qemu-img --version | head -1); $(nproc) cores"
if [ ! -f "$WORK/random.qcow2" ]; then
    head -c "$((SIZE_MIB << 20))" /dev/urandom >"$WORK/src.raw"
    qemu-img convert -f raw -O qcow2 -o cluster_size=64k "$WORK/src.raw" "$WORK/random.qcow2"
    rm -f "$WORK/src.raw"
fi
bench "$WORK/random.qcow2" "incompressible data, 64 KiB clusters"

if [ "${COMPRESSED:-0}" = 1 ]; then
    if [ ! -f "$WORK/compressed.qcow2" ]; then
        # Compressible: base64 text of random bytes (compresses to ~75%).
        head -c "$((SIZE_MIB * 3 << 18))" /dev/urandom | base64 -w 0 | head -c "$((SIZE_MIB << 20))" >"$WORK/src.raw"
        qemu-img convert -c -f raw -O qcow2 -o cluster_size=64k "$WORK/src.raw" "$WORK/compressed.qcow2"
        rm -f "$WORK/src.raw"
    fi
    bench "$WORK/compressed.qcow2" "zlib-compressed base64 text, 64 KiB clusters"
fi
echo "work dir: $WORK (images kept for reruns)"
