"""Fixtures of the differential suite: SoftHSM2 loaded directly with its own throw-away token,
and libhsmsim-pkcs11.so on the session's reference cluster (tests/pkcs11/conftest.py), each
loaded privately by ctypes, initialised with CKF_OS_LOCKING_OK and logged in once; each test
gets a fresh RW session on both (`pair`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from p11diff import Module, Session, rv_name
from p11helpers import REF_PIN, ClusterGateway, copy_module


def _init(module: Module, env: dict[str, str]) -> None:
    """C_Initialize with `env` set: both modules read their configuration then, and only then."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        rv = module.initialize()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert rv == 0, f"{module.name}: C_Initialize {rv_name(rv)}"


@pytest.fixture(scope="session")
def softhsm_login(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Module, int, str]]:
    from hsmsim.resources import softhsm_library
    from hsmsim.tls.errors import TlsError
    from hsmsim.tls.softhsm import make_token
    try:
        softhsm_library()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    d = tmp_path_factory.mktemp("softhsm-oracle")
    try:
        token = make_token(d / "token", label="oracle")
    except TlsError as exc:
        pytest.fail(f"the SoftHSM2 token could not be made: {exc}")
    # A private copy: this process may hold SoftHSM2 already, initialised with another config.
    lib = d / "libsofthsm2-oracle.so"
    shutil.copy(token.module, lib)
    module = Module(lib, "SoftHSM2")
    _init(module, {"SOFTHSM2_CONF": str(token.conf)})
    slot = module.slot_of("oracle")
    pin = token.pin_file.read_text()
    anchor = Session(module, slot, pin)  # holds the login for the whole run
    yield module, slot, pin
    anchor.close()
    module.C_Finalize(None)


@pytest.fixture(scope="session")
def hsmsim_login(ref_gateway: ClusterGateway, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[Module, int, str]]:
    d = tmp_path_factory.mktemp("hsmsim-differential")
    module = Module(copy_module(d), "hsmsim")
    _init(module, {"HSMSIM_SOCKET": str(ref_gateway.sock)})
    slot = module.slot_of("hsm1")
    anchor = Session(module, slot, REF_PIN)
    yield module, slot, REF_PIN
    anchor.close()
    module.C_Finalize(None)


@pytest.fixture
def soft(softhsm_login: tuple[Module, int, str]) -> Iterator[Session]:
    s = Session(*softhsm_login)
    yield s
    s.close()


@pytest.fixture
def hsm(hsmsim_login: tuple[Module, int, str]) -> Iterator[Session]:
    s = Session(*hsmsim_login)
    yield s
    s.close()


@pytest.fixture
def pair(soft: Session, hsm: Session) -> tuple[Session, Session]:
    """(SoftHSM2, hsmsim): run the same sequence on each and compare."""
    return soft, hsm


@pytest.fixture(scope="session")
def rsa_key() -> object:
    """One RSA-2048 key (CloudHSM's minimum, reference §1.5) imported into both modules."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_keys() -> tuple[object, object]:
    """Two P-256 keys (alice, bob) imported into both modules."""
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
