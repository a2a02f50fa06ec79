"""The data directory's files around the database: its lock, the database file's identity
(deleted or replaced under a running broker), this machine's boot id, and the one-line
cause of a storage error."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from broker.errors import Unavailable


def boot_id() -> str:
    """An id of this boot of the machine ("" where the system does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def describe(exc: BaseException) -> str:
    """The real cause of a storage error, for one log line: SQLite's message and code."""
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    return f"{exc} ({name})" if name else str(exc)


class DirectoryLock:
    """The exclusive lock on a data directory (its ``lock`` file, holding our pid): two
    brokers on one database would hand out the same seqs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse to start (``Unavailable``, naming the holder's pid)."""
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise Unavailable(
                f"data directory {self.folder} is in use by another broker{pid}; "
                "stop it or choose another --data"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (if held)."""
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


class FileWatch:
    """The database file's identity (device, inode) since it was opened: once the file is
    deleted or replaced, what we write would go to a file nobody will ever open again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._name = str(path)  # a str: a Path converts itself on every os.stat
        self._opened: tuple[int, int] | None = None
        #: Why the file is gone, once it is (it stays gone until a restart).
        self.lost: str | None = None

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._name)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def remember(self) -> None:
        """Record the identity of the file just opened."""
        self._opened = self._identity()

    def check(self) -> None:
        """Raise ``Unavailable`` once the file was deleted or replaced."""
        if self.lost is None and self._identity() != self._opened:
            self.lost = (
                f"the database file {self.path} was deleted or replaced while the broker ran; "
                "publishes are refused until it is restarted"
            )
        if self.lost is not None:
            raise Unavailable(self.lost)

    def newly_lost(self) -> str | None:
        """The cause, when the opened file is found gone now for the first time."""
        if self.lost is not None or self._opened is None or self._identity() == self._opened:
            return None
        try:
            self.check()
        except Unavailable:
            pass
        return self.lost
