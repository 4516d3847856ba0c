"""The C core's build contract: the cdef cffi parses is exactly the umbrella header's public
part, the Python tables mirror the header's enums, and the extension is found inside the
package by an ordinary import."""

from __future__ import annotations

import re
from pathlib import Path

import hsmsim.core._native as native
from hsmsim.core import _args, _errors, rsa

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "native" / "core"


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S).strip()


def _enum(name: str) -> dict[str, int]:
    header = (CORE / "hsmsim_core.h").read_text()
    body = re.search(r"typedef enum \{([^}]*)\}\s*" + name + ";", header)
    assert body, name
    return {k: int(v) for k, v in re.findall(r"(HSMSIM_\w+)\s*=\s*(\d+)",
                                             _strip_comments(body.group(1)))}


def test_cdef_is_the_public_part_of_the_header() -> None:
    header = (CORE / "hsmsim_core.h").read_text()
    public = header.split("---- cdef begin")[1].split("---- cdef end")[0]
    public = public.split("*/", 1)[1].rsplit("/*", 1)[0]
    cdef = (CORE / "hsmsim_core.cdef").read_text()
    assert _strip_comments(public) == _strip_comments(cdef)


def test_status_codes_match_the_header() -> None:
    enum = _enum("hsmsim_status")
    assert enum == {f"HSMSIM_{name}": getattr(_errors, name) for name in
                    ("OK", "ERR_ARG", "ERR_NOMEM", "ERR_KEY", "ERR_TAG", "ERR_SIGNATURE",
                     "ERR_DECRYPT", "ERR_BUFFER", "ERR_CRYPTO")}
    for code in enum.values():
        if code:
            assert isinstance(_errors.exception_for(code), Exception)
    assert "unknown crypto core status 99" in str(_errors.exception_for(99))


def test_hash_and_padding_codes_match_the_header() -> None:
    hashes = _enum("hsmsim_hash")
    assert hashes.pop("HSMSIM_HASH_NONE") == _args.HASH_NONE
    assert hashes == {f"HSMSIM_HASH_{n.upper()}": code for n, (code, _) in _args.HASHES.items()}
    pads = _enum("hsmsim_rsa_padding")
    assert pads == {"HSMSIM_RSA_PKCS1V15": rsa._PKCS1V15, "HSMSIM_RSA_PSS": rsa._PSS,
                    "HSMSIM_RSA_OAEP": rsa._OAEP, "HSMSIM_RSA_RAW": rsa._RAW}


def test_extension_lives_in_the_package() -> None:
    assert Path(native.__file__).parent == ROOT / "hsmsim" / "core" or "site-packages" in str(
        native.__file__)
    exported = {n for n in dir(native.lib) if not n.startswith("_")}
    assert exported and all(n.startswith(("hsmsim_", "HSMSIM_")) for n in exported)


def test_version_mismatch_is_a_clear_import_error() -> None:
    import subprocess
    import sys

    code = ("import hsmsim; hsmsim.__version__ = '0.0.0-other'\n"
            "try:\n    import hsmsim.core\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "compiled core is version" in out and "'0.0.0-other'" in out
