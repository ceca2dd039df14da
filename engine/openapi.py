"""The OpenAPI 3 document for every route, built from the msgspec Structs."""

from __future__ import annotations

from typing import Any

import msgspec

from . import schemas

_ERR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        "additionalProperties": True}},
}


def _errors(*pairs: tuple[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, codes in pairs:
        out[str(status)] = {"description": codes,
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return out


def _ok(status: int, ref: str, ctype: str = "application/json") -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{ref}"} if ref else {"type": "string"}
    return {str(status): {"description": "success", "content": {ctype: {"schema": schema}}}}


def _op(summary: str, ok: dict[str, Any], errs: dict[str, Any], *, security: str | None,
        params: list[dict[str, Any]] | None = None, body: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**ok, **errs}}
    if security:
        op["security"] = [{security: []}]
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    return op


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 64}}


AUTH = (401, "unauthorized")
UNAVAILABLE = (503, "unavailable")


def document() -> bytes:
    _, components = msgspec.json.schema_components(
        [schemas.GrabRequest, schemas.RedeemRequest, schemas.CouponReply, schemas.CouponsReply,
         schemas.RedemptionsReply, schemas.RoundReply, schemas.RoundsReply, schemas.RoundStats],
        ref_template="#/components/schemas/{name}")
    components["Error"] = _ERR
    idem = {"name": "Idempotency-Key", "in": "header", "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 64,
                       "pattern": "^[\\x21-\\x7e]+$"}}
    paths = {
        "/v1/rounds/{round_id}/grab": {"post": _op(
            "Grab a coupon", _ok(201, "CouponReply"),
            _errors((400, "invalid_request"), AUTH,
                    (404, "round_not_found, venue_not_found"),
                    (409, "round_not_open, round_quota_exceeded, campaign_quota_exceeded"),
                    (410, "round_closed, sold_out"), (422, "idempotency_key_reused"),
                    (429, "rate_limited"), UNAVAILABLE),
            security="member", params=[_path("round_id"), idem], body="GrabRequest")},
        "/v1/me/coupons": {"get": _op("My coupons, newest first", _ok(200, "CouponsReply"),
                                      _errors(AUTH, UNAVAILABLE), security="member")},
        "/v1/me/coupons/{code}": {"delete": _op(
            "Hand a coupon back", _ok(200, "CouponReply"),
            _errors(AUTH, (404, "coupon_not_found"), (409, "already_redeemed, already_void"),
                    (429, "rate_limited"), UNAVAILABLE),
            security="member", params=[_path("code")])},
        "/v1/me/coupons/{code}/qr.svg": {"get": _op(
            "My coupon as a QR code", {"200": {"description": "SVG", "content": {
                "image/svg+xml": {"schema": {"type": "string"}}}}},
            _errors(AUTH, (404, "coupon_not_found"), UNAVAILABLE),
            security="member", params=[_path("code")])},
        "/v1/rounds": {"get": _op("All rounds", _ok(200, "RoundsReply"), {}, security=None)},
        "/v1/rounds/{round_id}": {"get": _op(
            "One round", _ok(200, "RoundReply"), _errors((404, "round_not_found")),
            security=None, params=[_path("round_id")])},
        "/v1/venue/coupons/{code}": {"get": _op(
            "Look at a coupon without redeeming it", _ok(200, "CouponReply"),
            _errors(AUTH, (403, "wrong_venue"), (404, "coupon_not_found"),
                    (429, "rate_limited"), UNAVAILABLE),
            security="venue", params=[_path("code")])},
        "/v1/venue/redemptions": {
            "post": _op("Redeem a coupon", _ok(200, "CouponReply"),
                        _errors((400, "invalid_request"), AUTH, (403, "wrong_venue"),
                                (404, "coupon_not_found"),
                                (409, "already_redeemed, coupon_void, coupon_not_yet_valid"),
                                (410, "coupon_expired"), (429, "rate_limited"), UNAVAILABLE),
                        security="venue", body="RedeemRequest"),
            "get": _op("This venue's redemptions", _ok(200, "RedemptionsReply"),
                       _errors((400, "invalid_request"), AUTH, UNAVAILABLE), security="venue",
                       params=[{"name": "since", "in": "query", "required": False,
                                "schema": {"type": "string", "format": "date-time"}}])},
        "/v1/admin/rounds/{round_id}/stats": {"get": _op(
            "Per-venue stock, issued, void, redeemed", _ok(200, "RoundStats"),
            _errors(AUTH, (404, "round_not_found"), UNAVAILABLE), security="admin",
            params=[_path("round_id")])},
        "/healthz": {"get": _op("Process is up", {"200": {"description": "up"}}, {},
                                security=None)},
        "/readyz": {"get": _op("Redis answers and a campaign is loaded",
                               {"200": {"description": "ready"}}, _errors(UNAVAILABLE),
                               security=None)},
        "/metrics": {"get": _op("Prometheus metrics", {"200": {"description": "text", "content": {
            "text/plain": {"schema": {"type": "string"}}}}}, {}, security=None)},
        "/openapi.json": {"get": _op("This document", {"200": {"description": "OpenAPI"}}, {},
                                     security=None)},
    }
    doc = {
        "openapi": "3.0.3",
        "info": {"title": "coupon engine", "version": "1"},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "member": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "venue": {"type": "http", "scheme": "bearer"},
            "admin": {"type": "http", "scheme": "bearer"}}},
    }
    return msgspec.json.encode(doc)
