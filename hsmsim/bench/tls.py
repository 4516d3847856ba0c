"""`make bench` entry for the TLS-offload kit: runs `hsmsim tls bench` with its defaults (a
throw-away cluster, 8 s per setup) and returns the markdown table."""

from __future__ import annotations

import sys

from hsmsim.tls.bench import BenchOptions, run


def main() -> str:
    table = run(BenchOptions(progress=sys.stderr)).markdown()
    print(table)
    return table
