"""The members' page and the venues' scanner page in real headless Chromium (Debian's
package, driven by Playwright), against real ``coupon-engine serve`` processes.

Two engines: ``member`` runs on configured secrets (no demo sign-in), with a round R1
that opens about 20 s after start (so the first test sees the countdown), round quota
3 and campaign quota 2; ``venue`` runs on development secrets (demo sign-in offered),
with R1 open from the start, round quota 1. One browser for the module, with Chromium's
fake camera reading a y4m video that each venue test writes before it opens its page.
Every test ends with no console or page error and saves a screenshot in its tmp_path.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import campaign_toml
from pagekit import CHROMIUM_ARGS, Serve, Watch, bearer, call, chromium_path, write_y4m

from engine import codes
from engine.auth import mint_member_token

SECRET = "browser-test-member-secret-0123456789"
ADMIN = "browser-test-admin-token"
OPENS_IN_S = 20
TIMEOUT_MS = 15_000


def _iso_now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def member_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    now = _iso_now()
    text = campaign_toml(quota=2, venues=("V01", "V02", "V03"), rounds=[
        {"id": "R1", "opens": now + timedelta(seconds=OPENS_IN_S),
         "closes": now + timedelta(hours=1), "quota": 3,
         "stock": {"V01": 100, "V02": 1, "V03": 50}},
        {"id": "R2", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=3),
         "quota": 1, "stock": {"V01": 10}}])
    serve = Serve(tmp_path_factory.mktemp("member-engine"), text,
                  {"COUPON_MEMBER_JWT_SECRET": SECRET, "COUPON_ADMIN_TOKEN": ADMIN},
                  opens_at=now + timedelta(seconds=OPENS_IN_S)).start()
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def venue_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    now = _iso_now()
    text = campaign_toml(quota=3, venues=("V01", "V02"), rounds=[
        {"id": "R1", "opens": now - timedelta(minutes=5), "closes": now + timedelta(hours=1),
         "quota": 1, "stock": {"V01": 50, "V02": 50}}])
    serve = Serve(tmp_path_factory.mktemp("venue-engine"), text).start()
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def camera(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("camera") / "camera.y4m"
    write_y4m(path, None)
    return path


@pytest.fixture(scope="module")
def browser(camera: Path) -> Iterator[Any]:
    exe = chromium_path()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=[*CHROMIUM_ARGS, f"--use-file-for-fake-video-capture={camera}"])
        yield b
        b.close()


@pytest.fixture
def phone(browser: Any) -> Iterator[Any]:
    """A fresh phone-sized context (its own storage); pages opened in it are watched."""
    contexts: list[Any] = []

    def make(**kw: Any) -> Any:
        ctx = browser.new_context(viewport={"width": 390, "height": 844}, locale="zh-CN",
                                  **kw)
        ctx.set_default_timeout(TIMEOUT_MS)
        contexts.append(ctx)
        return ctx

    yield make
    for c in contexts:
        c.close()


def open_page(ctx: Any, url: str) -> tuple[Any, Watch]:
    page = ctx.new_page()
    watch = Watch(page)
    page.goto(url)
    page.locator("body[data-ready='1']").wait_for()
    return page, watch


def finish(page: Any, watch: Watch, tmp_path: Path, name: str = "final") -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    watch.assert_clean()


def member_url(serve: Serve, member: str) -> str:
    return f"{serve.base}/#token={mint_member_token(SECRET, member, 3600)}"


def member_headers(member: str) -> dict[str, str]:
    return bearer(mint_member_token(SECRET, member, 3600))


def my_coupons(serve: Serve, headers: dict[str, str]) -> list[dict[str, Any]]:
    reply = serve.get("/v1/me/coupons", headers)
    assert reply.status == 200
    return reply.json()["coupons"]


def wait_open(serve: Serve) -> None:
    assert serve.opens_at is not None
    delay = (serve.opens_at - _iso_now()).total_seconds()
    if delay > -0.5:
        time.sleep(delay + 0.5)


def grab_button(page: Any, venue: str) -> Any:
    return page.locator(f"li.venue[data-venue={venue}] button.grab")


def expect() -> Any:
    from playwright.sync_api import expect as pw_expect
    return pw_expect


# --- the member page ----------------------------------------------------------------

def test_countdown_and_buttons_follow_the_engine_clock_not_the_phone(
        phone: Any, member_engine: Serve, tmp_path: Path) -> None:
    """Two phones, one 5 minutes slow and one 3 minutes fast: both count down to the
    engine's opening and enable their grab buttons at it; then a grab, its coupon, its QR.
    (``phone`` first: the browser and its camera file are made before the engine starts
    the round's countdown, which a slow machine could otherwise spend on them.)"""
    serve = member_engine
    assert serve.opens_at is not None
    opens = serve.opens_at.timestamp()
    pages = []
    for skew_s, member in ((-300, "m-slow"), (180, "m-fast")):
        ctx = phone()
        ctx.clock.install(time=time.time() + skew_s)
        pages.append(open_page(ctx, member_url(serve, member)))
    left = opens - time.time()
    assert left > 3, f"the round opened before the pages were up ({left:.1f} s left)"
    for page, _ in pages:
        shown = page.locator("#countdown-time").text_content()
        h, m, s = map(int, shown.split(":"))
        # The phone's own clock would say 5 min 20 s, or nothing left at all.
        assert abs(h * 3600 + m * 60 + s - (opens - time.time())) < 2.5, shown
        assert grab_button(page, "V01").is_disabled()
        assert grab_button(page, "V01").text_content() == "未开始"
    enabled_at: list[float | None] = [None, None]
    deadline = opens + 10
    while time.time() < deadline and None in enabled_at:
        for i, (page, _) in enumerate(pages):
            if enabled_at[i] is None and grab_button(page, "V01").is_enabled():
                enabled_at[i] = time.time()
        time.sleep(0.05)
    for at in enabled_at:
        assert at is not None, "a grab button never enabled"
        # By the engine's clock: not before the opening (a little rounding), and promptly.
        assert opens - 0.5 <= at <= opens + 3.0, at - opens
    page, watch = pages[0]
    grab_button(page, "V01").click()
    expect()(page.locator("#notice")).to_contain_text("抢到了")
    coupons = my_coupons(serve, member_headers("m-slow"))
    assert len(coupons) == 1 and coupons[0]["venue_id"] == "V01"
    code = coupons[0]["code"]
    card = page.locator(f"li.coupon[data-code='{code}']")
    expect()(card.locator(".coupon-code")).to_have_text(code)
    expect()(card.locator(".badge")).to_have_text("可使用")
    expect()(page.locator("li.venue[data-venue=V01] .venue-stock")).to_have_text(
        "剩余 99 / 100")
    qr = card.locator("img.qr")
    expect()(qr).to_be_visible()
    box = qr.bounding_box()
    assert box is not None and box["width"] >= 250, box  # scannable from another phone
    # What another phone's camera would read off this screen.
    import zxingcpp
    from PIL import Image
    read = zxingcpp.read_barcodes(Image.open(io.BytesIO(qr.screenshot())))
    assert [r.text for r in read] == [code]
    for i, (p, w) in enumerate(pages):
        finish(p, w, tmp_path, f"final-{i}")


def test_a_lost_reply_is_retried_with_the_same_key_and_costs_one_coupon(
        member_engine: Serve, phone: Any, tmp_path: Path) -> None:
    serve = member_engine
    wait_open(serve)
    page, watch = open_page(phone(), member_url(serve, "m-lost"))
    keys: list[str | None] = []

    def lose_first_reply(route: Any, request: Any) -> None:
        keys.append(request.headers.get("idempotency-key"))
        if len(keys) == 1:
            granted = route.fetch()  # the engine grants the coupon ...
            assert granted.status == 201
            # ... and the reply is lost on the way: the phone sees a 503.
            route.fulfill(status=503, headers={"Retry-After": "1"}, content_type="application/json",
                          body='{"error": {"code": "unavailable", "message": "lost"}}')
        else:
            route.continue_()

    page.route("**/v1/rounds/R1/grab", lose_first_reply)
    grab_button(page, "V01").click()
    expect()(page.locator("#notice")).to_contain_text("抢到了", timeout=TIMEOUT_MS)
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1], keys
    coupons = my_coupons(serve, member_headers("m-lost"))
    assert len(coupons) == 1, coupons
    expect()(page.locator("li.coupon")).to_have_count(1)
    finish(page, watch, tmp_path)


def test_sold_out_and_the_campaign_quota_are_told_in_chinese(
        member_engine: Serve, phone: Any, tmp_path: Path) -> None:
    serve = member_engine
    wait_open(serve)
    # V02 has one coupon. This phone's view is a moment old (the public data may lag a
    # second): it still offers V02 when another member takes the last one.
    page, watch = open_page(phone(), member_url(serve, "m-late"))
    expect()(grab_button(page, "V02")).to_be_enabled()
    page.route("**/v1/rounds/R1", lambda route: route.abort())
    assert serve.post("/v1/rounds/R1/grab", {"venue_id": "V02"},
                      member_headers("m-first")).status == 201
    grab_button(page, "V02").click()
    expect()(page.locator("#notice")).to_have_text("这个场馆本场的券已抢光，看看其他场馆吧。")
    expect()(grab_button(page, "V02")).to_have_text("已抢光")
    expect()(grab_button(page, "V02")).to_be_disabled()
    page.unroute("**/v1/rounds/R1")
    expect()(page.locator("li.venue[data-venue=V02] .venue-stock")).to_have_text("已抢光")
    assert my_coupons(serve, member_headers("m-late")) == []
    # Campaign quota 2 (round quota 3): the third grab is refused, and said so.
    quota_text = "本次活动每人最多领 2 张券，您已领满（退券不退还领券名额）。"
    for expected in ("抢到了", "抢到了", quota_text):
        expect()(grab_button(page, "V01")).to_be_enabled()
        grab_button(page, "V01").click()
        expect()(page.locator("#notice")).to_contain_text(expected)
    assert len(my_coupons(serve, member_headers("m-late"))) == 2
    expect()(page.locator("li.coupon")).to_have_count(2)
    finish(page, watch, tmp_path)


def test_void_asks_first_and_says_the_quota_is_not_given_back(
        member_engine: Serve, phone: Any, tmp_path: Path) -> None:
    serve = member_engine
    wait_open(serve)
    headers = member_headers("m-void")
    granted = serve.post("/v1/rounds/R1/grab", {"venue_id": "V03"}, headers)
    assert granted.status == 201
    code = granted.json()["coupon"]["code"]
    page, watch = open_page(phone(), member_url(serve, "m-void"))
    card = page.locator(f"li.coupon[data-code='{code}']")
    expect()(card.locator("img.qr")).to_be_visible()
    card.locator("button.void").click()
    dialog = page.locator(".dialog-box")
    expect()(dialog).to_contain_text("退券不退还您的领券名额")
    expect()(dialog).to_contain_text("这张券会退回场馆")
    page.locator("#dialog-cancel").click()
    expect()(dialog).to_have_count(0)
    assert my_coupons(serve, headers)[0]["status"] == "issued"
    card.locator("button.void").click()
    page.locator("#dialog-ok").click()
    expect()(page.locator("#notice")).to_contain_text("已退券")
    expect()(card.locator(".badge")).to_have_text("已退券")
    expect()(card.locator("img.qr")).to_have_count(0)
    assert my_coupons(serve, headers)[0]["status"] == "void"
    stats = serve.get("/v1/admin/rounds/R1/stats", bearer(ADMIN)).json()
    v03 = [v for v in stats["venues"] if v["venue_id"] == "V03"][0]
    assert v03["void"] == 1 and v03["returned_open"] == 1
    finish(page, watch, tmp_path)


def test_configured_secrets_offer_no_demo_sign_in(member_engine: Serve, phone: Any,
                                                 tmp_path: Path) -> None:
    serve = member_engine
    assert serve.post("/v1/demo/sign-in", {"member_id": "x"}).status == 404
    page, watch = open_page(phone(), serve.base + "/")
    expect()(page.locator("#signin")).to_be_visible()
    assert page.locator("#demo-form").count() == 0
    assert "demo" not in page.content().lower()
    expect()(grab_button(page, "V01")).to_be_disabled()
    finish(page, watch, tmp_path)


def test_first_load_weight_and_requests(member_engine: Serve, venue_engine: Serve,
                                        phone: Any, tmp_path: Path) -> None:
    """What a million phones fetch at once: measured, bounded, printed (docs/pages.md)."""
    results = {}
    for name, url in (("member", member_url(member_engine, "m-weight")),
                      ("venue", venue_engine.base + "/venue/")):
        ctx = phone()
        page = ctx.new_page()
        watch = Watch(page)
        seen: list[Any] = []
        page.on("requestfinished", lambda r, seen=seen: seen.append(r))
        page.goto(url)
        page.locator("body[data-ready='1']").wait_for()
        page.wait_for_load_state("networkidle")
        sizes = [(r.url, r.sizes()) for r in seen]
        static = [s for u, s in sizes if "/v1/" not in u]
        results[name] = {
            "requests": len(sizes), "static_requests": len(static),
            "bytes": sum(s["responseBodySize"] + s["responseHeadersSize"] for _, s in sizes),
            "static_bytes": sum(s["responseBodySize"] + s["responseHeadersSize"]
                                for s in static),
            "urls": [re.sub(r"^https?://[^/]+", "", u) for u, _ in sizes]}
        finish(page, watch, tmp_path, name)
    print(results)
    (tmp_path / "weight.txt").write_text(repr(results))
    assert results["member"]["static_requests"] == 3  # the page, its script, its styles
    assert results["member"]["static_bytes"] < 30_000, results["member"]
    assert results["venue"]["static_requests"] == 4  # and the vendored decoder
    assert results["venue"]["static_bytes"] < 90_000, results["venue"]


def test_polling_is_at_most_every_second_and_stops_hidden_or_sold_out(
        browser: Any, phone: Any, tmp_path_factory: pytest.TempPathFactory,
        tmp_path: Path) -> None:
    now = _iso_now()
    serve = Serve(tmp_path_factory.mktemp("poll-engine"), campaign_toml(
        quota=3, venues=("V01", "V02"), rounds=[{
            "id": "R1", "opens": now - timedelta(minutes=5), "closes": now + timedelta(hours=1),
            "quota": 1, "stock": {"V01": 1, "V02": 1}}]),
        {"COUPON_MEMBER_JWT_SECRET": SECRET, "COUPON_ADMIN_TOKEN": ADMIN}).start()
    try:
        page, watch = open_page(phone(), serve.base + "/")
        polls: list[float] = []
        page.on("request", lambda r: polls.append(time.monotonic())
                if r.url.endswith("/v1/rounds/R1") else None)
        # Playwright delivers events while it waits, so wait through it, not time.sleep.
        page.wait_for_timeout(5000)
        gaps = [b - a for a, b in zip(polls, polls[1:])]
        assert 3 <= len(polls) <= 5, polls
        assert min(gaps) >= 0.95, gaps  # at most once a second, jittered
        # Hidden (as the browser tells a page its tab went away): no polls at all. Right
        # after a poll, so the next one is due within the 3 s watched.
        with page.expect_request(lambda r: r.url.endswith("/v1/rounds/R1")):
            pass
        page.wait_for_timeout(100)
        page.evaluate("""Object.defineProperty(document, 'hidden',
                             {configurable: true, get: () => true});
                         document.dispatchEvent(new Event('visibilitychange'))""")
        n = len(polls)
        page.wait_for_timeout(3000)
        assert len(polls) == n, "polled while hidden"
        page.evaluate("""Object.defineProperty(document, 'hidden',
                             {configurable: true, get: () => false});
                         document.dispatchEvent(new Event('visibilitychange'))""")
        page.wait_for_timeout(2500)
        assert len(polls) > n, "did not resume when shown again"
        # Hidden while a poll is on its way: its answer must not schedule another.
        page.evaluate("""(() => {
            const real = window.fetch;
            window.fetch = function (url, init) {
                const p = real.call(this, url, init);
                if (String(url).endsWith('/v1/rounds/R1') && !window.hidOnce) {
                    window.hidOnce = true;
                    Object.defineProperty(document, 'hidden',
                                          {configurable: true, get: () => true});
                    document.dispatchEvent(new Event('visibilitychange'));
                }
                return p;
            };
        })()""")
        page.wait_for_timeout(2000)  # the next poll goes out, and the page hides
        assert page.evaluate("window.hidOnce === true")
        n = len(polls)
        page.wait_for_timeout(3000)
        assert len(polls) == n, "a poll answered while hidden scheduled another"
        page.evaluate("""Object.defineProperty(document, 'hidden',
                             {configurable: true, get: () => false});
                         document.dispatchEvent(new Event('visibilitychange'))""")
        # Every venue sold out: the page says so and stops asking.
        for member, venue in (("p1", "V01"), ("p2", "V02")):
            assert serve.post("/v1/rounds/R1/grab", {"venue_id": venue},
                              member_headers(member)).status == 201
        expect()(page.locator("#countdown")).to_have_text("第 R1 场的券已全部抢光")
        for venue in ("V01", "V02"):
            expect()(grab_button(page, venue)).to_have_text("已抢光")
        n = len(polls)
        page.wait_for_timeout(3500)
        assert len(polls) == n, "polled after every venue sold out"
        finish(page, watch, tmp_path)
    finally:
        serve.stop()


# --- the demo sign-in (development secrets) -----------------------------------------

def test_demo_sign_in_then_grab_and_the_round_quota(venue_engine: Serve, phone: Any,
                                                   tmp_path: Path) -> None:
    page, watch = open_page(phone(), venue_engine.base + "/")
    page.locator("#demo-member").fill("demo-1")
    page.locator("#demo-submit").click()
    expect()(page.locator("#member-id")).to_have_text("会员 demo-1")
    expect()(page.locator("#signin")).to_be_hidden()
    grab_button(page, "V01").click()
    expect()(page.locator("#notice")).to_contain_text("抢到了")
    expect()(grab_button(page, "V02")).to_be_enabled()
    grab_button(page, "V02").click()
    expect()(page.locator("#notice")).to_have_text("本场每人限抢 1 张，您已抢满，请等下一场。")
    expect()(page.locator("li.coupon")).to_have_count(1)
    # The token the page got works on the API as that member.
    token = page.evaluate("localStorage.getItem('ce.memberToken')")
    coupons = my_coupons(venue_engine, bearer(token))
    assert [c["member_id"] for c in coupons] == ["demo-1"]
    page.locator("#sign-out").click()
    expect()(page.locator("#demo-form")).to_be_visible()
    assert page.evaluate("localStorage.getItem('ce.memberToken')") is None
    finish(page, watch, tmp_path)


# --- the venue page -----------------------------------------------------------------

def demo_coupon(serve: Serve, member: str, venue: str) -> str:
    token = serve.post("/v1/demo/sign-in", {"member_id": member}).json()["token"]
    granted = serve.post("/v1/rounds/R1/grab", {"venue_id": venue}, bearer(token))
    assert granted.status == 201, granted.body
    return granted.json()["coupon"]["code"]


def coupon_status(serve: Serve, member: str) -> list[dict[str, Any]]:
    token = serve.post("/v1/demo/sign-in", {"member_id": member}).json()["token"]
    return my_coupons(serve, bearer(token))


@pytest.fixture(scope="module")
def venue_key(venue_engine: Serve) -> str:
    return venue_engine.cli("token", "venue", "V01")


def answer(page: Any) -> Any:
    return page.locator("#answer")


def test_scanning_redeems_and_the_same_code_again_is_refused(
        venue_engine: Serve, venue_key: str, camera: Path, phone: Any,
        tmp_path: Path) -> None:
    serve = venue_engine
    code = demo_coupon(serve, "scan-1", "V01")
    write_y4m(camera, code)
    ctx = phone(permissions=["camera"])
    page, watch = open_page(ctx, serve.base + "/venue/")
    # The key, typed once.
    page.locator("#key-input").fill(venue_key)
    page.locator("#key-submit").click()
    expect()(page.locator("#venue-name")).to_have_text("场馆V01")
    # The camera reads the member's QR: the coupon is shown, redeemed with one tap.
    expect()(answer(page)).to_have_class(re.compile(r"\bask\b"))
    expect()(answer(page)).to_contain_text(code)
    assert coupon_status(serve, "scan-1")[0]["status"] == "issued"  # looked, not redeemed
    page.locator("#redeem").click()
    expect()(answer(page)).to_have_class(re.compile(r"\bok\b"))
    expect()(page.locator("#answer-title")).to_have_text("核销成功")
    redeemed = coupon_status(serve, "scan-1")[0]
    assert redeemed["status"] == "redeemed"
    expect()(page.locator("#today-count")).to_have_text("1")
    expect()(page.locator(f"#today li[data-code='{code}']")).to_have_count(1)
    page.screenshot(path=str(tmp_path / "green.png"))
    watch.assert_clean()
    page.close()
    # The same video again, on a new page (the key stays on the device): red, with the time.
    page, watch = open_page(ctx, serve.base + "/venue/")
    expect()(answer(page)).to_have_class(re.compile(r"\bbad\b"))
    expect()(page.locator("#answer-title")).to_have_text("此券已核销")
    when = datetime.fromisoformat(redeemed["redeemed_at"])
    expect()(answer(page)).to_contain_text(when.strftime("%H:%M:%S"))
    finish(page, watch, tmp_path)


def test_another_venues_coupon_is_refused_as_wrong_venue(
        venue_engine: Serve, venue_key: str, camera: Path, phone: Any,
        tmp_path: Path) -> None:
    serve = venue_engine
    code = demo_coupon(serve, "scan-2", "V02")
    write_y4m(camera, code)
    page, watch = open_page(phone(permissions=["camera"]), f"{serve.base}/venue/#key={venue_key}")
    assert "#key" not in page.url  # handed over, kept, and gone from the address bar
    expect()(answer(page)).to_have_class(re.compile(r"\bbad\b"))
    expect()(page.locator("#answer-title")).to_have_text("非本场馆的券")
    assert coupon_status(serve, "scan-2")[0]["status"] == "issued"
    finish(page, watch, tmp_path)


def test_typed_codes_are_forgiven_immediate_mode_void_and_sign_out(
        venue_engine: Serve, venue_key: str, camera: Path, phone: Any,
        tmp_path: Path) -> None:
    serve = venue_engine
    write_y4m(camera, None)  # nothing in front of the camera
    typed = demo_coupon(serve, "type-1", "V01")
    page, watch = open_page(phone(permissions=["camera"]), f"{serve.base}/venue/#key={venue_key}")
    expect()(page.locator("#venue-name")).to_have_text("场馆V01")
    before = int(page.locator("#today-count").text_content() or 0)
    sloppy = " ".join(typed.replace("-", "")[i:i + 4] for i in range(0, 17, 4)).lower()
    page.locator("#manual-code").fill(sloppy)
    page.locator("#manual-submit").click()
    expect()(answer(page)).to_have_class(re.compile(r"\bask\b"))
    page.locator("#redeem").click()
    expect()(page.locator("#answer-title")).to_have_text("核销成功")
    assert coupon_status(serve, "type-1")[0]["status"] == "redeemed"
    page.locator("#answer-dismiss").click()
    # Immediate mode: no question asked.
    page.locator("#mode-immediate").check()
    second = demo_coupon(serve, "type-2", "V01")
    page.locator("#manual-code").fill(second)
    page.locator("#manual-submit").click()
    expect()(page.locator("#answer-title")).to_have_text("核销成功")
    assert coupon_status(serve, "type-2")[0]["status"] == "redeemed"
    expect()(page.locator("#today-count")).to_have_text(str(before + 2))
    page.locator("#answer-dismiss").click()
    page.screenshot(path=str(tmp_path / "scanner.png"), full_page=True)
    # A coupon its member handed back, and a code that does not exist.
    voided = demo_coupon(serve, "type-3", "V01")
    token = serve.post("/v1/demo/sign-in", {"member_id": "type-3"}).json()["token"]
    assert call("DELETE", f"{serve.base}/v1/me/coupons/{voided}", None,
                bearer(token)).status == 200
    page.locator("#manual-code").fill(voided)
    page.locator("#manual-submit").click()
    expect()(page.locator("#answer-title")).to_have_text("此券已作废")
    page.locator("#answer-dismiss").click()
    page.locator("#manual-code").fill(codes.display(codes.new_code()))
    page.locator("#manual-submit").click()
    expect()(page.locator("#answer-title")).to_have_text("查无此券")
    page.locator("#answer-dismiss").click()
    # Sign out, confirmed: the key is gone from the device.
    page.locator("#sign-out").click()
    page.locator("#dialog-ok").click()
    expect()(page.locator("#key-form")).to_be_visible()
    assert page.evaluate("localStorage.getItem('ce.venueKey')") is None
    finish(page, watch, tmp_path)
