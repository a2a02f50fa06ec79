"""Token verification and ACL rules, without sockets."""

from __future__ import annotations

import base64
import time

import jwt
import pytest

from broker.core.auth import (
    ALGORITHMS,
    HMAC_ALGORITHMS,
    Acl,
    Identity,
    TokenVerifier,
    identity_from_claims,
    mint_token,
    parse_bearer,
)
from broker.errors import Forbidden, TokenExpired, Unauthorized

SECRET = "s" * 64
verifier = TokenVerifier(SECRET)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_valid_token() -> None:
    ident = verifier.verify(mint_token(SECRET, "123", "John"))
    assert (ident.id, ident.name) == ("123", "John")
    assert ident.exp is not None and ident.exp > time.time()


def test_id_claim_accepted_and_stringified() -> None:
    token = jwt.encode({"id": 123, "name": "John"}, SECRET, algorithm="HS256")
    ident = verifier.verify(token)
    assert ident.id == "123" and ident.exp is None


def test_numeric_sub_is_stringified() -> None:
    assert verifier.verify(jwt.encode({"sub": 42}, SECRET, algorithm="HS256")).id == "42"


def test_name_defaults_to_id() -> None:
    assert verifier.verify(jwt.encode({"sub": "9"}, SECRET, algorithm="HS256")).name == "9"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"sub": ""}, "user id"),
        ({"sub": "a/b"}, "user id"),
        ({"sub": "a+"}, "user id"),
        ({"sub": "#"}, "user id"),
        ({"name": "x"}, "no user id"),
        ({"sub": {"x": 1}}, "no user id"),
        ({"sub": "1", "acl": "all"}, "acl"),
        ({"sub": "1", "acl": {"pub": "x"}}, "acl.pub"),
    ],
)
def test_unusable_claims(claims: dict[str, object], reason: str) -> None:
    with pytest.raises(Unauthorized, match=reason):
        verifier.verify(jwt.encode(claims, SECRET, algorithm="HS256"))


def test_expired() -> None:
    token = mint_token(SECRET, "1", ttl=10, now=time.time() - 100)
    with pytest.raises(TokenExpired, match="token expired"):
        verifier.verify(token)


def test_not_yet_valid() -> None:
    token = jwt.encode({"sub": "1", "nbf": time.time() + 100}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="not yet valid"):
        verifier.verify(token)


def test_wrong_signature() -> None:
    with pytest.raises(Unauthorized, match="invalid signature"):
        verifier.verify(mint_token("other-secret-other-secret-123456", "1"))


def test_alg_none_refused() -> None:
    token = b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(b'{"sub":"1"}') + "."
    with pytest.raises(Unauthorized, match="algorithm"):
        verifier.verify(token)


def test_other_hmac_algorithm_refused() -> None:
    token = jwt.encode({"sub": "1"}, SECRET, algorithm="HS512")
    with pytest.raises(Unauthorized, match="algorithm 'HS512'"):
        verifier.verify(token)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "....", "x" * 5000, b64(b"{}") + ".."])
def test_garbage(garbage: str) -> None:
    with pytest.raises(Unauthorized):
        verifier.verify(garbage)


def test_audience_and_issuer() -> None:
    strict = TokenVerifier(SECRET, audience="broker", issuer="me", require_exp=True)
    good = mint_token(SECRET, "1", extra={"aud": "broker", "iss": "me"})
    assert strict.verify(good).id == "1"
    with pytest.raises(Unauthorized, match="audience"):
        strict.verify(mint_token(SECRET, "1", extra={"aud": "other", "iss": "me"}))
    with pytest.raises(Unauthorized, match="issuer"):
        strict.verify(mint_token(SECRET, "1", extra={"aud": "broker", "iss": "you"}))
    with pytest.raises(Unauthorized, match="'exp'"):
        strict.verify(mint_token(SECRET, "1", ttl=None, extra={"aud": "broker", "iss": "me"}))


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer abc", True),
        ("bearer abc", True),
        ("Basic abc", False),
        ("Bearer ", False),
        ("", False),
    ],
)
def test_parse_bearer(header: str, ok: bool) -> None:
    if ok:
        assert parse_bearer(header) == "abc"
    else:
        with pytest.raises(Unauthorized):
            parse_bearer(header)


def test_acl_claims_round_trip() -> None:
    token = mint_token(SECRET, "1", pub=["chat/#"], sub=[], admin=True)
    ident = verifier.verify(token)
    assert ident.acl == Acl(pub=("chat/#",), sub=())
    assert ident.admin is True


def ident(pub: list[str] | None = None, sub: list[str] | None = None) -> Identity:
    claims: dict[str, object] = {"sub": "7"}
    acl = {k: v for k, v in (("pub", pub), ("sub", sub)) if v is not None}
    if acl:
        claims["acl"] = acl
    return identity_from_claims(claims)


def test_publish_rules() -> None:
    ident().check_publish("anything")
    ident().check_publish("user/42")  # anyone may write to an inbox
    with pytest.raises(Forbidden, match="reserved"):
        ident().check_publish("$SYS/x")
    ident(pub=["chat/#"]).check_publish("chat/room")
    with pytest.raises(Forbidden):
        ident(pub=["chat/#"]).check_publish("news")
    with pytest.raises(Forbidden):
        ident(pub=[]).check_publish("chat")


def test_subscribe_rules() -> None:
    ident(sub=["scores/#"]).check_subscribe("scores/+")
    with pytest.raises(Forbidden):
        ident(sub=["scores/+"]).check_subscribe("scores/#")
    with pytest.raises(Forbidden):
        ident(sub=[]).check_subscribe("scores")
    ident(sub=[]).check_subscribe("user/7")  # own inbox, whatever the ACL
    ident(sub=[]).check_subscribe("user/7/#")
    with pytest.raises(Forbidden, match="inbox"):
        ident().check_subscribe("user/42")
    with pytest.raises(Forbidden, match="inbox"):
        ident().check_subscribe("user/42/#")
    ident().check_subscribe("user/+")  # allowed, but only one's own inbox is delivered
    assert ident().may_receive("user/7/x") and not ident().may_receive("user/8")


def test_one_algorithm_list_for_the_verifier_serve_and_token() -> None:
    import click

    from broker.cli.serve import serve
    from broker.cli.token import token_command

    def accepts(command: click.Command, value: str) -> bool:
        [option] = [p for p in command.params if p.name == "algorithm"]
        try:
            option.type.convert(value, option, None)
        except click.BadParameter:
            return False
        return True

    assert set(HMAC_ALGORITHMS) < set(ALGORITHMS)
    for algorithm in ALGORITHMS:
        assert accepts(serve, algorithm) and accepts(token_command, algorithm)
        TokenVerifier("k" * 32, algorithm)
    for outside in ("none", "HS1", "RS384", "ES384", "PS256", "EdDSA"):
        assert not accepts(serve, outside) and not accepts(token_command, outside)
        with pytest.raises(ValueError):
            TokenVerifier("k" * 32, outside)
