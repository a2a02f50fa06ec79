"""Tokens and permissions: JWT verification with a pinned algorithm, minting, ACL checks.

No I/O. ``TokenVerifier.verify`` turns a JWT into an ``Identity`` or raises
``Unauthorized`` with a one-line reason fit for an HTTP 401 body or an ``error`` frame.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import jwt

from broker.core.topics import any_covers, inbox_owner, pattern_inbox_owner
from broker.errors import BadRequest, Forbidden, TokenExpired, Unauthorized

#: JWT algorithms signed and verified with one shared secret.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
#: JWT algorithms signed with a private key and verified with its PEM public key.
KEY_ALGORITHMS = ("RS256", "ES256")
#: The one list of JWT algorithms (docs/protocol.md): a broker accepts exactly one of them
#: (``broker serve --algorithm``) and ``broker token --algorithm`` signs with any of them.
ALGORITHMS = HMAC_ALGORITHMS + KEY_ALGORITHMS
#: Verified tokens remembered per verifier (the token's bytes -> its identity), so that a
#: client reconnecting with the same token is not verified again; the oldest goes first.
TOKEN_CACHE_SIZE = 1024

_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
# Claims the fast path leaves to PyJWT (it checks them) and header fields it knows.
_CHECKED_ELSEWHERE = ("aud", "iss", "jti")
_PLAIN_HEADER = frozenset({"alg", "typ"})


#: Claim times the fast path compares itself: ints a float holds exactly. A larger one
#: (10**400) would overflow the comparison with the float clock in the compiled build, and
#: goes to PyJWT, which refuses it.
_TIME_LIMIT = 2**53


def _is_time(value: object) -> bool:
    """Whether ``value`` is an integer claim time the fast path may compare."""
    return type(value) is int and -_TIME_LIMIT < value < _TIME_LIMIT


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@dataclass(frozen=True)
class Acl:
    """What a token allows: ``None`` leaves an action unrestricted, a tuple allows only
    the topics its patterns cover (an empty tuple allows nothing)."""

    pub: tuple[str, ...] | None = None
    sub: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Identity:
    """The authenticated user behind a connection, taken from a verified token."""

    id: str
    name: str
    exp: float | None = None
    acl: Acl = field(default_factory=Acl)
    admin: bool = False
    #: An anonymous connection (section 10): no user, reads public topics only.
    anonymous: bool = False

    @classmethod
    def anonymous_reader(cls, public: tuple[str, ...]) -> Identity:
        """The identity of an anonymous connection: it may read what ``public`` covers."""
        return cls(id="", name="", acl=Acl(pub=(), sub=public), anonymous=True)

    def user_json(self) -> dict[str, str]:
        """The ``{"id", "name"}`` object the protocol sends for this user."""
        return {"id": self.id, "name": self.name}

    def check_publish(self, topic: str) -> None:
        """Raise ``Forbidden`` unless this user may publish to the (valid) ``topic``."""
        if self.anonymous:
            raise Forbidden("an anonymous connection may not publish")
        if topic.startswith("$"):
            raise Forbidden(f"topic {topic!r} is reserved for the broker")
        if self.acl.pub is not None and not any_covers(self.acl.pub, topic):
            raise Forbidden(f"your token does not allow publishing to {topic!r}")

    def check_subscribe(self, pattern: str) -> None:
        """Raise ``Forbidden`` unless this user may subscribe to the (valid) ``pattern``."""
        if self.anonymous:
            if not any_covers(self.acl.sub or (), pattern):
                raise Forbidden(
                    f"{pattern!r} is not public: anonymous connections read public topics"
                )
            return
        owner = pattern_inbox_owner(pattern)
        if owner is not None:
            if owner == self.id:
                return  # one's own inbox is always allowed
            raise Forbidden(f"{pattern!r} is another user's inbox")
        if self.acl.sub is not None and not any_covers(self.acl.sub, pattern):
            raise Forbidden(f"your token does not allow subscribing to {pattern!r}")

    def may_receive(self, topic: str) -> bool:
        """False for topics in another user's inbox, which this user never receives."""
        owner = inbox_owner(topic)
        return owner is None or owner == self.id


def _parse_acl(raw: Any) -> Acl:
    if raw is None:
        return Acl()
    if not isinstance(raw, dict):
        raise Unauthorized("invalid token: claim 'acl' must be an object")
    lists: dict[str, tuple[str, ...] | None] = {}
    for action in ("pub", "sub"):
        value = raw.get(action)
        if value is None:
            lists[action] = None
            continue
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise Unauthorized(f"invalid token: claim 'acl.{action}' must be a list of patterns")
        lists[action] = tuple(value)
    return Acl(pub=lists["pub"], sub=lists["sub"])


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    """Build an ``Identity`` from verified claims; raise ``Unauthorized`` if unusable."""
    raw_id = claims.get("sub", claims.get("id"))
    if raw_id is None or isinstance(raw_id, (dict, list, bool)):
        raise Unauthorized("invalid token: no user id ('sub' or 'id' claim)")
    user_id = str(raw_id)
    if not user_id or any(c in user_id for c in "/+#"):
        raise Unauthorized("invalid token: user id is empty or contains '/', '+' or '#'")
    name = claims.get("name")
    if name is None:
        name = user_id
    elif not isinstance(name, str):
        name = str(name)
    exp = claims.get("exp")
    admin = claims.get("admin", False) is True
    return Identity(
        id=user_id,
        name=name,
        exp=_expiry(exp),
        acl=_parse_acl(claims.get("acl")),
        admin=admin,
    )


def _expiry(raw: Any) -> float | None:
    """The ``exp`` claim as a float; ``Unauthorized`` when it is not a finite number."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except (OverflowError, TypeError, ValueError):
        value = math.inf
    if not math.isfinite(value):
        raise Unauthorized("invalid token: claim 'exp' is out of range")
    return value


class TokenVerifier:
    """Verify JWTs with exactly one algorithm and key (no ``alg`` from the token is
    trusted), plus optional audience, issuer and required ``exp``."""

    def __init__(
        self,
        key: str | bytes,
        algorithm: str = "HS256",
        *,
        audience: str | None = None,
        issuer: str | None = None,
        require_exp: bool = False,
        leeway: float = 0,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported algorithm {algorithm!r}")
        self.key = key
        self.algorithm = algorithm
        self.audience = audience
        self.issuer = issuer
        self.require_exp = require_exp
        self.leeway = leeway
        # The HMAC key for the fast path, when PyJWT would take it (not a PEM, SSH or DER
        # public key, not empty).
        self._hmac_key: bytes | None = None
        if algorithm in _HASHES:
            try:
                raw = key.encode() if isinstance(key, str) else key
                jwt.get_algorithm_by_name(algorithm).prepare_key(raw)
                self._hmac_key = raw
            except jwt.PyJWTError:
                pass
        # Token -> (identity, its exp as PyJWT compares it): only tokens that passed every
        # check, for this verifier's key and settings; the expiry is checked on each use.
        self._cache: dict[str, tuple[Identity, int | None]] = {}

    def verify(self, token: object) -> Identity:
        """The identity in a valid ``token``; ``Unauthorized`` with the reason otherwise."""
        if not isinstance(token, str) or not token:
            raise Unauthorized("missing token")
        cached = self._cache.get(token)
        if cached is not None:
            identity, exp = cached
            if exp is None or exp > time.time() - self.leeway:
                return identity
            del self._cache[token]  # expired: PyJWT says so below, in its words
        found = self._verify_hmac(token)
        identity = found if found is not None else self._verify(token)
        cache = self._cache
        if len(cache) >= TOKEN_CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[token] = (identity, None if identity.exp is None else int(identity.exp))
        return identity

    def _verify_hmac(self, token: str) -> Identity | None:
        """The identity in an HS* ``token`` verified without PyJWT, when it is a plain
        one (three base64url segments, header ``alg`` and ``typ`` only, a good
        signature, integer ``iat``/``nbf``/``exp`` that pass, no ``aud``/``iss``/``jti``
        and no audience or issuer required); None: let PyJWT decide, with its errors."""
        key = self._hmac_key
        if key is None or self.audience is not None or self.issuer is not None:
            return None
        parts = token.split(".")
        if len(parts) != 3 or not all(_SEGMENT.fullmatch(part) for part in parts):
            return None
        try:
            header = json.loads(_b64(parts[0]))
            signature = _b64(parts[2])
            claims = json.loads(_b64(parts[1]))
        except (ValueError, binascii.Error):
            return None
        if (
            type(header) is not dict
            or header.get("alg") != self.algorithm
            or not header.keys() <= _PLAIN_HEADER
            or type(claims) is not dict
        ):
            return None
        signed = token[: len(parts[0]) + len(parts[1]) + 1].encode()
        if not hmac.compare_digest(hmac.digest(key, signed, _HASHES[self.algorithm]), signature):
            return None
        if any(name in claims for name in _CHECKED_ELSEWHERE):
            return None
        now = time.time()
        leeway = self.leeway
        for name in ("iat", "nbf"):
            value = claims.get(name, 0)
            if not _is_time(value) or value > now + leeway:
                return None
        exp = claims.get("exp")
        if exp is None:
            if self.require_exp or "exp" in claims:
                return None
        elif not _is_time(exp) or exp <= now - leeway:
            return None
        return identity_from_claims(claims)

    def _verify(self, token: str) -> Identity:
        """``verify`` by PyJWT: every token the fast path leaves, and every error."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token") from None
        alg = header.get("alg")
        if alg != self.algorithm:
            shown = repr(alg) if len(repr(alg)) <= 40 else repr(alg)[:37] + "..."
            raise Unauthorized(f"invalid algorithm {shown} (this server accepts {self.algorithm})")
        # PyJWT insists that `sub` is a string; the protocol accepts numbers and
        # stringifies them (identity_from_claims), as it does for the `id` claim.
        options: jwt.types.Options = {
            "require": ["exp"] if self.require_exp else [],
            "verify_sub": False,
        }
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token not yet valid") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("invalid signature") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("invalid audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("invalid issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token has no '{exc.claim}' claim") from None
        except jwt.InvalidKeyError:
            raise Unauthorized("invalid key for this algorithm") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        return identity_from_claims(claims)


def parse_bearer(header: str) -> str:
    """The token in an ``Authorization: Bearer <jwt>`` header value, else ``Unauthorized``."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("Authorization header must use the Bearer scheme")
    token = token.strip()
    if not token:
        raise Unauthorized("empty bearer token")
    return token


def mint_token(
    key: str | bytes,
    user_id: str,
    name: str | None = None,
    *,
    ttl: float | None = 3600,
    algorithm: str = "HS256",
    pub: list[str] | None = None,
    sub: list[str] | None = None,
    admin: bool = False,
    extra: dict[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """A signed token for ``user_id`` (``ttl`` None: no ``exp``); ``pub``/``sub`` become
    the ``acl`` claim when given."""
    if not user_id or any(c in user_id for c in "/+#"):
        raise BadRequest("user id must be non-empty and contain no '/', '+' or '#'")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": user_id, "name": name or user_id, "iat": issued}
    if ttl is not None:
        claims["exp"] = issued + int(ttl)
    acl: dict[str, list[str]] = {}
    if pub is not None:
        acl["pub"] = list(pub)
    if sub is not None:
        acl["sub"] = list(sub)
    if acl:
        claims["acl"] = acl
    if admin:
        claims["admin"] = True
    if extra:
        claims.update(extra)
    return jwt.encode(claims, key, algorithm=algorithm)
