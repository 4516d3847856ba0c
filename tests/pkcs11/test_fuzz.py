"""Fuzzing the gateway socket: random bytes, random frames after a valid handshake, and mutated
valid requests never crash the gateway, and other clients keep working. Short runs here; long
ones under the `soak` marker."""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from pathlib import Path

import pytest

from hsmsim.gateway import protocol as P
from p11helpers import ClusterGateway, use_gateway

HELLO_BODY = P.Writer().u32(P.MAGIC).u16(1).u16(0).u32(P.MAX_FRAME).u64(os.getpid()).bytes(b"").done()


def frame(op: int, body: bytes, request_id: int = 1) -> bytes:
    return struct.pack("<IIHH", 8 + len(body), request_id, op, 0) + body


def connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    s.connect(str(sock))
    return s


def read_reply(s: socket.socket) -> tuple[int, int, bytes] | None:
    try:
        head = b""
        while len(head) < 4:
            chunk = s.recv(4 - len(head))
            if not chunk:
                return None
            head += chunk
        (n,) = struct.unpack("<I", head)
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            if not chunk:
                return None
            body += chunk
        rid, op, _f, rv = struct.unpack_from("<IHHQ", body)
        return op, rv, body[16:]
    except (socket.timeout, OSError):
        return None


def valid_requests() -> list[tuple[int, bytes]]:
    w = P.Writer
    return [
        (P.Op.GetSlotList, w().u8(1).done()),
        (P.Op.GetTokenInfo, w().u64(1).done()),
        (P.Op.OpenSession, w().u64(1).u64(6).done()),
        (P.Op.GetMechanismInfo, w().u64(1).u64(0x1087).done()),
        (P.Op.Login, w().u64(1).u64(1).bytes(b"fuzz_nobody:not-a-user").done()),  # never lock out a real user
        (P.Op.FindObjectsInit, w().u64(1).u32(1).u64(3).bytes(b"label").done()),
        (P.Op.SignInit, w().u64(1).u64(0x251).u8(0).u64(5).done()),
        (P.Op.Sign, w().u64(1).bytes(b"data").u8(1).u64(64).done()),
        (P.Op.EncryptInit, w().u64(1).u64(0x1087).u8(2).u8(1).bytes(bytes(12)).u64(96).bytes(b"").u64(128).u64(5).done()),
        (P.Op.GenerateKey, w().u64(1).u64(0x1080).u8(0).u32(1).u64(0x161).bytes(struct.pack("<Q", 32)).done()),
        (P.Op.GetAttributeValue, w().u64(1).u64(5).u32(2).u64(0).u8(1).u64(8).u64(0x11).u8(0).u64(0).done()),
    ]


def fuzz_once(sock: Path, rng: random.Random) -> None:
    s = connect(sock)
    try:
        kind = rng.randrange(4)
        if kind == 0:  # garbage from the first byte
            s.sendall(rng.randbytes(rng.randrange(1, 256)))
            read_reply(s)
            return
        s.sendall(frame(0, HELLO_BODY))
        reply = read_reply(s)
        assert reply is not None and reply[1] == 0
        for _ in range(rng.randrange(1, 20)):
            if kind == 1:  # random opcode and body in a well-formed frame
                data = frame(rng.randrange(0, 80), rng.randbytes(rng.randrange(0, 64)), rng.getrandbits(32))
            elif kind == 2:  # mutated valid request
                op, body = rng.choice(valid_requests())
                raw = bytearray(frame(op, body))
                for _ in range(rng.randrange(1, 4)):
                    i = rng.randrange(4, len(raw))
                    raw[i] ^= 1 << rng.randrange(8)
                data = bytes(raw)
            else:  # valid requests, in random order (state machines under abuse)
                op, body = rng.choice(valid_requests())
                data = frame(op, body)
            s.sendall(data)
            if read_reply(s) is None:
                return
    except (BrokenPipeError, ConnectionResetError):
        return
    finally:
        s.close()


def still_works(sock: Path) -> None:
    lib = use_gateway(sock)
    with lib.get_token(token_label="hsm1").open(rw=True) as s:
        assert len(s.generate_random(64)) == 8


def run_fuzz(sock: Path, iterations: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(iterations):
        fuzz_once(sock, rng)


def test_oversized_and_truncated_frames(ref_gateway: ClusterGateway) -> None:
    s = connect(ref_gateway.sock)
    s.sendall(frame(0, HELLO_BODY))
    assert read_reply(s)[1] == 0  # type: ignore[index]
    s.sendall(frame(P.Op.OpenSession, b"\x01\x00"))  # body too short
    op, rv, _ = read_reply(s)  # type: ignore[misc]
    assert op == P.Op.OpenSession and rv == 0x7  # CKR_ARGUMENTS_BAD, connection kept
    s.sendall(frame(P.Op.GetSlotList, b"\x01" + b"junk"))  # trailing bytes
    assert read_reply(s)[1] == 0x7  # type: ignore[index]
    s.sendall(frame(999, b""))  # unknown opcode
    assert read_reply(s)[1] == 0x54  # type: ignore[index]
    s.sendall(struct.pack("<I", P.MAX_FRAME + 1))  # over the frame limit: dropped
    assert read_reply(s) is None
    s.close()
    s = connect(ref_gateway.sock)
    s.sendall(frame(P.Op.GetSlotList, b"\x01"))  # no handshake first: dropped
    assert read_reply(s) is None
    s.close()
    s = connect(ref_gateway.sock)
    bad = P.Writer().u32(P.MAGIC).u16(9).u16(0).u32(4096).u64(1).bytes(b"").done()
    s.sendall(frame(0, bad))  # another major version
    assert read_reply(s)[1] == 0x5  # type: ignore[index]
    s.close()
    assert ref_gateway.alive()
    still_works(ref_gateway.sock)


def test_fuzz_session_cluster(ref_gateway: ClusterGateway) -> None:
    run_fuzz(ref_gateway.sock, 300, seed=1234)
    assert ref_gateway.alive()
    still_works(ref_gateway.sock)


def test_fuzz_real_daemon(hsmsim_session_cluster) -> None:  # type: ignore[no-untyped-def]
    c = hsmsim_session_cluster
    lib = use_gateway(c.socket_path)
    with lib.get_token(token_label="hsm1").open(rw=True, user_pin=c.pin) as other:
        run_fuzz(c.socket_path, 150, seed=99)
        pid = c.daemon_pid
        assert pid is not None
        os.kill(pid, 0)  # the daemon is alive
        assert len(other.generate_random(128)) == 16  # a client connected throughout still works
    still_works(c.socket_path)


@pytest.mark.soak
def test_fuzz_soak(ref_gateway: ClusterGateway) -> None:
    end = time.monotonic() + 120
    seed = 0
    while time.monotonic() < end:
        run_fuzz(ref_gateway.sock, 200, seed=seed)
        seed += 1
        assert ref_gateway.alive()
    still_works(ref_gateway.sock)
