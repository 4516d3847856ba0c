"""`python -m hsmsim.bench AREA`: runs one area's benchmark (or all) and prints markdown tables.

Each area is a module of hsmsim.bench whose `main() -> str` prints and returns its markdown
table(s)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from hsmsim.bench import cluster, core, kms, node, pkcs11, tls

AREAS: dict[str, Callable[[], str]] = {
    "core": core.main, "node": node.main, "cluster": cluster.main,
    "pkcs11": pkcs11.main, "kms": kms.main, "tls": tls.main,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in (*AREAS, "all"):
        print(f"usage: python -m hsmsim.bench {{{','.join(AREAS)},all}}", file=sys.stderr)
        return 2
    areas = tuple(AREAS) if argv[0] == "all" else (argv[0],)
    tables = [AREAS[area]() for area in areas]
    if argv[0] == "all":
        Path("bench-results").mkdir(exist_ok=True)
        Path("bench-results/bench.md").write_text("\n".join(tables))
        print("written: bench-results/bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
