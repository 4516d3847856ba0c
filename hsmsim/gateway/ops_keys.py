"""Handlers of key management: key and key-pair generation, wrapping and unwrapping (the
parameter rules and CloudHSM's wrap forms in hsmsim.gateway.policy), derivation, and random
bytes."""

from __future__ import annotations

from hsmsim.gateway.params import decode_mechanism
from hsmsim.gateway.policy import wrap_mechanism, wrap_spec
from hsmsim.gateway.protocol import Reader, Writer
from hsmsim.gateway.reply import OK, OutSpec, Reply, err
from hsmsim.gateway.service import Gateway
from hsmsim.gateway.state import Application
from hsmsim.gateway.templates import check_secret_template, decode_template, key_pair_templates, with_defaults
from hsmsim.pkcs11.constants import (RV, Attribute as A, KeyType, Mechanism as M,
                                     MechanismFlag as F, ObjectClass)
from hsmsim.pkcs11.mechanisms import FIPS_DISALLOWED, GCM_IV_LEN, MECHANISMS
from hsmsim.pkcs11.params import GcmParams, MechanismSpec


async def generate_key(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    mech = decode_mechanism(r)
    t = decode_template(r)
    r.end()
    login = app.require_login()
    info = MECHANISMS.get(mech.mechanism)
    if info is None or not info.flags & F.GENERATE or (
            gw.config.fips_mode and mech.mechanism in FIPS_DISALLOWED):
        raise err(RV.MECHANISM_INVALID, "not a key generation mechanism")
    key_type = info.key_type if info.key_type is not None else KeyType.GENERIC_SECRET
    if t.get(A.KEY_TYPE, key_type) != key_type or t.get(A.CLASS, ObjectClass.SECRET_KEY) != ObjectClass.SECRET_KEY:
        raise err(RV.TEMPLATE_INCONSISTENT, "CKA_CLASS/CKA_KEY_TYPE do not fit the mechanism")
    check_secret_template(t, key_type)
    t = with_defaults(t, ObjectClass.SECRET_KEY)
    handle = await gw.cluster.generate_key(login, mech.spec, t, s.handle)
    return OK, Writer().u64(handle).done()


async def generate_key_pair(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    mech = decode_mechanism(r)
    pub = decode_template(r)
    priv = decode_template(r)
    r.end()
    login = app.require_login()
    info = MECHANISMS.get(mech.mechanism)
    if info is None or not info.flags & F.GENERATE_KEY_PAIR:
        raise err(RV.MECHANISM_INVALID, "not a key-pair generation mechanism")
    assert info.key_type is not None
    pub, priv = key_pair_templates(gw.config, info.key_type, pub, priv)
    spec = mech.spec
    if spec.mechanism == M.RSA_X9_31_KEY_PAIR_GEN:
        # UG:pkcs11-mechanisms: "functionally identical" to CKM_RSA_PKCS_KEY_PAIR_GEN.
        # FIDELITY: the nodes generate the pair the PKCS#1 way (no X9.31 prime conditions).
        spec = MechanismSpec(M.RSA_PKCS_KEY_PAIR_GEN)
    h_pub, h_priv = await gw.cluster.generate_key_pair(login, spec, pub, priv, s.handle)
    return OK, Writer().u64(h_pub).u64(h_priv).done()


async def wrap_key(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    mech = decode_mechanism(r)
    wrapping = r.u64()
    key = r.u64()
    out = OutSpec(r)
    r.end()
    login = app.require_login()
    wrap_mechanism(gw.config, mech, F.WRAP, True)
    cache_key = (mech, wrapping, key)
    if s.wrap_cache is not None and s.wrap_cache[0] == cache_key:
        wrapped, iv = s.wrap_cache[1], s.wrap_cache[2]
    else:
        blob = await gw.cluster.wrap_key(login, wrapping, wrap_spec(mech), key)
        wrapped, iv = blob, None
        if mech.mechanism == M.AES_GCM:
            wrapped, iv = blob[GCM_IV_LEN:], blob[:GCM_IV_LEN]
        s.wrap_cache = (cache_key, wrapped, iv)
    reply, delivered = out.reply(wrapped, iv or b"")
    if delivered:
        s.wrap_cache = None
    return reply


async def unwrap_key(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    mech = decode_mechanism(r)
    unwrapping = r.u64()
    wrapped = r.bytes()
    t = decode_template(r)
    r.end()
    login = app.require_login()
    wrap_mechanism(gw.config, mech, F.UNWRAP, False)
    if mech.mechanism == M.AES_GCM:
        p = mech.spec.param
        assert isinstance(p, GcmParams)
        wrapped = p.iv + wrapped
    cls = t.get(A.CLASS)
    if not isinstance(cls, int) or A.KEY_TYPE not in t:
        raise err(RV.TEMPLATE_INCOMPLETE, "CKA_CLASS and CKA_KEY_TYPE are required")
    t = with_defaults(t, cls)
    handle = await gw.cluster.unwrap_key(login, unwrapping, wrap_spec(mech), wrapped, t, s.handle)
    return OK, Writer().u64(handle).done()


async def derive_key(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    mech = decode_mechanism(r)
    base = r.u64()
    t = decode_template(r)
    r.end()
    login = app.require_login()
    info = MECHANISMS.get(mech.mechanism)
    if info is None or not info.flags & F.DERIVE:
        raise err(RV.MECHANISM_INVALID, "not a derivation mechanism")
    cls = t.get(A.CLASS, ObjectClass.SECRET_KEY)
    if not isinstance(cls, int):
        raise err(RV.ATTRIBUTE_VALUE_INVALID, "bad CKA_CLASS")
    t = with_defaults(t, cls)
    handle = await gw.cluster.derive_key(login, base, mech.spec, t, s.handle)
    return OK, Writer().u64(handle).done()


async def generate_random(gw: Gateway, app: Application, r: Reader) -> Reply:
    app.session(r.u64())
    n = r.u64()
    r.end()
    if n > gw.config.max_frame - 4096:
        raise err(RV.ARGUMENTS_BAD, "too many random bytes in one call")
    data = await gw.cluster.generate_random(app.login, n) if n else b""
    return OK, Writer().bytes(data).done()
