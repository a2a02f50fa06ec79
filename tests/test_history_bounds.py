"""``GET /api/history`` costs what it returns: at most 1,000 messages and about 1 MiB per
answer, ``"more": true`` and a ``since`` request for the rest."""

from __future__ import annotations

import http.client
import json
from typing import Any

from .support import BrokerProcess

PAGE_BYTES = 1 << 20  # the bound documented in docs/protocol.md

BLOB = "x" * 60_000


def _call(broker: BrokerProcess, method: str, target: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=20)
    headers = {"Authorization": f"Bearer {broker.token('1')}"}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, target, body=payload, headers=headers)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    return response.status, (raw, json.loads(raw))


def test_a_history_answer_is_bounded_in_bytes(broker: BrokerProcess) -> None:
    for i in range(40):  # 40 x 60 KB: 2.4 MB of history on one topic
        status, _ = _call(broker, "POST", "/api/publish", {"topic": "big", "data": [i, BLOB]})
        assert status == 200
    status, (raw, first) = _call(broker, "GET", "/api/history?topic=big&last=40")
    assert status == 200
    assert len(raw) <= PAGE_BYTES + 70_000
    assert first["more"] is True
    got = [m["data"][0] for m in first["messages"]]
    assert 0 < len(got) < 40
    while True:
        since = first["messages"][-1]["seq"]
        status, (raw, first) = _call(
            broker, "GET", f"/api/history?topic=big&since={since}&epoch={first['epoch']}"
        )
        assert status == 200 and len(raw) <= PAGE_BYTES + 70_000
        got += [m["data"][0] for m in first["messages"]]
        if not first["more"]:
            break
        assert len(got) < 40
    assert got == list(range(40))


def test_small_messages_still_come_a_thousand_at_a_time(broker: BrokerProcess) -> None:
    status, _ = _call(
        broker, "POST", "/api/publish", {"topics": [f"s/{i}" for i in range(100)], "data": 1}
    )
    assert status == 200
    for _ in range(10):
        _call(broker, "POST", "/api/publish", {"topics": [f"s/{i}" for i in range(100)], "data": 2})
    status, (_, answer) = _call(broker, "GET", "/api/history?topic=s/%23&since=0")
    assert status == 200
    assert len(answer["messages"]) == 1000 and answer["more"] is True
