"""The lifecycle of clusters and HSMs behind the CloudHSMv2 operations: CreateCluster (with or
without a source backup), CreateHsm (a member added to a running cluster, or a hosted cluster's
first HSM: a new cluster, the one its last HSM left, or a restore), DeleteHsm,
InitializeCluster (the CSR, the signed certificate and trust anchor) and DeleteCluster.

The work runs in background tasks of the daemon's event loop (`Plane.spawn`), calling the
cluster's supervisor; the states an API caller sees (CREATE_IN_PROGRESS, DELETE_IN_PROGRESS,
INITIALIZE_IN_PROGRESS) are the members' own states, or the plane's `pending`/`transient`
entries, while that runs."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmsim.cloudhsm import backups, hosting
from hsmsim.cloudhsm import errors as e
from hsmsim.cloudhsm.hosting import drop_short_root, short_root
from hsmsim.cloudhsm.plane import AZ_LETTERS, DEFAULT_RETENTION_DAYS, HSM_TYPES, Plane, log
from hsmsim.cluster.backup import create_backup, restore_backup
from hsmsim.cluster.members import CREATE_IN_PROGRESS, DELETE_IN_PROGRESS
from hsmsim.cluster.state import (MAX_HSMS, HsmSpec, StateDir, discard_new_cluster, new_id,
                                  prepare_new_cluster, write_secret)
from hsmsim.files import atomic_write


def create_cluster(p: Plane, region: str, hsm_type: str, subnets: list[str], mode: str,
                   network_type: str, retention: str | None, source_backup: str | None,
                   tags: dict[str, str]) -> str:
    if hsm_type not in HSM_TYPES:
        raise e.InvalidRequest(f"HsmType {hsm_type} is not supported; use one of {', '.join(HSM_TYPES)}.")
    if len(set(subnets)) != len(subnets):
        raise e.InvalidRequest("Each subnet must be in a different Availability Zone.")
    backup_region = None
    if source_backup is not None:
        source_backup = source_backup.rsplit("/", 1)[-1]
        meta = backups.backup_meta(p, source_backup)
        if meta is None:
            raise e.NotFound(f"Backup {source_backup} not found.")
        backup_region = meta["_region"]
        if backup_region != region:
            raise e.NotFound(f"Backup {source_backup} not found.")
        if backups.backup_state(p, source_backup) != "READY":
            raise e.InvalidRequest(f"Backup {source_backup} is not READY.")
        hsm_type, mode = str(meta.get("hsm_type", hsm_type)), str(meta.get("mode", mode))
    cid = new_id("cluster-")
    # FIDELITY: there is no VPC: the subnets are taken as given and mapped, in order, to the
    # Region's Availability Zones a, b, c, ...
    p.data["clusters"][cid] = {
        "region": region, "created": p.clock(), "hsm_type": hsm_type, "mode": mode,
        "phase": "ACTIVE" if source_backup else "UNINITIALIZED",
        "subnets": {region + AZ_LETTERS[i]: s for i, s in enumerate(subnets)},
        "retention": retention or DEFAULT_RETENTION_DAYS, "network_type": network_type,
        "source_backup": source_backup}
    if tags:
        p.data["tags"][cid] = dict(tags)
    p.save()
    return cid


async def create_hsm(p: Plane, cid: str, region: str, az: str) -> dict[str, Any]:
    rec = p.record(cid, region)
    if rec["phase"] == "DELETED":
        raise e.InvalidRequest(f"Cluster {cid} is deleted.")
    if az not in rec["subnets"]:
        raise e.InvalidRequest(f"Availability Zone {az} is not in the subnet mapping of cluster "
                               f"{cid} ({', '.join(sorted(rec['subnets']))}).")
    if p.pending.get(cid):
        raise e.InvalidRequest(f"Cluster {cid} has an HSM being created or deleted; retry when "
                               "it is ACTIVE or DELETED.")
    both = p.cluster_obj(cid)
    if both is not None:
        c, sup = both
        if len(c.members) >= MAX_HSMS:
            raise e.InvalidRequest(f"Cluster {cid} has the maximum of {MAX_HSMS} HSMs.")
        if not (c.routable() or c.usable()):
            raise e.InvalidRequest(f"Cluster {cid} has no healthy HSM to clone the new HSM from.")
        before = set(c.members)
        p.spawn(sup.add_hsm(az), f"CreateHsm in {cid}")
        for _ in range(100):  # add_hsm records the member before its first wait
            await asyncio.sleep(0)
            new = set(c.members) - before
            if new:
                hsm_id = new.pop()
                return next(h for h in p.hsms(cid) if h["HsmId"] == hsm_id)
        raise e.Internal("The HSM could not be created.")
    if rec.get("primary"):
        raise e.InvalidRequest(f"Cluster {cid} is not running.")
    return await _first_hsm(p, cid, rec, az)


async def _first_hsm(p: Plane, cid: str, rec: dict[str, Any], az: str) -> dict[str, Any]:
    """The first HSM of a cluster hosted here: a new cluster directory (or the one its
    last HSM left, or a restore of its source backup), then its nested daemon."""
    sub = p.cluster_dir(cid)
    if sub.exists():
        # The cluster's last HSM was deleted: its token comes back in the new HSM, as
        # CloudHSM restores a cluster's newest backup into it. FIDELITY: the HSM keeps its
        # old id (a node's token is keyed to its HSM id), in the AZ asked for now.
        spec = sub.load_spec()
        hsm_id = str(rec.get("parked") or spec.hsms[0].hsm_id)
        sub.save_spec(spec.with_hsms([HsmSpec(hsm_id, az)]))
    elif rec.get("source_backup"):
        hsm_id = await _restore(p, cid, rec, sub, az)
    else:
        hsm_id = new_id("hsm-")
        new = prepare_new_cluster(sub, [az], 1, None, None)
        spec = replace(new.spec, cluster_id=cid, hsms=(HsmSpec(hsm_id, az),),
                       hsm_type=rec["hsm_type"], mode=rec.get("mode", "FIPS"))
        atomic_write(sub.init_marker, spec.to_json())
        rec["csr"] = _csr(p, cid)
    rec.pop("parked", None)
    p.save()
    p.pending.setdefault(cid, {})[hsm_id] = (az, CREATE_IN_PROGRESS)

    async def run() -> None:
        try:
            await hosting.host(p, cid)
        except BaseException:
            if not sub.exists():
                discard_new_cluster(sub, created_root=True)
            raise
        finally:
            p.pending.get(cid, {}).pop(hsm_id, None)
    p.spawn(run(), f"CreateHsm in {cid}")
    return next(h for h in p.hsms(cid) if h["HsmId"] == hsm_id)


async def _restore(p: Plane, cid: str, rec: dict[str, Any], sub: StateDir, az: str) -> str:
    """A cluster from a backup: the backup's owner restores it into `sub` (its HSMs hand
    over the masking key), then the restored directory is given this cluster's id and one
    HSM, in `az`; its id is returned. FIDELITY: this runs within CreateHsm's request (a
    few seconds), as the HSM's id is its restored token's."""
    bid = str(rec["source_backup"])
    bid = p.data["copies"].get(bid, {}).get("source_backup", bid)
    meta = backups.backup_meta(p, bid)
    if meta is None:
        raise e.NotFound(f"Backup {bid} not found.")
    owner = p.cluster_obj(str(meta.get("cluster_id")))
    if owner is None:
        raise e.InvalidRequest("The backup's cluster is not running; it must hand over the masking key.")
    sub.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = short_root(sub.root, cid)  # the restore's nodes listen there
    await restore_backup(owner[0], p.cluster_dir(str(meta["cluster_id"])), bid, str(target), None)
    spec = sub.load_spec()
    keep = spec.hsms[0].hsm_id
    for h in spec.hsms[1:]:
        shutil.rmtree(sub.node_dir(h.hsm_id), ignore_errors=True)
    sub.save_spec(replace(spec, cluster_id=cid, hsms=(HsmSpec(keep, az),)))
    return keep


async def delete_hsm(p: Plane, cid: str, region: str, hsm_id: str | None, eni: str | None,
                     ip: str | None) -> str:
    rec = p.record(cid, region)
    found = [h for h in p.hsms(cid) if (hsm_id and h["HsmId"] == hsm_id)
             or (eni and h["EniId"] == eni) or (ip and h["EniIp"] == ip)]
    if not (hsm_id or eni or ip):
        raise e.InvalidRequest("Specify HsmId, EniId or EniIp.")
    if not found:
        raise e.NotFound(f"HSM {hsm_id or eni or ip} not found in cluster {cid}.")
    hsm = found[0]
    target = str(hsm["HsmId"])
    if hsm["State"] in (CREATE_IN_PROGRESS, DELETE_IN_PROGRESS):
        raise e.InvalidRequest(f"HSM {target} is {hsm['State']}.")
    both = p.cluster_obj(cid)
    if both is None:
        raise e.InvalidRequest(f"Cluster {cid} is not running.")
    c, sup = both
    if len(c.members) > 1:
        p.spawn(sup.remove_hsm(target), f"DeleteHsm {target}")
        await asyncio.sleep(0)  # remove_hsm marks the member DELETE_IN_PROGRESS at once
        return target
    if rec.get("primary"):
        # FIDELITY: the daemon's own cluster keeps at least one HSM (hsm remove refuses too)
        raise e.InvalidRequest(f"HSM {target} is the last HSM of cluster {cid}, which the "
                               "hsmsim daemon itself serves; it cannot be deleted.")
    p.pending.setdefault(cid, {})[target] = (c.members[target].az, DELETE_IN_PROGRESS)

    async def last() -> None:
        try:
            sub = p.cluster_dir(cid)
            try:  # CloudHSM backs a cluster up when its last HSM goes
                await create_backup(c, sub, reason="last HSM deleted", progress=None)
            except Exception as exc:
                log.warning("backup before deleting the last HSM of %s failed: %s", cid, exc)
            await hosting.unhost(p, cid)
            rec["parked"] = target
            p.save()
        finally:
            p.pending.get(cid, {}).pop(target, None)
    p.spawn(last(), f"DeleteHsm {target}")
    return target



def _spki(key: Any) -> bytes:
    """A public key's DER SubjectPublicKeyInfo: what a certificate and a CSR compare by."""
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))

async def initialize(p: Plane, cid: str, region: str, signed_pem: str, anchor_pem: str) -> str:
    from cryptography import x509
    rec = p.record(cid, region)
    state = p.cluster_state(cid)
    if state != "UNINITIALIZED":
        raise e.InvalidRequest(f"Cluster {cid} is {state}; only an UNINITIALIZED cluster can be initialized.")
    both = p.cluster_obj(cid)
    if both is None or not both[0].usable():
        raise e.InvalidRequest(f"Cluster {cid} has no ACTIVE HSM; create one first.")
    try:
        signed = x509.load_pem_x509_certificate(signed_pem.encode())
        anchor = x509.load_pem_x509_certificate(anchor_pem.encode())
        csr = x509.load_pem_x509_csr(str(rec["csr"]).encode())
    except (ValueError, KeyError):
        raise e.InvalidRequest("SignedCert and TrustAnchor must be PEM certificates.") from None
    if _spki(signed.public_key()) != _spki(csr.public_key()):
        raise e.InvalidRequest("SignedCert does not certify the cluster's CSR.")
    try:
        signed.verify_directly_issued_by(anchor)
    except Exception:
        raise e.InvalidRequest("SignedCert is not signed by TrustAnchor.") from None
    c = both[0]
    p.transient[cid] = "INITIALIZE_IN_PROGRESS"

    async def run() -> None:
        try:
            # every HSM takes part: each must answer before the cluster is INITIALIZED
            for m in list(c.members.values()):
                if m.client is not None:
                    await asyncio.wait_for(m.client.ping(), 30)
            sub = p.cluster_dir(cid)
            write_secret(sub.ca / "customerCA.crt", anchor_pem)
            write_secret(sub.ca / "cluster.crt", signed_pem)
            rec["cluster_cert"], rec["trust_anchor"] = signed_pem, anchor_pem
            rec["phase"] = "INITIALIZED"
            rec["admin_mtime"] = sub.admin_password.stat().st_mtime_ns
            p.save()
        finally:
            p.transient.pop(cid, None)
    p.spawn(run(), f"InitializeCluster {cid}")
    return "INITIALIZE_IN_PROGRESS"


def _csr(p: Plane, cid: str) -> str:
    """The cluster's CSR. FIDELITY: its RSA key is made and kept by the daemon (0600, in
    STATE/cloudhsm/), not inside the HSM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_secret(p.root / "cloudhsm" / "csr" / f"{cid}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"HSM:{cid}:PARTN:0, for FIPS mode"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmsim")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def delete_cluster(p: Plane, cid: str, region: str) -> dict[str, Any]:
    rec = p.record(cid, region)
    if rec["phase"] == "DELETED":
        raise e.InvalidRequest(f"Cluster {cid} is already deleted.")
    if p.hsms(cid) or cid in p.hosted:
        raise e.InvalidRequest(f"Cluster {cid} has HSMs; delete them first.")
    sub = p.cluster_dir(cid)
    # the backups (and the key that opens them) stay, as CloudHSM keeps a deleted
    # cluster's backups; the HSMs' tokens go
    shutil.rmtree(sub.nodes, ignore_errors=True)
    drop_short_root(sub.root, cid)
    rec["phase"] = "DELETED"
    p.save()
    return p.describe(cid)
