"""redis-py clients for one Redis or a Redis Cluster, chosen by URL or flag.

A cluster is named by a seed node: ``redis+cluster://host:port`` (or
``rediss+cluster://``), or a plain ``redis://`` URL with ``--redis-cluster`` /
``COUPON_REDIS_CLUSTER=1``. Everything that is not the hot path talks to
Redis through the client returned here; the hot path uses ``wire.Wire`` or
``clusterwire.ClusterWire`` (see ``store.wire_for``).
"""

from __future__ import annotations

from typing import Any, Union

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

AnyClient = Union[aioredis.Redis, RedisCluster]

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in _CLUSTER_SCHEMES


def plain_url(url: str) -> str:
    """``redis+cluster://h:p`` -> ``redis://h:p`` (other URLs unchanged)."""
    scheme, sep, rest = url.partition("://")
    return _CLUSTER_SCHEMES.get(scheme.lower(), scheme) + sep + rest


def wants_cluster(url: str, flag: bool = False) -> bool:
    return flag or is_cluster_url(url)


def open_client(url: str, *, cluster: bool = False, timeout: float | None = None,
                connect_timeout: float | None = None,
                max_connections: int | None = None) -> AnyClient:
    """A decode_responses client for ``url``; a ``RedisCluster`` when asked for one."""
    kw: dict[str, Any] = {"decode_responses": True}
    if timeout is not None:
        kw["socket_timeout"] = timeout
    if connect_timeout is not None:
        kw["socket_connect_timeout"] = connect_timeout
    if wants_cluster(url, cluster):
        if max_connections is not None:
            kw["max_connections"] = max_connections
        return RedisCluster.from_url(plain_url(url), **kw)
    if max_connections is not None:
        kw["max_connections"] = max_connections
    if timeout is not None:
        kw.update(retry_on_timeout=False, health_check_interval=0)
    return aioredis.Redis.from_url(url, **kw)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


async def primaries(client: AnyClient) -> list[ClusterNode]:
    """The cluster's primaries (after making sure the client knows the slot map)."""
    assert isinstance(client, RedisCluster)
    await client.initialize()
    return list(client.get_primaries())


async def owner_of(client: RedisCluster, key: str) -> ClusterNode:
    await client.initialize()
    return client.get_node_from_key(key)


async def node_client(client: AnyClient, key: str) -> aioredis.Redis:
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


async def release(client: AnyClient, node: aioredis.Redis) -> None:
    if node is not client:
        await node.aclose()
