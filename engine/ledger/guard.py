"""The one guard against loading or serving a campaign over lost state.

The ledger only ever holds what Redis held: the archiver copies each stream entry
into it and acknowledges the entry afterwards. So a Redis that serves a campaign
must remember at least what the ledger archived of it, and a ledger that archives
this Redis must hold what Redis says was archived. When either is
not so, one of them went back in time, and serving would put on sale again what
the ledger records as sold, or settle from a ledger that has forgotten payments.

What is checked, per campaign and per stock shard (``refuse_lost_state``):

1. Redis holds no state of the campaign while the ledger has events of it: Redis
   lost everything (no append-only file left). Loading the file would reset stock
   and quotas. -> ``coupon-engine restore``.
2. Redis holds the campaign but its stream says it never held what the ledger
   archived: the ledger's last event id of a shard is past the stream's
   ``last-generated-id``, or the ledger counts more events of the shard than the
   stream's ``entries-added``, or the stream is gone. Redis was restarted from an
   older copy (an old AOF or snapshot), or the ledger is another engine's.
   -> ``coupon-engine restore --force`` (it archives what the stream holds first).
3. With the archiver on (``COUPON_ARCHIVER``, so this data directory's ledger is
   meant to be the archive of this Redis): Redis says an entry past the ledger's
   last one was archived (the shard's ``archived`` key, which the archiver sets
   after each commit; for a Redis last archived by a version that read through
   the consumer group ``ledger``, what that group acknowledged). Archived means
   committed to *a* ledger, so this one is an older copy (a backup restored) or
   another data directory's.

A different campaign id proves nothing (a new season in an old data directory),
and neither does a different campaign document: updates and operator actions
change the document, and the ledger's copy lags by an archive pass. The event
positions are what cannot go backwards.

``serve`` and ``campaign load`` call ``load_checked`` (or ``refuse_lost_state``
when they only serve what is loaded); nothing else in the engine calls
``store.load_campaign`` (tests/test_lost_state.py checks that).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from redis import exceptions as rex

from ..campaign import Campaign, UpdatePlan
from ..config import Settings
from ..store import keys
from ..store.connection import AnyClient
from ..store.loading import load_campaign, shard_count
from ..store.streams import LEGACY_GROUP
from .db import Ledger, stream_id_key

RESTORE_DOC = '(docs/ledger.md, "Restore")'


class LostState(Exception):
    """Loading or serving now would go back in time; the message names the fix."""


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """What a shard's stream in Redis says it ever held, and what its archiver
    group acknowledged (None: Redis cannot tell)."""

    exists: bool
    last_generated: tuple[int, int] = (0, 0)
    entries_added: int | None = None
    acknowledged: tuple[int, int] | None = None


def _fmt(sid: tuple[int, int]) -> str:
    return f"{sid[0]}-{sid[1]}"


def ledger_positions(path: Path, campaign_id: str) -> dict[int, tuple[str, int]]:
    """shard -> (last archived stream id, events) from the ledger file, if there is one."""
    if not path.is_file():
        return {}
    with Ledger(path) as led:
        return led.shard_positions(campaign_id)


async def stream_position(client: AnyClient, k: keys.Keys) -> StreamPosition:
    stream = k.events
    try:
        info = await client.xinfo_stream(stream)
    except rex.ResponseError:  # no such key
        return StreamPosition(exists=False)
    added = info.get("entries-added")
    archived = await client.get(k.archived)
    acked = stream_id_key(archived) if archived else await _legacy_acknowledged(client, stream)
    return StreamPosition(True, stream_id_key(info["last-generated-id"]),
                          None if added is None else int(added), acked)


async def _legacy_acknowledged(client: AnyClient, stream: str) -> tuple[int, int] | None:
    """What the old archiver's consumer group acknowledged, if the stream still has it."""
    try:
        groups = await client.xinfo_groups(stream)
    except rex.ResponseError:
        return None
    group = next((g for g in groups if g.get("name") == LEGACY_GROUP), None)
    if group is None or not group.get("last-delivered-id"):
        return None
    delivered = stream_id_key(group["last-delivered-id"])
    if not int(group.get("pending") or 0):
        return delivered  # nothing pending: everything delivered was acknowledged
    summary = await client.xpending(stream, LEGACY_GROUP)
    top = summary.get("max") if summary else None
    # The last delivered entry is not pending: it was acknowledged.
    return delivered if top and stream_id_key(top) < delivered else None


async def refuse_lost_state(client: AnyClient, settings: Settings, campaign_id: str) -> None:
    """Raise ``LostState`` when Redis or the ledger of ``settings.data_dir`` went back
    in time for this campaign (module docstring); return when loading or serving it
    is safe. Reads only."""
    path = settings.ledger_path
    if not path.is_file():
        return  # no ledger here: nothing to compare with (a front end on another host)
    history = await asyncio.to_thread(ledger_positions, path, campaign_id)
    k = keys.Keys(campaign_id)
    if not await client.exists(k.campaign):
        if history:
            total = sum(n for _, n in history.values())
            raise LostState(
                f"Redis holds no campaign {campaign_id}, but the ledger {path} has {total}"
                f" events of it: Redis has lost its state, and loading the campaign would sell"
                f" its stock a second time. Run 'coupon-engine restore' first {RESTORE_DOC}")
        return  # a first load
    shards = await shard_count(client, campaign_id)
    for shard in range(max(shards, max(history, default=0) + 1)):
        last, count = history.get(shard, (None, 0))
        where = f"stock shard {shard}" if shards > 1 or shard else "the event stream"
        behind = (f"Redis holds campaign {campaign_id}, but the ledger {path} has archived"
                  f" {count} events of {where} up to {last}")
        fix = (": Redis was restarted from an older copy (AOF or snapshot) and would sell"
               " again what the ledger records as sold, or the ledger belongs to another"
               " engine. If this is the engine's Redis, stop every serve and run"
               f" 'coupon-engine restore --force' {RESTORE_DOC}")
        if shard >= shards:
            raise LostState(f"{behind}, and the campaign in Redis has {shards} shard(s){fix}")
        pos = await stream_position(client, k.of_shard(shard))
        if last is not None:
            if not pos.exists:
                raise LostState(f"{behind}, and Redis has no such stream{fix}")
            if stream_id_key(last) > pos.last_generated:
                raise LostState(f"{behind}, and Redis's stream ends at"
                                f" {_fmt(pos.last_generated)}{fix}")
            if pos.entries_added is not None and count > pos.entries_added:
                raise LostState(f"{behind}, and Redis's stream ever held"
                                f" {pos.entries_added}{fix}")
        archived = stream_id_key(last) if last is not None else (0, 0)
        if settings.archiver and pos.acknowledged is not None and pos.acknowledged > archived:
            raise LostState(
                f"this Redis's archiver archived (acknowledged) events of {where} of campaign"
                f" {campaign_id} up to {_fmt(pos.acknowledged)}, but the ledger {path} has"
                f" {'none' if last is None else 'them only up to ' + last}: they were committed"
                " to another ledger, so this one is an older copy or another data directory's,"
                " and settling from it could pay codes twice. Use the data directory whose"
                " ledger archives this Redis (or COUPON_ARCHIVER=0 on a front end that does"
                " not archive)")


async def load_checked(client: AnyClient, settings: Settings, campaign: Campaign,
                       shards: int | None = None) -> UpdatePlan:
    """Every command that writes a campaign into Redis goes through here: the guard,
    then the atomic load (``store.load_campaign``; a refusal writes nothing)."""
    await refuse_lost_state(client, settings, campaign.id)
    return await load_campaign(client, campaign,
                               settings.stock_shards if shards is None else shards)
