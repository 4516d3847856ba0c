"""The kit's own s-server.sh (`openssl s_server -engine pkcs11 -keyform engine -www`), as a
user runs it: TLS 1.2 and 1.3 handshakes from Python with the key in the token, for the
self-signed EC P-384 kit (ECDSA through the engine)."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

import pytest

from hsmsim.testing.cluster import free_port
from hsmsim.tls.servers import s_server_script

from .conftest import Kits


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_s_server_script_serves_with_the_token_key(kits: Kits, tmp_path: Path,
                                                   version: ssl.TLSVersion) -> None:
    kit = kits.ec
    port = free_port()
    with s_server_script(kit, port, tmp_path / "s_server.log").wait_ready() as srv:
        ctx = ssl.create_default_context(cafile=kit.files["chain"])
        ctx.minimum_version = ctx.maximum_version = version
        conn = http.client.HTTPSConnection("ec.example.test", port, context=ctx, timeout=15)
        # The certificate is for ec.example.test; connect to 127.0.0.1 with that SNI name.
        conn._create_connection = (  # type: ignore[attr-defined]
            lambda addr, *a, **k: socket.create_connection(("127.0.0.1", port), *a, **k))
        conn.connect()
        assert conn.sock is not None
        cipher = conn.sock.cipher()
        assert cipher is not None
        assert cipher[1] == ("TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
        if version == ssl.TLSVersion.TLSv1_2:
            assert cipher[0].startswith("ECDHE-ECDSA-"), cipher
        served = conn.sock.getpeercert(binary_form=True)
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200 and b"-keyform engine" in body  # s_server echoes its flags
        assert served == ssl.PEM_cert_to_DER_cert(Path(kit.files["cert"]).read_text())
        assert srv.proc.poll() is None, srv.log_tail()
