#!/usr/bin/env bash
# Long differential campaign against qemu-img (see README, "Differential
# engine"): builds in release and runs qcow2-differential under nice.
#   scripts/differential.sh [MUTANTS [SEED [JOBS]]]   (default 20000 20000 2)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p qcow2-guard-cli -p qcow2-differential
exec nice -n 10 target/release/qcow2-differential --guard target/release/qcow2-guard \
    --mutants "${1:-20000}" --seed "${2:-20000}" --jobs "${3:-2}" --breakdown
