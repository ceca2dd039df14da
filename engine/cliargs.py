"""What every ``coupon-engine`` subcommand shares: the flags that say which engine it
acts on, the one-line refusal (contract section 4: exit 2, one line), and the
progress line of long runs."""

from __future__ import annotations

import argparse
import sys
import time
import typing


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """--redis-url, --redis-cluster, --data-dir: the same engine as a running ``serve``."""
    p.add_argument("--redis-url", help="Redis URL (else COUPON_REDIS_URL, else embedded);"
                   " redis+cluster://HOST:PORT names a Redis Cluster seed node")
    p.add_argument("--redis-cluster", action="store_true",
                   help="the --redis-url is a seed node of a Redis Cluster"
                        " (else COUPON_REDIS_CLUSTER)")
    p.add_argument("--data-dir", help="data directory (else COUPON_DATA_DIR, ./var)")


class Parser(argparse.ArgumentParser):
    """argparse with the contract's refusal: one line on stderr, exit 2 (argparse's
    own prints the usage too). Subcommand parsers inherit the class."""

    def error(self, message: str) -> typing.NoReturn:
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        self.exit(2, f"coupon-engine: {where}{message} (see --help)\n")


def fail(reason: str, status: int = 2) -> int:
    """Print ``reason`` as one line on stderr; return the exit status."""
    print(f"coupon-engine: {reason}", file=sys.stderr)
    return status


class Progress:
    """A progress line on stderr for long runs (reconcile, settle, archive, restore).

    Shown only when stderr is a terminal, and only once a run has lasted ``delay_s``:
    stdout keeps carrying the command's result (summary.json), and a log file or a
    pipe gets no carriage returns. ``update`` is cheap enough to call per batch.
    """

    def __init__(self, label: str, stream: typing.TextIO | None = None,
                 delay_s: float = 1.0, every_s: float = 0.5) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self.start = time.monotonic()
        self.delay_s, self.every_s = delay_s, every_s
        self.shown_at: float | None = None

    def update(self, done: int, total: int | None = None, unit: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.delay_s:
            return
        if self.shown_at is not None and now - self.shown_at < self.every_s:
            return
        self.shown_at = now
        text = f"{done:,}{unit}"
        if total:
            text = f"{min(100, 100 * done // total)}% ({done:,} of {total:,}{unit})"
        self.stream.write(f"\r{self.label}: {text}\x1b[K")
        self.stream.flush()

    def finish(self) -> None:
        """End the line, if one was shown."""
        if self.shown_at is not None:
            self.stream.write("\n")
            self.stream.flush()
            self.shown_at = None
