"""Mutual TLS for the node protocol over TCP (nodes on other hosts): server and client
contexts that require a peer certificate issued by the cluster CA (`ca/ca.crt`).

Peers are authenticated by the CA, not by host name (nodes are addressed by IP or container
name); the cluster secret proof still runs inside the channel."""

from __future__ import annotations

import ssl
from pathlib import Path

from hsmsim.errors import ConfigError


def _context(purpose: ssl.Purpose, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    side = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node TLS files ({ca}, {cert}, {key}): {exc}") from None
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """For `hsmsim node serve --tls-ca --tls-cert --tls-key`: clients must present a
    certificate from the cluster CA."""
    return _context(ssl.Purpose.CLIENT_AUTH, ca, cert, key)


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """For NodeClient.connect(..., ssl=...): the node must present a cluster-CA certificate,
    and so does the client."""
    return _context(ssl.Purpose.SERVER_AUTH, ca, cert, key)
