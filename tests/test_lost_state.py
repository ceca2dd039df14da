"""No campaign is loaded or served over lost state (engine/ledger/guard.py).

Run as an operator would: the real CLI in subprocesses, against a redis-server this
test starts, with a ledger that `coupon-engine archive` filled. Then Redis loses its
data (emptied; or restarted from an older copy of its append-only file), or the
ledger is swapped for an older copy, and every command that loads a campaign must
refuse with exit 2 and one line, writing nothing.
"""

from __future__ import annotations

import ast
import asyncio
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from conftest import campaign_toml, open_round
from test_serve import env_for, free_port

from engine import campaign as cmp
from engine.config import Settings
from engine.store import Store
from engine.store.embedded import EmbeddedRedis

CLI = [sys.executable, "-m", "engine.cli"]
ENGINE = Path(__file__).resolve().parent.parent / "engine"
SAMPLE_ID = "snow-2025"  # the bundled sample's id: `serve` without a file loads it


def cli(data: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**env_for(data), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def grant(url: str, c: cmp.Campaign, members: list[str]) -> list[str]:
    """Grabs through the engine's own grab.lua (the Store a worker uses)."""
    async def go() -> list[str]:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        store = Store(client, c, Settings())
        try:
            out = []
            for m in members:
                res = await store.grab("R1", "V01", m, None)
                assert res.outcome.name == "GRANTED", res
                out.append(res.code)
            return out
        finally:
            await store.close()
            await client.aclose()
    return asyncio.run(go())


def keys_and_size(url: str) -> tuple[int, str | None, str | None]:
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return (r.dbsize(), r.get("cpn:active"),
                r.hget(f"cpn:{{{SAMPLE_ID}}}:stock", "R1:V01"))
    finally:
        r.close()


def assert_refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("coupon-engine: ")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def world(tmp_path: Path):
    """A Redis of the test's own, a campaign (with the sample's id) loaded by the CLI,
    5 coupons of a line of 5 granted, and the ledger archived."""
    rs = EmbeddedRedis(tmp_path / "redis")
    rs.start()
    data = tmp_path / "var"
    text = campaign_toml(cid=SAMPLE_ID, rounds=[open_round(rs.url, stock={"V01": 5})])
    camp = tmp_path / "campaign.toml"
    camp.write_text(text, encoding="utf-8")
    c = cmp.parse_campaign(text)
    try:
        assert cli(data, "campaign", "load", str(camp), "--redis-url", rs.url).returncode == 0
        granted = grant(rs.url, c, [f"m{i}" for i in range(5)])
        out = cli(data, "archive", "--redis-url", rs.url)
        assert out.returncode == 0 and "archived 5 new" in out.stdout, out
        yield {"rs": rs, "data": data, "camp": camp, "c": c, "granted": granted,
               "tmp": tmp_path}
    finally:
        rs.stop()


def loaders(w: dict) -> dict[str, list[str]]:
    """Every command that writes a campaign into Redis."""
    url, port = w["rs"].url, str(free_port())
    return {
        "campaign load": ["campaign", "load", str(w["camp"]), "--redis-url", url],
        "serve --campaign": ["serve", "--campaign", str(w["camp"]), "--redis-url", url,
                             "--port", port],
        "serve (the sample)": ["serve", "--redis-url", url, "--port", port],
    }


def test_every_loader_refuses_an_emptied_redis_that_the_ledger_knows(world: dict) -> None:
    w, url = world, world["rs"].url
    r = redis.Redis.from_url(url)
    r.flushall()  # Redis lost everything: no append-only file to restart from
    r.close()
    for name, args in loaders(w).items():
        proc = cli(w["data"], *args)
        assert_refused(proc, "coupon-engine restore", f"{SAMPLE_ID}", "5 events")
        assert keys_and_size(url) == (0, None, None), f"{name} wrote into the empty Redis"
    # COUPON_CAMPAIGN is the same path as --campaign.
    proc = cli(w["data"], "serve", "--redis-url", url, "--port", str(free_port()),
               env={"COUPON_CAMPAIGN": str(w["camp"])})
    assert_refused(proc, "coupon-engine restore")
    assert keys_and_size(url)[0] == 0

    # The fix it names works, and loading is then allowed (and changes nothing).
    assert cli(w["data"], "restore", "--redis-url", url).returncode == 0
    out = cli(w["data"], "campaign", "load", str(w["camp"]), "--redis-url", url)
    assert out.returncode == 0 and "unchanged" in out.stdout, out
    assert keys_and_size(url)[2] == "0"  # the line of 5 stays sold out
    c = w["c"]

    async def one_more() -> str:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        store = Store(client, c, Settings())
        try:
            return (await store.grab("R1", "V01", "late", None)).outcome.name
        finally:
            await store.close()
            await client.aclose()
    assert asyncio.run(one_more()) == "SOLD_OUT"


def void_and_regrant(url: str, c: cmp.Campaign, granted: list[str], n: int) -> None:
    """Members m0..m{n-1} hand their coupons back; n new members grab the stock."""
    async def go() -> None:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        store = Store(client, c, Settings())
        try:
            for i in range(n):
                assert (await store.void(f"m{i}", granted[i])).outcome.name == "VOIDED"
            for i in range(n):
                res = await store.grab("R1", "V01", f"new{i}", None)
                assert res.outcome.name == "GRANTED", res
        finally:
            await store.close()
            await client.aclose()
    asyncio.run(go())


def test_every_loader_refuses_a_redis_restarted_from_an_older_aof(world: dict) -> None:
    """Redis comes back from an older copy of its append-only file: it holds the
    campaign, without events the ledger archived since."""
    w = world
    rs: EmbeddedRedis = w["rs"]
    old = w["tmp"] / "aof-copy"
    rs.stop()  # SHUTDOWN fsyncs: a consistent copy
    shutil.copytree(rs.directory / "appendonly", old)
    rs.start()
    void_and_regrant(rs.url, w["c"], w["granted"], 2)
    assert "archived 4 new" in cli(w["data"], "archive", "--redis-url", rs.url).stdout
    rs.stop()
    shutil.rmtree(rs.directory / "appendonly")
    shutil.copytree(old, rs.directory / "appendonly")
    rs.start()  # the older copy: m0, m1 hold their coupons, new0 and new1 have none

    def snapshot() -> dict:
        c = redis.Redis.from_url(rs.url)
        try:
            return {k: c.dump(k) for k in sorted(c.keys("*"))}
        finally:
            c.close()
    before = snapshot()
    assert before
    for name, args in loaders(w).items():
        proc = cli(w["data"], *args)
        assert_refused(proc, "coupon-engine restore --force", "older copy")
        assert snapshot() == before, f"{name} wrote into the rolled-back Redis"
    # restore --force brings Redis forward to the ledger; then everything loads.
    out = cli(w["data"], "restore", "--force", "--redis-url", rs.url)
    assert out.returncode == 0, out.stderr
    assert cli(w["data"], "campaign", "load", str(w["camp"]), "--redis-url",
               rs.url).returncode == 0
    c = redis.Redis.from_url(rs.url, decode_responses=True)
    try:
        assert c.hget(f"cpn:{{{SAMPLE_ID}}}:coupon:{w['granted'][0]}", "status") == "void"
        assert c.hget(f"cpn:{{{SAMPLE_ID}}}:member:new0", "total") == "1"
    finally:
        c.close()


def test_a_ledger_older_than_what_redis_acknowledged_is_refused(world: dict) -> None:
    """The data directory's ledger is put back from an older backup: the archiver
    group acknowledged events it lacks (settling from it could pay twice)."""
    w, url = world, world["rs"].url
    ledger = w["data"] / "ledger.sqlite3"
    backup = w["tmp"] / "ledger-backup.sqlite3"
    with sqlite3.connect(ledger) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    void_and_regrant(url, w["c"], w["granted"], 1)
    assert "archived 2 new" in cli(w["data"], "archive", "--redis-url", url).stdout
    for suffix in ("", "-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, ledger)
    proc = cli(w["data"], "campaign", "load", str(w["camp"]), "--redis-url", url)
    assert_refused(proc, "acknowledged", "older copy")
    proc = cli(w["data"], "serve", "--redis-url", url, "--port", str(free_port()))
    assert_refused(proc, "acknowledged")
    # A front end that does not archive may use it (nothing is settled from it there).
    proc = cli(w["data"], "campaign", "load", str(w["camp"]), "--redis-url", url,
               env={"COUPON_ARCHIVER": "0"})
    assert proc.returncode == 0, proc.stderr


def test_nothing_in_the_engine_loads_a_campaign_around_the_guard() -> None:
    """store.load_campaign is called only by the guard's load_checked: a new loader
    that called it directly would skip the check."""
    callers = []
    for path in ENGINE.rglob("*.py"):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name == "load_campaign":
                    callers.append(str(path.relative_to(ENGINE)))
    assert sorted(callers) == ["ledger/guard.py"], callers
