"""A throw-away SoftHSM2 token used directly (no hsmsim in between): the reference setup of
`hsmsim tls bench` and of the TLS tests, reached through the same engine and kit files."""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
from pathlib import Path

from hsmsim.resources import softhsm_library
from hsmsim.tls.errors import TlsError


@dataclasses.dataclass(frozen=True)
class SoftToken:
    module: Path
    label: str
    conf: Path
    pin_file: Path  # 0600, the user PIN

    @property
    def env(self) -> tuple[tuple[str, str], ...]:
        return (("SOFTHSM2_CONF", str(self.conf)),)


def make_token(directory: Path, label: str = "hsm1") -> SoftToken:
    """Initialises a fresh token in `directory` (its own softhsm2.conf and token directory)."""
    try:
        module = softhsm_library()
    except FileNotFoundError as exc:
        raise TlsError(str(exc)) from None
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    tokens = directory / "tokens"
    tokens.mkdir(exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    pin_file = directory / "user.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pin)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    # The PINs appear on softhsm2-util's command line for an instant: a throw-away token only.
    try:
        r = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                            "--so-pin", so_pin, "--pin", pin],
                           capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise TlsError(f"softhsm2-util failed: {exc}") from None
    if r.returncode != 0:
        raise TlsError(f"softhsm2-util --init-token failed: {r.stderr.strip()}")
    return SoftToken(module, label, conf, pin_file)
