"""The campaign's event streams: one per stock shard, read by the ledger archiver.

Shared by the store (the poller reports the ledger's lag) and the archiver
(which reads them after its ledger's cursor and trims what it archived).
"""

from __future__ import annotations

from .connection import AnyClient
from .keys import Keys
from .loading import shard_count

# The consumer group the archiver read through before the ledger kept its own cursor
# (schema v5). Still read once, when a stream is first archived the new way, and by
# the guard while a Redis archived by an older version still has it; never created.
LEGACY_GROUP = "ledger"


def shard_streams(campaign_id: str, shards: int) -> list[tuple[int, str]]:
    """(shard, stream key) of every stock shard of the campaign."""
    base = Keys(campaign_id)
    return [(s, base.of_shard(s).events) for s in range(shards)]


async def lag(client: AnyClient, campaign_id: str, shards: int | None = None) -> int:
    """Events not yet in the ledger, summed over shards (``shards`` read from Redis
    when the caller does not know it).

    The archiver trims a stream up to what it committed right after every commit, so
    what a stream holds is what the ledger lacks: its length. (A crash between a
    commit and its trim overstates it by that batch until the next pass trims.)
    """
    if shards is None:
        shards = await shard_count(client, campaign_id)
    streams = shard_streams(campaign_id, shards)
    return sum([int(await client.xlen(stream)) for _, stream in streams])
