"""The KMS request pipeline, independent of HTTP: authenticate (SigV4 parse, strict
verification), pick the operation, validate the input, apply quotas, run the handler, write
the audit record, and translate any domain error into the AWS error once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hsmsim.kms import errors as e
from hsmsim.kms import sigv4, wire
from hsmsim.kms.audit import AuditLog
from hsmsim.kms.config import KNOWN_REGIONS
from hsmsim.kms.ops import HANDLERS
from hsmsim.kms.ops.common import Call
from hsmsim.kms.ops.sweep import sweep
from hsmsim.kms.quotas import CRYPTO_OPS, Quotas
from hsmsim.kms.runtime import Kms
from hsmsim.kms.store import Unit

log = logging.getLogger("hsmsim.kms")

# FIDELITY: modelled operations hsmsim does not implement (DeriveSharedSecret, Encapsulate,
# Decapsulate) answer UnsupportedOperationException.
TRACKED = frozenset({"Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext",
                     "GenerateDataKeyWithoutPlaintext", "GenerateMac", "ReEncrypt", "Sign", "Verify", "VerifyMac"})


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    source_ip: str
    request_id: str


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes


class KmsService:
    def __init__(self, kms: Kms, audit: AuditLog) -> None:
        self.kms = kms  # the default Region's KMS; a request's Region picks its own
        self.audit = audit
        self._quotas: dict[str, Quotas] = {}  # per Region, as AWS's quotas are per account and Region
        self.quota_clock: Callable[[], float] = time.monotonic  # injectable: tests refill exactly
        self._sweep_lock = asyncio.Lock()  # the periodic sweep and a clock move never overlap

    async def handle(self, req: HttpRequest) -> HttpResponse:
        """One request, all or nothing: the handler's store writes are held back and committed
        together with the audit record once the response is ready; any failure before that
        (in the handler, in rendering the audit record or the response, in writing them)
        discards the writes, undoes what the handler did outside the store (`Call.undo`) and
        answers the error (audited on its own).

        FIDELITY: AWS does not document this; a change that is not on the audit trail, or half
        a change, must not happen here. A request with store changes whose audit record cannot
        be written answers KMSInternalException; one without changes still succeeds (logged)."""
        op = "Unknown"
        params: dict[str, Any] = {}
        call: Call | None = None
        access_key = ""
        kms = self.kms
        unit = self.kms.store.begin()
        try:
            lower = {k.lower(): v for k, v in req.headers.items()}
            op = wire.operation_name(lower.get("x-amz-target"))
            if "json" not in lower.get("content-type", ""):
                # FIDELITY: real KMS picks the protocol by content type; anything that is not
                # JSON is refused here with a SerializationException.
                raise e.Malformed("Content-Type must be application/x-amz-json-1.1")
            access_key, region = self._authenticate(req, lower)
            kms = self.kms.in_region(region)
            caller = kms.caller_for(access_key)
            call = Call(caller)
            params = wire.decode_request(op, req.body)
            handler = HANDLERS.get(op)
            if handler is None:
                raise e.Unsupported(f"{op} is not supported by hsmsim.")
            if params.get("GrantTokens"):
                kms.check_grant_tokens(params["GrantTokens"])
            if kms.config.quotas:
                quotas = self._quotas.get(region) or self._quotas.setdefault(
                    region, Quotas(clock=self.quota_clock))
                quotas.check(op)
                if op in CRYPTO_OPS:
                    self._store_quota(kms, quotas, params)
            output = await handler.run(kms, call, wire.typed_input(op, params))
            body = wire.encode_response(output)
            event_id, line = self._render(kms, req, op, params, call, access_key, None)
            writes = bool(unit.writes)

            def append_audit() -> None:
                try:
                    self.audit.append(line)
                except OSError:
                    if writes:
                        raise  # no change without its audit record
                    log.error("KMS audit record could not be written (request %s)", req.request_id)

            self.kms.store.commit(unit, append_audit)
        except e.KmsError as exc:
            await self._undo(unit, call, req)
            err = wire.to_wire(exc)
            self._audit(kms, req, op, params, call, access_key, (err.code, err.message))
            return HttpResponse(err.status, err.body())
        except Exception:  # a bug: never leak details, always answer
            await self._undo(unit, call, req)
            log.exception("KMS %s failed (request %s)", op, req.request_id)
            err = wire.to_wire(e.Internal(""))
            self._audit(kms, req, op, params, call, access_key, (err.code, "internal error"))
            return HttpResponse(err.status, err.body())
        except BaseException:  # cancelled: the client went away before an answer
            self.kms.store.discard(unit)
            if call is not None and call.undo:
                asyncio.get_running_loop().create_task(self._undo(unit, call, req))
            raise
        if op in TRACKED and call is not None:
            when = kms.clock.now()
            for arn in call.resources:
                if arn.split(":")[3] == kms.region:
                    kms.used(arn.rsplit("/", 1)[1], op, when, event_id, req.request_id)
        return HttpResponse(200, body)

    async def _undo(self, unit: Unit, call: Call | None, req: HttpRequest) -> None:
        self.kms.store.discard(unit)
        if call is None:
            return
        undo, call.undo = call.undo, []
        for step in reversed(undo):
            try:
                await step()
            except Exception:
                # Best effort, as for a deleted key: an orphan may stay in the cluster.
                log.error("KMS could not undo part of a failed request (request %s)", req.request_id)

    @staticmethod
    def _store_quota(kms: Kms, quotas: Quotas, params: Mapping[str, Any]) -> None:
        ref = params.get("KeyId") or params.get("DestinationKeyId")
        store_id = params.get("CustomKeyStoreId")
        if store_id is None and isinstance(ref, str):
            try:
                store_id = kms.resolve(ref).custom_key_store_id
            except e.KmsError:
                store_id = None
        if store_id:
            quotas.check_store(store_id)

    def authenticate(self, req: HttpRequest) -> str:
        """The access key of a signed request (the test endpoints use it too); AuthMissing,
        AuthIncomplete or a signature error otherwise."""
        return self._authenticate(req, {k.lower(): v for k, v in req.headers.items()})[0]

    def _authenticate(self, req: HttpRequest, lower: Mapping[str, str]) -> tuple[str, str]:
        """(access key, Region) of a request: the Region is its credential scope's.

        FIDELITY: one endpoint serves every configured Region (AWS has one endpoint per
        Region). A scope naming an AWS Region that is not configured answers
        UnrecognizedClientException, as AWS does for a Region not enabled for the account; any
        other name, InvalidSignatureException ("Credential should be scoped to a valid
        region"), as a Region endpoint does for a scope that is not its own."""
        cred = sigv4.parse_authorization(lower.get("authorization"))
        if cred is None:
            raise e.AuthMissing("Missing Authentication Token")
        config = self.kms.config
        if cred.region not in config.allowed_regions:
            if cred.region in KNOWN_REGIONS:
                raise e.AuthUnknownKey("The security token included in the request is invalid.")
            raise e.AuthBadSignature(f"Credential should be scoped to a valid region, not '{cred.region}'. ")
        if not config.strict_sigv4:
            return cred.access_key, cred.region
        entry = self.kms.principals.get(cred.access_key)
        if entry is None or entry[1] is None:
            raise e.AuthUnknownKey("The security token included in the request is invalid.")
        if cred.service != "kms":
            raise e.AuthBadSignature(f"Credential should be scoped to correct service: 'kms'. ")
        sigv4.verify(cred, entry[1], req.method, req.path, req.query, req.headers, req.body)
        return cred.access_key, cred.region

    def _render(self, kms: Kms, req: HttpRequest, op: str, params: Mapping[str, Any], call: Call | None,
                access_key: str, error: tuple[str, str] | None) -> tuple[str, str]:
        caller = call.caller if call is not None else kms.caller_for(None)
        return self.audit.render(
            op=op, caller_arn=caller.arn, account=caller.account, access_key=access_key,
            region=kms.region, source_ip=req.source_ip,
            user_agent=req.headers.get("User-Agent", ""), request_id=req.request_id,
            params=params, resources=call.resources if call else [], error=error,
            when=kms.clock.now(), response=call.response_elements if call else None,
            additional=call.additional if call else None)

    def _audit(self, kms: Kms, req: HttpRequest, op: str, params: Mapping[str, Any], call: Call | None,
               access_key: str, error: tuple[str, str]) -> None:
        """The record of a failed request; a failure to write it is logged, never raised."""
        try:
            self.audit.append(self._render(kms, req, op, params, call, access_key, error)[1])
        except Exception:
            log.error("KMS audit record could not be written (request %s)", req.request_id)

    async def reset(self) -> None:
        """Start over, as moto_server's `POST /moto-api/reset`: every Region's keys, aliases,
        grants and custom key stores are forgotten (stores disconnected first, so `kmsuser`
        logs out) and the clock is back at the real time. The audit trail stays. FIDELITY:
        test control only; the backing keys of custom-key-store keys stay in the cluster, as
        keys a deleted store leaves behind (`hsmsim reset` starts the cluster over too)."""
        async with self._sweep_lock:
            old = self.kms
            for regional in old.regional():
                await regional.keystores.close()
            await old.fleet.close()
            old.store.wipe()
            self.kms = Kms(old.cluster, old.config, old.state_dir, old.store.view(old.config.region),
                           clusters=old.clusters)
            self.kms.open_stored_regions()
            self._quotas.clear()

    async def sweep(self) -> None:
        async with self._sweep_lock:
            self.kms.open_stored_regions()
            for kms in self.kms.regional():
                await sweep(kms)
