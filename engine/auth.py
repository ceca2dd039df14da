"""Credentials: member JWTs, the admin token and development secrets.

Venue API keys live in Redis (``Store.venue_for_key``); this module holds the
parts that need no store.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from .config import Settings
from .errors import Unauthorized

log = logging.getLogger("engine.auth")

# Tokens longer than this are refused before any parsing.
MAX_TOKEN_LEN = 4096
_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Secrets:
    member_jwt_secret: str
    admin_token: str


def resolve_secrets(settings: Settings) -> Secrets:
    """Configured secrets, or development ones kept in the data directory.

    The development file is created on first use, readable by its owner only,
    so ``coupon-engine token ...`` and ``serve`` on the same data directory agree.
    """
    member, admin = settings.member_jwt_secret, settings.admin_token
    if member and admin:
        return Secrets(member, admin)
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
    return Secrets(member or stored["member_jwt_secret"], admin or stored["admin_token"])


def mint_member_token(secret: str, member_id: str, ttl_s: int = 3600,
                      now: float | None = None) -> str:
    now = time.time() if now is None else now
    return jwt.encode({"sub": member_id, "iat": int(now), "exp": int(now) + ttl_s},
                      secret, algorithm="HS256")


class MemberVerifier:
    """Verifies member JWTs, caching good ones by token string until ``exp``."""

    def __init__(self, secret: str, id_pattern: re.Pattern[str]) -> None:
        self._secret = secret
        self._ids = id_pattern
        self._cache: dict[str, tuple[str, float]] = {}

    def verify(self, token: str) -> str:
        now = time.time()
        hit = self._cache.get(token)
        if hit is not None:
            if hit[1] > now:
                return hit[0]
            del self._cache[token]
        if len(token) > MAX_TOKEN_LEN:
            raise Unauthorized("token too long")
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"],
                                options={"require": ["exp", "sub"]})
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid member token: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not self._ids.match(sub):
            raise Unauthorized("token subject is not a valid member id")
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (sub, float(claims["exp"]))
        return sub


def check_admin(token: str, admin_token: str) -> None:
    if not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise Unauthorized("invalid admin token")


def bearer(header: str | None) -> str:
    if not header:
        raise Unauthorized("missing Authorization header")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'")
    return value.strip()

