"""The read-only routes the pages need beside the contract's API (docs/pages.md), and,
with the engine's development secrets only, the demo sign-in.

Each answers from what the worker already holds (the campaign, its clock estimate) or
with exactly the Redis read the contract's venue routes make (the key check), nothing
more.
"""

from __future__ import annotations

from aiohttp import web

from ..schemas import CampaignReply, TimeReply, VenueReply, demo_sign_in_decoder
from . import pages
from .caching import cached_json
from .handlers import ENGINE, _authorization, _body, json_response

NO_STORE = {"Cache-Control": "no-store"}


async def campaign(request: web.Request) -> web.Response:
    return cached_json(request, CampaignReply(request.app[ENGINE].campaign_view()))


async def engine_time(request: web.Request) -> web.Response:
    # Never cached: a stored answer would be a wrong clock.
    resp = json_response(TimeReply(request.app[ENGINE].engine_time()))
    resp.headers.update(NO_STORE)
    return resp


async def venue_me(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    venue = await engine.venue(_authorization(request))
    resp = json_response(VenueReply(engine.venue_view(venue)))
    resp.headers.update(NO_STORE)
    return resp


async def demo_sign_in(request: web.Request) -> web.Response:
    body = await _body(request, demo_sign_in_decoder)
    reply = request.app[ENGINE].demo_member_token(body.member_id)  # type: ignore[attr-defined]
    resp = json_response(reply)
    resp.headers.update(NO_STORE)
    return resp


def add_routes(app: web.Application, *, demo_sign_in_route: bool) -> None:
    """The pages, their assets and their read-only API; the demo sign-in only when
    ``demo_sign_in_route`` (the engine runs on development secrets)."""
    r = app.router
    r.add_get("/v1/campaign", campaign)
    r.add_get("/v1/time", engine_time)
    r.add_get("/v1/venue/me", venue_me)
    if demo_sign_in_route:
        r.add_post("/v1/demo/sign-in", demo_sign_in)
    pages.add_routes(app, demo_sign_in=demo_sign_in_route)
