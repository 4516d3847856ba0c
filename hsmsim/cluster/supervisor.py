"""Keeps the cluster's members alive and in sync: bootstrap of a new cluster (masking key,
first users, cloning), start of an existing one, health checks, restart of crashed nodes,
reconciliation of a member that returns (inventory diff, masked copies, tombstones), adding
and removing HSMs, and fault injection."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hsmsim import files
from hsmsim.cluster.cluster import Cluster, Obj
from hsmsim.cluster.members import ACTIVE, CREATE_IN_PROGRESS, DELETE_IN_PROGRESS, Member, MemberDown
from hsmsim.cluster.state import AZ_RE, MAX_HSMS, HsmSpec, new_id
from hsmsim.errors import HsmsimError
from hsmsim.node.client import NodeUnavailable
from hsmsim.pkcs11.constants import RV, UserType
from hsmsim.pkcs11.errors import Pkcs11Error

log = logging.getLogger("hsmsim.cluster")

ProgressFn = Callable[[int, int, str], Awaitable[None]]
REPLACE_AFTER = 3  # consecutive failed starts before an HSM is replaced
SPACE_RETRY_S = 5.0  # a node that could not start for want of disk space is tried this often


class ClusterOpError(HsmsimError):
    """A lifecycle or fault request cannot be done (unknown HSM, last HSM, bad state)."""


class Supervisor:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self._task: asyncio.Task[None] | None = None
        self._anti_entropy_at = 0.0
        self.last_converged: float | None = None
        self.space_retry_at: dict[str, float] = {}  # HSM id -> next start try (disk full)

    # -- start -----------------------------------------------------------------------------------
    async def bootstrap_new(self, admin_password: str, cu_password: str) -> None:
        """A brand-new cluster: the first HSM makes the masking key and the first users; the
        others are cloned from it."""
        c = self.c
        members = list(c.members.values())
        first, others = members[0], members[1:]
        await asyncio.gather(first.spawn("new", c.config.node_start_timeout_s),
                             *(m.spawn("clone", c.config.node_start_timeout_s) for m in others))
        assert first.client is not None
        await first.client.initialize_users(admin_password, cu_password)
        c.journal.append({"t": "user_live", "u": "admin"}, {"t": "user_live", "u": "crypto_user"})
        await asyncio.gather(*(self.clone_into(first, m) for m in others))
        for m in members:
            m.converged = True
            m.hsm_state = ACTIVE

    async def clone_into(self, source: Member, target: Member) -> None:
        """Masking key transfer (wrapped to the target's ephemeral key), then users."""
        if source.client is None or target.client is None:
            raise MemberDown(f"cannot clone {target.hsm_id} from {source.hsm_id}: one is down")
        offer = await target.client.clone_offer()
        blob = await source.client.clone_export(offer)
        await target.client.clone_accept(blob)
        users = await source.client.export_users()
        await target.client.import_users(users)

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
        await self.rebuild_directory()
        await self.reconcile_all()

    async def rebuild_directory(self) -> None:
        """The object directory from every reachable member's inventory (daemon start)."""
        c = self.c
        invs = await self._inventories(c.usable())
        c.objects = {h: o for h, o in c.objects.items() if not o.token}
        top = 0
        for hid, inv in invs.items():
            for h in inv:
                top = max(top, h)
                if h in c.journal.tombstones:
                    continue
                c.objects.setdefault(h, Obj(True, set())).holders.add(hid)
        for h in c.journal.tombstones:
            top = max(top, h)
        if top:
            c.handles.bump_past(top)

    async def _inventories(self, members: list[Member]) -> dict[str, dict[int, bytes]]:
        out: dict[str, dict[int, bytes]] = {}

        async def one(m: Member) -> None:
            try:
                inv = await self.c.timed(m, m.client.inventory(), timeout=30.0)  # type: ignore[union-attr]
                out[m.hsm_id] = {e.handle: e.fingerprint for e in inv}
            except (NodeUnavailable, Pkcs11Error) as exc:
                log.info("inventory of %s failed: %s", m.hsm_id, exc)
        await asyncio.gather(*(one(m) for m in members))
        return out

    # -- reconciliation --------------------------------------------------------------------------
    async def reconcile_all(self) -> None:
        await asyncio.gather(*(self.reconcile(m) for m in self.c.usable() if not m.converged))

    async def reconcile(self, m: Member, progress: ProgressFn | None = None) -> None:
        """Bring `m` in line with the cluster: users, tombstones, missing or different token
        objects (masked copies from a member that holds the reference version)."""
        c = self.c
        if m.hsm_id in c._reconciling:
            return
        c._reconciling.add(m.hsm_id)
        try:
            gen = m.generation
            refs = [x for x in c.usable() if x is not m and x.converged] or \
                   [x for x in c.usable() if x is not m]
            # A node whose cloning was interrupted has no masking key yet: clone it first.
            try:
                st = await c.timed(m, m.client.status())  # type: ignore[union-attr]
                if not st.has_masking_key:
                    if not refs:
                        return
                    await self.clone_into(refs[0], m)
            except (NodeUnavailable, Pkcs11Error, MemberDown) as exc:
                log.info("%s: masking key check/clone failed: %s", m.hsm_id, exc)
                return
            invs = await self._inventories([m] + refs)
            mine = invs.get(m.hsm_id)
            if mine is None or m.generation != gen:
                return
            # users: converged both ways, as keys are: `m` may hold a newer record than the
            # others (e.g. a password changed while it was the only HSM up), or an older one.
            if refs and not await c.converge_users([m] + refs):
                log.info("user sync of %s failed; it is retried", m.hsm_id)
                return
            await self._apply_user_tombstones(m)
            # objects the member holds that the cluster does not know (e.g. the daemon died
            # between creation and its record): adopt them, the others get copies.
            for h in mine:
                if h not in c.journal.tombstones and h not in c.objects:
                    c.objects[h] = Obj(True, {m.hsm_id})
                    c.handles.bump_past(h)
            # tombstones
            for h in [h for h in mine if h in c.journal.tombstones]:
                try:
                    await c.timed(m, m.client.destroy_object(None, h))  # type: ignore[union-attr]
                except Pkcs11Error as exc:
                    if exc.rv not in (RV.OBJECT_HANDLE_INVALID, RV.KEY_HANDLE_INVALID):
                        raise
                mine.pop(h, None)
            # missing or different objects
            work: list[tuple[int, Member, bool]] = []
            for h, obj in list(c.objects.items()):
                if not obj.token or h in c.journal.tombstones:
                    continue
                ref_fps = {invs[r.hsm_id][h] for r in refs if r.hsm_id in invs and h in invs[r.hsm_id]}
                holders = [r for r in refs if r.hsm_id in invs and h in invs[r.hsm_id]]
                if h in mine:
                    obj.holders.add(m.hsm_id)
                    if holders and mine[h] not in ref_fps:
                        work.append((h, holders[0], True))
                elif holders:
                    work.append((h, holders[0], False))
                else:
                    obj.holders.discard(m.hsm_id)
            total = len(work)
            done = 0
            if progress is not None:
                await progress(0, total, f"syncing {m.hsm_id}")
            sem = asyncio.Semaphore(16)

            async def copy(h: int, src: Member, replace: bool) -> None:
                nonlocal done
                async with sem:
                    blob = await c.timed(src, src.client.export_masked(h))  # type: ignore[union-attr]
                    if h in c.journal.tombstones:
                        return
                    await c.import_blob(m, h, blob, replace=replace)
                    done += 1
                    if progress is not None and (done % 10 == 0 or done == total):
                        await progress(done, total, f"syncing {m.hsm_id}")

            results = await asyncio.gather(*(copy(*w) for w in work), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                log.info("reconciliation of %s: %d copies failed (%s)", m.hsm_id, len(failed),
                         failed[0])
                return
            if m.generation == gen and m.usable:
                m.login_refused.clear()  # users are in sync now: refusals may be stale
                await self._prelogin(m)
                if not m.converged:
                    log.info("%s converged (%d objects copied)", m.hsm_id, total)
                m.converged = True
                m.last_error = None if m.last_error and "exited" not in m.last_error else m.last_error
                c.converge_events += 1
                if all(x.converged for x in c.members.values() if not x.killed):
                    self.last_converged = time.monotonic()
        finally:
            c._reconciling.discard(m.hsm_id)

    async def _apply_user_tombstones(self, m: Member) -> None:
        """Users deleted while this member was away: delete them here too, as the admin
        (user records merge by version, so an import alone cannot remove a user)."""
        c = self.c
        if not c.journal.user_tombstones or m.client is None:
            return
        try:
            present = {u.username for u in await c.timed(m, m.client.list_users(None))}
        except (NodeUnavailable, Pkcs11Error):
            return
        doomed = sorted(present & c.journal.user_tombstones)
        if not doomed:
            return
        try:
            info = await c.timed(m, m.client.login(UserType.SO, "admin", c.state.read_secret(
                c.state.admin_password)))
        except (HsmsimError, NodeUnavailable) as exc:
            log.info("cannot remove deleted users %s from %s: %s", doomed, m.hsm_id, exc)
            return
        try:
            for name in doomed:
                try:
                    await c.timed(m, m.client.delete_user(info.login_id, name))
                except Pkcs11Error as exc:
                    log.info("deleting user %s on %s: %s", name, m.hsm_id, exc)
        finally:
            try:
                await c.timed(m, m.client.logout(info.login_id))
            except (NodeUnavailable, Pkcs11Error):
                pass

    async def _prelogin(self, m: Member) -> None:
        """Log every application in on a member before it takes traffic again, so that no
        request pays for a login (a slow password hash) on the way."""
        c = self.c
        recs = [r for r in c._logins.values() if r.login.login_id not in m.logins]
        results = await asyncio.gather(*(c.node_login(m, r) for r in recs),
                                       return_exceptions=True)
        for r, res in zip(recs, results):
            if isinstance(res, BaseException):
                log.info("login of %s on %s failed: %s", r.login.username, m.hsm_id, res)

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
            lock = c.lock_for(m.hsm_id)
            if lock.locked():
                continue
            c.spawn_bg(self._check_member(m, lock), f"check {m.hsm_id}")
        now = time.monotonic()
        if now - self._anti_entropy_at > max(5.0, c.config.reconcile_interval_s * 5):
            self._anti_entropy_at = now
            # Periodic anti-entropy (CloudHSM's server-side sync): catch anything a failed
            # background copy left behind.
            for m in c.usable():
                if m.converged and m.pending_sync == 0 and c.sync_lag(m) > 0:
                    m.converged = False

    async def _check_member(self, m: Member, lock: asyncio.Lock) -> None:
        c = self.c
        async with lock:
            if m.exited():
                if m.proc is not None or m.adopted_pid is not None:
                    code = m.proc.returncode if m.proc is not None else "unknown"
                    why = f"node process exited with status {code}"
                    m.mark_down(why)
                    c._drop_session_objects(m)
                    m.restarts += 1
                    log.warning("%s: %s; restarting", m.hsm_id, why)
                if time.monotonic() < self.space_retry_at.get(m.hsm_id, 0.0):
                    return
                if m.start_failures >= REPLACE_AFTER:
                    await self._replace(m)
                    return
                try:
                    await m.spawn(None, c.config.node_start_timeout_s)
                    c._drop_session_objects(m)
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
                    c._drop_session_objects(m)
                except (HsmsimError, OSError) as exc:
                    m.last_error = f"cannot connect: {exc}"
                    return
            else:
                try:
                    await asyncio.wait_for(m.client.ping(), c.liveness_window())  # type: ignore[union-attr]
                    m.ping_failures = 0
                except asyncio.TimeoutError:
                    # A slow answer on a busy machine is not a failure yet: two in a row are,
                    # unless the node still answers other requests (it is loaded, not dead).
                    m.ping_failures += 1
                    if m.ping_failures >= 2 and not m.answering(c.liveness_window()):
                        m.mark_down("health check: no answer")
                        c._drop_session_objects(m)
                    return
                except (NodeUnavailable, Pkcs11Error) as exc:
                    m.mark_down(f"health check failed: {exc}")
                    c._drop_session_objects(m)
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
        for o in c.objects.values():
            o.holders.discard(m.hsm_id)
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
        m = Member(hsm_id, az, c.state)
        m.hsm_state = CREATE_IN_PROGRESS
        c.members[hsm_id] = m
        try:
            async with c.lock_for(hsm_id):
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
        m.hsm_state = ACTIVE
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
        async with c.lock_for(hsm_id):
            await m.terminate()
        for o in c.objects.values():
            o.holders.discard(hsm_id)
        c._drop_session_objects(m)
        del c.members[hsm_id]
        c.spec = c.spec.with_hsms([h for h in c.spec.hsms if h.hsm_id != hsm_id])
        c.state.save_spec(c.spec)
        shutil.rmtree(m.dir, ignore_errors=True)

    # -- faults ----------------------------------------------------------------------------------
    async def kill(self, hsm_id: str) -> None:
        m = self.member(hsm_id)
        await m.kill()
        self.c._drop_session_objects(m)

    async def start_hsm(self, hsm_id: str) -> None:
        """Start an HSM that was killed on purpose (or is down) again."""
        m = self.member(hsm_id)
        if m.paused:
            raise ClusterOpError(f"{hsm_id} is paused; resume it instead")
        m.killed = False
        async with self.c.lock_for(hsm_id):
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
        self.c._drop_session_objects(m)

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
                await self.c.timed(m, m.client.set_fault(partitioned=True), timeout=5.0)
            except Exception as exc:  # noqa: BLE001 - partitioned either way
                log.info("partition of %s: the node was not told (%s)", hsm_id, exc)
        m.partitioned = True
        m.mark_down("partitioned from the daemon")
        self.c._drop_session_objects(m)

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
        async with self.c.lock_for(m.hsm_id):
            if not m.connected and not m.exited():
                try:
                    await m.connect()
                except (HsmsimError, OSError) as exc:
                    m.last_error = str(exc)
        if m.usable:
            self.c.spawn_bg(self.reconcile(m), "reconcile")

    async def set_fault(self, hsm_id: str, **fields: Any) -> dict[str, Any]:
        m = self.member(hsm_id)
        if not m.usable or m.client is None:
            raise ClusterOpError(f"{hsm_id} is not reachable ({m.condition()})")
        result = await self.c.timed(m, m.client.set_fault(**fields))
        if "latency_ms" in fields:
            m.latency_ms = int(fields["latency_ms"])
        if "throttle_rps" in fields:
            m.throttle_rps = int(fields["throttle_rps"])
        return result

    def converging(self) -> bool:
        return any(not m.converged for m in self.c.members.values()
                   if not (m.killed or m.paused or m.partitioned))
