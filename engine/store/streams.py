"""The campaign's event streams: one per stock shard, read by the ledger archiver.

Shared by the store (the poller reports the ledger's lag) and the archiver
(which owns the consumer group and trims what it archived).
"""

from __future__ import annotations

from redis import exceptions as rex

from .connection import AnyClient
from .keys import Keys
from .loading import shard_count

# The archiver's consumer group on every stream.
GROUP = "ledger"


def shard_streams(campaign_id: str, shards: int) -> list[tuple[int, str]]:
    """(shard, stream key) of every stock shard of the campaign."""
    base = Keys(campaign_id)
    return [(s, base.of_shard(s).events) for s in range(shards)]


async def lag(client: AnyClient, campaign_id: str, shards: int | None = None) -> int:
    """Events not yet in the ledger (undelivered + pending), summed over shards
    (``shards`` read from Redis when the caller does not know it)."""
    if shards is None:
        shards = await shard_count(client, campaign_id)
    streams = shard_streams(campaign_id, shards)
    return sum([await _stream_lag(client, stream) for _, stream in streams])


async def _stream_lag(client: AnyClient, stream: str) -> int:
    try:
        groups = await client.xinfo_groups(stream)
    except rex.ResponseError:
        return 0  # no stream yet: nothing to archive
    group = next((g for g in groups if g["name"] == GROUP), None)
    if group is None:
        return int(await client.xlen(stream))
    undelivered = group.get("lag")
    if undelivered is None:
        # Redis cannot tell (e.g. after deletions); everything left in the
        # stream is at most pending or undelivered, because we trim the rest.
        return int(await client.xlen(stream))
    return int(undelivered) + int(group.get("pending") or 0)
