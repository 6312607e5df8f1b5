"""One process per output folder: an exclusive lock file ``OUT/.searchrl.lock``.

``hold_run_lock(out)`` takes an exclusive ``flock`` on the lock file and keeps it for the life of
the process (or until :func:`release_run_lock`); a second ``searchrl train`` / ``searchrl eval`` on
the same ``--out`` gets :class:`~searchrl.errors.SearchRLError` naming the holder's pid instead of
writing into the same files. The kernel drops the lock when the holder dies, even by SIGKILL, so a
crashed run never leaves a stale lock behind (the file itself stays; it is not the lock).

Left out: locks over network file systems that do not implement ``flock`` (NFS without lockd),
and Windows.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from searchrl.errors import SearchRLError

LOCK_NAME = ".searchrl.lock"
_held: dict[str, int] = {}  # resolved folder -> open file descriptor


def hold_run_lock(out: str | Path) -> Path:
    """Lock ``out`` (created if needed) for this process; idempotent within one process."""
    folder = Path(out).resolve()
    key = str(folder)
    if key in _held:
        return folder / LOCK_NAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise SearchRLError(f"{folder} is in use by pid {holder} (lock {path}): wait for it to finish, "
                            "or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[key] = fd
    return path


def release_run_lock(out: str | Path) -> None:
    """Drop this process's lock on ``out`` (no-op when not held)."""
    fd = _held.pop(str(Path(out).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
