"""The node's configuration section `[node]` (hsm2m.medium defaults from CloudHSM's quotas),
resolved once by the CLI entry point and passed down."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeConfig:
    max_keys: int = 16666  # CloudHSM hsm2m.medium: 16,666 keys
    max_asymmetric_keys: int = 3333  # of which at most 3,333 asymmetric
    max_users: int = 1024
    max_connections: int = 2048  # HsmSessionCount: "Up to 2,048 are allowed"
    # SoftHSM2 worker threads (initialised with OS locking): crypto, and token object
    # creation, which is file-I/O bound and overlaps well.
    softhsm_threads: int = 4
    softhsm_log_level: str = "ERROR"
    # The direct data path over TCP+TLS for remote applications (docs/direct-protocol.md):
    # auto (this HSM's own loopback address 127.A.B.C on port 2223), off, or HOST:PORT.
    direct_tls_listen: str = "auto"
