"""The running engine's Redis state for the one active campaign: ``Store``.

The hot path (grab, redeem, void, the idempotency probe) goes through
``wire.Wire``: one pipelined connection per worker with the scripts loaded at
connect (on a Redis Cluster, ``clusterwire.ClusterWire``: one such connection
per primary, routed by slot). Everything else (admin reads, polling, pub/sub)
uses redis-py (``RedisCluster`` on a cluster). Every Redis failure leaves here
as ``errors.Unavailable`` (``connection.guarded`` / ``connection.wired``) so
the HTTP layer answers 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Generic, TypeVar

from .. import codes
from .. import shards as shards_mod
from ..campaign import Campaign
from ..config import Settings
from ..domain import CouponState
from ..errors import Unavailable
from . import keys, records, scripts, streams
from .clusterwire import ClusterWire
from .connection import (
    AnyClient,
    guarded,
    node_client,
    redis_time_ms,
    release,
    run_script,
    wire_for,
    wire_unavailable,
    wired,
)
from .scripts import (
    AddStockOutcome,
    Arg,
    CloseOutcome,
    GrabOutcome,
    PauseOutcome,
    RedeemOutcome,
    ResumeOutcome,
    ReverseOutcome,
    Script,
    VoidOutcome,
)
from .transfers import Transfers
from .wire import Framed, ReplyError, Wire, WireError, framed

log = logging.getLogger("engine.store")

_CODE_ATTEMPTS = 4
# Seconds of silence after which the notify subscription yields None (subscribe_notifications).
NOTIFY_TICK_S = 1.0


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and a
# grant builds one of these per request (1.1 us of its CPU, issue 19).
@dataclass(slots=True)
class GrabResult:
    outcome: GrabOutcome
    now_ms: int
    code: str = ""
    issued_at_ms: int = 0
    valid_from_ms: int = 0
    valid_until_ms: int = 0
    remaining: int = -1
    edge_ms: int = 0  # opens_at for ROUND_NOT_OPEN, closes_at for ROUND_CLOSED
    message: str = ""


Oc = TypeVar("Oc", RedeemOutcome, VoidOutcome)


@dataclass(frozen=True, slots=True)
class ChangeResult(Generic[Oc]):
    """Outcome of redeem.lua or void.lua."""

    outcome: Oc
    now_ms: int
    coupon: CouponState | None = None  # the coupon after the change, when it changed
    at_ms: int = 0  # redeemed_at for ALREADY_REDEEMED, valid edge for validity errors
    restocked: bool = False


Ctl = TypeVar("Ctl", bound=IntEnum)


@dataclass(frozen=True, slots=True)
class ControlResult(Generic[Ctl]):
    """Outcome of an operator's control script (pause, resume, close, add_stock,
    reverse): on success the audit event's stream id and what it recorded."""

    outcome: Ctl
    now_ms: int
    event_id: str = ""   # the ledger's id of the audit event (shard-qualified)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    # A refusal's values after {code, now}: opens_at / closes_at / settled_at (ms), a
    # status, a message, or add_stock's (committed_fen, budget_fen).
    values: tuple[Any, ...] = ()
    coupon: CouponState | None = None  # reverse: the coupon after the change

    @property
    def edge_ms(self) -> int:
        return int(self.values[0]) if self.values and isinstance(self.values[0], int) else 0


@dataclass(frozen=True, slots=True)
class RoundControl:
    """What the operators' controls left in a round hash (shard 0)."""

    paused_since_ms: int | None
    last_paused_ms: int | None
    last_resumed_ms: int | None
    closed_early_ms: int | None


def _control_result(enum: type[Ctl], reply: list[Any], event_shard: int = 0) -> ControlResult[Ctl]:
    oc = scripts.outcome(enum, int(reply[0]))
    now = int(reply[1])
    if oc.value == 0:
        sid = str(reply[2])
        eid = sid if event_shard == 0 else f"{event_shard}/{sid}"
        return ControlResult(oc, now, eid, json.loads(reply[3]), json.loads(reply[4]))
    return ControlResult(oc, now, values=tuple(reply[2:]))


class FramedKeys:
    """One shard's ``keys.Keys`` with the names every call sends framed once (a
    ``scripts.ShardKeys``): the hot path then copies bytes instead of encoding."""

    def __init__(self, k: keys.Keys) -> None:
        self._k = k
        self.campaign = framed(k.campaign)
        self.stock = framed(k.stock)
        self.stats = framed(k.stats)
        self.events = framed(k.events)
        self.xfer_out = framed(k.xfer_out)
        self.xfer_in = framed(k.xfer_in)
        # Only rounds of the campaign reach here (the engine checks first).
        self._rounds: dict[str, Framed] = {}

    def round(self, round_id: str) -> Framed:
        got = self._rounds.get(round_id)
        if got is None:
            got = self._rounds[round_id] = framed(self._k.round(round_id))
        return got

    def member(self, member_id: str) -> str:
        return self._k.member(member_id)

    def member_coupons(self, member_id: str) -> str:
        return self._k.member_coupons(member_id)

    def coupon(self, code: str) -> str:
        return self._k.coupon(code)

    def idempotency(self, member_id: str, key: str) -> str:
        return self._k.idempotency(member_id, key)

    def venue_redemptions(self, venue_id: str) -> str:
        return self._k.venue_redemptions(venue_id)


class Store:
    """The engine's Redis state for the one active campaign.

    With S > 1 stock shards, each call goes to the shard that owns its data:
    a grab to the member's shard, a redeem or void to the code's shard.
    """

    def __init__(self, client: AnyClient, campaign: Campaign, settings: Settings,
                 wire: Wire | ClusterWire | None = None, shards: int = 1) -> None:
        self.redis = client
        self.campaign = campaign
        self.keys = keys.Keys(campaign.id)
        self.settings = settings
        self.wire = wire or wire_for(client, settings)
        self.shards = shards
        self.shard_keys = [self.keys.of_shard(s) for s in range(shards)]
        self._framed = [FramedKeys(k) for k in self.shard_keys]
        self._grab = scripts.load("grab")
        self._redeem = scripts.load("redeem")
        self._void = scripts.load("void")
        self._ctl = {name: scripts.load(name) for name in (
            "pause", "resume", "close", "add_stock", "reverse", "round_sync")}
        self._mark_sold_out = scripts.load("mark_sold_out")
        self.transfers = Transfers(self.wire, client, self.shard_keys,
                                   self.keys.notify_channel, self.time_ms)

    async def close(self) -> None:
        await self.wire.close()
        await self.redis.aclose()

    async def _run(self, script: Script, call: tuple[list[Arg], list[Arg]]) -> Any:
        """One script call on the hot path; store failures become ``Unavailable``
        (``wired``'s rule, without its coroutine around every grab)."""
        try:
            return await self.wire.evalsha(script, *call)
        except (WireError, ReplyError) as exc:
            failure = wire_unavailable(exc)
            if failure is None:
                raise
            raise failure from exc

    async def ping(self) -> bool:
        try:
            return bool(await guarded(self.redis.ping()))
        except Unavailable:
            return False

    async def time_ms(self) -> int:
        return await guarded(redis_time_ms(self.redis, self.keys.campaign))

    def member_shard(self, member_id: str) -> int:
        return shards_mod.member_shard(member_id, self.shards)

    def code_shard(self, code: str) -> int:
        """The shard holding this (canonical) code's record."""
        return shards_mod.code_shard(code, self.shards)

    def _new_code(self, shard: int) -> str:
        """A fresh code whose own shard is ``shard``: the coupon then lives with its
        member, and redeem and void find it from the code alone."""
        code = codes.new_code()
        while self.shards > 1 and shards_mod.code_shard(code, self.shards) != shard:
            code = codes.new_code()
        return code

    async def grab(self, round_id: str, venue_id: str, member_id: str,
                   idem_key: str | None) -> GrabResult:
        shard = self.member_shard(member_id)
        k = self._framed[shard]
        for _ in range(_CODE_ATTEMPTS):
            code = self._new_code(shard)
            reply = await self._run(self._grab, scripts.grab_call(
                k, round_id, venue_id, member_id, code, idem_key or "",
                self.settings.idempotency_ttl_s))
            result = _grab_result(reply)
            if result.outcome is not GrabOutcome.CODE_COLLISION:
                return result
            log.warning("coupon code collision; drawing another")
        raise RuntimeError("could not draw an unused coupon code")

    async def redeem(self, venue_id: str, code: str) -> ChangeResult[RedeemOutcome]:
        reply = await self._run(self._redeem, scripts.redeem_call(
            self._framed[self.code_shard(code)], venue_id, code))
        oc = scripts.outcome(RedeemOutcome, int(reply[0]))
        now = int(reply[1])
        if oc is RedeemOutcome.REDEEMED:
            return ChangeResult(oc, now, records.coupon_state(
                code, records.pairs_to_dict(reply[2:])))
        return ChangeResult(oc, now, at_ms=int(reply[2]) if len(reply) > 2 else 0)

    async def void(self, member_id: str, code: str) -> ChangeResult[VoidOutcome]:
        reply = await self._run(self._void, scripts.void_call(
            self._framed[self.code_shard(code)], member_id, code, self.keys.notify_channel))
        oc = scripts.outcome(VoidOutcome, int(reply[0]))
        now = int(reply[1])
        if oc is VoidOutcome.VOIDED:
            return ChangeResult(oc, now, records.coupon_state(
                code, records.pairs_to_dict(reply[3:])), restocked=reply[2] == 1)
        return ChangeResult(oc, now, at_ms=int(reply[2]) if len(reply) > 2 else 0)

    # The operators' controls (docs/operations.md, "Operator controls"). Rare calls, over
    # redis-py. Round decisions are shard 0's; with S > 1 shards the other shards' copies
    # of the round are paused first and made to agree with shard 0 after, so that once
    # the call returns no shard grants past what shard 0 recorded.

    async def _shard0(self, name: str, call: scripts.Call) -> list[Any]:
        return list(await run_script(self.redis, self._ctl[name], call))

    async def _tentative_pause(self, round_id: str) -> None:
        for s in range(1, self.shards):
            await run_script(self.redis, self._ctl["round_sync"], scripts.round_sync_call(
                self.shard_keys[s], round_id, "*", None))

    async def _sync_round(self, round_id: str) -> None:
        """Copy shard 0's pause and early close of the round to every other shard."""
        if self.shards == 1:
            return
        k = self.keys
        paused = await guarded(self.redis.hget(k.round(round_id), records.R_PAUSED))
        closed = await guarded(self.redis.hget(k.campaign, records.CLOSED_PREFIX + round_id))
        for s in range(1, self.shards):
            await run_script(self.redis, self._ctl["round_sync"], scripts.round_sync_call(
                self.shard_keys[s], round_id, paused or "", int(closed) if closed else None))

    async def pause(self, round_id: str, actor: str, reason: str) -> ControlResult[PauseOutcome]:
        await self._tentative_pause(round_id)
        try:
            reply = await self._shard0("pause", scripts.pause_call(
                self.keys, round_id, actor, reason, self.keys.notify_channel))
        finally:
            await self._sync_round(round_id)
        return _control_result(PauseOutcome, reply)

    async def resume(self, round_id: str, actor: str,
                     reason: str) -> ControlResult[ResumeOutcome]:
        try:
            reply = await self._shard0("resume", scripts.resume_call(
                self.keys, round_id, actor, reason, self.keys.notify_channel))
        finally:
            await self._sync_round(round_id)
        return _control_result(ResumeOutcome, reply)

    async def close_round(self, round_id: str, actor: str,
                          reason: str) -> ControlResult[CloseOutcome]:
        await self._tentative_pause(round_id)
        try:
            reply = await self._shard0("close", scripts.close_call(
                self.keys, round_id, actor, reason, self.keys.notify_channel))
        finally:
            await self._sync_round(round_id)
        return _control_result(CloseOutcome, reply)

    async def add_stock(self, round_id: str, venue_id: str, units: int, actor: str,
                        reason: str) -> ControlResult[AddStockOutcome]:
        """The units go to shard 0's stock; other shards refill from it when dry."""
        reply = await self._shard0("add_stock", scripts.add_stock_call(
            self.keys, round_id, venue_id, units, actor, reason, self.keys.notify_channel))
        return _control_result(AddStockOutcome, reply)

    async def reverse(self, code: str, actor: str,
                      reason: str) -> ControlResult[ReverseOutcome]:
        shard = self.code_shard(code)
        k = self.shard_keys[shard]
        venue = await guarded(self.redis.hget(k.coupon(code), records.C_VENUE))
        if venue is None:
            return ControlResult(ReverseOutcome.NOT_FOUND, await self.time_ms())
        reply = list(await run_script(self.redis, self._ctl["reverse"], scripts.reverse_call(
            k, code, venue, actor, reason)))
        res = _control_result(ReverseOutcome, reply, shard)
        if res.outcome is ReverseOutcome.REVERSED:
            coupon = records.coupon_state(code, records.pairs_to_dict(reply[5:]))
            return ControlResult(res.outcome, res.now_ms, res.event_id, res.before,
                                 res.after, coupon=coupon)
        return res

    async def round_controls(self) -> dict[str, RoundControl]:
        """round id -> the pause state and last pause / resume of every round."""
        pipe = self.redis.pipeline(transaction=False)
        rounds = [r.id for r in self.campaign.rounds]
        for rid in rounds:
            pipe.hmget(self.keys.round(rid), [records.R_PAUSED, records.R_PAUSED_AT,
                                              records.R_RESUMED_AT])
        pipe.hmget(self.keys.campaign, [records.CLOSED_PREFIX + rid for rid in rounds])
        *rows, closed = await guarded(pipe.execute()) if rounds else ([],)

        def ms(v: str | None) -> int | None:
            return int(v) if v else None
        return {rid: RoundControl(ms(p), ms(pa), ms(ra), ms(cl))
                for rid, (p, pa, ra), cl in zip(rounds, rows, closed)}

    async def coupon(self, code: str) -> CouponState | None:
        rec = await guarded(self.redis.hgetall(self.shard_keys[self.code_shard(code)]
                                               .coupon(code)))
        return records.coupon_state(code, rec) if rec else None

    async def member_coupons(self, member_id: str) -> list[CouponState]:
        # A member's hash and coupons are all in the member's shard (one slot). Codes
        # granted before issue 19 are in the older list key, after the hash's.
        k = self.shard_keys[self.member_shard(member_id)]
        joined, legacy = await asyncio.gather(
            guarded(self.redis.hget(k.member(member_id), records.M_CODES)),
            guarded(self.redis.lrange(k.member_coupons(member_id), 0, -1)))
        codes_ = records.member_codes(joined) + list(legacy)
        return await self._coupons([(c, k) for c in codes_])

    async def venue_redemptions(self, venue_id: str, since_ms: int,
                                limit: int = 1000) -> list[CouponState]:
        """The venue's redemptions since ``since_ms``, oldest first, at most ``limit``;
        with shards, the first ``limit`` of each shard merged by time."""
        scored: list[tuple[float, str, keys.Keys]] = []
        for k in self.shard_keys:
            rows = await guarded(self.redis.zrangebyscore(
                k.venue_redemptions(venue_id), since_ms, "+inf", start=0, num=limit,
                withscores=True))
            scored += [(score, c, k) for c, score in rows]
        scored.sort(key=lambda x: (x[0], x[1]))
        return await self._coupons([(c, k) for _, c, k in scored[:limit]])

    async def _coupons(self, where: list[tuple[str, keys.Keys]]) -> list[CouponState]:
        """The coupons of these codes, in this order, in one pipelined round trip."""
        if not where:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for c, k in where:
            pipe.hgetall(k.coupon(c))
        recs = await guarded(pipe.execute())
        return [records.coupon_state(c, r) for (c, _), r in zip(where, recs) if r]

    async def _counts_by_shard(self, name: str) -> list[dict[str, int]]:
        """The integer hash ``name`` ('stock' or 'stats') of every shard."""
        out = []
        for k in self.shard_keys:
            raw = await guarded(self.redis.hgetall(getattr(k, name)))
            out.append({f: int(v) for f, v in raw.items()})
        return out

    async def stock_by_shard(self) -> list[dict[str, int]]:
        self.transfers.by_shard = await self._counts_by_shard("stock")
        return self.transfers.by_shard

    async def stock(self) -> dict[str, int]:
        """'<round>:<venue>' -> remaining, for every stock line (summed over shards;
        units in flight between shards are in none of them for a moment)."""
        return _sum(await self.stock_by_shard())

    async def stats_by_shard(self) -> list[dict[str, int]]:
        return await self._counts_by_shard("stats")

    async def stats(self) -> dict[str, int]:
        return _sum(await self.stats_by_shard())

    async def sold_out_times(self) -> dict[str, int]:
        """'<round>:<venue>' -> ms when the line was first seen sold out (keys.sold_out)."""
        raw = await guarded(self.redis.hgetall(self.keys.sold_out))
        return {str(f): int(v) for f, v in raw.items()}

    async def mark_sold_out(self, lines: list[str], now_ms: int) -> None:
        """Record the first sighting only: every worker polls, the earliest wins; nothing
        is written into a Redis that no longer holds the campaign (mark_sold_out.lua)."""
        await self._run(self._mark_sold_out, scripts.mark_sold_out_call(
            self._framed[0], self.keys.sold_out, now_ms, lines))

    async def ledger_lag(self) -> int:
        """Events on the stream not yet archived into the ledger."""
        return await guarded(streams.lag(self.redis, self.campaign.id, self.shards))

    async def has_idempotency(self, member_id: str, idem_key: str) -> bool:
        k = self.shard_keys[self.member_shard(member_id)]
        return bool(await wired(self.wire.call("EXISTS", k.idempotency(member_id, idem_key))))

    async def campaign_fingerprint(self) -> str | None:
        """The loaded campaign's version: its file's fingerprint and the count of operator
        changes (close, add stock) since; a worker reloads when it differs."""
        fp, rev = await guarded(self.redis.hmget(self.keys.campaign,
                                                 ["fingerprint", records.REVISION]))
        return records.campaign_version(fp, rev)

    async def reload_campaign(self) -> Campaign | None:
        """The campaign as run (the file's document with the operators' overrides)."""
        new = records.effective_campaign(await guarded(self.redis.hgetall(self.keys.campaign)))
        if new is None:
            return None
        self.campaign = new
        return self.campaign

    # Venue API keys: only a SHA-256 of each key is stored.

    async def add_venue_key(self, venue_id: str) -> str:
        key_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)
        token = f"vk.{venue_id}.{key_id}.{secret}"
        await guarded(self.redis.hset(self.keys.venue_keys(venue_id), key_id, _sha(token)))
        return token

    async def revoke_venue_key(self, venue_id: str, key_id: str | None) -> int:
        if key_id is None:
            return int(await guarded(self.redis.delete(self.keys.venue_keys(venue_id))))
        return int(await guarded(self.redis.hdel(self.keys.venue_keys(venue_id), key_id)))

    async def list_venue_keys(self, venue_id: str) -> list[str]:
        return sorted(await guarded(self.redis.hkeys(self.keys.venue_keys(venue_id))))

    async def venue_for_key(self, token: str) -> str | None:
        """The venue a key acts for, or None; the digest is compared in constant time."""
        parsed = parse_venue_key(token)
        if parsed is None:
            return None
        venue_id, key_id = parsed
        if self.campaign.venue(venue_id) is None:
            return None
        stored = await guarded(self.redis.hget(self.keys.venue_keys(venue_id), key_id))
        if stored is None or not hmac.compare_digest(stored, _sha(token)):
            return None
        return venue_id

    async def subscribe_notifications(self, tick_s: float = NOTIFY_TICK_S
                                      ) -> AsyncIterator[str | None]:
        """Messages on the campaign's notify channel, and None after each ``tick_s``
        without one, until the consumer stops or cancels. The ticks let the consumer
        notice ``Engine.stop()`` without a cancellation, which a read blocked in redis-py
        can swallow (then the listener outlived the app's shutdown)."""
        # On a cluster a PUBLISH (void.lua's included) reaches subscribers on every
        # node; we subscribe on the primary serving the campaign's slot, with a
        # plain connection of our own (see docs/cluster.md).
        node = await guarded(node_client(self.redis, self.keys.notify_channel))
        pubsub = node.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys.notify_channel)
            while True:
                msg = await pubsub.get_message(timeout=tick_s)
                if msg and msg.get("type") == "message":
                    yield str(msg["data"])
                elif msg is None:
                    yield None
        finally:
            await pubsub.aclose()
            await release(self.redis, node)

    async def publish(self, message: str) -> None:
        await guarded(self.redis.publish(self.keys.notify_channel, message))


def _sum(parts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for f, v in part.items():
            total[f] = total.get(f, 0) + v
    return total


def parse_venue_key(token: str) -> tuple[str, str] | None:
    """(venue id, key id) of ``vk.<venue id>.<key id>.<secret>``, else None.

    Read from the right: the key id (hex) and the secret (base64url) never hold a
    dot, while a venue id may (``A-Za-z0-9_.-``), so ``vk.ski.v1.<id>.<secret>`` is
    venue ``ski.v1``. Keys of dot-free venues read exactly as they always did.
    """
    if not token.startswith("vk."):
        return None
    parts = token[3:].rsplit(".", 2)
    if len(parts) != 3 or not all(parts):
        return None
    venue_id, key_id, _secret = parts
    return venue_id, key_id


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _grab_result(reply: list[Any]) -> GrabResult:
    oc = scripts.outcome(GrabOutcome, int(reply[0]))
    now = int(reply[1])
    if oc is GrabOutcome.GRANTED:
        return GrabResult(oc, now, str(reply[2]), int(reply[3]), int(reply[4]), int(reply[5]),
                          int(reply[6]))
    if oc is GrabOutcome.REPLAYED:
        return GrabResult(oc, now, str(reply[2]), int(reply[3]), int(reply[4]), int(reply[5]))
    if oc in (GrabOutcome.ROUND_NOT_OPEN, GrabOutcome.ROUND_CLOSED):
        return GrabResult(oc, now, edge_ms=int(reply[2]))
    if oc is GrabOutcome.BAD_ARGUMENT:
        return GrabResult(oc, now, message=str(reply[2]))
    return GrabResult(oc, now)
