"""The KMS operations: one async handler per operation, grouped by family. A handler takes the
runtime (`Kms`), the call (`Call`: caller, resources for the audit) and the validated request,
and returns the output members. Handlers raise only domain errors (`hsmsim.kms.errors`)."""

from __future__ import annotations

from hsmsim.kms.ops import access, aliases, asymmetric, crypto, imports, keys, keystores, multiregion, rotation
from hsmsim.kms.ops.common import Handler

HANDLERS: dict[str, Handler] = {}
for _mod in (keys, aliases, crypto, asymmetric, rotation, access, keystores, imports, multiregion):
    HANDLERS.update(_mod.HANDLERS)
