"""The cluster: topology, routing, key sync, failover, reconciliation, backups and faults over
the HSM node processes. `api` is its contract with the gateway, the KMS and the control API."""
