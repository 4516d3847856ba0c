"""`python -m hsmsim.bench AREA`: runs one area's benchmark (or all) and prints markdown tables.

Each area is a module `hsmsim.bench.<area>` whose `main() -> str` prints and returns its
markdown table(s)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

AREAS = ("core", "node", "cluster", "pkcs11", "kms", "tls")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in (*AREAS, "all"):
        print(f"usage: python -m hsmsim.bench {{{','.join(AREAS)},all}}", file=sys.stderr)
        return 2
    areas = AREAS if argv[0] == "all" else (argv[0],)
    tables: list[str] = []
    for area in areas:
        try:
            mod = importlib.import_module(f"hsmsim.bench.{area}")
        except ModuleNotFoundError as exc:
            if exc.name != f"hsmsim.bench.{area}":
                raise
            print(f"### {area}\n\n(no benchmark yet)\n")
            continue
        tables.append(mod.main())
    if argv[0] == "all":
        Path("bench-results").mkdir(exist_ok=True)
        Path("bench-results/bench.md").write_text("\n".join(tables))
        print("written: bench-results/bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
