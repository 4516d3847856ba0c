"""The AWS JSON 1.1 wire edge of the KMS: reads an operation's input from a request body,
validates it against the KMS model (types, required members, lengths, ranges, enums, patterns:
`hsmsim.awsmodel`) and builds the handler's typed input, encodes outputs, and translates
domain errors into AWS error codes, HTTP statuses and bodies from one table. Nothing below
this module sees JSON, a wire member name or a wire error."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hsmsim import awsmodel
from hsmsim.kms import errors as e
from hsmsim.kms.inputs import STRUCTURES
from hsmsim.kms.shapes import MODEL, OPERATIONS, SHAPES

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
    # FIDELITY: AWS's front-end connection limits are undocumented; ours answers 503
    # ServiceUnavailableException (which SDKs retry).
    e.Overloaded: ("ServiceUnavailableException", 503),
    # FIDELITY: AWS's front end answers a body that stalls with a bare 408; ours has a body.
    e.RequestTimeout: ("RequestTimeoutException", 408),
    e.NoSuchEndpoint: ("NotFoundException", 404),
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
    code, status, found = awsmodel.error_entry(ERROR_TABLE, exc, e.Internal)
    return WireError(code, status, exc.message if found else "")


def operation_name(target: str | None) -> str:
    """The operation named by an X-Amz-Target header, or UnknownOperation."""
    if not target or not target.startswith(TARGET_PREFIX):
        raise e.UnknownOperation("")
    name = target[len(TARGET_PREFIX):]
    if name not in OPERATIONS:
        raise e.UnknownOperation("")
    return name



def parse_json(body: bytes) -> Any:
    """A request body as JSON; Malformed (SerializationException) for anything that is not a
    JSON text or nests deeper than MAX_DEPTH. Never a RecursionError."""
    # Only a body with many brackets is scanned (bytes.count is cheap; the scan is not).
    if awsmodel.too_deep(body):
        raise e.Malformed(f"Request body nests deeper than {awsmodel.MAX_DEPTH} levels")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise e.Malformed("Request body is not valid JSON") from None


def decode_request(op: str, body: bytes) -> dict[str, Any]:
    """An operation's validated input, keyed by wire member names, blobs decoded to bytes and
    timestamps to epoch floats (the audit record and the edge's own checks read it)."""
    if not body.strip():
        body = b"{}"  # FIDELITY: an empty body is read as {} (botocore always sends a body)
    raw = parse_json(body)
    shape = OPERATIONS[op]["input"]
    if shape is None:
        return {}
    try:
        return awsmodel.validate(MODEL, shape, raw, _SENSITIVE)
    except awsmodel.Malformed as exc:
        raise e.Malformed(exc.message) from None
    except awsmodel.Invalid as exc:
        raise e.Invalid(exc.message) from None


def typed_input(op: str, params: Mapping[str, Any]) -> Any:
    """The handler's input: `params` (from `decode_request`) as the operation's generated frozen
    dataclass (`hsmsim.kms.inputs`), so no wire name reaches the handlers."""
    return awsmodel.build(SHAPES, OPERATIONS[op]["input"], params, STRUCTURES)


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
