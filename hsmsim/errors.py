"""The one exception root of hsmsim; every layer's errors derive from it and each boundary
translates them once (PKCS#11 return codes, KMS wire errors, CLI exit codes)."""


class HsmsimError(Exception):
    """Root of every error hsmsim raises on purpose."""


class ConfigError(HsmsimError):
    """A configuration file, environment variable or flag is invalid; the message names it."""
