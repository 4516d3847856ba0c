"""Model-driven fuzzing of every operation on the KMS with the cluster double (ring 1): random
members built from the KMS model's shapes (valid-looking and broken), against a few real keys;
the short run also goes against the real daemon.
No request may produce a 5xx or an answer that is not an AWS-shaped error. A long run is
marked soak."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest

from hsmsim.kms.shapes import OPERATIONS, SHAPES

from .conftest import KmsEndpoint
from .test_http import send


def _value(rng: random.Random, shape_name: str, refs: list[str], depth: int = 0) -> Any:
    shape = SHAPES[shape_name]
    typ = shape["type"]
    if rng.random() < 0.05:
        return rng.choice([None, 1, "x", [], {}, True, "A" * 300])
    if typ == "string":
        if "enum" in shape:
            return rng.choice(shape["enum"])
        if "KeyId" in shape_name or "Arn" in shape_name:
            return rng.choice(refs)
        return rng.choice(["alias/fz", "cks-00000000000000000", "x" * shape.get("min", 1),
                           "arn:aws:iam::111122223333:root", "default", "k"])
    if typ == "blob":
        return base64.b64encode(rng.randbytes(rng.choice([1, 16, 32, 200]))).decode()
    if typ == "integer":
        return rng.choice([0, 1, 7, 30, 32, 90, 1024, 5000, -1])
    if typ == "boolean":
        return rng.random() < 0.5
    if typ == "timestamp":
        return rng.choice([0, 1.7e9, 4e9])
    if typ == "list":
        return [_value(rng, shape["member"], refs, depth + 1) for _ in range(rng.randint(0, 2))] if depth < 3 else []
    if typ == "map":
        return {rng.choice(["a", "b", "aws-crypto-public-key"]): "v" for _ in range(rng.randint(0, 2))}
    if typ == "structure":
        if depth >= 3:
            return {}
        members = shape["members"]
        out = {m: _value(rng, s, refs, depth + 1) for m, s in members.items() if m in shape.get("required", ())}
        for m, s in members.items():
            if rng.random() < 0.3:
                out[m] = _value(rng, s, refs, depth + 1)
        return out
    return None


def fuzz(ep: KmsEndpoint, n: int, seed: int) -> None:
    c = ep.client()
    refs = [c.create_key()["KeyMetadata"]["Arn"],
            c.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"],
            c.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"],
            "alias/fz", "00000000-0000-0000-0000-000000000000", "garbage"]
    rng = random.Random(seed)
    ops = sorted(OPERATIONS)
    for _ in range(n):
        op = rng.choice(ops)
        shape = OPERATIONS[op]["input"]
        doc = _value(rng, shape, refs) if shape else {}
        if op in ("ScheduleKeyDeletion", "DisableKey", "DeleteCustomKeyStore") and rng.random() < 0.8:
            continue  # keep the keys usable for the rest of the run
        status, headers, body = send(ep, json.dumps(doc).encode(), target=f"TrentService.{op}")
        assert status in (200, 400), (op, doc, status, body)
        assert "x-amzn-requestid" in headers
        if status == 400:
            assert isinstance(body, dict) and body["__type"].endswith("Exception"), (op, body)


def test_fuzz_every_operation_short(kms: KmsEndpoint) -> None:
    fuzz(kms, 400, 7)


@pytest.mark.soak
def test_fuzz_every_operation_long(kms_double: KmsEndpoint) -> None:
    fuzz(kms_double, 20000, 8)
