"""Writing a rebuilt campaign into Redis: the steps of ``coupon-engine restore`` that
touch Redis. ``ledger/replay.py`` computes the state (a ``Target``: every key and
its value) from the ledger; this module inspects the target Redis and writes it.

``apply`` is safe to rerun after a crash at any point: it first sets a marker
key and removes ``cpn:active`` (one MULTI), so a half-written campaign is never
"loaded"; it then clears the campaign's keys and writes the data in pipelined
batches; one final MULTI writes the campaign, rounds, stock and stats, sets
``cpn:active`` and deletes the marker. A rerun that finds the marker starts
over.

The event stream is not refilled (its entries are already in the ledger): it
is recreated empty, with its last id (XSETID) at the ledger's last event id, so
new XADD ids sort after everything archived; the archiver reads after its
ledger's cursor, so only new entries. The shard's ``archived`` key is set to
that id, as the archiver leaves it.

Venue API keys (``vkeys``) are not in the ledger and are not rebuilt; with
``--force`` over a Redis that still has them, they are left as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..crashpoint import CrashPoint
from . import keys as K
from .streams import LEGACY_GROUP

CRASH_ENV = "COUPON_RESTORE_CRASH_POINT"
DEFAULT_BATCH = 5000


@dataclass
class Report:
    """What a rebuilt state holds, for the operator's summary."""

    events: int = 0
    coupons: int = 0
    issued: int = 0
    redeemed: int = 0
    reversed: int = 0
    void: int = 0
    audit: int = 0
    members: int = 0
    idempotency_restored: int = 0
    idempotency_expired: int = 0
    # Grants younger than the idempotency TTL archived before events carried 'idem'.
    grants_without_key_record: int = 0
    last_event_id: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Stream:
    """One shard's event stream as restore recreates it: empty, its last id at the
    shard's last archived event."""

    key: str
    last_id: str | None
    entries_added: int


@dataclass
class Target:
    """The campaign's Redis state after restore, key by key.

    ``final_*`` keys are written in the last transaction (what makes the
    campaign visible and grabbable); the rest are data written in batches.
    """

    campaign_id: str
    active: str
    final_hashes: dict[str, dict[str, str]]
    hashes: dict[str, dict[str, str]]
    lists: dict[str, list[str]]
    zsets: dict[str, dict[str, int]]
    expiring: dict[str, tuple[str, int]]  # key -> (value, absolute expiry in ms)
    streams: list[Stream]
    report: Report
    shards: int = 1

    @property
    def keys(self) -> K.Keys:
        return K.Keys(self.campaign_id)

    @property
    def shard_keys(self) -> list[K.Keys]:
        return [K.Keys(self.campaign_id, s) for s in range(self.shards)]

    def data_commands(self) -> Iterator[tuple[Any, ...]]:
        """The batched part, as Redis commands."""
        for key, h in self.hashes.items():
            yield ("HSET", key, *_flat(h.items()))
        for key, items in self.lists.items():
            yield ("RPUSH", key, *items)
        for key, z in self.zsets.items():
            yield ("ZADD", key, *_flat((score, member) for member, score in z.items()))
        for key, (value, at_ms) in self.expiring.items():
            yield ("SET", key, value, "PXAT", at_ms)

    def final_commands(self) -> Iterator[tuple[Any, ...]]:
        for key, h in self.final_hashes.items():
            yield ("HSET", key, *_flat(h.items()))
        yield ("SET", K.ACTIVE, self.active)


def _flat(pairs: Iterable[tuple[Any, Any]]) -> list[Any]:
    out: list[Any] = []
    for a, b in pairs:
        out += [a, b]
    return out


def marker_key(campaign_id: str) -> str:
    """String present while a restore of the campaign is under way (or crashed)."""
    return f"{K.Keys(campaign_id).tag}:restoring"


@dataclass(frozen=True)
class Existing:
    active: str | None       # what cpn:active names
    interrupted: bool        # a previous restore of this campaign did not finish
    campaign_keys: int       # keys under cpn:{C}: (at least; counting stops at 1000)

    @property
    def empty(self) -> bool:
        return self.active is None and self.campaign_keys == 0


async def _scan(client: Any, pattern: str, limit: int | None = None) -> list[str]:
    found: list[str] = []
    async for key in client.scan_iter(match=pattern, count=1000):
        found.append(key)
        if limit is not None and len(found) >= limit:
            break
    return found


async def inspect(client: Any, campaign_id: str, shards: int = 1) -> Existing:
    active = await client.get(K.ACTIVE)
    interrupted = bool(await client.exists(marker_key(campaign_id)))
    n = 0
    for s in range(shards):
        n += len(await _scan(client, f"{K.Keys(campaign_id, s).tag}:*", limit=1000))
    return Existing(active, interrupted, min(n, 1000))


def check_target(existing: Existing, campaign_id: str, force: bool) -> str | None:
    """Why restore must not write into this Redis, or None. A previous restore
    that crashed is always resumable; live state is replaced only with ``force``;
    another campaign's state never."""
    if existing.active is not None and existing.active != campaign_id:
        return (f"this Redis serves campaign {existing.active!r}, not {campaign_id!r}; "
                "restore only into an empty Redis (or one holding this campaign, with --force)")
    if existing.interrupted or existing.empty or force:
        return None
    return (f"this Redis already holds campaign {campaign_id!r} "
            f"({existing.campaign_keys}{'+' if existing.campaign_keys >= 1000 else ''} keys);"
            " restore rebuilds a Redis that lost everything. Stop `serve`, then pass --force"
            " to archive its stream and replace its state with the ledger's")


async def apply(client: Any, t: Target, *, batch: int = DEFAULT_BATCH,
                crash_point: str | None = None,
                progress: Callable[[int], None] | None = None) -> None:
    """Write ``t`` into Redis, replacing whatever the campaign's keys hold.

    The caller has decided (``check_target``) that this is allowed. ``progress`` is
    told how many data commands have been written, after each batch.
    """
    crash = CrashPoint(crash_point, ("after_clear", "after_batch"))
    k = t.keys
    marker = marker_key(t.campaign_id)
    # 1. Mark the restore, unload the campaign, and recreate the stream at the
    #    ledger's last id, in one transaction. From here on no worker sees a
    #    loaded campaign, and any event written meanwhile sorts after the ledger.
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(marker, json.dumps({"last_event_id": t.report.last_event_id}))
        pipe.delete(K.ACTIVE)
        for st, sk in zip(t.streams, t.shard_keys, strict=True):
            pipe.delete(st.key, sk.archived)
            # An empty stream needs a group to exist (XGROUP CREATE MKSTREAM); none is
            # kept, the archiver reads by its ledger's cursor.
            pipe.execute_command("XGROUP", "CREATE", st.key, LEGACY_GROUP, "0", "MKSTREAM")
            pipe.execute_command("XGROUP", "DESTROY", st.key, LEGACY_GROUP)
            if st.last_id is not None:
                # (max-deleted-entry-id stays 0-0: the archiver trims, it never XDELs.)
                pipe.execute_command("XSETID", st.key, st.last_id,
                                     "ENTRIESADDED", st.entries_added)
                pipe.set(sk.archived, st.last_id)
        await pipe.execute()

    # 2. Clear what a previous run (or the replaced state) left. Venue API keys
    #    are not in the ledger: those still present (--force) are kept.
    keep = {marker, *(st.key for st in t.streams), *(sk.archived for sk in t.shard_keys)}
    vkeys = k.venue_keys("")
    stale = []
    for sk in t.shard_keys:
        stale += [key for key in await _scan(client, f"{sk.tag}:*")
                  if key not in keep and not key.startswith(vkeys)]
    for i in range(0, len(stale), 1000):
        await client.unlink(*stale[i:i + 1000])
    crash.at("after_clear")

    # 3. Data, in pipelined batches (not visible as a campaign until step 4).
    pending: list[tuple[Any, ...]] = []
    sent = 0
    for cmd in t.data_commands():
        pending.append(cmd)
        if len(pending) >= batch:
            await _send(client, pending)
            sent += len(pending)
            pending = []
            crash.at("after_batch")
            if progress is not None:
                progress(sent)
    if pending:
        await _send(client, pending)
        crash.at("after_batch")

    # 4. Campaign, rounds, stock, stats, cpn:active; the marker goes.
    async with client.pipeline(transaction=True) as pipe:
        for cmd in t.final_commands():
            pipe.execute_command(*cmd)
        pipe.delete(marker)
        await pipe.execute()


async def _send(client: Any, cmds: list[tuple[Any, ...]]) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for cmd in cmds:
            pipe.execute_command(*cmd)
        await pipe.execute()
