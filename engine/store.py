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
import logging
import secrets
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rex

from . import campaign as cmp
from . import codes, keys, redisconn, scripts
from .campaign import Campaign, UpdatePlan
from .clusterwire import ClusterWire
from .config import Settings
from .domain import pairs_to_dict
from .errors import Unavailable
from .scripts import GrabOutcome, RedeemOutcome, Script, VoidOutcome
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


async def load_campaign(client: redisconn.AnyClient, new: Campaign) -> UpdatePlan:
    """Load or update the campaign atomically; CampaignError leaves Redis untouched.

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
    tx = await redisconn.node_client(client, k.campaign)
    try:
        return await _load_tagged(client, tx, new, stale)
    finally:
        await redisconn.release(client, tx)


async def _load_tagged(client: redisconn.AnyClient, tx: aioredis.Redis, new: Campaign,
                       stale: str) -> UpdatePlan:
    k = keys.Keys(new.id)
    async with tx.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(k.campaign)
                doc = await pipe.hget(k.campaign, "doc")
                old = cmp.from_json(doc) if doc else None
                now = await redis_time_ms(pipe)
                plan = cmp.plan_update(old, new, now)
                await _claim_active(client, new.id, stale)
                if plan.noop:
                    await pipe.reset()
                    return plan
                pipe.multi()
                pipe.hset(k.campaign, mapping={
                    "id": new.id, "quota": new.member_campaign_quota,
                    "doc": cmp.to_json(new), "fingerprint": new.fingerprint()})
                for r in new.rounds:
                    pipe.hset(k.round(r.id), mapping={
                        "o": r.opens_at_ms, "c": r.closes_at_ms, "q": r.member_round_quota,
                        "vf": r.valid_from_ms, "vu": r.valid_until_ms})
                for rid in plan.new_rounds:
                    r = new.round(rid)
                    assert r is not None
                    for vid, n in r.stock.items():
                        pipe.hset(k.stock, f"{rid}:{vid}", n)
                        pipe.hset(k.stats, f"initial:{rid}:{vid}", n)
                for ch in plan.changed_rounds:
                    for vid, delta in ch.stock_delta.items():
                        pipe.hincrby(k.stock, f"{ch.round_id}:{vid}", delta)
                        pipe.hincrby(k.stats, f"initial:{ch.round_id}:{vid}", delta)
                await pipe.execute()
                return plan
            except rex.WatchError:
                continue


class Store:
    """The engine's Redis state for the one active campaign."""

    def __init__(self, client: redisconn.AnyClient, campaign: Campaign, settings: Settings,
                 wire: Wire | ClusterWire | None = None) -> None:
        self.redis = client
        self.campaign = campaign
        self.keys = keys.Keys(campaign.id)
        self.settings = settings
        self.wire = wire or wire_for(client, settings)
        k = self.keys
        # Keys every grab sends, framed once.
        self._fixed: dict[str, Framed] = {
            "campaign": framed(k.campaign), "stock": framed(k.stock),
            "stats": framed(k.stats), "events": framed(k.events)}
        self._round_keys: dict[str, Framed] = {}
        self._grab = scripts.load("grab")
        self._redeem = scripts.load("redeem")
        self._void = scripts.load("void")

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

    async def grab(self, round_id: str, venue_id: str, member_id: str,
                   idem_key: str | None) -> GrabResult:
        k, f = self.keys, self._fixed
        round_key = self._round_keys.get(round_id)
        if round_key is None:
            # Only rounds of the campaign reach here (the engine checks first).
            round_key = self._round_keys[round_id] = framed(k.round(round_id))
        for _ in range(_CODE_ATTEMPTS):
            code = codes.new_code()
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

    async def redeem(self, venue_id: str, code: str) -> ChangeResult:
        k = self.keys
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
        k = self.keys
        reply = await self._run(
            self._void, [k.coupon(code), k.stock, k.stats, k.events],
            [member_id, code, k.notify_channel])
        oc = scripts.outcome("void", int(reply[0]))
        now = int(reply[1])
        if oc is VoidOutcome.VOIDED:
            return ChangeResult(oc, now, pairs_to_dict(reply[3:]), restocked=reply[2] == 1)
        at = int(reply[2]) if len(reply) > 2 else 0
        return ChangeResult(oc, now, {}, at_ms=at)

    async def coupon(self, code: str) -> dict[str, str] | None:
        rec = await guarded(self.redis.hgetall(self.keys.coupon(code)))
        return rec or None

    async def member_coupons(self, member_id: str) -> list[tuple[str, dict[str, str]]]:
        codes_ = await guarded(self.redis.lrange(self.keys.member_coupons(member_id), 0, -1))
        if not codes_:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for c in codes_:
            pipe.hgetall(self.keys.coupon(c))
        recs = await guarded(pipe.execute())
        return [(c, r) for c, r in zip(codes_, recs) if r]

    async def venue_redemptions(self, venue_id: str, since_ms: int,
                                limit: int = 1000) -> list[tuple[str, dict[str, str]]]:
        codes_ = await guarded(self.redis.zrangebyscore(
            self.keys.venue_redemptions(venue_id), since_ms, "+inf", start=0, num=limit))
        pipe = self.redis.pipeline(transaction=False)
        for c in codes_:
            pipe.hgetall(self.keys.coupon(c))
        recs = await guarded(pipe.execute()) if codes_ else []
        return [(c, r) for c, r in zip(codes_, recs) if r]

    async def stock(self) -> dict[str, int]:
        """'<round>:<venue>' -> remaining, for every stock line."""
        raw = await guarded(self.redis.hgetall(self.keys.stock))
        return {f: int(v) for f, v in raw.items()}

    async def stats(self) -> dict[str, int]:
        raw = await guarded(self.redis.hgetall(self.keys.stats))
        return {f: int(v) for f, v in raw.items()}

    async def ledger_lag(self) -> int:
        """Events on the stream not yet archived into the ledger."""
        from .archiver import lag
        return await guarded(lag(self.redis, self.campaign.id))

    async def has_idempotency(self, member_id: str, idem_key: str) -> bool:
        return bool(await wired(
            self.wire.call("EXISTS", self.keys.idempotency(member_id, idem_key))))

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

