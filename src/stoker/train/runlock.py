"""One run per output directory: a lock file that names its holder.

`train.out_dir/.lock` holds `{"host", "pid", "started"}` of the run that writes the directory.
Two runs writing one directory would interleave metrics.jsonl and overwrite each other's
checkpoints, so a second run is refused with a one-line error naming the first. The lock is an
advisory `flock` on the open file, which the kernel releases when the holder dies (even by
`kill -9`); where the filesystem has no `flock`, the recorded PID decides: a lock whose PID is
no longer alive on this host is stale and taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from stoker.errors import StokerError

LOCK_FILE = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"PID {holder.get('pid')} on {holder.get('host')}, started {when}"


class RunLock:
    """Context manager holding `out_dir/.lock` for the duration of a run."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None

    def _read_holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text() or "{}")
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict[str, Any]) -> StokerError:
        return StokerError(
            f"{self.path.parent} is in use by another run ({_describe(holder)}); wait for it, "
            f"stop it, or choose another --train.out_dir (if that run is gone, delete "
            f"{self.path})"
        )

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # the file may be unlinked by a releasing holder meanwhile
            fd = self._try_flock()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise StokerError(f"could not take the run lock {self.path}; try again")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def _try_flock(self) -> int:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._refuse(self._read_holder()) from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return self._acquire_by_pid()  # a filesystem without flock
        return fd

    def _acquire_by_pid(self) -> int:
        holder = self._read_holder()
        alive = (
            holder.get("host") != socket.gethostname() or _pid_alive(int(holder["pid"]))
            if holder.get("pid")
            else False
        )
        if alive and holder.get("pid") != os.getpid():
            raise self._refuse(holder)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # unlink while still holding it (see `acquire`)
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
