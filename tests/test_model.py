"""Property test: random grabs, replays and round openings run against both
grab.lua on a real redis-server and the pure-Python GrabModel; every outcome
and the final counters must agree."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import redis
from conftest import campaign_toml, redis_now
from grab_model import GrabModel
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine import campaign as cmp
from engine import codes
from engine.store import keys, scripts
from engine.store.scripts import GrabOutcome

MEMBERS = st.sampled_from([f"m{i}" for i in range(6)])
ROUNDS = st.sampled_from(["R_past", "R_open", "R_soon", "R_nope"])
VENUES = st.sampled_from(["V01", "V02", "V03"])
IDEM = st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"]))


def make_machine(url: str) -> type[RuleBasedStateMachine]:
    class GrabMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.r = redis.Redis.from_url(url, decode_responses=True)
            self.r.flushall()
            now = redis_now(url)
            rounds = [
                {"id": "R_past", "opens": now - timedelta(hours=3),
                 "closes": now - timedelta(hours=2), "stock": {"V01": 3}},
                {"id": "R_open", "opens": now - timedelta(hours=1),
                 "closes": now + timedelta(hours=1), "quota": 2,
                 "stock": {"V01": 3, "V02": 1}},
                {"id": "R_soon", "opens": now + timedelta(hours=2),
                 "closes": now + timedelta(hours=3), "stock": {"V01": 2, "V02": 2}},
            ]
            c = cmp.parse_campaign(campaign_toml(cid="model", quota=3, rounds=rounds,
                                                 venues=("V01", "V02", "V03")))
            import asyncio

            import redis.asyncio as aioredis

            from engine.store import load_campaign

            async def load() -> None:
                client = aioredis.Redis.from_url(url, decode_responses=True)
                await load_campaign(client, c)
                await client.aclose()
            asyncio.run(load())
            self.k = keys.Keys("model")
            self.script = self.r.register_script(scripts.load("grab").source)
            self.model = GrabModel(c)

        def now_ms(self) -> int:
            sec, usec = self.r.time()
            return sec * 1000 + usec // 1000

        @rule(member=MEMBERS, round_id=ROUNDS, venue=VENUES, key=IDEM)
        def grab(self, member: str, round_id: str, venue: str, key: str | None) -> None:
            code = codes.new_code()
            k = self.k
            keys_, argv = scripts.grab_call(k, round_id, venue, member, code, key or "", 86400)
            reply = self.script(keys=keys_, args=argv)
            got = scripts.outcome(scripts.GrabOutcome, int(reply[0]))
            want = self.model.grab(member, round_id, venue, self.now_ms(), key)
            assert got == want, (member, round_id, venue, key)

        @rule()
        def open_soon_round(self) -> None:
            # A round change: the scheduled round opens now.
            now = self.now_ms()
            self.r.hset(self.k.round("R_soon"), "o", now - 1)
            rounds = tuple(msgspec.structs.replace(r, opens_at_ms=now - 1)
                           if r.id == "R_soon" else r for r in self.model.campaign.rounds)
            self.model.campaign = msgspec.structs.replace(self.model.campaign, rounds=rounds)

        @invariant()
        def counters_agree(self) -> None:
            if not hasattr(self, "model"):
                return
            stock = self.r.hgetall(self.k.stock)
            for (rid, vid), n in self.model.stock.items():
                assert int(stock[f"{rid}:{vid}"]) == n
            for m, total in self.model.member_total.items():
                assert int(self.r.hget(self.k.member(m), "total") or 0) == total

        def teardown(self) -> None:
            if hasattr(self, "r"):
                self.r.close()

    return GrabMachine


def test_grab_script_matches_the_model(redis_url: str) -> None:
    machine = make_machine(redis_url)
    machine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()


def test_the_model_would_catch_a_broken_rule(redis_url: str) -> None:
    """Guard against a vacuous property: a model without the round quota disagrees."""
    c = cmp.parse_campaign(campaign_toml(cid="model", rounds=[{
        "id": "R", "opens": redis_now(redis_url) - timedelta(hours=1),
        "closes": redis_now(redis_url) + timedelta(hours=1), "stock": {"V01": 5}}]))
    m = GrabModel(c)
    now = int(redis_now(redis_url).timestamp() * 1000)
    assert m.grab("a", "R", "V01", now, None) is GrabOutcome.GRANTED
    assert m.grab("a", "R", "V01", now, None) is GrabOutcome.ROUND_QUOTA
