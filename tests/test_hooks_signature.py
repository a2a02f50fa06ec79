"""The ``Broker-Signature`` header, the ``[hooks]`` table and the answers' meaning
(broker.core.hooks), and the example application's verifier: what the broker signs it
accepts, and a forged or stale signature it refuses, over a real socket too."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from broker.core import hooks
from broker.errors import BadRequest, Forbidden, Unavailable

from .hooks_support import APP, HOOK_SECRET, Backend, Reply, request

BODY = b'{"user":{"id":"1","name":"A"},"topic":"chat/x","data":"hi"}'
NOW = 1_800_000_000.0


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hooks_example_app", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sign_and_verify_round_trip() -> None:
    header = hooks.sign("k", BODY, NOW)
    assert header.startswith(f"t={int(NOW)},v1=") and len(header.split("v1=")[1]) == 64
    hooks.verify("k", header, BODY, NOW + 10)


@pytest.mark.parametrize(
    ("header", "body", "now", "reason"),
    [
        (None, BODY, NOW, "no Broker-Signature"),
        ("v1=abc", BODY, NOW, "malformed"),
        (hooks.sign("k", BODY, NOW), BODY, NOW + 301, "stale"),
        (hooks.sign("k", BODY, NOW), BODY, NOW - 301, "stale"),
        (hooks.sign("other", BODY, NOW), BODY, NOW, "does not match"),
        (hooks.sign("k", BODY, NOW), BODY + b" ", NOW, "does not match"),
        (
            hooks.sign("k", BODY, NOW).replace(f"t={int(NOW)}", f"t={int(NOW) + 1}"),
            BODY,
            NOW,
            "match",
        ),
    ],
)
def test_verify_refuses(header: str | None, body: bytes, now: float, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        hooks.verify("k", header, body, now)


def test_the_examples_verifier_accepts_the_broker_and_refuses_forgeries() -> None:
    verify = example().verify_signature
    now = time.time()
    assert verify(HOOK_SECRET, hooks.sign(HOOK_SECRET, BODY, now), BODY, now)
    assert not verify(HOOK_SECRET, hooks.sign("guess", BODY, now), BODY, now)  # forged
    assert not verify(HOOK_SECRET, hooks.sign(HOOK_SECRET, BODY, now - 600), BODY, now)  # stale
    assert not verify(HOOK_SECRET, hooks.sign(HOOK_SECRET, BODY, now), BODY + b"x", now)
    assert not verify(HOOK_SECRET, None, BODY, now)
    assert not verify(HOOK_SECRET, "t=abc,v1=00", BODY, now)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    app = Backend(tmp_path).start()
    yield app
    app.kill()


def test_the_example_refuses_a_forged_or_stale_request(backend: Backend) -> None:
    body = orjson.dumps({"user": {"id": "1", "name": "A"}, "topic": "chat/x", "data": "spam"})
    url = f"{backend.url}/broker/publish"

    def post(signature: str) -> Reply:
        headers = {"Broker-Signature": signature, "Content-Type": "application/json"}
        return request("POST", url, body=body, headers=headers)

    assert post(hooks.sign(HOOK_SECRET, body)).status == 403  # signed: moderated
    assert post(hooks.sign("forged", body)).status == 401
    assert post(hooks.sign(HOOK_SECRET, body, time.time() - 3600)).status == 401


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ([], "must be a table"),
        ({"conect": "http://x"}, "unknown key 'conect'"),
        ({"connect": "ws://x", "secret": "s"}, "connect must be an http:// or https:// URL"),
        ({"events": "http://x"}, "'secret' (the HMAC key) is missing"),
        ({"secret": ""}, "secret must be a non-empty string"),
        ({"timeout": "2h"}, "timeout must be from 10ms to 1m"),
        ({"queue": -1}, "queue must be a whole number from 0"),
    ],
)
def test_a_bad_hooks_table_is_one_line(table: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        hooks.parse_settings(table)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_hooks_table_and_its_rendering() -> None:
    settings = hooks.parse_settings(
        {"publish": "https://app/p", "secret": "s", "timeout": "500ms", "queue": 5}
    )
    assert settings.publish == "https://app/p" and settings.timeout == 0.5
    assert settings.url("connect") is None and settings.configured
    lines = hooks.render(settings)
    assert 'secret = "<redacted>"' in lines and 'timeout = "500ms"' in lines
    assert "queue = 5" in lines and 'secret = "s"' not in lines
    assert hooks.check(settings, {"publish": ["chat/#"]}) is None
    assert "has no subscribe URL" in (hooks.check(settings, {"subscribe": ["a"]}) or "")


def test_what_a_check_answer_means() -> None:
    assert hooks.read_check(200, b"{}") is None
    assert hooks.read_check(200, b'{"data": {"x": 1}}') == b'{"x":1}'
    assert hooks.read_check(200, b'{"data": null}') == b"null"
    with pytest.raises(Forbidden, match="nope"):
        hooks.read_check(403, b'{"error": {"message": "nope"}}')
    with pytest.raises(BadRequest, match="too long"):
        hooks.read_check(400, b'{"error": {"message": "too long"}}')
    for status, body in ((500, b"{}"), (302, b""), (200, b"not json"), (200, b"[]")):
        with pytest.raises(Unavailable):
            hooks.read_check(status, body)


def test_what_a_connect_answer_admits() -> None:
    answer = hooks.read_connect(
        200, b'{"user": {"id": 7, "name": "Ann"}, "acl": {"pub": []}, "admin": true}'
    )
    assert answer.identity is not None and answer.identity.id == "7"
    assert answer.identity.admin and answer.identity.acl.pub == ()
    assert hooks.read_connect(200, b'{"anonymous": true}').anonymous
    refused = hooks.read_connect(401, b'{"error": {"message": "log in first"}}')
    assert refused.identity is None and refused.message == "log in first"
    assert hooks.read_connect(200, b'{"user": {"id": "a/b"}}').identity is None
    assert hooks.read_connect(200, b'{"user": {"id": "a"}, "exp": 1}').identity is None


def test_bodies() -> None:
    connect = orjson.loads(
        hooks.connect_body("sse", {"cookie": "s=1", "authorization": "x"}, "10.0.0.1")
    )
    assert connect == {"transport": "sse", "headers": {"cookie": "s=1"}, "remote_addr": "10.0.0.1"}
    publish = orjson.loads(hooks.check_body({"id": "1", "name": "A"}, "t", b'{"a":1}', "k"))
    assert publish == {"user": {"id": "1", "name": "A"}, "topic": "t", "data": {"a": 1}, "key": "k"}
    assert "data" not in orjson.loads(hooks.check_body({"id": "1", "name": "A"}, "t"))
