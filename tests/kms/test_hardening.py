"""Hostile input and hostile load on the KMS endpoint (issue 17): the test clock refuses moves
that would break dates and answers only signed requests; deeply nested JSON is a
SerializationException; a request that fails changes nothing (store, audit, cluster); slow or
half-sent HTTP requests are timed out and capped so the daemon's other services keep working;
malformed header lines never reach the log; the KMS port is kept with the cluster. Long
versions of the clock fuzz and of the slow-client flood are marked soak."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from hsmsim.kms.config import KmsConfig

from .conftest import KmsEndpoint, start_double, stop_double
from .test_http import send


@pytest.fixture
def fresh(tmp_path: Path) -> Any:
    """A KMS of its own (cluster double) that a test may damage; restartable on the same state."""
    eps: list[KmsEndpoint] = []

    def start(config: KmsConfig | None = None) -> KmsEndpoint:
        if eps and eps[-1].server is not None:
            stop_double(eps[-1])
            eps[-1].server = None
        ep = start_double(tmp_path, config)
        eps.append(ep)
        return ep

    yield start
    if eps and eps[-1].server is not None:
        stop_double(eps[-1])


def clock(ep: KmsEndpoint, body: bytes, sign: bool = True) -> tuple[int, Any]:
    status, _, parsed = send(ep, body, target=None, content_type="application/json", sign=sign,
                             path="/_hsmsim/clock")
    return status, parsed


def healthy(ep: KmsEndpoint) -> None:
    """Every date the KMS answers is a finite number and a new key works end to end."""
    c = ep.client()
    md = c.create_key(Description="after")["KeyMetadata"]
    blob = c.encrypt(KeyId=md["KeyId"], Plaintext=b"x")["CiphertextBlob"]
    assert c.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"
    status, _, body = send(ep, json.dumps({"KeyId": md["KeyId"]}).encode(), target="TrentService.DescribeKey")
    assert status == 200 and isinstance(body["KeyMetadata"]["CreationDate"], float)


# -- 17.3: the clock endpoint -------------------------------------------------------------------
BAD_MOVES = [b"NaN", b"Infinity", b"-Infinity", b"1e12", b"1e308", b"-5", b"10" * 400, b'"60"', b"true",
             b"[1]", b"{}"]


@pytest.mark.parametrize("value", BAD_MOVES)
def test_clock_refuses_moves_that_break_dates(fresh: Any, value: bytes) -> None:
    ep = fresh()
    status, body = clock(ep, b'{"advance_seconds": ' + value + b"}")
    assert status == 400 and body["__type"] == "ValidationException", body
    assert "advance_seconds" in body["message"] or "forward" in body["message"]
    healthy(ep)
    ep = fresh()  # the refused move was not saved either
    healthy(ep)
    status, body = clock(ep, b'{"advance_seconds": 0}')
    assert status == 200 and body["offset"] == 0.0


def test_clock_total_offset_is_bounded(fresh: Any) -> None:
    ep = fresh()
    assert clock(ep, b'{"advance_seconds": 3000000000}')[0] == 200
    status, body = clock(ep, b'{"advance_seconds": 3000000000}')
    assert status == 400 and body["__type"] == "ValidationException"
    status, body = clock(ep, b'{"advance_seconds": 86400}')
    assert status == 200 and body["offset"] == 3000086400.0
    healthy(fresh())


@pytest.mark.parametrize("body", [b"[", b"[1, 2]", b"[" * 5000])
def test_clock_malformed_bodies(fresh: Any, body: bytes) -> None:
    ep = fresh()
    status, parsed = clock(ep, body)
    assert status == 400 and parsed["__type"] == "SerializationException"


def test_clock_needs_a_signature(fresh: Any) -> None:
    ep = fresh()
    status, body = clock(ep, b'{"advance_seconds": 60}', sign=False)
    assert status == 403 and body["__type"] == "MissingAuthenticationTokenException"
    status, body = clock(ep, b'{"advance_seconds": 0}')
    assert status == 200 and body["offset"] == 0.0  # the unsigned move did nothing


def test_clock_checks_the_signature_in_strict_mode(fresh: Any) -> None:
    ep = fresh(KmsConfig(port=0, strict_sigv4=True,
                         principals=("AKIDRAW=arn:aws:iam::111122223333:user/raw=raw-secret",)))
    status, body = clock(ep, b'{"advance_seconds": 60}')
    assert status == 200 and body["offset"] == 60.0
    status, _, body = send(ep, b'{"advance_seconds": 60}', target=None, content_type="application/json",
                           path="/_hsmsim/clock",
                           extra={"Authorization": "AWS4-HMAC-SHA256 Credential=AKIDRAW/20261123/us-east-1/kms/"
                                                   "aws4_request, SignedHeaders=host, Signature=00"})
    assert status == 400 and body["__type"] == "InvalidSignatureException"


def test_clock_endpoint_refused_by_config(fresh: Any) -> None:
    ep = fresh(KmsConfig(port=0, clock_control=False))
    status, body = clock(ep, b'{"advance_seconds": 60}')
    assert status == 404 and body["__type"] == "NotFoundException"
    healthy(ep)


def test_a_bad_offset_saved_by_an_earlier_version_is_ignored(fresh: Any) -> None:
    ep = fresh()
    assert ep.server is not None and ep.loop is not None
    ep.server.service.kms.store.set_meta("clock_offset", "nan")
    ep = fresh()
    healthy(ep)


def _fuzz_clock(ep: KmsEndpoint, n: int, seed: int) -> None:
    rng = random.Random(seed)
    atoms: list[bytes] = [b"NaN", b"Infinity", b"-Infinity", b"1e308", b"-1e308", b"1e12", b"0", b"-0.0", b"1",
                          b"3155760001", b"86400.5", b"null", b"true", b'"1"', b"[]", b"{}", b"1" * 500,
                          b"4e-324", b"-1", b"2" * 20]
    for _ in range(n):
        value = rng.choice(atoms)
        body = rng.choice([b'{"advance_seconds": ' + value + b"}", value, b'{"advance_seconds": [' + value + b"]}",
                           b"{" * rng.randint(1, 3000)])
        status, parsed = clock(ep, body, sign=rng.random() < 0.8)
        assert status in (200, 400, 403), (body[:80], status, parsed)
        assert isinstance(parsed, dict) and parsed.get("__type", "ok") != "KMSInternalException"
    healthy(ep)


def test_clock_fuzz_short(fresh: Any) -> None:
    ep = fresh()
    _fuzz_clock(ep, 60, 17)
    healthy(fresh())


@pytest.mark.soak
def test_clock_fuzz_soak(fresh: Any) -> None:
    ep = fresh()
    _fuzz_clock(ep, 3000, 1703)
    healthy(fresh())


# -- 17.6: deeply nested JSON -------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"[" * 60_000, b'{"KeyId": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                  b'{"Tags": ' + b"[{" * 40 + b"}]" * 40 + b"}",
                                  b'{"x": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}"])
def test_deeply_nested_json_is_a_serialization_error(kms_double: KmsEndpoint, body: bytes) -> None:
    status, _, parsed = send(kms_double, body, target="TrentService.CreateKey")
    assert status == 400 and parsed["__type"] == "SerializationException", parsed
    assert send(kms_double, b"{}")[0] == 200


# -- 17.3: a request that fails changes nothing --------------------------------------------------
def _audit_lines(ep: KmsEndpoint) -> list[dict[str, Any]]:
    path = ep.state_dir / "kms" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _db_rows(ep: KmsEndpoint, table: str) -> int:
    import sqlite3
    db = sqlite3.connect(str(ep.state_dir / "kms" / "kms.sqlite3"))
    try:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


def _fail_success_records(monkeypatch: pytest.MonkeyPatch, ep: KmsEndpoint, op: str) -> None:
    """The audit write of `op`'s success record raises (the last step of a request); failure
    records are still written."""
    assert ep.server is not None
    audit = ep.server.service.audit
    real = audit._write

    def write(line: str) -> None:
        rec = json.loads(line)
        if rec["eventName"] == op and "errorCode" not in rec:
            raise ValueError("injected: cannot write the record")  # as time.gmtime(NaN) did
        real(line)
    monkeypatch.setattr(audit, "_write", write)


def test_a_failed_create_key_changes_nothing(fresh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError
    ep = fresh()
    c = ep.client()  # boto3's default retries: the 500 is tried 3 times (3 keys before the fix)
    c.create_key(Description="before")
    keys_before = sorted(k["KeyId"] for k in c.list_keys()["Keys"])
    rows_before = (_db_rows(ep, "keys"), _db_rows(ep, "materials"))
    _fail_success_records(monkeypatch, ep, "CreateKey")
    with pytest.raises(ClientError) as exc:
        c.create_key(Description="doomed")
    assert exc.value.response["Error"]["Code"] == "KMSInternalException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert sorted(k["KeyId"] for k in c.list_keys()["Keys"]) == keys_before
    assert (_db_rows(ep, "keys"), _db_rows(ep, "materials")) == rows_before
    records = [r for r in _audit_lines(ep) if r["eventName"] == "CreateKey"]
    assert [r.get("errorCode") for r in records][1:] == ["KMSInternalException"] * (len(records) - 1)
    assert len(records) >= 2  # the failures are on record
    monkeypatch.undo()
    healthy(fresh())  # and nothing half-done comes back after a restart
    assert _db_rows(ep, "keys") == rows_before[0] + 1


def test_a_failed_alias_and_tag_change_nothing(fresh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError
    ep = fresh()
    c = ep.client()
    key = c.create_key()["KeyMetadata"]["KeyId"]
    for op, call in (("CreateAlias", lambda: c.create_alias(AliasName="alias/doomed", TargetKeyId=key)),
                     ("TagResource", lambda: c.tag_resource(KeyId=key, Tags=[{"TagKey": "t", "TagValue": "v"}]))):
        _fail_success_records(monkeypatch, ep, op)
        with pytest.raises(ClientError) as exc:
            call()
        assert exc.value.response["Error"]["Code"] == "KMSInternalException"
        monkeypatch.undo()
    assert c.list_aliases(KeyId=key)["Aliases"] == []
    assert c.list_resource_tags(KeyId=key)["Tags"] == []
    assert _db_rows(ep, "aliases") == 0


def test_a_failed_custom_key_store_create_key_removes_its_cluster_key(
        fresh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.config import Config
    from botocore.exceptions import ClientError
    from .conftest import connected_store
    ep = fresh()
    c = ep.client(config=Config(retries={"total_max_attempts": 1}))
    store = connected_store(ep, c)
    assert ep.double is not None
    objects_before = set(ep.double.objects)
    _fail_success_records(monkeypatch, ep, "CreateKey")
    with pytest.raises(ClientError) as exc:
        c.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)
    assert exc.value.response["Error"]["Code"] == "KMSInternalException"
    assert set(ep.double.objects) == objects_before  # the backing key was destroyed again
    assert c.list_keys()["Keys"] == []


# -- 17.4 and the stored port: slow clients against a daemon with few descriptors ---------------
APP = r"""
import os, pkcs11
from pkcs11.mechanisms import GCMParams
lib = pkcs11.lib(os.environ["HSMSIM_PKCS11_MODULE"])
token = lib.get_token(token_label="hsm1")
with token.open(rw=True, user_pin=os.environ["HSMSIM_PIN"]) as s:
    key = s.generate_key(pkcs11.KeyType.AES, 256)
    nonce = bytes(12)
    ct = key.encrypt(b"x" * 16, mechanism=pkcs11.Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, b"", 128))
    print(len(ct))
"""


def _up_with_fd_limit(cluster: Any, limit: int, env: dict[str, str]) -> dict[str, Any]:
    """`hsmsim up --detach` on the cluster's state under RLIMIT_NOFILE = limit (soft and hard,
    so the daemon cannot raise it); the CLI's JSON answer."""
    import os
    import shutil
    import subprocess
    from hsmsim.testing.cluster import CLI
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    root = str(Path(__file__).resolve().parents[2])
    env = {**env, "PYTHONPATH": root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")}
    r = subprocess.run([prlimit, f"--nofile={limit}:{limit}", *CLI, "up", "--detach", "--json", "--state",
                        str(cluster.state_dir)], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _slow_clients(port: int, n: int) -> list[Any]:
    """n connections that each send half a request header and then nothing."""
    import socket
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Target: TrentService.ListKeys\r\nContent-Le")
        socks.append(s)
    return socks


def _closed_by_server(s: Any) -> bool:
    s.setblocking(False)  # (select() cannot take descriptors above 1023)
    try:
        data = s.recv(65536)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 503")


def _flood(tmp_path: Path, limit: int, n: int) -> None:
    import os
    import resource
    import socket
    import subprocess
    import sys
    import time
    from .conftest import free_port, start_real
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 256:
        want = n + 256 if hard == resource.RLIM_INFINITY else min(hard, n + 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        if want < n + 256:
            pytest.skip(f"this process may open only {want} files")
    state = tmp_path / "state"
    state.mkdir()
    (state / "hsmsim.toml").write_text("[kms]\nidle_timeout_seconds = 2\n")  # no port: it comes from the env
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "HSMSIM_KMS_PORT"}
    ep = start_real(state, {"HSMSIM_KMS_PORT": str(port)})
    cluster = ep.extra
    socks: list[Any] = []
    try:
        cluster.down()
        out = _up_with_fd_limit(cluster, limit, env)  # HSMSIM_KMS_PORT not set this time
        # The port given at the first `up` is kept with the cluster.
        assert out["env"]["AWS_ENDPOINT_URL_KMS"] == f"http://127.0.0.1:{port}"
        socks = _slow_clients(port, n)
        app_env = {**os.environ, **cluster.env}
        r = subprocess.run([sys.executable, "-c", APP], env=app_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "32", r.stderr  # a new PKCS#11 application works
        assert cluster.status()["cluster_id"] == cluster.cluster_id  # `hsmsim status` works
        victim = cluster.hsm_ids[0]
        old_pid = cluster.hsm(victim)["pid"]
        cluster.crash(victim)  # a killed node comes back
        deadline = time.monotonic() + 120
        while (h := cluster.hsm(victim))["pid"] in (None, old_pid) or h["state"] != "ACTIVE":
            assert time.monotonic() < deadline, h
            time.sleep(0.2)
        # Every slow client is closed: over the cap at once (503), the others after the timeout.
        open_socks = list(socks)
        deadline = time.monotonic() + 120
        while open_socks:
            assert time.monotonic() < deadline, f"{len(open_socks)} slow connections still open"
            open_socks = [s for s in open_socks if not _closed_by_server(s)]
            time.sleep(0.1)
        c = KmsEndpoint(f"http://127.0.0.1:{port}", state, "real", cluster.cluster_id, "").client()
        assert "Keys" in c.list_keys()  # and the endpoint serves again
        for s in socks:
            s.close()
        # More gateway connections than the daemon has descriptors: those over the gateway's
        # cap are closed at once, and `hsmsim status` and node restarts keep working.
        from hsmsim.daemon.main import connection_caps
        gateway_cap = connection_caps(limit)[1]
        socks = []
        for _ in range(limit + 20):
            g = socket.socket(socket.AF_UNIX)
            g.connect(str(cluster.socket_path))
            socks.append(g)
        deadline = time.monotonic() + 120
        while sum(_closed_by_server(g) for g in socks) < limit + 20 - gateway_cap:
            assert time.monotonic() < deadline, "connections over the gateway's cap stay open"
            time.sleep(0.1)
        assert cluster.status()["cluster_id"] == cluster.cluster_id
        victim = cluster.hsm_ids[1]
        old_pid = cluster.hsm(victim)["pid"]
        cluster.crash(victim)
        while (h := cluster.hsm(victim))["pid"] in (None, old_pid) or h["state"] != "ACTIVE":
            assert time.monotonic() < deadline, h
            time.sleep(0.2)
        for g in socks:
            g.close()
        socks = []
        r = subprocess.run([sys.executable, "-c", APP], env=app_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "32", r.stderr
    finally:
        for s in socks:
            s.close()
        cluster.down()


def test_slow_clients_do_not_starve_the_daemon(tmp_path: Path) -> None:
    _flood(tmp_path, limit=400, n=500)


@pytest.mark.soak
def test_slow_clients_do_not_starve_the_daemon_soak(tmp_path: Path) -> None:
    _flood(tmp_path, limit=1024, n=1100)


# -- 17.10: malformed request text never reaches the log -----------------------------------------
BAD_REQUESTS = [
    b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization SECRET-%s\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nX-Api-Key: a\x01SECRET-%s\r\n\r\n",
    b"GET /SECRET-%s\x00 HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"SECRET-%s" * 1500 + b"\r\n\r\n",
]


def test_malformed_header_lines_are_not_logged(kms_real: KmsEndpoint) -> None:
    import os
    import socket
    import stat
    import time
    log = kms_real.state_dir / "daemon.log"
    marker = os.urandom(6).hex()
    port = int(kms_real.url.rsplit(":", 1)[1])
    for template in BAD_REQUESTS:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(template.replace(b"%s", marker.encode()))
            assert s.recv(65536).startswith(b"HTTP/1.")  # answered 400
    deadline = time.monotonic() + 30
    def logged() -> int:  # aiohttp's own message, or ours
        text = log.read_text(errors="replace")
        return text.count("bad HTTP request from 127.0.0.1") + text.count("Error handling request")
    while logged() < len(BAD_REQUESTS):
        assert time.monotonic() < deadline, "the bad requests were not logged"
        time.sleep(0.05)
    text = log.read_text(errors="replace")
    assert marker not in text
    assert text.count("bad HTTP request from 127.0.0.1") >= len(BAD_REQUESTS)
    assert "Invalid header token" in text  # the reason is there
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_the_stored_kms_port_and_an_explicit_one(tmp_path: Path) -> None:
    from hsmsim.kms.config import port_given, remember_port, settle_port, stored_port
    assert stored_port(tmp_path) is None
    cfg = KmsConfig()
    assert settle_port(cfg, tmp_path, False) == (cfg, None)  # first up: as configured
    remember_port(tmp_path, 45111)
    assert oct((tmp_path / "kms" / "endpoint.json").stat().st_mode & 0o777) == "0o600"
    assert settle_port(cfg, tmp_path, False) == (KmsConfig(port=45111), None)  # later ups: the stored one
    assert settle_port(KmsConfig(port=0), tmp_path, True) == (KmsConfig(port=45111), None)
    moved, warning = settle_port(KmsConfig(port=45222), tmp_path, True)  # an explicit other port wins
    assert moved.port == 45222 and warning is not None and "45111 to 45222" in warning
    assert port_given({"kms": {"port": 1}}, {}) and port_given({}, {"HSMSIM_KMS_PORT": "1"})
    assert not port_given({"kms": {"host": "127.0.0.1"}}, {})


def _read_all(s: Any) -> bytes:
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_a_stalled_body_is_answered_408_and_closed(fresh: Any) -> None:
    import socket
    ep = fresh(KmsConfig(port=0, idle_timeout_seconds=1))
    port = int(ep.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
                  b"Content-Type: application/x-amz-json-1.1\r\nContent-Length: 100\r\n\r\n{\"Li")
        answer = _read_all(s)  # the server answers and closes; recv returns b"" at the end
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["__type"] == "RequestTimeoutException"
    assert send(ep, b"{}")[0] == 200


def test_connections_over_the_cap_are_refused_at_once(fresh: Any) -> None:
    import socket
    import time
    ep = fresh(KmsConfig(port=0, max_connections=5, idle_timeout_seconds=3))
    server = ep.server
    assert server is not None and server.max_connections == 5
    port = int(ep.url.rsplit(":", 1)[1])
    held = _slow_clients(port, 5)
    try:
        deadline = time.monotonic() + 30
        while server.open_connections < 5:  # accepted by the server's loop
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            answer = _read_all(s)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["__type"] == "ServiceUnavailableException"
        for s in held:  # the half-sent requests are closed after the idle timeout
            s.settimeout(60)
            assert _read_all(s) == b""
        while server.open_connections:  # and forgotten by the server
            assert time.monotonic() < deadline + 60
            time.sleep(0.01)
    finally:
        for s in held:
            s.close()
    assert send(ep, b"{}")[0] == 200  # room again
