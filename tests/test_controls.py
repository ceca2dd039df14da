"""The operators' controls (contract section 3, "Operator controls") against a real
redis-server: pause, resume and close a round, add stock to a line, reverse a
redemption; every refusal with the store unchanged; the audit each action writes; named
operator tokens; a reload of the campaign file after the operators changed it; the CLI.

The same controls under a burst on a real ``serve --workers 2``, the ledger, settlement
and an archiver SIGKILL are in ``tests/test_controls_serve.py``; restore in
``tests/test_controls_restore.py``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import ADMIN, campaign_toml, open_round, redis_now

from engine import campaign as cmp
from engine import codes
from engine.domain import parse_rfc3339
from engine.http.handlers import ENGINE
from engine.store import load_campaign
from engine.store.settled import mark_settled

ROOT = Path(__file__).resolve().parent.parent
K = "cpn:{test-c}"


async def grab(e, member: str, venue: str = "V01", rid: str = "R1",
               key: str | None = None) -> tuple[int, dict, dict]:
    headers = e.member(member)
    if key:
        headers["Idempotency-Key"] = key
    resp = await e.client.post(f"/v1/rounds/{rid}/grab", json={"venue_id": venue},
                               headers=headers)
    return resp.status, await resp.json(), dict(resp.headers)


async def control(e, path: str, body: object = None, reason: str = "test",
                  headers: dict | None = None) -> tuple[int, dict]:
    resp = await e.client.post(f"/v1/admin/{path}",
                               json=body if body is not None else {"reason": reason},
                               headers=e.admin if headers is None else headers)
    return resp.status, await resp.json()


async def redeem(e, venue: str, code: str) -> tuple[int, dict]:
    resp = await e.client.post("/v1/venue/redemptions", json={"code": code},
                               headers=await e.venue(venue))
    return resp.status, await resp.json()


async def events(e, shard_key: str = K) -> list[dict]:
    return [f for _, f in await e.redis.xrange(f"{shard_key}:events")]


# -- pause, resume, close -------------------------------------------------------------


async def test_pause_resume_and_close_answer_and_decide_with_the_grabs(make_engine,
                                                                      redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    s, first, _ = await grab(e, "early", key="tap-1")
    assert s == 201

    s, body = await control(e, "rounds/R1/pause", reason="身份服务故障 identity service down")
    assert s == 200, body
    rnd, audit = body["round"], body["audit"]
    assert rnd["id"] == "R1" and rnd["paused"] is True and rnd["state"] == "open"
    assert rnd["paused_at"] == audit["at"]
    assert (audit["action"], audit["by"], audit["round_id"]) == ("pause", "admin", "R1")
    assert audit["reason"] == "身份服务故障 identity service down"
    assert audit["before"] == {"paused": False}
    paused_at = parse_rfc3339(audit["at"])
    assert audit["after"] == {"paused": True, "paused_at_ms": paused_at}
    snap = await e.snapshot()
    for i in range(5):
        s, b, h = await grab(e, f"m{i}", key=f"k{i}" if i % 2 else None)
        assert (s, b["error"]["code"]) == (409, "round_paused"), b
        assert h["Retry-After"] == "30"
    assert await e.snapshot() == snap  # a refused grab changes nothing
    # A keyed retry of a grant made before the pause still finds its coupon.
    s, again, _ = await grab(e, "early", key="tap-1")
    assert (s, again) == (201, first)
    stats = await (await e.client.get("/v1/admin/rounds/R1/stats", headers=e.admin)).json()
    assert stats["paused"] is True and stats["totals"]["issued"] == 1

    s, body = await control(e, "rounds/R1/resume", reason="fixed")
    assert s == 200 and body["round"]["paused"] is False and body["round"]["paused_at"] is None
    assert body["audit"]["before"] == {"paused": True, "paused_at_ms": paused_at}
    resumed_at = parse_rfc3339(body["audit"]["at"])
    assert body["audit"]["after"] == {"paused": False, "paused_for_ms": resumed_at - paused_at}
    assert (await grab(e, "m0"))[0] == 201

    s, body = await control(e, "rounds/R1/close", reason="budget reached elsewhere")
    assert s == 200, body
    closed_at = parse_rfc3339(body["audit"]["at"])
    assert body["round"]["state"] == "closed"
    assert parse_rfc3339(body["round"]["closes_at"]) == closed_at
    assert body["audit"]["after"]["closes_at_ms"] == closed_at
    s, b, _ = await grab(e, "m1")
    assert (s, b["error"]["code"]) == (410, "round_closed")
    # Everyone sees the round closed: the public view and the round hash.
    view = (await (await e.client.get("/v1/rounds/R1")).json())["round"]
    assert view["state"] == "closed" and parse_rfc3339(view["closes_at"]) == closed_at
    assert int(await e.redis.hget(f"{K}:round:R1", "c")) == closed_at
    # Coupons already issued keep their validity and can be redeemed.
    mine = (await (await e.client.get("/v1/me/coupons", headers=e.member("early"))).json())
    assert mine["coupons"][0]["valid_until"] == first["coupon"]["valid_until"]
    assert (await redeem(e, "V01", first["coupon"]["code"]))[0] == 200

    # The stream holds each action once, with who, when, why, before and after.
    acts = [f for f in await events(e) if f["type"] in ("pause", "resume", "close")]
    assert [(f["type"], f["actor"], int(f["at"])) for f in acts] == [
        ("pause", "admin", paused_at), ("resume", "admin", resumed_at),
        ("close", "admin", closed_at)]
    assert json.loads(acts[2]["before"])["paused"] is False


async def test_the_grab_script_itself_refuses_a_paused_round(make_engine, redis_url,
                                                            aredis) -> None:
    """Not only the workers' cache: grab.lua reads the pause in its own HMGET, so a grab
    already on its way to Redis when the pause lands is refused too."""
    from engine.config import Settings
    from engine.store import Store
    from engine.store.scripts import GrabOutcome
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    store = Store(aredis, e.campaign, Settings())
    try:
        assert (await store.pause("R1", "admin", "x")).event_id
        assert (await store.grab("R1", "V01", "m", None)).outcome is GrabOutcome.ROUND_PAUSED
        assert (await store.resume("R1", "admin", "x")).event_id
        assert (await store.grab("R1", "V01", "m", None)).outcome is GrabOutcome.GRANTED
    finally:
        await store.wire.close()


async def test_closing_a_scheduled_round_cancels_it(make_engine, redis_url) -> None:
    now = redis_now(redis_url)
    later = {"id": "R2", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=3),
             "stock": {"V01": 5}}
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url), later]))
    s, body = await control(e, "rounds/R2/close", reason="cancelled: venue closed by snow")
    assert s == 200 and body["round"]["state"] == "closed"
    at = parse_rfc3339(body["audit"]["at"])
    assert parse_rfc3339(body["round"]["opens_at"]) == at == parse_rfc3339(
        body["round"]["closes_at"])
    s, b, _ = await grab(e, "m", rid="R2")
    assert (s, b["error"]["code"]) == (410, "round_closed")
    assert (await control(e, "rounds/R2/stock", {"venue_id": "V01", "add": 1,
                                                 "reason": "x"}))[1]["error"]["code"] == \
        "round_closed"


async def test_a_void_after_an_early_close_does_not_restock(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 3})]))
    s, b, _ = await grab(e, "m")
    assert s == 201
    assert (await control(e, "rounds/R1/close"))[0] == 200
    resp = await e.client.delete(f"/v1/me/coupons/{b['coupon']['code']}", headers=e.member("m"))
    assert resp.status == 200
    st = await e.redis.hgetall(f"{K}:stats")
    assert st.get("returned_closed:R1:V01") == "1" and "returned_open:R1:V01" not in st
    assert await e.redis.hget(f"{K}:stock", "R1:V01") == "2"
    assert (await events(e))[-1]["restocked"] == "0"


# -- add stock -------------------------------------------------------------------------


async def test_added_stock_is_granted_exactly_and_counted(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 3,
                                                                            "V02": 4})]))
    first = await asyncio.gather(*[grab(e, f"a{i}") for i in range(60)])
    assert sum(1 for s, _, _ in first if s == 201) == 3
    assert {b["error"]["code"] for s, b, _ in first if s != 201} == {"sold_out"}
    s, body = await control(e, "rounds/R1/stock", {"venue_id": "V01", "add": 7,
                                                   "reason": "the line was entered 7 short"})
    assert s == 200, body
    audit = body["audit"]
    assert (audit["action"], audit["venue_id"], audit["units"]) == ("add_stock", "V01", 7)
    assert audit["before"] == {"stock": 3, "added": 0, "remaining_shard0": 0}
    assert audit["after"] == {"stock": 10, "added": 7, "remaining_shard0": 7}
    line = next(v for v in body["round"]["venues"] if v["venue_id"] == "V01")
    assert (line["stock"], line["remaining"]) == (10, 7)
    more = await asyncio.gather(*[grab(e, f"b{i}") for i in range(200)])
    assert sum(1 for s, _, _ in more if s == 201) == 7
    assert await e.redis.hget(f"{K}:stock", "R1:V01") == "0"
    st = await e.redis.hgetall(f"{K}:stats")
    assert (st["initial:R1:V01"], st["added:R1:V01"], st["issued:R1:V01"]) == ("10", "7", "10")
    # The invariant stock = initial - issued + returned_open holds with the addition.
    stats = await (await e.client.get("/v1/admin/rounds/R1/stats", headers=e.admin)).json()
    v01 = next(v for v in stats["venues"] if v["venue_id"] == "V01")
    assert (v01["stock"], v01["added"], v01["issued"], v01["remaining"]) == (10, 7, 10, 0)
    # The public view shows the added stock (the campaign as run).
    view = (await (await e.client.get("/v1/rounds/R1")).json())["round"]
    assert next(v for v in view["venues"] if v["venue_id"] == "V01")["stock"] == 10


async def test_budget_counts_every_round_and_earlier_additions(make_engine, redis_url) -> None:
    now = redis_now(redis_url)
    later = {"id": "R2", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=3),
             "stock": {"V01": 4}}
    # 10 + 4 coupons of 9900 fen loaded; room for 3 more.
    e = await make_engine(campaign_toml(budget=17 * 9900, rounds=[
        open_round(redis_url, stock={"V01": 5, "V02": 5}), later]))
    assert (await control(e, "rounds/R2/stock", {"venue_id": "V01", "add": 2,
                                                 "reason": "x"}))[0] == 200
    snap = await e.snapshot()
    s, body = await control(e, "rounds/R1/stock", {"venue_id": "V02", "add": 2, "reason": "x"})
    assert (s, body["error"]["code"]) == (409, "over_budget")
    assert "17 x" not in body["error"]["message"] and str(18 * 9900) in body["error"]["message"]
    assert await e.snapshot() == snap
    assert (await control(e, "rounds/R1/stock", {"venue_id": "V02", "add": 1,
                                                 "reason": "x"}))[0] == 200
    s, body = await control(e, "rounds/R1/stock", {"venue_id": "V01", "add": 1, "reason": "x"})
    assert (s, body["error"]["code"]) == (409, "over_budget")


# -- reverse ---------------------------------------------------------------------------


async def test_a_reversed_redemption_is_issued_again_and_redeemable_once_more(
        make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    s, b, _ = await grab(e, "m")
    code = b["coupon"]["code"]
    s, red = await redeem(e, "V01", code)
    assert s == 200
    redeemed_at = parse_rfc3339(red["coupon"]["redeemed_at"])
    # Typed by an operator: case, spaces and dashes are forgiven as everywhere.
    s, body = await control(e, f"redemptions/{code.lower().replace('-', ' ')}/reverse",
                            reason="staff scanned the wrong member's code")
    assert s == 200, body
    c = body["coupon"]
    assert (c["code"], c["status"], c["redeemed_at"]) == (code, "issued", None)
    assert (c["valid_from"], c["valid_until"]) == (b["coupon"]["valid_from"],
                                                    b["coupon"]["valid_until"])
    audit = body["audit"]
    assert (audit["action"], audit["code"], audit["venue_id"]) == ("reverse", code, "V01")
    assert audit["before"] == {"status": "redeemed", "redeemed_at_ms": redeemed_at}
    assert audit["after"] == {"status": "issued"}
    # The venue's redemption list shows it gone; the counters follow.
    vr = await (await e.client.get("/v1/venue/redemptions", headers=await e.venue("V01"))).json()
    assert vr["redemptions"] == []
    st = await e.redis.hgetall(f"{K}:stats")
    assert (st["redeemed:R1:V01"], st["reversed:R1:V01"]) == ("0", "1")
    # Redeemable once more, at its venue only.
    resp = await e.client.post("/v1/venue/redemptions", json={"code": code},
                               headers=await e.venue("V02"))
    assert (await resp.json())["error"]["code"] == "wrong_venue"
    s, red2 = await redeem(e, "V01", code)
    assert s == 200 and red2["coupon"]["status"] == "redeemed"
    assert (await redeem(e, "V01", code))[1]["error"]["code"] == "already_redeemed"
    vr = await (await e.client.get("/v1/venue/redemptions", headers=await e.venue("V01"))).json()
    assert [x["code"] for x in vr["redemptions"]] == [code]
    ev = await events(e)
    assert [f["type"] for f in ev] == ["grant", "redeem", "reverse", "redeem"]
    assert (ev[2]["actor"], ev[2]["code"], ev[2]["member"]) == (
        "admin", codes.normalize(code), "m")


# -- every refusal leaves the store unchanged ----------------------------------------


async def test_every_control_refusal_leaves_the_store_unchanged(make_engine, redis_url,
                                                               aredis) -> None:
    now = redis_now(redis_url)
    rounds = [
        {"id": "R0", "opens": now - timedelta(hours=3), "closes": now - timedelta(hours=2),
         "stock": {"V01": 5}},
        open_round(redis_url, stock={"V01": 5, "V02": 5}),
        {"id": "R2", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=3),
         "stock": {"V01": 5}},
    ]
    e = await make_engine(campaign_toml(rounds=rounds, venues=("V01", "V02", "V03"),
                                        budget=21 * 9900))
    issued = (await grab(e, "holder"))[1]["coupon"]["code"]
    redeemed = (await grab(e, "redeemer", venue="V02"))[1]["coupon"]["code"]
    assert (await redeem(e, "V02", redeemed))[0] == 200
    settled = (await grab(e, "settled", venue="V02"))[1]["coupon"]["code"]
    assert (await redeem(e, "V02", settled))[0] == 200
    voided = (await grab(e, "voider", venue="V02"))[1]["coupon"]["code"]
    assert (await e.client.delete(f"/v1/me/coupons/{voided}",
                                  headers=e.member("voider"))).status == 200
    not_settled, _ = await mark_settled(aredis, "test-c", 1, [codes.normalize(settled)],
                                        1_700_000_000_000, only_redeemed=True)
    assert not_settled == set()
    snap = await e.snapshot()

    async def expect(status: int, code: str, path: str, body: object = None,
                     headers: dict | None = None, extra: str | None = None) -> dict:
        s, got = await control(e, path, body, headers=headers)
        assert (s, got.get("error", {}).get("code")) == (status, code), (path, got)
        assert await e.snapshot() == snap, (path, code)
        if extra:
            assert got["error"][extra].endswith("+08:00")
        return got

    ok = {"reason": "x"}
    for action in ("pause", "resume", "close"):
        await expect(404, "round_not_found", f"rounds/nope/{action}", ok)
        await expect(404, "round_not_found", f"rounds/bad%20id/{action}", ok)
        await expect(401, "unauthorized", f"rounds/R1/{action}", ok, headers={})
        await expect(401, "unauthorized", f"rounds/R1/{action}", ok,
                     headers={"Authorization": "Bearer wrong-token"})
        await expect(401, "unauthorized", f"rounds/R1/{action}", ok,
                     headers=e.member("holder"))
        for bad in ({}, {"reason": ""}, {"reason": "   "}, {"reason": "x" * 501},
                    {"reason": 5}, {"reason": "x", "extra": 1}, [1]):
            await expect(400, "invalid_request", f"rounds/R1/{action}", bad)
    await expect(409, "round_not_open", "rounds/R2/pause", ok, extra="opens_at")
    await expect(410, "round_closed", "rounds/R0/pause", ok)
    await expect(409, "round_not_paused", "rounds/R1/resume", ok)
    await expect(409, "round_not_paused", "rounds/R2/resume", ok)
    await expect(410, "round_closed", "rounds/R0/close", ok)

    stock = "rounds/R1/stock"
    await expect(404, "round_not_found", "rounds/nope/stock", {"venue_id": "V01", "add": 1,
                                                               "reason": "x"})
    await expect(404, "venue_not_found", stock, {"venue_id": "V99", "add": 1, "reason": "x"})
    await expect(404, "venue_not_found", "rounds/R2/stock", {"venue_id": "V02", "add": 1,
                                                             "reason": "x"})  # no line
    await expect(409, "over_budget", stock, {"venue_id": "V01", "add": 2, "reason": "x"})
    await expect(410, "round_closed", "rounds/R0/stock", {"venue_id": "V01", "add": 1,
                                                          "reason": "x"})
    await expect(401, "unauthorized", stock, {"venue_id": "V01", "add": 1, "reason": "x"},
                 headers={})
    for bad in ({"venue_id": "V01", "add": 0, "reason": "x"},
                {"venue_id": "V01", "add": -3, "reason": "x"},
                {"venue_id": "V01", "add": 1.5, "reason": "x"},
                {"venue_id": "V01", "add": "2", "reason": "x"},
                {"venue_id": "V01", "add": 10**12, "reason": "x"},
                {"venue_id": "V01", "add": 1},
                {"venue_id": "V01", "add": 1, "reason": " "},
                {"venue_id": "bad id", "add": 1, "reason": "x"},
                {"add": 1, "reason": "x"}):
        await expect(400, "invalid_request", stock, bad)

    def rev(code: str) -> str:
        return f"redemptions/{code}/reverse"
    await expect(404, "coupon_not_found", rev(codes.display(codes.new_code())), ok)
    await expect(404, "coupon_not_found", rev("HELLO"), ok)
    await expect(404, "coupon_not_found", rev(redeemed[:-1] + ("0" if redeemed[-1] != "0"
                                                               else "1")), ok)
    await expect(409, "not_redeemed", rev(issued), ok)
    await expect(409, "not_redeemed", rev(voided), ok)
    await expect(409, "already_settled", rev(settled), ok)
    await expect(401, "unauthorized", rev(redeemed), ok, headers={})
    await expect(400, "invalid_request", rev(redeemed), {"reason": ""})
    # A pause of a paused round is refused too, and changes nothing.
    assert (await control(e, "rounds/R1/pause"))[0] == 200
    snap = await e.snapshot()
    got = await expect(409, "round_not_open", "rounds/R1/pause", ok, extra="opens_at")
    assert "already" in got["error"]["message"]


# -- operators' names ------------------------------------------------------------------


async def test_named_operator_tokens_name_who_acted(make_engine, redis_url) -> None:
    alice = "alice-token-0123456789"
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]),
                          admin_tokens=(("alice", alice), ("bob", "bob-token-0123456789")))
    s, body = await control(e, "rounds/R1/pause", headers={"Authorization": f"Bearer {alice}"})
    assert s == 200 and body["audit"]["by"] == "alice"
    s, body = await control(e, "rounds/R1/resume")  # COUPON_ADMIN_TOKEN still works
    assert s == 200 and body["audit"]["by"] == "admin"
    assert [f["actor"] for f in await events(e)] == ["alice", "admin"]
    s, body = await control(e, "rounds/R1/pause",
                            headers={"Authorization": f"Bearer {alice[:-1]}"})
    assert s == 401


def test_named_tokens_alone_are_configured_credentials(tmp_path: Path) -> None:
    """Named tokens say "production" as COUPON_ADMIN_TOKEN does: no development admin
    token beside them (it would let anyone with the data directory act unnamed), no demo
    sign-in."""
    from engine.auth import resolve_secrets
    from engine.config import Settings
    s = resolve_secrets(Settings(data_dir=tmp_path, admin_tokens=(("alice", "a" * 16),)))
    assert (s.development, s.admin_token, s.admins) == (False, "", (("alice", "a" * 16),))
    s = resolve_secrets(Settings(data_dir=tmp_path, admin_token="b" * 16,
                                 admin_tokens=(("alice", "a" * 16),)))
    assert s.admins == (("admin", "b" * 16), ("alice", "a" * 16))


def test_named_tokens_setting_is_checked_in_one_line() -> None:
    from engine.config import SettingsError, from_env
    got = from_env({"COUPON_ADMIN_TOKENS": "alice:0123456789abcdef, bob:fedcba9876543210"})
    assert got.admin_tokens == (("alice", "0123456789abcdef"), ("bob", "fedcba9876543210"))
    for bad in ("alice", "alice:short", "al ice:0123456789abcdef",
                "a:0123456789abcdef,a:fedcba9876543210",
                "a:0123456789abcdef,b:0123456789abcdef"):
        with pytest.raises(SettingsError) as exc:
            from_env({"COUPON_ADMIN_TOKENS": bad})
        assert str(exc.value).startswith("COUPON_ADMIN_TOKENS: ") and "\n" not in str(exc.value)


# -- the campaign file after the operators changed it ---------------------------------


async def test_reloading_the_file_keeps_the_close_and_the_added_stock(
        make_engine, redis_url, aredis) -> None:
    now = redis_now(redis_url)
    r1 = open_round(redis_url, stock={"V01": 5, "V02": 5})
    r2 = {"id": "R2", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=3),
          "stock": {"V01": 5}}
    text = campaign_toml(rounds=[r1, r2], budget=30 * 9900)
    e = await make_engine(text)
    assert (await control(e, "rounds/R2/stock", {"venue_id": "V01", "add": 4,
                                                 "reason": "x"}))[0] == 200
    assert (await control(e, "rounds/R1/close"))[0] == 200
    closed = await e.redis.hgetall(f"{K}:round:R1")
    # The same file again: a no-op, neither refused nor undoing the operators' changes.
    plan = await load_campaign(aredis, cmp.parse_campaign(text))
    assert plan.noop
    assert await e.redis.hgetall(f"{K}:round:R1") == closed
    # A changed file that raises R2's stock: applied on top of the addition, R1 stays closed.
    raised = campaign_toml(rounds=[r1, {**r2, "stock": {"V01": 8}}], budget=30 * 9900)
    plan = await load_campaign(aredis, cmp.parse_campaign(raised))
    assert not plan.noop
    assert await e.redis.hgetall(f"{K}:round:R1") == closed
    assert await e.redis.hget(f"{K}:stock", "R2:V01") == "12"
    assert await e.redis.hget(f"{K}:stats", "initial:R2:V01") == "12"
    engine = e.client.server.app[ENGINE]
    await engine.refresh()
    r = engine.campaign.round("R2")
    assert r.stock == {"V01": 12} and engine.campaign.round("R1").closes_at_ms == int(closed["c"])
    # The budget counts the addition: 10 + 8 + 4 + 9 > 30.
    over = campaign_toml(rounds=[r1, {**r2, "stock": {"V01": 17}}], budget=30 * 9900)
    with pytest.raises(cmp.CampaignError, match="operators' additions"):
        await load_campaign(aredis, cmp.parse_campaign(over))
    # A file that changes the closed round is refused like any opened round.
    moved = campaign_toml(rounds=[{**r1, "quota": 2}, {**r2, "stock": {"V01": 8}}],
                          budget=30 * 9900)
    with pytest.raises(cmp.CampaignError, match="opened"):
        await load_campaign(aredis, cmp.parse_campaign(moved))
    # A scheduled round an operator cancelled cannot be changed by a file either.
    assert (await control(e, "rounds/R2/close", reason="cancelled"))[0] == 200
    cancelled = await e.redis.hgetall(f"{K}:round:R2")
    again = campaign_toml(rounds=[r1, {**r2, "stock": {"V01": 9}}], budget=30 * 9900)
    with pytest.raises(cmp.CampaignError, match="closed by an operator"):
        await load_campaign(aredis, cmp.parse_campaign(again))
    assert (await load_campaign(aredis, cmp.parse_campaign(raised))).noop
    assert await e.redis.hgetall(f"{K}:round:R2") == cancelled


# -- workers' cached knowledge ---------------------------------------------------------


async def script_calls(e) -> int:
    stats = await e.redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
               for c in ("evalsha", "eval", "exists"))


async def test_other_workers_refuse_from_cache_and_forget_at_once(make_engine,
                                                                 redis_url) -> None:
    text = campaign_toml(rounds=[open_round(redis_url, stock={"V01": 1, "V02": 50})])
    a = await make_engine(text)
    b = await make_engine(text)  # a second worker on the same Redis
    assert (await control(a, "rounds/R1/pause"))[0] == 200
    assert (await grab(b, "m0", venue="V02"))[1]["error"]["code"] == "round_paused"
    before = await script_calls(b)
    for i in range(20):  # B now knows: no Redis call
        assert (await grab(b, f"x{i}", venue="V02"))[1]["error"]["code"] == "round_paused"
    assert await script_calls(b) == before
    assert (await control(a, "rounds/R1/resume"))[0] == 200
    t0 = time.monotonic()
    while (await grab(b, "m1", venue="V02"))[0] != 201:
        assert time.monotonic() - t0 < 2.0, "worker B still refuses after the resume"
        await asyncio.sleep(0.02)
    # Sold out at B, then stock added through A: B grants again at once.
    assert (await grab(b, "s0"))[0] == 201
    assert (await grab(b, "s1"))[1]["error"]["code"] == "sold_out"
    assert (await control(a, "rounds/R1/stock", {"venue_id": "V01", "add": 1,
                                                 "reason": "x"}))[0] == 200
    t0 = time.monotonic()
    while (await grab(b, "s1"))[0] != 201:
        assert time.monotonic() - t0 < 2.0, "worker B still answers sold_out after the addition"
        await asyncio.sleep(0.02)


async def test_notices_clear_cached_knowledge(make_engine, redis_url) -> None:
    """What each notify message does to a worker's cache (the poller repairs any miss
    within a poll; these are the immediate paths)."""
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    engine = e.client.server.app[ENGINE]
    engine.stop()  # no poller: only the notices change the cache here
    await asyncio.sleep(0.6)
    engine.notice("pause R1")
    assert engine.state.paused == {"R1"}
    engine.notice("resume R1")
    assert engine.state.paused == set()
    engine.state.sold_out.add("R1:V01")
    engine.notice("restock R1:V01")
    assert engine.state.sold_out == set()
    engine.state.paused.add("R1")
    engine._poke.clear()
    engine.notice("close R1")
    assert engine.state.paused == set() and engine._poke.is_set()
    # A lost 'resume' costs at most a poll: the poller forgets a pause Redis no longer has.
    engine.state.paused.add("R1")
    await engine.refresh()
    assert engine.state.paused == set()


async def test_each_control_tells_the_workers(make_engine, redis_url, aredis) -> None:
    """The notify channel carries what each control changed, from the script itself."""
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    pubsub = aredis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(f"{K}:notify")
    try:
        for path, body in (("rounds/R1/pause", None), ("rounds/R1/resume", None),
                           ("rounds/R1/stock", {"venue_id": "V02", "add": 2, "reason": "x"}),
                           ("rounds/R1/close", None)):
            assert (await control(e, path, body))[0] == 200
        got = []
        t0 = time.monotonic()
        while len(got) < 4 and time.monotonic() - t0 < 3:
            msg = await pubsub.get_message(timeout=0.5)
            if msg:
                got.append(msg["data"])
        assert got == ["pause R1", "resume R1", "restock R1:V02", "close R1"]
    finally:
        await pubsub.aclose()


async def test_the_controls_show_on_metrics(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    s, body = await control(e, "rounds/R1/pause")
    paused_at = parse_rfc3339(body["audit"]["at"]) / 1000
    assert (await control(e, "rounds/R1/stock", {"venue_id": "V02", "add": 3,
                                                 "reason": "x"}))[0] == 200
    want = {'coupon_round_paused{round="R1"}': 1.0,
            'coupon_round_paused_at_seconds{round="R1"}': paused_at,
            'coupon_stock_added{round="R1",venue="V02"}': 3.0,
            'coupon_grab_requests_total{outcome="round_paused",round="R1"}': 0.0}
    t0 = time.monotonic()
    while True:
        text = await (await e.client.get("/metrics")).text()
        got = {name: float(v) for name, _, v in (
            line.rpartition(" ") for line in text.splitlines() if not line.startswith("#"))}
        if all(got.get(k) == v for k, v in want.items()):
            break
        assert time.monotonic() - t0 < 3, {k: got.get(k) for k in want}
        await asyncio.sleep(0.1)


# -- the command line -------------------------------------------------------------------


def cli(redis_url: str, data: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update(COUPON_REDIS_URL=redis_url, COUPON_DATA_DIR=str(data), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


async def test_the_cli_controls_as_the_api_does(make_engine, redis_url, tmp_path) -> None:
    now = redis_now(redis_url)
    later = {"id": "R2", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=3),
             "stock": {"V01": 5}}
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url), later],
                                        budget=27 * 9900))
    code = (await grab(e, "m"))[1]["coupon"]["code"]
    assert (await redeem(e, "V01", code))[0] == 200
    data = tmp_path / "cli"
    p = cli(redis_url, data, "round", "pause", "R1", "--reason", "bots on V01")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["round"]["paused"] is True and out["audit"]["by"] == f"cli:{getpass.getuser()}"
    assert (await grab(e, "n"))[1]["error"]["code"] == "round_paused"
    p = cli(redis_url, data, "round", "add-stock", "R1", "V02", "1", "--reason", "short by 1")
    assert p.returncode == 0 and json.loads(p.stdout)["audit"]["units"] == 1, p.stderr
    p = cli(redis_url, data, "redemption", "reverse", code, "--reason", "wrong member")
    assert p.returncode == 0 and json.loads(p.stdout)["coupon"]["status"] == "issued", p.stderr
    p = cli(redis_url, data, "round", "resume", "R1", "--reason", "bots gone")
    assert p.returncode == 0, p.stderr
    p = cli(redis_url, data, "round", "close", "R2", "--reason", "cancelled")
    assert p.returncode == 0 and json.loads(p.stdout)["round"]["state"] == "closed"
    snap = await e.snapshot()
    for args, why in [
            (("round", "pause", "R9", "--reason", "x"), "round_not_found"),
            (("round", "resume", "R1", "--reason", "x"), "round_not_paused"),
            (("round", "pause", "R1", "--reason", "  "), "invalid_request"),
            (("round", "pause", "R1"), "--reason"),
            (("round", "close", "R2", "--reason", "x"), "round_closed"),
            (("round", "add-stock", "R1", "V01", "0", "--reason", "x"), "not positive"),
            (("round", "add-stock", "R1", "V01", "two", "--reason", "x"), "whole number"),
            (("round", "add-stock", "R1", "V01", "5", "--reason", "x"), "over_budget"),
            (("round", "add-stock", "R1", "V77", "1", "--reason", "x"), "venue_not_found"),
            (("redemption", "reverse", code, "--reason", "x"), "not_redeemed"),
            (("redemption", "reverse", "nonsense", "--reason", "x"), "coupon_not_found"),
            (("round", "pause", "R1", "--reason", "x" * 501), "invalid_request")]:
        p = cli(redis_url, data, *args)
        assert p.returncode == 2 and why in p.stderr and p.stderr.count("\n") == 1, (args, p)
        assert p.stdout == ""
        assert await e.snapshot() == snap, args
    acts = [(f["type"], f["actor"]) for f in await events(e) if "actor" in f]
    who = f"cli:{getpass.getuser()}"
    assert acts == [("pause", who), ("add_stock", who), ("reverse", who), ("resume", who),
                    ("close", who)]
    assert ADMIN not in json.dumps(acts)


# -- stock shards ---------------------------------------------------------------------


async def test_controls_hold_on_every_stock_shard(make_engine, redis_url) -> None:
    """With 3 stock shards each shard's copy of the round pauses and closes, and stock
    added to shard 0 reaches members of the other shards through the refill."""
    from conftest import members_of
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 3,
                                                                            "V02": 30})]),
                          stock_shards=3)
    crowd = {s: members_of(s, 6, 3, prefix=f"s{s}-") for s in range(3)}
    assert (await control(e, "rounds/R1/pause"))[0] == 200
    paused = [await e.redis.hget(f"cpn:{{test-c{t}}}:round:R1", "p") for t in ("", ":1", ":2")]
    assert len(set(paused)) == 1 and paused[0] is not None
    for s in range(3):
        got = await grab(e, crowd[s][0], venue="V02")
        assert (got[0], got[1]["error"]["code"]) == (409, "round_paused"), s
    assert (await control(e, "rounds/R1/resume"))[0] == 200
    for s in range(3):
        assert (await grab(e, crowd[s][1], venue="V02"))[0] == 201, s
    # V01's 3 coupons (one per shard) go; 4 more added to shard 0 reach shards 1 and 2.
    for s in range(3):
        assert (await grab(e, crowd[s][2]))[0] == 201, s
    assert (await control(e, "rounds/R1/stock", {"venue_id": "V01", "add": 4,
                                                 "reason": "x"}))[0] == 200
    assert await e.redis.hget("cpn:{test-c}:stats", "added:R1:V01") == "4"
    got = [await grab(e, m) for m in crowd[1][3:] + crowd[2][3:]]
    assert sum(1 for s, _, _ in got if s == 201) == 4
    assert (await control(e, "rounds/R1/close"))[0] == 200
    closes = {await e.redis.hget(f"cpn:{{test-c{t}}}:round:R1", "c") for t in ("", ":1", ":2")}
    assert len(closes) == 1
    for s in range(3):
        got = await grab(e, crowd[s][4], venue="V02")
        assert (got[0], got[1]["error"]["code"]) == (410, "round_closed"), s
    # A void in shard 2 after the close does not restock (its campaign hash knows).
    code = (await e.client.get("/v1/me/coupons", headers=e.member(crowd[2][1])))
    code = (await code.json())["coupons"][0]["code"]
    resp = await e.client.delete(f"/v1/me/coupons/{code}", headers=e.member(crowd[2][1]))
    assert resp.status == 200
    st = await e.redis.hgetall("cpn:{test-c:2}:stats")
    assert st.get("returned_closed:R1:V02") == "1" and "returned_open:R1:V02" not in st
