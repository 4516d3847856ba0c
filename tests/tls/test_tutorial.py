"""The quick start of docs/tls-offload.md, run as its commands are written (bash in a fresh
directory): a default cluster first (read-only sessions refused, as CloudHSM: `tls init` warns),
then the documented configuration change and restart, `tls init`, the kit's s-server.sh and
curl with the kit's chain."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hsmsim.testing.cluster import free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "tls-offload.md"

SCRIPT = r"""
set -euo pipefail
hsmsim() { "$PYTHON" -c 'import sys; from hsmsim.cli import main; sys.exit(main())' "$@"; }
trap 'hsmsim down >/dev/null 2>&1 || true; [ -n "${SPID:-}" ] && kill "$SPID" 2>/dev/null || true' EXIT

hsmsim up --detach --state ./.hsmsim > up.out
hsmsim tls init --cn localhost --out ./strict-kit > strict.out 2> strict.err

hsmsim config set gateway.quirk_ro_session_fails false
hsmsim down && hsmsim up --detach > /dev/null

hsmsim tls init --cn localhost --out ./tls-localhost > init.out 2> init.err

./tls-localhost/s-server.sh > s_server.log 2>&1 &
SPID=$!
for i in $(seq 1 100); do
  curl -sS --cacert tls-localhost/chain.pem "https://localhost:$PORT/" > page.html 2> curl.err && break
  sleep 0.1
done
kill "$SPID"; wait "$SPID" 2>/dev/null || true; SPID=
hsmsim down > /dev/null
"""


def test_quick_start_commands(tmp_path: Path) -> None:
    for tool in ("curl", "openssl", "bash"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed")
    from hsmsim.resources import pkcs11_module
    try:
        pkcs11_module()
    except FileNotFoundError as exc:
        pytest.skip(f"hsmsim module not built: {exc}")
    doc = DOC.read_text()
    for line in ("hsmsim up --detach --state ./.hsmsim",
                 "hsmsim config set gateway.quirk_ro_session_fails false",
                 "hsmsim down && hsmsim up --detach",
                 "hsmsim tls init --cn localhost --out ./tls-localhost",
                 "./tls-localhost/s-server.sh",
                 "curl --cacert tls-localhost/chain.pem https://localhost:8443/"):
        assert line in doc, f"the quick start no longer says {line!r}"
    # Only the ports differ from the document: tests share the machine.
    (tmp_path / ".hsmsim").mkdir()
    (tmp_path / ".hsmsim" / "hsmsim.toml").write_text(f"[kms]\nport = {free_port()}\n")
    port = free_port()
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHON": sys.executable, "PORT": str(port),
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in ("HSMSIM_HOME", "HSMSIM_SOCKET", "HSMSIM_PIN", "OPENSSL_CONF"):
        env.pop(name, None)
    r = subprocess.run(["bash", "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=240)
    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.*")
            if p.is_file() and p.suffix in (".out", ".err", ".log")}
    assert r.returncode == 0, (r.stderr, logs)
    # The strict cluster: the kit is made, with a warning that names the fix.
    assert "quirk_ro_session_fails = false" in logs["strict.err"]
    assert str(tmp_path / ".hsmsim" / "hsmsim.toml") in logs["strict.err"]
    # After the change: no warning, and the server answers over TLS with the HSM key.
    assert "warning" not in logs["init.err"]
    assert "pkcs11:token=hsm1;object=tls-localhost-" in logs["init.out"]
    page = (tmp_path / "page.html").read_text(errors="replace")
    assert "-keyform engine" in page and "New, TLSv1." in page, (page[:500], logs)
