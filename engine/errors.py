"""Engine errors: each carries the contract's code, HTTP status and extra fields.

Handlers raise these; one middleware turns them into
``{"error": {"code", "message", ...}}``. Nothing here knows about aiohttp.
"""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    code: str = "internal"
    status: int = 500
    default_message: str = "internal error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None,
                 **fields: Any) -> None:
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.fields = fields
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.fields}}


def _error(name: str, code: str, status: int, message: str) -> type[EngineError]:
    return type(name, (EngineError,), {"code": code, "status": status,
                                       "default_message": message})


InvalidRequest = _error("InvalidRequest", "invalid_request", 400, "the request is not valid")
Unauthorized = _error("Unauthorized", "unauthorized", 401, "missing or invalid credentials")
Forbidden = _error("Forbidden", "forbidden", 403, "this credential may not do that")
WrongVenue = _error("WrongVenue", "wrong_venue", 403, "this coupon belongs to another venue")
NotFound = _error("NotFound", "not_found", 404, "no such resource")
RoundNotFound = _error("RoundNotFound", "round_not_found", 404, "no such round")
VenueNotFound = _error("VenueNotFound", "venue_not_found", 404,
                       "no such venue in this round")
CouponNotFound = _error("CouponNotFound", "coupon_not_found", 404, "no such coupon")
RoundNotOpen = _error("RoundNotOpen", "round_not_open", 409, "the round has not opened yet")
RoundClosed = _error("RoundClosed", "round_closed", 410, "the round has closed")
SoldOut = _error("SoldOut", "sold_out", 410, "this venue is sold out in this round")
RoundQuotaExceeded = _error("RoundQuotaExceeded", "round_quota_exceeded", 409,
                            "you already hold this round's quota of coupons")
CampaignQuotaExceeded = _error("CampaignQuotaExceeded", "campaign_quota_exceeded", 409,
                               "you already hold the campaign's quota of coupons")
IdempotencyKeyReused = _error("IdempotencyKeyReused", "idempotency_key_reused", 422,
                              "this Idempotency-Key was used with another request")
RateLimited = _error("RateLimited", "rate_limited", 429, "too many requests; slow down")
AlreadyRedeemed = _error("AlreadyRedeemed", "already_redeemed", 409,
                         "this coupon was already redeemed")
AlreadyVoid = _error("AlreadyVoid", "already_void", 409, "this coupon was already returned")
CouponVoid = _error("CouponVoid", "coupon_void", 409,
                    "this coupon was returned by its member and is no longer valid")
CouponNotYetValid = _error("CouponNotYetValid", "coupon_not_yet_valid", 409,
                           "this coupon cannot be used yet")
CouponExpired = _error("CouponExpired", "coupon_expired", 410, "this coupon has expired")
MethodNotAllowed = _error("MethodNotAllowed", "method_not_allowed", 405,
                          "method not allowed")
Unavailable = _error("Unavailable", "unavailable", 503,
                     "the engine cannot reach its store; retry shortly")
NotReady = _error("NotReady", "unavailable", 503, "the engine is not ready")
