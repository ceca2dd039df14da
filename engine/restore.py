"""Rebuild a campaign's Redis state from the ledger (``coupon-engine restore``).

After Redis has lost everything (no append-only file to restart from), the
ledger still holds every archived grant, void and redemption. This module
turns the campaign document plus those events into exactly the keys the Lua
scripts would have left behind (see docs/keys.md), and writes them.

Two halves:

* ``build(campaign, events, now_ms, idempotency_ttl_s)`` is pure: it replays
  the events with the scripts' rules (grab.lua, void.lua, redeem.lua) and
  returns a ``Target`` (every key and its value) plus a ``Report``. It checks
  that the history is one the scripts could have produced and raises
  ``RestoreError`` naming the first event that is not.
* ``inspect`` / ``apply`` talk to Redis. ``apply`` is safe to rerun after a
  crash at any point: it first sets a marker key and removes ``cpn:active``
  (one MULTI), so a half-written campaign is never "loaded"; it then clears
  the campaign's keys and writes the data in pipelined batches; one final
  MULTI writes the campaign, rounds, stock and stats, sets ``cpn:active`` and
  deletes the marker. A rerun that finds the marker starts over.

The event stream is not refilled (its entries are already in the ledger): it
is recreated empty, with its last id (XSETID) at the ledger's last event id
and the archiver's consumer group positioned there, so new XADD ids sort after
everything archived and the archiver reads only new entries.

Venue API keys (``vkeys``) are not in the ledger and are not rebuilt; with
``--force`` over a Redis that still has them, they are left as they are.

Only campaigns with one stock shard are rebuilt: ``check_shards`` refuses a
campaign that the ledger, Redis or the operator says has more (each shard's
stock after transfers between shards is not in the ledger).
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from . import campaign as cmp
from . import keys as K
from .archiver import GROUP
from .campaign import Campaign
from .ledger import EventRow, event_id_key, split_event_id

CRASH_ENV = "COUPON_RESTORE_CRASH_POINT"
DEFAULT_BATCH = 5000


class RestoreError(ValueError):
    """The ledger cannot be turned into a consistent state; the message says why."""


class RestoreRefused(RuntimeError):
    """The target Redis already holds state that restore would overwrite."""


def check_shards(campaign_id: str, counts: dict[str, int]) -> None:
    """Refuse a campaign with more than one stock shard.

    ``counts`` maps where a shard count was found (the ledger, Redis, --shards)
    to that count; any of them above 1 is enough, since each source can miss
    it (a ledger archived before it recorded the count, a Redis that lost it).
    """
    sharded = {where: n for where, n in counts.items() if n > 1}
    if sharded:
        said = ", ".join(f"{n} per {where}" for where, n in sharded.items())
        raise RestoreError(
            f"campaign {campaign_id} has stock shards ({said}); restore rebuilds only"
            " campaigns with one stock shard: a shard's stock after transfers between"
            " shards is not in the ledger (docs/ledger.md, Restore)")


# -- the pure part ---------------------------------------------------------------


@dataclass
class Report:
    events: int = 0
    coupons: int = 0
    issued: int = 0
    redeemed: int = 0
    void: int = 0
    members: int = 0
    idempotency_restored: int = 0
    idempotency_expired: int = 0
    # Grants younger than the idempotency TTL archived before events carried 'idem'.
    grants_without_key_record: int = 0
    last_event_id: str | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


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
    stream: str
    last_id: str | None
    entries_added: int
    report: Report

    @property
    def keys(self) -> K.Keys:
        return K.Keys(self.campaign_id)

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


@dataclass
class _Coupon:
    round_id: str
    venue_id: str
    member_id: str
    fields: dict[str, str]


def build(c: Campaign, events: Sequence[EventRow], now_ms: int,
          idempotency_ttl_s: int) -> Target:
    """Replay ``events`` (stream order) over campaign ``c``, as the scripts did."""
    k = K.Keys(c.id)
    rep = Report(events=len(events))
    rounds = {r.id: r for r in c.rounds}
    # Counters per '<R>:<V>' line, named as in the stats hash.
    stats: dict[str, int] = {}
    for r in c.rounds:
        for vid, n in r.stock.items():
            stats[f"initial:{r.id}:{vid}"] = n

    def bump(counter: str, line: str) -> None:
        name = f"{counter}:{line}"
        stats[name] = stats.get(name, 0) + 1

    coupons: dict[str, _Coupon] = {}
    members: dict[str, dict[str, int]] = {}
    member_codes: dict[str, list[str]] = {}
    redeemed: dict[str, dict[str, int]] = {}
    idem: dict[str, tuple[str, int]] = {}
    last: tuple[int, int, int] | None = None

    for e in events:
        where = f"ledger event {e.event_id} ({e.type} {e.code})"
        shard, _ = split_event_id(e.event_id)
        if shard:
            check_shards(c.id, {"the ledger's event ids, at least": shard + 1})
        pos = event_id_key(e.event_id)
        if last is not None and pos <= last:
            raise RestoreError(f"{where}: events are not in stream order")
        last = pos
        r = rounds.get(e.round_id)
        if r is None or e.venue_id not in r.stock:
            raise RestoreError(f"{where}: no stock line {e.round_id}:{e.venue_id} in campaign "
                               f"{c.id}; restore with the campaign these events belong to")
        line = f"{e.round_id}:{e.venue_id}"
        if e.type == "grant":
            if e.code in coupons:
                raise RestoreError(f"{where}: code granted twice")
            fields = {"round": e.round_id, "venue": e.venue_id, "member": e.member_id,
                      "status": "issued", "issued_at": str(e.at_ms),
                      "valid_from": str(r.valid_from_ms), "valid_until": str(r.valid_until_ms),
                      "closes_at": str(r.closes_at_ms)}
            coupons[e.code] = _Coupon(e.round_id, e.venue_id, e.member_id, fields)
            m = members.setdefault(e.member_id, {})
            m["total"] = m.get("total", 0) + 1
            m[f"r:{e.round_id}"] = m.get(f"r:{e.round_id}", 0) + 1
            member_codes.setdefault(e.member_id, []).append(e.code)
            bump("issued", line)
            expires = e.at_ms + idempotency_ttl_s * 1000
            if e.idem_key is None:
                # Archived before grants carried their key: if it had one, its
                # record (still live, by its age) cannot be rebuilt.
                if expires > now_ms:
                    rep.grants_without_key_record += 1
            elif e.idem_key:
                ikey = k.idempotency(e.member_id, e.idem_key)
                if expires > now_ms:
                    # A later grant with the same key (only after expiry) overwrote it.
                    idem[ikey] = (f"{e.round_id}/{e.venue_id}|{e.code}|{e.at_ms}|"
                                  f"{r.valid_from_ms}|{r.valid_until_ms}", expires)
                else:
                    idem.pop(ikey, None)
                    rep.idempotency_expired += 1
            continue

        cp = coupons.get(e.code)
        if cp is None:
            raise RestoreError(f"{where}: no grant of this code before it in the ledger")
        if (cp.round_id, cp.venue_id, cp.member_id) != (e.round_id, e.venue_id, e.member_id):
            raise RestoreError(f"{where}: round/venue/member differ from the code's grant")
        status = cp.fields["status"]
        if e.type == "redeem":
            if status != "issued":
                raise RestoreError(f"{where}: redeemed while {status}")
            cp.fields.update(status="redeemed", redeemed_at=str(e.at_ms))
            bump("redeemed", line)
            redeemed.setdefault(e.venue_id, {})[e.code] = e.at_ms
        elif e.type == "void":
            if status != "issued":
                raise RestoreError(f"{where}: voided while {status}")
            cp.fields.update(status="void", voided_at=str(e.at_ms))
            bump("void", line)
            # void.lua restocks while the round is open (now < closes_at); the
            # event records which happened, older rows are decided the same way.
            restocked = e.restocked if e.restocked is not None else int(e.at_ms < r.closes_at_ms)
            bump("returned_open" if restocked else "returned_closed", line)
        else:
            raise RestoreError(f"{where}: unknown event type")

    stock: dict[str, str] = {}
    for r in c.rounds:
        for vid in r.stock:
            line = f"{r.id}:{vid}"
            n = (stats[f"initial:{line}"] - stats.get(f"issued:{line}", 0)
                 + stats.get(f"returned_open:{line}", 0))
            if n < 0:
                rep.warnings.append(f"stock line {line} is {n}: more coupons granted than stock")
            stock[line] = str(n)

    final_hashes: dict[str, dict[str, str]] = {
        k.campaign: {"id": c.id, "quota": str(c.member_campaign_quota),
                     "doc": cmp.to_json(c).decode(), "fingerprint": c.fingerprint()},
    }
    for r in c.rounds:
        final_hashes[k.round(r.id)] = {
            "o": str(r.opens_at_ms), "c": str(r.closes_at_ms), "q": str(r.member_round_quota),
            "vf": str(r.valid_from_ms), "vu": str(r.valid_until_ms)}
    if stock:
        final_hashes[k.stock] = stock
    final_hashes[k.stats] = {name: str(n) for name, n in stats.items()}

    hashes: dict[str, dict[str, str]] = {}
    for code, cp in coupons.items():
        hashes[k.coupon(code)] = cp.fields
    for mid, m in members.items():
        hashes[k.member(mid)] = {f: str(n) for f, n in m.items()}

    rep.coupons = len(coupons)
    rep.issued = sum(1 for e in events if e.type == "grant")
    rep.redeemed = sum(1 for e in events if e.type == "redeem")
    rep.void = sum(1 for e in events if e.type == "void")
    rep.members = len(members)
    rep.idempotency_restored = len(idem)
    rep.last_event_id = events[-1].event_id if events else None
    return Target(
        campaign_id=c.id, active=c.id, final_hashes=final_hashes, hashes=hashes,
        lists={k.member_coupons(m): codes[::-1] for m, codes in member_codes.items()},
        zsets={k.venue_redemptions(v): z for v, z in redeemed.items()},
        expiring=idem, stream=k.events, last_id=rep.last_event_id,
        entries_added=len(events), report=rep)


def marker_key(campaign_id: str) -> str:
    """String present while a restore of the campaign is under way (or crashed)."""
    return f"{K.Keys(campaign_id).tag}:restoring"


# -- the storage part ------------------------------------------------------------


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


async def inspect(client: Any, campaign_id: str) -> Existing:
    active = await client.get(K.ACTIVE)
    interrupted = bool(await client.exists(marker_key(campaign_id)))
    n = len(await _scan(client, f"{K.Keys(campaign_id).tag}:*", limit=1000))
    return Existing(active, interrupted, n)


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


class _Crasher:
    """Test hook, like the archiver's: SIGKILL ourselves at a named point.
    ``after_clear`` or ``after_batch[:N]`` (the N-th data batch, default 1st)."""

    def __init__(self, spec: str | None) -> None:
        self.point, self.nth, self.seen = None, 1, 0
        if spec:
            point, _, nth = spec.partition(":")
            if point not in ("after_clear", "after_batch"):
                raise ValueError(f"unknown restore crash point {spec!r}")
            self.point, self.nth = point, int(nth or 1)

    def at(self, point: str) -> None:
        if self.point == point:
            self.seen += 1
            if self.seen >= self.nth:
                os.kill(os.getpid(), signal.SIGKILL)


async def apply(client: Any, t: Target, *, batch: int = DEFAULT_BATCH,
                crash_point: str | None = None) -> None:
    """Write ``t`` into Redis, replacing whatever the campaign's keys hold.

    The caller has decided (``check_target``) that this is allowed.
    """
    crash = _Crasher(crash_point)
    k = t.keys
    marker = marker_key(t.campaign_id)
    # 1. Mark the restore, unload the campaign, and recreate the stream at the
    #    ledger's last id, in one transaction. From here on no worker sees a
    #    loaded campaign, and any event written meanwhile sorts after the ledger.
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(marker, json.dumps({"last_event_id": t.last_id}))
        pipe.delete(K.ACTIVE)
        pipe.delete(t.stream)
        if t.last_id is None:
            pipe.execute_command("XGROUP", "CREATE", t.stream, GROUP, "0", "MKSTREAM")
        else:
            pipe.execute_command("XGROUP", "CREATE", t.stream, GROUP, t.last_id, "MKSTREAM",
                                 "ENTRIESREAD", t.entries_added)
            # (max-deleted-entry-id stays 0-0: the archiver trims, it never XDELs.)
            pipe.execute_command("XSETID", t.stream, t.last_id, "ENTRIESADDED", t.entries_added)
        await pipe.execute()

    # 2. Clear what a previous run (or the replaced state) left. Venue API keys
    #    are not in the ledger: those still present (--force) are kept.
    keep = {marker, t.stream}
    vkeys = k.venue_keys("")
    stale = [key for key in await _scan(client, f"{k.tag}:*")
             if key not in keep and not key.startswith(vkeys)]
    for i in range(0, len(stale), 1000):
        await client.unlink(*stale[i:i + 1000])
    crash.at("after_clear")

    # 3. Data, in pipelined batches (not visible as a campaign until step 4).
    pending: list[tuple[Any, ...]] = []
    for cmd in t.data_commands():
        pending.append(cmd)
        if len(pending) >= batch:
            await _send(client, pending)
            pending = []
            crash.at("after_batch")
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
