"""The README's tutorials work as written: each block marked `<!-- tutorial: NAME -->` is run
as-is (shell blocks with bash -euo pipefail, Python blocks with this interpreter, the pytest
example under pytest) against a real cluster started by the tutorial itself."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"<!-- tutorial: ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)


def tutorials() -> dict[str, tuple[str, str]]:
    return {name: (lang, body) for name, lang, body in BLOCK.findall(README.read_text())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workdir:
    """A user's shell: a directory whose ./.hsmsim is the cluster, and the venv on PATH."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HSMSIM_", "AWS_"))}
        self.env.update(PATH=f"{BIN}:{os.environ['PATH']}", HSMSIM_HOME=str(path / ".hsmsim"),
                        HSMSIM_KMS_PORT=str(free_port()), PYTHONUNBUFFERED="1")

    def run(self, name: str, timeout: float = 240) -> str:
        lang, body = tutorials()[name]
        env = {**self.env, **self.exports()}  # a later block runs in the same user's shell
        if lang == "sh":
            cmd = ["bash", "-euo", "pipefail", "-c", body]
        elif lang == "python" and name == "pytest":
            (self.path / "test_example.py").write_text(body)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"]
            env = self.env
        else:
            cmd = [sys.executable, "-c", body]
        proc = subprocess.run(cmd, cwd=self.path, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"tutorial {name} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def exports(self) -> dict[str, str]:
        out = subprocess.run(["hsmsim", "env"], cwd=self.path, env=self.env,
                             capture_output=True, text=True).stdout  # empty before `hsmsim up`
        return dict(re.findall(r"^export (\w+)=(.*)$", out, re.M))

    def down(self) -> None:
        subprocess.run(["hsmsim", "down"], cwd=self.path, env=self.env, capture_output=True,
                       timeout=60)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Workdir]:
    wd = Workdir(tmp_path)
    yield wd
    wd.down()


def test_every_tutorial_block_is_known() -> None:
    assert set(tutorials()) == {"pkcs11", "pkcs11-python", "faults", "pytest", "tls",
                                "tls-serve", "kms", "kms-python", "cloudhsmv2"}
    assert "../shared" not in README.read_text()


def one_shell_script() -> str:
    """Every tutorial block in README order, as a user pastes them into one terminal: shell
    blocks as they are; a Python block into `python3` in that shell; the pytest example saved as
    test_example.py and run with pytest. Each block announces itself on stderr."""
    parts = ["set -euo pipefail"]
    for name, lang, body in BLOCK.findall(README.read_text()):
        parts.append(f"echo '### block {name}' >&2")
        if lang == "sh":
            parts.append(body)
        elif name == "pytest":
            parts.append(f"cat > test_example.py <<'__README_PY__'\n{body}__README_PY__\n"
                         "python3 -m pytest -q -p no:cacheprovider test_example.py")
        else:
            parts.append(f"python3 - <<'__README_PY__'\n{body}__README_PY__")
    parts.append("echo \"SCRATCH=$PWD\"")
    return "\n".join(parts) + "\n"


def test_every_block_runs_as_pasted_in_order_in_one_shell(workdir: Workdir) -> None:
    """A fresh shell in a clone: the venv on PATH and nothing else of hsmsim's in the
    environment. The tutorials keep the cluster in ./.hsmsim and write their own files into a
    scratch folder, not the clone."""
    env = {k: v for k, v in workdir.env.items() if k != "HSMSIM_HOME"}
    proc = subprocess.run(["bash", "-c", one_shell_script()], cwd=workdir.path, env=env,
                          capture_output=True, text=True, timeout=900)
    blocks = re.findall(r"^### block (\S+)$", proc.stderr, re.M)
    assert proc.returncode == 0, (f"the README failed in block {blocks[-1] if blocks else '?'}:"
                                  f"\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    assert blocks == [name for name, _, _ in BLOCK.findall(README.read_text())]
    out = proc.stdout
    scratch = Path(re.findall(r"^SCRATCH=(.*)$", out, re.M)[-1])
    assert scratch != workdir.path and not (workdir.path / "message.sig").exists()
    # Tutorial 1
    assert "token label        : hsm1" in out
    assert "pkcs11:token=hsm1;object=demo-rsa;id=%01;type=private" in out
    assert (scratch / "message.sig").stat().st_size == 256
    assert (scratch / "message2.sig").stat().st_size == 256
    assert "PSS signature: 256 bytes" in out
    assert "1 passed" in out
    # Tutorial 2
    for name in ("cert.pem", "chain.pem", "openssl.cnf", "s-server.sh"):
        assert (scratch / "tls-localhost" / name).is_file(), name
    assert "Protocol" in out and "hsmsim TLS offload: localhost" in out
    # Tutorial 3
    assert "top secret" in out
    assert re.search(r"arn:aws:kms:us-east-1:\d{12}:key/\S+\s+AWS_CLOUDHSM\s+Enabled", out), out
    # Tutorial 4: a cluster made through the CloudHSMv2 API signs with a key on both its HSMs
    assert (scratch / "ha.sig").stat().st_size == 256
    assert re.search(r"PRIVATE_KEY\s+RSA\s+ha-rsa\s+2/2", out), out
    assert re.search(r"hsm-\w+\s+us-east-1b\s+[\d.]+\s+ACTIVE", out), out
    # The config line of Tutorial 2 can be pasted again without breaking the next start.
    again = tutorials()["tls"][1].splitlines()[0]
    subprocess.run(["bash", "-euo", "pipefail", "-c", again], cwd=workdir.path, env=env,
                   check=True, capture_output=True, timeout=120)
    assert (workdir.path / ".hsmsim" / "hsmsim.toml").read_text().count("quirk_ro_session_fails") == 1
