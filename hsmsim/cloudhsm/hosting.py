"""The clusters this daemon hosts besides its own (made by CreateCluster, in STATE/clusters/<id>/):
each is served by a nested daemon (cluster, supervisor, control socket, PKCS#11 gateway) in this
process, through a short /tmp path for its Unix sockets."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from hsmsim.cloudhsm.plane import Plane
from hsmsim.cluster.api import ClusterClient, ClusterInfo, HsmInfo


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


async def host(p: Plane, cid: str) -> None:
    """Serve cluster `cid` from this process: a nested daemon (cluster, supervisor, control
    socket STATE/clusters/<id>/control.sock) and its PKCS#11 gateway (gateway.sock there)."""
    from hsmsim.config import resolve_section
    from hsmsim.daemon.main import Daemon, DaemonOptions
    from hsmsim.gateway.config import GatewayConfig
    from hsmsim.gateway.server import start_gateway
    main = p.daemon
    d = Daemon(DaemonOptions(state_dir=short_root(p.cluster_dir(cid).root, cid),
                             cluster_overrides=main.opts.cluster_overrides, services=False),
               main.environ)
    p.hosted[cid] = d
    try:
        await d.start()
        assert d.cluster is not None
        gcfg = resolve_section(GatewayConfig, "gateway", d.file_data, d.environ)
        d.services["gateway"] = await start_gateway(d.cluster, gcfg, d.state.gateway_sock)
        d.endpoints["gateway"] = str(d.state.gateway_sock)
        # One KMS per daemon: its custom key stores take any cluster it serves (kms_cluster);
        # `hsmsim env --state` of a hosted cluster points at the daemon's endpoints
        d.endpoints.update({k: v for k, v in main.endpoints.items() if k in ("kms", "cloudhsm")})
    except BaseException:
        p.hosted.pop(cid, None)
        await d.close()
        raise

    async def watch() -> None:  # `hsmsim down --state STATE/clusters/<id>` stops it
        await d.stopping.wait()
        if p.hosted.get(cid) is d:
            await unhost(p, cid)
    p.spawn(watch(), f"cluster {cid}")


async def unhost(p: Plane, cid: str) -> None:
    """Stop serving `cid`: its nested daemon closes (its nodes stop) even if the caller is
    cancelled meanwhile (the close runs in its own task, which `closing` keeps for the
    endpoint's own close to wait for)."""
    d = p.hosted.pop(cid, None)
    if d is not None:
        t = asyncio.get_running_loop().create_task(d.close())
        p.closing.add(t)
        t.add_done_callback(p.closing.discard)
        try:
            await asyncio.shield(t)
        finally:
            drop_short_root(p.cluster_dir(cid).root, cid)
    else:
        drop_short_root(p.cluster_dir(cid).root, cid)


def served(p: Plane, cid: str) -> ClusterClient | None:
    """The cluster object serving hosted cluster `cid` now (None: stopped, deleted, unknown)."""
    if cid == p.primary_id:
        return None
    d = p.hosted.get(cid)
    return d.cluster if d is not None else None


async def kms_cluster(p: Plane, cid: str, region: str) -> tuple[ClusterClient, ClusterInfo] | None:
    """What KMS custom key stores see of hosted cluster `cid` in `region`: the cluster serving
    it and the plane's view (the state and HSM states DescribeClusters shows, the trust anchor
    given to InitializeCluster). None for the daemon's own cluster (the KMS asks it directly),
    another Region's, or one not served."""
    rec = p.data["clusters"].get(cid)
    client = served(p, cid)
    if rec is None or rec.get("region") != region or client is None:
        return None
    hsms = tuple(HsmInfo(str(h["HsmId"]), str(h["AvailabilityZone"]), str(h["State"]), 0, 0, None)
                 for h in p.hsms(cid))
    anchor = p.certificate(cid, "trust_anchor") or ""  # a restored cluster: its origin's
    return client, ClusterInfo(cid, p.cluster_state(cid), hsms, anchor.encode())
