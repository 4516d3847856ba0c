"""`hsmsim env`: the variables a PKCS#11 or KMS client needs, and the files they name
(SunPKCS11 config, p11-kit module file, ssh-askpass), written into the state directory."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from hsmsim.cli.common import state_of
from hsmsim.cluster.state import StateDir
from hsmsim.config import environ
from hsmsim.control.client import ControlClient
from hsmsim.control.protocol import ControlError

if TYPE_CHECKING:
    from hsmsim.kms.config import KmsConfig


def client_env(state: StateDir, endpoints: dict[str, str] | None = None,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a client needs (what `hsmsim env` prints)."""
    from hsmsim.resources import pkcs11_module
    base = environ() if base is None else base
    try:
        module = str(pkcs11_module())
    except FileNotFoundError:
        module = str(Path(__file__).resolve().parents[1] / "_lib" / "libhsmsim-pkcs11.so")
    pw = state.read_secret(state.cu_password)
    kms_config = _kms_config(state)
    kms = (endpoints or {}).get("kms") or _kms_endpoint(kms_config)
    env = {
        "HSMSIM_HOME": str(state.root),
        "HSMSIM_SOCKET": str(state.gateway_sock),
        "HSMSIM_PKCS11_MODULE": module,
        "HSMSIM_PIN": f"crypto_user:{pw}",
        "AWS_ENDPOINT_URL_KMS": kms,
    }
    # the CloudHSMv2 control plane's endpoint (docs/cloudhsmv2.md), known while the daemon runs
    chsm = (endpoints or {}).get("cloudhsm")
    if chsm:
        env["AWS_ENDPOINT_URL_CLOUDHSM_V2"] = chsm
    sunpkcs11 = _sunpkcs11_config(state, module)
    if sunpkcs11 is not None:
        env["HSMSIM_SUNPKCS11_CONFIG"] = str(sunpkcs11)
    for var, path in _tool_files(state, module):
        env[var] = str(path)
    for k, v in (("AWS_ACCESS_KEY_ID", "hsmsimAKIAEXAMPLE"),
                 ("AWS_SECRET_ACCESS_KEY", "hsmsim-secret-not-checked"),
                 ("AWS_DEFAULT_REGION", _kms_region(kms_config))):
        if not base.get(k):
            env[k] = v
    return env


# Java's SunPKCS11 (JDK 17: no `tokenLabel`, so the slot by index). CloudHSM's usage attributes
# default to false, so generated keys get the ones their type can use; secret and private keys
# must be CKA_PRIVATE. The module reads HSMSIM_SOCKET from the JVM's environment.
_SUNPKCS11 = """name = hsmsim
library = {module}
slotListIndex = 0
attributes(generate, CKO_PRIVATE_KEY, *) = {{
  CKA_PRIVATE = true
  CKA_SIGN = true
}}
attributes(generate, CKO_PRIVATE_KEY, CKK_RSA) = {{
  CKA_DECRYPT = true
}}
attributes(generate, CKO_PUBLIC_KEY, *) = {{
  CKA_VERIFY = true
}}
attributes(generate, CKO_PUBLIC_KEY, CKK_RSA) = {{
  CKA_ENCRYPT = true
}}
attributes(generate, CKO_SECRET_KEY, *) = {{
  CKA_PRIVATE = true
  CKA_ENCRYPT = true
  CKA_DECRYPT = true
}}
"""


def _sunpkcs11_config(state: StateDir, module: str) -> Path | None:
    """STATE/sunpkcs11.cfg for `Security.getProvider("SunPKCS11").configure(path)` and keytool's
    `-providerArg`; None if the state directory cannot be written."""
    path = state.root / "sunpkcs11.cfg"
    text = _SUNPKCS11.format(module=module)
    try:
        if not path.is_file() or path.read_text() != text:
            from hsmsim import files
            files.write_private(path, text)  # 0600 whatever the umask
    except OSError:
        return None
    return path


# p11-kit loads a module named by a `.module` file in ~/.config/pkcs11/modules/ (for root:
# /etc/pkcs11/modules/); link this one there. OpenSSH reads a PIN only from a terminal or an
# SSH_ASKPASS program: this one prints $HSMSIM_PIN from its caller's environment, so no secret is
# written to disk. Set SSH_ASKPASS to it per command, never for the whole shell (every ssh
# prompt would be answered with the HSM's PIN).
_TOOL_FILES = (
    ("HSMSIM_P11KIT_MODULE_FILE", "hsmsim.module", 0o644, "module: {module}\n"),
    ("HSMSIM_SSH_ASKPASS", "ssh-askpass", 0o700,
     "#!/bin/sh\n# SSH_ASKPASS for a PKCS#11 PIN prompt: the caller's $HSMSIM_PIN.\n"
     "printf '%s\\n' \"$HSMSIM_PIN\"\n"),
)


def _tool_files(state: StateDir, module: str) -> list[tuple[str, Path]]:
    """STATE/hsmsim.module (p11-kit) and STATE/ssh-askpass (OpenSSH), written when missing or
    changed, with the variables that name them; a file that cannot be written is left out."""
    from hsmsim.files import write_private
    out = []
    for var, name, mode, template in _TOOL_FILES:
        path = state.root / name
        text = template.format(module=module)
        try:
            fresh = path.is_file() and path.read_text() == text
            if not fresh or path.stat().st_mode & 0o777 != mode:
                write_private(path, text, mode)
        except OSError:
            continue
        out.append((var, path))
    return out


def _kms_config(state: StateDir) -> KmsConfig | None:
    """The [kms] section as the daemon resolves it (file, then environment), loaded once per
    command; None when the configuration cannot be read (the built-in defaults are exported)."""
    try:
        from hsmsim.config import load_file, resolve_section
        from hsmsim.kms.config import KmsConfig
        return resolve_section(KmsConfig, "kms", load_file(state.config_file), environ())
    except Exception:
        return None


def _kms_region(cfg: KmsConfig | None) -> str:
    """The KMS's default Region ([kms] region): the one `hsmsim env` exports."""
    return "us-east-1" if cfg is None else str(cfg.region)


def _kms_endpoint(cfg: KmsConfig | None) -> str:
    if cfg is None:
        return "http://127.0.0.1:4599"
    return f"http://{cfg.host}:{cfg.port}"


def exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def cmd_env(args: argparse.Namespace) -> int:
    state = state_of(args)
    state.load_spec()
    endpoints: dict[str, str] = {}
    try:
        endpoints = ControlClient(state.control_sock, timeout=3).call("status").get("endpoints", {})
    except ControlError:
        pass
    env = client_env(state, endpoints)
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        print(exports(env))
    return 0
