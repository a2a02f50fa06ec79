"""The Python client and the CLI on public topics: ``latest`` and anonymous connections
(``Client(anonymous=True)``, ``broker sub --latest --anonymous``), against real brokers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.client import Client
from broker.client.state import ClientState, SubState
from broker.errors import Forbidden

from .support import ROOT, BrokerProcess, Peer, isolated_env, public_broker


async def publish_scores(broker: BrokerProcess) -> list[int]:
    pub = await Peer.open(broker.url, broker.token("p"))
    seqs = []
    for topic, score in [("scores/a", "0-0"), ("scores/b", "1-0"), ("scores/a", "1-0")]:
        reply = await pub.request("pub", topic=topic, data=score)
        seqs.append(int(reply["seq"]))
    await pub.close()
    return seqs


def test_a_latest_subscription_resumes_like_a_last_one() -> None:
    state = ClientState()
    sub = SubState("scores/#", False, latest=True)
    state.subs["scores/#"] = sub
    assert sub.request(1).latest is True
    state.apply_sub_reply(sub, None, None, {"seq": 9, "epoch": "e"}, False)
    assert sub.request(2).latest is True  # nothing arrived yet: ask again on a new connection
    state.on_msg({"seq": 4, "topic": "scores/a"})
    state.on_msg({"seq": 10, "topic": "scores/b"})  # past the replay: live from here on
    resumed = sub.request(3)
    assert (resumed.latest, resumed.since) == (False, 10)


async def test_the_python_client_reads_latest_anonymously(make_broker: Any, tmp_path: Path) -> None:
    broker = public_broker(make_broker, tmp_path)
    seqs = await publish_scores(broker)
    async with Client(broker.url, anonymous=True) as client:
        assert client.user is not None and client.user.id == ""
        await client.subscribe("scores/#", latest=True)
        messages = aiter(client)
        got = [await asyncio.wait_for(anext(messages), 5) for _ in range(2)]
        assert [(m.topic, m.seq) for m in got] == [("scores/b", seqs[1]), ("scores/a", seqs[2])]
        with pytest.raises(Forbidden):
            await client.subscribe("chat")
        with pytest.raises(Forbidden):
            await client.publish("scores/a", "2-0")
    with pytest.raises(ValueError, match="exclusive"):
        await Client(broker.url, anonymous=True).subscribe("a", last=1, latest=True)


@pytest.mark.slow
def test_broker_sub_latest_anonymous(make_broker: Any, tmp_path: Path) -> None:
    broker = public_broker(make_broker, tmp_path)
    asyncio.run(publish_scores(broker))
    env = isolated_env(tmp_path)
    env["BROKER_URL"] = broker.url
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "sub", "scores/#", "--latest", "--anonymous",
         "--count", "2", "--raw", "--timeout", "10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1-0", "1-0"]
    refused = subprocess.run(
        [sys.executable, "-m", "broker.cli", "sub", "chat", "--anonymous", "--timeout", "10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode == 5, refused.stderr  # forbidden
    assert "not public" in refused.stderr
    clash = subprocess.run(
        [sys.executable, "-m", "broker.cli", "sub", "x", "--latest", "--last", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert clash.returncode == 2 and "exclusive" in clash.stderr
