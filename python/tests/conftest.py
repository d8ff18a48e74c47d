"""Helpers shared by the Python tests: make images with qemu-img and
qemu-io (the oracle), run the qcow2-guard binary, patch bytes.

qemu-img must be installed (CI has qemu-utils): a missing qemu-img fails
the tests rather than skipping them. The binary is $QCOW2_GUARD_BIN, or
target/debug/qcow2-guard built with cargo when that is unset.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "data" / "sample.qcow2"


def run(args: List[str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}): {out.stderr.decode()}")
    return out


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["qemu-img", *args], check=check)


def qemu_io(image: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    out = run(args + [str(image)])
    text = out.stdout.decode()
    assert "error" not in text and "failed" not in text, text


def create(path: Path, opts: str = "", size: str = "1M", backing: Optional[Tuple[str, str]] = None) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing[0], "-F", backing[1]]
    qemu_img(*args, str(path), size)
    return path


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def be64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(8), "big")


_BIN: Optional[str] = None


def guard_bin() -> str:
    global _BIN
    if _BIN is None:
        env = os.environ.get("QCOW2_GUARD_BIN")
        if env:
            _BIN = env
        else:
            run(["cargo", "build", "--quiet", "--manifest-path", str(REPO / "Cargo.toml"), "--bin", "qcow2-guard"])
            _BIN = str(REPO / "target" / "debug" / "qcow2-guard")
    return _BIN


def guard(*args: str) -> Tuple[int, Dict[str, Any]]:
    """Run the CLI with --json; (exit code, document)."""
    out = run([guard_bin(), *args], check=False)
    assert out.returncode in (0, 1, 2, 3, 4), out
    return out.returncode, json.loads(out.stdout)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def hostile_dir(tmp_path_factory) -> Path:
    """The hostile catalogue of the Rust tests, as image files with a
    label each: $QCOW2_GUARD_HOSTILE_DIR when scripts/test.sh exported it
    during `cargo test`, otherwise exported now by running those tests."""
    env = os.environ.get("QCOW2_GUARD_HOSTILE_DIR")
    if env and any(Path(env).glob("*.qcow2")):
        return Path(env)
    d = tmp_path_factory.mktemp("hostile")
    subprocess.run(
        ["cargo", "test", "--quiet", "--manifest-path", str(REPO / "Cargo.toml"), "--test", "hostile", "--test", "cve", "--test", "check"],
        env={**os.environ, "QCOW2_GUARD_EXPORT_IMAGES": str(d)},
        check=True,
        capture_output=True,
    )
    return d
