"""The round's two hot routes, dispatched before aiohttp's router and middleware.

When a round opens, nearly every request is ``POST /v1/rounds/{round_id}/grab``
(and, at the venues, ``POST /v1/venue/redemptions``); most are refused (sold out,
quota reached, not open yet). Measured per request in a worker (docs/benchmarks.md,
issue 19), aiohttp's router resolve, its match-info and middleware chain and the
handler's ``request.app`` look-ups cost as much as the engine's own decision. So
``HotPath`` is the server's request handler: it recognises those two routes from the
raw request line with string tests, and answers them with the same handler code,
the same error mapping and the same metrics as the routed path. Everything else
(other routes, any path with a query, a percent-escape or a character the router
would treat differently, ``Expect: 100-continue``) goes to the application's own
handler unchanged, so the router stays the one definition of the API.

``EngineRunner`` is ``web.AppRunner`` with ``HotPath`` installed on the server it
makes (the workers, the tests' harness and the probes all run it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..metrics import Metrics
from .handlers import (
    BODY_TIMEOUT,
    ENGINE,
    METRICS,
    answer_error,
    grab_answer,
    redeem_answer,
)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

GRAB_ROUTE = "/v1/rounds/{round_id}/grab"
REDEEM_ROUTE = "/v1/venue/redemptions"
_GRAB_PREFIX = "/v1/rounds/"
_GRAB_SUFFIX = "/grab"
# Characters after which the raw path is not what the router matches (escapes, a
# query, a fragment, a segment separator) or not a round id the router would take.
_NOT_PLAIN = frozenset("%?#/{}")


def hot_round_id(raw_path: str) -> str | None:
    """The round id of a plain ``/v1/rounds/<id>/grab`` request path, else None
    (the routed path then decides, with the router's own rules)."""
    if not (raw_path.startswith(_GRAB_PREFIX) and raw_path.endswith(_GRAB_SUFFIX)):
        return None
    rid = raw_path[11:-5]
    if not rid or not _NOT_PLAIN.isdisjoint(rid):
        return None
    return rid


class HotPath:
    """The server's request handler: the hot routes here, the rest to the app."""

    __slots__ = ("_app", "_fallback", "_metrics")

    def __init__(self, app: web.Application, fallback: Handler, metrics: Metrics) -> None:
        self._app = app
        self._fallback = fallback
        self._metrics = metrics

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "POST":
            path = request.raw_path
            rid = hot_round_id(path)
            if rid is not None and "Expect" not in request.headers:
                return await self._answer(request, GRAB_ROUTE, rid)
            if path == REDEEM_ROUTE and "Expect" not in request.headers:
                return await self._answer(request, REDEEM_ROUTE, None)
        return await self._fallback(request)

    async def _answer(self, request: web.BaseRequest, route: str,
                      round_id: str | None) -> web.StreamResponse:
        # The middleware's bookkeeping (engine_middleware), without its router frames.
        metrics = self._metrics
        t0 = time.perf_counter()
        metrics.in_flight += 1
        status = 500
        try:
            app = self._app
            if round_id is not None:
                resp = await grab_answer(app[ENGINE], app[BODY_TIMEOUT], request, round_id)
            else:
                resp = await redeem_answer(app[ENGINE], app[BODY_TIMEOUT], request)
            status = resp.status
            return resp
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception as exc:  # noqa: BLE001 - answer_error logs what is unexpected
            resp = answer_error(request, exc)
            status = resp.status
            return resp
        finally:
            metrics.in_flight -= 1
            metrics.http(route, "POST", status, time.perf_counter() - t0)


class EngineRunner(web.AppRunner):
    """``web.AppRunner`` whose server answers the hot routes through ``HotPath``."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.request_handler = HotPath(self.app, server.request_handler,
                                         self.app[METRICS])
        return server
