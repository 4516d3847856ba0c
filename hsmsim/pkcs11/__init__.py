"""PKCS#11 vocabulary shared by the node, the cluster and the gateway: constants (from the
PKCS#11 2.40 headers and CloudHSM's vendor header), return-code exceptions and the attribute
type table."""
