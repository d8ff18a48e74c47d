#!/usr/bin/env bash
# Minimize corpus/<target>/ with new inputs merged in, as `cargo fuzz cmin`
# does (libFuzzer -merge=1 into an empty directory), except that the named
# seeds of scripts/make-corpus.sh are kept as they are: the merge starts
# from them, and of the fuzzer-found inputs (SHA-1 names) and the new
# inputs only those adding coverage over the seeds stay, smallest first.
#
#   scripts/corpus-cmin.sh TARGET [DIR...]   e.g. a campaign's corpus
#
#   CMIN_MAX_BYTES  leave out candidate inputs larger than this (default
#                   4096: a bigger input costs the replay and the repo more
#                   than the edges it adds)
# Uses the ASan build of `cargo fuzz build` (built here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
t=$1; shift
max=${CMIN_MAX_BYTES:-4096}
bin=fuzz/target/x86_64-unknown-linux-gnu/release/$t
[ -x "$bin" ] || (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build "$t")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out" "$work/in"
for f in corpus/"$t"/*; do
    if [[ $(basename "$f") =~ ^[0-9a-f]{40}$ ]]; then
        [ "$(stat -c %s "$f")" -le "$max" ] && cp "$f" "$work/in/"
    else
        cp "$f" "$work/out/"
    fi
done
for d in "$@"; do
    find "$d" -maxdepth 1 -type f -size -"$((max + 1))"c -exec cp {} "$work/in/" \;
done
before=$(ls corpus/"$t" | wc -l)
ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=64} "$bin" -merge=1 -rss_limit_mb=512 \
    -malloc_limit_mb=256 -timeout=10 "$work/out" "$work/in" >"$work/log" 2>&1 ||
    { tail -n 30 "$work/log"; exit 1; }
find corpus/"$t" -maxdepth 1 -type f -regextype posix-extended -regex '.*/[0-9a-f]{40}' -delete
find "$work/out" -maxdepth 1 -type f -regextype posix-extended -regex '.*/[0-9a-f]{40}' \
    -exec cp {} corpus/"$t"/ \;
echo "$t: $before -> $(ls corpus/"$t" | wc -l) files, $(du -sb corpus/"$t" | cut -f1) bytes"
