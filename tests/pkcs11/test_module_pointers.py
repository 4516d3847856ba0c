"""The module never touches a caller's pointer after the call that passed it has returned
(issue 11, defect 2). AES-GCM is where it used to: CloudHSM hands the HSM-generated IV back in
`CK_GCM_PARAMS.pIv`, and the module kept `pIv` from C_EncryptInit to write the IV at C_Encrypt
(a heap use-after-free write under Java's SunPKCS11, which frees that buffer after Init). The
IV is now chosen at C_EncryptInit and written into pIv before C_EncryptInit returns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from ctypes import byref, c_ulong, c_void_p, cast, create_string_buffer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsmsim.pkcs11.constants import RV, Attribute as A, Mechanism as M
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec
from p11helpers import REF_PIN, ClusterGateway, copy_module, require_module
from p11raw import CK_GCM_PARAMS, Raw, mechanism, open_session, template

U = c_ulong
KEY = bytes(range(32))
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def aes_key(raw: Raw, h: int) -> int:
    """A session AES key of known value, so results can be checked with pyca/cryptography."""
    key = U()
    t, _keep = template((A.CLASS, 4), (A.KEY_TYPE, 0x1F), (A.VALUE, KEY), (A.ENCRYPT, True),
                        (A.DECRYPT, True))
    assert raw.C_CreateObject(U(h), t, U(5), byref(key)) == RV.OK
    return key.value


def gcm(iv: Any, aad: Any = None, aadlen: int = 0) -> CK_GCM_PARAMS:
    return CK_GCM_PARAMS(cast(iv, c_void_p), 12, 96, None if aad is None else cast(aad, c_void_p),
                         aadlen, 128)


def module_decrypt(raw: Raw, h: int, key: int, iv: bytes, aad: bytes, ct: bytes) -> tuple[int, bytes]:
    ivbuf, aadbuf = create_string_buffer(iv, 12), create_string_buffer(aad, max(len(aad), 1))
    mech, _keep = mechanism(M.AES_GCM, gcm(ivbuf, aadbuf, len(aad)))
    rv = raw.C_DecryptInit(U(h), byref(mech), U(key))
    if rv != RV.OK:
        return rv, b""
    out, n = create_string_buffer(len(ct)), U(len(ct))
    rv = raw.C_Decrypt(U(h), ct, U(len(ct)), out, byref(n))
    return rv, out.raw[:n.value]


@pytest.mark.parametrize("length_query", [True, False])
def test_gcm_iv_is_in_piv_when_encrypt_init_returns_and_never_written_after(live: Raw,
                                                                             length_query: bool) -> None:
    h = open_session(live, REF_PIN)
    key = aes_key(live, h)
    iv, aad = create_string_buffer(12), create_string_buffer(b"hdr", 3)  # zeroed, as CloudHSM wants
    mech, _keep = mechanism(M.AES_GCM, gcm(iv, aad, 3))
    assert live.C_EncryptInit(U(h), byref(mech), U(key)) == RV.OK
    hsm_iv = iv.raw[:12]
    assert hsm_iv != bytes(12)  # the HSM's IV is there before C_Encrypt
    # The application is done with the buffer (SunPKCS11 frees it here); whatever reuses the
    # memory must survive C_Encrypt untouched.
    sentinel = b"\xa5" * 12
    iv.raw = sentinel
    data = b"sixteen byte msg" * 3
    n = U(len(data) + 16)
    if length_query:
        assert live.C_Encrypt(U(h), data, U(len(data)), None, byref(n)) == RV.OK
        assert n.value == len(data) + 16
        assert iv.raw[:12] == sentinel
    out = create_string_buffer(n.value)
    assert live.C_Encrypt(U(h), data, U(len(data)), out, byref(n)) == RV.OK
    assert iv.raw[:12] == sentinel
    ct = out.raw[:n.value]
    assert AESGCM(KEY).decrypt(hsm_iv, ct, b"hdr") == data  # the node encrypted with that IV
    assert module_decrypt(live, h, key, hsm_iv, b"hdr", ct) == (RV.OK, data)
    # Each C_EncryptInit draws a new IV.
    iv.raw = bytes(12)
    assert live.C_EncryptInit(U(h), byref(mech), U(key)) == RV.OK
    assert iv.raw[:12] not in (bytes(12), hsm_iv)


def test_a_refused_gcm_init_writes_nothing(live: Raw) -> None:
    h = open_session(live, REF_PIN)
    key = aes_key(live, h)
    iv = create_string_buffer(b"\x01" + bytes(11), 12)  # non-zero: CloudHSM refuses it
    mech, _keep = mechanism(M.AES_GCM, gcm(iv))
    assert live.C_EncryptInit(U(h), byref(mech), U(key)) == RV.MECHANISM_PARAM_INVALID
    assert iv.raw[:12] == b"\x01" + bytes(11)


# A fresh process: the IV, the CK_GCM_PARAMS, the CK_MECHANISM and the AAD share one page that
# is made inaccessible as soon as C_EncryptInit returns, so any later read or write of them by
# the module kills the process (SIGSEGV) instead of corrupting memory quietly.
_CHILD = r"""
import ctypes, json, sys
from ctypes import byref, c_int, c_long, c_size_t, c_ulong as U, c_void_p, create_string_buffer, sizeof
sys.path.insert(0, sys.argv[1])
from p11raw import CK_GCM_PARAMS, CK_MECHANISM, Raw, open_session, template
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = c_void_p
libc.mmap.argtypes = [c_void_p, c_size_t, c_int, c_int, c_int, c_long]
libc.mprotect.argtypes = [c_void_p, c_size_t, c_int]
raw = Raw(sys.argv[2])
assert raw.C_Initialize(None) == 0
h = open_session(raw, sys.argv[3])
key = U()
t, keep = template((0, 4), (0x100, 0x1F), (0x11, bytes(range(32))), (0x104, True), (0x105, True))
assert raw.C_CreateObject(U(h), t, U(5), byref(key)) == 0
page = libc.mmap(None, 4096, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
assert page not in (None, ctypes.c_void_p(-1).value)
params = CK_GCM_PARAMS.from_address(page)
mech = CK_MECHANISM.from_address(page + 128)
iv_at, aad_at = page + 256, page + 512
ctypes.memmove(aad_at, b"hdr", 3)
params.pIv, params.ulIvLen, params.ulIvBits = iv_at, 12, 96
params.pAAD, params.ulAADLen, params.ulTagBits = aad_at, 3, 128
mech.mechanism, mech.pParameter, mech.ulParameterLen = 0x1087, page, sizeof(CK_GCM_PARAMS)
res = {"init": raw.C_EncryptInit(U(h), c_void_p(page + 128), key)}
res["iv"] = ctypes.string_at(iv_at, 12).hex()
assert libc.mprotect(page, 4096, 0) == 0  # PROT_NONE: as good as freed
data = b"page-guarded plaintext"
n = U()
res["query"] = raw.C_Encrypt(U(h), data, U(len(data)), None, byref(n))
out = create_string_buffer(n.value)
res["encrypt"] = raw.C_Encrypt(U(h), data, U(len(data)), out, byref(n))
res["ct"] = out.raw[:n.value].hex()
raw.C_CloseSession(U(h))
raw.C_Finalize(None)
print(json.dumps(res))
"""


def test_no_access_to_encrypt_init_arguments_after_it_returns(ref_gateway: ClusterGateway,
                                                              tmp_path: Path) -> None:
    env = dict(os.environ, HSMSIM_SOCKET=str(ref_gateway.sock))
    r = subprocess.run([sys.executable, "-c", _CHILD, str(HERE), str(copy_module(tmp_path)), REF_PIN],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"the module touched freed C_EncryptInit memory (rc {r.returncode}): {r.stderr[-2000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert (res["init"], res["query"], res["encrypt"]) == (RV.OK, RV.OK, RV.OK)
    iv = bytes.fromhex(res["iv"])
    assert iv != bytes(12)
    assert AESGCM(KEY).decrypt(iv, bytes.fromhex(res["ct"]), b"hdr") == b"page-guarded plaintext"


def test_the_node_encrypts_with_the_daemons_iv_only_when_it_is_marked_chosen() -> None:
    from hsmsim.core import AesGcmKey
    from hsmsim.node import engine
    from hsmsim.node.codec import mech_from_wire, mech_to_wire
    key, chosen = AesGcmKey(KEY), os.urandom(12)
    spec = mech_from_wire(mech_to_wire(MechanismSpec(M.AES_GCM, GcmParams(chosen, b"a", 128, iv_chosen=True))))
    assert isinstance(spec.param, GcmParams) and spec.param.iv_chosen
    ct, iv = engine.gcm_encrypt(key, spec.param, b"data")
    assert iv == chosen and AESGCM(KEY).decrypt(chosen, ct, b"a") == b"data"
    # An unmarked IV (KMS passes zeros) is never used for encryption: the node draws its own.
    unmarked = mech_from_wire(mech_to_wire(MechanismSpec(M.AES_GCM, GcmParams(chosen, b"a"))))
    assert isinstance(unmarked.param, GcmParams) and not unmarked.param.iv_chosen
    assert engine.gcm_encrypt(key, unmarked.param, b"data")[1] != chosen
    with pytest.raises(Pkcs11Error) as e:
        engine.gcm_encrypt(key, GcmParams(b"short", iv_chosen=True), b"x")
    assert e.value.rv == RV.MECHANISM_PARAM_INVALID


# The same sequence as SunPKCS11 runs it, from C, with the module's sources compiled in under
# AddressSanitizer: the parameter (IV buffer included) is freed right after C_EncryptInit.
_ASAN_HARNESS = r"""
#include "hsmsim_pkcs11.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    CK_SESSION_HANDLE h;
    CK_OBJECT_HANDLE k;
    CK_ULONG cls = 4, kt = 0x1F;
    CK_BBOOL t = 1;
    CK_BYTE key[32];
    for (int i = 0; i < 32; i++) key[i] = (CK_BYTE)i;
    CK_ATTRIBUTE tmpl[] = {{0, &cls, 8}, {0x100, &kt, 8}, {0x11, key, 32}, {0x104, &t, 1}, {0x105, &t, 1}};
    if (C_Initialize(NULL) || C_OpenSession(1, 6, NULL, NULL, &h)) return 10;
    if (C_Login(h, 1, (CK_UTF8CHAR_PTR)argv[1], strlen(argv[1])) || C_CreateObject(h, tmpl, 5, &k)) return 11;
    for (int i = 0; i < 20; i++) {
        CK_GCM_PARAMS *p = calloc(1, sizeof *p);
        CK_MECHANISM *m = calloc(1, sizeof *m);
        p->pIv = calloc(1, 12);
        p->ulIvLen = 12;
        p->ulIvBits = 96;
        p->ulTagBits = 128;
        m->mechanism = CKM_AES_GCM;
        m->pParameter = p;
        m->ulParameterLen = sizeof *p;
        if (C_EncryptInit(h, m, k)) return 12;
        CK_BYTE iv[12], out[64];
        memcpy(iv, p->pIv, 12);
        free(p->pIv);
        free(p);
        free(m);
        CK_ULONG n = 0;
        if (C_Encrypt(h, (CK_BYTE_PTR)"hello", 5, NULL, &n) || n != 21) return 13;
        if (C_Encrypt(h, (CK_BYTE_PTR)"hello", 5, out, &n) || n != 21) return 14;
        printf("%s ", i ? "" : "first");
        for (int j = 0; j < 12; j++) printf("%02x", iv[j]);
        printf(" ");
        for (CK_ULONG j = 0; j < n; j++) printf("%02x", out[j]);
        printf("\n");
    }
    if (C_CloseSession(h) || C_Finalize(NULL)) return 15;
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on PATH")
def test_freeing_the_gcm_parameter_after_encrypt_init_is_clean_under_asan(ref_gateway: ClusterGateway,
                                                                           tmp_path: Path) -> None:
    src, exe = tmp_path / "harness.c", tmp_path / "harness"
    src.write_text(_ASAN_HARNESS)
    built = subprocess.run(
        ["cc", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
         "-fno-omit-frame-pointer", f"-I{ROOT / 'native' / 'pkcs11'}", str(src),
         *(str(c) for c in sorted((ROOT / "native" / "pkcs11").glob("*.c"))),
         "-lssl", "-lcrypto", "-lpthread", "-o", str(exe)], capture_output=True, text=True)
    if built.returncode and "asan" in built.stderr.lower():
        pytest.skip(f"sanitizer runtime not available: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr
    env = dict(os.environ, HSMSIM_SOCKET=str(ref_gateway.sock),
               ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    env.pop("LD_PRELOAD", None)
    run = subprocess.run([str(exe), REF_PIN], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.splitlines()]
    assert len(lines) == 20
    ivs = set()
    for fields in lines:
        iv, ct = bytes.fromhex(fields[-2]), bytes.fromhex(fields[-1])
        assert AESGCM(KEY).decrypt(iv, ct, None) == b"hello"
        ivs.add(iv)
    assert len(ivs) == 20 and bytes(12) not in ivs


# ---- many sessions, each with a pending AES-GCM encryption ----------------------------------------
MANY = 1100  # more than the 1,024 entries of the module's former global IV table


@pytest.fixture(scope="module")
def roomy_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGateway]:
    """A cluster whose applications may open more sessions than CloudHSM's 1,024."""
    require_module()
    gw = ClusterGateway(tmp_path_factory.mktemp("roomygw") / "gateway.sock",
                        {"max_sessions": str(MANY + 8)})
    yield gw
    gw.stop()


def test_many_sessions_with_pending_gcm_inits_each_get_their_iv(roomy_gateway: ClusterGateway,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSMSIM_SOCKET", str(roomy_gateway.sock))
    raw = Raw(copy_module(tmp_path))
    assert raw.C_Initialize(None) == RV.OK
    try:
        first = open_session(raw, REF_PIN)
        key = aes_key(raw, first)
        sessions = [first] + [open_session(raw) for _ in range(MANY - 1)]
        ivs, keep = [], []
        for h in sessions:  # every session's encryption is initialised before any runs
            iv = create_string_buffer(12)
            mech, k = mechanism(M.AES_GCM, gcm(iv))
            assert raw.C_EncryptInit(U(h), byref(mech), U(key)) == RV.OK
            ivs.append(iv)
            keep.append((mech, k))
        chosen = [iv.raw[:12] for iv in ivs]
        assert bytes(12) not in chosen and len(set(chosen)) == MANY
        for iv in ivs:
            iv.raw = bytes(12)  # the buffers are the application's again
        # Every session asks for its length first: more pending results than the module's
        # cache of them holds (256), which the gateway then answers itself.
        for i, h in enumerate(sessions):
            n = U()
            assert raw.C_Encrypt(U(h), i.to_bytes(4, "big") * 4, U(16), None, byref(n)) == RV.OK
            assert n.value == 32
        for i, h in enumerate(sessions):
            data = i.to_bytes(4, "big") * 4
            out, n = create_string_buffer(32), U(32)
            assert raw.C_Encrypt(U(h), data, U(len(data)), out, byref(n)) == RV.OK
            assert AESGCM(KEY).decrypt(chosen[i], out.raw[:n.value], None) == data
            assert raw.C_Encrypt(U(h), data, U(len(data)), out, byref(n)) == RV.OPERATION_NOT_INITIALIZED
        assert all(iv.raw[:12] == bytes(12) for iv in ivs)
        assert raw.C_CloseAllSessions(U(1)) == RV.OK
    finally:
        raw.C_Finalize(None)
