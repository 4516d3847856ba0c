"""The CloudHSMv2 control plane's model: the account's clusters (the daemon's own cluster and
the ones CreateCluster makes, each hosted by this daemon in STATE/clusters/<id>/), their HSMs
as the real node processes report them, backups (the clusters' own backup files), tags and
resource policies. What AWS keeps that a cluster directory does not (subnets, tags, policies,
backup attributes, certificates) is kept in STATE/cloudhsm/plane.json, written atomically.

This file holds that record and the views of clusters and HSMs the API answers with; the work
that changes them is in `lifecycle` (clusters and HSMs), `hosting` (the nested daemons serving
hosted clusters) and `backups`; tags and resource policies are handled in `ops`."""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsmsim.cloudhsm import errors as e
from hsmsim.cluster.cluster import Cluster
from hsmsim.cluster.members import ACTIVE, CREATE_IN_PROGRESS, DEGRADED, DELETE_IN_PROGRESS, Member
from hsmsim.cluster.state import StateDir
from hsmsim.cluster.supervisor import Supervisor
from hsmsim.files import atomic_write
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



def region_of_az(az: str) -> str:
    return az[:-1]


def ts(epoch: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc)


def parse_utc(text: str) -> float:
    try:
        return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=_dt.timezone.utc).timestamp()
    except ValueError:
        return 0.0


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
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
                "primary": True, "region": region, "created": parse_utc(primary.created) or self.clock(),
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
            # The member's own state (`hsmsim status` and ClusterInfo read it too): an HSM
            # being added (CreateHsm, `hsmsim hsm add`) is CREATE_IN_PROGRESS until it has been
            # cloned and reconciled, as on CloudHSM a new HSM holds every key when it is ACTIVE.
            for m in list(c.members.values()):
                state = m.hsm_state
                message = ("HSM is being created" if state == CREATE_IN_PROGRESS
                           else f"HSM is {m.condition()}")
                if state == ACTIVE and not m.usable:
                    state = DEGRADED
                out[m.hsm_id] = self._hsm(cid, rec, m.hsm_id, m.az, state, m.dir, m.address, message)
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

    # -- backup history ----------------------------------------------------------------------------
    def _backup_cluster(self, bid: str) -> str | None:
        """The cluster backup `bid` (or the backup it is a copy of) was taken of, or None."""
        bid = str(self.data["copies"].get(bid, {}).get("source_backup", bid))
        for cid in self.data["clusters"]:
            try:
                meta = json.loads((self.cluster_dir(cid).backups / f"{bid}.json").read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("cluster_id"):
                return str(meta["cluster_id"])
        return None

    def lineage(self, cid: str) -> str:
        """The first cluster of `cid`'s backup history: following SourceBackupId (made from a
        backup of ...) back to a cluster not made from a backup this plane knows."""
        seen = {cid}
        while True:
            rec = self.data["clusters"].get(cid) or {}
            bid = rec.get("source_backup")
            parent = self._backup_cluster(str(bid)) if bid else None
            if parent is None or parent in seen or parent not in self.data["clusters"]:
                return cid
            seen.add(parent)
            cid = parent

    def related(self, a: str, b: str) -> bool:
        """Whether two clusters share a backup history (one was made from a backup of the
        other, or both from backups of a third): on CloudHSM these have the same cluster
        certificate, which is what KMS's UpdateCustomKeyStore compares. FIDELITY: compared
        here by that history, not by the certificates (a cluster made from a backup shows
        its origin's ClusterCertificate, `certificate`)."""
        return a in self.data["clusters"] and b in self.data["clusters"] and \
            self.lineage(a) == self.lineage(b)

    def certificate(self, cid: str, which: str) -> str | None:
        """The cluster's `cluster_cert` or `trust_anchor` (InitializeCluster's): for a cluster
        made from a backup, its backup history's, as CloudHSM restores the cluster certificate
        with the backup."""
        rec = self.data["clusters"].get(cid) or {}
        root = self.data["clusters"].get(self.lineage(cid)) or {}
        value = rec.get(which) or root.get(which)
        if not value and root.get("primary"):
            try:  # the cluster CA `hsmsim up` made stands for both (see `describe`)
                value = self.daemon.state.ca_cert.read_text()
            except OSError:
                pass
        return str(value) if value else None

    def known(self, cid: str, region: str) -> bool:
        """Whether `cid` is a cluster of `region` that has not been deleted (it may have no
        HSM, or not be served now)."""
        rec = self.data["clusters"].get(cid)
        return rec is not None and rec.get("region") == region and rec.get("phase") != "DELETED"

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
        # InitializeCluster's certificate; a restored cluster's origin's; the daemon's own
        # cluster: the cluster CA `hsmsim up` made (the trust anchor KMS custom key stores take)
        cluster_cert = self.certificate(cid, "cluster_cert")
        if cluster_cert:
            certs["ClusterCertificate"] = cluster_cert
        return {
            "BackupPolicy": "DEFAULT",
            "BackupRetentionPolicy": {"Type": "DAYS", "Value": str(rec.get("retention", DEFAULT_RETENTION_DAYS))},
            "ClusterId": cid, "CreateTimestamp": ts(float(rec["created"])),
            "Hsms": self.hsms(cid), "HsmType": rec["hsm_type"], "Mode": rec.get("mode", "FIPS"),
            "SecurityGroup": f"sg-{_hex(cid + 'sg', 17)}", "SourceBackupId": rec.get("source_backup"),
            "State": state, "StateMessage": rec.get("message"),
            "SubnetMapping": dict(rec["subnets"]), "VpcId": f"vpc-{_hex(cid + 'vpc', 17)}",
            "NetworkType": rec.get("network_type", "IPV4"),
            "Certificates": certs or None,
            "TagList": tag_list(self.data["tags"].get(cid, {})) or None,
        }

    def clusters_in(self, region: str) -> list[str]:
        return sorted((cid for cid, rec in self.data["clusters"].items() if rec["region"] == region),
                      key=lambda cid: float(self.data["clusters"][cid]["created"]))

    # -- background work ---------------------------------------------------------------------------
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

