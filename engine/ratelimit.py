"""In-process rate limits: pure logic, a clock passed in, no I/O.

Kept per worker process on purpose: a limit that needs a Redis round trip
would cost the hot path the very call it is meant to protect. With N workers
a member can get up to N times the rate; the Lua quotas are the hard limit.
"""

from __future__ import annotations

import math
from collections import OrderedDict


class TokenBucket:
    """Per-key token buckets with a bounded number of keys (LRU eviction)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 200_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """0.0 if allowed (a token is spent), else seconds until one is available."""
        tokens, last = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._put(key, (tokens - 1.0, now))
            return 0.0
        self._put(key, (tokens, now))
        return (1.0 - tokens) / self.rate

    def _put(self, key: str, value: tuple[float, float]) -> None:
        self._state[key] = value
        self._state.move_to_end(key)
        if len(self._state) > self.max_keys:
            self._state.popitem(last=False)


class FailureWindow:
    """Counts failures per key in a fixed window; blocks a key past ``limit``.

    Attempts whose outcome is not known yet (a store call in flight) hold a
    reservation: each may still fail, so ``headroom`` leaves room for them and
    concurrent attempts can never spend more than ``limit`` between them.
    """

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._counts: dict[str, tuple[int, float]] = {}
        self._reserved: dict[str, int] = {}

    def blocked_for(self, key: str, now: float) -> float:
        """Seconds the key must wait, 0.0 when it may try."""
        count, start = self._counts.get(key, (0, now))
        if now - start >= self.window_s:
            self._counts.pop(key, None)
            return 0.0
        if count >= self.limit:
            return self.window_s - (now - start)
        return 0.0

    def _window(self, key: str, now: float) -> tuple[int, float]:
        """(failures, start) of the key's window at ``now``: (0, now) once it expired."""
        count, start = self._counts.get(key, (0, now))
        if now - start >= self.window_s:
            return 0, now
        return count, start

    def headroom(self, key: str, now: float) -> int:
        """Failures the key may still have, less those reserved by attempts in flight."""
        return self.limit - self._window(key, now)[0] - self._reserved.get(key, 0)

    def reserve(self, key: str) -> None:
        self._reserved[key] = self._reserved.get(key, 0) + 1

    def release(self, key: str) -> None:
        """The attempt is answered (its failure, if any, already counted by ``fail``)."""
        n = self._reserved.get(key, 0) - 1
        if n > 0:
            self._reserved[key] = n
        else:
            self._reserved.pop(key, None)

    def fail(self, key: str, now: float) -> None:
        count, start = self._window(key, now)
        self._counts[key] = (count + 1, start)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
