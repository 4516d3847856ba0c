"""The node protocol at its edge: handshake, principals, pipelining with out-of-order
responses, and malformed input (random bytes, truncated, oversized, wrong types, unknown
ops) that gets an error or a closed connection while the node keeps serving everyone else."""

from __future__ import annotations

import asyncio
import os
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hsmsim.node import protocol
from hsmsim.node.client import NodeClient, NodeUnavailable
from hsmsim.pkcs11.constants import RV, Attribute as A, Mechanism as M
from hsmsim.pkcs11.errors import error_class
from hsmsim.pkcs11.params import GcmParams, MechanismSpec as Spec

from .conftest import _bootstrap
from .nodeproc import NodeProc, run, write_secret


class Raw:
    """A raw connection for sending arbitrary bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, node: NodeProc) -> "Raw":
        r, w = await asyncio.open_unix_connection(str(node.sock), limit=2 * protocol.MAX_FRAME)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, msg: object) -> dict:
        payload = msgpack.packb(msg, use_bin_type=True)
        await self.send(struct.pack(">I", len(payload)) + payload)
        return await self.response()

    async def response(self, timeout: float = 10) -> dict:
        payload = await asyncio.wait_for(protocol.read_frame(self.reader), timeout)
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)

    async def closed(self, timeout: float = 10) -> bool:
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    return True
        except (ConnectionError, OSError):
            return True

    async def close(self) -> None:
        self.writer.close()


async def still_serving(node: NodeProc) -> None:
    c = await node.client()
    await c.ping()
    assert (await c.status()).hsm_id == node.hsm_id
    await c.close()


def test_handshake_and_principals(node_a: NodeProc) -> None:
    async def body() -> None:
        raw = await Raw.open(node_a)
        r = await raw.request({"id": 1, "op": "ping"})
        assert r == {"id": 1, "ok": False, "rv": RV.ARGUMENTS_BAD,
                     "msg": "the first request must be hello"}
        r = await raw.request({"id": 2, "op": "hello", "versions": [99]})
        assert r["ok"] is False and r["rv"] == RV.ARGUMENTS_BAD
        r = await raw.request({"id": 3, "op": "hello", "versions": [1, 2], "client": "t"})
        assert r["ok"] and r["result"]["version"] == 1 and len(r["result"]["nonce"]) == 32
        assert r["result"]["max_frame"] == protocol.MAX_FRAME
        r = await raw.request({"id": 4, "op": "status"})
        assert r["rv"] == RV.USER_NOT_LOGGED_IN
        r = await raw.request({"id": 5, "op": "auth_cluster", "proof": os.urandom(32)})
        assert r["rv"] == RV.PIN_INCORRECT
        r = await raw.request({"id": 6, "op": "export_masked", "handle": 1})
        assert r["rv"] == RV.USER_NOT_LOGGED_IN
        r = await raw.request({"id": 7, "op": "encrypt", "handle": 1, "data": b"x",
                               "mech": [M.AES_GCM, None]})
        assert r["rv"] == RV.USER_NOT_LOGGED_IN
        await raw.close()
        # A wrong secret fails at connect.
        with pytest.raises(error_class(RV.PIN_INCORRECT)):
            await NodeClient.connect(node_a.address, cluster_secret=b"x" * 32)
        with pytest.raises(NodeUnavailable):
            await NodeClient.connect(f"unix:{node_a.sock}.missing")
    run(body)


def test_bad_requests_get_errors(node_a: NodeProc, handles) -> None:
    async def body() -> None:
        c, lid = await node_a.login("alice", cluster=True)
        for op, fields, rv in (
            ("no_such_op", {}, RV.ARGUMENTS_BAD),
            ("generate_random", {"length": "ten"}, RV.ARGUMENTS_BAD),
            ("generate_random", {"length": -1}, RV.ARGUMENTS_BAD),
            ("generate_random", {"length": True}, RV.ARGUMENTS_BAD),
            ("generate_random", {}, RV.ARGUMENTS_BAD),
            ("generate_key", {"login_id": lid, "mech": "aes", "template": {}, "handle": 1},
             RV.ARGUMENTS_BAD),
            ("generate_key", {"login_id": lid, "mech": [M.AES_KEY_GEN, None],
                              "template": {A.VALUE_LEN: "32"}, "handle": handles()},
             RV.ATTRIBUTE_VALUE_INVALID),
            ("generate_key", {"login_id": lid, "mech": [M.AES_KEY_GEN, None],
                              "template": {"label": "x"}, "handle": handles()}, RV.ARGUMENTS_BAD),
            ("generate_key", {"login_id": lid, "mech": [M.AES_KEY_GEN, None],
                              "template": {0x7777: 1}, "handle": handles()},
             RV.ATTRIBUTE_TYPE_INVALID),
            ("generate_key", {"login_id": lid, "mech": [M.AES_KEY_GEN, None],
                              "template": {A.VALUE_LEN: 16}, "handle": 0}, RV.ARGUMENTS_BAD),
            ("encrypt", {"login_id": lid, "handle": 1, "data": "text",
                         "mech": [M.AES_GCM, None]}, RV.ARGUMENTS_BAD),
            ("encrypt", {"login_id": lid, "handle": 123456789, "data": b"x",
                         "mech": [M.AES_GCM, {"t": "gcm", "iv": 5}]}, RV.MECHANISM_PARAM_INVALID),
            ("encrypt", {"login_id": lid, "handle": 123456789, "data": b"x",
                         "mech": [M.AES_GCM, {"t": "gcm", "iv": b""}]}, RV.KEY_HANDLE_INVALID),
            ("decrypt", {"login_id": 987654, "handle": 1, "data": b"x",
                         "mech": [M.AES_GCM, None]}, RV.USER_NOT_LOGGED_IN),
            ("set_fault", {"latency_ms": "slow"}, RV.ARGUMENTS_BAD),
            ("audit_read", {"since_seq": -5}, RV.ARGUMENTS_BAD),
        ):
            with pytest.raises(error_class(rv)):
                await c.call(op, **fields)
        # Mechanism parameter errors.
        h = await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 16, A.ENCRYPT: True},
                                 handle=handles(), session=5)
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            await c.call("encrypt", login_id=lid, handle=h, data=b"x",
                         mech=[M.AES_GCM, {"t": "gcm", "iv": 5}])
        with pytest.raises(error_class(RV.MECHANISM_PARAM_INVALID)):
            await c.call("encrypt", login_id=lid, handle=h, data=b"x",
                         mech=[M.AES_GCM, {"t": "nope"}])
        with pytest.raises(error_class(RV.MECHANISM_INVALID)):
            await c.encrypt(lid, h, Spec(M.SHA256), b"x")
        # A duplicate handle changes nothing.
        with pytest.raises(error_class(RV.TEMPLATE_INCONSISTENT)):
            await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 32}, handle=h, session=5)
        (vl,) = await c.get_attributes(lid, h, [A.VALUE_LEN])
        assert vl.value == 16
        # Oversized requests are refused before sending; the connection stays usable.
        with pytest.raises(error_class(RV.DATA_LEN_RANGE)):
            await c.encrypt(lid, h, Spec(M.AES_GCM, GcmParams(b"", b"")), b"\0" * protocol.MAX_FRAME)
        await c.close_session(5, lid)
        await c.ping()
        await c.close()
    run(body)


def test_malformed_frames(node_a: NodeProc) -> None:
    async def body() -> None:
        # Oversized length: error frame with id 0, then the connection is closed.
        raw = await Raw.open(node_a)
        await raw.send(struct.pack(">I", protocol.MAX_FRAME + 1) + b"x" * 100)
        r = await raw.response()
        assert r["id"] == 0 and r["rv"] == RV.ARGUMENTS_BAD
        assert await raw.closed()
        # Zero length.
        raw = await Raw.open(node_a)
        await raw.send(b"\0\0\0\0")
        assert (await raw.response())["id"] == 0
        assert await raw.closed()
        # Undecodable payload and non-map payloads: error, connection stays open.
        raw = await Raw.open(node_a)
        for payload in (b"\xc1", b"\x92\x01\x02", msgpack.packb("hello"), msgpack.packb(None),
                        msgpack.packb({"op": "hello"}), msgpack.packb({"id": "x", "op": "ping"}),
                        msgpack.packb({"id": 1, "op": 5})):
            await raw.send(struct.pack(">I", len(payload)) + payload)
            r = await raw.response()
            assert r["ok"] is False and r["rv"] == RV.ARGUMENTS_BAD
        assert (await raw.request({"id": 9, "op": "hello", "versions": [1]}))["ok"]
        # Truncated frame then hang-up.
        await raw.send(struct.pack(">I", 1000) + b"partial")
        await raw.close()
        # Pure random bytes.
        for _ in range(5):
            raw = await Raw.open(node_a)
            await raw.send(os.urandom(4096))
            await raw.close()
        await still_serving(node_a)
    run(body)


def test_pipelining_out_of_order(node_a: NodeProc, handles) -> None:
    async def body() -> None:
        c, lid = await node_a.login("alice")
        h = await c.generate_key(lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 32, A.ENCRYPT: True,
                                                            A.DECRYPT: True},
                                 handle=handles(), session=9)
        # A slow request (RSA-3072 key generation) and fast ones on the same connection: the
        # fast answers arrive first.
        slow = asyncio.ensure_future(c.generate_key_pair(
            lid, Spec(M.RSA_PKCS_KEY_PAIR_GEN), {A.MODULUS_BITS: 3072}, {},
            public_handle=handles(), private_handle=handles(), session=9))
        await asyncio.sleep(0.01)
        datas = [os.urandom(100) for _ in range(300)]
        encs = await asyncio.gather(*(c.encrypt(lid, h, Spec(M.AES_GCM, GcmParams(b"", b"")), d)
                                      for d in datas))
        assert not slow.done()
        outs = await asyncio.gather(*(c.decrypt(lid, h, Spec(M.AES_GCM, GcmParams(e.iv or b"", b"")),
                                                e.data) for e in encs))
        assert outs == datas
        await slow
        await c.close_session(9, lid)
        await c.close()
    run(body)


FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.binary(max_size=40),
                         st.text(max_size=20), st.lists(st.integers(-5, 2**64 - 1), max_size=4),
                         st.dictionaries(st.integers(-3, 2**40), st.one_of(st.booleans(),
                                                                           st.integers(-2**63, 2**63), st.binary(max_size=8)),
                                         max_size=4))
REQUESTS = st.fixed_dictionaries(
    # id 0 and non-integer ids are answered with id 0, which NodeClient treats as a
    # connection-level error: test_malformed_frames covers them on a raw connection.
    {"id": st.integers(10**6, 2**64 - 1),
     "op": st.one_of(st.sampled_from(sorted(protocol.OPS)), st.text(max_size=10))},
    optional={k: FIELD_VALUES for k in ("handle", "login_id", "mech", "template", "data",
                                        "length", "attrs", "session", "blob", "username",
                                        "password", "user_type", "since_seq", "versions")})


def _fuzz(node: NodeProc, examples: int) -> None:
    loop = asyncio.new_event_loop()
    c, lid = loop.run_until_complete(node.login("alice", cluster=True))  # the widest surface

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(REQUESTS, st.booleans()), min_size=1, max_size=8))
    def check(requests: list[tuple[dict, bool]]) -> None:
        async def body() -> None:
            for req, logged_in in requests:
                if req.get("op") in ("set_fault", "initialize_users", "clone_accept", "logout"):
                    continue  # would stop the node from answering, or end our login
                if logged_in:
                    req = {**req, "login_id": lid}
                payload = msgpack.packb(req, use_bin_type=True)
                c._writer.write(struct.pack(">I", len(payload)) + payload)
            await c.ping()  # the connection survived every fuzzed request
        loop.run_until_complete(body())
    try:
        check()
    finally:
        loop.run_until_complete(c.close())
        loop.close()
    run(still_serving, node)
    # No request hit an unexpected exception (those are logged as "request failed").
    assert "request failed" not in node.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory):
    """A node of its own: fuzzed requests create and destroy objects with random handles."""
    state = tmp_path_factory.mktemp("fuzz")
    node = NodeProc(state, "hsm-fffffffffff", "us-east-1a",
                    write_secret(state / "secrets" / "cluster.secret"), "new").start()
    run(_bootstrap, node)
    try:
        yield node
    finally:
        node.stop()


def test_fuzz_requests_short(fuzz_node: NodeProc) -> None:
    _fuzz(fuzz_node, 60)


@pytest.mark.soak
def test_fuzz_requests_soak(fuzz_node: NodeProc) -> None:
    _fuzz(fuzz_node, int(os.environ.get("HSMSIM_FUZZ_EXAMPLES", "3000")))
