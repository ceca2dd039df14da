"""``coupon-engine restore``, the use case: rebuild a campaign's Redis state from the
ledger after Redis lost it (docs/ledger.md, "Restore").

The steps: choose the campaign (the ledger's copy, or a file that agrees with
it) and its stock shard count; inspect the target Redis and refuse what must
not be overwritten; with ``--force``, archive the live stream first; replay
the ledger (``replay.build``, pure); write the result (``store.restore.apply``).
The CLI (``ledger/cli.py``) only parses arguments and prints.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import campaign as cmp
from ..domain import utc_now_ms
from ..store.connection import redis_time_ms
from ..store.loading import shard_count
from ..store.restore import (
    CRASH_ENV,
    DEFAULT_BATCH,
    Existing,
    Stream,
    Target,
    apply,
    check_target,
    inspect,
    marker_key,
)
from . import archiver
from .db import Ledger
from .replay import RestoreError, build, resolve_shards

__all__ = ["CRASH_ENV", "DEFAULT_BATCH", "Existing", "Refused", "RestoreError", "Stream",
           "Target", "build", "check_target", "dry_run", "marker_key", "resolve_shards",
           "restore_into", "summary"]


class Refused(Exception):
    """Bad input for restore: the CLI answers exit 2 with this reason."""


@dataclass(frozen=True)
class Request:
    """What the operator asked for."""

    campaign_file: str | None = None
    shards: int | None = None
    force: bool = False
    batch: int = DEFAULT_BATCH
    idempotency_ttl_s: int = 86_400
    crash_point: str | None = None


def campaign_to_restore(ledger: Ledger, path: str | None) -> cmp.Campaign:
    """The campaign to rebuild: the ledger's copy (what Redis last served), or the
    file given when the ledger has none. A file that differs from the ledger's
    copy is refused: restore that copy, then ``campaign load`` the file, which
    applies the rules for changing a loaded campaign."""
    if path is None:
        c = ledger.source_campaign()
        if c is None:
            raise Refused("the ledger holds no campaign document; pass --campaign FILE")
        return c
    try:
        from_file = cmp.read_campaign(Path(path))
    except cmp.CampaignError as exc:
        raise Refused(str(exc)) from None
    kept = ledger.source_campaign(from_file.id)
    if kept is not None and kept != from_file:
        raise Refused(f"{path} differs from the ledger's copy of campaign {from_file.id}; run"
                      " restore without --campaign, then `coupon-engine campaign load"
                      f" {path}` to apply the change")
    return from_file


def shards_for(ledger: Ledger, campaign_id: str, declared: int | None,
               in_redis: int = 1) -> int:
    """The stock shard count restore rebuilds with (``replay.resolve_shards``)."""
    return resolve_shards(
        campaign_id, {"the ledger": ledger.shard_count(campaign_id), "Redis": in_redis},
        ledger.event_shards(campaign_id), declared)


def dry_run(ledger: Ledger, req: Request) -> Target:
    """What restore would write, computed from the ledger alone."""
    c = campaign_to_restore(ledger, req.campaign_file)
    return build(c, ledger.events_of(c.id), utc_now_ms(), req.idempotency_ttl_s,
                 shards_for(ledger, c.id, req.shards), ledger.audit_of(c.id),
                 ledger.settled_at(c.id))


async def restore_into(client: Any, ledger: Ledger, req: Request,
                       say: Callable[[str], None] = print,
                       progress: Callable[[int], None] | None = None) -> Target:
    """Rebuild the campaign in this (single) Redis; raises ``Refused`` or
    ``RestoreError`` before writing anything when it must not."""
    c = campaign_to_restore(ledger, req.campaign_file)
    shards = shards_for(ledger, c.id, req.shards, await shard_count(client, c.id))
    existing = await inspect(client, c.id, shards)
    why = check_target(existing, c.id, req.force)
    if why:
        raise Refused(why)
    if existing.interrupted:
        say("a previous restore of this campaign did not finish; starting over")
    elif not existing.empty:
        # --force over live state: whatever its stream holds goes to the ledger first.
        n = await archiver.archive_once(client, ledger, campaign_id=c.id)
        say(f"--force: archived {n} new event(s) from the existing stream first")
        c = campaign_to_restore(ledger, req.campaign_file)
    now = await redis_time_ms(client)
    events = await asyncio.to_thread(ledger.events_of, c.id)
    audits = await asyncio.to_thread(ledger.audit_of, c.id)
    settled = await asyncio.to_thread(ledger.settled_at, c.id)
    target = build(c, events, now, req.idempotency_ttl_s, shards, audits, settled)
    await apply(client, target, batch=req.batch, crash_point=req.crash_point,
                progress=progress)
    return target


def summary(t: Target, verb: str = "restored") -> str:
    r = t.report
    lines = [
        f"{verb} campaign {t.campaign_id}: {r.events} ledger event(s), {r.coupons} coupon(s)"
        f" ({r.redeemed} redeemed, {r.reversed} reversed, {r.void} void), {r.members}"
        f" member(s), {r.audit} operator action(s),"
        f" {r.idempotency_restored} idempotency record(s)"
        f" ({r.idempotency_expired} expired, not restored)",
        f"event stream resumes after {r.last_event_id or '0-0'}; the archiver reads"
        " after its ledger's cursor there",
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
