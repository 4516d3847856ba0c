"""hsmsim: a local, faithful simulator of an AWS CloudHSM cluster, its PKCS#11 library and a
KMS custom key store."""

__version__ = "0.1.0"
