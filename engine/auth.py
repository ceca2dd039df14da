"""Credentials: member JWTs, the admin token and development secrets.

Venue API keys live in Redis (``Store.venue_for_key``); this module holds the
parts that need no store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
import msgspec

from .config import DEFAULT_ADMIN_NAME, Settings
from .errors import Unauthorized

log = logging.getLogger("engine.auth")

# Tokens longer than this are refused before any parsing.
MAX_TOKEN_LEN = 4096
_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Secrets:
    member_jwt_secret: str
    # The unnamed operator token (COUPON_ADMIN_TOKEN, or the development one), '' when
    # only named tokens are configured.
    admin_token: str
    # Both secrets are the engine's own (generated or read from <data dir>/secrets.json),
    # not configured: only then may the pages offer a demo sign-in (docs/pages.md).
    development: bool = False
    # Named operator tokens (name, token) from COUPON_ADMIN_TOKENS.
    named_admins: tuple[tuple[str, str], ...] = ()

    @property
    def admins(self) -> tuple[tuple[str, str], ...]:
        """Every operator credential, (name, token): the unnamed one is "admin"."""
        unnamed = ((DEFAULT_ADMIN_NAME, self.admin_token),) if self.admin_token else ()
        return unnamed + self.named_admins


def resolve_secrets(settings: Settings) -> Secrets:
    """Configured secrets, or development ones kept in the data directory.

    The development file is created on first use, readable by its owner only,
    so ``coupon-engine token ...`` and ``serve`` on the same data directory agree.
    Named operator tokens (COUPON_ADMIN_TOKENS) configure the operators as
    COUPON_ADMIN_TOKEN does: no development admin token is made beside them.
    """
    member, admin, named = settings.member_jwt_secret, settings.admin_token, \
        settings.admin_tokens
    if member and (admin or named):
        return Secrets(member, admin or "", named_admins=named)
    path = settings.secrets_path
    stored: dict[str, str] = {}
    if path.exists():
        stored = json.loads(path.read_text())
    if not stored.get("member_jwt_secret") or not stored.get("admin_token"):
        stored = {"member_jwt_secret": secrets.token_urlsafe(32),
                  "admin_token": "adm_" + secrets.token_urlsafe(24)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(stored, f)
        os.replace(tmp, path)
        log.warning("created development secrets in %s (set COUPON_MEMBER_JWT_SECRET and "
                    "COUPON_ADMIN_TOKEN in production)", path)
    elif not (member and admin):
        log.info("using development secrets from %s", path)
    unnamed = admin or ("" if named else stored["admin_token"])
    return Secrets(member or stored["member_jwt_secret"], unnamed,
                   development=not member and not admin and not named, named_admins=named)


def mint_member_token(secret: str, member_id: str, ttl_s: int = 3600,
                      now: float | None = None) -> str:
    now = time.time() if now is None else now
    return jwt.encode({"sub": member_id, "iat": int(now), "exp": int(now) + ttl_s},
                      secret, algorithm="HS256")


# Clock skew allowed on exp, nbf and iat (COUPON_MEMBER_JWT_LEEWAY): phones and the
# identity service do not share a clock to the second.
DEFAULT_LEEWAY_S = 30.0

_json = msgspec.json.Decoder()


class _Claims(msgspec.Struct):
    """The claims PyJWT looks at, as sent (any JSON type; UNSET when absent): the
    checks are PyJWT's, on these values (``_check_claims``)."""

    exp: Any = msgspec.UNSET
    sub: Any = msgspec.UNSET
    iat: Any = msgspec.UNSET
    nbf: Any = msgspec.UNSET
    aud: Any = msgspec.UNSET
    jti: Any = msgspec.UNSET


_claims_json = msgspec.json.Decoder(_Claims)
# base64url without padding, the only encoding RFC 7515 allows in a compact JWS.
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


def _numeric(value: Any, name: str) -> int:
    """A NumericDate claim as PyJWT reads it: ``int(value)`` (so 1.9 is 1, "12" is 12,
    true is 1); anything int() refuses is a bad token."""
    try:
        return int(value)
    except (ValueError, TypeError, OverflowError):
        raise Unauthorized(f"invalid member token: {name} must be an integer") from None


def _hmac_sha256_pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states after hashing the key xor ipad and xor opad (RFC 2104)."""
    block = hashlib.sha256().block_size
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    return (hashlib.sha256(bytes(b ^ 0x36 for b in key)),
            hashlib.sha256(bytes(b ^ 0x5C for b in key)))


# Canonical base64url only, as PyJWT: the low bits of a short last group's last
# character carry nothing and must be zero. By length % 4: the characters allowed last.
_B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_CANONICAL_LAST = {2: frozenset(_B64_ALPHABET[::16]), 3: frozenset(_B64_ALPHABET[::4])}


def _b64decode(segment: str) -> bytes:
    rem = len(segment) % 4
    if not _B64URL.match(segment) or rem == 1:
        raise ValueError("not base64url")
    if rem and segment[-1] not in _CANONICAL_LAST[rem]:
        raise ValueError("not canonical base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class MemberVerifier:
    """Verifies member JWTs (HS256 only), caching good ones by token string until ``exp``
    (plus the leeway).

    A verifier of its own rather than PyJWT's ``decode``: this runs on every
    grab, and PyJWT's generality (every algorithm, every claim option) cost a
    tenth of the request. It answers as PyJWT (the version pinned in
    pyproject.toml) does for ``jwt.decode(token, secret, algorithms=["HS256"],
    options={"require": ["exp", "sub"]}, leeway=leeway_s)``: a compact JWS whose
    header says ``alg: HS256`` with a string ``kid`` if any, whose HMAC-SHA256 over
    the first two segments matches, with ``exp`` and ``sub`` present, ``exp`` after
    now - leeway, ``nbf`` and ``iat`` (if present) before now + leeway, each read with
    ``int()``, no ``aud`` (none is configured), a string ``jti`` if any, and a ``sub``
    that is a member id. ``tests/test_auth.py`` feeds both the same tokens. Stricter
    by design (docs/decisions.md): padded segments, any ``crit`` header, and JSON
    beyond RFC 8259 (NaN, Infinity) are refused here.
    """

    def __init__(self, secret: str, id_pattern: re.Pattern[str],
                 leeway_s: float = DEFAULT_LEEWAY_S) -> None:
        self._key = secret.encode()
        self._inner, self._outer = _hmac_sha256_pads(self._key)
        self._ids = id_pattern
        self.leeway_s = leeway_s
        # Verified tokens, least recently used first: a member taps many times in a
        # round, and a full cache drops its oldest entry rather than all of them.
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._good_headers: set[str] = set()

    def verify(self, token: str) -> str:
        now = time.time()
        cache = self._cache
        hit = cache.get(token)
        if hit is not None:
            if hit[1] > now:
                cache.move_to_end(token)
                return hit[0]
            del cache[token]
        if len(token) > MAX_TOKEN_LEN:
            raise Unauthorized("token too long")
        if not token.isascii():
            raise Unauthorized("invalid member token: not ASCII")
        parts = token.split(".")
        if len(parts) != 3:
            raise Unauthorized("invalid member token: not a compact JWS")
        head, body, sig = parts
        if head not in self._good_headers:
            self._check_header(head)
        mac = self._mac(f"{head}.{body}".encode())
        expected = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        if not hmac.compare_digest(expected, sig):
            raise Unauthorized("invalid member token: signature verification failed")
        try:
            claims = _claims_json.decode(_b64decode(body))
        except (ValueError, msgspec.DecodeError) as exc:
            raise Unauthorized(f"invalid member token: bad claims ({exc})") from None
        sub, exp = self._check_claims(claims, now)
        if len(cache) >= _CACHE_MAX:
            cache.popitem(last=False)
        cache[token] = (sub, exp + self.leeway_s)
        return sub

    def _check_claims(self, c: _Claims, now: float) -> tuple[str, int]:
        """(sub, exp) of acceptable claims, in PyJWT's order of checks."""
        unset = msgspec.UNSET
        leeway = self.leeway_s
        if c.exp is unset or c.exp is None:
            raise Unauthorized("invalid member token: exp is required")
        if c.sub is unset or c.sub is None:
            raise Unauthorized("invalid member token: sub is required")
        if c.iat is not unset and _numeric(c.iat, "iat") > now + leeway:
            raise Unauthorized("invalid member token: not yet valid (iat)")
        if c.nbf is not unset and _numeric(c.nbf, "nbf") > now + leeway:
            raise Unauthorized("invalid member token: not yet valid (nbf)")
        exp = _numeric(c.exp, "exp")
        if exp <= now - leeway:
            raise Unauthorized("invalid member token: signature has expired")
        if c.aud is not unset and c.aud:
            raise Unauthorized("invalid member token: no audience is accepted")
        if not isinstance(c.sub, str):
            raise Unauthorized("invalid member token: sub must be a string")
        if c.jti is not unset and not isinstance(c.jti, str):
            raise Unauthorized("invalid member token: jti must be a string")
        if not self._ids.match(c.sub):
            raise Unauthorized("token subject is not a valid member id")
        return c.sub, exp

    def _mac(self, msg: bytes) -> bytes:
        """HMAC-SHA256 of ``msg`` under the secret: ``hmac.new(key, msg, sha256)``
        from the two keyed SHA-256 states hashed once at start (RFC 2104). Measured
        in a busy worker: 8 us per token instead of 13 for ``hmac.new``, which sets
        up OpenSSL's HMAC for every call."""
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def _check_header(self, head: str) -> None:
        try:
            h = _json.decode(_b64decode(head))
        except (ValueError, msgspec.DecodeError) as exc:
            raise Unauthorized(f"invalid member token: bad header ({exc})") from None
        if not isinstance(h, dict):
            raise Unauthorized("invalid member token: header is not an object")
        if "kid" in h and not isinstance(h["kid"], str):
            raise Unauthorized("invalid member token: kid must be a string")
        if "crit" in h:
            raise Unauthorized("invalid member token: critical header extensions unsupported")
        if h.get("b64", True) is False:
            raise Unauthorized("invalid member token: unencoded payloads unsupported")
        if h.get("alg") != "HS256":
            raise Unauthorized(f"invalid member token: algorithm {h.get('alg')!r} is not "
                               "allowed")
        if len(self._good_headers) < 64:
            self._good_headers.add(head)


def check_admin(token: str, admin_token: str) -> None:
    if not token.isascii():
        raise Unauthorized("invalid admin token")
    if not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise Unauthorized("invalid admin token")


def admin_name(token: str, admins: tuple[tuple[str, str], ...]) -> str:
    """The name of the operator whose token this is (what the audit records); every
    token is compared, in constant time, whichever matches."""
    if not token.isascii():
        raise Unauthorized("invalid admin token")
    found = None
    for name, expected in admins:
        if hmac.compare_digest(token.encode(), expected.encode()) and found is None:
            found = name
    if found is None:
        raise Unauthorized("invalid admin token")
    return found


def bearer(header: str | None) -> str:
    if not header:
        raise Unauthorized("missing Authorization header")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'")
    return value.strip()

