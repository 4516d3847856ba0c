"""PKCS#11 URIs (RFC 7512) as the kit writes and reads them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmsim.tls.errors import TlsError
from hsmsim.tls.uri import Pkcs11Uri


def test_format_matches_rfc7512_shape() -> None:
    uri = Pkcs11Uri(token="hsm1", object="tls-web-1a2b3c", id=bytes.fromhex("00ff10"),
                    type="private")
    assert str(uri) == "pkcs11:token=hsm1;object=tls-web-1a2b3c;id=%00%ff%10;type=private"


def test_round_trip_with_reserved_characters() -> None:
    uri = Pkcs11Uri(token="my token", object="a;b/c?d&e$f%g", id=b"\x01\x02", type="private",
                    pin_source="file:/state/tls/crypto_user.pin")
    text = str(uri)
    # ';' '/' '?' '&' '$' '%' and spaces never appear raw inside a value.
    path = text.split("?", 1)[0]
    assert path.count(";") == 3 and "$" not in text and " " not in text
    assert "object=a%3Bb%2Fc%3Fd%26e%24f%25g" in text
    assert text.endswith("?pin-source=file:/state/tls/crypto_user.pin")
    assert Pkcs11Uri.parse(text) == uri


def test_parse_accepts_uppercase_percent_and_pin_value() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=hsm1;id=%0A%Ff;type=private?pin-value=crypto_user:pw")
    assert uri.id == b"\x0a\xff" and uri.pin_value == "crypto_user:pw"
    assert "pin-value" not in str(uri.without_secrets())


@pytest.mark.parametrize("text, message", [
    ("pkcs12:token=a", "starts with"),
    ("pkcs11:token=a;model=x", "unsupported PKCS#11 URI attribute 'model'"),
    ("pkcs11:token=a;token=b", "given twice"),
    ("pkcs11:token", "unsupported"),
    ("pkcs11:type=secret", "type must be one of"),
    ("pkcs11:object=%ff%fe", "not UTF-8"),
])
def test_parse_rejects_bad_uris(text: str, message: str) -> None:
    with pytest.raises(TlsError, match=message):
        Pkcs11Uri.parse(text)


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(token=_text, obj=_text, key_id=st.binary(max_size=32),
       kind=st.sampled_from([None, "private", "public", "cert"]),
       pin_source=st.one_of(st.none(), _text))
@settings(max_examples=300, deadline=None)
def test_any_uri_round_trips(token: str, obj: str, key_id: bytes, kind: str | None,
                             pin_source: str | None) -> None:
    uri = Pkcs11Uri(token=token, object=obj, id=key_id, type=kind, pin_source=pin_source)
    text = str(uri)
    assert text.isascii() and " " not in text and "$" not in text
    assert Pkcs11Uri.parse(text) == uri


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_parse_never_crashes(text: str) -> None:
    try:
        Pkcs11Uri.parse("pkcs11:" + text)
    except TlsError:
        pass
