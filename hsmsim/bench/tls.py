"""`make bench` entry for the TLS-offload kit: runs `hsmsim tls bench` with its defaults (a
throw-away cluster, 8 s per setup) and returns its markdown table (ratios to the PEM key file
and to SoftHSM2 through the same engine, measured in the same run)."""

from __future__ import annotations

import sys

from hsmsim.tls.bench import BenchOptions, run


def main() -> str:
    table = run(BenchOptions(progress=sys.stderr)).markdown()
    print(table)
    return table
