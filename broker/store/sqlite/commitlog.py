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
(little-endian u32 each) and the payload.

At start (``CommitLog.recover``) the segments are read whole. A record cut short at the
end of the log (fewer bytes than its header says, or zeros: a power loss in the middle of
a ``write``) is *torn*: it was never fsynced, so never acknowledged under ``fsync =
always``, and under ``interval`` it is what a power loss may cost; it is dropped. Any
other bad record (its bytes all there but its CRC wrong, or valid records after it) is
*damage*: the records after it are found again (``scan_segment``) and kept, and the store
starts a new epoch (see ``SqliteStore``): what the damaged bytes held is lost and no seq
they may have carried can be given again under the epoch clients saw.
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
#: Bytes of CRC a search for valid records after damage may check, per segment; past it
#: the rest counts as damaged (the safe side: a new epoch).
_SCAN_BUDGET = 256 << 20


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
    if pos != len(payload):
        raise struct.error("bytes left after the last field")
    return batch


def _cut(payload: bytes, pos: int, lengths: list[int]) -> tuple[list[bytes], int]:
    """The fields of ``lengths`` bytes each from ``pos`` on, and the position after them."""
    fields = []
    for n in lengths:
        fields.append(payload[pos : pos + n])
        pos += n
    return fields, pos


def _record_at(data: bytes, pos: int) -> tuple[Batch, int] | str:
    """The record at ``pos`` and the position after it, or why there is none: "torn" (cut
    short, or zeros to the end) or "damaged"."""
    if len(data) - pos < _HEAD.size:
        return "torn"
    length, crc = _HEAD.unpack_from(data, pos)
    start = pos + _HEAD.size
    if length > len(data) - start or (length == 0 and not data[pos:].strip(b"\0")):
        return "torn"
    if length > _MAX_RECORD or length < _BATCH.size:
        return "damaged"
    payload = data[start : start + length]
    if zlib.crc32(payload) != crc:
        return "damaged"
    try:
        return decode(payload), start + length
    except (struct.error, UnicodeDecodeError):
        return "damaged"


def _plausible(data: bytes, pos: int) -> bool:
    """Cheap checks before a record's CRC, while searching for one after damage."""
    if len(data) - pos < _HEAD.size + _BATCH.size:
        return False
    length = _HEAD.unpack_from(data, pos)[0]
    if length < _BATCH.size or length > len(data) - pos - _HEAD.size:
        return False
    reserved, n_messages, n_keys = _BATCH.unpack_from(data, pos + _HEAD.size)
    return bool(reserved >= 0 and n_messages * _MESSAGE.size + n_keys * _KEY.size <= length)


@dataclass
class Scan:
    """One segment read whole: its valid records, and what was wrong in it."""

    batches: list[Batch] = field(default_factory=list)
    #: Bytes cut short at the segment's end (a torn write), and bytes of damage.
    torn: int = 0
    damaged: int = 0
    #: Valid records before the first damage, and after it.
    before: int = 0
    after: int = 0
    #: Offset of the first bad byte (-1: none).
    bad_at: int = -1


def scan_segment(data: bytes) -> Scan:
    """Every valid record of a segment's bytes. After a bad record the next one is sought
    where the bad one's length says it ends, else at every offset (within a CRC budget);
    whatever lies between counts as damaged, and a bad end with nothing valid after it as
    torn when it is cut short."""
    scan = Scan()
    pos = 0
    budget = _SCAN_BUDGET
    while pos < len(data):
        found = _record_at(data, pos)
        if not isinstance(found, str):
            scan.batches.append(found[0])
            if scan.bad_at < 0:
                scan.before += 1
            else:
                scan.after += 1
            pos = found[1]
            continue
        if scan.bad_at < 0:
            scan.bad_at = pos
        resume = _resync(data, pos, budget, _last_seq(scan.batches))
        if resume is None:
            rest = len(data) - pos
            if found == "torn" and scan.damaged == 0:
                scan.torn = rest
            else:
                scan.damaged += rest
            break
        budget -= resume[1]
        scan.damaged += resume[0] - pos
        pos = resume[0]
    return scan


def _last_seq(batches: list[Batch]) -> int:
    """The highest seq of the batches read so far (0: none)."""
    for batch in reversed(batches):
        if batch.messages:
            return batch.messages[-1].seq
    return 0


def _follows(found: tuple[Batch, int] | str, after: int) -> bool:
    """Whether a record found after damage is one: whole, and its seqs increasing past
    ``after`` (a message's bytes that happen to look like a record are not)."""
    if isinstance(found, str):
        return False
    seqs = [m.seq for m in found[0].messages]
    return all(a < b for a, b in zip([after, *seqs], seqs, strict=False))


def _resync(data: bytes, bad: int, budget: int, after: int) -> tuple[int, int] | None:
    """The offset of the next valid record after the bad one at ``bad`` (its seqs past
    ``after``) and the CRC bytes spent finding it; None when there is none (or the budget
    ran out)."""
    spent = 0
    if len(data) - bad >= _HEAD.size:
        end = bad + _HEAD.size + _HEAD.unpack_from(data, bad)[0]
        if end < len(data) and _plausible(data, end) and _follows(_record_at(data, end), after):
            return end, _HEAD.unpack_from(data, end)[0]
    for pos in range(bad + 1, len(data) - _HEAD.size - _BATCH.size + 1):
        if not _plausible(data, pos):
            continue
        spent += _HEAD.unpack_from(data, pos)[0]
        if spent > budget:
            return None
        if _follows(_record_at(data, pos), after):
            return pos, spent
    return None


def read_segment(data: bytes) -> list[Batch]:
    """The whole records at the start of a segment's bytes, up to the first torn or
    damaged one."""
    scan = scan_segment(data)
    return scan.batches[: scan.before]


@dataclass
class Damage:
    """A segment found damaged at start (see ``Recovery``)."""

    path: Path
    size: int
    bad_at: int
    damaged: int
    before: int
    after: int


@dataclass
class Recovery:
    """What ``CommitLog.recover`` found: every valid record, oldest first; the number of
    the last segment read; the bytes of a torn tail; the damaged segments."""

    batches: list[Batch] = field(default_factory=list)
    last_segment: int = 0
    torn: int = 0
    damage: list[Damage] = field(default_factory=list)


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

    def recover(self) -> Recovery:
        """Every valid record of the segments left on disk, oldest first, with what was
        torn or damaged (see the module's docstring). A bad end that valid records follow,
        in the same segment or a later one, is damage, not a tear."""
        found = Recovery()
        scans = []
        for number, path in self.segments():
            data = path.read_bytes()
            scans.append((path, len(data), scan_segment(data)))
            found.last_segment = number
        for i, (path, size, scan) in enumerate(scans):
            found.batches += scan.batches
            later = any(s.batches for _, _, s in scans[i + 1 :])
            if scan.torn and not later:
                found.torn += scan.torn
            elif scan.torn or scan.damaged:
                found.damage.append(
                    Damage(
                        path,
                        size,
                        scan.bad_at,
                        scan.torn + scan.damaged,
                        scan.before,
                        scan.after + sum(len(s.batches) for _, _, s in scans[i + 1 :]),
                    )
                )
        return found

    def keep_aside(self, path: Path) -> Path:
        """Rename a damaged segment out of the log (never deleted): ``<name>.damaged``,
        ``<name>.damaged.1``... Returns its new path."""
        target = path.with_name(f"{path.name}.damaged")
        n = 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.damaged.{n}")
        os.rename(path, target)
        folder = os.open(self.folder, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        return target

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

    @property
    def current(self) -> tuple[int, int]:
        """The current segment's number and how many bytes it holds."""
        return self._number, self._size

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
