"""The KMS-compatible endpoint (AWS JSON 1.1, `TrentService`) served by the daemon: wire codec,
operations, store, key-material backends, policies, custom key stores and audit trail.

Layers, top to bottom: server (aiohttp) -> wire (codec, validation, error table, SigV4) ->
service (dispatch, quotas, audit) -> ops (one handler per operation) -> store / material /
keystores / policy -> hsmsim.cluster.api and hsmsim.core."""
