"""The cluster client the daemon plays (CloudHSM's client SDK): `Cluster` implements
`ClusterClient` and `DirectRouting` by composing the parts named below, and holds the
client-facing object and crypto calls themselves.

- pool.Pool: the members and how a node call is made (deadlines, health, background tasks)
- directory.Directory: the handle -> object table (holders, tombstones, indexes)
- logins.Logins: application logins on every HSM
- routing.Router: which HSM takes a request, the availability check, the one retry loop
- sync.KeySync: copies of new token objects to the other HSMs
- usersync.UserSync / users.UserCalls: user records across HSMs / the user verbs
- tickets.Tickets / direct.DirectRoutes: the direct data path"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from hsmsim.cluster.api import (AttributeResult, ClusterInfo, DirectRoute, EncryptResult, HsmInfo,
                                Login, UserInfo)
from hsmsim.cluster.config import ClusterConfig
from hsmsim.cluster.direct import DirectRoutes
from hsmsim.cluster.directory import Directory
from hsmsim.cluster.journal import HandleAllocator, Journal
from hsmsim.cluster.logins import Logins
from hsmsim.cluster.members import ACTIVE, DEGRADED, Member
from hsmsim.cluster.pool import Pool
from hsmsim.cluster.routing import Router
from hsmsim.cluster.state import ClusterSpec, StateDir
from hsmsim.cluster.sync import KeySync
from hsmsim.cluster.tickets import Tickets
from hsmsim.cluster.users import UserCalls
from hsmsim.cluster.usersync import UserSync
from hsmsim.node.client import NodeClient, NodeUnavailable
from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import RV, Attribute, UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import MechanismSpec

log = logging.getLogger("hsmsim.cluster")


class Cluster:
    """The daemon's view of the cluster; one instance per daemon."""

    def __init__(self, state: StateDir, spec: ClusterSpec, config: ClusterConfig) -> None:
        self.state, self.spec = state, spec
        self.pool = Pool({h.hsm_id: Member(h.hsm_id, h.az, state) for h in spec.hsms}, config)
        self.handles = HandleAllocator(state.handles)
        self.journal = Journal(state.journal)
        self.directory = Directory(self.journal)
        self.usersync = UserSync(self.pool, self.journal)
        self.tickets = Tickets(self.pool)
        self.logins = Logins(self.pool, self.directory, self.usersync, self.tickets)
        self.router = Router(self.pool, self.directory, self.logins, self.handles)
        self.keysync = KeySync(self.pool, self.directory)
        self.users = UserCalls(self.pool, self.journal, self.logins, self.router, self.usersync,
                               self.keysync)
        self.direct = DirectRoutes(self.pool, self.directory, self.logins, self.router,
                                   self.tickets)
        self.ca_pem = state.ca_cert.read_bytes() if state.ca_cert.exists() else b""
        self.converge_events = 0

    # -- the parts, as the supervisor, control and tests use them --------------------------------
    @property
    def members(self) -> dict[str, Member]:
        return self.pool.members

    @property
    def config(self) -> ClusterConfig:
        return self.pool.config

    @config.setter
    def config(self, config: ClusterConfig) -> None:
        self.pool.config = config

    @property
    def check_availability(self) -> bool:
        return self.pool.check_availability

    def usable(self) -> list[Member]:
        return self.pool.usable()

    def routable(self) -> list[Member]:
        return self.pool.routable()

    def sync_lag(self, m: Member) -> int:
        return self.directory.sync_lag(m.hsm_id)

    def held(self, m: Member) -> int:
        return self.directory.held(m.hsm_id)

    def live_token_handles(self) -> set[int]:
        return self.directory.live_tokens()

    # -- ClusterClient: info -----------------------------------------------------------------------
    def cluster_state(self) -> str:
        members = list(self.members.values())
        if members and all(m.usable and m.converged for m in members):
            return ACTIVE
        return DEGRADED

    async def info(self) -> ClusterInfo:
        hsms = tuple(HsmInfo(m.hsm_id, m.az, m.hsm_state if m.usable else DEGRADED
                             if m.hsm_state == ACTIVE else m.hsm_state,
                             self.held(m), self.sync_lag(m), m.last_error)
                     for m in self.members.values())
        return ClusterInfo(self.spec.cluster_id, self.cluster_state(), hsms, self.ca_pem)

    # -- ClusterClient: logins ---------------------------------------------------------------------
    async def login(self, user_type: UserType, username: str, password: str) -> Login:
        return await self.logins.login(user_type, username, password)

    async def logout(self, login: Login) -> None:
        await self.logins.logout(login)

    # -- DirectRouting -----------------------------------------------------------------------------
    async def direct_route(self, login: Login, handle: int) -> list[DirectRoute]:
        return await self.direct.direct_route(login, handle)

    def direct_route_cached(self, login: Login, handle: int) -> list[DirectRoute] | None:
        return self.direct.direct_route_cached(login, handle)

    # -- ClusterClient: objects --------------------------------------------------------------------
    @staticmethod
    def _is_token(template: Template) -> bool:
        return bool(template.get(int(Attribute.TOKEN), False))

    async def _create(self, login: Login, token_flags: Sequence[bool], session: int,
                      requires: Sequence[int], invalid: RV,
                      fn: Callable[[NodeClient, int, list[int]], Awaitable[Any]]) -> list[int]:
        """Create objects on one HSM, then sync the token ones (acknowledged per the key
        availability check)."""
        _, handles, m = await self.router.create(login, token_flags, session, requires, invalid,
                                                 fn)
        token_handles = [h for h, tok in zip(handles, token_flags) if tok]
        if token_handles:
            await self.keysync.replicate_new(m, token_handles)
        return handles

    async def generate_key(self, login: Login, mech: MechanismSpec, template: Template,
                           session: int) -> int:
        handles = await self._create(
            login, [self._is_token(template)], session, (), RV.KEY_HANDLE_INVALID,
            lambda client, lid, hs: client.generate_key(lid, mech, template, handle=hs[0],
                                                        session=session))
        return handles[0]

    async def generate_key_pair(self, login: Login, mech: MechanismSpec, public: Template,
                                private: Template, session: int) -> tuple[int, int]:
        handles = await self._create(
            login, [self._is_token(public), self._is_token(private)], session, (),
            RV.KEY_HANDLE_INVALID,
            lambda client, lid, hs: client.generate_key_pair(
                lid, mech, public, private, public_handle=hs[0], private_handle=hs[1],
                session=session))
        return handles[0], handles[1]

    async def create_object(self, login: Login, template: Template, session: int) -> int:
        handles = await self._create(
            login, [self._is_token(template)], session, (), RV.OBJECT_HANDLE_INVALID,
            lambda client, lid, hs: client.create_object(lid, template, handle=hs[0],
                                                         session=session))
        return handles[0]

    async def copy_object(self, login: Login, handle: int, template: Template, session: int) -> int:
        src = self.router.entry(handle, RV.OBJECT_HANDLE_INVALID)
        token = self._is_token(template) if int(Attribute.TOKEN) in template else src.token
        handles = await self._create(
            login, [token], session, (handle,), RV.OBJECT_HANDLE_INVALID,
            lambda client, lid, hs: client.copy_object(lid, handle, template, new_handle=hs[0],
                                                       session=session))
        return handles[0]

    async def unwrap_key(self, login: Login, unwrapping: int, mech: MechanismSpec, wrapped: bytes,
                         template: Template, session: int) -> int:
        handles = await self._create(
            login, [self._is_token(template)], session, (unwrapping,),
            RV.UNWRAPPING_KEY_HANDLE_INVALID,
            lambda client, lid, hs: client.unwrap_key(lid, unwrapping, mech, wrapped, template,
                                                      handle=hs[0], session=session))
        return handles[0]

    async def derive_key(self, login: Login, base: int, mech: MechanismSpec, template: Template,
                         session: int) -> int:
        handles = await self._create(
            login, [self._is_token(template)], session, (base,), RV.KEY_HANDLE_INVALID,
            lambda client, lid, hs: client.derive_key(lid, base, mech, template, handle=hs[0],
                                                      session=session))
        return handles[0]

    async def destroy_object(self, login: Login, handle: int) -> None:
        obj = self.router.entry(handle, RV.OBJECT_HANDLE_INVALID)
        await self.router.run(login, (handle,), RV.OBJECT_HANDLE_INVALID,
                              lambda client, lid: client.destroy_object(lid, handle))
        if obj.token:
            self.directory.tombstone(handle)
        else:
            self.directory.remove(handle)
        for hid in obj.holders:
            m = self.members.get(hid)
            if m is not None and m.usable:
                self.pool.spawn_bg(self.keysync.destroy_replica(m, handle))

    async def get_attributes(self, login: Login, handle: int,
                             attrs: Sequence[int]) -> list[AttributeResult]:
        slots = await self.router.run(login, (handle,), RV.OBJECT_HANDLE_INVALID,
                                      lambda client, lid: client.get_attributes(lid, handle, attrs))
        return list(slots)

    async def _apply_everywhere(self, login: Login, handle: int,
                                fn: Callable[[NodeClient, int], Awaitable[Any]]) -> None:
        """A change to a token object: on one holder first (the HSM checks the user may make
        it), then on every other usable holder; a holder that misses it is reconciled."""
        obj = self.router.entry(handle, RV.OBJECT_HANDLE_INVALID)
        _, first = await self.router.run_on(login, (handle,), RV.OBJECT_HANDLE_INVALID, fn)
        if not obj.token:
            return
        rec = self.logins.rec(login)
        others = [self.members[h] for h in obj.holders if h in self.members and h != first.hsm_id]

        async def follow(m: Member) -> None:
            try:
                lid = await self.logins.node_login(m, rec)
                await self.pool.timed(m, fn(m.connection(), lid))
            except Exception as exc:
                log.info("change of %s on %s failed (%s): reconciling", handle, m.hsm_id, exc)
                m.converged = False
        await asyncio.gather(*(follow(m) for m in others if m.usable))
        for m in others:
            if not m.usable:
                m.converged = False

    async def set_attributes(self, login: Login, handle: int, template: Template) -> None:
        await self._apply_everywhere(login, handle, lambda client, lid: client.set_attributes(
            lid, handle, template))

    async def share_key(self, login: Login, handle: int, username: str) -> None:
        await self._apply_everywhere(login, handle, lambda client, lid: client.share_key(
            lid, handle, username))

    async def unshare_key(self, login: Login, handle: int, username: str) -> None:
        await self._apply_everywhere(login, handle, lambda client, lid: client.unshare_key(
            lid, handle, username))

    async def find_objects(self, login: Login, template: Template, session: int,
                           as_user: str | None = None) -> list[int]:
        """Handles the login may see that match `template`; an admin's `as_user` narrows them to
        what that crypto user sees (owned, shared with it, public keys)."""
        rec = self.logins.rec(login)
        homes = self.directory.session_holders(login.login_id)
        found: set[int] = set(await self.router.run(
            login, (), RV.OBJECT_HANDLE_INVALID,
            lambda client, lid: client.find_objects(lid, template, None, as_user)))
        for hid in homes:
            m = self.members.get(hid)
            if m is None or not m.usable:
                continue
            try:
                lid = await self.logins.node_login(m, rec)
                found.update(await self.pool.timed(m, m.connection().find_objects(
                    lid, template, None)))
            except (NodeUnavailable, Pkcs11Error):
                pass
        return self.directory.visible(found, login.login_id)

    async def close_session(self, login: Login | None, session: int) -> None:
        homes = self.directory.on_session_closed(
            session, login.login_id if login is not None else None)
        for hid in homes:
            m = self.members.get(hid)
            if m is None or not m.usable:
                continue
            lid = m.logins.get(login.login_id) if login is not None else None
            try:
                await self.pool.timed(m, m.connection().close_session(session, lid))
            except (NodeUnavailable, Pkcs11Error) as exc:
                log.info("close_session on %s: %s", hid, exc)

    # -- ClusterClient: crypto ---------------------------------------------------------------------
    async def encrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> EncryptResult:
        r: EncryptResult = await self.router.run(
            login, (handle,), RV.KEY_HANDLE_INVALID,
            lambda client, lid: client.encrypt(lid, handle, mech, data))
        return r

    async def decrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> bytes:
        return await self.router.run(login, (handle,), RV.KEY_HANDLE_INVALID,
                                     lambda client, lid: client.decrypt(lid, handle, mech, data))

    async def sign(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> bytes:
        return await self.router.run(login, (handle,), RV.KEY_HANDLE_INVALID,
                                     lambda client, lid: client.sign(lid, handle, mech, data))

    async def verify(self, login: Login, handle: int, mech: MechanismSpec, data: bytes,
                     signature: bytes) -> None:
        await self.router.run(login, (handle,), RV.KEY_HANDLE_INVALID,
                              lambda client, lid: client.verify(lid, handle, mech, data, signature))

    async def wrap_key(self, login: Login, wrapping: int, mech: MechanismSpec, key: int) -> bytes:
        self.router.entry(wrapping, RV.WRAPPING_KEY_HANDLE_INVALID)
        return await self.router.run(login, (wrapping, key), RV.KEY_HANDLE_INVALID,
                                     lambda client, lid: client.wrap_key(lid, wrapping, mech, key))

    async def generate_random(self, login: Login | None, length: int) -> bytes:
        return await self.router.run_unlogged(lambda client: client.generate_random(length))

    # -- ClusterClient: users ----------------------------------------------------------------------
    async def create_user(self, login: Login, username: str, role: str, password: str) -> None:
        await self.users.create_user(login, username, role, password)

    async def delete_user(self, login: Login, username: str) -> None:
        await self.users.delete_user(login, username)

    async def change_password(self, login: Login, username: str, password: str) -> None:
        await self.users.change_password(login, username, password)

    async def unlock_user(self, login: Login, username: str) -> None:
        await self.users.unlock_user(login, username)

    async def list_users(self, login: Login) -> list[UserInfo]:
        return await self.users.list_users(login)

    async def list_users_cluster(self) -> list[dict[str, Any]]:
        return await self.usersync.list_cluster()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def close(self) -> None:
        await self.pool.cancel_bg()
        await asyncio.gather(*(m.terminate() for m in self.members.values()),
                             return_exceptions=True)
        self.journal.close()
