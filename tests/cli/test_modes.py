"""Modes do not follow the caller's umask (issue 17.9): under `umask 000`, `hsmsim up` makes
the state directory 0700 and everything in it private (directories 0700, files and sockets
0600), logs and pid files included. The one documented exception is the cluster CA's public
certificate, ca/ca.crt (0644, inside the 0700 tree)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from hsmsim.testing.cluster import free_port

# Public, non-secret files meant to be read by other programs (inside the 0700 tree, so only by
# the owner's): the CA certificate, and p11-kit's module file when `hsmsim env` writes one.
SHARED = {"ca/ca.crt": 0o644, "hsmsim.module": 0o644}


def hsmsim(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "import sys; from hsmsim.cli import main; sys.exit(main())",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=lambda: os.umask(0))


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.lstat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def test_up_under_umask_000_keeps_everything_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSMSIM_")}
    env["HSMSIM_KMS_PORT"] = str(free_port())
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = hsmsim(["up", "--detach", "--json", "--state", str(state)], env)
    assert r.returncode == 0, r.stderr
    try:
        seen = modes(state)
        for must in ("daemon.log", "daemon.pid", "gateway.sock", "control.sock", "cluster.json"):
            assert must in seen, f"{must} missing from {sorted(seen)}"
        assert any(k.endswith("node.log") for k in seen)
        assert any(k.endswith("node.pid") for k in seen)
        assert any(k.endswith("audit.jsonl") for k in seen)
        wrong = {path: oct(mode) for path, mode in seen.items()
                 if path not in SHARED and mode & 0o077}
        assert not wrong, f"group/other bits under umask 000: {wrong}"
        assert seen["."] == 0o700
        assert seen["ca/ca.crt"] == SHARED["ca/ca.crt"]
        for path, mode in SHARED.items():
            assert seen.get(path, mode) == mode, (path, oct(seen[path]))
        dirs = [p for p in seen if (state / p).is_dir() and not (state / p).is_symlink()]
        assert all(seen[d] == 0o700 for d in dirs), {d: oct(seen[d]) for d in dirs}
    finally:
        d = hsmsim(["down", "--state", str(state)], env)
        assert d.returncode == 0, d.stderr
    # What `down` leaves (and the log it appended to) is still private.
    after = modes(state)
    wrong = {path: oct(mode) for path, mode in after.items()
             if path not in SHARED and mode & 0o077}
    assert not wrong, f"after down: {wrong}"
