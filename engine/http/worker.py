"""One serving process of ``coupon-engine serve``: the aiohttp app on uvloop (or on
asyncio's own loop, ``COUPON_EVENT_LOOP=asyncio``: docs/decisions.md).

Workers share the port through SO_REUSEPORT; SIGTERM or SIGINT drains (stop
accepting, finish what is in flight, then close). Client connections are bounded
(``guard.py``: header deadline, keep-alive timeout, a cap per worker).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from ..config import Settings
from ..logs import setup_logging
from .app import create_app
from .guard import ConnectionGuard, GuardedSite, raise_fd_limit
from .hot import EngineRunner

log = logging.getLogger("engine.http.worker")


def tune_collector(settings: Settings) -> None:
    """What start-up built (imports, the app, the campaign) is moved out of the
    collector's sight, so its full collections walk only what requests leave; and its
    young generation is sized for a crowd (``COUPON_GC_THRESHOLDS``): a request that
    waits its turn among thousands of connections is still alive at CPython's default
    700 allocations, so nearly all it allocates would be promoted and walked again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*settings.gc_thresholds)


async def run_worker(settings: Settings, url: str, index: int) -> None:
    app = create_app(settings, url)
    runner = EngineRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10.0)
    await runner.setup()
    tune_collector(settings)
    before, after = raise_fd_limit(settings.max_connections)
    if after != before:
        log.info("worker %d: open-files limit raised from %d to %d", index, before, after)
    guard = ConnectionGuard(client_timeout_s=settings.client_timeout_s,
                            keepalive_timeout_s=settings.keepalive_timeout_s,
                            max_connections=settings.max_connections)
    site = GuardedSite(runner, settings.host, settings.port, guard, backlog=4096)
    await site.start()
    log.info("worker %d listening on http://%s:%d (event loop: %s)", index, settings.host,
             settings.port, settings.event_loop)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("worker %d draining", index)
    await runner.cleanup()


def worker_main(settings: Settings, url: str, index: int) -> None:
    """The spawned process's entry point."""
    setup_logging(settings.log_level)
    if settings.event_loop == "asyncio":
        asyncio.run(run_worker(settings, url, index))
        return
    import uvloop
    uvloop.run(run_worker(settings, url, index))
