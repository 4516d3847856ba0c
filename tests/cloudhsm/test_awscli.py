"""aws-cli against the CloudHSMv2 endpoint: README Tutorial 4 (the CloudHSM getting-started
flow: create-cluster, create-hsm, initialize-cluster with a CSR signed by an openssl CA,
activation, a second HSM in another AZ, pkcs11-tool signs with a key that is on both HSMs)
run as written in a fresh shell, and aws-cli's rendering of the endpoint's errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hsmsim.testing.cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"<!-- tutorial: cloudhsmv2 -->\n```sh\n(.*?)```", re.S)


def shell_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSMSIM_", "AWS_"))}
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", HSMSIM_HOME=str(home),
               HSMSIM_KMS_PORT=str(free_port()), HSMSIM_CLOUDHSM_PORT="0")
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> object:
    yield tmp_path
    subprocess.run(["hsmsim", "down"], env=shell_env(tmp_path / ".hsmsim"), capture_output=True,
                   timeout=120)


def test_readme_tutorial_4_runs_as_written(workdir: Path) -> None:
    body = BLOCK.findall((ROOT / "README.md").read_text())
    assert len(body) == 1
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", body[0]], cwd=workdir,
                          env=shell_env(workdir / ".hsmsim"), capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert re.search(r"^cluster-\w+\s+ACTIVE\s+hsm2m\.medium$", out, re.M), out
    assert out.count("CREATE_IN_PROGRESS") == 2 and "INITIALIZE_IN_PROGRESS" in out
    assert re.search(r"^ACTIVE$", out, re.M), out
    assert (workdir / "ha.sig").stat().st_size == 256
    assert re.search(r"PRIVATE_KEY\s+RSA\s+ha-rsa\s+2/2", out), out
    hsms = re.findall(r"^(hsm-\w+)\s+(us-east-1[ab])\s+([\d.]+)\s+ACTIVE$", out, re.M)
    assert sorted(az for _, az, _ in hsms) == ["us-east-1a", "us-east-1b"], out


def test_awscli_shows_the_endpoints_errors(workdir: Path) -> None:
    env = shell_env(workdir / ".hsmsim")
    subprocess.run(["hsmsim", "up", "--detach", "--azs", "2"], env=env, check=True,
                   capture_output=True, timeout=180)
    exports = subprocess.run(["hsmsim", "env"], env=env, capture_output=True, text=True, check=True).stdout
    env.update(re.findall(r"^export (\w+)=(.*)$", exports, re.M))
    assert env["AWS_ENDPOINT_URL_CLOUDHSM_V2"].startswith("http://127.0.0.1:")
    r = subprocess.run(["aws", "cloudhsmv2", "create-hsm", "--cluster-id", "cluster-aaaaaaaaaaa",
                        "--availability-zone", "us-east-1a"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "(CloudHsmResourceNotFoundException)" in r.stderr and "cluster-aaaaaaaaaaa" in r.stderr
    r = subprocess.run(["aws", "cloudhsmv2", "describe-backups", "--filters", "colour=blue"],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "(CloudHsmInvalidRequestException)" in r.stderr, r.stderr
