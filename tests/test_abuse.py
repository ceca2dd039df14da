"""Abuse and bad input (issue 8): each gets the contract's answer, and the store
is unchanged.

Every test here starts from one small world (an open round with a granted, a
redeemed and a voided coupon, an idempotency record and venue keys), takes a
full snapshot of Redis (every key with its type, contents and whether it
expires) and asserts after each refusal that the snapshot is equal.

Already covered elsewhere and not repeated: missing/garbage/`exp`-less/`exp=1`/
other-secret/`alg: none` member tokens on grab and one 10,000-byte body
(test_grab), a revoked venue key, a member JWT at the venue routes and the
sequential unknown-code limit (test_redeem), the sequential member token bucket
(test_grab).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from aiohttp import web
from conftest import ADMIN, SECRET, campaign_toml, open_round, redis_now

from engine import codes
from engine.http import public
from engine.http.handlers import add_routes

C = "cpn:{test-c}"


# --- the world and its snapshot -------------------------------------------------------

async def store_state(redis: Any) -> dict[str, tuple[str, object, bool]]:
    """key -> (type, full contents, expires?) for every key in this test's Redis."""
    out: dict[str, tuple[str, object, bool]] = {}
    for key in sorted(await redis.keys("*")):
        if key.endswith(":soldout"):
            continue  # the state pollers' monitoring record (keys.sold_out), not a request's
        kind = await redis.type(key)
        if kind == "string":
            val: object = await redis.get(key)
        elif kind == "hash":
            val = await redis.hgetall(key)
        elif kind == "list":
            val = await redis.lrange(key, 0, -1)
        elif kind == "set":
            val = sorted(await redis.smembers(key))
        elif kind == "zset":
            val = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            val = [(i, f) for i, f in await redis.xrange(key, "-", "+")]
        else:
            raise AssertionError(f"snapshot does not know type {kind} of {key}")
        out[key] = (kind, val, await redis.ttl(key) >= 0)
    return out


@dataclass
class World:
    e: Any
    issued: str        # holder's issued coupon (V01), granted with Idempotency-Key k1
    redeemed: str      # holder's coupon redeemed at V02
    voided: str        # holder's voided coupon (V01)
    venue1: dict[str, str]
    venue2: dict[str, str]
    snap: dict[str, Any]

    async def unchanged(self) -> None:
        assert await store_state(self.e.redis) == self.snap

    async def refused(self, method: str, path: str, status: int, code: str, **kw: Any) -> dict:
        resp = await self.e.client.request(method, path, **kw)
        body = await resp.json(content_type=None)
        assert (resp.status, body["error"]["code"]) == (status, code), (method, path, body)
        assert resp.content_type == "application/json"
        assert set(body) == {"error"} and isinstance(body["error"]["message"], str)
        await self.unchanged()
        return body


@pytest.fixture
async def world(make_engine, redis_url) -> World:
    now = redis_now(redis_url)
    rounds = [open_round(redis_url, quota=3, stock={"V01": 5, "V02": 5}),
              {"id": "R2", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=3),
               "stock": {"V01": 5}}]
    e = await make_engine(campaign_toml(rounds=rounds, venues=("V01", "V02", "V03"), quota=3),
                          venue_bad_code_limit=10)

    async def grab(venue: str, key: str | None = None) -> str:
        h = e.member("holder")
        if key:
            h["Idempotency-Key"] = key
        resp = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": venue}, headers=h)
        assert resp.status == 201, await resp.text()
        return (await resp.json())["coupon"]["code"]

    issued, redeemed, voided = await grab("V01", "k1"), await grab("V02"), await grab("V01")
    v1, v2 = await e.venue("V01"), await e.venue("V02")
    resp = await e.client.post("/v1/venue/redemptions", json={"code": redeemed}, headers=v2)
    assert resp.status == 200
    resp = await e.client.delete(f"/v1/me/coupons/{voided}", headers=e.member("holder"))
    assert resp.status == 200
    return World(e, issued, redeemed, voided, v1, v2, await store_state(e.redis))


async def raw_http(e: Any, request: bytes) -> tuple[int, bytes, bytes]:
    """Send bytes as they are (headers aiohttp's client would refuse to send)."""
    reader, writer = await asyncio.open_connection(e.client.server.host, e.client.server.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


def raw_request(method: str, path: str, headers: dict[str, bytes], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: test", b"Connection: close"]
    lines += [k.encode() + b": " + v for k, v in headers.items()]
    if body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --- member tokens --------------------------------------------------------------------

def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs(header: dict | bytes, payload: dict | bytes, key: bytes,
       digest: Any = hashlib.sha256) -> str:
    """A JWT signed by hand, so that any header, payload or key can be used."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = b64(h) + "." + b64(p)
    return signing_input + "." + b64(hmac.new(key, signing_input.encode(), digest).digest())


HS256 = {"alg": "HS256", "typ": "JWT"}


def claims(sub: object = "holder", **kw: object) -> dict:
    now = int(time.time())
    return {"sub": sub, "iat": now, "exp": now + 3600, **kw}


def rsa_pair() -> tuple[Any, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public_pem


def _tampered_payload() -> str:
    good = hs(HS256, claims("holder"), SECRET.encode())
    h, _, sig = good.split(".")
    return ".".join([h, b64(json.dumps(claims("victim")).encode()), sig])


def _tampered_signature() -> str:
    good = hs(HS256, claims("holder"), SECRET.encode())
    h, p, sig = good.split(".")
    return ".".join([h, p, ("B" if sig[0] == "A" else "A") + sig[1:]])


def _rs256() -> str:
    private, _ = rsa_pair()
    return jwt.encode(claims(), private, algorithm="RS256")


def _hs256_with_public_key() -> str:
    # The RS/HS confusion: HMAC keyed with a public key that an attacker can know.
    _, public_pem = rsa_pair()
    return hs(HS256, claims(), public_pem)


def _rs256_header_hmac_public_key() -> str:
    _, public_pem = rsa_pair()
    return hs({"alg": "RS256", "typ": "JWT"}, claims(), public_pem)


def _oversized_but_signed() -> str:
    # Correctly signed and unexpired: only the size guard refuses it.
    return hs(HS256, claims(pad="x" * 5000), SECRET.encode())


BAD_MEMBER_TOKENS: dict[str, Callable[[], str]] = {
    "tampered-payload": _tampered_payload,
    "tampered-signature": _tampered_signature,
    # Beyond the 30 s clock-skew leeway on exp, nbf and iat alike.
    "expired-40s-ago": lambda: hs(HS256, claims(exp=int(time.time()) - 40), SECRET.encode()),
    "iat-in-40s": lambda: hs(HS256, claims(iat=int(time.time()) + 40), SECRET.encode()),
    "iat-in-a-year": lambda: hs(HS256, claims(iat=int(time.time()) + 365 * 86400),
                                SECRET.encode()),
    "nbf-in-40s": lambda: hs(HS256, claims(nbf=int(time.time()) + 40), SECRET.encode()),
    "nbf-in-an-hour": lambda: hs(HS256, claims(nbf=int(time.time()) + 3600), SECRET.encode()),
    "alg-none-empty-sig": lambda: hs({"alg": "none"}, claims(), b"").rsplit(".", 1)[0] + ".",
    "alg-None-with-sig": lambda: hs({"alg": "None", "typ": "JWT"}, claims(), SECRET.encode()),
    "alg-NONE": lambda: hs({"alg": "NONE"}, claims(), b"").rsplit(".", 1)[0] + ".",
    "no-alg": lambda: hs({"typ": "JWT"}, claims(), SECRET.encode()),
    "hs512-right-secret": lambda: hs({"alg": "HS512"}, claims(), SECRET.encode(),
                                     hashlib.sha512),
    "rs256": _rs256,
    "hs256-keyed-with-public-key": _hs256_with_public_key,
    "rs256-header-hmac-public-key": _rs256_header_hmac_public_key,
    "oversized-5000-signed": _oversized_but_signed,
    "exp-1e400": lambda: hs(HS256, b'{"sub":"holder","exp":1e400}', SECRET.encode()),
    "exp-NaN": lambda: hs(HS256, b'{"sub":"holder","exp":NaN}', SECRET.encode()),
    "exp-negative-huge": lambda: hs(HS256, b'{"sub":"holder","exp":-1e308}', SECRET.encode()),
    "iat-Infinity": lambda: hs(HS256, b'{"sub":"holder","exp":9999999999,"iat":Infinity}',
                               SECRET.encode()),
    "sub-unicode": lambda: hs(HS256, claims("会员"), SECRET.encode()),
    "sub-fullwidth": lambda: hs(HS256, claims("ｈｏｌｄｅｒ"), SECRET.encode()),
    "sub-colon-key-injection": lambda: hs(HS256, claims("holder:r:R1"), SECRET.encode()),
    "sub-empty": lambda: hs(HS256, claims(""), SECRET.encode()),
    "sub-65-chars": lambda: hs(HS256, claims("m" * 65), SECRET.encode()),
    "sub-number": lambda: hs(HS256, claims(12345), SECRET.encode()),
    "sub-missing": lambda: hs(HS256, {"exp": int(time.time()) + 60}, SECRET.encode()),
    "payload-not-json": lambda: hs(HS256, b"holder", SECRET.encode()),
    "payload-array": lambda: hs(HS256, b'["holder"]', SECRET.encode()),
    "two-segments": lambda: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0",
    "four-segments": lambda: hs(HS256, claims(), SECRET.encode()) + ".x",
    "not-base64": lambda: "!!!.@@@.###",
}


@pytest.mark.parametrize("make_token", BAD_MEMBER_TOKENS.values(), ids=BAD_MEMBER_TOKENS.keys())
async def test_bad_member_tokens_are_401_on_every_member_route(world: World,
                                                               make_token) -> None:
    auth = {"Authorization": f"Bearer {make_token()}"}
    w = world
    await w.refused("POST", "/v1/rounds/R1/grab", 401, "unauthorized", json={"venue_id": "V02"},
                    headers={**auth, "Idempotency-Key": "fresh"})
    await w.refused("GET", "/v1/me/coupons", 401, "unauthorized", headers=auth)
    await w.refused("DELETE", f"/v1/me/coupons/{w.issued}", 401, "unauthorized", headers=auth)
    await w.refused("GET", f"/v1/me/coupons/{w.issued}/qr.svg", 401, "unauthorized",
                    headers=auth)


async def test_the_bad_token_cases_are_otherwise_sound(world: World) -> None:
    """Guard the guards: the same hand-made signing with the right inputs is accepted."""
    good = hs(HS256, claims("holder"), SECRET.encode())
    resp = await world.e.client.get("/v1/me/coupons", headers={"Authorization": f"Bearer {good}"})
    assert resp.status == 200 and len((await resp.json())["coupons"]) == 3
    just_fits = hs(HS256, claims(pad="x" * 2900), SECRET.encode())
    assert 3500 < len(just_fits) <= 4096
    resp = await world.e.client.get("/v1/me/coupons",
                                    headers={"Authorization": f"Bearer {just_fits}"})
    assert resp.status == 200
    # Within the 30 s leeway: a phone's or the identity service's clock a little off.
    now = int(time.time())
    for skewed in (claims(iat=now + 20), claims(nbf=now + 20), claims(exp=now - 20)):
        token = hs(HS256, skewed, SECRET.encode())
        resp = await world.e.client.get("/v1/me/coupons",
                                        headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200, skewed


async def test_member_id_with_trailing_newline_is_refused(world: World) -> None:
    token = hs(HS256, claims("holder\n"), SECRET.encode())
    await world.refused("GET", "/v1/me/coupons", 401, "unauthorized",
                        headers={"Authorization": f"Bearer {token}"})
    await world.refused("POST", "/v1/rounds/R1/grab", 401, "unauthorized",
                        json={"venue_id": "V02"}, headers={"Authorization": f"Bearer {token}"})


def test_auth_functions_refuse_undecodable_tokens_with_unauthorized() -> None:
    from engine.auth import MemberVerifier, check_admin
    from engine.campaign import ID_RE
    from engine.errors import Unauthorized
    with pytest.raises(Unauthorized):
        MemberVerifier(SECRET, ID_RE).verify("eyJ\udcff.x.y")
    with pytest.raises(Unauthorized):
        check_admin("adm_\udcff", ADMIN)


# --- malformed Authorization headers --------------------------------------------------

MALFORMED = {
    "empty": "",
    "scheme-only": "Bearer",
    "scheme-and-space": "Bearer    ",
    "basic": "Basic aG9sZGVyOnB3",
    "token-scheme": "Token {token}",
    "no-scheme": "{token}",
    "no-space": "Bearer{token}",
    "tab-separator": "Bearer\t{token}",
    "trailing-garbage": "Bearer {token} extra",
    "two-tokens-comma": "Bearer {token},Bearer {token}",
    "oversized-8000": "Bearer " + "a" * 8000,
}


@pytest.mark.parametrize("template", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_authorization_is_401_for_every_kind(world: World, template: str) -> None:
    w = world
    member_token = w.e.member("holder")["Authorization"].split(" ", 1)[1]
    venue_token = w.venue1["Authorization"].split(" ", 1)[1]
    for path, method, token, kw in [
            ("/v1/rounds/R1/grab", "POST", member_token, {"json": {"venue_id": "V02"}}),
            ("/v1/venue/redemptions", "POST", venue_token, {"json": {"code": w.issued}}),
            (f"/v1/venue/coupons/{w.issued}", "GET", venue_token, {}),
            ("/v1/admin/rounds/R1/stats", "GET", ADMIN, {})]:
        header = template.replace("{token}", token)
        await w.refused(method, path, 401, "unauthorized",
                        headers={"Authorization": header}, **kw)


async def test_a_credential_of_one_kind_is_401_at_another(world: World) -> None:
    w = world
    admin, venue = {"Authorization": f"Bearer {ADMIN}"}, w.venue1
    await w.refused("POST", "/v1/rounds/R1/grab", 401, "unauthorized", json={"venue_id": "V02"},
                    headers=venue)
    await w.refused("POST", "/v1/rounds/R1/grab", 401, "unauthorized", json={"venue_id": "V02"},
                    headers=admin)
    await w.refused("POST", "/v1/venue/redemptions", 401, "unauthorized",
                    json={"code": w.issued}, headers=admin)
    await w.refused("GET", "/v1/admin/rounds/R1/stats", 401, "unauthorized", headers=venue)
    # A venue key naming another venue, with this key's id and secret.
    _, vid, kid, secret = venue["Authorization"].split(" ")[1].split(".")
    await w.refused("POST", "/v1/venue/redemptions", 401, "unauthorized",
                    json={"code": w.issued},
                    headers={"Authorization": f"Bearer vk.V02.{kid}.{secret}"})
    await w.refused("POST", "/v1/venue/redemptions", 401, "unauthorized",
                    json={"code": w.issued},
                    headers={"Authorization": f"Bearer vk.{vid}.{kid}.{secret}x"})


async def test_non_utf8_authorization_bytes_are_401(world: World) -> None:
    """Regression: bytes that are not UTF-8 reached the token checks as lone surrogates
    and answered 500 on member and admin routes."""
    kid = world.venue1["Authorization"].split(".")[2]
    for path, value in [("/v1/me/coupons", b"Bearer \xff\xfe"),
                        ("/v1/me/coupons", b"Bearer eyJ\xe9.x.y"),
                        ("/v1/admin/rounds/R1/stats", b"Bearer adm_\xe9\xe9"),
                        ("/v1/venue/redemptions", b"Bearer vk.V01." + kid.encode() + b".\xff"),
                        ("/v1/venue/redemptions", "Bearer vk.V01.会员.x".encode())]:
        status, head, body = await raw_http(world.e, raw_request(
            "GET", path, {"Authorization": value}))
        assert status == 401, (path, value, body)
        assert json.loads(body)["error"]["code"] == "unauthorized"
    await world.unchanged()


async def test_header_beyond_the_http_limit_is_refused_before_the_engine(world: World) -> None:
    """An Authorization line over 8190 bytes never reaches a handler: the HTTP parser
    answers 400 (plain text, not the contract's JSON; see the report)."""
    resp = await world.e.client.get("/v1/me/coupons",
                                    headers={"Authorization": "Bearer " + "a" * 20000})
    assert resp.status == 400
    await world.unchanged()


# --- huge and deeply nested bodies ----------------------------------------------------

async def test_huge_bodies_are_400(world: World) -> None:
    w, member = world, world.e.member("m-big")
    big = b'{"venue_id": "V01", "pad": "' + b"x" * 1_000_000 + b'"}'
    await w.refused("POST", "/v1/rounds/R1/grab", 400, "invalid_request", data=big,
                    headers=member)
    await w.refused("POST", "/v1/venue/redemptions", 400, "invalid_request",
                    data=b'{"code": "' + b"7" * 1_000_000 + b'"}', headers=w.venue1)

    async def chunks():  # no Content-Length: the limit must hold while reading
        yield b'{"venue_id": "V01"' + b" " * 10
        for _ in range(64):
            yield b" " * 4096
        yield b"}"

    await w.refused("POST", "/v1/rounds/R1/grab", 400, "invalid_request", data=chunks(),
                    headers=member)
    # 4097 bytes of an otherwise valid body: one byte over the limit.
    body = b'{"venue_id": "V02"}'
    await w.refused("POST", "/v1/rounds/R1/grab", 400, "invalid_request",
                    data=body + b" " * (4097 - len(body)), headers=member)


async def test_a_body_of_exactly_the_limit_is_read(world: World) -> None:
    """The limit is 4096 bytes, not less: such a body reaches the coupon check (404)."""
    body = json.dumps({"code": codes.display(codes.new_code())}).encode()
    await world.refused("POST", "/v1/venue/redemptions", 404, "coupon_not_found",
                        data=body + b" " * (4096 - len(body)), headers=world.venue1)


@pytest.mark.parametrize("depth", [64, 1000, 2000])
async def test_deeply_nested_bodies_are_400(world: World, depth: int) -> None:
    w, member = world, world.e.member("m-deep")
    arrays = b"[" * depth + b"]" * depth
    objects = b'{"a":' * min(depth, 600) + b"1" + b"}" * min(depth, 600)
    for path, headers, body in [
            ("/v1/rounds/R1/grab", member, arrays),
            ("/v1/rounds/R1/grab", member, b'{"venue_id":' + arrays + b"}"),
            ("/v1/rounds/R1/grab", member, b'{"venue_id":"V02","x":' + arrays + b"}"),
            ("/v1/rounds/R1/grab", member, b'{"venue_id":' + objects + b"}"),
            ("/v1/venue/redemptions", w.venue1, b'{"code":' + arrays + b"}"),
            ("/v1/venue/redemptions", w.venue1, objects)]:
        assert len(body) <= 4096
        await w.refused("POST", path, 400, "invalid_request", data=body, headers=headers)


async def test_bad_content_length_is_refused_by_the_http_layer(world: World) -> None:
    auth = world.e.member("m-cl")["Authorization"].encode()
    for length in [b"-1", b"99999999999999999999999", b"1e3", b"0x10"]:
        status, _, _ = await raw_http(world.e, raw_request(
            "POST", "/v1/rounds/R1/grab", {"Authorization": auth, "Content-Length": length}))
        assert status == 400, length
    await world.unchanged()


# --- unicode in ids -------------------------------------------------------------------

ODD_ROUND_IDS = ["Ｒ１", "雪", "R1\u202e", "R1\n", "R1\x00", "R1\u200b", "🎿", "r1", "R1 ",
                 "R" * 200, "...", "R1:V01"]


async def test_unicode_round_ids_in_paths_are_round_not_found(world: World) -> None:
    w, member = world, world.e.member("m-uni")
    for rid in ODD_ROUND_IDS:
        p = quote(rid, safe="")
        await w.refused("POST", f"/v1/rounds/{p}/grab", 404, "round_not_found",
                        json={"venue_id": "V01"}, headers=member)
        await w.refused("GET", f"/v1/rounds/{p}", 404, "round_not_found")
        await w.refused("GET", f"/v1/admin/rounds/{p}/stats", 404, "round_not_found",
                        headers={"Authorization": f"Bearer {ADMIN}"})


ODD_VENUE_IDS = ["Ｖ０１", "场馆", "V01\n", "V\x00", "V01\u200b", "V01 ", "", "V" * 65, "V01:x",
                 "\ud83c\udfbf"]


async def test_unicode_venue_ids_in_bodies_are_400(world: World) -> None:
    """Regression: "V01\\n" passed the body's pattern ($ before a final newline)."""
    w, member = world, world.e.member("m-uni")
    for vid in ODD_VENUE_IDS:
        body = json.dumps({"venue_id": vid}).encode()  # \\u escapes, lone surrogates too
        await w.refused("POST", "/v1/rounds/R1/grab", 400, "invalid_request", data=body,
                        headers=member)


async def test_unicode_codes_in_paths_and_bodies_are_coupon_not_found(world: World) -> None:
    w, member = world, world.e.member("holder")
    wide = w.issued.translate({ord(c): ord(c) + 0xFEE0
                               for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"})
    for text in [wide, "雪" * 17, w.issued + "\u200b", w.issued.replace("-", "\u2010"),
                 w.issued + "\n\n"]:
        p = quote(text, safe="")
        await w.refused("DELETE", f"/v1/me/coupons/{p}", 404, "coupon_not_found",
                        headers=member)
        await w.refused("GET", f"/v1/me/coupons/{p}/qr.svg", 404, "coupon_not_found",
                        headers=member)
        await w.refused("GET", f"/v1/venue/coupons/{p}", 404, "coupon_not_found",
                        headers=w.venue1)
        await w.refused("POST", "/v1/venue/redemptions", 404, "coupon_not_found",
                        json={"code": text}, headers=w.venue2)


async def test_non_ascii_idempotency_keys_are_400(world: World) -> None:
    auth = world.e.member("m-idem")["Authorization"].encode()
    for key in ["キー".encode(), b"k\xff", "k1\u200b".encode(), b"a" * 65, b"a\tb",
                b"a" + b" " * 63 + b"b", b"k\x7f"]:
        status, _, body = await raw_http(world.e, raw_request(
            "POST", "/v1/rounds/R1/grab",
            {"Authorization": auth, "Idempotency-Key": key, "Content-Type": b"application/json"},
            b'{"venue_id": "V02"}'))
        assert status == 400, key
        # A control character may already be refused by the HTTP parser (plain text).
        if key not in (b"k\x7f",):
            assert json.loads(body)["error"]["code"] == "invalid_request", key
    await world.unchanged()


async def test_idempotency_keys_with_inner_spaces_are_keys(world: World) -> None:
    """Space is printable ASCII (contract: 1-64 printable characters). HTTP strips a
    value's leading and trailing spaces, so "  tap 2  " is the key "tap 2"."""
    e = world.e

    async def grab(member: str, key: bytes) -> tuple[int, dict]:
        status, _, body = await raw_http(e, raw_request(
            "POST", "/v1/rounds/R1/grab",
            {"Authorization": e.member(member)["Authorization"].encode(),
             "Idempotency-Key": key, "Content-Type": b"application/json"},
            b'{"venue_id": "V02"}'))
        return status, json.loads(body)

    longest = b"a" + b" " * 62 + b"z"
    for member, key, same in [("m-sp1", b"tap 1", b"tap 1"), ("m-sp2", longest, longest),
                              ("m-sp3", b"  tap 2  ", b"tap 2")]:
        first = await grab(member, key)
        assert first[0] == 201, (key, first)
        assert await grab(member, same) == first, key
    # Still one coupon each: the replays were replays.
    for member in ("m-sp1", "m-sp2", "m-sp3"):
        resp = await e.client.get("/v1/me/coupons", headers=e.member(member))
        assert len((await resp.json())["coupons"]) == 1
    # The OpenAPI document says the same.
    doc = await (await e.client.get("/openapi.json")).json()
    param = next(p for p in doc["paths"]["/v1/rounds/{round_id}/grab"]["post"]["parameters"]
                 if p["name"] == "Idempotency-Key")
    pattern = param["schema"]["pattern"]
    assert param["schema"]["maxLength"] == 64
    for ok in ("tap 1", longest.decode(), "~ !"):
        assert re.fullmatch(pattern, ok), ok
    for bad in ("a\tb", " a", "a ", "k\x7f", "a\x01b"):
        assert not re.fullmatch(pattern, bad), bad


# --- negative and huge numbers --------------------------------------------------------

async def test_numbers_where_the_body_wants_strings_are_400(world: World) -> None:
    w, member = world, world.e.member("m-num")
    for raw in [b"-1", b"0", b"1e400", b"-1e400", b"18446744073709551616", b"-9" * 1000,
                b"1.5", b"NaN", b"Infinity", b"true", b"null"]:
        await w.refused("POST", "/v1/rounds/R1/grab", 400, "invalid_request",
                        data=b'{"venue_id": ' + raw + b"}", headers=member)
        await w.refused("POST", "/v1/venue/redemptions", 400, "invalid_request",
                        data=b'{"code": ' + raw + b"}", headers=w.venue1)


async def test_since_with_negative_and_huge_values(world: World) -> None:
    w = world
    for since in ["-1", "0", "1e400", "-99999999999", "99999999999999999999", "NaN",
                  "Infinity", "+999999-01-01T00:00:00Z", "2024-01-01T00:00:00",
                  "2024-13-01T00:00:00+08:00", "2024-01-01T00:00:00+25:00", "１２"]:
        await w.refused("GET", "/v1/venue/redemptions", 400, "invalid_request",
                        params={"since": since}, headers=w.venue2)
    # The extremes that are valid times answer: everything, then nothing.
    for since, expected in [("0001-01-01T00:00:00+14:00", [w.redeemed]),
                            ("1970-01-01T00:00:00-00:01", [w.redeemed]),
                            ("9999-12-31T23:59:59.999999-23:59", [])]:
        resp = await w.e.client.get("/v1/venue/redemptions", params={"since": since},
                                    headers=w.venue2)
        assert resp.status == 200, since
        assert [c["code"] for c in (await resp.json())["redemptions"]] == expected
    await w.unchanged()


async def test_numeric_looking_path_ids(world: World) -> None:
    w, member = world, world.e.member("m-num")
    for rid in ["-1", "0", "1e400", "18446744073709551616", "NaN"]:
        await w.refused("POST", f"/v1/rounds/{rid}/grab", 404, "round_not_found",
                        json={"venue_id": "V01"}, headers=member)
    for code in ["-1", "0", "9" * 17, "1e400"]:
        await w.refused("GET", f"/v1/venue/coupons/{code}", 404, "coupon_not_found",
                        headers=w.venue2)


# --- idempotency keys reused with other bodies ----------------------------------------

async def test_reused_key_with_other_bodies_is_422_even_in_a_flood(world: World) -> None:
    w = world
    h = {**w.e.member("holder"), "Idempotency-Key": "k1"}
    results = await asyncio.gather(*[
        w.e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V02"}, headers=h)
        for _ in range(30)])
    for resp in results:
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (422, "idempotency_key_reused")
    await w.unchanged()
    # An invalid body with the same key is invalid first.
    await w.refused("POST", "/v1/rounds/R1/grab", 400, "invalid_request",
                    json={"venue_id": "V01", "again": True}, headers=h)


async def test_reused_key_on_a_sold_out_venue_is_still_422(make_engine, redis_url) -> None:
    """The worker's sold-out fast path must not hide a reused key."""
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, quota=2,
                                                           stock={"V01": 5, "V02": 1})]))
    h = {**e.member("m"), "Idempotency-Key": "k"}
    assert (await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                                headers=h)).status == 201
    assert (await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V02"},
                                headers=e.member("other"))).status == 201
    resp = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V02"},
                               headers=e.member("late"))
    assert (await resp.json())["error"]["code"] == "sold_out"  # the worker knows now
    before = await store_state(e.redis)
    resp = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V02"}, headers=h)
    assert (resp.status, (await resp.json())["error"]["code"]) == (422, "idempotency_key_reused")
    assert await store_state(e.redis) == before


async def test_replay_with_the_same_body_spelled_differently_changes_nothing(
        world: World) -> None:
    w = world
    h = {**w.e.member("holder"), "Idempotency-Key": "k1", "Content-Type": "application/json"}
    bodies = [b'{"venue_id":"V01"}', b' { "venue_id" :\n"V01" } ',
              b'{"venue_id":"\\u0056\\u0030\\u0031"}']
    replies = []
    for body in bodies:
        resp = await w.e.client.post("/v1/rounds/R1/grab", data=body, headers=h)
        assert resp.status == 201
        replies.append(await resp.json())
    assert all(r == replies[0] for r in replies)
    assert replies[0]["coupon"]["code"] == w.issued and replies[0]["coupon"]["status"] == "issued"
    await w.unchanged()


# --- floods of random codes -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["redeem", "lookup", "mixed"])
async def test_concurrent_flood_of_random_codes_stops_at_the_limit(world: World,
                                                                   kind: str) -> None:
    """Regression: the venue's unknown-code budget was checked before the store was asked
    and spent after, so 100 concurrent random codes all got 404 with a limit of 10."""
    w = world

    async def redeem(text: str) -> Any:
        return await w.e.client.post("/v1/venue/redemptions", json={"code": text},
                                     headers=w.venue1)

    async def look(text: str) -> Any:
        return await w.e.client.get(f"/v1/venue/coupons/{text}", headers=w.venue1)

    flood = [codes.display(codes.new_code()) for _ in range(120)]
    pick = {"redeem": lambda i: redeem, "lookup": lambda i: look,
            "mixed": lambda i: redeem if i % 3 else look}[kind]
    results = await asyncio.gather(*[pick(i)(c) for i, c in enumerate(flood)])
    answers = [(r.status, (await r.json())["error"]["code"]) for r in results]
    assert answers.count((404, "coupon_not_found")) == 10  # venue_bad_code_limit
    assert answers.count((429, "rate_limited")) == 110
    for r in results:
        if r.status == 429:
            assert 1 <= int(r.headers["Retry-After"]) <= 60
    await w.unchanged()
    # Blocked for the minute, even for a real code of its own; the other venue is not.
    await w.refused("POST", "/v1/venue/redemptions", 429, "rate_limited",
                    json={"code": w.issued}, headers=w.venue1)
    await w.refused("GET", f"/v1/venue/coupons/{w.issued}", 429, "rate_limited",
                    headers=w.venue1)
    await w.refused("POST", "/v1/venue/redemptions", 403, "wrong_venue",
                    json={"code": w.issued}, headers=w.venue2)


async def test_malformed_code_flood_counts_too(world: World) -> None:
    """Codes that fail their check are answered without the store, and still spend the
    venue's budget: a scanner cannot probe forever with typos."""
    w = world
    real = codes.display(codes.new_code())
    typo = real[:-1] + ("0" if real[-1] != "0" else "1")
    texts = [typo, "hello", "雪", "x" * 64] * 5
    answers = []
    for text in texts:
        resp = await w.e.client.post("/v1/venue/redemptions", json={"code": text},
                                     headers=w.venue1)
        answers.append((resp.status, (await resp.json())["error"]["code"]))
    assert answers == [(404, "coupon_not_found")] * 10 + [(429, "rate_limited")] * 10
    await w.unchanged()


async def test_random_valid_looking_codes_are_404_and_touch_nothing(world: World) -> None:
    w = world
    for i in range(10):  # within the limit: every one is simply unknown
        text = codes.display(codes.new_code())
        if i % 2:
            text = text.lower().replace("-", " ")
        await w.refused("POST", "/v1/venue/redemptions", 404, "coupon_not_found",
                        json={"code": text}, headers=w.venue2)


async def test_member_flood_is_rate_limited_exactly(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]), member_rate=0.01,
                          member_burst=5)
    before = await store_state(e.redis)
    results = await asyncio.gather(*[
        e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V99"}, headers=e.member("m"))
        for _ in range(60)])
    answers = [(r.status, (await r.json())["error"]["code"]) for r in results]
    assert answers.count((404, "venue_not_found")) == 5
    assert answers.count((429, "rate_limited")) == 55
    assert await store_state(e.redis) == before


# --- the OpenAPI document and the HTTP edges ------------------------------------------

async def test_openapi_documents_every_route_and_its_errors(world: World) -> None:
    doc = await (await world.e.client.get("/openapi.json")).json()
    app = web.Application()
    add_routes(app)
    public.add_routes(app, demo_sign_in_route=False)  # the engine under test has real secrets
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()
              if r.method != "HEAD"}
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    schemes = doc["components"]["securitySchemes"]
    assert set(schemes) == {"member", "venue", "admin"}
    assert all(s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values())
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                if status[0] in "45":
                    codes_ = resp["content"]["application/json"]["schema"]["properties"][
                        "error"]["properties"]["code"]["enum"]
                    assert codes_, (path, method, status)
            if op["security"]:
                assert op["responses"]["401"]["content"]["application/json"]["schema"][
                    "properties"]["error"]["properties"]["code"]["enum"] == ["unauthorized"]
    grab = doc["paths"]["/v1/rounds/{round_id}/grab"]["post"]
    assert {p["name"] for p in grab["parameters"]} == {"round_id", "Idempotency-Key"}
    assert set(grab["responses"]) == {"201", "400", "401", "404", "409", "410", "422", "429",
                                      "503"}
    assert grab["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    try:
        from openapi_spec_validator import validate
    except ImportError:  # pragma: no cover - in the test extra
        pytest.fail("openapi-spec-validator is missing (pip install -e '.[test]')")
    validate(doc)


async def test_405_names_the_allowed_methods(world: World) -> None:
    resp = await world.e.client.put("/v1/rounds/R1/grab", headers=world.e.member("holder"))
    assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]
    await world.unchanged()
