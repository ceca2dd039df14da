"""HTTP handlers: parse, authenticate, call the Engine, encode. Nothing else."""

from __future__ import annotations

import asyncio
import gzip
import hmac
import logging
import re
import time
from collections.abc import Mapping
from typing import NamedTuple

import msgspec
from aiohttp import StreamReader, web
from prometheus_client import CONTENT_TYPE_LATEST

from .. import errors
from ..auth import bearer
from ..domain import parse_rfc3339
from ..metrics import Metrics
from ..schemas import (
    IDEM_PATTERN,
    CouponReply,
    CouponsReply,
    RedemptionsReply,
    RoundReply,
    RoundsReply,
    add_stock_decoder,
    control_decoder,
    encoder,
    grab_decoder,
    redeem_decoder,
)
from ..service import Engine
from . import qr
from .caching import cached_json

ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
OPENAPI: web.AppKey[bytes] = web.AppKey("openapi", bytes)
# GET /metrics: the bearer token it asks for ("" = none); its render is METRICS_PAGE.
METRICS_TOKEN: web.AppKey[str] = web.AppKey("metrics_token", str)
# Seconds a client has to deliver a body once its headers are in (COUPON_CLIENT_TIMEOUT).
BODY_TIMEOUT: web.AppKey[float] = web.AppKey("body_timeout", float)
# The worker's tallies, which the middleware and the hot path both count into.
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)

MAX_BODY = 4096
_IDEM_RE = re.compile(IDEM_PATTERN)
log = logging.getLogger("engine.app")
_JSON = "application/json"


def _authorization(request: web.BaseRequest) -> str | None:
    """The Authorization header; credentials are ASCII, anything else is a 401 here.

    Bytes that are not UTF-8 reach aiohttp's headers as lone surrogates, which the
    token checks cannot encode (a 500 before this guard).
    """
    value = request.headers.get("Authorization")
    if value is not None and not value.isascii():
        raise errors.Unauthorized("Authorization must be ASCII")
    return value


class Answer(NamedTuple):
    """A hot route's JSON answer before it is a response: the hot path writes it in one
    piece (``hot.RawAnswer``), the routed handlers wrap it (``as_response``)."""

    status: int
    body: bytes
    headers: Mapping[str, str] | None = None


def as_response(answer: Answer) -> web.Response:
    resp = web.Response(body=answer.body, status=answer.status, content_type=_JSON)
    if answer.headers:
        resp.headers.update(answer.headers)
    return resp


def json_response(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=encoder.encode(payload), status=status, content_type=_JSON)


def error_answer(exc: errors.EngineError) -> Answer:
    """The contract's JSON error for an engine error (raised or returned)."""
    return Answer(exc.status, exc.encoded(), exc.headers)


def error_response(exc: errors.EngineError) -> web.Response:
    return as_response(error_answer(exc))


def answer_error(request: web.BaseRequest, exc: Exception) -> web.Response:
    """The contract's answer for what a handler raised: an engine error's JSON error,
    aiohttp's own 404/405/413 in the contract's words, a 500 (logged) for anything
    else. Other HTTP exceptions (none are raised by the handlers) are re-raised."""
    if isinstance(exc, errors.EngineError):
        resp = error_response(exc)
        if not request.content.is_eof():
            # Answered before its body arrived (too large, too slow): what is left
            # of the body would be read as the next request. Close after answering.
            resp.force_close()
        return resp
    if isinstance(exc, web.HTTPException):
        if exc.status == 404:
            err: errors.EngineError = errors.NotFound(f"no route {request.path}")
        elif exc.status == 405:
            # RFC 9110: a 405 names the allowed methods.
            err = errors.MethodNotAllowed(headers={"Allow": exc.headers.get("Allow", "")})
        elif exc.status == 413:
            err = errors.InvalidRequest("request body too large")
        else:
            raise exc
        return error_response(err)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(errors.EngineError())


async def read_body(request: web.BaseRequest, timeout: float) -> bytes:
    """The whole body when it did not all come with the headers (``_body`` takes that
    case without a coroutine): in pieces over a slow network, or chunked without a
    Content-Length. Stops at the limit (400) and after the client timeout (400; the
    connection is then closed)."""
    content = request.content
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise errors.InvalidRequest(f"body larger than {MAX_BODY} bytes")
    # ``read(n)`` returns what has arrived so far, not n bytes: read to the end.
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await content.read(MAX_BODY + 1 - size):
                parts.append(chunk)
                size += len(chunk)
                if size > MAX_BODY:
                    raise errors.InvalidRequest(f"body larger than {MAX_BODY} bytes")
    except TimeoutError:
        raise errors.InvalidRequest(
            f"the body did not arrive within {timeout:g} s") from None
    return b"".join(parts)


def _arrived(content: StreamReader) -> bytes:
    """A body that came whole with the headers (the usual case): no waiting, no timer."""
    data = content.read_nowait()
    if len(data) > MAX_BODY:
        raise errors.InvalidRequest(f"body larger than {MAX_BODY} bytes")
    return data


async def _body(request: web.BaseRequest, decoder: msgspec.json.Decoder,
                timeout: float | None = None) -> object:
    content = request.content
    if content.is_eof():
        raw = _arrived(content)  # without read_body's coroutine: every grab comes here
    else:
        if timeout is None:
            assert isinstance(request, web.Request)
            timeout = request.app[BODY_TIMEOUT]
        raw = await read_body(request, timeout)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise errors.InvalidRequest(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise errors.InvalidRequest(f"body is not valid JSON: {exc}") from None


async def grab_answer(engine: Engine, body_timeout: float, request: web.BaseRequest,
                      round_id: str) -> Answer:
    """POST /v1/rounds/{round_id}/grab, for the routed handler and the hot path."""
    headers = request.headers
    member = engine.member(_authorization(request))
    idem = headers.get("Idempotency-Key")
    if idem is not None and not _IDEM_RE.fullmatch(idem):
        raise errors.InvalidRequest("Idempotency-Key must be 1-64 printable ASCII characters")
    body = await _body(request, grab_decoder, body_timeout)
    engine.rate_limit_member(member)
    res = await engine.grab(member, round_id, body.venue_id, idem)  # type: ignore[attr-defined]
    if isinstance(res, errors.EngineError):
        return error_answer(res)
    return Answer(201, encoder.encode(CouponReply(res)))


async def grab(request: web.Request) -> web.Response:
    app = request.app
    return as_response(await grab_answer(app[ENGINE], app[BODY_TIMEOUT], request,
                                         request.match_info["round_id"]))


async def my_coupons(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    member = engine.member(_authorization(request))
    return json_response(CouponsReply(await engine.my_coupons(member)))


async def void_coupon(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    member = engine.member(_authorization(request))
    engine.rate_limit_member(member)
    return json_response(CouponReply(await engine.void(member, request.match_info["code"])))


async def coupon_qr(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    member = engine.member(_authorization(request))
    coupon = await engine.my_coupon(member, request.match_info["code"])
    return web.Response(body=qr.svg(coupon.code), content_type="image/svg+xml")


async def rounds(request: web.Request) -> web.Response:
    return cached_json(request, RoundsReply(request.app[ENGINE].rounds()))


async def round_(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return cached_json(request, RoundReply(engine.round(request.match_info["round_id"])))


async def venue_coupon(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    venue = await engine.venue(_authorization(request))
    coupon = await engine.venue_lookup(venue, request.match_info["code"])
    return json_response(CouponReply(coupon))


async def redeem_answer(engine: Engine, body_timeout: float,
                        request: web.BaseRequest) -> Answer:
    """POST /v1/venue/redemptions, for the routed handler and the hot path."""
    venue = await engine.venue(_authorization(request))
    body = await _body(request, redeem_decoder, body_timeout)
    coupon = await engine.redeem(venue, body.code)  # type: ignore[attr-defined]
    return Answer(200, encoder.encode(CouponReply(coupon)))


async def redeem(request: web.Request) -> web.Response:
    app = request.app
    return as_response(await redeem_answer(app[ENGINE], app[BODY_TIMEOUT], request))


async def venue_redemptions(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    venue = await engine.venue(_authorization(request))
    since_text = request.query.get("since")
    since = 0
    if since_text is not None:
        try:
            since = parse_rfc3339(since_text)
        except ValueError:
            raise errors.InvalidRequest("since must be an RFC 3339 time with an offset") from None
    return json_response(RedemptionsReply(await engine.venue_redemptions(venue, since)))


async def admin_stats(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    engine.admin(_authorization(request))
    return json_response(await engine.round_stats(request.match_info["round_id"]))


# The operators' controls (contract section 3): the operator token's name is who the
# audit records.

async def _round_control(request: web.Request, action: str) -> web.Response:
    engine = request.app[ENGINE]
    actor = engine.admin(_authorization(request))
    body = await _body(request, control_decoder)
    control = getattr(engine.controls, action)
    reply = await control(actor, request.match_info["round_id"],
                          body.reason)  # type: ignore[attr-defined]
    return json_response(reply)


async def pause_round(request: web.Request) -> web.Response:
    return await _round_control(request, "pause")


async def resume_round(request: web.Request) -> web.Response:
    return await _round_control(request, "resume")


async def close_round(request: web.Request) -> web.Response:
    return await _round_control(request, "close")


async def add_stock(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    actor = engine.admin(_authorization(request))
    body = await _body(request, add_stock_decoder)
    reply = await engine.controls.add_stock(
        actor, request.match_info["round_id"], body.venue_id,  # type: ignore[attr-defined]
        body.add, body.reason)  # type: ignore[attr-defined]
    return json_response(reply)


async def reverse_redemption(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    actor = engine.admin(_authorization(request))
    body = await _body(request, control_decoder)
    reply = await engine.controls.reverse(actor, request.match_info["code"],
                                          body.reason)  # type: ignore[attr-defined]
    return json_response(reply)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if not await engine.ready():
        raise errors.NotReady("redis does not answer", headers={"Retry-After": "1"})
    return json_response({"status": "ready", "campaign_id": engine.campaign.id})


class MetricsPage:
    """The /metrics body, rendered at most once per ``max_age_s`` and shared.

    A render merges every worker's sample files (tens of ms of a worker's CPU with
    the sample campaign); done per scrape, 100 scrapes a second took the worker's
    loop. Here the first scrape after ``max_age_s`` flushes this worker's tallies and
    renders in a thread (gzipped once there too: Prometheus asks for gzip, and the
    text is ~200 KB), scrapes arriving meanwhile wait for that same render, and every
    other scrape is answered with the last one. A scrape therefore shows the engine
    as of at most ``max_age_s`` (plus the other workers' 0.25 s flush) ago.
    """

    def __init__(self, metrics: Metrics, max_age_s: float = 1.0) -> None:
        self.metrics = metrics
        self.max_age_s = max_age_s
        self.renders = 0
        self._body: tuple[bytes, bytes] = (b"", b"")
        self._at = float("-inf")
        self._rendering: asyncio.Future[tuple[bytes, bytes]] | None = None

    def _render(self) -> tuple[bytes, bytes]:
        text = self.metrics.render()
        return text, gzip.compress(text, 1)

    async def body(self) -> tuple[bytes, bytes]:
        """(text, the same gzipped)."""
        if time.monotonic() - self._at < self.max_age_s:
            return self._body
        if self._rendering is None:
            self.metrics.flush()
            started = time.monotonic()
            fut = asyncio.get_running_loop().run_in_executor(None, self._render)
            self._rendering = fut

            def done(f: asyncio.Future[tuple[bytes, bytes]]) -> None:
                self._rendering = None
                if not f.cancelled() and f.exception() is None:
                    self._body, self._at = f.result(), started
                    self.renders += 1

            fut.add_done_callback(done)
        # Shielded: a scraper that goes away must not cancel the render others await.
        return await asyncio.shield(self._rendering)


METRICS_PAGE: web.AppKey[MetricsPage] = web.AppKey("metrics_page", MetricsPage)


async def metrics(request: web.Request) -> web.Response:
    token = request.app[METRICS_TOKEN]
    if token:
        given = bearer(_authorization(request))
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise errors.Unauthorized("invalid metrics token",
                                      headers={"WWW-Authenticate": "Bearer"})
    text, gz = await request.app[METRICS_PAGE].body()
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        return web.Response(body=gz, headers={"Content-Type": CONTENT_TYPE_LATEST,
                                              "Content-Encoding": "gzip",
                                              "Vary": "Accept-Encoding"})
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST,
                                            "Vary": "Accept-Encoding"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type=_JSON)


def add_routes(app: web.Application) -> None:
    """The contract's routes (the pages' own are ``public.add_routes``)."""
    r = app.router
    r.add_post("/v1/rounds/{round_id}/grab", grab)
    r.add_get("/v1/me/coupons", my_coupons)
    r.add_delete("/v1/me/coupons/{code}", void_coupon)
    r.add_get("/v1/me/coupons/{code}/qr.svg", coupon_qr)
    r.add_get("/v1/rounds", rounds)
    r.add_get("/v1/rounds/{round_id}", round_)
    r.add_get("/v1/venue/coupons/{code}", venue_coupon)
    r.add_post("/v1/venue/redemptions", redeem)
    r.add_get("/v1/venue/redemptions", venue_redemptions)
    r.add_get("/v1/admin/rounds/{round_id}/stats", admin_stats)
    r.add_post("/v1/admin/rounds/{round_id}/pause", pause_round)
    r.add_post("/v1/admin/rounds/{round_id}/resume", resume_round)
    r.add_post("/v1/admin/rounds/{round_id}/close", close_round)
    r.add_post("/v1/admin/rounds/{round_id}/stock", add_stock)
    r.add_post("/v1/admin/redemptions/{code}/reverse", reverse_redemption)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)
