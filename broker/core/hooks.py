"""Hooks to the application's backend (section 12 of docs/protocol.md), without the I/O.

The ``[hooks]`` table of the settings file (``parse_settings``, ``check``), the
``Broker-Signature`` header (``sign``, ``verify``), the JSON bodies the broker sends
(``connect_body``, ``check_body``, ``event``) and what the backend's answers mean
(``read_connect``, ``read_check``). The HTTP client, its queue and the retries of
``events`` are ``broker.server.hooks``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from broker.core.auth import Identity, identity_from_claims
from broker.core.units import format_duration, parse_duration
from broker.errors import BadRequest, BrokerError, Forbidden, Unauthorized, Unavailable

#: The hooks, by their key in ``[hooks]``.
NAMES = ("connect", "subscribe", "publish", "events")
#: The request headers a ``connect`` hook receives (those present), in lower case.
CONNECT_HEADERS = ("cookie", "user-agent", "origin", "x-forwarded-for")
#: The signature header.
SIGNATURE = "Broker-Signature"
#: How old a signature ``verify`` accepts by default (seconds, either way).
TOLERANCE = 300.0
#: Largest answer read from the backend; a bigger one is a failed call.
MAX_ANSWER = 1 << 20


@dataclass(frozen=True)
class HookSettings:
    """The ``[hooks]`` table: a URL per hook (None: not called), the HMAC secret and the
    bounds of the calls."""

    connect: str | None = None
    subscribe: str | None = None
    publish: str | None = None
    events: str | None = None
    secret: str | None = None
    #: Seconds a call may take, connection included; then the call failed.
    timeout: float = 2.0
    #: Calls in flight at once (the HTTP client's pool).
    concurrency: int = 100
    #: Calls waiting for a free slot; past it a call fails at once (``unavailable``).
    queue: int = 1000
    #: Events waiting to be sent; past it the oldest are dropped, counted and logged.
    events_queue: int = 10000
    #: Events per POST at most.
    events_batch: int = 100

    def url(self, name: str) -> str | None:
        """The URL of hook ``name`` (one of ``NAMES``), None when not configured."""
        value: str | None = getattr(self, name)
        return value

    @property
    def configured(self) -> bool:
        """Whether any hook has a URL."""
        return any(self.url(name) for name in NAMES)


def _url(raw: object) -> str:
    if not isinstance(raw, str) or not raw.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    if len(raw) > 2048 or any(c.isspace() for c in raw) or "://" == raw[-3:]:
        raise ValueError("must be an http:// or https:// URL")
    return raw


def _count(low: int, high: int) -> Any:
    def read(raw: object) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return raw

    return read


def _timeout(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError("must be a duration such as 500ms or 2s")
    value = parse_duration(raw)
    if not 0.01 <= value <= 60:
        raise ValueError("must be from 10ms to 1m")
    return value


def _secret(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError("must be a non-empty string")
    return raw


#: key -> how its TOML value is read (``ValueError`` saying why not).
OPTIONS: dict[str, Any] = {
    "connect": _url,
    "subscribe": _url,
    "publish": _url,
    "events": _url,
    "secret": _secret,
    "timeout": _timeout,
    "concurrency": _count(1, 10_000),
    "queue": _count(0, 1_000_000),
    "events_queue": _count(1, 10_000_000),
    "events_batch": _count(1, 10_000),
}


def parse_settings(raw: object) -> HookSettings:
    """The ``[hooks]`` table, read; ``ValueError`` with one line saying what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError("must be a table written [hooks]")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        reader = OPTIONS.get(key)
        if reader is None:
            raise ValueError(f"unknown key {key!r} (known: {', '.join(OPTIONS)})")
        try:
            values[key] = reader(value)
        except ValueError as exc:
            raise ValueError(f"{key} {exc}") from None
    settings = HookSettings(**values)
    if settings.configured and not settings.secret:
        raise ValueError("a hook is configured but 'secret' (the HMAC key) is missing")
    return settings


def check(settings: HookSettings, selected: Mapping[str, Iterable[str]]) -> str | None:
    """What is wrong with hooks that namespaces select (``selected``: hook name -> the
    patterns that ask for it) but the ``[hooks]`` table does not configure; None if
    nothing."""
    for name, patterns in selected.items():
        patterns = list(patterns)
        if patterns and not settings.url(name):
            return f"namespace {patterns[0]!r} sets {name}_hook, but [hooks] has no {name} URL"
    return None


def render(settings: HookSettings) -> list[str]:
    """``[hooks]`` as TOML lines for ``--print-config``, the secret redacted."""
    lines = ["[hooks]"]
    for name in NAMES:
        url = settings.url(name)
        if url:
            lines.append(f"{name} = {orjson.dumps(url).decode()}")
    if settings.secret:
        lines.append('secret = "<redacted>"')
    default = HookSettings()
    for key in ("timeout", "concurrency", "queue", "events_queue", "events_batch"):
        value = getattr(settings, key)
        if value != getattr(default, key):
            shown = f'"{format_duration(value)}"' if key == "timeout" else str(value)
            lines.append(f"{key} = {shown}")
    return lines


# -- the signature ----------------------------------------------------------------------


def sign(secret: str, body: bytes, now: float | None = None) -> str:
    """The ``Broker-Signature`` value for ``body``: ``t=<unix seconds>,v1=<hex HMAC-SHA256
    of "<t>.<body>">``."""
    t = int(time.time() if now is None else now)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    secret: str,
    header: str | None,
    body: bytes,
    now: float | None = None,
    tolerance: float = TOLERANCE,
) -> None:
    """Check a ``Broker-Signature`` header against ``body``; ``ValueError`` saying why
    it is refused (missing, malformed, too old or in the future, wrong MAC)."""
    if not header:
        raise ValueError("no Broker-Signature header")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    stamps = parts.get("t", [])
    if len(stamps) != 1 or not stamps[0].isdigit():
        raise ValueError("malformed Broker-Signature header")
    t = int(stamps[0])
    current = time.time() if now is None else now
    if abs(current - t) > tolerance:
        raise ValueError("stale Broker-Signature (timestamp out of tolerance)")
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, mac) for mac in parts.get("v1", [])):
        raise ValueError("Broker-Signature does not match")


# -- bodies -------------------------------------------------------------------------------


def connect_body(transport: str, headers: Mapping[str, str], remote_addr: str) -> bytes:
    """The ``connect`` request: ``transport``, the headers of ``CONNECT_HEADERS`` present
    (``headers`` keyed in lower case), the peer's address."""
    chosen = {name: headers[name] for name in CONNECT_HEADERS if name in headers}
    return orjson.dumps({"transport": transport, "headers": chosen, "remote_addr": remote_addr})


def check_body(
    user: Mapping[str, str], topic: str, data: bytes | None = None, key: str | None = None
) -> bytes:
    """The ``subscribe`` request (``data`` None) or the ``publish`` one (``data`` the
    publish's JSON, ``key`` its idempotency key when it has one)."""
    body: dict[str, Any] = {"user": dict(user), "topic": topic}
    if data is not None:
        body["data"] = orjson.Fragment(data)
    if key is not None:
        body["key"] = key
    return orjson.dumps(body)


def event(
    kind: str,
    user: Mapping[str, str],
    ts: int,
    *,
    topic: str | None = None,
    code: int | None = None,
) -> dict[str, Any]:
    """One item of an ``events`` batch: ``connect``, ``disconnect`` (with ``code``),
    ``join`` or ``leave`` (with ``topic``)."""
    item: dict[str, Any] = {"type": kind, "user": dict(user), "ts": ts}
    if topic is not None:
        item["topic"] = topic
    if code is not None:
        item["code"] = code
    return item


def events_body(items: Iterable[Mapping[str, Any]]) -> bytes:
    """An ``events`` request: ``{"events": [...]}``."""
    return orjson.dumps({"events": list(items)})


# -- answers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectAnswer:
    """What a ``connect`` answer admits: a user, an anonymous connection, or nothing
    (``message``: the backend's reason, if it gave one)."""

    identity: Identity | None = None
    anonymous: bool = False
    message: str | None = None


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def _message(answer: Any) -> str | None:
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:200]
    return None


def read_connect(status: int, body: bytes) -> ConnectAnswer:
    """What a ``connect`` answer admits. ``200 {"user": {"id", "name"}, "acl"?, "admin"?,
    "exp"?}``: that user, as a token with those claims would; ``200 {"anonymous": true}``:
    anonymous; anything else: nothing."""
    answer = _json(body)
    if status != 200 or not isinstance(answer, dict):
        return ConnectAnswer(message=_message(answer))
    if answer.get("anonymous") is True:
        return ConnectAnswer(anonymous=True)
    user = answer.get("user")
    if not isinstance(user, dict):
        return ConnectAnswer(message="the backend's answer has no 'user'")
    claims: dict[str, Any] = {"sub": user.get("id"), "name": user.get("name")}
    for claim in ("acl", "admin", "exp"):
        if claim in answer:
            claims[claim] = answer[claim]
    try:
        identity = identity_from_claims(claims)
    except Unauthorized as exc:
        return ConnectAnswer(message=exc.message.replace("invalid token", "invalid answer"))
    if identity.exp is not None and identity.exp <= time.time():
        return ConnectAnswer(message="the backend's answer has expired")
    return ConnectAnswer(identity=identity)


def read_check(status: int, body: bytes) -> bytes | None:
    """What a ``subscribe`` or ``publish`` answer says: ``200 {}`` allows (None); ``200
    {"data": V}`` allows with ``V`` instead of the data (V's JSON); ``403``/``400`` with
    ``{"error": {"message"}}`` refuse with ``forbidden``/``bad_request``; anything else is
    ``unavailable``."""
    if status == 200:
        answer = _json(body)
        if not isinstance(answer, dict):
            raise Unavailable("the application's backend gave an answer that is not a JSON object")
        if "data" in answer:
            return orjson.dumps(answer["data"])
        return None
    error: BrokerError
    if status in (400, 403):
        message = _message(_json(body)) or "refused by the application"
        error = Forbidden(message) if status == 403 else BadRequest(message)
        raise error
    raise Unavailable(f"the application's backend answered {status}; retry later")
