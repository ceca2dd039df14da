"""Ledger subcommands: archive, reconcile, settle, statement (contract section 4),
and restore (rebuild Redis from the ledger, docs/ledger.md "Restore").

``register(subparsers)`` adds them to the main ``coupon-engine`` parser; each
sets ``func(args) -> int``. Exit 0 on success, 2 on bad input with one line on
stderr, 1 when Redis is needed (archive) and cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import exceptions as rex

from ..cliargs import Parser, Progress, add_engine_args, fail
from ..config import Settings, SettingsError, from_flags
from ..shards import MAX_SHARDS
from ..store.connection import open_client
from ..store.embedded import EmbeddedRedisError, engine_redis, engine_redis_if_any
from . import archiver, reconcile, report, restore
from .db import Ledger

log = logging.getLogger("engine.ledger.cli")
CRASH_ENV = "COUPON_ARCHIVER_CRASH_POINT"


def _settings(args: argparse.Namespace) -> Settings:
    return from_flags(vars(args))


async def _archive(url: str, ledger: Ledger, follow: bool, crash_point: str | None,
                   cluster: bool = False, progress: Progress | None = None) -> int:
    client = open_client(url, cluster=cluster, connect_timeout=5)
    try:
        if not follow:
            tick = None if progress is None else \
                (lambda n: progress.update(n, unit=" events"))
            try:
                return await archiver.archive_once(client, ledger, crash_point=crash_point,
                                                   progress=tick)
            finally:
                if progress is not None:
                    progress.finish()
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
        with Ledger(s.ledger_path) as ledger, engine_redis(s) as url:
            n = asyncio.run(_archive(url, ledger, args.follow, crash, s.redis_cluster,
                                     _progress(s, "archive")))
    except EmbeddedRedisError as exc:
        return fail(str(exc), 1)
    except (rex.ConnectionError, rex.TimeoutError, OSError, rex.RedisClusterException) as exc:
        return fail(f"cannot reach Redis: {exc}", 1)
    print(f"archived {n} new event(s) into {s.ledger_path}")
    return 0


def _catch_up(s: Settings, ledger: Ledger) -> None:
    """Drain the stream first so reports see the latest redemptions; with Redis
    unreachable, work from what the ledger already holds and say so."""
    try:
        with engine_redis_if_any(s) as url:
            if url is None:
                return
            asyncio.run(_archive(url, ledger, False, None, s.redis_cluster,
                                 _progress(s, "archiving first")))
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
            return fail(f"claims file {claims} not found")
        try:
            with Ledger(s.ledger_path) as ledger:
                _catch_up(s, ledger)
                return work(ledger, s, args)
        except reconcile.BadInput as exc:
            return fail(str(exc))
    return run


def _warn(message: str) -> None:
    print(f"coupon-engine: {message}", file=sys.stderr)


def _progress(s: Settings, label: str) -> Progress:
    return Progress(f"coupon-engine: {label}", delay_s=s.progress_after_s)


def _do_reconcile(ledger: Ledger, s: Settings, args: argparse.Namespace) -> int:
    summary = reconcile.reconcile(ledger, args.venue, Path(args.claims), Path(args.out),
                                  warn=_warn, progress=_progress(
                                      s, f"reconcile {Path(args.claims).name}"))
    print(reconcile.summary_json(summary))
    return 0


def _do_settle(ledger: Ledger, s: Settings, args: argparse.Namespace) -> int:
    summary = reconcile.settle(ledger, args.venue, Path(args.claims), Path(args.out),
                               warn=_warn,
                               progress=_progress(s, f"settle {Path(args.claims).name}"))
    print(reconcile.summary_json(summary))
    return 0


def _do_statement(ledger: Ledger, s: Settings, args: argparse.Namespace) -> int:
    doc = reconcile.statement(ledger, Path(args.out))
    print(reconcile.statement_text(doc))
    print(f"written: {Path(args.out) / 'statement.csv'}, {Path(args.out) / 'statement.json'}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    s = _settings(args)
    if args.batch < 1:
        return fail("--batch must be positive")
    if args.shards is not None and not 1 <= args.shards <= MAX_SHARDS:
        return fail(f"--shards must be 1..{MAX_SHARDS}")
    if not s.ledger_path.is_file():
        return fail(f"no ledger at {s.ledger_path}; restore rebuilds Redis from it")
    req = restore.Request(campaign_file=args.campaign, shards=args.shards, force=args.force,
                          batch=args.batch, idempotency_ttl_s=s.idempotency_ttl_s,
                          crash_point=os.environ.get(restore.CRASH_ENV) or None)
    try:
        with Ledger(s.ledger_path) as ledger:
            if args.dry_run:
                target = restore.dry_run(ledger, req)
                print("dry run, nothing written")
                print(restore.summary(target, "would restore"))
                return 0
            with engine_redis(s) as url:
                progress = _progress(s, "restore")
                try:
                    target = asyncio.run(_restore(url, ledger, req, progress))
                finally:
                    progress.finish()
                print(restore.summary(target))
                return 0
    except (restore.Refused, restore.RestoreError) as exc:
        return fail(str(exc))
    except EmbeddedRedisError as exc:
        return fail(str(exc), 1)
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        return fail(f"cannot reach Redis: {exc}", 1)


async def _restore(url: str, ledger: Ledger, req: restore.Request,
                   progress: Progress) -> restore.Target:
    # Single Redis only: restore writes cpn:active in the same MULTI as the campaign keys.
    client = open_client(url, connect_timeout=5)
    try:
        return await restore.restore_into(
            client, ledger, req, progress=lambda n: progress.update(n, unit=" commands"))
    finally:
        await client.aclose()


def cmd_report(args: argparse.Namespace) -> int:
    """The round report (ledger/report.py): the ledger only, never Redis."""
    s = _settings(args)
    try:
        summary = report.run(s.ledger_path, args.round, Path(args.out))
    except report.ReportError as exc:
        return fail(str(exc))
    zh, en = report.summary_text(summary)
    print(zh)
    print(en)
    print(f"written: {Path(args.out) / 'report.html'} (and its PNG and CSV files)")
    return 0


def register(subparsers: Any) -> None:
    """Add archive / reconcile / settle / statement / report / restore to the main parser."""
    p = subparsers.add_parser("archive", help="move the event stream into the ledger")
    p.add_argument("--follow", action="store_true", help="keep archiving until interrupted")
    add_engine_args(p)
    p.set_defaults(func=cmd_archive)

    for name, work, text in (
            ("reconcile", _do_reconcile, "match a venue's claims with the ledger; changes nothing"),
            ("settle", _do_settle, "reconcile and record the paid codes as settled")):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("--venue", required=True, metavar="VENUE_ID")
        p.add_argument("--claims", required=True, metavar="FILE.csv")
        p.add_argument("--out", default=".", metavar="DIR")
        add_engine_args(p)
        p.set_defaults(func=_ledger_command(work))

    p = subparsers.add_parser("statement", help="per-venue and campaign totals")
    p.add_argument("--out", default=".", metavar="DIR")
    add_engine_args(p)
    p.set_defaults(func=_ledger_command(_do_statement))

    p = subparsers.add_parser(
        "report", help="the round report (HTML, PNG, CSV) from the ledger alone")
    p.add_argument("--round", default=None, metavar="R",
                   help="the round (default: the latest round that granted coupons)")
    p.add_argument("--out", default=".", metavar="DIR")
    p.add_argument("--data-dir", default=None,
                   help="data directory holding ledger.sqlite3 (default: COUPON_DATA_DIR,"
                        " else ./var)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser(
        "restore", help="rebuild the campaign's Redis state from the ledger after Redis lost it")
    p.add_argument("--campaign", default=None, metavar="FILE",
                   help="campaign file, only needed when the ledger holds no copy of it")
    p.add_argument("--force", action="store_true",
                   help="replace state this Redis already holds for the campaign"
                        " (its stream is archived first)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the ledger and print what would be restored; touch no Redis")
    p.add_argument("--batch", type=int, default=restore.DEFAULT_BATCH, metavar="N",
                   help="Redis commands per pipelined write (default %(default)s)")
    p.add_argument("--shards", type=int, default=None, metavar="S",
                   help="the campaign's stock shard count, for a ledger that does not record"
                        " it (default: the ledger's, else 1); must agree with the ledger's")
    add_engine_args(p)
    p.set_defaults(func=cmd_restore)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m engine.ledger.cli``): the ledger commands
    without the rest of the CLI."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = Parser(prog="coupon-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        return fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
