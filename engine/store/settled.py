"""Settled codes in Redis: what `settle` paid, marked on the coupons so that an operator
can no longer reverse their redemptions (``lua/mark_settled.lua``, ``lua/reverse.lua``).

The ledger decides what is paid; this is its copy in Redis, written by `settle` before
it commits (only coupons still redeemed, so a redemption reversed meanwhile is not paid)
and by the archiver for settlements recorded while Redis was away (any coupon: those
were paid already).
"""

from __future__ import annotations

from typing import Any

from redis import exceptions as rex

from .. import shards as shards_mod
from . import keys, scripts
from .connection import AnyClient

CHUNK = 500


async def mark_settled(client: AnyClient, campaign_id: str, shards: int, codes_: list[str],
                       at_ms: int, only_redeemed: bool) -> tuple[set[str], set[str]]:
    """Mark the (canonical) codes settled at ``at_ms``; returns the codes not marked:
    (not redeemed any more, with ``only_redeemed``; unknown to Redis). A code marked
    before keeps its first mark."""
    script = scripts.load("mark_settled")
    by_shard: dict[int, list[str]] = {}
    for c in codes_:
        by_shard.setdefault(shards_mod.code_shard(c, shards), []).append(c)
    not_redeemed: set[str] = set()
    unknown: set[str] = set()
    for shard, some in sorted(by_shard.items()):
        k = keys.Keys(campaign_id, shard)
        for i in range(0, len(some), CHUNK):
            chunk = some[i:i + CHUNK]
            reply = await _run(client, script, scripts.mark_settled_call(
                k, chunk, at_ms, only_redeemed))
            for pos in (int(x) for x in reply[2:]):
                if pos > 0:
                    not_redeemed.add(chunk[pos - 1])
                else:
                    unknown.add(chunk[-pos - 1])
    return not_redeemed, unknown


async def _run(client: AnyClient, script: scripts.Script, call: scripts.Call) -> Any:
    """EVALSHA, loading the script when the server lacks it. Redis errors are left as
    redis-py raises them: the archiver and `settle` handle an unreachable Redis."""
    args = scripts.flat(call)
    try:
        return await client.evalsha(script.sha, *args)
    except rex.NoScriptError:
        return await client.eval(script.source, *args)
