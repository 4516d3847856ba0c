"""Optional request quotas as token buckets: per-operation rates, the shared cryptographic
quota and 1,800 requests/s per custom key store. An empty bucket means ThrottlingException."""

from __future__ import annotations

import time
from collections.abc import Callable

from hsmsim.kms import errors as e

CRYPTO_OPS = frozenset({"Encrypt", "Decrypt", "ReEncrypt", "GenerateDataKey",
                        "GenerateDataKeyWithoutPlaintext", "GenerateRandom", "Sign", "Verify",
                        "GenerateMac", "VerifyMac"})
SHARED_CRYPTO_RPS = 50_000.0  # us-east-1
CUSTOM_KEY_STORE_RPS = 1_800.0
OP_RPS: dict[str, float] = {
    "CreateKey": 5, "CreateAlias": 5, "UpdateAlias": 5, "DeleteAlias": 15, "DescribeKey": 2000,
    "ListKeys": 500, "ListAliases": 500, "EnableKey": 5, "DisableKey": 5, "EnableKeyRotation": 15,
    "DisableKeyRotation": 5, "GetKeyRotationStatus": 1000, "ScheduleKeyDeletion": 15,
    "CancelKeyDeletion": 5, "PutKeyPolicy": 15, "GetKeyPolicy": 1000, "CreateGrant": 50,
    "ListGrants": 100, "RetireGrant": 30, "RevokeGrant": 30, "TagResource": 10, "UntagResource": 5,
    "ListResourceTags": 2000, "GetPublicKey": 2000, "UpdateKeyDescription": 5,
    "CreateCustomKeyStore": 5, "ConnectCustomKeyStore": 5, "DisconnectCustomKeyStore": 5,
    "DescribeCustomKeyStores": 5, "UpdateCustomKeyStore": 5, "DeleteCustomKeyStore": 5,
    "GenerateDataKeyPair": 25, "GenerateDataKeyPairWithoutPlaintext": 25,
    "ReplicateKey": 5, "UpdatePrimaryRegion": 5,
}
MESSAGE = "You have exceeded the rate at which you may call KMS. Reduce the frequency of your calls."


class Bucket:
    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(rate, 1.0)
        self.tokens = self.capacity
        self._clock = clock
        self.stamp = clock()

    def take(self) -> bool:
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Quotas:
    def __init__(self, op_rps: dict[str, float] | None = None, shared: float = SHARED_CRYPTO_RPS,
                 per_store: float = CUSTOM_KEY_STORE_RPS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` (seconds, monotonic) is injectable so that tests see exact refills."""
        self._clock = clock
        self._ops = {k: Bucket(v, clock=clock) for k, v in (op_rps or OP_RPS).items()}
        self._shared = Bucket(shared, clock=clock)
        self._per_store_rate = per_store
        self._stores: dict[str, Bucket] = {}

    def check(self, op: str) -> None:
        bucket = self._ops.get(op)
        if bucket is not None and not bucket.take():
            raise e.Throttled(MESSAGE)
        if op in CRYPTO_OPS and not self._shared.take():
            raise e.Throttled(MESSAGE)

    def check_store(self, store_id: str) -> None:
        bucket = self._stores.setdefault(store_id, Bucket(self._per_store_rate, clock=self._clock))
        if not bucket.take():
            raise e.Throttled(MESSAGE)
