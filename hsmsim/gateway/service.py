"""The gateway service: the state every handler works on (the applications of one daemon, the
session handle source, the caches, the direct routes) and the lifetime of applications and
sessions. The handlers live by operation family (ops_token, ops_session, ops_objects,
ops_crypto, ops_keys) and are reached through the one opcode table in hsmsim.gateway.dispatch;
together they give CloudHSM Client SDK 5 behaviour (login per application, RW sessions only,
mechanism table, local hashing, GCM IV rules, data limits, output-length conventions, quirks)."""

from __future__ import annotations

import logging

from hsmsim.cluster.api import ClusterClient, DirectRouting
from hsmsim.gateway.caches import KeyChecks, MechanismCache
from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.routes import DirectRoutes
from hsmsim.gateway.state import Application, HandleSource

log = logging.getLogger(__name__)


class Gateway:
    """All applications of one daemon and the state the handlers share."""

    def __init__(self, cluster: ClusterClient, config: GatewayConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.apps: dict[bytes, Application] = {}
        self.handles = HandleSource()
        self.key_checks = KeyChecks(cluster, config)
        self.mechs = MechanismCache()
        self.serial = b"hsmsim"
        # the daemon's cluster routes direct calls; a ClusterClient without it never offers them.
        # While the call trace is on no direct route is offered either: every call then passes
        # the daemon and is in the trace (slower, but complete).
        self.router: DirectRouting | None = (
            cluster if hasattr(cluster, "direct_route") and not config.trace_calls
            else None)  # type: ignore[assignment]
        self.routes = DirectRoutes(config)

    async def prepare(self) -> None:
        try:
            info = await self.cluster.info()
            self.serial = info.cluster_id.removeprefix("cluster-").encode()[:16]
        except Exception:  # the token serial is cosmetic; never fail start-up on it
            log.warning("cluster info unavailable for the token serial number")

    # ---- application lifetime -----------------------------------------------------------------
    async def close_application(self, app: Application) -> None:
        """The last connection left or C_Finalize: sessions close (session objects die), logout."""
        self.apps.pop(app.token, None)
        login = app.login
        for handle in list(app.sessions):
            await self.close_session(app, handle)
        app.login = None
        if login is not None:
            try:
                await self.cluster.logout(login)
            except Exception as exc:  # noqa: BLE001 - best effort at teardown
                log.info("logout at application close failed: %s", type(exc).__name__)

    async def close_session(self, app: Application, handle: int) -> None:
        app.sessions.pop(handle, None)
        if app.login is not None:  # its session objects die: forget keys checked at init
            self.key_checks.forget(login_id=app.login.login_id)
        try:
            await self.cluster.close_session(app.login, handle)
        except Exception as exc:  # noqa: BLE001 - the session is gone either way
            log.info("close_session failed: %s", type(exc).__name__)
        if not app.sessions and app.login is not None:
            # PKCS#11: closing the application's last session ends its login. (CloudHSM keeps
            # the others logged in when one closes, which per-application login gives.)
            # FIDELITY: what CloudHSM does when the last session closes is not documented.
            login, app.login = app.login, None
            try:
                await self.cluster.logout(login)
            except Exception as exc:  # noqa: BLE001
                log.info("logout failed: %s", type(exc).__name__)
