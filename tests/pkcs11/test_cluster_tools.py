"""Real PKCS#11 hosts against a real cluster: OpenSC's pkcs11-tool and OpenSSL with the libp11
pkcs11 engine (a certificate signed by an HSM key; `openssl s_server` TLS 1.2/1.3 handshakes with
Python's ssl client, RSA and EC keys)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key

from p11helpers import require_module

ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")
TOOL = shutil.which("pkcs11-tool")
OPENSSL = shutil.which("openssl")
# libp11 accepts PINs of at most 32 characters: a crypto user with a short PIN for OpenSSL.
USER, PASSWORD = "p11tools", "toolpass123"
PIN = f"{USER}:{PASSWORD}"


@pytest.fixture(scope="module")
def cluster(hsmsim_session_cluster):  # type: ignore[no-untyped-def]
    c = hsmsim_session_cluster
    r = c.cli("user", "create", "--username", USER, "--role", "crypto-user", "--password", PASSWORD)
    assert r.returncode == 0 or "exist" in (r.stdout + r.stderr).lower(), r.stderr
    return c


@pytest.fixture(scope="module")
def env(cluster) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return dict(os.environ, HSMSIM_SOCKET=str(cluster.socket_path))


def tool(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if TOOL is None:
        pytest.skip("pkcs11-tool (Debian package opensc) is not installed")
    r = subprocess.run([TOOL, "--module", str(require_module()), *args], env=env, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def keys(env: dict[str, str]) -> dict[str, str]:
    """An RSA and an EC key pair made by pkcs11-tool --keypairgen; id per kind. CloudHSM takes
    only CKA_PRIVATE=true and pkcs11-tool sets false on the public key unless --private."""
    tool(env, "--login", "--pin", PIN, "--private", "--keypairgen", "--key-type", "rsa:2048", "--label", "p11t-rsa", "--id", "a1")
    tool(env, "--login", "--pin", PIN, "--private", "--keypairgen", "--key-type", "EC:prime256v1", "--label", "p11t-ec",
         "--id", "a2")
    return {"rsa": "a1", "ec": "a2"}


def test_list_slots(env: dict[str, str]) -> None:
    out = tool(env, "--list-slots").stdout
    assert "token label        : hsm1" in out
    assert "PIN initialized" in out and "login required" in out


def test_login_with_cloudhsm_pin_format(env: dict[str, str]) -> None:
    r = tool(env, "--login", "--pin", "p11tools:wrong-password", "--list-objects", "--session-rw", check=False)
    assert r.returncode != 0 and "CKR_PIN_INCORRECT" in r.stdout + r.stderr
    tool(env, "--login", "--pin", PIN, "--list-objects", "--session-rw")


def test_sign_and_list_objects(env: dict[str, str], keys: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"signed by pkcs11-tool")
    for kind, mech in (("rsa", "SHA256-RSA-PKCS"), ("ec", "ECDSA-SHA256")):
        sig, pub = tmp_path / f"{kind}.sig", tmp_path / f"{kind}.der"
        # CloudHSM: read-only sessions fail, so pkcs11-tool needs --session-rw
        r = tool(env, "--login", "--pin", PIN, "--sign", "--id", keys[kind], "-m", mech, "-i", str(data),
                 "-o", str(sig), check=False)
        assert r.returncode != 0 and "CKR_FUNCTION_FAILED" in r.stdout + r.stderr
        tool(env, "--session-rw", "--login", "--pin", PIN, "--sign", "--id", keys[kind], "-m", mech,
             "-i", str(data), "-o", str(sig), *(["--signature-format", "openssl"] if kind == "ec" else []))
        tool(env, "--session-rw", "--login", "--pin", PIN, "--read-object", "--type", "pubkey", "--id", keys[kind],
             "-o", str(pub))
        key = load_der_public_key(pub.read_bytes())
        if kind == "rsa":
            key.verify(sig.read_bytes(), data.read_bytes(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg, union-attr]
        else:
            key.verify(sig.read_bytes(), data.read_bytes(), ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, union-attr]
    out = tool(env, "--session-rw", "--login", "--pin", PIN, "--list-objects").stdout
    assert "label:      p11t-rsa" in out and "label:      p11t-ec" in out


def test_pkcs11_tool_self_test(env: dict[str, str], keys: dict[str, str]) -> None:
    r = tool(env, "--session-rw", "--login", "--pin", PIN, "--test")
    assert "No errors" in r.stdout + r.stderr


# --- OpenSSL with the libp11 engine ------------------------------------------------------------------------
# libp11 0.4.12 loads keys through a read-only session and, answered CKR_FUNCTION_FAILED as CloudHSM
# answers, waits forever for a session. TLS-offload users switch that quirk off
# (HSMSIM_GATEWAY_QUIRK_RO_SESSION_FAILS=false); these tests run on such a cluster.
@pytest.fixture(scope="module")
def tls_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if OPENSSL is None or not ENGINE.exists():
        pytest.skip("openssl or the pkcs11 engine (libengine-pkcs11-openssl) is not installed")
    from hsmsim.testing.cluster import start_cluster
    env = dict(os.environ, HSMSIM_GATEWAY_QUIRK_RO_SESSION_FAILS="false")
    c = start_cluster(tmp_path_factory.mktemp("tls") / "state", env=env)
    try:
        r = c.cli("user", "create", "--username", USER, "--role", "crypto-user", "--password", PASSWORD)
        assert r.returncode == 0, r.stderr
        e = dict(os.environ, HSMSIM_SOCKET=str(c.socket_path))
        tool(e, "--login", "--pin", PIN, "--private", "--keypairgen", "--key-type", "rsa:2048", "--label", "p11t-rsa", "--id", "a1")
        tool(e, "--login", "--pin", PIN, "--private", "--keypairgen", "--key-type", "EC:prime256v1", "--label", "p11t-ec",
             "--id", "a2")
        yield e
    finally:
        c.down()


@pytest.fixture(scope="module")
def openssl_env(tls_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    conf = tmp_path_factory.mktemp("openssl") / "openssl.cnf"
    conf.write_text(f"""openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
dynamic_path = {ENGINE}
MODULE_PATH = {require_module()}
init = 0
[req]
distinguished_name = dn
[dn]
""")
    return dict(tls_env, OPENSSL_CONF=str(conf))


def key_uri(label: str) -> str:
    return f"pkcs11:token=hsm1;object={label};type=private?pin-value={PIN}"


@pytest.fixture(scope="module")
def certs(openssl_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    d = tmp_path_factory.mktemp("certs")
    for kind in ("rsa", "ec"):
        cert = d / f"{kind}.pem"
        r = subprocess.run([OPENSSL or "openssl", "req", "-new", "-x509", "-days", "1", "-engine", "pkcs11",
                            "-keyform", "engine", "-key", key_uri(f"p11t-{kind}"), "-subj", f"/CN=localhost-{kind}",
                            "-out", str(cert)], env=openssl_env, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        out[kind] = cert
    return out


def test_openssl_req_makes_a_cert_signed_by_the_hsm_key(certs: dict[str, Path]) -> None:
    for kind, path in certs.items():
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        pub = cert.public_key()
        if kind == "rsa":
            pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),  # type: ignore[call-arg, union-attr]
                       cert.signature_hash_algorithm)
        else:
            pub.verify(cert.signature, cert.tbs_certificate_bytes,  # type: ignore[call-arg, union-attr]
                       ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s_server(openssl_env: dict[str, str], certs: dict[str, Path]) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind: str, version_flag: str) -> int:
        port = _free_port()
        p = subprocess.Popen([OPENSSL or "openssl", "s_server", "-engine", "pkcs11", "-keyform", "engine",
                              "-key", key_uri(f"p11t-{kind}"), "-cert", str(certs[kind]), "-accept",
                              f"127.0.0.1:{port}", version_flag, "-quiet"],
                             env=openssl_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        procs.append(p)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port
            except OSError:
                if p.poll() is not None:
                    raise AssertionError(p.stderr.read().decode() if p.stderr else "s_server died")
                time.sleep(0.1)
        raise AssertionError("s_server did not listen")
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tls_handshake_with_hsm_key(s_server, certs: dict[str, Path], kind: str, version: str) -> None:  # type: ignore[no-untyped-def]
    flag = "-tls1_2" if version == "1.2" else "-tls1_3"
    port = s_server(kind, flag)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(certs[kind]))
    ctx.check_hostname = False
    want = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx.minimum_version = ctx.maximum_version = want
    last: Exception | None = None
    for _ in range(20):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw) as tls:
                    assert tls.version() == f"TLSv{version}"
                    der = x509.load_pem_x509_certificate(certs[kind].read_bytes()).public_bytes(Encoding.DER)
                    assert tls.getpeercert(binary_form=True) == der
                    return
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"no TLS handshake succeeded: {last!r}")
