"""Fixtures for the TLS-offload kit: two backends behind the same `hsmsim tls init` command,
a throw-away SoftHSM2 token used directly and a real hsmsim cluster (daemon + 3 node processes)
reached through libhsmsim-pkcs11.so. Tests parametrised with `backend` run against both."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmsim.testing.cluster import free_port, run_cli
from hsmsim.tls.kit import Kit

REQUIRED_TOOLS = ("openssl", "softhsm2-util", "pkcs11-tool")


def _need_tools() -> None:
    for tool in REQUIRED_TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed (make deps)")
    try:
        from hsmsim.tls.kit import engine_path
        engine_path()
    except Exception as exc:
        pytest.skip(str(exc))


@dataclasses.dataclass
class Backend:
    """Where `tls init` puts keys, and how to call it there."""

    name: str
    state: Path
    init_args: list[str]
    module: Path
    token: str
    pin: str
    module_env: dict[str, str]
    cluster: object | None = None

    def init(self, out: Path, *args: str) -> Kit:
        r = run_cli(["tls", "init", "--out", str(out), "--json", *self.init_args, *args])
        assert r.returncode == 0, r.stderr
        secret = self.pin.split(":", 1)[-1]
        assert secret not in r.stdout and secret not in r.stderr  # the PIN is never printed
        kit = Kit.load(out)
        assert json.loads(r.stdout)["uri"] == kit.uri
        return kit

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(["tls", *args, *self.init_args])


@pytest.fixture(scope="session")
def softhsm_backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    _need_tools()
    from hsmsim.tls.softhsm import make_token
    root = tmp_path_factory.mktemp("tls-softhsm")
    token = make_token(root / "token")
    return Backend("softhsm2", root / "state",
                   ["--state", str(root / "state"), "--module", str(token.module),
                    "--token", token.label, "--pin-file", str(token.pin_file),
                    "--module-env", f"SOFTHSM2_CONF={token.conf}"],
                   token.module, token.label, token.pin_file.read_text(),
                   dict(token.env))


def _start_tls_cluster(state: Path, allow_ro_sessions: bool) -> object:
    from hsmsim.testing.cluster import ClusterStartError, start_cluster
    state.mkdir(parents=True)
    toml = f"[kms]\nport = {free_port()}\n"
    if allow_ro_sessions:
        # libp11 opens read-only sessions, which CloudHSM (and hsmsim by default) refuse.
        toml += "\n[gateway]\nquirk_ro_session_fails = false\n"
    (state / "hsmsim.toml").write_text(toml)
    try:
        return start_cluster(state)
    except ClusterStartError as exc:
        pytest.fail(f"the hsmsim cluster did not start:\n{exc}", pytrace=False)


def _need_module() -> Path:
    from hsmsim.resources import pkcs11_module
    try:
        return pkcs11_module()
    except FileNotFoundError as exc:
        pytest.skip(f"hsmsim backend unavailable: {exc}")


@pytest.fixture(scope="session")
def hsmsim_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    _need_tools()
    _need_module()
    state = tmp_path_factory.mktemp("tls-hsmsim") / "state"
    cluster = _start_tls_cluster(state, allow_ro_sessions=True)
    try:
        env = cluster.env  # type: ignore[attr-defined]
        yield Backend("hsmsim", state, ["--state", str(state)],
                      Path(env["HSMSIM_PKCS11_MODULE"]), "hsm1", env["HSMSIM_PIN"],
                      {"HSMSIM_SOCKET": env["HSMSIM_SOCKET"]}, cluster)
    finally:
        cluster.down()  # type: ignore[attr-defined]


@pytest.fixture(params=["softhsm", "hsmsim"], scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    b: Backend = request.getfixturevalue(f"{request.param}_backend")
    return b


@dataclasses.dataclass
class Kits:
    """The kits most tests share, made once per backend: an RSA-2048 key certified by the
    local CA for `localhost` (served by nginx), and a self-signed EC P-384 one."""

    backend: Backend
    rsa: Kit
    ec: Kit
    port: int


@pytest.fixture(scope="session")
def kits(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Kits:
    root = tmp_path_factory.mktemp(f"kits-{backend.name}")
    port = free_port()
    rsa = backend.init(root / "rsa", "--cn", "localhost", "--key", "rsa2048", "--issuer", "ca",
                       "--san", "127.0.0.1", "--port", str(port))
    ec = backend.init(root / "ec", "--cn", "ec.example.test", "--key", "ec-p384",
                      "--issuer", "self")
    return Kits(backend, rsa, ec, port)
