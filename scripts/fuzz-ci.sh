#!/usr/bin/env bash
# Build the fuzz targets under AddressSanitizer and run each for a short
# time, seeded from the committed corpus and regressions. Fails on any
# crash, timeout, leak or out-of-memory; the failing inputs are copied to
# fuzz-artifacts/<target>/ and printed in hex.
#
#   FUZZ_SECONDS  seconds per target (default 30)
#   FUZZ_TARGETS  targets to run (default: all of fuzz/Cargo.toml's bins)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seconds=${FUZZ_SECONDS:-30}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz missing: installing it"
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz needs nightly flags (-Zsanitizer); stable with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
# ASan keeps freed memory in a 256 MiB quarantine by default, which counts
# against -rss_limit_mb=512 although the target holds none of it (the
# structured target peaks at ~460 MiB RSS with it, ~180 MiB with 32 MiB).
# Safe Rust has no use-after-free for the quarantine to catch.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=64}

start=$(date +%s)
# fuzz/Cargo.lock must be current (cargo fuzz build has no --locked: ask
# cargo whether the lock file satisfies the manifests without changing it).
cargo metadata --locked --manifest-path fuzz/Cargo.toml --format-version 1 >/dev/null
(cd fuzz && cargo fuzz build)
echo "fuzz build: $(($(date +%s) - start)) s"

targets=${FUZZ_TARGETS:-$(cd fuzz && cargo fuzz list)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for t in $targets; do
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    seeds=("$root/corpus/$t")
    [ -d "$root/corpus/regressions/$t" ] && seeds+=("$root/corpus/regressions/$t")
    echo "== fuzz $t (${seconds} s)"
    if ! (cd fuzz && cargo fuzz run "$t" "$work/$t/corpus" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=512 -malloc_limit_mb=256 \
        -timeout=10 -dict="$root/corpus/qcow2.dict" -print_final_stats=1 \
        -artifact_prefix="$work/$t/artifacts/" >"$work/$t/log" 2>&1); then
        status=1
        tail -n 60 "$work/$t/log"
        mkdir -p "$root/fuzz-artifacts/$t"
        for f in "$work/$t/artifacts"/*; do
            [ -f "$f" ] || continue
            cp "$f" "$root/fuzz-artifacts/$t/"
            echo "-- $t artifact $(basename "$f") ($(wc -c <"$f") bytes), kept in fuzz-artifacts/$t/:"
            od -A x -t x1z "$f" | head -n 40
        done
        echo "FAILED: fuzz target $t (add the input to corpus/regressions/$t/ once fixed)"
    else
        grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$work/$t/log" | tr '\n' ' '
        echo
    fi
done
echo "fuzz step: $(($(date +%s) - start)) s"
exit $status
