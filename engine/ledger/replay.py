"""Rebuild a campaign's Redis state from the ledger: the pure replay of
``coupon-engine restore``.

``build(campaign, events, now_ms, idempotency_ttl_s)`` replays the events with
the scripts' rules (grab.lua, void.lua, redeem.lua) and returns a
``store.restore.Target`` (every key and its value, with a ``Report``). It
checks that the history is one the scripts could have produced and raises
``RestoreError`` naming the first event that is not. No I/O: the steps that
touch Redis are ``store/restore.py``, the use case is ``ledger/restore.py``.

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

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..campaign import Campaign, with_overrides
from ..domain import CouponState
from ..shards import code_shard, member_shard, split
from ..store import keys as K
from ..store import records
from ..store.restore import Report, Stream, Target
from .db import AuditRow, EventRow, event_id_key, overrides_of, split_event_id


class RestoreError(ValueError):
    """The ledger cannot be turned into a consistent state; the message says why."""


def _replay_control(a: AuditRow, where: str, stock: dict[str, int], stats0: dict[str, int],
                    paused: dict[str, int], last_pause: dict[str, int],
                    last_resume: dict[str, int]) -> int:
    """One operator round action, as pause.lua / resume.lua / close.lua / add_stock.lua
    did it; returns 1 when it bumped the campaign's revision (close, add stock)."""
    r = a.round_id
    if a.action == "pause":
        paused[r] = last_pause[r] = a.at_ms
    elif a.action == "resume":
        paused.pop(r, None)
        last_resume[r] = a.at_ms
    elif a.action == "close":
        paused.pop(r, None)
        return 1
    elif a.action == "add_stock":
        if a.venue_id not in stock or not a.units or a.units < 1:
            raise RestoreError(f"{where}: no stock line {r}:{a.venue_id} to add to")
        line = f"{r}:{a.venue_id}"
        # add_stock.lua puts the units in shard 0.
        stats0[f"initial:{line}"] += a.units
        stats0[f"added:{line}"] = stats0.get(f"added:{line}", 0) + a.units
        return 1
    else:
        raise RestoreError(f"{where}: unknown operator action")
    return 0


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
class _Coupon:
    state: CouponState
    closes_at_ms: int
    shard: int
    voided_at_ms: int | None = None


def build(c: Campaign, events: Sequence[EventRow], now_ms: int,
          idempotency_ttl_s: int, shards: int = 1, audits: Sequence[AuditRow] = (),
          settled: dict[str, int] | None = None) -> Target:
    """Replay ``events`` (stream order) over campaign ``c`` (the document as its file
    loaded it), as the scripts did, into ``shards`` stock shards, with the operators'
    actions ``audits`` (pause, resume, close, add stock; a reverse is an event too) in
    their place in the stream, and ``settled`` (code -> settled at) marked on the
    coupons as `settle` and the archiver mark them."""
    ks = [K.Keys(c.id, s) for s in range(shards)]
    rep = Report(events=len(events))
    controls = [a for a in audits if a.action != "reverse"]  # a reverse is in events too
    rep.audit = len(audits)
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
    paused: dict[str, int] = {}          # round -> paused since (ms)
    last_pause: dict[str, int] = {}
    last_resume: dict[str, int] = {}
    revision = 0                         # close and add_stock bump the campaign's rev

    merged: list[EventRow | AuditRow] = [*events, *controls]
    if controls:
        merged.sort(key=lambda x: event_id_key(x.event_id))
    for e in merged:
        if isinstance(e, AuditRow):
            where = f"ledger event {e.event_id} ({e.action} {e.round_id})"
            shard, stream_id = split_event_id(e.event_id)
            if shard != 0:
                raise RestoreError(f"{where}: operators' round actions are in shard 0's"
                                   " stream")
            pos = event_id_key(e.event_id)
            if last is not None and pos <= last:
                raise RestoreError(f"{where}: events are not in stream order")
            last = pos
            last_in_shard[0] = stream_id
            entries_in_shard[0] += 1
            rd = rounds.get(e.round_id)
            if rd is None:
                raise RestoreError(f"{where}: no round {e.round_id} in campaign {c.id}")
            revision += _replay_control(e, where, rd.stock, stats[0], paused, last_pause,
                                        last_resume)
            continue
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
        rd = rounds.get(e.round_id)
        if rd is None or e.venue_id not in rd.stock:
            raise RestoreError(f"{where}: no stock line {e.round_id}:{e.venue_id} in campaign "
                               f"{c.id}; restore with the campaign these events belong to")
        line = f"{e.round_id}:{e.venue_id}"
        if e.type == "grant":
            if e.code in coupons:
                raise RestoreError(f"{where}: code granted twice")
            coupons[e.code] = _Coupon(CouponState(
                e.code, e.round_id, e.venue_id, e.member_id, "issued", e.at_ms,
                rd.valid_from_ms, rd.valid_until_ms), rd.closes_at_ms, shard)
            member_shards[e.member_id] = shard
            m = members.setdefault(e.member_id, {})
            in_round = records.M_ROUND_PREFIX + e.round_id
            m[records.M_TOTAL] = m.get(records.M_TOTAL, 0) + 1
            m[in_round] = m.get(in_round, 0) + 1
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
                    idem[ikey] = (records.idempotency_record(
                        e.round_id, e.venue_id, e.code, e.at_ms, rd.valid_from_ms,
                        rd.valid_until_ms), expires)
                else:
                    idem.pop(ikey, None)
                    rep.idempotency_expired += 1
            continue

        cp = coupons.get(e.code)
        if cp is None:
            raise RestoreError(f"{where}: no grant of this code before it in the ledger")
        st = cp.state
        if (st.round_id, st.venue_id, st.member_id) != (e.round_id, e.venue_id, e.member_id):
            raise RestoreError(f"{where}: round/venue/member differ from the code's grant")
        status = st.status
        if e.type == "redeem":
            if status != "issued":
                raise RestoreError(f"{where}: redeemed while {status}")
            cp.state = replace(st, status="redeemed", redeemed_at_ms=e.at_ms)
            bump(shard, "redeemed", line)
            redeemed.setdefault((shard, e.venue_id), {})[e.code] = e.at_ms
        elif e.type == "reverse":
            if status != "redeemed":
                raise RestoreError(f"{where}: reversed while {status}")
            cp.state = replace(st, status="issued", redeemed_at_ms=None)
            stats[shard][f"redeemed:{line}"] -= 1
            bump(shard, "reversed", line)
            redeemed[(shard, e.venue_id)].pop(e.code, None)
        elif e.type == "void":
            if status != "issued":
                raise RestoreError(f"{where}: voided while {status}")
            cp.state, cp.voided_at_ms = replace(st, status="void"), e.at_ms
            bump(shard, "void", line)
            # void.lua restocks while the round is open (now < closes_at); the
            # event records which happened, older rows are decided the same way.
            restocked = e.restocked if e.restocked is not None else int(e.at_ms < rd.closes_at_ms)
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

    ov = overrides_of(controls)
    ran = with_overrides(c, ov)
    final_hashes: dict[str, dict[str, str]] = {}
    for sh, k in enumerate(ks):
        final_hashes[k.campaign] = {**records.campaign_fields(c, sh, shards),
                                    **records.override_fields(ov, sh)}
        if sh == 0 and revision:
            final_hashes[k.campaign][records.REVISION] = str(revision)
        for r in ran.rounds:
            h = {f: str(v) for f, v in records.round_fields(r).items()}
            if r.id in paused:
                h[records.R_PAUSED] = str(paused[r.id])
            if sh == 0:
                if r.id in last_pause:
                    h[records.R_PAUSED_AT] = str(last_pause[r.id])
                if r.id in last_resume:
                    h[records.R_RESUMED_AT] = str(last_resume[r.id])
            final_hashes[k.round(r.id)] = h
        if stock[sh]:
            final_hashes[k.stock] = stock[sh]
        final_hashes[k.stats] = {name: str(n) for name, n in stats[sh].items()}

    hashes: dict[str, dict[str, str]] = {}
    for code, cp in coupons.items():
        h = records.coupon_fields(cp.state, cp.closes_at_ms, cp.voided_at_ms)
        if settled and code in settled:
            h[records.C_SETTLED] = str(settled[code])
        hashes[ks[cp.shard].coupon(code)] = h
    for mid, m in members.items():
        # grab.lua keeps the member's codes, newest first, in the member hash's 'c'.
        hashes[ks[member_shards[mid]].member(mid)] = {
            **{f: str(n) for f, n in m.items()},
            records.M_CODES: "".join(reversed(member_codes[mid]))}

    rep.coupons = len(coupons)
    rep.issued = sum(1 for e in events if e.type == "grant")
    rep.redeemed = sum(1 for e in events if e.type == "redeem")
    rep.reversed = sum(1 for e in events if e.type == "reverse")
    rep.void = sum(1 for e in events if e.type == "void")
    rep.members = len(members)
    rep.idempotency_restored = len(idem)
    rep.last_event_id = events[-1].event_id if events else None
    return Target(
        campaign_id=c.id, active=c.id, final_hashes=final_hashes, hashes=hashes,
        lists={},
        zsets={ks[sh].venue_redemptions(v): z for (sh, v), z in redeemed.items() if z},
        expiring=idem,
        streams=[Stream(k.events, last_in_shard[sh], entries_in_shard[sh])
                 for sh, k in enumerate(ks)],
        report=rep, shards=shards)


