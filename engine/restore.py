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

A campaign with S stock shards is rebuilt into S shards (``resolve_shards``
decides S from the ledger, Redis and ``--shards``, refusing when they
disagree): members, coupons and idempotency records go to their own shards,
each shard's stream resumes after that shard's last archived id, and since
the ledger does not say where stock stood after transfers between shards,
each line's remaining stock is split evenly over the shards, with the
shards' ``xfer_in``/``xfer_out`` counters set so that every shard's
``stock = initial - issued + returned_open - xfer_out + xfer_in`` holds.
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
from .shards import code_shard, member_shard, split

CRASH_ENV = "COUPON_RESTORE_CRASH_POINT"
DEFAULT_BATCH = 5000


class RestoreError(ValueError):
    """The ledger cannot be turned into a consistent state; the message says why."""


class RestoreRefused(RuntimeError):
    """The target Redis already holds state that restore would overwrite."""


def resolve_shards(campaign_id: str, recorded: dict[str, int], at_least: int,
                   declared: int | None) -> int:
    """The stock shard count to rebuild with.

    ``recorded`` maps each source that stores the count (the ledger, Redis) to
    what it says, 1 meaning "nothing recorded" (an unsharded campaign records
    nothing, and a Redis that lost everything has lost it too); ``at_least`` is
    1 + the highest shard among the ledger's event ids; ``declared`` is
    ``--shards``. Every source that says more than 1 and ``--shards`` must
    agree, and the result must hold every archived event's shard.
    """
    said = {where: n for where, n in recorded.items() if n > 1}
    if declared is not None:
        said["--shards"] = declared
    if len(set(said.values())) > 1:
        listed = ", ".join(f"{n} per {where}" for where, n in said.items())
        raise RestoreError(f"campaign {campaign_id}: the stock shard counts disagree ({listed})")
    shards = next(iter(said.values()), 1)
    if shards < at_least:
        raise RestoreError(
            f"campaign {campaign_id}: the ledger holds events of stock shard {at_least - 1},"
            f" more than {shards} shard(s); pass --shards with the count it was loaded with")
    return shards


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


@dataclass(frozen=True)
class Stream:
    """One shard's event stream as restore recreates it: empty, its last id at the
    shard's last archived event, the archiver's group positioned there."""

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


@dataclass
class _Coupon:
    round_id: str
    venue_id: str
    member_id: str
    fields: dict[str, str]
    shard: int = 0


def build(c: Campaign, events: Sequence[EventRow], now_ms: int,
          idempotency_ttl_s: int, shards: int = 1) -> Target:
    """Replay ``events`` (stream order) over campaign ``c``, as the scripts did,
    into ``shards`` stock shards."""
    ks = [K.Keys(c.id, s) for s in range(shards)]
    rep = Report(events=len(events))
    rounds = {r.id: r for r in c.rounds}
    # Counters per shard and '<R>:<V>' line, named as in the stats hash.
    stats: list[dict[str, int]] = [{} for _ in range(shards)]
    for r in c.rounds:
        for vid, n in r.stock.items():
            for s, share in enumerate(split(n, shards)):
                stats[s][f"initial:{r.id}:{vid}"] = share
    last_in_shard: list[str | None] = [None] * shards
    entries_in_shard = [0] * shards

    def bump(shard: int, counter: str, line: str) -> None:
        name = f"{counter}:{line}"
        stats[shard][name] = stats[shard].get(name, 0) + 1

    coupons: dict[str, _Coupon] = {}
    members: dict[str, dict[str, int]] = {}
    member_codes: dict[str, list[str]] = {}
    redeemed: dict[tuple[int, str], dict[str, int]] = {}
    member_shards: dict[str, int] = {}
    idem: dict[str, tuple[str, int]] = {}
    last: tuple[int, int, int] | None = None

    for e in events:
        where = f"ledger event {e.event_id} ({e.type} {e.code})"
        shard, stream_id = split_event_id(e.event_id)
        if shard >= shards:
            raise RestoreError(f"{where}: from stock shard {shard}, restoring {shards} shard(s)")
        if shards > 1 and (code_shard(e.code, shards), member_shard(e.member_id, shards)) != (
                shard, shard):
            raise RestoreError(f"{where}: written by shard {shard}, but its code and member"
                               f" belong to shards {code_shard(e.code, shards)} and"
                               f" {member_shard(e.member_id, shards)} of {shards}")
        last_in_shard[shard] = stream_id
        entries_in_shard[shard] += 1
        k = ks[shard]
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
            coupons[e.code] = _Coupon(e.round_id, e.venue_id, e.member_id, fields, shard)
            member_shards[e.member_id] = shard
            m = members.setdefault(e.member_id, {})
            m["total"] = m.get("total", 0) + 1
            m[f"r:{e.round_id}"] = m.get(f"r:{e.round_id}", 0) + 1
            member_codes.setdefault(e.member_id, []).append(e.code)
            bump(shard, "issued", line)
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
            bump(shard, "redeemed", line)
            redeemed.setdefault((shard, e.venue_id), {})[e.code] = e.at_ms
        elif e.type == "void":
            if status != "issued":
                raise RestoreError(f"{where}: voided while {status}")
            cp.fields.update(status="void", voided_at=str(e.at_ms))
            bump(shard, "void", line)
            # void.lua restocks while the round is open (now < closes_at); the
            # event records which happened, older rows are decided the same way.
            restocked = e.restocked if e.restocked is not None else int(e.at_ms < r.closes_at_ms)
            bump(shard, "returned_open" if restocked else "returned_closed", line)
        else:
            raise RestoreError(f"{where}: unknown event type")

    stock: list[dict[str, str]] = [{} for _ in range(shards)]
    for r in c.rounds:
        for vid in r.stock:
            line = f"{r.id}:{vid}"
            # What each shard would hold had no stock moved between shards...
            own = [st[f"initial:{line}"] - st.get(f"issued:{line}", 0)
                   + st.get(f"returned_open:{line}", 0) for st in stats]
            left = sum(own)
            if left < 0:
                rep.warnings.append(f"stock line {line} is {left}: more coupons granted than stock")
            # ...and an even split of what is left, the difference booked as transfers.
            for sh, n in enumerate(split(left, shards)):
                stock[sh][line] = str(n)
                if n > own[sh]:
                    stats[sh][f"xfer_in:{line}"] = n - own[sh]
                elif n < own[sh]:
                    stats[sh][f"xfer_out:{line}"] = own[sh] - n

    final_hashes: dict[str, dict[str, str]] = {}
    for sh, k in enumerate(ks):
        final_hashes[k.campaign] = {"quota": str(c.member_campaign_quota),
                                    "fingerprint": c.fingerprint()}
        for r in c.rounds:
            final_hashes[k.round(r.id)] = {
                "o": str(r.opens_at_ms), "c": str(r.closes_at_ms),
                "q": str(r.member_round_quota),
                "vf": str(r.valid_from_ms), "vu": str(r.valid_until_ms)}
        if stock[sh]:
            final_hashes[k.stock] = stock[sh]
        final_hashes[k.stats] = {name: str(n) for name, n in stats[sh].items()}
    final_hashes[ks[0].campaign].update(id=c.id, doc=cmp.to_json(c).decode())
    if shards > 1:
        final_hashes[ks[0].campaign]["shards"] = str(shards)

    hashes: dict[str, dict[str, str]] = {}
    for code, cp in coupons.items():
        hashes[ks[cp.shard].coupon(code)] = cp.fields
    for mid, m in members.items():
        hashes[ks[member_shards[mid]].member(mid)] = {f: str(n) for f, n in m.items()}

    rep.coupons = len(coupons)
    rep.issued = sum(1 for e in events if e.type == "grant")
    rep.redeemed = sum(1 for e in events if e.type == "redeem")
    rep.void = sum(1 for e in events if e.type == "void")
    rep.members = len(members)
    rep.idempotency_restored = len(idem)
    rep.last_event_id = events[-1].event_id if events else None
    return Target(
        campaign_id=c.id, active=c.id, final_hashes=final_hashes, hashes=hashes,
        lists={ks[member_shards[m]].member_coupons(m): codes[::-1]
               for m, codes in member_codes.items()},
        zsets={ks[sh].venue_redemptions(v): z for (sh, v), z in redeemed.items()},
        expiring=idem,
        streams=[Stream(k.events, last_in_shard[sh], entries_in_shard[sh])
                 for sh, k in enumerate(ks)],
        report=rep, shards=shards)


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
        pipe.set(marker, json.dumps({"last_event_id": t.report.last_event_id}))
        pipe.delete(K.ACTIVE)
        for st in t.streams:
            pipe.delete(st.key)
            if st.last_id is None:
                pipe.execute_command("XGROUP", "CREATE", st.key, GROUP, "0", "MKSTREAM")
            else:
                pipe.execute_command("XGROUP", "CREATE", st.key, GROUP, st.last_id, "MKSTREAM",
                                     "ENTRIESREAD", st.entries_added)
                # (max-deleted-entry-id stays 0-0: the archiver trims, it never XDELs.)
                pipe.execute_command("XSETID", st.key, st.last_id,
                                     "ENTRIESADDED", st.entries_added)
        await pipe.execute()

    # 2. Clear what a previous run (or the replaced state) left. Venue API keys
    #    are not in the ledger: those still present (--force) are kept.
    keep = {marker, *(st.key for st in t.streams)}
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
