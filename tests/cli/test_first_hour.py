"""What a new user reaches for first: HSMs named by AZ, `hsm list`, a status table that shows
the KMS endpoint and injected faults, `logs` from disk, and `reset` to start over."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hsmsim.testing.cluster import HsmsimCluster, run_cli, start_cluster

pkcs11 = pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed")

_P256 = bytes.fromhex("06082a8648ce3d030107")  # the OID of secp256r1, DER


def test_hsm_named_by_az_and_listed(cli_cluster: HsmsimCluster) -> None:
    hsms = json.loads(cli_cluster.cli("hsm", "list", "--json").stdout)
    by_az = {h["az"]: h["hsm_id"] for h in hsms}
    assert set(by_az) == {"us-east-1a", "us-east-1b", "us-east-1c"}
    r = cli_cluster.cli("hsm", "latency", "us-east-1b", "--ms", "7", "--json")
    assert r.returncode == 0, r.stderr
    try:
        assert cli_cluster.hsm(by_az["us-east-1b"])["latency_ms"] == 7
        assert cli_cluster.hsm(by_az["us-east-1a"])["latency_ms"] == 0
        # The table on a terminal (and in a pipe) shows the fault and the KMS endpoint.
        table = cli_cluster.cli("hsm", "list").stdout
        assert "latency 7 ms" in table and by_az["us-east-1b"] in table
        status = cli_cluster.cli("status").stdout
        assert f"KMS endpoint {cli_cluster.kms_endpoint}" in status
        env = json.loads(cli_cluster.cli("env", "--json").stdout)
        assert f"CloudHSMv2 endpoint {env['AWS_ENDPOINT_URL_CLOUDHSM_V2']}\n" in status
        assert "latency 7 ms" in status
    finally:
        cli_cluster.cli("hsm", "latency", "us-east-1b", "--ms", "0")
    r = cli_cluster.cli("hsm", "latency", "eu-west-9z", "--ms", "1")
    assert r.returncode == 1 and "no HSM 'eu-west-9z' in this cluster" in r.stderr
    assert "us-east-1a" in r.stderr


def test_logs_are_read_from_disk(cli_cluster: HsmsimCluster) -> None:
    r = cli_cluster.cli("logs", "-n", "5")
    assert r.returncode == 0 and 0 < len(r.stdout.splitlines()) <= 5, r.stderr
    r = cli_cluster.cli("logs", "--az", "us-east-1c")
    assert r.returncode == 0, r.stderr
    hsm_c = next(h for h in cli_cluster.status()["hsms"] if h["az"] == "us-east-1c")["hsm_id"]
    node_log = cli_cluster.state_dir / "nodes" / hsm_c / "node.log"
    assert r.stdout == node_log.read_text()
    r = cli_cluster.cli("logs", "--hsm", "hsm-nonesuch")
    assert r.returncode == 1 and "no HSM 'hsm-nonesuch'" in r.stderr


def test_reset_needs_a_yes_then_deletes_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    c = start_cluster(state, azs=1, extra_args=["--disable-key-availability-check"])
    try:
        r = run_cli(["reset", "--state", str(state)])  # no terminal and no --yes: refused
        assert r.returncode == 1 and "--yes" in r.stderr
        assert c.daemon_pid is not None and (state / "cluster.json").exists()
        live = run_cli(["audit", "--json", "--state", str(state)])
        assert live.returncode == 0, live.stderr
        # With no daemon, `audit` reads each HSM's log from disk: the same records.
        c.down()
        cold = run_cli(["audit", "--json", "--state", str(state)])
        assert cold.returncode == 0 and "reading the HSMs' audit logs from disk" in cold.stderr
        live_recs = [json.loads(x) for x in live.stdout.splitlines()]
        cold_recs = [json.loads(x) for x in cold.stdout.splitlines()]
        assert live_recs and cold_recs[:len(live_recs)] == live_recs
        r = run_cli(["audit", "--hsm", "hsm-nonesuch", "--state", str(state)])
        assert r.returncode == 1 and "no HSM 'hsm-nonesuch'" in r.stderr
        r = run_cli(["reset", "--yes", "--state", str(state)])
        assert r.returncode == 0, r.stderr
        assert not state.exists()
        assert run_cli(["status", "--state", str(state)]).returncode != 0
    finally:
        if state.exists():
            c.down()
    # A directory that is not a cluster's is never deleted.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "file").write_text("keep me")
    r = run_cli(["reset", "--yes", "--state", str(other)])
    assert r.returncode == 1 and (other / "file").exists()


def test_keys_named_by_label_or_uri(cli_cluster: HsmsimCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    c = cli_cluster
    for k, v in c.env.items():
        monkeypatch.setenv(k, v)
    with c.pkcs11_lib().get_token().open(user_pin=c.pin, rw=True) as s:
        s.generate_keypair(pkcs11.KeyType.EC, 256, store=True, label="pair", id=b"\x07",
                           public_template={pkcs11.Attribute.EC_PARAMS: _P256},
                           private_template={pkcs11.Attribute.SIGN: True})
        s.generate_key(pkcs11.KeyType.AES, 128, store=True, label="single")
    # A label that names a key pair is ambiguous: the error offers each URI.
    r = c.cli("key", "delete", "pair")
    assert r.returncode == 1 and "names 2 keys" in r.stderr
    assert "pkcs11:token=hsm1;object=pair;id=%07;type=private" in r.stderr
    r = c.cli("key", "share", "pkcs11:object=pair;type=private", "--username", "admin")
    assert r.returncode == 1 and "no key" not in r.stderr  # found; sharing with an admin is refused
    r = c.cli("key", "delete", "pkcs11:token=hsm1;object=pair;type=public", "--json")
    assert r.returncode == 0, r.stderr
    r = c.cli("key", "delete", "single", "--json")
    assert r.returncode == 0, r.stderr
    # One format for key references in every command's output, as `key list` shows them.
    ref = json.loads(r.stdout)["key_reference"]
    assert re.fullmatch(r"0x[0-9a-f]{16}", ref) and "handle" not in json.loads(r.stdout)
    left = json.loads(c.cli("key", "list", "--json").stdout)
    assert {(k["label"], k["class"]) for k in left if k["label"] in ("pair", "single")} == {
        ("pair", "PRIVATE_KEY")}
    assert c.cli("key", "delete", "pair").returncode == 0


def test_one_hsm_cluster_warns_about_the_availability_check(tmp_path: Path) -> None:
    from hsmsim.testing.cluster import free_port
    state = tmp_path / "one"
    state.mkdir()
    (state / "hsmsim.toml").write_text(f"[kms]\nport = {free_port()}\n")
    r = run_cli(["up", "--detach", "--azs", "1", "--state", str(state)])
    try:
        assert r.returncode == 0, r.stderr
        assert "hsmsim: warning: the cluster has 1 HSM(s): CloudHSM's key availability check needs 2" in r.stderr
        # The banner ends with what to run in another shell.
        assert r.stdout.splitlines()[-1] == (
            f'# in another shell: source .venv/bin/activate && eval "$(hsmsim env --state {state})"')
        st = json.loads(run_cli(["status", "--json", "--state", str(state)]).stdout)
        assert any("key availability check needs 2" in w for w in st["warnings"])
        assert "key availability check needs 2" in run_cli(["status", "--state", str(state)]).stdout
    finally:
        run_cli(["down", "--state", str(state)])
    r = run_cli(["up", "--detach", "--json", "--state", str(state), "--disable-key-availability-check"])
    try:
        assert r.returncode == 0, r.stderr
        assert not any("availability" in w for w in json.loads(r.stdout)["warnings"])
    finally:
        run_cli(["down", "--state", str(state)])


def test_a_busy_kms_port_fails_up_instead_of_pointing_elsewhere(tmp_path: Path) -> None:
    import socket
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    state = tmp_path / "busy"
    state.mkdir()
    (state / "hsmsim.toml").write_text(f"[kms]\nport = {port}\n")
    try:
        r = run_cli(["up", "--detach", "--azs", "2", "--state", str(state)])
        assert r.returncode != 0, r.stdout
        assert f"the KMS port {port} is in use by another process" in r.stderr, r.stderr
        assert "hsmsim config set kms.port" in r.stderr
        # Nothing keeps running: no daemon, no HSM node.
        assert run_cli(["status", "--state", str(state)]).returncode != 0
        import subprocess
        nodes = subprocess.run(["pgrep", "-f", f"node serve --state {state}"], capture_output=True,
                               text=True)
        assert nodes.stdout == "", f"HSM nodes left running: {nodes.stdout}"
    finally:
        squatter.close()
        run_cli(["down", "--state", str(state)])
    r = run_cli(["up", "--detach", "--json", "--state", str(state)])  # the port is free again
    try:
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["kms_endpoint"] == f"http://127.0.0.1:{port}"
    finally:
        run_cli(["down", "--state", str(state)])


def test_admin_lists_a_users_keys_without_its_password(cli_cluster: HsmsimCluster,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    c = cli_cluster
    assert c.cli("user", "create", "--username", "keylister", "--role", "crypto-user",
                 "--password", "keylister-Passw0rd").returncode == 0
    for k, v in c.env.items():
        monkeypatch.setenv(k, v)
    lib = c.pkcs11_lib()
    with lib.get_token().open(user_pin="keylister:keylister-Passw0rd", rw=True) as s:
        s.generate_key(pkcs11.KeyType.AES, 128, store=True, label="listers-own")
    with lib.get_token().open(user_pin=c.pin, rw=True) as s:
        s.generate_key(pkcs11.KeyType.AES, 128, store=True, label="cu-secret-of-crypto-user")
    try:
        r = c.cli("key", "list", "--user", "keylister", "--json")
        assert r.returncode == 0, r.stderr
        labels = {k["label"] for k in json.loads(r.stdout)}
        assert "listers-own" in labels and "cu-secret-of-crypto-user" not in labels
        mine = {k["label"] for k in json.loads(c.cli("key", "list", "--json").stdout)}
        assert "cu-secret-of-crypto-user" in mine and "listers-own" not in mine
    finally:
        c.cli("key", "delete", "cu-secret-of-crypto-user")
        c.cli("user", "delete", "--username", "keylister")
