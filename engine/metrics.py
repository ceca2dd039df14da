"""Prometheus metrics, declared in one place.

Label values are bounded: round and venue ids come from the loaded campaign,
outcomes from the script enums; never a member id or a code.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class Metrics:
    """The engine's counters; ``disabled()`` gives a registry nobody scrapes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.grab_requests = Counter(
            "coupon_grab_requests_total", "Grab requests by round and outcome",
            ["round", "outcome"], registry=r)
        self.coupons_issued = Counter(
            "coupon_coupons_issued_total", "Coupons issued", ["round", "venue"], registry=r)
        self.coupons_voided = Counter(
            "coupon_coupons_voided_total", "Coupons voided", ["round", "venue"], registry=r)
        self.coupons_redeemed = Counter(
            "coupon_coupons_redeemed_total", "Coupons redeemed", ["round", "venue"], registry=r)
        self.redemption_attempts = Counter(
            "coupon_redemption_attempts_total", "Venue lookups and redemptions by outcome",
            ["venue", "outcome"], registry=r)

    @classmethod
    def disabled(cls) -> "Metrics":
        return cls(CollectorRegistry(auto_describe=True))

    def grab(self, round_id: str, outcome: str) -> None:
        self.grab_requests.labels(round_id, outcome).inc()

    def issued(self, round_id: str, venue_id: str) -> None:
        self.coupons_issued.labels(round_id, venue_id).inc()

    def voided(self, round_id: str, venue_id: str) -> None:
        self.coupons_voided.labels(round_id, venue_id).inc()

    def redeemed(self, round_id: str, venue_id: str) -> None:
        self.coupons_redeemed.labels(round_id, venue_id).inc()

    def redemption(self, venue_id: str, outcome: str) -> None:
        self.redemption_attempts.labels(venue_id, outcome).inc()
