"""TokenVerifier's fast path for plain HS* tokens and its cache of verified tokens: the
same identity or the same error as PyJWT's verification, for every kind of token, and
an expiry that the cache still enforces."""

from __future__ import annotations

import base64
import time
from typing import Any

import jwt
import orjson
import pytest

from broker.core.auth import TOKEN_CACHE_SIZE, Identity, TokenVerifier
from broker.errors import TokenExpired, Unauthorized

KEY = "v" * 32
NOW = int(time.time())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: Any, claims: Any, key: str = KEY) -> str:
    """A token with exactly this header and payload JSON (PyJWT adds nothing)."""
    import hashlib
    import hmac

    signed = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}"
    signature = hmac.digest(key.encode(), signed.encode(), hashlib.sha256)
    return f"{signed}.{b64(signature)}"


def outcome(verify: Any, token: str) -> object:
    try:
        return verify(token)
    except Unauthorized as exc:
        return (type(exc), exc.message)


TOKENS = {
    "plain": jwt.encode({"sub": "a", "exp": NOW + 60, "iat": NOW}, KEY),
    "no exp": jwt.encode({"sub": "a"}, KEY),
    "acl and admin": jwt.encode(
        {"sub": "a", "name": "A", "acl": {"pub": ["x/#"], "sub": []}, "admin": True}, KEY
    ),
    "numeric sub": jwt.encode({"sub": 7, "exp": NOW + 60}, KEY),
    "bad acl": jwt.encode({"sub": "a", "acl": ["x"]}, KEY),
    "no user": jwt.encode({"name": "a"}, KEY),
    "expired": jwt.encode({"sub": "a", "exp": NOW - 5}, KEY),
    "float exp": jwt.encode({"sub": "a", "exp": NOW + 60.5}, KEY),
    "string exp": jwt.encode({"sub": "a", "exp": "soon"}, KEY),
    "future iat": jwt.encode({"sub": "a", "iat": NOW + 3600}, KEY),
    "future nbf": jwt.encode({"sub": "a", "nbf": NOW + 3600}, KEY),
    "past nbf": jwt.encode({"sub": "a", "nbf": NOW - 5}, KEY),
    "audience": jwt.encode({"sub": "a", "aud": "x"}, KEY),
    "issuer": jwt.encode({"sub": "a", "iss": "x"}, KEY),
    "jti not a string": jwt.encode({"sub": "a", "jti": 5}, KEY),
    "wrong key": jwt.encode({"sub": "a"}, "w" * 32),
    "wrong algorithm": jwt.encode({"sub": "a"}, KEY * 2, algorithm="HS384"),
    "alg none": jwt.encode({"sub": "a"}, None, algorithm="none"),
    "kid header": hand_made({"alg": "HS256", "kid": 5}, {"sub": "a"}),
    "crit header": hand_made({"alg": "HS256", "crit": ["x"]}, {"sub": "a"}),
    "payload not an object": hand_made({"alg": "HS256"}, ["sub"]),
    "header not an object": hand_made(["HS256"], {"sub": "a"}),
    "no typ": hand_made({"alg": "HS256"}, {"sub": "a"}),
    "padded": jwt.encode({"sub": "a"}, KEY) + "==",
    "two segments": "a.b",
    "garbage": "not a token at all",
    "bad base64": "a$.b.c",
}


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_the_fast_path_decides_as_pyjwt(name: str) -> None:
    token = TOKENS[name]
    fast = outcome(TokenVerifier(KEY).verify, token)
    assert fast == outcome(TokenVerifier(KEY)._verify, token)


@pytest.mark.parametrize("name", ["plain", "issuer", "audience"])
def test_audience_and_issuer_settings_are_pyjwts(name: str) -> None:
    for kwargs in ({"audience": "x"}, {"issuer": "x"}, {"require_exp": True}):
        token = TOKENS[name]
        fast = outcome(TokenVerifier(KEY, **kwargs).verify, token)  # type: ignore[arg-type]
        slow = outcome(TokenVerifier(KEY, **kwargs)._verify, token)  # type: ignore[arg-type]
        assert fast == slow, kwargs


def test_a_key_pyjwt_refuses_refuses_every_token() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"
    token = hand_made({"alg": "HS256"}, {"sub": "a"}, key=pem)
    with pytest.raises(Unauthorized, match="invalid key"):
        TokenVerifier(pem).verify(token)


def test_a_verified_token_is_remembered_until_it_expires() -> None:
    verifier = TokenVerifier(KEY)
    token = jwt.encode({"sub": "a", "exp": int(time.time()) + 1}, KEY)
    first = verifier.verify(token)
    assert isinstance(first, Identity) and verifier.verify(token) is first
    deadline = time.monotonic() + 5
    while True:  # the cache answers until exp, then refuses like PyJWT does
        try:
            assert verifier.verify(token) is first
        except TokenExpired as exc:
            assert exc.message == "token expired"
            break
        assert time.monotonic() < deadline, "the cached token never expired"
        time.sleep(0.05)
    with pytest.raises(TokenExpired):
        verifier.verify(token)


def test_the_cache_is_bounded() -> None:
    verifier = TokenVerifier(KEY)
    tokens = [jwt.encode({"sub": f"u{i}"}, KEY) for i in range(TOKEN_CACHE_SIZE + 50)]
    for token in tokens:
        verifier.verify(token)
    assert len(verifier._cache) == TOKEN_CACHE_SIZE
    assert tokens[0] not in verifier._cache and tokens[-1] in verifier._cache


def test_a_refused_token_is_not_remembered() -> None:
    verifier = TokenVerifier(KEY)
    for name in ("wrong key", "future nbf", "expired"):
        with pytest.raises(Unauthorized):
            verifier.verify(TOKENS[name])
    assert not verifier._cache
