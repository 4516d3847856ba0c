"""Keeps the cluster's members alive: bootstrap of a new cluster (masking key, first users,
cloning), start of an existing one, health checks, restart or replacement of crashed nodes,
adding and removing HSMs, and fault injection. Bringing a member back in sync is
reconcile.Reconciler's job."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import time
from typing import Any

from hsmsim import files
from hsmsim.cluster.cluster import Cluster
from hsmsim.cluster.members import ACTIVE, DEGRADED, DELETE_IN_PROGRESS, Member, MemberDown
from hsmsim.cluster.reconcile import ProgressFn, Reconciler
from hsmsim.cluster.state import AZ_RE, MAX_HSMS, HsmSpec, new_id
from hsmsim.errors import HsmsimError
from hsmsim.node.client import NodeUnavailable
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger("hsmsim.cluster")

REPLACE_AFTER = 3  # consecutive failed starts before an HSM is replaced
SPACE_RETRY_S = 5.0  # a node that could not start for want of disk space is tried this often


class ClusterOpError(HsmsimError):
    """A lifecycle or fault request cannot be done (unknown HSM, last HSM, bad state)."""


class Supervisor:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self._task: asyncio.Task[None] | None = None
        self._anti_entropy_at = 0.0
        self.reconciler = Reconciler(cluster)
        self.space_retry_at: dict[str, float] = {}  # HSM id -> next start try (disk full)

    async def clone_into(self, source: Member, target: Member) -> None:
        await self.reconciler.clone_into(source, target)

    async def reconcile(self, m: Member, progress: ProgressFn | None = None) -> None:
        await self.reconciler.reconcile(m, progress)

    # -- start -----------------------------------------------------------------------------------
    async def bootstrap_new(self, admin_password: str, cu_password: str) -> None:
        """A brand-new cluster: the first HSM makes the masking key and the first users; the
        others are cloned from it."""
        c = self.c
        members = list(c.members.values())
        first, others = members[0], members[1:]
        await asyncio.gather(first.spawn("new", c.config.node_start_timeout_s),
                             *(m.spawn("clone", c.config.node_start_timeout_s) for m in others))
        await first.connection().initialize_users(admin_password, cu_password)
        c.journal.append({"t": "user_live", "u": "admin"}, {"t": "user_live", "u": "crypto_user"})
        await asyncio.gather(*(self.clone_into(first, m) for m in others))
        for m in members:
            m.converged = True
            m.hsm_state = ACTIVE

    async def start_existing(self) -> None:
        c = self.c

        async def bring_up(m: Member) -> None:
            if not await m.adopt():
                await m.spawn(None, c.config.node_start_timeout_s)
        results = await asyncio.gather(*(bring_up(m) for m in c.members.values()),
                                       return_exceptions=True)
        for m, r in zip(c.members.values(), results):
            if isinstance(r, BaseException):
                m.last_error = str(r)
                log.error("%s failed to start: %s", m.hsm_id, r)
        if not c.usable():
            raise MemberDown("no HSM of the cluster could be started: " +
                             "; ".join(str(r) for r in results if isinstance(r, BaseException)))
        await self.reconciler.rebuild_directory()
        await self.reconciler.reconcile_all()

    # -- supervision -----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("supervision pass failed")
            await asyncio.sleep(self.c.config.health_interval_s)

    async def check_once(self) -> None:
        c = self.c
        for m in list(c.members.values()):
            if m.removing or m.killed or m.partitioned or m.paused:
                continue
            lock = c.pool.lock_for(m.hsm_id)
            if lock.locked():
                continue
            c.pool.spawn_bg(self._check_member(m, lock), f"check {m.hsm_id}")
        now = time.monotonic()
        if now - self._anti_entropy_at > max(5.0, c.config.reconcile_interval_s * 5):
            self._anti_entropy_at = now
            # Periodic anti-entropy (CloudHSM's server-side sync): catch anything a failed
            # background copy left behind.
            for m in c.usable():
                if m.converged and m.pending_sync == 0 and c.directory.sync_lag(m.hsm_id) > 0:
                    m.converged = False

    async def _check_member(self, m: Member, lock: asyncio.Lock) -> None:
        c = self.c
        async with lock:
            if m.exited():
                if m.proc is not None or m.adopted_pid is not None:
                    code = m.proc.returncode if m.proc is not None else "unknown"
                    why = f"node process exited with status {code}"
                    m.mark_down(why)
                    c.directory.on_member_lost(m.hsm_id)
                    m.restarts += 1
                    log.warning("%s: %s; restarting", m.hsm_id, why)
                if time.monotonic() < self.space_retry_at.get(m.hsm_id, 0.0):
                    return
                if m.start_failures >= REPLACE_AFTER:
                    await self._replace(m)
                    return
                try:
                    await m.spawn(None, c.config.node_start_timeout_s)
                    c.directory.on_member_lost(m.hsm_id)
                    m.start_failures = 0
                    self.space_retry_at.pop(m.hsm_id, None)
                except (HsmsimError, OSError) as exc:
                    m.last_error = str(exc)
                    if self._no_space(m, exc):
                        # A full disk is not a damaged HSM: wait for space, never replace.
                        m.last_error = (f"no space left on the disk of {m.dir}; the HSM starts "
                                        "again once there is space (it is not replaced)")
                        log.warning("%s: cannot start: %s", m.hsm_id, m.last_error)
                        self.space_retry_at[m.hsm_id] = time.monotonic() + SPACE_RETRY_S
                        return
                    # Only a node that fails on its own counts (not one killed while starting).
                    if m.proc is None or m.proc.returncode is None or m.proc.returncode > 0:
                        m.start_failures += 1
                    return
            elif not m.connected:
                try:
                    await m.connect()
                    c.directory.on_member_lost(m.hsm_id)
                except (HsmsimError, OSError) as exc:
                    m.last_error = f"cannot connect: {exc}"
                    return
            else:
                try:
                    await asyncio.wait_for(m.connection().ping(), c.pool.liveness_window())
                    m.ping_failures = 0
                except asyncio.TimeoutError:
                    # A slow answer on a busy machine is not a failure yet: two in a row are,
                    # unless the node still answers other requests (it is loaded, not dead).
                    m.ping_failures += 1
                    if m.ping_failures >= 2 and not m.answering(c.pool.liveness_window()):
                        m.mark_down("health check: no answer")
                        c.directory.on_member_lost(m.hsm_id)
                    return
                except (NodeUnavailable, Pkcs11Error) as exc:
                    m.mark_down(f"health check failed: {exc}")
                    c.directory.on_member_lost(m.hsm_id)
                    return
        if m.usable and not m.converged:
            await self.reconcile(m)

    @staticmethod
    def _no_space(m: Member, exc: BaseException) -> bool:
        """Whether a failed start was for want of disk space: the node's own exit status, the
        error itself, or a full disk under the node's directory."""
        if m.proc is not None and m.proc.returncode == files.EXIT_NO_SPACE:
            return True
        return files.is_no_space(exc, m.dir if m.dir.exists() else m.state.root)

    async def _replace(self, m: Member) -> None:
        """An HSM whose node cannot start any more (e.g. its token was damaged by a kill -9
        mid-write) is replaced: its directory is set aside and a fresh node is cloned from a
        healthy HSM, then reconciled. FIDELITY: CloudHSM replaces an unhealthy HSM with a new
        one with a new HSM id; here the replacement keeps the id so that scripts and tests can
        keep addressing it (the old state is kept in nodes/.replaced-<id>-<time>)."""
        c = self.c
        if files.no_space(m.dir if m.dir.exists() else c.state.root):
            # A copy needs space the disk does not have, and a full disk damages nothing.
            m.last_error = f"cannot start and the disk of {m.dir} is full: not replacing it"
            m.start_failures = 0
            self.space_retry_at[m.hsm_id] = time.monotonic() + SPACE_RETRY_S
            return
        sources = [x for x in c.routable() if x is not m] or [x for x in c.usable() if x is not m]
        if not sources:
            m.last_error = "cannot start and no healthy HSM to replace it from"
            return
        log.warning("%s: node failed to start %d times; replacing it from %s", m.hsm_id,
                    m.start_failures, sources[0].hsm_id)
        await m.terminate()
        aside = c.state.nodes / f".replaced-{m.hsm_id}-{int(time.time())}"
        try:
            m.dir.rename(aside)
        except OSError as exc:
            m.last_error = f"cannot set the damaged node aside: {exc}"
            return
        c.directory.on_member_removed(m.hsm_id)
        try:
            await m.spawn("clone", c.config.node_start_timeout_s)
            await self.clone_into(sources[0], m)
        except (HsmsimError, OSError) as exc:
            m.last_error = f"replacement failed: {exc}"
            await m.terminate()
            # Leave no dead copy behind: the set-aside directory goes back in place (the next
            # attempt sets it aside again).
            shutil.rmtree(m.dir, ignore_errors=True)
            try:
                aside.rename(m.dir)
            except OSError as back:
                log.error("%s: cannot put %s back: %s", m.hsm_id, aside, back)
            return
        m.start_failures = 0
        m.replacements += 1
        m.last_error = "replaced after repeated start failures"

    # -- lifecycle -------------------------------------------------------------------------------
    def member(self, hsm_id: str) -> Member:
        m = self.c.members.get(hsm_id)
        if m is None:
            raise ClusterOpError(f"no HSM {hsm_id!r} in cluster {self.c.spec.cluster_id} "
                                 f"(HSMs: {', '.join(self.c.members) or 'none'})")
        return m

    async def add_hsm(self, az: str, progress: ProgressFn | None = None) -> str:
        c = self.c
        if not AZ_RE.match(az):
            raise ClusterOpError(f"{az!r} is not an availability zone name like us-east-1a")
        if len(c.members) >= MAX_HSMS:
            raise ClusterOpError(f"a cluster holds at most {MAX_HSMS} HSMs (CloudHSM quota)")
        sources = c.routable() or c.usable()
        if not sources:
            raise ClusterOpError("no healthy HSM to clone the new HSM from")
        hsm_id = new_id("hsm-")
        m = Member(hsm_id, az, c.state, adding=True)  # CREATE_IN_PROGRESS until it holds every key
        c.members[hsm_id] = m
        try:
            async with c.pool.lock_for(hsm_id):
                await m.spawn("clone", c.config.node_start_timeout_s)
                await self.clone_into(sources[0], m)
                await self.reconcile(m, progress)
                if not m.converged:
                    raise ClusterOpError(f"{hsm_id} could not be brought in sync: {m.last_error}")
        except BaseException:
            c.members.pop(hsm_id, None)
            await m.terminate()
            shutil.rmtree(m.dir, ignore_errors=True)
            raise
        m.adding = False
        m.hsm_state = ACTIVE if m.usable else DEGRADED
        c.spec = c.spec.with_hsms([*c.spec.hsms, HsmSpec(hsm_id, az)])
        c.state.save_spec(c.spec)
        return hsm_id

    async def remove_hsm(self, hsm_id: str) -> None:
        c = self.c
        m = self.member(hsm_id)
        if len(c.members) == 1:
            # FIDELITY: CloudHSM allows deleting the last HSM (the cluster keeps its backup);
            # here the cluster would have nowhere to keep its keys, so we refuse.
            raise ClusterOpError("cannot remove the last HSM of the cluster")
        m.removing = True
        m.hsm_state = DELETE_IN_PROGRESS
        async with c.pool.lock_for(hsm_id):
            await m.terminate()
        c.directory.on_member_removed(hsm_id)
        del c.members[hsm_id]
        c.spec = c.spec.with_hsms([h for h in c.spec.hsms if h.hsm_id != hsm_id])
        c.state.save_spec(c.spec)
        shutil.rmtree(m.dir, ignore_errors=True)

    # -- faults ----------------------------------------------------------------------------------
    async def kill(self, hsm_id: str) -> None:
        m = self.member(hsm_id)
        await m.kill()
        self.c.directory.on_member_lost(m.hsm_id)

    async def start_hsm(self, hsm_id: str) -> None:
        """Start an HSM that was killed on purpose (or is down) again."""
        m = self.member(hsm_id)
        if m.paused:
            raise ClusterOpError(f"{hsm_id} is paused; resume it instead")
        m.killed = False
        async with self.c.pool.lock_for(hsm_id):
            if m.exited():
                m.restarts += 1
                await m.spawn(None, self.c.config.node_start_timeout_s)
            elif not m.connected and not m.partitioned:
                await m.connect()
        if m.usable:
            await self.reconcile(m)

    async def pause(self, hsm_id: str) -> None:
        m = self.member(hsm_id)
        if m.exited():
            raise ClusterOpError(f"{hsm_id} is not running")
        m.paused = True
        m.send_signal(signal.SIGSTOP)
        m.mark_down("paused")
        self.c.directory.on_member_lost(m.hsm_id)

    async def resume(self, hsm_id: str) -> None:
        m = self.member(hsm_id)
        if not m.paused:
            raise ClusterOpError(f"{hsm_id} is not paused")
        m.send_signal(signal.SIGCONT)
        m.paused = False
        await self._rejoin(m)

    async def partition(self, hsm_id: str) -> None:
        m = self.member(hsm_id)
        if m.client is not None and not m.client.closed:
            # the node closes the applications' direct connections too, until the daemon
            # reaches it again (heal): a partition cuts the HSM off from every client
            try:
                await self.c.pool.timed(m, m.client.set_fault(partitioned=True), timeout=5.0)
            except Exception as exc:  # noqa: BLE001 - partitioned either way
                log.info("partition of %s: the node was not told (%s)", hsm_id, exc)
        m.partitioned = True
        m.mark_down("partitioned from the daemon")
        self.c.directory.on_member_lost(m.hsm_id)

    async def heal(self, hsm_id: str) -> None:
        m = self.member(hsm_id)
        if not m.partitioned:
            raise ClusterOpError(f"{hsm_id} is not partitioned")
        m.partitioned = False
        await self._rejoin(m)

    async def _rejoin(self, m: Member) -> None:
        """Reconnect an HSM that is neither paused, partitioned nor killed, and catch it up."""
        if m.paused or m.partitioned or m.killed:
            return
        async with self.c.pool.lock_for(m.hsm_id):
            if not m.connected and not m.exited():
                try:
                    await m.connect()
                except (HsmsimError, OSError) as exc:
                    m.last_error = str(exc)
        if m.usable:
            self.c.pool.spawn_bg(self.reconcile(m), "reconcile")

    async def set_fault(self, hsm_id: str, **fields: Any) -> dict[str, Any]:
        m = self.member(hsm_id)
        if not m.usable or m.client is None:
            raise ClusterOpError(f"{hsm_id} is not reachable ({m.condition()})")
        result = await self.c.pool.timed(m, m.client.set_fault(**fields))
        if "latency_ms" in fields:
            m.latency_ms = int(fields["latency_ms"])
        if "throttle_rps" in fields:
            m.throttle_rps = int(fields["throttle_rps"])
        return result

    def converging(self) -> bool:
        return any(not m.converged for m in self.c.members.values()
                   if not (m.killed or m.paused or m.partitioned))
