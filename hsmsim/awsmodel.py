"""AWS JSON-protocol service models as data: loads a trimmed botocore model shipped as package
data, validates a decoded request against it (types, required members, lengths, ranges, enums,
patterns: the violations AWS reports as ValidationException) and builds the operation's typed
input (generated frozen dataclasses, snake_case fields) from the validated members. It knows no
service: the KMS wire edge uses it, and any other botocore JSON service can (tools/gen_aws_model.py
writes the model and the dataclasses)."""

from __future__ import annotations

import base64
import binascii
import json
import keyword
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


class ModelError(Exception):
    """A request that does not fit the model; the service's wire edge translates it once."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Malformed(ModelError):
    """A value of the wrong JSON type, or a blob that is not base64 (SerializationException)."""


class Invalid(ModelError):
    """Well-typed values that break the model's constraints (ValidationException)."""


@dataclass(frozen=True)
class ServiceModel:
    """One service's operations (input/output shape names, modelled errors) and shapes (type,
    constraints, member shape names), as trimmed by tools/gen_aws_model.py."""

    api_version: str
    operations: Mapping[str, Mapping[str, Any]]
    shapes: Mapping[str, Mapping[str, Any]]


def load(path: Path) -> ServiceModel:
    data = json.loads(path.read_text())
    return ServiceModel(data["metadata"]["apiVersion"], data["operations"], data["shapes"])


_SNAKE_1 = re.compile(r"([A-Z]+)([A-Z][a-z])")
_SNAKE_2 = re.compile(r"([a-z0-9])([A-Z])")


@lru_cache(maxsize=None)
def snake(name: str) -> str:
    """The Python field name of a wire member name: `CiphertextBlob` -> `ciphertext_blob`,
    `AWSAccountId` -> `aws_account_id`; a Python keyword gets a trailing underscore."""
    out = _SNAKE_2.sub(r"\1_\2", _SNAKE_1.sub(r"\1_\2", name)).lower()
    return out + "_" if keyword.iskeyword(out) else out


def error_entry(table: Mapping[type, tuple[str, int]], exc: BaseException,
                fallback: type) -> tuple[str, int, bool]:
    """An endpoint's (code, HTTP status) for a domain error: the entry of the nearest class of
    `exc` in `table`, else `fallback`'s; the flag says whether `exc` itself was found (an error
    not in the table is a bug: its message is not shown)."""
    for cls in type(exc).__mro__:
        if cls in table:
            code, status = table[cls]
            return code, status, True
    code, status = table[fallback]
    return code, status, False


# No AWS JSON input of the services served here nests deeper than a handful of levels (KMS:
# Tags -> tag -> member); a document deeper than MAX_DEPTH is refused before parsing, so that
# neither the JSON parser nor a decoder recurses on it. FIDELITY: AWS's nesting limit is
# undocumented; beyond ours the answer is each service's "malformed request" error.
MAX_DEPTH = 32
_NESTING = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def too_deep(body: bytes) -> bool:
    """Whether a JSON text nests arrays and objects deeper than MAX_DEPTH (brackets inside
    strings ignored); cheap for the usual shallow body."""
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return False
    depth = 0
    for m in _NESTING.finditer(body):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif c in (b"]", b"}"):
            depth -= 1
    return False


def _camel(name: str) -> str:
    return name[:1].lower() + name[1:]


@lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


class Decoder:
    """One request's walk over the model: `decode` returns the members AWS would accept (blobs
    as bytes, timestamps as epoch floats, unknown and null members dropped), raises Malformed
    at the first value of the wrong type, and collects constraint violations in AWS's words.
    Values of `sensitive` shapes are never echoed in a violation."""

    def __init__(self, shapes: Mapping[str, Mapping[str, Any]], sensitive: Collection[str] = ()) -> None:
        self.shapes = shapes
        self.sensitive = sensitive
        self.violations: list[str] = []

    def _violate(self, shape_name: str, value: Any, path: str, constraint: str) -> None:
        shown = ""
        if shape_name not in self.sensitive and isinstance(value, (str, int)) and not isinstance(value, bool):
            text = str(value)
            shown = f" '{text}'" if len(text) <= 256 else ""
        elif value is None:
            shown = " null"
        self.violations.append(f"Value{shown} at '{path}' failed to satisfy constraint: {constraint}")

    def decode(self, shape_name: str, value: Any, path: str) -> Any:
        shape = self.shapes[shape_name]
        typ = shape["type"]
        if typ == "structure":
            if not isinstance(value, dict):
                raise Malformed(f"Expected a JSON object at '{path or 'input'}'")
            out: dict[str, Any] = {}
            members: Mapping[str, str] = shape["members"]
            for req in shape.get("required", ()):
                if value.get(req) is None:
                    self._violate(members[req], None, self._join(path, req), "Member must not be null")
            for name, raw in value.items():
                if name not in members or raw is None:
                    continue  # AWS ignores unknown members
                out[name] = self.decode(members[name], raw, self._join(path, name))
            return out
        if typ == "string":
            if not isinstance(value, str):
                raise Malformed(f"STRING_VALUE expected at '{path}'")
            self._lengths(shape_name, shape, value, len(value), path)
            if "enum" in shape and value not in shape["enum"]:
                self._violate(shape_name, value, path,
                              f"Member must satisfy enum value set: [{', '.join(shape['enum'])}]")
            elif "pattern" in shape and not _regex(shape["pattern"]).fullmatch(value):
                self._violate(shape_name, value, path,
                              f"Member must satisfy regular expression pattern: {shape['pattern']}")
            return value
        if typ == "blob":
            if not isinstance(value, str):
                raise Malformed(f"Base64 string expected at '{path}'")
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise Malformed(f"Invalid base64 at '{path}'") from None
            self._lengths(shape_name, shape, data, len(data), path)
            return data
        if typ in ("integer", "long"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise Malformed(f"Integer expected at '{path}'")
            if "min" in shape and value < shape["min"]:
                self._violate(shape_name, value, path,
                              f"Member must have value greater than or equal to {shape['min']}")
            if "max" in shape and value > shape["max"]:
                self._violate(shape_name, value, path,
                              f"Member must have value less than or equal to {shape['max']}")
            return value
        if typ == "boolean":
            if not isinstance(value, bool):
                raise Malformed(f"Boolean expected at '{path}'")
            return value
        if typ == "timestamp":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise Malformed(f"Epoch seconds expected at '{path}'")
            return float(value)
        if typ == "list":
            if not isinstance(value, list):
                raise Malformed(f"JSON array expected at '{path}'")
            self._lengths(shape_name, shape, value, len(value), path)
            return [self.decode(shape["member"], item, f"{path}.{i + 1}.member")
                    for i, item in enumerate(value)]
        if typ == "map":
            if not isinstance(value, dict):
                raise Malformed(f"JSON object expected at '{path}'")
            result: dict[str, Any] = {}
            for k, v in value.items():
                self.decode(shape["key"], k, f"{path}.key")
                result[k] = self.decode(shape["value"], v, f"{path}.{k}.member")
            return result
        return value

    @staticmethod
    def _join(path: str, name: str) -> str:
        return f"{path}.{_camel(name)}" if path else _camel(name)

    def _lengths(self, shape_name: str, shape: Mapping[str, Any], value: Any, n: int, path: str) -> None:
        if "min" in shape and n < shape["min"]:
            self._violate(shape_name, value, path,
                          f"Member must have length greater than or equal to {shape['min']}")
        if "max" in shape and n > shape["max"]:
            self._violate(shape_name, value, path,
                          f"Member must have length less than or equal to {shape['max']}")


def validate(model: ServiceModel, shape_name: str, raw: Any, sensitive: Collection[str] = ()) -> dict[str, Any]:
    """The members of a structure-shaped request that the model accepts; Malformed at the first
    ill-typed value, Invalid naming every constraint violation ("N validation errors detected")."""
    decoder = Decoder(model.shapes, sensitive)
    out = decoder.decode(shape_name, raw, "")
    if decoder.violations:
        n = len(decoder.violations)
        head = f"{n} validation error{'s' if n > 1 else ''} detected: "
        raise Invalid(head + "; ".join(decoder.violations))
    assert isinstance(out, dict)
    return out


def build(shapes: Mapping[str, Mapping[str, Any]], shape_name: str, value: Any,
          classes: Mapping[str, type[Any]]) -> Any:
    """The typed form of a validated value: a structure becomes its generated dataclass
    (`classes[shape name]`, fields in snake_case, absent members None), a list a tuple; maps
    stay dicts, scalars as decoded. Only for output of `validate`."""
    shape = shapes[shape_name]
    typ = shape["type"]
    if typ == "structure":
        members: Mapping[str, str] = shape["members"]
        return classes[shape_name](**{snake(wire): build(shapes, members[wire], v, classes)
                                      for wire, v in value.items()})
    if typ == "list":
        return tuple(build(shapes, shape["member"], item, classes) for item in value)
    if typ == "map":
        return {k: build(shapes, shape["value"], v, classes) for k, v in value.items()}
    return value
