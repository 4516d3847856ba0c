"""Loader for the RSA Laboratories PKCS#1 example files (PSS, OAEP, v1.5) from the
`cryptography-vectors` package; NIST CAVP files are read by the shared `vectorfiles`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vectorfiles import read_vector_file


@dataclass
class Pkcs1Key:
    """One key of an RSA Laboratories example file, with its example cases."""

    public: dict[str, str] = field(default_factory=dict)
    private: dict[str, str] = field(default_factory=dict)
    cases: list[dict[str, str]] = field(default_factory=list)

    def n(self) -> int:
        return int(self.private.get("modulus") or self.public["modulus"], 16)

    def e(self) -> int:
        return int(self.private.get("public exponent") or self.public["exponent"], 16)

    def components(self) -> tuple[int, int, int, int, int, int, int, int]:
        p = self.private
        return (
            self.n(), self.e(), int(p["exponent"], 16), int(p["prime 1"], 16),
            int(p["prime 2"], 16), int(p["prime exponent 1"], 16),
            int(p["prime exponent 2"], 16), int(p["coefficient"], 16),
        )


_CASE = re.compile(r"^(PSS|OAEP|PKCS#1 v1\.5)\b.*Example")
_CASE_FIELDS = {"message", "message to be signed", "message to be encrypted", "seed", "salt"}


def load_pkcs1(rel: str) -> list[Pkcs1Key]:
    """An RSA Laboratories PKCS#1 example file (pkcs-1v2-1d2-vec/*, pkcs1v15*-vectors.txt,
    oaep-custom/*): keys with their components and cases, every value as a hex string."""
    keys: list[Pkcs1Key] = []
    key: Pkcs1Key | None = None
    target: dict[str, str] | None = None
    label: str | None = None
    for raw in read_vector_file(rel).splitlines():
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("#"):
            if target is not None and label is not None:
                target[label] += line.replace(" ", "")
            continue
        body = line.lstrip("#").strip()
        label = None
        if _CASE.match(body) and key is not None:
            target = {"name": body}
            key.cases.append(target)
        elif re.match(r"^Example\b", body):
            key = Pkcs1Key()
            keys.append(key)
            target = None
        elif key is not None and body == "Public key":
            target = key.public
        elif key is not None and body == "Private key":
            target = key.private
        elif body.endswith(":") and target is not None:
            label = body[:-1].strip().lower()
            if key is not None and target is key.private and label in _CASE_FIELDS:
                # pkcs1v15crypt-vectors.txt lacks the header of its very first example.
                target = {"name": "(unnamed first example)"}
                key.cases.append(target)
            target[label] = ""
    return keys


HASH_NAMES = {"SHA1": "sha1", "SHA224": "sha224", "SHA256": "sha256", "SHA384": "sha384",
              "SHA512": "sha512"}
