"""The `[cluster]` configuration section: key availability check, retries, timeouts and
supervision intervals of the cluster client inside the daemon."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hsmsim.config import resolve_section
from hsmsim.errors import ConfigError

RETRY_MODES = ("off", "standard")


@dataclass(frozen=True)
class ClusterConfig:
    # CloudHSM SDK 5.8+: `default_retry_mode` off | standard (3 retries, exponential backoff).
    default_retry_mode: str = "standard"
    max_retries: int = 3
    retry_base_ms: int = 50
    # CloudHSM SDK 5 `disable_key_availability_check` (needed for single-HSM clusters).
    disable_key_availability_check: bool = False
    request_timeout_s: float = 3.0
    health_interval_s: float = 0.5
    node_start_timeout_s: float = 15.0
    reconcile_interval_s: float = 1.0
    log_level: str = "INFO"
    # CloudHSM backs a cluster up at least once every 24 hours and keeps backups 90 days by
    # default (7-379), never deleting the last one.
    backup_interval_h: float = 24.0
    backup_retention_days: int = 90

    def validate(self) -> "ClusterConfig":
        if self.default_retry_mode not in RETRY_MODES:
            raise ConfigError(f"cluster.default_retry_mode must be one of {', '.join(RETRY_MODES)}, "
                              f"not {self.default_retry_mode!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("cluster.log_level must be DEBUG, INFO, WARNING or ERROR")
        if not 7 <= self.backup_retention_days <= 379:
            raise ConfigError("cluster.backup_retention_days must be between 7 and 379")
        if self.backup_interval_h <= 0:
            raise ConfigError("cluster.backup_interval_h must be positive")
        if not 0 <= self.max_retries <= 10:
            raise ConfigError("cluster.max_retries must be between 0 and 10")
        for name in ("request_timeout_s", "health_interval_s", "node_start_timeout_s",
                     "reconcile_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"cluster.{name} must be positive")
        return self

    @property
    def retries(self) -> int:
        return 0 if self.default_retry_mode == "off" else self.max_retries


def load_cluster_config(file_data: Mapping[str, Any], environ: Mapping[str, str],
                        overrides: Mapping[str, Any] | None = None) -> ClusterConfig:
    return resolve_section(ClusterConfig, "cluster", file_data, environ, overrides).validate()
