"""Build glue: the cffi crypto core and the PKCS#11 module, both landing inside the package.

All sources and flags are listed in native/build_native.py."""

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "native"))
import build_native  # noqa: E402


class BuildExt(build_ext):
    """Builds the cffi extension, then libhsmsim-pkcs11.so into hsmsim/_lib/."""

    def run(self) -> None:
        super().run()
        out = ROOT / "hsmsim" / "_lib" if self.inplace else Path(self.build_lib) / "hsmsim" / "_lib"
        build_native.build_pkcs11(out)


class BuildPy(build_py):
    """Ships the SoftHSM2 configuration templates inside the package (hsmsim/_data/)."""

    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "hsmsim" / "_data"
        dest.mkdir(parents=True, exist_ok=True)
        for f in (ROOT / "softhsm-config").iterdir():
            if f.is_file():
                shutil.copy2(f, dest / f.name)


setup(
    cffi_modules=["native/build_native.py:_ffibuilder"],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
