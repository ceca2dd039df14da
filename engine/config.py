"""Settings: one typed object, read from the environment in one place.

Command-line flags override the environment; nothing here runs at import time.
Every setting is one row of ``OPTIONS``: its variable, its field, how its text is
read and what a valid value is. ``from_env`` and ``from_flags`` read every row
the same way, so ``COUPON_PORT=abc`` and ``--port abc`` get the same one-line
refusal (``SettingsError``, naming the variable or the flag).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .shards import MAX_SHARDS

# The shortest secrets accepted outside development (COUPON_ALLOW_WEAK_SECRETS):
# RFC 7518 asks for an HS256 key of at least the hash's 32 bytes; an operator token
# of 16 characters from a generator is beyond guessing at any request rate.
MIN_MEMBER_SECRET_BYTES = 32
MIN_ADMIN_TOKEN_CHARS = 16
MAX_WORKERS = 256
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The HTTP workers' event loop (docs/decisions.md, "The workers' event loop").
EVENT_LOOPS = ("uvloop", "asyncio")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


class SettingsError(ValueError):
    """A setting the engine refuses; the message is one line naming the variable or
    the flag."""


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
    # Development only: accept configured secrets shorter than the minimums above.
    allow_weak_secrets: bool = False
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
    # uvloop answers more per second; asyncio's own loop serves a crowd of connections
    # fairly where uvloop leaves some waiting for seconds (docs/decisions.md).
    event_loop: str = "uvloop"
    # The workers' gc.set_threshold (docs/benchmarks.md, issue 19 fourth pass): with
    # thousands of connections a request lives for hundreds of milliseconds, and at
    # CPython's (700, 10, 10) nearly everything it allocates is promoted and walked again.
    gc_thresholds: tuple[int, int, int] = (50_000, 20, 10)
    # Seconds a long command (reconcile, settle, archive, restore) runs before it shows
    # its progress on stderr, when stderr is a terminal.
    progress_after_s: float = 1.0
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


# -- how a setting's text is read (raise ValueError with the reason) ---------------

_INT_RE = re.compile(r"[+-]?[0-9]{1,18}")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _int(text: str) -> int:
    # int() would also take '1_000', ' 12 ' and non-ASCII digits.
    if not _INT_RE.fullmatch(text.strip()):
        raise ValueError("not an integer")
    return int(text.strip())


def _float(text: str) -> float:
    if not _FLOAT_RE.fullmatch(text.strip()):
        raise ValueError("not a number")
    return float(text.strip())


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError("not one of 1/0, true/false, yes/no, on/off")


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("empty")
    return text


def _path(text: str) -> Path:
    return Path(_text(text))


def _redis_url(text: str) -> str:
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme not in REDIS_SCHEMES:
        raise ValueError(f"the scheme must be one of {', '.join(s + '://' for s in REDIS_SCHEMES)}")
    return text


def _token(text: str) -> str:
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError("must be printable ASCII without spaces")
    return text


# An operator's name: what the audit log records as "who".
_NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
DEFAULT_ADMIN_NAME = "admin"


def _admin_tokens(text: str) -> tuple[tuple[str, str], ...]:
    """'name:token,name:token' -> ((name, token), ...): names 1-64 of A-Za-z0-9_.@-,
    tokens of printable ASCII without ',' or spaces, at least MIN_ADMIN_TOKEN_CHARS
    characters; no name or token twice. The message never shows a token."""
    out: list[tuple[str, str]] = []
    for i, item in enumerate(text.split(","), 1):
        name, sep, token = item.strip().partition(":")
        if not sep or not _NAME_RE.fullmatch(name):
            raise ValueError(f"entry {i} must be NAME:TOKEN with a name of 1-64"
                             " characters of A-Za-z0-9_.@-")
        if len(token) < MIN_ADMIN_TOKEN_CHARS or not all("\x21" <= ch <= "\x7e"
                                                         for ch in token):
            raise ValueError(f"the token of {name!r} must be at least {MIN_ADMIN_TOKEN_CHARS}"
                             " printable ASCII characters without spaces")
        if any(n == name for n, _ in out) or any(t == token for _, t in out):
            raise ValueError(f"{name!r} repeats a name or a token")
        out.append((name, token))
    return tuple(out)


def _log_level(text: str) -> str:
    v = text.strip().upper()
    if v not in LOG_LEVELS:
        raise ValueError(f"not one of {', '.join(LOG_LEVELS)}")
    return v


def _gc_thresholds(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(_INT_RE.fullmatch(x.strip()) for x in parts):
        raise ValueError("must be three integers a,b,c (as gc.set_threshold takes)")
    a, b, c = (int(x) for x in parts)
    # 0 would switch the collector off, and the cycles asyncio and aiohttp leave
    # (exceptions with their frames) would never be freed.
    if not (100 <= a <= 10_000_000 and 1 <= b <= 1000 and 1 <= c <= 1000):
        raise ValueError("must be 100..10000000, 1..1000, 1..1000")
    return a, b, c


def _event_loop(text: str) -> str:
    v = text.strip().lower()
    if v not in EVENT_LOOPS:
        raise ValueError(f"not one of {', '.join(EVENT_LOOPS)}")
    return v


# -- what a valid value is (None, or the reason) ------------------------------------


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be {lo}..{hi}"
    return check


def _at_least(lo: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be at least {lo}"


def _positive(v: Any) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a positive number"


def _not_negative(v: Any) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be 0 or more"


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: ``env`` variable, ``field`` of Settings, ``parse`` (text -> value,
    ValueError = refused), ``check`` (value -> the problem, or None), and ``flag``,
    the argparse dest of the command-line flag that overrides it (``switch``: a
    store_true flag, which overrides only when given)."""

    env: str
    field: str
    parse: Callable[[str], Any]
    check: Callable[[Any], str | None] | None = None
    flag: str | None = None
    switch: bool = False
    # Never echoed in a refusal.
    secret: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("COUPON_DATA_DIR", "data_dir", _path, flag="data_dir"),
    Option("COUPON_REDIS_URL", "redis_url", _redis_url, flag="redis_url"),
    Option("COUPON_REDIS_CLUSTER", "redis_cluster", _bool, flag="redis_cluster", switch=True),
    Option("COUPON_STOCK_SHARDS", "stock_shards", _int, _between(1, MAX_SHARDS),
           flag="stock_shards"),
    Option("COUPON_HOST", "host", _text, flag="host"),
    Option("COUPON_PORT", "port", _int, _between(1, 65535), flag="port"),
    Option("COUPON_WORKERS", "workers", _int, _between(1, MAX_WORKERS), flag="workers"),
    Option("COUPON_CAMPAIGN", "campaign_file", _path, flag="campaign"),
    Option("COUPON_ALLOW_UNSAFE_REDIS", "allow_unsafe_redis", _bool,
           flag="allow_unsafe_redis", switch=True),
    Option("COUPON_MEMBER_JWT_SECRET", "member_jwt_secret", _text, secret=True),
    Option("COUPON_ADMIN_TOKEN", "admin_token", _text, secret=True),
    Option("COUPON_ADMIN_TOKENS", "admin_tokens", _admin_tokens, secret=True),
    Option("COUPON_ALLOW_WEAK_SECRETS", "allow_weak_secrets", _bool,
           flag="allow_weak_secrets", switch=True),
    Option("COUPON_REDIS_TIMEOUT", "redis_timeout", _float, _positive),
    Option("COUPON_REDIS_POOL_SIZE", "redis_pool_size", _int, _between(1, 10_000)),
    Option("COUPON_CLIENT_TIMEOUT", "client_timeout_s", _float, _between(0.1, 600)),
    Option("COUPON_KEEPALIVE_TIMEOUT", "keepalive_timeout_s", _float, _between(0.1, 3600)),
    Option("COUPON_MAX_CONNECTIONS", "max_connections", _int, _between(1, 1_000_000)),
    Option("COUPON_MEMBER_JWT_LEEWAY", "member_jwt_leeway_s", _float, _between(0, 300)),
    Option("COUPON_METRICS_TOKEN", "metrics_token", _token, secret=True),
    Option("COUPON_MEMBER_RATE", "member_rate", _float, _positive),
    Option("COUPON_MEMBER_BURST", "member_burst", _int, _at_least(1)),
    Option("COUPON_VENUE_BAD_CODE_LIMIT", "venue_bad_code_limit", _int, _at_least(1)),
    Option("COUPON_ARCHIVER", "archiver", _bool),
    Option("COUPON_LOG_LEVEL", "log_level", _log_level),
    Option("COUPON_EVENT_LOOP", "event_loop", _event_loop),
    Option("COUPON_GC_THRESHOLDS", "gc_thresholds", _gc_thresholds),
    Option("COUPON_PROGRESS_AFTER", "progress_after_s", _float, _not_negative),
)


def _flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _read(opt: Option, text: str, where: str) -> Any:
    try:
        value = opt.parse(text)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    problem = opt.check(value) if opt.check else None
    if problem:
        raise SettingsError(f"{where}: {problem}")
    return value


def _check_secrets(s: Settings, origin: Mapping[str, str]) -> None:
    """Configured secrets long enough to be secrets (development may waive it)."""
    if s.allow_weak_secrets:
        return
    member, admin = s.member_jwt_secret, s.admin_token
    if member is not None and len(member.encode("utf-8")) < MIN_MEMBER_SECRET_BYTES:
        raise SettingsError(
            f"{origin['member_jwt_secret']}: an HS256 secret needs at least"
            f" {MIN_MEMBER_SECRET_BYTES} bytes, got {len(member.encode('utf-8'))}"
            " (COUPON_ALLOW_WEAK_SECRETS=1 accepts it, for development only)")
    if admin is not None and len(admin) < MIN_ADMIN_TOKEN_CHARS:
        raise SettingsError(
            f"{origin['admin_token']}: the operator token needs at least"
            f" {MIN_ADMIN_TOKEN_CHARS} characters, got {len(admin)}"
            " (COUPON_ALLOW_WEAK_SECRETS=1 accepts it, for development only)")


def _build(env: Mapping[str, str], flags: Mapping[str, Any]) -> Settings:
    changes: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for opt in OPTIONS:
        text = env.get(opt.env)
        if text:  # unset and empty both mean the default
            changes[opt.field] = _read(opt, text, opt.env if opt.secret else f"{opt.env}={text}")
            origin[opt.field] = opt.env
        if opt.flag is None:
            continue
        value = flags.get(opt.flag)
        if opt.switch:
            if value:
                changes[opt.field] = True
                origin[opt.field] = _flag_name(opt.flag)
        elif value is not None:
            where = f"{_flag_name(opt.flag)} {value}"
            changes[opt.field] = _read(opt, str(value), where)
            origin[opt.field] = _flag_name(opt.flag)
    settings = replace(Settings(), **changes)
    _check_secrets(settings, origin)
    return settings


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from ``COUPON_*`` environment variables; SettingsError names the
    first variable the engine refuses."""
    return _build(os.environ if env is None else env, {})


def from_flags(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, with the command line's flags applied
    (``vars(args)`` of any subcommand; flags it does not have are ignored)."""
    return _build(os.environ if env is None else env, flags)
