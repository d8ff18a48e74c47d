#!/usr/bin/env bash
# A longer ASan campaign than CI's 30 s: each named target (default: all)
# fuzzes for SECONDS from a copy of its committed corpus and regressions,
# PARALLEL targets at a time, at nice 15. Prints per target the executions,
# executions per second, libFuzzer's peak RSS, user CPU seconds and the
# process's peak RSS (GNU time), and any artifact; exits 1 on a finding.
# The grown corpora stay in WORKDIR/<target>/corpus for
# scripts/corpus-cmin.sh.
#
#   scripts/fuzz-campaign.sh [-t SECONDS] [-j PARALLEL] [-w WORKDIR] [TARGET...]
#   scripts/fuzz-campaign.sh -t 1200 -j 3        # 20 min per target
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=1200 par=3 work=
while getopts "t:j:w:" o; do
    case $o in
        t) secs=$OPTARG ;;
        j) par=$OPTARG ;;
        w) work=$OPTARG ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
work=${work:-$(mktemp -d "${TMPDIR:-/tmp}/qcow2-guard-campaign.XXXXXX")}
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
(cd fuzz && cargo fuzz build)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cd fuzz && cargo fuzz list)
bin=$root/fuzz/target/x86_64-unknown-linux-gnu/release
command -v /usr/bin/time >/dev/null || { echo "needs GNU time (/usr/bin/time)" >&2; exit 1; }

one() {
    local t=$1 d=$work/$1
    rm -rf "$d"
    mkdir -p "$d/corpus" "$d/artifacts"
    cp -r "$root/corpus/$t/." "$d/corpus/"
    cp "$bin/$t" "$d/bin"
    local seeds=("$d/corpus")
    [ -d "$root/corpus/regressions/$t" ] && seeds+=("$root/corpus/regressions/$t")
    # The quarantine as in CI (scripts/fuzz-ci.sh): safe Rust has no
    # use-after-free for it to catch, and it counts against the RSS limit.
    (cd "$d" && ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=64} \
        /usr/bin/time -f "%U %M" -o "$d/time" nice -n 15 ./bin "${seeds[@]}" \
        -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=30 \
        -dict="$root/corpus/qcow2.dict" -print_final_stats=1 \
        -artifact_prefix="$d/artifacts/" >"$d/log" 2>&1) || true
}

i=0
for t in "${targets[@]}"; do
    one "$t" &
    i=$((i + 1))
    if [ $((i % par)) -eq 0 ]; then wait; fi
done
wait

status=0
printf '%-11s %12s %8s %8s %8s %9s  %s\n' target executions exec/s "rss MB" "user s" "max KiB" findings
for t in "${targets[@]}"; do
    d=$work/$t
    stat() { sed -n "s/^stat::$1: *//p" "$d/log" | tail -n 1; }
    read -r user maxrss <"$d/time" || true
    found=$(find "$d/artifacts" -type f | wc -l)
    [ "$found" -eq 0 ] || status=1
    printf '%-11s %12s %8s %8s %8s %9s  %s\n' "$t" "$(stat number_of_executed_units)" \
        "$(stat average_exec_per_sec)" "$(stat peak_rss_mb)" "${user:-?}" "${maxrss:-?}" "$found"
done
echo "corpora and logs: $work"
exit $status
