#!/usr/bin/env bash
# Every test suite (README's second set-up command; .ci/run calls it too):
# the Rust workspace, then the Python package built from python/ by pip
# (maturin, abi3 wheel) into a virtual environment, and its pytest suite.
#
# Needs cargo, qemu-img/qemu-io, python3 with venv and pip, and PyPI (pip
# installs maturin, pytest, oslo.utils and cryptography into the venv). The venv is kept
# in target/python-venv (QCOW2_GUARD_VENV to move it).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh

echo "== Rust: cargo test --workspace"
# The hostile catalogue's images are kept for the Python side-by-side
# tests (tests/common: export).
images="$PWD/target/python-test-images"
rm -rf "$images"
QCOW2_GUARD_EXPORT_IMAGES="$images" cargo test --workspace

echo "== Python: build and install python/ into a venv"
venv=${QCOW2_GUARD_VENV:-target/python-venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || {
        # Without the venv module (Debian's python3 minus python3-venv).
        python3 -m pip install --quiet --user virtualenv
        python3 -m virtualenv --quiet "$venv"
    }
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
# oslo.utils' format_inspector imports cryptography (for LUKS).
"${pip[@]}" install pytest oslo.utils cryptography
# The documented install (pip builds the wheel with maturin), reinstalled
# every run so the tests see this tree; in the dev profile, which reuses
# what cargo test just compiled (pip install ./python alone builds release).
MATURIN_PEP517_ARGS="--profile dev" \
    "${pip[@]}" install --force-reinstall --no-deps ./python

echo "== Python: pytest"
# The binary cargo test just built, for the side-by-side tests.
QCOW2_GUARD_BIN="$PWD/target/debug/qcow2-guard" QCOW2_GUARD_HOSTILE_DIR="$images" \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -p no:logging python/tests
