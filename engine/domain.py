"""Pure rules and conversions: no I/O, no Redis, no HTTP.

A coupon's state is a ``CouponState`` of typed values (the store's adapter,
``store/records.py``, builds one from a Redis hash); ``coupon_view`` turns it
into the wire ``Coupon``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo

from . import codes
from .campaign import Campaign, Round
from .schemas import Coupon

RoundState = Literal["scheduled", "open", "closed"]
CouponStatus = Literal["issued", "redeemed", "void"]


def line_key(round_id: str, venue_id: str) -> str:
    """A stock line's name, ``<round>:<venue>``: the field of the stock hash, the suffix
    of the stats counters, and the worker's sold-out flags."""
    return f"{round_id}:{venue_id}"


@dataclass(frozen=True, slots=True)
class CouponState:
    """One coupon as the store holds it: typed values, times in ms since the epoch."""

    code: str  # canonical, 17 characters
    round_id: str
    venue_id: str
    member_id: str
    status: CouponStatus
    issued_at_ms: int
    valid_from_ms: int
    valid_until_ms: int
    redeemed_at_ms: int | None = None


@lru_cache(maxsize=16)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=1024)
def _second(s: int, tz: str) -> tuple[str, str]:
    """Second ``s`` since the epoch in ``tz``: (its date and time, to the second; its
    UTC offset), as ``datetime.isoformat`` writes them."""
    text = datetime.fromtimestamp(s, tz=_zone(tz)).isoformat(timespec="seconds")
    return text[:19], text[19:]


def rfc3339(ms: int, tz: str) -> str:
    """Milliseconds since the epoch as RFC 3339 with the campaign's offset.

    From a cache by the second: a grant's issue time is new on nearly every reply, but
    thousands of them fall in one second (a datetime per call cost a grant 2.7 us),
    and round edges and validity bounds repeat on every reply."""
    s, frac = divmod(ms, 1000)
    head, offset = _second(s, tz)
    if frac:
        return f"{head}.{frac:03d}{offset}"
    return head + offset


def parse_rfc3339(text: str) -> int:
    """RFC 3339 text (an offset is required) to milliseconds; ValueError if not."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError("time needs an offset")
    return int(dt.timestamp() * 1000)


def round_state(r: Round, now_ms: int) -> RoundState:
    if now_ms < r.opens_at_ms:
        return "scheduled"
    if now_ms >= r.closes_at_ms:
        return "closed"
    return "open"


def coupon_view(campaign: Campaign, s: CouponState) -> Coupon:
    """The wire Coupon for a coupon's state."""
    return issued_view(campaign, s.code, s.round_id, s.venue_id, s.member_id,
                       s.issued_at_ms, s.valid_from_ms, s.valid_until_ms, s.status,
                       s.redeemed_at_ms)


def issued_view(campaign: Campaign, code: str, round_id: str, venue_id: str,
                member_id: str, issued_at_ms: int, valid_from_ms: int, valid_until_ms: int,
                status: CouponStatus = "issued", redeemed_at_ms: int | None = None) -> Coupon:
    """The wire Coupon from its values: a grant's reply is built from grab.lua's reply
    without a CouponState in between (a frozen dataclass costs a grant 1.2 us)."""
    tz = campaign.timezone
    return Coupon(
        code=codes.display(code),
        campaign_id=campaign.id,
        round_id=round_id,
        venue_id=venue_id,
        member_id=member_id,
        status=status,
        issued_at=rfc3339(issued_at_ms, tz),
        valid_from=rfc3339(valid_from_ms, tz),
        valid_until=rfc3339(valid_until_ms, tz),
        face_value_fen=campaign.face_value_fen,
        member_price_fen=campaign.member_price_fen,
        redeemed_at=rfc3339(redeemed_at_ms, tz) if redeemed_at_ms is not None else None,
    )


def utc_now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)
