"""Finds files shipped with hsmsim: the SoftHSM2 template (packaged under hsmsim/_data, or the
repository's softhsm-config/ in a development checkout) and the built PKCS#11 module."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SOFTHSM_TEMPLATE = "softhsm2.conf.in"
PKCS11_MODULE = "libhsmsim-pkcs11.so"


def softhsm_template() -> Path:
    for candidate in (PACKAGE / "_data" / SOFTHSM_TEMPLATE,
                      PACKAGE.parent / "softhsm-config" / SOFTHSM_TEMPLATE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{SOFTHSM_TEMPLATE} is not installed with hsmsim")


def pkcs11_module() -> Path:
    """The path of libhsmsim-pkcs11.so inside the installed package."""
    path = PACKAGE / "_lib" / PKCS11_MODULE
    if not path.is_file():
        raise FileNotFoundError(f"{PKCS11_MODULE} was not built; run `make build`")
    return path


def softhsm_library() -> Path:
    """SoftHSM2's PKCS#11 library from the Debian package."""
    for candidate in (Path("/usr/lib/softhsm/libsofthsm2.so"),
                      Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
                      Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("SoftHSM2 is not installed (Debian package softhsm2)")
