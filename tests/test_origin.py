"""The Origin check on WebSocket upgrades (``--allowed-origin``), against a real broker."""

from __future__ import annotations

import asyncio

import orjson
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.typing import Origin

from .support import (
    Peer,
    http_get,
    refusal,
)


async def test_allowed_origins(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(
        "--allowed-origin",
        "http://good.example",
        "--allowed-origin",
        "https://also.example:8443",
        memory=True,
    )
    token = broker.token("1")
    for origin in [
        "http://evil.example",
        "null",
        "http://good.example.evil.example",
        "http://good.example:8080",
        "https://good.example",
        "https://also.example",
        "http://evil.example/http://good.example",
    ]:
        status, body = await refusal(
            broker.url, {"Authorization": f"Bearer {token}"}, origin=Origin(origin)
        )
        assert status == 403 and body.strip(), (origin, status, body)
        # Origin is checked before authentication, with or without a token.
        status, _ = await refusal(broker.url, {}, origin=Origin(origin))
        assert status == 403, origin
    for good in ["http://good.example", "https://also.example:8443", None]:
        allowed = Origin(good) if good is not None else None
        ws = await connect(
            broker.url, additional_headers={"Authorization": f"Bearer {token}"}, origin=allowed
        )
        assert orjson.loads(await ws.recv())["op"] == "hello"
        await ws.close()
        peer = Peer(await connect(broker.url, origin=allowed))  # first-frame auth
        await peer.send({"op": "auth", "token": token})
        assert (await peer.recv())["op"] == "hello"
        await peer.close()
    # Plain HTTP paths are not WebSocket upgrades: unaffected.
    assert await asyncio.to_thread(http_get, broker.http_url + "/healthz") == (200, b"ok")


async def test_duplicate_origin_headers_are_403(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker("--allowed-origin", "http://good.example", memory=True)
    headers = Headers([("Origin", "http://good.example"), ("Origin", "http://evil.example")])
    status, _ = await refusal(broker.url, headers)
    assert status == 403
