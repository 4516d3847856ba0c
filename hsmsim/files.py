"""Files hsmsim writes into a state directory: explicit modes (never the caller's umask),
all-or-nothing appends of records, and telling a full disk from a broken one.

Modes: every directory 0700, every file and socket 0600. The exceptions are public, non-secret
files that other programs read: the cluster CA's certificate (`ca/ca.crt`, 0644) and the
p11-kit module file `hsmsim env` may write (`hsmsim.module`, 0644); they sit in a 0700 tree,
so only the owner can reach them anyway. The PKCS#11 module and the package itself are
installed by pip and are not written here."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import IO

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644  # the cluster CA certificate only
PRIVATE_UMASK = 0o077
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SQLITE_FULL = 13
# Exit status of a node process that cannot start because its disk is full: the daemon waits
# for space instead of setting the HSM aside as damaged (EX_TEMPFAIL).
EXIT_NO_SPACE = 75
LOW_SPACE_BYTES = 1 << 20  # after a failed write, less free space than this means "full"


def private_umask() -> int:
    """Defence in depth for a process that writes state: anything created without an explicit
    mode is private. Returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


def make_dir(path: Path, parents: bool = True) -> Path:
    """`path` as a 0700 directory (missing parents too, each 0700), whatever the umask."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if not parents or p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            pass
        os.chmod(d, PRIVATE_DIR)
    if not missing:
        os.chmod(path, PRIVATE_DIR)
    return path


def open_fd(path: Path, flags: int, mode: int = PRIVATE_FILE) -> int:
    """os.open with O_CREAT and an exact mode (also for a file that already existed)."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_append(path: Path, mode: int = PRIVATE_FILE) -> IO[bytes]:
    """A binary append stream (logs), mode exact."""
    return os.fdopen(open_fd(path, os.O_WRONLY | os.O_APPEND, mode), "ab")


def write_private(path: Path, data: str | bytes, mode: int = PRIVATE_FILE) -> None:
    """Replace the content of a small file (pid files), mode exact. Not crash-atomic."""
    fd = open_fd(path, os.O_WRONLY | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new file: temp file,
    fsync, rename, fsync the directory. Private (0600) unless `mode` says otherwise (exact,
    whatever the umask); a missing parent directory is made 0700. On failure the temp file is
    removed and the old file, if any, stays."""
    if not path.parent.is_dir():
        make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def touch_private(path: Path) -> Path:
    """Create `path` empty (or keep it) with mode 0600, e.g. before SQLite or a logging handler
    opens it with the process umask."""
    os.close(open_fd(path, os.O_RDONLY))
    return path


def file_handler(path: Path) -> logging.FileHandler:
    """A logging.FileHandler on a 0600 file."""
    touch_private(path)
    return logging.FileHandler(path)


def append_all(fd: int, data: bytes, size: int) -> int:
    """Append `data` to the file open on `fd` (O_APPEND) whose length is `size`: all of it, or
    nothing (a short or failed write is cut off again before the error is raised, so no torn
    record stays behind for the next append to join). Returns the new length."""
    done = 0
    try:
        while done < len(data):
            n = os.write(fd, data[done:])
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n
    except BaseException:
        if done:
            try:
                os.ftruncate(fd, size)
            except OSError:  # pragma: no cover - start-up repair cuts the torn tail
                pass
        raise
    return size + done


def no_space(path: Path) -> bool:
    """Whether the filesystem holding `path` is (nearly) out of blocks or inodes. Asked after a
    failed write whose error does not say why (SoftHSM2, SQLite I/O errors)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    low_blocks = st.f_bavail * st.f_frsize < LOW_SPACE_BYTES
    low_inodes = st.f_files > 0 and st.f_favail == 0
    return low_blocks or low_inodes


def is_no_space(exc: BaseException, path: Path | None = None) -> bool:
    """Whether `exc` means "the disk is full" rather than "something is broken": ENOSPC/EDQUOT,
    SQLite's SQLITE_FULL, or (given `path`) any I/O failure while that filesystem is full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return True
        if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == SQLITE_FULL:
            return True
        e = e.__cause__ or e.__context__
    return path is not None and no_space(path)
