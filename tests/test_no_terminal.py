"""The suite never lets a child read the terminal, even when pytest itself runs under one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_INNER = '''
import subprocess

def test_child_has_no_terminal():
    # Opening /dev/tty succeeds only in a process that has a controlling terminal.
    r = subprocess.run(["sh", "-c", "exec 3</dev/tty && echo tty"], capture_output=True, text=True)
    assert r.stdout != "tty\\n", "a child could open the terminal"

def test_child_stdin_is_not_the_terminal():
    r = subprocess.run(["sh", "-c", "test -t 0 && echo tty || echo notty"], capture_output=True, text=True)
    assert r.stdout == "notty\\n"
'''


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` is needed to give pytest a terminal")
def test_children_get_no_terminal_under_a_pseudo_terminal(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_inner.py").write_text(_INNER)
    command = f"{sys.executable} -m pytest -q --color=no -p no:cacheprovider --rootdir {tmp_path} {tmp_path}"
    # `script` runs the inner pytest on a fresh pseudo-terminal, as a developer's shell would.
    r = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert "2 passed" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 0
