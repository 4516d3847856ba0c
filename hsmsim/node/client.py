"""NodeClient: the asyncio client of one HSM node's protocol (docs/node-protocol.md).

One connection multiplexes many requests: each call gets a request id, many may be in flight
and responses may arrive out of order. Error responses raise `Pkcs11Error(rv, msg)`;
a throttled node raises `NodeThrottled` (a CKR_FUNCTION_FAILED error with `.throttled`; the
daemon raises its subclass `NodeBusy` for a slow answer from a node that is alive);
a lost connection raises `NodeUnavailable` from every pending and later call."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hsmsim import __version__
from hsmsim.errors import HsmsimError
from hsmsim.node import codec, protocol
from hsmsim.node.values import (AuditRecord, Hello, InventoryEntry, LoginInfo, NodeStatus,
                                NodeUser)
from hsmsim.pkcs11.values import AttributeResult, EncryptResult
from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import RV, UserType
from hsmsim.pkcs11.errors import ERRORS, Pkcs11Error
from hsmsim.pkcs11.params import MechanismSpec

if TYPE_CHECKING:
    from ssl import SSLContext


class NodeUnavailable(HsmsimError):
    """The node cannot be reached or the connection to it was lost."""


class NodeThrottled(ERRORS[int(RV.FUNCTION_FAILED)]):  # type: ignore[misc]
    """The node rejected the request because it is over its request rate (CloudHSM's busy
    0xBB, surfaced by SDK 5 as CKR_FUNCTION_FAILED). Safe to retry: nothing was changed."""

    throttled = True


class NodeBusy(NodeThrottled):
    """The node did not answer this request in time but keeps answering others (health checks,
    other requests): slow expected work (a queue of password hashes, a large key generation),
    not a dead HSM. Retried like a throttled request; unlike one, the request may still
    complete on the node."""


def cluster_proof(secret: bytes, nonce: bytes, hsm_id: str) -> bytes:
    """The auth_cluster proof: HMAC-SHA256(secret, context || nonce || hsm_id)."""
    return hmac.new(secret, protocol.AUTH_CONTEXT + nonce + hsm_id.encode(), hashlib.sha256).digest()


class _Responses(asyncio.streams.FlowControlMixin, asyncio.Protocol):
    """The client side of one node connection: parses response frames as they arrive and hands
    them to the client at once (no reader task: one loop pass less per response than a
    StreamReader loop)."""

    def __init__(self) -> None:
        super().__init__()
        self._client: NodeClient | None = None
        self._buf = bytearray()
        self._dead = False
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def attach(self, client: "NodeClient") -> None:
        self._client = client
        if self._buf:
            self.data_received(b"")

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        client = self._client
        if client is None or self._dead:
            return
        size = protocol.HEADER.size
        while len(buf) >= size:
            (length,) = protocol.HEADER.unpack_from(buf)
            if length == 0 or length > protocol.MAX_FRAME:
                client._fail_all(NodeUnavailable(
                    f"node protocol error: frame length {length} outside 1..{protocol.MAX_FRAME}"))
                self._dead = True
                break
            if len(buf) < size + length:
                return
            payload = bytes(buf[size:size + length])
            del buf[:size + length]
            if not client._on_payload(payload):
                self._dead = True
                break
        if self._dead:
            buf.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._client is not None:
            why = exc.__class__.__name__ if exc is not None else "EOF"
            self._client._fail_all(NodeUnavailable(f"connection to node lost: {why}"))
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: object) -> "asyncio.Future[None]":
        return self._closed


def _encrypt_result(r: Any) -> EncryptResult:
    return EncryptResult(r["data"], r.get("iv"))


class NodeClient:
    """A connection to one node. Create with `await NodeClient.connect(address)`."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._closed: BaseException | None = None
        self.hello: Hello | None = None
        # When the node last answered anything on this connection (time.monotonic()): a node
        # that keeps answering is alive even while one slow request is outstanding.
        self.last_heard = time.monotonic()

    # -- connection ------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, address: str, *, cluster_secret: bytes | None = None,
                      timeout: float = 10.0, ssl: "SSLContext | None" = None) -> "NodeClient":
        """Connect, handshake, and authenticate as the cluster principal when a secret is
        given. `ssl` (hsmsim.node.tls.client_context) runs TCP connections over mutual TLS.
        Raises NodeUnavailable if the node cannot be reached."""
        kind, where, port = protocol.parse_address(address)
        loop = asyncio.get_running_loop()
        try:
            if kind == "unix":
                conn = loop.create_unix_connection(_Responses, where)
            else:
                conn = loop.create_connection(_Responses, where, port, ssl=ssl)
            transport, proto = await asyncio.wait_for(conn, timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise NodeUnavailable(f"cannot connect to node at {address}: {exc}") from None
        client = cls(asyncio.StreamWriter(transport, proto, None, loop))
        proto.attach(client)
        try:
            client.hello = await asyncio.wait_for(client._hello(), timeout)
            if cluster_secret is not None:
                await asyncio.wait_for(client.authenticate(cluster_secret), timeout)
        except asyncio.TimeoutError:
            await client.close()
            raise NodeUnavailable(f"node at {address} did not answer the handshake within "
                                  f"{timeout:g} s") from None
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def hsm_id(self) -> str:
        assert self.hello is not None
        return self.hello.hsm_id

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def close(self) -> None:
        if self._closed is None:
            self._fail_all(NodeUnavailable("connection closed by client"))
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, ConnectionError):
            pass

    async def __aenter__(self) -> "NodeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _fail_all(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if not waiter.done():
                waiter.set_exception(exc)

    def _on_payload(self, payload: bytes) -> bool:
        """One response frame (called by `_Responses`); False once the connection is unusable."""
        try:
            msg = protocol.unpack(payload)
            if not isinstance(msg, dict):
                raise protocol.ProtocolError("response is not a map")
            rid = msg.get("id")
            self.last_heard = time.monotonic()
            waiter = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if waiter is None:
                if rid == 0 and msg.get("ok") is False:  # connection-level error
                    raise NodeUnavailable(f"node closed the connection: {msg.get('msg')}")
                return True
            if not waiter.done():
                waiter.set_result(msg)
            return True
        except protocol.ProtocolError as exc:
            self._fail_all(NodeUnavailable(f"node protocol error: {exc}"))
        except NodeUnavailable as exc:
            self._fail_all(exc)
        except Exception as exc:  # undecodable payload
            self._fail_all(NodeUnavailable(f"bad frame from node: {exc}"))
        return False

    def _send(self, op: str, fields: dict[str, Any], waiter: "asyncio.Future[Any]") -> int:
        """Write one request whose response goes to `waiter`; returns its request id."""
        if self._closed is not None:
            raise NodeUnavailable(str(self._closed))
        rid = next(self._ids)
        fields["id"], fields["op"] = rid, op
        try:
            frame = protocol.pack(fields)
        except protocol.ProtocolError:
            raise Pkcs11Error(RV.DATA_LEN_RANGE, "request exceeds the node's frame limit") from None
        self._pending[rid] = waiter
        try:
            self._writer.write(frame)
        except (ConnectionError, OSError) as exc:
            self._pending.pop(rid, None)
            self._fail_all(NodeUnavailable(f"connection to node lost: {exc}"))
            raise NodeUnavailable(f"connection to node lost: {exc}") from None
        return rid

    @staticmethod
    def result_of(msg: dict[str, Any]) -> Any:
        """The result of a response map, or its error raised."""
        if msg.get("ok") is True:
            return msg.get("result")
        rv = msg.get("rv", int(RV.GENERAL_ERROR))
        text = str(msg.get("msg", ""))
        if msg.get("throttled"):
            raise NodeThrottled(RV.FUNCTION_FAILED, text or "HSM is throttling requests")
        raise Pkcs11Error(int(rv) if isinstance(rv, int) else int(RV.GENERAL_ERROR), text)

    async def call(self, op: str, **fields: Any) -> Any:
        """Send one request and wait for its result (raises on an error response)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        rid = self._send(op, fields, fut)
        try:
            if self._writer.transport.get_write_buffer_size() > 4 * protocol.MAX_FRAME:
                await self._writer.drain()
            msg = await fut
        except (ConnectionError, OSError) as exc:
            self._fail_all(NodeUnavailable(f"connection to node lost: {exc}"))
            raise NodeUnavailable(f"connection to node lost: {exc}") from None
        finally:
            self._pending.pop(rid, None)
        return self.result_of(msg)

    async def _hello(self) -> Hello:
        r = await self.call("hello", versions=list(protocol.SUPPORTED_VERSIONS),
                            client=f"hsmsim {__version__}")
        return Hello(r["version"], r["hsm_id"], r["az"], r["server"], r["max_frame"], r["nonce"])

    async def authenticate(self, secret: bytes) -> None:
        """Prove the cluster secret (HMAC over the hello nonce); the connection then carries
        the cluster principal."""
        assert self.hello is not None
        await self.call("auth_cluster", proof=cluster_proof(secret, self.hello.nonce,
                                                            self.hello.hsm_id))

    # -- session-level -----------------------------------------------------------------------------

    async def ping(self) -> None:
        await self.call("ping")

    async def status(self) -> NodeStatus:
        r = await self.call("status")
        return NodeStatus(**r)

    # -- users -------------------------------------------------------------------------------------

    async def login(self, user_type: UserType | int, username: str, password: str) -> LoginInfo:
        r = await self.call("login", user_type=int(user_type), username=username,
                            password=password)
        return LoginInfo(r["login_id"], r["user_type"], r["username"])

    async def logout(self, login_id: int) -> None:
        await self.call("logout", login_id=login_id)

    async def initialize_users(self, co_password: str, cu_password: str,
                               co_username: str = "admin", cu_username: str = "crypto_user") -> None:
        await self.call("initialize_users", co_username=co_username, co_password=co_password,
                        cu_username=cu_username, cu_password=cu_password)

    async def create_user(self, login_id: int, username: str, role: str, password: str) -> None:
        await self.call("create_user", login_id=login_id, username=username, role=role,
                        password=password)

    async def delete_user(self, login_id: int, username: str) -> None:
        await self.call("delete_user", login_id=login_id, username=username)

    async def change_password(self, login_id: int, username: str, password: str) -> None:
        await self.call("change_password", login_id=login_id, username=username,
                        password=password)

    async def unlock_user(self, login_id: int, username: str) -> None:
        await self.call("unlock_user", login_id=login_id, username=username)

    async def list_users(self, login_id: int | None = None) -> list[NodeUser]:
        r = await self.call("list_users", login_id=login_id)
        return [NodeUser(**u) for u in r]

    async def export_users(self) -> bytes:
        """All user records as one masked (encrypted, authenticated) blob."""
        return bytes(await self.call("export_users"))

    async def import_users(self, blob: bytes, skip: Sequence[str] = ()) -> int:
        """Converge with the users of a blob from export_users (newer credentials win; users
        named in `skip` are not added); returns how many records changed."""
        return int(await self.call("import_users", blob=blob, skip=list(skip)))

    # -- objects -----------------------------------------------------------------------------------

    async def generate_key(self, login_id: int, mech: MechanismSpec, template: Template, *,
                           handle: int, session: int = 0) -> int:
        return int(await self.call("generate_key", login_id=login_id,
                                   mech=codec.mech_to_wire(mech),
                                   template=codec.template_to_wire(template), handle=handle,
                                   session=session))

    async def generate_key_pair(self, login_id: int, mech: MechanismSpec, public: Template,
                                private: Template, *, public_handle: int, private_handle: int,
                                session: int = 0) -> tuple[int, int]:
        r = await self.call("generate_key_pair", login_id=login_id, mech=codec.mech_to_wire(mech),
                            public_template=codec.template_to_wire(public),
                            private_template=codec.template_to_wire(private),
                            public_handle=public_handle, private_handle=private_handle,
                            session=session)
        return (int(r[0]), int(r[1]))

    async def create_object(self, login_id: int, template: Template, *, handle: int,
                            session: int = 0) -> int:
        return int(await self.call("create_object", login_id=login_id,
                                   template=codec.template_to_wire(template), handle=handle,
                                   session=session))

    async def copy_object(self, login_id: int, handle: int, template: Template, *,
                          new_handle: int, session: int = 0) -> int:
        return int(await self.call("copy_object", login_id=login_id, handle=handle,
                                   template=codec.template_to_wire(template),
                                   new_handle=new_handle, session=session))

    async def destroy_object(self, login_id: int | None, handle: int) -> None:
        """Destroy as a user (login_id) or, with login_id None, as the cluster principal
        (replication of a deletion, reconciliation)."""
        await self.call("destroy_object", login_id=login_id, handle=handle)

    async def get_attributes(self, login_id: int, handle: int,
                             attrs: Sequence[int]) -> list[AttributeResult]:
        r = await self.call("get_attributes", login_id=login_id, handle=handle,
                            attrs=[int(a) for a in attrs])
        return codec.results_from_wire(r)

    async def set_attributes(self, login_id: int, handle: int, template: Template) -> None:
        await self.call("set_attributes", login_id=login_id, handle=handle,
                        template=codec.template_to_wire(template))

    async def find_objects(self, login_id: int, template: Template,
                           session: int | None = None, as_user: str | None = None) -> list[int]:
        """Handles of the objects matching template that the user may see (session objects
        only those of `session` when given, otherwise all of this connection's logins')."""
        r = await self.call("find_objects", login_id=login_id,
                            template=codec.template_to_wire(template), session=session,
                            as_user=as_user)
        return [int(h) for h in r]

    async def close_session(self, session: int, login_id: int | None = None) -> int:
        """Destroy the session objects owned by `session`; returns how many."""
        return int(await self.call("close_session", session=session, login_id=login_id))

    async def share_key(self, login_id: int, handle: int, username: str) -> None:
        await self.call("share_key", login_id=login_id, handle=handle, username=username)

    async def unshare_key(self, login_id: int, handle: int, username: str) -> None:
        await self.call("unshare_key", login_id=login_id, handle=handle, username=username)

    # -- crypto ------------------------------------------------------------------------------------

    async def encrypt(self, login_id: int, handle: int, mech: MechanismSpec,
                      data: bytes) -> EncryptResult:
        return _encrypt_result(await self.call("encrypt", login_id=login_id, handle=handle,
                                               mech=codec.mech_to_wire(mech), data=data))

    async def decrypt(self, login_id: int, handle: int, mech: MechanismSpec, data: bytes) -> bytes:
        return bytes(await self.call("decrypt", login_id=login_id, handle=handle,
                                     mech=codec.mech_to_wire(mech), data=data))

    async def sign(self, login_id: int, handle: int, mech: MechanismSpec, data: bytes) -> bytes:
        return bytes(await self.call("sign", login_id=login_id, handle=handle,
                                     mech=codec.mech_to_wire(mech), data=data))

    async def verify(self, login_id: int, handle: int, mech: MechanismSpec, data: bytes,
                     signature: bytes) -> None:
        """Returns on a valid signature; raises CKR_SIGNATURE_INVALID otherwise."""
        await self.call("verify", login_id=login_id, handle=handle,
                        mech=codec.mech_to_wire(mech), data=data, signature=signature)

    async def digest(self, mech: MechanismSpec, data: bytes) -> bytes:
        return bytes(await self.call("digest", mech=codec.mech_to_wire(mech), data=data))

    async def generate_random(self, length: int) -> bytes:
        return bytes(await self.call("generate_random", length=length))

    async def wrap_key(self, login_id: int, wrapping: int, mech: MechanismSpec, key: int) -> bytes:
        return bytes(await self.call("wrap_key", login_id=login_id, wrapping=wrapping,
                                     mech=codec.mech_to_wire(mech), key=key))

    async def unwrap_key(self, login_id: int, unwrapping: int, mech: MechanismSpec,
                         wrapped: bytes, template: Template, *, handle: int,
                         session: int = 0) -> int:
        return int(await self.call("unwrap_key", login_id=login_id, unwrapping=unwrapping,
                                   mech=codec.mech_to_wire(mech), data=wrapped,
                                   template=codec.template_to_wire(template), handle=handle,
                                   session=session))

    async def derive_key(self, login_id: int, base: int, mech: MechanismSpec, template: Template,
                         *, handle: int, session: int = 0) -> int:
        return int(await self.call("derive_key", login_id=login_id, base=base,
                                   mech=codec.mech_to_wire(mech),
                                   template=codec.template_to_wire(template), handle=handle,
                                   session=session))

    # -- masking, sync, cloning (cluster principal) ------------------------------------------------

    async def export_masked(self, handle: int) -> bytes:
        return bytes(await self.call("export_masked", handle=handle))

    async def import_masked(self, blob: bytes, *, replace: bool = False) -> int:
        """Recreate the object of a masked blob under its own handle; with replace, an
        existing object of that handle is replaced (reconciliation)."""
        return int(await self.call("import_masked", blob=blob, replace=replace))

    async def inventory(self) -> list[InventoryEntry]:
        r = await self.call("inventory")
        return [InventoryEntry(int(h), bytes(f)) for h, f in r]

    async def clone_offer(self) -> bytes:
        """On a node started with --init clone: an ephemeral RSA-3072 public key (DER
        SubjectPublicKeyInfo) to which an existing node can export the masking key."""
        return bytes(await self.call("clone_offer"))

    async def clone_export(self, public_key: bytes) -> bytes:
        """On an existing node: the masking key wrapped (RSA-OAEP SHA-256) to `public_key`."""
        return bytes(await self.call("clone_export", public_key=public_key))

    async def clone_accept(self, blob: bytes) -> None:
        """On the cloned node: install the masking key from clone_export's blob."""
        await self.call("clone_accept", blob=blob)

    # -- operations --------------------------------------------------------------------------------

    async def set_fault(self, *, latency_ms: float | None = None, throttle_rps: float | None = None,
                        paused: bool | None = None, partitioned: bool | None = None) -> dict[str, Any]:
        """Change fault injection; fields left None keep their value. throttle_rps 0 = off.
        `partitioned` True closes the node's direct connections until the daemon
        authenticates again. Returns the resulting fault settings."""
        fields = {k: v for k, v in (("latency_ms", latency_ms), ("throttle_rps", throttle_rps),
                                    ("paused", paused), ("partitioned", partitioned))
                  if v is not None}
        return dict(await self.call("set_fault", **fields))

    async def direct_ticket(self, login_id: int) -> tuple[bytes, bytes, str]:
        """(ticket, descriptor key, direct addresses) bound to `login_id` on this node
        (docs/direct-protocol.md); the ticket dies with the login. The addresses are the Unix
        listener's (unix:PATH) and, when the node has one, the TCP+TLS listener's
        (tls:NAME@HOST:PORT), separated by a space."""
        r = await self.call("direct_ticket", login_id=login_id)
        addresses = " ".join(a for a in (str(r["address"]), str(r.get("tls_address") or "")) if a)
        return bytes(r["ticket"]), bytes(r["key"]), addresses

    async def counters(self) -> dict[str, int]:
        """Fault and direct-path counters: delayed, throttled, direct_calls, direct_fallbacks,
        direct_delayed."""
        return {str(k): int(v) for k, v in (await self.call("counters")).items()}

    async def audit_read(self, since_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        r = await self.call("audit_read", since_seq=since_seq, limit=limit)
        return [AuditRecord(x["seq"], x["time_us"], x["event"], x["fields"]) for x in r]
