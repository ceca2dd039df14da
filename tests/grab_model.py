"""The grab rules in plain Python: the reference model that the property test
(tests/test_model.py) runs side by side with ``lua/grab.lua``."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.campaign import Campaign
from engine.domain import round_state
from engine.store.scripts import GrabOutcome


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
        if state == "closed" or now_ms >= r.valid_until_ms:  # expired coupons are not sold
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


