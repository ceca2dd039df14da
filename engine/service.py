"""The engine's use cases, between HTTP handlers and the store.

Holds each worker's cached knowledge (the campaign, remaining stock, sold-out
venues, the offset of Redis's clock) and turns script outcomes into Coupons
or contract errors. Imports neither aiohttp nor redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import codes, errors
from .auth import (
    DEFAULT_LEEWAY_S,
    MemberVerifier,
    Secrets,
    admin_name,
    bearer,
    mint_member_token,
    resolve_secrets,
)
from .campaign import ID_RE, Campaign
from .config import Settings
from .domain import coupon_view, issued_view, line_key, rfc3339, round_state
from .metrics import Metrics
from .ratelimit import FailureWindow, TokenBucket, retry_after
from .schemas import (
    MAX_ADD,
    AdminRoundView,
    AuditRecord,
    CampaignView,
    Coupon,
    DemoSignInReply,
    ReverseReply,
    RoundControlReply,
    RoundStats,
    RoundView,
    VenueInfo,
    VenueStats,
    VenueStock,
    check_reason,
)
from .store import GrabResult, Store, active_campaign, client_for, connect_with_retry, shard_count
from .store.scripts import (
    AddStockOutcome,
    CloseOutcome,
    GrabOutcome,
    PauseOutcome,
    RedeemOutcome,
    ResumeOutcome,
    ReverseOutcome,
    VoidOutcome,
)
from .store.state import ControlResult

log = logging.getLogger("engine.service")

# A round is answered "not open" without Redis only this long before opening
# (by the Redis clock as this worker estimates it), and "closed" only this long after.
CLOCK_MARGIN_MS = 500
# Members a worker remembers at a quota (WorkerState.at_quota): some 30 MB at most.
AT_QUOTA_MAX = 200_000
# The at_quota entry for the campaign's quota (never a round id: ids match ID_RE).
CAMPAIGN_WIDE = "*"
# Shared refusal instances (Engine.refusal); a few per round in practice.
_REFUSALS_MAX = 4096
POLL_INTERVAL_S = 0.5
# Refill-and-grab tries for a member whose stock shard is dry (docs/cluster.md).
_REFILL_ATTEMPTS = 32
# Lifetime of a member token from the demo sign-in (development secrets only).
DEMO_TOKEN_TTL_S = 12 * 3600

# Each script's refusals as the contract's errors (errors.py). An outcome that is
# not here is a success or an engine bug (BAD_ARGUMENT, CODE_COLLISION).
GRAB_REFUSALS: dict[GrabOutcome, type[errors.EngineError]] = {
    GrabOutcome.ROUND_NOT_FOUND: errors.RoundNotFound,
    GrabOutcome.VENUE_NOT_FOUND: errors.VenueNotFound,
    GrabOutcome.ROUND_NOT_OPEN: errors.RoundNotOpen,
    GrabOutcome.ROUND_CLOSED: errors.RoundClosed,
    GrabOutcome.ROUND_QUOTA: errors.RoundQuotaExceeded,
    GrabOutcome.CAMPAIGN_QUOTA: errors.CampaignQuotaExceeded,
    GrabOutcome.SOLD_OUT: errors.SoldOut,
    GrabOutcome.IDEMPOTENCY_REUSED: errors.IdempotencyKeyReused,
    GrabOutcome.ROUND_PAUSED: errors.RoundPaused,
}
# The grab counter's outcome label, computed once rather than per grab.
_GRAB_LABELS = {oc: oc.name.lower() for oc in GrabOutcome}
REDEEM_REFUSALS: dict[RedeemOutcome, type[errors.EngineError]] = {
    RedeemOutcome.NOT_FOUND: errors.CouponNotFound,
    RedeemOutcome.WRONG_VENUE: errors.WrongVenue,
    RedeemOutcome.ALREADY_REDEEMED: errors.AlreadyRedeemed,
    RedeemOutcome.VOID: errors.CouponVoid,
    RedeemOutcome.NOT_YET_VALID: errors.CouponNotYetValid,
    RedeemOutcome.EXPIRED: errors.CouponExpired,
}
VOID_REFUSALS: dict[VoidOutcome, type[errors.EngineError]] = {
    VoidOutcome.NOT_FOUND: errors.CouponNotFound,
    VoidOutcome.ALREADY_REDEEMED: errors.AlreadyRedeemed,
    VoidOutcome.ALREADY_VOID: errors.AlreadyVoid,
}
# The operators' controls. Pausing a round that is paused already answers round_not_open
# (the contract's refusal for a round that is not granting), with its own message.
PAUSE_REFUSALS: dict[PauseOutcome, type[errors.EngineError]] = {
    PauseOutcome.ROUND_NOT_FOUND: errors.RoundNotFound,
    PauseOutcome.ROUND_NOT_OPEN: errors.RoundNotOpen,
    PauseOutcome.ROUND_CLOSED: errors.RoundClosed,
    PauseOutcome.ALREADY_PAUSED: errors.RoundNotOpen,
}
RESUME_REFUSALS: dict[ResumeOutcome, type[errors.EngineError]] = {
    ResumeOutcome.ROUND_NOT_FOUND: errors.RoundNotFound,
    ResumeOutcome.ROUND_NOT_PAUSED: errors.RoundNotPaused,
}
CLOSE_REFUSALS: dict[CloseOutcome, type[errors.EngineError]] = {
    CloseOutcome.ROUND_NOT_FOUND: errors.RoundNotFound,
    CloseOutcome.ROUND_CLOSED: errors.RoundClosed,
}
ADD_STOCK_REFUSALS: dict[AddStockOutcome, type[errors.EngineError]] = {
    AddStockOutcome.ROUND_NOT_FOUND: errors.RoundNotFound,
    AddStockOutcome.VENUE_NOT_FOUND: errors.VenueNotFound,
    AddStockOutcome.ROUND_CLOSED: errors.RoundClosed,
    AddStockOutcome.OVER_BUDGET: errors.OverBudget,
}
REVERSE_REFUSALS: dict[ReverseOutcome, type[errors.EngineError]] = {
    ReverseOutcome.NOT_FOUND: errors.CouponNotFound,
    ReverseOutcome.NOT_REDEEMED: errors.NotRedeemed,
    ReverseOutcome.ALREADY_SETTLED: errors.AlreadySettled,
}


def refusal(cls: type[errors.EngineError], at_ms: int, tz: str) -> errors.EngineError:
    """The error, with its extra field (a time the script returned) when it has one."""
    err = cls()
    if cls.extra:
        err.fields[cls.extra] = rfc3339(at_ms, tz)
    return err


@dataclass
class WorkerState:
    """What one worker process knows without asking Redis."""

    campaign: Campaign
    remaining: dict[str, int] = field(default_factory=dict)
    sold_out: set[str] = field(default_factory=set)
    # Rounds an operator paused, as a script reply or a 'pause' notice said (cleared by
    # 'resume' and by the poller): refused without Redis, never granted from.
    paused: set[str] = field(default_factory=set)
    # redis_time_ms - local_time_ms, from the last script reply.
    clock_offset_ms: float = 0.0
    fingerprint: str = ""
    # Members grab.lua found (or this worker made) at a quota: member -> the rounds
    # whose quota they reached, CAMPAIGN_WIDE for the campaign's (a tuple of strings,
    # which the garbage collector does not track). A quota is never given back (a void
    # returns the stock, not the quota), so this only grows until the campaign
    # changes; bounded, least recently used dropped first.
    at_quota: OrderedDict[str, tuple[str, ...]] = field(default_factory=OrderedDict)

    def knows_at_quota(self, member_id: str, round_id: str) -> None:
        """Remember that the member reached the round's quota (CAMPAIGN_WIDE: the
        campaign's)."""
        known = self.at_quota.get(member_id)
        if known is None:
            self.at_quota[member_id] = (round_id,)
            if len(self.at_quota) > AT_QUOTA_MAX:
                self.at_quota.popitem(last=False)
        else:
            if round_id not in known:
                self.at_quota[member_id] = (*known, round_id)
            self.at_quota.move_to_end(member_id)

    def quota_refusal(self, member_id: str, round_id: str) -> GrabOutcome | None:
        """The quota refusal grab.lua would give this member in this round, if known."""
        known = self.at_quota.get(member_id)
        if known is None:
            return None
        if round_id in known:
            return GrabOutcome.ROUND_QUOTA
        if CAMPAIGN_WIDE in known:
            return GrabOutcome.CAMPAIGN_QUOTA
        return None

    def redis_now_ms(self) -> float:
        return time.time() * 1000 + self.clock_offset_ms

    def observe_clock(self, redis_now_ms: int) -> None:
        self.clock_offset_ms = redis_now_ms - time.time() * 1000


class Engine:
    def __init__(self, store: Store, secrets: Secrets, *, member_rate: float,
                 member_burst: int, venue_bad_code_limit: int,
                 metrics: Metrics | None = None,
                 member_jwt_leeway_s: float = DEFAULT_LEEWAY_S) -> None:
        self.store = store
        self.state = WorkerState(store.campaign, fingerprint=store.campaign.fingerprint())
        self.secrets = secrets
        self.members = MemberVerifier(secrets.member_jwt_secret, ID_RE,
                                      leeway_s=member_jwt_leeway_s)
        self.member_limit = TokenBucket(member_rate, member_burst)
        self.venue_failures = FailureWindow(venue_bad_code_limit)
        self.metrics = metrics or Metrics.disabled()
        self._venue_cache: dict[str, tuple[str, float]] = {}
        self._venue_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._refills: dict[tuple[str, int], asyncio.Future[int]] = {}
        self._refusals: dict[tuple[type[errors.EngineError], int], errors.EngineError] = {}
        self._stopping = False
        # Set by a notice that the campaign changed (an operator's close or added stock):
        # the poller then runs at once instead of at its next tick.
        self._poke = asyncio.Event()
        self.controls = Controls(store, on_change=self._reload_campaign)

    async def ready(self) -> bool:
        """Whether Redis answers (for /readyz)."""
        return await self.store.ping()

    async def close(self) -> None:
        await self.store.close()

    @property
    def campaign(self) -> Campaign:
        return self.state.campaign

    # Credentials

    def member(self, authorization: str | None) -> str:
        return self.members.verify(bearer(authorization))

    def admin(self, authorization: str | None) -> str:
        """The operator's name (what the audit records) for a valid operator token."""
        return admin_name(bearer(authorization), self.secrets.admins)

    async def venue(self, authorization: str | None) -> str:
        token = bearer(authorization)
        now = time.monotonic()
        hit = self._venue_cache.get(token)
        # Cached for a few seconds: a revoked key stops working within that time.
        if hit is not None and hit[1] > now:
            return hit[0]
        venue_id = await self.store.venue_for_key(token)
        if venue_id is None:
            raise errors.Unauthorized("invalid venue key")
        if len(self._venue_cache) > 10_000:
            self._venue_cache.clear()
        self._venue_cache[token] = (venue_id, now + 5.0)
        return venue_id

    def rate_limit_member(self, member_id: str) -> None:
        wait = self.member_limit.take(member_id, time.monotonic())
        if wait:
            raise errors.RateLimited(headers={"Retry-After": retry_after(wait)})

    # Members

    async def grab(self, member_id: str, round_id: str, venue_id: str,
                   idem_key: str | None) -> Coupon | errors.EngineError:
        """The coupon (new, or replayed for a repeated Idempotency-Key) or the refusal.

        Refusals are returned, not raised: this is the path a million members hit
        at once, and raising through the handler, the middleware and aiohttp's
        frames cost more than deciding. Store failures still raise ``Unavailable``.
        """
        c = self.campaign
        r = c.round(round_id)
        if r is None:
            self.metrics.grab(round_id, "round_not_found")
            return self.refusal(errors.RoundNotFound)
        if venue_id not in r.stock:
            self.metrics.grab(round_id, "venue_not_found")
            return self.refusal(errors.VenueNotFound)
        now = self.state.redis_now_ms()
        if now < r.opens_at_ms - CLOCK_MARGIN_MS:
            self.metrics.grab(round_id, "round_not_open")
            return self.refusal(errors.RoundNotOpen, r.opens_at_ms)
        # The rest of what the worker knows, in grab.lua's order of checks; each still
        # lets a keyed retry of a granted request through to its replay.
        line = line_key(round_id, venue_id)
        known = None
        if now > r.closes_at_ms + CLOCK_MARGIN_MS:
            known = GrabOutcome.ROUND_CLOSED
        elif round_id in self.state.paused:
            known = GrabOutcome.ROUND_PAUSED
        elif self.state.at_quota and (
                quota := self.state.quota_refusal(member_id, round_id)) is not None:
            known = quota
        elif line in self.state.sold_out:
            known = GrabOutcome.SOLD_OUT
        if known is not None and not await self._may_replay(member_id, idem_key):
            self.metrics.grab(round_id, _GRAB_LABELS[known])
            return self.refusal(GRAB_REFUSALS[known])
        # metrics.script's timing, without a generator-based context manager per grant.
        t0 = time.perf_counter()
        try:
            res = await self.store.grab(round_id, venue_id, member_id, idem_key)
        finally:
            self.metrics.script_took("grab", time.perf_counter() - t0)
        if res.outcome is GrabOutcome.SOLD_OUT and self.store.shards > 1:
            res = await self._grab_after_refill(res, member_id, round_id, venue_id, idem_key)
        self.state.observe_clock(res.now_ms)
        self.metrics.grab(round_id, _GRAB_LABELS[res.outcome])
        return self._grab_reply(res, member_id, round_id, venue_id, line)

    def refusal(self, cls: type[errors.EngineError], at_ms: int = 0) -> errors.EngineError:
        """The refusal ``cls`` (with its time field from ``at_ms`` when it has one), one
        shared instance per (class, time): the grab path returns these rather than
        raising them, and each is encoded once (``errors.EngineError.encoded``)."""
        key = (cls, at_ms if cls.extra else 0)
        err = self._refusals.get(key)
        if err is None:
            if len(self._refusals) >= _REFUSALS_MAX:
                self._refusals.clear()
            err = self._refusals[key] = refusal(cls, at_ms, self.campaign.timezone)
        return err

    async def _may_replay(self, member_id: str, idem_key: str | None) -> bool:
        """Whether a request the worker could refuse without Redis (closed, sold out)
        must still go to grab.lua: a keyed retry of a granted request gets its coupon."""
        return idem_key is not None and await self.store.has_idempotency(member_id, idem_key)

    async def _grab_after_refill(self, res: GrabResult, member_id: str, round_id: str,
                                 venue_id: str, idem_key: str | None) -> GrabResult:
        """The member's stock shard is dry: move stock into it from another shard and
        grab again, until a grab passes or every other shard is empty too (then the
        answer is sold out). Each refill moves at least one unit, but other members
        of the shard may take it first; after _REFILL_ATTEMPTS the member is asked
        to retry (503) rather than told a sold-out that may be false."""
        line = line_key(round_id, venue_id)
        shard = self.store.member_shard(member_id)
        for _ in range(_REFILL_ATTEMPTS):
            if not await self._refill(line, shard):
                return res
            with self.metrics.script("grab"):
                res = await self.store.grab(round_id, venue_id, member_id, idem_key)
            if res.outcome is not GrabOutcome.SOLD_OUT:
                return res
        # Stock still moves but others keep winning it: "sold out" would be false.
        raise errors.Unavailable("stock is being rebalanced; retry",
                                 headers={"Retry-After": "1"})

    def _refill_done(self, key: tuple[str, int], f: asyncio.Future[int]) -> None:
        self._refills.pop(key, None)
        # Every waiter may have gone (clients hung up): mark a failure as seen here,
        # the waiters still present get it from their own await.
        if not f.cancelled():
            f.exception()

    async def _refill(self, line: str, shard: int) -> int:
        """One refill of (line, shard) at a time per worker: the requests that found
        the shard dry together wait for the same transfer instead of each halving
        another shard."""
        key = (line, shard)
        running = self._refills.get(key)
        if running is None:
            running = asyncio.ensure_future(self.store.transfers.refill(line, shard))
            self._refills[key] = running
            running.add_done_callback(lambda f: self._refill_done(key, f))
            self.metrics.count_refill()
        return await asyncio.shield(running)

    def _grab_reply(self, res: GrabResult, member_id: str, round_id: str, venue_id: str,
                    line: str) -> Coupon | errors.EngineError:
        c = self.campaign
        oc = res.outcome
        if oc is GrabOutcome.GRANTED or oc is GrabOutcome.REPLAYED:
            if oc is GrabOutcome.GRANTED:
                # With shards, ``remaining`` is one shard's: the poll sums them.
                if self.store.shards == 1:
                    if res.remaining <= 0:
                        self.state.sold_out.add(line)
                    self.state.remaining[line] = res.remaining
                self.metrics.issued(round_id, venue_id)
                r = c.round(round_id)
                if r is not None and r.member_round_quota == 1:
                    # Granted the round's one coupon: the member's next tap is refused
                    # here (quota is never given back: a void returns stock only).
                    self.state.knows_at_quota(member_id, round_id)
            # A replay returns the first result again: the coupon as it was issued.
            return issued_view(c, res.code, round_id, venue_id, member_id, res.issued_at_ms,
                               res.valid_from_ms, res.valid_until_ms)
        if oc is GrabOutcome.SOLD_OUT:
            self.state.sold_out.add(line)
        elif oc is GrabOutcome.ROUND_PAUSED:
            self.state.paused.add(round_id)
        elif oc is GrabOutcome.ROUND_QUOTA:
            self.state.knows_at_quota(member_id, round_id)
        elif oc is GrabOutcome.CAMPAIGN_QUOTA:
            self.state.knows_at_quota(member_id, CAMPAIGN_WIDE)
        cls = GRAB_REFUSALS.get(oc)
        if cls is None:
            raise RuntimeError(f"grab.lua refused its arguments: {oc.name} {res.message}")
        return self.refusal(cls, res.edge_ms)

    async def my_coupons(self, member_id: str) -> list[Coupon]:
        return [coupon_view(self.campaign, s) for s in await self.store.member_coupons(member_id)]

    async def my_coupon(self, member_id: str, text: str) -> Coupon:
        code = codes.normalize(text)
        state = await self.store.coupon(code) if code else None
        if state is None or state.member_id != member_id:
            raise errors.CouponNotFound()
        return coupon_view(self.campaign, state)

    async def void(self, member_id: str, text: str) -> Coupon:
        code = codes.normalize(text)
        if code is None:
            raise errors.CouponNotFound()
        with self.metrics.script("void"):
            res = await self.store.void(member_id, code)
        self.state.observe_clock(res.now_ms)
        if res.coupon is None:
            raise refusal(VOID_REFUSALS[res.outcome], res.at_ms, self.campaign.timezone)
        s = res.coupon
        if res.restocked:
            self.state.sold_out.discard(line_key(s.round_id, s.venue_id))
        self.metrics.voided(s.round_id, s.venue_id)
        return coupon_view(self.campaign, s)

    # Venues

    @contextlib.asynccontextmanager
    async def _venue_attempt(self, venue_id: str) -> AsyncIterator[None]:
        """One code check of a venue, inside its unknown-code budget.

        Every check holds one of the budget's remaining failures until it is
        answered, so concurrent checks can never spend more than the budget (100
        concurrent random codes, limit 10: exactly 10 x 404). Checks beyond the
        headroom wait for one in flight to finish; a venue with a clean record has
        up to ``limit`` checks in flight per worker, not one at a time.
        """
        while True:
            now = time.monotonic()
            wait = self.venue_failures.blocked_for(venue_id, now)
            if wait:
                self.metrics.redemption(venue_id, "rate_limited")
                raise errors.RateLimited(headers={"Retry-After": retry_after(wait)})
            if self.venue_failures.headroom(venue_id, now) > 0:
                break
            # Only attempts in flight can leave no headroom without a block: one
            # of them finishing wakes us.
            fut = asyncio.get_running_loop().create_future()
            self._venue_waiters.setdefault(venue_id, []).append(fut)
            await fut
        self.venue_failures.reserve(venue_id)
        try:
            yield
        finally:
            self.venue_failures.release(venue_id)
            for f in self._venue_waiters.pop(venue_id, ()):
                if not f.done():
                    f.set_result(None)

    def _venue_code(self, venue_id: str, text: str) -> str:
        """Canonical code, or a 404 counted against the venue's failure budget (called
        inside ``_venue_attempt``)."""
        now = time.monotonic()
        code = codes.normalize(text)
        if code is None:
            self.venue_failures.fail(venue_id, now)
            self.metrics.redemption(venue_id, "malformed")
            raise errors.CouponNotFound()
        return code

    async def venue_lookup(self, venue_id: str, text: str) -> Coupon:
        async with self._venue_attempt(venue_id):
            code = self._venue_code(venue_id, text)
            state = await self.store.coupon(code)
            if state is None:
                self.venue_failures.fail(venue_id, time.monotonic())
        if state is None:
            self.metrics.redemption(venue_id, "lookup_not_found")
            raise errors.CouponNotFound()
        if state.venue_id != venue_id:
            self.metrics.redemption(venue_id, "lookup_wrong_venue")
            raise errors.WrongVenue()
        self.metrics.redemption(venue_id, "lookup")
        return coupon_view(self.campaign, state)

    async def redeem(self, venue_id: str, text: str) -> Coupon:
        async with self._venue_attempt(venue_id):
            code = self._venue_code(venue_id, text)
            with self.metrics.script("redeem"):
                res = await self.store.redeem(venue_id, code)
            if res.outcome is RedeemOutcome.NOT_FOUND:
                self.venue_failures.fail(venue_id, time.monotonic())
        self.state.observe_clock(res.now_ms)
        self.metrics.redemption(venue_id, res.outcome.name.lower())
        if res.coupon is None:
            raise refusal(REDEEM_REFUSALS[res.outcome], res.at_ms, self.campaign.timezone)
        self.metrics.redeemed(res.coupon.round_id, venue_id)
        return coupon_view(self.campaign, res.coupon)

    async def venue_redemptions(self, venue_id: str, since_ms: int) -> list[Coupon]:
        return [coupon_view(self.campaign, s)
                for s in await self.store.venue_redemptions(venue_id, since_ms)]

    # Public and operators

    def rounds(self) -> list[RoundView]:
        return [self._round_view(r.id) for r in self.campaign.rounds]

    def round(self, round_id: str) -> RoundView:
        if self.campaign.round(round_id) is None:
            raise errors.RoundNotFound()
        return self._round_view(round_id)

    def _round_view(self, round_id: str) -> RoundView:
        return round_view(self.campaign, round_id, self.state.remaining,
                          int(self.state.redis_now_ms()))

    # The pages' read-only additions (docs/pages.md): only what the worker already knows.

    def campaign_view(self) -> CampaignView:
        c = self.campaign
        return CampaignView(
            id=c.id, name=c.name, timezone=c.timezone, face_value_fen=c.face_value_fen,
            member_price_fen=c.member_price_fen, member_campaign_quota=c.member_campaign_quota,
            venues=[VenueInfo(venue_id=v.id, name=v.name, kind=v.kind, city=v.city)
                    for v in c.venues])

    def engine_time(self) -> str:
        """The Redis clock as this worker estimates it (the clock that opens rounds),
        with milliseconds."""
        return rfc3339(int(self.state.redis_now_ms()), self.campaign.timezone)

    def venue_view(self, venue_id: str) -> VenueInfo:
        v = self.campaign.venue(venue_id)
        if v is None:  # a key for a venue the campaign no longer has: not a key at all
            raise errors.Unauthorized("invalid venue key")
        return VenueInfo(venue_id=v.id, name=v.name, kind=v.kind, city=v.city)

    def demo_member_token(self, member_id: str) -> DemoSignInReply:
        """A member token for any id: only with the engine's development secrets, which
        sign nothing the union's identity service would."""
        if not self.secrets.development:
            raise errors.NotFound("no demo sign-in with configured secrets")
        now = time.time()
        return DemoSignInReply(
            token=mint_member_token(self.secrets.member_jwt_secret, member_id,
                                    DEMO_TOKEN_TTL_S, now=now),
            member_id=member_id,
            expires_at=rfc3339(int(now + DEMO_TOKEN_TTL_S) * 1000, self.campaign.timezone))

    async def round_stats(self, round_id: str) -> RoundStats:
        c = self.campaign
        r = c.round(round_id)
        if r is None:
            raise errors.RoundNotFound()
        stats = await self.store.stats()
        stock = await self.store.stock()
        now = await self.store.time_ms()
        rows = []
        totals = {k: 0 for k in ("stock", "remaining", "issued", "void", "returned_open",
                                 "returned_closed", "redeemed", "added", "reversed")}
        for vid in r.stock:
            line = line_key(round_id, vid)
            v = c.venue(vid)
            row = VenueStats(
                venue_id=vid, name=v.name if v else vid,
                stock=stats.get(f"initial:{line}", 0), remaining=stock.get(line, 0),
                issued=stats.get(f"issued:{line}", 0), void=stats.get(f"void:{line}", 0),
                returned_open=stats.get(f"returned_open:{line}", 0),
                returned_closed=stats.get(f"returned_closed:{line}", 0),
                redeemed=stats.get(f"redeemed:{line}", 0), added=stats.get(f"added:{line}", 0),
                reversed=stats.get(f"reversed:{line}", 0))
            rows.append(row)
            for k in totals:
                totals[k] += getattr(row, k)
        paused = (await self.store.round_controls())[round_id].paused_since_ms is not None
        return RoundStats(round_id=round_id, state=round_state(r, now), venues=rows,
                          totals=totals, paused=paused)

    # Background: keep the worker's knowledge fresh

    async def refresh(self) -> None:
        """Re-read remaining stock and the campaign if it changed; clear stale sold-out flags."""
        # Finish transfers a crashed worker left half done before reading stock.
        await self.store.transfers.sweep()
        stock = await self.store.stock()
        self.state.remaining = stock
        for line in [x for x in self.state.sold_out if stock.get(x, 0) > 0]:
            self.state.sold_out.discard(line)
        now = await self.store.time_ms()
        self.state.observe_clock(now)
        await self._reload_campaign()
        controls = await self.store.round_controls()
        for rid in [x for x in self.state.paused if _unpaused(controls, x)]:
            self.state.paused.discard(rid)
        # This poll is the engine's one reader of Redis state: the gauges come from here.
        stats = await self.store.stats()
        lag = await self.store.ledger_lag()
        sold_out = await self._sold_out(stock, now)
        self.metrics.observe_state(self.campaign, stock, stats, now, lag, sold_out)
        self.metrics.observe_controls({
            rid: (rc.paused_since_ms is not None, rc.last_paused_ms, rc.last_resumed_ms,
                  rc.closed_early_ms) for rid, rc in controls.items()})

    async def _reload_campaign(self) -> None:
        """Take the campaign again when its version moved (a load, or an operator's close
        or added stock)."""
        fp = await self.store.campaign_fingerprint()
        if fp and fp != self.state.fingerprint:
            new = await self.store.reload_campaign()
            if new is not None:
                self.state.campaign = new
                self.state.fingerprint = fp
                # Quotas, round times or the timezone may be new: forget what they decided.
                self.state.at_quota.clear()
                self._refusals.clear()
                self.metrics.prime(new)
                log.info("campaign %s reloaded (version %s)", new.id, fp[:12])

    async def _sold_out(self, stock: dict[str, int], now_ms: int) -> dict[str, int]:
        """When each line first ran out while its round was open, as the pollers saw it
        (to the poll interval), for the dashboard's time to sell-out."""
        seen = await self.store.sold_out_times()
        new = [f"{r.id}:{v}" for r in self.campaign.rounds
               if round_state(r, now_ms) == "open" for v in r.stock
               if f"{r.id}:{v}" not in seen and stock.get(f"{r.id}:{v}", 1) <= 0]
        if new:
            await self.store.mark_sold_out(new, now_ms)
            seen = await self.store.sold_out_times()
        return seen

    def stop(self) -> None:
        """Ask the background loops to end. Cancelling them is not enough on its own:
        a client library can swallow a cancellation that races its own timeout
        (asyncio.timeout in 3.11 then un-cancels the task), and the loop would go on."""
        self._stopping = True

    async def poll_forever(self) -> None:
        while not self._stopping:
            self._poke.clear()
            try:
                await self.refresh()
            except errors.Unavailable as exc:
                _reraise_if_cancelling()
                log.warning("state poll failed: %s", exc.message)
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad poll
                _reraise_if_cancelling()
                log.exception("state poll failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), POLL_INTERVAL_S)

    def notice(self, msg: str) -> None:
        """A message of the notify channel: what changed, so cached knowledge goes."""
        kind, _, what = msg.partition(" ")
        if kind == "restock":
            # A void, a transfer or an operator's added stock: the line has stock again.
            self.state.sold_out.discard(what)
            self._poke.set()
        elif kind == "pause":
            self.state.paused.add(what)
        elif kind == "resume":
            self.state.paused.discard(what)
        elif kind == "close":
            self.state.paused.discard(what)
            self._poke.set()  # reload the campaign now: the round's close moved

    async def listen_forever(self) -> None:
        """Clear cached knowledge the moment another process changes it: sold-out flags
        when stock returns, pauses when a round resumes, the campaign on a close."""
        while not self._stopping:
            try:
                async for msg in self.store.subscribe_notifications():
                    if self._stopping:
                        return
                    if msg is not None:
                        self.notice(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect after any failure
                _reraise_if_cancelling()
                log.warning("notification channel lost (%s); reconnecting", exc)
                await asyncio.sleep(1.0)


def _unpaused(controls: dict[str, Any], round_id: str) -> bool:
    rc = controls.get(round_id)
    return rc is None or rc.paused_since_ms is None


def round_view(c: Campaign, round_id: str, remaining: dict[str, int],
               now_ms: int) -> RoundView:
    """The contract's Round: the campaign as run, remaining stock as last read."""
    r = c.round(round_id)
    assert r is not None
    venues = []
    for vid, stock in r.stock.items():
        v = c.venue(vid)
        venues.append(VenueStock(
            venue_id=vid, name=v.name if v else vid, kind=v.kind if v else "",
            stock=stock, remaining=remaining.get(line_key(round_id, vid), stock)))
    return RoundView(
        id=r.id, opens_at=rfc3339(r.opens_at_ms, c.timezone),
        closes_at=rfc3339(r.closes_at_ms, c.timezone), state=round_state(r, now_ms),
        member_round_quota=r.member_round_quota, venues=venues)


class Controls:
    """The operators' controls (contract section 3, "Operator controls"), for the API
    and the CLI alike: pause, resume and close a round, add stock to a line, reverse a
    redemption. Each is one script on Redis that decides atomically with the grabs and
    writes its audit event (who, when, reason, before/after) to the stream, from where
    the archiver puts it in the ledger. ``actor`` is the operator credential's name."""

    def __init__(self, store: Store,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.store = store
        self._on_change = on_change

    @staticmethod
    def _reason(reason: str) -> str:
        try:
            check_reason(reason)
        except ValueError as exc:
            raise errors.InvalidRequest(str(exc)) from None
        return reason

    @staticmethod
    def _round_id(round_id: str) -> str:
        if not ID_RE.match(round_id):
            raise errors.RoundNotFound()
        return round_id

    def _refuse(self, table: dict[Any, type[errors.EngineError]], res: ControlResult[Any],
                message: str | None = None) -> errors.EngineError:
        cls = table.get(res.outcome)
        if cls is None:
            raise RuntimeError(f"control script refused its arguments: {res.outcome.name}"
                               f" {res.values}")
        err = refusal(cls, res.edge_ms, self.store.campaign.timezone)
        if message:
            err.message = message
        return err

    def _audit(self, action: str, round_id: str, actor: str, reason: str,
               res: ControlResult[Any], **extra: Any) -> AuditRecord:
        return AuditRecord(id=res.event_id, action=action,  # type: ignore[arg-type]
                           round_id=round_id, by=actor,
                           at=rfc3339(res.now_ms, self.store.campaign.timezone), reason=reason,
                           before=res.before, after=res.after, **extra)

    async def _round_reply(self, action: str, round_id: str, actor: str, reason: str,
                           res: ControlResult[Any], **extra: Any) -> RoundControlReply:
        if self._on_change is not None:
            await self._on_change()
        c = await self.store.reload_campaign() or self.store.campaign
        stock = await self.store.stock()
        rc = (await self.store.round_controls()).get(round_id)
        base = round_view(c, round_id, stock, res.now_ms)
        paused_since = rc.paused_since_ms if rc else None
        view = AdminRoundView(
            id=base.id, opens_at=base.opens_at, closes_at=base.closes_at, state=base.state,
            member_round_quota=base.member_round_quota, venues=base.venues,
            paused=paused_since is not None,
            paused_at=rfc3339(paused_since, c.timezone) if paused_since else None)
        return RoundControlReply(round=view,
                                 audit=self._audit(action, round_id, actor, reason, res, **extra))

    async def pause(self, actor: str, round_id: str, reason: str) -> RoundControlReply:
        res = await self.store.pause(self._round_id(round_id), actor, self._reason(reason))
        if res.outcome is not PauseOutcome.PAUSED:
            already = res.outcome is PauseOutcome.ALREADY_PAUSED
            raise self._refuse(PAUSE_REFUSALS, res,
                               "the round is paused already" if already else None)
        return await self._round_reply("pause", round_id, actor, reason, res)

    async def resume(self, actor: str, round_id: str, reason: str) -> RoundControlReply:
        res = await self.store.resume(self._round_id(round_id), actor, self._reason(reason))
        if res.outcome is not ResumeOutcome.RESUMED:
            raise self._refuse(RESUME_REFUSALS, res)
        return await self._round_reply("resume", round_id, actor, reason, res)

    async def close(self, actor: str, round_id: str, reason: str) -> RoundControlReply:
        res = await self.store.close_round(self._round_id(round_id), actor,
                                           self._reason(reason))
        if res.outcome is not CloseOutcome.CLOSED:
            raise self._refuse(CLOSE_REFUSALS, res)
        return await self._round_reply("close", round_id, actor, reason, res)

    async def add_stock(self, actor: str, round_id: str, venue_id: str, units: int,
                        reason: str) -> RoundControlReply:
        self._round_id(round_id)
        if not ID_RE.match(venue_id):
            raise errors.VenueNotFound()
        if isinstance(units, bool) or not isinstance(units, int) or \
                not 1 <= units <= MAX_ADD:
            raise errors.InvalidRequest(f"the stock to add must be an integer 1-{MAX_ADD}")
        res = await self.store.add_stock(round_id, venue_id, units, actor,
                                         self._reason(reason))
        if res.outcome is not AddStockOutcome.ADDED:
            message = None
            if res.outcome is AddStockOutcome.OVER_BUDGET:
                committed, budget = (int(x) for x in res.values[:2])
                message = (f"adding {units} would make the campaign's stock cost {committed}"
                           f" fen, over its budget of {budget} fen")
            raise self._refuse(ADD_STOCK_REFUSALS, res, message)
        return await self._round_reply("add_stock", round_id, actor, reason, res,
                                       venue_id=venue_id, units=units)

    async def reverse(self, actor: str, text: str, reason: str) -> ReverseReply:
        reason = self._reason(reason)
        code = codes.normalize(text)
        if code is None:
            raise errors.CouponNotFound()
        res = await self.store.reverse(code, actor, reason)
        if res.outcome is not ReverseOutcome.REVERSED or res.coupon is None:
            message = None
            if res.outcome is ReverseOutcome.NOT_REDEEMED and res.values:
                message = f"this coupon is {res.values[0]}, not redeemed; nothing to reverse"
            raise self._refuse(REVERSE_REFUSALS, res, message)
        s = res.coupon
        c = self.store.campaign
        return ReverseReply(
            coupon=coupon_view(c, s),
            audit=self._audit("reverse", s.round_id, actor, reason, res,
                              venue_id=s.venue_id, code=codes.display(code)))


async def open_engine(settings: Settings, redis_url: str, metrics: Metrics,
                      secrets: Secrets | None = None) -> Engine:
    """One worker's Engine on the Redis at ``redis_url``, its state read once and its
    hot-path connection open."""
    client = client_for(settings, redis_url)
    try:
        await connect_with_retry(client, settings.redis_connect_retries)
        campaign = await active_campaign(client)
        if campaign is None:
            raise RuntimeError("no campaign is loaded; run 'coupon-engine campaign load FILE'")
        shards = await shard_count(client, campaign.id)
    except BaseException:
        await client.aclose()
        raise
    engine = Engine(Store(client, campaign, settings, shards=shards),
                    secrets or resolve_secrets(settings),
                    member_rate=settings.member_rate, member_burst=settings.member_burst,
                    venue_bad_code_limit=settings.venue_bad_code_limit, metrics=metrics,
                    member_jwt_leeway_s=settings.member_jwt_leeway_s)
    metrics.prime(campaign)
    engine.state.fingerprint = await engine.store.campaign_fingerprint() or ""
    await engine.refresh()
    # Connect the hot path now (scripts loaded, SHAs checked), not on the first grab.
    try:
        await engine.store.wire.call("PING")
    except Exception as exc:  # noqa: BLE001 - the first call will retry the connect
        log.warning("hot-path redis connection not ready at start: %s", exc)
    return engine


def _reraise_if_cancelling() -> None:
    """A client library may turn our cancellation into its own error (redis-py can
    report a cancelled read as a timeout); a task asked to stop must still stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()
