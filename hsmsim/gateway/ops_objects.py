"""Handlers of objects: create, copy, destroy, attributes (with the PKCS#11 rules for
lengths, sensitive and unknown attributes in one C_GetAttributeValue) and searches, with
CloudHSM's unsupported-API quirks and its template defaults."""

from __future__ import annotations

from hsmsim.gateway.protocol import Reader, Writer
from hsmsim.gateway.reply import OK, Reply, err
from hsmsim.gateway.service import Gateway
from hsmsim.gateway.state import Application
from hsmsim.gateway.templates import decode_find_template, decode_template, with_defaults
from hsmsim.pkcs11 import attributes
from hsmsim.pkcs11.constants import RV, UNAVAILABLE_INFORMATION, Attribute as A, ObjectClass


async def create_object(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    t = decode_template(r)
    r.end()
    login = app.require_login()
    cls = t.get(A.CLASS)
    if not isinstance(cls, int) or isinstance(cls, bool):
        raise err(RV.TEMPLATE_INCOMPLETE, "CKA_CLASS is required")
    if cls in (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
        if A.KEY_TYPE not in t:
            raise err(RV.TEMPLATE_INCOMPLETE, "CKA_KEY_TYPE is required")
        t = with_defaults(t, cls)
    handle = await gw.cluster.create_object(login, t, s.handle)
    return OK, Writer().u64(handle).done()


async def copy_object(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    handle = r.u64()
    t = decode_template(r)
    r.end()
    login = app.require_login()
    if gw.config.quirk_unsupported_api:
        # FIDELITY: C_CopyObject is not in the SDK 5 API list (UG:pkcs11-apis); the return
        # code for unlisted functions is not documented, we use CKR_FUNCTION_NOT_SUPPORTED.
        raise err(RV.FUNCTION_NOT_SUPPORTED, "C_CopyObject is not supported")
    new = await gw.cluster.copy_object(login, handle, t, s.handle)
    return OK, Writer().u64(new).done()


async def destroy_object(gw: Gateway, app: Application, r: Reader) -> Reply:
    app.session(r.u64())
    handle = r.u64()
    r.end()
    await gw.cluster.destroy_object(app.require_login(), handle)
    gw.key_checks.forget(handle=handle)
    return OK, b""


def get_object_size(gw: Gateway, app: Application, r: Reader) -> Reply:
    app.session(r.u64())
    r.u64()
    r.end()
    app.require_login()
    # FIDELITY: not in the SDK 5 API list (UG:pkcs11-apis); the size is unavailable anyway.
    if gw.config.quirk_unsupported_api:
        raise err(RV.FUNCTION_NOT_SUPPORTED, "C_GetObjectSize is not supported")
    return OK, Writer().u64(UNAVAILABLE_INFORMATION).done()


async def get_attribute_value(gw: Gateway, app: Application, r: Reader) -> Reply:
    app.session(r.u64())
    handle = r.u64()
    n = r.count()
    wanted = [(r.u64(), r.u8() != 0, r.u64()) for _ in range(n)]
    r.end()
    login = app.require_login()
    results = await gw.cluster.get_attributes(login, handle, [t for t, _, _ in wanted])
    if len(results) != len(wanted):
        raise err(RV.GENERAL_ERROR, "cluster returned a different number of attributes")
    w = Writer().u32(n)
    seen: set[int] = set()
    for (attr, present, cap), res in zip(wanted, results):
        if res.rv != OK or res.value is None:
            seen.add(res.rv or int(RV.ATTRIBUTE_TYPE_INVALID))
            w.u64(UNAVAILABLE_INFORMATION).u8(0).bytes(b"")
            continue
        raw = attributes.encode(attr, res.value)
        if not present:
            w.u64(len(raw)).u8(0).bytes(b"")
        elif cap < len(raw):
            seen.add(int(RV.BUFFER_TOO_SMALL))
            w.u64(UNAVAILABLE_INFORMATION).u8(0).bytes(b"")
        else:
            w.u64(len(raw)).u8(1).bytes(raw)
    rv = OK
    for candidate in (RV.ATTRIBUTE_SENSITIVE, RV.ATTRIBUTE_TYPE_INVALID, RV.BUFFER_TOO_SMALL):
        if int(candidate) in seen:
            rv = int(candidate)
            break
    return rv, w.done()


async def set_attribute_value(gw: Gateway, app: Application, r: Reader) -> Reply:
    app.session(r.u64())
    handle = r.u64()
    t = decode_template(r)
    r.end()
    login = app.require_login()
    if gw.config.quirk_unsupported_api:
        # UG:pkcs11-apis: C_SetAttributeValue is supported only for certificate objects
        # (UG:pkcs11-certificate-storage-api); key attributes change through CloudHSM CLI.
        res = await gw.cluster.get_attributes(login, handle, [A.CLASS])
        if not res or res[0].value != ObjectClass.CERTIFICATE:
            raise err(RV.FUNCTION_NOT_SUPPORTED, "C_SetAttributeValue works on certificates only")
    await gw.cluster.set_attributes(login, handle, t)
    return OK, b""


async def find_objects_init(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    t = decode_find_template(r)
    r.end()
    if s.found is not None and not gw.config.quirk_wrong_sequence_ok:
        raise err(RV.OPERATION_ACTIVE, "a search is already active")
    # Reproduced quirk (UG:ki-pkcs11-sdk item 10): a second C_FindObjectsInit succeeds.
    if app.login is None or t is None:
        # FIDELITY: without a login CloudHSM shows nothing; we answer an empty search. An
        # attribute type no object has (decode_find_template) matches nothing either.
        s.found = []
        return OK, b""
    s.found = list(await gw.cluster.find_objects(app.login, t, s.handle))
    return OK, b""


def find_objects(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    limit = r.u64()
    r.end()
    if s.found is None:
        raise err(RV.OPERATION_NOT_INITIALIZED, "C_FindObjectsInit first")
    n = min(limit, len(s.found), 1 << 20)
    batch, s.found = s.found[:n], s.found[n:]
    return OK, Writer().ulongs(batch).done()


def find_objects_final(gw: Gateway, app: Application, r: Reader) -> Reply:
    s = app.session(r.u64())
    r.end()
    if s.found is None:
        raise err(RV.OPERATION_NOT_INITIALIZED, "no search is active")
    s.found = None
    return OK, b""
