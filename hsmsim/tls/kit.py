"""`hsmsim tls init`: makes one TLS server identity whose key lives in a token, and writes the
files that use it (openssl.cnf for the libp11 engine, nginx configuration, an s_server script,
certificates). Works against the hsmsim cluster or any PKCS#11 module (a `Target`)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from hsmsim import files as fsmodes
from hsmsim.tls import certs
from hsmsim.tls.errors import TlsError
from hsmsim.tls.hsmkey import (KeySpec, PublicKey, TokenRef, TokenSession, open_session,
                               read_only_sessions_refused)
from hsmsim.tls.uri import Pkcs11Uri

TOKEN_LABEL = "hsm1"  # the one token the hsmsim module exposes, as CloudHSM's library does
DEFAULT_USER = "crypto_user"
ISSUERS = ("ca", "self")
KIT_FILE = "kit.json"
# FIDELITY: CloudHSM ships its own OpenSSL Dynamic Engine (engine id `cloudhsm`, PIN from
# CLOUDHSM_PIN, keys named by a "fake PEM" file made with getCaviumPrivKey); hsmsim uses the
# generic libp11 engine (id `pkcs11`) on libhsmsim-pkcs11.so, keys named by RFC 7512 URIs.
# The engine's PIN comes from this variable (openssl.cnf: PIN = $ENV::HSMSIM_PIN), as CloudHSM's
# engine takes it from CLOUDHSM_PIN. Not from the URI: libp11 0.4.12 truncates a
# pin-source file to 32 characters, shorter than many CloudHSM `user:password` PINs, and a
# pin-value would put the password into nginx's configuration.
PIN_ENV = "HSMSIM_PIN"

PUBLIC = 0o644  # certificates and requests: meant to be shared
SCRIPT = 0o700


@dataclasses.dataclass(frozen=True)
class Target:
    """A PKCS#11 module and token the kit puts keys in, and how a server process reaches it:
    the 0600 PIN file env.sh reads into $HSMSIM_PIN (never the PIN itself in a kit file) and
    the environment variables the module needs (they go into env.sh and nginx's `env` lines).
    `new_pin` is a PIN that `init_kit` writes to `pin_file` once it has logged in with it."""

    kind: str  # "hsmsim" or "module"
    module: Path
    token: str
    user: str | None
    pin_file: Path
    env: tuple[tuple[str, str], ...] = ()
    new_pin: str | None = dataclasses.field(default=None, repr=False)

    def pin(self) -> str:
        if self.new_pin is not None:
            return self.new_pin
        try:
            return self.pin_file.read_text().strip("\r\n")
        except OSError as exc:
            raise TlsError(f"cannot read the PIN file {self.pin_file}: {exc.strerror}") from None

    def token_ref(self) -> TokenRef:
        return TokenRef(self.module, self.token, self.pin())


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def cluster_target(state: Path, module: Path, user: str, password: str | None) -> Target:
    """The hsmsim cluster of state directory `state`, logged in as crypto user `user`.
    The password comes from `password`, else `$STATE/secrets/<user>.password` (written there
    by `hsmsim up` for the default crypto user); the PIN `user:password` is written to
    `$STATE/tls/<user>.pin` (0600) once a kit has been made with it."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", user):
        raise TlsError(f"--user {user!r} is not a valid CloudHSM user name")
    socket = state / "gateway.sock"
    if not socket.exists():
        raise TlsError(f"no hsmsim daemon for {state} ({socket} is missing); "
                       f"start one with `hsmsim up --detach --state {state}`")
    if not module.is_file():
        raise TlsError(f"the PKCS#11 module {module} is missing; run `make build`")
    if password is None:
        secret = state / "secrets" / f"{user}.password"
        try:
            password = secret.read_text().strip()
        except OSError:
            raise TlsError(f"no password for crypto user {user!r}: set HSMSIM_TLS_PASSWORD "
                           f"(only {DEFAULT_USER}'s password is kept in {secret.parent})") from None
    pin_file = state / "tls" / f"{user}.pin"
    env = (("HSMSIM_HOME", str(state)), ("HSMSIM_SOCKET", str(socket)))
    return Target("hsmsim", module, TOKEN_LABEL, user, pin_file, env, f"{user}:{password}")


def wait_replicated(state: Path, timeout: float = 15.0) -> bool:
    """Waits until every running HSM of the cluster holds every key (sync lag 0), so that a
    server started next finds the new key pair whichever HSM serves its search. CloudHSM
    likewise copies keys to the other HSMs after acknowledging them. False on timeout."""
    import time

    from hsmsim.control.client import ControlClient
    from hsmsim.control.protocol import ControlError

    client = ControlClient(state / "control.sock", timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = client.call("status")
        except ControlError:
            return False
        live = [h for h in status.get("hsms", [])
                if h.get("condition") not in ("killed", "paused", "partitioned", "removed")]
        if live and all(h.get("sync_lag") == 0 for h in live):
            return True
        time.sleep(0.05)
    return False


def module_target(module: Path, token: str, pin_file: Path,
                  env: Sequence[tuple[str, str]]) -> Target:
    """Any PKCS#11 module (SoftHSM2 directly, for instance) with a user PIN in `pin_file`."""
    if not module.is_file():
        raise TlsError(f"PKCS#11 module {module} does not exist")
    if not pin_file.is_file():
        raise TlsError(f"PIN file {pin_file} does not exist")
    return Target("module", module, token, None, pin_file.absolute(), tuple(env))


def engine_path() -> Path:
    """libp11's OpenSSL engine (Debian package libengine-pkcs11-openssl)."""
    try:
        out = subprocess.run(["openssl", "version", "-e"], capture_output=True, text=True,
                             check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        raise TlsError("the `openssl` command is missing (Debian package openssl)") from None
    match = re.search(r'ENGINESDIR:\s*"([^"]+)"', out)
    candidates = [Path(match.group(1)) / "pkcs11.so"] if match else []
    candidates += [Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"),
                   Path("/usr/lib/aarch64-linux-gnu/engines-3/pkcs11.so")]
    for path in candidates:
        if path.is_file():
            return path
    raise TlsError("libp11's pkcs11 engine is not installed (Debian package "
                   "libengine-pkcs11-openssl)")


@dataclasses.dataclass(frozen=True)
class KitRequest:
    cn: str
    spec: KeySpec
    issuer: str  # "ca" (the local CA under $STATE/tls/ca) or "self" (self-signed by the key)
    days: int
    sans: tuple[str, ...]
    out_dir: Path
    state_dir: Path
    port: int
    target: Target


@dataclasses.dataclass(frozen=True)
class Kit:
    """What `tls init` made: the key's URI and the files written."""

    cn: str
    key: str
    label: str
    key_id: str  # hex
    uri: str  # names the private key object; no PIN in it
    pin_file: str  # 0600, read into $HSMSIM_PIN by env.sh
    issuer: str
    module: str
    token: str
    out_dir: str
    files: dict[str, str]
    env: dict[str, str]
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, out_dir: Path) -> "Kit":
        try:
            data = json.loads((out_dir / KIT_FILE).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise TlsError(f"{out_dir} holds no readable TLS kit ({exc})") from None


def _slug(cn: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", cn.lower()).strip("-.")[:40] or "key"


def _label(cn: str) -> str:
    return f"tls-{_slug(cn)}-{secrets.token_hex(3)}"


def default_out_dir(state: Path, cn: str) -> Path:
    """Where a kit goes without --out: `$STATE/tls/<cn>-<6 hex>`."""
    return state / "tls" / f"{_slug(cn)}-{secrets.token_hex(3)}"


def validate_cn(cn: str) -> str:
    if not cn or len(cn) > 64 or any(ord(c) < 0x20 for c in cn) or '"' in cn or ";" in cn:
        raise TlsError("--cn must be 1-64 printable characters without quotes or ';'")
    return cn


def init_kit(req: KitRequest) -> Kit:
    """Generates the token key pair, certifies it and writes the kit into `req.out_dir`."""
    validate_cn(req.cn)
    if req.issuer not in ISSUERS:
        raise TlsError(f"--issuer must be one of {', '.join(ISSUERS)}")
    if not 1 <= req.days <= 3650:
        raise TlsError("--days must be between 1 and 3650")
    if not 1 <= req.port <= 65535:
        raise TlsError("--port must be between 1 and 65535")
    engine = engine_path()
    out = req.out_dir.absolute()
    if out.exists() and not out.is_dir():
        raise TlsError(f"--out {out} exists and is not a directory")
    if (out / KIT_FILE).exists():
        raise TlsError(f"{out} already holds a TLS kit; choose another --out")
    try:
        ca = certs.load_or_create_ca(req.state_dir) if req.issuer == "ca" else None
    except OSError as exc:
        raise TlsError(f"cannot create the local CA under {req.state_dir}: "
                       f"{exc.strerror or exc}") from None
    label = _label(req.cn)
    key_id = secrets.token_bytes(8)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, req.cn)])
    spec = req.spec
    with open_session(req.target.token_ref()) as session:
        warnings = _session_warnings(req)
        public_key = session.generate(spec, label, key_id)
        try:
            cert, chain, full, csr = _certify(req, session, key_id, subject, public_key, ca)
            if cert.public_key() != public_key:
                raise TlsError("internal error: the certificate does not carry the token's "
                               "public key")
            try:
                return _write_kit(req, engine, out, label, key_id, cert, chain, full, csr,
                                  warnings)
            except OSError as exc:
                raise TlsError(f"writing the kit into {out} failed: "
                               f"{exc.strerror or exc}") from None
        except BaseException:
            session.destroy(key_id)  # never leave a half-made identity behind
            raise


def _session_warnings(req: KitRequest) -> list[str]:
    # FIDELITY: CloudHSM's PKCS#11 library refuses read-only sessions, and hsmsim reproduces
    # that by default; libp11 opens them (CloudHSM's own engine does not use that library), so
    # TLS-offload clusters run with [gateway] quirk_ro_session_fails = false. Warn, don't fail:
    # the key and files are still right once the setting is changed.
    if not read_only_sessions_refused(req.target.token_ref()):
        return []
    fix = (f"set `quirk_ro_session_fails = false` under [gateway] in "
           f"{req.state_dir / 'hsmsim.toml'} and restart the cluster (hsmsim down; hsmsim up)"
           if req.target.kind == "hsmsim" else "use a module that allows them")
    return ["the token refuses read-only sessions (CKR_FUNCTION_FAILED, as CloudHSM does) and "
            f"the OpenSSL pkcs11 engine opens them, so servers would hang at start: {fix}"]


def _certify(req: KitRequest, session: TokenSession, key_id: bytes, subject: x509.Name,
             public_key: PublicKey, ca: certs.LocalCa | None
             ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...],
                        tuple[x509.Certificate, ...], x509.CertificateSigningRequest]:
    spec = req.spec

    def signer(tbs: bytes) -> bytes:
        return session.sign(key_id, spec, tbs)

    csr = certs.sign_csr(subject, public_key, spec, signer)
    if ca is None:
        builder = certs.leaf_builder(req.cn, public_key, subject, req.days, req.sans, None)
        cert = certs.sign_certificate(builder, spec, signer)
        certs.verify_signed_by(cert, cert)
        return cert, (cert,), (cert,), csr
    issuer_key = ca.cert.public_key()
    assert isinstance(issuer_key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey))
    builder = certs.leaf_builder(req.cn, public_key, ca.cert.subject, req.days, req.sans,
                                 issuer_key)
    cert = ca.issue(builder)
    certs.verify_signed_by(cert, ca.cert)
    return cert, (ca.cert,), (cert, ca.cert), csr


def _write_kit(req: KitRequest, engine: Path, out: Path, label: str, key_id: bytes,
               cert: x509.Certificate, chain: tuple[x509.Certificate, ...],
               full: tuple[x509.Certificate, ...],
               csr: x509.CertificateSigningRequest, warnings: list[str]) -> Kit:
    spec = req.spec
    uri = Pkcs11Uri(token=req.target.token, object=label, id=key_id, type="private")
    if req.target.new_pin is not None:
        _write_secret(req.target.pin_file, req.target.new_pin)
        os.chmod(req.target.pin_file.parent, 0o700)
    if not out.exists():  # a directory the user named and that exists keeps its mode
        fsmodes.make_dir(out)
    files = {
        "cert": out / "cert.pem", "chain": out / "chain.pem", "fullchain": out / "fullchain.pem",
        "csr": out / "request.csr", "openssl_cnf": out / "openssl.cnf", "env": out / "env.sh",
        "nginx_conf": out / "nginx.conf", "nginx_server": out / "nginx-server.conf",
        "nginx_sh": out / "nginx.sh", "s_server": out / "s-server.sh", "kit": out / KIT_FILE,
    }
    env = {"OPENSSL_CONF": str(files["openssl_cnf"]), **dict(req.target.env)}
    secret_env = {PIN_ENV: req.target.pin_file}
    # Modes are explicit whatever the umask: certificates are public (0644), the rest is the
    # user's own (0600; scripts 0700).
    fsmodes.write_private(files["cert"], certs.pem(cert), PUBLIC)
    fsmodes.write_private(files["chain"], certs.pem(*chain), PUBLIC)
    fsmodes.write_private(files["fullchain"], certs.pem(*full), PUBLIC)
    fsmodes.write_private(files["csr"], csr.public_bytes(serialization.Encoding.PEM), PUBLIC)
    fsmodes.write_private(files["openssl_cnf"],
                          render_openssl_cnf(engine, req.target.module, req.cn))
    fsmodes.write_private(files["env"], render_env_sh(env, secret_env), SCRIPT)
    fsmodes.write_private(files["nginx_server"],
                          render_nginx_server(req.cn, str(uri), files, req.port))
    fsmodes.write_private(files["nginx_conf"], render_nginx_conf(req.cn, out, env, files))
    fsmodes.write_private(files["nginx_sh"], render_nginx_sh(out), SCRIPT)
    fsmodes.write_private(files["s_server"], render_s_server(str(uri), files, req.port), SCRIPT)
    kit = Kit(cn=req.cn, key=spec.name, label=label, key_id=key_id.hex(), uri=str(uri),
              pin_file=str(req.target.pin_file), issuer=req.issuer, module=str(req.target.module),
              token=req.target.token, out_dir=str(out),
              files={k: str(v) for k, v in files.items()}, env=env, warnings=warnings)
    fsmodes.write_private(files["kit"], json.dumps(kit.to_json(), indent=2, sort_keys=True) + "\n")
    return kit


# ---- file templates -------------------------------------------------------------------

def render_openssl_cnf(engine: Path, module: Path, cn: str) -> str:
    return f"""\
# OpenSSL configuration written by `hsmsim tls init` for {cn}.
# Use it with OPENSSL_CONF=<this file> (env.sh sets it). It loads libp11's pkcs11 engine and
# points it at the PKCS#11 module. No PIN is written here: the engine takes it from ${PIN_ENV}
# (`user:password`), which env.sh reads from a 0600 file. While that variable is unset OpenSSL
# silently skips this whole file, and the engine then reports "No matching initialized token".
config_diagnostics = 1
openssl_conf = openssl_init

[openssl_init]
engines = engine_section

[engine_section]
pkcs11 = pkcs11_section

[pkcs11_section]
engine_id = pkcs11
dynamic_path = {engine}
MODULE_PATH = {module}
PIN = $ENV::{PIN_ENV}
"""


def render_env_sh(env: Mapping[str, str], secret_env: Mapping[str, Path]) -> str:
    lines = ["# Environment for OpenSSL and nginx using this kit: `. ./env.sh`"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    for name, path in secret_env.items():
        quoted = shlex.quote(str(path))
        lines += [f'{name}="$(cat {quoted})" && export {name}  # the PIN stays in that file',
                  f'[ -n "${name}" ] || echo "env.sh: no PIN in {path}" >&2']
    return "\n".join(lines) + "\n"


def render_nginx_server(cn: str, uri: str, files: Mapping[str, Path], port: int) -> str:
    return f"""\
# nginx server block written by `hsmsim tls init`: the private key stays in the HSM and is
# used through OpenSSL's pkcs11 engine. Include it in an http {{}} block (nginx.conf does).
server {{
    listen 127.0.0.1:{port} ssl;
    server_name {cn};
    ssl_certificate {files["fullchain"]};
    ssl_certificate_key "engine:pkcs11:{uri}";
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
        default_type text/plain;
        return 200 "hsmsim TLS offload: {cn}\\n";
    }}
}}
"""


def _owner_name(path: Path) -> str:
    import pwd

    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (KeyError, OSError):
        return "root"


def render_nginx_conf(cn: str, out: Path, env: Mapping[str, str],
                      files: Mapping[str, Path]) -> str:
    env_lines = "\n".join(f"env {name};" for name in env)
    user = _owner_name(out)
    return f"""\
# A complete nginx configuration written by `hsmsim tls init` for {cn}; start it with
# nginx.sh (`nginx -p {out} -c nginx.conf` with env.sh's variables in its environment).
# The master process loads the key through the engine, so those variables must be in its
# environment; the `env` lines pass them on to the workers, which log in again after fork.
# Workers run as the user that owns the PIN file and can open the module's socket (0600).
user {user};
worker_processes 2;
pid {out / "nginx.pid"};
error_log {out / "nginx-error.log"} info;
ssl_engine pkcs11;
{env_lines}

events {{
    worker_connections 256;
}}

http {{
    access_log off;
    client_body_temp_path {out / "tmp"};
    proxy_temp_path {out / "tmp"};
    fastcgi_temp_path {out / "tmp"};
    uwsgi_temp_path {out / "tmp"};
    scgi_temp_path {out / "tmp"};
    include {files["nginx_server"]};
}}
"""


def render_nginx_sh(out: Path) -> str:
    return f"""\
#!/bin/sh
# Starts nginx in the foreground with this kit (written by `hsmsim tls init`). Stop: Ctrl-C.
# Reload (new workers, which log in to the HSM again after fork): nginx.sh -s reload
set -e
. {shlex.quote(str(out / "env.sh"))}
mkdir -p {shlex.quote(str(out / "tmp"))}
if [ $# -gt 0 ]; then exec nginx -p {shlex.quote(str(out))} -c nginx.conf "$@"; fi
exec nginx -p {shlex.quote(str(out))} -c nginx.conf -g 'daemon off;'
"""


def render_s_server(uri: str, files: Mapping[str, Path], port: int) -> str:
    return f"""\
#!/bin/sh
# An OpenSSL test server whose private key stays in the HSM (written by `hsmsim tls init`).
# Try it: curl --cacert {files["chain"]} https://<cn>:${{PORT:-{port}}}/
. {shlex.quote(str(files["env"]))}
exec openssl s_server -engine pkcs11 -keyform engine \\
    -key {shlex.quote(uri)} \\
    -cert {shlex.quote(str(files["cert"]))} -cert_chain {shlex.quote(str(files["chain"]))} \\
    -accept "127.0.0.1:${{PORT:-{port}}}" -www "$@"
"""


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                     else None)
    if path is None:
        raise TlsError("nginx is not installed (Debian package nginx-light)")
    return path
