"""How the CLI prints: aligned tables on a terminal, JSON with --json (or when piped and asked),
and a progress bar on stderr for long work."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO


def add_json_flag(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
          out: TextIO = sys.stdout) -> None:
    """An aligned plain-text table with upper-case headers."""
    if not rows:
        print("(none)", file=out)
        return
    cols = list(columns or rows[0].keys())
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip(), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)


def emit(data: Any, as_json: bool, rows: Sequence[dict[str, Any]] | None = None,
         columns: Sequence[str] | None = None) -> None:
    """JSON of `data` with --json, else a table of `rows` (default: data when it is a list)."""
    if as_json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
        print()
    else:
        table(rows if rows is not None else data, columns)


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, stream: TextIO = sys.stderr) -> None:
        self.total, self.label, self.stream, self.done = max(total, 1), label, stream, 0
        self.enabled = stream.isatty()

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self.enabled:
            frac = self.done / self.total
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total}")
            self.stream.flush()

    def report(self, done: int, total: int, label: str = "") -> None:
        """A progress callback (done of total), e.g. for the control API's streamed progress."""
        self.total = max(total, 1)
        self.done = 0
        self.advance(done)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iterate(items: Iterable[Any], total: int, label: str) -> Iterable[Any]:
    with Progress(total, label) as bar:
        for item in items:
            yield item
            bar.advance()
