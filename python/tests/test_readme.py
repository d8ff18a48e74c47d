"""The README's Python examples run as written, from a copy of the
repository's layout (they write their outputs in the current directory)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import REPO


def python_blocks():
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_examples_run(capsys, tmp_path: Path):
    blocks = python_blocks()
    assert len(blocks) == 3, "the README's Python examples"
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(REPO / "tests" / "data")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(here)
    out = capsys.readouterr().out
    assert "59 compressed clusters verified" in out
    assert "bad_magic 0" in out
    assert "4194304 bytes of raw disk" in out
    assert "qcow2 4194304 ok" in out
    assert (tmp_path / "store.img").read_bytes() == (REPO / "tests/data/sample.qcow2").read_bytes()
