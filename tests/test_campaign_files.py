"""Campaign files as operators write them (contract section 1), through the CLI:
the contract's own example (times as quoted strings), Notepad's byte-order mark and
CRLF, times without an offset, and rounds whose coupons would expire before the
round closes. Plus grab.lua's last line of defence: no coupon sold past its
valid_until, even for a round loaded before such files were refused."""

from __future__ import annotations

import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from conftest import campaign_toml, open_round, redis_now
from test_serve import CLI, env_for, free_port, wait_ready

from engine import campaign as cmp
from engine.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONTRACT_EXAMPLE = FIXTURES / "contract_campaign.toml"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env=env_for(Path("/nonexistent-data-dir")))


def one_line_refusal(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coupon-engine: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_the_fixture_is_the_contracts_example_verbatim() -> None:
    """The fixture is a copy (CI has no ../shared); where the contract is at hand,
    the copy must still be exact."""
    here = Path(__file__).resolve()
    for base in (here.parents[2], here.parents[3]):
        contract = base / "shared" / "contract.md"
        if contract.is_file():
            text = contract.read_text("utf-8")
            block = text.split("```toml\n", 1)[1].split("```", 1)[0]
            assert block == CONTRACT_EXAMPLE.read_text("utf-8")
            return
    pytest.skip("the contract is not beside this checkout")


def test_the_contracts_example_checks_and_loads(redis_url: str, tmp_path: Path) -> None:
    assert 'opens_at = "2024-12-20T10:00:00+08:00"' in CONTRACT_EXAMPLE.read_text("utf-8")
    proc = run("campaign", "check", str(CONTRACT_EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("campaign snow-2025: 1 venues, 1 rounds, 700 coupons")
    proc = run("campaign", "load", str(CONTRACT_EXAMPLE), "--redis-url", redis_url,
               "--data-dir", str(tmp_path / "var"))
    assert proc.returncode == 0, proc.stderr
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        rnd = r.hgetall("cpn:{snow-2025}:round:R1")
        assert r.hget("cpn:{snow-2025}:stock", "R1:V01") == "700"
    finally:
        r.close()
    # 2024-12-20T10:00:00+08:00 = 02:00 UTC; valid_until 2025-01-31T23:59:59+08:00.
    assert (int(rnd["o"]), int(rnd["vu"])) == (1734660000000, 1738339199000)
    # The same times written as bare TOML date-times are the same campaign.
    bare = CONTRACT_EXAMPLE.read_text("utf-8")
    for key in ("opens_at", "closes_at", "valid_from", "valid_until"):
        start = bare.index(f'{key} = "')
        end = bare.index('"', start + len(key) + 4)
        bare = bare[:start] + bare[start:end].replace('"', "") + bare[end + 1:]
    assert 'opens_at = 2024-12-20T10:00:00+08:00' in bare
    assert cmp.parse_campaign(bare) == cmp.read_campaign(CONTRACT_EXAMPLE)


def notepad(path: Path, text: str) -> Path:
    """What Windows Notepad saves as "UTF-8 with BOM": a byte-order mark and CRLF."""
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    return path


def test_a_notepad_file_checks_loads_and_serves(redis_url: str, tmp_path: Path) -> None:
    path = notepad(tmp_path / "notepad.toml", CONTRACT_EXAMPLE.read_text("utf-8"))
    assert path.read_bytes().startswith(b"\xef\xbb\xbf[campaign]\r\n")
    proc = run("campaign", "check", str(path))
    assert proc.returncode == 0, proc.stderr
    proc = run("campaign", "load", str(path), "--redis-url", redis_url, "--data-dir",
               str(tmp_path / "var"))
    assert proc.returncode == 0, proc.stderr
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushall()
    r.close()
    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        serve = subprocess.Popen([*CLI, "serve", "--campaign", str(path), "--redis-url",
                                  redis_url, "--port", str(port)],
                                 env=env_for(tmp_path / "var2"), stderr=log)
    try:
        wait_ready(f"http://127.0.0.1:{port}", serve)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert r.get("cpn:active") == "snow-2025"
    finally:
        r.close()


@pytest.mark.parametrize("written, needle", [
    ('opens_at = "2024-12-20T10:00:00"', "has no UTC offset"),
    ("opens_at = 2024-12-20T10:00:00", "has no UTC offset"),
    ('opens_at = "2024-12-20 10:00"', "is not an RFC 3339 date-time"),
    ("opens_at = 2024-12-20", "needs a date, a time and a UTC offset"),
    ('opens_at = "next friday"', "is not an RFC 3339 date-time"),
    ("opens_at = 20241220", "must be a date-time with a UTC offset"),
])
def test_a_time_without_an_offset_is_refused_saying_so(written: str, needle: str,
                                                       tmp_path: Path) -> None:
    text = CONTRACT_EXAMPLE.read_text("utf-8").replace(
        'opens_at = "2024-12-20T10:00:00+08:00"', written)
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    line = one_line_refusal(run("campaign", "check", str(path)), "round R1", "'opens_at'",
                            needle)
    assert "+08:00" in line  # it shows how to write it


def test_files_that_are_not_utf8_text_are_refused_saying_what_they_are(tmp_path: Path) -> None:
    text = CONTRACT_EXAMPLE.read_text("utf-8")
    utf16 = tmp_path / "unicode.toml"
    utf16.write_bytes(text.encode("utf-16"))  # Notepad's "Unicode": BOM + UTF-16 LE
    one_line_refusal(run("campaign", "check", str(utf16)), "UTF-16", "save it as UTF-8")
    gbk = tmp_path / "ansi.toml"
    gbk.write_bytes(text.encode("gbk"))  # Notepad's "ANSI" on Chinese Windows
    one_line_refusal(run("campaign", "check", str(gbk)), "line 3", "not UTF-8")
    one_line_refusal(run("campaign", "check", str(tmp_path / "none.toml")), "cannot read")


def test_a_round_whose_coupons_expire_before_it_closes_is_refused(
        redis_url: str, tmp_path: Path) -> None:
    now = redis_now(redis_url)
    for until in (now + timedelta(minutes=30), now + timedelta(hours=1)):  # before, at close
        text = campaign_toml(rounds=[
            open_round(redis_url, "R1", closes=now + timedelta(hours=1),
                       valid_until=until)])
        path = tmp_path / "short.toml"
        path.write_text(text, encoding="utf-8")
        one_line_refusal(run("campaign", "check", str(path)), "round R1",
                         "valid_until", "not after closes_at")
        one_line_refusal(run("campaign", "load", str(path), "--redis-url", redis_url,
                             "--data-dir", str(tmp_path / "var")), "round R1")
        r = redis.Redis.from_url(redis_url)
        try:
            assert r.dbsize() == 0
        finally:
            r.close()


async def test_no_coupon_is_sold_past_its_valid_until(make_engine, redis_url: str) -> None:
    """A round in Redis whose coupons expired while it is still open (loaded by an
    engine that accepted such files): grab.lua refuses before writing anything."""
    now = redis_now(redis_url)
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 5})]))
    ok = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                             headers=e.member("early"))
    assert ok.status == 201
    await e.redis.hset("cpn:{test-c}:round:R1", "vu",
                       int((now - timedelta(seconds=1)).timestamp() * 1000))
    snap = await e.snapshot()
    for key in (None, "k1"):
        headers = e.member("late") | ({"Idempotency-Key": key} if key else {})
        resp = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                                   headers=headers)
        assert (resp.status, (await resp.json())["error"]["code"]) == (410, "round_closed")
    assert await e.snapshot() == snap


def test_check_of_the_sample_still_passes() -> None:
    assert main(["campaign", "check", str(Path(cmp.__file__).parent / "data" /
                                         "sample_campaign.toml")]) == 0
