"""The gateway's opcode table and protocol version are the C header's: the Python enum is
checked against `HSMSIM_FUNCTIONS` (an opcode is the function's 1-based place in it) and the
`HSMSIM_PROTO_*` constants, so the two sides cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

from hsmsim.gateway import protocol as P
from hsmsim.gateway.protocol import Op

HEADER = Path(__file__).resolve().parents[2] / "native" / "pkcs11" / "hsmsim_pkcs11.h"


def _header_functions() -> list[str]:
    text = HEADER.read_text()
    block = text[text.index("#define HSMSIM_FUNCTIONS(X)"):]
    block = block[:block.index("\n\n")]
    return re.findall(r"\bX\((C_\w+),", block)


def test_every_python_opcode_is_the_headers() -> None:
    functions = _header_functions()
    assert functions[0] == "C_Initialize" and len(functions) == 68  # PKCS#11 2.40's list
    from_header = {name: place for place, name in enumerate(functions, start=1)}
    for op in Op:
        if op is Op.HELLO:
            assert op.value == 0
            continue
        assert from_header.get(f"C_{op.name}") == op.value, op


def test_protocol_constants_are_the_headers() -> None:
    text = HEADER.read_text()

    def define(name: str) -> int:
        m = re.search(rf"#define {name} (0x[0-9A-Fa-f]+|\d+)u?", text)
        assert m, name
        return int(m.group(1), 0)
    assert define("HSMSIM_PROTO_MAGIC") == P.MAGIC
    assert define("HSMSIM_PROTO_MAJOR") == P.MAJOR
    assert define("HSMSIM_PROTO_MINOR") == P.MINOR
