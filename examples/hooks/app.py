"""A small web application that keeps its own login and its own rules, next to a broker.

Standard library only. Users log in with a name and get a session cookie; the page then
opens a WebSocket to the broker with no token at all: the browser sends the cookie with the
upgrade, and the broker asks this application's ``/broker/connect`` who it is. The
application also moderates (``/broker/publish``: refuses "spam", rewrites "darn"; a
publish containing "slowpoke" is answered too late, to show the broker's timeout), keeps
one room private (``/broker/subscribe``: ``chat/staff`` is for admins) and records what
the broker reports (``/broker/events``, appended to a JSON-lines file).

Every request from the broker is checked with ``verify_signature`` first.

    python examples/hooks/app.py --secret change-me --broker ws://127.0.0.1:8765/ws
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import html
import json
import secrets
import threading
import time
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

#: How old a signature may be (seconds, either way).
TOLERANCE = 300


def verify_signature(
    secret: str, header: str | None, body: bytes, now: float | None = None
) -> bool:
    """Whether ``header`` (Broker-Signature: t=<unix>,v1=<hex>) signs ``body`` with
    ``secret`` and is recent."""
    if not header:
        return False
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    if not parts.get("t", "").isdigit() or "v1" not in parts:
        return False
    t = int(parts["t"])
    if abs((time.time() if now is None else now) - t) > TOLERANCE:
        return False  # stale (or from the future): a replayed request
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


def reaches_staff(pattern: str) -> bool:
    """Whether a subscription ``pattern`` can match ``chat/staff`` or below (``chat/#``,
    ``chat/+`` and ``#`` can)."""
    levels = pattern.split("/")
    for want, level in zip(("chat", "staff"), levels):
        if level == "#":
            return True
        if level not in (want, "+"):
            return False
    return len(levels) >= 2


PAGE = """<!doctype html>
<meta charset="utf-8"><title>hooks example</title>
<p>Logged in as <b>{name}</b>. <span id="state">connecting…</span></p>
<form id="say"><input id="text" autocomplete="off"> <button>send</button></form>
<ul id="messages"></ul>
<script>
// Nothing secret in this page: the browser sends the session cookie with the upgrade.
const ws = new WebSocket({broker});
const show = (text) => {{
  const li = document.createElement("li"); li.textContent = text;
  document.getElementById("messages").append(li);
}};
ws.onmessage = (event) => {{
  const frame = JSON.parse(event.data);
  if (frame.op === "hello") {{
    document.getElementById("state").textContent = "connected as " + frame.user.id;
    ws.send(JSON.stringify({{op: "sub", id: 1, topic: "chat/lobby", last: 20}}));
  }} else if (frame.op === "msg") {{
    show(frame.from.name + ": " + frame.data);
  }} else if (frame.op === "error") {{
    show("refused: " + frame.message);
  }}
}};
document.getElementById("say").onsubmit = (event) => {{
  event.preventDefault();
  const text = document.getElementById("text");
  ws.send(JSON.stringify({{op: "pub", id: 2, topic: "chat/lobby", data: text.value, echo: true}}));
  text.value = "";
}};
</script>
"""

LOGIN = """<!doctype html>
<meta charset="utf-8"><title>log in</title>
<form method="post" action="/login"><input name="name" placeholder="your name">
<button>log in</button></form>
"""


class App:
    """The application's state: sessions (cookie -> user) and where events go."""

    def __init__(self, secret: str, broker: str, events: Path) -> None:
        self.secret = secret
        self.broker = broker
        self.events = events
        self.sessions: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def login(self, name: str) -> str:
        sid = secrets.token_urlsafe(24)
        user = {"id": name.lower(), "name": name, "admin": name.lower() == "admin"}
        with self.lock:
            self.sessions[sid] = user
        return sid

    def user(self, cookie_header: str | None) -> dict[str, Any] | None:
        if not cookie_header:
            return None
        cookie = SimpleCookie()
        cookie.load(cookie_header)
        morsel = cookie.get("session")
        with self.lock:
            return self.sessions.get(morsel.value) if morsel else None

    # -- the hooks ----------------------------------------------------------------------

    def connect(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        user = self.user(body.get("headers", {}).get("cookie"))
        if user is None:
            return 401, {"error": {"message": "not logged in"}}
        return 200, {
            "user": {"id": user["id"], "name": user["name"]},
            "acl": {"pub": ["chat/#"], "sub": ["chat/#"]},
            "exp": int(time.time()) + 3600,
        }

    def subscribe(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if reaches_staff(body["topic"]) and body["user"]["id"] != "admin":
            return 403, {"error": {"message": "staff only"}}
        return 200, {}

    def publish(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        text = json.dumps(body.get("data"))
        if "slowpoke" in text:
            time.sleep(5)  # longer than the broker's timeout: the publish is unavailable
        if "spam" in text:
            return 403, {"error": {"message": "no spam, please"}}
        if "darn" in text:
            return 200, {"data": json.loads(text.replace("darn", "d**n"))}
        return 200, {}

    def record(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock, self.events.open("a") as f:
            for event in body["events"]:
                f.write(json.dumps(event) + "\n")
        return 200, {}


def handler(app: App) -> type[BaseHTTPRequestHandler]:
    hooks = {
        "/broker/connect": app.connect,
        "/broker/subscribe": app.subscribe,
        "/broker/publish": app.publish,
        "/broker/events": app.record,
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the broker pools its connections
        # Each answer in one write, sent at once: a header and a body in two small writes
        # meet the peer's delayed ACK and wait 40 ms.
        wbufsize = 1 << 16
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def reply(
            self, status: int, body: bytes, kind: str, extra: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            user = app.user(self.headers.get("Cookie"))
            if self.path != "/":
                self.reply(404, b"not found\n", "text/plain")
            elif user is None:
                self.reply(200, LOGIN.encode(), "text/html; charset=utf-8")
            else:
                page = PAGE.format(name=html.escape(user["name"]), broker=json.dumps(app.broker))
                self.reply(200, page.encode(), "text/html; charset=utf-8")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/login":
                name = parse_qs(body.decode()).get("name", [""])[0].strip()
                if not name.isalnum():
                    self.reply(400, b"a name is letters and digits\n", "text/plain")
                    return
                cookie = f"session={app.login(name)}; HttpOnly; SameSite=Lax; Path=/"
                self.reply(303, b"", "text/plain", {"Location": "/", "Set-Cookie": cookie})
                return
            hook = hooks.get(self.path)
            if hook is None:
                self.reply(404, b"not found\n", "text/plain")
                return
            if not verify_signature(app.secret, self.headers.get("Broker-Signature"), body):
                self.reply(401, b'{"error": {"message": "bad signature"}}', "application/json")
                return
            status, answer = hook(json.loads(body))
            self.reply(status, json.dumps(answer).encode(), "application/json")

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--secret", required=True, help="the broker's [hooks] secret")
    parser.add_argument("--broker", default="ws://127.0.0.1:8765/ws", help="the broker's URL")
    parser.add_argument("--events", type=Path, default=Path("events.jsonl"), help="events file")
    args = parser.parse_args()
    app = App(args.secret, args.broker, args.events)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(app))
    server.daemon_threads = True
    print(f"application on http://127.0.0.1:{args.port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
