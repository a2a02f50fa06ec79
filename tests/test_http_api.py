"""The HTTP API (section 7 of docs/protocol.md) against real broker processes.

Requests go over real sockets with the standard library's ``http.client``; subscribers
are raw WebSocket peers.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from typing import Any
from urllib.parse import quote

import h11
import pytest

from broker.client.http import HttpClient
from broker.client.http import publish as publish_helper
from broker.errors import BadRequest, Forbidden, Unauthorized

from .harness import Broker
from .support import BrokerProcess, Peer

Answer = tuple[int, dict[str, str], Any]


def call(
    broker: Broker,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = "",
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Answer:
    """One request: (status, headers with lower-case names, decoded JSON body or text)."""
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
    sent = dict(headers or {})
    if token == "":
        token = broker.token("1")
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    payload = raw
    if body is not None:
        payload = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=payload, headers=sent)
        response = conn.getresponse()
        data = response.read()
        got = {k.lower(): v for k, v in response.getheaders()}
        decoded: Any = data.decode()
        if got.get("content-type", "").startswith("application/json"):
            decoded = json.loads(data)
        return response.status, got, decoded
    finally:
        if own:
            conn.close()


def error_of(answer: Answer) -> tuple[int, str]:
    status, headers, body = answer
    assert headers["content-type"].startswith("application/json"), answer
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    return status, body["error"]["code"]


def publish(broker: Broker, body: Any, token: str | None = "") -> Answer:
    return call(broker, "POST", "/api/publish", body, token=token)


def history(broker: Broker, query: str, token: str | None = "") -> Answer:
    return call(broker, "GET", "/api/history?" + query, token=token)


# -- publish --------------------------------------------------------------------------------


async def test_publish_reaches_subscribers_and_history(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("2"))
    assert (await peer.request("sub", topic="scores/#"))["op"] == "ok"
    status, headers, body = publish(
        broker, {"topic": "scores/uk", "data": {"home": 2}}, token=broker.token("svc", "Service")
    )
    assert status == 200 and headers["content-type"] == "application/json"
    assert set(body) == {"seq"} and isinstance(body["seq"], int)
    msg = await peer.recv()
    assert msg["op"] == "msg" and msg["seq"] == body["seq"] and msg["topic"] == "scores/uk"
    assert msg["data"] == {"home": 2} and msg["from"] == {"id": "svc", "name": "Service"}
    status, _, page = history(broker, "topic=scores/uk&last=5")
    assert status == 200 and [m["seq"] for m in page["messages"]] == [body["seq"]]
    assert "op" not in page["messages"][0]
    await peer.close()


async def test_batch_publish_in_the_order_of_topics(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("2"))
    await peer.request("sub", topic="#")
    topics = [f"room/{i}" for i in (5, 3, 9, 1)]
    status, _, body = publish(broker, {"topics": topics, "data": "hi"})
    assert status == 200 and set(body) == {"seqs"}
    seqs = body["seqs"]
    assert len(seqs) == 4 and seqs == sorted(seqs) and len(set(seqs)) == 4
    got = [await peer.recv() for _ in topics]
    assert [(m["topic"], m["seq"]) for m in got] == list(zip(topics, seqs))
    await peer.close()


def test_a_batch_with_one_forbidden_topic_publishes_nothing(broker: Broker) -> None:
    token = broker.token("svc", pub=["user/+"])
    answer = publish(broker, {"topics": ["user/1", "user/2", "news", "user/3"], "data": 1}, token)
    assert error_of(answer) == (403, "forbidden")
    answer = publish(broker, {"topics": ["user/1", "user/+"], "data": 1}, token)
    assert error_of(answer) == (400, "bad_request")
    admin = broker.token("admin", admin=True)
    for n in (1, 2, 3):
        assert history(broker, f"topic=user/{n}&last=10", broker.token(str(n)))[2]["messages"] == []
    assert call(broker, "GET", "/api/stats", token=admin)[2]["last_seq"] == 0


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ([1, 2], "not an object"),
        ({"data": 1}, "no topic"),
        ({"topic": "a", "topics": ["b"], "data": 1}, "both"),
        ({"topic": "a"}, "no data"),
        ({"topic": 5, "data": 1}, "topic not a string"),
        ({"topic": "a/+", "data": 1}, "a pattern"),
        ({"topic": "", "data": 1}, "empty topic"),
        ({"topics": "a", "data": 1}, "topics not a list"),
        ({"topics": [], "data": 1}, "no topics"),
        ({"topics": ["a", "a"], "data": 1}, "repeated topic"),
        ({"topics": [f"t/{i}" for i in range(101)], "data": 1}, "101 topics"),
        ({"topic": "a", "data": 1, "key": None}, "null key"),
        ({"topic": "a", "data": 1, "key": ""}, "empty key"),
        ({"topic": "a", "data": 1, "key": 7}, "number key"),
        ({"topic": "a", "data": 1, "key": "k" * 129}, "key too long"),
    ],
)
def test_malformed_publishes_are_bad_requests(broker: Broker, body: Any, why: str) -> None:
    assert error_of(publish(broker, body)) == (400, "bad_request"), why


def test_unknown_fields_are_ignored_and_100_topics_pass(broker: Broker) -> None:
    status, _, body = publish(broker, {"topic": "a", "data": None, "extra": [1]})
    assert status == 200 and body["seq"] == 1
    status, _, body = publish(broker, {"topics": [f"t/{i}" for i in range(100)], "data": 0})
    assert status == 200 and body["seqs"] == list(range(2, 102))


def test_body_must_be_json(broker: Broker) -> None:
    answer = call(
        broker, "POST", "/api/publish", raw=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert error_of(answer) == (400, "bad_request")
    answer = call(
        broker,
        "POST",
        "/api/publish",
        raw=b'{"topic":"a","data":1}',
        headers={"Content-Type": "text/plain"},
    )
    assert error_of(answer) == (400, "bad_request")
    answer = call(broker, "POST", "/api/publish", raw=b'{"topic":"a","data":1}')
    assert error_of(answer) == (400, "bad_request")  # no content type at all
    status, _, _ = call(
        broker,
        "POST",
        "/api/publish",
        raw=b'{"topic":"a","data":1}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 200


def test_reserved_topic_is_forbidden(broker: Broker) -> None:
    assert error_of(publish(broker, {"topic": "$sys/x", "data": 1})) == (403, "forbidden")


def test_tokens_are_checked(broker: Broker) -> None:
    body = {"topic": "a", "data": 1}
    assert error_of(publish(broker, body, token=None)) == (401, "unauthorized")
    assert error_of(publish(broker, body, token="not.a.jwt")) == (401, "unauthorized")
    expired = broker.token("1", ttl=-10)
    status, code = error_of(publish(broker, body, token=expired))
    assert (status, code) == (401, "unauthorized")
    answer = call(
        broker, "POST", "/api/publish", body, token=None, headers={"Authorization": "Basic eDp5"}
    )
    assert error_of(answer) == (401, "unauthorized")
    assert error_of(call(broker, "GET", "/api/stats", token=None)) == (401, "unauthorized")


def test_body_over_the_max_message_size_is_413(make_broker: Any) -> None:
    broker = make_broker("--max-message-size", "1KiB", memory=True)
    answer = publish(broker, {"topic": "a", "data": "x" * 2000})
    assert error_of(answer) == (413, "bad_request")
    assert publish(broker, {"topic": "a", "data": "x" * 500})[0] == 200


def test_unknown_path_and_wrong_method(broker: Broker) -> None:
    assert error_of(call(broker, "GET", "/api/nothing")) == (404, "bad_request")
    answer = call(broker, "GET", "/api/publish")
    assert error_of(answer) == (405, "bad_request")
    assert "POST" in answer[1]["allow"]
    answer = call(broker, "DELETE", "/api/history")
    assert error_of(answer) == (405, "bad_request") and "GET" in answer[1]["allow"]
    assert call(broker, "GET", "/healthz", token=None)[:1] == (200,)


def test_rate_limit_per_user_one_unit_per_message(make_broker: Any) -> None:
    broker = make_broker("--rate-limit", "5", memory=True)
    token = broker.token("svc")
    answer = publish(broker, {"topics": [f"t/{i}" for i in range(8)], "data": 1}, token)
    assert error_of(answer) == (429, "rate_limited")
    statuses = [publish(broker, {"topic": "t", "data": i}, token)[0] for i in range(6)]
    assert statuses.count(200) >= 4 and statuses[-1] == 429
    # Another user has a bucket of their own.
    assert publish(broker, {"topic": "t", "data": 0}, broker.token("other"))[0] == 200


def test_keep_alive_serves_many_requests_on_one_connection(broker: Broker) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
    seqs = []
    for i in range(5):
        status, _, body = call(broker, "POST", "/api/publish", {"topic": "k", "data": i}, conn=conn)
        assert status == 200
        seqs.append(body["seq"])
        if i == 0:
            local = conn.sock.getsockname()
        assert conn.sock is not None and conn.sock.getsockname() == local
    assert call(broker, "GET", "/healthz", conn=conn)[0] == 200
    assert conn.sock.getsockname() == local
    conn.close()
    assert seqs == sorted(seqs)


@pytest.mark.slow
def test_a_slow_request_is_dropped_after_the_auth_timeout(make_broker: Any) -> None:
    broker = make_broker("--auth-timeout", "1s", memory=True)
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        data = s.recv(4096)
        while data:
            data = s.recv(4096)
        assert time.monotonic() - started < 4


async def test_http_clients_count_in_max_connections(make_broker: Any) -> None:
    broker = make_broker("--max-connections", "1", memory=True)
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
    assert call(broker, "GET", "/api/presence?topic=a", conn=conn)[0] == 200
    # The keep-alive HTTP client holds the one connection: others are refused (503, or
    # dropped at accept when many are refused at once).
    with pytest.raises(Exception):  # noqa: B017
        await Peer.open(broker.url, broker.token("2"))
    try:
        refused = publish(broker, {"topic": "a", "data": 1})[0]
    except (OSError, http.client.HTTPException):
        refused = 503
    assert refused == 503
    conn.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            if publish(broker, {"topic": "a", "data": 1})[0] == 200:
                break
        except (OSError, http.client.HTTPException):
            pass
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


@pytest.mark.process
def test_acknowledged_publish_survives_kill_9(broker: BrokerProcess) -> None:
    status, _, body = publish(broker, {"topics": ["a", "b"], "data": "kept"})
    assert status == 200
    broker.kill()
    broker.start()
    page = history(broker, "topic=%23&last=10")[2]
    assert [(m["topic"], m["seq"], m["data"]) for m in page["messages"]] == [
        ("a", body["seqs"][0], "kept"),
        ("b", body["seqs"][1], "kept"),
    ]


# -- history --------------------------------------------------------------------------------


def test_history_pages_over_more_than_1000_messages(broker: Broker) -> None:
    token = broker.token("1")
    for batch in range(13):
        topics = [f"p/{batch}/{i}" for i in range(100)]
        assert publish(broker, {"topics": topics, "data": batch}, token)[0] == 200
    status, _, first = history(broker, "topic=p/%23&since=0")
    assert status == 200 and first["more"] is True and len(first["messages"]) == 1000
    assert first["recovered"] is True and first["seq"] == 1300
    seqs = [m["seq"] for m in first["messages"]]
    assert seqs == list(range(1, 1001))
    status, _, second = history(broker, f"topic=p/%23&since={seqs[-1]}&epoch={first['epoch']}")
    assert second["more"] is False and [m["seq"] for m in second["messages"]] == list(
        range(1001, 1301)
    )
    _, _, last = history(broker, "topic=p/%23&last=1200")
    assert (
        last["more"] is True and last["messages"][0]["seq"] == 101 and len(last["messages"]) == 1000
    )
    _, _, last = history(broker, "topic=p/%2B/3&last=5")
    assert [m["topic"] for m in last["messages"]] == [f"p/{b}/3" for b in range(8, 13)]


def test_history_fields_and_errors(broker: Broker) -> None:
    publish(broker, {"topic": "h/a", "data": {"x": 1}}, broker.token("7", "Seven"))
    _, _, page = history(broker, "topic=h/a")
    assert page["messages"] == [] and page["more"] is False  # neither: last 0
    _, _, page = history(broker, "topic=h/a&last=1")
    (msg,) = page["messages"]
    assert set(msg) == {"topic", "seq", "data", "from", "ts"}
    assert msg["from"] == {"id": "7", "name": "Seven"} and msg["data"] == {"x": 1}
    assert isinstance(page["epoch"], str) and page["recovered"] is True
    _, _, other = history(broker, "topic=h/a&since=0&epoch=someotherepoch")
    assert other["recovered"] is False and len(other["messages"]) == 1
    assert error_of(history(broker, "topic=h/a&last=1&since=0")) == (400, "bad_request")
    assert error_of(history(broker, "topic=h/a&last=-1")) == (400, "bad_request")
    assert error_of(history(broker, "topic=h/a&last=x")) == (400, "bad_request")
    assert error_of(history(broker, "last=1")) == (400, "bad_request")
    assert error_of(history(broker, "topic=a%2Bb&last=1")) == (400, "bad_request")
    token = broker.token("1", sub=["other/#"])
    assert error_of(history(broker, "topic=h/a&last=1", token)) == (403, "forbidden")


def test_history_keeps_inboxes_private(broker: Broker) -> None:
    publish(broker, {"topics": ["user/1", "user/2", "user/1/x", "news"], "data": 0})
    _, _, page = history(broker, "topic=%23&last=10", broker.token("1"))
    assert [m["topic"] for m in page["messages"]] == ["user/1", "user/1/x", "news"]
    _, _, page = history(broker, "topic=user/%2B&since=0", broker.token("2"))
    assert [m["topic"] for m in page["messages"]] == ["user/2"]
    assert error_of(history(broker, "topic=user/2&last=5", broker.token("1"))) == (403, "forbidden")


# -- presence and stats ---------------------------------------------------------------------


async def test_presence_and_stats(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("9", "Nine"))
    await peer.request("sub", topic="room/1")
    status, _, body = call(broker, "GET", "/api/presence?topic=" + quote("room/1", safe=""))
    assert status == 200 and body == {"users": [{"id": "9", "name": "Nine", "connections": 1}]}
    assert error_of(call(broker, "GET", "/api/presence?topic=room/%2B")) == (400, "bad_request")
    assert error_of(call(broker, "GET", "/api/presence?topic=user/9")) == (403, "forbidden")
    assert error_of(call(broker, "GET", "/api/stats")) == (403, "forbidden")
    status, _, figures = call(broker, "GET", "/api/stats", token=broker.token("ops", admin=True))
    assert status == 200 and figures["connections"] == 1 and "epoch" in figures
    await peer.close()


# -- browsers -------------------------------------------------------------------------------


def test_cors_preflight_and_origin_check(make_broker: Any) -> None:
    broker = make_broker("--allowed-origin", "https://app.example", memory=True)
    status, headers, _ = call(
        broker,
        "OPTIONS",
        "/api/publish",
        token=None,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    status, headers, _ = publish_from(broker, "https://app.example")
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
    answer = publish_from(broker, "https://evil.example")
    assert error_of(answer) == (403, "forbidden")
    assert "access-control-allow-origin" not in answer[1]
    status, _, _ = publish(broker, {"topic": "a", "data": 1})  # no Origin: not a browser
    assert status == 200


def test_the_brokers_own_origin_is_allowed_as_on_the_websocket(make_broker: Any) -> None:
    # http.client sends Host: 127.0.0.1:<port>; a page served by the broker has that origin.
    broker = make_broker("--allowed-origin", "https://app.example", memory=True)
    own = f"http://127.0.0.1:{broker.port}"
    status, headers, _ = publish_from(broker, own)
    assert status == 200 and headers["access-control-allow-origin"] == own
    assert error_of(publish_from(broker, f"http://127.0.0.1:{broker.port + 1}")) == (
        403,
        "forbidden",
    )


def test_any_origin_when_none_is_configured(broker: Broker) -> None:
    status, headers, _ = publish_from(broker, "https://anything.example")
    assert status == 200 and headers["access-control-allow-origin"] == "https://anything.example"


def publish_from(broker: Broker, origin: str) -> Answer:
    return call(
        broker, "POST", "/api/publish", {"topic": "a", "data": 1}, headers={"Origin": origin}
    )


# -- metrics and the helper -----------------------------------------------------------------


def test_metrics_count_http_requests_by_path_and_status(broker: Broker) -> None:
    publish(broker, {"topic": "a", "data": 1})
    call(broker, "GET", "/api/nothing")
    _, _, text = call(broker, "GET", "/metrics", token=None)
    assert 'broker_http_requests_total{path="/api/publish",status="200"} 1.0' in text
    assert 'broker_http_requests_total{path="other",status="404"} 1.0' in text


def test_pipelined_requests_are_answered_in_order(broker: Broker) -> None:
    token = broker.token("1")
    wire = b""
    for i in range(5):
        body = json.dumps({"topic": "pipe", "data": i}).encode()
        headers = [
            ("Host", "x"),
            ("Authorization", f"Bearer {token}"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ]
        one = h11.Connection(h11.CLIENT)
        wire += one.send(h11.Request(method="POST", target="/api/publish", headers=headers))
        wire += one.send(h11.Data(data=body)) + one.send(h11.EndOfMessage())
    # Five requests in one write; h11 on this side reads the five answers back.
    reader = h11.Connection(h11.CLIENT)
    seqs: list[int] = []
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as s:
        s.sendall(wire)
        deadline = time.monotonic() + 10
        while len(seqs) < 5:
            reader.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))
            reader.send(h11.EndOfMessage())
            body = b""
            while True:
                assert time.monotonic() < deadline
                event = reader.next_event()
                if event is h11.NEED_DATA:
                    reader.receive_data(s.recv(65536))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            seqs.append(json.loads(body)["seq"])
            reader.start_next_cycle()
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    page = history(broker, "topic=pipe&last=10")[2]
    assert [m["data"] for m in page["messages"]] == [0, 1, 2, 3, 4]


def test_sync_helper(broker: Broker) -> None:
    token = broker.token("1")
    assert publish_helper(broker.http_url, token, "a", {"n": 0}) == 1
    with HttpClient(broker.url, token) as client:  # a ws:// URL works too
        seq = client.publish("a", {"n": 1})
        assert client.publish("a", {"n": 2}, key="same") == seq + 1
        assert client.publish("a", {"n": 3}, key="same") == seq + 1  # a retry: no new message
        assert client.publish_many(["b", "c"], 0) == [seq + 2, seq + 3]
        page = client.history("a", last=5)
        assert [m["data"] for m in page["messages"]] == [{"n": 0}, {"n": 1}, {"n": 2}]
        with pytest.raises(Forbidden):
            client.publish("$x", 1)
        with pytest.raises(BadRequest):
            client.publish_many(["a", "a"], 1)
    with HttpClient(broker.http_url, "not.a.token") as client, pytest.raises(Unauthorized):
        client.publish("a", 1)


@pytest.mark.slow
def test_sync_helper_retries_on_a_stale_keep_alive_connection(make_broker: Any) -> None:
    broker = make_broker("--auth-timeout", "1s", memory=True)
    with HttpClient(broker.http_url, broker.token("1")) as client:
        first = client.publish("a", 1)
        deadline = time.monotonic() + 5
        # The broker closes the idle keep-alive connection after the timeout; the next
        # publish finds it closed and is sent again on a new one.
        while not _closed_by_peer(client):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.publish("a", 2) == first + 1


def _closed_by_peer(client: HttpClient) -> bool:
    conn = client._conn
    assert conn is not None and conn.sock is not None
    conn.sock.setblocking(False)
    try:
        return conn.sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    finally:
        conn.sock.setblocking(True)
