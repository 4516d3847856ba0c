"""Benchmark of one HSM node through the node protocol, beside SoftHSM2 used directly through
python-pkcs11 in the same run (`make bench-node`, python -m hsmsim.bench node).

A real node process is started in a temporary state directory and filled with token keys.
The node side runs from this one client process with many requests in flight (pipelining);
the direct side is single-threaded python-pkcs11 on the *same* SoftHSM2 token (its objects are
found by the node's internal tag labels), so both touch identical key objects. The two sides
are measured in alternating slices so that load on the shared machine hits both alike.

Environment: HSMSIM_BENCH_FIND_KEYS (default 10000) token keys for the find benchmark,
HSMSIM_BENCH_SECONDS (default 3.0) per measured operation and side."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hsmsim.bench.report import ratio, render
from hsmsim.node.client import NodeClient
from hsmsim.node.process import token_pins
from hsmsim.pkcs11.constants import Attribute as A, Mechanism as M, UserType
from hsmsim.pkcs11.params import GcmParams, MechanismSpec as Spec
from hsmsim.resources import softhsm_library

HSM_ID = "hsm-benchnode01"
P256 = bytes.fromhex("06082a8648ce3d030107")
WINDOW = 64  # requests in flight on the node connection
ROUNDS = 6  # alternating slices per side; each side keeps its best (the machine is shared)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class NodeRun:
    """A node process for the benchmark."""

    def __init__(self, state: Path) -> None:
        self.state = state
        secrets = state / "secrets"
        secrets.mkdir(parents=True, mode=0o700)
        self.secret_file = secrets / "cluster.secret"
        self.secret_file.write_bytes(os.urandom(32).hex().encode())
        self.sock = state / "node.sock"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSMSIM_")}
        self.log = (state / "node.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hsmsim", "node", "serve", "--state", str(state),
             "--hsm-id", HSM_ID, "--az", "us-east-1a", "--listen", f"unix:{self.sock}",
             "--cluster-secret-file", str(self.secret_file), "--init", "new"],
            stdout=subprocess.PIPE, stderr=self.log, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(b"READY"):
            raise RuntimeError(f"node did not start: {(state / 'node.log').read_text()}")

    @property
    def conf(self) -> Path:
        return self.state / "nodes" / HSM_ID / "softhsm2.conf"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


async def _pipelined(fn: Callable[[int], Awaitable[Any]], seconds: float) -> float:
    """ops/s with WINDOW requests in flight for `seconds`."""
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < deadline:
            await fn(i)
            done += 1
            i += WINDOW
    await asyncio.gather(*(worker(w) for w in range(WINDOW)))
    return done / (time.perf_counter() - start)


def _direct(fn: Callable[[int], Any], seconds: float, max_calls: int = 1 << 30) -> float:
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while calls < max_calls:
        fn(calls)
        calls += 1
        if time.perf_counter() >= deadline:
            break
    return calls / (time.perf_counter() - start)


async def _populate(c: NodeClient, lid: int, count: int, first: int) -> float:
    """Create `count` token AES-256 keys labelled key-<i>; returns keys/s."""
    sem = asyncio.Semaphore(WINDOW)
    start = time.perf_counter()

    done = 0

    async def one(i: int) -> None:
        nonlocal done
        async with sem:
            await c.generate_key(lid, Spec(M.AES_KEY_GEN),
                                 {A.VALUE_LEN: 32, A.TOKEN: True, A.LABEL: f"key-{i}",
                                  A.ENCRYPT: True, A.DECRYPT: True}, handle=first + i)
        done += 1
        if done % 500 == 0:
            print(f"  {done} keys, {done / (time.perf_counter() - start):.0f}/s",
                  file=sys.stderr, flush=True)
    await asyncio.gather(*(one(i) for i in range(count)))
    return count / (time.perf_counter() - start)


def run_bench() -> list[dict[str, Any]]:
    import pkcs11  # python-pkcs11, the direct reference (untyped here: its Key has no sign/encrypt)
    from pkcs11.mechanisms import GCMParams

    seconds = float(os.environ.get("HSMSIM_BENCH_SECONDS", "3.0"))
    find_keys = _env_int("HSMSIM_BENCH_FIND_KEYS", 10000)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hsmsim-bench-node-") as tmp:
        node = NodeRun(Path(tmp))
        loop = asyncio.new_event_loop()
        try:
            secret = node.secret_file.read_bytes().strip()
            c = loop.run_until_complete(NodeClient.connect(f"unix:{node.sock}",
                                                           cluster_secret=secret))
            loop.run_until_complete(c.initialize_users("benchadmin1", "benchuser1"))
            lid = loop.run_until_complete(c.login(UserType.USER, "crypto_user",
                                                  "benchuser1")).login_id
            print(f"populating {find_keys} token keys through the node...", file=sys.stderr)
            keygen_node = loop.run_until_complete(_populate(c, lid, find_keys, 100000))
            rsa_pub, rsa_priv = loop.run_until_complete(c.generate_key_pair(
                lid, Spec(M.RSA_PKCS_KEY_PAIR_GEN), {A.MODULUS_BITS: 2048, A.TOKEN: True,
                                                     A.VERIFY: True},
                {A.SIGN: True, A.TOKEN: True}, public_handle=10, private_handle=11))
            ec_pub, ec_priv = loop.run_until_complete(c.generate_key_pair(
                lid, Spec(M.EC_KEY_PAIR_GEN), {A.EC_PARAMS: P256, A.TOKEN: True, A.VERIFY: True},
                {A.SIGN: True, A.TOKEN: True}, public_handle=12, private_handle=13))
            aes = loop.run_until_complete(c.generate_key(
                lid, Spec(M.AES_KEY_GEN), {A.VALUE_LEN: 32, A.TOKEN: True, A.ENCRYPT: True,
                                           A.DECRYPT: True}, handle=14))

            # The direct side: python-pkcs11 on the same token, same key objects.
            os.environ["SOFTHSM2_CONF"] = str(node.conf)
            lib = pkcs11.lib(str(softhsm_library()))
            token = lib.get_token(token_label=HSM_ID)
            session = token.open(rw=True, user_pin=token_pins(secret, HSM_ID)[1].decode())
            d_rsa: Any = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY,
                                    label=f"hsmsim:{rsa_priv}")
            d_ec: Any = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY,
                                   label=f"hsmsim:{ec_priv}")
            d_aes: Any = session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY,
                                    label=f"hsmsim:{aes}")

            msg = b"benchmark message"
            digest = hashlib.sha256(msg).digest()
            kib = os.urandom(1024)
            labels = [f"key-{random.randrange(find_keys)}" for _ in range(4096)]

            def node_ops() -> dict[str, Callable[[int], Awaitable[Any]]]:
                return {
                    "RSA-2048 sign (SHA256_RSA_PKCS)":
                        lambda i: c.sign(lid, rsa_priv, Spec(M.SHA256_RSA_PKCS), msg),
                    "ECDSA P-256 sign (over a SHA-256 digest)":
                        lambda i: c.sign(lid, ec_priv, Spec(M.ECDSA), digest),
                    "AES-256-GCM encrypt 1 KiB":
                        lambda i: c.encrypt(lid, aes, Spec(M.AES_GCM, GcmParams(b"", b"")), kib),
                    f"find by label among {find_keys:,} token keys":
                        lambda i: c.find_objects(lid, {A.LABEL: labels[i % len(labels)]}),
                }

            def direct_find(i: int) -> None:
                list(session.get_objects({pkcs11.Attribute.LABEL: f"hsmsim:{100000 + i}"}))

            direct_ops: dict[str, tuple[Callable[[int], Any], int]] = {
                "RSA-2048 sign (SHA256_RSA_PKCS)":
                    (lambda i: d_rsa.sign(msg, mechanism=pkcs11.Mechanism.SHA256_RSA_PKCS), 1 << 30),
                "ECDSA P-256 sign (over a SHA-256 digest)":
                    (lambda i: d_ec.sign(digest, mechanism=pkcs11.Mechanism.ECDSA), 1 << 30),
                "AES-256-GCM encrypt 1 KiB":
                    (lambda i: d_aes.encrypt(kib, mechanism=pkcs11.Mechanism.AES_GCM,
                                             mechanism_param=GCMParams(os.urandom(12))), 1 << 30),
                # SoftHSM2's linear search takes ~0.25 s per find among 10,000: few calls.
                f"find by label among {find_keys:,} token keys": (direct_find, 4),
            }
            targets = {"RSA-2048 sign (SHA256_RSA_PKCS)": "≥ 1.5× direct",
                       f"find by label among {find_keys:,} token keys": "≥ 1,000/s"}
            for name, fn in node_ops().items():
                loop.run_until_complete(fn(0))  # warm the C-core context cache
                direct_fn, max_calls = direct_ops[name]
                direct_fn(0)
                n_rates, d_rates = [], []
                for _ in range(ROUNDS):
                    n_rates.append(loop.run_until_complete(_pipelined(fn, seconds / ROUNDS)))
                    d_rates.append(_direct(direct_fn, seconds / ROUNDS, max_calls))
                n, d = max(n_rates), max(d_rates)
                rows.append({"operation": name, "node protocol ops/s": n,
                             "SoftHSM2 direct ops/s": d, "ratio": ratio(n, d),
                             "target": targets.get(name, "")})

            # Token key generation: the node's rate while populating, direct on the same token.
            direct_keys: list[Any] = []

            def direct_gen(i: int) -> None:
                direct_keys.append(session.generate_key(pkcs11.KeyType.AES, 256, store=True,
                                                        label=f"direct-{i}"))
            d = _direct(direct_gen, seconds * 2, 400)
            for k in direct_keys:
                k.destroy()
            rows.append({"operation": "token AES-256 key generation", "node protocol ops/s":
                         keygen_node, "SoftHSM2 direct ops/s": d, "ratio": ratio(keygen_node, d),
                         "target": ""})
            session.close()
            loop.run_until_complete(c.close())
        finally:
            loop.close()
            node.stop()
    return rows


def main() -> str:
    rows = run_bench()
    table = render("node: one HSM node through the node protocol vs SoftHSM2 direct "
                   "(python-pkcs11), same token, same run", rows)
    print(table)
    return table
