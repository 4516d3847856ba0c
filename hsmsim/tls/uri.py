"""PKCS#11 URIs (RFC 7512) for the keys the kit makes: formatting, parsing, percent-encoding.

Only the attributes the kit and libp11 use are modelled: path attributes `token`, `object`,
`id`, `type`, and the query attributes `pin-source` and `module-path`. `pin-value` is parsed
(so that a user's URI round-trips) but the kit never writes it."""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from hsmsim.tls.errors import TlsError

SCHEME = "pkcs11:"
OBJECT_TYPES = ("private", "public", "cert", "secret-key", "data")
# RFC 7512 section 2.3: pchar minus ';' and '/', plus unreserved; '&' and '?' are fine in a path
# value but libp11 splits on them, so they are encoded too; so is '$', which nginx would read as
# a variable in `ssl_certificate_key`.
_PATH_SAFE = "-._~!'()*+,=:@"
_QUERY_SAFE = "-._~!'()*+,=:@/"


def _enc(value: str | bytes, safe: str) -> str:
    return quote(value, safe=safe)


def _id_enc(value: bytes) -> str:
    return "".join(f"%{b:02x}" for b in value)


@dataclasses.dataclass(frozen=True)
class Pkcs11Uri:
    """One object's PKCS#11 URI. `id` is raw bytes; every other value is text."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    pin_source: str | None = None
    pin_value: str | None = None
    module_path: str | None = None

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in OBJECT_TYPES:
            raise TlsError(f"PKCS#11 URI type must be one of {', '.join(OBJECT_TYPES)}, "
                           f"not {self.type!r}")

    def replace(self, **changes: Any) -> Pkcs11Uri:
        return dataclasses.replace(self, **changes)

    def without_secrets(self) -> "Pkcs11Uri":
        """The same URI without pin-value (pin-source names a file, not the PIN, and stays)."""
        return dataclasses.replace(self, pin_value=None)

    def __str__(self) -> str:
        path: list[str] = []
        if self.token is not None:
            path.append("token=" + _enc(self.token, _PATH_SAFE))
        if self.object is not None:
            path.append("object=" + _enc(self.object, _PATH_SAFE))
        if self.id is not None:
            path.append("id=" + _id_enc(self.id))
        if self.type is not None:
            path.append("type=" + self.type)
        query: list[str] = []
        if self.pin_source is not None:
            query.append("pin-source=" + _enc(self.pin_source, _QUERY_SAFE))
        if self.pin_value is not None:
            query.append("pin-value=" + _enc(self.pin_value, _QUERY_SAFE))
        if self.module_path is not None:
            query.append("module-path=" + _enc(self.module_path, _QUERY_SAFE))
        text = SCHEME + ";".join(path)
        return text + ("?" + "&".join(query) if query else "")

    @classmethod
    def parse(cls, text: str) -> "Pkcs11Uri":
        """Parses a URI; unknown path attributes are an error naming them (the kit would
        otherwise silently select a different object than the user meant)."""
        if not text.startswith(SCHEME):
            raise TlsError(f"a PKCS#11 URI starts with {SCHEME!r}")
        rest = text[len(SCHEME):]
        path_part, _, query_part = rest.partition("?")
        fields: dict[str, object] = {}
        path_names = {"token": "token", "object": "object", "id": "id", "type": "type"}
        query_names = {"pin-source": "pin_source", "pin-value": "pin_value",
                       "module-path": "module_path"}
        for part, names, sep in ((path_part, path_names, ";"), (query_part, query_names, "&")):
            if not part:
                continue
            for item in part.split(sep):
                name, eq, raw = item.partition("=")
                if not eq or name not in names:
                    raise TlsError(f"unsupported PKCS#11 URI attribute {name!r}")
                field = names[name]
                if field in fields:
                    raise TlsError(f"PKCS#11 URI attribute {name!r} given twice")
                try:
                    value = unquote_to_bytes(raw)
                    fields[field] = value if field == "id" else value.decode("utf-8")
                except UnicodeDecodeError:
                    raise TlsError(f"PKCS#11 URI attribute {name!r} is not UTF-8") from None
        return cls(**fields)  # type: ignore[arg-type]
