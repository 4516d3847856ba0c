"""The packaging metadata is clean: setuptools applies pyproject.toml without a single warning,
so `make run` and `make test` print no deprecation banners while they install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CHECK = """
import warnings
warnings.simplefilter("error")
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution
apply_configuration(Distribution(), "pyproject.toml")
"""


def test_pyproject_applies_without_warnings() -> None:
    r = subprocess.run([sys.executable, "-c", _CHECK], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
