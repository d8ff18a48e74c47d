#!/bin/bash -eu
# OSS-Fuzz / ClusterFuzzLite build script: builds every cargo-fuzz target
# of fuzz/ and puts into $OUT, for each target, the binary, a seed corpus
# zip (corpus/<target>/ plus corpus/regressions/<target>/), the dictionary
# and a .options file. Runs from the repository root ($SRC/qcow2-guard).
# Targets (fuzz/Cargo.toml bins): header, tables, decompress, structured,
# read, check, mutate, stream, convert; every one gets the same options (inputs over 1 MiB are
# ignored by the bodies, read's 16-byte trailer included).
#
# Local check without docker: scripts/oss-fuzz-local.sh.

cd "${QCOW2_GUARD_SRC:-$SRC/qcow2-guard}"

cargo fuzz build -O
bin=fuzz/target/x86_64-unknown-linux-gnu/release

for target in $(cargo fuzz list); do
    cp "$bin/$target" "$OUT/"
    rm -f "$OUT/${target}_seed_corpus.zip"
    for dir in "corpus/$target" "corpus/regressions/$target"; do
        if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
            (cd "$dir" && zip -q -j "$OUT/${target}_seed_corpus.zip" ./*)
        fi
    done
    cp corpus/qcow2.dict "$OUT/$target.dict"
    cat > "$OUT/$target.options" <<OPTIONS
[libfuzzer]
dict = $target.dict
max_len = 1048576
rss_limit_mb = 512
malloc_limit_mb = 256

[asan]
# Safe Rust has no use-after-free for ASan's 256 MiB default quarantine to
# catch, and it counts against rss_limit_mb (scripts/fuzz-ci.sh sets the same).
quarantine_size_mb = 64
OPTIONS
done
