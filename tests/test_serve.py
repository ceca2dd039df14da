"""`coupon-engine serve` as a process: embedded Redis, sample campaign, CLI tokens,
clean stop on SIGTERM, refusal of an unsafe external Redis."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis

from engine.store.embedded import EmbeddedRedis

CLI = [sys.executable, "-m", "engine.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def env_for(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env["COUPON_DATA_DIR"] = str(data)
    return env


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve exited early"
        try:
            if http("GET", base + "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("engine did not become ready")


def test_embedded_default_end_to_end(tmp_path: Path) -> None:
    data, port = tmp_path / "var", free_port()
    base = f"http://127.0.0.1:{port}"
    env = env_for(data)
    # Logs go to a file: an unread pipe fills up and blocks the engine.
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2"], env=env,
                                stderr=log)
    try:
        wait_ready(base, proc)
        sock = data / "redis" / "redis.sock"
        r = redis.Redis(unix_socket_path=str(sock), decode_responses=True)
        assert r.config_get("appendfsync")["appendfsync"] == "always"
        assert r.config_get("aof-load-truncated")["aof-load-truncated"] == "no"
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        rounds = http("GET", base + "/v1/rounds")[1]["rounds"]
        assert [x["id"] for x in rounds] == ["R1", "R2", "R3"]
        assert rounds[0]["state"] == "scheduled" and len(rounds[0]["venues"]) == 50
        token = subprocess.run([*CLI, "token", "member", "alice"], env=env, check=True,
                               capture_output=True, text=True).stdout.strip()
        status, body = http("POST", base + "/v1/rounds/R1/grab", {"venue_id": "V01"},
                            {"Authorization": f"Bearer {token}",
                             "Content-Type": "application/json"})
        assert (status, body["error"]["code"]) == (409, "round_not_open")
        vkey = subprocess.run([*CLI, "token", "venue", "V01"], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()
        assert http("GET", base + "/v1/venue/redemptions",
                    headers={"Authorization": f"Bearer {vkey}"})[0] == 200
        admin = subprocess.run([*CLI, "token", "admin"], env=env, check=True,
                               capture_output=True, text=True).stdout.strip()
        assert http("GET", base + "/v1/admin/rounds/R1/stats",
                    headers={"Authorization": f"Bearer {admin}"})[0] == 200
        bad = subprocess.run([*CLI, "token", "venue", "NOPE"], env=env, capture_output=True,
                             text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
        r.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    # The embedded redis-server went with it, and its data stayed.
    assert not EmbeddedRedis(data / "redis").socket_path.exists() or \
        subprocess.run(["redis-cli", "-s", str(data / "redis" / "redis.sock"), "ping"],
                       capture_output=True).returncode != 0
    assert any((data / "redis" / "appendonly").iterdir())


def test_unsafe_external_redis_is_refused(tmp_path: Path) -> None:
    unsafe = EmbeddedRedis(tmp_path / "unsafe")
    unsafe.start(extra={"appendfsync": "everysec"})
    try:
        proc = subprocess.run([*CLI, "serve", "--redis-url", unsafe.url, "--port",
                               str(free_port())], env=env_for(tmp_path / "var"),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        assert "appendfsync" in proc.stderr and "--allow-unsafe-redis" in proc.stderr
    finally:
        unsafe.stop()


def test_serve_archives_into_the_ledger_and_reconciles(tmp_path: Path) -> None:
    import sqlite3

    from conftest import campaign_toml, open_round
    data, port = tmp_path / "var", free_port()
    base = f"http://127.0.0.1:{port}"
    env = env_for(data)
    probe = EmbeddedRedis(tmp_path / "clock")
    probe.start()
    try:
        text = campaign_toml(rounds=[open_round(probe.url)])
    finally:
        probe.stop()
    camp = tmp_path / "c.toml"
    camp.write_text(text, encoding="utf-8")
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--campaign", str(camp)],
                                env=env, stderr=log)
    try:
        wait_ready(base, proc)
        run = lambda *a: subprocess.run([*CLI, *a], env=env, check=True,  # noqa: E731
                                        capture_output=True, text=True).stdout.strip()
        member = {"Authorization": "Bearer " + run("token", "member", "m1"),
                  "Content-Type": "application/json"}
        status, body = http("POST", base + "/v1/rounds/R1/grab", {"venue_id": "V01"}, member)
        assert status == 201
        code = body["coupon"]["code"]
        venue = {"Authorization": "Bearer " + run("token", "venue", "V01"),
                 "Content-Type": "application/json"}
        status, body = http("POST", base + "/v1/venue/redemptions", {"code": code}, venue)
        assert status == 200
        ledger = data / "ledger.sqlite3"
        deadline = time.monotonic() + 10
        rows: list = []
        while time.monotonic() < deadline:
            if ledger.exists():
                with sqlite3.connect(ledger) as db:
                    rows = db.execute("select type from events order by event_id").fetchall()
                if len(rows) == 2:
                    break
            time.sleep(0.2)
        assert [r[0] for r in rows] == ["grant", "redeem"]
        claims = tmp_path / "claims.csv"
        claims.write_text(f"code,redeemed_at,amount_fen\n{code},{body['coupon']['redeemed_at']},10000\n")
        out = json.loads(run("reconcile", "--venue", "V01", "--claims", str(claims), "--out",
                             str(tmp_path / "out")))
        assert out["counts"]["matched"] == 1 and out["payable_fen"] == 9900
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0


async def test_serve_refuses_an_empty_redis_that_the_ledger_knows(
        make_engine, redis_url: str, tmp_path: Path, write_campaign) -> None:
    """Redis lost everything, the ledger did not: loading would sell the stock twice."""
    import pytest
    from conftest import campaign_toml, open_round

    from engine.config import Settings
    from engine.ledger import Ledger, archiver
    from engine.server import ServeError, prepare

    text = campaign_toml(rounds=[open_round(redis_url)])
    e = await make_engine(text)
    resp = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                               headers=e.member("m1"))
    assert resp.status == 201
    settings = Settings(data_dir=tmp_path / "var", campaign_file=write_campaign(text))
    with Ledger(settings.ledger_path) as led:
        assert await archiver.archive_once(e.redis, led) == 1
    await e.redis.flushall()
    with pytest.raises(ServeError, match="coupon-engine restore"):
        await prepare(settings, redis_url, embedded=False)
    assert await e.redis.dbsize() == 0  # nothing was loaded
    # A data directory without that history loads as before.
    fresh = Settings(data_dir=tmp_path / "other", campaign_file=settings.campaign_file)
    loaded = await prepare(fresh, redis_url, embedded=False)
    assert loaded.id == "test-c"
