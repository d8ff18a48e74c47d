#!/usr/bin/env bash
# The build's one system dependency: libzstd-dev (with pkg-config), because
# zstd clusters are decoded by the system's libzstd, the library QEMU links
# (.cargo/config.toml; SECURITY.md, "Decoders"). Installs it from Debian's
# packages when it is missing; does nothing when pkg-config already finds it.
# Called by scripts/run.sh, scripts/test.sh and .ci/run.
set -euo pipefail
if pkg-config --exists libzstd 2>/dev/null; then
    exit 0
fi
echo "qcow2-guard: installing pkg-config and libzstd-dev (Debian packages)" >&2
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q >/dev/null
"${sudo[@]}" apt-get install -y -q pkg-config libzstd-dev >/dev/null
pkg-config --exists libzstd
