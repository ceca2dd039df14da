"""Ledger subcommands: archive, reconcile, settle, statement (contract section 4).

``register(subparsers)`` adds them to the main ``coupon-engine`` parser; each
sets ``func(args) -> int``. Exit 0 on success, 2 on bad input with one line on
stderr, 1 when Redis is needed (archive) and cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from redis import exceptions as rex

from . import archiver, reconcile
from .config import Settings, from_env
from .embedded import EmbeddedRedisError, ensure_running
from .ledger import Ledger
from .redisconn import open_client

log = logging.getLogger("engine.cli_ledger")
CRASH_ENV = "COUPON_ARCHIVER_CRASH_POINT"


def _fail(reason: str, status: int = 2) -> int:
    print(f"coupon-engine: {reason}", file=sys.stderr)
    return status


def _settings(args: argparse.Namespace) -> Settings:
    return from_env().with_overrides(
        redis_url=getattr(args, "redis_url", None),
        redis_cluster=True if getattr(args, "redis_cluster", False) else None,
        data_dir=Path(args.data_dir) if getattr(args, "data_dir", None) else None)


@contextlib.contextmanager
def _redis_url(s: Settings, required: bool) -> Iterator[str | None]:
    """The engine's Redis URL, starting the embedded server if it is down.

    When not ``required`` and there is no embedded Redis data yet, yields
    None instead of creating an empty server just to find nothing in it.
    """
    if s.redis_url:
        yield s.redis_url
        return
    if s.redis_cluster:
        raise EmbeddedRedisError("--redis-cluster needs --redis-url (a seed node of the cluster)")
    if not required and not s.redis_dir.exists():
        yield None
        return
    try:
        cm = ensure_running(s.redis_dir)
        url = cm.__enter__()
    except EmbeddedRedisError as exc:
        if required:
            raise
        log.warning("embedded Redis unavailable: %s", exc)
        yield None
        return
    try:
        yield url
    finally:
        cm.__exit__(None, None, None)


async def _archive(url: str, ledger: Ledger, follow: bool, crash_point: str | None,
                   cluster: bool = False) -> int:
    client = open_client(url, cluster=cluster, connect_timeout=5)
    try:
        if not follow:
            return await archiver.archive_once(client, ledger, crash_point=crash_point)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await archiver.archive_follow(client, ledger, stop, crash_point=crash_point)
    finally:
        await client.aclose()


def cmd_archive(args: argparse.Namespace) -> int:
    s = _settings(args)
    crash = os.environ.get(CRASH_ENV) or None
    try:
        with Ledger(s.ledger_path) as ledger, _redis_url(s, required=True) as url:
            assert url is not None
            n = asyncio.run(_archive(url, ledger, args.follow, crash, s.redis_cluster))
    except EmbeddedRedisError as exc:
        return _fail(str(exc), 1)
    except (rex.ConnectionError, rex.TimeoutError, OSError, rex.RedisClusterException) as exc:
        return _fail(f"cannot reach Redis: {exc}", 1)
    print(f"archived {n} new event(s) into {s.ledger_path}")
    return 0


def _catch_up(s: Settings, ledger: Ledger) -> None:
    """Drain the stream first so reports see the latest redemptions; with Redis
    unreachable, work from what the ledger already holds and say so."""
    try:
        with _redis_url(s, required=False) as url:
            if url is None:
                return
            asyncio.run(_archive(url, ledger, False, None, s.redis_cluster))
    except (rex.ConnectionError, rex.TimeoutError, OSError, rex.RedisClusterException,
            EmbeddedRedisError) as exc:
        print(f"coupon-engine: warning: Redis unreachable ({exc}); using the ledger as"
              " last archived", file=sys.stderr)


def _ledger_command(work: Callable[[Ledger, Settings, argparse.Namespace], int]
                    ) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        s = _settings(args)
        claims = getattr(args, "claims", None)
        if claims is not None and not Path(claims).is_file():
            return _fail(f"claims file {claims} not found")
        try:
            with Ledger(s.ledger_path) as ledger:
                _catch_up(s, ledger)
                return work(ledger, s, args)
        except reconcile.BadInput as exc:
            return _fail(str(exc))
    return run


def _do_reconcile(ledger: Ledger, s: Settings, args: argparse.Namespace) -> int:
    summary = reconcile.reconcile(ledger, args.venue, Path(args.claims), Path(args.out))
    print(reconcile.summary_json(summary))
    return 0


def _do_settle(ledger: Ledger, s: Settings, args: argparse.Namespace) -> int:
    summary = reconcile.settle(ledger, args.venue, Path(args.claims), Path(args.out))
    print(reconcile.summary_json(summary))
    return 0


def _do_statement(ledger: Ledger, s: Settings, args: argparse.Namespace) -> int:
    doc = reconcile.statement(ledger, Path(args.out))
    print(reconcile.statement_text(doc))
    print(f"written: {Path(args.out) / 'statement.csv'}, {Path(args.out) / 'statement.json'}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None,
                   help="Redis URL (default: COUPON_REDIS_URL, else the embedded Redis)")
    p.add_argument("--redis-cluster", action="store_true",
                   help="the --redis-url is a seed node of a Redis Cluster")
    p.add_argument("--data-dir", default=None,
                   help="data directory (default: COUPON_DATA_DIR, else ./var)")


def register(subparsers: Any) -> None:
    """Add archive / reconcile / settle / statement to the main parser."""
    p = subparsers.add_parser("archive", help="move the event stream into the ledger")
    p.add_argument("--follow", action="store_true", help="keep archiving until interrupted")
    _common(p)
    p.set_defaults(func=cmd_archive)

    for name, work, text in (
            ("reconcile", _do_reconcile, "match a venue's claims with the ledger; changes nothing"),
            ("settle", _do_settle, "reconcile and record the paid codes as settled")):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("--venue", required=True, metavar="VENUE_ID")
        p.add_argument("--claims", required=True, metavar="FILE.csv")
        p.add_argument("--out", default=".", metavar="DIR")
        _common(p)
        p.set_defaults(func=_ledger_command(work))

    p = subparsers.add_parser("statement", help="per-venue and campaign totals")
    p.add_argument("--out", default=".", metavar="DIR")
    _common(p)
    p.set_defaults(func=_ledger_command(_do_statement))


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m engine.cli_ledger``), for tests and
    for use before the main CLI wires these commands in."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="coupon-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
