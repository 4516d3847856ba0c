"""The control API: the admin protocol between the `hsmsim` CLI and the daemon over
`control.sock` (see docs/control-protocol.md)."""
