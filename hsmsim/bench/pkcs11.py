"""`make bench-pkcs11`: the same python-pkcs11 client, with 1 and 4 threads, through
libhsmsim-pkcs11 against a 3-HSM cluster, beside SoftHSM2 used directly and `openssl speed`,
reported as ratios measured in the same run."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsmsim.bench.report import ratio, render

SECONDS = float(os.environ.get("HSMSIM_BENCH_SECONDS", "2"))
FIND_KEYS = int(os.environ.get("HSMSIM_BENCH_FIND_KEYS", "10000"))
KIB = b"\x5a" * 1024


def _rate(worker: Callable[[], Callable[[], None]], threads: int) -> float:
    """Operations per second: `threads` threads, each calling its own prepared op for SECONDS."""
    ops = [worker() for _ in range(threads)]
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def run(i: int) -> None:
        op = ops[i]
        start.wait()
        n = 0
        while not stop.is_set():
            op()
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(SECONDS)
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def _openssl(args: list[str]) -> str:
    r = subprocess.run(["openssl", "speed", "-seconds", str(int(max(1, SECONDS))), *args],
                       capture_output=True, text=True, timeout=300)
    return r.stdout


def openssl_refs() -> dict[str, float]:
    out: dict[str, float] = {}
    text = _openssl(["-multi", "2", "rsa2048"])
    m = re.search(r"^rsa\s+2048 bits\s+\S+\s+\S+\s+([\d.]+)", text, re.M)
    if m:
        out["rsa2048_multi2"] = float(m.group(1))
    text = _openssl(["rsa2048"])
    m = re.search(r"^rsa\s+2048 bits\s+\S+\s+\S+\s+([\d.]+)", text, re.M)
    if m:
        out["rsa2048"] = float(m.group(1))
    text = _openssl(["ecdsap256"])
    m = re.search(r"256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)", text)
    if m:
        out["ecdsap256"] = float(m.group(1))
    text = _openssl(["-evp", "aes-256-gcm", "-bytes", "1024"])
    m = re.search(r"^AES-256-GCM\s+([\d.]+)k", text, re.M | re.I)
    if m:
        out["aesgcm1k"] = float(m.group(1)) * 1000 / 1024
    return out


class Target:
    """One PKCS#11 library with a logged-in session and the benchmark keys."""

    def __init__(self, lib: Any, pin: str, hsmsim: bool) -> None:
        import pkcs11
        from pkcs11 import KeyType
        from pkcs11.util.ec import encode_named_curve_parameters
        self.pkcs11 = pkcs11
        self.hsmsim = hsmsim
        self.token = lib.get_token(token_label="hsm1" if hsmsim else "bench")
        self.session = self.token.open(rw=True, user_pin=pin)
        s = self.session
        self.rsa = s.generate_keypair(KeyType.RSA, 2048, store=True, label="bench-rsa")[1]
        params = s.create_domain_parameters(
            KeyType.EC, {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        self.ec = params.generate_keypair(store=True, label="bench-ec")[1]
        self.aes = s.generate_key(KeyType.AES, 256, store=True, label="bench-aes")

    def _key(self, session: Any, label: str, cls: Any) -> Any:
        return session.get_key(label=label, object_class=cls)

    def worker(self, what: str) -> Callable[[], Callable[[], None]]:
        pkcs11 = self.pkcs11
        M, OC = pkcs11.Mechanism, pkcs11.ObjectClass

        def make() -> Callable[[], None]:
            s = self.token.open(rw=True)
            if what == "rsa":
                k = self._key(s, "bench-rsa", OC.PRIVATE_KEY)
                return lambda: k.sign(b"bench", mechanism=M.SHA256_RSA_PKCS) and None
            if what == "ec":
                k = self._key(s, "bench-ec", OC.PRIVATE_KEY)
                if self.hsmsim:
                    return lambda: k.sign(b"bench", mechanism=M.ECDSA_SHA256) and None
                # SoftHSM 2.6 has no CKM_ECDSA_SHA256: hash locally, as the gateway does
                return lambda: k.sign(hashlib.sha256(b"bench").digest(), mechanism=M.ECDSA) and None
            k = self._key(s, "bench-aes", OC.SECRET_KEY)
            GCM = pkcs11.mechanisms.GCMParams
            if self.hsmsim:
                return lambda: k.encrypt(KIB, mechanism=M.AES_GCM, mechanism_param=GCM(bytes(bytearray(12)), None, 128)) and None
            iv = os.urandom(12)
            return lambda: k.encrypt(KIB, mechanism=M.AES_GCM, mechanism_param=GCM(iv, None, 128)) and None
        return make

    def find_rate(self, n: int) -> float:
        """Find one key by label among n others (session keys, to keep set-up short)."""
        from pkcs11 import Attribute, KeyType
        s = self.session
        for i in range(n):
            s.generate_key(KeyType.AES, 128, store=False, label=f"find-{i}")
        target = f"find-{n // 2}"
        t0, count = time.perf_counter(), 0
        while time.perf_counter() - t0 < SECONDS:
            found = list(s.get_objects({Attribute.LABEL: target}))
            assert len(found) == 1
            count += 1
        return count / (time.perf_counter() - t0)


def roundtrip_us(module: Path, softhsm: bool, pin: bytes) -> float:
    """Mean latency of C_GetSessionInfo through ctypes (the emptiest call)."""
    dll = ctypes.CDLL(str(module))
    dll.C_Initialize(None)  # already initialised by python-pkcs11: CKR_CRYPTOKI_ALREADY_INITIALIZED
    slots = (ctypes.c_ulong * 8)()
    n = ctypes.c_ulong(8)
    dll.C_GetSlotList(ctypes.c_ubyte(1), slots, ctypes.byref(n))
    h = ctypes.c_ulong()
    rv = dll.C_OpenSession(ctypes.c_ulong(slots[0]), ctypes.c_ulong(6), None, None, ctypes.byref(h))
    assert rv == 0, hex(rv)
    info = (ctypes.c_ulong * 4)()
    fn = dll.C_GetSessionInfo
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS:
        for _ in range(100):
            fn(h, info)
        count += 100
    elapsed = time.perf_counter() - t0
    dll.C_CloseSession(h)
    return elapsed / count * 1e6


def _softhsm(tmp: Path) -> tuple[Any, Path]:
    import pkcs11
    from hsmsim.resources import softhsm_library
    (tmp / "tokens").mkdir(parents=True)
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "1234",
                    "--so-pin", "12345678"], check=True, capture_output=True)
    path = softhsm_library()
    return pkcs11.lib(str(path)), path


def main() -> str:
    import pkcs11
    from hsmsim.resources import pkcs11_module
    from hsmsim.testing.cluster import start_cluster

    rows: list[dict[str, Any]] = []
    refs = openssl_refs()
    with tempfile.TemporaryDirectory(prefix="hsmsim-bench-p11-") as d:
        tmp = Path(d)
        soft_lib, soft_path = _softhsm(tmp / "softhsm")
        soft = Target(soft_lib, "1234", hsmsim=False)
        cluster = start_cluster(tmp / "cluster")
        try:
            os.environ["HSMSIM_SOCKET"] = str(cluster.socket_path)
            module = pkcs11_module()
            hs = Target(pkcs11.lib(str(module)), cluster.pin, hsmsim=True)
            cluster.wait_converged(60)
            names = {"rsa": ("RSA-2048 sign (SHA256_RSA_PKCS)", "rsa2048", "openssl -multi 2", 0.85),
                     "ec": ("ECDSA P-256 sign (ECDSA_SHA256)", "ecdsap256", "SoftHSM2 direct", 1.5),
                     "gcm": ("AES-256-GCM 1 KiB encrypt", "aesgcm1k", "SoftHSM2 direct", 0.5)}
            for what, (label, ref1, target_ref, target) in names.items():
                soft1 = _rate(soft.worker(what), 1)
                h1 = _rate(hs.worker(what), 1)
                h4 = _rate(hs.worker(what), 4)
                ref = refs.get("rsa2048_multi2", 0.0) if what == "rsa" else soft1
                rows.append({"operation": label, "hsmsim 1 thread": h1, "hsmsim 4 threads": h4,
                             "SoftHSM2 direct 1 thread": soft1, "openssl speed 1 process": refs.get(ref1),
                             "openssl speed -multi 2": refs.get("rsa2048_multi2") if what == "rsa" else None,
                             "ratio (4 threads / target reference)": ratio(h4, ref),
                             "target": f"≥ {target}× {target_ref}"})
            n = FIND_KEYS
            s_find, h_find = soft.find_rate(n), hs.find_rate(n)
            rows.append({"operation": f"find by label among {n:,} keys", "hsmsim 1 thread": h_find,
                         "SoftHSM2 direct 1 thread": s_find,
                         "ratio (4 threads / target reference)": None,
                         "target": f"(1 thread / SoftHSM2 = {ratio(h_find, s_find) or 0:.2f})"})
            h_rt = roundtrip_us(module, False, b"")
            s_rt = roundtrip_us(soft_path, True, b"")
            rows.append({"operation": "empty round trip C_GetSessionInfo", "hsmsim 1 thread": 1e6 / h_rt,
                         "SoftHSM2 direct 1 thread": 1e6 / s_rt,
                         "target": f"added {h_rt - s_rt:.1f} µs per call (target ≤ 30 µs)"})
        finally:
            cluster.down()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    targets = (f"Load average at the end (1/5/15 min): {load}; ratios are taken in the same run.\n"
               "Targets: RSA-2048 4 threads ≥ 0.85× `openssl speed -multi 2 rsa2048`; ECDSA P-256 ≥ 1.5× "
               "SoftHSM2 direct; AES-GCM 1 KiB ≥ 0.5× SoftHSM2 direct; empty round trip ≤ 30 µs added.")
    table = render("pkcs11: python-pkcs11 through libhsmsim-pkcs11 (3-HSM cluster) vs SoftHSM2 direct and "
                   "openssl (ops/s)", rows) + "\n" + targets + "\n"
    print(table)
    return table
