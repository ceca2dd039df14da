"""The pages' HTTP side, in process: content types, cache headers of hashed assets and
of the HTML, ETag/304 on the public round data, the read-only additions, and the demo
sign-in present only with development secrets."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from conftest import EngineTestServer, campaign_toml, open_round, redis_now

from engine import campaign as cmp
from engine.auth import resolve_secrets
from engine.config import Settings
from engine.http import pages
from engine.http.app import create_app
from engine.store import load_campaign

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "engine" / "http" / "static"


async def test_html_is_short_lived_and_names_immutable_hashed_assets(make_engine,
                                                                     redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    for path in ("/", "/venue/"):
        resp = await e.client.get(path)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert resp.headers["Cache-Control"] == "public, max-age=60"
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        html = await resp.text()
        assert '<html lang="zh-CN">' in html and "{{" not in html
        refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
        assert refs, html
        for ref in refs:
            assert re.search(r"\.[0-9a-f]{12}\.(js|css|txt)$", ref), ref
            a = await e.client.get(ref)
            assert a.status == 200, ref
            assert a.headers["Cache-Control"] == "public, max-age=31536000, immutable"
            ext = ref.rsplit(".", 1)[1]
            assert a.headers["Content-Type"] == {
                "js": "text/javascript", "css": "text/css", "txt": "text/plain"}[ext] \
                + "; charset=utf-8"
            assert a.headers["X-Content-Type-Options"] == "nosniff"
        # An ETag revalidates the page without its body.
        again = await e.client.get(path, headers={"If-None-Match": resp.headers["ETag"]})
        assert again.status == 304 and await again.read() == b""


async def test_assets_are_gzipped_for_clients_that_accept_it(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    site = e.client.app[pages.SITE]
    url = site.urls["vendor/jsQR.js"]
    gz = await e.client.get(url, headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert gz.headers["Content-Encoding"] == "gzip" and gz.headers["Vary"] == "Accept-Encoding"
    raw = await gz.read()
    plain = await e.client.get(url, headers={"Accept-Encoding": "identity"})
    body = await plain.read()
    assert "Content-Encoding" not in plain.headers
    assert len(raw) < len(body) / 3
    # Served byte for byte as vendored from npm (docs/pages.md names its SHA-256).
    assert body == (STATIC / "vendor" / "jsQR.js").read_bytes()


async def test_unknown_assets_and_the_venue_redirect(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    resp = await e.client.get("/static/app.000000000000.css")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    # Source files are not served on their own, only the hashed bundles.
    assert (await e.client.get("/static/js/common.js")).status == 404
    resp = await e.client.get("/venue", allow_redirects=False)
    assert resp.status == 301 and resp.headers["Location"] == "/venue/"


@pytest.mark.parametrize("path", ["/v1/rounds", "/v1/rounds/R1", "/v1/campaign"])
async def test_public_round_data_is_cacheable_for_a_second_with_an_etag(
        make_engine, redis_url, path) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    first = await e.client.get(path)
    assert first.status == 200 and first.headers["Content-Type"] == "application/json"
    assert first.headers["Cache-Control"] == "public, max-age=1"
    etag = first.headers["ETag"]
    body = await first.read()
    for inm in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        again = await e.client.get(path, headers={"If-None-Match": inm})
        assert again.status == 304, inm
        assert again.headers["ETag"] == etag and await again.read() == b""
    other = await e.client.get(path, headers={"If-None-Match": '"something-else"'})
    assert other.status == 200 and await other.read() == body
    if path.startswith("/v1/rounds"):
        # A grant changes the remaining stock: a new body, a new tag.
        r = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                                headers=e.member("etag-m"))
        assert r.status == 201
        changed = await e.client.get(path, headers={"If-None-Match": etag})
        assert changed.status == 200 and changed.headers["ETag"] != etag


async def test_rounds_bodies_are_the_contracts(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    body = await (await e.client.get("/v1/rounds/R1")).json()
    assert set(body) == {"round"}
    assert set(body["round"]) == {"id", "opens_at", "closes_at", "state",
                                  "member_round_quota", "venues"}
    assert set(body["round"]["venues"][0]) == {"venue_id", "name", "kind", "stock",
                                               "remaining"}
    missing = await e.client.get("/v1/rounds/NOPE")
    assert missing.status == 404 and "ETag" not in missing.headers


async def test_campaign_time_and_venue_me(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    camp = (await (await e.client.get("/v1/campaign")).json())["campaign"]
    assert camp["name"] == "测试活动" and camp["timezone"] == "Asia/Shanghai"
    assert camp["member_campaign_quota"] == 3 and camp["face_value_fen"] == 10000
    assert camp["venues"][0] == {"venue_id": "V01", "name": "场馆V01", "kind": "ski",
                                 "city": "吉林市"}
    resp = await e.client.get("/v1/time")
    assert resp.headers["Cache-Control"] == "no-store"
    now = (await resp.json())["now"]
    assert now.endswith("+08:00")
    from datetime import datetime
    assert abs((datetime.fromisoformat(now) - redis_now(redis_url)).total_seconds()) < 2
    assert (await e.client.get("/v1/venue/me")).status == 401
    me = await e.client.get("/v1/venue/me", headers=await e.venue("V02"))
    assert (await me.json()) == {"venue": {"venue_id": "V02", "name": "场馆V02",
                                           "kind": "ski", "city": "吉林市"}}


async def test_configured_secrets_have_no_demo_sign_in(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    resp = await e.client.post("/v1/demo/sign-in", json={"member_id": "alice"})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    # Not even routed; and the engine itself refuses to mint, should it ever be.
    assert not [r for r in e.client.app.router.routes()
                if r.resource is not None and r.resource.canonical == "/v1/demo/sign-in"]
    from engine import errors
    from engine.http.handlers import ENGINE
    with pytest.raises(errors.NotFound):
        e.client.app[ENGINE].demo_member_token("alice")
    doc = await (await e.client.get("/openapi.json")).json()
    assert "/v1/demo/sign-in" not in doc["paths"]
    assert "demo" not in (await (await e.client.get("/")).text()).lower()


async def test_development_secrets_offer_the_demo_sign_in(redis_url, aredis,
                                                         tmp_path: Path) -> None:
    await load_campaign(aredis, cmp.parse_campaign(campaign_toml(rounds=[open_round(redis_url)])),
                        1)
    settings = Settings(data_dir=tmp_path / "var", redis_url=redis_url)
    client = TestClient(EngineTestServer(create_app(settings, redis_url)))
    await client.start_server()
    try:
        assert 'id="demo-form"' in await (await client.get("/")).text()
        doc = await (await client.get("/openapi.json")).json()
        assert "/v1/demo/sign-in" in doc["paths"]
        resp = await client.post("/v1/demo/sign-in", json={"member_id": "alice"})
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
        reply = await resp.json()
        assert reply["member_id"] == "alice" and reply["expires_at"].endswith("+08:00")
        mine = await client.get("/v1/me/coupons",
                                headers={"Authorization": f"Bearer {reply['token']}"})
        assert mine.status == 200
        for bad in ({"member_id": "a b"}, {"member_id": ""}, {"member_id": "a", "x": 1}, {}):
            r = await client.post("/v1/demo/sign-in", json=bad)
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_request"
    finally:
        await client.close()


def test_secrets_are_development_only_when_none_is_configured(tmp_path: Path) -> None:
    base = Settings(data_dir=tmp_path)
    assert resolve_secrets(base).development is True
    assert resolve_secrets(base).development is True  # read back from secrets.json
    assert resolve_secrets(Settings(data_dir=tmp_path, member_jwt_secret="m",
                                    admin_token="a")).development is False
    # One configured secret is a production intent: no demo sign-in either way.
    assert resolve_secrets(Settings(data_dir=tmp_path, member_jwt_secret="m")).development \
        is False
    assert resolve_secrets(Settings(data_dir=tmp_path, admin_token="a")).development is False


def test_every_static_file_is_package_data() -> None:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "engine.http" in conf["packages"]
    globs = conf["package-data"]["engine.http"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert files
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f"{f} would not be installed"


def test_the_pages_name_every_contract_outcome() -> None:
    """Each member and venue outcome of the contract has its own Chinese text."""
    member = (STATIC / "js" / "member.js").read_text()
    venue = (STATIC / "js" / "venue.js").read_text()
    for code in ("sold_out", "round_quota_exceeded", "campaign_quota_exceeded",
                 "round_not_open", "round_paused", "round_closed", "round_not_found",
                 "venue_not_found", "idempotency_key_reused", "rate_limited", "unavailable",
                 "unauthorized", "invalid_request", "already_redeemed", "already_void",
                 "coupon_not_found"):
        assert code in member, code
    for code in ("coupon_not_found", "wrong_venue", "already_redeemed", "coupon_void",
                 "coupon_not_yet_valid", "coupon_expired", "rate_limited", "unavailable",
                 "unauthorized", "invalid_request"):
        assert code in venue, code


def test_assets_are_read_when_the_app_is_made_not_at_import() -> None:
    site = pages.Site(demo_sign_in=False)
    assert set(site.pages) == {"member", "venue"}
    assert all(u.startswith("/static/") for u in site.urls.values())
    assert "demo-form" not in site.pages["member"].body.decode()
    assert "demo-form" in pages.Site(demo_sign_in=True).pages["member"].body.decode()
