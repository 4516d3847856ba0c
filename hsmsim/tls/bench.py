"""`hsmsim tls bench`: TLS 1.2 ECDHE-RSA-2048 full handshakes/s on 127.0.0.1 (`openssl s_time
-new` as the client) against three `openssl s_server -engine pkcs11` setups measured in one
run, in interleaved rounds: the key in the hsmsim cluster, the same server with the key in a
PEM file, and SoftHSM2 directly. Optionally the cluster setup again under injected HSM latency.
Reports rates and ratios to the PEM setup; it never judges them (no thresholds)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from hsmsim.bench.report import render
from hsmsim.tls.errors import TlsError
from hsmsim.tls.kit import Kit
from hsmsim.tls.servers import Server, free_port, s_server, s_time

CLI = [sys.executable, "-c", "import sys; from hsmsim.cli import main; sys.exit(main())"]
HSMSIM, PEM, SOFTHSM = "hsmsim cluster (engine)", "PEM key file", "SoftHSM2 direct (engine)"
TITLE = ("tls: TLS 1.2 ECDHE-RSA-2048 full handshakes/s, openssl s_time -new -> "
         "openssl s_server -engine pkcs11, 127.0.0.1")
# The reference point, measured on this kind of machine (shared/reference/baselines.md).
SOFTHSM_REFERENCE_RATIO = 0.76
TARGET_RATIO = 0.9  # x PEM
TARGET_VS_SOFTHSM = 1.05  # issue 12: x SoftHSM2 through the same engine, in the same run


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    seconds: float = 8.0  # measuring time per setup (per latency point)
    latencies_ms: tuple[float, ...] = ()
    state_dir: Path | None = None  # a running cluster; None: a throw-away one
    progress: TextIO | None = None


@dataclasses.dataclass(frozen=True)
class SetupResult:
    setup: str
    handshakes: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float | None:
        return self.handshakes / self.seconds if self.seconds and self.handshakes else None


@dataclasses.dataclass(frozen=True)
class LatencyPoint:
    latency_ms: float
    handshakes: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float | None:
        return self.handshakes / self.seconds if self.seconds and self.handshakes else None


@dataclasses.dataclass(frozen=True)
class BenchResult:
    setups: tuple[SetupResult, ...]
    latency: tuple[LatencyPoint, ...]
    rounds: int

    def rate(self, setup: str) -> float | None:
        return next((s.rate for s in self.setups if s.setup == setup), None)

    def ratio(self, setup: str) -> float | None:
        pem, rate = self.rate(PEM), self.rate(setup)
        return rate / pem if rate and pem else None

    def rows(self) -> list[dict[str, object]]:
        expected = {HSMSIM: f"target >= {TARGET_RATIO} x PEM, >= {TARGET_VS_SOFTHSM} x SoftHSM2",
                    SOFTHSM: f"reference {SOFTHSM_REFERENCE_RATIO} x PEM", PEM: "reference"}
        soft = self.rate(SOFTHSM)
        return [{"setup": s.setup, "handshakes/s": s.rate, "x PEM": self.ratio(s.setup),
                 "x SoftHSM2 (engine)": s.rate / soft if s.rate and soft else None,
                 "expected": expected[s.setup], "handshakes": s.handshakes,
                 "note": s.note} for s in self.setups]

    def latency_rows(self) -> list[dict[str, object]]:
        base = self.rate(HSMSIM)
        pem = self.rate(PEM)
        rows: list[dict[str, object]] = [
            {"injected latency ms": 0.0, "handshakes/s": base,
             "x PEM": base / pem if base and pem else None, "note": "main run"}]
        for p in self.latency:
            rows.append({"injected latency ms": p.latency_ms, "handshakes/s": p.rate,
                         "x PEM": p.rate / pem if p.rate and pem else None, "note": p.note})
        return rows

    def markdown(self) -> str:
        text = render(TITLE, self.rows())
        if self.latency:
            text += "\n" + render("tls: the cluster setup with latency injected on every HSM",
                                  self.latency_rows())
        return text

    def to_json(self) -> dict[str, object]:
        return {"rounds": self.rounds,
                "setups": [{**dataclasses.asdict(s), "rate": s.rate, "ratio_to_pem":
                            self.ratio(s.setup)} for s in self.setups],
                "latency": [{**dataclasses.asdict(p), "rate": p.rate} for p in self.latency]}


def _say(opts: BenchOptions, text: str) -> None:
    if opts.progress is not None:
        print(f"tls bench: {text}", file=opts.progress, flush=True)


def _cli(args: list[str], timeout: float = 300.0) -> str:
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise TlsError(f"hsmsim {' '.join(args[:2])} failed: {r.stderr.strip()[-800:]}")
    return r.stdout


def _init_kit(args: list[str], out: Path) -> Kit:
    """`hsmsim tls init` in a child process (one PKCS#11 module per process) -> the kit."""
    _cli(["tls", "init", "--cn", "localhost", "--key", "rsa2048", "--issuer", "self",
          "--out", str(out), "--json", *args])
    return Kit.load(out)


def _pem_kit(work: Path, template: Kit) -> tuple[Kit, Path]:
    """A software RSA-2048 key and certificate; the engine stays loaded (same server line)."""
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    work.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = work / "key.pem", work / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files = {**template.files, "cert": str(cert_path)}
    return dataclasses.replace(template, files=files, label="pem"), key_path


@contextlib.contextmanager
def _cluster(opts: BenchOptions, work: Path) -> Iterator[tuple[Path | None, str]]:
    """The cluster to measure: (state dir, note); state None with the reason when none."""
    if opts.state_dir is not None:
        if not (opts.state_dir / "gateway.sock").exists():
            yield None, f"no running cluster in {opts.state_dir}"
        else:
            yield opts.state_dir, ""
        return
    try:
        from hsmsim.resources import pkcs11_module
        pkcs11_module()
    except FileNotFoundError as exc:
        yield None, str(exc)
        return
    from hsmsim.testing.cluster import ClusterStartError, start_cluster
    state = work / "cluster"
    state.mkdir(parents=True)
    # FIDELITY: CloudHSM's library refuses read-only sessions (reproduced by default); libp11,
    # which stands in for CloudHSM's own OpenSSL engine here, opens them, so the benchmark's
    # cluster allows them.
    (state / "hsmsim.toml").write_text(
        f"[kms]\nport = {free_port()}\n\n[gateway]\nquirk_ro_session_fails = false\n")
    _say(opts, "starting a throw-away 3-HSM cluster")
    try:
        cluster = start_cluster(state)
    except ClusterStartError as exc:
        yield None, f"the cluster did not start: {str(exc).splitlines()[0]}"
        return
    try:
        yield state, ""
    finally:
        cluster.down()


def _set_latency(state: Path, ms: float) -> None:
    """`hsmsim hsm latency ID --ms N` on every HSM, through the daemon's control API."""
    from hsmsim.control.client import ControlClient
    from hsmsim.control.protocol import ControlError

    client = ControlClient(state / "control.sock", timeout=60)
    try:
        status = client.call("status")
        for hsm in status.get("hsms", []):
            if hsm.get("condition") not in ("killed", "removed"):
                client.call("hsm.latency", hsm_id=str(hsm["hsm_id"]), ms=int(round(ms)))
    except ControlError as exc:
        raise TlsError(f"setting {ms:g} ms of HSM latency failed: {exc}") from None


def run(opts: BenchOptions) -> BenchResult:
    for tool in ("openssl", "softhsm2-util"):
        if shutil.which(tool) is None:
            raise TlsError(f"`{tool}` is not installed")
    total = max(1, int(round(opts.seconds)))
    # Short interleaved slices (4 rounds of 2 s by default): load from other processes on a
    # shared machine then falls on the three setups alike.
    rounds = max(1, min(4, total // 2))
    slice_s = max(1, total // rounds)
    with tempfile.TemporaryDirectory(prefix="hsmsim-tls-bench-") as tmp:
        work = Path(tmp)
        from hsmsim.tls.softhsm import make_token
        _say(opts, "making a SoftHSM2 token and keys")
        token = make_token(work / "softhsm", "bench")
        soft_kit = _init_kit(["--state", str(work / "softhsm-state"), "--module",
                              str(token.module), "--token", token.label, "--pin-file",
                              str(token.pin_file), "--module-env",
                              f"SOFTHSM2_CONF={token.conf}"], work / "softhsm-kit")
        pem_kit, pem_key = _pem_kit(work / "pem", soft_kit)
        with contextlib.ExitStack() as stack:
            servers: dict[str, Server] = {}
            notes: dict[str, str] = {}
            state, why = stack.enter_context(_cluster(opts, work))
            if state is not None:
                try:
                    hsm_kit = _init_kit(["--state", str(state)], work / "hsmsim-kit")
                    if hsm_kit.warnings:  # the engine would hang: read-only sessions refused
                        raise TlsError(hsm_kit.warnings[0])
                    servers[HSMSIM] = stack.enter_context(s_server(
                        hsm_kit, free_port(), work / "s_server-hsmsim.log"))
                except TlsError as exc:
                    notes[HSMSIM] = f"not measured: {exc}".splitlines()[0]
            else:
                notes[HSMSIM] = f"not measured: {why}"
            servers[PEM] = stack.enter_context(s_server(
                pem_kit, free_port(), work / "s_server-pem.log", key_pem=pem_key))
            servers[SOFTHSM] = stack.enter_context(s_server(
                soft_kit, free_port(), work / "s_server-softhsm.log"))
            for name, srv in list(servers.items()):
                try:
                    srv.wait_ready()
                except TlsError as exc:
                    notes[name] = f"not measured: {exc}".splitlines()[0]
                    del servers[name]
            counts = {name: [0, 0.0] for name in (HSMSIM, PEM, SOFTHSM)}
            for r in range(rounds):
                for name, srv in servers.items():
                    if name in notes:
                        continue  # failed in an earlier round
                    _say(opts, f"round {r + 1}/{rounds}: {name}, {slice_s} s")
                    try:
                        n, secs = s_time(srv.port, slice_s)
                    except TlsError as exc:
                        notes[name] = f"failed: {exc}; server log: {srv.log_tail(3)}"
                        counts[name] = [0, 0.0]
                        continue
                    counts[name][0] += n
                    counts[name][1] += secs
            setups = tuple(SetupResult(name, int(c[0]), float(c[1]), notes.get(name, ""))
                           for name, c in counts.items())
            points: list[LatencyPoint] = []
            if opts.latencies_ms and HSMSIM in servers and state is not None:
                try:
                    for ms in opts.latencies_ms:
                        _say(opts, f"latency {ms:g} ms on every HSM: {HSMSIM}, {total} s")
                        try:
                            _set_latency(state, ms)
                            time.sleep(0.2)
                            n, secs = s_time(servers[HSMSIM].port, total)
                            points.append(LatencyPoint(ms, n, secs))
                        except TlsError as exc:
                            points.append(LatencyPoint(ms, 0, 0.0, f"failed: {exc}"))
                finally:
                    try:
                        _set_latency(state, 0)
                    except TlsError as exc:
                        _say(opts, f"could not take the latency off again: {exc}")
            elif opts.latencies_ms:
                points = [LatencyPoint(ms, 0, 0.0, notes.get(HSMSIM, "no cluster"))
                          for ms in opts.latencies_ms]
        return BenchResult(setups, tuple(points), rounds)
