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


class _Header(msgspec.Struct):
    alg: str
    typ: str | None = None
    crit: list[str] | None = None


class _Claims(msgspec.Struct):
    sub: str
    exp: int | float
    nbf: int | float | None = None
    iat: int | float | None = None


_header_decoder = msgspec.json.Decoder(_Header)
_claims_decoder = msgspec.json.Decoder(_Claims)
# base64url without padding, the only encoding RFC 7515 allows in a compact JWS.
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


def _hmac_sha256_pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states after hashing the key xor ipad and xor opad (RFC 2104)."""
    block = hashlib.sha256().block_size
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    return (hashlib.sha256(bytes(b ^ 0x36 for b in key)),
            hashlib.sha256(bytes(b ^ 0x5C for b in key)))


def _b64decode(segment: str) -> bytes:
    if not _B64URL.match(segment) or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class MemberVerifier:
    """Verifies member JWTs (HS256 only), caching good ones by token string until ``exp``.

    A verifier of its own rather than PyJWT's ``decode``: this runs on every
    grab, and PyJWT's generality (every algorithm, every claim option) cost a
    tenth of the request. It accepts exactly one thing: a compact JWS whose
    header says ``alg: HS256`` (no ``crit``), whose HMAC-SHA256 over the first
    two segments matches, whose ``exp`` is in the future, whose ``nbf`` (if
    any) is past, and whose ``sub`` is a member id. ``alg: none``, RS/ES/PS
    tokens and HS256 tokens signed with any other key all fail the same check.
    """

    def __init__(self, secret: str, id_pattern: re.Pattern[str]) -> None:
        self._key = secret.encode()
        self._inner, self._outer = _hmac_sha256_pads(self._key)
        self._ids = id_pattern
        self._cache: dict[str, tuple[str, float]] = {}
        self._good_headers: set[str] = set()

    def verify(self, token: str) -> str:
        now = time.time()
        hit = self._cache.get(token)
        if hit is not None:
            if hit[1] > now:
                return hit[0]
            del self._cache[token]
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
            claims = _claims_decoder.decode(_b64decode(body))
        except (ValueError, msgspec.DecodeError) as exc:
            raise Unauthorized(f"invalid member token: bad claims ({exc})") from None
        if claims.exp <= now:
            raise Unauthorized("invalid member token: signature has expired")
        if claims.nbf is not None and claims.nbf > now:
            raise Unauthorized("invalid member token: not yet valid (nbf)")
        if not self._ids.match(claims.sub):
            raise Unauthorized("token subject is not a valid member id")
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (claims.sub, float(claims.exp))
        return claims.sub

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
            h = _header_decoder.decode(_b64decode(head))
        except (ValueError, msgspec.DecodeError) as exc:
            raise Unauthorized(f"invalid member token: bad header ({exc})") from None
        if h.alg != "HS256":
            raise Unauthorized(f"invalid member token: algorithm {h.alg!r} is not allowed")
        if h.crit is not None:
            raise Unauthorized("invalid member token: critical header extensions unsupported")
        if h.typ is not None and h.typ.upper() != "JWT":
            raise Unauthorized("invalid member token: typ is not JWT")
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

