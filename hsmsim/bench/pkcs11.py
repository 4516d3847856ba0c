"""`make bench-pkcs11`: the same python-pkcs11 client, with 1 and 4 threads, through
libhsmsim-pkcs11 against a 3-HSM cluster, beside SoftHSM2 used directly and `openssl speed`,
reported as ratios measured in the same run."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hsmsim.bench.report import ratio, render

SECONDS = float(os.environ.get("HSMSIM_BENCH_SECONDS", "2"))
FIND_KEYS = int(os.environ.get("HSMSIM_BENCH_FIND_KEYS", "10000"))
KIB = b"\x5a" * 1024


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def cluster_pids(state: Path) -> dict[str, int]:
    """The daemon's and every node's pid, from their pid files."""
    pids = {"daemon": int((state / "daemon.pid").read_text().split()[0])}
    for d in sorted((state / "nodes").iterdir()):
        f = d / "node.pid"
        if f.exists():
            pids[f"node {d.name}"] = int(f.read_text().split()[0])
    return pids


def _rate(worker: Callable[[], Callable[[], None]], threads: int,
          cpu: dict[str, float] | None = None, pids: dict[str, int] | None = None) -> float:
    """Operations per second: `threads` threads, each calling its own prepared op for SECONDS.
    With `pids`, `cpu` receives each process's CPU microseconds per operation (and "client")."""
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
    procs = {"client": os.getpid(), **(pids or {})}
    start.wait()
    before = {k: cpu_seconds(v) for k, v in procs.items()}
    t0 = time.perf_counter()
    time.sleep(SECONDS)
    stop.set()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    after = {k: cpu_seconds(v) for k, v in procs.items()}
    total = sum(counts)
    if cpu is not None and total:
        for k in procs:
            cpu[k] = (after[k] - before[k]) / total * 1e6
    return total / elapsed


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
            if what == "gcm-decrypt":
                # python-pkcs11 points pIv at the bytes object it is given, and hsmsim writes the
                # IV the HSM drew into pIv: `iv` holds it after the encryption (SoftHSM2 keeps ours)
                iv = bytes(bytearray(12)) if self.hsmsim else os.urandom(12)
                ct = k.encrypt(KIB, mechanism=M.AES_GCM, mechanism_param=GCM(iv, None, 128))
                iv = bytes(bytearray(iv))
                return lambda: k.decrypt(ct, mechanism=M.AES_GCM, mechanism_param=GCM(iv, None, 128)) and None
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


_SOFT_THREADS = r'''
import ctypes, hashlib, json, os, sys, threading, time
from ctypes import POINTER, Structure, byref, c_ubyte, c_ulong, c_void_p
lib = ctypes.CDLL(sys.argv[1]); seconds = float(sys.argv[2]); threads = int(sys.argv[3])
class InitArgs(Structure):
    _fields_ = [("c", c_void_p), ("d", c_void_p), ("l", c_void_p), ("u", c_void_p), ("flags", c_ulong), ("r", c_void_p)]
class Mech(Structure):
    _fields_ = [("mechanism", c_ulong), ("p", c_void_p), ("n", c_ulong)]
class Attr(Structure):
    _fields_ = [("type", c_ulong), ("p", c_void_p), ("n", c_ulong)]
class Gcm(Structure):
    _fields_ = [("iv", c_void_p), ("ivlen", c_ulong), ("ivbits", c_ulong), ("aad", c_void_p), ("aadlen", c_ulong), ("tag", c_ulong)]
for f in ("C_Initialize", "C_GetSlotList", "C_OpenSession", "C_Login", "C_FindObjectsInit", "C_FindObjects",
          "C_FindObjectsFinal", "C_SignInit", "C_Sign", "C_EncryptInit", "C_Encrypt"):
    getattr(lib, f).restype = c_ulong
a = InitArgs(None, None, None, None, 2, None)  # CKF_OS_LOCKING_OK: SoftHSM2 locks for threads
assert lib.C_Initialize(byref(a)) == 0
slots = (c_ulong * 8)(); n = c_ulong(8)
assert lib.C_GetSlotList(c_ubyte(1), slots, byref(n)) == 0
def session():
    h = c_ulong()
    assert lib.C_OpenSession(slots[0], c_ulong(6), None, None, byref(h)) == 0
    lib.C_Login(h, c_ulong(1), b"1234", c_ulong(4))
    return h
def key(h, label, cls):
    lab = ctypes.create_string_buffer(label.encode(), len(label)); c = c_ulong(cls)
    t = (Attr * 2)(Attr(3, ctypes.cast(lab, c_void_p), len(label)), Attr(0, ctypes.cast(byref(c), c_void_p), 8))
    assert lib.C_FindObjectsInit(h, t, c_ulong(2)) == 0
    k = c_ulong(); m = c_ulong()
    lib.C_FindObjects(h, byref(k), c_ulong(1), byref(m)); lib.C_FindObjectsFinal(h)
    assert m.value == 1
    return k
def op(what):
    h = session()
    out = ctypes.create_string_buffer(2048)
    if what == "rsa":
        k = key(h, "bench-rsa", 3); mech = Mech(0x40, None, 0)  # CKM_SHA256_RSA_PKCS
        def run():
            n = c_ulong(2048); lib.C_SignInit(h, byref(mech), k); assert lib.C_Sign(h, b"bench", c_ulong(5), out, byref(n)) == 0
        return run
    if what == "ec":
        k = key(h, "bench-ec", 3); mech = Mech(0x1041, None, 0); d = hashlib.sha256(b"bench").digest()
        def run():
            n = c_ulong(2048); lib.C_SignInit(h, byref(mech), k); assert lib.C_Sign(h, d, c_ulong(32), out, byref(n)) == 0
        return run
    k = key(h, "bench-aes", 4); iv = ctypes.create_string_buffer(os.urandom(12), 12)
    g = Gcm(ctypes.cast(iv, c_void_p), 12, 96, None, 0, 128); mech = Mech(0x1087, ctypes.cast(byref(g), c_void_p), ctypes.sizeof(g))
    data = b"\x5a" * 1024
    def run():
        n = c_ulong(2048); lib.C_EncryptInit(h, byref(mech), k); assert lib.C_Encrypt(h, data, c_ulong(1024), out, byref(n)) == 0
    return run
res = {}
for what in sys.argv[4].split(","):
    ops = [op(what) for _ in range(threads)]; counts = [0] * threads; stop = threading.Event()
    def loop(i):
        while not stop.is_set():
            ops[i](); counts[i] += 1
    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts: t.start()
    time.sleep(seconds); stop.set()
    for t in ts: t.join()
    res[what] = sum(counts) / (time.perf_counter() - t0)
print(json.dumps(res))
'''


def softhsm_threads(path: Path, threads: int) -> dict[str, float | str]:
    """SoftHSM2 direct with `threads` threads (ctypes, C_Initialize with CKF_OS_LOCKING_OK, in
    a child process per operation: python-pkcs11's C_Initialize(NULL) leaves SoftHSM2 without
    locking). An operation whose child fails is reported as such (SoftHSM 2.6.1's AES-GCM
    exits with status 5 under 4 threads on this machine)."""
    out: dict[str, float | str] = {}
    for what in ("rsa", "ec", "gcm"):
        r = subprocess.run([sys.executable, "-c", _SOFT_THREADS, str(path), str(SECONDS), str(threads), what],
                           capture_output=True, text=True, timeout=600, env=dict(os.environ))
        if r.returncode != 0:
            out[what] = f"failed (exit {r.returncode})"
            continue
        out.update({str(k): float(v) for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()})
    return out


@contextlib.contextmanager
def _busy_cpu() -> Iterator[None]:
    """A child process spinning on one CPU while the block runs. On a VM whose idle vCPUs halt
    (Firecracker's haltpoll with guest_halt_poll_ns=0 here), a round trip that wakes a halted vCPU
    pays the hypervisor's wake-up (35-70 µs measured, against 12 µs with a CPU kept busy): the
    empty round trip is reported both ways so that the daemon's part can be told from the VM's."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        spinner.kill()
        spinner.wait()


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
            soft4 = softhsm_threads(soft_path, 4)
            pids = cluster_pids(tmp / "cluster")
            cpu_rows: list[dict[str, Any]] = []
            # issue 12's targets: 4 client threads against the reference, as ratios in one run
            names: dict[str, tuple[str, str, str, float | None]] = {
                "rsa": ("RSA-2048 sign (SHA256_RSA_PKCS)", "rsa2048", "openssl -multi 2", 0.7),
                "ec": ("ECDSA P-256 sign (ECDSA_SHA256)", "ecdsap256", "SoftHSM2 direct 1 thread", 0.9),
                "gcm": ("AES-256-GCM 1 KiB encrypt", "aesgcm1k", "SoftHSM2 direct 1 thread", 0.6),
                # no target: the direct path's cost for AES-GCM (encryption goes through the
                # daemon, so that the IV drawn at C_EncryptInit is used once)
                "gcm-decrypt": ("AES-256-GCM 1 KiB decrypt (direct path)", "aesgcm1k",
                                "SoftHSM2 direct 1 thread", None)}
            for what, (label, ref1, target_ref, target) in names.items():
                soft1 = _rate(soft.worker(what), 1)
                h1 = _rate(hs.worker(what), 1)
                cpu: dict[str, float] = {}
                h4 = _rate(hs.worker(what), 4, cpu, pids)
                ref = refs.get("rsa2048_multi2", 0.0) if what == "rsa" else soft1
                cluster_cpu = sum(v for k, v in cpu.items() if k != "client")
                cpu_rows.append({"operation (4 threads)": label,
                                 **{f"{k} µs/op": v for k, v in cpu.items()},
                                 "cluster µs/op": cluster_cpu,
                                 "daemon share of cluster CPU": (
                                     f"{100 * cpu.get('daemon', 0.0) / cluster_cpu:.0f}%" if cluster_cpu else None),
                                 "target": "≤ 20%" if what == "ec" else None})
                rows.append({"operation": label, "hsmsim 1 thread": h1, "hsmsim 4 threads": h4,
                             "SoftHSM2 direct 1 thread": soft1,
                             "SoftHSM2 direct 4 threads": soft4.get(what),
                             "openssl speed 1 process": refs.get(ref1),
                             "openssl speed -multi 2": refs.get("rsa2048_multi2") if what == "rsa" else None,
                             "ratio (4 threads / target reference)": ratio(h4, ref),
                             "target": f"≥ {target}× {target_ref}" if target is not None else
                             f"(none; {ratio(h4, ref) or 0:.2f}× {target_ref})"})
            n = FIND_KEYS
            s_find, h_find = soft.find_rate(n), hs.find_rate(n)
            rows.append({"operation": f"find by label among {n:,} keys", "hsmsim 1 thread": h_find,
                         "SoftHSM2 direct 1 thread": s_find,
                         "ratio (4 threads / target reference)": None,
                         "target": f"(1 thread / SoftHSM2 = {ratio(h_find, s_find) or 0:.2f})"})
            h_rt = roundtrip_us(module, False, b"")
            s_rt = roundtrip_us(soft_path, True, b"")
            with _busy_cpu():
                h_busy = roundtrip_us(module, False, b"")
            rows.append({"operation": "empty round trip C_GetSessionInfo", "hsmsim 1 thread": 1e6 / h_rt,
                         "SoftHSM2 direct 1 thread": 1e6 / s_rt,
                         "target": f"added {h_rt - s_rt:.1f} µs per call (target ≤ 30 µs); "
                                   f"{h_busy - s_rt:.1f} µs with one CPU kept busy"})
        finally:
            cluster.down()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    targets = (f"Load average at the end (1/5/15 min): {load}; ratios are taken in the same run.\n"
               "Targets (issue 12), 4 client threads: RSA-2048 ≥ 0.7× `openssl speed -multi 2 rsa2048`; "
               "ECDSA P-256 ≥ 0.9× SoftHSM2 direct (1 thread); AES-256-GCM 1 KiB encrypt ≥ 0.6× SoftHSM2 "
               "direct (1 thread); empty round trip ≤ 30 µs added; the daemon's share of the cluster's CPU "
               "(daemon + nodes) during the 4-thread ECDSA loop ≤ 20%; TLS handshakes ≥ 1.05× SoftHSM2 "
               "through the same engine (`make bench-tls`: its 'x SoftHSM2 (engine)' column).")
    table = render("pkcs11: python-pkcs11 through libhsmsim-pkcs11 (3-HSM cluster) vs SoftHSM2 direct and "
                   "openssl (ops/s)", rows) + "\n" + targets + "\n\n" + render(
        "pkcs11: CPU per operation by process (/proc/<pid>/stat utime+stime over the 4-thread run, "
        "divided by all the run's operations: each node serves about a third of them; client = the "
        "benchmark process; cluster = daemon + nodes)", cpu_rows)
    print(table)
    return table
