"""Plain HTTP/1.1 requests read by ``broker.server.http11`` (httptools) and the responses it
writes: what is read, what is refused and with which status, how pipelined bytes wait,
and the same seen from a client of a running broker."""

from __future__ import annotations

import socket
import time

import pytest

from broker.server.http11 import MAX_HEAD, SLICE, HttpRequest, RequestReader, response

from .support import BrokerProcess


def read_all(reader: RequestReader) -> list[HttpRequest]:
    out = []
    while (request := reader.next_request()) is not None:
        out.append(request)
    return out


def test_a_request_is_read_with_lower_case_names_and_trimmed_values() -> None:
    reader = RequestReader(1000)
    reader.receive(b"POST /api/publish?x=1 HTTP/1.1\r\nHost: a \r\nX-Thing:\tB\r\n")
    assert reader.next_request() is None  # the head is not whole yet
    reader.receive(b"Content-Length: 2\r\n\r\n{}")
    [request] = read_all(reader)
    assert (request.method, request.path, request.query) == ("POST", "/api/publish", "x=1")
    assert request.headers == [(b"host", b"a"), (b"x-thing", b"B"), (b"content-length", b"2")]
    assert request.body == b"{}" and request.keep_alive and request.error is None
    assert reader.head is None  # the first head is read: nothing more is kept for websockets


def test_chunked_bodies_are_read() -> None:
    reader = RequestReader(1000)
    reader.receive(
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    [request] = read_all(reader)
    assert request.body == b"abcde"


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GET / HTTP/1.1\nHost: x\n\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * (3 * SLICE), 431),  # a head without end
        (b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 2 * SLICE) + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n" + b"a" * 1001, 413),
    ],
)
def test_malformed_or_oversized_requests_are_refused(wire: bytes, status: int) -> None:
    reader = RequestReader(1000)
    reader.head = None  # not a first request: nothing is handed to websockets
    reader.receive(wire)
    [request] = read_all(reader)
    assert request.error is not None and request.error[0] == status, request.error
    assert not request.keep_alive
    reader.receive(b"GET / HTTP/1.1\r\n\r\n")  # nothing more is read
    assert reader.next_request() is None


def test_a_head_of_the_bound_passes_in_any_feeds() -> None:
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD - 40) + b"\r\n\r\n"
    for step in (1000, SLICE - 7, len(head)):
        reader = RequestReader(1000)
        for start in range(0, len(head), step):
            reader.receive(head[start : start + step])
        [request] = read_all(reader)
        assert request.error is None


def test_pipelined_requests_wait_as_bytes_until_taken() -> None:
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    reader = RequestReader(1000)
    reader.receive(one * 5000)  # 170 KB in one read
    first = reader.next_request()
    assert first is not None
    # Only the first slice was parsed: the rest is still bytes.
    assert reader.buffered() > len(one) * 5000 - 2 * SLICE
    assert len(read_all(reader)) == 4999 and reader.buffered() == 0


def test_a_request_that_closes_is_the_last() -> None:
    reader = RequestReader(1000)
    reader.receive(b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    [request] = read_all(reader)
    assert request.path == "/a" and not request.keep_alive
    reader = RequestReader(1000)
    reader.receive(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n")
    [request] = read_all(reader)
    assert not request.keep_alive


@pytest.mark.parametrize(
    "first",
    [
        b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ws?x=1 HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ],
)
def test_a_first_request_for_a_websocket_goes_to_websockets_whole(first: bytes) -> None:
    reader = RequestReader(1000)
    reader.receive(first + b"\x81\x80")
    assert reader.next_request() is None
    assert reader.upgrade and reader.head == first + b"\x81\x80"


def test_a_later_upgrade_request_is_answered_as_the_last() -> None:
    reader = RequestReader(1000)
    reader.receive(b"GET /a HTTP/1.1\r\n\r\n")
    assert read_all(reader)[0].keep_alive
    reader.receive(
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"GET /b HTTP/1.1\r\n\r\n"
    )
    [request] = read_all(reader)
    assert request.path == "/ws" and not request.keep_alive and not reader.upgrade


def test_a_response_is_written_from_the_template() -> None:
    body = b'{"seq":1}'
    out = response(200, "broker/1", [("Content-Type", "application/json")], body)
    assert out == (
        b"HTTP/1.1 200 OK\r\nServer: broker/1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 9\r\n\r\n" + body
    )
    out = response(404, "b", [], b"nope", head_only=True, close=True)
    assert out == (
        b"HTTP/1.1 404 Not Found\r\nServer: b\r\nContent-Length: 4\r\nConnection: close\r\n\r\n"
    )
    assert response(599, "b", [], b"").startswith(b"HTTP/1.1 599 \r\n")


def _exchange(port: int, wire: bytes) -> bytes:
    """Send ``wire``, read until the broker closes (bounded)."""
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(wire)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return bytes(got)


def test_a_broker_answers_an_endless_head_with_431_and_closes(broker: BrokerProcess) -> None:
    answer = _exchange(broker.port, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (3 * SLICE))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert b"Connection: close" in answer


def test_a_broker_answers_a_later_upgrade_then_closes(broker: BrokerProcess) -> None:
    answer = _exchange(
        broker.port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 426 " in answer
