"""Fixtures for the crypto core's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import hsmsim.core.rsa as core_rsa


@pytest.fixture
def small_rsa_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Lowers the face's minimum RSA size to 1024 bits, for the classic PKCS#1 example
    vectors (1024 to 2048-bit keys). The C core has no size policy; the face's own policy is
    tested separately with the default minimum."""
    monkeypatch.setattr(core_rsa, "MIN_BITS", 1024)
    yield
