"""The README's Python examples run as written, from the repository root."""

from __future__ import annotations

import os
import re

from conftest import REPO


def python_blocks():
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_examples_run(capsys):
    blocks = python_blocks()
    assert blocks, "no Python example in the README"
    here = os.getcwd()
    os.chdir(REPO)
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(here)
    out = capsys.readouterr().out
    assert "59 compressed clusters verified" in out
    assert "bad_magic 0" in out
