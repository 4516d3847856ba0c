"""The KMS operations: one async handler per operation, grouped by family. A handler takes the
runtime (`Kms`), the call (`Call`: caller, resources for the audit) and the validated request
as the operation's typed input (`hsmsim.kms.inputs`, snake_case fields, no wire names), and
returns the output members. Handlers raise only domain errors (`hsmsim.kms.errors`)."""

from __future__ import annotations

from typing import Any

from hsmsim.kms.ops import access, aliases, asymmetric, crypto, imports, keys, keystores, multiregion, rotation
from hsmsim.kms.ops.common import Handler

HANDLERS: dict[str, Handler[Any]] = {}
for _mod in (keys, aliases, crypto, asymmetric, rotation, access, keystores, imports, multiregion):
    HANDLERS.update(_mod.HANDLERS)
