"""Multi-part AES and DES3 in ECB, CBC, CBC-PAD and CTR mode, streamed to the HSMs.

The gateway keeps only the operation's public chaining state: the last ciphertext block (CBC),
the counter block and how much of it is used (CTR), and the bytes of a block not yet complete
(for CBC-PAD decryption, the last block, held back until Final because it carries the padding).
Every complete block goes to the cluster at once as an ordinary single-part call whose IV or
counter block is that state, in pieces of at most `PIECE` bytes, so an Update emits every
complete block as SoftHSM2 does, the output lengths are known before any HSM is asked (length
queries and CKR_BUFFER_TOO_SMALL consume nothing), and no message size is bounded by the node
protocol's frame. The key never leaves the HSM. Each piece is a request of its own, routed,
retried and failed over like any other: an HSM lost in the middle of an operation costs
nothing (the next piece runs on another HSM holding the key); an error the HSM reports ends
the operation (PKCS#11 §5.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hsmsim.cluster.api import Login
from hsmsim.node.protocol import MAX_FRAME
from hsmsim.pkcs11.constants import RV, Mechanism as M
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import CtrParams, MechanismSpec, RawParams
from hsmsim.pkcs11.values import EncryptResult

# Data bytes per HSM request: half a node frame leaves room for the other fields, and is a
# multiple of every block size.
PIECE = MAX_FRAME // 2
# Multi-part input the gateway buffers for one HSM request at Final (HMAC, CMAC, raw RSA): more
# than a node frame could never be sent, so Update refuses it as it arrives.
MAX_BUFFERED = MAX_FRAME

# mechanism -> (block size, mechanism of the complete-block pieces, mechanism of the last block)
_MODES: dict[int, tuple[int, int, int | None]] = {
    M.AES_ECB: (16, M.AES_ECB, None),
    M.AES_CBC: (16, M.AES_CBC, None),
    M.AES_CBC_PAD: (16, M.AES_CBC, M.AES_CBC_PAD),
    M.AES_CTR: (16, M.AES_CTR, None),
    M.DES3_ECB: (8, M.DES3_ECB, None),
    M.DES3_CBC: (8, M.DES3_CBC, None),
    M.DES3_CBC_PAD: (8, M.DES3_CBC, M.DES3_CBC_PAD),
}


def streams(mechanism: int) -> bool:
    """True for the mechanisms this module streams."""
    return mechanism in _MODES


class Crypto(Protocol):
    """The two cluster calls a stream needs (hsmsim.cluster.api.ClusterClient has them)."""

    async def encrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> EncryptResult: ...
    async def decrypt(self, login: Login, handle: int, mech: MechanismSpec, data: bytes) -> bytes: ...


def _add(block: bytes, n: int) -> bytes:
    """The counter block `n` blocks on: the whole 128-bit block counts up, as OpenSSL's CTR in
    SoftHSM2 does (SoftHSM2 refuses data that would wrap the ulCounterBits counter, so the two
    agree on every message it accepts)."""
    return ((int.from_bytes(block, "big") + n) % (1 << 128)).to_bytes(16, "big")


@dataclass
class CipherStream:
    """One multi-part encryption or decryption (a mutable state object of one Operation)."""

    mechanism: int
    encrypting: bool
    block: int
    piece_mech: int
    last_mech: int | None  # CBC-PAD: the padded mechanism of Final's block
    chain: bytes  # CBC: the IV of the next piece; CTR: the counter block of the next byte
    counter_bits: int = 0
    used: int = 0  # CTR: bytes of the counter block `chain` already used by earlier parts
    held: bytes = b""  # an incomplete block (CBC-PAD decryption: up to one whole block)

    @classmethod
    def start(cls, spec: MechanismSpec, encrypting: bool) -> "CipherStream":
        block, piece, last = _MODES[spec.mechanism]
        p = spec.param
        if isinstance(p, CtrParams):
            return cls(spec.mechanism, encrypting, block, piece, last, p.cb, p.counter_bits)
        chain = p.data if isinstance(p, RawParams) else b""
        return cls(spec.mechanism, encrypting, block, piece, last, chain)

    @property
    def ctr(self) -> bool:
        return self.piece_mech == M.AES_CTR

    def _keep_last(self) -> bool:
        return self.last_mech is not None and not self.encrypting

    def update_size(self, n: int) -> int:
        """Bytes an Update of `n` more input bytes emits (SoftHSM2's exact answer)."""
        if self.ctr:
            return n
        total = len(self.held) + n
        if self._keep_last():
            return (total - 1) // self.block * self.block if total else 0
        return total // self.block * self.block

    def final_size(self) -> int | None:
        """Bytes Final emits, when they are known without the HSM (CBC-PAD decryption: None)."""
        if self.ctr:
            return 0
        if self.last_mech is None:
            return 0
        return self.block if self.encrypting else None

    def check_final(self) -> None:
        """Final's input rule: whole blocks (PKCS#11 §2.10 AES-ECB/CBC), one block for CBC-PAD
        decryption."""
        if self.ctr or (self.last_mech is not None and self.encrypting):
            return
        if self._keep_last():
            if len(self.held) != self.block:
                raise Pkcs11Error(RV.ENCRYPTED_DATA_LEN_RANGE, "the ciphertext is not whole blocks")
        elif self.held:
            rv = RV.DATA_LEN_RANGE if self.encrypting else RV.ENCRYPTED_DATA_LEN_RANGE
            raise Pkcs11Error(rv, f"the data is not a multiple of {self.block} bytes")

    async def update(self, hsm: Crypto, login: Login, key: int, data: bytes) -> bytes:
        """Every complete block of held + data through the HSMs; the state moves on only as each
        piece succeeds (a failure ends the operation anyway)."""
        if self.ctr:
            return await self._ctr(hsm, login, key, data)
        n = self.update_size(len(data))
        if n == 0:
            self.held += data
            return b""
        buf = self.held + data if self.held else data
        out = []
        for i in range(0, n, PIECE):
            out.append(await self._piece(hsm, login, key, buf[i:min(i + PIECE, n)]))
        self.held = bytes(buf[n:])
        return b"".join(out)

    async def _piece(self, hsm: Crypto, login: Login, key: int, chunk: bytes) -> bytes:
        if self.encrypting and self.last_mech is not None:
            # CBC-PAD encryption runs as itself (a key's CKA_ALLOWED_MECHANISMS may list only
            # CBC-PAD), dropping the padding block that whole blocks get: the rest is plain CBC.
            spec = MechanismSpec(self.last_mech, RawParams(self.chain))
            out = (await hsm.encrypt(login, key, spec, chunk)).data[:len(chunk)]
            self.chain = out[-self.block:]
            return out
        # FIDELITY: CBC-PAD decryption runs its pieces as plain CBC, which a key whose
        # CKA_ALLOWED_MECHANISMS lists CBC-PAD alone refuses (SoftHSM2 enforces the attribute):
        # such a key decrypts single-part messages of up to PIECE bytes only.
        spec = MechanismSpec(self.piece_mech, RawParams(self.chain) if self.chain else None)
        if self.encrypting:
            out = (await hsm.encrypt(login, key, spec, chunk)).data
            if self.chain:
                self.chain = out[-self.block:]
            return out
        out = await hsm.decrypt(login, key, spec, chunk)
        if self.chain:
            self.chain = chunk[-self.block:]
        return out

    async def _ctr(self, hsm: Crypto, login: Login, key: int, data: bytes) -> bytes:
        out = []
        for i in range(0, len(data), PIECE):
            part = data[i:i + PIECE]
            # A part that starts inside a counter block: the bytes of it already used go first
            # (as zeros) and their output is dropped. That output is keystream, which the
            # gateway could compute anyway from the plaintext and ciphertext it relays.
            lead = bytes(self.used)
            spec = MechanismSpec(M.AES_CTR, CtrParams(self.counter_bits, self.chain))
            if self.encrypting:
                res = (await hsm.encrypt(login, key, spec, lead + part)).data
            else:
                res = await hsm.decrypt(login, key, spec, lead + part)
            out.append(res[self.used:])
            done = self.used + len(part)
            self.chain, self.used = _add(self.chain, done // 16), done % 16
        return b"".join(out)

    async def final(self, hsm: Crypto, login: Login, key: int) -> bytes:
        """Final's output (check_final first): CBC-PAD's padded block, else nothing."""
        self.check_final()
        if self.last_mech is None:
            return b""
        spec = MechanismSpec(self.last_mech, RawParams(self.chain))
        if self.encrypting:
            return (await hsm.encrypt(login, key, spec, self.held)).data
        return await hsm.decrypt(login, key, spec, self.held)
