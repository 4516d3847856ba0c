"""`hsmsim module-path` prints the module that PKCS#11 hosts load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hsmsim.resources import pkcs11_module
from p11helpers import REPO, require_module


def test_module_path_prints_the_built_module() -> None:
    require_module()
    r = subprocess.run([sys.executable, "-m", "hsmsim", "module-path"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0 and "No module named hsmsim.__main__" in r.stderr:
        r = subprocess.run([sys.executable, "-c", "import sys; from hsmsim.cli import main; sys.exit(main())",
                            "module-path"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path == pkcs11_module() and path.is_absolute() and path.name == "libhsmsim-pkcs11.so"
    assert path.read_bytes()[:4] == b"\x7fELF"
