"""Wire bodies: msgspec Structs, encoders and decoders built once at import."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# An Idempotency-Key: 1-64 printable ASCII characters (contract), space included. HTTP
# strips a header value's leading and trailing spaces, so a key arrives without them:
# it begins and ends with a visible character. Control characters (tab too) are not
# printable. Match with ``fullmatch`` ("$" alone would pass a final newline).
IDEM_PATTERN = r"^[\x21-\x7e](?:[\x20-\x7e]{0,62}[\x21-\x7e])?$"

Ident = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
CodeText = Annotated[str, Meta(min_length=1, max_length=64)]


class Body(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base of every request body: unknown fields are a 400."""


# msgspec matches ``pattern`` with re.search, where "$" also matches before a final
# newline ("V01\n" passed); the whole string must be an identifier.
_IDENT_FULL = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class GrabRequest(Body, frozen=True):
    venue_id: Ident

    def __post_init__(self) -> None:
        if not _IDENT_FULL.fullmatch(self.venue_id):
            raise ValueError("venue_id must be 1-64 characters of A-Za-z0-9_.-")


class RedeemRequest(Body, frozen=True):
    code: CodeText


class Coupon(msgspec.Struct, frozen=True):
    code: str
    campaign_id: str
    round_id: str
    venue_id: str
    member_id: str
    status: Literal["issued", "redeemed", "void"]
    issued_at: str
    valid_from: str
    valid_until: str
    face_value_fen: int
    member_price_fen: int
    redeemed_at: str | None


class VenueStock(msgspec.Struct, frozen=True):
    venue_id: str
    name: str
    kind: str
    stock: int
    remaining: int


class RoundView(msgspec.Struct, frozen=True):
    id: str
    opens_at: str
    closes_at: str
    state: Literal["scheduled", "open", "closed"]
    member_round_quota: int
    venues: list[VenueStock]


class VenueStats(msgspec.Struct, frozen=True):
    venue_id: str
    name: str
    stock: int
    remaining: int
    issued: int
    void: int
    returned_open: int
    returned_closed: int
    redeemed: int


class RoundStats(msgspec.Struct, frozen=True):
    round_id: str
    state: Literal["scheduled", "open", "closed"]
    venues: list[VenueStats]
    totals: dict[str, int]


class CouponReply(msgspec.Struct, frozen=True):
    coupon: Coupon


class CouponsReply(msgspec.Struct, frozen=True):
    coupons: list[Coupon]


class RedemptionsReply(msgspec.Struct, frozen=True):
    redemptions: list[Coupon]


class RoundReply(msgspec.Struct, frozen=True):
    round: RoundView


class RoundsReply(msgspec.Struct, frozen=True):
    rounds: list[RoundView]


# The pages' read-only additions to the contract (docs/pages.md).

class VenueInfo(msgspec.Struct, frozen=True):
    venue_id: str
    name: str
    kind: str
    city: str


class CampaignView(msgspec.Struct, frozen=True):
    id: str
    name: str
    timezone: str
    face_value_fen: int
    member_price_fen: int
    member_campaign_quota: int
    venues: list[VenueInfo]


class CampaignReply(msgspec.Struct, frozen=True):
    campaign: CampaignView


class TimeReply(msgspec.Struct, frozen=True):
    now: str


class VenueReply(msgspec.Struct, frozen=True):
    venue: VenueInfo


class DemoSignInRequest(Body, frozen=True):
    member_id: Ident

    def __post_init__(self) -> None:
        if not _IDENT_FULL.fullmatch(self.member_id):
            raise ValueError("member_id must be 1-64 characters of A-Za-z0-9_.-")


class DemoSignInReply(msgspec.Struct, frozen=True):
    token: str
    member_id: str
    expires_at: str


encoder = msgspec.json.Encoder()
grab_decoder = msgspec.json.Decoder(GrabRequest)
redeem_decoder = msgspec.json.Decoder(RedeemRequest)
demo_sign_in_decoder = msgspec.json.Decoder(DemoSignInRequest)
