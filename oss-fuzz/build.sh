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

# libzstd (the C library QEMU links; the parser decodes zstd with it) is
# linked statically, so the runner image needs no libzstd.so.1. zstd-sys
# asks pkg-config (ZSTD_SYS_USE_PKG_CONFIG, .cargo/config.toml) for a
# static library, and the pkg-config crate links one statically only from
# outside /usr: give it a private copy of the builder's libzstd.a.
zstd_dir=$WORK/libzstd-static
mkdir -p "$zstd_dir/lib"
# (The compiler finds it in the multiarch folder; pkg-config's libdir may
# not name that folder.)
cp "$(${CC:-cc} -print-file-name=libzstd.a)" "$zstd_dir/lib/"
cat >"$zstd_dir/libzstd.pc" <<PC
libdir=$zstd_dir/lib
includedir=$(pkg-config --variable=includedir libzstd)
Name: zstd
Description: static copy of the builder's libzstd
Version: $(pkg-config --modversion libzstd)
Libs: -L\${libdir} -lzstd
Libs.private: -pthread
Cflags: -I\${includedir}
PC
export PKG_CONFIG_PATH=$zstd_dir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}

# With SANITIZER=coverage, OSS-Fuzz's cargo wrapper turns this into a
# plain `cargo build --bins` in fuzz/ and copies the binaries here.
cargo fuzz build -O
bin=${CARGO_TARGET_DIR:-fuzz/target}/x86_64-unknown-linux-gnu/release

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
