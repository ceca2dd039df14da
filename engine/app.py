"""The aiohttp application: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
            err = errors.MethodNotAllowed()
        elif exc.status == 413:
            err = errors.InvalidRequest("request body too large")
        else:
            raise
        return json_response(err.body(), status=err.status)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = errors.EngineError()
        return json_response(err.body(), status=500)


def create_app(settings: Settings, redis_url: str) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=64 * 1024)
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
                        metrics=Metrics())
        await engine.refresh()
        app[ENGINE] = engine
        tasks = [asyncio.create_task(engine.poll_forever(), name="state-poller"),
                 asyncio.create_task(engine.listen_forever(), name="notify-listener")]
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
