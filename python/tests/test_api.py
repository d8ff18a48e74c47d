"""check() and info() against the command-line tool's JSON (one library
builds both) and against qemu-img, for paths, file objects and bytes."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest

import qcow2_guard
from qcow2_guard import CorruptImageError, NotQcow2Error, RefusedError, Verdict

from conftest import SAMPLE, be64, create, guard, patch, qemu_img, qemu_io


def without_exit(doc):
    doc = dict(doc)
    del doc["exit-code"]
    return doc


def test_sample_is_ok_and_matches_the_cli():
    r = qcow2_guard.check(SAMPLE)
    assert r.verdict is Verdict.OK and r.verdict == "ok" and r.ok
    assert r.findings == [] and r.finding_counts == {}
    assert r.stats["decompressed-clusters"] == 59
    assert r.image["cluster-size"] == 4096
    code, doc = guard("check", "--json", str(SAMPLE))
    assert code == 0
    assert r.to_dict() == without_exit(doc)


def test_info_matches_the_cli_and_qemu_img(tmp: Path):
    base = create(tmp / "base.qcow2")
    img = create(tmp / "top.qcow2", backing=("base.qcow2", "qcow2"))
    for path, policy in ((SAMPLE, []), (img, ["--allow-backing"])):
        ours = qcow2_guard.info(path, allow_backing=bool(policy))
        code, doc = guard("info", "--json", *policy, str(path))
        assert code == 0
        assert ours == without_exit(doc)
    ours = qcow2_guard.info(img)
    qemu = __import__("json").loads(qemu_img("info", "--output=json", str(img)).stdout)
    for key in ("virtual-size", "cluster-size", "backing-filename", "backing-filename-format", "dirty-flag"):
        assert ours[key] == qemu[key], key
    assert ours["format-specific"]["data"]["compat"] == qemu["format-specific"]["data"]["compat"]
    assert [f["code"] for f in ours["findings"]] == ["policy_backing_file"]
    assert base.exists()


def test_every_kind_of_source_gives_the_same_report(tmp: Path):
    data = SAMPLE.read_bytes()
    want = qcow2_guard.check(SAMPLE).to_dict()
    with open(SAMPLE, "rb") as f:
        f.seek(123)
        got = qcow2_guard.check(f).to_dict()
        assert f.tell() == 123, "the caller's file position is kept"
    want["filename"] = got["filename"] = ""
    for src in (data, bytearray(data), memoryview(data), io.BytesIO(data)):
        doc = qcow2_guard.check(src).to_dict()
        doc["filename"] = ""
        assert doc == want, type(src)
    assert got == want
    assert qcow2_guard.info(io.BytesIO(data))["virtual-size"] == 4 << 20


def test_check_reports_policy_and_corruption(tmp: Path):
    img = create(tmp / "a.qcow2", size="1M")
    qemu_io(img, "write -P 0xaa 0 64k")
    top = create(tmp / "top.qcow2", backing=("a.qcow2", "qcow2"))
    r = qcow2_guard.check(top)
    assert r.verdict is Verdict.UNSAFE
    assert [(f.code, f.severity, f.offset) for f in r.findings] == [("policy_backing_file", "error", 8)]
    assert qcow2_guard.check(top, allow_backing=True).ok
    # Point the first L1 entry at the refcount table: corrupt.
    l1 = be64(img, 40)
    rt = be64(img, 48)
    patch(img, l1, (0x8000000000000000 | rt).to_bytes(8, "big"))
    r = qcow2_guard.check(img)
    assert r.verdict is Verdict.CORRUPT
    assert r.has("metadata_overlap")
    assert all(isinstance(f.offset, int) for f in r.findings)
    code, doc = guard("check", "--json", str(img))
    assert code == 2 and r.to_dict() == without_exit(doc)
    # metadata_only skips decompression only.
    assert qcow2_guard.check(SAMPLE, metadata_only=True).stats["decompressed-clusters"] == 0


def test_typed_exceptions(tmp: Path):
    with pytest.raises(NotQcow2Error) as e:
        qcow2_guard.info(b"not a disk image at all" * 10)
    assert (e.value.code, e.value.offset) == ("bad_magic", 0)
    assert isinstance(e.value, qcow2_guard.Qcow2GuardError)
    img = create(tmp / "a.qcow2")
    patch(img, 56, (0).to_bytes(4, "big"))  # refcount_table_clusters
    with pytest.raises(CorruptImageError) as e:
        qcow2_guard.info(img)
    assert (e.value.code, e.value.offset) == ("missing_refcount_table", 56)
    assert "[missing_refcount_table] at offset 0x38" in str(e.value)
    # check() reports the same error as a finding instead of raising.
    r = qcow2_guard.check(img)
    assert r.verdict is Verdict.INVALID
    assert [(f.code, f.offset) for f in r.findings] == [("missing_refcount_table", 56)]
    # Over a cap the caller can tighten: refused, not corrupt.
    img = create(tmp / "b.qcow2")
    patch(img, 4, (3).to_bytes(4, "big"))
    patch(img, 72, (1 << 5).to_bytes(8, "big"))
    assert qcow2_guard.check(img).verdict is Verdict.UNSAFE
    with pytest.raises(FileNotFoundError):
        qcow2_guard.check(tmp / "missing.qcow2")
    with pytest.raises(TypeError):
        qcow2_guard.check(12345)  # type: ignore[arg-type]
    assert RefusedError.__mro__[1] is qcow2_guard.Qcow2GuardError


def test_the_gil_is_released_during_a_check(tmp: Path):
    # A compressible image of compressed clusters: check decompresses all.
    raw = tmp / "a.raw"
    raw.write_bytes((b"qcow2-guard test pattern " * 41)[:1024] * (48 << 10))
    img = tmp / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(raw), str(img))
    done = threading.Event()
    span = []
    result = []

    def work():
        start = time.monotonic()
        result.append(qcow2_guard.check(img))
        span.extend((start, time.monotonic()))
        done.set()

    ticks = []
    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():
        ticks.append(time.monotonic())
        time.sleep(0.0002)
    t.join()
    r = result[0]
    assert r.ok and r.stats["decompressed-clusters"] == 768
    # The main thread kept running while the library worked: with the GIL
    # held for the whole call, no tick could fall inside it.
    inside = [x for x in ticks if span[0] < x < span[1]]
    assert len(inside) >= 3, (len(inside), span[1] - span[0])


def test_threads_like_the_cli(tmp: Path):
    """``threads`` is the CLI's ``check --threads`` / ``convert -m``: any
    value gives the same report and the same disk; values the CLI refuses
    raise ValueError before anything is read or written."""
    raw = tmp / "disk.raw"
    raw.write_bytes(b"".join(bytes([i % 251]) * 4096 + bytes(range(256)) * 16 for i in range(256)))
    img = tmp / "c.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    want = qcow2_guard.check(img, threads=1)
    assert want.verdict is Verdict.OK and want.stats["decompressed-clusters"] > 0
    for n in (2, 4, 64):
        assert qcow2_guard.check(img, threads=n).to_dict() == want.to_dict()
    code, doc = guard("check", "--json", "--threads", "3", str(img))
    assert code == 0 and without_exit(doc) == want.to_dict()
    for n in (1, 3):
        out = tmp / f"out{n}.raw"
        assert qcow2_guard.convert(img, out, threads=n) == []
        assert out.read_bytes() == raw.read_bytes()
    bad_out = tmp / "bad.raw"
    for bad in (0, 65, -1, 1.5, True, "2"):
        with pytest.raises(ValueError):
            qcow2_guard.check(img, threads=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            qcow2_guard.convert(img, bad_out, threads=bad)  # type: ignore[arg-type]
    assert not bad_out.exists()


def test_data_file_like_the_cli(tmp: Path):
    """``data_file=`` is the CLI's ``check --data-file``: with it the check
    finds guest data mapped past the data file's end (``past_eof``), which
    QEMU reads as zeros and ``qemu-img check`` calls clean; without it the
    tables are checked alone. Same report as the CLI; misuse raises."""
    img, data = tmp / "df.qcow2", tmp / "df.data"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data},cluster_size=65536", str(img), "1M")
    qemu_io(img, "write -P 0xaa 0 64k", "write -P 0xbb 128k 4k")
    os.truncate(data, 132 * 1024)
    assert qemu_img("check", str(img), check=False).returncode == 0

    alone = qcow2_guard.check(img, allow_data_file=True)
    assert alone.verdict is Verdict.OK, alone.findings
    for given in (data, str(data), data.read_bytes()):
        r = qcow2_guard.check(img, allow_data_file=True, data_file=given)
        assert r.verdict is Verdict.CORRUPT
        assert {f.code for f in r.findings} == {"past_eof"}
    code, doc = guard("check", "--json", "--allow-data-file", "--data-file", str(data), str(img))
    assert code == 2 and without_exit(doc) == r.to_dict()

    with pytest.raises(ValueError):
        qcow2_guard.check(img, data_file=data)
    with pytest.raises(ValueError):
        qcow2_guard.check(SAMPLE, allow_data_file=True, data_file=data)
    with pytest.raises(FileNotFoundError):
        qcow2_guard.check(img, allow_data_file=True, data_file=tmp / "missing.data")
