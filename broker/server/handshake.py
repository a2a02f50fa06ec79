"""The WebSocket opening handshake's fast path: one parse of the request head, the checks
of RFC 6455 4.2.1, and the 101 response written from a template.

``parse_upgrade`` reads a request head that arrived whole in the connection's first read
and returns it only when it is a plain, well-formed WebSocket upgrade to ``/ws`` that the
broker accepts without negotiating anything (no extension when compression is on, no
subprotocol; an extension offer is ignored, as websockets ignores it, unless compression
is on). Anything else, refusals included, returns None and takes the general path
(h11, then websockets' ``ServerProtocol``), which answers exactly as it always did: so
this module can only accept what websockets would have accepted, never refuse
differently. It parses at least as strictly as both h11 and websockets (CRLF line ends,
token header names, visible-ASCII values, no folding, no body, one ``Host``).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import re
import time

from websockets.datastructures import Headers
from websockets.http11 import Request

#: RFC 6455 1.3: appended to the client's key before hashing.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: websockets' limits on a request head (its http11 module): over them, the general path.
MAX_HEADERS = 128
MAX_LINE = 8190
#: h11's bound on a request head (``max_incomplete_event_size``).
MAX_HEAD = 16 * 1024
_NAME = r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
# A field value: visible ASCII, inner spaces and tabs, none at either end (h11's rule;
# websockets also takes bytes over 0x7f, which are left to it).
_VALUE = r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?"
_FIELD = rf"({_NAME}):[ \t]*({_VALUE})[ \t]*\r\n"
#: The whole head at once: the request line, then header lines, then the blank line.
_HEAD = re.compile(
    rf"GET (/ws(?:\?[\x21-\x7e]*)?) HTTP/1\.1\r\n((?:{_NAME}:[ \t]*{_VALUE}[ \t]*\r\n)*)\r\n"
)
_FIELDS = re.compile(_FIELD)
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
#: A key is 16 random bytes in base64: 22 characters and ``==``.
_KEY = re.compile(r"[A-Za-z0-9+/]{21}[AQgw]==")
#: Headers that make websockets (or h11) take a closer look: left to them. An extension
#: offer is one only when the server has extensions (websockets ignores it otherwise).
_GENERAL = frozenset({"content-length", "transfer-encoding", "sec-websocket-protocol"})
_NEGOTIATING = _GENERAL | {"sec-websocket-extensions"}


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for the client's ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def parse_upgrade(head: bytes, extensions: bool = False) -> Request | None:
    """The upgrade request in ``head`` (the bytes up to and including the blank line), or
    None when the general path must read it (see the module's docstring); ``extensions``:
    the server negotiates some, so an offer of one goes the general way."""
    if len(head) > MAX_HEAD:
        return None
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    match = _HEAD.fullmatch(text)
    if match is None:
        return None
    target, block = match.groups()
    fields = _FIELDS.findall(block)
    if len(fields) > MAX_HEADERS:
        return None
    if len(text) > MAX_LINE and any(len(line) > MAX_LINE for line in text.split("\r\n")):
        return None
    headers = Headers()
    for name, value in fields:
        headers[name] = value
    if len(headers.get_all("Host")) != 1:
        return None
    if any(name in headers for name in (_NEGOTIATING if extensions else _GENERAL)):
        return None
    return Request(target, headers)


def upgrade_ok(headers: Headers) -> str | None:
    """The ``Sec-WebSocket-Accept`` value if ``headers`` pass every check websockets makes
    of a handshake this broker accepts (Connection, Upgrade, key, version); None
    otherwise, for websockets to answer with its 400 or 426."""
    connection = [
        item.strip() for value in headers.get_all("Connection") for item in value.split(",")
    ]
    if not all(_TOKEN.fullmatch(item) for item in connection):
        return None
    if not any(item.lower() == "upgrade" for item in connection):
        return None
    upgrade = headers.get_all("Upgrade")
    if len(upgrade) != 1 or upgrade[0].lower() != "websocket":
        return None
    keys = headers.get_all("Sec-WebSocket-Key")
    if len(keys) != 1 or _KEY.fullmatch(keys[0]) is None:
        return None
    if headers.get_all("Sec-WebSocket-Version") != ["13"]:
        return None
    return accept_key(keys[0])


class ResponseTemplate:
    """The 101 response, the same bytes websockets' ``accept`` would send (its headers
    in its order, then ``Server``), with the ``Date`` computed once a second."""

    __slots__ = ("_date", "_second", "_tail")

    def __init__(self, server_header: str) -> None:
        self._tail = f"\r\nServer: {server_header}\r\n\r\n".encode()
        self._second = -1
        self._date = b""

    def accept(self, accept: str) -> bytes:
        """The response accepting a handshake whose key gave ``accept``."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            date = email.utils.formatdate(now, usegmt=True)
            self._date = (
                f"HTTP/1.1 101 Switching Protocols\r\nDate: {date}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
            ).encode()
        return self._date + accept.encode() + self._tail
