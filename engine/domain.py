"""Pure rules and conversions: no I/O, no Redis, no HTTP.

``GrabModel`` is the reference model of the grab rules that the property test
runs side by side with ``lua/grab.lua``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Literal, Mapping
from zoneinfo import ZoneInfo

from . import codes
from .campaign import Campaign, Round
from .schemas import Coupon
from .scripts import GrabOutcome

RoundState = Literal["scheduled", "open", "closed"]


@lru_cache(maxsize=16)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=4096)
def rfc3339(ms: int, tz: str) -> str:
    """Milliseconds since the epoch as RFC 3339 with the campaign's offset.

    Cached: round edges and validity bounds repeat on every reply, and at
    thousands of grabs a second so do issue times within one millisecond."""
    dt = datetime.fromtimestamp(ms / 1000, tz=_zone(tz))
    if ms % 1000:
        return dt.isoformat(timespec="milliseconds")
    return dt.isoformat(timespec="seconds")


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


def coupon_from_record(campaign: Campaign, code: str, rec: Mapping[str, str]) -> Coupon:
    """A wire Coupon from the coupon hash stored in Redis."""
    tz = campaign.timezone
    redeemed = rec.get("redeemed_at")
    return Coupon(
        code=codes.display(code),
        campaign_id=campaign.id,
        round_id=rec["round"],
        venue_id=rec["venue"],
        member_id=rec["member"],
        status=rec["status"],  # type: ignore[arg-type]
        issued_at=rfc3339(int(rec["issued_at"]), tz),
        valid_from=rfc3339(int(rec["valid_from"]), tz),
        valid_until=rfc3339(int(rec["valid_until"]), tz),
        face_value_fen=campaign.face_value_fen,
        member_price_fen=campaign.member_price_fen,
        redeemed_at=rfc3339(int(redeemed), tz) if redeemed else None,
    )


def pairs_to_dict(flat: list) -> dict[str, str]:
    """HGETALL-style flat list (as a script returns it) to a dict of str."""
    def s(x: object) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)
    return {s(flat[i]): s(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


@dataclass
class GrabModel:
    """The grab rules in plain Python, in the order grab.lua applies them."""

    campaign: Campaign
    stock: dict[tuple[str, str], int] = field(default_factory=dict)
    member_total: dict[str, int] = field(default_factory=dict)
    member_round: dict[tuple[str, str], int] = field(default_factory=dict)
    idem: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for r in self.campaign.rounds:
            for v, n in r.stock.items():
                self.stock[(r.id, v)] = n

    def grab(self, member: str, round_id: str, venue: str, now_ms: int,
             idem_key: str | None) -> GrabOutcome:
        fp = f"{round_id}/{venue}"
        if idem_key is not None and (member, idem_key) in self.idem:
            prior_fp, _ = self.idem[(member, idem_key)]
            return GrabOutcome.REPLAYED if prior_fp == fp else GrabOutcome.IDEMPOTENCY_REUSED
        r = self.campaign.round(round_id)
        if r is None:
            return GrabOutcome.ROUND_NOT_FOUND
        if (round_id, venue) not in self.stock:
            return GrabOutcome.VENUE_NOT_FOUND
        state = round_state(r, now_ms)
        if state == "scheduled":
            return GrabOutcome.ROUND_NOT_OPEN
        if state == "closed":
            return GrabOutcome.ROUND_CLOSED
        if self.member_round.get((member, round_id), 0) >= r.member_round_quota:
            return GrabOutcome.ROUND_QUOTA
        if self.member_total.get(member, 0) >= self.campaign.member_campaign_quota:
            return GrabOutcome.CAMPAIGN_QUOTA
        if self.stock[(round_id, venue)] <= 0:
            return GrabOutcome.SOLD_OUT
        self.stock[(round_id, venue)] -= 1
        self.member_total[member] = self.member_total.get(member, 0) + 1
        self.member_round[(member, round_id)] = self.member_round.get((member, round_id), 0) + 1
        if idem_key is not None:
            self.idem[(member, idem_key)] = (fp, "")
        return GrabOutcome.GRANTED


def utc_now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)
