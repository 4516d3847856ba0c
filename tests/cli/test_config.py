"""`hsmsim config` shows every setting with its effective value and source, refuses unknown
settings with a message naming them, and the README's configuration reference lists them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hsmsim.cli.config import SECTIONS, settings
from hsmsim.testing.cluster import HsmsimCluster

ROOT = Path(__file__).resolve().parents[2]
HSMSIM = [sys.executable, "-m", "hsmsim"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HSMSIM_")}
    return subprocess.run([*HSMSIM, *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=60)


def test_layers_and_sources(tmp_path: Path) -> None:
    (tmp_path / "hsmsim.toml").write_text("[kms]\nport = 4700\n[gateway]\nquirk_data_limits = false\n")
    out = run("config", "--state", str(tmp_path), "--json",
              env={"HSMSIM_KMS_PORT": "4800", "HSMSIM_CLUSTER_MAX_RETRIES": "1"})
    assert out.returncode == 0, out.stderr
    rows = {(r["section"], r["setting"]): r for r in json.loads(out.stdout)}
    assert rows[("kms", "port")]["value"] == 4800 and rows[("kms", "port")]["source"] == "environment"
    assert rows[("gateway", "quirk_data_limits")]["value"] is False
    assert rows[("gateway", "quirk_data_limits")]["source"] == "file"
    assert rows[("cluster", "max_retries")]["value"] == 1
    assert rows[("node", "max_keys")] == {**rows[("node", "max_keys")], "value": 16666, "source": "default"}


def test_bad_settings_are_named(tmp_path: Path) -> None:
    (tmp_path / "hsmsim.toml").write_text("[kms]\nprot = 1\n")
    out = run("config", "--state", str(tmp_path))
    assert out.returncode == 1 and "unknown setting(s) in [kms]: prot" in out.stderr
    (tmp_path / "hsmsim.toml").write_text("[kms]\nport = 1\n")
    out = run("config", "--state", str(tmp_path), env={"HSMSIM_KMS_STRICT_SIGV4": "maybe"})
    assert out.returncode == 1 and "HSMSIM_KMS_STRICT_SIGV4 must be true or false" in out.stderr
    # A misspelled section is refused as a misspelled key is, in `config` and in `up`.
    (tmp_path / "hsmsim.toml").write_text("[gatway]\nquirk_ro_session_fails = false\n")
    out = run("config", "--state", str(tmp_path))
    assert out.returncode == 1 and "unknown section(s) gatway" in out.stderr, out.stderr
    out = run("up", "--state", str(tmp_path), "--detach")
    assert out.returncode != 0 and "unknown section(s) gatway" in out.stderr, out.stderr
    assert not (tmp_path / "cluster.json").exists()
    (tmp_path / "hsmsim.toml").write_text("[kms\n")
    out = run("config", "--state", str(tmp_path))
    assert out.returncode == 1 and "hsmsim.toml" in out.stderr


def test_readme_documents_every_setting(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [f"[{r['section']}] {r['setting']}" for r in settings({}, {})
               if f"`{r['setting']}`" not in readme.split("## Configuration")[1]]
    assert not missing, f"README's configuration reference lacks: {missing}"
    # ... and names no setting that does not exist (a `[kms] enabled` row did).
    import re
    known = {(r["section"], r["setting"]) for r in settings({}, {})}
    rows = set(re.findall(r"^\| (\w+) \| `(\w+)` \|", readme.split("## Configuration")[1], re.M))
    assert rows and rows <= known, f"README documents settings that do not exist: {rows - known}"
    assert "../shared" not in readme, "the README points outside the repository"
    assert {s for s, _ in SECTIONS} == {"cluster", "node", "gateway", "kms", "cloudhsm"}


def test_running_daemon_settings_and_edits_not_applied(cli_cluster: HsmsimCluster) -> None:
    toml = cli_cluster.state_dir / "hsmsim.toml"
    before = toml.read_text()
    try:
        toml.write_text(before + "\n[gateway]\nquirk_ro_session_fails = false\n")
        r = cli_cluster.cli("up", "--detach")
        assert r.returncode == 0, r.stderr
        assert ("[gateway] quirk_ro_session_fails = False (file) is not applied: the running "
                "daemon uses True; run `hsmsim down && hsmsim up`") in r.stderr, r.stderr
        rows = {(x["section"], x["setting"]): x for x in json.loads(cli_cluster.cli("config", "--json").stdout)}
        row = rows[("gateway", "quirk_ro_session_fails")]
        assert row["value"] is True and row["file_value"] is False
        assert "not applied until `hsmsim down && hsmsim up`" in row["note"]
        assert rows[("kms", "port")]["note"] == ""
    finally:
        toml.write_text(before)
    r = cli_cluster.cli("up", "--detach")
    assert r.returncode == 0 and "is not applied" not in r.stderr, r.stderr


def test_config_set_edits_one_line_and_checks_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = run("config", "set", "gateway.quirk_ro_session_fails", "false", "--state", str(state))
    assert r.returncode == 0, r.stderr
    toml = state / "hsmsim.toml"
    assert toml.read_text() == "[gateway]\nquirk_ro_session_fails = false\n"
    assert (toml.stat().st_mode & 0o777, state.stat().st_mode & 0o777) == (0o600, 0o700)
    toml.write_text("# mine\n[kms]\nport = 4700  # the port\n\n[gateway]\nquirk_ro_session_fails = false\n")
    for _ in range(2):  # setting it again changes nothing else
        assert run("config", "set", "kms.port", "4800", "--state", str(state)).returncode == 0
    assert toml.read_text() == "# mine\n[kms]\nport = 4800\n\n[gateway]\nquirk_ro_session_fails = false\n"
    before = toml.read_text()
    for args, why in ((("gateway.nope", "1"), "[gateway] has no setting 'nope'"),
                      (("kms.port", "abc"), "kms.port must be a number"),
                      (("bogus", "1"), "is not SECTION.NAME")):
        r = run("config", "set", *args, "--state", str(state))
        assert r.returncode == 1 and why in r.stderr, r.stderr
    assert toml.read_text() == before
    rows = {(x["section"], x["setting"]): x for x in json.loads(run("config", "--json", "--state", str(state)).stdout)}
    assert rows[("kms", "port")]["value"] == 4800 and rows[("kms", "port")]["source"] == "file"
