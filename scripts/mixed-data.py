#!/usr/bin/env python3
"""Write SIZE bytes of the benchmarks' mixed data to PATH (scripts/bench.sh,
scripts/instructions.sh): per 1 MiB, 40% base64 text of random bytes, 20%
random, 20% zeros, 20% short repeated records. The mix of kinds is the same
on every run (seeded); the random bytes are not.

Usage: mixed-data.py PATH SIZE
"""
import base64, os, random, sys

path, size = sys.argv[1], int(sys.argv[2])
r = random.Random(1)
mib = 1 << 20
with open(path, "wb") as f:
    for _ in range(size // mib):
        k = r.random()
        if k < 0.4:
            f.write(base64.b64encode(os.urandom(mib * 3 // 4 + 2))[:mib])
        elif k < 0.6:
            f.write(os.urandom(mib))
        elif k < 0.8:
            f.write(bytes(mib))
        else:
            rec = b"".join(b"%08d record %s\n" % (i, os.urandom(8).hex().encode()) for i in range(64))
            f.write((rec * (mib // len(rec) + 1))[:mib])
