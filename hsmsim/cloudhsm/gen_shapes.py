"""Developer tool: regenerates `hsmsim/cloudhsm/shapes.py` from the installed botocore's
CloudHSMv2 model (documentation stripped). Run `python -m hsmsim.cloudhsm.gen_shapes` after
upgrading botocore."""

from __future__ import annotations

import gzip
import json
import pprint
import sys
from pathlib import Path
from typing import Any


def generate() -> str:
    import botocore  # type: ignore[import-untyped]
    data = Path(botocore.__file__).parent / "data/cloudhsmv2/2017-04-28"
    src = data / "service-2.json.gz"
    m = json.load(gzip.open(src)) if src.exists() else json.loads((data / "service-2.json").read_text())
    ops = {n: {"input": o.get("input", {}).get("shape"), "output": o.get("output", {}).get("shape"),
               "errors": [e["shape"] for e in o.get("errors", [])]} for n, o in m["operations"].items()}
    shapes: dict[str, dict[str, Any]] = {}
    for n, s in m["shapes"].items():
        d: dict[str, Any] = {"type": s["type"]}
        for k in ("min", "max", "enum", "pattern", "required", "exception", "fault"):
            if k in s:
                d[k] = s[k]
        if s["type"] == "structure":
            d["members"] = {mn: mv["shape"] for mn, mv in s["members"].items()}
        if s["type"] == "list":
            d["member"] = s["member"]["shape"]
        if s["type"] == "map":
            d["key"], d["value"] = s["key"]["shape"], s["value"]["shape"]
        shapes[n] = d
    return ('"""The CloudHSMv2 API model as data: operations (input/output shapes, modelled errors)\n'
            "and shapes (types, lengths, enums, patterns, required members), generated from botocore\n"
            "%s's `botocore/data/cloudhsmv2/2017-04-28/service-2.json` with documentation stripped\n"
            "by `python -m hsmsim.cloudhsm.gen_shapes`. Regenerate rather than edit; the wire layer\n"
            'validates requests against it."""\n\n'
            "from typing import Any\n\n"
            "API_VERSION = %r\n"
            "TARGET_PREFIX = %r\n\n"
            "OPERATIONS: dict[str, dict[str, Any]] = %s\n\n"
            "SHAPES: dict[str, dict[str, Any]] = %s\n"
            % (botocore.__version__, m["metadata"]["apiVersion"], m["metadata"]["targetPrefix"],
               pprint.pformat(ops, width=100, sort_dicts=True),
               pprint.pformat(shapes, width=100, sort_dicts=True)))


def main() -> int:
    out = Path(__file__).with_name("shapes.py")
    out.write_text(generate())
    print(f"written: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
