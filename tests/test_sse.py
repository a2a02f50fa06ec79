"""Server-sent event streams at ``GET /sse`` (section 11 of docs/protocol.md), against real
brokers over real sockets: refusals before the stream, the ``ready`` event, ids and
``Last-Event-ID`` resume, one merged replay, inbox privacy, limits, shutdown, and the
clients that only speak HTTP (``curl -N``, Node's ``fetch``); on one node and across two
cluster nodes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.core.sse import parse_last_event_id, parse_stream
from broker.errors import BadRequest

from .support import BrokerProcess, Peer, RedisServer, async_wait_for, public_broker


@dataclass
class Event:
    """One server-sent event as a client parses it."""

    name: str = "message"
    id: str | None = None
    data: str = ""
    retry: int | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Stream:
    """A raw HTTP client reading one ``GET /sse`` response."""

    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    comments: list[str] = field(default_factory=list)

    async def event(self, timeout: float = 5.0) -> Event:
        """The next event (comment lines are kept in ``comments``)."""
        event = Event()
        seen = False
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), timeout)).decode()
            if not line:
                raise EOFError("the stream ended")
            line = line.rstrip("\n")
            if not line:
                if seen:
                    return event
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(": ")
            seen = True
            if name == "event":
                event.name = value
            elif name == "id":
                event.id = value
            elif name == "data":
                event.data = value
            elif name == "retry":
                event.retry = int(value)

    async def ended(self, timeout: float = 10.0) -> bool:
        """Read until the server closes; True when it did within ``timeout``."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except TimeoutError:
            return False
        return True

    async def body(self) -> Any:
        return json.loads(await asyncio.wait_for(self.reader.read(), 5))

    def close(self) -> None:
        self.writer.close()


async def open_stream(
    broker: BrokerProcess, query: dict[str, Any] | str, headers: dict[str, str] | None = None
) -> Stream:
    text = query if isinstance(query, str) else urllib.parse.urlencode(query, doseq=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    lines = [f"GET /sse?{text} HTTP/1.1", f"Host: 127.0.0.1:{broker.port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    status_line = (await asyncio.wait_for(reader.readline(), 5)).decode()
    status = int(status_line.split()[1])
    got: dict[str, str] = {}
    while True:
        line = (await asyncio.wait_for(reader.readline(), 5)).decode().rstrip("\r\n")
        if not line:
            break
        name, _, value = line.partition(":")
        got[name.strip().lower()] = value.strip()
    return Stream(status, got, reader, writer)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def publish(peer: Peer, topic: str, data: Any) -> int:
    reply = await peer.request("pub", topic=topic, data=data)
    assert reply["op"] == "ok", reply
    return int(reply["seq"])


def test_the_query_and_last_event_id() -> None:
    ask = parse_stream("topic=a%2F%23&topic=b&last=5", None, 10)
    assert ask.patterns == ("a/#", "b") and ask.last == 5 and ask.replays
    resumed = parse_stream("topic=a&latest=true", "e1:42", 10)
    assert (resumed.since, resumed.epoch, resumed.latest, resumed.resumed) == (
        42,
        "e1",
        False,
        True,
    )
    assert not parse_stream("topic=a&latest=0", None, 10).replays
    assert parse_last_event_id("ab:cd:7") == ("ab:cd", 7)
    for query in (
        "",
        "topic=a%2B",
        "topic=a&last=1&since=2",
        "topic=a&latest=yes",
        "topic=a&last=-1",
    ):
        with pytest.raises(BadRequest):
            parse_stream(query, None, 10)
    with pytest.raises(BadRequest, match="at most 2"):
        parse_stream("topic=a&topic=b&topic=c", None, 2)
    for bad in ("7", "e:", ":7", "e:x"):
        with pytest.raises(BadRequest):
            parse_last_event_id(bad)


async def test_refusals_come_before_the_stream(make_broker: Any, tmp_path: Path) -> None:
    broker: BrokerProcess = make_broker()
    token = broker.token("alice")
    cases: list[tuple[dict[str, Any], dict[str, str], int, str]] = [
        ({}, auth(token), 400, "bad_request"),
        ({"topic": "a/#/b"}, auth(token), 400, "bad_request"),
        ({"topic": "a", "last": 1, "latest": "true"}, auth(token), 400, "bad_request"),
        ({"topic": "a"}, {}, 401, "unauthorized"),
        ({"topic": "a"}, auth("not-a-token"), 401, "unauthorized"),
        ({"topic": "a", "token": "bad"}, {}, 401, "unauthorized"),
        ({"topic": "user/bob"}, auth(token), 403, "forbidden"),
        ({"topic": "a"}, {**auth(token), "Origin": "https://evil.example"}, 200, ""),
    ]
    for query, headers, status, code in cases:
        stream = await open_stream(broker, query, headers)
        assert stream.status == status, (query, stream.status)
        if code:
            assert stream.headers["content-type"] == "application/json"
            assert (await stream.body())["error"]["code"] == code
        stream.close()
    acl = broker.token("carol", sub=["scores/#"])
    stream = await open_stream(broker, {"topic": "chat"}, auth(acl))
    assert stream.status == 403
    stream.close()


async def test_an_origin_not_allowed_is_refused(make_broker: Any) -> None:
    broker: BrokerProcess = make_broker("--allowed-origin", "https://app.example")
    token = broker.token("a")
    stream = await open_stream(
        broker, {"topic": "a"}, {**auth(token), "Origin": "https://x.example"}
    )
    assert stream.status == 403
    stream.close()
    stream = await open_stream(
        broker, {"topic": "a"}, {**auth(token), "Origin": "https://app.example"}
    )
    assert stream.status == 200
    assert stream.headers["access-control-allow-origin"] == "https://app.example"
    stream.close()


async def test_a_stream_opens_with_ready_then_messages(broker: BrokerProcess) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    before = await publish(pub, "scores/a", 1)
    stream = await open_stream(broker, {"topic": "scores/#"}, auth(broker.token("alice")))
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    ready = await stream.event()
    assert ready.name == "ready" and ready.retry is not None
    epoch = ready.json["epoch"]
    assert ready.json == {"seq": before, "epoch": epoch, "recovered": True}
    assert ready.id == f"{epoch}:{before}"  # no replay asked: resume from here
    seq = await publish(pub, "scores/b", {"home": 2})
    await publish(pub, "chat", "not for this stream")
    seq2 = await publish(pub, "scores/a", 3)
    first, second = await stream.event(), await stream.event()
    assert (first.name, first.id) == ("message", f"{epoch}:{seq}")
    assert first.json == {
        "topic": "scores/b",
        "seq": seq,
        "data": {"home": 2},
        "from": {"id": "p", "name": "p"},
        "ts": first.json["ts"],
    }
    assert second.id == f"{epoch}:{seq2}"
    stream.close()


async def test_one_replay_over_all_patterns_without_duplicates(broker: BrokerProcess) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    seqs = [await publish(pub, t, i) for i, t in enumerate(["a/1", "b/1", "a/2", "c", "b/2"])]
    token = broker.token("r")
    query = {"topic": ["a/#", "a/+", "b/#"], "last": 3}
    stream = await open_stream(broker, query, auth(token))
    ready = await stream.event()
    assert ready.id is None  # a replay was asked for: its messages carry the ids
    got = [(await stream.event()).json["seq"] for _ in range(3)]
    assert got == [seqs[1], seqs[2], seqs[4]]
    stream.close()
    stream = await open_stream(
        broker, {"topic": ["a/#", "a/+", "b/#"], "since": seqs[0]}, auth(token)
    )
    await stream.event()
    got = [(await stream.event()).json["seq"] for _ in range(3)]
    assert got == [seqs[1], seqs[2], seqs[4]]
    live = await publish(pub, "a/3", "live")
    assert (await stream.event()).json["seq"] == live
    stream.close()
    stream = await open_stream(broker, {"topic": ["a/#", "b/#"], "latest": "true"}, auth(token))
    await stream.event()
    got = [(await stream.event()).json["topic"] for _ in range(5)]
    assert got == ["a/1", "b/1", "a/2", "b/2", "a/3"]  # each topic's latest, in seq order
    stream.close()


async def test_last_event_id_resumes_and_wins_over_the_query(broker: BrokerProcess) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    token = broker.token("r")
    stream = await open_stream(broker, {"topic": "t/#", "latest": "true"}, auth(token))
    epoch = (await stream.event()).json["epoch"]
    first = await publish(pub, "t/a", 1)
    assert (await stream.event()).id == f"{epoch}:{first}"
    stream.close()  # dropped; meanwhile two more
    missed = [await publish(pub, "t/a", 2), await publish(pub, "t/b", 3)]
    again = await open_stream(
        broker,
        {"topic": "t/#", "latest": "true"},
        {**auth(token), "Last-Event-ID": f"{epoch}:{first}"},
    )
    ready = await again.event()
    assert ready.json["recovered"] is True and ready.id is None
    assert [(await again.event()).json["seq"] for _ in range(2)] == missed
    again.close()
    other = await open_stream(broker, {"topic": "t/#"}, {**auth(token), "Last-Event-ID": "old:1"})
    ready = await other.event()
    assert ready.json["recovered"] is False  # another history: everything it holds
    assert [(await other.event()).json["seq"] for _ in range(3)] == [first, *missed]
    other.close()
    bad = await open_stream(broker, {"topic": "t/#"}, {**auth(token), "Last-Event-ID": "junk"})
    assert bad.status == 400
    bad.close()


async def test_inbox_privacy_on_a_stream(broker: BrokerProcess) -> None:
    pub = await Peer.open(broker.url, broker.token("p"))
    await publish(pub, "user/bob/note", "bob's")
    mine = await publish(pub, "user/alice/note", "alice's")
    stream = await open_stream(
        broker, {"topic": "user/+/note", "last": 10}, auth(broker.token("alice"))
    )
    await stream.event()
    assert (await stream.event()).json["seq"] == mine
    await publish(pub, "user/bob/note", "bob's again")
    live = await publish(pub, "user/alice/note", "alice's again")
    assert (await stream.event()).json["seq"] == live
    stream.close()


@pytest.mark.slow
async def test_token_parameter_and_expiry_end_the_stream(broker: BrokerProcess) -> None:
    token = broker.token("alice", ttl=2)
    stream = await open_stream(broker, {"topic": "a", "token": token}, {})
    assert stream.status == 200
    assert (await stream.event()).name == "ready"
    assert await stream.ended(timeout=10)


async def test_anonymous_streams_read_public_topics_within_their_caps(
    make_broker: Any, tmp_path: Path
) -> None:
    broker = public_broker(make_broker, tmp_path, "--max-anonymous", "1")
    pub = await Peer.open(broker.url, broker.token("p"))
    stream = await open_stream(broker, {"topic": "scores/+"})
    assert stream.status == 200
    await stream.event()
    refused = await open_stream(broker, {"topic": "scores/+"})
    assert refused.status == 503 and (await refused.body())["error"]["code"] == "unavailable"
    forbidden = await open_stream(broker, {"topic": "chat"})
    assert forbidden.status == 403
    seq = await publish(pub, "scores/x", 1)
    assert (await stream.event()).json["seq"] == seq
    with urllib.request.urlopen(f"{broker.http_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert "broker_sse_streams 1.0" in text and "broker_anonymous_connections 1.0" in text
    stream.close()


async def test_streams_count_in_the_connection_limit(make_broker: Any) -> None:
    broker: BrokerProcess = make_broker("--max-connections", "2")
    token = broker.token("a")
    streams = [await open_stream(broker, {"topic": "a"}, auth(token)) for _ in range(2)]
    assert [s.status for s in streams] == [200, 200]
    third = await open_stream(broker, {"topic": "a"}, auth(token))
    assert third.status == 503
    for s in streams:
        s.close()


async def test_a_stream_that_does_not_read_is_closed_as_a_slow_consumer(make_broker: Any) -> None:
    broker: BrokerProcess = make_broker("--max-queue", "64KiB")
    stream = await open_stream(broker, {"topic": "flood"}, auth(broker.token("slow")))
    await stream.event()
    pub = await Peer.open(broker.url, broker.token("p"))
    big = "x" * 30_000
    for i in range(400):  # 12 MB, far past what the socket buffers hold
        await pub.send({"op": "pub", "topic": "flood", "data": big, "id": i})

    def closed() -> bool:
        with urllib.request.urlopen(f"{broker.http_url}/metrics", timeout=5) as response:
            return "broker_slow_consumer_closes_total 1.0" in response.read().decode()

    await async_wait_for(closed, timeout=20)
    stream.close()


@pytest.mark.process
async def test_shutdown_ends_streams_cleanly(make_broker: Any) -> None:
    broker: BrokerProcess = make_broker()
    stream = await open_stream(broker, {"topic": "a"}, auth(broker.token("a")))
    await stream.event()
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGTERM)
    assert await stream.ended(timeout=15)
    assert broker.proc.wait(timeout=15) == 0


@pytest.mark.slow
async def test_a_quiet_stream_gets_comment_lines(broker: BrokerProcess) -> None:
    stream = await open_stream(broker, {"topic": "quiet"}, auth(broker.token("a")))
    await stream.event()

    async def comment() -> str:
        while True:
            line = (await stream.reader.readline()).decode()
            assert line and not line.startswith(("data:", "id:")), line
            if line.startswith(":"):
                return line

    assert (await asyncio.wait_for(comment(), 15)).startswith(": ")  # within 15 s
    stream.close()


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} is required in CI")
        pytest.skip(f"{binary} is not installed")
    return path


@pytest.mark.slow
async def test_curl_reads_a_stream(make_broker: Any, tmp_path: Path) -> None:
    curl = _require("curl")
    broker = public_broker(make_broker, tmp_path)
    pub = await Peer.open(broker.url, broker.token("p"))
    await publish(pub, "scores/a", "1-0")
    proc = subprocess.Popen(
        [curl, "-sN", "--max-time", "20", f"{broker.http_url}/sse?topic=scores/%23&latest=true"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        await asyncio.sleep(0)  # (the stream is read below, line by line)
        lines: list[str] = []
        seq = None
        loop = asyncio.get_running_loop()
        while len([line for line in lines if line.startswith("data:")]) < 3:
            line = (
                await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 10)
            ).decode()
            assert line, "curl's stream ended early"
            lines.append(line.rstrip("\n"))
            if line.startswith("data:") and seq is None and "ready" in lines[-2]:
                seq = await publish(pub, "scores/b", "0-1")
        datas = [json.loads(line[6:]) for line in lines if line.startswith("data:")]
        assert datas[1]["data"] == "1-0" and datas[2]["seq"] == seq
    finally:
        proc.kill()
        proc.wait(timeout=5)


NODE_READER = """
const [url, want] = process.argv.slice(2);
const response = await fetch(url);
const decoder = new TextDecoder();
let text = "";
const seen = [];
for await (const chunk of response.body) {
  text += decoder.decode(chunk, { stream: true });
  let end;
  while ((end = text.indexOf("\\n\\n")) >= 0) {
    const block = text.slice(0, end);
    text = text.slice(end + 2);
    const data = block.split("\\n").find((l) => l.startsWith("data: "));
    const name = block.split("\\n").find((l) => l.startsWith("event: "));
    if (data && !name) seen.push(JSON.parse(data.slice(6)).data);
    if (name) console.log("READY " + response.headers.get("content-type"));
  }
  if (seen.length >= Number(want)) break;
}
console.log(JSON.stringify(seen));
process.exit(0);
"""


@pytest.mark.slow
async def test_node_fetch_reads_a_stream(make_broker: Any, tmp_path: Path) -> None:
    node = _require("node")
    broker = public_broker(make_broker, tmp_path)
    pub = await Peer.open(broker.url, broker.token("p"))
    await publish(pub, "scores/a", "kept")
    script = tmp_path / "reader.mjs"
    script.write_text(NODE_READER)
    proc = await asyncio.create_subprocess_exec(
        node, str(script), f"{broker.http_url}/sse?topic=scores/%23&last=1", "2",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert ready.decode().strip() == "READY text/event-stream"
        await publish(pub, "scores/a", "live")
        out = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert json.loads(out) == ["kept", "live"]
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.slow
@pytest.mark.redis
async def test_streams_across_two_cluster_nodes(redis_server: RedisServer, tmp_path: Path) -> None:
    from .test_cluster import Node

    redis_server.ensure_running()
    redis_server.flush()
    a = Node(tmp_path / "a", redis_server.url).start()
    b = Node(tmp_path / "b", redis_server.url).start()
    try:
        pub = await Peer.open(a.url, a.token("p"))
        token = b.token("r")
        stream = await open_stream(b, {"topic": "t/#"}, auth(token))
        ready = await stream.event()
        first = await publish(pub, "t/a", 1)
        event = await stream.event()
        assert event.id == f"{ready.json['epoch']}:{first}"
        stream.close()
        missed = await publish(pub, "t/b", 2)
        # Resumed on the other node with the id the first one gave.
        again = await open_stream(a, {"topic": "t/#"}, {**auth(token), "Last-Event-ID": event.id})
        assert (await again.event()).json["recovered"] is True
        assert (await again.event()).json["seq"] == missed
        again.close()
    finally:
        a.kill()
        b.kill()
