"""`make bench-cluster`: token AES-256 key generation acknowledged on at least 2 of 3 HSMs,
beside SoftHSM2 token key generation used directly (same machine, same run), and the longest
stall a signing client sees when one HSM is killed mid-run."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from hsmsim.bench.report import ratio, render

ROUNDS = 3
ROUND_SECONDS = 3.0
KEYGEN_IN_FLIGHT = 32
SIGN_SECONDS = 6.0
SIGNERS = 4

_DIRECT = textwrap.dedent("""
    import os, subprocess, sys, time, pathlib
    d = pathlib.Path(sys.argv[1]); secs = float(sys.argv[2])
    (d / "tokens").mkdir(parents=True, exist_ok=True)
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\\nobjectstore.backend = file\\n"
                    "log.level = ERROR\\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench",
                    "--so-pin", "12345678", "--pin", "12345678"], check=True,
                   capture_output=True)
    import pkcs11
    lib = pkcs11.lib(sys.argv[3])
    tok = lib.get_token(token_label="bench")
    with tok.open(user_pin="12345678", rw=True) as s:
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < secs:
            s.generate_key(pkcs11.KeyType.AES, 256, store=True, label=f"k{n}")
            n += 1
        print(n / (time.perf_counter() - t0))
""")


def softhsm_direct_keygen(seconds: float) -> float:
    """Token AES-256 keys/s from SoftHSM2 through python-pkcs11, in its own process (SoftHSM2
    reads SOFTHSM2_CONF once per process)."""
    from hsmsim.resources import softhsm_library
    with tempfile.TemporaryDirectory(prefix="hsmsim-bench-direct-") as d:
        r = subprocess.run([sys.executable, "-c", _DIRECT, d, str(seconds),
                            str(softhsm_library())], capture_output=True, text=True, check=True)
        return float(r.stdout.strip().splitlines()[-1])


async def _cluster_bench(root: Path) -> dict[str, Any]:
    from hsmsim.cluster.state import StateDir, prepare_new_cluster
    from hsmsim.daemon.main import Daemon, DaemonOptions
    from hsmsim.pkcs11.constants import Attribute, Mechanism, UserType
    from hsmsim.pkcs11.errors import Pkcs11Error
    from hsmsim.pkcs11.attributes import Template
    from hsmsim.pkcs11.params import MechanismSpec

    prepare_new_cluster(StateDir(root), ["us-east-1a", "us-east-1b", "us-east-1c"], 1,
                        "bench-admin-pw", "bench-cu-password")
    d = Daemon(DaemonOptions(root, None, (), services=False), dict(os.environ))
    await d.start()
    c = d.cluster
    assert c is not None
    out: dict[str, Any] = {}
    try:
        login = await c.login(UserType.USER, "crypto_user", "bench-cu-password")
        tmpl: Template = {int(Attribute.TOKEN): True, int(Attribute.VALUE_LEN): 32,
                int(Attribute.ENCRYPT): True, int(Attribute.DECRYPT): True}
        gen = MechanismSpec(int(Mechanism.AES_KEY_GEN))
        failures = 0
        cluster_rates: list[float] = []
        direct_rates: list[float] = []
        third: list[float] = []
        loop = asyncio.get_running_loop()
        # Interleaved rounds (SoftHSM2 direct, then the cluster) so that both see the same
        # machine load; medians are reported.
        for _ in range(ROUNDS):
            direct_rates.append(await loop.run_in_executor(None, softhsm_direct_keygen,
                                                           ROUND_SECONDS))
            count = 0
            end = time.perf_counter() + ROUND_SECONDS

            async def keygen() -> None:
                nonlocal count, failures
                while time.perf_counter() < end:
                    try:
                        await c.generate_key(login, gen, tmpl, 1)
                        count += 1
                    except Pkcs11Error:
                        failures += 1
            t0 = time.perf_counter()
            await asyncio.gather(*(keygen() for _ in range(KEYGEN_IN_FLIGHT)))
            cluster_rates.append(count / (time.perf_counter() - t0))
            t1 = time.perf_counter()
            while any(c.sync_lag(m) for m in c.members.values()) and time.perf_counter() - t1 < 60:
                await asyncio.sleep(0.01)
            third.append(time.perf_counter() - t1)
        out["keygen_per_s"] = statistics.median(cluster_rates)
        out["direct_per_s"] = statistics.median(direct_rates)
        out["keygen_failures"] = failures
        out["third_copy_s"] = max(third)

        # signing client; one HSM killed a third of the way through
        pub: Template = {int(Attribute.TOKEN): True, int(Attribute.VERIFY): True,
               int(Attribute.MODULUS_BITS): 2048, int(Attribute.PUBLIC_EXPONENT): b"\x01\x00\x01"}
        priv: Template = {int(Attribute.TOKEN): True, int(Attribute.SIGN): True,
                int(Attribute.SENSITIVE): True}
        _, key = await c.generate_key_pair(login, MechanismSpec(int(Mechanism.RSA_PKCS_KEY_PAIR_GEN)),
                                           pub, priv, 1)
        await asyncio.sleep(0.5)  # let the pair reach the third HSM
        mech = MechanismSpec(int(Mechanism.SHA256_RSA_PKCS))
        lat: list[float] = []
        errors = 0
        end = time.perf_counter() + SIGN_SECONDS

        async def signer() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    await c.sign(login, key, mech, b"bench message")
                except Pkcs11Error:
                    errors += 1
                lat.append(time.perf_counter() - t)

        async def killer() -> None:
            await asyncio.sleep(SIGN_SECONDS / 3)
            victim = next(m for m in c.members.values() if m.pid is not None)
            os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        await asyncio.gather(killer(), *(signer() for _ in range(SIGNERS)))
        out["sign_per_s"] = len(lat) / (time.perf_counter() - t0)
        out["sign_median_ms"] = statistics.median(lat) * 1000
        out["sign_max_ms"] = max(lat) * 1000
        out["sign_errors"] = errors
    finally:
        await d.close()
    return out


def main() -> str:
    with tempfile.TemporaryDirectory(prefix="hsmsim-bench-cluster-") as tmp:
        r = asyncio.run(_cluster_bench(Path(tmp) / "state"))
    direct = r["direct_per_s"]
    rows = [
        {"measure": "token AES-256 keygen, acknowledged on >=2 of 3 HSMs (keys/s)",
         "hsmsim": r["keygen_per_s"], "reference": direct,
         "reference is": "SoftHSM2 token keygen direct (python-pkcs11, 1 thread)",
         "ratio": ratio(r["keygen_per_s"], direct), "target": ">= 1.0",
         "notes": f"median of {ROUNDS} interleaved {ROUND_SECONDS:.0f}s rounds, {KEYGEN_IN_FLIGHT} in flight, {r['keygen_failures']} failures; third "
                  f"copies done {r['third_copy_s']:.1f}s after the load"},
        {"measure": "RSA-2048 SHA256 sign while one HSM is killed: longest stall (ms)",
         "hsmsim": r["sign_max_ms"], "reference": r["sign_median_ms"],
         "reference is": "median sign latency in the same run (ms)",
         "ratio": ratio(r["sign_max_ms"], r["sign_median_ms"]), "target": "bounded by retries",
         "notes": f"{SIGNERS} signers, {r['sign_per_s']:.0f} signs/s, {r['sign_errors']} errors"},
    ]
    table = render("cluster", rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
