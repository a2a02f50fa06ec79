"""Errors of the broker protocol: one class per wire error code, in one table.

    BrokerError                 code "internal"      500  a bug in the server
    ├── BadRequest              code "bad_request"   400  malformed frame, bad field, bad topic
    │   └── TooLarge                                 413  an HTTP API body over the size limit
    ├── Unauthorized            code "unauthorized"  401  missing, invalid or expired token
    │   └── TokenExpired                             401  a valid signature, ``exp`` passed
    ├── Forbidden               code "forbidden"     403  ACL, reserved topic, another's inbox
    ├── RateLimited             code "rate_limited"  429  publishing over the rate limit
    ├── Unavailable             code "unavailable"   503  store or cluster cannot take it now
    │   client side only (``broker.client``), never on the wire:
    ├── ConnectionFailed        no broker reachable at any URL
    ├── ConnectionLost          connection dropped with the request in flight
    ├── RequestTimeout          no answer in time
    │   ``broker serve``'s settings only, never on the wire:
    └── ConfigError             unknown setting, bad value, settings that exclude each other

``ERRORS_BY_CODE`` is the one table of wire codes (``code`` -> class; ``ERROR_CODES`` lists
them): the codes an ``error`` frame may carry (docs/protocol.md, "Requests and replies"),
the values of the ``code`` label in the metrics, and the classes the client raises. Each
class carries its ``http_status`` for the HTTP API. The server raises these from the
sans-I/O core and turns them into ``error`` frames in one place
(``protocol.encode_error``); the client library raises the same classes when the server
answers with the matching code, so ``except Forbidden`` works on both sides. The CLI maps
classes to exit codes in one place (``broker.cli.errors.EXIT_CODES``).
"""

from __future__ import annotations

from typing import Any

# WebSocket close codes of the protocol (docs/protocol.md, "Limits and closing"). The
# server's WebSocket layer sends 1009 itself; the client needs to recognise it.
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_TOO_BIG = 1009  # a frame over the max message size, never read (TooLarge)
CLOSE_UNAUTHORIZED = 4001  # no valid token in time, or a refused refresh (Unauthorized)
CLOSE_TOKEN_EXPIRED = 4003  # the token's exp has passed (TokenExpired)
CLOSE_SLOW_CONSUMER = 4008  # the connection's send queue went over its bound
CLOSE_TRY_AGAIN_LATER = 1013  # a cap of anonymous connections is reached (section 10)


class BrokerError(Exception):
    """Base class: a request the broker refused, with its protocol error code."""

    #: The wire error code (``error`` frames, the metrics' ``code`` label).
    code = "internal"
    #: The HTTP status the HTTP API answers this error with.
    http_status = 500

    def __init__(self, message: str = "", *, request_id: Any = None) -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")
        #: The ``id`` of the request this error answers, when it had a valid one.
        self.request_id = request_id


class BadRequest(BrokerError):
    """The frame is malformed or a field is missing, ill-typed or invalid."""

    code = "bad_request"
    http_status = 400


class TooLarge(BadRequest):
    """A request body is larger than the max message size (code ``bad_request``)."""

    http_status = 413


class Unauthorized(BrokerError):
    """The token is missing, invalid, or belongs to another user."""

    code = "unauthorized"
    http_status = 401


class TokenExpired(Unauthorized):
    """The token's signature is valid but its ``exp`` has passed."""


class Forbidden(BrokerError):
    """The user may not do this: ACL, reserved topic, another user's inbox, admin only."""

    code = "forbidden"
    http_status = 403


class RateLimited(BrokerError):
    """The connection publishes faster than its configured rate."""

    code = "rate_limited"
    http_status = 429


class Unavailable(BrokerError):
    """The store or cluster cannot take the request now; retry later."""

    code = "unavailable"
    http_status = 503


#: The wire error codes and their classes, in the order of docs/protocol.md.
ERRORS_BY_CODE: dict[str, type[BrokerError]] = {
    cls.code: cls
    for cls in (BadRequest, Unauthorized, Forbidden, RateLimited, Unavailable, BrokerError)
}
#: Every wire error code (``internal`` last: a bug in the server, never a client's fault).
ERROR_CODES: tuple[str, ...] = tuple(ERRORS_BY_CODE)


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
