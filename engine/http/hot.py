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

Their answers are written by ``RawAnswer``: the head aiohttp would write for a JSON
answer, from bytes kept per status and connection kind, and the body, in one write
through the request's own ``StreamWriter``. A ``web.Response`` builds a header
multidict, prepares, serializes and writes it on every answer: a fifth of a
refusal's CPU (docs/benchmarks.md, issue 19). An answer with headers of its own
(``Retry-After``) is still a ``web.Response``.

``EngineRunner`` is ``web.AppRunner`` with ``HotPath`` installed on the server it
makes (the workers, the tests' harness and the probes all run it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from multidict import CIMultiDict

from ..metrics import Metrics
from .handlers import (
    BODY_TIMEOUT,
    ENGINE,
    METRICS,
    Answer,
    answer_error,
    as_response,
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


_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()
# The Connection header aiohttp adds: (HTTP/1.1, keep-alive) none, (1.1, not) close,
# (1.0, keep-alive) keep-alive, (1.0, not) none.
_CONNECTION = {(True, True): b"", (True, False): b"Connection: close\r\n",
               (False, True): b"Connection: keep-alive\r\n", (False, False): b""}


class _Heads:
    """The head of a JSON answer as aiohttp writes it, up to Content-Length's value,
    and after it (Date, Server, Connection), each kept until the second changes."""

    def __init__(self) -> None:
        self._start: dict[tuple[int, bool], bytes] = {}
        self._second = -1
        self._tails: dict[tuple[bool, bool], bytes] = {}

    def start(self, status: int, http11: bool) -> bytes:
        key = (status, http11)
        head = self._start.get(key)
        if head is None:
            version = "1.1" if http11 else "1.0"
            head = self._start[key] = (
                f"HTTP/{version} {status} {HTTPStatus(status).phrase}\r\n"
                "Content-Type: application/json\r\nContent-Length: ").encode()
        return head

    def tail(self, http11: bool, keep_alive: bool) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._tails.clear()
        key = (http11, keep_alive)
        tail = self._tails.get(key)
        if tail is None:
            tail = self._tails[key] = (
                b"\r\nDate: " + formatdate(now, usegmt=True).encode() + b"\r\n"
                + _SERVER + _CONNECTION[key] + b"\r\n")
        return tail


_HEADS = _Heads()


class RawAnswer:
    """A complete JSON answer as aiohttp's ``RequestHandler`` uses a response: it calls
    ``prepare`` and ``write_eof``, then reads ``keep_alive`` (and, were access logging
    on, ``status``, ``body_length`` and ``headers``)."""

    __slots__ = ("status", "_body", "_keep_alive", "_request", "body_length")
    __http_exception__ = False

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self._body = body
        self._keep_alive = False
        self._request: web.BaseRequest | None = None
        self.body_length = 0

    @property
    def keep_alive(self) -> bool:
        return self._keep_alive

    @property
    def headers(self) -> CIMultiDict[str]:
        return CIMultiDict({"Content-Type": "application/json",
                            "Content-Length": str(len(self._body))})

    async def prepare(self, request: web.BaseRequest) -> None:
        self._request = request

    async def write_eof(self) -> None:
        request = self._request
        if request is None:
            return
        self._request = None
        version = request.version
        if version != HttpVersion11 and version != HttpVersion10:
            # Nothing else reaches aiohttp's parser; never write a wrong status line.
            raise RuntimeError(f"unexpected HTTP version {version}")
        http11 = version == HttpVersion11
        keep_alive = self._keep_alive = request.keep_alive
        body = self._body
        data = b"%s%d%s%s" % (_HEADS.start(self.status, http11), len(body),
                              _HEADS.tail(http11, keep_alive), body)
        # The request's writer does the accounting, the closing-transport check and the
        # drain a web.Response gets.
        await request._payload_writer.write_eof(data)
        self.body_length = len(data)


def raw_answer(answer: Answer) -> web.StreamResponse:
    """The hot path's response for ``answer``: raw unless it carries headers."""
    if answer.headers:
        return as_response(answer)
    return cast(web.StreamResponse, RawAnswer(answer.status, answer.body))


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
                answer = await grab_answer(app[ENGINE], app[BODY_TIMEOUT], request, round_id)
            else:
                answer = await redeem_answer(app[ENGINE], app[BODY_TIMEOUT], request)
            status = answer.status
            return raw_answer(answer)
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
