"""A small in-process reference `ClusterClient` on pyca/cryptography, used to test the gateway and
the C module without node processes (the module and gateway are the things under test here; the
real cluster is exercised by test_cluster_*.py). Run as a script it serves one gateway:

    python -m tests.pkcs11.p11ref SOCKET_PATH [key=value gateway settings...]
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.keywrap import (aes_key_unwrap, aes_key_unwrap_with_padding, aes_key_wrap,
                                                    aes_key_wrap_with_padding)

from hsmsim.cluster.api import AttributeResult, ClusterInfo, EncryptResult, Login
from hsmsim.pkcs11.attributes import Template
from hsmsim.pkcs11.constants import RV, Attribute as A, KeyType, Mechanism as M, ObjectClass, UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec, OaepParams, PssParams, RawParams

USERS = {("crypto_user", "password1"): UserType.USER, ("admin", "password1"): UserType.SO}
HASHES = {M.SHA_1: hashes.SHA1, M.SHA224: hashes.SHA224, M.SHA256: hashes.SHA256,
          M.SHA384: hashes.SHA384, M.SHA512: hashes.SHA512}
HMACS = {M.SHA_1_HMAC: "sha1", M.SHA224_HMAC: "sha224", M.SHA256_HMAC: "sha256",
         M.SHA384_HMAC: "sha384", M.SHA512_HMAC: "sha512"}
SENSITIVE = {A.VALUE, A.PRIVATE_EXPONENT, A.PRIME_1, A.PRIME_2, A.EXPONENT_1, A.EXPONENT_2, A.COEFFICIENT}
CURVES = {bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(), bytes.fromhex("06052b81040022"): ec.SECP384R1(),
          bytes.fromhex("06052b81040023"): ec.SECP521R1(), bytes.fromhex("06052b81040021"): ec.SECP224R1()}


class Obj:
    def __init__(self, attrs: Template, secret: object, owner: str, session: int | None) -> None:
        self.attrs = attrs
        self.secret = secret
        self.owner = owner
        self.session = session


class RefCluster:
    def __init__(self) -> None:
        self.objects: dict[int, Obj] = {}
        self.handles = itertools.count(0x40001)
        self.logins = itertools.count(1)

    async def info(self) -> ClusterInfo:
        return ClusterInfo("cluster-ref0000000000000", "ACTIVE", (), b"")

    async def login(self, user_type: UserType, username: str, password: str) -> Login:
        if USERS.get((username, password)) != user_type:
            raise Pkcs11Error(RV.PIN_INCORRECT, "bad login")
        return Login(next(self.logins), user_type, username)

    async def logout(self, login: Login) -> None:
        return None

    def _get(self, login: Login, handle: int) -> Obj:
        o = self.objects.get(handle)
        if o is None or (o.owner != login.username and o.attrs.get(A.CLASS) != ObjectClass.PUBLIC_KEY):
            raise Pkcs11Error(RV.OBJECT_HANDLE_INVALID, "no such object")
        return o

    def _add(self, attrs: Template, secret: object, login: Login, session: int) -> int:
        h = next(self.handles)
        self.objects[h] = Obj(attrs, secret, login.username, None if attrs.get(A.TOKEN) else session)
        return h

    async def generate_key(self, login: Login, mech: MechanismSpec, template: Template, session: int) -> int:
        t = dict(template)
        kt = {M.AES_KEY_GEN: KeyType.AES, M.GENERIC_SECRET_KEY_GEN: KeyType.GENERIC_SECRET,
              M.DES3_KEY_GEN: KeyType.DES3}[M(mech.mechanism)]
        n = int(t.get(A.VALUE_LEN, 24))  # type: ignore[arg-type]
        t.update({A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: kt, A.VALUE_LEN: n, A.LOCAL: True})
        return self._add(t, os.urandom(n), login, session)

    async def generate_key_pair(self, login: Login, mech: MechanismSpec, public: Template,
                                private: Template, session: int) -> tuple[int, int]:
        pub, priv = dict(public), dict(private)
        if mech.mechanism in (M.RSA_PKCS_KEY_PAIR_GEN, M.RSA_X9_31_KEY_PAIR_GEN):
            e = int.from_bytes(pub[A.PUBLIC_EXPONENT], "big")  # type: ignore[arg-type]
            key = rsa.generate_private_key(e, int(pub[A.MODULUS_BITS]))  # type: ignore[arg-type]
            n = key.public_key().public_numbers().n.to_bytes(int(pub[A.MODULUS_BITS]) // 8, "big")  # type: ignore[arg-type]
            common = {A.KEY_TYPE: KeyType.RSA, A.MODULUS: n, A.PUBLIC_EXPONENT: pub[A.PUBLIC_EXPONENT]}
        else:
            curve = CURVES.get(bytes(pub[A.EC_PARAMS]))  # type: ignore[arg-type]
            if curve is None:
                raise Pkcs11Error(RV.CURVE_NOT_SUPPORTED, "curve")
            key = ec.generate_private_key(curve)
            point = key.public_key().public_bytes(serialization.Encoding.X962,
                                                  serialization.PublicFormat.UncompressedPoint)
            common = {A.KEY_TYPE: KeyType.EC, A.EC_PARAMS: pub[A.EC_PARAMS]}
            pub[A.EC_POINT] = b"\x04" + bytes([len(point)]) + point
        pub.update(common)
        pub[A.CLASS] = ObjectClass.PUBLIC_KEY
        priv.update(common)
        priv.pop(A.EC_POINT, None)
        priv[A.CLASS] = ObjectClass.PRIVATE_KEY
        return (self._add(pub, key.public_key(), login, session), self._add(priv, key, login, session))

    async def create_object(self, login: Login, template: Template, session: int) -> int:
        t = dict(template)
        secret: object = t.get(A.VALUE, b"")
        if t.get(A.CLASS) == ObjectClass.SECRET_KEY:
            t[A.VALUE_LEN] = len(bytes(secret))  # type: ignore[arg-type]
        return self._add(t, secret, login, session)

    async def copy_object(self, login: Login, handle: int, template: Template, session: int) -> int:
        o = self._get(login, handle)
        return self._add({**o.attrs, **template}, o.secret, login, session)

    async def destroy_object(self, login: Login, handle: int) -> None:
        self._get(login, handle)
        del self.objects[handle]

    async def get_attributes(self, login: Login, handle: int, attrs: Sequence[int]) -> list[AttributeResult]:
        o = self._get(login, handle)
        out = []
        for a in attrs:
            if a in SENSITIVE and o.attrs.get(A.CLASS) in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY) \
                    and (o.attrs.get(A.SENSITIVE) or not o.attrs.get(A.EXTRACTABLE)):
                out.append(AttributeResult(a, None, RV.ATTRIBUTE_SENSITIVE))
            elif a == A.VALUE and o.attrs.get(A.CLASS) == ObjectClass.SECRET_KEY:
                out.append(AttributeResult(a, bytes(o.secret)))  # type: ignore[arg-type]
            elif a in o.attrs:
                out.append(AttributeResult(a, o.attrs[a]))
            else:
                out.append(AttributeResult(a, None, RV.ATTRIBUTE_TYPE_INVALID))
        return out

    async def set_attributes(self, login: Login, handle: int, template: Template) -> None:
        self._get(login, handle).attrs.update(template)

    async def find_objects(self, login: Login, template: Template, session: int) -> list[int]:
        return [h for h, o in self.objects.items()
                if (o.owner == login.username or o.attrs.get(A.CLASS) == ObjectClass.PUBLIC_KEY)
                and all(o.attrs.get(k) == v for k, v in template.items())]

    async def close_session(self, login: Login | None, session: int) -> None:
        for h in [h for h, o in self.objects.items() if o.session == session]:
            del self.objects[h]

    def _key(self, login: Login, handle: int) -> Obj:
        try:
            return self._get(login, handle)
        except Pkcs11Error:
            raise Pkcs11Error(RV.KEY_HANDLE_INVALID, "no such key") from None

    async def encrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> EncryptResult:
        o = self._key(login, handle)
        m, p = mech.mechanism, mech.param
        if m == M.AES_GCM:
            assert isinstance(p, GcmParams)
            iv = os.urandom(12)
            return EncryptResult(AESGCM(o.secret).encrypt(iv, data, p.aad or None), iv)  # type: ignore[arg-type]
        if m in (M.RSA_PKCS_OAEP, M.RSA_PKCS):
            pub = o.secret if isinstance(o.secret, rsa.RSAPublicKey) else o.secret.public_key()  # type: ignore[attr-defined]
            return EncryptResult(pub.encrypt(data, _rsa_pad(m, p)))
        return EncryptResult(_sym(o, m, p, data, True))

    async def decrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> bytes:
        o = self._key(login, handle)
        m, p = mech.mechanism, mech.param
        if m == M.AES_GCM:
            assert isinstance(p, GcmParams)
            try:
                return AESGCM(o.secret).decrypt(p.iv, data, p.aad or None)  # type: ignore[arg-type]
            except Exception:
                raise Pkcs11Error(RV.ENCRYPTED_DATA_INVALID, "tag") from None
        if m in (M.RSA_PKCS_OAEP, M.RSA_PKCS):
            try:
                return o.secret.decrypt(data, _rsa_pad(m, p))  # type: ignore[attr-defined, no-any-return]
            except ValueError:
                raise Pkcs11Error(RV.ENCRYPTED_DATA_INVALID, "rsa") from None
        return _sym(o, m, p, data, False)

    async def sign(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> bytes:
        o = self._key(login, handle)
        m, p = mech.mechanism, mech.param
        if m in HMACS:
            return hmac.new(o.secret, data, HMACS[m]).digest()  # type: ignore[arg-type]
        if m == M.AES_CMAC:
            c = CMAC(algorithms.AES(o.secret))  # type: ignore[arg-type]
            c.update(data)
            return c.finalize()
        if m == M.ECDSA:
            der = o.secret.sign(data, ec.ECDSA(utils.Prehashed(_hash_for_len(len(data)))))  # type: ignore[attr-defined]
            r, s = utils.decode_dss_signature(der)
            size = (o.secret.curve.key_size + 7) // 8  # type: ignore[attr-defined]
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        key: rsa.RSAPrivateKey = o.secret  # type: ignore[assignment]
        if m == M.RSA_PKCS:
            n = key.private_numbers().public_numbers.n
            k = (n.bit_length() + 7) // 8
            em = b"\x00\x01" + b"\xff" * (k - len(data) - 3) + b"\x00" + data
            return pow(int.from_bytes(em, "big"), key.private_numbers().d, n).to_bytes(k, "big")
        if m == M.RSA_PKCS_PSS:
            assert isinstance(p, PssParams)
            h = HASHES[p.hash_alg]()
            return key.sign(data, padding.PSS(padding.MGF1(h), p.salt_len), utils.Prehashed(h))
        raise Pkcs11Error(RV.MECHANISM_INVALID, "ref cluster cannot sign with this")

    async def verify(self, login: Login, handle: int, mech: MechanismSpec, data: bytes, signature: bytes) -> None:
        o = self._key(login, handle)
        if mech.mechanism in HMACS or mech.mechanism == M.AES_CMAC:
            if not hmac.compare_digest(await self.sign(login, handle, mech, data), signature):
                raise Pkcs11Error(RV.SIGNATURE_INVALID, "bad")
            return
        from cryptography.exceptions import InvalidSignature
        pub = o.secret if not hasattr(o.secret, "public_key") else o.secret.public_key()  # type: ignore[attr-defined]
        try:
            if mech.mechanism == M.ECDSA:
                size = len(signature) // 2
                der = utils.encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                                 int.from_bytes(signature[size:], "big"))
                pub.verify(der, data, ec.ECDSA(utils.Prehashed(_hash_for_len(len(data)))))
            elif mech.mechanism == M.RSA_PKCS:
                n, e = pub.public_numbers().n, pub.public_numbers().e
                k = (n.bit_length() + 7) // 8
                em = pow(int.from_bytes(signature, "big"), e, n).to_bytes(k, "big")
                if not em.endswith(b"\x00" + data):
                    raise InvalidSignature()
            else:
                p = mech.param
                assert isinstance(p, PssParams)
                h = HASHES[p.hash_alg]()
                pub.verify(signature, data, padding.PSS(padding.MGF1(h), p.salt_len), utils.Prehashed(h))
        except InvalidSignature:
            raise Pkcs11Error(RV.SIGNATURE_INVALID, "bad") from None

    async def wrap_key(self, login: Login, wrapping: int, mech: MechanismSpec, key: int) -> bytes:
        w, k = self._key(login, wrapping), self._get(login, key)
        if mech.mechanism == M.CLOUDHSM_AES_GCM:
            iv = os.urandom(12)
            return iv + AESGCM(w.secret).encrypt(iv, k.secret, None)  # type: ignore[arg-type]
        if mech.mechanism == M.AES_KEY_WRAP_PAD:
            return aes_key_wrap_with_padding(w.secret, k.secret)  # type: ignore[arg-type]
        return aes_key_wrap(w.secret, k.secret)  # type: ignore[arg-type]

    async def unwrap_key(self, login: Login, unwrapping: int, mech: MechanismSpec, wrapped: bytes,
                         template: Template, session: int) -> int:
        w = self._key(login, unwrapping)
        try:
            if mech.mechanism == M.CLOUDHSM_AES_GCM:
                value = AESGCM(w.secret).decrypt(wrapped[:12], wrapped[12:], None)  # type: ignore[arg-type]
            elif mech.mechanism == M.AES_KEY_WRAP_PAD:
                value = aes_key_unwrap_with_padding(w.secret, wrapped)  # type: ignore[arg-type]
            else:
                value = aes_key_unwrap(w.secret, wrapped)  # type: ignore[arg-type]
        except Exception:
            raise Pkcs11Error(RV.WRAPPED_KEY_INVALID, "bad") from None
        return await self.create_object(login, {**template, A.VALUE: value}, session)

    async def derive_key(self, login: Login, base: int, mech: MechanismSpec, template: Template,
                         session: int) -> int:
        raise Pkcs11Error(RV.MECHANISM_INVALID, "ref cluster does not derive")

    async def generate_random(self, login: Login | None, length: int) -> bytes:
        return os.urandom(length)


def _hash_for_len(n: int) -> hashes.HashAlgorithm:
    return {20: hashes.SHA1(), 28: hashes.SHA224(), 32: hashes.SHA256(), 48: hashes.SHA384(),
            64: hashes.SHA512()}[n]


def _rsa_pad(m: int, p: object) -> padding.AsymmetricPadding:
    if m == M.RSA_PKCS:
        return padding.PKCS1v15()
    assert isinstance(p, OaepParams)
    h = HASHES[p.hash_alg]()
    return padding.OAEP(padding.MGF1(h), h, p.label or None)


def _sym(o: Obj, m: int, p: object, data: bytes, enc: bool) -> bytes:
    from cryptography.hazmat.primitives import padding as sympad
    key = o.secret
    iv = p.data if isinstance(p, RawParams) else b""
    if m in (M.AES_CBC, M.AES_CBC_PAD):
        mode: modes.Mode = modes.CBC(iv)
    elif m == M.AES_ECB:
        mode = modes.ECB()
    elif m == M.AES_CTR:
        mode = modes.CTR(p.cb)  # type: ignore[attr-defined]
    else:
        raise Pkcs11Error(RV.MECHANISM_INVALID, "ref cluster cannot do this")
    c = Cipher(algorithms.AES(key), mode)  # type: ignore[arg-type]
    if m == M.AES_CBC_PAD:
        if enc:
            pd = sympad.PKCS7(128).padder()
            data = pd.update(data) + pd.finalize()
        else:
            d = c.decryptor()
            out = d.update(data) + d.finalize()
            u = sympad.PKCS7(128).unpadder()
            return u.update(out) + u.finalize()
    elif m in (M.AES_CBC, M.AES_ECB) and len(data) % 16:
        raise Pkcs11Error(RV.DATA_LEN_RANGE if enc else RV.ENCRYPTED_DATA_LEN_RANGE, "blocks")
    x = c.encryptor() if enc else c.decryptor()
    return x.update(data) + x.finalize()


async def _serve(path: Path, settings: dict[str, str]) -> None:
    from hsmsim.config import resolve_section
    from hsmsim.gateway.config import GatewayConfig
    from hsmsim.gateway.server import start_gateway
    config = resolve_section(GatewayConfig, "gateway", {"gateway": {}}, {}, settings)
    server = await start_gateway(RefCluster(), config, path)  # type: ignore[arg-type]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.close()


if __name__ == "__main__":
    settings = dict(a.split("=", 1) for a in sys.argv[2:])
    asyncio.run(_serve(Path(sys.argv[1]), settings))
