"""The `[cloudhsm]` configuration section: where the CloudHSMv2 endpoint listens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CloudHsmConfig:
    """[cloudhsm] in hsmsim.toml (HSMSIM_CLOUDHSM_HOST / _PORT). Port 4600 by default; when
    it is taken the endpoint takes any free port (with a warning), and `hsmsim env` exports
    the one in use. Port 0: any free port."""

    host: str = "127.0.0.1"
    port: int = 4600
