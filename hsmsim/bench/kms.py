"""`make bench-kms`: Encrypt and Decrypt of 1 KiB, requests/s, against hsmsim's KMS endpoint (an
AWS_KMS key, crypto in the daemon's C core; and a custom-key-store key, crypto in the cluster)
and against moto's server, measured in the same run with one load generator: aiohttp,
keep-alive, 16 concurrent requests, each request signed once with SigV4 and replayed."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hsmsim.bench.report import ratio, render

CONCURRENCY = 16
DURATION = float(os.environ.get("HSMSIM_BENCH_SECONDS", "1.5"))
ROUNDS = 5  # hsmsim and moto measured alternately, median of the rounds (the machine is shared)
WARMUP = 0.5
PAYLOAD = 1024
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(url: str) -> Any:
    import boto3  # type: ignore[import-untyped]
    return boto3.client("kms", endpoint_url=url, region_name=REGION, aws_access_key_id="AKIDBENCH",
                        aws_secret_access_key="bench-secret")


def _signed(url: str, op: str, body: bytes) -> dict[str, str]:
    """Headers of one SigV4-signed request, reused for every request of the run."""
    from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
    from botocore.credentials import Credentials  # type: ignore[import-untyped]
    req = AWSRequest(method="POST", url=url + "/", data=body, headers={
        "X-Amz-Target": f"TrentService.{op}", "Content-Type": "application/x-amz-json-1.1"})
    SigV4Auth(Credentials("AKIDBENCH", "bench-secret"), "kms", REGION).add_auth(req)
    return dict(req.headers.items())


async def _load(url: str, op: str, body: bytes) -> tuple[float, int]:
    """(requests/s, errors) for DURATION seconds after a short warm-up."""
    import aiohttp
    headers = _signed(url, op, body)
    done = 0
    errors = 0
    counting = False
    stop = False

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done, errors
        while not stop:
            async with session.post(url + "/", data=body, headers=headers) as r:
                await r.read()
                if counting:
                    if r.status == 200:
                        done += 1
                    else:
                        errors += 1

    conn = aiohttp.TCPConnector(limit=CONCURRENCY, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(CONCURRENCY)]
        await asyncio.sleep(WARMUP)
        counting = True
        t0 = time.perf_counter()
        await asyncio.sleep(DURATION)
        counting = False
        elapsed = time.perf_counter() - t0
        stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
    return done / elapsed, errors


def _bodies(client: Any, key_arn: str) -> tuple[bytes, bytes]:
    import base64
    import json
    plain = os.urandom(PAYLOAD)
    enc = json.dumps({"KeyId": key_arn, "Plaintext": base64.b64encode(plain).decode()}).encode()
    blob = client.encrypt(KeyId=key_arn, Plaintext=plain)["CiphertextBlob"]
    dec = json.dumps({"CiphertextBlob": base64.b64encode(blob).decode(), "KeyId": key_arn}).encode()
    return enc, dec


def _start_moto(port: int) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except urllib.error.HTTPError:
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def _connected_store(cluster: Any, client: Any) -> str:
    password = "benchKmsUser1"
    r = cluster.cli("user", "create", "--username", "kmsuser", "--role", "crypto-user", "--password", password)
    if r.returncode != 0:
        raise RuntimeError(f"kmsuser: {r.stderr.strip()}")
    ca = (cluster.state_dir / "ca" / "ca.crt").read_text()
    sid = client.create_custom_key_store(CustomKeyStoreName="bench", CloudHsmClusterId=cluster.cluster_id,
                                         TrustAnchorCertificate=ca, KeyStorePassword=password)["CustomKeyStoreId"]
    client.connect_custom_key_store(CustomKeyStoreId=sid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = client.describe_custom_key_stores(CustomKeyStoreId=sid)["CustomKeyStores"][0]
        if st["ConnectionState"] == "CONNECTED":
            return str(sid)
        if st["ConnectionState"] == "FAILED":
            raise RuntimeError(f"custom key store failed: {st.get('ConnectionErrorCode')}")
        time.sleep(0.1)
    raise RuntimeError("custom key store did not connect")


def main() -> str:
    from hsmsim.testing.cluster import start_cluster
    with tempfile.TemporaryDirectory(prefix="hsmsim-bench-kms-") as tmp:
        cluster = start_cluster(Path(tmp) / "state")
        moto_port = _free_port()
        moto = _start_moto(moto_port)
        try:
            ours_url, moto_url = cluster.kms_endpoint, f"http://127.0.0.1:{moto_port}"
            ours, theirs = _client(ours_url), _client(moto_url)
            aws_key = ours.create_key()["KeyMetadata"]["Arn"]
            cks_key = ours.create_key(Origin="AWS_CLOUDHSM",
                                      CustomKeyStoreId=_connected_store(cluster, ours))["KeyMetadata"]["Arn"]
            moto_key = theirs.create_key()["KeyMetadata"]["Arn"]
            moto_bodies = _bodies(theirs, moto_key)
            rows = []
            for label, key in (("AWS_KMS", aws_key), ("AWS_CLOUDHSM (custom key store)", cks_key)):
                bodies = _bodies(ours, key)
                for i, op in enumerate(("Encrypt", "Decrypt")):
                    ours_runs, moto_runs = [], []
                    for _ in range(ROUNDS):
                        ours_runs.append(asyncio.run(_load(ours_url, op, bodies[i])))
                        moto_runs.append(asyncio.run(_load(moto_url, op, moto_bodies[i])))
                    ours_rps = statistics.median(r for r, _ in ours_runs)
                    moto_rps = statistics.median(r for r, _ in moto_runs)
                    ours_err = sum(e for _, e in ours_runs)
                    moto_err = sum(e for _, e in moto_runs)
                    rows.append({"operation (1 KiB)": op, "hsmsim key": label,
                                 "hsmsim req/s": ours_rps, "moto req/s": moto_rps,
                                 "ratio (target >= 3x)": ratio(ours_rps, moto_rps),
                                 "errors (hsmsim/moto)": f"{ours_err}/{moto_err}"})
        finally:
            moto.terminate()
            try:
                moto.wait(10)
            except subprocess.TimeoutExpired:
                moto.kill()
            cluster.down()
    table = render(f"KMS endpoint vs moto_server (aiohttp, keep-alive, {CONCURRENCY} concurrent, "
                   f"signed once, median of {ROUNDS} alternating {DURATION:g} s runs)", rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
