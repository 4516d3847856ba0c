"""OpenSSH (Debian's openssh-client) with the hsmsim module: `ssh-keygen -D` lists the HSM's
keys once the PIN comes through SSH_ASKPASS, `ssh-agent -P` takes the module outside /usr/lib*,
`ssh-add -s` loads the keys, and `ssh-keygen -Y sign` signs with them through the agent. The
SSHSIG signatures are checked by `ssh-keygen -Y verify` and here by pyca."""

from __future__ import annotations

import base64
import hashlib
import struct
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hsmsim.testing.cluster import HsmsimCluster

from .conftest import HERE, assert_recipe_in_source, b64, client_env, require, run_client

SCRIPT = HERE / "openssh" / "hsmsim-openssh.sh"


def _string(buf: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack(">I", buf[pos:pos + 4])
    return buf[pos + 4:pos + 4 + n], pos + 4 + n


def _ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def verify_sshsig(armored: bytes, message: bytes, public_key: object) -> str:
    """Check an `ssh-keygen -Y sign` signature (PROTOCOL.sshsig) with pyca; its algorithm."""
    lines = armored.decode().strip().splitlines()
    assert lines[0] == "-----BEGIN SSH SIGNATURE-----"
    assert lines[-1] == "-----END SSH SIGNATURE-----"
    blob = base64.b64decode("".join(lines[1:-1]))
    assert blob[:6] == b"SSHSIG" and struct.unpack(">I", blob[6:10]) == (1,)
    _pub, pos = _string(blob, 10)
    namespace, pos = _string(blob, pos)
    reserved, pos = _string(blob, pos)
    hash_alg, pos = _string(blob, pos)
    sig, pos = _string(blob, pos)
    assert pos == len(blob) and namespace == b"file" and hash_alg == b"sha512"
    signed = (b"SSHSIG" + _ssh_string(namespace) + _ssh_string(reserved) + _ssh_string(hash_alg)
              + _ssh_string(hashlib.sha512(message).digest()))
    alg, p = _string(sig, 0)
    raw, _ = _string(sig, p)
    if alg == b"ecdsa-sha2-nistp256":
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        r, q = _string(raw, 0)
        s, _ = _string(raw, q)
        der = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
        public_key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
    else:
        assert alg == b"rsa-sha2-512" and isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(raw, signed, padding.PKCS1v15(), hashes.SHA512())
    return alg.decode()


def test_openssh(client_cluster: HsmsimCluster, tmp_path: Path) -> None:
    require("ssh-keygen", "ssh-agent", "ssh-add", "pkcs11-tool")
    # HOME is a scratch directory: nothing is read from or written to the user's ~/.ssh.
    env = client_env(client_cluster, HOME=str(tmp_path), TMPDIR=str(tmp_path))
    assert Path(env["HSMSIM_SSH_ASKPASS"]).stat().st_mode & 0o777 == 0o700
    out = run_client(["bash", str(SCRIPT)], env)
    msg = b64(out, "message")

    # The PIN cannot be asked for without a terminal or askpass; ssh-agent without -P refuses
    # a module outside /usr/lib*.
    assert out["no_pin_D"] == "failed"
    assert out["default_agent_add"] == "refused"

    # ssh-keygen -D and the agent see the keys pkcs11-tool generated, labels as comments.
    ec_pub = serialization.load_der_public_key(b64(out, "ec_public_der"))
    rsa_pub = serialization.load_der_public_key(b64(out, "rsa_public_der"))
    assert isinstance(ec_pub, ec.EllipticCurvePublicKey) and ec_pub.curve.name == "secp256r1"
    assert isinstance(rsa_pub, rsa.RSAPublicKey) and rsa_pub.key_size == 2048
    listed = b64(out, "keygen_D").decode().splitlines()
    for line, pub in ((out["agent_ec"], ec_pub), (out["agent_rsa"], rsa_pub)):
        assert line in listed
        assert serialization.load_ssh_public_key(line.encode()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == pub.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)

    # Signatures made in the HSM through the agent: ssh-keygen -Y verify and pyca agree.
    assert out["ec_verify"].startswith('Good "file" signature for me with ECDSA key')
    assert out["rsa_verify"].startswith('Good "file" signature for me with RSA key')
    assert out["tampered_verify"] == "refused"
    assert verify_sshsig(b64(out, "ec_sshsig"), msg, ec_pub) == "ecdsa-sha2-nistp256"
    assert verify_sshsig(b64(out, "rsa_sshsig"), msg, rsa_pub) == "rsa-sha2-512"


def test_readme_recipe_is_what_runs() -> None:
    assert_recipe_in_source("OpenSSH", SCRIPT)
