"""The CloudHSMv2 control plane's domain errors, in CloudHSM's own terms. They carry the human
message only; `hsmsim.cloudhsm.wire` turns each class into an AWS error code and HTTP status
from one table. No message may contain key material or passwords."""

from __future__ import annotations

from hsmsim.errors import HsmsimError


class CloudHsmError(HsmsimError):
    """Root of the control plane's domain errors."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class Invalid(CloudHsmError):
    """A request value breaks the model's constraints (ValidationException)."""


class Malformed(CloudHsmError):
    """The body cannot be read as the operation's input (SerializationException)."""


class UnknownOperation(CloudHsmError): ...
class AuthMissing(CloudHsmError): ...
class AuthIncomplete(CloudHsmError): ...
class AuthUnknownKey(CloudHsmError): ...
class AuthBadSignature(CloudHsmError): ...
class TooLarge(CloudHsmError): ...


class InvalidRequest(CloudHsmError):
    """The request is well formed but not allowed now (CloudHsmInvalidRequestException)."""


class NotFound(CloudHsmError):
    """No such cluster, HSM, backup or policy in this Region (CloudHsmResourceNotFoundException)."""


class AccessDenied(CloudHsmError): ...
class TagError(CloudHsmError): ...
class LimitExceeded(CloudHsmError): ...
class Internal(CloudHsmError): ...
