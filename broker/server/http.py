"""The plain HTTP paths on the broker's port: health, metrics and the static files.

Everything but ``/ws`` is answered here (``Routes.respond``); ``/ws`` goes on to the
WebSocket handshake in ``broker.server.app``.
"""

from __future__ import annotations

import html
import ipaddress
from collections.abc import Sequence
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING
from typing import Protocol as Interface

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from broker.core.namespaces import Namespaces
from broker.server.metrics import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from broker.server.config import ServerConfig
    from broker.server.connection import Connection
    from broker.server.http11 import HttpRequest
    from broker.server.metrics import Metrics

#: Path -> (file in broker/static, content type).
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
    "/broker.js": ("broker.js", "text/javascript; charset=utf-8"),
    "/broker.d.ts": ("broker.d.ts", "application/typescript; charset=utf-8"),
}

#: The client library (docs/web.md): cached a while and importable from allowed origins.
LIBRARY_FILES = frozenset({"/broker.js", "/broker.d.ts"})


def loopback_host(host: str) -> bool:
    """Whether a ``Host`` header (port included or not) names this machine's loopback:
    ``localhost`` (or a name under ``.localhost``), ``127.0.0.0/8`` or ``[::1]``."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_allowed(origins: list[str], hosts: list[str], allowed: Sequence[str]) -> bool:
    """Whether a request's ``Origin`` header(s) pass the ``--allowed-origin`` check.

    No ``Origin`` (not a browser) or no list configured: allowed. The broker's own origin,
    ``http(s)://`` + the ``Host`` header, is allowed only when that host is loopback
    (``localhost``, ``127.0.0.1``, ``[::1]``): a ``Host`` header is whatever the page's
    host name is, and a page of an attacker's name resolved to the broker (DNS rebinding)
    sends its own name in both. The broker's public origin is allowed by listing it. A
    header sent twice is refused as a whole.
    """
    if not origins or not allowed:
        return True
    if len(origins) > 1:
        return False
    origin = origins[0]
    if origin in allowed:
        return True
    if len(hosts) != 1:
        return False
    host = hosts[0].strip().lower()
    if not host or not loopback_host(host):
        return False
    return origin.lower() in (f"http://{host}", f"https://{host}")


class Server(Interface):
    """What the plain HTTP paths use of the server (``BrokerServer`` is one)."""

    @property
    def config(self) -> ServerConfig:
        """The settings: the allowed origins of the client library."""

    @property
    def metrics(self) -> Metrics:
        """What ``/metrics`` shows."""

    @property
    def draining(self) -> bool:
        """Shutting down: ``/healthz`` answers 503."""

    @property
    def namespaces(self) -> Namespaces:
        """Per-pattern options: the console page names the public patterns."""


class Routes:
    """Answers the plain HTTP paths of one server."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def plain(
        self, conn: Connection, request: HttpRequest
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers and body for a plain (not upgrade) request that h11 parsed."""
        headers = Headers([(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers])
        response = self.respond(conn, Request(request.target, headers), request.path)
        if response is None:  # /ws, but not a WebSocket handshake
            response = conn.protocol.reject(
                HTTPStatus.UPGRADE_REQUIRED, "send a WebSocket handshake on a new connection\n"
            )
        # h11 frames the response (Content-Length, Connection) itself.
        fields = [
            (name, value)
            for name, value in response.headers.raw_items()
            if name.lower() not in ("content-length", "connection")
        ]
        return response.status_code, fields, bytes(response.body or b"")

    def respond(self, conn: Connection, request: Request, path: str) -> Response | None:
        """The response for ``path``, or None for ``/ws`` (the WebSocket upgrade)."""
        if path == "/ws":
            return None
        if path == "/healthz":
            if self.server.draining:
                return conn.protocol.reject(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
            return conn.protocol.reject(HTTPStatus.OK, "ok")
        if path == "/metrics":
            if not origin_allowed(
                request.headers.get_all("Origin"),
                request.headers.get_all("Host"),
                self.server.config.allowed_origins,
            ):
                return conn.protocol.reject(HTTPStatus.FORBIDDEN, "origin not allowed\n")
            body = self.server.metrics.exposition()
            headers = Headers(
                [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))]
            )
            return Response(200, "OK", headers, body)
        connection = ",".join(request.headers.get_all("Connection")).lower()
        if path in STATIC_FILES and "upgrade" not in connection:
            if path in LIBRARY_FILES:
                return library_file(path, request, self.server.config.allowed_origins)
            if path == "/":
                return static_file(path, public=self.server.namespaces.public)
            return static_file(path)
        return conn.protocol.reject(HTTPStatus.NOT_FOUND, "not found\n")


def _read_static(path: str) -> tuple[str, bytes] | Response:
    """The content type and bytes of one of the ``STATIC_FILES``, or a 404."""
    name, content_type = STATIC_FILES[path]
    try:
        return content_type, resources.files("broker").joinpath("static", name).read_bytes()
    except OSError:
        return Response(404, "Not Found", Headers([("Content-Type", "text/plain")]), b"")


#: The console page's placeholder for the public patterns (read by console.js).
PUBLIC_META = b'<meta name="broker-public" content="">'


def static_file(path: str, public: tuple[str, ...] = ()) -> Response:
    """One of the ``STATIC_FILES`` (the browser console), never cached stale; the page
    names the ``public`` patterns, so that a visitor without a token watches them."""
    found = _read_static(path)
    if isinstance(found, Response):
        return found
    content_type, body = found
    if public:
        named = html.escape(",".join(public), quote=True).encode()
        body = body.replace(PUBLIC_META, b'<meta name="broker-public" content="' + named + b'">')
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            (
                "Content-Security-Policy",
                "default-src 'self'; connect-src 'self' ws: wss:; "
                "img-src 'self' data:; frame-ancestors 'none'",
            ),
        ]
    )
    return Response(200, "OK", headers, body)


def library_file(path: str, request: Request, allowed: Sequence[str]) -> Response:
    """``/broker.js`` or its declarations, with CORS for the allowed origins (any when none)."""
    found = _read_static(path)
    if isinstance(found, Response):
        return found
    content_type, body = found
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "public, max-age=300"),
            ("X-Content-Type-Options", "nosniff"),
            ("Vary", "Origin"),
        ]
    )
    origins = request.headers.get_all("Origin")
    if not allowed:
        headers["Access-Control-Allow-Origin"] = "*"
    elif origins and origin_allowed(origins, request.headers.get_all("Host"), allowed):
        headers["Access-Control-Allow-Origin"] = origins[0]
    return Response(200, "OK", headers, body)
