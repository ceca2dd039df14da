"""The contract's errors: one plain class per code, with its HTTP status and the extra
field the contract adds to its body.

Handlers raise (or the hot path returns) these; one middleware turns them
into ``{"error": {"code", "message", ...}}``; the OpenAPI document derives each
route's error codes and extra fields from the classes it lists; each script
outcome maps to a class through one dict beside its use (``service.py``).
Adding a refusal: the Lua header, its enum member, one class here, one dict
entry; ``tests/test_refusals.py`` checks the four agree. Nothing here knows
about aiohttp.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec


class EngineError(Exception):
    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"
    # The one extra body field the contract names for this code (a time), if any.
    extra: ClassVar[str | None] = None
    # Answered with a Retry-After header (seconds).
    retry_after: ClassVar[bool] = False
    # The Retry-After value when the caller gives none (a refusal built from a script's
    # outcome has no one to choose it).
    default_retry_after_s: ClassVar[int | None] = None

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None,
                 **fields: Any) -> None:
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.fields = fields
        self.headers = headers or {}
        if self.default_retry_after_s is not None and "Retry-After" not in self.headers:
            self.headers["Retry-After"] = str(self.default_retry_after_s)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.fields}}

    def encoded(self) -> bytes:
        """``body()`` as JSON, encoded once per instance: the engine answers a round's
        refusals with a few shared instances (``service.Engine.refusal``)."""
        raw = self.__dict__.get("_encoded")
        if raw is None:
            raw = self.__dict__["_encoded"] = msgspec.json.encode(self.body())
        return raw


class InvalidRequest(EngineError):
    code, status, default_message = "invalid_request", 400, "the request is not valid"


class Unauthorized(EngineError):
    code, status, default_message = "unauthorized", 401, "missing or invalid credentials"


class WrongVenue(EngineError):
    code, status, default_message = ("wrong_venue", 403,
                                     "this coupon belongs to another venue")


class NotFound(EngineError):
    code, status, default_message = "not_found", 404, "no such resource"


class RoundNotFound(EngineError):
    code, status, default_message = "round_not_found", 404, "no such round"


class VenueNotFound(EngineError):
    code, status, default_message = "venue_not_found", 404, "no such venue in this round"


class CouponNotFound(EngineError):
    code, status, default_message = "coupon_not_found", 404, "no such coupon"


class MethodNotAllowed(EngineError):
    code, status, default_message = "method_not_allowed", 405, "method not allowed"


class RoundNotOpen(EngineError):
    code, status, default_message = "round_not_open", 409, "the round has not opened yet"
    extra = "opens_at"


class RoundPaused(EngineError):
    code, status, default_message = ("round_paused", 409,
                                     "the round is paused by the operators; try again later")
    retry_after = True
    # A pause lasts as long as the operators need: ask again in a while, not at once.
    default_retry_after_s = 30


class RoundNotPaused(EngineError):
    code, status, default_message = "round_not_paused", 409, "the round is not paused"


class OverBudget(EngineError):
    code, status, default_message = ("over_budget", 409,
                                     "this much stock would commit more than the budget")


class NotRedeemed(EngineError):
    code, status, default_message = ("not_redeemed", 409,
                                     "this coupon is not redeemed; there is nothing to reverse")


class AlreadySettled(EngineError):
    code, status, default_message = ("already_settled", 409,
                                     "this redemption has been settled (paid to the venue) and"
                                     " cannot be reversed")


class RoundQuotaExceeded(EngineError):
    code, status, default_message = ("round_quota_exceeded", 409,
                                     "you already hold this round's quota of coupons")


class CampaignQuotaExceeded(EngineError):
    code, status, default_message = ("campaign_quota_exceeded", 409,
                                     "you already hold the campaign's quota of coupons")


class AlreadyRedeemed(EngineError):
    code, status, default_message = ("already_redeemed", 409,
                                     "this coupon was already redeemed")
    extra = "redeemed_at"


class AlreadyVoid(EngineError):
    code, status, default_message = "already_void", 409, "this coupon was already returned"


class CouponVoid(EngineError):
    code, status, default_message = ("coupon_void", 409,
                                     "this coupon was returned by its member and is no longer"
                                     " valid")


class CouponNotYetValid(EngineError):
    code, status, default_message = ("coupon_not_yet_valid", 409,
                                     "this coupon cannot be used yet")
    extra = "valid_from"


class RoundClosed(EngineError):
    code, status, default_message = "round_closed", 410, "the round has closed"


class SoldOut(EngineError):
    code, status, default_message = ("sold_out", 410,
                                     "this venue is sold out in this round")


class CouponExpired(EngineError):
    code, status, default_message = "coupon_expired", 410, "this coupon has expired"
    extra = "valid_until"


class IdempotencyKeyReused(EngineError):
    code, status, default_message = ("idempotency_key_reused", 422,
                                     "this Idempotency-Key was used with another request")


class RateLimited(EngineError):
    code, status, default_message = "rate_limited", 429, "too many requests; slow down"
    retry_after = True


class Unavailable(EngineError):
    code, status, default_message = ("unavailable", 503,
                                     "the engine cannot reach its store; retry shortly")
    retry_after = True


class NotReady(Unavailable):
    default_message = "the engine is not ready"


def contract_errors() -> list[type[EngineError]]:
    """Every error class with a contract code (EngineError itself is the 500)."""
    out: list[type[EngineError]] = []
    todo = list(EngineError.__subclasses__())
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo += cls.__subclasses__()
    return out
