"""The TLS-offload kit (`hsmsim tls init`, `hsmsim tls bench`): TLS server keys that live in a
PKCS#11 token (the hsmsim cluster, or any module), their certificates, and ready-to-use OpenSSL
and nginx configuration that reaches the key through the libp11 `pkcs11` engine."""
