"""PKCS#11 failures: one exception class per CKR_* return value, chosen from a dict.

`Pkcs11Error(RV.KEY_HANDLE_INVALID, "...")` constructs the matching subclass, so domain code
raises by return value and boundaries translate back with `.rv`."""

from __future__ import annotations

from typing import Any

from hsmsim.errors import HsmsimError
from hsmsim.pkcs11.constants import RV


class Pkcs11Error(HsmsimError):
    """A PKCS#11 operation failed with return value `rv`; the message is for logs, never for
    key material."""

    rv: RV = RV.GENERAL_ERROR

    def __new__(cls, rv: int | RV | None = None, message: str = "") -> "Pkcs11Error":
        if cls is Pkcs11Error and rv is not None:
            cls = ERRORS.get(int(rv), Pkcs11Error)
        return super().__new__(cls)

    def __init__(self, rv: int | RV | None = None, message: str = "") -> None:
        if rv is not None:
            try:
                self.rv = RV(int(rv))
            except ValueError:
                self.rv = RV.GENERAL_ERROR
        super().__init__(message or f"CKR_{self.rv.name}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Pkcs11Error, (int(self.rv), str(self)))


def _class_name(rv: RV) -> str:
    return "".join(part.capitalize() for part in rv.name.split("_"))


ERRORS: dict[int, type[Pkcs11Error]] = {
    int(rv): type(_class_name(rv), (Pkcs11Error,), {"rv": rv, "__doc__": f"CKR_{rv.name}"})
    for rv in RV
    if rv is not RV.OK
}


def error_class(rv: RV) -> type[Pkcs11Error]:
    """The exception class for one return value, for `except error_class(RV.X)`."""
    return ERRORS[int(rv)]
