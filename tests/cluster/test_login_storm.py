"""Hostile login load (issue 17, defects 1 and 2), through the real PKCS#11 module and gateway:
a storm of correct logins from many applications beside an honest signer, and a burst of
concurrent password guesses for one user.

Every application is a private copy of the module loaded with ctypes (its own library state,
so its own gateway connection and login), driven from its own thread; the daemon runs in this
process (tests/cluster/conftest.Harness) with the gateway started on its loop, so the test can
read each HSM's audit log and the daemon's view of its members."""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from ctypes import byref, c_ubyte, c_ulong, c_void_p
from pathlib import Path
from typing import Any

import pytest

from hsmsim.cluster.api import Login
from hsmsim.pkcs11.constants import RV, Attribute, Mechanism, UserType
from hsmsim.pkcs11.params import GcmParams, MechanismSpec
from hsmsim.resources import pkcs11_module

from .conftest import AES_GEN, Harness, aes_template

CKF_RW_SERIAL = 0x6
CKU_USER = 1
CU_PIN = "crypto_user:cu-password-1"
LOCKOUT_AFTER = 5  # CloudHSM: five incorrect attempts (hsmsim.node.ops_users.LOCKOUT_AFTER)
RV_NAMES = {int(v): v.name for v in RV}


class CK_MECHANISM(ctypes.Structure):
    _fields_ = [("mechanism", c_ulong), ("pParameter", c_void_p), ("ulParameterLen", c_ulong)]


class App:
    """One PKCS#11 application: a private copy of the module (own state, own connection)."""

    def __init__(self, template: Path, where: Path, n: int) -> None:
        path = where / f"app{n}.so"
        shutil.copy(template, path)
        self.dll = ctypes.CDLL(str(path))
        for name in ("C_Initialize", "C_Finalize", "C_OpenSession", "C_Login", "C_SignInit",
                     "C_Sign"):
            getattr(self.dll, name).restype = c_ulong
        rv = self.dll.C_Initialize(None)
        assert rv == 0, RV_NAMES.get(rv, rv)
        h = c_ulong()
        rv = self.dll.C_OpenSession(c_ulong(1), c_ulong(CKF_RW_SERIAL), None, None, byref(h))
        assert rv == 0, RV_NAMES.get(rv, rv)
        self.session = h.value

    def login(self, pin: str) -> int:
        p = pin.encode()
        return int(self.dll.C_Login(c_ulong(self.session), c_ulong(CKU_USER), p, c_ulong(len(p))))

    def sign_hmac(self, handle: int, data: bytes) -> int:
        mech = CK_MECHANISM(int(Mechanism.SHA256_HMAC), None, 0)
        rv = int(self.dll.C_SignInit(c_ulong(self.session), byref(mech), c_ulong(handle)))
        if rv:
            return rv
        out = (c_ubyte * 64)()
        n = c_ulong(64)
        return int(self.dll.C_Sign(c_ulong(self.session), data, c_ulong(len(data)), out, byref(n)))

    def close(self) -> None:
        self.dll.C_Finalize(None)


class Rig:
    """A 3-HSM cluster in this process with its PKCS#11 gateway."""

    def __init__(self, root: Path, overrides: tuple[tuple[str, Any], ...]) -> None:
        from hsmsim.gateway.config import GatewayConfig
        from hsmsim.gateway.server import start_gateway
        self.dir = root
        self.h = Harness(root / "state", overrides=overrides)
        self.sock = root / "gateway.sock"
        self.gw = self.h.call(start_gateway(self.h.cluster, GatewayConfig(), self.sock))
        assert os.environ.get("HSMSIM_SOCKET") == str(self.sock)  # read by C_Initialize
        self.module = pkcs11_module()
        self.apps = root / "apps"
        self.apps.mkdir()
        self._n = 0

    def apps_for(self, count: int) -> list[App]:
        out = []
        for _ in range(count):
            self._n += 1
            out.append(App(self.module, self.apps, self._n))
        return out

    def generations(self) -> dict[str, int]:
        return {m.hsm_id: m.generation for m in self.h.cluster.members.values()}

    def audit(self, username: str) -> dict[str, list[dict[str, Any]]]:
        """Each HSM's login audit records for `username`, in order."""
        self.h.wait_converged(120)

        async def read() -> dict[str, list[dict[str, Any]]]:
            out: dict[str, list[dict[str, Any]]] = {}
            for m in self.h.cluster.members.values():
                assert m.client is not None
                recs = await m.client.audit_read(0, 10000)
                out[m.hsm_id] = [dict(r.fields, event=r.event) for r in recs
                                 if r.event in ("login", "login_failed")
                                 and r.fields.get("username") == username]
            return out
        return self.h.call(read())

    def close(self) -> None:
        try:
            self.h.call(self.gw.close())
        finally:
            self.h.close()


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    # A short request timeout makes a short storm reach it (the storm of 100 reached
    # the default 3 s); the storm must still not look like dead HSMs.
    monkeypatch.setenv("HSMSIM_SOCKET", str(tmp_path / "gateway.sock"))
    r = Rig(tmp_path, (("request_timeout_s", 1.0),))
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def rig_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    monkeypatch.setenv("HSMSIM_SOCKET", str(tmp_path / "gateway.sock"))
    r = Rig(tmp_path, ())
    try:
        yield r
    finally:
        r.close()


def _at_once(jobs: list[Any]) -> list[Any]:
    """Run the callables in their own threads, released together; their results in order."""
    results: list[Any] = [None] * len(jobs)
    gate = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        gate.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return results


def storm(rig: Rig, logins: int) -> None:
    """`logins` applications log in at once with correct passwords while another application
    signs and a third holds a session key."""
    h = rig.h
    c = h.cluster
    owner = h.login()
    secret = h.call(c.generate_key(owner, MechanismSpec(int(Mechanism.GENERIC_SECRET_KEY_GEN)), {
        int(Attribute.TOKEN): True, int(Attribute.VALUE_LEN): 32, int(Attribute.LABEL): "signer",
        int(Attribute.SIGN): True, int(Attribute.VERIFY): True}, 1))
    other: Login = h.login()
    session_key = h.call(c.generate_key(other, AES_GEN, aes_template(token=False), 7))
    h.wait_converged(60)
    signer = rig.apps_for(1)[0]
    assert signer.login(CU_PIN) == 0
    assert signer.sign_hmac(secret, b"warm-up") == 0
    apps = rig.apps_for(logins)
    before = rig.generations()
    stop = threading.Event()
    signed: Counter[str] = Counter()

    def sign_loop() -> None:
        while not stop.is_set():
            rv = signer.sign_hmac(secret, b"honest")
            signed[RV_NAMES.get(rv, hex(rv))] += 1

    t = threading.Thread(target=sign_loop)
    t.start()
    try:
        answers = _at_once([lambda a=a: a.login(CU_PIN) for a in apps])
    finally:
        stop.set()
        t.join(60)
    got = Counter(RV_NAMES.get(a, repr(a)) if isinstance(a, int) else repr(a) for a in answers)
    down = {m.hsm_id: m.last_error for m in c.members.values()
            if before[m.hsm_id] != m.generation or not m.usable}
    print(f"\nstorm of {logins} logins: answers {dict(got)}; honest signer {dict(signed)}; "
          f"HSMs marked down {down}")
    alive = session_key in c.directory
    gcm = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=b"", aad=b"", tag_bits=128))
    if alive:
        h.call(c.encrypt(other, session_key, gcm, b"still here"))
    for a in apps:
        a.close()
    signer.close()
    assert got == Counter({"OK": logins}), got
    assert set(signed) == {"OK"} and signed["OK"] > 0, signed
    assert down == {}
    assert alive, "another application's session key was destroyed"
    assert rig.generations() == before


def guesses(rig: Rig, n: int) -> None:
    """`n` applications log in at once as one user: n-1 with wrong passwords, one right."""
    h = rig.h
    c = h.cluster
    admin = h.login("admin", "admin-password-1", UserType.SO)
    h.call(c.create_user(admin, "guesser", "crypto-user", "right-password-1"))
    h.wait_converged(60)
    apps = rig.apps_for(n)
    right = n // 2
    pins = [f"guesser:wrong-pass-{i:03d}" for i in range(n)]
    pins[right] = "guesser:right-password-1"
    answers = _at_once([lambda a=a, p=p: a.login(p) for a, p in zip(apps, pins)])
    names = [RV_NAMES.get(a, repr(a)) if isinstance(a, int) else repr(a) for a in answers]
    wrong = Counter(x for i, x in enumerate(names) if i != right)
    audit = rig.audit("guesser")
    verified = {hid: [r for r in recs if r["event"] == "login_failed" and r.get("reason") is None]
                for hid, recs in audit.items()}
    successes = {hid: sum(r["event"] == "login" for r in recs) for hid, recs in audit.items()}
    print(f"\nburst of {n} guesses: wrong answered {dict(wrong)}; right answered "
          f"{names[right]}; failures verified per HSM "
          f"{ {hid: len(v) for hid, v in verified.items()} }; successes per HSM {successes}")
    # After the burst the account is locked: right and wrong passwords get the same answer.
    after = rig.apps_for(2)
    late = [after[0].login("guesser:right-password-1"), after[1].login("guesser:wrong-pass-xyz")]
    for a in apps + after:
        a.close()

    assert set(names) <= {"OK", "PIN_INCORRECT", "PIN_LOCKED"}, names
    assert names[right] in ("OK", "PIN_LOCKED")
    for hid, recs in audit.items():
        # Check, verify and count are one step: at most LOCKOUT_AFTER failures are verified
        # between two successes, and no failure is lost (the counter goes 1, 2, 3, ...).
        run = 0
        for r in recs:
            if r["event"] == "login":
                run = 0
            elif r.get("reason") is None:
                run += 1
                assert r["failed"] == run, (hid, recs)
                assert run <= LOCKOUT_AFTER, (hid, recs)
        assert successes[hid] <= 1
        assert len(verified[hid]) <= LOCKOUT_AFTER * (1 + successes[hid])
    ok = names.count("OK")
    # Only failures a node verified can answer PIN_INCORRECT; everything else is PIN_LOCKED,
    # whatever the password, so the right one never stands out.
    assert wrong["PIN_INCORRECT"] <= LOCKOUT_AFTER * (1 + ok)
    assert wrong["PIN_LOCKED"] == n - 1 - wrong["PIN_INCORRECT"]
    assert late == [int(RV.PIN_LOCKED), int(RV.PIN_LOCKED)]
    users = {u.username: u for u in h.call(c.list_users(admin))}
    assert users["guesser"].locked


def test_login_storm_beside_a_signer(rig: Rig) -> None:
    storm(rig, 36)


def test_password_guess_burst(rig: Rig) -> None:
    guesses(rig, 24)


@pytest.mark.soak
def test_login_storm_soak(rig_default: Rig) -> None:
    storm(rig_default, 100)


@pytest.mark.soak
def test_password_guess_burst_soak(rig_default: Rig) -> None:
    guesses(rig_default, 60)
