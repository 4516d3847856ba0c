"""The TLS kit's one exception type; the CLI turns it into a one-line message."""

from __future__ import annotations

from hsmsim.errors import HsmsimError


class TlsError(HsmsimError):
    """A TLS-kit step failed; the message says which step and why, never a PIN or key."""
