#!/usr/bin/env bash
# Line coverage of parser/src reached by the committed fuzz corpus.
#
# Replays corpus/<target>/ and corpus/regressions/<target>/ through the fuzz
# target bodies (the root test tests/fuzz_corpus.rs) built with
# -C instrument-coverage on stable Rust, then reports with llvm-cov.
# llvm-profdata/llvm-cov must match rustc's LLVM: taken from the rustup
# component llvm-tools(-preview), installed if missing; failing that, from
# a Debian llvm-<major> package of the same major version.
#
#   scripts/fuzz-coverage.sh          summary per file and the total
#   scripts/fuzz-coverage.sh --lines  also the uncovered lines
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
tools="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin"
if [ ! -x "$tools/llvm-cov" ]; then
    rustup component add llvm-tools-preview >/dev/null 2>&1 || true
fi
if [ ! -x "$tools/llvm-cov" ]; then
    tools=/usr/lib/llvm-$llvm_major/bin
    if [ ! -x "$tools/llvm-cov" ]; then
        apt-get update -qq && apt-get install -y -qq "llvm-$llvm_major" >/dev/null
    fi
fi
[ -x "$tools/llvm-cov" ] || { echo "no llvm-cov for LLVM $llvm_major" >&2; exit 1; }

target_dir=$root/target/coverage
prof=$target_dir/profiles
rm -rf "$prof"
mkdir -p "$prof"
export RUSTFLAGS="-C instrument-coverage"
export CARGO_TARGET_DIR=$target_dir
export LLVM_PROFILE_FILE="$prof/%p-%m.profraw"

bin=$(cargo test --test fuzz_corpus --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*fuzz_corpus[^"]*\)".*/\1/p' | tail -n 1)
[ -n "$bin" ] || { echo "could not build the replay test" >&2; exit 1; }
"$bin" --quiet >/dev/null

"$tools/llvm-profdata" merge -sparse "$prof"/*.profraw -o "$prof/merged.profdata"
args=(-instr-profile="$prof/merged.profdata" "$bin"
    --ignore-filename-regex="(/\.cargo/|/rustc/|^$root/fuzz/|^$root/tests/|^$root/src/|/library/)")
"$tools/llvm-cov" report "${args[@]}" | sed "s#$root/##"
if [ "${1:-}" = "--lines" ]; then
    "$tools/llvm-cov" show "${args[@]}" --show-line-counts-or-regions \
        --format=text | grep -E '^ +[0-9]+\| +0\|' | head -n 400 || true
fi
total=$("$tools/llvm-cov" report "${args[@]}" | awk '/^TOTAL/ {print $(NF-3)}')
echo "parser/src line coverage by the fuzz corpus: $total"
