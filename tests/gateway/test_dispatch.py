"""The gateway's one opcode -> handler table: every opcode of the protocol has a handler or an
explicit refusal, and nothing is dispatched by reflection on method names."""

from __future__ import annotations

import ast
from pathlib import Path

from hsmsim.gateway import dispatch as D
from hsmsim.gateway.config import GatewayConfig
from hsmsim.gateway.protocol import Op, Reader, Writer
from hsmsim.gateway.service import Gateway
from hsmsim.gateway.state import Application
from hsmsim.pkcs11.constants import RV

GATEWAY = Path(D.__file__).resolve().parent


def test_every_opcode_has_a_handler_or_an_explicit_refusal() -> None:
    # HELLO is the handshake: the server answers it before any handler runs.
    assert set(D.HANDLERS) == set(Op) - {Op.HELLO}
    for op, handler in D.HANDLERS.items():
        assert callable(handler), op.name
    refused = {op for op, h in D.HANDLERS.items() if h is D.not_supported}
    # the PKCS#11 functions the module answers itself or CloudHSM does not offer
    assert refused == {Op.Initialize, Op.GetInfo, Op.GetFunctionList, Op.InitToken, Op.InitPIN,
                       Op.SetPIN, Op.GetOperationState, Op.SetOperationState, Op.DigestKey,
                       Op.SignRecoverInit, Op.SignRecover, Op.VerifyRecoverInit, Op.VerifyRecover,
                       Op.DigestEncryptUpdate, Op.DecryptDigestUpdate, Op.SignEncryptUpdate,
                       Op.DecryptVerifyUpdate, Op.SeedRandom, Op.GetFunctionStatus,
                       Op.CancelFunction, Op.WaitForSlotEvent}


def test_a_refused_opcode_answers_function_not_supported() -> None:
    gw = Gateway(None, GatewayConfig())  # type: ignore[arg-type]  # never reaches the cluster
    app = Application(b"t" * 16, 1)
    # an opcode beyond the enum is refused the same way
    for op in (int(Op.SeedRandom), int(Op.DigestKey), int(Op.WaitForSlotEvent), 999):
        assert D.dispatch(gw, app, op, memoryview(b"")) == (RV.FUNCTION_NOT_SUPPORTED, b"")


def test_handlers_answer_from_the_table() -> None:
    gw = Gateway(None, GatewayConfig(fips_mode=True))  # type: ignore[arg-type]
    rv, body = D.dispatch(gw, Application(b"t" * 16, 1), int(Op.GetSlotList),  # type: ignore[misc]
                          memoryview(Writer().u8(1).done()))
    r = Reader(body)
    assert rv == 0 and [r.u64() for _ in range(r.u32())] == [1]


def _calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name == "iscoroutinefunction" or (name == "getattr" and len(node.args) >= 2
                                                 and isinstance(node.args[1], ast.JoinedStr)):
                found.append(f"{path.name}:{node.lineno} {name}")
    return found


def test_no_dispatch_by_reflection() -> None:
    found = [c for p in sorted(GATEWAY.glob("*.py")) for c in _calls(p)]
    assert not found, found
