"""The streaming inspector and convert, against check and qemu-img."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

import qcow2_guard
from qcow2_guard import CorruptImageError, RefusedError, StreamInspector, Verdict

from conftest import SAMPLE, be64, create, patch, qemu_img, qemu_io


def same(a, b):
    a, b = a.to_dict(), b.to_dict()
    a["filename"] = b["filename"] = ""
    return a == b


def test_streamed_report_equals_check(tmp: Path):
    img = create(tmp / "a.qcow2", size="8M")
    qemu_io(img, "write -P 0xaa 0 1M", "write -P 0x55 4M 64k")
    whole = qcow2_guard.check(img)
    data = img.read_bytes()
    # From a file object and from an iterator of chunks of odd sizes.
    with open(img, "rb") as f:
        assert same(qcow2_guard.inspect_stream(f, chunk_size=777), whole)
    chunks = (data[i : i + 5000] for i in range(0, len(data), 5000))
    assert same(qcow2_guard.inspect_stream(chunks), whole)
    # A layout with backward references: needs the spool.
    r = qcow2_guard.inspect_stream(io.BytesIO(SAMPLE.read_bytes()))
    assert r.verdict is Verdict.NEEDS_RANDOM_ACCESS and r.has("needs_random_access")
    insp = StreamInspector(spool=str(SAMPLE))
    for i in range(0, SAMPLE.stat().st_size, 4096):
        insp.feed(SAMPLE.read_bytes()[i : i + 4096])
    assert insp.position == SAMPLE.stat().st_size
    assert same(insp.finish(), qcow2_guard.check(SAMPLE)) and insp.read_back
    # A spool the caller writes as the upload arrives (a file object).
    spool = open(tmp / "spool", "w+b")
    insp = StreamInspector(spool=spool)
    for i in range(0, len(SAMPLE.read_bytes()), 8192):
        chunk = SAMPLE.read_bytes()[i : i + 8192]
        insp.feed(chunk)
        spool.write(chunk)
        spool.flush()
    assert same(insp.finish(), qcow2_guard.check(SAMPLE))
    with pytest.raises(RuntimeError):
        insp.feed(b"x")


def test_early_verdict(tmp: Path):
    create(tmp / "base.qcow2", size="16M")
    img = create(tmp / "top.qcow2", backing=("base.qcow2", "qcow2"), size="16M")
    qemu_io(img, "write -P 0x33 0 8M")
    insp = StreamInspector()
    assert insp.early.state == "pending"
    data = img.read_bytes()
    insp.feed(data[:65536])
    e = insp.early
    assert e.refused and [f.code for f in e.findings] == ["policy_backing_file"]
    r = qcow2_guard.inspect_stream(open(img, "rb"), stop_early=True)
    assert r.verdict is not Verdict.OK
    insp = StreamInspector(allow_backing=True)
    insp.feed(data[:65536])
    assert insp.early.state == "clear"


def test_convert_matches_qemu_img(tmp: Path):
    raw = tmp / "g.raw"
    raw.write_bytes(os.urandom(1 << 20) + b"\0" * (1 << 20) + b"abc" * 100000)
    for opts in ("compression_type=zlib", "compression_type=zstd"):
        img = tmp / "c.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o", opts, str(raw), str(img))
        ticks = []
        out = tmp / "out.raw"
        assert qcow2_guard.convert(img, out, progress=lambda d, t: ticks.append((d, t))) == []
        qemu_img("convert", "-O", "raw", str(img), str(tmp / "q.raw"))
        assert out.read_bytes() == (tmp / "q.raw").read_bytes()
        assert ticks and ticks[-1][0] == ticks[-1][1] == out.stat().st_size
        buf = io.BytesIO()
        qcow2_guard.convert(img, buf)
        assert buf.getvalue() == out.read_bytes()


def test_convert_refusals(tmp: Path):
    base = create(tmp / "base.qcow2")
    qemu_io(base, "write -P 0x44 0 1M")
    top = create(tmp / "top.qcow2", backing=("base.qcow2", "qcow2"))
    out = tmp / "out.raw"
    with pytest.raises(RefusedError) as e:
        qcow2_guard.convert(top, out)
    assert (e.value.code, e.value.offset, e.value.input) == ("policy_backing_file", 8, "image")
    assert [f.code for f in e.value.findings] == ["policy_backing_file"]
    assert not out.exists() and os.listdir(tmp) == sorted(os.listdir(tmp))
    # With the backing handed in: qemu-img's output.
    warnings = qcow2_guard.convert(top, out, allow_backing=True, backing=base)
    assert warnings == []
    qemu_img("convert", "-O", "raw", str(top), str(tmp / "q.raw"))
    assert out.read_bytes() == (tmp / "q.raw").read_bytes()
    # Without it: zeros, and a warning.
    out2 = tmp / "out2.raw"
    warnings = qcow2_guard.convert(top, out2, allow_backing=True)
    assert [w.code for w in warnings] == ["convert_no_backing"]
    with pytest.raises(ValueError):
        qcow2_guard.convert(top, out, backing=base)
    # Corrupt: the audit refuses, nothing is written.
    bad = create(tmp / "bad.qcow2")
    qemu_io(bad, "write -P 0xaa 0 64k")
    patch(bad, be64(bad, 40), (0x8000000000000000 | be64(bad, 48)).to_bytes(8, "big"))
    with pytest.raises(CorruptImageError) as e:
        qcow2_guard.convert(bad, tmp / "bad.raw")
    assert e.value.report.verdict is Verdict.CORRUPT and e.value.findings
    assert not (tmp / "bad.raw").exists()
    assert not [n for n in os.listdir(tmp) if n.endswith(".qcow2-guard-tmp")]
    # The output must not be the input.
    with pytest.raises(ValueError):
        qcow2_guard.convert(base, base)
    # A progress callback that raises: re-raised, no output kept.
    def boom(done, total):
        raise KeyError("stop")

    with pytest.raises(KeyError):
        qcow2_guard.convert(base, tmp / "boom.raw", progress=boom)
    assert not (tmp / "boom.raw").exists()
