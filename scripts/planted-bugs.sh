#!/usr/bin/env bash
# How strong is the fuzz suite? Plant small semantic bugs in the parser,
# one at a time, in a scratch copy of the repository, and see which the
# fuzz targets catch by mutation within a time limit.
#
# For each bug: the parser source is patched (an exact string replacement
# that must match once), the targets are built (libFuzzer, no sanitizer:
# the bugs are wrong answers, found by the oracles, not memory errors),
# then
#   1. the committed corpus and regressions of each listed target are
#      replayed: a crash there is "caught by a seed" (not counted as found
#      by fuzzing);
#   2. otherwise each listed target fuzzes for LIMIT seconds from that
#      corpus: a crash is "caught by fuzzing" (by mutation, since every
#      seed passed).
# Prints one line per bug and the totals.
#
#   PLANTED_LIMIT  seconds of fuzzing per target and bug (default 60)
#   PLANTED_ONLY   run only the bugs whose names contain this string
#   PLANTED_FRESH  1: no committed corpus at all (no seed check; fuzzing
#                  starts from nothing, so whatever is caught is caught by
#                  mutation alone)
#   PLANTED_TARGETS  fuzz these targets for every bug instead of the bug's
#                  own list (e.g. to measure one target's strength alone)
#   PLANTED_WORK   work folder (default: a new temporary one); kept, so a
#                  second run rebuilds incrementally
#
#   nice -n 10 scripts/planted-bugs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
limit=${PLANTED_LIMIT:-60}
only=${PLANTED_ONLY:-}
fresh=${PLANTED_FRESH:-0}
only_targets=${PLANTED_TARGETS:-}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

work=${PLANTED_WORK:-$(mktemp -d)}
mkdir -p "$work"
src=$work/src
pristine=$work/pristine
rm -rf "$src" "$pristine"
mkdir -p "$src" "$pristine"
# The repository without build output; fuzz/target is kept between bugs
# (in $work) so only the parser and the fuzz crate rebuild.
for d in Cargo.toml Cargo.lock parser fuzz corpus; do
    [ -e "$d" ] && cp -r "$d" "$src/"
done
cp -r parser "$pristine/"
rm -rf "$src/fuzz/target" "$src/fuzz/artifacts"
mkdir -p "$work/target"
ln -s "$work/target" "$src/fuzz/target"

# name | file | old | new | targets (one line each; \n in old/new is a
# newline).
bugs=$(cat <<'EOF'
sector_count_without_plus_one|parser/src/compressed.rs|sectors: extra.saturating_add(1),|sectors: extra,|structured mutate
compressed_past_eof_unchecked|parser/src/compressed.rs|if self.end() > file_len && !self.tail_cut_by_eof(file_len) {|if false && self.end() > file_len {|decompress mutate
deflate_short_output_accepted|parser/src/compressed.rs|Ok(Status::StreamEnd) if written == want => Ok(()),|Ok(Status::StreamEnd) => Ok(()),|decompress
l2_reserved_bits_ignored|parser/src/l1l2.rs|if raw & reserved != 0 {|if raw & reserved & 0 != 0 {|mutate
snapshot_l1_not_walked|parser/src/walker.rs|self.l1_entries(visit, &be_u64s(&raw), start, refs, L1Table::Snapshot);|let _ = (refs, be_u64s(&raw));|structured mutate
refcount_order_7_accepted|parser/src/header.rs|if self.refcount_order > 6 {|if self.refcount_order > 7 {|header tables structured mutate
extended_l2_zero_bits_ignored|parser/src/l1l2.rs|} else if zero & bit != 0 {|} else if zero & bit & 0 != 0 {|mutate
backing_fall_through_skipped|parser/src/read.rs|ExtentKind::Unallocated => self.read_backing_range(e.guest_offset, buf),|ExtentKind::Unallocated => {\n                buf.fill(0);\n                Ok(())\n            }|mutate read
l1_reserved_bit_8_ignored|parser/src/l1l2.rs|pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;|pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_00ff;|mutate
refcount_too_low_off_by_one|parser/src/check/walk.rs|if need > have && have < u32::MAX {|if need > have.saturating_add(1) && have < u32::MAX {|mutate
leak_off_by_one|parser/src/check/walk.rs|} else if have > need && need < u32::MAX {|} else if have > need.saturating_add(1) && need < u32::MAX {|mutate
zero_flag_ignored|parser/src/l1l2.rs|None => Ok(if raw & OFLAG_ZERO != 0 {|None => Ok(if raw & OFLAG_ZERO & 0 != 0 {|mutate read
l2_unaligned_offset_accepted|parser/src/l1l2.rs|if !is_aligned(off, g.cluster_size) {|if false && !is_aligned(off, g.cluster_size) {|mutate check
compressed_copied_flag_accepted|parser/src/l1l2.rs|if copied {|if false && copied {|structured tables
subcluster_bitmap_check_overstrict|parser/src/l1l2.rs|if alloc & zero != 0 {|if alloc != 0 && zero != 0 {|structured mutate
subcluster_allocated_without_host_accepted|parser/src/l1l2.rs|if alloc != 0 && host.is_none() {|if alloc == u32::MAX && host.is_none() {|structured tables
l1_too_small_off_by_one|parser/src/header.rs|if l1_size < needed {|if l1_size.saturating_add(1) < needed {|structured header tables
zstd_frame_end_unchecked|parser/src/compressed.rs|if hint != 0 {|if false && hint != 0 {|decompress structured
stream_payload_from_chunk_start|parser/src/stream.rs|let take = chunk.part(have.max(chunk.start), key.1);|let take = chunk.part(chunk.start, key.1);|stream
EOF
)

apply() { # file old new: exact replacement, which must match once
    python3 - "$1" "$2" "$3" <<'PY'
import sys
path, old, new = sys.argv[1], sys.argv[2].replace("\\n", "\n"), sys.argv[3].replace("\\n", "\n")
s = open(path).read()
n = s.count(old)
if n != 1:
    sys.exit(f"{path}: the text to replace occurs {n} times: {old!r}")
open(path, "w").write(s.replace(old, new))
PY
}

seed_dirs() { # target -> corpus dirs that exist (none when fresh)
    local t=$1
    [ "$fresh" = 1 ] && return 0
    for d in "$src/corpus/$t" "$src/corpus/regressions/$t"; do
        [ -d "$d" ] && echo "$d"
    done
}

total=0 fuzzed=0 seeded=0 missed=0 broken=0
report=$work/report.txt
: >"$report"
bin=$work/target/x86_64-unknown-linux-gnu/release
while IFS='|' read -r name file old new targets; do
    [ -z "$name" ] && continue
    [ -n "$only" ] && [[ $name != *"$only"* ]] && continue
    [ -n "$only_targets" ] && targets=$only_targets
    total=$((total + 1))
    cp "$pristine/$file" "$src/$file"
    if ! apply "$src/$file" "$old" "$new" 2>"$work/apply.log"; then
        line="$name: NOT APPLIED ($(cat "$work/apply.log"))"
        broken=$((broken + 1))
    elif ! (cd "$src/fuzz" && for t in $targets; do
        # Incremental: one changed line rebuilds in a fraction of the time.
        CARGO_PROFILE_RELEASE_INCREMENTAL=true cargo fuzz build -s none -O "$t" || exit 1
    done >"$work/build.log" 2>&1); then
        line="$name: DOES NOT BUILD (see $work/build.log)"
        broken=$((broken + 1))
        cp "$pristine/$file" "$src/$file"
        echo "$line" | tee -a "$report"
        continue
    else
        line=""
        for t in $targets; do
            mapfile -t seeds < <(seed_dirs "$t")
            mkdir -p "$work/seed-art"
            [ "$fresh" = 1 ] && break
            if ! "$bin/$t" -runs=0 -rss_limit_mb=1024 -artifact_prefix="$work/seed-art/" \
                "${seeds[@]}" >"$work/$t.seed.log" 2>&1; then
                line="$name: caught by a committed seed ($t)"
                seeded=$((seeded + 1))
                break
            fi
        done
        if [ -z "$line" ]; then
            for t in $targets; do
                mapfile -t seeds < <(seed_dirs "$t")
                rm -rf "$work/corpus-$t" "$work/art-$t"
                mkdir -p "$work/corpus-$t" "$work/art-$t"
                start=$(date +%s)
                if ! "$bin/$t" "$work/corpus-$t" "${seeds[@]}" -max_total_time="$limit" \
                    -rss_limit_mb=1024 -timeout=10 -dict="$src/corpus/qcow2.dict" \
                    -artifact_prefix="$work/art-$t/" >"$work/$t.fuzz.log" 2>&1; then
                    why=$(grep -m1 -E "panicked at|ERROR: libFuzzer" -A1 "$work/$t.fuzz.log" | tail -n 1 | cut -c1-150)
                    line="$name: caught by fuzzing ($t, $(($(date +%s) - start)) s): $why"
                    fuzzed=$((fuzzed + 1))
                    break
                fi
            done
        fi
        if [ -z "$line" ]; then
            line="$name: MISSED ($targets, ${limit} s each)"
            missed=$((missed + 1))
        fi
    fi
    cp "$pristine/$file" "$src/$file"
    echo "$line" | tee -a "$report"
done <<<"$bugs"

echo "planted bugs: $total (fresh=$fresh); caught by fuzzing (mutation) $fuzzed; by a committed seed $seeded; missed $missed; not applied/built $broken (limit ${limit} s per target)" | tee -a "$report"
