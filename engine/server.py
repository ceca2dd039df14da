"""``coupon-engine serve``: Redis (embedded or checked), campaign, worker processes.

The parent owns the embedded redis-server and the workers; workers share the
port through SO_REUSEPORT. SIGTERM or SIGINT drains: workers stop accepting,
finish what they hold, then the parent stops Redis (which fsyncs its AOF).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from . import campaign as cmp
from .auth import resolve_secrets
from .cliargs import fail
from .config import Settings
from .domain import rfc3339, utc_now_ms
from .http.worker import worker_main
from .ledger.archiver import run_in_background
from .ledger.guard import LostState, load_checked, refuse_lost_state
from .logs import setup_logging
from .metrics import MULTIPROC_ENV, PROCESS_SAMPLE_S, ProcessGauges, mark_process_dead
from .store import (
    active_campaign,
    check_safety,
    client_for,
    connect_with_retry,
    redis_time_ms,
)
from .store.embedded import EmbeddedRedis

log = logging.getLogger("engine.server")


class ServeError(RuntimeError):
    """A reason ``serve`` refuses to start, printed as one line."""


def sample_campaign_text() -> str:
    from importlib import resources
    return resources.files("engine.data").joinpath("sample_campaign.toml").read_text("utf-8")


async def prepare(settings: Settings, url: str, embedded: bool) -> cmp.Campaign:
    """Check Redis, load the campaign; return what the workers will serve."""
    client = client_for(settings, url, timeout=5.0)
    try:
        await connect_with_retry(client, settings.redis_connect_retries)
        if not embedded:
            problems = await check_safety(client)
            if problems and not settings.allow_unsafe_redis:
                raise ServeError("this Redis could lose acknowledged coupons: "
                                 + "; ".join(problems) + " (or pass --allow-unsafe-redis)")
            for p in problems:
                log.warning("unsafe Redis setting accepted: %s", p)
        try:
            if settings.campaign_file is not None:
                new = cmp.read_campaign(Path(settings.campaign_file))
                plan = await load_checked(client, settings, new)
                log.info("campaign %s %s", new.id, "unchanged" if plan.noop else "loaded")
            else:
                current = await active_campaign(client)
                if current is None:
                    sample = cmp.parse_campaign(sample_campaign_text())
                    # Checked before the schedule is shifted: the same id either way.
                    await refuse_lost_state(client, settings, sample.id)
                    now = await redis_time_ms(client)
                    await load_checked(client, settings, cmp.shifted_for_demo(sample, now))
                    log.info("loaded the sample campaign %s, first round opens in 60 s",
                             sample.id)
                else:
                    await refuse_lost_state(client, settings, current.id)
                    log.info("serving the campaign already loaded: %s", current.id)
        except LostState as exc:
            raise ServeError(str(exc)) from None
        loaded = await active_campaign(client)
        assert loaded is not None
        for r in loaded.rounds:
            log.info("round %s: opens %s, closes %s, %d coupons over %d venues", r.id,
                     rfc3339(r.opens_at_ms, loaded.timezone),
                     rfc3339(r.closes_at_ms, loaded.timezone), sum(r.stock.values()),
                     len(r.stock))
        return loaded
    finally:
        await client.aclose()


async def run_archiver(settings: Settings, url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("ledger archiver writing %s", settings.ledger_path)
    sampler = asyncio.create_task(_sample_process("archiver", stop))
    await run_in_background(url, settings.ledger_path, stop, cluster=settings.redis_cluster)
    await sampler
    log.info("ledger archiver stopped")


async def _sample_process(role: str, stop: asyncio.Event) -> None:
    """CPU and memory of this process for /metrics (workers do it in their flush loop)."""
    gauges = ProcessGauges(CollectorRegistry(), role)
    while not stop.is_set():
        gauges.sample()
        try:
            await asyncio.wait_for(stop.wait(), PROCESS_SAMPLE_S)
        except TimeoutError:
            pass


# The archiver copies what Redis already holds durably; during a burst it yields the
# CPU to the workers and Redis and catches up after (its lag is a dashboard panel).
ARCHIVER_NICENESS = 10


def archiver_main(settings: Settings, url: str) -> None:
    setup_logging(settings.log_level)
    try:
        os.nice(ARCHIVER_NICENESS)
    except OSError as exc:  # not allowed here: run at normal priority
        log.warning("could not lower the archiver's priority: %s", exc)
    import uvloop
    uvloop.run(run_archiver(settings, url))


def _reset_metrics_dir(path: Path) -> None:
    """Empty the workers' metric files and point spawned workers at them.

    Files from an earlier run would add old counts to this one; the variable is
    inherited by the spawned workers before they import prometheus_client.
    """
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level)
    redis: EmbeddedRedis | None = None
    url = settings.redis_url
    if url is None and settings.cluster:
        return fail("--redis-cluster needs --redis-url (a seed node of the cluster)")
    if url is None:
        redis = EmbeddedRedis(settings.redis_dir)
        redis.start()
        url = redis.url
        log.info("embedded redis-server with appendfsync always in %s", settings.redis_dir)
    procs: list[mp.process.BaseProcess] = []
    try:
        resolve_secrets(settings)
        asyncio.run(prepare(settings, url, embedded=redis is not None))
        _reset_metrics_dir(settings.metrics_dir)
        ctx = mp.get_context("spawn")
        # name -> how to start it; the same spec restarts a process that died.
        specs: dict[str, tuple[Callable[..., None], tuple[object, ...]]] = {
            f"worker-{i}": (worker_main, (settings, url, i))
            for i in range(max(1, settings.workers))}
        # One archiver for the whole engine: it alone writes the SQLite ledger.
        if settings.archiver:
            specs["archiver"] = (archiver_main, (settings, url))

        def start(name: str) -> mp.process.BaseProcess:
            target, args = specs[name]
            p = ctx.Process(target=target, args=args, name=name)
            p.start()
            return p

        procs.extend(start(name) for name in specs)
        stopping = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info("engine up at %s (started %s UTC ms)", f"http://{settings.host}:{settings.port}",
                 utc_now_ms())
        while not stopping:
            for i, p in enumerate(procs):
                if not p.is_alive() and not stopping:
                    log.error("%s exited with %s; restarting it", p.name, p.exitcode)
                    if p.pid is not None:
                        mark_process_dead(p.pid, str(settings.metrics_dir))
                    procs[i] = start(p.name)
            time.sleep(0.2)
        return 0
    except (ServeError, cmp.CampaignError) as exc:
        return fail(str(exc))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()
        if redis is not None:
            redis.stop()
            log.info("embedded redis-server stopped")
