"""Errors of the broker protocol, one class per wire error code.

    BrokerError                 code "internal"
    ├── BadRequest              code "bad_request"   malformed frame, bad field, bad topic
    ├── Unauthorized            code "unauthorized"  missing, invalid or expired token
    │   └── TokenExpired        (a valid signature whose ``exp`` has passed)
    ├── Forbidden               code "forbidden"     ACL, reserved topic, another user's inbox
    ├── RateLimited             code "rate_limited"  publish rate over the connection's limit
    ├── Unavailable             code "unavailable"   store or cluster cannot take it now
    │   client side only (``broker.client``), never on the wire:
    ├── ConnectionFailed        no broker reachable at any URL
    ├── ConnectionLost          connection dropped with the request in flight
    ├── RequestTimeout          no answer in time
    │   ``broker serve``'s settings only, never on the wire:
    └── ConfigError             unknown setting, bad value, settings that exclude each other

The server raises these from the sans-I/O core and turns them into ``error`` frames in
one place (``protocol.encode_error``); the client library raises the same classes when the
server answers with the matching code, so ``except Forbidden`` works on both sides.
"""

from __future__ import annotations

from typing import Any

#: WebSocket close codes used by the protocol (section 6 of PROTOCOL.md).
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009
CLOSE_UNAUTHORIZED = 4001
CLOSE_TOKEN_EXPIRED = 4003
CLOSE_SLOW_CONSUMER = 4008


class BrokerError(Exception):
    """Base class: a request the broker refused, with its protocol error code."""

    code = "internal"

    def __init__(self, message: str = "", *, request_id: Any = None) -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")
        #: The ``id`` of the request this error answers, when it had a valid one.
        self.request_id = request_id


class BadRequest(BrokerError):
    """The frame is malformed or a field is missing, ill-typed or invalid."""

    code = "bad_request"


class Unauthorized(BrokerError):
    """The token is missing, invalid, or belongs to another user."""

    code = "unauthorized"


class TokenExpired(Unauthorized):
    """The token's signature is valid but its ``exp`` has passed."""


class Forbidden(BrokerError):
    """The user may not do this: ACL, reserved topic, another user's inbox, admin only."""

    code = "forbidden"


class RateLimited(BrokerError):
    """The connection publishes faster than its configured rate."""

    code = "rate_limited"


class Unavailable(BrokerError):
    """The store or cluster cannot take the request now; retry later."""

    code = "unavailable"


ERRORS_BY_CODE: dict[str, type[BrokerError]] = {
    cls.code: cls
    for cls in (BrokerError, BadRequest, Unauthorized, Forbidden, RateLimited, Unavailable)
}


def error_for_code(code: str, message: str, request_id: Any = None) -> BrokerError:
    """The exception matching a wire error code (``BrokerError`` for unknown codes)."""
    cls = ERRORS_BY_CODE.get(code, BrokerError)
    return cls(message, request_id=request_id)


# Client-side errors: raised by ``broker.client``, never sent on the wire (their codes are
# not in ``ERRORS_BY_CODE``).


class ConnectionFailed(BrokerError):
    """No broker could be reached at any of the client's URLs (refused, DNS, TLS, timeout)."""

    code = "connection_failed"


class ConnectionLost(BrokerError):
    """The connection dropped with this request in flight: a publish may or may not be recorded."""

    code = "connection_lost"


class RequestTimeout(BrokerError):
    """The broker did not answer a request (or the connection did not come back) in time."""

    code = "timeout"


class ConfigError(BrokerError):
    """A setting is unknown, has a bad value or conflicts with another; the message names the
    setting and where its value came from (flag, environment variable, file)."""

    code = "config"
