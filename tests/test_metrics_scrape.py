"""/metrics under many scrapes, and restricted to a token (issue 14, item 7).

A render merges every worker's sample files; it is done at most once a second per
worker and shared, so 100 scrapes a second leave other requests' latency alone. With
``COUPON_METRICS_TOKEN`` set, /metrics answers only to ``Authorization: Bearer
<token>``, which the shipped Prometheus scrape config carries from a file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import campaign_toml, open_round, redis_now
from servekit import Served, children, free_port, serve

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "scrape-token-0123456789"


async def test_the_token_works_both_ways(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]), metrics_token=TOKEN)
    c = e.client
    for headers in ({}, {"Authorization": "Bearer wrong-token"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN},
                    e.member("m1")):
        resp = await c.get("/metrics", headers=headers)
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (401, "unauthorized"), headers
    resp = await c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200 and "coupon_grab_requests_total" in await resp.text()
    # Nothing else asks for it.
    assert (await c.get("/v1/rounds")).status == 200
    assert (await c.get("/readyz")).status == 200
    assert (await c.get("/v1/me/coupons", headers=e.member("m1"))).status == 200


async def test_without_a_token_metrics_stay_open(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    resp = await e.client.get("/metrics")
    assert resp.status == 200 and "coupon_grab_requests_total" in await resp.text()


async def test_renders_at_most_once_a_second_and_shares_them(make_engine, redis_url) -> None:
    from engine.http.handlers import METRICS_PAGE
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    page = e.client.app[METRICS_PAGE]

    async def scrape() -> str:
        return await (await e.client.get("/metrics")).text()

    first = await asyncio.gather(*(scrape() for _ in range(50)))
    assert page.renders == 1 and len(set(first)) == 1
    # Within the second: the same body, even after a grant.
    t0 = time.monotonic()
    r = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                            headers=e.member("m1"))
    assert r.status == 201
    if time.monotonic() - t0 < 0.5:
        assert await scrape() == first[0] and page.renders == 1
    # After it: rendered again, and the grant is there.
    await asyncio.sleep(1.05)
    text = await scrape()
    assert page.renders == 2
    assert 'coupon_grab_requests_total{outcome="granted",round="R1"} 1.0' in text


def cpu_seconds(pids: list[int]) -> float:
    tck = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tck
    return total


async def latencies(s: Served, seconds: float, scrapes_per_s: int,
                    headers: dict[str, str]) -> tuple[list[float], int]:
    """Latencies of a member's coupon list, every 20 ms for ``seconds``, while
    ``scrapes_per_s`` scrapes a second run beside it; (latencies, scrapes answered)."""
    probe: list[float] = []
    scraped = 0
    stop = time.monotonic() + seconds
    member = s.member("prober")
    async with aiohttp.ClientSession() as http, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as scrapers:
        async def scrape() -> None:
            nonlocal scraped
            async with scrapers.get(s.base + "/metrics", headers=headers) as resp:
                await resp.read()
                assert resp.status == 200
                scraped += 1

        async def scrape_loop() -> None:
            tasks = set()
            interval = 1 / scrapes_per_s
            next_at = time.monotonic()
            while time.monotonic() < stop:
                t = asyncio.create_task(scrape())
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.gather(*tasks)

        async def probe_loop() -> None:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                async with http.get(s.base + "/v1/me/coupons", headers=member) as resp:
                    await resp.read()
                    assert resp.status == 200
                probe.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)

        jobs = [probe_loop()] + ([scrape_loop()] if scrapes_per_s else [])
        await asyncio.gather(*jobs)
    return probe, scraped


def p(values: list[float], q: int) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * q // 100) - 1)]


def test_100_scrapes_a_second_leave_other_requests_alone(tmp_path: Path,
                                                         redis_url: str) -> None:
    """``serve --workers 2`` with the sample campaign's size (50 venues, 3 rounds:
    thousands of series), a token, and a real Prometheus scraping with it."""
    now = redis_now(redis_url)
    venues = tuple(f"V{i:02d}" for i in range(1, 51))
    rounds = [open_round(redis_url, stock={v: 100 for v in venues})] + [
        {"id": f"R{i}", "opens": now + timedelta(hours=i), "closes": now + timedelta(hours=i + 1),
         "stock": {v: 100 for v in venues}} for i in (2, 3)]
    text = campaign_toml(venues=venues, rounds=rounds)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with serve(tmp_path, redis_url, text, workers=2, COUPON_METRICS_TOKEN=TOKEN) as s:
        workers = [pid for pid in children(s.proc.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2
        asyncio.run(latencies(s, 1.0, 0, auth))  # warm up: tokens, connections
        cpu0 = cpu_seconds(workers)
        base, _ = asyncio.run(latencies(s, 4.0, 0, auth))
        cpu1 = cpu_seconds(workers)
        busy, scraped = asyncio.run(latencies(s, 4.0, 100, auth))
        cpu2 = cpu_seconds(workers)
        extra_cpu = (cpu2 - cpu1) - (cpu1 - cpu0) * len(busy) / max(1, len(base))
        report = {
            "probe p50 ms": (round(p(base, 50) * 1000, 2), round(p(busy, 50) * 1000, 2)),
            "probe p99 ms": (round(p(base, 99) * 1000, 2), round(p(busy, 99) * 1000, 2)),
            "probe max ms": (round(max(base) * 1000, 2), round(max(busy) * 1000, 2)),
            "scrapes": scraped,
            "worker CPU ms per scrape": round(extra_cpu / max(1, scraped) * 1000, 3),
        }
        print("metrics under 100 scrapes/s (baseline, with scrapes):", json.dumps(report))
        assert scraped >= 300
        # Generous on a shared 2-core machine; the fault was latency past 2 s.
        assert p(busy, 99) < max(10 * p(base, 99), 0.25), report
        assert max(busy) < 1.0, report
        _prometheus_scrapes_with_the_token(tmp_path, s)


def _prometheus_scrapes_with_the_token(tmp_path: Path, s: Served) -> None:
    """The shipped scrape config, with its documented ``authorization`` lines, scrapes
    the engine (up 1); the same job without them is refused (up 0)."""
    if shutil.which("prometheus") is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed")
        return
    shipped = yaml.safe_load((ROOT / "dashboards" / "prometheus.yml").read_text("utf-8"))
    job = next(j for j in shipped["scrape_configs"] if j["job_name"] == "coupon-engine")
    comment = (ROOT / "dashboards" / "prometheus.yml").read_text("utf-8")
    assert "#     credentials_file:" in comment  # the lines README tells operators to use
    token_file = tmp_path / "metrics.token"
    token_file.write_text(TOKEN + "\n")
    target = {"targets": [f"127.0.0.1:{s.port}"]}
    with_token = {**job, "static_configs": [target],
                  "authorization": {"credentials_file": str(token_file)}}
    without = {**job, "job_name": "no-token", "static_configs": [target]}
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s"},
                                  "scrape_configs": [with_token, without]}))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                up = {r["metric"]["job"]: r["value"][1] for r in query(port, "up")}
            except OSError:
                up = {}
            if up.get("coupon-engine") == "1" and up.get("no-token") == "0":
                break
            assert time.monotonic() < deadline, up
            time.sleep(0.3)
        got = query(port, 'coupon_budget_fen{job="coupon-engine"}')
        assert got and float(got[0]["value"][1]) > 0
    finally:
        prom.terminate()
        prom.wait(15)


def query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["data"]["result"]
