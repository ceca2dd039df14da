"""How the engine reaches Redis: clients, connect-retry, the safety check, and the one
place where a Redis failure becomes ``errors.Unavailable``.

A cluster is named by a seed node: ``redis+cluster://host:port`` (or
``rediss+cluster://``), or a plain ``redis://`` URL with ``--redis-cluster`` /
``COUPON_REDIS_CLUSTER=1``. Everything that is not the hot path talks to
Redis through the redis-py client made here; the hot path uses ``wire.Wire``
or ``clusterwire.ClusterWire`` (``wire_for``), to the same server.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..config import Settings
from ..errors import Unavailable
from . import scripts
from .clusterwire import ClusterWire
from .wire import Address, ReplyError, Wire, WireError

log = logging.getLogger("engine.store")
T = TypeVar("T")

# A decode_responses redis-py client: Redis or RedisCluster. Any, because redis-py's
# annotations say bytes | str for every reply where these clients always return str.
AnyClient = Any

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in _CLUSTER_SCHEMES


def plain_url(url: str) -> str:
    """``redis+cluster://h:p`` -> ``redis://h:p`` (other URLs unchanged)."""
    scheme, sep, rest = url.partition("://")
    return _CLUSTER_SCHEMES.get(scheme.lower(), scheme) + sep + rest


def wants_cluster(url: str, flag: bool = False) -> bool:
    return flag or is_cluster_url(url)


def _dead_connection_retry() -> Retry:
    """Run a command once more, at once, when its connection turns out dead (a Redis
    restart leaves every pooled connection so), and never on a timeout: a slow Redis
    answers 503 after ``COUPON_REDIS_TIMEOUT``, not after redis-py's default of ten
    retries with backoff."""
    return Retry(NoBackoff(), 1, supported_errors=(rex.ConnectionError,))


def open_client(url: str, *, cluster: bool = False, timeout: float | None = None,
                connect_timeout: float | None = None,
                max_connections: int | None = None,
                pool_wait: float | None = None) -> AnyClient:
    """A decode_responses client for ``url``; a ``RedisCluster`` when asked for one.

    With ``max_connections`` a plain client's pool holds at most that many and a
    command that finds them all busy waits for one up to ``pool_wait`` seconds
    (default ``timeout``), then fails as a connection error (503): a burst of reads
    queues instead of failing the moment the pool is full.
    """
    kw: dict[str, Any] = {"decode_responses": True}
    if timeout is not None:
        kw["socket_timeout"] = timeout
    if connect_timeout is not None:
        kw["socket_connect_timeout"] = connect_timeout
    if wants_cluster(url, cluster):
        if max_connections is not None:
            kw["max_connections"] = max_connections
        return RedisCluster.from_url(plain_url(url), **kw)
    kw["retry"] = _dead_connection_retry()
    if timeout is not None:
        kw.update(health_check_interval=0)
    if max_connections is None:
        return aioredis.Redis.from_url(url, **kw)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections,
        timeout=pool_wait if pool_wait is not None else timeout, **kw)
    return aioredis.Redis.from_pool(pool)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


async def primaries(client: AnyClient) -> list[ClusterNode]:
    """The cluster's primaries (after making sure the client knows the slot map)."""
    assert isinstance(client, RedisCluster)
    await client.initialize()
    return list(client.get_primaries())


async def owner_of(client: RedisCluster, key: str) -> ClusterNode:
    await client.initialize()
    node = client.get_node_from_key(key)
    if node is None:
        raise rex.SlotNotCoveredError(f"no primary serves the slot of {key!r}")
    return node


async def node_client(client: AnyClient, key: str) -> AnyClient:
    """A plain client on the primary that serves ``key``'s slot (the client itself
    for a single Redis).

    Used where redis-py's cluster client is awkward: WATCH/MULTI on one
    campaign's keys (all in one slot) and the notify subscription. If the slot
    moves while it is in use the server answers MOVED and the caller retries
    with a new one. Close it with ``release(client, node_client)``.
    """
    if not isinstance(client, RedisCluster):
        return client
    node = await owner_of(client, key)
    kw = {k: v for k, v in node.connection_kwargs.items()
          if k in ("username", "password", "socket_timeout", "socket_connect_timeout",
                   "decode_responses", "encoding", "encoding_errors", "ssl_ca_certs",
                   "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")}
    if node.connection_class.__name__ == "SSLConnection":
        kw["ssl"] = True
    return aioredis.Redis(host=node.host, port=int(node.port), **kw)


async def release(client: AnyClient, node: AnyClient) -> None:
    if node is not client:
        await node.aclose()


# What the engine requires of Redis so that nothing acknowledged is lost.
REQUIRED_CONFIG = {
    "appendonly": "yes",
    "appendfsync": "always",
    "no-appendfsync-on-rewrite": "no",
    "aof-load-truncated": "no",
    "maxmemory-policy": "noeviction",
}


def _redis_errors_to_unavailable(exc: Exception) -> Unavailable:
    return Unavailable(f"store unavailable: {type(exc).__name__}", headers={"Retry-After": "1"})


# Error replies that mean "the store refuses for now", not "the engine is wrong".
_UNAVAILABLE_PREFIXES = frozenset({"OOM", "LOADING", "READONLY", "MASTERDOWN", "BUSY",
                                   "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "MISCONF"})


async def guarded(op: Awaitable[T]) -> T:
    """Await a Redis operation; any store failure becomes a 503 ``unavailable``."""
    try:
        return await op
    except (TimeoutError, rex.ConnectionError, rex.TimeoutError, OSError,
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
    except (WireError, ReplyError) as exc:
        failure = wire_unavailable(exc)
        if failure is None:
            raise
        raise failure from exc


def wire_unavailable(exc: WireError | ReplyError) -> Unavailable | None:
    """The ``Unavailable`` a wire failure is (``wired``'s rule, for callers that catch
    it themselves), or None for a reply error that is the script's own."""
    if isinstance(exc, ReplyError) and exc.prefix not in _UNAVAILABLE_PREFIXES:
        return None
    return _redis_errors_to_unavailable(exc)


async def run_script(client: AnyClient, script: scripts.Script, call: scripts.Call) -> Any:
    """One script call over redis-py (the operators' controls, settlement marks: not the
    hot path): EVALSHA, loading the script first when the server does not have it.
    Failures become ``Unavailable`` as everywhere."""
    args = scripts.flat(call)
    try:
        return await guarded(client.evalsha(script.sha, *args))
    except rex.NoScriptError:
        return await guarded(client.eval(script.source, *args))


def wire_for(client: AnyClient, settings: Settings) -> Wire | ClusterWire:
    """A hot-path Wire to the same server (and database) as a redis-py client; for a
    ``RedisCluster``, a ClusterWire seeded with the nodes the client knows."""
    if is_cluster(client):
        return cluster_wire_for(client, settings)
    pool = client.connection_pool
    kw = pool.connection_kwargs
    common = {"db": int(kw.get("db") or 0), "username": kw.get("username"),
              "password": kw.get("password")}
    if kw.get("path"):
        addr = Address(path=kw["path"], **common)
    else:
        ctx = tls_context(pool.connection_class, kw)
        addr = Address(host=kw.get("host", "127.0.0.1"), port=int(kw.get("port", 6379)),
                       tls=ctx is not None, ssl_context=ctx, **common)
    return Wire(addr, scripts.all_scripts(), timeout=settings.redis_timeout)


def tls_context(connection_class: type, kwargs: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context redis-py builds for these connection settings, None for a plain
    connection: ``rediss://`` with ``ssl_cert_reqs``, ``ssl_ca_certs``,
    ``ssl_certfile``/``ssl_keyfile``, ``ssl_check_hostname``, ... verifies on the hot
    path's wire exactly as on every redis-py connection (one context, built by
    redis-py from the same arguments, never a second reading of them)."""
    if not issubclass(connection_class, aioredis.SSLConnection):
        return None
    context: ssl.SSLContext = connection_class(**kwargs).ssl_context.get()
    return context


def cluster_wire_for(client: Any, settings: Settings) -> ClusterWire:
    nm = client.nodes_manager
    nodes = {**nm.startup_nodes, **nm.nodes_cache}.values()
    seeds = []
    for n in nodes:
        kw = n.connection_kwargs
        ctx = tls_context(n.connection_class, kw)
        seeds.append(Address(host=n.host, port=int(n.port), username=kw.get("username"),
                             password=kw.get("password"), tls=ctx is not None,
                             ssl_context=ctx))
    return ClusterWire(seeds, scripts.all_scripts(), timeout=settings.redis_timeout)


def client_for(settings: Settings, url: str, *,
               timeout: float | None = None) -> AnyClient:
    """The engine's redis-py client: a ``RedisCluster`` for ``redis+cluster://`` URLs
    or with ``settings.redis_cluster``, else a plain one."""
    t = settings.redis_timeout if timeout is None else timeout
    return open_client(url, cluster=settings.redis_cluster, timeout=t, connect_timeout=t,
                       max_connections=settings.redis_pool_size)


async def connect_with_retry(client: AnyClient, attempts: int,
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


async def check_safety(client: AnyClient) -> list[str]:
    """Settings of this Redis (of every primary of a cluster) that break the engine's
    durability promise."""
    problems = []
    if is_cluster(client):
        targets: list[tuple[str, Any]] = [
            (f"{n.host}:{n.port}: ", n) for n in await primaries(client)]
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
    if key is not None and is_cluster(client):
        sec, usec = await client.time(target_nodes=await owner_of(client, key))
    else:
        sec, usec = await client.time()
    return int(sec) * 1000 + int(usec) // 1000
