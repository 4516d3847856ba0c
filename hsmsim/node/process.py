"""One HSM node process: lays out its state directory, renders softhsm2.conf, points
SOFTHSM2_CONF at it (this process only), opens or initialises the token, recovers the
index, and serves the node protocol until SIGTERM/SIGINT.

Prints `READY <address>` on stdout once it accepts connections. Exits with status
`files.EXIT_NO_SPACE` when it cannot start because its disk is full (the daemon then waits for
space instead of replacing the HSM as damaged)."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import logging
import os
import re
import signal
import sqlite3
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from hsmsim import aio, files
from hsmsim.errors import ConfigError, HsmsimError
from hsmsim.node import direct_tls
from hsmsim.node.audit import AuditLog
from hsmsim.node.config import NodeConfig
from hsmsim.node.index import IndexStore
from hsmsim.node.keystore import Keystore, Quotas, remove_debris
from hsmsim.node.server import NodeServer
from hsmsim.node.service import NodeService
from hsmsim.node.softhsm import SoftHsm
from hsmsim.node.tls import server_context
from hsmsim.node.users import UserStore
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.resources import softhsm_library, softhsm_template

log = logging.getLogger("hsmsim.node")
HSM_ID = re.compile(r"^hsm-[a-z0-9]{11}$")
INIT_MODES = ("new", "clone")


@dataclass(frozen=True)
class NodeOptions:
    state: Path  # the cluster's state directory ($HSMSIM_HOME)
    hsm_id: str
    az: str
    listen: str
    cluster_secret_file: Path
    init: str | None = None  # "new" | "clone" on first start; ignored afterwards
    tls_ca: Path | None = None  # mutual TLS on tcp: listeners (all three or none)
    tls_cert: Path | None = None
    tls_key: Path | None = None


def node_dir(state: Path, hsm_id: str) -> Path:
    return state / "nodes" / hsm_id


def token_pins(secret: bytes, hsm_id: str) -> tuple[bytes, bytes]:
    """SO and user PINs of this node's SoftHSM2 token, derived from the cluster secret.
    FIDELITY: a real HSM's partition credentials are its own; here they follow from the
    cluster secret so that no extra secret file is needed."""
    def pin(kind: str) -> bytes:
        return hmac.new(secret, f"hsmsim-token-{kind}:{hsm_id}".encode(),
                        hashlib.sha256).hexdigest()[:32].encode()
    return pin("so"), pin("user")


def render_softhsm_conf(ndir: Path, level: str) -> Path:
    tokens = files.make_dir(ndir / "tokens", parents=False)
    text = softhsm_template().read_text()
    text = text.replace("@TOKENDIR@", str(tokens)).replace("@LOGLEVEL@", level)
    conf = ndir / "softhsm2.conf"
    try:
        if conf.read_text() == text:
            os.chmod(conf, files.PRIVATE_FILE)
            return conf  # unchanged: no write needed (a node must start on a full disk)
    except (OSError, UnicodeDecodeError):
        pass
    files.atomic_write(conf, text.encode())
    return conf


def read_secret(path: Path) -> bytes:
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster secret file {path}: {exc.strerror}") from None
    if len(data) < 16:
        raise ConfigError(f"cluster secret file {path} holds fewer than 16 bytes")
    return data


def validate(opts: NodeOptions) -> None:
    if not HSM_ID.match(opts.hsm_id):
        raise ConfigError(f"--hsm-id must look like hsm-xxxxxxxxxxx (11 of [a-z0-9]), "
                          f"not {opts.hsm_id!r}")
    if opts.init is not None and opts.init not in INIT_MODES:
        raise ConfigError("--init must be new or clone")
    tls = (opts.tls_ca, opts.tls_cert, opts.tls_key)
    if any(tls) and not all(tls):
        raise ConfigError("--tls-ca, --tls-cert and --tls-key go together")
    if any(tls) and not opts.listen.startswith("tcp:"):
        raise ConfigError("TLS applies to tcp: listeners only")
    if not re.match(r"^[a-z]{2}-[a-z]+-\d[a-z]$", opts.az):
        raise ConfigError(f"--az must look like us-east-1a, not {opts.az!r}")


class Node:
    """The assembled node: keystore, users, audit, service and server."""

    def __init__(self, opts: NodeOptions, config: NodeConfig) -> None:
        validate(opts)
        files.private_umask()  # defence in depth: SoftHSM2's token files are private too
        self.opts = opts
        self.config = config
        self.dir = files.make_dir(node_dir(opts.state, opts.hsm_id))
        self._lock_fd = files.open_fd(self.dir / "node.lock", os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HsmsimError(f"node {opts.hsm_id} is already running on {self.dir}") from None
        secret = read_secret(opts.cluster_secret_file)
        try:
            conf = render_softhsm_conf(self.dir, config.softhsm_log_level)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        # SoftHSM2 reads SOFTHSM2_CONF once, at C_Initialize, in this process only.
        os.environ["SOFTHSM2_CONF"] = str(conf)
        so_pin, user_pin = token_pins(secret, opts.hsm_id)
        debris = remove_debris(self.dir / "tokens")  # before SoftHSM2 reads the token
        index = IndexStore(self.dir / "index.sqlite")
        first_start = index.get_meta("init") is None
        if first_start and opts.init is None:
            raise ConfigError(f"node {opts.hsm_id} has no state yet: pass --init new or --init clone")
        try:
            library = softhsm_library()
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        try:
            hsm = SoftHsm.load(library, opts.hsm_id, so_pin, user_pin)
        except Pkcs11Error as exc:
            raise HsmsimError(f"cannot open the token of {opts.hsm_id}: {exc} "
                              "(wrong cluster secret?)") from None
        self.audit = AuditLog(self.dir / "audit.jsonl", opts.hsm_id)
        self.keystore = Keystore(hsm, index, config.softhsm_threads,
                                 Quotas(config.max_keys, config.max_asymmetric_keys),
                                 disk=self.dir)
        stats = self.keystore.recover()
        stats["debris_files"] = debris
        if first_start:
            self.audit.record("init_token", mode=opts.init)
            if opts.init == "new" and self.keystore.masking is None:
                self.keystore.generate_masking_key()
                self.audit.record("masking_key_generate")
            index.set_meta("init", str(opts.init).encode())
        log.info("node %s recovered: %s", opts.hsm_id, stats)
        self.recovery = stats
        self.users = UserStore(self.dir / "index.sqlite")
        self.service = NodeService(opts.hsm_id, opts.az, self.keystore, self.users, self.audit,
                                   max_users=config.max_users, secret=secret)
        self.service.recovery = stats
        self.server = NodeServer(self.service, max_connections=config.max_connections)

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        ctx = None
        if self.opts.tls_ca and self.opts.tls_cert and self.opts.tls_key:
            ctx = server_context(self.opts.tls_ca, self.opts.tls_cert, self.opts.tls_key)
        bound = await self.server.listen(self.opts.listen, ctx)
        await self._direct_tls()
        print(f"READY {bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        await stop.wait()
        await self.server.close()
        await self.keystore.drain()  # creations in flight end (or are undone) before exit

    async def _direct_tls(self) -> None:
        """The direct path's TCP+TLS listener (docs/direct-protocol.md), for remote
        applications; without it (off, no cluster CA here, no address) they use the daemon."""
        hsm_id = self.opts.hsm_id
        address = None
        try:
            candidates = direct_tls.parse_listen(self.config.direct_tls_listen, hsm_id)
            if candidates is not None and not (self.opts.state / "ca" / "ca.key").is_file():
                log.info("no direct TLS listener: no cluster CA in %s", self.opts.state)
                candidates = None
            if candidates is not None:
                ctx = direct_tls.server_context(self.opts.state, self.dir, hsm_id, [h for h, _ in candidates])
                address = await self.server.direct.listen_tls(candidates, ctx, hsm_id)
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.warning("no direct TLS listener: %s", exc)
        try:
            direct_tls.write_address(self.dir, address)
        except OSError as exc:
            # The file only tells `hsmsim status` the address (tickets carry it to the daemon):
            # a node on a full disk still starts and serves the keys it has.
            log.warning("the direct TLS address is not recorded in %s: %s", self.dir, exc)

    def close(self) -> None:
        self.keystore.close()
        self.users.close()
        self.audit.close()
        os.close(self._lock_fd)


def run(opts: NodeOptions, config: NodeConfig) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ndir = node_dir(opts.state, opts.hsm_id)
    node: Node | None = None
    try:
        node = Node(opts, config)
        aio.run(node.serve())  # writes files before READY too (the direct TLS certificate)
    except (OSError, sqlite3.Error, Pkcs11Error, HsmsimError) as exc:
        if not files.is_no_space(exc, ndir):
            raise
        # A full disk is not a broken HSM: the daemon waits for space instead of replacing it.
        log.error("node %s stops: no space left on the disk of %s (%s)", opts.hsm_id, ndir, exc)
        return files.EXIT_NO_SPACE
    finally:
        if node is not None:
            node.close()
    return 0
