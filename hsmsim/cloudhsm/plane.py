"""The CloudHSMv2 control plane's model: the account's clusters (the daemon's own cluster and
the ones CreateCluster makes, each hosted by this daemon in STATE/clusters/<id>/), their HSMs
as the real node processes report them, backups (the clusters' own backup files), tags and
resource policies. What AWS keeps that a cluster directory does not (subnets, tags, policies,
backup attributes, certificates) is kept in STATE/cloudhsm/plane.json, written atomically.

Lifecycle work (starting nodes, cloning, removing) runs in background tasks of the daemon's
event loop, calling the cluster's supervisor; the states an API caller sees
(CREATE_IN_PROGRESS, DELETE_IN_PROGRESS, ...) are the members' own states while that runs."""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsmsim.cloudhsm import errors as e
from hsmsim.cluster.backup import create_backup, list_backups, restore_backup
from hsmsim.cluster.cluster import Cluster
from hsmsim.cluster.members import ACTIVE, CREATE_IN_PROGRESS, DEGRADED, DELETE_IN_PROGRESS, Member
from hsmsim.cluster.state import (MAX_HSMS, ClusterSpec, HsmSpec, StateDir, atomic_write,
                                  discard_new_cluster, new_id, prepare_new_cluster, write_secret)
from hsmsim.cluster.supervisor import Supervisor
from hsmsim.node import direct_tls

if TYPE_CHECKING:
    from hsmsim.daemon.main import Daemon

log = logging.getLogger("hsmsim.cloudhsm")

# FIDELITY: every resource belongs to this one account (the KMS's default account id).
ACCOUNT = "111122223333"
HSM_TYPES = ("hsm1.medium", "hsm2m.medium")
PENDING_DELETION_DAYS = 7  # DeleteBackup: the backup is deleted 7 days later (RestoreBackup undoes it)
DEFAULT_RETENTION_DAYS = "90"
MAX_TAGS = 50
AZ_LETTERS = "abcdefghij"


def _hex(seed: str, n: int) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:n]


def subnet_for(cluster_id: str, az: str) -> str:
    return f"subnet-{_hex(cluster_id + az, 17)}"


def eni_id(hsm_id: str) -> str:
    return f"eni-{_hex(hsm_id, 17)}"


def eni_ip(node_dir: Path, address: str, hsm_id: str) -> str:
    """The HSM's ENI address: the host of the node's direct TLS listener (`direct.addr`: by
    default the HSM's own loopback address 127.A.B.C, port 2223, where Client SDK 5 would
    connect to its ENI), else of its TCP node listener. FIDELITY: a node with neither (direct
    TLS off, nodes on Unix sockets) is given that same derived loopback address, which
    identifies it (DeleteHsm --eni-ip) but on which nothing listens."""
    for where in (direct_tls.read_address(node_dir) or "", address):
        kind, _, rest = where.partition(":")
        if kind in ("tls", "tcp"):
            host = rest.rsplit(":", 1)[0].strip("[]")
            if host.count(".") == 3:
                return host
    return direct_tls.loopback_ip(hsm_id)


def short_root(real: Path, cid: str) -> Path:
    """The path a hosted cluster is served from: `/tmp/hsmsim-<uid>/<cluster id>`, a link to
    its directory STATE/clusters/<id>, because a Unix socket path has at most 107 bytes and
    the node sockets under STATE/clusters/<id>/nodes/ pass that in most places a state
    directory lives. The link's directory must be ours and private, else the real path is
    used."""
    base = Path(f"/tmp/hsmsim-{os.getuid()}")
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = base.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return real
        link = base / cid
        if link.is_symlink() and os.readlink(link) == str(real):
            return link
        if link.exists() and not link.is_symlink():
            return real
        tmp = base / f".{cid}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(real)
        os.replace(tmp, link)
        return link
    except OSError:
        return real


def drop_short_root(real: Path, cid: str) -> None:
    link = Path(f"/tmp/hsmsim-{os.getuid()}") / cid
    try:
        if link.is_symlink() and os.readlink(link) == str(real):
            link.unlink()
    except OSError:
        pass


def region_of_az(az: str) -> str:
    return az[:-1]


def _ts(epoch: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc)


def _parse_utc(text: str) -> float:
    try:
        return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=_dt.timezone.utc).timestamp()
    except ValueError:
        return 0.0


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


class Plane:
    """The account's CloudHSM resources; one per daemon (`daemon` hosts the first cluster)."""

    def __init__(self, daemon: "Daemon") -> None:
        assert daemon.cluster is not None and daemon.supervisor is not None
        self.daemon = daemon
        self.root = daemon.state.root
        self.file = self.root / "cloudhsm" / "plane.json"
        self.clock: Callable[[], float] = time.time  # injectable: the 7-day deletion in tests
        self.hosted: dict[str, "Daemon"] = {}  # cluster id -> nested daemon serving it
        # HSMs being created or deleted that no cluster member stands for (yet / any more):
        # cluster id -> HSM id -> (AZ, state)
        self.pending: dict[str, dict[str, tuple[str, str]]] = {}
        self.transient: dict[str, str] = {}  # cluster id -> INITIALIZE_IN_PROGRESS
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closing: set[asyncio.Task[None]] = set()  # nested daemons being closed
        self.lock = asyncio.Lock()  # one API change at a time
        self.data: dict[str, Any] = self._load()
        primary = daemon.cluster.spec
        if primary.cluster_id not in self.data["clusters"]:
            region = region_of_az(primary.hsms[0].az) if primary.hsms else "us-east-1"
            azs = sorted({h.az for h in primary.hsms} | {region + x for x in "abc"})
            self.data["clusters"][primary.cluster_id] = {
                "primary": True, "region": region, "created": _parse_utc(primary.created) or self.clock(),
                "hsm_type": primary.hsm_type, "mode": primary.mode, "phase": "ACTIVE",
                "subnets": {az: subnet_for(primary.cluster_id, az) for az in azs},
                "retention": DEFAULT_RETENTION_DAYS, "network_type": "IPV4",
                "source_backup": primary.source_backup_id}
            self.save()

    # -- persistence -----------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.file.read_bytes())
            if isinstance(data, dict):
                for k in ("clusters", "tags", "backups", "copies", "policies"):
                    data.setdefault(k, {})
                return data
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            aside = self.file.with_name(f"plane.json.unreadable-{int(time.time())}")
            try:  # kept for the user to repair; the hosted clusters' directories stay as they are
                os.replace(self.file, aside)
            except OSError:
                pass
            log.error("%s is unreadable (%s); moved to %s, starting a new control-plane record",
                      self.file, exc, aside.name)
        return {"clusters": {}, "tags": {}, "backups": {}, "copies": {}, "policies": {}}

    def save(self) -> None:
        atomic_write(self.file, (json.dumps(self.data, indent=1, sort_keys=True) + "\n").encode())

    # -- clusters ----------------------------------------------------------------------------------
    @property
    def primary_id(self) -> str:
        assert self.daemon.cluster is not None
        return self.daemon.cluster.spec.cluster_id

    def cluster_dir(self, cid: str) -> StateDir:
        if cid == self.primary_id:
            return self.daemon.state
        return StateDir(self.root / "clusters" / cid)

    def record(self, cid: str, region: str) -> dict[str, Any]:
        rec = self.data["clusters"].get(cid)
        if rec is None or rec["region"] != region:
            raise e.NotFound(f"Cluster {cid} not found.")
        assert isinstance(rec, dict)
        return rec

    def cluster_obj(self, cid: str) -> tuple[Cluster, Supervisor] | None:
        if cid == self.primary_id:
            d = self.daemon
        else:
            hosted = self.hosted.get(cid)
            if hosted is None:
                return None
            d = hosted
        if d.cluster is None or d.supervisor is None:
            return None
        return d.cluster, d.supervisor

    def hsms(self, cid: str) -> list[dict[str, Any]]:
        rec = self.data["clusters"][cid]
        out: dict[str, dict[str, Any]] = {}
        both = self.cluster_obj(cid)
        if both is not None:
            c = both[0]
            for m in list(c.members.values()):
                state = m.hsm_state
                if state == ACTIVE and not m.usable:
                    state = DEGRADED
                out[m.hsm_id] = self._hsm(cid, rec, m.hsm_id, m.az, state, m.dir, m.address,
                                          f"HSM is {m.condition()}")
        elif rec.get("phase") != "DELETED" and not rec.get("parked"):
            state_dir = self.cluster_dir(cid)
            if state_dir.exists():
                try:
                    spec = state_dir.load_spec()
                except Exception:
                    spec = None
                for h in spec.hsms if spec else ():
                    m = Member(h.hsm_id, h.az, state_dir)
                    out[h.hsm_id] = self._hsm(cid, rec, h.hsm_id, h.az, DEGRADED, m.dir, m.address,
                                              "HSM is not running (its cluster was stopped)")
        for hsm_id, (az, state) in self.pending.get(cid, {}).items():
            if hsm_id not in out or state == DELETE_IN_PROGRESS:
                out[hsm_id] = self._hsm(cid, rec, hsm_id, az, state, self.cluster_dir(cid).node_dir(hsm_id),
                                        f"unix:{self.cluster_dir(cid).node_socket(hsm_id)}",
                                        "HSM is being created" if state == CREATE_IN_PROGRESS
                                        else "HSM is being deleted")
        return list(out.values())

    def _hsm(self, cid: str, rec: dict[str, Any], hsm_id: str, az: str, state: str, node_dir: Path,
             address: str, message: str) -> dict[str, Any]:
        return {"AvailabilityZone": az, "ClusterId": cid,
                "SubnetId": rec["subnets"].get(az, subnet_for(cid, az)),
                "EniId": eni_id(hsm_id), "EniIp": eni_ip(node_dir, address, hsm_id), "HsmType": rec["hsm_type"],
                "HsmId": hsm_id, "State": state, "StateMessage": message}

    def cluster_state(self, cid: str) -> str:
        rec = self.data["clusters"][cid]
        if cid in self.transient:
            return self.transient[cid]
        phase = str(rec["phase"])
        if rec.get("primary"):
            c = self.daemon.cluster
            assert c is not None
            return c.cluster_state()  # ACTIVE, or DEGRADED while an HSM is down or catching up
        if phase == "INITIALIZED" and self._activated(cid, rec):
            rec["phase"] = phase = "ACTIVE"
            self.save()
        return phase

    def _activated(self, cid: str, rec: dict[str, Any]) -> bool:
        """CloudHSM's `cluster activate` sets the admin's password; here the cluster is ACTIVE
        once the admin's password changed after initialisation (`hsmsim user change-password
        --username admin --state STATE/clusters/<id>`), seen as a newer password file."""
        try:
            mtime = self.cluster_dir(cid).admin_password.stat().st_mtime_ns
        except OSError:
            return False
        return mtime > int(rec.get("admin_mtime", 0))

    def describe(self, cid: str) -> dict[str, Any]:
        rec = self.data["clusters"][cid]
        state = self.cluster_state(cid)
        certs: dict[str, str] = {}
        if state == "UNINITIALIZED" and rec.get("csr"):
            certs["ClusterCsr"] = rec["csr"]
        if rec.get("cluster_cert"):
            certs["ClusterCertificate"] = rec["cluster_cert"]
        elif rec.get("primary"):
            try:  # the cluster CA `hsmsim up` made: the trust anchor KMS custom key stores take
                certs["ClusterCertificate"] = self.daemon.state.ca_cert.read_text()
            except OSError:
                pass
        return {
            "BackupPolicy": "DEFAULT",
            "BackupRetentionPolicy": {"Type": "DAYS", "Value": str(rec.get("retention", DEFAULT_RETENTION_DAYS))},
            "ClusterId": cid, "CreateTimestamp": _ts(float(rec["created"])),
            "Hsms": self.hsms(cid), "HsmType": rec["hsm_type"], "Mode": rec.get("mode", "FIPS"),
            "SecurityGroup": f"sg-{_hex(cid + 'sg', 17)}", "SourceBackupId": rec.get("source_backup"),
            "State": state, "StateMessage": rec.get("message"),
            "SubnetMapping": dict(rec["subnets"]), "VpcId": f"vpc-{_hex(cid + 'vpc', 17)}",
            "NetworkType": rec.get("network_type", "IPV4"),
            "Certificates": certs or None,
            "TagList": _tag_list(self.data["tags"].get(cid, {})) or None,
        }

    def clusters_in(self, region: str) -> list[str]:
        return sorted((cid for cid, rec in self.data["clusters"].items() if rec["region"] == region),
                      key=lambda cid: float(self.data["clusters"][cid]["created"]))

    def create_cluster(self, region: str, hsm_type: str, subnets: list[str], mode: str,
                       network_type: str, retention: str | None, source_backup: str | None,
                       tags: dict[str, str]) -> str:
        if hsm_type not in HSM_TYPES:
            raise e.InvalidRequest(f"HsmType {hsm_type} is not supported; use one of {', '.join(HSM_TYPES)}.")
        if len(set(subnets)) != len(subnets):
            raise e.InvalidRequest("Each subnet must be in a different Availability Zone.")
        backup_region = None
        if source_backup is not None:
            source_backup = source_backup.rsplit("/", 1)[-1]
            meta = self.backup_meta(source_backup)
            if meta is None:
                raise e.NotFound(f"Backup {source_backup} not found.")
            backup_region = meta["_region"]
            if backup_region != region:
                raise e.NotFound(f"Backup {source_backup} not found.")
            if self.backup_state(source_backup) != "READY":
                raise e.InvalidRequest(f"Backup {source_backup} is not READY.")
            hsm_type, mode = str(meta.get("hsm_type", hsm_type)), str(meta.get("mode", mode))
        cid = new_id("cluster-")
        # FIDELITY: there is no VPC: the subnets are taken as given and mapped, in order, to the
        # Region's Availability Zones a, b, c, ...
        self.data["clusters"][cid] = {
            "region": region, "created": self.clock(), "hsm_type": hsm_type, "mode": mode,
            "phase": "ACTIVE" if source_backup else "UNINITIALIZED",
            "subnets": {region + AZ_LETTERS[i]: s for i, s in enumerate(subnets)},
            "retention": retention or DEFAULT_RETENTION_DAYS, "network_type": network_type,
            "source_backup": source_backup}
        if tags:
            self.data["tags"][cid] = dict(tags)
        self.save()
        return cid

    # -- HSMs --------------------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("%s failed: %s", what, exc)
        t = asyncio.get_running_loop().create_task(run())
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def create_hsm(self, cid: str, region: str, az: str) -> dict[str, Any]:
        rec = self.record(cid, region)
        if rec["phase"] == "DELETED":
            raise e.InvalidRequest(f"Cluster {cid} is deleted.")
        if az not in rec["subnets"]:
            raise e.InvalidRequest(f"Availability Zone {az} is not in the subnet mapping of cluster "
                                   f"{cid} ({', '.join(sorted(rec['subnets']))}).")
        if self.pending.get(cid):
            raise e.InvalidRequest(f"Cluster {cid} has an HSM being created or deleted; retry when "
                                   "it is ACTIVE or DELETED.")
        both = self.cluster_obj(cid)
        if both is not None:
            c, sup = both
            if len(c.members) >= MAX_HSMS:
                raise e.InvalidRequest(f"Cluster {cid} has the maximum of {MAX_HSMS} HSMs.")
            if not (c.routable() or c.usable()):
                raise e.InvalidRequest(f"Cluster {cid} has no healthy HSM to clone the new HSM from.")
            before = set(c.members)
            self.spawn(sup.add_hsm(az), f"CreateHsm in {cid}")
            for _ in range(100):  # add_hsm records the member before its first wait
                await asyncio.sleep(0)
                new = set(c.members) - before
                if new:
                    hsm_id = new.pop()
                    return next(h for h in self.hsms(cid) if h["HsmId"] == hsm_id)
            raise e.Internal("The HSM could not be created.")
        if rec.get("primary"):
            raise e.InvalidRequest(f"Cluster {cid} is not running.")
        return await self._first_hsm(cid, rec, az)

    async def _first_hsm(self, cid: str, rec: dict[str, Any], az: str) -> dict[str, Any]:
        """The first HSM of a cluster hosted here: a new cluster directory (or the one its
        last HSM left, or a restore of its source backup), then its nested daemon."""
        sub = self.cluster_dir(cid)
        if sub.exists():
            # The cluster's last HSM was deleted: its token comes back in the new HSM, as
            # CloudHSM restores a cluster's newest backup into it. FIDELITY: the HSM keeps its
            # old id (a node's token is keyed to its HSM id), in the AZ asked for now.
            spec = sub.load_spec()
            hsm_id = str(rec.get("parked") or spec.hsms[0].hsm_id)
            sub.save_spec(spec.with_hsms([HsmSpec(hsm_id, az)]))
        elif rec.get("source_backup"):
            hsm_id = await self._restore(cid, rec, sub, az)
        else:
            hsm_id = new_id("hsm-")
            new = prepare_new_cluster(sub, [az], 1, None, None)
            spec = replace(new.spec, cluster_id=cid, hsms=(HsmSpec(hsm_id, az),),
                           hsm_type=rec["hsm_type"], mode=rec.get("mode", "FIPS"))
            atomic_write(sub.init_marker, spec.to_json())
            rec["csr"] = self._csr(cid)
        rec.pop("parked", None)
        self.save()
        self.pending.setdefault(cid, {})[hsm_id] = (az, CREATE_IN_PROGRESS)

        async def run() -> None:
            try:
                await self.host(cid)
            except BaseException:
                if not sub.exists():
                    discard_new_cluster(sub, created_root=True)
                raise
            finally:
                self.pending.get(cid, {}).pop(hsm_id, None)
        self.spawn(run(), f"CreateHsm in {cid}")
        return next(h for h in self.hsms(cid) if h["HsmId"] == hsm_id)

    async def _restore(self, cid: str, rec: dict[str, Any], sub: StateDir, az: str) -> str:
        """A cluster from a backup: the backup's owner restores it into `sub` (its HSMs hand
        over the masking key), then the restored directory is given this cluster's id and one
        HSM, in `az`; its id is returned. FIDELITY: this runs within CreateHsm's request (a
        few seconds), as the HSM's id is its restored token's."""
        bid = str(rec["source_backup"])
        bid = self.data["copies"].get(bid, {}).get("source_backup", bid)
        meta = self.backup_meta(bid)
        if meta is None:
            raise e.NotFound(f"Backup {bid} not found.")
        owner = self.cluster_obj(str(meta.get("cluster_id")))
        if owner is None:
            raise e.InvalidRequest("The backup's cluster is not running; it must hand over the masking key.")
        sub.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = short_root(sub.root, cid)  # the restore's nodes listen there
        await restore_backup(owner[0], self.cluster_dir(str(meta["cluster_id"])), bid, str(target), None)
        spec = sub.load_spec()
        keep = spec.hsms[0].hsm_id
        for h in spec.hsms[1:]:
            shutil.rmtree(sub.node_dir(h.hsm_id), ignore_errors=True)
        sub.save_spec(replace(spec, cluster_id=cid, hsms=(HsmSpec(keep, az),)))
        return keep

    async def host(self, cid: str) -> None:
        """Serve cluster `cid` from this process: a nested daemon (cluster, supervisor, control
        socket STATE/clusters/<id>/control.sock) and its PKCS#11 gateway (gateway.sock there)."""
        from hsmsim.config import resolve_section
        from hsmsim.daemon.main import Daemon, DaemonOptions
        from hsmsim.gateway.config import GatewayConfig
        from hsmsim.gateway.server import start_gateway
        main = self.daemon
        d = Daemon(DaemonOptions(state_dir=short_root(self.cluster_dir(cid).root, cid),
                                 cluster_overrides=main.opts.cluster_overrides, services=False),
                   main.environ)
        self.hosted[cid] = d
        try:
            await d.start()
            assert d.cluster is not None
            gcfg = resolve_section(GatewayConfig, "gateway", d.file_data, d.environ)
            d.services["gateway"] = await start_gateway(d.cluster, gcfg, d.state.gateway_sock)
            d.endpoints["gateway"] = str(d.state.gateway_sock)
            # FIDELITY: one KMS per daemon: custom key stores take the daemon's own cluster;
            # `hsmsim env --state` of a hosted cluster points at the daemon's endpoints
            d.endpoints.update({k: v for k, v in main.endpoints.items() if k in ("kms", "cloudhsm")})
        except BaseException:
            self.hosted.pop(cid, None)
            await d.close()
            raise

        async def watch() -> None:  # `hsmsim down --state STATE/clusters/<id>` stops it
            await d.stopping.wait()
            if self.hosted.get(cid) is d:
                await self.unhost(cid)
        self.spawn(watch(), f"cluster {cid}")

    async def unhost(self, cid: str) -> None:
        """Stop serving `cid`: its nested daemon closes (its nodes stop) even if the caller is
        cancelled meanwhile (the close runs in its own task, which `closing` keeps for the
        endpoint's own close to wait for)."""
        d = self.hosted.pop(cid, None)
        if d is not None:
            t = asyncio.get_running_loop().create_task(d.close())
            self.closing.add(t)
            t.add_done_callback(self.closing.discard)
            try:
                await asyncio.shield(t)
            finally:
                drop_short_root(self.cluster_dir(cid).root, cid)
        else:
            drop_short_root(self.cluster_dir(cid).root, cid)

    async def delete_hsm(self, cid: str, region: str, hsm_id: str | None, eni: str | None,
                         ip: str | None) -> str:
        rec = self.record(cid, region)
        found = [h for h in self.hsms(cid) if (hsm_id and h["HsmId"] == hsm_id)
                 or (eni and h["EniId"] == eni) or (ip and h["EniIp"] == ip)]
        if not (hsm_id or eni or ip):
            raise e.InvalidRequest("Specify HsmId, EniId or EniIp.")
        if not found:
            raise e.NotFound(f"HSM {hsm_id or eni or ip} not found in cluster {cid}.")
        hsm = found[0]
        target = str(hsm["HsmId"])
        if hsm["State"] in (CREATE_IN_PROGRESS, DELETE_IN_PROGRESS):
            raise e.InvalidRequest(f"HSM {target} is {hsm['State']}.")
        both = self.cluster_obj(cid)
        if both is None:
            raise e.InvalidRequest(f"Cluster {cid} is not running.")
        c, sup = both
        if len(c.members) > 1:
            self.spawn(sup.remove_hsm(target), f"DeleteHsm {target}")
            await asyncio.sleep(0)  # remove_hsm marks the member DELETE_IN_PROGRESS at once
            return target
        if rec.get("primary"):
            # FIDELITY: the daemon's own cluster keeps at least one HSM (hsm remove refuses too)
            raise e.InvalidRequest(f"HSM {target} is the last HSM of cluster {cid}, which the "
                                   "hsmsim daemon itself serves; it cannot be deleted.")
        self.pending.setdefault(cid, {})[target] = (c.members[target].az, DELETE_IN_PROGRESS)

        async def last() -> None:
            try:
                sub = self.cluster_dir(cid)
                try:  # CloudHSM backs a cluster up when its last HSM goes
                    await create_backup(c, sub, reason="last HSM deleted", progress=None)
                except Exception as exc:
                    log.warning("backup before deleting the last HSM of %s failed: %s", cid, exc)
                await self.unhost(cid)
                rec["parked"] = target
                self.save()
            finally:
                self.pending.get(cid, {}).pop(target, None)
        self.spawn(last(), f"DeleteHsm {target}")
        return target

    async def initialize(self, cid: str, region: str, signed_pem: str, anchor_pem: str) -> str:
        from cryptography import x509
        rec = self.record(cid, region)
        state = self.cluster_state(cid)
        if state != "UNINITIALIZED":
            raise e.InvalidRequest(f"Cluster {cid} is {state}; only an UNINITIALIZED cluster can be initialized.")
        both = self.cluster_obj(cid)
        if both is None or not both[0].usable():
            raise e.InvalidRequest(f"Cluster {cid} has no ACTIVE HSM; create one first.")
        try:
            signed = x509.load_pem_x509_certificate(signed_pem.encode())
            anchor = x509.load_pem_x509_certificate(anchor_pem.encode())
            csr = x509.load_pem_x509_csr(str(rec["csr"]).encode())
        except (ValueError, KeyError):
            raise e.InvalidRequest("SignedCert and TrustAnchor must be PEM certificates.") from None
        if signed.public_key().public_numbers() != csr.public_key().public_numbers():  # type: ignore[union-attr]
            raise e.InvalidRequest("SignedCert does not certify the cluster's CSR.")
        try:
            signed.verify_directly_issued_by(anchor)
        except Exception:
            raise e.InvalidRequest("SignedCert is not signed by TrustAnchor.") from None
        c = both[0]
        self.transient[cid] = "INITIALIZE_IN_PROGRESS"

        async def run() -> None:
            try:
                # every HSM takes part: each must answer before the cluster is INITIALIZED
                for m in list(c.members.values()):
                    if m.client is not None:
                        await asyncio.wait_for(m.client.ping(), 30)
                sub = self.cluster_dir(cid)
                write_secret(sub.ca / "customerCA.crt", anchor_pem)
                write_secret(sub.ca / "cluster.crt", signed_pem)
                rec["cluster_cert"], rec["trust_anchor"] = signed_pem, anchor_pem
                rec["phase"] = "INITIALIZED"
                rec["admin_mtime"] = sub.admin_password.stat().st_mtime_ns
                self.save()
            finally:
                self.transient.pop(cid, None)
        self.spawn(run(), f"InitializeCluster {cid}")
        return "INITIALIZE_IN_PROGRESS"

    def _csr(self, cid: str) -> str:
        """The cluster's CSR. FIDELITY: its RSA key is made and kept by the daemon (0600, in
        STATE/cloudhsm/), not inside the HSM."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_secret(self.root / "cloudhsm" / "csr" / f"{cid}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"HSM:{cid}:PARTN:0, for FIPS mode"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmsim")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    async def delete_cluster(self, cid: str, region: str) -> dict[str, Any]:
        rec = self.record(cid, region)
        if rec["phase"] == "DELETED":
            raise e.InvalidRequest(f"Cluster {cid} is already deleted.")
        if self.hsms(cid) or cid in self.hosted:
            raise e.InvalidRequest(f"Cluster {cid} has HSMs; delete them first.")
        sub = self.cluster_dir(cid)
        # the backups (and the key that opens them) stay, as CloudHSM keeps a deleted
        # cluster's backups; the HSMs' tokens go
        shutil.rmtree(sub.nodes, ignore_errors=True)
        drop_short_root(sub.root, cid)
        rec["phase"] = "DELETED"
        self.save()
        return self.describe(cid)

    # -- backups -----------------------------------------------------------------------------------
    def _all_backups(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for cid, rec in self.data["clusters"].items():
            for meta in list_backups(self.cluster_dir(cid)):
                if meta.get("state") == "CORRUPT":
                    continue
                meta = dict(meta)
                meta["_region"], meta["_owner"] = rec["region"], cid
                try:  # `created` has whole seconds; the file's time orders backups of one second
                    meta["_order"] = (self.cluster_dir(cid).backups / f"{meta['backup_id']}.json").stat().st_mtime_ns
                except OSError:
                    meta["_order"] = 0
                out[str(meta["backup_id"])] = meta
        for bid, copy in self.data["copies"].items():
            src = out.get(str(copy["source_backup"]))
            if src is None:
                continue
            out[bid] = {**src, "backup_id": bid, "_region": copy["region"], "_copy": copy}
        return out

    def backup_meta(self, bid: str) -> dict[str, Any] | None:
        return self._all_backups().get(bid)

    def backup_state(self, bid: str) -> str:
        return "PENDING_DELETION" if self.data["backups"].get(bid, {}).get("deleted_at") else "READY"

    def backup_view(self, meta: dict[str, Any]) -> dict[str, Any]:
        bid = str(meta["backup_id"])
        attrs = self.data["backups"].get(bid, {})
        copy = meta.get("_copy")
        deleted = attrs.get("deleted_at")
        view: dict[str, Any] = {
            "BackupId": bid, "BackupArn": f"arn:aws:cloudhsm:{meta['_region']}:{ACCOUNT}:backup/{bid}",
            "BackupState": self.backup_state(bid), "ClusterId": meta.get("cluster_id"),
            "CreateTimestamp": _ts(_parse_utc(str(meta.get("created", "")))),
            "NeverExpires": bool(attrs.get("never_expires", False)),
            "HsmType": meta.get("hsm_type"), "Mode": meta.get("mode"),
            # when the backup will be gone for good: 7 days after DeleteBackup
            "DeleteTimestamp": _ts(float(deleted) + PENDING_DELETION_DAYS * 86400) if deleted else None,
            "TagList": _tag_list(self.data["tags"].get(bid, {})) or None}
        if copy is not None:
            view.update({"CopyTimestamp": _ts(float(copy["created"])), "SourceRegion": copy["source_region"],
                         "SourceBackup": copy["source_backup"], "SourceCluster": copy["source_cluster"]})
        return view

    def backups_in(self, region: str) -> list[dict[str, Any]]:
        self.sweep()
        return [m for m in self._all_backups().values() if m["_region"] == region]

    def backup(self, bid: str, region: str) -> dict[str, Any]:
        meta = self.backup_meta(bid)
        if meta is None or meta["_region"] != region:
            raise e.NotFound(f"Backup {bid} not found.")
        return meta

    def sweep(self) -> list[str]:
        """Backups whose 7 days of pending deletion are over, and READY backups past their
        cluster's retention (never the cluster's newest, never one that NeverExpires), are
        deleted. Runs before every backup operation."""
        now = self.clock()
        gone = []
        metas = self._all_backups()
        newest: dict[str, str] = {}
        for bid, meta in sorted(metas.items(), key=lambda kv: (str(kv[1].get("created", "")),
                                                              kv[1].get("_order", 0))):
            if "_copy" not in meta:
                newest[str(meta["_owner"])] = bid
        for bid, meta in metas.items():
            attrs = self.data["backups"].get(bid, {})
            deleted = attrs.get("deleted_at")
            rec = self.data["clusters"].get(str(meta["_owner"]), {})
            if deleted is not None:
                expired = now >= float(deleted) + PENDING_DELETION_DAYS * 86400
            else:
                days = int(rec.get("retention", DEFAULT_RETENTION_DAYS))
                expired = (not attrs.get("never_expires") and newest.get(str(meta["_owner"])) != bid
                           and now >= _parse_utc(str(meta.get("created", ""))) + days * 86400)
            if expired:
                self._remove_backup(bid, meta)
                gone.append(bid)
        if gone:
            self.save()
        return gone

    def _remove_backup(self, bid: str, meta: dict[str, Any]) -> None:
        if "_copy" in meta:
            self.data["copies"].pop(bid, None)
        else:
            backups = self.cluster_dir(str(meta["_owner"])).backups
            for suffix in (".bak", ".json"):
                (backups / f"{bid}{suffix}").unlink(missing_ok=True)
        self.data["backups"].pop(bid, None)
        self.data["tags"].pop(bid, None)
        for arn in [a for a in self.data["policies"] if a.endswith("/" + bid)]:
            self.data["policies"].pop(arn)


def page(items: list[Any], token: str | None, size: int, kind: str) -> tuple[list[Any], str | None]:
    """One page of `items` and the token of the next (opaque: base64 of the offset)."""
    start = 0
    if token:
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
            start = int(data["o"])
            if data["k"] != kind or start < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise e.InvalidRequest("The NextToken is not valid.") from None
    end = start + size
    nxt = (base64.urlsafe_b64encode(json.dumps({"k": kind, "o": end}).encode()).decode()
           if end < len(items) else None)
    return items[start:end], nxt

