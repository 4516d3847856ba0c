"""The control API's operation table (see docs/control-protocol.md): op name -> one handler,
each a thin call into the cluster, the supervisor or the backup store on a ControlContext,
returning plain JSON values."""

from __future__ import annotations

from typing import Any

from hsmsim.control import ops_cluster, ops_users
from hsmsim.control.context import ControlContext, Op
from hsmsim.control.server import Handler, Progress

OPS: dict[str, Op] = {**ops_cluster.OPS, **ops_users.OPS}


def handlers(ctx: ControlContext) -> dict[str, Handler]:
    """The table with every operation bound to `ctx`, as the control server serves it."""
    def bind(op: Op) -> Handler:
        async def handler(args: dict[str, Any], p: Progress) -> Any:
            return await op(ctx, args, p)
        return handler
    return {name: bind(op) for name, op in OPS.items()}
