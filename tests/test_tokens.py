"""Tokens against a real broker: expiry (4003), refresh on a live connection, RS256 and
ES256 keys, and forged tokens (alg none, confusion, tampering, bad claims), refused
with 401 in the header and 4001 in the first frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed

from .harness import Broker, BrokerThread
from .support import (
    ROOT,
    SECRET,
    Peer,
    alg_none,
    b64,
    closed_with,
    forge,
    isolated_env,
    refusal,
    segment,
)

AUD = "broker-tests"
ISS = "https://issuer.example"


def short_token(user: str = "1", seconds: int = 2, **claims: Any) -> tuple[str, int]:
    exp = int(time.time()) + seconds
    return jwt.encode({"sub": user, "exp": exp, **claims}, SECRET, algorithm="HS256"), exp


@pytest.mark.slow
async def test_token_expiry_closes_4003(broker: Broker) -> None:
    frame_token, exp = short_token("1")
    by_frame = await Peer.open(broker.url, frame_token)
    by_header = await Peer.open_with_header(broker.url, frame_token)
    assert (await by_header.recv())["op"] == "hello"
    # Before exp the connections work.
    assert (await by_frame.request("sub", topic="t"))["op"] == "ok"
    for peer in (by_frame, by_header):
        code, reason, frames = await closed_with(peer, timeout=exp - time.time() + 3)
        assert frames == []
        assert (code, reason) == (4003, "token expired")
    assert time.time() >= exp - 0.05


@pytest.mark.slow
async def test_token_refresh_keeps_the_connection(broker: Broker) -> None:
    token, exp = short_token("1", name="Old")
    with_id = await Peer.open(broker.url, token)
    without_id = await Peer.open_with_header(broker.url, token)
    assert (await without_id.recv())["op"] == "hello"
    never_expiring = await Peer.open(
        broker.url, jwt.encode({"sub": "1"}, SECRET, algorithm="HS256")
    )

    new_exp = int(time.time()) + 3600
    fresh = jwt.encode({"sub": "1", "name": "New", "exp": new_exp}, SECRET, algorithm="HS256")
    await with_id.send({"op": "auth", "token": fresh, "id": "r1"})
    assert await with_id.recv() == {"op": "ok", "id": "r1", "exp": new_exp}
    await without_id.send({"op": "auth", "token": fresh})
    await without_id.expect_nothing(0.5)
    # A token without exp is refreshed by one with exp: then it expires (4003).
    short, short_exp = short_token("1", seconds=2)
    await never_expiring.send({"op": "auth", "token": short, "id": 7})
    assert await never_expiring.recv() == {"op": "ok", "id": 7, "exp": short_exp}
    # And a refresh with no exp: "exp": null.
    await with_id.send(
        {"op": "auth", "token": jwt.encode({"sub": "1", "name": "New"}, SECRET), "id": "r2"}
    )
    assert await with_id.recv() == {"op": "ok", "id": "r2", "exp": None}

    # Real time: the broker's expiry timers run in its own process, on its own clock.
    await asyncio.sleep(max(exp, short_exp) - time.time() + 1.0)
    code, reason, _ = await closed_with(never_expiring, timeout=1)
    assert (code, reason) == (4003, "token expired")
    for peer in (with_id, without_id):
        assert (await peer.request("sub", topic="t"))["op"] == "ok", "closed at the old exp"
    # The refreshed token is in force: msg.from carries its name.
    await without_id.request("pub", topic="t", data=1)
    assert (await with_id.recv())["from"] == {"id": "1", "name": "New"}


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda: jwt.encode({"sub": "2", "exp": int(time.time()) + 600}, SECRET), "same user"),
        (lambda: "garbage", "malformed token"),
        (
            lambda: jwt.encode({"sub": "1"}, "another-secret-another-secret-0123"),
            "invalid signature",
        ),
        (lambda: jwt.encode({"sub": "1", "exp": int(time.time()) - 5}, SECRET), "token expired"),
        (lambda: jwt.encode({"sub": "1", "nbf": int(time.time()) + 60}, SECRET), "not yet valid"),
        (lambda: alg_none("none", {"sub": "1"}), "algorithm"),
    ],
    ids=["other-user", "garbage", "bad-signature", "expired", "not-yet-valid", "alg-none"],
)
async def test_bad_refresh_closes_4001(
    broker: Broker, make_token: Callable[[], str], reason: str
) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    assert (await peer.request("sub", topic="t"))["op"] == "ok"
    await peer.send({"op": "auth", "token": make_token(), "id": "refresh"})
    code, _, frames = await closed_with(peer)
    assert len(frames) == 1, frames
    error = frames[0]
    assert (error["op"], error["code"], error["id"]) == ("error", "unauthorized", "refresh")
    assert reason in error["message"]
    assert code == 4001


async def test_refresh_drops_subscriptions_the_new_acl_forbids(broker: Broker) -> None:
    peer = await Peer.open(broker.url, broker.token("1"))
    for pattern in ["news", "scores/uk", "scores/+", "user/1"]:
        assert (await peer.request("sub", topic=pattern))["op"] == "ok"
    pub = await Peer.open(broker.url, broker.token("2"))
    await pub.request("pub", topic="news", data="before")
    assert (await peer.recv())["data"] == "before"

    narrower = broker.token("1", sub=["scores/uk"], pub=[])
    reply = await peer.request("auth", token=narrower)
    assert reply["op"] == "ok"
    for topic in ["news", "scores/fr", "scores/uk", "user/1"]:
        await pub.request("pub", topic=topic, data=topic)
    got = [(await peer.recv())["data"] for _ in range(2)]
    assert got == ["scores/uk", "user/1"]  # news and scores/+ were dropped; own inbox stays
    await peer.expect_nothing()
    # The new ACL governs new requests too.
    assert (await peer.request("sub", topic="news"))["code"] == "forbidden"
    assert (await peer.request("pub", topic="scores/uk", data=1))["code"] == "forbidden"


async def test_close_code_survives_frames_in_flight_4001(broker: Broker) -> None:
    """A bad refresh followed at once by another frame: still error + 4001, every time."""
    codes = []
    for _ in range(12):
        peer = await Peer.open(broker.url, broker.token("1"))
        await peer.send({"op": "auth", "token": "garbage", "id": 1})
        for _ in range(5):
            await peer.send({"op": "pub", "topic": "a", "data": 1})
        code, _, frames = await closed_with(peer)
        assert frames and frames[0]["code"] == "unauthorized"
        codes.append(code)
    assert codes == [4001] * 12, codes


@pytest.mark.slow
async def test_close_code_survives_frames_in_flight_4003(broker: Broker) -> None:
    """Connections that keep sending when their token expires still get 4003."""
    base = time.time() + 1.5

    async def busy(i: int) -> int | None:
        exp = base + i * 0.03  # staggered, so the expiries are independent trials
        peer = await Peer.open(broker.url, jwt.encode({"sub": "1", "exp": exp}, SECRET))

        async def drain() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await peer.ws.recv()

        reader = asyncio.create_task(drain())
        with contextlib.suppress(ConnectionClosed):
            while time.time() < exp + 3:
                for _ in range(10):
                    await peer.send({"op": "presence", "id": 1, "topic": "a"})
                await asyncio.sleep(0.001)  # let the reader run: requests, not a flood
        await reader
        return peer.ws.close_code

    codes = await asyncio.gather(*(busy(i) for i in range(20)))
    assert codes == [4003] * 20, codes


def rsa_keypair(tmp: Path, name: str = "rsa") -> tuple[Any, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, write_public(tmp, name, key)


def ec_keypair(tmp: Path, name: str = "ec") -> tuple[Any, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, write_public(tmp, name, key)


def write_public(tmp: Path, name: str, key: Any) -> Path:
    path = tmp / f"{name}.pub.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def private_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_asymmetric_keys_end_to_end(make_broker, tmp_path: Path, algorithm: str) -> None:  # type: ignore[no-untyped-def]
    make_pair = rsa_keypair if algorithm == "RS256" else ec_keypair
    key, public = make_pair(tmp_path, "server")
    attacker, _ = make_pair(tmp_path, "attacker")
    broker = make_broker(
        "--algorithm", algorithm, "--public-key", str(public), secret=None, memory=True
    )
    exp = int(time.time()) + 600

    def mint(user: str, signer: Any = key, headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(
            {"sub": user, "name": user.title(), "exp": exp},
            signer,
            algorithm=algorithm,
            headers=headers,
        )

    # Good tokens, both ways, and a round trip.
    alice = await Peer.open_with_header(broker.url, mint("alice"))
    assert (await alice.recv())["user"] == {"id": "alice", "name": "Alice"}
    bob = await Peer.open(broker.url, mint("bob"))
    assert (await alice.request("sub", topic="k"))["op"] == "ok"
    await bob.request("pub", topic="k", data=algorithm)
    msg = await alice.recv()
    assert msg["data"] == algorithm and msg["from"] == {"id": "bob", "name": "Bob"}

    pem = public.read_bytes()
    claims = {"sub": "mallory", "exp": exp}
    good = mint("mallory")
    h, p, s = good.split(".")
    forged = {
        # HS/RS confusion: the public key, which anyone has, used as an HMAC secret.
        "hs256-with-public-pem": (
            forge({"alg": "HS256", "typ": "JWT"}, claims, pem),
            "invalid algorithm",
        ),
        "hs512-with-public-pem": (
            forge({"alg": "HS512"}, claims, pem, hashlib.sha512),
            "invalid algorithm",
        ),
        # Same, claiming the configured algorithm.
        "hmac-sig-claiming-alg": (forge({"alg": algorithm}, claims, pem), "invalid signature"),
        "other-key": (mint("mallory", attacker), "invalid signature"),
        # An attacker's public key embedded in the header must not be trusted.
        "embedded-jwk": (
            mint(
                "mallory",
                attacker,
                {
                    "jwk": json.loads(
                        jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(
                            attacker.public_key()
                        )
                    )
                },
            ),
            "invalid signature",
        ),
        "jku": (
            mint("mallory", attacker, {"jku": "http://127.0.0.1:9/jwks.json", "kid": "k1"}),
            "invalid signature",
        ),
        "alg-none": (alg_none("none", claims), "invalid algorithm"),
        "alg-swapped": (
            segment({"alg": "PS256" if algorithm == "RS256" else "ES384"}) + f".{p}.{s}",
            "invalid algorithm",
        ),
        "tampered-payload": (
            f"{h}.{segment({'sub': 'admin', 'exp': exp, 'admin': True})}.{s}",
            "invalid signature",
        ),
        "stripped-signature": (f"{h}.{p}.", "invalid signature"),
        "expired": (
            jwt.encode({"sub": "m", "exp": int(time.time()) - 10}, key, algorithm=algorithm),
            "token expired",
        ),
    }
    for label, (token, reason) in forged.items():
        status, body = await refusal(broker.url, {"Authorization": f"Bearer {token}"})
        assert status == 401 and reason in body, (label, status, body)
        peer = await Peer.open(broker.url)
        await peer.send({"op": "auth", "token": token, "id": label})
        code, _, frames = await closed_with(peer)
        assert code == 4001 and len(frames) == 1, (label, code, frames)
        assert frames[0]["code"] == "unauthorized" and reason in frames[0]["message"], (
            label,
            frames,
        )
    # The broker is still fine afterwards.
    assert (await alice.request("sub", topic="after"))["op"] == "ok"


@pytest.mark.slow
def test_cli_token_signs_with_private_key(tmp_path: Path) -> None:
    key, public = rsa_keypair(tmp_path)
    private = tmp_path / "rsa.key.pem"
    private.write_bytes(private_pem(key))
    out = subprocess.run(  # noqa: PLW1510 - the exit code is asserted below
        [
            sys.executable,
            "-m",
            "broker.cli",
            "token",
            "--id",
            "alice",
            "--algorithm",
            "RS256",
            "--private-key",
            str(private),
        ],
        cwd=ROOT,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), public.read_bytes(), algorithms=["RS256"])
    assert claims["sub"] == "alice"


@pytest.fixture(scope="module")
def strict_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    """HS256 with --audience, --issuer and --require-exp."""
    home = tmp_path_factory.mktemp("strict")
    server = BrokerThread(home, "--audience", AUD, "--issuer", ISS, "--require-exp", memory=True)
    yield server.start()
    server.close()


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "mallory",
        "name": "M",
        "aud": AUD,
        "iss": ISS,
        "exp": int(time.time()) + 300,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def valid() -> str:
    return forge({"alg": "HS256", "typ": "JWT"}, claims())


def resign_header(header: dict[str, Any]) -> str:
    """The valid token's payload and signature under a different header."""
    _, p, s = valid().split(".")
    return f"{segment(header)}.{p}.{s}"


def tamper_payload() -> str:
    h, _, s = valid().split(".")
    return f"{h}.{segment(claims(sub='admin', admin=True))}.{s}"


FORGERIES: list[Any] = [
    # alg none in its spellings, with and without a signature
    pytest.param(lambda: alg_none("none", claims()), "invalid algorithm", id="alg-none"),
    pytest.param(lambda: alg_none("None", claims()), "invalid algorithm", id="alg-None"),
    pytest.param(lambda: alg_none("NONE", claims()), "invalid algorithm", id="alg-NONE"),
    pytest.param(lambda: alg_none("nOnE", claims()), "invalid algorithm", id="alg-nOnE"),
    pytest.param(
        lambda: resign_header({"alg": "none", "typ": "JWT"}),
        "invalid algorithm",
        id="alg-none-with-sig",
    ),
    pytest.param(
        lambda: forge({"alg": "none"}, claims()), "invalid algorithm", id="alg-none-hmac-signed"
    ),
    pytest.param(lambda: forge({"typ": "JWT"}, claims()), "invalid algorithm", id="alg-missing"),
    pytest.param(lambda: forge({"alg": None}, claims()), "invalid algorithm", id="alg-null"),
    pytest.param(lambda: forge({"alg": ["HS256"]}, claims()), "invalid algorithm", id="alg-list"),
    pytest.param(
        lambda: forge({"alg": "hs256"}, claims()), "invalid algorithm", id="alg-lowercase"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256 "}, claims()), "invalid algorithm", id="alg-trailing-space"
    ),
    # other algorithms with the right secret
    pytest.param(
        lambda: forge({"alg": "HS512"}, claims(), digest=hashlib.sha512),
        "invalid algorithm",
        id="HS512",
    ),
    pytest.param(
        lambda: forge({"alg": "HS384"}, claims(), digest=hashlib.sha384),
        "invalid algorithm",
        id="HS384",
    ),
    pytest.param(
        lambda: forge({"alg": "RS256"}, claims()), "invalid algorithm", id="RS256-hmac-signed"
    ),
    pytest.param(
        lambda: forge({"alg": "ES256"}, claims()), "invalid algorithm", id="ES256-hmac-signed"
    ),
    # signature games
    pytest.param(
        lambda: valid().rsplit(".", 1)[0] + ".", "invalid signature", id="signature-stripped"
    ),
    pytest.param(lambda: valid().rsplit(".", 1)[0], "malformed token", id="two-segments"),
    pytest.param(lambda: valid() + ".x.y", "malformed", id="five-segments"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(), b"x" * 40), "invalid signature", id="other-secret"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(), b""), "invalid signature", id="empty-secret"
    ),
    pytest.param(tamper_payload, "invalid signature", id="payload-tampered"),
    pytest.param(
        lambda: resign_header({"alg": "HS256", "typ": "JWT", "kid": "x"}),
        "invalid signature",
        id="header-tampered",
    ),
    pytest.param(
        lambda: valid()[:-4] + ("AAAA" if not valid().endswith("AAAA") else "BBBB"),
        "invalid signature",
        id="signature-bitflip",
    ),
    # key-selection header tricks: ignored, the configured key decides
    pytest.param(
        lambda: forge({"alg": "HS256", "kid": "../../../../../../dev/null"}, claims(), b""),
        "invalid signature",
        id="kid-path-traversal",
    ),
    pytest.param(
        lambda: forge(
            {"alg": "HS256", "kid": "' UNION SELECT 'attacker'--"}, claims(), b"attacker"
        ),
        "invalid signature",
        id="kid-sql",
    ),
    pytest.param(
        lambda: forge(
            {"alg": "HS256", "jku": "http://127.0.0.1:9/jwks.json", "kid": "a"},
            claims(),
            b"attacker-secret",
        ),
        "invalid signature",
        id="jku",
    ),
    pytest.param(
        lambda: forge(
            {"alg": "HS256", "x5u": "http://127.0.0.1:9/cert.pem"}, claims(), b"attacker-secret"
        ),
        "invalid signature",
        id="x5u",
    ),
    pytest.param(
        lambda: forge(
            {"alg": "HS256", "jwk": {"kty": "oct", "k": b64(b"attacker-secret")}},
            claims(),
            b"attacker-secret",
        ),
        "invalid signature",
        id="embedded-jwk",
    ),
    pytest.param(
        lambda: forge({"alg": "HS256", "crit": ["exp"]}, claims()), "malformed", id="crit-unknown"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256", "crit": ["b64"], "b64": False}, claims()),
        "malformed",
        id="crit-b64",
    ),
    # time claims
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(exp=int(time.time()) - 2)),
        "token expired",
        id="expired",
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(exp=0)), "token expired", id="exp-zero"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(exp="tomorrow")), "exp", id="exp-not-a-number"
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(exp=...)), "'exp'", id="exp-missing"),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(exp=None)), "exp", id="exp-null"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(nbf=int(time.time()) + 60)),
        "not yet valid",
        id="nbf-future",
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(nbf="soon")), "nbf", id="nbf-string"),
    # audience and issuer
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(aud="someone-else")),
        "invalid audience",
        id="aud-wrong",
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(aud=["a", "b"])),
        "invalid audience",
        id="aud-list-wrong",
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(aud=...)), "'aud'", id="aud-missing"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(aud=AUD.upper())), "invalid audience", id="aud-case"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(iss="https://evil.example")),
        "invalid issuer",
        id="iss-wrong",
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(iss=...)), "'iss'", id="iss-missing"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(iss=ISS + "/")), "invalid issuer", id="iss-suffix"
    ),
    # malformed structure
    pytest.param(lambda: "not-a-jwt", "malformed token", id="garbage"),
    pytest.param(lambda: "!!!.@@@.###", "malformed token", id="non-base64"),
    pytest.param(
        lambda: forge(b"not json at all", claims()), "malformed token", id="header-not-json"
    ),
    pytest.param(lambda: forge(b'["HS256"]', claims()), "malformed token", id="header-array"),
    pytest.param(lambda: forge({"alg": "HS256"}, b"not json"), "invalid", id="payload-not-json"),
    pytest.param(lambda: forge({"alg": "HS256"}, b"[1,2]"), "invalid", id="payload-array"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(pad="p" * 5000), b"wrong"),
        "invalid signature",
        id="huge-6KB",
    ),
    # unusable user ids, correctly signed
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub="")), "user id", id="sub-empty"),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub="a/b")), "user id", id="sub-slash"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(sub="user/2")), "user id", id="sub-inbox-path"
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub="+")), "user id", id="sub-plus"),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub="a#")), "user id", id="sub-hash"),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub=None)), "user id", id="sub-null"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(sub=..., id="")), "user id", id="id-claim-empty"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(sub=..., id="x/y")), "user id", id="id-claim-slash"
    ),
    pytest.param(lambda: forge({"alg": "HS256"}, claims(sub=True)), "user id", id="sub-bool"),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(sub={"id": "1"})), "user id", id="sub-object"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(acl="everything")), "acl", id="acl-not-object"
    ),
    pytest.param(
        lambda: forge({"alg": "HS256"}, claims(acl={"sub": "#"})), "acl", id="acl-sub-string"
    ),
]


async def test_strict_broker_accepts_a_valid_token(strict_broker: Broker) -> None:
    """The control for the forgeries below: the same broker lets a correct token in."""
    peer = await Peer.open_with_header(strict_broker.url, valid())
    assert (await peer.recv())["user"] == {"id": "mallory", "name": "M"}
    peer = await Peer.open(strict_broker.url, forge({"alg": "HS256"}, claims(aud=["x", AUD])))
    assert (await peer.request("sub", topic="t"))["op"] == "ok"


@pytest.mark.parametrize(("make_token", "reason"), FORGERIES)
async def test_forged_token_in_header_is_401(
    strict_broker: Broker, make_token: Callable[[], str], reason: str
) -> None:
    status, body = await refusal(strict_broker.url, {"Authorization": f"Bearer {make_token()}"})
    assert status == 401
    line = body.strip()
    assert reason in line and line and "\n" not in line, body


@pytest.mark.parametrize(("make_token", "reason"), FORGERIES)
async def test_forged_token_in_first_frame_is_4001(
    strict_broker: Broker, make_token: Callable[[], str], reason: str
) -> None:
    peer = await Peer.open(strict_broker.url)
    await peer.send({"op": "auth", "token": make_token(), "id": "forged"})
    code, _, frames = await closed_with(peer)
    assert len(frames) == 1, frames
    error = frames[0]
    assert (error["op"], error["code"], error.get("id")) == ("error", "unauthorized", "forged"), (
        error
    )
    assert reason in error["message"], error
    assert code == 4001


async def test_oversized_tokens(strict_broker: Broker) -> None:
    """Tokens beyond what the handshake or a frame may carry are refused, never let in."""
    huge = forge({"alg": "HS256"}, claims(pad="p" * 100_000))
    status, _ = await refusal(strict_broker.url, {"Authorization": f"Bearer {huge}"})
    assert status in (400, 401, 413, 431), status
    peer = await Peer.open(strict_broker.url)
    await peer.send({"op": "auth", "token": huge})  # over the 64 KiB frame limit
    code, _, frames = await closed_with(peer)
    assert code in (1009, 4001) and all(f["op"] == "error" for f in frames), (code, frames)
    near_limit = forge({"alg": "HS256"}, claims(pad="p" * 45_000), b"wrong")
    peer = await Peer.open(strict_broker.url)
    await peer.send({"op": "auth", "token": near_limit})
    code, _, frames = await closed_with(peer)
    assert code == 4001 and "invalid signature" in frames[0]["message"]
    peer = await Peer.open_with_header(strict_broker.url, valid())  # still serving
    assert (await peer.recv())["op"] == "hello"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (
            lambda: Headers(
                [("Authorization", f"Bearer {valid()}"), ("Authorization", "Bearer forged")]
            ),
            401,
        ),
        (
            lambda: Headers(
                [("Authorization", "Bearer forged"), ("Authorization", f"Bearer {valid()}")]
            ),
            401,
        ),
    ],
    ids=["valid-then-forged", "forged-then-valid"],
)
async def test_duplicate_authorization_headers_are_401(
    strict_broker: Broker, headers: Callable[[], Headers], status: int
) -> None:
    got, body = await refusal(strict_broker.url, headers())
    assert (got, "\n" in body.strip()) == (status, False), (got, body)
