"""One table per fact: the mechanism table carries each mechanism's parameter rule (data, not
a code path in the gateway), and the mechanism -> hash map lives once, in
hsmsim.pkcs11.mechanisms.HASHES, read by the gateway and the node; the crypto core's list of
hash names (with its C codes) agrees with it."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from hsmsim.core._args import HASHES as CORE_HASHES
from hsmsim.pkcs11 import mechanisms
from hsmsim.pkcs11.constants import Mechanism as M, MechanismFlag as F
from hsmsim.pkcs11.mechanisms import HASHES, MECHANISMS, ParamRule

PACKAGE = Path(mechanisms.__file__).resolve().parents[1]
HASH_NAMES = {h.name for h in HASHES}


def test_parameter_rules_live_in_the_mechanism_table() -> None:
    assert MECHANISMS[M.AES_CBC].params == MECHANISMS[M.AES_CBC_PAD].params
    assert MECHANISMS[M.AES_CBC].params is not None and MECHANISMS[M.AES_CBC].params.raw_lens == {16}
    assert MECHANISMS[M.DES3_CBC].params is not None and MECHANISMS[M.DES3_CBC].params.raw_lens == {8}
    assert MECHANISMS[M.AES_ECB].params == mechanisms.NO_PARAM
    for m, info in MECHANISMS.items():
        if info.params is None:  # derivation parameters are checked by the node
            assert info.flags & F.DERIVE, hex(m)
        else:
            assert isinstance(info.params, ParamRule), hex(m)
    for h in HASHES:  # every hash-and-PSS mechanism takes PSS parameters matching its hash
        assert MECHANISMS[h.rsa_pss].params == mechanisms.PSS_RULE
        assert MECHANISMS[h.rsa_pss].hash == MECHANISMS[h.rsa_pkcs].hash == h.name


def test_the_gateway_has_no_per_mechanism_parameter_branches() -> None:
    policy = (PACKAGE / "gateway" / "policy.py").read_text()
    tree = ast.parse(policy)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "check_params")
    assert not [n for n in ast.walk(fn) if isinstance(n, ast.If)], "parameter rules belong in the table"


def test_the_hash_names_are_the_crypto_cores() -> None:
    assert HASH_NAMES == set(CORE_HASHES)
    for h in HASHES:
        assert CORE_HASHES[h.name][1] == hashlib.new(h.name).digest_size
        assert mechanisms.DIGEST_INFO[h.name][-1] == hashlib.new(h.name).digest_size


def _hash_maps(path: Path) -> list[str]:
    """Dict literals in `path` with a hash name as a key or value: a hand copy of the table."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Dict):
            consts = [v.value for v in (*node.keys, *node.values) if isinstance(v, ast.Constant)]
            if any(c in HASH_NAMES for c in consts):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_one_mechanism_to_hash_table() -> None:
    allowed = {PACKAGE / "pkcs11" / "mechanisms.py", PACKAGE / "core" / "_args.py"}
    copies = [f for p in sorted(PACKAGE.rglob("*.py")) if p not in allowed for f in _hash_maps(p)
              if p.parts[-2] in ("node", "gateway", "pkcs11", "core", "cluster")]
    assert not copies, copies
    # the node's consumers read the table itself
    from hsmsim.node import engine, kdf, ops_crypto, ops_keys
    assert engine.HASH_OF_RSA_PKCS is mechanisms.HASH_OF_RSA_PKCS
    assert engine.HASH_OF_MGF is mechanisms.HASH_OF_MGF
    assert ops_crypto.HASH_OF_ECDSA is mechanisms.HASH_OF_ECDSA
    assert ops_keys.HASH_OF_KDF is mechanisms.HASH_OF_KDF
    assert kdf.HASH_OF_HMAC is mechanisms.HASH_OF_HMAC
    for gone in ("HASH_NAMES", "MGF_NAMES", "RSA_PKCS_HASH", "RSA_PSS_HASH"):
        assert not hasattr(engine, gone), gone
    for gone in ("DIGESTS", "ECDSA_HASH", "HMAC_HASHES"):
        assert not hasattr(ops_crypto, gone), gone
    for gone in ("X963_HASHES", "PRF_HASHES"):
        assert not hasattr(kdf, gone), gone
