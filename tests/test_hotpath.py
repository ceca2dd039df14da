"""The hot path (engine/http/hot.py) and what the worker decides from its own knowledge
(issue 19): the two hot routes answered before aiohttp's router exactly as the router
would answer them, quota refusals without Redis once known, shared refusals, and the
member-token cache as a bounded LRU."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from conftest import campaign_toml, open_round, redis_now
from yarl import URL

from engine import auth
from engine.auth import MemberVerifier, mint_member_token
from engine.campaign import ID_RE
from engine.http.handlers import ENGINE
from engine.http.hot import HotPath, hot_round_id


@pytest.mark.parametrize(("path", "rid"), [
    ("/v1/rounds/R1/grab", "R1"),
    ("/v1/rounds/winter.2026-r1/grab", "winter.2026-r1"),
    ("/v1/rounds/R1/grab?x=1", None),        # a query: the router decides
    ("/v1/rounds/R%31/grab", None),          # an escape: the router decodes it
    ("/v1/rounds/a/b/grab", None),           # another route shape
    ("/v1/rounds//grab", None),
    ("/v1/rounds/{x}/grab", None),
    ("/v1/rounds/R1/grab/", None),
    ("http://h/v1/rounds/R1/grab", None),    # absolute form
])
def test_hot_round_id(path: str, rid: str | None) -> None:
    assert hot_round_id(path) == rid


def _hot(e: Any) -> HotPath:
    handler = e.client.server.runner.server.request_handler
    assert isinstance(handler, HotPath)
    return handler


def _count_fallback(e: Any) -> list[str]:
    """Wrap the application's own handler (router + middleware): the paths it saw."""
    hot = _hot(e)
    seen: list[str] = []
    inner = hot._fallback

    async def counting(request: Any) -> Any:
        seen.append(request.raw_path)
        return await inner(request)

    hot._fallback = counting
    return seen


def _count_grab_scripts(e: Any) -> list[str]:
    """Wrap the store's grab (the real script call): the members it was called for."""
    engine = e.client.server.app[ENGINE]
    calls: list[str] = []
    inner = engine.store.grab

    async def counting(round_id: str, venue_id: str, member_id: str, idem: Any) -> Any:
        calls.append(member_id)
        return await inner(round_id, venue_id, member_id, idem)

    engine.store.grab = counting
    return calls


async def _answer(e: Any, path: str | URL, member: str, venue: str = "V01",
                  **headers: str) -> tuple[int, Any, dict[str, str]]:
    resp = await e.client.post(path, json={"venue_id": venue},
                               headers={**e.member(member), **headers})
    return resp.status, await resp.json(), dict(resp.headers)


async def test_hot_routes_skip_the_router_and_answer_as_it_does(make_engine,
                                                                 redis_url) -> None:
    now = redis_now(redis_url)
    later = {"id": "R2", "opens": now + timedelta(days=1),
             "closes": now + timedelta(days=1, hours=1), "quota": 1, "stock": {"V01": 5}}
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url), later]))
    seen = _count_fallback(e)
    hot = await _answer(e, "/v1/rounds/R2/grab", "m1")
    assert seen == []  # the grab never reached the router
    routed = await _answer(e, URL("/v1/rounds/R%32/grab", encoded=True), "m1")
    queried = await _answer(e, "/v1/rounds/R2/grab?from=app", "m1")
    assert seen == ["/v1/rounds/R%32/grab", "/v1/rounds/R2/grab?from=app"]
    assert hot[0] == routed[0] == queried[0] == 409
    assert hot[1] == routed[1] == queried[1]
    assert hot[1]["error"]["code"] == "round_not_open" and hot[1]["error"]["opens_at"]
    assert hot[2]["Content-Type"] == routed[2]["Content-Type"]
    # A grant, a redemption and their errors through the hot path too.
    status, body, _ = await _answer(e, "/v1/rounds/R1/grab", "m2")
    assert status == 201
    code = body["coupon"]["code"]
    venue = await e.venue("V01")
    resp = await e.client.post("/v1/venue/redemptions", json={"code": code}, headers=venue)
    assert resp.status == 200 and (await resp.json())["coupon"]["status"] == "redeemed"
    resp = await e.client.post("/v1/venue/redemptions", data=b"{not json", headers=venue)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_request"
    resp = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    assert seen == ["/v1/rounds/R%32/grab", "/v1/rounds/R2/grab?from=app"]
    # Other routes still go through the router (and its 404/405 in the contract's words).
    assert (await e.client.get("/v1/rounds/R1/grab")).status == 405
    assert (await e.client.post("/v1/rounds/R1/grab/x", json={})).status == 404
    assert seen[2:] == ["/v1/rounds/R1/grab", "/v1/rounds/R1/grab/x"]


async def test_a_member_at_quota_is_refused_without_redis(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(quota=3, rounds=[open_round(redis_url, quota=1)]))
    calls = _count_grab_scripts(e)
    assert (await _answer(e, "/v1/rounds/R1/grab", "m",
                          **{"Idempotency-Key": "k1"}))[0] == 201
    assert calls == ["m"]
    # The round's one coupon granted: the next taps are refused from what the worker knows.
    for venue in ("V01", "V02"):
        status, body, _ = await _answer(e, "/v1/rounds/R1/grab", "m", venue)
        assert (status, body["error"]["code"]) == (409, "round_quota_exceeded")
    assert calls == ["m"]
    # A keyed retry of the grant still reaches grab.lua for its replay.
    status, body, _ = await _answer(e, "/v1/rounds/R1/grab", "m",
                                    **{"Idempotency-Key": "k1"})
    assert status == 201
    assert calls == ["m", "m"]
    # Other members are not affected.
    assert (await _answer(e, "/v1/rounds/R1/grab", "n"))[0] == 201


async def test_a_quota_learned_from_grab_lua(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(quota=5, rounds=[open_round(redis_url, quota=2)]))
    calls = _count_grab_scripts(e)
    for _ in range(2):
        assert (await _answer(e, "/v1/rounds/R1/grab", "m"))[0] == 201
    # A quota of 2: the worker cannot tell from the grants, grab.lua tells it once.
    for _ in range(3):
        status, body, _ = await _answer(e, "/v1/rounds/R1/grab", "m")
        assert (status, body["error"]["code"]) == (409, "round_quota_exceeded")
    assert calls == ["m"] * 3


async def test_campaign_quota_is_remembered(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(quota=2, rounds=[open_round(redis_url, quota=3)]))
    calls = _count_grab_scripts(e)
    assert (await _answer(e, "/v1/rounds/R1/grab", "m"))[0] == 201
    assert (await _answer(e, "/v1/rounds/R1/grab", "m"))[0] == 201
    for _ in range(3):
        status, body, _ = await _answer(e, "/v1/rounds/R1/grab", "m")
        assert (status, body["error"]["code"]) == (409, "campaign_quota_exceeded")
    assert len(calls) == 3


async def test_refusals_are_shared_and_encoded_once(make_engine, redis_url) -> None:
    now = redis_now(redis_url)
    later = {"id": "R2", "opens": now + timedelta(days=1),
             "closes": now + timedelta(days=1, hours=1), "quota": 1, "stock": {"V01": 5}}
    e = await make_engine(campaign_toml(rounds=[later]))
    engine = e.client.server.app[ENGINE]
    bodies = [(await _answer(e, "/v1/rounds/R2/grab", f"m{i}"))[1] for i in range(3)]
    assert bodies[0] == bodies[1] == bodies[2]
    from engine import errors
    err = engine.refusal(errors.RoundNotOpen, engine.campaign.round("R2").opens_at_ms)
    assert err is engine.refusal(errors.RoundNotOpen, engine.campaign.round("R2").opens_at_ms)
    import json
    assert json.loads(err.encoded()) == bodies[0]


def test_the_token_cache_drops_the_least_recently_used(monkeypatch) -> None:
    monkeypatch.setattr(auth, "_CACHE_MAX", 3)
    secret = "s" * 40
    v = MemberVerifier(secret, ID_RE)
    toks = {m: mint_member_token(secret, m, 600) for m in ("a", "b", "c", "d")}
    for m in ("a", "b", "c"):
        assert v.verify(toks[m]) == m
    assert v.verify(toks["a"]) == "a"   # a is now the most recently used
    assert v.verify(toks["d"]) == "d"   # the cache is full: b (the oldest) goes
    assert list(v._cache) == [toks["c"], toks["a"], toks["d"]]


async def _raw_exchange(host: str, port: int, requests: list[bytes]) -> bytes:
    """Send ``requests`` on one connection (pipelined) and read until it closes."""
    import asyncio
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"".join(requests))
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


def _request(path: str, version: str, headers: dict[str, str], body: bytes,
             connection: str | None) -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: engine",
             "Content-Type: application/json", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    if connection:
        lines.append(f"Connection: {connection}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _without_date(data: bytes) -> bytes:
    import re
    return re.sub(rb"Date: [^\r]*\r\n", b"", data)


@pytest.mark.parametrize(("version", "connection"), [
    ("1.1", None), ("1.1", "close"), ("1.0", None), ("1.0", "keep-alive")])
async def test_hot_answers_are_the_bytes_aiohttp_writes(make_engine, redis_url, version: str,
                                                        connection: str | None) -> None:
    """The hot path writes its answers itself (hot.RawAnswer): byte for byte what the
    routed path (a web.Response) writes, Date aside, on every HTTP version and
    connection kind, so a client cannot tell them apart; a kept-alive connection keeps
    answering in order."""
    now = redis_now(redis_url)
    later = {"id": "R2", "opens": now + timedelta(days=1),
             "closes": now + timedelta(days=1, hours=1), "quota": 1, "stock": {"V01": 5}}
    e = await make_engine(campaign_toml(rounds=[later]))
    host, port = e.client.server.host, e.client.server.port
    body = b'{"venue_id": "V01"}'
    keep = connection == "keep-alive" or (version == "1.1" and connection is None)
    answers = []
    for path in ("/v1/rounds/R2/grab", "/v1/rounds/R%32/grab"):   # hot, then routed
        req = _request(path, version, e.member("m1"), body, connection)
        # A kept-alive connection: the same request twice, then one that closes.
        reqs = [req, req, _request(path, version, e.member("m1"), body, "close")] \
            if keep else [req]
        answers.append(_without_date(await _raw_exchange(host, port, reqs)))
    hot, routed = answers
    assert hot == routed
    status = f"HTTP/{version} 409 Conflict\r\n".encode()
    assert hot.startswith(status) and hot.count(status) == (3 if keep else 1)
    assert (b"Connection: close\r\n" in hot) == (version == "1.1")
    assert (b"Connection: keep-alive\r\n" in hot) == (version == "1.0" and keep)
