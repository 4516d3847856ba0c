"""`hsmsim tls bench --plot FILE.png`: handshakes/s against injected HSM latency, with the PEM
and SoftHSM2 rates as reference lines. Drawn with matplotlib when it is installed, else by a
small built-in rasteriser (3x5 pixel font, zlib PNG) so the flag always works."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

from hsmsim.tls.bench import HSMSIM, PEM, SOFTHSM, BenchResult
from hsmsim.tls.errors import TlsError

TITLE = "TLS 1.2 ECDHE-RSA-2048 handshakes/s vs injected HSM latency"


def _series(result: BenchResult) -> list[tuple[float, float]]:
    points = [(0.0, result.rate(HSMSIM))] + [(p.latency_ms, p.rate) for p in result.latency]
    return sorted((x, y) for x, y in points if y is not None)


def plot_latency(result: BenchResult, path: Path) -> str:
    """Writes the PNG; returns a one-line message saying how it was drawn."""
    series = _series(result)
    if not series:
        raise TlsError("nothing to plot: the cluster setup was not measured")
    refs = [(name, rate) for name, rate in ((PEM, result.rate(PEM)),
                                            (SOFTHSM, result.rate(SOFTHSM))) if rate]
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        path.write_bytes(_png(series, refs))
        return f"wrote {path} (built-in plotter; install matplotlib for a nicer one)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([x for x, _ in series], [y for _, y in series], "o-", label=HSMSIM)
    for (name, rate), style in zip(refs, ("--", ":")):
        ax.axhline(rate, linestyle=style, color="grey", label=name)
    ax.set_xlabel("injected latency on every HSM (ms)")
    ax.set_ylabel("full handshakes/s")
    ax.set_title(TITLE)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path} (matplotlib)"


# ---- the built-in rasteriser -------------------------------------------------------------

_FONT = {  # 3x5 glyphs, rows top to bottom, '#' = ink
    "0": "####.##.##.####", "1": ".#.##..#..#.###", "2": "###..#####..###",
    "3": "###..###..#####", "4": "#.##.####..#..#", "5": "####..###..####",
    "6": "####..####.####", "7": "###..#..#..#..#", "8": "####.#####.####",
    "9": "####.####..####", ".": "............#..", "-": "......###......",
    "/": "..#..#.#..#.#..", "(": ".#.#..#..#...#.", ")": ".#...#..#..#.#.",
    " ": "...............", ":": "....#.....#....", "=": "...###...###...",
    "A": ".#.#.#####.##.#", "B": "##.#.###.#.###.", "C": "####..#..#..###",
    "D": "##.#.##.##.###.", "E": "####..####..###", "F": "####..####..#..",
    "G": "####..#.##.####", "H": "#.##.#####.##.#", "I": "###.#..#..#.###",
    "J": "..#..#..##.####", "K": "#.##.###.#.##.#", "L": "#..#..#..#..###",
    "M": "#.########.##.#", "N": "##.#.##.##.##.#", "O": "####.##.##.####",
    "P": "####.#####..#..", "Q": "####.##.####..#", "R": "####.###.#.##.#",
    "S": "####..###..####", "T": "###.#..#..#..#.", "U": "#.##.##.##.####",
    "V": "#.##.##.##.#.#.", "W": "#.##.########.#", "X": "#.##.#.#.#.##.#",
    "Y": "#.##.#.#..#..#.", "Z": "###..#.#.#..###", "+": "....#.###.#....",
}


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, rgb: tuple[int, int, int], size: int = 1) -> None:
        for dx in range(size):
            for dy in range(size):
                xx, yy = x + dx, y + dy
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = (yy * self.w + xx) * 3
                    self.px[i:i + 3] = bytes(rgb)

    def line(self, x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int],
             width: int = 1, dash: int = 0) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            if dash and (i // dash) % 2:
                continue
            x = round(x0 + (x1 - x0) * i / steps)
            y = round(y0 + (y1 - y0) * i / steps)
            self.dot(x - width // 2, y - width // 2, rgb, width)

    def text(self, x: int, y: int, s: str, rgb: tuple[int, int, int] = (0, 0, 0),
             scale: int = 2) -> None:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "]).ljust(15, ".")
            for r in range(5):
                for c in range(3):
                    if glyph[r * 3 + c] == "#":
                        self.dot(x + c * scale, y + r * scale, rgb, scale)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3])
                       for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return float(next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw))


def _label(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.0f}"


def _png(series: list[tuple[float, float]], refs: list[tuple[str, float]]) -> bytes:
    w, h, left, right, top, bottom = 720, 440, 80, 24, 50, 60
    cv = _Canvas(w, h)
    xmax = max(x for x, _ in series) or 1.0
    ymax = max([y for _, y in series] + [r for _, r in refs]) * 1.1 or 1.0
    xstep, ystep = _nice_step(xmax), _nice_step(ymax)
    xmax = math.ceil(xmax / xstep) * xstep
    ymax = math.ceil(ymax / ystep) * ystep

    def sx(x: float) -> int:
        return round(left + (w - left - right) * x / xmax)

    def sy(y: float) -> int:
        return round(h - bottom - (h - top - bottom) * y / ymax)

    black, grey, blue = (0, 0, 0), (150, 150, 150), (31, 119, 180)
    cv.text(left, 14, TITLE, black, 2)
    cv.line(left, h - bottom, w - right, h - bottom, black)
    cv.line(left, top, left, h - bottom, black)
    v = 0.0
    while v <= xmax + 1e-9:
        cv.line(sx(v), h - bottom, sx(v), h - bottom + 5, black)
        cv.text(sx(v) - 4 * len(_label(v)), h - bottom + 10, _label(v))
        v += xstep
    v = 0.0
    while v <= ymax + 1e-9:
        cv.line(left - 5, sy(v), left, sy(v), black)
        cv.line(left + 1, sy(v), w - right, sy(v), (230, 230, 230))
        cv.text(left - 10 - 8 * len(_label(v)), sy(v) - 5, _label(v))
        v += ystep
    cv.text(left + 150, h - 22, "INJECTED HSM LATENCY (MS)")
    cv.text(6, top - 22, "HANDSHAKES/S")
    for (name, rate), dash in zip(refs, (6, 2)):
        cv.line(left, sy(rate), w - right, sy(rate), grey, 1, dash)
        cv.text(w - right - 8 * len(name.split()[0]) - 4, sy(rate) - 14, name.split()[0], grey)
    for (x0, y0), (x1, y1) in zip(series, series[1:]):
        cv.line(sx(x0), sy(y0), sx(x1), sy(y1), blue, 2)
    for x, y in series:
        cv.dot(sx(x) - 3, sy(y) - 3, blue, 7)
    return cv.png()
