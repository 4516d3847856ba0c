"""Hostile input and hostile load on the KMS endpoint (issue 17): the test clock refuses moves
that would break dates and answers only signed requests; deeply nested JSON is a
SerializationException; a request that fails changes nothing (store, audit, cluster); slow or
half-sent HTTP requests are timed out and capped so the daemon's other services keep working;
malformed header lines never reach the log; the KMS port is kept with the cluster. Long
versions of the clock fuzz and of the slow-client flood are marked soak."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from hsmsim.kms.config import KmsConfig

from .conftest import KmsEndpoint, start_double, stop_double
from .test_http import send


@pytest.fixture
def fresh(tmp_path: Path) -> Any:
    """A KMS of its own (cluster double) that a test may damage; restartable on the same state."""
    eps: list[KmsEndpoint] = []

    def start(config: KmsConfig | None = None) -> KmsEndpoint:
        if eps and eps[-1].server is not None:
            stop_double(eps[-1])
            eps[-1].server = None
        ep = start_double(tmp_path, config)
        eps.append(ep)
        return ep

    yield start
    if eps and eps[-1].server is not None:
        stop_double(eps[-1])


def clock(ep: KmsEndpoint, body: bytes, sign: bool = True) -> tuple[int, Any]:
    status, _, parsed = send(ep, body, target=None, content_type="application/json", sign=sign,
                             path="/_hsmsim/clock")
    return status, parsed


def healthy(ep: KmsEndpoint) -> None:
    """Every date the KMS answers is a finite number and a new key works end to end."""
    c = ep.client()
    md = c.create_key(Description="after")["KeyMetadata"]
    blob = c.encrypt(KeyId=md["KeyId"], Plaintext=b"x")["CiphertextBlob"]
    assert c.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"
    status, _, body = send(ep, json.dumps({"KeyId": md["KeyId"]}).encode(), target="TrentService.DescribeKey")
    assert status == 200 and isinstance(body["KeyMetadata"]["CreationDate"], float)


# -- 17.3: the clock endpoint -------------------------------------------------------------------
BAD_MOVES = [b"NaN", b"Infinity", b"-Infinity", b"1e12", b"1e308", b"-5", b"10" * 400, b'"60"', b"true",
             b"[1]", b"{}"]


@pytest.mark.parametrize("value", BAD_MOVES)
def test_clock_refuses_moves_that_break_dates(fresh: Any, value: bytes) -> None:
    ep = fresh()
    status, body = clock(ep, b'{"advance_seconds": ' + value + b"}")
    assert status == 400 and body["__type"] == "ValidationException", body
    assert "advance_seconds" in body["message"] or "forward" in body["message"]
    healthy(ep)
    ep = fresh()  # the refused move was not saved either
    healthy(ep)
    status, body = clock(ep, b'{"advance_seconds": 0}')
    assert status == 200 and body["offset"] == 0.0


def test_clock_total_offset_is_bounded(fresh: Any) -> None:
    ep = fresh()
    assert clock(ep, b'{"advance_seconds": 3000000000}')[0] == 200
    status, body = clock(ep, b'{"advance_seconds": 3000000000}')
    assert status == 400 and body["__type"] == "ValidationException"
    status, body = clock(ep, b'{"advance_seconds": 86400}')
    assert status == 200 and body["offset"] == 3000086400.0
    healthy(fresh())


@pytest.mark.parametrize("body", [b"[", b"[1, 2]", b"[" * 5000])
def test_clock_malformed_bodies(fresh: Any, body: bytes) -> None:
    ep = fresh()
    status, parsed = clock(ep, body)
    assert status == 400 and parsed["__type"] == "SerializationException"


def test_clock_needs_a_signature(fresh: Any) -> None:
    ep = fresh()
    status, body = clock(ep, b'{"advance_seconds": 60}', sign=False)
    assert status == 403 and body["__type"] == "MissingAuthenticationTokenException"
    status, body = clock(ep, b'{"advance_seconds": 0}')
    assert status == 200 and body["offset"] == 0.0  # the unsigned move did nothing


def test_clock_checks_the_signature_in_strict_mode(fresh: Any) -> None:
    ep = fresh(KmsConfig(port=0, strict_sigv4=True,
                         principals=("AKIDRAW=arn:aws:iam::111122223333:user/raw=raw-secret",)))
    status, body = clock(ep, b'{"advance_seconds": 60}')
    assert status == 200 and body["offset"] == 60.0
    status, _, body = send(ep, b'{"advance_seconds": 60}', target=None, content_type="application/json",
                           path="/_hsmsim/clock",
                           extra={"Authorization": "AWS4-HMAC-SHA256 Credential=AKIDRAW/20261123/us-east-1/kms/"
                                                   "aws4_request, SignedHeaders=host, Signature=00"})
    assert status == 400 and body["__type"] == "InvalidSignatureException"


def test_clock_endpoint_refused_by_config(fresh: Any) -> None:
    ep = fresh(KmsConfig(port=0, clock_control=False))
    status, body = clock(ep, b'{"advance_seconds": 60}')
    assert status == 404 and body["__type"] == "NotFoundException"
    healthy(ep)


def test_a_bad_offset_saved_by_an_earlier_version_is_ignored(fresh: Any) -> None:
    ep = fresh()
    assert ep.server is not None and ep.loop is not None
    ep.server.service.kms.store.set_meta("clock_offset", "nan")
    ep = fresh()
    healthy(ep)


def _fuzz_clock(ep: KmsEndpoint, n: int, seed: int) -> None:
    rng = random.Random(seed)
    atoms: list[bytes] = [b"NaN", b"Infinity", b"-Infinity", b"1e308", b"-1e308", b"1e12", b"0", b"-0.0", b"1",
                          b"3155760001", b"86400.5", b"null", b"true", b'"1"', b"[]", b"{}", b"1" * 500,
                          b"4e-324", b"-1", b"2" * 20]
    for _ in range(n):
        value = rng.choice(atoms)
        body = rng.choice([b'{"advance_seconds": ' + value + b"}", value, b'{"advance_seconds": [' + value + b"]}",
                           b"{" * rng.randint(1, 3000)])
        status, parsed = clock(ep, body, sign=rng.random() < 0.8)
        assert status in (200, 400, 403), (body[:80], status, parsed)
        assert isinstance(parsed, dict) and parsed.get("__type", "ok") != "KMSInternalException"
    healthy(ep)


def test_clock_fuzz_short(fresh: Any) -> None:
    ep = fresh()
    _fuzz_clock(ep, 60, 17)
    healthy(fresh())


@pytest.mark.soak
def test_clock_fuzz_soak(fresh: Any) -> None:
    ep = fresh()
    _fuzz_clock(ep, 3000, 1703)
    healthy(fresh())


# -- 17.6: deeply nested JSON -------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"[" * 60_000, b'{"KeyId": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                  b'{"Tags": ' + b"[{" * 40 + b"}]" * 40 + b"}",
                                  b'{"x": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}"])
def test_deeply_nested_json_is_a_serialization_error(kms_double: KmsEndpoint, body: bytes) -> None:
    status, _, parsed = send(kms_double, body, target="TrentService.CreateKey")
    assert status == 400 and parsed["__type"] == "SerializationException", parsed
    assert send(kms_double, b"{}")[0] == 200


# -- 17.3: a request that fails changes nothing --------------------------------------------------
def _audit_lines(ep: KmsEndpoint) -> list[dict[str, Any]]:
    path = ep.state_dir / "kms" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _db_rows(ep: KmsEndpoint, table: str) -> int:
    import sqlite3
    db = sqlite3.connect(str(ep.state_dir / "kms" / "kms.sqlite3"))
    try:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


def _fail_success_records(monkeypatch: pytest.MonkeyPatch, ep: KmsEndpoint, op: str) -> None:
    """The audit write of `op`'s success record raises (the last step of a request); failure
    records are still written."""
    assert ep.server is not None
    audit = ep.server.service.audit
    real = audit._write

    def write(line: str) -> None:
        rec = json.loads(line)
        if rec["eventName"] == op and "errorCode" not in rec:
            raise ValueError("injected: cannot write the record")  # as time.gmtime(NaN) did
        real(line)
    monkeypatch.setattr(audit, "_write", write)


def test_a_failed_create_key_changes_nothing(fresh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError
    ep = fresh()
    c = ep.client()  # boto3's default retries: the 500 is tried 3 times (3 keys before the fix)
    c.create_key(Description="before")
    keys_before = sorted(k["KeyId"] for k in c.list_keys()["Keys"])
    rows_before = (_db_rows(ep, "keys"), _db_rows(ep, "materials"))
    _fail_success_records(monkeypatch, ep, "CreateKey")
    with pytest.raises(ClientError) as exc:
        c.create_key(Description="doomed")
    assert exc.value.response["Error"]["Code"] == "KMSInternalException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert sorted(k["KeyId"] for k in c.list_keys()["Keys"]) == keys_before
    assert (_db_rows(ep, "keys"), _db_rows(ep, "materials")) == rows_before
    records = [r for r in _audit_lines(ep) if r["eventName"] == "CreateKey"]
    assert [r.get("errorCode") for r in records][1:] == ["KMSInternalException"] * (len(records) - 1)
    assert len(records) >= 2  # the failures are on record
    monkeypatch.undo()
    healthy(fresh())  # and nothing half-done comes back after a restart
    assert _db_rows(ep, "keys") == rows_before[0] + 1


def test_a_failed_alias_and_tag_change_nothing(fresh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError
    ep = fresh()
    c = ep.client()
    key = c.create_key()["KeyMetadata"]["KeyId"]
    for op, call in (("CreateAlias", lambda: c.create_alias(AliasName="alias/doomed", TargetKeyId=key)),
                     ("TagResource", lambda: c.tag_resource(KeyId=key, Tags=[{"TagKey": "t", "TagValue": "v"}]))):
        _fail_success_records(monkeypatch, ep, op)
        with pytest.raises(ClientError) as exc:
            call()
        assert exc.value.response["Error"]["Code"] == "KMSInternalException"
        monkeypatch.undo()
    assert c.list_aliases(KeyId=key)["Aliases"] == []
    assert c.list_resource_tags(KeyId=key)["Tags"] == []
    assert _db_rows(ep, "aliases") == 0


def test_a_failed_custom_key_store_create_key_removes_its_cluster_key(
        fresh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.config import Config
    from botocore.exceptions import ClientError
    from .conftest import connected_store
    ep = fresh()
    c = ep.client(config=Config(retries={"total_max_attempts": 1}))
    store = connected_store(ep, c)
    assert ep.double is not None
    objects_before = set(ep.double.objects)
    _fail_success_records(monkeypatch, ep, "CreateKey")
    with pytest.raises(ClientError) as exc:
        c.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)
    assert exc.value.response["Error"]["Code"] == "KMSInternalException"
    assert set(ep.double.objects) == objects_before  # the backing key was destroyed again
    assert c.list_keys()["Keys"] == []
