"""The KMS endpoint's configuration section `[kms]`, resolved once into a frozen value."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hsmsim import files
from hsmsim.config import resolve_section
from hsmsim.errors import ConfigError

DEFAULT_PORT = 4599

# The commercial ("aws" partition) Regions, as botocore's endpoints.json lists them. A request
# signed for one of these Regions that is not configured answers like a Region that is not
# enabled for the account; any other Region name like a credential scoped to no valid Region.
COMMERCIAL_REGIONS = (
    "af-south-1", "ap-east-1", "ap-east-2", "ap-northeast-1", "ap-northeast-2", "ap-northeast-3",
    "ap-south-1", "ap-south-2", "ap-southeast-1", "ap-southeast-2", "ap-southeast-3",
    "ap-southeast-4", "ap-southeast-5", "ap-southeast-6", "ap-southeast-7", "ca-central-1",
    "ca-west-1", "eu-central-1", "eu-central-2", "eu-north-1", "eu-south-1", "eu-south-2",
    "eu-west-1", "eu-west-2", "eu-west-3", "il-central-1", "me-central-1", "me-south-1",
    "mx-central-1", "sa-east-1", "us-east-1", "us-east-2", "us-west-1", "us-west-2")
KNOWN_REGIONS = frozenset(COMMERCIAL_REGIONS) | {
    "cn-north-1", "cn-northwest-1", "us-gov-east-1", "us-gov-west-1"}


@dataclass(frozen=True)
class KmsConfig:
    """Settings of the KMS endpoint.

    `principals` maps access keys to principals, each entry `AKID=arn` or
    `AKID=arn=secret` (the secret is needed by strict SigV4). A request from an access key not
    in the map acts as `arn:aws:iam::<account_id>:root` (or is rejected in strict mode).
    `enforce_policies` evaluates key policies and grants on every operation (on by default:
    with unmapped access keys acting as the account root and the default policy allowing the
    root, only keys with a restrictive policy refuse anything). `clock_control` exposes `POST /_hsmsim/clock` so tests can
    move the KMS clock forward (scheduled deletions, automatic rotation); off, `/_hsmsim/*`
    answers 404. `max_connections` caps the endpoint's open connections (the daemon lowers it
    further to fit its file-descriptor limit); a connection over the cap gets a 503 and is
    closed. `region` is the default Region (the one `hsmsim env` exports and the one a store
    made before Regions migrates to); `regions` lists the Regions served (empty: every
    commercial Region), each request picking its Region from its SigV4 credential scope.
    `idle_timeout_seconds` closes a connection that has not sent a whole request header
    within that time (idle keep-alive connections too) and answers 408 to a body that does not
    arrive within it.

    FIDELITY: with strict_sigv4 off (the default) any well-formed SigV4 Authorization header is
    accepted without checking the signature; a request without one is still refused
    (MissingAuthenticationTokenException)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    account_id: str = "111122223333"
    region: str = "us-east-1"
    regions: tuple[str, ...] = ()
    strict_sigv4: bool = False
    principals: tuple[str, ...] = ()
    enforce_policies: bool = True
    quotas: bool = False
    max_request_bytes: int = 65536
    clock_control: bool = True
    rotation_check_seconds: float = 5.0
    max_connections: int = 1024
    idle_timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not (self.account_id.isdigit() and len(self.account_id) == 12):
            raise ConfigError(f"kms.account_id must be 12 digits, not {self.account_id!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"kms.port must be 0..65535, not {self.port}")
        if not self.rotation_check_seconds > 0:
            raise ConfigError("kms.rotation_check_seconds must be positive")
        if self.max_connections < 1:
            raise ConfigError("kms.max_connections must be at least 1")
        if not 0 < self.idle_timeout_seconds <= 3600:
            raise ConfigError("kms.idle_timeout_seconds must be more than 0 and at most 3600")
        if self.max_request_bytes < 1024:
            raise ConfigError("kms.max_request_bytes must be at least 1024")
        for r in self.allowed_regions:
            if not (r and all(c.isalnum() or c == "-" for c in r) and r == r.lower()):
                raise ConfigError(f"kms.regions entries must be Region names like us-east-1, not {r!r}")
        if self.region not in self.allowed_regions:
            raise ConfigError(f"kms.region {self.region!r} must be one of kms.regions")
        for entry in self.principals:
            parts = entry.split("=", 2)
            if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("arn:"):
                raise ConfigError(f"kms.principals entry must be AKID=arn[=secret], not {entry.split('=')[0]!r}...")

    def principal_table(self) -> dict[str, tuple[str, str | None]]:
        """Access key id -> (principal ARN, secret or None)."""
        table: dict[str, tuple[str, str | None]] = {}
        for r in self.allowed_regions:
            if not (r and all(c.isalnum() or c == "-" for c in r) and r == r.lower()):
                raise ConfigError(f"kms.regions entries must be Region names like us-east-1, not {r!r}")
        if self.region not in self.allowed_regions:
            raise ConfigError(f"kms.region {self.region!r} must be one of kms.regions")
        for entry in self.principals:
            parts = entry.split("=", 2)
            table[parts[0]] = (parts[1], parts[2] if len(parts) == 3 else None)
        return table

    @property
    def allowed_regions(self) -> tuple[str, ...]:
        return self.regions or COMMERCIAL_REGIONS

    @property
    def root_arn(self) -> str:
        return f"arn:aws:iam::{self.account_id}:root"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def resolve(file_data: Mapping[str, Any], environ: Mapping[str, str],
            overrides: Mapping[str, Any] | None = None) -> KmsConfig:
    """The `[kms]` section from defaults, file, HSMSIM_KMS_* environment and flags."""
    return resolve_section(KmsConfig, "kms", file_data, environ, overrides)


# The KMS port clients were given at the cluster's first `up` (AWS_ENDPOINT_URL_KMS), kept with
# the cluster so that a later `up` without the same flag or environment serves the same URL.
PORT_FILE = Path("kms") / "endpoint.json"


def port_given(file_data: Mapping[str, Any], environ: Mapping[str, str]) -> bool:
    """Whether the port was chosen explicitly (hsmsim.toml [kms] port or HSMSIM_KMS_PORT)."""
    section = file_data.get("kms", {})
    return (isinstance(section, Mapping) and "port" in section) or "HSMSIM_KMS_PORT" in environ


def stored_port(state_dir: Path) -> int | None:
    try:
        port = json.loads((state_dir / PORT_FILE).read_text())["port"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return port if isinstance(port, int) and 0 < port <= 65535 else None


def settle_port(config: KmsConfig, state_dir: Path, given: bool) -> tuple[KmsConfig, str | None]:
    """The config to serve with and a warning, if any. The port stored at the first `up` is
    used unless a port other than 0 is given explicitly; an explicit port that differs from the
    stored one wins (it is stored once the endpoint runs) and the warning says that the endpoint
    moved."""
    stored = stored_port(state_dir)
    if stored is None or stored == config.port:
        return config, None
    if not given or config.port == 0:  # port 0 ("any free port") keeps the one it got first
        return replace(config, port=stored), None
    return config, (f"the KMS endpoint moved from port {stored} to {config.port} (as configured); "
                    "clients using the old AWS_ENDPOINT_URL_KMS must be updated")


def remember_port(state_dir: Path, port: int) -> None:
    """Stores the port the endpoint serves on (0600, written atomically)."""
    files.atomic_write(state_dir / PORT_FILE, json.dumps({"port": port}).encode() + b"\n")
