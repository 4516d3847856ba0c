"""The KMS endpoint's configuration section `[kms]`, resolved once into a frozen value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hsmsim.config import resolve_section
from hsmsim.errors import ConfigError

DEFAULT_PORT = 4599


@dataclass(frozen=True)
class KmsConfig:
    """Settings of the KMS endpoint.

    `principals` maps access keys to principals, each entry `AKID=arn` or
    `AKID=arn=secret` (the secret is needed by strict SigV4). A request from an access key not
    in the map acts as `arn:aws:iam::<account_id>:root` (or is rejected in strict mode).
    `enforce_policies` evaluates key policies and grants on every operation (on by default:
    with unmapped access keys acting as the account root and the default policy allowing the
    root, only keys with a restrictive policy refuse anything). `clock_control` exposes `POST /_hsmsim/clock` so tests can
    move the KMS clock forward (scheduled deletions, automatic rotation).

    FIDELITY: with strict_sigv4 off (the default) any well-formed SigV4 Authorization header is
    accepted without checking the signature; a request without one is still refused
    (MissingAuthenticationTokenException)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    account_id: str = "111122223333"
    region: str = "us-east-1"
    strict_sigv4: bool = False
    principals: tuple[str, ...] = ()
    enforce_policies: bool = True
    quotas: bool = False
    max_request_bytes: int = 65536
    clock_control: bool = True
    rotation_check_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not (self.account_id.isdigit() and len(self.account_id) == 12):
            raise ConfigError(f"kms.account_id must be 12 digits, not {self.account_id!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"kms.port must be 0..65535, not {self.port}")
        if not self.rotation_check_seconds > 0:
            raise ConfigError("kms.rotation_check_seconds must be positive")
        if self.max_request_bytes < 1024:
            raise ConfigError("kms.max_request_bytes must be at least 1024")
        for entry in self.principals:
            parts = entry.split("=", 2)
            if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("arn:"):
                raise ConfigError(f"kms.principals entry must be AKID=arn[=secret], not {entry.split('=')[0]!r}...")

    def principal_table(self) -> dict[str, tuple[str, str | None]]:
        """Access key id -> (principal ARN, secret or None)."""
        table: dict[str, tuple[str, str | None]] = {}
        for entry in self.principals:
            parts = entry.split("=", 2)
            table[parts[0]] = (parts[1], parts[2] if len(parts) == 3 else None)
        return table

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
