"""The command line behaves as shell tools do: a bad flag shows the usage of the sub-command it
was given to, and a reader that goes away (`| head -1`) ends the command without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HSMSIM = [sys.executable, "-m", "hsmsim"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HSMSIM_")}


def test_bad_flag_prints_the_subcommands_usage(tmp_path: Path) -> None:
    r = subprocess.run([*HSMSIM, "hsm", "kill", "--bogus", "hsm-x", "--state", str(tmp_path)],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("usage: hsmsim hsm kill "), r.stderr
    assert "hsmsim hsm kill: error: unrecognized arguments: --bogus" in r.stderr
    r = subprocess.run([*HSMSIM, "status", "--bogus"], capture_output=True, text=True, env=_env(),
                       timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("usage: hsmsim status "), r.stderr


def test_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    # `hsmsim config` prints about fifty rows; the reader takes one line and closes the pipe.
    r = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -c1 >/dev/null', "-",
                        *HSMSIM, "config", "--state", str(tmp_path)],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
    assert r.stderr == ""
