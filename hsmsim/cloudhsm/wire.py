"""The wire edge of the CloudHSMv2 endpoint. Two protocols carry the same operations: AWS JSON
1.1 (`POST /`, `X-Amz-Target: BaldrApiService.<Op>`, what the issue and older SDKs use) and
Smithy RPC v2 CBOR (`POST /service/BaldrApiService/operation/<Op>`, which botocore 1.36+
prefers for this service). Both validate the input against botocore's model (types, required
members, lengths, ranges, enums, patterns) with the KMS wire layer's approach and messages,
encode outputs, and translate domain errors into AWS codes and statuses from one table."""

from __future__ import annotations

import datetime as _dt
import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from hsmsim import awsmodel
from hsmsim.cloudhsm import cbor
from hsmsim.cloudhsm import errors as e
from hsmsim.cloudhsm.inputs import STRUCTURES
from hsmsim.cloudhsm.shapes import OPERATIONS, SHAPES, TARGET_PREFIX

JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
CBOR_CONTENT_TYPE = "application/cbor"
RPC_V2_PREFIX = f"/service/{TARGET_PREFIX}/operation/"

ERROR_TABLE: dict[type[e.CloudHsmError], tuple[str, int]] = {
    e.Invalid: ("ValidationException", 400),
    e.Malformed: ("SerializationException", 400),
    e.UnknownOperation: ("UnknownOperationException", 400),
    e.AuthMissing: ("MissingAuthenticationTokenException", 403),
    e.AuthIncomplete: ("IncompleteSignatureException", 400),
    e.AuthUnknownKey: ("UnrecognizedClientException", 400),
    e.AuthBadSignature: ("InvalidSignatureException", 400),
    # FIDELITY: AWS's front end answers an oversized body with a bare 413; ours has a body.
    e.TooLarge: ("RequestEntityTooLargeException", 413),
    e.InvalidRequest: ("CloudHsmInvalidRequestException", 400),
    e.NotFound: ("CloudHsmResourceNotFoundException", 400),
    e.AccessDenied: ("CloudHsmAccessDeniedException", 400),
    e.TagError: ("CloudHsmTagException", 400),
    e.LimitExceeded: ("CloudHsmResourceLimitExceededException", 400),
    e.Internal: ("CloudHsmInternalFailureException", 500),
}

# Shapes whose values are never echoed in validation messages.
_SENSITIVE = {"Cert", "ResourcePolicy", "PreCoPassword"}


@dataclass(frozen=True)
class WireError:
    code: str
    status: int
    message: str

    def fields(self) -> dict[str, str]:
        # botocore reads `message` or `Message`; the model's member is `Message`
        return {"__type": self.code, "Message": self.message}


def to_wire(exc: e.CloudHsmError) -> WireError:
    """The AWS error for a domain error: the nearest class in the table wins."""
    code, status, found = awsmodel.error_entry(ERROR_TABLE, exc, e.Internal)
    return WireError(code, status, exc.message if found else "")


def operation_from_target(target: str | None) -> str:
    if not target or not target.startswith(TARGET_PREFIX + "."):
        raise e.UnknownOperation("")
    name = target[len(TARGET_PREFIX) + 1:]
    if name not in OPERATIONS:
        raise e.UnknownOperation("")
    return name


def operation_from_path(path: str) -> str:
    name = path[len(RPC_V2_PREFIX):] if path.startswith(RPC_V2_PREFIX) else ""
    if name not in OPERATIONS:
        raise e.UnknownOperation("")
    return name


# Smithy patterns use Java's \p{L} (letter), \p{Z} (separator), \p{N} (number) classes, which
# Python's re lacks: such a pattern (the tag key and value ones) is checked per character.
_UNICODE_CLASS = re.compile(r"\\p\{([A-Z])\}")


@lru_cache(maxsize=None)
def _matcher(pattern: str) -> Callable[[str], bool]:
    """A check for a pattern of the form ^([<classes and characters>]*)$ with \\p{X} classes."""
    m = re.fullmatch(r"\^?\(\[(.*)\]\*\)\$?", pattern)
    if m is None:
        raise ValueError(f"unsupported pattern {pattern!r}")
    majors = tuple(_UNICODE_CLASS.findall(m.group(1)))
    allowed = set(_UNICODE_CLASS.sub("", m.group(1)).replace("\\", ""))
    return lambda s: all(c in allowed or unicodedata.category(c)[0] in majors for c in s)


class _Decoder(awsmodel.Decoder):
    """The shared AWS model walk (`hsmsim.awsmodel`, as the KMS uses it) with what this model
    needs beyond it: patterns with Unicode classes (the tag patterns) and map sizes (Filters
    has at most 30 entries)."""

    def decode(self, shape_name: str, value: Any, path: str) -> Any:
        shape = self.shapes[shape_name]
        pattern = shape.get("pattern")
        if shape["type"] == "string" and isinstance(value, str) and pattern and "\\p{" in pattern:
            self._lengths(shape_name, shape, value, len(value), path)
            if not _matcher(pattern)(value):
                self._violate(shape_name, value, path,
                              f"Member must satisfy regular expression pattern: {pattern}")
            return value
        if shape["type"] == "map" and isinstance(value, dict):
            self._lengths(shape_name, shape, value, len(value), path)
        return super().decode(shape_name, value, path)



def parse_body(body: bytes, cbor_body: bool) -> Any:
    """A request body (JSON or CBOR) as plain values; Malformed for anything else."""
    if not body.strip():
        return {}  # FIDELITY: an empty body is read as an empty input
    if cbor_body:
        try:
            return cbor.loads(body)
        except cbor.CborError as exc:
            raise e.Malformed(f"Request body is not valid CBOR ({exc})") from None
    if awsmodel.too_deep(body):
        raise e.Malformed(f"Request body nests deeper than {awsmodel.MAX_DEPTH} levels")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise e.Malformed("Request body is not valid JSON") from None


def decode_request(op: str, raw: Any) -> dict[str, Any]:
    """An operation's validated input."""
    shape = OPERATIONS[op]["input"]
    if shape is None:
        return {}
    decoder = _Decoder(SHAPES, _SENSITIVE)
    try:
        out = decoder.decode(shape, raw, "")
    except awsmodel.Malformed as exc:
        raise e.Malformed(exc.message) from None
    if decoder.violations:
        n = len(decoder.violations)
        head = f"{n} validation error{'s' if n > 1 else ''} detected: "
        raise e.Invalid(head + "; ".join(decoder.violations))
    assert isinstance(out, dict)
    return out


def typed_input(op: str, params: Mapping[str, Any]) -> Any:
    """The handler's input: `params` (from `decode_request`) as the operation's generated frozen
    dataclass (`hsmsim.cloudhsm.inputs`), so no wire name reaches the handlers."""
    return awsmodel.build(SHAPES, OPERATIONS[op]["input"], params, STRUCTURES)


def _jsonable(value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def encode(output: Mapping[str, Any], cbor_body: bool) -> bytes:
    """A response body: JSON (timestamps as epoch seconds) or CBOR (tag 1)."""
    if cbor_body:
        return cbor.dumps(dict(output))
    return json.dumps(_jsonable(dict(output)), separators=(",", ":"), allow_nan=False).encode()
