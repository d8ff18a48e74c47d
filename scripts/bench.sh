#!/usr/bin/env bash
# qcow2-guard next to qemu-img: wall time and peak RSS of convert, check and
# info, measured in one run, alternating the two tools.
#
# Builds the release binary, makes the images with qemu-img/qemu-io, runs
# each case RUNS times per tool (alternately) and prints the medians and the
# ratios ours / qemu-img. Cases:
#   random   1 GiB of incompressible data, 64 KiB clusters, uncompressed
#   zlib     1 GiB of mixed data (text, random, zeros, patterns), compressed
#   zstd     the same data, compression_type=zstd
#   frag     1 GiB written 4 KiB at a time in a shuffled order, 4 KiB clusters
#   prealloc 1 TiB, preallocation=metadata (16 Mi L2 entries, sparse file)
# convert (vs `qemu-img convert -O raw`) on every image, `check
# --metadata-only` (vs `qemu-img check`) on every image, full `check` (with
# decompression) on the compressed ones, `info` vs `qemu-img info`. Every
# converted output is compared with qemu-img's (holes and data) and the
# disk usage (du) of both is shown.
#
# Needs cargo, qemu-img, qemu-io and python3; ~6 GiB of disk. Not part of
# CI (it takes several minutes). Images are removed at the end unless
# KEEP=1.
#
# Usage: scripts/bench.sh [WORKDIR]      (default: a fresh temp dir)
# Env:   RUNS=5                 runs per tool and case
#        BENCH_SIZE_MIB=1024    size of the random/zlib/zstd/frag images
#        BENCH_PREALLOC_GIB=1024  size of the preallocation=metadata image
#        KEEP=1                 keep the images (reused by the next run)
set -euo pipefail

cd "$(dirname "$0")/.."
export RUNS=${RUNS:-5}
export PREALLOC_GIB=${BENCH_PREALLOC_GIB:-1024}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}

WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/qcow2-guard-bench.XXXXXX")}
mkdir -p "$WORK"
cleanup() {
    rm -f "$WORK"/*.raw "$WORK"/.*.qcow2-guard-tmp "$WORK/rss.txt"
    if [ "${KEEP:-0}" != 1 ]; then
        rm -f "$WORK"/*.qcow2 "$WORK"/size.txt
        rmdir "$WORK" 2>/dev/null || true
    fi
}
trap cleanup EXIT

cargo build --release --quiet
GUARD=$PWD/target/release/qcow2-guard

# Images are rebuilt when the sizes changed.
if [ "$(cat "$WORK/size.txt" 2>/dev/null)" != "$SIZE_MIB $PREALLOC_GIB" ]; then
    rm -f "$WORK"/*.qcow2
    echo "$SIZE_MIB $PREALLOC_GIB" >"$WORK/size.txt"
fi
make_images() {
    local size=$((SIZE_MIB << 20))
    if [ ! -f "$WORK/random.qcow2" ]; then
        head -c "$size" /dev/urandom >"$WORK/src.raw"
        qemu-img convert -f raw -O qcow2 -o cluster_size=64k "$WORK/src.raw" "$WORK/random.qcow2"
        rm -f "$WORK/src.raw"
    fi
    if [ ! -f "$WORK/zlib.qcow2" ] || [ ! -f "$WORK/zstd.qcow2" ]; then
        # Mixed data, per 1 MiB: 40% base64 text of random bytes, 20%
        # random, 20% zeros, 20% short repeated records.
        python3 - "$WORK/src.raw" "$size" <<'EOF'
import base64, os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
r = random.Random(1)
mib = 1 << 20
with open(path, "wb") as f:
    for _ in range(size // mib):
        k = r.random()
        if k < 0.4:
            f.write(base64.b64encode(os.urandom(mib * 3 // 4 + 2))[:mib])
        elif k < 0.6:
            f.write(os.urandom(mib))
        elif k < 0.8:
            f.write(bytes(mib))
        else:
            rec = b"".join(b"%08d record %s\n" % (i, os.urandom(8).hex().encode()) for i in range(64))
            f.write((rec * (mib // len(rec) + 1))[:mib])
EOF
        qemu-img convert -c -f raw -O qcow2 -o cluster_size=64k,compression_type=zlib "$WORK/src.raw" "$WORK/zlib.qcow2"
        qemu-img convert -c -f raw -O qcow2 -o cluster_size=64k,compression_type=zstd "$WORK/src.raw" "$WORK/zstd.qcow2"
        rm -f "$WORK/src.raw"
    fi
    if [ ! -f "$WORK/frag.qcow2" ]; then
        qemu-img create -q -f qcow2 -o cluster_size=4k "$WORK/frag.qcow2" "$size"
        python3 - "$size" <<'EOF' | qemu-io -t unsafe -f qcow2 "$WORK/frag.qcow2" >/dev/null
import random, sys
n = int(sys.argv[1]) // 4096
order = list(range(n))
random.Random(7).shuffle(order)
sys.stdout.write("".join(f"write -q -P {1 + i % 255} {i * 4096} 4k\n" for i in order))
EOF
    fi
    if [ ! -f "$WORK/prealloc.qcow2" ]; then
        qemu-img create -q -f qcow2 -o cluster_size=64k,preallocation=metadata "$WORK/prealloc.qcow2" "${PREALLOC_GIB}G"
    fi
}
make_images

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM"
echo "qemu-img: $(qemu-img --version | head -1)"
echo "qcow2-guard: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "sizes: ${SIZE_MIB} MiB images, ${PREALLOC_GIB} GiB preallocation=metadata; $RUNS runs per tool, alternating"
echo

python3 - "$GUARD" "$WORK" <<'EOF'
import os, statistics, subprocess, sys, time

guard, work = sys.argv[1], sys.argv[2]
runs = int(os.environ["RUNS"])
img = lambda n: os.path.join(work, n + ".qcow2")
out_g, out_q = os.path.join(work, "guard.raw"), os.path.join(work, "qemu.raw")

# Peak RSS must come from a small parent: a child forked from this python
# process counts python's pages until it execs. GNU time if installed,
# else a minimal python wrapper (which adds its own few MiB to both tools).
rss_file = os.path.join(work, "rss.txt")
if os.access("/usr/bin/time", os.X_OK):
    wrap = ["/usr/bin/time", "-f", "%M", "-o", rss_file]
else:
    wrap = ["python3", "-S", "-c", "import os, sys\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    os.execvp(sys.argv[1], sys.argv[1:])\n"
            "_, st, ru = os.wait4(pid, 0)\n"
            "open(os.environ['RSS_FILE'], 'w').write(str(ru.ru_maxrss))\n"
            "sys.exit(os.waitstatus_to_exitcode(st))"]
os.environ["RSS_FILE"] = rss_file

def measure(cmd, before=None):
    """Wall seconds and peak RSS (KiB) of one run of cmd."""
    if before:
        before()
    t = time.monotonic()
    p = subprocess.run(wrap + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.monotonic() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.decode(errors='replace')}")
    with open(rss_file) as f:
        return wall, int(f.read().split()[-1])

def rm(*paths):
    def f():
        for p in paths:
            if os.path.exists(p):
                os.remove(p)
    return f

def data_runs(path):
    """(start, end) of the data runs of a sparse file."""
    runs, pos = [], 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                s = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            e = os.lseek(fd, s, os.SEEK_HOLE)
            runs.append((s, e))
            pos = e
    return runs

def same_content(a, b):
    """Byte-identical, reading only where either file has data."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    ranges = sorted(data_runs(a) + data_runs(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        end = 0
        for s, e in ranges:
            s = max(s, end)
            while s < e:
                n = min(e - s, 4 << 20)
                if os.pread(fa.fileno(), n, s) != os.pread(fb.fileno(), n, s):
                    return False
                s += n
            end = max(end, e)
    return True

def du_kib(path):
    return os.stat(path).st_blocks // 2

rows = []
def case(label, gcmd, qcmd, before=None):
    g, q = [], []
    for _ in range(runs):
        g.append(measure(gcmd, before))
        q.append(measure(qcmd, before))
    med = statistics.median
    gt, qt = med(x[0] for x in g), med(x[0] for x in q)
    gm, qm = med(x[1] for x in g), med(x[1] for x in q)
    rows.append((label, gt, qt, gm / 1024, qm / 1024))
    print(f"{label:40}{gt:9.2f}{qt:9.2f}{gt / qt:7.2f}{gm / 1024:9.1f}{qm / 1024:9.1f}{gm / qm:7.2f}", flush=True)

def convert(name, label):
    case(f"convert {label}",
         [guard, "convert", "-q", img(name), out_g],
         ["qemu-img", "convert", "-O", "raw", img(name), out_q],
         before=rm(out_g, out_q))
    # The last run of each left its output: compare them.
    subprocess.run([guard, "convert", "-q", img(name), out_g], check=True, stderr=subprocess.DEVNULL)
    ok = same_content(out_g, out_q)
    notes.append(f"convert {name}: outputs {'identical' if ok else 'DIFFER'}; "
                 f"du qcow2-guard {du_kib(out_g)} KiB, qemu-img {du_kib(out_q)} KiB")
    rm(out_g, out_q)()
    if not ok:
        sys.exit(notes[-1])

notes = []
print(f"{'case':40}{'ours s':>9}{'qemu s':>9}{'ratio':>7}{'ours MiB':>9}{'qemu MiB':>9}{'ratio':>7}")
print(f"{'':40}{'(median wall time)':>25}{'(median peak RSS)':>25}")
convert("random", "random 64k (uncompressed)")
convert("zlib", "mixed, zlib-compressed")
convert("zstd", "mixed, zstd-compressed")
convert("frag", "fragmented 4k clusters")
convert("prealloc", f"{os.environ['PREALLOC_GIB']} GiB prealloc=metadata")
for name in ("random", "zlib", "zstd", "frag", "prealloc"):
    case(f"check --metadata-only {name}",
         [guard, "check", "--metadata-only", img(name)], ["qemu-img", "check", img(name)])
for name in ("zlib", "zstd"):
    case(f"check (decompress) {name}",
         [guard, "check", img(name)], ["qemu-img", "check", img(name)])
for name in ("random", "prealloc"):
    case(f"info {name}", [guard, "info", img(name)], ["qemu-img", "info", img(name)])
print()
for n in notes:
    print(n)
conv = [r for r in rows if r[0].startswith("convert")]
meta = [r for r in rows if r[0].startswith("check --metadata-only")]
print(f"worst convert time ratio: {max(r[1] / r[2] for r in conv):.2f} (target <= 1.0, aim 0.7)")
print(f"worst check --metadata-only time ratio: {max(r[1] / r[2] for r in meta):.2f} (target <= 1.0)")
print(f"highest qcow2-guard peak RSS: {max(r[3] for r in rows):.1f} MiB (target <= 64)")
EOF
