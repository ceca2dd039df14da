"""One serving process of ``coupon-engine serve``: the aiohttp app on uvloop.

Workers share the port through SO_REUSEPORT; SIGTERM or SIGINT drains (stop
accepting, finish what is in flight, then close).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from ..config import Settings
from ..logs import setup_logging
from .app import create_app

log = logging.getLogger("engine.http.worker")


async def run_worker(settings: Settings, url: str, index: int) -> None:
    app = create_app(settings, url)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True, backlog=4096)
    await site.start()
    log.info("worker %d listening on http://%s:%d", index, settings.host, settings.port)
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
    import uvloop
    uvloop.run(run_worker(settings, url, index))
