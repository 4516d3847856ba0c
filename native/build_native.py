"""The one build script for hsmsim's C: sources, flags and link options for the cffi crypto core
and for the PKCS#11 module. setup.py imports it; nothing else sets compiler flags."""

from __future__ import annotations

import os
from pathlib import Path

NATIVE = Path(__file__).resolve().parent

# Hardened, warning-clean C11 for both libraries.
CFLAGS = [
    "-std=c11",
    "-O2",
    "-fPIC",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-fstack-protector-strong",
    "-D_FORTIFY_SOURCE=2",
    "-D_GNU_SOURCE",
    "-fvisibility=hidden",
]
LDFLAGS = ["-Wl,-z,relro,-z,now"]

# --- the crypto core (cffi, API out-of-line mode) -------------------------------------------
CORE_DIR = NATIVE / "core"
CORE_MODULE = "hsmsim.core._native"


def core_sources() -> list[str]:
    return sorted(str(p.relative_to(NATIVE.parent)) for p in CORE_DIR.glob("*.c"))


def package_version() -> str:
    """hsmsim.__version__, read from the source so that it is compiled into the core."""
    import re

    text = (NATIVE.parent / "hsmsim" / "__init__.py").read_text()
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if m is None:
        raise RuntimeError("hsmsim/__init__.py has no __version__ = \"...\" line")
    return m.group(1)


def make_core_ffibuilder():  # type: ignore[no-untyped-def]
    """The cffi builder for the crypto core; its cdef is the umbrella header's public part."""
    from cffi import FFI

    ffi = FFI()
    cdef_file = CORE_DIR / "hsmsim_core.cdef"
    ffi.cdef(cdef_file.read_text())
    ffi.set_source(
        CORE_MODULE,
        '#include "hsmsim_core.h"\n',
        sources=core_sources(),
        include_dirs=[str(CORE_DIR)],
        libraries=["crypto", "pthread"],
        define_macros=[("HSMSIM_VERSION", f'"{package_version()}"')],
        extra_compile_args=[f for f in CFLAGS if f != "-fvisibility=hidden"],
        extra_link_args=LDFLAGS,
    )
    return ffi


# --- the PKCS#11 module (plain shared library, loaded by any PKCS#11 host) -------------------
PKCS11_DIR = NATIVE / "pkcs11"
PKCS11_LIBNAME = "libhsmsim-pkcs11.so"
PKCS11_LIBRARIES = ["pthread", "ssl", "crypto"]  # libssl: TLS to a remote daemon


def pkcs11_sources() -> list[str]:
    return sorted(str(p) for p in PKCS11_DIR.glob("*.c"))


def build_pkcs11(out_dir: Path, *, debug: bool = False) -> Path | None:
    """Compile and link libhsmsim-pkcs11.so into out_dir; returns its path (None if no sources)."""
    import subprocess

    sources = pkcs11_sources()
    if not sources:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / PKCS11_LIBNAME
    cc = os.environ.get("CC", "cc")
    flags = CFLAGS + (["-g", "-O0"] if debug else [])
    cmd = [cc, *flags, "-shared", f"-I{PKCS11_DIR}", *sources, "-o", str(target), *LDFLAGS]
    cmd += [f"-l{lib}" for lib in PKCS11_LIBRARIES]
    subprocess.run(cmd, check=True)
    return target


# cffi_modules entry point ("native/build_native.py:_ffibuilder").
_ffibuilder = make_core_ffibuilder() if (CORE_DIR / "hsmsim_core.cdef").exists() else None
