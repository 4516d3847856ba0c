"""The on-disk state directory of one cluster: its layout, `cluster.json`, the secrets, the
cluster CA, identifiers, and crash-safe file writes. Nothing here talks to a node."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets as _secrets
import shutil
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hsmsim import files
# re-exported: cloudhsm/plane.py and cloudhsm/lifecycle.py import it from here
from hsmsim.files import atomic_write
from hsmsim.errors import HsmsimError

FORMAT_VERSION = 1
MAX_HSMS = 28  # CloudHSM: HSMs per cluster (not adjustable)
AZ_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d[a-z]$")  # an availability zone name, us-east-1a
INIT_MARKER = ".initializing"
_ID_ALPHABET = string.ascii_lowercase + "234567"  # CloudHSMv2 id pattern: [2-7a-zA-Z]{11,16}


class StateError(HsmsimError):
    """The state directory is missing, corrupt or belongs to something else; the message says
    which file and what to do."""


def new_id(prefix: str, length: int = 11) -> str:
    """A CloudHSMv2-style identifier, e.g. `hsm-ab2cd3ef4gh`."""
    return prefix + "".join(_secrets.choice(_ID_ALPHABET) for _ in range(length))


def new_password() -> str:
    """A generated password within CloudHSM's 8-32 character rule."""
    return _secrets.token_urlsafe(15)  # 20 characters: "crypto_user:" + 20 fits libp11's 32-character PIN limit


@dataclass(frozen=True)
class HsmSpec:
    """One HSM of the cluster as recorded in cluster.json."""

    hsm_id: str
    az: str


@dataclass(frozen=True)
class ClusterSpec:
    """cluster.json: the cluster's identity and topology."""

    cluster_id: str
    hsms: tuple[HsmSpec, ...]
    created: str
    hsm_type: str = "hsm2m.medium"
    mode: str = "FIPS"
    source_backup_id: str | None = None
    version: int = FORMAT_VERSION

    def with_hsms(self, hsms: Sequence[HsmSpec]) -> "ClusterSpec":
        return replace(self, hsms=tuple(hsms))

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            "version": self.version,
            "cluster_id": self.cluster_id,
            "created": self.created,
            "hsm_type": self.hsm_type,
            "mode": self.mode,
            "source_backup_id": self.source_backup_id,
            "hsms": [{"hsm_id": h.hsm_id, "az": h.az} for h in self.hsms],
        }
        return (json.dumps(data, indent=2) + "\n").encode()

    @staticmethod
    def from_json(raw: bytes, where: Path) -> "ClusterSpec":
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"unsupported format version {data.get('version')!r}")
            cid = data["cluster_id"]
            if not isinstance(cid, str) or not cid.startswith("cluster-"):
                raise ValueError("cluster_id is missing or malformed")
            hsms = []
            for h in data["hsms"]:
                if not (isinstance(h, dict) and isinstance(h.get("hsm_id"), str)
                        and h["hsm_id"].startswith("hsm-") and isinstance(h.get("az"), str)):
                    raise ValueError("an HSM entry is malformed")
                hsms.append(HsmSpec(h["hsm_id"], h["az"]))
            if len({h.hsm_id for h in hsms}) != len(hsms):
                raise ValueError("duplicate HSM ids")
            return ClusterSpec(cluster_id=cid, hsms=tuple(hsms), created=str(data["created"]),
                               hsm_type=str(data.get("hsm_type", "hsm2m.medium")),
                               mode=str(data.get("mode", "FIPS")),
                               source_backup_id=data.get("source_backup_id"))
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{where} is corrupt ({exc}); restore it from a backup or remove "
                             "the state directory to create a new cluster") from None


@dataclass(frozen=True)
class StateDir:
    """Paths of one cluster's state directory (the layout every component shares)."""

    root: Path
    extra: dict[str, Path] = field(default_factory=dict, compare=False)

    @property
    def cluster_json(self) -> Path: return self.root / "cluster.json"
    @property
    def config_file(self) -> Path: return self.root / "hsmsim.toml"
    @property
    def secrets(self) -> Path: return self.root / "secrets"
    @property
    def cluster_secret(self) -> Path: return self.secrets / "cluster.secret"
    @property
    def admin_password(self) -> Path: return self.secrets / "admin.password"
    @property
    def cu_password(self) -> Path: return self.secrets / "crypto_user.password"
    @property
    def backup_key(self) -> Path: return self.secrets / "backup.key"
    @property
    def nodes(self) -> Path: return self.root / "nodes"
    def node_dir(self, hsm_id: str) -> Path: return self.nodes / hsm_id
    def node_socket(self, hsm_id: str) -> Path: return self.node_dir(hsm_id) / "node.sock"
    @property
    def gateway_sock(self) -> Path: return self.root / "gateway.sock"
    @property
    def control_sock(self) -> Path: return self.root / "control.sock"
    @property
    def kms(self) -> Path: return self.root / "kms"
    @property
    def backups(self) -> Path: return self.root / "backups"
    @property
    def ca(self) -> Path: return self.root / "ca"
    @property
    def ca_cert(self) -> Path: return self.ca / "ca.crt"
    @property
    def ca_key(self) -> Path: return self.ca / "ca.key"
    @property
    def pid_file(self) -> Path: return self.root / "daemon.pid"
    @property
    def log_file(self) -> Path: return self.root / "daemon.log"
    @property
    def journal(self) -> Path: return self.root / "cluster" / "journal.jsonl"
    @property
    def handles(self) -> Path: return self.root / "cluster" / "handles.json"
    @property
    def init_marker(self) -> Path: return self.root / INIT_MARKER

    def exists(self) -> bool:
        return self.cluster_json.is_file()

    def load_spec(self) -> ClusterSpec:
        if not self.root.exists():
            raise StateError(f"no cluster in {self.root}: run `hsmsim up` first")
        if not self.root.is_dir():
            raise StateError(f"state directory {self.root} is not a directory")
        try:
            raw = self.cluster_json.read_bytes()
        except FileNotFoundError:
            raise StateError(f"no cluster in {self.root} (cluster.json is missing): run "
                             "`hsmsim up` first") from None
        except OSError as exc:
            raise StateError(f"cannot read {self.cluster_json}: {exc.strerror}") from None
        spec = ClusterSpec.from_json(raw, self.cluster_json)
        for name in (self.cluster_secret,):
            if not name.is_file():
                raise StateError(f"state directory {self.root} is corrupt: {name} is missing")
        return spec

    def save_spec(self, spec: ClusterSpec) -> None:
        atomic_write(self.cluster_json, spec.to_json())

    def read_secret(self, path: Path) -> str:
        try:
            return path.read_text().strip()
        except OSError:
            raise StateError(f"state directory {self.root} is corrupt: cannot read "
                             f"{path.relative_to(self.root)}") from None


def write_secret(path: Path, value: str | bytes) -> None:
    files.make_dir(path.parent)
    data = value.encode() if isinstance(value, str) else value
    atomic_write(path, data, mode=0o600)


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_ca(state: StateDir, cluster_id: str) -> None:
    """The cluster's self-signed CA (CloudHSM's trust anchor): `ca/ca.crt`, key 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmsim"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_id} CA"),
    ])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    files.make_dir(state.ca)
    atomic_write(state.ca_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    # The certificate is public by nature: the one 0644 file of the state directory (its
    # directories are 0700, so only the owner reaches it anyway).
    atomic_write(state.ca_cert, cert.public_bytes(serialization.Encoding.PEM),
                 mode=files.PUBLIC_FILE)


@dataclass(frozen=True)
class NewCluster:
    """What `prepare_new_cluster` made: the spec (not yet saved) and the initial passwords."""

    spec: ClusterSpec
    admin_password: str
    cu_password: str
    created_root: bool


def prepare_new_cluster(state: StateDir, azs: Sequence[str], hsms_per_az: int,
                        admin_password: str | None, cu_password: str | None) -> NewCluster:
    """Lay out a new cluster's directory (secrets, CA, init marker). cluster.json is written
    only once the nodes are initialised (`finish_new_cluster`); until then the init marker says
    the directory is half-made and may be removed (`discard_new_cluster`)."""
    created_root = not state.root.exists()
    if state.root.exists():
        if not state.root.is_dir():
            raise StateError(f"state directory {state.root} is not a directory")
        leftovers = [p.name for p in state.root.iterdir() if p.name != "hsmsim.toml"]
        if leftovers and not state.init_marker.exists():
            raise StateError(f"{state.root} is not empty and holds no cluster (cluster.json is "
                             f"missing; found {', '.join(sorted(leftovers)[:5])}); choose another "
                             "--state or remove it")
        if state.init_marker.exists():
            discard_new_cluster(state, created_root=False)
    files.make_dir(state.root)  # 0700 whatever the umask (another user must not plant files)
    spec = ClusterSpec(
        cluster_id=new_id("cluster-"),
        hsms=tuple(HsmSpec(new_id("hsm-"), az) for az in azs for _ in range(hsms_per_az)),
        created=utcnow())
    # The marker holds the spec-to-be: the daemon bootstraps from it, then writes cluster.json.
    atomic_write(state.init_marker, spec.to_json())
    admin = admin_password or new_password()
    cu = cu_password or new_password()
    write_secret(state.cluster_secret, _secrets.token_hex(32))
    write_secret(state.admin_password, admin)
    write_secret(state.cu_password, cu)
    write_secret(state.backup_key, _secrets.token_bytes(32).hex())
    make_ca(state, spec.cluster_id)
    for d in (state.nodes, state.backups, state.kms, state.journal.parent):
        files.make_dir(d, parents=False)
    return NewCluster(spec, admin, cu, created_root)


def finish_new_cluster(state: StateDir, spec: ClusterSpec) -> None:
    state.save_spec(spec)
    state.init_marker.unlink(missing_ok=True)
    files.fsync_dir(state.root)


def discard_new_cluster(state: StateDir, created_root: bool) -> None:
    """Remove a half-made cluster: the whole directory if we created it, else what we put in
    it (everything except a user's hsmsim.toml)."""
    if not state.root.exists():
        return
    kill_node_processes(state)
    if created_root:
        shutil.rmtree(state.root, ignore_errors=True)
        return
    for p in state.root.iterdir():
        if p.name == "hsmsim.toml":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def kill_node_processes(state: StateDir) -> int:
    """SIGKILL node processes still running from this directory (an interrupted creation)."""
    import signal
    n = 0
    if not state.nodes.is_dir():
        return 0
    for pidfile in state.nodes.glob("*/node.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"serve" in cmdline and pidfile.parent.name.encode() in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
                n += 1
            except ProcessLookupError:
                pass
    return n
