#!/usr/bin/env bash
# Run oss-fuzz/build.sh the way OSS-Fuzz's base builder does, without
# docker: SRC, OUT and WORK are fresh temporary folders (SRC/qcow2-guard
# is this checkout), then check what landed in OUT: every target binary
# (and that it runs over its seed corpus), its seed corpus zip, dictionary
# and .options file.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export SRC=$tmp/src OUT=$tmp/out WORK=$tmp/work
mkdir -p "$SRC" "$OUT" "$WORK"
ln -s "$root" "$SRC/qcow2-guard"
# What the base builder sets for an ASan libFuzzer build.
export SANITIZER=address FUZZING_ENGINE=libfuzzer ARCHITECTURE=x86_64
export FUZZING_LANGUAGE=rust LIB_FUZZING_ENGINE=-fsanitize=fuzzer
# Stable Rust here: let it accept cargo-fuzz's nightly flags.
export RUSTC_BOOTSTRAP=1

bash oss-fuzz/build.sh

targets=$(cd fuzz && cargo fuzz list)
fail=0
for t in $targets; do
    for f in "$t" "${t}_seed_corpus.zip" "$t.dict" "$t.options"; do
        if [ ! -s "$OUT/$f" ]; then
            echo "missing or empty in OUT: $f"
            fail=1
        fi
    done
    [ -x "$OUT/$t" ] || { echo "not executable: $t"; fail=1; }
    # ClusterFuzz reads sanitizer settings from the .options file too.
    grep -q '^quarantine_size_mb = 64$' "$OUT/$t.options" ||
        { echo "$t.options lacks the ASan quarantine setting"; fail=1; }
    n=$(unzip -Z1 "$OUT/${t}_seed_corpus.zip" | wc -l)
    mkdir -p "$WORK/$t"
    unzip -q -o "$OUT/${t}_seed_corpus.zip" -d "$WORK/$t"
    if ! (cd "$OUT" && "./$t" -runs=0 -rss_limit_mb=512 -malloc_limit_mb=256 \
        -dict="$t.dict" "$WORK/$t" >"$WORK/$t.log" 2>&1); then
        echo "target $t fails on its seed corpus:"
        tail -n 30 "$WORK/$t.log"
        fail=1
    fi
    echo "$t: binary $(du -h "$OUT/$t" | cut -f1), seed corpus $n files, runs clean"
done
extra=$(cd "$OUT" && ls | grep -v -E "^($(echo "$targets" | tr '\n' '|' | sed 's/|$//'))(_seed_corpus\.zip|\.dict|\.options)?$" || true)
[ -z "$extra" ] || echo "also in OUT: $extra"
[ "$fail" = 0 ] && echo "OUT is complete: $(ls "$OUT" | wc -l) files"
exit $fail
