"""Admission: which TCP connections may hold a socket, counted from ``accept``.

Every accepted socket counts against ``max_connections``, whatever it goes on to do (a
WebSocket, a plain HTTP request, nothing at all), so idle sockets cannot take the file
descriptors the broker needs. Until it authenticates a connection is *unauthenticated*:
those are bounded on their own (``max_unauthenticated``; when full, the oldest is
dropped, so a flood of sockets that never authenticate cannot hold the door shut) and per
peer address (``max_unauthenticated_per_address``), and must authenticate within the
authentication timeout counted from accept.

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
        self._per_address: dict[str, int] = {}
        # Over a limit, kept only to answer 503: connection -> the limit.
        self._refusing: dict[Conn, str] = {}

    @property
    def unauthenticated(self) -> int:
        """Connections accepted and not authenticated yet."""
        return len(self._pending)

    def admit(self, conn: Conn, now: float) -> bool:
        """Count a new connection, or refuse it. False: drop it now. A connection over
        ``max_connections`` may be kept to be answered 503 (``refused(conn)``)."""
        if len(self.sockets) >= self.max_connections:
            return self._refuse("connections", conn)
        address = peer_address(conn.peer)
        if self.max_per_address and self._per_address.get(address, 0) >= self.max_per_address:
            return self._refuse("unauthenticated_per_address", conn)
        if len(self._pending) >= self.max_unauthenticated:
            # The oldest is the likeliest never to authenticate: it makes room.
            self.on_limit("unauthenticated", conn)
            oldest = next(iter(self._pending))
            self.settle(oldest)
            oldest.abort()
        self.sockets.add(conn)
        self._pending[conn] = (address, now)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return True

    def _refuse(self, limit: str, conn: Conn) -> bool:
        self.on_limit(limit, conn)
        if len(self._refusing) >= REFUSE_SLACK:
            return False
        self._refusing[conn] = limit
        return True

    def refused(self, conn: Conn, now: float) -> bool:
        """True for a connection kept only to be answered 503. One refused at accept for
        want of room gets in after all when room was made since (a socket that was
        closing when it came)."""
        limit = self._refusing.get(conn)
        if limit is None:
            return False
        if limit != "connections" or len(self.sockets) >= self.max_connections:
            return True
        del self._refusing[conn]
        address = peer_address(conn.peer)
        self.sockets.add(conn)
        self._pending[conn] = (address, now)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return False

    def accepted_at(self, conn: Conn) -> float | None:
        """When a connection not authenticated yet was accepted (None otherwise)."""
        entry = self._pending.get(conn)
        return entry[1] if entry is not None else None

    def settle(self, conn: Conn) -> None:
        """``conn`` authenticated (or is served plain HTTP): no longer unauthenticated."""
        entry = self._pending.pop(conn, None)
        if entry is None:
            return
        address = entry[0]
        left = self._per_address[address] - 1
        if left:
            self._per_address[address] = left
        else:
            del self._per_address[address]

    def forget(self, conn: Conn) -> None:
        """``conn`` is closed."""
        self.settle(conn)
        self.sockets.discard(conn)
        self._refusing.pop(conn, None)
