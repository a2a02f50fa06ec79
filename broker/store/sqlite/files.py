"""The data directory's files around the database: its lock, the database file's identity
(deleted or replaced under a running broker), the history mark (what seqs were given,
kept outside the database), this machine's boot id, and the one-line cause of a storage
error."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass
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
    """The exclusive lock on a data directory: two brokers on one database would hand out
    the same seqs. The lock is taken on the directory itself, which no file replacement
    can swap (a ``lock`` file can be replaced, and whoever opens the new one locks it
    too), and on its ``lock`` file, which holds our pid for the message that names the
    holder (and is what brokers before this one lock). Where the file system cannot lock
    a directory the file alone holds it, and ``check`` notices it replaced."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None
        self._dir_fd: int | None = None
        self._identity: tuple[int, int] | None = None

    def _refuse(self, fd: int | None) -> Unavailable:
        holder = ""
        try:
            with open(self.folder / "lock", "rb") as f:
                holder = f.read(32).decode(errors="replace").strip()
        except OSError:
            pass
        if fd is not None:
            os.close(fd)
        pid = f" (pid {holder})" if holder.isdigit() else ""
        return Unavailable(
            f"data directory {self.folder} is in use by another broker{pid}; "
            "stop it or choose another --data"
        )

    def acquire(self) -> None:
        """Take the lock, or refuse (``Unavailable``, naming the holder's pid)."""
        dir_fd: int | None = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        assert dir_fd is not None
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise self._refuse(dir_fd) from None
            os.close(dir_fd)  # no directory locks here (NFS): the file alone
            dir_fd = None
        path = self.folder / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if dir_fd is not None:
                os.close(dir_fd)
            raise self._refuse(fd) from None
        st = os.fstat(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self._dir_fd = fd, dir_fd
        self._identity = (st.st_dev, st.st_ino)
        if dir_fd is None:
            self.check()  # replaced between our open and our lock

    def check(self) -> None:
        """Without a directory lock: raise ``Unavailable`` once the lock file we hold is
        not the one at its path any more (replaced or removed): another broker could
        lock the new one."""
        if self._dir_fd is not None or self._fd is None:
            return
        try:
            st = os.stat(self.folder / "lock")
            same = (st.st_dev, st.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if not same:
            raise Unavailable(
                f"the lock file of {self.folder} was replaced or removed while the broker "
                "ran; publishes are refused until it is restarted"
            )

    def release(self) -> None:
        """Let go of the lock (if held)."""
        for fd in (self._fd, self._dir_fd):
            if fd is not None:
                os.close(fd)  # releases the flock
        self._fd = self._dir_fd = None


@dataclass(frozen=True)
class Mark:
    """The history mark: seqs up to ``seq`` were given under ``epoch``, and the database
    file (inode ``inode``) held them. Kept next to the database, outside it, so that a
    database that went back (restored, copied in by hand) is told from the one the last
    run left."""

    epoch: str
    seq: int
    inode: int


class MarkFile:
    """The file that keeps the ``Mark`` (``<database>-mark``), replaced atomically and
    fsynced on every write."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Mark | None:
        """The mark (None: none yet, a directory from before marks). Raises ``ValueError``
        when the file is unreadable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            return Mark(str(data["epoch"]), int(data["seq"]), int(data["inode"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{self.path} is unreadable") from None

    def write(self, mark: Mark) -> None:
        """Replace the mark durably (temporary file, fsync, rename, directory fsync)."""
        partial = self.path.with_name(f".{self.path.name}.partial")
        body = json.dumps({"epoch": mark.epoch, "seq": mark.seq, "inode": mark.inode})
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, body.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class FileWatch:
    """The database file's identity (device, inode) since it was opened: once the file is
    deleted or replaced, what we write would go to a file nobody will ever open again.

    ``check`` looks at the file at most once per ``every`` seconds (0: each time): a
    ``stat`` per commit was a tenth of a chat publish's system calls, and with the
    ``interval`` fsync policy publishes acknowledged in the last interval are at risk
    anyway."""

    def __init__(self, path: Path, every: float = 0.0) -> None:
        self.path = path
        self.every = every
        self._name = str(path)  # a str: a Path converts itself on every os.stat
        self._opened: tuple[int, int] | None = None
        self._next = 0.0  # time.monotonic() of the next look
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

    def check(self, at_once: bool = False) -> None:
        """Raise ``Unavailable`` once the file was deleted or replaced (as seen at most
        ``every`` seconds ago, or now with ``at_once``)."""
        if self.lost is None and self.every and not at_once:
            now = time.monotonic()  # the vDSO: no system call
            if now < self._next:
                return
            self._next = now + self.every
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
