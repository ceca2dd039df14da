"""A test hook: SIGKILL this process at a named point, as a crash would.

The archiver and restore take a spec ``"<point>"`` or ``"<point>:N"`` (the N-th
time the point is reached, default the first) from an environment variable
that only the crash tests set; with no spec nothing happens.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable


class CrashPoint:
    def __init__(self, spec: str | None, points: Iterable[str]) -> None:
        self.point: str | None = None
        self.nth = 1
        self.seen = 0
        if spec:
            point, _, nth = spec.partition(":")
            if point not in set(points):
                raise ValueError(f"unknown crash point {spec!r}")
            self.point, self.nth = point, int(nth or 1)

    def at(self, point: str) -> None:
        if self.point != point:
            return
        self.seen += 1
        if self.seen >= self.nth:
            os.kill(os.getpid(), signal.SIGKILL)
