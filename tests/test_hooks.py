"""Hooks to the application's backend (section 12) against a real backend process.

The backend is examples/hooks/app.py (tests/hooks_support.py): it logs users in with a
cookie, refuses publishes with "spam", rewrites "darn" as "d**n", answers "slowpoke"
after 5 s (the brokers here wait 1 s), keeps ``chat/staff`` for ``admin`` and appends the
events it receives to a file. Brokers are real ``broker serve`` processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from .hooks_support import Backend, Reply, hooked_broker, request
from .support import BrokerProcess, Peer, async_wait_for


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    app = Backend(tmp_path / "app").start()
    yield app
    app.kill()


@pytest.fixture
def broker(tmp_path: Path, backend: Backend) -> Iterator[BrokerProcess]:
    proc = hooked_broker(tmp_path / "broker", backend)
    yield proc
    proc.kill()


def api_publish(broker: BrokerProcess, token: str, body: dict[str, object]) -> Reply:
    return request(
        "POST",
        f"{broker.http_url}/api/publish",
        json_body=body,
        headers={"Authorization": f"Bearer {token}"},
    )


@pytest.mark.slow
async def test_refusal_rewrite_and_timeout_of_a_websocket_publish(
    broker: BrokerProcess,
) -> None:
    alice = await Peer.open(broker.url, broker.token("alice"))
    bob = await Peer.open(broker.url, broker.token("bob"))
    assert (await bob.request("sub", topic="chat/lobby"))["op"] == "ok"

    refused = await alice.request("pub", topic="chat/lobby", data="buy spam now")
    assert refused["code"] == "forbidden" and refused["message"] == "no spam, please"
    rewritten = await alice.request("pub", topic="chat/lobby", data="darn it")
    assert rewritten["op"] == "ok"
    late = await alice.request("pub", topic="chat/lobby", data="slowpoke")
    assert late["code"] == "unavailable"

    got = await bob.recv()
    assert got["op"] == "msg" and got["data"] == "d**n it" and got["seq"] == rewritten["seq"]
    await bob.expect_nothing()  # neither the refused nor the late one was delivered
    replay = await Peer.open(broker.url, broker.token("carol"))
    await replay.request("sub", topic="chat/lobby", last=10)
    assert (await replay.recv())["data"] == "d**n it"  # stored as rewritten
    await replay.expect_nothing()
    for peer in (alice, bob, replay):
        await peer.close()


@pytest.mark.slow
async def test_refusal_rewrite_and_timeout_of_an_http_publish(broker: BrokerProcess) -> None:
    token = broker.token("alice")
    refused = api_publish(broker, token, {"topic": "chat/lobby", "data": "spam"})
    assert refused.status == 403
    assert refused.json()["error"]["message"] == "no spam, please"
    ok = api_publish(broker, token, {"topics": ["chat/x/a", "chat/x/b"], "data": {"t": "darn"}})
    assert ok.status == 200
    late = api_publish(broker, token, {"topic": "chat/lobby", "data": "slowpoke"})
    assert late.status == 503 and late.json()["error"]["code"] == "unavailable"
    history = request(
        "GET",
        f"{broker.http_url}/api/history",
        params={"topic": "chat/x/#", "last": "10"},
        headers={"Authorization": f"Bearer {token}"},
    ).json()
    assert "messages" in history, history
    assert [(m["topic"], m["data"]) for m in history["messages"]] == [
        ("chat/x/a", {"t": "d**n"}),
        ("chat/x/b", {"t": "d**n"}),
    ]
    # A topic no namespace selects asks nothing: "spam" passes.
    assert api_publish(broker, token, {"topic": "news", "data": "spam"}).status == 200


async def test_a_recorded_key_is_a_duplicate_without_asking_the_hook(
    broker: BrokerProcess,
) -> None:
    alice = await Peer.open(broker.url, broker.token("alice"))
    first = await alice.request("pub", topic="chat/lobby", data="darn", key="k-1")
    assert first["op"] == "ok"
    # The hook would refuse "spam": it is not asked, the key answers.
    again = await alice.request("pub", topic="chat/lobby", data="spam", key="k-1")
    assert again == {"op": "ok", "id": again["id"], "seq": first["seq"], "duplicate": True}
    token = broker.token("alice")
    http = api_publish(broker, token, {"topic": "chat/lobby", "data": "spam", "key": "k-1"})
    assert http.json() == {"seq": first["seq"], "duplicate": True}
    await alice.close()


async def test_a_subscription_the_backend_refuses(broker: BrokerProcess) -> None:
    bob = await Peer.open(broker.url, broker.token("bob"))
    refused = await bob.request("sub", topic="chat/staff")
    assert refused["code"] == "forbidden" and refused["message"] == "staff only"
    wide = await bob.request("sub", topic="chat/#")  # can match chat/staff: asked too
    assert wide["code"] == "forbidden"
    assert (await bob.request("sub", topic="chat/lobby"))["op"] == "ok"
    admin = await Peer.open(broker.url, broker.token("admin"))
    assert (await admin.request("sub", topic="chat/staff"))["op"] == "ok"
    headers = {"Authorization": f"Bearer {broker.token('bob')}"}
    history = request(
        "GET", f"{broker.http_url}/api/history", params={"topic": "chat/staff"}, headers=headers
    )
    assert history.status == 403
    stream = request(
        "GET", f"{broker.http_url}/sse", params={"topic": "chat/staff"}, headers=headers
    )
    assert stream.status == 403 and stream.json()["error"]["message"] == "staff only"
    await bob.close()
    await admin.close()


@pytest.mark.slow
async def test_the_connect_hook_makes_a_cookie_the_user(
    broker: BrokerProcess, backend: Backend
) -> None:
    from websockets.asyncio.client import connect

    cookie = backend.login("Alice")
    ws = await connect(broker.url, additional_headers={"Cookie": f"session={cookie}"})
    peer = Peer(ws)
    hello = await peer.recv()  # no auth frame: the hook answered at the upgrade
    assert hello["op"] == "hello" and hello["user"] == {"id": "alice", "name": "Alice"}
    # The hook's ACL applies: chat/# only.
    assert (await peer.request("pub", topic="news", data=1))["code"] == "forbidden"
    await peer.close()
    # Without a session the hook admits nothing: the first frame must be auth.
    stranger = await Peer.open(broker.url)
    await stranger.send({"op": "sub", "id": 1, "topic": "chat/lobby"})
    assert (await stranger.recv())["code"] == "unauthorized"

    stream = request(
        "GET",
        f"{broker.http_url}/sse",
        params={"topic": "chat/lobby"},
        headers={"Cookie": f"session={cookie}"},
    )
    assert stream.status == 200 and b"event: ready" in stream.body
    refused = request("GET", f"{broker.http_url}/sse", params={"topic": "chat/lobby"})
    assert refused.status == 401
    assert refused.json()["error"]["message"] == "not logged in"

    def alice(kind: str) -> list[dict[str, object]]:
        return [e for e in backend.events() if e["type"] == kind and e["user"]["id"] == "alice"]

    # The WebSocket and the stream: a connect and a disconnect each (a stream ends 1000).
    # A stream whose client went is noticed at the latest by its next keep-alive comment.
    await async_wait_for(lambda: len(alice("disconnect")) == 2, timeout=30)
    assert len(alice("connect")) == 2
    assert [e["code"] for e in alice("disconnect")] == [1000, 1000]


@pytest.mark.slow
async def test_a_slow_backend_stalls_only_the_connection_that_waits(
    broker: BrokerProcess,
) -> None:
    slow = await Peer.open(broker.url, broker.token("alice"))
    other = await Peer.open(broker.url, broker.token("bob"))
    await slow.send({"op": "pub", "id": 1, "topic": "chat/lobby", "data": "slowpoke"})
    # Published while alice's publish waits for the backend: answered first.
    quick = await other.request("pub", topic="news", data=1)
    assert quick["op"] == "ok"
    checked = await other.request("pub", topic="chat/lobby", data="hello")
    assert checked["op"] == "ok"
    assert (await slow.recv())["code"] == "unavailable"
    metrics = request("GET", f"{broker.http_url}/metrics").body.decode()
    assert 'broker_hook_calls_total{hook="publish"} 2.0' in metrics
    assert 'broker_hook_failures_total{hook="publish"} 1.0' in metrics
    assert 'broker_hook_seconds_count{hook="publish"} 2.0' in metrics
    await slow.close()
    await other.close()


def _per_user(events: list[dict[str, object]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for event in events:
        user = event["user"]
        assert isinstance(user, dict)
        out.setdefault(str(user["id"]), []).append(str(event["type"]))
    return out


@pytest.mark.slow
async def test_events_survive_a_backend_restart_in_order(
    broker: BrokerProcess, backend: Backend
) -> None:
    # "room" asks no subscribe hook: subscriptions go on while the backend is down.
    first = await Peer.open(broker.url, broker.token("u0"))
    await first.request("sub", topic="room")
    await first.close()
    await async_wait_for(lambda: len(backend.events()) == 4, timeout=10)
    backend.kill()
    for i in range(1, 6):  # while the backend is down
        peer = await Peer.open(broker.url, broker.token(f"u{i}"))
        assert (await peer.request("sub", topic="room"))["op"] == "ok"
        await peer.close()
    await asyncio.sleep(0.5)  # a few failed attempts
    backend.start()
    await async_wait_for(lambda: len(backend.events()) >= 24, timeout=20)
    events = backend.events()
    per_user = _per_user(events)
    assert per_user == {f"u{i}": ["connect", "join", "leave", "disconnect"] for i in range(6)}, (
        per_user
    )
    stamps = [int(str(e["ts"])) for e in events]
    assert stamps == sorted(stamps)
    assert all(e["topic"] == "room" for e in events if e["type"] in ("join", "leave"))
    assert {e["code"] for e in events if e["type"] == "disconnect"} == {1000}


@pytest.mark.slow
async def test_cluster_nodes_send_each_join_and_leave_once(
    tmp_path: Path, backend: Backend, redis_server: object
) -> None:
    from .support import RedisServer

    assert isinstance(redis_server, RedisServer)
    redis_server.ensure_running()
    redis_server.flush()
    nodes = [hooked_broker(tmp_path / f"n{i}", backend, cluster=redis_server.url) for i in range(2)]
    try:
        peers = []
        for node in nodes:  # alice on both nodes, in the same room
            peer = await Peer.open(node.url, node.token("alice"))
            await peer.request("sub", topic="chat/room")
            peers.append(peer)
        # Both subscriptions counted cluster-wide before either goes.
        for _ in range(100):
            users = (await peers[0].request("presence", topic="chat/room"))["users"]
            if users and users[0]["connections"] == 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"presence never showed both connections: {users}")
        for peer in peers:
            await peer.close()
        await async_wait_for(lambda: len(backend.events()) >= 6, timeout=10)
        await asyncio.sleep(1.0)  # time for a second join or leave, were one sent
        kinds = [e["type"] for e in backend.events()]
        assert sorted(kinds) == sorted(["connect"] * 2 + ["join", "leave"] + ["disconnect"] * 2), (
            backend.events()
        )
        assert kinds.index("join") < kinds.index("leave")
    finally:
        for node in nodes:
            node.kill()


def test_a_misconfigured_hook_is_refused_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .support import ROOT, isolated_env

    cases = {
        '[hooks]\npublish = "ftp://x"\nsecret = "s"\n': "publish must be an http:// or https://",
        '[hooks]\npublish = "http://x/p"\n': "'secret' (the HMAC key) is missing",
        '[hooks]\nsecret = "s"\n[[namespace]]\npattern = "a/#"\npublish_hook = true\n': (
            "namespace 'a/#' sets publish_hook, but [hooks] has no publish URL"
        ),
    }
    for text, message in cases.items():
        path = tmp_path / "broker.toml"
        path.write_text(text)
        done = subprocess.run(
            [sys.executable, "-m", "broker.cli", "serve", "--memory", "--config", str(path)],
            cwd=ROOT,
            env=isolated_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], done.stderr


def test_print_config_redacts_the_secret(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .support import ROOT, isolated_env

    path = tmp_path / "broker.toml"
    path.write_text('[hooks]\nevents = "http://127.0.0.1:9/e"\nsecret = "very-secret"\n')
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--memory", "--config", str(path)]
        + ["--print-config"],
        cwd=ROOT,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert 'events = "http://127.0.0.1:9/e"' in done.stdout
    assert "very-secret" not in done.stdout and 'secret = "<redacted>"' in done.stdout


async def test_an_events_overflow_is_counted_and_logged_once(tmp_path: Path) -> None:
    down = Backend(tmp_path / "app")  # never started: nothing listens on its port
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[hooks]\nevents = "{down.url}/broker/events"\nsecret = "s"\nevents_queue = 2\n'
    )
    broker = BrokerProcess(tmp_path / "b", "--config", str(config), memory=True).start()
    try:
        for i in range(5):  # 10 events: 2 fit
            peer = await Peer.open_with_header(broker.url, broker.token(f"u{i}"))
            await peer.recv()
            await peer.close()

        def dropped() -> float:
            text = request("GET", f"{broker.http_url}/metrics").body.decode()
            line = next(x for x in text.splitlines() if x.startswith("broker_hook_events_dropped"))
            return float(line.split()[-1])

        await async_wait_for(lambda: dropped() == 8, timeout=10)
        metrics = request("GET", f"{broker.http_url}/metrics").body.decode()
        assert "broker_hook_events_queued 2.0" in metrics
        assert broker.log().count("hook events queue full") == 1
    finally:
        broker.kill()


async def test_publishes_of_one_connection_are_recorded_in_the_order_sent(
    broker: BrokerProcess,
) -> None:
    alice = await Peer.open(broker.url, broker.token("alice"))
    sent = ["one", "darn", "spam", "two", "three"]
    topics = ["chat/a", "chat/a", "chat/a", "news", "chat/b"]  # news asks no hook
    for i, (topic, data) in enumerate(zip(topics, sent)):
        await alice.send({"op": "pub", "id": i, "topic": topic, "data": data})
    await alice.send({"op": "sub", "id": "s", "topic": "chat/a", "last": 10})
    got = [await alice.recv() for _ in range(6)]
    # The sub, sent last, is answered after every publish before it (a refusal may come
    # before the oks of earlier publishes: those wait to be recorded, as without hooks).
    assert got[-1]["id"] == "s"
    replies = {r["id"]: r for r in got}
    assert replies[2]["code"] == "forbidden"
    seqs = [replies[i]["seq"] for i in (0, 1, 3, 4)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4  # recorded in the order sent
    replayed = [(await alice.recv())["data"] for _ in range(2)]
    assert replayed == ["one", "d**n"]
    await alice.close()


@pytest.mark.slow
async def test_calls_past_the_bounds_are_unavailable_at_once(
    tmp_path: Path, backend: Backend
) -> None:
    broker = hooked_broker(
        tmp_path / "b",
        backend,
        hooks=("connect", "publish"),  # no events: the one slot is the publishes'
        timeout="3s",
        extra="concurrency = 1\nqueue = 0",
    )
    try:
        slow = await Peer.open(broker.url, broker.token("alice"))
        await slow.send({"op": "pub", "id": 1, "topic": "chat/a", "data": "slowpoke"})
        await asyncio.sleep(0.3)  # its call holds the one slot for 3 s
        other = await Peer.open_with_header(broker.url, broker.token("bob"))
        await other.recv()
        refused = await other.request("pub", topic="chat/a", data="hi")
        assert refused["code"] == "unavailable" and "too many calls" in refused["message"], refused
        late = await slow.recv()
        assert late["code"] == "unavailable" and "in time" in late["message"], late
        await slow.close()
        await other.close()
    finally:
        broker.kill()


async def test_a_stream_the_backend_does_not_know_is_anonymous_on_public_topics(
    tmp_path: Path, backend: Backend
) -> None:
    broker = hooked_broker(tmp_path / "b", backend, public="news/#")
    try:
        public = request("GET", f"{broker.http_url}/sse", params={"topic": "news/x"})
        assert public.status == 200  # the hook said 401; public patterns cover it
        private = request("GET", f"{broker.http_url}/sse", params={"topic": "chat/lobby"})
        assert private.status == 401 and private.json()["error"]["message"] == "not logged in"
        # A WebSocket the backend does not know may still ask to be anonymous.
        peer = await Peer.open(broker.url)
        await peer.send({"op": "auth"})
        assert (await peer.recv())["anonymous"] is True
        await peer.close()
    finally:
        broker.kill()
