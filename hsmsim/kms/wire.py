"""The AWS JSON 1.1 wire edge of the KMS: reads an operation's input from a request body and
validates it against the KMS model (types, required members, lengths, ranges, enums, patterns),
encodes outputs, and translates domain errors into AWS error codes, HTTP statuses and bodies
from one table. Nothing below this module sees JSON or produces a wire error."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from hsmsim.kms import errors as e
from hsmsim.kms.shapes import OPERATIONS, SHAPES

TARGET_PREFIX = "TrentService."
CONTENT_TYPE = "application/x-amz-json-1.1"

# Domain error class -> (AWS error code, HTTP status). The three modelled faults are 5xx.
ERROR_TABLE: dict[type[e.KmsError], tuple[str, int]] = {
    e.Invalid: ("ValidationException", 400),
    e.Malformed: ("SerializationException", 400),
    e.UnknownOperation: ("UnknownOperationException", 400),
    e.AccessDenied: ("AccessDeniedException", 400),
    e.AuthMissing: ("MissingAuthenticationTokenException", 403),
    e.AuthIncomplete: ("IncompleteSignatureException", 400),
    e.AuthUnknownKey: ("UnrecognizedClientException", 400),
    e.AuthBadSignature: ("InvalidSignatureException", 400),
    e.AuthExpired: ("InvalidSignatureException", 400),
    e.Throttled: ("ThrottlingException", 400),
    # FIDELITY: AWS's front end answers an oversized body with a bare 413; we add a JSON body
    # with code RequestEntityTooLargeException so clients get a readable error.
    e.TooLarge: ("RequestEntityTooLargeException", 413),
    e.NotFound: ("NotFoundException", 400),
    e.InvalidArn: ("InvalidArnException", 400),
    # FIDELITY: the reserved `alias/aws/` prefix is refused with NotAuthorizedException, as
    # local-kms does after real KMS; the exact AWS message is not published.
    e.NotAuthorized: ("NotAuthorizedException", 400),
    e.AlreadyExists: ("AlreadyExistsException", 400),
    e.Disabled: ("DisabledException", 400),
    e.InvalidState: ("KMSInvalidStateException", 400),
    e.InvalidCiphertext: ("InvalidCiphertextException", 400),
    e.IncorrectKey: ("IncorrectKeyException", 400),
    e.InvalidKeyUsage: ("InvalidKeyUsageException", 400),
    e.InvalidGrantToken: ("InvalidGrantTokenException", 400),
    e.InvalidGrantId: ("InvalidGrantIdException", 400),
    e.InvalidAliasName: ("InvalidAliasNameException", 400),
    e.InvalidMarker: ("InvalidMarkerException", 400),
    e.InvalidSignature: ("KMSInvalidSignatureException", 400),
    e.InvalidMac: ("KMSInvalidMacException", 400),
    e.LimitExceeded: ("LimitExceededException", 400),
    e.MalformedPolicy: ("MalformedPolicyDocumentException", 400),
    e.TagError: ("TagException", 400),
    e.Unsupported: ("UnsupportedOperationException", 400),
    e.DryRun: ("DryRunOperationException", 400),
    e.Conflict: ("ConflictException", 400),
    e.StoreNotFound: ("CustomKeyStoreNotFoundException", 400),
    e.StoreNameInUse: ("CustomKeyStoreNameInUseException", 400),
    e.StoreInvalidState: ("CustomKeyStoreInvalidStateException", 400),
    e.StoreHasKeys: ("CustomKeyStoreHasCMKsException", 400),
    e.ClusterNotFound: ("CloudHsmClusterNotFoundException", 400),
    e.ClusterNotActive: ("CloudHsmClusterNotActiveException", 400),
    e.ClusterInUse: ("CloudHsmClusterInUseException", 400),
    e.ClusterInvalidConfiguration: ("CloudHsmClusterInvalidConfigurationException", 400),
    e.ClusterNotRelated: ("CloudHsmClusterNotRelatedException", 400),
    e.IncorrectTrustAnchor: ("IncorrectTrustAnchorException", 400),
    e.InvalidImportToken: ("InvalidImportTokenException", 400),
    e.ExpiredImportToken: ("ExpiredImportTokenException", 400),
    e.IncorrectKeyMaterial: ("IncorrectKeyMaterialException", 400),
    e.Internal: ("KMSInternalException", 500),
    e.DependencyTimeout: ("DependencyTimeoutException", 503),
    e.KeyUnavailable: ("KeyUnavailableException", 500),
}

# Shapes whose values are never echoed in validation messages.
_SENSITIVE = {"KeyStorePasswordType", "PlaintextType", "XksProxyAuthenticationRawSecretAccessKeyType",
              "TrustAnchorCertificateType", "GrantTokenType"}


@dataclass(frozen=True)
class WireError:
    code: str
    status: int
    message: str

    def body(self) -> bytes:
        return json.dumps({"__type": self.code, "message": self.message}).encode()


def to_wire(exc: e.KmsError) -> WireError:
    """The AWS error for a domain error: the nearest class in the table wins."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            code, status = ERROR_TABLE[cls]
            return WireError(code, status, exc.message)
    return WireError("KMSInternalException", 500, "")


def operation_name(target: str | None) -> str:
    """The operation named by an X-Amz-Target header, or UnknownOperation."""
    if not target or not target.startswith(TARGET_PREFIX):
        raise e.UnknownOperation("")
    name = target[len(TARGET_PREFIX):]
    if name not in OPERATIONS:
        raise e.UnknownOperation("")
    return name


def _camel(name: str) -> str:
    return name[:1].lower() + name[1:]


@lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


class _Decoder:
    def __init__(self) -> None:
        self.violations: list[str] = []

    def _violate(self, shape_name: str, value: Any, path: str, constraint: str) -> None:
        shown = ""
        if shape_name not in _SENSITIVE and isinstance(value, (str, int)) and not isinstance(value, bool):
            text = str(value)
            shown = f" '{text}'" if len(text) <= 256 else ""
        elif value is None:
            shown = " null"
        self.violations.append(f"Value{shown} at '{path}' failed to satisfy constraint: {constraint}")

    def decode(self, shape_name: str, value: Any, path: str) -> Any:
        shape = SHAPES[shape_name]
        typ = shape["type"]
        if typ == "structure":
            if not isinstance(value, dict):
                raise e.Malformed(f"Expected a JSON object at '{path or 'input'}'")
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
                raise e.Malformed(f"STRING_VALUE expected at '{path}'")
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
                raise e.Malformed(f"Base64 string expected at '{path}'")
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise e.Malformed(f"Invalid base64 at '{path}'") from None
            self._lengths(shape_name, shape, data, len(data), path)
            return data
        if typ == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                raise e.Malformed(f"Integer expected at '{path}'")
            if "min" in shape and value < shape["min"]:
                self._violate(shape_name, value, path,
                              f"Member must have value greater than or equal to {shape['min']}")
            if "max" in shape and value > shape["max"]:
                self._violate(shape_name, value, path,
                              f"Member must have value less than or equal to {shape['max']}")
            return value
        if typ == "boolean":
            if not isinstance(value, bool):
                raise e.Malformed(f"Boolean expected at '{path}'")
            return value
        if typ == "timestamp":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise e.Malformed(f"Epoch seconds expected at '{path}'")
            return float(value)
        if typ == "list":
            if not isinstance(value, list):
                raise e.Malformed(f"JSON array expected at '{path}'")
            self._lengths(shape_name, shape, value, len(value), path)
            return [self.decode(shape["member"], item, f"{path}.{i + 1}.member")
                    for i, item in enumerate(value)]
        if typ == "map":
            if not isinstance(value, dict):
                raise e.Malformed(f"JSON object expected at '{path}'")
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


# No KMS input nests deeper than 5 (Tags -> tag -> member); a document deeper than this is
# refused before parsing, so that neither the JSON parser nor the decoder recurses on it.
# FIDELITY: AWS's nesting limit is undocumented; beyond ours the answer is 400
# SerializationException, as AWS gives for deeply nested JSON.
MAX_DEPTH = 32
_NESTING = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets in strings ignored)."""
    depth = deepest = 0
    for m in _NESTING.finditer(body):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def parse_json(body: bytes) -> Any:
    """A request body as JSON; Malformed (SerializationException) for anything that is not a
    JSON text or nests deeper than MAX_DEPTH. Never a RecursionError."""
    # Only a body with many brackets is scanned (bytes.count is cheap; the scan is not).
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth(body) > MAX_DEPTH:
        raise e.Malformed(f"Request body nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise e.Malformed("Request body is not valid JSON") from None


def decode_request(op: str, body: bytes) -> dict[str, Any]:
    """An operation's validated input, blobs decoded to bytes and timestamps to epoch floats."""
    if not body.strip():
        body = b"{}"  # FIDELITY: an empty body is read as {} (botocore always sends a body)
    raw = parse_json(body)
    shape = OPERATIONS[op]["input"]
    if shape is None:
        return {}
    decoder = _Decoder()
    out = decoder.decode(shape, raw, "")
    if decoder.violations:
        n = len(decoder.violations)
        head = f"{n} validation error{'s' if n > 1 else ''} detected: "
        raise e.Invalid(head + "; ".join(decoder.violations))
    assert isinstance(out, dict)
    return out


def _encode(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def encode_response(output: Mapping[str, Any]) -> bytes:
    """A JSON 1.1 response body: bytes as base64, None members left out."""
    # allow_nan=False: a NaN or infinite date is a bug, answered as a 500, never sent as JSON
    # that no client parses.
    return json.dumps(_encode(dict(output)), separators=(",", ":"), allow_nan=False).encode()
