"""The HSM node: one OS process per HSM, holding one SoftHSM2 token, its object index, users,
audit log and the C-core engine, served over the node protocol (docs/node-protocol.md).

Clients import `hsmsim.node.client.NodeClient`; the server side is `hsmsim.node.server`."""
