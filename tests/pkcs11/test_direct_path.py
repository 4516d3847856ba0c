"""The direct data path (issue 12, docs/direct-protocol.md): single-part C_Sign, C_Verify,
C_Encrypt and C_Decrypt go from the module straight to an HSM holding the key; a lost, silent,
throttled or partitioned HSM makes the module hand the call to the daemon. Observed through
the nodes' own counters (direct calls, fallbacks, delayed requests), never through timing."""

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from ctypes import byref, c_ulong
from pathlib import Path

import pytest

from p11helpers import REF_PIN, ClusterGateway, copy_module, require_module, wait_for
from p11raw import CK_GCM_PARAMS, Raw, mechanism, open_session, template

from hsmsim.node.client import NodeClient
from hsmsim.node.direct import MAGIC, descriptor_mac, encode_descriptor
from hsmsim.node import codec
from hsmsim.pkcs11.constants import RV
from hsmsim.pkcs11.params import MechanismSpec
from hsmsim.testing.cluster import run_cli

CKM_EC_KEY_PAIR_GEN = 0x1040
CKM_ECDSA_SHA256 = 0x1044
CKM_AES_KEY_GEN = 0x1080
CKM_AES_GCM = 0x1087
CKA_TOKEN, CKA_LABEL, CKA_SIGN, CKA_VERIFY = 0x1, 0x3, 0x108, 0x10A
CKA_ENCRYPT, CKA_DECRYPT, CKA_VALUE_LEN, CKA_EC_PARAMS = 0x104, 0x105, 0x161, 0x180
P256 = bytes.fromhex("06082a8648ce3d030107")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGateway]:
    require_module()
    gw = ClusterGateway(tmp_path_factory.mktemp("directgw") / "gateway.sock", {})
    yield gw
    gw.stop()


@pytest.fixture
def mod(tmp_path: Path, cluster: ClusterGateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Raw]:
    monkeypatch.setenv("HSMSIM_SOCKET", str(cluster.sock))
    raw = Raw(copy_module(tmp_path))
    assert raw.C_Initialize(None) == 0
    yield raw
    raw.C_Finalize(None)


# -- helpers -----------------------------------------------------------------------------------

def nodes(gw: ClusterGateway) -> list[Path]:
    return sorted(p for p in (gw.state / "nodes").iterdir() if (p / "node.sock").exists())


def counters(gw: ClusterGateway) -> dict[str, dict[str, int]]:
    """Every node's counters (node protocol `counters`, as the cluster principal)."""
    secret = (gw.state / "secrets" / "cluster.secret").read_bytes()

    async def read() -> dict[str, dict[str, int]]:
        out = {}
        for d in nodes(gw):
            c = await NodeClient.connect(f"unix:{d / 'node.sock'}", cluster_secret=secret)
            try:
                out[d.name] = await c.counters()
            finally:
                await c.close()
        return out
    return asyncio.run(read())


def total(c: dict[str, dict[str, int]], name: str) -> int:
    return sum(v[name] for v in c.values())


def ec_pair(raw: Raw, h: int) -> tuple[int, int]:
    label = f"direct-{os.getpid()}-{time.monotonic_ns()}"
    mech, _ = mechanism(CKM_EC_KEY_PAIR_GEN)
    pub, k1 = template((CKA_TOKEN, True), (CKA_VERIFY, True), (CKA_EC_PARAMS, P256), (CKA_LABEL, label))
    priv, k2 = template((CKA_TOKEN, True), (CKA_SIGN, True), (CKA_LABEL, label))
    hp, hk = c_ulong(), c_ulong()
    assert raw.C_GenerateKeyPair(c_ulong(h), byref(mech), pub, c_ulong(4), priv, c_ulong(3),
                                 byref(hp), byref(hk)) == 0
    return hp.value, hk.value


def aes_key(raw: Raw, h: int) -> int:
    mech, _ = mechanism(CKM_AES_KEY_GEN)
    t, keep = template((CKA_TOKEN, True), (CKA_ENCRYPT, True), (CKA_DECRYPT, True), (CKA_VALUE_LEN, 32))
    k = c_ulong()
    assert raw.C_GenerateKey(c_ulong(h), byref(mech), t, c_ulong(4), byref(k)) == 0
    return k.value


def sign_init(raw: Raw, h: int, key: int) -> int:
    mech, _ = mechanism(CKM_ECDSA_SHA256)
    return int(raw.C_SignInit(c_ulong(h), byref(mech), c_ulong(key)))


def sign(raw: Raw, h: int, data: bytes) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(256)
    n = c_ulong(256)
    rv = int(raw.C_Sign(c_ulong(h), data, c_ulong(len(data)), buf, byref(n)))
    return rv, buf.raw[:n.value]


def verify(raw: Raw, h: int, key: int, data: bytes, sig: bytes) -> int:
    mech, _ = mechanism(CKM_ECDSA_SHA256)
    assert raw.C_VerifyInit(c_ulong(h), byref(mech), c_ulong(key)) == 0
    return int(raw.C_Verify(c_ulong(h), data, c_ulong(len(data)), sig, c_ulong(len(sig))))


def sign_once(raw: Raw, h: int, key: int, data: bytes = b"direct") -> tuple[int, bytes]:
    rv = sign_init(raw, h, key)
    return (rv, b"") if rv else sign(raw, h, data)


def daemon_pid(gw: ClusterGateway) -> int:
    return int((gw.state / "daemon.pid").read_text())


def node_pid(d: Path) -> int:
    return int((d / "node.pid").read_text().split()[0])


def cli(gw: ClusterGateway, *args: str) -> None:
    r = run_cli(["hsm", *args, "--state", str(gw.state)], timeout=120)
    assert r.returncode == 0, r.stderr


def healthy(gw: ClusterGateway) -> bool:
    r = run_cli(["status", "--json", "--state", str(gw.state)], timeout=60)
    return r.returncode == 0 and '"healthy"' in r.stdout and '"down"' not in r.stdout \
        and '"killed"' not in r.stdout and '"starting"' not in r.stdout


# -- the path itself ---------------------------------------------------------------------------

def test_sign_completes_on_the_hsm_while_the_daemon_is_stopped(cluster: ClusterGateway, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    assert sign_once(mod, h, priv)[0] == 0  # the key's copies are in place
    before = counters(cluster)
    assert sign_init(mod, h, priv) == 0
    pid = daemon_pid(cluster)
    os.kill(pid, signal.SIGSTOP)
    try:
        n = c_ulong(0)
        assert mod.C_Sign(c_ulong(h), b"while stopped", c_ulong(13), None, byref(n)) == 0  # length query
        assert n.value >= 64
        rv, sig = sign(mod, h, b"while stopped")
        assert rv == 0 and len(sig) == 64
    finally:
        os.kill(pid, signal.SIGCONT)
    after = counters(cluster)
    assert total(after, "direct_calls") == total(before, "direct_calls") + 1  # one node call
    assert verify(mod, h, pub, b"while stopped", sig) == 0
    assert verify(mod, h, pub, b"other data", sig) == RV.SIGNATURE_INVALID


def test_operation_rules_hold_on_the_direct_path(cluster: ClusterGateway, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    _, priv = ec_pair(mod, h)
    assert sign_init(mod, h, priv) == 0
    assert sign_init(mod, h, priv) == RV.OPERATION_ACTIVE
    small = ctypes.create_string_buffer(8)
    n = c_ulong(8)
    assert mod.C_Sign(c_ulong(h), b"x", c_ulong(1), small, byref(n)) == RV.BUFFER_TOO_SMALL
    assert n.value == 64
    rv, sig = sign(mod, h, b"x")  # the operation was kept
    assert rv == 0 and len(sig) == 64
    assert sign(mod, h, b"x")[0] == RV.OPERATION_NOT_INITIALIZED  # ended by the delivery
    assert sign_init(mod, h, priv) == 0  # and a new one starts (the daemon was told)
    assert sign(mod, h, b"y")[0] == 0
    # a key without CKA_SIGN: refused at Init by the daemon, as before
    key = aes_key(mod, h)
    assert sign_init(mod, h, key) in (RV.KEY_FUNCTION_NOT_PERMITTED, RV.KEY_TYPE_INCONSISTENT,
                                      RV.MECHANISM_INVALID)


def test_gcm_on_the_direct_path_uses_the_iv_drawn_at_init(cluster: ClusterGateway, mod: Raw) -> None:
    """GCM decryption goes direct; GCM encryption goes through the daemon, which uses the IV
    drawn at Init exactly once (a replayed direct descriptor would reuse it)."""
    h = open_session(mod, REF_PIN)
    key = aes_key(mod, h)
    before = counters(cluster)
    iv = ctypes.create_string_buffer(12)
    p = CK_GCM_PARAMS(ctypes.cast(iv, ctypes.c_void_p), 12, 96, None, 0, 128)
    mech, _ = mechanism(CKM_AES_GCM, p)
    assert mod.C_EncryptInit(c_ulong(h), byref(mech), c_ulong(key)) == 0
    drawn = iv.raw
    assert drawn != bytes(12)
    out = ctypes.create_string_buffer(200)
    n = c_ulong(200)
    assert mod.C_Encrypt(c_ulong(h), b"secret" * 10, c_ulong(60), out, byref(n)) == 0
    ct = out.raw[:n.value]
    assert len(ct) == 60 + 16
    p2 = CK_GCM_PARAMS(ctypes.cast(ctypes.create_string_buffer(drawn, 12), ctypes.c_void_p), 12, 96, None, 0, 128)
    mech2, keep = mechanism(CKM_AES_GCM, p2)
    assert mod.C_DecryptInit(c_ulong(h), byref(mech2), c_ulong(key)) == 0
    n = c_ulong(200)
    assert mod.C_Decrypt(c_ulong(h), ct, c_ulong(len(ct)), out, byref(n)) == 0
    assert out.raw[:n.value] == b"secret" * 10
    assert mod.C_DecryptInit(c_ulong(h), byref(mech2), c_ulong(key)) == 0
    bad = ct[:-1] + bytes([ct[-1] ^ 1])
    assert mod.C_Decrypt(c_ulong(h), bad, c_ulong(len(bad)), out, byref(n)) == RV.ENCRYPTED_DATA_INVALID
    assert mod.C_Decrypt(c_ulong(h), ct, c_ulong(len(ct)), out, byref(n)) == RV.OPERATION_NOT_INITIALIZED
    assert total(counters(cluster), "direct_calls") == total(before, "direct_calls") + 2


# -- fallback ----------------------------------------------------------------------------------

def _signs_everywhere(mod: Raw, h: int, priv: int, pub: int, rounds: int = 6) -> None:
    """`rounds` Init+Sign pairs (the daemon's balance order alternates the first HSM), each
    signature valid."""
    for i in range(rounds):
        rv, sig = sign_once(mod, h, priv, b"round %d" % i)
        assert rv == 0, hex(rv)
        assert verify(mod, h, pub, b"round %d" % i, sig) == 0


def test_fallback_when_the_chosen_hsm_is_stopped_or_killed(cluster: ClusterGateway, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    _signs_everywhere(mod, h, priv, pub, 2)
    victim = nodes(cluster)[0]
    # SIGSTOP: the module waits request_timeout_s, then the daemon answers (and fails over)
    sessions = [open_session(mod) for _ in range(4)]
    for s in sessions:
        assert sign_init(mod, s, priv) == 0  # half of them name the victim first
    pid = node_pid(victim)
    os.kill(pid, signal.SIGSTOP)
    try:
        for s in sessions:
            rv, sig = sign(mod, s, b"stopped")
            assert rv == 0, hex(rv)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: healthy(cluster), 90)
    # kill -9: the node is gone; its restart forgets every ticket
    for s in sessions:
        assert sign_init(mod, s, priv) == 0
    os.kill(node_pid(victim), signal.SIGKILL)
    for s in sessions:
        rv, sig = sign(mod, s, b"killed")
        assert rv == 0, hex(rv)
    assert wait_for(lambda: healthy(cluster), 90)
    _signs_everywhere(mod, h, priv, pub, 4)  # the restarted HSM's new tickets work


def test_fallback_when_the_chosen_hsm_is_throttled_or_partitioned(cluster: ClusterGateway, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    _signs_everywhere(mod, h, priv, pub, 2)
    victim = nodes(cluster)[0]
    cli(cluster, "throttle", victim.name, "--rps", "1")
    try:
        before = counters(cluster)[victim.name]
        _signs_everywhere(mod, h, priv, pub, 8)
        after = counters(cluster)[victim.name]
        assert after["direct_fallbacks"] > before["direct_fallbacks"]  # refused, handed over
        assert after["throttled"] > before["throttled"]
    finally:
        cli(cluster, "throttle", victim.name, "--rps", "0")
    sessions = [open_session(mod) for _ in range(4)]
    for s in sessions:
        assert sign_init(mod, s, priv) == 0
    cli(cluster, "partition", victim.name)
    try:
        for s in sessions:
            rv, _ = sign(mod, s, b"partitioned")
            assert rv == 0, hex(rv)
        # the partitioned node closes new direct connections at once
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(10)
        c.connect(str(victim / "dp.sock"))
        try:
            c.sendall(struct.pack("<IIHH", 8, MAGIC, 1, 0))
            assert c.recv(16) == b""  # closed without an answer...
        except (ConnectionResetError, BrokenPipeError):
            pass  # ...or reset
        c.close()
    finally:
        cli(cluster, "heal", victim.name)
    assert wait_for(lambda: healthy(cluster), 90)
    _signs_everywhere(mod, h, priv, pub, 4)


def test_latency_injection_delays_direct_calls(cluster: ClusterGateway, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    _signs_everywhere(mod, h, priv, pub, 2)
    for d in nodes(cluster):
        cli(cluster, "latency", d.name, "--ms", "20")
    try:
        for s in [open_session(mod) for _ in range(3)]:
            assert sign_init(mod, s, priv) == 0
            before = counters(cluster)
            assert sign(mod, s, b"slow")[0] == 0
            after = counters(cluster)
            assert total(after, "direct_calls") == total(before, "direct_calls") + 1
            assert total(after, "direct_delayed") == total(before, "direct_delayed") + 1  # it waited
            assert total(after, "delayed") > total(before, "delayed")
    finally:
        for d in nodes(cluster):
            cli(cluster, "latency", d.name, "--ms", "0")


# -- tickets -----------------------------------------------------------------------------------

def _node_call(path: Path, ticket: bytes, desc: bytes, mac: bytes, data: bytes) -> tuple[int, int, bytes]:
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(30)
    c.connect(str(path))
    c.sendall(struct.pack("<IIHH", 8, MAGIC, 1, 0))
    assert len(c.recv(16)) == 16
    body = struct.pack("<IB", 7, 3) + b"".join(struct.pack("<I", len(x)) + x
                                                for x in (ticket, desc, mac, data, b""))
    c.sendall(struct.pack("<I", len(body)) + body)
    head = b""
    while len(head) < 21:
        chunk = c.recv(21 - len(head))
        assert chunk
        head += chunk
    _, rid, rv, flags, n = struct.unpack("<IIQBI", head)
    out = b""
    while len(out) < n:
        out += c.recv(n - len(out))
    c.close()
    assert rid == 7
    return rv, flags, out


def test_a_ticket_dies_with_its_login(cluster: ClusterGateway, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    _, priv = ec_pair(mod, h)
    assert sign_once(mod, h, priv)[0] == 0
    node = nodes(cluster)[0]
    secret = (cluster.state / "secrets" / "cluster.secret").read_bytes()
    user, password = REF_PIN.split(":", 1)
    desc = encode_descriptor("sign", priv, codec.mech_to_wire(MechanismSpec(0x1041)), "sha256", b"",
                             None, 0, 1 << 19)

    async def ticket() -> tuple[NodeClient, int, bytes, bytes]:
        c = await NodeClient.connect(f"unix:{node / 'node.sock'}", cluster_secret=secret)
        info = await c.login(1, user, password)
        t, key, address = await c.direct_ticket(info.login_id)
        assert address.split(" ")[0] == f"unix:{node / 'dp.sock'}"  # then its TLS listener
        return c, info.login_id, t, key

    async def logout(c: NodeClient, lid: int) -> None:
        await c.logout(lid)
        await c.close()

    loop = asyncio.new_event_loop()  # one loop: the NodeClient lives on it
    c, lid, t, key = loop.run_until_complete(ticket())
    try:
        rv, flags, sig = _node_call(node / "dp.sock", t, desc, descriptor_mac(key, desc), b"m")
        assert (rv, flags, len(sig)) == (0, 0, 64)
        # the descriptor is bound to the ticket's key: altered, it is refused
        rv, _, _ = _node_call(node / "dp.sock", t, desc + b"\x00", descriptor_mac(key, desc), b"m")
        assert rv == RV.ARGUMENTS_BAD
    finally:
        loop.run_until_complete(logout(c, lid))
        loop.close()
    rv, flags, out = _node_call(node / "dp.sock", t, desc, descriptor_mac(key, desc), b"m")
    assert (rv, flags, out) == (RV.USER_NOT_LOGGED_IN, 1, b"")  # revoked: handed to the daemon
    rv, flags, _ = _node_call(node / "dp.sock", os.urandom(32), desc, descriptor_mac(key, desc), b"m")
    assert (rv, flags) == (RV.USER_NOT_LOGGED_IN, 1)


def test_c_logout_revokes_the_applications_tickets(cluster: ClusterGateway, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    _, priv = ec_pair(mod, h)
    assert sign_init(mod, h, priv) == 0
    assert mod.C_Logout(c_ulong(h)) == 0
    assert sign(mod, h, b"x")[0] == RV.OPERATION_NOT_INITIALIZED
    assert sign_init(mod, h, priv) == RV.USER_NOT_LOGGED_IN


# -- threads, fork, fuzz -------------------------------------------------------------------------

def test_threads_share_the_node_connections_safely(cluster: ClusterGateway, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    before = counters(cluster)
    errors: list[str] = []

    def worker(i: int) -> None:
        s = open_session(mod)
        for j in range(25):
            data = b"t%d-%d" % (i, j)
            rv, sig = sign_once(mod, s, priv, data)
            if rv != 0 or verify(mod, s, pub, data, sig) != 0:
                errors.append(f"{i}/{j}: {rv:#x}")
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert total(counters(cluster), "direct_calls") >= total(before, "direct_calls") + 6 * 25 * 2


def test_a_forked_child_never_uses_its_parents_node_connections(cluster: ClusterGateway, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    assert sign_once(mod, h, priv)[0] == 0  # the parent has pooled node connections now
    assert sign_init(mod, h, priv) == 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            if mod.C_Sign(c_ulong(h), b"x", c_ulong(1), None, byref(c_ulong())) == RV.CRYPTOKI_NOT_INITIALIZED \
                    and mod.C_Initialize(None) == 0:
                s = open_session(mod, REF_PIN)
                ok = all(sign_once(mod, s, priv, b"child")[0] == 0 for _ in range(20))
                code = 0 if ok else 2
        finally:
            os._exit(code)
    assert sign(mod, h, b"begun before the fork")[0] == 0
    for _ in range(20):  # the parent signs meanwhile, on its own connections
        assert sign_once(mod, h, priv)[0] == 0
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    rv, sig = sign_once(mod, h, priv, b"parent")
    assert rv == 0 and verify(mod, h, pub, b"parent", sig) == 0


def test_fuzzed_frames_at_a_direct_listener(cluster: ClusterGateway, mod: Raw) -> None:
    h = open_session(mod, REF_PIN)
    pub, priv = ec_pair(mod, h)
    path = nodes(cluster)[0] / "dp.sock"
    rng = random.Random(1212)
    hello = struct.pack("<IIHH", 8, MAGIC, 1, 0)
    for i in range(150):
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(5)
        c.connect(str(path))
        kind = i % 5
        if kind == 0:
            payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
        elif kind == 1:
            payload = struct.pack("<I", rng.choice([0, 1, 0xFFFFFFFF, (1 << 21)])) + b"zz"
        elif kind == 2:
            payload = hello + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
        elif kind == 3:
            body = struct.pack("<IB", 1, rng.randrange(256)) + struct.pack("<I", 0xFFFFFF00)
            payload = hello + struct.pack("<I", len(body)) + body
        else:
            body = struct.pack("<IB", 1, 3) + b"".join(
                struct.pack("<I", n) + os.urandom(n) for n in (32, rng.randrange(0, 40), 16, 3, 0))
            payload = hello + struct.pack("<I", len(body)) + body
        try:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            while c.recv(4096):
                pass
        except OSError:
            pass
        finally:
            c.close()
    rv, sig = sign_once(mod, h, priv, b"after the fuzz")  # the node still serves
    assert rv == 0 and verify(mod, h, pub, b"after the fuzz", sig) == 0


def test_a_daemon_restart_leaves_direct_operations_stale(cluster: ClusterGateway, mod: Raw) -> None:
    """The daemon's restart ends its node logins, so the module's tickets die with them: the
    pending direct Sign is handed to the new daemon, which answers the stale session's error;
    new sessions work and sign directly again."""
    h = open_session(mod, REF_PIN)
    _, priv = ec_pair(mod, h)
    assert sign_once(mod, h, priv)[0] == 0
    assert sign_init(mod, h, priv) == 0
    cluster.stop()
    ClusterGateway(cluster.sock, {})  # the same cluster again, a new daemon
    assert sign(mod, h, b"stale")[0] == RV.SESSION_HANDLE_INVALID
    before = counters(cluster)
    s = open_session(mod, REF_PIN)
    assert sign_once(mod, s, priv, b"new")[0] == 0
    assert total(counters(cluster), "direct_calls") == total(before, "direct_calls") + 1
