#!/usr/bin/env bash
# `cargo run --release -- ARGS` from a fresh clone: first makes sure the
# build's system dependency is there (scripts/deps.sh). README's first
# set-up command: scripts/run.sh check tests/data/sample.qcow2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
exec cargo run --quiet --release -- "$@"
