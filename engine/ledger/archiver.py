"""Moves the campaign's event streams into the ledger, each event exactly once.

A campaign loaded with S stock shards has S streams, one per shard and each in
its own Redis Cluster slot (keys.Keys.of_shard). Each is archived on its own,
one command per stream (never a multi-key command, which a cluster would refuse
as CROSSSLOT). A coupon's whole life is in one shard's stream, so per-stream
order is all the ledger needs; the ledger's event id names the shard
(ledger.ledger_event_id) because two streams can hand out the same entry id.

The ledger is its own cursor: its ``cursors`` table holds, per (campaign, shard),
the last stream id archived, written in the transaction that archived it. Order
of operations per batch, and why it is crash-safe:

1. XRANGE after the cursor (exclusive), COUNT ``batch``.
2. One SQLite transaction inserts the entries (INSERT OR IGNORE on the stream id)
   and moves the cursor to the batch's last id; COMMIT with synchronous=FULL.
3. SET the shard's ``archived`` key to that id (what the guard reads), then
   XTRIM MINID just past it: only what is committed leaves Redis.

A crash before 2 leaves the cursor where it was: the batch is read again. A
crash after 2 leaves the batch in Redis but behind the cursor: it is not read
again, and the next pass trims it first. There is no consumer group, pending
list or XACK: Redis does no per-entry bookkeeping (XREADGROUP propagated an
XCLAIM per entry to the AOF), and exactly-once follows from the transaction.

A shard the ledger has no cursor for (a new ledger, or one written while the
archiver read through the consumer group ``ledger``, before schema v5) is read
from the start of what its stream holds. The old archiver trimmed only below
the oldest entry that was pending or not yet delivered, so that covers all it
had not acknowledged; entries already in the ledger are skipped by the primary
key. Once that shard has a cursor the old group is destroyed.

For the crash tests, ``crash_point`` ("after_read" or "after_commit",
optionally ":N" for the N-th batch) SIGKILLs the process at that point. The
CLI takes it from ``COUPON_ARCHIVER_CRASH_POINT``; never set it in production.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from redis import exceptions as rex

from .. import campaign as cmp
from ..crashpoint import CrashPoint
from ..store import keys
from ..store.connection import AnyClient, open_client
from ..store.loading import shard_count
from ..store.settled import mark_settled
from ..store.streams import LEGACY_GROUP, shard_streams
from .db import Ledger, ledger_event_id, stream_id_key

log = logging.getLogger("engine.archiver")

# Entries per XRANGE and per SQLite transaction. Bigger batches dirty fewer pages of
# the coupons' random code index per event (docs/benchmarks.md, issue 19).
BATCH = 5000
# Redis (or one cluster node) not answering: retried on the next pass.
UNREACHABLE = (rex.ConnectionError, rex.TimeoutError, OSError, rex.ClusterDownError,
               rex.RedisClusterException)

Entries = list[tuple[str, dict[str, str]]]


async def sync_campaign(client: AnyClient, ledger: Ledger) -> str | None:
    """Copy the active campaign document (and its shard count) into the ledger;
    returns its id."""
    cid = await client.get(keys.ACTIVE)
    if cid is None:
        return None
    doc = await client.hget(keys.Keys(cid).campaign, "doc")
    if doc:
        await asyncio.to_thread(ledger.save_campaign, cmp.from_json(doc))
    # Restore needs the count after Redis lost it, so the ledger keeps a copy.
    await asyncio.to_thread(ledger.save_shard_count, cid, await shard_count(client, cid))
    return cid


async def archive_once(client: AnyClient, ledger: Ledger, *,
                       campaign_id: str | None = None, batch: int = BATCH,
                       crash_point: str | None = None, trim: bool = True,
                       progress: Callable[[int], None] | None = None) -> int:
    """Drain every shard's stream into the ledger; returns how many events were new.
    ``progress`` is told the running count of entries handled, after each batch.
    ``trim=False`` leaves archived entries in Redis (tests)."""
    crash = CrashPoint(crash_point, ("after_read", "after_commit"))
    handled = 0

    def tick(n: int) -> None:
        nonlocal handled
        handled += n
        if progress is not None:
            progress(handled)

    cid = await sync_campaign(client, ledger)
    cid = campaign_id or cid
    if cid is None:
        return 0
    total = 0
    unreachable: Exception | None = None
    for shard, stream in shard_streams(cid, await shard_count(client, cid)):
        # On a cluster each shard is on its own primary: one that is down must
        # not hold back the others' events, so it is reported after the rest.
        try:
            total += await _archive_stream(client, ledger, cid, shard, stream, batch,
                                           crash, tick, trim)
        except UNREACHABLE as exc:
            unreachable = unreachable or exc
    if unreachable is not None:
        raise unreachable
    await sync_settled(client, ledger, cid, await shard_count(client, cid))
    return total


def _synced_key(campaign_id: str) -> str:
    return f"settled_synced:{campaign_id}"


async def sync_settled(client: AnyClient, ledger: Ledger, campaign_id: str,
                       shards: int) -> int:
    """Mark in Redis the codes `settle` recorded since the last pass (it marks them
    itself when Redis is reachable; this covers a settle that ran with Redis away), so
    an operator cannot reverse a redemption already paid. Returns how many were new."""
    since = await asyncio.to_thread(ledger.meta_int, _synced_key(campaign_id))
    rows = await asyncio.to_thread(ledger.settlements_after, campaign_id, since)
    if not rows:
        return 0
    by_time: dict[int, list[str]] = {}
    for _rowid, code, at in rows:
        by_time.setdefault(at, []).append(code)
    for at, some in by_time.items():
        _, unknown = await mark_settled(client, campaign_id, shards, some, at,
                                        only_redeemed=False)
        if unknown:
            log.warning("archiver: %d settled code(s) are not in Redis (first: %s)",
                        len(unknown), sorted(unknown)[0])
    await asyncio.to_thread(ledger.set_meta, _synced_key(campaign_id), str(rows[-1][0]))
    return len(rows)


async def _archive_stream(client: AnyClient, ledger: Ledger, cid: str, shard: int,
                          stream: str, batch: int, crash: CrashPoint,
                          tick: Callable[[int], None], trim: bool) -> int:
    """One shard's stream, from the ledger's cursor to its end."""
    after = await asyncio.to_thread(ledger.cursor, cid, shard)
    legacy = after is None
    if after is not None and trim:
        # A crash between a commit and its trim left that batch in Redis.
        await _trim_through(client, stream, after)
    total = 0
    while True:
        entries = await read_after(client, stream, after, batch)
        if not entries:
            break
        crash.at("after_read")
        after = entries[-1][0]
        rows = [(ledger_event_id(shard, eid), f) for eid, f in entries]
        total += await asyncio.to_thread(ledger.insert_events, cid, rows, (shard, after))
        crash.at("after_commit")
        await _release(client, keys.Keys(cid, shard), after, trim)
        tick(len(entries))
        if len(entries) < batch:
            break  # the end of the stream: spares one empty read per pass
    if legacy and after is not None:
        await _drop_legacy_group(client, stream)
    return total


async def read_after(client: AnyClient, stream: str, after: str | None,
                     count: int) -> Entries:
    """Up to ``count`` entries of ``stream`` after the id ``after`` (exclusive; None:
    from the first entry), in stream order."""
    start = "-" if after is None else f"({after}"
    got: Entries = await client.xrange(stream, min=start, max="+", count=count)
    return got


async def _release(client: AnyClient, k: keys.Keys, archived: str, trim: bool) -> None:
    """Tell Redis the entries up to ``archived`` are in the ledger, and let it drop them
    (two round trips per batch of thousands: not worth a pipeline)."""
    await client.set(k.archived, archived)
    if trim:
        await _trim_through(client, k.events, archived)


async def _drop_legacy_group(client: AnyClient, stream: str) -> None:
    """The old archiver's consumer group: its pending entries are in the ledger now
    (everything the stream held was read), and nothing reads it any more."""
    try:
        await client.xgroup_destroy(stream, LEGACY_GROUP)
    except rex.ResponseError:
        pass  # no stream: nothing to drop


async def _trim_through(client: AnyClient, stream: str, eid: str) -> int:
    """Drop ``stream``'s entries up to and including ``eid``, exactly (an approximate
    trim could leave archived entries in the lag); returns how many went."""
    ms, seq = stream_id_key(eid)
    return int(await client.xtrim(stream, minid=f"{ms}-{seq + 1}", approximate=False))


async def trim_archived(client: AnyClient, ledger: Ledger, campaign_id: str, shard: int
                        ) -> int:
    """XTRIM MINID just past the shard's cursor in ``ledger``: drops what is archived,
    keeps everything else. Returns the entries removed."""
    after = await asyncio.to_thread(ledger.cursor, campaign_id, shard)
    if after is None:
        return 0
    stream = keys.Keys(campaign_id, shard).events
    return await _trim_through(client, stream, after)


async def trim_campaign(client: AnyClient, ledger: Ledger, campaign_id: str) -> int:
    """trim_archived on every shard's stream; returns the entries removed."""
    shards = await shard_count(client, campaign_id)
    return sum([await trim_archived(client, ledger, campaign_id, s) for s in range(shards)])


async def archive_follow(client: AnyClient, ledger: Ledger, stop: asyncio.Event, *,
                         interval_s: float = 0.5, batch: int = BATCH,
                         crash_point: str | None = None) -> int:
    """Archive until ``stop`` is set; Redis outages are logged and retried."""
    total = 0
    backoff = interval_s
    while not stop.is_set():
        try:
            total += await archive_once(client, ledger, batch=batch,
                                        crash_point=crash_point)
            backoff = interval_s
        except UNREACHABLE as exc:
            log.warning("archiver: Redis unavailable (%s); retrying", exc)
            backoff = min(backoff * 2, 10.0)
        except Exception:
            # A background task that dies silently stops the ledger; keep trying
            # and make the failure loud instead.
            log.exception("archiver: pass failed; retrying")
            backoff = min(backoff * 2, 10.0)
        try:
            await asyncio.wait_for(stop.wait(), timeout=backoff)
        except TimeoutError:
            pass
    return total


async def run_in_background(redis_url: str, ledger_path: Path | str, stop: asyncio.Event,
                            campaign_id: str | None = None, *,
                            interval_s: float = 0.5, cluster: bool = False) -> int:
    """What ``serve`` runs as a background task: its own connection and ledger.

    ``campaign_id`` is accepted for symmetry; the active campaign is read from
    Redis on every pass so a newly loaded campaign is picked up.
    """
    del campaign_id
    client = open_client(redis_url, cluster=cluster)
    ledger = Ledger(ledger_path)
    try:
        return await archive_follow(client, ledger, stop, interval_s=interval_s)
    finally:
        ledger.close()
        await client.aclose()
