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
from dataclasses import dataclass, field
from typing import AsyncIterator

from . import codes, errors
from .auth import MemberVerifier, Secrets, bearer, check_admin
from .campaign import ID_RE, Campaign
from .domain import coupon_from_record, rfc3339, round_state
from .metrics import Metrics
from .ratelimit import FailureWindow, TokenBucket, retry_after
from .schemas import Coupon, RoundStats, RoundView, VenueStats, VenueStock
from .scripts import GrabOutcome, RedeemOutcome, VoidOutcome
from .store import GrabResult, Store

log = logging.getLogger("engine.service")

# A round is answered "not open" without Redis only this long before opening
# (by the Redis clock as this worker estimates it), and "closed" only this long after.
CLOCK_MARGIN_MS = 500
POLL_INTERVAL_S = 0.5
# Refill-and-grab tries for a member whose stock shard is dry (docs/cluster.md).
_REFILL_ATTEMPTS = 32


@dataclass
class WorkerState:
    """What one worker process knows without asking Redis."""

    campaign: Campaign
    remaining: dict[str, int] = field(default_factory=dict)
    sold_out: set[str] = field(default_factory=set)
    # redis_time_ms - local_time_ms, from the last script reply.
    clock_offset_ms: float = 0.0
    fingerprint: str = ""

    def redis_now_ms(self) -> float:
        return time.time() * 1000 + self.clock_offset_ms

    def observe_clock(self, redis_now_ms: int) -> None:
        self.clock_offset_ms = redis_now_ms - time.time() * 1000


class Engine:
    def __init__(self, store: Store, secrets: Secrets, *, member_rate: float,
                 member_burst: int, venue_bad_code_limit: int,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.state = WorkerState(store.campaign, fingerprint=store.campaign.fingerprint())
        self.secrets = secrets
        self.members = MemberVerifier(secrets.member_jwt_secret, ID_RE)
        self.member_limit = TokenBucket(member_rate, member_burst)
        self.venue_failures = FailureWindow(venue_bad_code_limit)
        self.metrics = metrics or Metrics.disabled()
        self._venue_cache: dict[str, tuple[str, float]] = {}
        self._venue_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._refills: dict[tuple[str, int], asyncio.Future[int]] = {}
        self._stopping = False

    @property
    def campaign(self) -> Campaign:
        return self.state.campaign

    # Credentials

    def member(self, authorization: str | None) -> str:
        return self.members.verify(bearer(authorization))

    def admin(self, authorization: str | None) -> None:
        check_admin(bearer(authorization), self.secrets.admin_token)

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
            return errors.RoundNotFound()
        if venue_id not in r.stock:
            self.metrics.grab(round_id, "venue_not_found")
            return errors.VenueNotFound()
        now = self.state.redis_now_ms()
        if now < r.opens_at_ms - CLOCK_MARGIN_MS:
            self.metrics.grab(round_id, "round_not_open")
            return errors.RoundNotOpen(opens_at=rfc3339(r.opens_at_ms, c.timezone))
        if now > r.closes_at_ms + CLOCK_MARGIN_MS and not await self._may_replay(
                member_id, idem_key):
            self.metrics.grab(round_id, "round_closed")
            return errors.RoundClosed()
        line = f"{round_id}:{venue_id}"
        if line in self.state.sold_out and not await self._may_replay(member_id, idem_key):
            self.metrics.grab(round_id, "sold_out")
            return errors.SoldOut()
        with self.metrics.script("grab"):
            res = await self.store.grab(round_id, venue_id, member_id, idem_key)
        if res.outcome is GrabOutcome.SOLD_OUT and self.store.shards > 1:
            res = await self._grab_after_refill(res, member_id, round_id, venue_id, idem_key)
        self.state.observe_clock(res.now_ms)
        self.metrics.grab(round_id, res.outcome.name.lower())
        return self._grab_reply(res, member_id, round_id, venue_id, line)

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
        line = f"{round_id}:{venue_id}"
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
            running = asyncio.ensure_future(self.store.refill(line, shard))
            self._refills[key] = running
            running.add_done_callback(lambda f: self._refill_done(key, f))
            self.metrics.count_refill()
        return await asyncio.shield(running)

    def _grab_reply(self, res: GrabResult, member_id: str, round_id: str, venue_id: str,
                    line: str) -> Coupon | errors.EngineError:
        c = self.campaign
        oc = res.outcome
        if oc in (GrabOutcome.GRANTED, GrabOutcome.REPLAYED):
            if oc is GrabOutcome.GRANTED:
                # With shards, ``remaining`` is one shard's: the poll sums them.
                if self.store.shards == 1:
                    if res.remaining <= 0:
                        self.state.sold_out.add(line)
                    self.state.remaining[line] = res.remaining
                self.metrics.issued(round_id, venue_id)
            # A replay returns the first result again: the coupon as it was issued.
            return coupon_from_record(c, res.code, {
                "round": round_id, "venue": venue_id, "member": member_id,
                "status": "issued", "issued_at": str(res.issued_at_ms),
                "valid_from": str(res.valid_from_ms), "valid_until": str(res.valid_until_ms)})
        if oc is GrabOutcome.SOLD_OUT:
            self.state.sold_out.add(line)
            return errors.SoldOut()
        if oc is GrabOutcome.ROUND_NOT_OPEN:
            return errors.RoundNotOpen(opens_at=rfc3339(res.edge_ms, c.timezone))
        if oc is GrabOutcome.ROUND_CLOSED:
            return errors.RoundClosed()
        if oc is GrabOutcome.ROUND_QUOTA:
            return errors.RoundQuotaExceeded()
        if oc is GrabOutcome.CAMPAIGN_QUOTA:
            return errors.CampaignQuotaExceeded()
        if oc is GrabOutcome.IDEMPOTENCY_REUSED:
            return errors.IdempotencyKeyReused()
        if oc is GrabOutcome.ROUND_NOT_FOUND:
            return errors.RoundNotFound()
        if oc is GrabOutcome.VENUE_NOT_FOUND:
            return errors.VenueNotFound()
        raise RuntimeError(f"grab.lua refused its arguments: {oc.name} {res.message}")

    async def my_coupons(self, member_id: str) -> list[Coupon]:
        rows = await self.store.member_coupons(member_id)
        return [coupon_from_record(self.campaign, code, rec) for code, rec in rows]

    async def my_coupon(self, member_id: str, text: str) -> Coupon:
        code = codes.normalize(text)
        rec = await self.store.coupon(code) if code else None
        if code is None or rec is None or rec.get("member") != member_id:
            raise errors.CouponNotFound()
        return coupon_from_record(self.campaign, code, rec)

    async def void(self, member_id: str, text: str) -> Coupon:
        code = codes.normalize(text)
        if code is None:
            raise errors.CouponNotFound()
        with self.metrics.script("void"):
            res = await self.store.void(member_id, code)
        self.state.observe_clock(res.now_ms)
        oc = res.outcome
        if oc is VoidOutcome.VOIDED:
            rec = res.record
            line = f"{rec['round']}:{rec['venue']}"
            if res.restocked:
                self.state.sold_out.discard(line)
            self.metrics.voided(rec["round"], rec["venue"])
            return coupon_from_record(self.campaign, code, rec)
        if oc is VoidOutcome.NOT_FOUND:
            raise errors.CouponNotFound()
        if oc is VoidOutcome.ALREADY_REDEEMED:
            raise errors.AlreadyRedeemed(redeemed_at=rfc3339(res.at_ms, self.campaign.timezone))
        raise errors.AlreadyVoid()

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
            rec = await self.store.coupon(code)
            if rec is None:
                self.venue_failures.fail(venue_id, time.monotonic())
        if rec is None:
            self.metrics.redemption(venue_id, "lookup_not_found")
            raise errors.CouponNotFound()
        if rec["venue"] != venue_id:
            self.metrics.redemption(venue_id, "lookup_wrong_venue")
            raise errors.WrongVenue()
        self.metrics.redemption(venue_id, "lookup")
        return coupon_from_record(self.campaign, code, rec)

    async def redeem(self, venue_id: str, text: str) -> Coupon:
        async with self._venue_attempt(venue_id):
            code = self._venue_code(venue_id, text)
            with self.metrics.script("redeem"):
                res = await self.store.redeem(venue_id, code)
            if res.outcome is RedeemOutcome.NOT_FOUND:
                self.venue_failures.fail(venue_id, time.monotonic())
        self.state.observe_clock(res.now_ms)
        oc = res.outcome
        self.metrics.redemption(venue_id, oc.name.lower())
        tz = self.campaign.timezone
        if oc is RedeemOutcome.REDEEMED:
            self.metrics.redeemed(res.record["round"], venue_id)
            return coupon_from_record(self.campaign, code, res.record)
        if oc is RedeemOutcome.NOT_FOUND:
            raise errors.CouponNotFound()
        if oc is RedeemOutcome.WRONG_VENUE:
            raise errors.WrongVenue()
        if oc is RedeemOutcome.ALREADY_REDEEMED:
            raise errors.AlreadyRedeemed(redeemed_at=rfc3339(res.at_ms, tz))
        if oc is RedeemOutcome.VOID:
            raise errors.CouponVoid()
        if oc is RedeemOutcome.NOT_YET_VALID:
            raise errors.CouponNotYetValid(valid_from=rfc3339(res.at_ms, tz))
        raise errors.CouponExpired(valid_until=rfc3339(res.at_ms, tz))

    async def venue_redemptions(self, venue_id: str, since_ms: int) -> list[Coupon]:
        rows = await self.store.venue_redemptions(venue_id, since_ms)
        return [coupon_from_record(self.campaign, code, rec) for code, rec in rows]

    # Public and operators

    def rounds(self) -> list[RoundView]:
        return [self._round_view(r.id) for r in self.campaign.rounds]

    def round(self, round_id: str) -> RoundView:
        if self.campaign.round(round_id) is None:
            raise errors.RoundNotFound()
        return self._round_view(round_id)

    def _round_view(self, round_id: str) -> RoundView:
        c = self.campaign
        r = c.round(round_id)
        assert r is not None
        venues = []
        for vid, stock in r.stock.items():
            v = c.venue(vid)
            venues.append(VenueStock(
                venue_id=vid, name=v.name if v else vid, kind=v.kind if v else "",
                stock=stock, remaining=self.state.remaining.get(f"{round_id}:{vid}", stock)))
        return RoundView(
            id=r.id, opens_at=rfc3339(r.opens_at_ms, c.timezone),
            closes_at=rfc3339(r.closes_at_ms, c.timezone),
            state=round_state(r, int(self.state.redis_now_ms())),
            member_round_quota=r.member_round_quota, venues=venues)

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
                                 "returned_closed", "redeemed")}
        for vid in r.stock:
            line = f"{round_id}:{vid}"
            v = c.venue(vid)
            row = VenueStats(
                venue_id=vid, name=v.name if v else vid,
                stock=stats.get(f"initial:{line}", 0), remaining=stock.get(line, 0),
                issued=stats.get(f"issued:{line}", 0), void=stats.get(f"void:{line}", 0),
                returned_open=stats.get(f"returned_open:{line}", 0),
                returned_closed=stats.get(f"returned_closed:{line}", 0),
                redeemed=stats.get(f"redeemed:{line}", 0))
            rows.append(row)
            for k in totals:
                totals[k] += getattr(row, k)
        return RoundStats(round_id=round_id, state=round_state(r, now), venues=rows,
                          totals=totals)

    # Background: keep the worker's knowledge fresh

    async def refresh(self) -> None:
        """Re-read remaining stock and the campaign if it changed; clear stale sold-out flags."""
        # Finish transfers a crashed worker left half done before reading stock.
        await self.store.sweep_transfers()
        stock = await self.store.stock()
        self.state.remaining = stock
        for line in [x for x in self.state.sold_out if stock.get(x, 0) > 0]:
            self.state.sold_out.discard(line)
        now = await self.store.time_ms()
        self.state.observe_clock(now)
        fp = await self.store.campaign_fingerprint()
        if fp and fp != self.state.fingerprint:
            new = await self.store.reload_campaign()
            if new is not None:
                self.state.campaign = new
                self.state.fingerprint = fp
                self.metrics.prime(new)
                log.info("campaign %s reloaded (fingerprint %s)", new.id, fp[:12])
        # This poll is the engine's one reader of Redis state: the gauges come from here.
        stats = await self.store.stats()
        lag = await self.store.ledger_lag()
        sold_out = await self._sold_out(stock, now)
        self.metrics.observe_state(self.campaign, stock, stats, now, lag, sold_out)

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
            try:
                await self.refresh()
            except errors.Unavailable as exc:
                _reraise_if_cancelling()
                log.warning("state poll failed: %s", exc.message)
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad poll
                _reraise_if_cancelling()
                log.exception("state poll failed")
            await asyncio.sleep(POLL_INTERVAL_S)

    async def listen_forever(self) -> None:
        """Clear sold-out flags the moment a void returns stock to an open round."""
        while not self._stopping:
            try:
                async for msg in self.store.subscribe_notifications():
                    if self._stopping:
                        return
                    kind, _, line = msg.partition(" ")
                    if kind == "restock":
                        self.state.sold_out.discard(line)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect after any failure
                _reraise_if_cancelling()
                log.warning("notification channel lost (%s); reconnecting", exc)
                await asyncio.sleep(1.0)


def _reraise_if_cancelling() -> None:
    """A client library may turn our cancellation into its own error (redis-py can
    report a cancelled read as a timeout); a task asked to stop must still stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()
