"""A small synchronous client of the broker's HTTP API, for code without an event loop.

A Django view, a Flask handler, a cron job::

    from broker.client.http import publish

    seq = publish("http://127.0.0.1:8765", token, "scores/uk", {"home": 2, "away": 1})

Every publish carries a ``key`` (a fresh one unless given) and is retried once on a
network failure with the same key, so a retry never publishes twice (section 8 of
docs/protocol.md). Errors the broker answers raise the matching ``broker.errors`` class.
Standard library only (``http.client``); one ``HttpClient`` keeps its connection alive
between requests.
"""

from __future__ import annotations

import http.client
import json
import uuid
from typing import Any
from urllib.parse import urlencode, urlsplit

from broker.errors import BrokerError, ConnectionFailed, error_for_code

__all__ = ["HttpClient", "history", "publish", "publish_many"]


class HttpClient:
    """One keep-alive HTTP connection to a broker, authenticated with ``token``.

    ``url`` is the broker's base URL (``http://host:port`` or ``https://...``; a
    ``ws://``/``wss://`` URL or a trailing ``/ws`` is accepted too). Not thread-safe: use
    one per thread.
    """

    def __init__(self, url: str, token: str, *, timeout: float = 10.0, retries: int = 1) -> None:
        parts = urlsplit(url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme or "http")
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.https = scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def publish(self, topic: str, data: Any, *, key: str | None = None) -> int:
        """Publish ``data`` (any JSON value) to ``topic``; return its seq (the first
        publish's seq when ``key`` was already used within the dedupe window)."""
        body = {"topic": topic, "data": data, "key": key or uuid.uuid4().hex}
        answer = self._request("POST", "/api/publish", body)
        return int(answer["seq"] if "seq" in answer else answer["seqs"][0])

    def publish_many(self, topics: list[str], data: Any, *, key: str | None = None) -> list[int]:
        """Publish ``data`` to each of ``topics`` (1 to 100) at once, all or nothing;
        return their seqs in the order of ``topics``."""
        body = {"topics": topics, "data": data, "key": key or uuid.uuid4().hex}
        answer = self._request("POST", "/api/publish", body)
        seqs = answer["seqs"] if "seqs" in answer else [answer["seq"]]
        return [int(s) for s in seqs]

    def history(
        self,
        topic: str,
        *,
        last: int | None = None,
        since: int | None = None,
        epoch: str | None = None,
    ) -> dict[str, Any]:
        """One page of ``GET /api/history`` (at most 1,000 messages; ``more`` says
        whether to ask again with ``since`` = the last seq returned)."""
        query: dict[str, str | int] = {"topic": topic}
        if last is not None:
            query["last"] = last
        if since is not None:
            query["since"] = since
        if epoch is not None:
            query["epoch"] = epoch
        return self._request("GET", "/api/history?" + urlencode(query), None)

    def presence(self, topic: str) -> list[dict[str, Any]]:
        """Who is subscribed to ``topic`` now (``GET /api/presence``)."""
        users: list[dict[str, Any]] = self._request(
            "GET", "/api/presence?" + urlencode({"topic": topic}), None
        )["users"]
        return users

    def stats(self) -> dict[str, Any]:
        """Server-wide figures (``GET /api/stats``; needs an admin token)."""
        return self._request("GET", "/api/stats", None)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self._conn = cls(self.host, self.port, timeout=self.timeout)
        return self._conn

    def _request(self, method: str, path: str, body: Any) -> dict[str, Any]:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                conn = self._connection()
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                status = response.status
                if response.will_close:
                    self.close()
                break
            except (OSError, http.client.HTTPException) as exc:
                # The request may have reached the broker; publishes carry a key, so
                # sending it again is safe. Reads are safe anyway.
                self.close()
                if attempt + 1 == attempts:
                    raise ConnectionFailed(f"{method} {path}: {exc}") from exc
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        if status >= 400 or not isinstance(answer, dict):
            error = answer.get("error") if isinstance(answer, dict) else None
            if isinstance(error, dict):
                raise error_for_code(str(error.get("code")), str(error.get("message")))
            raise BrokerError(f"HTTP {status} from the broker")
        return answer


def publish(url: str, token: str, topic: str, data: Any, *, key: str | None = None) -> int:
    """Publish ``data`` to ``topic`` over one short HTTP request; return its seq."""
    with HttpClient(url, token) as client:
        return client.publish(topic, data, key=key)


def publish_many(
    url: str, token: str, topics: list[str], data: Any, *, key: str | None = None
) -> list[int]:
    """Publish ``data`` to every topic of ``topics`` at once; return their seqs."""
    with HttpClient(url, token) as client:
        return client.publish_many(topics, data, key=key)


def history(url: str, token: str, topic: str, **query: Any) -> dict[str, Any]:
    """One page of history for ``topic`` (``last``/``since``/``epoch`` as keywords)."""
    with HttpClient(url, token) as client:
        return client.history(topic, **query)
