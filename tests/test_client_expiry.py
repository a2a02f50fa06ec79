"""The client knows an expired token by its code and its ``exp``, never by the reason's words.

The wire gives every refusal at authentication the same code (``unauthorized``: HTTP 401,
an ``error`` frame, close 4001); only close 4003 says "expired". So a refused token is
``TokenExpired`` when its own ``exp`` has passed, and ``Unauthorized`` otherwise, whatever
the broker's reason says.
"""

from __future__ import annotations

import base64
import time

import orjson
import pytest

from broker.client import Client
from broker.client.client import refused
from broker.core.auth import mint_token
from broker.errors import TokenExpired, Unauthorized

from .support import SECRET, BrokerProcess


def unsigned(header: dict[str, object], claims: dict[str, object]) -> str:
    """A JWT-shaped token with any header, and a signature nobody made."""

    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}.c2lnbmF0dXJl"


@pytest.mark.parametrize("header", [False, True])
async def test_a_reason_that_says_expired_is_not_expiry(
    broker: BrokerProcess, header: bool
) -> None:
    # The broker echoes the token's "alg" in its reason: "invalid algorithm 'expired' ...".
    token = unsigned({"alg": "expired", "typ": "JWT"}, {"sub": "a"})
    with pytest.raises(Unauthorized) as info:
        await Client(broker.url, token, auth_header=header).connect()
    assert "expired" in info.value.message
    assert type(info.value) is Unauthorized


@pytest.mark.parametrize("header", [False, True])
async def test_a_refused_token_past_its_exp_is_expired(broker: BrokerProcess, header: bool) -> None:
    token = mint_token(SECRET, "a", ttl=-10)
    with pytest.raises(TokenExpired):
        await Client(broker.url, token, auth_header=header).connect()


async def test_a_refresh_refused_is_expired_only_past_its_exp(broker: BrokerProcess) -> None:
    async with Client(broker.url, mint_token(SECRET, "a", ttl=60)) as client:
        with pytest.raises(TokenExpired):
            await client.refresh_token(mint_token(SECRET, "a", ttl=-10))
    async with Client(broker.url, mint_token(SECRET, "a", ttl=60)) as client:
        bad = unsigned({"alg": "expired", "typ": "JWT"}, {"sub": "a", "exp": time.time() + 60})
        with pytest.raises(Unauthorized) as info:
            await client.refresh_token(bad)
        assert type(info.value) is Unauthorized


def test_the_decision_reads_the_token_not_the_message() -> None:
    assert type(refused("token expired", mint_token(SECRET, "a", ttl=60))) is Unauthorized
    assert type(refused("anything at all", mint_token(SECRET, "a", ttl=-1))) is TokenExpired
    assert type(refused("token expired", None)) is Unauthorized
    assert type(refused("token expired", "not a token")) is Unauthorized
