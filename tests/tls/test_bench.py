"""`hsmsim tls bench` end to end, shortened (1 s per setup, one latency point): all three
setups complete real handshakes and the report carries rates, ratios and the plot. Rates are
reported, never asserted against targets (performance is judged by `make bench-tls`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hsmsim.testing.cluster import run_cli
from hsmsim.tls.bench import HSMSIM, PEM, SOFTHSM

from .conftest import Backend


def test_short_bench_with_latency_and_plot(hsmsim_backend: Backend, tmp_path: Path) -> None:
    png = tmp_path / "latency.png"
    r = run_cli(["tls", "bench", "--seconds", "1", "--latency-ms", "2", "--json",
                 "--plot", str(png), "--state", str(hsmsim_backend.state)], timeout=240)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    setups = {s["setup"]: s for s in data["setups"]}
    assert set(setups) == {HSMSIM, PEM, SOFTHSM}
    for name, s in setups.items():
        assert s["handshakes"] > 0 and s["rate"] > 0, (name, s, r.stderr)
        assert s["note"] == ""
    assert setups[PEM]["ratio_to_pem"] == 1.0
    assert abs(setups[HSMSIM]["ratio_to_pem"] - setups[HSMSIM]["rate"] / setups[PEM]["rate"]) \
        < 1e-9
    point, = data["latency"]
    assert point["latency_ms"] == 2 and point["handshakes"] > 0
    # The latency was taken off again.
    status = json.loads(run_cli(["status", "--json", "--state",
                                 str(hsmsim_backend.state)]).stdout)
    assert all(not h.get("latency_ms") for h in status["hsms"]), status["hsms"]
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) > (100, 100)
    assert f"wrote {png}" in r.stderr
