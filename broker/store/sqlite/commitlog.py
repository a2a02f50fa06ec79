"""The SQLite store's commit log on disk, its records and segments: what an ``ok`` waits for
under ``fsync = interval``.

A publish that arrives alone would otherwise pay a whole SQLite transaction (a BEGIN, the
inserts, a COMMIT writing two or three 4 KiB WAL frames): tens of microseconds on the
event loop for every chat message. Instead the batch is encoded as one record and
appended to a log segment with one ``write``: once it returns the batch is in the
operating system, which a ``kill -9`` of the broker cannot undo, and the batch counts as
recorded. The store's fsync thread (``syncer``) rotates to a new segment every
``fsync_interval``, fsyncs the finished one, applies its batches to SQLite in one
transaction and removes the segment once SQLite holds them durably. At start, whatever
segments are left (the broker was killed) are applied before anything else. Like Redis'
append-only file, with the difference that the log only ever holds the last interval.

A segment is ``<prefix>.<n>``, ``n`` growing; a record is its payload's length and CRC-32
(little-endian u32 each) and the payload. A record cut short or damaged (a crash in the
middle of a ``write``, a power loss) ends its segment: what follows it was never
acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from broker.core.model import Message

_HEAD = struct.Struct("<II")  # payload length, CRC-32 of the payload
_BATCH = struct.Struct("<qII")  # reservation (0: none), messages, keys
_MESSAGE = struct.Struct("<qqIIII")  # seq, ts, then the byte lengths of topic, id, name, data
_KEY = struct.Struct("<qIII")  # ts, byte lengths of user, key, seqs
#: A record longer than this is damage, not data (a batch is at most a few MiB).
_MAX_RECORD = 1 << 30


@dataclass
class Batch:
    """One record: the messages of a commit, its idempotency keys as stored (user, key,
    seqs text, ts in ms) and the seq reservation it made (0: none)."""

    messages: list[Message] = field(default_factory=list)
    keys: list[tuple[str, str, str, int]] = field(default_factory=list)
    reserved: int = 0


def encode(batch: Batch) -> bytes:
    """One record for ``batch``, ready to append."""
    parts = [_BATCH.pack(batch.reserved, len(batch.messages), len(batch.keys))]
    for m in batch.messages:
        topic, sid, name = m.topic.encode(), m.sender_id.encode(), m.sender_name.encode()
        parts.append(_MESSAGE.pack(m.seq, m.ts, len(topic), len(sid), len(name), len(m.payload)))
        parts += (topic, sid, name, m.payload)
    for user, key, seqs, ts in batch.keys:
        u, k, s = user.encode(), key.encode(), seqs.encode()
        parts.append(_KEY.pack(ts, len(u), len(k), len(s)))
        parts += (u, k, s)
    payload = b"".join(parts)
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> Batch:
    """The batch of one record's payload (its CRC already checked)."""
    reserved, n_messages, n_keys = _BATCH.unpack_from(payload)
    pos = _BATCH.size
    batch = Batch(reserved=reserved)
    for _ in range(n_messages):
        seq, ts, *lengths = _MESSAGE.unpack_from(payload, pos)
        (topic, sid, name, data), pos = _cut(payload, pos + _MESSAGE.size, lengths)
        batch.messages.append(Message(seq, topic.decode(), data, sid.decode(), name.decode(), ts))
    for _ in range(n_keys):
        ts, *lengths = _KEY.unpack_from(payload, pos)
        (user, key, seqs), pos = _cut(payload, pos + _KEY.size, lengths)
        batch.keys.append((user.decode(), key.decode(), seqs.decode(), ts))
    return batch


def _cut(payload: bytes, pos: int, lengths: list[int]) -> tuple[list[bytes], int]:
    """The fields of ``lengths`` bytes each from ``pos`` on, and the position after them."""
    fields = []
    for n in lengths:
        fields.append(payload[pos : pos + n])
        pos += n
    return fields, pos


def read_segment(data: bytes) -> list[Batch]:
    """The whole records at the start of a segment's bytes, up to the first torn or
    damaged one."""
    batches = []
    pos = 0
    while len(data) - pos >= _HEAD.size:
        length, crc = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        payload = data[start : start + length]
        if length > _MAX_RECORD or len(payload) < length or zlib.crc32(payload) != crc:
            break
        try:
            batches.append(decode(payload))
        except (struct.error, UnicodeDecodeError):
            break
        pos = start + length
    return batches


class CommitLog:
    """Log segments ``<folder>/<prefix>.<n>``: appended to on the event loop, rotated,
    fsynced and removed by the store's fsync thread. Not thread-safe: the ``Syncer``
    serialises ``append`` and ``rotate``."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.prefix = prefix
        self._fd: int | None = None
        self._next: tuple[int, int] | None = None  # made by prepare(), taken by rotate()
        self._number = 0
        self._size = 0  # bytes in the current segment

    def segments(self) -> list[tuple[int, Path]]:
        """The segments on disk, oldest first."""
        found = []
        for path in self.folder.glob(f"{self.prefix}.*"):
            suffix = path.name[len(self.prefix) + 1 :]
            if suffix.isdigit():
                found.append((int(suffix), path))
        return sorted(found)

    def recover(self) -> tuple[list[Batch], int]:
        """Every whole record of the segments left on disk, oldest first, and the number
        of the last of them (0: none)."""
        segments = self.segments()
        batches: list[Batch] = []
        for _, path in segments:
            batches += read_segment(path.read_bytes())
        return batches, segments[-1][0] if segments else 0

    def start(self) -> None:
        """Open a new segment after those on disk (call once they are applied)."""
        existing = self.segments()
        self._number = existing[-1][0] if existing else 0
        self.prepare()
        self.rotate()

    def prepare(self) -> None:
        """Create the next segment, and make its name durable, ahead of ``rotate``: the
        directory fsync stays off the path of the lock that ``append`` takes."""
        if self._next is not None:
            return
        number = self._number + 1
        path = self.folder / f"{self.prefix}.{number}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            folder = os.open(self.folder, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError:
            os.close(fd)
            raise
        self._next = (number, fd)

    def append(self, record: bytes) -> None:
        """Append one record (``encode``); raises ``OSError`` with the segment cut back to
        its last whole record, so that a failed batch leaves no trace."""
        assert self._fd is not None, "CommitLog.start() first"
        try:
            written = os.write(self._fd, record)
            if written != len(record):
                raise OSError(28, "No space left on device (short write to the commit log)")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += written

    def sync(self) -> None:
        """Make the records of the current segment durable (``fdatasync``)."""
        if self._fd is not None:
            os.fdatasync(self._fd)

    def rotate(self) -> tuple[int, int] | None:
        """Send new records to the segment ``prepare`` made; returns the finished one (its
        number and open descriptor, which the caller fsyncs and closes), if any."""
        assert self._next is not None, "CommitLog.prepare() first"
        finished = None if self._fd is None else (self._number, self._fd)
        (self._number, self._fd), self._next = self._next, None
        self._size = 0
        return finished

    def remove_upto(self, number: int) -> None:
        """Remove the segments up to ``number``: SQLite holds their batches durably."""
        for n, path in self.segments():
            if n <= number:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def close(self) -> None:
        """Close the open segments (they stay on disk until removed)."""
        for fd in (self._fd, None if self._next is None else self._next[1]):
            if fd is not None:
                os.close(fd)
        self._fd = self._next = None
