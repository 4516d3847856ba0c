"""The control socket at its edge: malformed frames, unknown operations and ill-typed
arguments get a precise error (or a closed connection) and the daemon keeps serving."""

from __future__ import annotations

import json
import random
import socket
import struct
import pytest

from hsmsim.control.client import ControlClient
from hsmsim.control.protocol import ControlError
from hsmsim.testing.cluster import HsmsimCluster


@pytest.fixture
def cluster(cli_cluster: HsmsimCluster) -> HsmsimCluster:
    return cli_cluster


def _raw(c: HsmsimCluster, data: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(c.state_dir / "control.sock"))
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


def _frames(raw: bytes) -> list[dict[str, object]]:
    out = []
    while len(raw) >= 4:
        (n,) = struct.unpack(">I", raw[:4])
        out.append(json.loads(raw[4:4 + n]))
        raw = raw[4 + n:]
    return out


def _frame(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("data, kind", [
    (struct.pack(">I", 5) + b"nope!", "protocol"),
    (struct.pack(">I", 2) + b"[]", "protocol"),
    (struct.pack(">I", 0xFFFFFFF0), "protocol"),
    (_frame({"op": 3}), "protocol"),
    (_frame({"op": "format_disk", "args": {}}), "protocol"),
    (_frame({"op": "hsm.latency", "args": {"hsm_id": "hsm-x", "ms": "lots"}}), "arguments"),
    (_frame({"op": "user.create", "args": {"username": "x"}}), "arguments"),
])
def test_bad_requests_get_precise_errors(cluster: HsmsimCluster, data: bytes, kind: str) -> None:
    frames = _frames(_raw(cluster, data))
    assert frames and frames[0]["ok"] is False and frames[0]["kind"] == kind
    assert cluster.status()["state"] in ("ACTIVE", "DEGRADED")


def test_random_bytes_never_break_the_daemon(cluster: HsmsimCluster) -> None:
    _fuzz(cluster, 60, seed=1)


@pytest.mark.soak
def test_soak_random_frames(cluster: HsmsimCluster) -> None:
    _fuzz(cluster, 3000, seed=2)
    rng = random.Random(3)
    # every operation except those that change the topology or stop the daemon
    ops = ["status", "ping", "inventory", "hsm.latency", "hsm.throttle", "user.list",
           "user.create", "user.delete", "user.change_password", "user.unlock", "key.list",
           "key.share", "key.unshare", "key.delete", "audit.read", "backup.list",
           "backup.restore", "x"]
    fields = ["hsm_id", "ms", "rps", "username", "role", "password", "handle", "since",
              "limit", "login_user", "login_password", "backup_id", "target", "role_login"]
    for _ in range(500):
        args = {k: rng.choice([None, 1, -1, 0, "x", "", [], {}, True, 2**70, {"a": "b"}])
                for k in rng.sample(fields, rng.randrange(0, 5))}
        frames = _frames(_raw(cluster, _frame({"op": rng.choice(ops), "args": args})))
        assert frames and "ok" in frames[0]
        if frames[0]["ok"] is False:
            assert frames[0]["kind"] != "internal", frames[0]
    assert cluster.status()["cluster_id"] == cluster.cluster_id


def _fuzz(cluster: HsmsimCluster, n_frames: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(n_frames):
        n = rng.randrange(0, 200)
        blob = bytes(rng.randrange(256) for _ in range(n))
        if rng.random() < 0.5 and n >= 4:
            blob = struct.pack(">I", n - 4) + blob[4:]
        _raw(cluster, blob)
    assert cluster.status()["cluster_id"] == cluster.cluster_id


def test_several_requests_on_one_connection(cluster: HsmsimCluster) -> None:
    frames = _frames(_raw(cluster, _frame({"op": "ping", "args": {}}) * 3))
    assert len(frames) == 3 and all(f["ok"] for f in frames)


def test_client_reports_unknown_hsm(cluster: HsmsimCluster) -> None:
    with pytest.raises(ControlError, match="no HSM"):
        ControlClient(cluster.state_dir / "control.sock").call("hsm.pause", hsm_id="hsm-nope")


def test_hsm_add_refuses_a_bad_az_without_side_effects(cluster: HsmsimCluster) -> None:
    before = cluster.control("backup.list")
    with pytest.raises(ControlError, match="availability zone"):
        cluster.control("hsm.add", az="mars-1")
    assert cluster.control("backup.list") == before
    assert len(cluster.status()["hsms"]) == 3
