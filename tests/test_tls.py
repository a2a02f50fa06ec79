"""``wss://`` end to end: a broker with a certificate, clients that verify it."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from .support import (
    ROOT,
    Peer,
    http_get,
    isolated_env,
    self_signed_cert,
)


@pytest.mark.slow
async def test_wss_end_to_end(make_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = self_signed_cert(tmp_path)
    broker = make_broker("--tls-cert", str(cert), "--tls-key", str(key), memory=True)
    trusting = ssl.create_default_context(cafile=str(cert))
    for host in ("127.0.0.1", "localhost"):
        url = f"wss://{host}:{broker.port}/ws"
        reader = Peer(await connect(url, ssl=trusting, open_timeout=10))
        await reader.send({"op": "auth", "token": broker.token("r")})
        assert (await reader.recv())["op"] == "hello"
        assert (await reader.request("sub", topic="secure"))["op"] == "ok"
        writer = Peer(
            await connect(
                url,
                ssl=trusting,
                additional_headers={"Authorization": f"Bearer {broker.token('w', 'W')}"},
            )
        )
        assert (await writer.recv())["op"] == "hello"
        ok = await writer.request("pub", topic="secure", data={"host": host})
        msg = await reader.recv()
        assert (msg["data"], msg["seq"], msg["from"]) == (
            {"host": host},
            ok["seq"],
            {"id": "w", "name": "W"},
        )
        assert writer.ws.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        await reader.close()
        await writer.close()
    assert await asyncio.to_thread(
        http_get, f"https://127.0.0.1:{broker.port}/healthz", trusting
    ) == (200, b"ok")

    # A client that does not trust the certificate fails, and so does a wrong host name.
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect(
            f"wss://127.0.0.1:{broker.port}/ws", ssl=ssl.create_default_context(), open_timeout=10
        )
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect(
            f"wss://127.0.0.1:{broker.port}/ws",
            ssl=trusting,
            server_hostname="evil.example",
            open_timeout=10,
        )
    # Plain ws:// to the TLS port gets no WebSocket.
    with pytest.raises((InvalidMessage, InvalidStatus, OSError, asyncio.TimeoutError)):
        ws = await connect(broker.url, open_timeout=5)
        await ws.close()

    # The CLI trusts the certificate with --ca-file, and refuses without it.
    reader = Peer(await connect(f"wss://localhost:{broker.port}/ws", ssl=trusting))
    await reader.send({"op": "auth", "token": broker.token("r")})
    await reader.recv()
    await reader.request("sub", topic="cli")
    base = [
        sys.executable,
        "-m",
        "broker.cli",
        "pub",
        "cli",
        "from-cli",
        "--url",
        f"wss://localhost:{broker.port}/ws",
        "--token",
        broker.token("cli"),
    ]
    env = isolated_env(tmp_path)
    env.pop("BROKER_CA_FILE", None)
    run = await asyncio.to_thread(
        subprocess.run,
        base + ["--ca-file", str(cert)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    msg = await reader.recv()
    assert (msg["data"], msg["from"]["id"]) == ("from-cli", "cli")
    run = await asyncio.to_thread(
        subprocess.run, base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode != 0
    await reader.expect_nothing()
