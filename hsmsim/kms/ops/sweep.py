"""The periodic sweep: keys whose deletion window is over are deleted, imported material whose
ValidTo has passed is removed, due automatic rotations run, and usage tracking is saved."""

from __future__ import annotations

from hsmsim.kms import model
from hsmsim.kms.ops.imports import remove_material
from hsmsim.kms.ops.keys import delete_now
from hsmsim.kms.ops.rotation import rotate
from hsmsim.kms.runtime import Kms


async def sweep(kms: Kms) -> None:
    """Deletes keys whose waiting period is over and rotates keys whose rotation is due.

    FIDELITY: runs every kms.rotation_check_seconds and after each clock move, so a key is
    deleted (or rotated) up to that long after its date."""
    kms.flush_usage()
    now = kms.clock.now()
    for key in list(kms.store.keys.values()):
        if key.state == model.PENDING_DELETION and key.deletion_date is not None and key.deletion_date <= now:
            await delete_now(kms, key)
        elif key.origin == model.EXTERNAL and key.valid_to is not None and key.valid_to <= now:
            remove_material(kms, key)
        elif key.rotation_enabled and key.next_rotation is not None and key.next_rotation <= now \
                and key.state == model.ENABLED and key.origin == model.AWS_KMS and not kms.is_replica(key):
            await rotate(kms, key, "AUTOMATIC")
