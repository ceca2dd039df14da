"""`coupon-engine report` on the ledger of a real burst: `serve` as a process, a
round opening with small stock lines, concurrent grabs, voids, redemptions and a
settlement, then `archive`, then the report on a copy of the ledger with Redis
down. Every number of every CSV is recomputed here with SQL on the ledger, and
the HTML page is rendered in headless Chromium."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from conftest import iso
from test_serve import free_port, http, wait_ready

from engine import campaign as cmp
from engine.auth import mint_member_token
from engine.ledger import Ledger, report
from engine.store.embedded import EmbeddedRedis

CLI = [sys.executable, "-m", "engine.cli"]
SECRET = "report-test-member-secret-0123456789"
TZ = ZoneInfo("Asia/Shanghai")
# 12 venues: more than report.TOP_VENUES, so the curve sums the smallest ones.
VENUES = [(f"V{i:02d}", f"场馆{i:02d}", kind, city, stock) for i, (kind, city, stock) in
          enumerate([("ski", "吉林市", 14), ("ski", "长春市", 12), ("skating", "长春市", 10),
                     ("hot_spring", "延吉市", 9), ("snow_park", "吉林市", 8),
                     ("scenic", "白山市", 7), ("ski", "白山市", 6), ("skating", "吉林市", 5),
                     ("hot_spring", "长春市", 4), ("scenic", "延吉市", 3),
                     ("snow_park", "白山市", 3), ("ski", "吉林市", 200)], start=1)]
OPEN_DELAY_S = 4
MEMBERS = 90
QUOTA = 3


def campaign_text(now: datetime) -> str:
    opens = now + timedelta(seconds=OPEN_DELAY_S)
    out = ["[campaign]", 'id = "report-c"', 'name = "冰雪季·惠职工 测试"',
           'timezone = "Asia/Shanghai"', "budget_fen = 10_000_000", "face_value_fen = 10000",
           "member_price_fen = 100", "settlement_fen = 9900",
           f"member_campaign_quota = {QUOTA}", ""]
    for vid, name, kind, city, _ in VENUES:
        out += ["[[venues]]", f'id = "{vid}"', f'name = "{name}"', f'kind = "{kind}"',
                f'city = "{city}"', ""]
    for rid, o, c, stock in (
            ("R1", opens, opens + timedelta(hours=1), {v[0]: v[4] for v in VENUES}),
            ("R2", opens + timedelta(hours=2), opens + timedelta(hours=3), {"V01": 5})):
        out += ["[[rounds]]", f'id = "{rid}"', f"opens_at = {iso(o)}", f"closes_at = {iso(c)}",
                f"member_round_quota = {QUOTA}", f"valid_from = {iso(o - timedelta(hours=1))}",
                f"valid_until = {iso(c + timedelta(days=30))}", "[rounds.stock]",
                *[f"{v} = {n}" for v, n in stock.items()], ""]
    return "\n".join(out)


def env_for(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COUPON_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(COUPON_DATA_DIR=str(data), COUPON_MEMBER_JWT_SECRET=SECRET,
               COUPON_MEMBER_RATE="1000", COUPON_MEMBER_BURST="1000")
    return env


async def burst(base: str, opens_ms: int, redis_url: str) -> list[tuple[str, str, str]]:
    """Every member taps up to QUOTA venues at once as the round opens; returns
    (member, venue, code) of each coupon granted."""
    import redis.asyncio as aioredis
    rnd = random.Random(17)
    client = aioredis.Redis.from_url(redis_url)
    while True:
        sec, usec = await client.time()
        if sec * 1000 + usec // 1000 >= opens_ms + 50:
            break
        await asyncio.sleep(0.02)
    await client.aclose()
    granted: list[tuple[str, str, str]] = []
    weights = [v[4] for v in VENUES[:-1]]
    conn = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(base, connector=conn) as s:
        async def member(i: int) -> None:
            m = f"m{i:03d}"
            headers = {"Authorization": "Bearer " + mint_member_token(SECRET, m, 3600)}
            # The small venues are what everybody wants; V12 (200 coupons) is the fallback.
            picks = rnd.choices([v[0] for v in VENUES[:-1]], weights, k=QUOTA)
            if i % 4 == 0:
                picks[-1] = "V12"
            for v in picks:
                async with s.post("/v1/rounds/R1/grab", json={"venue_id": v},
                                  headers=headers) as r:
                    body = await r.json()
                    if r.status == 201:
                        granted.append((m, v, body["coupon"]["code"]))
                    else:
                        assert r.status in (409, 410), body
        await asyncio.gather(*(member(i) for i in range(MEMBERS)))
    return granted


@pytest.fixture(scope="module")
def burst_ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A ledger made by a real burst against `serve` (embedded Redis, archiver inside),
    copied away after `serve` stopped: Redis is down when the report runs."""
    tmp = tmp_path_factory.mktemp("burst")
    data, port = tmp / "var", free_port()
    probe = EmbeddedRedis(tmp / "clock")
    probe.start()
    try:
        import redis
        sec, usec = redis.Redis.from_url(probe.url).time()
    finally:
        probe.stop()
    now = datetime.fromtimestamp(sec + usec / 1e6, tz=UTC)
    text = campaign_text(now)
    camp = tmp / "c.toml"
    camp.write_text(text, encoding="utf-8")
    c = cmp.parse_campaign(text)
    env = env_for(data)
    base = f"http://127.0.0.1:{port}"
    with (tmp / "serve.log").open("wb") as log:
        proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2",
                                 "--campaign", str(camp)], env=env, stderr=log)
    try:
        wait_ready(base, proc)
        url = f"unix://{(data / 'redis' / 'redis.sock').resolve()}"
        granted = asyncio.run(burst(base, c.round("R1").opens_at_ms, url))
        assert len(granted) > 100
        run = lambda *a: subprocess.run([*CLI, *a], env=env, check=True,  # noqa: E731
                                        capture_output=True, text=True).stdout.strip()
        # Voids while the round is open (the stock goes back on sale) ...
        member = lambda m: {"Authorization": "Bearer " + mint_member_token(SECRET, m, 3600)}  # noqa: E731
        voided = granted[:: 9][:8]
        for m, _, code in voided:
            assert http("DELETE", f"{base}/v1/me/coupons/{code}", headers=member(m))[0] == 200
        # ... and taken again by latecomers.
        for i, (_, v, _) in enumerate(voided[:4]):
            st, body = http("POST", f"{base}/v1/rounds/R1/grab", {"venue_id": v},
                            {**member(f"late{i}"), "Content-Type": "application/json"})
            assert st == 201, body
        # Redemptions at three venues, some of them settled.
        keep = [g for g in granted if g not in voided]
        redeemed = []
        for vid in ("V01", "V02", "V12"):
            key = {"Authorization": "Bearer " + run("token", "venue", vid),
                   "Content-Type": "application/json"}
            for _, _, code in [g for g in keep if g[1] == vid][:5]:
                st, body = http("POST", f"{base}/v1/venue/redemptions", {"code": code}, key)
                assert st == 200, body
                redeemed.append((vid, code, body["coupon"]["redeemed_at"]))
        claims = tmp / "claims.csv"
        claims.write_text("code,redeemed_at,amount_fen\n" + "".join(
            f"{code},{at},10000\n" for vid, code, at in redeemed if vid == "V01"))
        run("archive")
        run("settle", "--venue", "V01", "--claims", str(claims), "--out", str(tmp / "settle"))
        run("archive")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, (tmp / "serve.log").read_text()
    copy = tmp / "copy"
    copy.mkdir()
    for f in data.glob("ledger.sqlite3*"):
        shutil.copy(f, copy / f.name)
    yield {"data": copy, "campaign": c, "granted": granted, "tmp": tmp}


def read_csv(path: Path) -> list[dict[str, str]]:
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf"), f"{path.name} has no BOM"
    return list(csv.DictReader(io.StringIO(raw[3:].decode("utf-8"))))


def run_report(data: Path, out: Path, *extra: str, env_extra: dict | None = None
               ) -> subprocess.CompletedProcess:
    env = env_for(data)
    env.update(env_extra or {})
    return subprocess.run([*CLI, "report", "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=120)


def ms_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def test_report_numbers_equal_the_ledger(burst_ledger: dict, tmp_path: Path) -> None:
    data, c = burst_ledger["data"], burst_ledger["campaign"]
    out = tmp_path / "out"
    # Redis is down and the configured URL leads nowhere: the report never asks it.
    p = run_report(data, out, env_extra={"COUPON_REDIS_URL": f"redis://127.0.0.1:{free_port()}"})
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # not a terminal: no progress lines
    assert "第 R1 轮" in p.stdout and "Round R1" in p.stdout
    for f in ("report.html", "summary.json", *(f"{n}.png" for n, _ in report.FIGURES)):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not list(out.glob(".report-*"))
    db = sqlite3.connect(data / "ledger.sqlite3")
    r1 = c.round("R1")
    opens = r1.opens_at_ms
    venues = {v.id: v for v in c.venues}

    def one(sql: str, *args: object) -> int:
        return db.execute(sql, args).fetchone()[0]

    # Sell-out times: walk each line's grants and open-round voids in stream order.
    rows = db.execute("SELECT event_id, venue_id, type, at_ms FROM events WHERE round_id = 'R1'"
                      " AND (type = 'grant' OR (type = 'void' AND restocked = 1))").fetchall()
    rows.sort(key=lambda r: ms_key(r[0]))
    left, sold_at = dict(r1.stock), {}
    for _, vid, etype, at in rows:
        left[vid] += -1 if etype == "grant" else 1
        if etype == "grant" and left[vid] == 0 and vid not in sold_at:
            sold_at[vid] = at
    times = read_csv(out / "sellout_times.csv")
    assert len(sold_at) >= 8, "the burst should sell most lines out"
    assert [t["venue_id"] for t in times] == sorted(
        r1.stock, key=lambda v: (v not in sold_at, sold_at.get(v, 0), v))
    for t in times:
        vid = t["venue_id"]
        assert (t["name"], t["kind"], t["city"]) == (venues[vid].name, venues[vid].kind,
                                                      venues[vid].city)
        assert int(t["stock"]) == r1.stock[vid]
        assert int(t["granted"]) == one("SELECT count(*) FROM events WHERE type = 'grant'"
                                        " AND round_id = 'R1' AND venue_id = ?", vid)
        if vid in sold_at:
            assert t["sold_out_after_s"] == f"{(sold_at[vid] - opens) / 1000:.3f}"
            assert datetime.fromisoformat(t["sold_out_at"]) == datetime.fromtimestamp(
                sold_at[vid] / 1000, TZ)
        else:
            assert t["sold_out_after_s"] == t["sold_out_at"] == ""

    # The curve: cumulative grants per venue at each instant of the CSV.
    curve = read_csv(out / "sellout_curve.csv")
    cols = list(curve[0])
    assert cols[0] == "seconds_since_open" and cols[-1] == "total"
    assert sorted(cols[1:-1]) == sorted(r1.stock)
    last_grant = one("SELECT max(at_ms) FROM events WHERE type = 'grant' AND round_id = 'R1'")
    assert float(curve[-1]["seconds_since_open"]) * 1000 >= last_grant - opens
    for row in curve:
        t_ms = round(float(row["seconds_since_open"]) * 1000)
        got = dict(db.execute(
            "SELECT venue_id, count(*) FROM events WHERE type = 'grant' AND round_id = 'R1'"
            " AND at_ms - ? <= ? GROUP BY venue_id", (opens, t_ms)).fetchall())
        for vid in r1.stock:
            assert int(row[vid]) == got.get(vid, 0), (t_ms, vid)
        assert int(row["total"]) == sum(got.values())

    # The first minute, second by second.
    per_s = dict(db.execute("SELECT (at_ms - ?) / 1000, count(*) FROM events WHERE type ="
                            " 'grant' AND round_id = 'R1' GROUP BY 1", (opens,)).fetchall())
    burst_rows = read_csv(out / "burst.csv")
    assert [int(b["second"]) for b in burst_rows] == list(range(60))
    assert [int(b["grants"]) for b in burst_rows] == [per_s.get(s, 0) for s in range(60)]
    assert sum(int(b["grants"]) for b in burst_rows) > 100

    # Kinds and cities, in the round and over the campaign.
    by_venue_round = dict(db.execute("SELECT venue_id, count(*) FROM events WHERE type ="
                                     " 'grant' AND round_id = 'R1' GROUP BY venue_id"))
    by_venue_all = dict(db.execute("SELECT venue_id, count(*) FROM events WHERE type ="
                                   " 'grant' GROUP BY venue_id"))
    for name, attr in (("coupons_by_kind", "kind"), ("coupons_by_city", "city")):
        got_rows = read_csv(out / f"{name}.csv")
        want_keys = {getattr(v, attr) for v in c.venues}
        assert {g[attr] for g in got_rows} == want_keys
        for g in got_rows:
            vs = [v.id for v in c.venues if getattr(v, attr) == g[attr]]
            assert int(g["issued_in_round"]) == sum(by_venue_round.get(v, 0) for v in vs)
            assert int(g["issued_in_campaign"]) == sum(by_venue_all.get(v, 0) for v in vs)

    # Members by coupons received over the campaign.
    dist = dict(db.execute("SELECT n, count(*) FROM (SELECT member_id, count(*) n FROM events"
                           " WHERE type = 'grant' GROUP BY member_id) GROUP BY n"))
    members = read_csv(out / "members_by_coupons.csv")
    assert [int(m["coupons"]) for m in members] == [1, 2, 3]
    assert {int(m["coupons"]): int(m["members"]) for m in members} == \
        {n: dist.get(n, 0) for n in (1, 2, 3)}
    assert all(dist.get(n) for n in (1, 2, 3)), dist

    # Redemption per venue: issued, voids, returned stock, shares.
    red = read_csv(out / "redemption_by_venue.csv")
    assert [r["venue_id"] for r in red] == [v.id for v in c.venues] + ["TOTAL"]
    tot = dict.fromkeys(("issued", "void", "returned_open", "returned_closed", "redeemed"), 0)
    for r in red[:-1]:
        vid = r["venue_id"]
        want = {
            "issued": one("SELECT count(*) FROM events WHERE type = 'grant' AND venue_id = ?", vid),
            "void": one("SELECT count(*) FROM events WHERE type = 'void' AND venue_id = ?", vid),
            "returned_open": one("SELECT count(*) FROM events WHERE type = 'void' AND"
                                 " restocked = 1 AND venue_id = ?", vid),
            "returned_closed": one("SELECT count(*) FROM events WHERE type = 'void' AND"
                                   " restocked = 0 AND venue_id = ?", vid),
            "redeemed": one("SELECT count(*) FROM events WHERE type = 'redeem' AND"
                            " venue_id = ?", vid)}
        assert {k: int(r[k]) for k in want} == want, vid
        for k in tot:
            tot[k] += want[k]
        i, v_, rd = want["issued"], want["void"], want["redeemed"]
        assert r["redeemed_share_of_issued"] == (f"{rd / i:.4f}" if i else "")
        assert r["redeemed_share_of_live"] == (f"{rd / (i - v_):.4f}" if i - v_ else "")
    assert {k: int(red[-1][k]) for k in tot} == tot
    assert tot["redeemed"] == 15 and tot["void"] == 8 and tot["returned_open"] == 8

    # By week (Monday, campaign time): SQLite's own calendar.
    weeks = dict((w, (i, v_, rd)) for w, i, v_, rd in db.execute(
        "SELECT date(at_ms / 1000, 'unixepoch', '+8 hours', '-6 days', 'weekday 1') w,"
        " sum(type = 'grant'), sum(type = 'void'), sum(type = 'redeem') FROM events GROUP BY w"))
    wk = read_csv(out / "redemption_by_week.csv")
    assert [w["week_start"] for w in wk] == sorted(weeks)
    cum_i = cum_r = 0
    for w in wk:
        i, v_, rd = weeks[w["week_start"]]
        cum_i, cum_r = cum_i + i, cum_r + rd
        assert (int(w["issued"]), int(w["void"]), int(w["redeemed"]),
                int(w["cumulative_issued"]), int(w["cumulative_redeemed"])) == \
            (i, v_, rd, cum_i, cum_r)
        assert w["cumulative_redeemed_share"] == f"{cum_r / cum_i:.4f}"

    # The budget, in fen and in yuan.
    issued = one("SELECT count(*) FROM events WHERE type = 'grant'")
    void = one("SELECT count(*) FROM events WHERE type = 'void'")
    redeemed = one("SELECT count(*) FROM events WHERE type = 'redeem'")
    settled = one("SELECT coalesce(sum(amount_fen), 0) FROM settlements")
    assert settled == 5 * 9900
    want_fen = {"budget": c.budget_fen, "committed": (issued - void) * 9900,
                "redeemed": redeemed * 9900, "settled": settled,
                "remaining": c.budget_fen - (issued - void) * 9900}
    budget = {b["item"]: b for b in read_csv(out / "budget.csv")}
    assert list(budget) == list(want_fen)
    for item, fen in want_fen.items():
        assert int(budget[item]["fen"]) == fen
        assert budget[item]["yuan"] == f"{fen // 100}.{fen % 100:02d}"
        assert budget[item]["share_of_budget"] == f"{fen / c.budget_fen:.4f}"

    # The summary.
    s = json.loads((out / "summary.json").read_text("utf-8"))
    assert s["round_id"] == "R1"
    assert s["coupons"] == one("SELECT count(*) FROM events WHERE type = 'grant'"
                               " AND round_id = 'R1'")
    assert s["members"] == one("SELECT count(DISTINCT member_id) FROM events WHERE type ="
                               " 'grant' AND round_id = 'R1'")
    assert s["venues_sold_out"] == len(sold_at)
    assert s["first_sold_out_after_s"] == round((min(sold_at.values()) - opens) / 1000, 3)
    assert (s["redeemed"], s["issued"]) == (redeemed, issued)
    html_text = (out / "report.html").read_text("utf-8")
    zh, en = report.summary_text(s)
    assert zh in html_text.replace("&#x27;", "'") and en in html_text.replace("&#x27;", "'")
    assert f"共发放 {s['coupons']:,} 张券" in zh and f"{s['members']:,} 名会员" in zh


def test_report_renders_in_chromium(burst_ledger: dict, tmp_path: Path) -> None:
    """The page opens offline in a real browser, every figure loads, Chinese shows."""
    pytest.importorskip("playwright")
    chromium = shutil.which("chromium")
    if chromium is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed")
    out = tmp_path / "out"
    assert run_report(burst_ledger["data"], out).returncode == 0
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox"])
        try:
            ctx = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
            page = ctx.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "report.html").as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("""() => [...document.images].map(i => ({
                alt: i.alt, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth,
                src: i.src.slice(0, 22)}))""")
            assert len(images) == len(report.FIGURES)
            broken = [i for i in images if not i["ok"]]
            assert broken == []
            assert all(i["src"] == "data:image/png;base64," and i["w"] > 500 for i in images)
            # Nothing but the page itself (and its data URIs) was fetched.
            assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
            text = page.inner_text("body")
            assert "售罄曲线" in text and "Sell-out curve" in text and "第 R1 轮" in text
            # Chinese glyphs take space (no zero-width missing-glyph boxes).
            width = page.evaluate("""() => { const s = document.createElement('span');
                s.textContent = '冰雪季惠职工'; document.body.appendChild(s);
                return s.getBoundingClientRect().width; }""")
            assert width > 40
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 50_000
            if os.environ.get("COUPON_REPORT_SCREENSHOT"):
                page.screenshot(path=os.environ["COUPON_REPORT_SCREENSHOT"])
        finally:
            browser.close()


def test_report_refuses_bad_input(burst_ledger: dict, tmp_path: Path) -> None:
    data = burst_ledger["data"]
    out = tmp_path / "out"
    p = run_report(data, out, "--round", "R9")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "R9" in p.stderr, p.stderr
    assert not out.exists() or not any(out.iterdir())
    empty = tmp_path / "empty"
    p = run_report(empty, out)
    assert p.returncode == 2 and "no ledger" in p.stderr and p.stderr.count("\n") == 1
    assert not (empty / "ledger.sqlite3").exists()
    Ledger(tmp_path / "blank" / "ledger.sqlite3").close()
    p = run_report(tmp_path / "blank", out)
    assert p.returncode == 2 and "no campaign" in p.stderr and p.stderr.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())
    # A round that granted nothing yet is reported as such.
    p = run_report(data, out, "--round", "R2")
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "summary.json").read_text("utf-8"))
    assert (s["round_id"], s["coupons"], s["venues_sold_out"]) == ("R2", 0, 0)
    assert "均未售罄" in p.stdout


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_only(burst_ledger: dict, tmp_path: Path) -> None:
    path = burst_ledger["data"] / "ledger.sqlite3"
    term = Terminal()
    report.run(path, None, tmp_path / "a", stream=term)
    n = sqlite3.connect(path).execute("SELECT count(*) FROM events").fetchone()[0]
    assert f"reading the ledger's events: {n:,} / {n:,}" in term.getvalue()
    assert f"read {n:,} events" in term.getvalue() and "drew 8 figures" in term.getvalue()
    quiet = io.StringIO()
    report.run(path, None, tmp_path / "b", stream=quiet)
    assert quiet.getvalue() == ""


def test_markers_are_drawn_where_the_curve_asks() -> None:
    """The hook the operator controls' audit events will use."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots()
    report.draw_markers(ax, [(3.5, "pause"), (9.0, "resume")])
    xs = sorted(line.get_xdata()[0] for line in ax.get_lines())
    assert xs == [3.5, 9.0]
    assert [t.get_text() for t in ax.texts] == ["pause", "resume"]
    plt.close(fig)


def test_sell_out_counts_returned_stock_and_weeks_start_on_monday(tmp_path: Path) -> None:
    """A void while the round is open puts the coupon back on sale: the line sells out
    at the grant that takes the returned one. Weeks are Mondays in campaign time."""
    now = datetime(2024, 12, 20, 2, 0, tzinfo=UTC)   # Friday 10:00 in Shanghai
    c = cmp.parse_campaign(campaign_text(now - timedelta(seconds=OPEN_DELAY_S)))
    opens = c.round("R1").opens_at_ms
    v10 = "V10"  # stock 3

    def ev(i: int, etype: str, at: int, member: str, code: str, **extra: str) -> tuple:
        return (f"{at}-{i}", {"type": etype, "code": code, "round": "R1", "venue": v10,
                              "member": member, "at": str(at), **extra})
    day = 86_400_000
    events = [ev(0, "grant", opens + 100, "a", "C1", idem=""),
              ev(1, "grant", opens + 200, "b", "C2", idem=""),
              ev(2, "void", opens + 300, "b", "C2", restocked="1"),
              ev(3, "grant", opens + 400, "c", "C3", idem=""),
              ev(4, "grant", opens + 500, "d", "C4", idem=""),     # the 3rd live coupon
              ev(5, "redeem", opens + 3 * day, "a", "C1"),        # Monday 10:00 local
              ev(6, "redeem", opens + 2 * day + 13 * 3_600_000 + 59 * 60_000, "c", "C3")]
    # ... the last one Sunday 23:59 local: still the week of the 16th.
    path = tmp_path / "var" / "ledger.sqlite3"
    with Ledger(path) as led:
        led.save_campaign(c)
        led.insert_events(c.id, events)
    rep = report.run(path, None, tmp_path / "out")
    times = {t["venue_id"]: t for t in read_csv(tmp_path / "out" / "sellout_times.csv")}
    assert times[v10]["sold_out_after_s"] == "0.500"
    assert times[v10]["granted"] == "4"
    assert rep["venues_sold_out"] == 1 and rep["first_sold_out_after_s"] == 0.5
    # Grants exactly on a row's instant count in that row.
    curve = read_csv(tmp_path / "out" / "sellout_curve.csv")
    assert [(row["seconds_since_open"], row[v10], row["total"]) for row in curve] == [
        ("0.000", "0", "0"), ("0.100", "1", "1"), ("0.200", "2", "2"), ("0.300", "2", "2"),
        ("0.400", "3", "3"), ("0.500", "4", "4")]
    weeks = read_csv(tmp_path / "out" / "redemption_by_week.csv")
    assert [(w["week_start"], w["issued"], w["void"], w["redeemed"]) for w in weeks] == \
        [("2024-12-16", "4", "1", "1"), ("2024-12-23", "0", "0", "1")]
    assert weeks[-1]["cumulative_redeemed_share"] == "0.5000"
    budget = {b["item"]: b for b in read_csv(tmp_path / "out" / "budget.csv")}
    assert budget["committed"]["fen"] == str(3 * 9900) and budget["committed"]["yuan"] == "297.00"
