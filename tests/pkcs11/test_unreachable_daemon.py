"""An application whose daemon is not running gets CKR_DEVICE_ERROR, and the module says why
on stderr, once per process (the daemon's log cannot: there is no daemon)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from p11helpers import require_module

_PROGRAM = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
print(hex(lib.C_Initialize(None)), hex(lib.C_Initialize(None)))
"""


def test_unreachable_daemon_is_reported_once_on_stderr(tmp_path: Path) -> None:
    module = require_module()
    missing = tmp_path / "no-daemon" / "gateway.sock"
    env = {**os.environ, "HSMSIM_SOCKET": str(missing)}
    r = subprocess.run([sys.executable, "-c", _PROGRAM, str(module)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.stdout.split() == ["0x30", "0x30"]  # CKR_DEVICE_ERROR both times
    lines = [x for x in r.stderr.splitlines() if x.startswith("libhsmsim-pkcs11:")]
    assert lines == [f"libhsmsim-pkcs11: cannot reach the hsmsim daemon at {missing} (No such file "
                     "or directory); start it with `hsmsim up`, or point HSMSIM_SOCKET at its "
                     "gateway.sock"]
