"""Ledger subcommands: archive, reconcile, settle, statement (contract section 4),
and restore (rebuild Redis from the ledger, docs/ledger.md "Restore").

``register(subparsers)`` adds them to the main ``coupon-engine`` parser; each
sets ``func(args) -> int``. Exit 0 on success, 2 on bad input with one line on
stderr, 1 when Redis is needed (archive) and cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from redis import exceptions as rex

from .. import codes
from ..cliargs import Parser, Progress, add_engine_args, fail
from ..config import Settings, SettingsError, from_flags
from ..domain import rfc3339
from ..shards import MAX_SHARDS
from ..store.connection import open_client
from ..store.embedded import EmbeddedRedisError, engine_redis, engine_redis_if_any
from ..store.loading import shard_count
from ..store.settled import mark_settled
from . import archiver, reconcile, report, restore
from .db import AuditRow, Ledger

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


_UNREACHABLE = (rex.ConnectionError, rex.TimeoutError, OSError, rex.RedisClusterException,
                EmbeddedRedisError)


def _warn_unreachable(exc: Exception) -> None:
    print(f"coupon-engine: warning: Redis unreachable ({exc}); using the ledger as"
          " last archived", file=sys.stderr)


@contextlib.contextmanager
def _redis_if_reachable(s: Settings, ledger: Ledger) -> Iterator[str | None]:
    """The engine's Redis with the stream drained into the ledger first (so reports see
    the latest redemptions), or None when it cannot be reached: then the command works
    from the ledger as last archived, and says so."""
    try:
        cm = engine_redis_if_any(s)
        url = cm.__enter__()
    except _UNREACHABLE as exc:
        _warn_unreachable(exc)
        yield None
        return
    try:
        if url is not None:
            try:
                asyncio.run(_archive(url, ledger, False, None, s.redis_cluster,
                                     _progress(s, "archiving first")))
            except _UNREACHABLE as exc:
                _warn_unreachable(exc)
                url = None
        yield url
    finally:
        cm.__exit__(None, None, None)


Work = Callable[[Ledger, Settings, argparse.Namespace, "str | None"], int]


def _ledger_command(work: Work) -> Callable[[argparse.Namespace], int]:
    """A ledger command: its ledger, the stream drained into it first when Redis is
    reachable; bad input is exit 2 with one line."""
    def run(args: argparse.Namespace) -> int:
        s = _settings(args)
        claims = getattr(args, "claims", None)
        if claims is not None and not Path(claims).is_file():
            return fail(f"claims file {claims} not found")
        try:
            with Ledger(s.ledger_path) as ledger, _redis_if_reachable(s, ledger) as url:
                return work(ledger, s, args, url)
        except reconcile.BadInput as exc:
            return fail(str(exc))
    return run


def _warn(message: str) -> None:
    print(f"coupon-engine: {message}", file=sys.stderr)


def _progress(s: Settings, label: str) -> Progress:
    return Progress(f"coupon-engine: {label}", delay_s=s.progress_after_s)


def _do_reconcile(ledger: Ledger, s: Settings, args: argparse.Namespace,
                  url: str | None) -> int:
    summary = reconcile.reconcile(ledger, args.venue, Path(args.claims), Path(args.out),
                                  warn=_warn, progress=_progress(
                                      s, f"reconcile {Path(args.claims).name}"))
    print(reconcile.summary_json(summary))
    return 0


def _marker(s: Settings, url: str | None) -> reconcile.Marker:
    """settle's marking of the codes it pays, in the engine's Redis (None: unreachable,
    the archiver marks them on its next pass)."""
    def mark(campaign_id: str, codes_: list[str], at_ms: int) -> set[str] | None:
        if url is None:
            print("coupon-engine: warning: Redis unreachable; the paid codes are marked"
                  " settled there by the archiver's next pass", file=sys.stderr)
            return None

        async def run() -> set[str]:
            client = open_client(url, cluster=s.redis_cluster, connect_timeout=5)
            try:
                shards = await shard_count(client, campaign_id)
                # A code Redis does not hold cannot be reversed there: only a code that
                # is there and not redeemed any more is withheld.
                not_redeemed, _ = await mark_settled(client, campaign_id, shards, codes_,
                                                     at_ms, only_redeemed=True)
                return not_redeemed
            finally:
                await client.aclose()
        try:
            return asyncio.run(run())
        except _UNREACHABLE as exc:
            print(f"coupon-engine: warning: Redis unreachable ({exc}); the paid codes are"
                  " marked settled there by the archiver's next pass", file=sys.stderr)
            return None
    return mark


def _do_settle(ledger: Ledger, s: Settings, args: argparse.Namespace,
               url: str | None) -> int:
    summary = reconcile.settle(ledger, args.venue, Path(args.claims), Path(args.out),
                               mark=_marker(s, url), warn=_warn,
                               progress=_progress(s, f"settle {Path(args.claims).name}"))
    print(reconcile.summary_json(summary))
    return 0


def _audit_line(a: AuditRow, tz: str) -> str:
    what = a.round_id
    if a.action == "add_stock":
        what += f" {a.venue_id} +{a.units}"
    elif a.action == "reverse" and a.code:
        what += f" {a.venue_id} {codes.display(a.code)}"
    changes = ", ".join(f"{k}: {a.before.get(k)!r} -> {a.after.get(k)!r}"
                        for k in dict.fromkeys([*a.before, *a.after])
                        if a.before.get(k) != a.after.get(k))
    return (f"{rfc3339(a.at_ms, tz)}  {a.action:<9} {what}  by {a.actor}  ({changes})"
            f"  reason: {a.reason}")


def _do_audit(ledger: Ledger, s: Settings, args: argparse.Namespace,
              url: str | None) -> int:
    c = ledger.source_campaign()
    if c is None:
        raise reconcile.BadInput("the ledger holds no campaign yet; load one and run archive")
    if args.round is not None and c.round(args.round) is None:
        raise reconcile.BadInput(f"unknown round {args.round!r} in campaign {c.id}")
    rows = ledger.audit_of(c.id, args.round)
    for a in rows:
        if args.json:
            print(json.dumps({
                "id": a.event_id, "action": a.action, "round_id": a.round_id,
                "venue_id": a.venue_id, "code": codes.display(a.code) if a.code else None,
                "units": a.units, "by": a.actor, "at": rfc3339(a.at_ms, c.timezone),
                "reason": a.reason, "before": a.before, "after": a.after},
                ensure_ascii=False))
        else:
            print(_audit_line(a, c.timezone))
    if not args.json:
        print(f"{len(rows)} operator action(s)"
              + (f" in round {args.round}" if args.round else ""), file=sys.stderr)
    return 0


def _do_statement(ledger: Ledger, s: Settings, args: argparse.Namespace,
                  url: str | None) -> int:
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
        "audit", help="the operators' actions (pause, resume, close, add stock, reverse)"
                      " as the ledger records them")
    p.add_argument("--round", default=None, metavar="R", help="only this round's")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add_engine_args(p)
    p.set_defaults(func=_ledger_command(_do_audit))

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
