"""Fixtures for the PKCS#11 module and gateway tests: real clusters (one with CloudHSM's quirks,
one with every quirk switched off), and python-pkcs11 pointed at them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from p11helpers import REF_PIN, ClusterGateway, require_module, use_gateway


@pytest.fixture(scope="session")
def ref_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGateway]:
    require_module()
    gw = ClusterGateway(tmp_path_factory.mktemp("refgw") / "gateway.sock", {})
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def strict_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGateway]:
    """A gateway with every CloudHSM quirk switched off (PKCS#11-standard behaviour)."""
    require_module()
    off = {k: "false" for k in ("quirk_ro_session_fails", "quirk_wrong_sequence_ok",
                                "quirk_private_template_usage_false", "quirk_unsupported_api",
                                "quirk_data_limits")}
    gw = ClusterGateway(tmp_path_factory.mktemp("strictgw") / "gateway.sock", off)
    yield gw
    gw.stop()


@pytest.fixture
def ref_lib(ref_gateway: ClusterGateway):  # type: ignore[no-untyped-def]
    return use_gateway(ref_gateway.sock)


@pytest.fixture
def ref_token(ref_lib):  # type: ignore[no-untyped-def]
    return ref_lib.get_token(token_label="hsm1")


@pytest.fixture
def ref_session(ref_token) -> Iterator[object]:  # type: ignore[no-untyped-def]
    s = ref_token.open(rw=True, user_pin=REF_PIN)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def raw(tmp_path):  # type: ignore[no-untyped-def]
    """A private copy of the module, not initialised."""
    from p11helpers import copy_module
    from p11raw import Raw
    return Raw(copy_module(tmp_path))


@pytest.fixture
def live(raw, ref_gateway: ClusterGateway, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """`raw`, initialised against the quirky (CloudHSM-default) cluster."""
    monkeypatch.setenv("HSMSIM_SOCKET", str(ref_gateway.sock))
    assert raw.C_Initialize(None) == 0
    yield raw
    raw.C_Finalize(None)


@pytest.fixture
def strict(tmp_path, strict_gateway: ClusterGateway, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A private module copy initialised against the quirk-free gateway."""
    from p11helpers import copy_module
    from p11raw import Raw
    d = tmp_path / "strict"
    d.mkdir()
    r = Raw(copy_module(d))
    monkeypatch.setenv("HSMSIM_SOCKET", str(strict_gateway.sock))
    assert r.C_Initialize(None) == 0
    yield r
    r.C_Finalize(None)
