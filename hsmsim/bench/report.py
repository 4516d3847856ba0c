"""Renders benchmark rows as one markdown table; rows are plain dicts with the same keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def render(title: str, rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table, columns in first-seen key order, under a '### title' heading."""
    if not rows:
        return f"### {title}\n\n(no rows)\n"
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None
