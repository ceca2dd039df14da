"""Settings: one typed object, read from the environment in one place.

Command-line flags override the environment; nothing here runs at import time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the engine needs to know about its environment."""

    data_dir: Path = Path("./var")
    redis_url: str | None = None
    # The URL names a seed node of a Redis Cluster (also implied by the
    # ``redis+cluster://`` scheme).
    redis_cluster: bool = False
    # Stock shards a campaign is split into at its first load (docs/cluster.md);
    # fixed afterwards. 1 = every key of the campaign in one slot.
    stock_shards: int = 1
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    campaign_file: Path | None = None
    allow_unsafe_redis: bool = False
    member_jwt_secret: str | None = None
    admin_token: str | None = None
    # Named operator tokens, (name, token): the name is who the audit records
    # (COUPON_ADMIN_TOKENS="alice:tok1,bob:tok2"); COUPON_ADMIN_TOKEN is named "admin".
    admin_tokens: tuple[tuple[str, str], ...] = ()
    # Seconds a Redis call may take before the request is answered 503.
    redis_timeout: float = 1.0
    redis_connect_retries: int = 20
    # Per-member token bucket, per worker process.
    member_rate: float = 5.0
    member_burst: int = 10
    # Unknown or malformed codes a venue may send per minute before 429.
    venue_bad_code_limit: int = 30
    idempotency_ttl_s: int = 86_400
    # Connections of redis-py's pool per worker (everything but the hot path); a
    # request that finds them all busy waits for one, up to ``redis_timeout``.
    redis_pool_size: int = 256
    # Seconds a client has to deliver a request's complete headers (from connecting,
    # or from the first byte of its next request on a kept-alive connection), and
    # again to deliver its body; slower clients are closed (headers) or answered 400.
    client_timeout_s: float = 10.0
    # Seconds an idle kept-alive connection stays open between requests.
    keepalive_timeout_s: float = 75.0
    # Open client connections per worker; the newest beyond it is closed at once.
    max_connections: int = 10_000
    # Clock skew allowed on a member token's exp, nbf and iat, in seconds.
    member_jwt_leeway_s: float = 30.0
    # When set, GET /metrics answers only to ``Authorization: Bearer <token>``.
    metrics_token: str | None = None
    archiver: bool = True
    log_level: str = "INFO"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite3"

    @property
    def secrets_path(self) -> Path:
        return self.data_dir / "secrets.json"

    @property
    def metrics_dir(self) -> Path:
        return self.data_dir / "metrics"

    @property
    def cluster(self) -> bool:
        """True when Redis is a cluster, by flag or by URL scheme."""
        url = self.redis_url or ""
        return self.redis_cluster or url.split("://", 1)[0].lower() in (
            "redis+cluster", "rediss+cluster")

    def with_overrides(self, **changes: Any) -> Settings:
        """Return a copy with the non-None values of ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line naming the variable."""


# An operator's name: what the audit log records as "who".
_NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
DEFAULT_ADMIN_NAME = "admin"


def parse_admin_tokens(value: str, var: str = "COUPON_ADMIN_TOKENS"
                       ) -> tuple[tuple[str, str], ...]:
    """'name:token,name:token' -> ((name, token), ...): names 1-64 of A-Za-z0-9_.@-,
    tokens of printable ASCII without ',' or spaces, at least 16 characters; no name or
    token twice."""
    out: list[tuple[str, str]] = []
    for i, item in enumerate(value.split(","), 1):
        name, sep, token = item.strip().partition(":")
        if not sep or not _NAME_RE.fullmatch(name):
            raise SettingsError(f"{var}: entry {i} must be NAME:TOKEN with a name of 1-64"
                              " characters of A-Za-z0-9_.@-")
        if len(token) < 16 or not all("\x21" <= ch <= "\x7e" for ch in token):
            raise SettingsError(f"{var}: the token of {name!r} must be at least 16 printable"
                              " ASCII characters without spaces")
        if any(n == name for n, _ in out) or any(t == token for _, t in out):
            raise SettingsError(f"{var}: {name!r} repeats a name or a token")
        out.append((name, token))
    return tuple(out)


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _seconds(name: str, value: str, low: float, high: float) -> float:
    """A number of seconds in [low, high], else ``SettingsError`` naming ``name``."""
    try:
        got = float(value)
    except ValueError:
        got = float("nan")
    if not low <= got <= high:  # NaN fails too
        raise SettingsError(f"{name} must be a number of seconds from {low:g} to {high:g}, "
                            f"got {value!r}")
    return got


def _count(name: str, value: str, low: int, high: int) -> int:
    """An integer in [low, high], else ``SettingsError`` naming ``name``."""
    try:
        got = int(value)
    except ValueError:
        raise SettingsError(f"{name} must be an integer from {low} to {high}, "
                            f"got {value!r}") from None
    if not low <= got <= high:
        raise SettingsError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return got


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from ``COUPON_*`` environment variables."""
    env = os.environ if env is None else env
    s = Settings()
    changes: dict[str, Any] = {}
    if v := env.get("COUPON_DATA_DIR"):
        changes["data_dir"] = Path(v)
    if v := env.get("COUPON_REDIS_URL"):
        changes["redis_url"] = v
    if v := env.get("COUPON_REDIS_CLUSTER"):
        changes["redis_cluster"] = _bool(v)
    if v := env.get("COUPON_STOCK_SHARDS"):
        changes["stock_shards"] = int(v)
    if v := env.get("COUPON_HOST"):
        changes["host"] = v
    if v := env.get("COUPON_PORT"):
        changes["port"] = int(v)
    if v := env.get("COUPON_WORKERS"):
        changes["workers"] = int(v)
    if v := env.get("COUPON_CAMPAIGN"):
        changes["campaign_file"] = Path(v)
    if v := env.get("COUPON_ALLOW_UNSAFE_REDIS"):
        changes["allow_unsafe_redis"] = _bool(v)
    if v := env.get("COUPON_MEMBER_JWT_SECRET"):
        changes["member_jwt_secret"] = v
    if v := env.get("COUPON_ADMIN_TOKEN"):
        changes["admin_token"] = v
    if v := env.get("COUPON_ADMIN_TOKENS"):
        changes["admin_tokens"] = parse_admin_tokens(v)
    if v := env.get("COUPON_REDIS_TIMEOUT"):
        changes["redis_timeout"] = float(v)
    if v := env.get("COUPON_MEMBER_RATE"):
        changes["member_rate"] = float(v)
    if v := env.get("COUPON_MEMBER_BURST"):
        changes["member_burst"] = int(v)
    if v := env.get("COUPON_VENUE_BAD_CODE_LIMIT"):
        changes["venue_bad_code_limit"] = int(v)
    if v := env.get("COUPON_REDIS_POOL_SIZE"):
        changes["redis_pool_size"] = _count("COUPON_REDIS_POOL_SIZE", v, 1, 10_000)
    if v := env.get("COUPON_CLIENT_TIMEOUT"):
        changes["client_timeout_s"] = _seconds("COUPON_CLIENT_TIMEOUT", v, 0.1, 600)
    if v := env.get("COUPON_KEEPALIVE_TIMEOUT"):
        changes["keepalive_timeout_s"] = _seconds("COUPON_KEEPALIVE_TIMEOUT", v, 0.1, 3600)
    if v := env.get("COUPON_MAX_CONNECTIONS"):
        changes["max_connections"] = _count("COUPON_MAX_CONNECTIONS", v, 1, 1_000_000)
    if v := env.get("COUPON_MEMBER_JWT_LEEWAY"):
        changes["member_jwt_leeway_s"] = _seconds("COUPON_MEMBER_JWT_LEEWAY", v, 0, 300)
    if v := env.get("COUPON_METRICS_TOKEN"):
        if not v.isascii() or not v.isprintable() or " " in v:
            raise SettingsError("COUPON_METRICS_TOKEN must be printable ASCII without spaces")
        changes["metrics_token"] = v
    if v := env.get("COUPON_ARCHIVER"):
        changes["archiver"] = _bool(v)
    if v := env.get("COUPON_LOG_LEVEL"):
        changes["log_level"] = v.upper()
    return replace(s, **changes)


# Command-line flags (argparse dests) and the setting each overrides; store_true
# flags override only when given.
_FLAGS = {"data_dir": "data_dir", "redis_url": "redis_url", "stock_shards": "stock_shards",
          "host": "host", "port": "port", "workers": "workers", "campaign": "campaign_file"}
_SWITCHES = {"redis_cluster": "redis_cluster", "allow_unsafe_redis": "allow_unsafe_redis"}


def from_flags(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, with the command line's flags applied
    (``vars(args)`` of any subcommand; flags it does not have are ignored)."""
    changes: dict[str, Any] = {}
    for flag, name in _FLAGS.items():
        value = flags.get(flag)
        if value is not None:
            changes[name] = Path(value) if name in ("data_dir", "campaign_file") else value
    for flag, name in _SWITCHES.items():
        if flags.get(flag):
            changes[name] = True
    return from_env(env).with_overrides(**changes)
