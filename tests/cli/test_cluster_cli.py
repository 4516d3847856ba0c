"""The `hsmsim` cluster commands as a user runs them: real `hsmsim up --detach`, status,
env, users, keys, HSM faults, backups, audit, down; and bad flags, a corrupt state directory
and a missing SoftHSM2, each with a clear message, an exit code and no half-made cluster."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from hsmsim.testing.cluster import HsmsimCluster, run_cli, start_cluster


def _json(r: object) -> object:
    assert r.returncode == 0, r.stderr  # type: ignore[attr-defined]
    return json.loads(r.stdout)  # type: ignore[attr-defined]


def test_up_creates_a_cluster_with_private_secrets(cli_cluster: HsmsimCluster) -> None:
    c = cli_cluster
    assert c.cluster_id.startswith("cluster-") and len(c.hsm_ids) == 3
    st = c.status()
    assert st["state"] == "ACTIVE" and [h["az"] for h in st["hsms"]] == [
        "us-east-1a", "us-east-1b", "us-east-1c"]
    for p in ("secrets/cluster.secret", "secrets/admin.password",
              "secrets/crypto_user.password", "ca/ca.key"):
        assert stat.S_IMODE((c.state_dir / p).stat().st_mode) == 0o600, p
    assert stat.S_IMODE((c.state_dir / "secrets").stat().st_mode) == 0o700
    assert stat.S_IMODE((c.state_dir / "control.sock").stat().st_mode) == 0o600
    assert (c.state_dir / "ca" / "ca.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    assert c.pin == "crypto_user:" + (c.state_dir / "secrets/crypto_user.password").read_text()
    assert c.admin_password not in (c.state_dir / "daemon.log").read_text()


def test_status_and_env(cli_cluster: HsmsimCluster) -> None:
    st = _json(cli_cluster.cli("status", "--json"))
    assert st["cluster_id"] == cli_cluster.cluster_id  # type: ignore[index]
    r = cli_cluster.cli("status")
    assert r.returncode == 0 and "HSM" in r.stdout and cli_cluster.hsm_ids[0] in r.stdout
    r = cli_cluster.cli("env")
    assert r.returncode == 0
    for var in ("HSMSIM_HOME", "HSMSIM_SOCKET", "HSMSIM_PKCS11_MODULE", "HSMSIM_PIN",
                "AWS_ENDPOINT_URL_KMS"):
        assert f"export {var}=" in r.stdout


def test_user_commands(cli_cluster: HsmsimCluster) -> None:
    c = cli_cluster
    r = c.cli("user", "create", "--username", "bob", "--role", "crypto-user",
              "--password", "bob-password")
    assert r.returncode == 0, r.stderr
    users = _json(c.cli("user", "list", "--json"))
    bob = [u for u in users if u["username"] == "bob"]  # type: ignore[union-attr, index]
    assert bob and bob[0]["role"] == "crypto-user" and bob[0]["cluster-coverage"] == "full"
    r = c.cli("user", "change-password", "--username", "bob", "--password", "short")
    assert r.returncode == 1 and "8 to 32" in r.stderr
    r = c.cli("user", "create", "--username", "bob", "--role", "crypto-user",
              "--password", "bob-password")
    assert r.returncode == 1 and "error" in r.stderr
    assert c.cli("user", "delete", "--username", "bob").returncode == 0
    users = _json(c.cli("user", "list", "--json"))
    assert not [u for u in users if u["username"] == "bob"]  # type: ignore[union-attr, index]


def test_key_list_shows_pkcs11_uris_and_delete(cli_cluster: HsmsimCluster) -> None:
    c = cli_cluster
    keys = _json(c.cli("key", "list", "--json"))
    assert isinstance(keys, list)
    r = c.cli("key", "delete", "0x7fffffffffff")
    assert r.returncode == 1 and "CKR_OBJECT_HANDLE_INVALID" in r.stderr
    r = c.cli("key", "delete", "not-a-label")
    assert r.returncode == 1 and "no key 'not-a-label' among the" in r.stderr


def test_hsm_faults_from_the_cli(cli_cluster: HsmsimCluster) -> None:
    c = cli_cluster
    victim = c.hsm_ids[2]
    assert c.cli("hsm", "kill", victim).returncode == 0
    assert c.hsm(victim)["condition"] == "killed"
    assert c.cli("hsm", "start", victim).returncode == 0
    assert c.cli("hsm", "partition", victim).returncode == 0
    assert c.hsm(victim)["condition"] == "partitioned"
    assert c.cli("hsm", "heal", victim).returncode == 0
    assert c.cli("hsm", "latency", victim, "--ms", "5").returncode == 0
    assert c.cli("hsm", "latency", victim, "--ms", "0").returncode == 0
    assert c.cli("hsm", "throttle", victim, "--rps", "0").returncode == 0
    c.wait_converged(30)
    r = c.cli("hsm", "kill", "hsm-doesnotexist")
    assert r.returncode == 1 and "no HSM" in r.stderr
    r = c.cli("hsm", "latency", victim, "--ms", "-3")
    assert r.returncode == 1


def test_backup_list_and_audit(cli_cluster: HsmsimCluster) -> None:
    c = cli_cluster
    r = c.cli("backup", "create", "--json")
    assert r.returncode == 0, r.stderr
    bid = json.loads(r.stdout)["backup_id"]
    assert bid in c.cli("backup", "list").stdout
    assert c.cli("key", "list").returncode == 0  # a crypto user's login, whatever ran before
    recs = [json.loads(line) for line in c.cli("audit", "--json").stdout.splitlines()]
    by_az = [json.loads(line) for line in c.cli("audit", "--json", "--hsm", "us-east-1a").stdout.splitlines()]
    in_a = [h["hsm_id"] for h in c.status()["hsms"] if h["az"] == "us-east-1a"]
    assert by_az and {r["hsm_id"] for r in by_az} == set(in_a)
    assert recs and {r["hsm_id"] for r in recs} <= set(c.hsm_ids)
    assert any(r["event"] == "login" for r in recs)
    text = json.dumps(recs)
    assert c.admin_password not in text and c.cu_password not in text


def test_second_up_reports_the_running_daemon(cli_cluster: HsmsimCluster) -> None:
    r = run_cli(["up", "--detach", "--state", str(cli_cluster.state_dir)])
    assert r.returncode == 0
    assert "already running" in r.stderr


def test_down_then_up_reopens_the_same_cluster(cli_cluster: HsmsimCluster) -> None:
    c = cli_cluster
    r = c.cli("user", "create", "--username", "carol", "--role", "crypto-user",
              "--password", "carol-password")
    assert r.returncode == 0, r.stderr
    r = c.cli("down")
    assert r.returncode == 0 and "stopped" in r.stdout
    assert not (c.state_dir / "control.sock").exists()
    assert not (c.state_dir / "daemon.pid").exists()
    c.up()
    st = c.status()
    assert st["cluster_id"] == c.cluster_id
    assert [h["hsm_id"] for h in st["hsms"]] == c.hsm_ids
    users = _json(c.cli("user", "list", "--json"))
    assert "carol" in {u["username"] for u in users}  # type: ignore[union-attr, index]


@pytest.mark.parametrize("args, message", [
    (["--azs", "0"], "--azs must be between 1 and 6"),
    (["--azs", "2", "--az", "us-east-1a"], "either --azs"),
    (["--az", "mars-1"], "not an availability zone"),
    (["--hsms-per-az", "29"], "--hsms-per-az"),
    (["--admin-password", "short"], "8 to 32"),
])
def test_bad_up_flags(tmp_path: Path, args: list[str], message: str) -> None:
    state = tmp_path / "s"
    r = run_cli(["up", "--detach", "--state", str(state), *args])
    assert r.returncode == 1 and message in r.stderr
    assert not state.exists()


def test_unknown_flag_exits_2(tmp_path: Path) -> None:
    r = run_cli(["up", "--bogus", "--state", str(tmp_path / "s")])
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_missing_softhsm(tmp_path: Path) -> None:
    env = dict(os.environ, HSMSIM_SOFTHSM2_LIBRARY="/nonexistent/libsofthsm2.so")
    r = run_cli(["up", "--detach", "--state", str(tmp_path / "s")], env=env)
    assert r.returncode == 1 and "SoftHSM2" in r.stderr
    assert not (tmp_path / "s").exists()


def test_corrupt_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    (state / "cluster.json").write_text("{not json")
    r = run_cli(["up", "--detach", "--state", str(state)])
    assert r.returncode == 1 and "cluster.json is corrupt" in r.stderr
    r = run_cli(["status", "--state", str(state)])
    assert r.returncode == 1
    (state / "cluster.json").unlink()
    (state / "stray").write_text("x")
    r = run_cli(["up", "--detach", "--state", str(state)])
    assert r.returncode == 1 and "not empty" in r.stderr


def test_commands_without_a_daemon(tmp_path: Path) -> None:
    r = run_cli(["status", "--state", str(tmp_path / "none")])
    assert r.returncode == 1 and "hsmsim up" in r.stderr
    r = run_cli(["down", "--state", str(tmp_path / "none")])
    assert r.returncode == 0


def test_foreground_up_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time
    from hsmsim.testing.cluster import CLI, free_port
    state = tmp_path / "fg"
    state.mkdir()
    (state / "hsmsim.toml").write_text(f"[kms]\nport = {free_port()}\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.Popen([*CLI, "up", "--azs", "2", "--state", str(state)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if "running" in line:
                break
        out = "".join(lines)
        assert "export HSMSIM_PIN=" in out and "is ready" in out, out + p.stderr.read()  # type: ignore[union-attr]
        # the banner names the CloudHSMv2 endpoint the exports point at
        chsm = re.search(r"^export AWS_ENDPOINT_URL_CLOUDHSM_V2=(\S+)$", out, re.M)
        assert chsm and f"  CloudHSMv2 API : {chsm.group(1)}\n" in out, out
        pids = [int((state / "nodes" / d / "node.pid").read_text())
                for d in os.listdir(state / "nodes")]
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert not (state / "control.sock").exists() and not (state / "daemon.pid").exists()
    for pid in pids:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"node {pid} still runs after Ctrl-C")
    _ = sys


def test_backup_restore_from_the_cli(cli_cluster: HsmsimCluster, tmp_path: Path) -> None:
    c = cli_cluster
    bid = json.loads(c.cli("backup", "create", "--json").stdout)["backup_id"]
    target = tmp_path / "restored"
    r = c.cli("backup", "restore", bid, "--target", str(target))
    assert r.returncode == 0, r.stderr
    assert f"hsmsim up --state {target}" in r.stdout
    spec = json.loads((target / "cluster.json").read_text())
    assert spec["cluster_id"] != c.cluster_id and spec["source_backup_id"] == bid
    r = c.cli("backup", "restore", bid, "--target", str(target))
    assert r.returncode == 1 and "not empty" in r.stderr
    r = c.cli("backup", "restore", "backup-nosuchbackup", "--target", str(tmp_path / "x"))
    assert r.returncode == 1 and "no backup" in r.stderr
    assert not (tmp_path / "x").exists()


def test_down_after_a_daemon_crash_stops_the_nodes(tmp_path: Path) -> None:
    import signal
    import time
    c = start_cluster(tmp_path / "crash", azs=2)
    pids = [h["pid"] for h in c.status()["hsms"]]
    os.kill(c.daemon_pid, signal.SIGKILL)  # type: ignore[arg-type]
    time.sleep(0.3)
    for pid in pids:
        os.kill(pid, 0)  # HSMs outlive their client
    r = run_cli(["down", "--state", str(c.state_dir)])
    assert r.returncode == 0 and "stopped 2 HSM node(s)" in r.stderr
    deadline = time.monotonic() + 10
    for pid in pids:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"node {pid} still runs"
            time.sleep(0.05)


def test_interrupted_creation_is_redone(tmp_path: Path) -> None:
    from hsmsim.cluster.state import StateDir, prepare_new_cluster
    from hsmsim.testing.cluster import free_port
    state = tmp_path / "half"
    half = prepare_new_cluster(StateDir(state), ["us-east-1a", "us-east-1b"], 1, None, None)
    (state / "hsmsim.toml").write_text(f"[kms]\nport = {free_port()}\n")
    assert (state / ".initializing").exists() and not (state / "cluster.json").exists()
    r = run_cli(["up", "--detach", "--json", "--azs", "2", "--state", str(state)])
    try:
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["cluster_id"] != half.spec.cluster_id
        assert (state / "cluster.json").exists() and not (state / ".initializing").exists()
    finally:
        run_cli(["down", "--state", str(state)])


def test_bad_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[cluster]\nmax_retries = 99\n")
    r = run_cli(["up", "--detach", "--state", str(tmp_path / "s"), "--config", str(cfg)])
    assert r.returncode == 1 and "max_retries" in r.stderr
    assert not (tmp_path / "s").exists()
    cfg.write_text("[cluster\n")
    r = run_cli(["up", "--detach", "--state", str(tmp_path / "s"), "--config", str(cfg)])
    assert r.returncode == 1 and "bad.toml" in r.stderr
    assert not (tmp_path / "s").exists()
    r = run_cli(["up", "--detach", "--state", str(tmp_path / "s"), "--config",
                 str(tmp_path / "missing.toml")])
    assert r.returncode == 1 and "no such file" in r.stderr


def test_key_list_uri_for_a_key_made_through_pkcs11(cli_cluster: HsmsimCluster,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pkcs11 = pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed")
    c = cli_cluster
    if not c.module_path.is_file():
        pytest.skip("libhsmsim-pkcs11.so is not built (make build)")
    for k, v in c.env.items():
        monkeypatch.setenv(k, v)
    lib = c.pkcs11_lib()
    with lib.get_token().open(user_pin=c.pin, rw=True) as s:
        s.generate_key(pkcs11.KeyType.AES, 256, store=True, label="web key",
                       id=b"\x01\xab")
    keys = _json(c.cli("key", "list", "--json"))
    mine = [k for k in keys if k["label"] == "web key"]  # type: ignore[union-attr, index]
    assert mine, keys
    assert mine[0]["uri"] == "pkcs11:token=hsm1;object=web%20key;id=%01%ab;type=secret-key"
    assert mine[0]["coverage"] in ("2/3", "3/3")
    r = c.cli("key", "delete", mine[0]["key_reference"])
    assert r.returncode == 0, r.stderr
    assert not [k for k in _json(c.cli("key", "list", "--json"))  # type: ignore[union-attr]
                if k["label"] == "web key"]
