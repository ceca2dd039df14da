"""The OpenAPI 3 document for every route, built from the msgspec Structs.

Every route of ``handlers.add_routes`` is here with its parameters, body,
credentials and every status the contract (``../shared/contract.md``) names.
Each error response's schema pins ``error.code`` to the contract's codes for
that status and allows only the extra fields the contract names, so a
schema-conformance run (schemathesis in ``.ci/run``) catches a wrong code too.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .. import errors as E
from .. import schemas
from ..errors import EngineError
from ..schemas import IDEM_PATTERN
from ..service import GRAB_REFUSALS, REDEEM_REFUSALS, VOID_REFUSALS

JSON = "application/json"
IDENT_PATTERN = "^[A-Za-z0-9_.-]+$"
_TIME = {"type": "string", "format": "date-time"}

_RETRY_AFTER = {"description": "seconds to wait before retrying", "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"}}


def _error_schema(classes: list[type[EngineError]]) -> dict[str, Any]:
    props: dict[str, Any] = {"code": {"type": "string", "enum": [c.code for c in classes]},
                             "message": {"type": "string"}}
    for c in classes:
        if c.extra:
            props[c.extra] = _TIME
    return {"type": "object", "required": ["error"], "additionalProperties": False,
            "properties": {"error": {"type": "object", "required": ["code", "message"],
                                     "additionalProperties": False, "properties": props}}}


def _errors(*classes: type[EngineError]) -> dict[str, Any]:
    """The error responses of a route, from the contract's error classes it can answer:
    grouped by status, each with its codes, extra fields and Retry-After header."""
    by_status: dict[int, list[type[EngineError]]] = {}
    for c in classes:
        group = by_status.setdefault(c.status, [])
        if c.code not in (g.code for g in group):
            group.append(c)
    out: dict[str, Any] = {}
    for status, group in sorted(by_status.items()):
        resp: dict[str, Any] = {"description": ", ".join(c.code for c in group),
                                "content": {JSON: {"schema": _error_schema(group)}}}
        if any(c.retry_after for c in group):
            resp["headers"] = {"Retry-After": _RETRY_AFTER}
        out[str(status)] = resp
    return out


def _ok(status: int, ref: str, description: str = "success",
        links: dict[str, Any] | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = {"description": description, "content": {
        JSON: {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}
    if links:
        resp["links"] = links
    return {str(status): resp}


def _op(op_id: str, summary: str, ok: dict[str, Any], errs: dict[str, Any], *,
        security: str | None, params: list[dict[str, Any]] | None = None,
        body: str | None = None, description: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary,
                          "responses": {**ok, **errs}}
    if description:
        op["description"] = description
    # Public operations say so explicitly (an empty requirement list).
    op["security"] = [{security: []}] if security else []
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {JSON: {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    return op


def _round_param() -> dict[str, Any]:
    return {"name": "round_id", "in": "path", "required": True,
            "description": "a round id (unknown ids answer 404 round_not_found)",
            "schema": {"type": "string", "minLength": 1, "maxLength": 64,
                       "pattern": IDENT_PATTERN}, "example": "R1"}


def _code_param() -> dict[str, Any]:
    return {"name": "code", "in": "path", "required": True,
            "description": "a coupon code as shown (XXXX-XXXX-XXXX-XXXX-C) or typed: case, "
                           "spaces, dashes, I/L for 1 and O for 0 are forgiven; anything "
                           "else, or a failed check character, answers 404 coupon_not_found",
            "schema": {"type": "string", "minLength": 1, "maxLength": 64},
            "example": "7K3M-Q9ZR-4TXW-2HBN-P"}


# The errors each script's route can answer beside its script's refusals.
ErrorList = tuple[type[EngineError], ...]
GRAB_ERRORS: ErrorList = (E.InvalidRequest, E.Unauthorized, *GRAB_REFUSALS.values(),
                          E.RateLimited, E.Unavailable)
REDEEM_ERRORS: ErrorList = (E.InvalidRequest, E.Unauthorized, *REDEEM_REFUSALS.values(),
                            E.RateLimited, E.Unavailable)
VOID_ERRORS: ErrorList = (E.Unauthorized, *VOID_REFUSALS.values(), E.RateLimited,
                          E.Unavailable)


def _cached(ok: dict[str, Any]) -> dict[str, Any]:
    """A public 200 that phones and proxies may keep a second (docs/pages.md), and its
    304 for a matching If-None-Match."""
    for resp in ok.values():
        resp["headers"] = {
            "ETag": {"description": "strong tag of the body", "required": True,
                     "schema": {"type": "string"}},
            "Cache-Control": {"description": "public, max-age=1", "required": True,
                              "schema": {"type": "string"}}}
    return {**ok, "304": {"description": "not modified: If-None-Match named the current ETag"}}


def _pages() -> dict[str, Any]:
    """The two pages and their hashed assets (engine/http/pages.py)."""
    html = {"200": {"description": "the page (zh-CN)",
                    "content": {"text/html": {"schema": {"type": "string"}}}},
            "304": {"description": "not modified"}}
    asset = {"name": "asset", "in": "path", "required": True,
             "description": "a content-hashed asset name the pages refer to",
             "schema": {"type": "string", "minLength": 1}, "example": "app.0123456789ab.css"}
    return {
        "/": {"get": _op("memberPage", "The members' grab page", html, {}, security=None)},
        "/venue/": {"get": _op("venuePage", "The venues' scanner page", html, {},
                               security=None)},
        "/venue": {"get": _op("venuePageRedirect", "Redirect to /venue/", {
            "301": {"description": "to /venue/", "headers": {"Location": {
                "required": True, "schema": {"type": "string"}}}}}, {}, security=None)},
        "/static/{asset}": {"get": _op(
            "staticAsset", "A page's script, style sheet or vendored licence (immutable)",
            {"200": {"description": "the asset", "content": {
                t: {"schema": {"type": "string"}}
                for t in ("text/javascript", "text/css", "text/plain")}},
             "304": {"description": "not modified"}},
            _errors(E.NotFound), security=None, params=[asset])},
    }


def document(*, demo_sign_in: bool = False) -> bytes:
    """The document; ``demo_sign_in`` adds the route only development secrets offer."""
    _, components = msgspec.json.schema_components(
        [schemas.GrabRequest, schemas.RedeemRequest, schemas.CouponReply, schemas.CouponsReply,
         schemas.RedemptionsReply, schemas.RoundReply, schemas.RoundsReply, schemas.RoundStats,
         schemas.CampaignReply, schemas.TimeReply, schemas.VenueReply,
         schemas.DemoSignInRequest, schemas.DemoSignInReply],
        ref_template="#/components/schemas/{name}")
    # Bodies: unknown fields are refused (400), as the contract says.
    for name in ("GrabRequest", "RedeemRequest", "DemoSignInRequest"):
        components[name]["additionalProperties"] = False
    components["DemoSignInRequest"]["examples"] = [{"member_id": "alice"}]
    components["TimeReply"]["properties"]["now"] = _TIME
    components["DemoSignInReply"]["properties"]["expires_at"] = _TIME
    components["GrabRequest"]["examples"] = [{"venue_id": "V01"}]
    components["RedeemRequest"]["examples"] = [{"code": "7K3M-Q9ZR-4TXW-2HBN-P"}]
    # Wire times are RFC 3339 with an offset; redeemed_at is null until redeemed.
    coupon = components["Coupon"]["properties"]
    for f in ("issued_at", "valid_from", "valid_until"):
        coupon[f] = _TIME
    coupon["redeemed_at"] = {"anyOf": [_TIME, {"type": "null"}]}
    for f in ("opens_at", "closes_at"):
        components["RoundView"]["properties"][f] = _TIME
    components["Health"] = {"type": "object", "required": ["status"],
                            "properties": {"status": {"type": "string", "enum": ["ok"]}}}
    components["Ready"] = {"type": "object", "required": ["status", "campaign_id"],
                           "properties": {"status": {"type": "string", "enum": ["ready"]},
                                          "campaign_id": {"type": "string"}}}

    idem = {"name": "Idempotency-Key", "in": "header", "required": False,
            "description": "1-64 printable ASCII characters, inner spaces included (HTTP "
                           "strips leading and trailing ones); a replay of the same key and "
                           "body returns the first result again (status included); the same "
                           "key with another body answers 422 idempotency_key_reused",
            "schema": {"type": "string", "minLength": 1, "maxLength": 64,
                       "pattern": IDEM_PATTERN}}
    since = {"name": "since", "in": "query", "required": False,
             "description": "RFC 3339 time with an offset; redemptions at or after it, "
                            "oldest first, at most 1,000 (default: from the start)",
             "schema": {"type": "string", "format": "date-time"}}
    code_from_grab = {"code": "$response.body#/coupon/code"}
    grab_links = {
        "VoidCoupon": {"operationId": "voidCoupon", "parameters": code_from_grab},
        "CouponQr": {"operationId": "couponQr", "parameters": code_from_grab},
        "LookUpCoupon": {"operationId": "venueLookUpCoupon", "parameters": code_from_grab},
        "RedeemCoupon": {"operationId": "redeemCoupon", "requestBody": code_from_grab},
    }
    paths = {
        "/v1/rounds/{round_id}/grab": {"post": _op(
            "grabCoupon", "Grab a coupon", _ok(201, "CouponReply", "granted (or replayed)",
                                               links=grab_links),
            _errors(*GRAB_ERRORS),
            security="member", params=[_round_param(), idem], body="GrabRequest",
            description="A venue with no stock line in the round is venue_not_found.")},
        "/v1/me/coupons": {"get": _op(
            "myCoupons", "My coupons, newest first", _ok(200, "CouponsReply"),
            _errors(E.Unauthorized, E.Unavailable), security="member")},
        "/v1/me/coupons/{code}": {"delete": _op(
            "voidCoupon", "Hand a coupon back", _ok(200, "CouponReply", "now void"),
            _errors(*VOID_ERRORS),
            security="member", params=[_code_param()],
            description="Another member's code is coupon_not_found.")},
        "/v1/me/coupons/{code}/qr.svg": {"get": _op(
            "couponQr", "My coupon as a QR code", {"200": {"description": "SVG", "content": {
                "image/svg+xml": {"schema": {"type": "string"}}}}},
            _errors(E.Unauthorized, E.CouponNotFound, E.Unavailable),
            security="member", params=[_code_param()])},
        "/v1/rounds": {"get": _op("listRounds", "All rounds", _cached(_ok(200, "RoundsReply")),
                                  {}, security=None)},
        "/v1/rounds/{round_id}": {"get": _op(
            "getRound", "One round", _cached(_ok(200, "RoundReply")),
            _errors(E.RoundNotFound), security=None, params=[_round_param()])},
        "/v1/campaign": {"get": _op(
            "getCampaign", "The campaign's name, time zone, prices, quota and venues",
            _cached(_ok(200, "CampaignReply")), {}, security=None,
            description="A read-only addition for the pages (docs/pages.md).")},
        "/v1/time": {"get": _op(
            "engineTime", "The engine's clock (the one that opens rounds)",
            _ok(200, "TimeReply"), {}, security=None,
            description="Never cached. Pages correct it by half the round trip "
                        "(docs/pages.md).")},
        "/v1/venue/me": {"get": _op(
            "venueMe", "The venue this key acts for", _ok(200, "VenueReply"),
            _errors(E.Unauthorized, E.Unavailable), security="venue")},
        "/v1/venue/coupons/{code}": {"get": _op(
            "venueLookUpCoupon", "Look at a coupon without redeeming it",
            _ok(200, "CouponReply"),
            _errors(E.Unauthorized, E.WrongVenue, E.CouponNotFound, E.RateLimited,
                    E.Unavailable),
            security="venue", params=[_code_param()])},
        "/v1/venue/redemptions": {
            "post": _op("redeemCoupon", "Redeem a coupon", _ok(200, "CouponReply", "redeemed"),
                        _errors(*REDEEM_ERRORS),
                        security="venue", body="RedeemRequest",
                        description="Unknown, forged or mistyped codes are all "
                                    "coupon_not_found; too many of them from one venue in a "
                                    "minute answer 429 rate_limited."),
            "get": _op("venueRedemptions", "This venue's redemptions",
                       _ok(200, "RedemptionsReply"),
                       _errors(E.InvalidRequest, E.Unauthorized, E.Unavailable),
                       security="venue",
                       params=[since])},
        "/v1/admin/rounds/{round_id}/stats": {"get": _op(
            "roundStats", "Per-venue stock, issued, void, redeemed", _ok(200, "RoundStats"),
            _errors(E.Unauthorized, E.RoundNotFound, E.Unavailable), security="admin",
            params=[_round_param()])},
        "/healthz": {"get": _op("healthz", "Process is up", _ok(200, "Health"), {},
                                security=None)},
        "/readyz": {"get": _op("readyz", "Redis answers and a campaign is loaded",
                               _ok(200, "Ready"), _errors(E.NotReady), security=None)},
        "/metrics": {"get": _op("metrics", "Prometheus metrics of all workers",
                                {"200": {"description": "Prometheus text format", "content": {
                                    "text/plain": {"schema": {"type": "string"}}}}},
                                _errors(E.Unauthorized), security=None,
                                description="Rendered at most once a second. With "
                                            "COUPON_METRICS_TOKEN set, answered only to "
                                            "Authorization: Bearer <that token> (else 401).")},
        "/openapi.json": {"get": _op("openapi", "This document", {"200": {
            "description": "OpenAPI 3", "content": {JSON: {"schema": {"type": "object"}}}}}, {},
            security=None)},
    }
    paths.update(_pages())
    if demo_sign_in:
        paths["/v1/demo/sign-in"] = {"post": _op(
            "demoSignIn", "A member token for any member id (development secrets only)",
            _ok(200, "DemoSignInReply"), _errors(E.InvalidRequest), security=None,
            body="DemoSignInRequest",
            description="Registered only when the engine made its own secrets; with "
                        "configured secrets the route does not exist (404).")}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "coupon engine", "version": "1",
                 "description": "Errors are {\"error\": {\"code\", \"message\", ...}} with the "
                                "contract's codes; unknown JSON fields are refused with 400."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "member": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                       "description": "Authorization: Bearer <member JWT>, HS256 from the "
                                      "union's identity service; sub = member id, exp "
                                      "required"},
            "venue": {"type": "http", "scheme": "bearer",
                      "bearerFormat": "vk.<venue id>.<key id>.<secret>",
                      "description": "Authorization: Bearer <venue API key>, from "
                                     "'coupon-engine token venue ID'"},
            "admin": {"type": "http", "scheme": "bearer",
                      "description": "Authorization: Bearer <operator token>, "
                                     "COUPON_ADMIN_TOKEN"}}},
    }
    return msgspec.json.encode(doc)
