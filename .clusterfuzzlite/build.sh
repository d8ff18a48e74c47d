#!/bin/bash -eu
# ClusterFuzzLite uses the same build as OSS-Fuzz.
exec "$SRC/qcow2-guard/oss-fuzz/build.sh"
