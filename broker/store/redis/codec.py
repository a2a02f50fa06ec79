"""How messages are laid out in Redis: history members and append-log batches.

A history member (in ``h:<topic>``, and at the end of a stream entry) is binary-safe:
``<seq> <ts> <idlen> <namelen>\n<id><name><data>``.
"""

from __future__ import annotations

from broker.core.model import Draft, Message


def to_bytes(text: str) -> bytes:
    # Ids and names come from JSON and may hold lone surrogates; keep them byte-exact.
    return text.encode("utf-8", "surrogatepass")


def to_str(raw: bytes | str) -> str:
    """Bytes from Redis as text, byte-exact (lone surrogates survive the round trip)."""
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogatepass")


def encode_tail(draft: Draft) -> bytes:
    """The part of a history member after ``"<seq> "``: ts, sender and data."""
    sid, name = to_bytes(draft.sender_id), to_bytes(draft.sender_name)
    return b"%d %d %d\n%b%b%b" % (draft.ts, len(sid), len(name), sid, name, draft.payload)


def decode_member(topic: str, member: bytes) -> Message:
    """A history member (``<seq> <ts> <idlen> <namelen>\\n<id><name><data>``) as a Message."""
    head, _, rest = member.partition(b"\n")
    seq, ts, idlen, namelen = (int(x) for x in head.split(b" "))
    return Message(
        seq,
        topic,
        rest[idlen + namelen :],
        to_str(rest[:idlen]),
        to_str(rest[idlen : idlen + namelen]),
        ts,
    )


def split_batch(batch: bytes) -> list[bytes]:
    """The entries of a ``_READ_LOG`` answer (``<len>:<entry>`` repeated)."""
    out = []
    pos, end = 0, len(batch)
    while pos < end:
        colon = batch.index(b":", pos)
        start = colon + 1
        pos = start + int(batch[pos:colon])
        out.append(batch[start:pos])
    return out


def key_id(user: str, key: str) -> bytes:
    """The name of an idempotency key under ``k:``, unambiguous for any user id:
    ``<len(user)>:<user><key>`` (length in bytes)."""
    uid = to_bytes(user)
    return b"%d:%b%b" % (len(uid), uid, to_bytes(key))
