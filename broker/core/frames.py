"""WebSocket frames (RFC 6455, section 5), sans-I/O: bytes in, frames and bytes out.

The one frame codec of the project: the server's connections, the load-generating client
link and the benchmarks' raw clients all encode with ``encode`` and parse with ``Parser``.

``Parser.feed`` takes bytes as they arrive, cut anywhere, and yields ``(opcode, payload)``
pairs: whole messages (``TEXT``/``BINARY``, fragments already joined, permessage-deflate
already inflated when it was negotiated) and control frames (``PING``, ``PONG``, ``CLOSE``)
as they come, also between the fragments of a message. A stream that breaks the RFC
raises ``FrameError``, which carries the close code to answer with: 1002 for a protocol
error (reserved bits or opcodes, a client frame without a mask, a bad continuation, a bad
control frame), 1007 for a close reason that is not UTF-8, 1009 for a frame or a message
over the size bound (checked from the header: an oversized frame is never buffered).

Text payloads stay bytes here: whether and how to decode them is the caller's choice
(the server decodes each text message whole, so a character may span fragments).

Unmasking is pure Python by default; an I/O shell may pass a faster function with the
same signature (websockets' C helper) as ``apply_mask``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Final

#: Opcodes (RFC 6455 5.2).
CONT = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

#: Close codes (RFC 6455 7.4.1) the codec and its callers use.
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # a close frame without a code (never sent)
CLOSE_ABNORMAL = 1006  # no close frame at all (never sent)
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011

#: Longest control frame payload, and so longest close reason in UTF-8 bytes (two of the
#: 125 bytes are the code).
MAX_CONTROL = 125
MAX_CLOSE_REASON = MAX_CONTROL - 2

#: Codes a peer may send in a close frame: the defined ones that are not reserved for
#: local use (1004-1006, 1015), and the registered and private ranges.
_VALID_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
_INSIDE = "new message inside a fragmented one"

#: One received frame or message: the opcode and the (unmasked, joined) payload.
Frame = tuple[int, bytes]
#: ``apply_mask(data, mask)``: ``data`` XOR the 4-byte ``mask`` repeated.
Masker = Callable[[bytes | bytearray, bytes | bytearray], bytes]


class FrameError(Exception):
    """The peer broke the WebSocket framing rules: close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def apply_mask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """``data`` XOR ``mask`` (4 bytes) repeated: masking and unmasking are the same."""
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes(mask * ((n >> 2) + 1), "little")
    # The key is up to 3 bytes longer than the data: its high bytes are cut off below.
    return (int.from_bytes(data, "little") ^ key).to_bytes((n >> 2) * 4 + 4, "little")[:n]


def encode(
    payload: bytes,
    opcode: int = TEXT,
    *,
    mask: bytes | None = None,
    fin: bool = True,
    apply_mask: Masker = apply_mask,
) -> bytes:
    """One frame carrying ``payload``: unmasked (a server's) without ``mask``, else masked
    with that 4-byte key (a client's). ``fin=False`` makes a fragment that ``CONT`` frames
    continue."""
    n = len(payload)
    first = opcode | 0x80 if fin else opcode
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 1 << 16:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + apply_mask(payload, mask)


#: The 2-byte heads of unmasked final text frames of up to 125 bytes (acks, small
#: messages), made once: ``bytes((0x81, n))`` per frame builds a tuple first.
_TEXT_HEADS: Final = [bytes((0x81, n)) for n in range(126)]
_TEXT_HEAD_16: Final = bytes((0x81, 126))
_TEXT_HEAD_64: Final = bytes((0x81, 127))


def text_head(n: int) -> bytes:
    """The head of an unmasked, final text frame of ``n`` payload bytes."""
    if n < 126:
        return _TEXT_HEADS[n]
    if n < 1 << 16:
        return _TEXT_HEAD_16 + n.to_bytes(2, "big")
    return _TEXT_HEAD_64 + n.to_bytes(8, "big")


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final text frame: what the server writes, the same bytes to every
    subscriber."""
    n = len(payload)
    if n < 126:
        return _TEXT_HEADS[n] + payload
    return text_head(n) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: the code, then ``reason`` cut to fit 125 bytes (at a
    character boundary)."""
    raw = reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore").encode()
    return code.to_bytes(2, "big") + raw


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a received close frame (1005 and "" when it has none)."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in _VALID_CODES and not 3000 <= code < 5000:
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


class Parser:
    """Incremental parser of one direction of a connection.

    ``masked``: frames must be masked (a server reading a client) or must not be (a client
    reading a server). ``max_size``: bound in bytes on a frame and on a message (None: no
    bound). ``deflate``: permessage-deflate was negotiated, so a message whose first frame
    has RSV1 set is compressed. After a ``FrameError`` the parser stays failed: every
    later ``feed`` raises it again.
    """

    __slots__ = (
        "_apply_mask",
        "_buffer",
        "_failed",
        "_fragments",
        "_inflater",
        "_opcode",
        "_pos",
        "_size",
        "_squeezed",
        "masked",
        "max_size",
    )

    def __init__(
        self,
        *,
        masked: bool,
        max_size: int | None = None,
        deflate: bool = False,
        apply_mask: Masker = apply_mask,
    ) -> None:
        self.masked = masked
        self.max_size = max_size
        self._apply_mask = apply_mask
        # Unparsed bytes: _buffer[_pos:]. The buffer is the caller's bytes while a feed
        # parses them; only a partial frame left over is copied (into a bytearray).
        self._buffer: bytes | bytearray = b""
        self._pos = 0
        # A fragmented message being received: its opcode, payloads, total size, and
        # whether it is compressed.
        self._opcode = 0
        self._fragments: list[bytes] | None = None
        self._size = 0
        self._squeezed = False
        self._inflater = zlib.decompressobj(-15) if deflate else None
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed (a partial frame)."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> Iterator[Frame]:
        """Parse ``data`` after what was left over: yield each complete message and
        control frame, in order; keep a partial frame for the next call. Iterate it to
        the end (or until ``FrameError``), even when no longer interested in messages."""
        if self._failed is not None:
            raise self._failed
        buf = self._buffer
        if self._pos < len(buf):
            if isinstance(buf, bytearray):
                del buf[: self._pos]
            else:
                buf = bytearray(buf[self._pos :])
            buf += data
        else:
            buf = data
        self._buffer = buf
        self._pos = pos = 0
        end = len(buf)
        masked = self.masked
        max_size = self.max_size
        try:
            while end - pos >= 2:
                head1 = buf[pos]
                head2 = buf[pos + 1]
                length = head2 & 0x7F
                start = pos + 2
                if length == 126:
                    if end - pos < 4:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                    start += 2
                elif length == 127:
                    if end - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    if length >> 63:
                        raise FrameError(CLOSE_PROTOCOL_ERROR, "frame length over 2^63")
                    start += 8
                if bool(head2 & 0x80) is not masked:
                    raise FrameError(
                        CLOSE_PROTOCOL_ERROR,
                        "client frame without a mask" if masked else "masked server frame",
                    )
                if max_size is not None and length > max_size:
                    raise FrameError(CLOSE_TOO_BIG, f"frame over {max_size} bytes")
                if masked:
                    start += 4
                stop = start + length
                if stop > end:
                    break  # the rest of this frame is still on its way
                if masked:
                    payload = self._apply_mask(buf[start:stop], buf[start - 4 : start])
                else:
                    payload = bytes(buf[start:stop])
                self._pos = pos = stop
                if head1 == 0x81 or head1 == 0x82:  # the common case: a whole message
                    if self._fragments is not None:
                        raise FrameError(CLOSE_PROTOCOL_ERROR, _INSIDE)
                    yield head1 & 0x0F, payload
                else:
                    frame = self._frame(head1, payload)
                    if frame is not None:
                        yield frame
        except FrameError as exc:
            self._failed = exc
            raise

    def _frame(self, head1: int, payload: bytes) -> Frame | None:
        """Any frame but a whole unfragmented, uncompressed message: a control frame, a
        fragment (None until the last) or a compressed message."""
        opcode = head1 & 0x0F
        fin = head1 & 0x80
        rsv = head1 & 0x70
        if opcode >= CLOSE:
            if opcode > PONG:
                raise FrameError(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
            if rsv:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
            if not fin:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if len(payload) > MAX_CONTROL:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
            if opcode == CLOSE:
                parse_close(payload)
            return opcode, payload
        if opcode > BINARY:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        if rsv & 0x30 or (rsv and (self._inflater is None or opcode == CONT)):
            raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if opcode == CONT:
            fragments = self._fragments
            if fragments is None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
            self._size += len(payload)
            if self.max_size is not None and self._size > self.max_size:
                raise FrameError(CLOSE_TOO_BIG, f"message over {self.max_size} bytes")
            fragments.append(payload)
            if not fin:
                return None
            self._fragments = None
            return self._message(self._opcode, b"".join(fragments), self._squeezed)
        if self._fragments is not None:
            raise FrameError(CLOSE_PROTOCOL_ERROR, _INSIDE)
        if not fin:
            self._opcode = opcode
            self._fragments = [payload]
            self._size = len(payload)
            self._squeezed = bool(rsv)
            return None
        return self._message(opcode, payload, bool(rsv))

    def _message(self, opcode: int, payload: bytes, compressed: bool) -> Frame:
        if not compressed:
            return opcode, payload
        assert self._inflater is not None
        limit = 0 if self.max_size is None else self.max_size + 1
        try:
            data = self._inflater.decompress(payload + _DEFLATE_TAIL, limit)
        except zlib.error as exc:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"bad compressed data: {exc}") from None
        if self._inflater.unconsumed_tail or (limit and len(data) >= limit):
            raise FrameError(CLOSE_TOO_BIG, f"message over {self.max_size} bytes")
        return opcode, data
