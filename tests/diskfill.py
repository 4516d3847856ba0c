"""A real full disk for tests: a small tmpfs mounted for one test (root only; the test is
skipped with the reason otherwise), and a filler that takes it to the last byte."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(size_mb: int) -> Iterator[Path]:
    """A `size_mb` MiB tmpfs at a short path under /tmp (Unix socket paths are short)."""
    disk = Path(tempfile.mkdtemp(prefix="hsmsim-disk-", dir="/tmp"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs",
                        str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        disk.rmdir()
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
        shutil.rmtree(disk, ignore_errors=True)


def fill(disk: Path) -> Path:
    """Fill the filesystem to the last byte; returns the filler file (delete it for space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 14, 1 << 9, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler
