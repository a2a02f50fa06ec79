"""Admission: which TCP connections may hold a socket, counted from ``accept``.

Every accepted socket counts against ``max_connections``, whatever it goes on to do (a
WebSocket, a plain HTTP request, nothing at all), so idle sockets cannot take the file
descriptors the broker needs. Until it authenticates a connection is *unauthenticated*
(a plain HTTP keep-alive connection stays so for as long as none of its requests carries
a valid token):
those are bounded on their own (``max_unauthenticated``; when full, the oldest is
dropped, so a flood of sockets that never authenticate cannot hold the door shut) and per
peer address (``max_unauthenticated_per_address``, the oldest of that address dropped), and
must authenticate within the authentication timeout counted from accept.

A connection over ``max_connections`` is answered ``503`` by the handshake when few are
being refused at once (``REFUSE_SLACK``); beyond that it is dropped at accept.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Protocol

#: Descriptors kept for the broker itself (store, journal, logs, Redis, listeners).
RESERVED_DESCRIPTORS = 64
#: Connections over a limit kept open at once to be answered 503; beyond, dropped.
REFUSE_SLACK = 64
#: The derived connection cap never exceeds this (the NATS default, 64K).
MAX_DERIVED_CONNECTIONS = 65536
#: The derived bound on unauthenticated connections never exceeds this.
MAX_DERIVED_UNAUTHENTICATED = 4096
#: How long a connection refused with 503 may take to send its request.
REFUSE_TIMEOUT = 1.0


class Conn(Protocol):
    """What admission needs from a connection."""

    peer: str

    def abort(self) -> None:
        """Drop the TCP connection now."""


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY:
        return target
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):  # over the kernel's nr_open: keep what we have
            pass
    return soft


def connection_budget(descriptors: int) -> int:
    """The most connections ``descriptors`` file descriptors can carry, with the broker's
    own descriptors and the refusal slack kept aside."""
    usable = descriptors - RESERVED_DESCRIPTORS - REFUSE_SLACK
    return max(1, min(MAX_DERIVED_CONNECTIONS, usable))


def default_unauthenticated(max_connections: int) -> int:
    """The default bound on unauthenticated connections: a quarter of the connection cap,
    so a flood of them leaves three quarters to authenticated clients (all of a small cap,
    up to 16)."""
    quarter = min(MAX_DERIVED_UNAUTHENTICATED, max_connections // 4)
    return max(1, min(max_connections, max(16, quarter)))


def peer_address(peer: str) -> str:
    """The address part of ``host:port`` (IPv6 included)."""
    return peer.rpartition(":")[0] or peer


class Admission:
    """Counts the sockets of one server and decides, at accept, which it keeps.

    ``on_limit(limit, conn)`` is called for every refusal (``limit`` one of
    ``metrics.LIMITS``)."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_unauthenticated: int,
        max_per_address: int,
        on_limit: Callable[[str, Conn], None],
    ) -> None:
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated
        self.max_per_address = max_per_address
        self.on_limit = on_limit
        #: Every counted socket.
        self.sockets: set[Conn] = set()
        # Not authenticated yet, oldest first: connection -> (address, accepted at).
        self._pending: dict[Conn, tuple[str, float]] = {}
        # The same, per peer address, oldest first.
        self._per_address: dict[str, dict[Conn, None]] = {}
        # Over max_connections, kept only to answer 503.
        self._refusing: set[Conn] = set()

    @property
    def unauthenticated(self) -> int:
        """Connections accepted and not authenticated yet."""
        return len(self._pending)

    def admit(self, conn: Conn, now: float) -> bool:
        """Count a new connection, or refuse it. False: drop it now. A connection over
        ``max_connections`` may be kept to be answered 503 (``refused(conn)``).

        An unauthenticated bound that is full makes room by dropping its oldest
        connection (of the same address, for the per-address one): the longer one has
        waited, the likelier it never authenticates, and a flood of sockets then only
        displaces itself while an honest client, done in a round trip, gets through."""
        if len(self.sockets) >= self.max_connections:
            self.on_limit("connections", conn)
            if len(self._refusing) >= REFUSE_SLACK:
                return False
            self._refusing.add(conn)
            return True
        address = peer_address(conn.peer)
        mine = self._per_address.get(address)
        if self.max_per_address and mine is not None and len(mine) >= self.max_per_address:
            self.on_limit("unauthenticated_per_address", conn)
            self._drop(next(iter(mine)))
        elif len(self._pending) >= self.max_unauthenticated:
            self.on_limit("unauthenticated", conn)
            self._drop(next(iter(self._pending)))
        self._admit(conn, address, now)
        return True

    def _admit(self, conn: Conn, address: str, now: float) -> None:
        self.sockets.add(conn)
        self._pending[conn] = (address, now)
        self._per_address.setdefault(address, {})[conn] = None

    def _drop(self, conn: Conn) -> None:
        self.settle(conn)
        conn.abort()

    def refused(self, conn: Conn, now: float) -> bool:
        """True for a connection kept only to be answered 503. One refused at accept for
        want of room gets in after all when room was made since (a socket that was
        closing when it came)."""
        if conn not in self._refusing:
            return False
        if len(self.sockets) >= self.max_connections:
            return True
        self._refusing.discard(conn)
        self._admit(conn, peer_address(conn.peer), now)
        return False

    def accepted_at(self, conn: Conn) -> float | None:
        """When a connection not authenticated yet was accepted (None otherwise)."""
        entry = self._pending.get(conn)
        return entry[1] if entry is not None else None

    def settle(self, conn: Conn) -> None:
        """``conn`` authenticated (a WebSocket, or an HTTP request with a valid token): no
        longer unauthenticated. Plain HTTP without a token never settles."""
        entry = self._pending.pop(conn, None)
        if entry is None:
            return
        mine = self._per_address[entry[0]]
        del mine[conn]
        if not mine:
            del self._per_address[entry[0]]

    def forget(self, conn: Conn) -> None:
        """``conn`` is closed."""
        self.settle(conn)
        self.sockets.discard(conn)
        self._refusing.discard(conn)


def default_anonymous(max_connections: int) -> int:
    """The default cap on anonymous connections: half the connection cap, so that a
    crowd watching public topics always leaves half to users who log in."""
    return max(1, max_connections // 2)


class AnonymousCaps:
    """Anonymous connections and streams (section 10 of docs/protocol.md): a total cap and
    a per-address cap of their own (0: no per-address cap)."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.count = 0
        self._by_address: dict[str, int] = {}

    def admit(self, peer: str) -> str | None:
        """Count one more from ``peer``; the limit that refuses it instead (None: admitted)."""
        address = peer_address(peer)
        mine = self._by_address.get(address, 0)
        if self.count >= self.total:
            return "anonymous"
        if self.per_address and mine >= self.per_address:
            return "anonymous_per_address"
        self.count += 1
        self._by_address[address] = mine + 1
        return None

    def release(self, peer: str) -> None:
        """One from ``peer`` is gone."""
        address = peer_address(peer)
        mine = self._by_address.get(address, 0)
        if mine <= 1:
            self._by_address.pop(address, None)
        else:
            self._by_address[address] = mine - 1
        self.count = max(0, self.count - 1)
