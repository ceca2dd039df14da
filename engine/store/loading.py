"""Loading a campaign into Redis: the first load and the allowed updates, atomically.

``campaign.plan_update`` decides what a file may change; this module applies
the plan: shards 1..S-1 first, then shard 0, which holds the document that
says the load happened (docs/cluster.md, "Stock shards").
"""

from __future__ import annotations

import logging
from typing import Any

from redis import exceptions as rex

from .. import campaign as cmp
from .. import shards as shards_mod
from ..campaign import Campaign, Overrides, UpdatePlan
from . import keys, records, scripts
from .connection import AnyClient, node_client, redis_time_ms, release
from .scripts import ClaimActiveOutcome

log = logging.getLogger("engine.store")


async def shard_count(client: AnyClient, campaign_id: str) -> int:
    """How many stock shards the loaded campaign has (1 when it was loaded unsharded)."""
    raw = await client.hget(keys.Keys(campaign_id).campaign, "shards")
    return int(raw) if raw else 1


async def active_campaign(client: AnyClient) -> Campaign | None:
    """The loaded campaign as the engine runs it (operators' overrides applied)."""
    cid = await client.get(keys.ACTIVE)
    if cid is None:
        return None
    return records.effective_campaign(await client.hgetall(keys.Keys(cid).campaign))


async def _claim_active(client: AnyClient, new_id: str, stale: str) -> None:
    script = scripts.load("claim_active")
    reply = await client.eval(script.source,
                              *scripts.flat(scripts.claim_active_call(keys.ACTIVE, new_id, stale)))
    if scripts.outcome(ClaimActiveOutcome, int(reply[0])) is ClaimActiveOutcome.HELD:
        raise cmp.CampaignError(f"this engine holds campaign {reply[1]!r}; refusing to load"
                                f" {new_id!r}")


async def load_campaign(client: AnyClient, new: Campaign,
                        shards: int = 1) -> UpdatePlan:
    """Load or update the campaign atomically; CampaignError leaves Redis untouched.

    ``shards`` > 1 splits every stock line over that many stock shards, each in
    its own slot (docs/cluster.md, "Stock shards"); the count is fixed at the
    first load, and a later load asking for another count is refused.

    ``cpn:active`` has no hash tag (on a cluster it lives in another slot than
    the campaign's keys), so it is never in the campaign's transaction:

    1. Read it; another campaign whose data exists -> refused, nothing written.
    2. WATCH the campaign hash, read the loaded version, plan the update
       (a refused plan writes nothing).
    3. Claim ``cpn:active`` by compare-and-set (a concurrent load of another
       campaign loses here, before writing anything).
    4. MULTI/EXEC the campaign's keys (one slot); retried from 2 if the hash
       changed under the WATCH.

    A crash between 3 and 4 leaves ``cpn:active`` naming a campaign with no
    data: loading that campaign again finishes the job, and loading another one
    replaces the stale name (step 1 sees no data behind it).
    """
    k = keys.Keys(new.id)
    current = await client.get(keys.ACTIVE)
    stale = ""
    if current is not None and current != new.id:
        if await client.exists(keys.Keys(current).campaign):
            raise cmp.CampaignError(
                f"this engine holds campaign {current!r}; refusing to load {new.id!r}")
        log.warning("cpn:active names campaign %r, which has no data (an interrupted"
                    " load); replacing it with %r", current, new.id)
        stale = current
    # On a cluster, WATCH/MULTI go to the primary serving the campaign's slot.
    if not 1 <= shards <= shards_mod.MAX_SHARDS:
        raise cmp.CampaignError(f"stock shards must be 1..{shards_mod.MAX_SHARDS}, got {shards}")
    tx = await node_client(client, k.campaign)
    try:
        return await _load_tagged(client, tx, new, stale, shards)
    finally:
        await release(client, tx)


def _write_shard(pipe: Any, k: keys.Keys, old: Campaign | None, new: Campaign,
                 plan: UpdatePlan, shard: int, shards: int, ov: Overrides) -> None:
    """Queue one shard's part of a load: its copy of the rounds and the quota,
    and its share of every new or changed stock line (changed lines have not
    opened, so each shard still holds exactly its share of the old stock).
    Round hashes get the rounds as run (an operator's early close kept); the
    stock deltas are the file's, so operators' additions stay on top."""
    for r in cmp.with_overrides(new, ov).rounds:
        pipe.hset(k.round(r.id), mapping=records.round_fields(r))
    for rid in plan.new_rounds:
        added = new.round(rid)
        assert added is not None
        for vid, n in added.stock.items():
            share = shards_mod.split(n, shards)[shard]
            pipe.hset(k.stock, f"{rid}:{vid}", share)
            pipe.hset(k.stats, f"initial:{rid}:{vid}", share)
    for ch in plan.changed_rounds:
        before = old.round(ch.round_id) if old is not None else None
        after = new.round(ch.round_id)
        assert before is not None and after is not None
        for vid in ch.stock_delta:
            delta = (shards_mod.split(after.stock.get(vid, 0), shards)[shard]
                     - shards_mod.split(before.stock.get(vid, 0), shards)[shard])
            pipe.hincrby(k.stock, f"{ch.round_id}:{vid}", delta)
            pipe.hincrby(k.stats, f"initial:{ch.round_id}:{vid}", delta)


async def _load_other_shards(client: AnyClient, old: Campaign | None,
                             new: Campaign, plan: UpdatePlan, shards: int,
                             ov: Overrides | None = None) -> None:
    """Apply the plan to shards 1..S-1, each in its own transaction on its own slot,
    before shard 0 (which holds the document) says the load happened. Each shard
    records the fingerprint it is at, so a load repeated after a crash between
    shards applies the plan to each shard exactly once."""
    ov = ov or Overrides()
    old_fp = old.fingerprint() if old is not None else None
    new_fp = new.fingerprint()
    for s in range(1, shards):
        k = keys.Keys(new.id, s)
        tx = await node_client(client, k.campaign)
        try:
            async with tx.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(k.campaign)
                        at = await pipe.hget(k.campaign, "fingerprint")
                        if at == new_fp:
                            await pipe.reset()
                            break
                        if at != old_fp:
                            raise cmp.CampaignError(
                                f"stock shard {s} holds campaign version {str(at)[:12]}, not the"
                                f" loaded {str(old_fp)[:12]}; it cannot be updated safely")
                        pipe.multi()
                        _write_shard(pipe, k, old, new, plan, s, shards, ov)
                        pipe.hset(k.campaign, mapping=records.campaign_fields(new, s, shards))
                        await pipe.execute()
                        break
                    except rex.WatchError:
                        continue
        finally:
            await release(client, tx)


async def _load_tagged(client: AnyClient, tx: AnyClient, new: Campaign,
                       stale: str, shards: int) -> UpdatePlan:
    k = keys.Keys(new.id)
    async with tx.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(k.campaign)
                fields = await pipe.hgetall(k.campaign)
                doc, had = fields.get("doc"), fields.get("shards")
                old = cmp.from_json(doc) if doc else None
                # Operators' overrides (close.lua, add_stock.lua) change this hash, so
                # one landing now fails the WATCH and the load is planned again.
                ov = records.overrides_from(fields)
                if old is not None and int(had or 1) != shards:
                    raise cmp.CampaignError(
                        f"campaign {new.id} was loaded with {int(had or 1)} stock shard(s);"
                        f" it cannot be reloaded with {shards}")
                now = await redis_time_ms(pipe)
                plan = cmp.plan_update(old, new, now, ov)
                await _claim_active(client, new.id, stale)
                if plan.noop:
                    await pipe.reset()
                    return plan
                await _load_other_shards(client, old, new, plan, shards, ov)
                pipe.multi()
                pipe.hset(k.campaign, mapping=records.campaign_fields(new, 0, shards))
                _write_shard(pipe, k, old, new, plan, 0, shards, ov)
                await pipe.execute()
                return plan
            except rex.WatchError:
                continue
