"""A daemon under load, as one process (used by test_durability): runs the cluster daemon for
STATE and 4 tasks that create token keys and use them, appending each acknowledged handle to
ACKED (fsynced) before creating the next. The test kills this process with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from hsmsim.daemon.main import Daemon, DaemonOptions
from hsmsim.pkcs11.constants import Attribute, Mechanism, UserType
from hsmsim.pkcs11.errors import Pkcs11Error
from hsmsim.pkcs11.params import GcmParams, MechanismSpec


async def main(state: Path, acked: Path) -> None:
    d = Daemon(DaemonOptions(state, None, (), services=False), dict(os.environ))
    await d.start()
    c = d.cluster
    assert c is not None
    fd = os.open(acked, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    gcm = MechanismSpec(int(Mechanism.AES_GCM), GcmParams(iv=b"", aad=b"", tag_bits=128))

    async def worker(i: int) -> None:
        login = await c.login(UserType.USER, "crypto_user", "cu-password-1")
        n = 0
        while True:
            n += 1
            tmpl = {int(Attribute.TOKEN): True, int(Attribute.VALUE_LEN): 32,
                    int(Attribute.LABEL): f"w{i}-{n}", int(Attribute.ENCRYPT): True,
                    int(Attribute.DECRYPT): True}
            try:
                h = await c.generate_key(login, MechanismSpec(int(Mechanism.AES_KEY_GEN)), tmpl, 1)
            except Pkcs11Error:
                continue
            os.write(fd, f"{h}\n".encode())
            os.fsync(fd)
            try:
                await c.encrypt(login, h, gcm, b"data")
            except Pkcs11Error:
                pass

    os.write(fd, b"ready\n")
    await asyncio.gather(*(worker(i) for i in range(4)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
