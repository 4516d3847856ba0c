"""The gateway: the daemon's server side of the PKCS#11 module's protocol, giving every client
application CloudHSM Client SDK 5 behaviour on top of a `ClusterClient`."""
