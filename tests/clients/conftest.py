"""Real PKCS#11 clients (Java, Go, Node.js, ...) run unmodified against one cluster.

Each client is a small program under tests/clients/<language>/ that prints `key=value` lines
(binary values in base64); the tests check those values with pyca/cryptography as well as with
the client platform's own crypto. Builds (javac, go build, npm install) are cached under
.venv/clients/ keyed by a hash of their sources, so reruns only run the programs."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from hsmsim.testing.cluster import HsmsimCluster, start_cluster

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
README = ROOT / "README.md"


@pytest.fixture(scope="session")
def client_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HsmsimCluster]:
    """One default cluster (3 HSMs, CloudHSM quirks on) shared by every client test."""
    c = start_cluster(tmp_path_factory.mktemp("clients") / "state")
    try:
        yield c
    finally:
        c.down()


def client_env(cluster: HsmsimCluster, **extra: str) -> dict[str, str]:
    """The environment a user has after `eval "$(hsmsim env)"`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSMSIM_", "AWS_"))}
    env.update(cluster.env)
    env.update(extra)
    return env


def require(*tools: str) -> dict[str, str]:
    """Absolute paths of the tools, or skip the test naming what is missing."""
    found = {t: shutil.which(t) for t in tools}
    missing = [t for t, p in found.items() if p is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (`make deps` installs it)")
    return {t: str(p) for t, p in found.items()}


def cache_dir(name: str, sources: Sequence[Path], *salt: str) -> Path:
    """.venv/clients/<name>/<hash of the sources and salt>/ (created); the caller builds into it
    under `build_lock` and marks success with a `.built` file."""
    h = hashlib.sha256()
    for p in sorted(sources):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for s in salt:
        h.update(s.encode() + b"\0")
    base = Path(os.environ.get("HSMSIM_CLIENT_CACHE", ROOT / ".venv" / "clients"))
    d = base / name / h.hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d


class build_lock:
    """An exclusive lock on a cache directory, so parallel runs do not build it twice."""

    def __init__(self, d: Path) -> None:
        self.path = d / ".lock"

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def run_build(cmd: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None,
              timeout: float = 600) -> None:
    r = subprocess.run(list(cmd), cwd=cwd, env=None if env is None else dict(env),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (f"{' '.join(cmd)} failed ({r.returncode}):\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def run_client(cmd: Sequence[str], env: Mapping[str, str], timeout: float = 240) -> dict[str, str]:
    """Run a client program; its `key=value` lines as a dict (it must end with `done=true`)."""
    r = subprocess.run(list(cmd), env=dict(env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd[0]} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert out.get("done") == "true", r.stdout + r.stderr
    return out


def b64(out: Mapping[str, str], key: str) -> bytes:
    return base64.b64decode(out[key])


def readme_recipe(heading: str) -> list[str]:
    """The lines of the code blocks under README's `### <heading>`, stripped, without
    blank lines, `...` and comment-only lines: each must appear in the client's source."""
    text = README.read_text()
    start = text.index(f"### {heading}\n")
    end = text.find("\n## ", start)
    section = text[start:end if end >= 0 else len(text)]
    nxt = section.find("\n### ", 4)
    section = section[:nxt if nxt >= 0 else len(section)]
    blocks = re.findall(r"```\w*\n(.*?)```", section, re.S)
    assert blocks, f"no code block under ### {heading}"
    lines = [ln.strip() for block in blocks for ln in block.splitlines()]
    return [ln for ln in lines if ln and ln != "..." and not ln.startswith(("//", "#"))]


def assert_recipe_in_source(heading: str, source: Path) -> None:
    """The README's recipe is the code the test runs: every line of it is in the source."""
    src = {ln.strip() for ln in source.read_text().splitlines()}
    missing = [ln for ln in readme_recipe(heading) if ln not in src]
    assert not missing, f"README's {heading} recipe lines not in {source.name}: {missing}"
