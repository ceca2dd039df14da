"""Campaign validation (contract section 1) and loading rules."""

from datetime import timedelta

import pytest
from conftest import campaign_toml, open_round, redis_now

from engine import campaign as cmp
from engine.cli import main
from engine.store import active_campaign, keys, load_campaign


def _base(url: str, **kw):
    now = redis_now(url)
    rounds = kw.pop("rounds", None) or [
        {"id": "R1", "opens": now + timedelta(hours=1), "closes": now + timedelta(hours=2),
         "stock": {"V01": 5}},
        {"id": "R2", "opens": now + timedelta(hours=3), "closes": now + timedelta(hours=4),
         "stock": {"V01": 5, "V02": 5}},
    ]
    return campaign_toml(rounds=rounds, **kw)


def test_sample_campaign_is_valid_and_fully_allocated() -> None:
    from engine.server import sample_campaign_text
    c = cmp.parse_campaign(sample_campaign_text())
    assert len(c.venues) == 50 and len(c.rounds) == 3
    assert {v.kind for v in c.venues} == set(cmp.VENUE_KINDS)
    spent = c.total_stock * c.settlement_fen
    assert spent <= c.budget_fen and c.budget_fen - spent < c.settlement_fen


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.replace("budget_fen = 1000000000", "budget_fen = 1000"), "over budget"),
    (lambda t: t.replace("V02 = 5", "V99 = 5"), "unknown venue"),
    (lambda t: t.replace("member_campaign_quota = 3", "member_campaign_quota = 0"), "at least 1"),
    (lambda t: t.replace("member_round_quota = 1", "member_round_quota = 0", 1), "at least 1"),
    (lambda t: t.replace('id = "R2"', 'id = "R1"'), "duplicate round"),
    (lambda t: t.replace('id = "V02"', 'id = "V01"'), "duplicate venue"),
    (lambda t: t.replace('face_value_fen = 10000', 'face_value_fen = "x"'), "integer"),
    (lambda t: t.replace("timezone =", "bogus = 1\ntimezone ="), "unknown field"),
    (lambda t: "not toml [", "not valid TOML"),
])
def test_refusals(redis_url: str, mutate, message: str) -> None:
    with pytest.raises(cmp.CampaignError, match=message):
        cmp.parse_campaign(mutate(_base(redis_url)))


def test_reversed_and_overlapping_times(redis_url: str) -> None:
    now = redis_now(redis_url)
    reversed_ = [{"id": "R1", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=1),
                  "stock": {"V01": 1}}]
    with pytest.raises(cmp.CampaignError, match="not after opens_at"):
        cmp.parse_campaign(campaign_toml(rounds=reversed_))
    overlap = [
        {"id": "R1", "opens": now, "closes": now + timedelta(hours=2), "stock": {"V01": 1}},
        {"id": "R2", "opens": now + timedelta(hours=1), "closes": now + timedelta(hours=3),
         "stock": {"V01": 1}}]
    with pytest.raises(cmp.CampaignError, match="overlaps"):
        cmp.parse_campaign(campaign_toml(rounds=overlap))
    bad_validity = [{"id": "R1", "opens": now, "closes": now + timedelta(hours=1),
                     "valid_from": now + timedelta(days=2), "valid_until": now + timedelta(days=1),
                     "stock": {"V01": 1}}]
    with pytest.raises(cmp.CampaignError, match="valid_until"):
        cmp.parse_campaign(campaign_toml(rounds=bad_validity))


async def test_bad_file_writes_nothing(redis_url: str, aredis, write_campaign) -> None:
    path = write_campaign(_base(redis_url, budget=10))
    assert main(["campaign", "load", str(path), "--redis-url", redis_url]) == 2
    assert await aredis.dbsize() == 0
    assert main(["campaign", "check", str(path)]) == 2


async def test_load_twice_is_noop_and_updates_follow_the_rules(redis_url: str, aredis) -> None:
    text = _base(redis_url)
    c = cmp.parse_campaign(text)
    await load_campaign(aredis, c)
    before = await aredis.hgetall("cpn:{test-c}:stock")
    plan = await load_campaign(aredis, cmp.parse_campaign(text))
    assert plan.noop
    # Raising stock of a round that has not opened is allowed.
    raised = cmp.parse_campaign(text.replace("V02 = 5", "V02 = 8"))
    await load_campaign(aredis, raised)
    after = await aredis.hgetall("cpn:{test-c}:stock")
    assert int(after["R2:V02"]) == int(before["R2:V02"]) + 3
    # Lowering it, or changing economics, is refused and changes nothing.
    for bad in (text.replace("V02 = 5", "V02 = 2"),
                text.replace("face_value_fen = 10000", "face_value_fen = 20000")):
        snapshot = await aredis.hgetall("cpn:{test-c}:stock")
        with pytest.raises(cmp.CampaignError):
            await load_campaign(aredis, cmp.parse_campaign(bad.replace("V02 = 5", "V02 = 8")
                                                          if "face" in bad else bad))
        assert await aredis.hgetall("cpn:{test-c}:stock") == snapshot
    assert (await active_campaign(aredis)) == raised


async def test_opened_round_cannot_change(redis_url: str, aredis) -> None:
    r = open_round(redis_url)
    text = campaign_toml(rounds=[r])
    await load_campaign(aredis, cmp.parse_campaign(text))
    with pytest.raises(cmp.CampaignError, match="has opened"):
        await load_campaign(aredis, cmp.parse_campaign(text.replace("V01 = 10", "V01 = 20")))
    other = campaign_toml(cid="other", rounds=[r])
    with pytest.raises(cmp.CampaignError, match="holds campaign"):
        await load_campaign(aredis, cmp.parse_campaign(other))


async def test_active_is_claimed_outside_the_campaign_transaction(redis_url: str,
                                                                  aredis) -> None:
    """cpn:active has no hash tag (another slot on a cluster): an interrupted load may
    leave it naming a campaign with no data; the next load replaces that name, and a
    refused load of a fresh Redis writes nothing at all."""
    r = open_round(redis_url)
    bad = campaign_toml(rounds=[r], budget=1)
    with pytest.raises(cmp.CampaignError):
        await load_campaign(aredis, cmp.parse_campaign(bad))
    assert await aredis.keys("*") == []
    await aredis.set(keys.ACTIVE, "ghost")  # claimed, then the loader crashed
    c = cmp.parse_campaign(campaign_toml(rounds=[r]))
    await load_campaign(aredis, c)
    assert await aredis.get(keys.ACTIVE) == c.id
    assert (await active_campaign(aredis)) == c


def test_rfc3339_agrees_with_datetime_to_the_millisecond() -> None:
    """domain.rfc3339 (a cache by the second) against datetime.isoformat of the same
    instant, in the campaign's zones and across a daylight-saving change, before and
    after the epoch, with and without milliseconds."""
    import random
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from engine.domain import rfc3339

    def reference(ms: int, tz: str) -> str:
        dt = datetime.fromtimestamp(ms / 1000, tz=ZoneInfo(tz))
        return dt.isoformat(timespec="milliseconds" if ms % 1000 else "seconds")

    rng = random.Random(7)
    # 2026-03-08 07:00 UTC: New York's clocks go forward an hour.
    dst = 1_772_953_200_000
    samples = [0, -1, 999, 1000, dst - 1, dst, dst + 1, dst + 999]
    samples += [rng.randrange(-10**11, 4 * 10**12) for _ in range(5000)]
    for tz in ("Asia/Shanghai", "UTC", "America/New_York", "Asia/Kolkata"):
        for ms in samples:
            assert rfc3339(ms, tz) == reference(ms, tz), (ms, tz)
