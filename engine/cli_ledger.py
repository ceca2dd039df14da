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
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from redis import exceptions as rex

from . import archiver, reconcile, restore
from . import campaign as cmp
from .config import Settings, from_env
from .embedded import EmbeddedRedisError, ensure_running
from .ledger import Ledger
from .redisconn import open_client
from .shards import MAX_SHARDS

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


class _Refused(Exception):
    """Bad input for restore: exit 2 with this reason."""


def _restore_campaign(ledger: Ledger, path: str | None) -> cmp.Campaign:
    """The campaign to rebuild: the ledger's copy (what Redis last served), or the
    file given when the ledger has none. A file that differs from the ledger's
    copy is refused: restore that copy, then ``campaign load`` the file, which
    applies the rules for changing a loaded campaign."""
    if path is None:
        c = ledger.campaign()
        if c is None:
            raise _Refused("the ledger holds no campaign document; pass --campaign FILE")
        return c
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise _Refused(f"cannot read {path}: {exc.strerror}") from None
    try:
        from_file = cmp.parse_campaign(text)
    except cmp.CampaignError as exc:
        raise _Refused(str(exc)) from None
    kept = ledger.campaign(from_file.id)
    if kept is not None and kept != from_file:
        raise _Refused(f"{path} differs from the ledger's copy of campaign {from_file.id}; run"
                       " restore without --campaign, then `coupon-engine campaign load"
                       f" {path}` to apply the change")
    return from_file


def _restore_summary(t: restore.Target, verb: str = "restored") -> str:
    r = t.report
    lines = [
        f"{verb} campaign {t.campaign_id}: {r.events} ledger event(s), {r.coupons} coupon(s)"
        f" ({r.redeemed} redeemed, {r.void} void), {r.members} member(s),"
        f" {r.idempotency_restored} idempotency record(s)"
        f" ({r.idempotency_expired} expired, not restored)",
        f"event stream resumes after {r.last_event_id or '0-0'}; the archiver's group"
        f" '{archiver.GROUP}' is positioned there",
    ]
    if t.shards > 1:
        lines.append(f"{t.shards} stock shards: each line's remaining stock split evenly over"
                     " them; each shard's stream resumes after its own last archived event")
    if r.grants_without_key_record:
        lines.append(f"warning: {r.grants_without_key_record} recent grant(s) were archived"
                     " before grant events carried the Idempotency-Key; their replay records"
                     " are not rebuilt")
    lines += [f"warning: {w}" for w in r.warnings]
    lines.append("note: venue API keys are not in the ledger; issue new ones with"
                 " `coupon-engine token venue VENUE_ID` for each venue")
    return "\n".join(lines)


def _shards(ledger: Ledger, campaign_id: str, declared: int | None,
            in_redis: int = 1) -> int:
    """The stock shard count restore rebuilds with (restore.resolve_shards)."""
    return restore.resolve_shards(
        campaign_id, {"the ledger": ledger.shard_count(campaign_id), "Redis": in_redis},
        ledger.event_shards(campaign_id), declared)


async def _restore(url: str, ledger: Ledger, s: Settings, args: argparse.Namespace) -> int:
    # Single Redis only: restore writes cpn:active in the same MULTI as the campaign keys.
    client = open_client(url, connect_timeout=5)
    try:
        c = _restore_campaign(ledger, args.campaign)
        from .store import shard_count
        shards = _shards(ledger, c.id, args.shards, await shard_count(client, c.id))
        existing = await restore.inspect(client, c.id, shards)
        why = restore.check_target(existing, c.id, args.force)
        if why:
            raise _Refused(why)
        if existing.interrupted:
            print("a previous restore of this campaign did not finish; starting over")
        elif not existing.empty:
            # --force over live state: whatever its stream holds goes to the ledger first.
            n = await archiver.archive_once(client, ledger, campaign_id=c.id)
            print(f"--force: archived {n} new event(s) from the existing stream first")
            c = _restore_campaign(ledger, args.campaign)
        from .store import redis_time_ms
        now = await redis_time_ms(client)
        events = await asyncio.to_thread(ledger.events_of, c.id)
        target = restore.build(c, events, now, s.idempotency_ttl_s, shards)
        await restore.apply(client, target, batch=args.batch,
                            crash_point=os.environ.get(restore.CRASH_ENV) or None)
        print(_restore_summary(target))
        return 0
    finally:
        await client.aclose()


def cmd_restore(args: argparse.Namespace) -> int:
    s = _settings(args)
    if args.batch < 1:
        return _fail("--batch must be positive")
    if args.shards is not None and not 1 <= args.shards <= MAX_SHARDS:
        return _fail(f"--shards must be 1..{MAX_SHARDS}")
    if not s.ledger_path.is_file():
        return _fail(f"no ledger at {s.ledger_path}; restore rebuilds Redis from it")
    try:
        with Ledger(s.ledger_path) as ledger:
            if args.dry_run:
                from .domain import utc_now_ms
                c = _restore_campaign(ledger, args.campaign)
                target = restore.build(c, ledger.events_of(c.id), utc_now_ms(),
                                       s.idempotency_ttl_s,
                                       _shards(ledger, c.id, args.shards))
                print("dry run, nothing written")
                print(_restore_summary(target, "would restore"))
                return 0
            with _redis_url(s, required=True) as url:
                assert url is not None
                return asyncio.run(_restore(url, ledger, s, args))
    except (_Refused, restore.RestoreError) as exc:
        return _fail(str(exc))
    except EmbeddedRedisError as exc:
        return _fail(str(exc), 1)
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        return _fail(f"cannot reach Redis: {exc}", 1)


def cmd_report(args: argparse.Namespace) -> int:
    """The round report (engine/report.py): the ledger only, never Redis."""
    from . import report
    s = _settings(args)
    try:
        summary = report.run(s.ledger_path, args.round, Path(args.out))
    except report.ReportError as exc:
        return _fail(str(exc))
    zh, en = report.summary_text(summary)
    print(zh)
    print(en)
    print(f"written: {Path(args.out) / 'report.html'} (and its PNG and CSV files)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None,
                   help="Redis URL (default: COUPON_REDIS_URL, else the embedded Redis)")
    p.add_argument("--redis-cluster", action="store_true",
                   help="the --redis-url is a seed node of a Redis Cluster")
    p.add_argument("--data-dir", default=None,
                   help="data directory (default: COUPON_DATA_DIR, else ./var)")


def register(subparsers: Any) -> None:
    """Add archive / reconcile / settle / statement / report / restore to the main parser."""
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
    _common(p)
    p.set_defaults(func=cmd_restore)


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
