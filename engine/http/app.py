"""The aiohttp application: ``create_app(settings, redis_url)`` and its one middleware."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..auth import resolve_secrets
from ..config import Settings
from ..metrics import Metrics
from ..service import open_engine
from . import openapi, public
from .handlers import (
    BODY_TIMEOUT,
    ENGINE,
    METRICS,
    METRICS_PAGE,
    METRICS_TOKEN,
    OPENAPI,
    MetricsPage,
    add_routes,
    answer_error,
)

log = logging.getLogger("engine.app")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def engine_middleware(metrics: Metrics) -> Middleware:
    """The one place engine errors become the contract's JSON errors, and where each
    request's duration and in-flight count are measured (one middleware, not two:
    each layer costs a coroutine per request)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        metrics.in_flight += 1
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except asyncio.CancelledError:
            status = 499  # the client went away; nginx's name for it
            raise
        except Exception as exc:  # noqa: BLE001 - answer_error logs what is unexpected
            if isinstance(exc, web.HTTPException):
                status = exc.status  # kept if answer_error re-raises it
            resp = answer_error(request, exc)
            status = resp.status
            return resp
        finally:
            metrics.in_flight -= 1
            resource = request.match_info.route.resource
            # The canonical path ("/v1/rounds/{round_id}/grab") keeps the label bounded.
            metrics.http(resource.canonical if resource is not None else "unmatched",
                         request.method, status, time.perf_counter() - t0)

    return middleware


def create_app(settings: Settings, redis_url: str) -> web.Application:
    metrics = Metrics()
    app = web.Application(middlewares=[engine_middleware(metrics)],
                          client_max_size=64 * 1024)
    # Read once here: whether the secrets are the development ones decides the routes.
    secrets = resolve_secrets(settings)
    app[OPENAPI] = openapi.document(demo_sign_in=secrets.development)
    app[BODY_TIMEOUT] = settings.client_timeout_s
    app[METRICS] = metrics
    app[METRICS_PAGE] = MetricsPage(metrics)
    app[METRICS_TOKEN] = settings.metrics_token or ""

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        engine = await open_engine(settings, redis_url, metrics, secrets)
        app[ENGINE] = engine
        tasks = [asyncio.create_task(engine.poll_forever(), name="state-poller"),
                 asyncio.create_task(engine.listen_forever(), name="notify-listener"),
                 asyncio.create_task(metrics.watch_loop_lag(), name="loop-lag"),
                 asyncio.create_task(metrics.flush_forever(), name="metrics-flush")]
        yield
        engine.stop()
        for t in tasks:
            t.cancel()
        # Bounded: a task that swallowed its cancellation must not hang the shutdown.
        _, stuck = await asyncio.wait(tasks, timeout=5.0)
        for t in stuck:
            log.error("background task %s did not stop within 5 s", t.get_name())
            # Again: a clean-up of its own that hangs is interrupted too, so the task is
            # done before the loop closes (else: "Task was destroyed but it is pending").
            t.cancel()
        if stuck:
            await asyncio.wait(stuck, timeout=1.0)
        await engine.close()

    app.cleanup_ctx.append(engine_ctx)
    add_routes(app)
    public.add_routes(app, demo_sign_in_route=secrets.development)
    return app
