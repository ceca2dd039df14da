"""Moves the campaign's event streams into the ledger, each event exactly once.

A campaign loaded with S stock shards has S streams, one per shard and each in
its own Redis Cluster slot (keys.Keys.of_shard). Each is archived on its own,
with its own consumer group and one call per stream (never a multi-key
XREADGROUP, which a cluster would refuse as CROSSSLOT). A coupon's whole life
is in one shard's stream, so per-stream order is all the ledger needs; the
ledger's event id names the shard (ledger.ledger_event_id) because two
streams can hand out the same entry id.

Order of operations per batch, and why it is crash-safe:

1. XREADGROUP: the entries become pending for our consumer (Redis keeps them).
2. One SQLite transaction inserts them (INSERT OR IGNORE on the stream id),
   COMMIT with synchronous=FULL.
3. XACK.

A crash before 2 leaves the entries pending: the next run reads its own
pending entries (id 0) first, or claims another consumer's with XAUTOCLAIM.
A crash between 2 and 3 makes the next run insert them again, which the
primary key turns into a no-op. The stream is trimmed only below the oldest
entry that is pending or not yet delivered, so nothing unarchived is dropped.

For the crash tests, ``crash_point`` ("after_read" or "after_commit",
optionally ":N" for the N-th batch) SIGKILLs the process at that point. The
CLI takes it from ``COUPON_ARCHIVER_CRASH_POINT``; never set it in production.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import exceptions as rex

from .. import campaign as cmp
from ..crashpoint import CrashPoint
from ..store import keys
from ..store.connection import AnyClient, open_client
from ..store.loading import shard_count
from ..store.settled import mark_settled
from ..store.streams import GROUP, shard_streams
from .db import Ledger, ledger_event_id

log = logging.getLogger("engine.archiver")

# One stable name: a restarted archiver finds its own unfinished batch with id 0.
CONSUMER = "ledger-archiver"
BATCH = 1000
# Another consumer's entry idle this long is presumed abandoned and claimed.
MIN_IDLE_MS = 60_000
# Redis (or one cluster node) not answering: retried on the next pass.
UNREACHABLE = (rex.ConnectionError, rex.TimeoutError, OSError, rex.ClusterDownError,
               rex.RedisClusterException)


async def ensure_group(client: AnyClient, stream: str) -> None:
    try:
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except rex.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


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


async def _write(ledger: Ledger, cid: str, shard: int,
                 entries: list[tuple[str, dict[str, str]]]) -> int:
    # Trimmed entries come back from a pending read with no fields; they were
    # acknowledged long ago by definition of our trim rule, so only ack them.
    live = [(ledger_event_id(shard, eid), f) for eid, f in entries if f]
    return await asyncio.to_thread(ledger.insert_events, cid, live)


async def _process(client: AnyClient, ledger: Ledger, cid: str, shard: int,
                   stream: str, entries: list[tuple[str, dict[str, str]]],
                   crash: CrashPoint) -> int:
    crash.at("after_read")
    new = await _write(ledger, cid, shard, entries)
    crash.at("after_commit")
    await client.xack(stream, GROUP, *[eid for eid, _ in entries])
    return new


async def archive_once(client: AnyClient, ledger: Ledger, consumer: str = CONSUMER, *,
                       campaign_id: str | None = None, batch: int = BATCH,
                       min_idle_ms: int = MIN_IDLE_MS, crash_point: str | None = None,
                       trim: bool = True,
                       progress: Callable[[int], None] | None = None) -> int:
    """Drain every shard's stream into the ledger; returns how many events were new.
    ``progress`` is told the running count of entries handled, after each batch."""
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
            total += await _archive_stream(client, ledger, cid, shard, stream, consumer,
                                           batch, min_idle_ms, crash, tick)
            if trim:
                await trim_archived(client, stream)
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
                          stream: str, consumer: str, batch: int, min_idle_ms: int,
                          crash: CrashPoint, tick: Callable[[int], None]) -> int:
    """One shard's stream: own pending entries, then abandoned ones, then new ones."""
    await ensure_group(client, stream)
    total = 0

    # 1. Our own unfinished batches (read before a crash, never acked).
    start = "0"
    while True:
        resp = await client.xreadgroup(GROUP, consumer, {stream: start}, count=batch)
        entries = _entries(resp)
        if not entries:
            break
        total += await _process(client, ledger, cid, shard, stream, entries, crash)
        tick(len(entries))
        start = entries[-1][0]

    # 2. Entries another (dead) consumer read and never acked.
    cursor = "0-0"
    while True:
        res = await client.xautoclaim(stream, GROUP, consumer, min_idle_ms, cursor,
                                      count=batch)
        cursor, claimed = res[0], [(eid, f or {}) for eid, f in res[1]]
        if claimed:
            total += await _process(client, ledger, cid, shard, stream, claimed, crash)
            tick(len(claimed))
        if cursor in ("0-0", b"0-0"):
            break

    # 3. New entries.
    while True:
        resp = await client.xreadgroup(GROUP, consumer, {stream: ">"}, count=batch)
        entries = _entries(resp)
        if not entries:
            break
        total += await _process(client, ledger, cid, shard, stream, entries, crash)
        tick(len(entries))
    return total


def _entries(resp: Any) -> list[tuple[str, dict[str, str]]]:
    """Flatten an XREADGROUP reply for one stream: RESP2 gives
    ``[[stream, entries]]``, RESP3 ``{stream: [entries]}``."""
    if not resp:
        return []
    if isinstance(resp, dict):
        lists = [lst for value in resp.values() for lst in value]
    else:
        lists = [entries for _, entries in resp]
    return [(eid, fields or {}) for entries in lists for eid, fields in entries]


def _parse_id(eid: str) -> tuple[int, int]:
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq or 0)


def _next_id(eid: str) -> str:
    ms, seq = _parse_id(eid)
    return f"{ms}-{seq + 1}"


async def trim_archived(client: AnyClient, stream: str) -> int:
    """XTRIM MINID to the oldest entry that is pending or not yet delivered.

    last-delivered-id is read before the pending summary: an entry delivered
    in between is then newer than last-delivered and is kept either way.
    """
    groups = await client.xinfo_groups(stream)
    group = next((g for g in groups if g["name"] == GROUP), None)
    if group is None:
        return 0
    last = group["last-delivered-id"]
    if last in ("0-0", None):
        return 0
    minid = _next_id(last)
    pending = await client.xpending(stream, GROUP)
    if pending and pending.get("pending"):
        low = pending["min"]
        if _parse_id(low) < _parse_id(minid):
            minid = low
    return await client.xtrim(stream, minid=minid, approximate=False)


async def trim_campaign(client: AnyClient, campaign_id: str) -> int:
    """trim_archived on every shard's stream; returns the entries removed."""
    streams = shard_streams(campaign_id, await shard_count(client, campaign_id))
    return sum([await trim_archived(client, stream) for _, stream in streams])


async def archive_follow(client: AnyClient, ledger: Ledger, stop: asyncio.Event,
                         consumer: str = CONSUMER, *, interval_s: float = 0.5,
                         batch: int = BATCH, min_idle_ms: int = MIN_IDLE_MS,
                         crash_point: str | None = None) -> int:
    """Archive until ``stop`` is set; Redis outages are logged and retried."""
    total = 0
    backoff = interval_s
    while not stop.is_set():
        try:
            total += await archive_once(client, ledger, consumer, batch=batch,
                                        min_idle_ms=min_idle_ms, crash_point=crash_point)
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
