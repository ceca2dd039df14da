"""The store wing: everything that speaks Redis for the engine.

Imports neither aiohttp nor sqlite3 (tests/test_layout.py). The running
engine's state is ``Store`` (``state.py``); how Redis is reached and checked is
``connection.py``; loading a campaign ``loading.py``; transfers between stock
shards ``transfers.py``; key names ``keys.py``; the Lua scripts and their calls
``scripts.py``; the hot path's pipelined connections ``wire.py`` and
``clusterwire.py``; the private redis-server ``embedded.py``; writing a
restored state ``restore.py``; settled codes marked on the coupons ``settled.py``.
"""

from __future__ import annotations

from .connection import check_safety, client_for, connect_with_retry, open_client, redis_time_ms
from .loading import active_campaign, load_campaign, shard_count
from .state import ChangeResult, GrabResult, Store

__all__ = ["ChangeResult", "GrabResult", "Store", "active_campaign", "check_safety",
           "client_for", "connect_with_retry", "load_campaign", "open_client",
           "redis_time_ms", "shard_count"]
