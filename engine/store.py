"""Everything the engine keeps in Redis, behind one class.

The hot path (grab, redeem, void, the idempotency probe) goes through
``wire.Wire``: one pipelined connection per worker with the scripts loaded at
connect (on a Redis Cluster, ``clusterwire.ClusterWire``: one such connection
per primary, routed by slot). Everything else (admin, polling, pub/sub,
campaign loading) uses redis-py (``RedisCluster`` on a cluster, see
``redisconn``). Every Redis failure leaves here as ``errors.Unavailable`` so
the HTTP layer answers 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import logging
import secrets
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rex

from . import campaign as cmp
from . import shards as shards_mod
from . import codes, keys, redisconn, scripts
from .campaign import Campaign, UpdatePlan
from .clusterwire import ClusterWire
from .config import Settings
from .domain import pairs_to_dict
from .errors import Unavailable
from .scripts import (GrabOutcome, RedeemOutcome, Script, VoidOutcome, XferInOutcome,
                      XferOutOutcome)
from .wire import Address, Framed, ReplyError, Wire, WireError, framed

log = logging.getLogger("engine.store")
T = TypeVar("T")

# What the engine requires of Redis so that nothing acknowledged is lost.
REQUIRED_CONFIG = {
    "appendonly": "yes",
    "appendfsync": "always",
    "no-appendfsync-on-rewrite": "no",
    "aof-load-truncated": "no",
    "maxmemory-policy": "noeviction",
}
_CODE_ATTEMPTS = 4
# A transfer journaled in a donor shard and not credited for this long is
# finished by the sweeper (the worker that started it is presumed gone).
TRANSFER_GRACE_MS = 2000


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class ChangeResult:
    """Outcome of redeem.lua or void.lua."""

    outcome: RedeemOutcome | VoidOutcome
    now_ms: int
    record: dict[str, str]
    at_ms: int = 0  # redeemed_at for ALREADY_REDEEMED, valid edge for validity errors
    restocked: bool = False


def _redis_errors_to_unavailable(exc: Exception) -> Unavailable:
    return Unavailable(f"store unavailable: {type(exc).__name__}", headers={"Retry-After": "1"})


# Error replies that mean "the store refuses for now", not "the engine is wrong".
_UNAVAILABLE_PREFIXES = frozenset({"OOM", "LOADING", "READONLY", "MASTERDOWN", "BUSY",
                                   "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "MISCONF"})


async def guarded(op: Awaitable[T]) -> T:
    """Await a Redis operation; any store failure becomes a 503 ``unavailable``."""
    try:
        return await op
    except (rex.ConnectionError, rex.TimeoutError, asyncio.TimeoutError, OSError,
            rex.ClusterDownError, rex.SlotNotCoveredError) as exc:
        raise _redis_errors_to_unavailable(exc) from exc
    except (rex.OutOfMemoryError, rex.ReadOnlyError) as exc:
        # redis-py strips the OOM / READONLY prefix from these two: match the class.
        raise _redis_errors_to_unavailable(exc) from exc
    except rex.ResponseError as exc:
        # OOM, LOADING, READONLY, MASTERDOWN: the store refuses writes for now.
        if str(exc).split(" ", 1)[0] in _UNAVAILABLE_PREFIXES:
            raise _redis_errors_to_unavailable(exc) from exc
        raise


async def wired(op: Awaitable[T]) -> T:
    """``guarded`` for the hot path's wire: the same failures become ``Unavailable``."""
    try:
        return await op
    except WireError as exc:
        raise _redis_errors_to_unavailable(exc) from exc
    except ReplyError as exc:
        if exc.prefix in _UNAVAILABLE_PREFIXES:
            raise _redis_errors_to_unavailable(exc) from exc
        raise


def wire_for(client: redisconn.AnyClient, settings: Settings) -> Wire | ClusterWire:
    """A hot-path Wire to the same server (and database) as a redis-py client; for a
    ``RedisCluster``, a ClusterWire seeded with the nodes the client knows."""
    if redisconn.is_cluster(client):
        return cluster_wire_for(client, settings)
    kw = client.connection_pool.connection_kwargs
    common = {"db": int(kw.get("db") or 0), "username": kw.get("username"),
              "password": kw.get("password")}
    if kw.get("path"):
        addr = Address(path=kw["path"], **common)
    else:
        addr = Address(host=kw.get("host", "127.0.0.1"), port=int(kw.get("port", 6379)),
                       tls=client.connection_pool.connection_class.__name__ == "SSLConnection",
                       **common)
    return Wire(addr, scripts.all_scripts(), timeout=settings.redis_timeout)


def cluster_wire_for(client: Any, settings: Settings) -> ClusterWire:
    nm = client.nodes_manager
    nodes = {**nm.startup_nodes, **nm.nodes_cache}.values()
    seeds = []
    for n in nodes:
        kw = n.connection_kwargs
        seeds.append(Address(host=n.host, port=int(n.port), username=kw.get("username"),
                             password=kw.get("password"),
                             tls=n.connection_class.__name__ == "SSLConnection"))
    return ClusterWire(seeds, scripts.all_scripts(), timeout=settings.redis_timeout)


def client_for(settings: Settings, url: str, *,
               timeout: float | None = None) -> redisconn.AnyClient:
    """The engine's redis-py client: a ``RedisCluster`` for ``redis+cluster://`` URLs
    or with ``settings.redis_cluster``, else a plain one."""
    t = settings.redis_timeout if timeout is None else timeout
    return redisconn.open_client(url, cluster=settings.redis_cluster, timeout=t,
                                 connect_timeout=t, max_connections=256)


async def connect_with_retry(client: aioredis.Redis, attempts: int,
                             delay: float = 0.25) -> None:
    """PING until Redis answers, a bounded number of times, logging each miss."""
    for i in range(1, attempts + 1):
        try:
            await client.ping()
            return
        except (rex.ConnectionError, rex.TimeoutError, OSError, rex.ClusterDownError,
                rex.RedisClusterException) as exc:
            if i == attempts:
                raise
            log.warning("redis not answering (%s), attempt %d/%d", exc, i, attempts)
            await asyncio.sleep(min(delay * i, 2.0))


async def check_safety(client: redisconn.AnyClient) -> list[str]:
    """Settings of this Redis (of every primary of a cluster) that break the engine's
    durability promise."""
    problems = []
    if redisconn.is_cluster(client):
        targets: list[tuple[str, Any]] = [
            (f"{n.host}:{n.port}: ", n) for n in await redisconn.primaries(client)]
    else:
        targets = [("", None)]
    for where, node in targets:
        kw = {"target_nodes": node} if node is not None else {}
        try:
            for name, want in REQUIRED_CONFIG.items():
                got = (await client.config_get(name, **kw)).get(name)
                if got != want:
                    problems.append(f"{where}{name} is {got!r}, the engine needs {want!r}")
        except rex.ResponseError as exc:
            problems.append(f"{where}cannot read CONFIG ({exc}); durability cannot be verified")
    return problems


async def redis_time_ms(client: Any, key: str | None = None) -> int:
    """The server's clock; on a cluster, the clock of the primary serving ``key``
    (the one whose scripts decide about that campaign), else of any node."""
    if key is not None and redisconn.is_cluster(client):
        sec, usec = await client.time(target_nodes=await redisconn.owner_of(client, key))
    else:
        sec, usec = await client.time()
    return int(sec) * 1000 + int(usec) // 1000


async def shard_count(client: redisconn.AnyClient, campaign_id: str) -> int:
    """How many stock shards the loaded campaign has (1 when it was loaded unsharded)."""
    raw = await client.hget(keys.Keys(campaign_id).campaign, "shards")
    return int(raw) if raw else 1


async def active_campaign(client: redisconn.AnyClient) -> Campaign | None:
    cid = await client.get(keys.ACTIVE)
    if cid is None:
        return None
    doc = await client.hget(keys.Keys(cid).campaign, "doc")
    return cmp.from_json(doc) if doc else None


# Compare-and-set of cpn:active, which is alone in its slot on a cluster:
# KEYS[1] = cpn:active, ARGV[1] = the campaign loading, ARGV[2] = the stale id it
# may replace ('' for none). Returns 1, or the id of the campaign that holds it.
_CLAIM_ACTIVE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return 1 end
if cur == false or cur == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return cur
"""


async def _claim_active(client: redisconn.AnyClient, new_id: str, stale: str) -> None:
    got = await client.eval(_CLAIM_ACTIVE, 1, keys.ACTIVE, new_id, stale)
    if got != 1:
        raise cmp.CampaignError(f"this engine holds campaign {got!r}; refusing to load"
                                f" {new_id!r}")


async def load_campaign(client: redisconn.AnyClient, new: Campaign,
                        shards: int = 1) -> UpdatePlan:
    """Load or update the campaign atomically; CampaignError leaves Redis untouched.

    ``shards`` > 1 splits every stock line over that many stock shards, each in
    its own slot (docs/cluster.md, "Stock shards"); the count is fixed at the
    first load, and a later load asking for another count is refused.

    ``cpn:active`` has no hash tag (on a cluster it lives in another slot than
    the campaign's keys), so it is never in the campaign's transaction:

    1. Read it; another campaign whose data exists -> refused, nothing written.
    2. WATCH the campaign hash, read the loaded version, plan the update
       (a refused plan writes nothing).
    3. Claim ``cpn:active`` by compare-and-set (a concurrent load of another
       campaign loses here, before writing anything).
    4. MULTI/EXEC the campaign's keys (one slot); retried from 2 if the hash
       changed under the WATCH.

    A crash between 3 and 4 leaves ``cpn:active`` naming a campaign with no
    data: loading that campaign again finishes the job, and loading another one
    replaces the stale name (step 1 sees no data behind it).
    """
    k = keys.Keys(new.id)
    current = await client.get(keys.ACTIVE)
    stale = ""
    if current is not None and current != new.id:
        if await client.exists(keys.Keys(current).campaign):
            raise cmp.CampaignError(
                f"this engine holds campaign {current!r}; refusing to load {new.id!r}")
        log.warning("cpn:active names campaign %r, which has no data (an interrupted"
                    " load); replacing it with %r", current, new.id)
        stale = current
    # On a cluster, WATCH/MULTI go to the primary serving the campaign's slot.
    if not 1 <= shards <= shards_mod.MAX_SHARDS:
        raise cmp.CampaignError(f"stock shards must be 1..{shards_mod.MAX_SHARDS}, got {shards}")
    tx = await redisconn.node_client(client, k.campaign)
    try:
        return await _load_tagged(client, tx, new, stale, shards)
    finally:
        await redisconn.release(client, tx)


def _write_shard(pipe: Any, k: keys.Keys, old: Campaign | None, new: Campaign,
                 plan: UpdatePlan, shard: int, shards: int) -> None:
    """Queue one shard's part of a load: its copy of the rounds and the quota,
    and its share of every new or changed stock line (changed lines have not
    opened, so each shard still holds exactly its share of the old stock)."""
    for r in new.rounds:
        pipe.hset(k.round(r.id), mapping={
            "o": r.opens_at_ms, "c": r.closes_at_ms, "q": r.member_round_quota,
            "vf": r.valid_from_ms, "vu": r.valid_until_ms})
    for rid in plan.new_rounds:
        r = new.round(rid)
        assert r is not None
        for vid, n in r.stock.items():
            share = shards_mod.split(n, shards)[shard]
            pipe.hset(k.stock, f"{rid}:{vid}", share)
            pipe.hset(k.stats, f"initial:{rid}:{vid}", share)
    for ch in plan.changed_rounds:
        before = old.round(ch.round_id) if old is not None else None
        after = new.round(ch.round_id)
        assert before is not None and after is not None
        for vid in ch.stock_delta:
            delta = (shards_mod.split(after.stock.get(vid, 0), shards)[shard]
                     - shards_mod.split(before.stock.get(vid, 0), shards)[shard])
            pipe.hincrby(k.stock, f"{ch.round_id}:{vid}", delta)
            pipe.hincrby(k.stats, f"initial:{ch.round_id}:{vid}", delta)


async def _load_other_shards(client: redisconn.AnyClient, old: Campaign | None,
                             new: Campaign, plan: UpdatePlan, shards: int) -> None:
    """Apply the plan to shards 1..S-1, each in its own transaction on its own slot,
    before shard 0 (which holds the document) says the load happened. Each shard
    records the fingerprint it is at, so a load repeated after a crash between
    shards applies the plan to each shard exactly once."""
    old_fp = old.fingerprint() if old is not None else None
    new_fp = new.fingerprint()
    for s in range(1, shards):
        k = keys.Keys(new.id, s)
        tx = await redisconn.node_client(client, k.campaign)
        try:
            async with tx.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(k.campaign)
                        at = await pipe.hget(k.campaign, "fingerprint")
                        if at == new_fp:
                            await pipe.reset()
                            break
                        if at != old_fp:
                            raise cmp.CampaignError(
                                f"stock shard {s} holds campaign version {str(at)[:12]}, not the"
                                f" loaded {str(old_fp)[:12]}; it cannot be updated safely")
                        pipe.multi()
                        _write_shard(pipe, k, old, new, plan, s, shards)
                        pipe.hset(k.campaign, mapping={
                            "quota": new.member_campaign_quota, "fingerprint": new_fp})
                        await pipe.execute()
                        break
                    except rex.WatchError:
                        continue
        finally:
            await redisconn.release(client, tx)


async def _load_tagged(client: redisconn.AnyClient, tx: aioredis.Redis, new: Campaign,
                       stale: str, shards: int) -> UpdatePlan:
    k = keys.Keys(new.id)
    async with tx.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(k.campaign)
                doc, had = await pipe.hmget(k.campaign, ["doc", "shards"])
                old = cmp.from_json(doc) if doc else None
                if old is not None and int(had or 1) != shards:
                    raise cmp.CampaignError(
                        f"campaign {new.id} was loaded with {int(had or 1)} stock shard(s);"
                        f" it cannot be reloaded with {shards}")
                now = await redis_time_ms(pipe)
                plan = cmp.plan_update(old, new, now)
                await _claim_active(client, new.id, stale)
                if plan.noop:
                    await pipe.reset()
                    return plan
                await _load_other_shards(client, old, new, plan, shards)
                pipe.multi()
                pipe.hset(k.campaign, mapping={
                    "id": new.id, "quota": new.member_campaign_quota,
                    "doc": cmp.to_json(new), "fingerprint": new.fingerprint()})
                if shards > 1:
                    pipe.hset(k.campaign, "shards", shards)
                _write_shard(pipe, k, old, new, plan, 0, shards)
                await pipe.execute()
                return plan
            except rex.WatchError:
                continue


@dataclass(frozen=True, slots=True)
class Transfer:
    """One journaled move of stock between shards (xfer_out.lua, then xfer_in.lua)."""

    id: str
    donor: int
    to: int
    line: str
    units: int


class Store:
    """The engine's Redis state for the one active campaign.

    With S > 1 stock shards, each call goes to the shard that owns its data:
    a grab to the member's shard, a redeem or void to the code's shard.
    """

    def __init__(self, client: redisconn.AnyClient, campaign: Campaign, settings: Settings,
                 wire: Wire | ClusterWire | None = None, shards: int = 1) -> None:
        self.redis = client
        self.campaign = campaign
        self.keys = keys.Keys(campaign.id)
        self.settings = settings
        self.wire = wire or wire_for(client, settings)
        self.shards = shards
        self.shard_keys = [self.keys.of_shard(s) for s in range(shards)]
        # Keys every grab sends, framed once per shard.
        self._fixed: list[dict[str, Framed]] = [
            {"campaign": framed(k.campaign), "stock": framed(k.stock),
             "stats": framed(k.stats), "events": framed(k.events)}
            for k in self.shard_keys]
        self._round_keys: dict[tuple[int, str], Framed] = {}
        self._grab = scripts.load("grab")
        self._redeem = scripts.load("redeem")
        self._void = scripts.load("void")
        self._xfer_out = scripts.load("xfer_out")
        self._xfer_in = scripts.load("xfer_in")
        # Transfer ids: unique per process and start, so two workers never share one.
        self._xfer_ids = itertools.count(1)
        self._xfer_prefix = f"{os.getpid()}.{secrets.token_hex(3)}"
        # Per shard, '<round>:<venue>' -> remaining, from the last stock() poll.
        self.by_shard: list[dict[str, int]] = [{} for _ in range(shards)]

    async def close(self) -> None:
        await self.wire.close()
        await self.redis.aclose()

    async def _run(self, script: Script, keys_: list[str | Framed],
                   argv: list[str | int]) -> Any:
        """One script call on the hot path; store failures become ``Unavailable``."""
        return await wired(self.wire.evalsha(script, keys_, argv))

    async def ping(self) -> bool:
        try:
            return bool(await guarded(self.redis.ping()))
        except Unavailable:
            return False

    async def time_ms(self) -> int:
        return await guarded(redis_time_ms(self.redis, self.keys.campaign))

    def member_shard(self, member_id: str) -> int:
        return shards_mod.member_shard(member_id, self.shards)

    def code_keys(self, code: str) -> keys.Keys:
        """The keys of the shard holding this (canonical) code's record."""
        return self.shard_keys[shards_mod.code_shard(code, self.shards)]

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
        k, f = self.shard_keys[shard], self._fixed[shard]
        round_key = self._round_keys.get((shard, round_id))
        if round_key is None:
            # Only rounds of the campaign reach here (the engine checks first).
            round_key = self._round_keys[shard, round_id] = framed(k.round(round_id))
        for _ in range(_CODE_ATTEMPTS):
            code = self._new_code(shard)
            reply = await self._run(
                self._grab,
                [f["campaign"], round_key, f["stock"], f["stats"], k.member(member_id),
                 k.member_coupons(member_id), k.coupon(code),
                 k.idempotency(member_id, idem_key or ""), f["events"]],
                [round_id, venue_id, member_id, code, "1" if idem_key else "0",
                 self.settings.idempotency_ttl_s])
            result = _grab_result(reply)
            if result.outcome is not GrabOutcome.CODE_COLLISION:
                return result
            log.warning("coupon code collision; drawing another")
        raise RuntimeError("could not draw an unused coupon code")

    # Stock transfers between shards (docs/cluster.md, "Stock shards").

    async def take_from(self, donor: int, to: int, line: str) -> Transfer | None:
        """Step 1: journal and take half of ``donor``'s share of ``line``; None when
        the donor has none."""
        xid = f"{self._xfer_prefix}.{next(self._xfer_ids)}"
        k = self.shard_keys[donor]
        reply = await self._run(self._xfer_out, [k.stock, k.xfer_out, k.stats], [line, xid, to])
        oc = scripts.outcome("xfer_out", int(reply[0]))
        if oc is XferOutOutcome.MOVED:
            return Transfer(xid, donor, to, line, int(reply[2]))
        if oc is XferOutOutcome.BAD_ARGUMENT:
            raise RuntimeError(f"xfer_out.lua refused its arguments: {reply[2]}")
        return None

    async def credit(self, t: Transfer) -> bool:
        """Step 2: credit the receiving shard (a no-op if done before), then drop the
        donor's journal entry. True if this call credited it."""
        k = self.shard_keys[t.to]
        reply = await self._run(self._xfer_in, [k.stock, k.xfer_in, k.stats],
                                [t.line, t.id, t.units, t.donor, self.keys.notify_channel])
        oc = scripts.outcome("xfer_in", int(reply[0]))
        if oc is XferInOutcome.BAD_ARGUMENT:
            raise RuntimeError(f"xfer_in.lua refused transfer {t.id}: {reply[2]}")
        await wired(self.wire.call("HDEL", self.shard_keys[t.donor].xfer_out, t.id))
        return oc is XferInOutcome.CREDITED

    async def refill(self, line: str, to: int) -> int:
        """Move stock of ``line`` into shard ``to`` from the first donor that has some
        (the fullest by the last poll first); the units moved, 0 if every other shard
        is empty. A donor that fails is skipped; if none gave and one failed, the
        failure is raised (the venue is not known to be sold out)."""
        failed: Unavailable | None = None
        known = {s: self.by_shard[s].get(line, 0) for s in range(self.shards)}
        for donor in shards_mod.donors(to, self.shards, known):
            try:
                t = await self.take_from(donor, to, line)
            except Unavailable as exc:
                failed = exc
                continue
            if t is not None:
                # If this credit fails, the sweeper finishes it: the units are journaled.
                await self.credit(t)
                return t.units
        if failed is not None:
            raise failed
        return 0

    async def pending_transfers(self) -> list[tuple[Transfer, int]]:
        """Every transfer journaled in a donor and not yet dropped, with its age in ms
        (by the donor's clock against shard 0's; cluster nodes' clocks agree closely
        enough for a grace of seconds)."""
        now = await self.time_ms()
        out = []
        for donor, k in enumerate(self.shard_keys):
            raw = await guarded(self.redis.hgetall(k.xfer_out))
            for xid, rec in raw.items():
                to, line, units, at = rec.split("|")
                out.append((Transfer(xid, donor, int(to), line, int(units)), now - int(at)))
        return out

    async def sweep_transfers(self, grace_ms: int = TRANSFER_GRACE_MS) -> int:
        """Finish transfers whose worker stopped between the two steps (a crash, a
        lost reply); returns how many this call credited. Safe to run anywhere,
        any number of times, concurrently with the transfers themselves."""
        if self.shards == 1:
            return 0
        done = 0
        for t, age in await self.pending_transfers():
            if age >= grace_ms:
                if await self.credit(t):
                    log.warning("sweeper credited transfer %s: %d of %s from shard %d to %d",
                                t.id, t.units, t.line, t.donor, t.to)
                    done += 1
        return done

    async def redeem(self, venue_id: str, code: str) -> ChangeResult:
        k = self.code_keys(code)
        reply = await self._run(
            self._redeem, [k.coupon(code), k.stats, k.venue_redemptions(venue_id), k.events],
            [venue_id, code])
        oc = scripts.outcome("redeem", int(reply[0]))
        now = int(reply[1])
        if oc is RedeemOutcome.REDEEMED:
            return ChangeResult(oc, now, pairs_to_dict(reply[2:]))
        at = int(reply[2]) if len(reply) > 2 else 0
        return ChangeResult(oc, now, {}, at_ms=at)

    async def void(self, member_id: str, code: str) -> ChangeResult:
        k = self.code_keys(code)
        reply = await self._run(
            self._void, [k.coupon(code), k.stock, k.stats, k.events],
            [member_id, code, self.keys.notify_channel])
        oc = scripts.outcome("void", int(reply[0]))
        now = int(reply[1])
        if oc is VoidOutcome.VOIDED:
            return ChangeResult(oc, now, pairs_to_dict(reply[3:]), restocked=reply[2] == 1)
        at = int(reply[2]) if len(reply) > 2 else 0
        return ChangeResult(oc, now, {}, at_ms=at)

    async def coupon(self, code: str) -> dict[str, str] | None:
        rec = await guarded(self.redis.hgetall(self.code_keys(code).coupon(code)))
        return rec or None

    async def member_coupons(self, member_id: str) -> list[tuple[str, dict[str, str]]]:
        # A member's list and coupons are all in the member's shard (one slot).
        k = self.shard_keys[self.member_shard(member_id)]
        codes_ = await guarded(self.redis.lrange(k.member_coupons(member_id), 0, -1))
        if not codes_:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for c in codes_:
            pipe.hgetall(k.coupon(c))
        recs = await guarded(pipe.execute())
        return [(c, r) for c, r in zip(codes_, recs) if r]

    async def venue_redemptions(self, venue_id: str, since_ms: int,
                                limit: int = 1000) -> list[tuple[str, dict[str, str]]]:
        """The venue's redemptions since ``since_ms``, oldest first, at most ``limit``;
        with shards, the first ``limit`` of each shard merged by time."""
        scored: list[tuple[float, str, keys.Keys]] = []
        for k in self.shard_keys:
            rows = await guarded(self.redis.zrangebyscore(
                k.venue_redemptions(venue_id), since_ms, "+inf", start=0, num=limit,
                withscores=True))
            scored += [(score, c, k) for c, score in rows]
        scored.sort(key=lambda x: (x[0], x[1]))
        scored = scored[:limit]
        if not scored:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for _, c, k in scored:
            pipe.hgetall(k.coupon(c))
        recs = await guarded(pipe.execute())
        return [(c, r) for (_, c, _), r in zip(scored, recs) if r]

    async def _counts_by_shard(self, name: str) -> list[dict[str, int]]:
        """The integer hash ``name`` ('stock' or 'stats') of every shard."""
        out = []
        for k in self.shard_keys:
            raw = await guarded(self.redis.hgetall(getattr(k, name)))
            out.append({f: int(v) for f, v in raw.items()})
        return out

    async def stock_by_shard(self) -> list[dict[str, int]]:
        self.by_shard = await self._counts_by_shard("stock")
        return self.by_shard

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
        """Record the first sighting only: every worker polls, the earliest wins."""
        pipe = self.redis.pipeline(transaction=False)
        for line in lines:
            pipe.hsetnx(self.keys.sold_out, line, now_ms)
        await guarded(pipe.execute())

    async def ledger_lag(self) -> int:
        """Events on the stream not yet archived into the ledger."""
        from .archiver import lag
        return await guarded(lag(self.redis, self.campaign.id))

    async def has_idempotency(self, member_id: str, idem_key: str) -> bool:
        k = self.shard_keys[self.member_shard(member_id)]
        return bool(await wired(self.wire.call("EXISTS", k.idempotency(member_id, idem_key))))

    async def campaign_fingerprint(self) -> str | None:
        return await guarded(self.redis.hget(self.keys.campaign, "fingerprint"))

    async def reload_campaign(self) -> Campaign | None:
        doc = await guarded(self.redis.hget(self.keys.campaign, "doc"))
        if doc is None:
            return None
        self.campaign = cmp.from_json(doc)
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
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != "vk":
            return None
        _, venue_id, key_id, _secret = parts
        if self.campaign.venue(venue_id) is None:
            return None
        stored = await guarded(self.redis.hget(self.keys.venue_keys(venue_id), key_id))
        if stored is None or not hmac.compare_digest(stored, _sha(token)):
            return None
        return venue_id

    async def subscribe_notifications(self) -> AsyncIterator[str]:
        """Messages on the campaign's notify channel, until cancelled."""
        # On a cluster a PUBLISH (void.lua's included) reaches subscribers on every
        # node; we subscribe on the primary serving the campaign's slot, with a
        # plain connection of our own (see docs/cluster.md).
        node = await guarded(redisconn.node_client(self.redis, self.keys.notify_channel))
        pubsub = node.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys.notify_channel)
            async for msg in pubsub.listen():
                if msg and msg.get("type") == "message":
                    yield str(msg["data"])
        finally:
            await pubsub.aclose()
            await redisconn.release(self.redis, node)

    async def publish(self, message: str) -> None:
        await guarded(self.redis.publish(self.keys.notify_channel, message))


def _sum(parts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for f, v in part.items():
            total[f] = total.get(f, 0) + v
    return total


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _grab_result(reply: list[Any]) -> GrabResult:
    oc = scripts.outcome("grab", int(reply[0]))
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

