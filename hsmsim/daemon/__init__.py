"""The hsmsim daemon process (`hsmsim up`): cluster, control API, gateway and KMS."""
