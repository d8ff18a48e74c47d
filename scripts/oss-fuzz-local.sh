#!/usr/bin/env bash
# Run oss-fuzz/build.sh the way OSS-Fuzz's base builder does, without
# docker: SRC, OUT and WORK are fresh temporary folders (SRC/qcow2-guard
# is this checkout), then check what landed in OUT: every target binary
# (and that it runs over its seed corpus), its seed corpus zip, dictionary
# and .options file, and that no binary needs libzstd.so (the runner image
# does not promise it: build.sh links libzstd statically).
#
#   SANITIZER=address (default): the ASan libFuzzer build.
#   SANITIZER=coverage: the coverage build, as OSS-Fuzz's cargo wrapper
#     makes it (`cargo fuzz build` becomes a plain `cargo build --bins` in
#     fuzz/ with -C instrument-coverage, copied to the release folder;
#     reproduced here by a `cargo` shim); each binary must also write a
#     profile over its seed corpus, and the profiles must merge and give
#     a line-coverage report (llvm-profdata and llvm-cov of the Rust
#     toolchain: OSS-Fuzz's coverage job does the same).
#
# RUSTFLAGS are those OSS-Fuzz's `compile` sets for Rust (cargo-fuzz then
# adds its own, as there). Builds go to target/oss-fuzz-$SANITIZER/ (not
# fuzz/target: other flags would rebuild everything there).
#
# Not reproduced (no docker here): the base image's own clang, libFuzzer
# (CUSTOM_LIBFUZZER_PATH) and libc++ (the coverage build's
# `-C link-arg=-lc++`); libfuzzer-sys builds its bundled libFuzzer with
# the system's C++ library instead.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export SRC=$tmp/src OUT=$tmp/out WORK=$tmp/work
mkdir -p "$SRC" "$OUT" "$WORK"
ln -s "$root" "$SRC/qcow2-guard"
# What the base builder sets for a libFuzzer build.
export SANITIZER=${SANITIZER:-address} FUZZING_ENGINE=libfuzzer ARCHITECTURE=x86_64
export FUZZING_LANGUAGE=rust LIB_FUZZING_ENGINE=-fsanitize=fuzzer
# Stable Rust here: let it accept cargo-fuzz's nightly flags.
export RUSTC_BOOTSTRAP=1

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/oss-fuzz-$SANITIZER}
if [ "$SANITIZER" = coverage ]; then
    # compile's coverage flags (without its -lc++), then the wrapper's.
    export RUSTFLAGS="--cfg fuzzing -Cdebuginfo=1 -Cforce-frame-pointers -Cinstrument-coverage -C debug-assertions=no"
    real_cargo=$(command -v cargo)
    mkdir -p "$tmp/bin"
    cat >"$tmp/bin/cargo" <<SHIM
#!/usr/bin/env bash
set -euo pipefail
if [ "\${1:-}" = fuzz ] && [ "\${2:-}" = build ]; then
    cd fuzz
    "$real_cargo" build --bins
    mkdir -p "\$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"
    cp -r "\$CARGO_TARGET_DIR"/debug/* "\$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/"
    exit 0
fi
exec "$real_cargo" "\$@"
SHIM
    chmod +x "$tmp/bin/cargo"
    export PATH=$tmp/bin:$PATH
fi

if [ "$SANITIZER" = address ]; then
    export RUSTFLAGS="--cfg fuzzing -Zsanitizer=address -Cdebuginfo=1 -Cforce-frame-pointers"
fi

start=$(date +%s)
bash oss-fuzz/build.sh
echo "build.sh: $(($(date +%s) - start)) s"

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
    if ldd "$OUT/$t" | grep -q libzstd; then
        echo "$t links libzstd dynamically: $(ldd "$OUT/$t" | grep libzstd)"
        fail=1
    fi
    export LLVM_PROFILE_FILE=$WORK/$t.profraw
    if ! (cd "$OUT" && "./$t" -runs=0 -rss_limit_mb=512 -malloc_limit_mb=256 \
        -dict="$t.dict" "$WORK/$t" >"$WORK/$t.log" 2>&1); then
        echo "target $t fails on its seed corpus:"
        tail -n 30 "$WORK/$t.log"
        fail=1
    fi
    if [ "$SANITIZER" = coverage ] && [ ! -s "$WORK/$t.profraw" ]; then
        echo "$t wrote no coverage profile"
        fail=1
    fi
    echo "$t: binary $(du -h "$OUT/$t" | cut -f1), seed corpus $n files, runs clean"
done
if [ "$SANITIZER" = coverage ] && [ "$fail" = 0 ]; then
    # What OSS-Fuzz's coverage job does with the profiles: merge them,
    # then a report per binary (a malformed profile fails here).
    sysroot=$(rustc --print sysroot)
    tools=$sysroot/lib/rustlib/x86_64-unknown-linux-gnu/bin
    if [ -x "$tools/llvm-profdata" ]; then
        "$tools/llvm-profdata" merge -sparse "$WORK"/*.profraw -o "$WORK/merged.profdata"
        for t in $targets; do
            total=$("$tools/llvm-cov" report "$OUT/$t" -instr-profile="$WORK/merged.profdata" \
                -ignore-filename-regex='/.cargo/|/rustc/' | tail -n 1)
            [ -n "$total" ] || { echo "$t: no coverage report"; fail=1; }
            echo "$t coverage (regions, functions, lines): $total"
        done
    else
        echo "llvm-tools missing (rustup component add llvm-tools): profiles not merged"
    fi
fi
extra=$(cd "$OUT" && ls | grep -v -E "^($(echo "$targets" | tr '\n' '|' | sed 's/|$//'))(_seed_corpus\.zip|\.dict|\.options)?$" || true)
[ -z "$extra" ] || echo "also in OUT: $extra"
[ "$fail" = 0 ] && echo "OUT is complete: $(ls "$OUT" | wc -l) files"
exit $fail
