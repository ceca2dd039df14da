"""The aiohttp application: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web

from . import errors, openapi
from .auth import resolve_secrets
from .config import Settings
from .handlers import ENGINE, OPENAPI, add_routes, json_response
from .metrics import Metrics
from .service import Engine
from .store import Store, active_campaign, client_for, connect_with_retry

log = logging.getLogger("engine.app")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place engine errors become the contract's JSON errors."""
    try:
        return await handler(request)
    except errors.EngineError as exc:
        resp = json_response(exc.body(), status=exc.status)
        resp.headers.update(exc.headers)
        return resp
    except web.HTTPException as exc:
        if exc.status == 404:
            err: errors.EngineError = errors.NotFound(f"no route {request.path}")
        elif exc.status == 405:
            # RFC 9110: a 405 names the allowed methods.
            err = errors.MethodNotAllowed(headers={"Allow": exc.headers.get("Allow", "")})
        elif exc.status == 413:
            err = errors.InvalidRequest("request body too large")
        else:
            raise
        resp = json_response(err.body(), status=err.status)
        resp.headers.update(err.headers)
        return resp
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = errors.EngineError()
        return json_response(err.body(), status=500)


def metrics_middleware(metrics: Metrics) -> Callable[[web.Request, Handler],
                                                      Awaitable[web.StreamResponse]]:
    """Duration and in-flight count per route; outermost, so it sees the final status."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        # The canonical path ("/v1/rounds/{round_id}/grab") keeps the label bounded.
        route = resource.canonical if resource is not None else "unmatched"
        status = 500
        metrics.http_in_flight.inc()
        t0 = time.perf_counter()
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.http_in_flight.dec()
            metrics.http_duration.labels(route, request.method, str(status)).observe(
                time.perf_counter() - t0)
            if status == 503:
                metrics.store_unavailable.inc()

    return middleware


def create_app(settings: Settings, redis_url: str) -> web.Application:
    metrics = Metrics()
    app = web.Application(middlewares=[metrics_middleware(metrics), error_middleware],
                          client_max_size=64 * 1024)
    app[OPENAPI] = openapi.document()

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        client = client_for(settings, redis_url)
        await connect_with_retry(client, settings.redis_connect_retries)
        campaign = await active_campaign(client)
        if campaign is None:
            raise RuntimeError("no campaign is loaded; run 'coupon-engine campaign load FILE'")
        engine = Engine(Store(client, campaign, settings), resolve_secrets(settings),
                        member_rate=settings.member_rate, member_burst=settings.member_burst,
                        venue_bad_code_limit=settings.venue_bad_code_limit,
                        metrics=metrics)
        metrics.prime(campaign)
        await engine.refresh()
        app[ENGINE] = engine
        tasks = [asyncio.create_task(engine.poll_forever(), name="state-poller"),
                 asyncio.create_task(engine.listen_forever(), name="notify-listener"),
                 asyncio.create_task(metrics.watch_loop_lag(), name="loop-lag")]
        yield
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await engine.store.close()

    app.cleanup_ctx.append(engine_ctx)
    add_routes(app)
    return app
