"""Reconciliation, settlement and statement through the CLI functions (section 5)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis
import redis.asyncio as aioredis
from conftest import campaign_toml, redis_now
from test_ledger import BASE_MS, World, make_campaign, seed

from engine import campaign as cmp
from engine import codes, store
from engine.config import Settings
from engine.ledger import Ledger, archiver, reconcile
from engine.ledger import cli as cli_ledger
from engine.store.scripts import RedeemOutcome

TZ = ZoneInfo("Asia/Shanghai")


def iso(ms: int, naive: bool = False) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(TZ)
    if naive:
        return dt.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S")
    return dt.isoformat()


def bad_check(code: str) -> str:
    last = codes.ALPHABET[(codes.ALPHABET.index(code[-1]) + 1) % 32]
    return code[:-1] + last


@pytest.fixture
def scene(redis_url: str, tmp_path: Path):
    """V01: ten redeemed coupons a0..a9, two issued, one void; V02: one redeemed."""
    w = World(redis_url, make_campaign())
    a = [w.grant("V01", f"m{i}") for i in range(10)]
    at = {code: BASE_MS + 3_600_000 + i * 60_000 for i, code in enumerate(a)}
    for code in a:
        w.redeem(code, at[code])
    issued = [w.grant("V01", "mi1"), w.grant("V01", "mi2")]
    voided = w.grant("V01", "mv")
    w.void(voided, BASE_MS + 5000)
    other = w.grant("V02", "mo")
    w.redeem(other, BASE_MS + 7000)
    w.flush()
    yield {"w": w, "a": a, "at": at, "issued": issued, "voided": voided, "other": other,
           "url": redis_url, "dir": tmp_path}
    w.close()


def write_claims(path: Path, rows: list[tuple[str, str, str]], header: str =
                 "code,redeemed_at,amount_fen,备注") -> Path:
    lines = [header] + [",".join((*r, "说明")) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(scene: dict, *argv: str) -> int:
    return cli_ledger.main([*argv, "--redis-url", scene["url"], "--data-dir",
                            str(scene["dir"] / "data")])


def venue_file(scene: dict, path: Path) -> Path:
    a, at = scene["a"], scene["at"]
    rows = [
        (a[0], iso(at[a[0]]), "10000"),                          # 2 matched
        (codes.display(a[1]).lower(), iso(at[a[1]]), "10000"),   # 3 matched, typed form
        (a[2], iso(at[a[2]] + 11 * 60_000), "10000"),            # 4 matched + time_skew
        (a[3], iso(at[a[3]]), "9000"),                           # 5 amount_mismatch
        (a[0], iso(at[a[0]]), "10000"),                          # 6 duplicate_claim
        (scene["issued"][0], iso(BASE_MS), "10000"),             # 7 not_redeemed
        (scene["voided"], iso(BASE_MS), "10000"),                # 8 not_redeemed
        (scene["other"], iso(BASE_MS), "10000"),                 # 9 wrong_venue
        (codes.new_code(), iso(BASE_MS), "10000"),               # 10 unknown_code
        ("HELLO", iso(BASE_MS), "10000"),                        # 11 invalid_row
        (bad_check(a[9]), iso(at[a[9]]), "10000"),               # 12 invalid_row
        (a[4], "yesterday", "10000"),                            # 13 invalid_row
        (a[5], iso(at[a[5]]), "abc"),                            # 14 invalid_row
        ("", "", ""),                                            # 15 blank: no claim
        (a[6], iso(at[a[6]], naive=True), "10000"),              # 16 matched, local time
        (a[7], iso(at[a[7]] + 9 * 60_000), "10000"),             # 17 matched, small skew
    ]
    text = ["code,redeemed_at,amount_fen,备注"]
    for r in rows:
        text.append("" if r == ("", "", "") else ",".join((*r, "说明")))
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


EXPECTED = {"matched": 5, "unclaimed": 4, "not_redeemed": 2, "wrong_venue": 1,
            "unknown_code": 1, "duplicate_claim": 1, "amount_mismatch": 1, "invalid_row": 4}


def read_out(out: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    raw = (out / "reconciliation.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    rows = list(csv.DictReader(raw.decode("utf-8-sig").splitlines()))
    return summary, rows


def test_every_class(scene: dict, capsys: pytest.CaptureFixture[str]) -> None:
    claims = venue_file(scene, scene["dir"] / "claims.csv")
    out = scene["dir"] / "out"
    assert run(scene, "reconcile", "--venue", "V01", "--claims", str(claims), "--out",
               str(out)) == 0
    printed = json.loads(capsys.readouterr().out)
    summary, rows = read_out(out)
    assert printed == summary
    assert summary == {"venue_id": "V01", "claims": 15, "ledger_redemptions": 10,
                       "counts": EXPECTED, "time_skew": 1, "payable_fen": 6 * 9900}
    by_line = {r["line"]: r for r in rows}
    assert by_line["6"]["class"] == "duplicate_claim"
    assert by_line["4"]["time_skew"] == "time_skew"
    assert by_line["5"]["class"] == "amount_mismatch" and by_line["5"]["paid_fen"] == "9900"
    assert by_line["9"]["class"] == "wrong_venue"
    assert [by_line[str(n)]["class"] for n in (11, 12, 13, 14)] == ["invalid_row"] * 4
    assert by_line["16"]["class"] == "matched" and by_line["16"]["time_skew"] == ""
    assert "15" not in by_line
    assert by_line["2"]["venue_name"] == "场馆V01"
    unclaimed = {r["code"] for r in rows if r["class"] == "unclaimed"}
    a = scene["a"]
    assert unclaimed == {codes.display(c) for c in (a[4], a[5], a[8], a[9])}
    assert all(r["line"] == "" for r in rows if r["class"] == "unclaimed")
    # Reconcile records nothing and gives the same answer again.
    assert run(scene, "reconcile", "--venue", "V01", "--claims", str(claims), "--out",
               str(out)) == 0
    assert json.loads(capsys.readouterr().out) == summary
    with Ledger(scene["dir"] / "data" / "ledger.sqlite3") as led:
        assert led.settlement_count() == 0


def test_settle_pays_each_code_once(scene: dict, capsys: pytest.CaptureFixture[str]) -> None:
    claims = venue_file(scene, scene["dir"] / "claims.csv")
    out = scene["dir"] / "out"
    args = ("settle", "--venue", "V01", "--claims", str(claims), "--out", str(out))
    assert run(scene, *args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["counts"] == EXPECTED and first["payable_fen"] == 6 * 9900
    assert first["settled_codes"] == 6
    assert run(scene, *args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["payable_fen"] == 0 and again["settled_codes"] == 0
    assert again["counts"]["duplicate_claim"] == 7
    assert again["counts"]["matched"] == again["counts"]["amount_mismatch"] == 0
    with Ledger(scene["dir"] / "data" / "ledger.sqlite3") as led:
        assert led.settlement_count() == 6
        flagged = led.db.execute("SELECT code FROM settlements WHERE flagged = 1").fetchall()
        assert flagged == [(scene["a"][3],)]

    # A later file repeating a settled code, plus one new claim.
    a, at = scene["a"], scene["at"]
    later = write_claims(scene["dir"] / "later.csv",
                         [(a[0], iso(at[a[0]]), "10000"), (a[8], iso(at[a[8]]), "10000")])
    assert run(scene, "settle", "--venue", "V01", "--claims", str(later), "--out",
               str(out)) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["counts"]["duplicate_claim"] == 1 and s["counts"]["matched"] == 1
    # a4, a5, a9 remain unclaimed; the six settled ones are no longer open.
    assert s["counts"]["unclaimed"] == 3 and s["ledger_redemptions"] == 4
    assert s["payable_fen"] == 9900


@pytest.mark.parametrize("header", ["code,amount_fen", "编码,redeemed_at,amount_fen", ""])
def test_file_without_the_columns_is_refused(scene: dict, header: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    a = scene["a"]
    path = scene["dir"] / "bad.csv"
    path.write_text(f"{header}\n{a[0]},x,10000\n" if header else "", encoding="utf-8")
    out = scene["dir"] / "out"
    for cmd in ("settle", "reconcile"):
        assert run(scene, cmd, "--venue", "V01", "--claims", str(path), "--out", str(out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("coupon-engine: ")
    assert not (out / "summary.json").exists()
    with Ledger(scene["dir"] / "data" / "ledger.sqlite3") as led:
        assert led.settlement_count() == 0


def test_bad_venue_and_missing_file(scene: dict, capsys: pytest.CaptureFixture[str]) -> None:
    claims = venue_file(scene, scene["dir"] / "claims.csv")
    assert run(scene, "reconcile", "--venue", "V99", "--claims", str(claims)) == 2
    assert "V99" in capsys.readouterr().err
    assert run(scene, "settle", "--venue", "V01", "--claims", str(scene["dir"] / "no.csv")) == 2
    assert capsys.readouterr().err.startswith("coupon-engine: ")


def test_statement_matches_venues_and_redis(scene: dict,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    seed(scene["w"], 400, venues=("V01", "V02", "V03"))
    claims = venue_file(scene, scene["dir"] / "claims.csv")
    assert run(scene, "settle", "--venue", "V01", "--claims", str(claims), "--out",
               str(scene["dir"] / "o1")) == 0
    out = scene["dir"] / "st"
    assert run(scene, "statement", "--out", str(out)) == 0
    assert "场馆V01" in capsys.readouterr().out
    doc = json.loads((out / "statement.json").read_text(encoding="utf-8"))
    assert (out / "statement.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    venues, totals = doc["venues"], doc["totals"]
    for k in ("issued", "void", "redeemed", "settled", "unclaimed", "payable_fen",
              "settled_fen", "outstanding_fen"):
        assert totals[k] == sum(v[k] for v in venues), k
    r = redis.Redis.from_url(scene["url"], decode_responses=True)
    stats = r.hgetall(scene["w"].k.stats)
    r.close()
    for v in venues:
        for counter, field in (("issued", "issued"), ("void", "void"), ("redeemed", "redeemed")):
            want = sum(int(n) for f, n in stats.items()
                       if f.startswith(f"{counter}:") and f.endswith(f":{v['venue_id']}"))
            assert v[field] == want, (v["venue_id"], field)
    assert totals["settled"] == 6 and totals["settled_fen"] == 6 * 9900
    assert totals["payable_fen"] == totals["redeemed"] * 9900
    assert doc["budget_fen"] - totals["payable_fen"] == totals["budget_remaining_fen"]
    rows = list(csv.DictReader((out / "statement.csv").read_text(encoding="utf-8-sig")
                               .splitlines()))
    assert rows[-1]["venue_id"] == "TOTAL" and int(rows[-1]["issued"]) == totals["issued"]


def test_reconcile_works_from_the_ledger_with_redis_gone(
        scene: dict, capsys: pytest.CaptureFixture[str]) -> None:
    claims = venue_file(scene, scene["dir"] / "claims.csv")
    assert run(scene, "archive") == 0
    capsys.readouterr()
    rc = cli_ledger.main(["reconcile", "--venue", "V01", "--claims", str(claims), "--out",
                          str(scene["dir"] / "o"), "--redis-url",
                          f"unix://{scene['dir']}/nothing.sock", "--data-dir",
                          str(scene["dir"] / "data")])
    assert rc == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err
    assert json.loads(captured.out)["counts"] == EXPECTED


async def test_real_scripts_end_to_end(redis_url: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Events written by the engine's own Lua scripts archive and reconcile."""
    now = redis_now(redis_url)
    c = cmp.parse_campaign(campaign_toml(quota=1, rounds=[{
        "id": "R1", "opens": now - timedelta(minutes=5), "closes": now + timedelta(hours=1),
        "stock": {"V01": 50, "V02": 50}}]))
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await store.load_campaign(client, c)
    s = store.Store(client, c, Settings(data_dir=tmp_path))
    granted = []
    for i in range(20):
        r = await s.grab("R1", "V01" if i % 4 else "V02", f"m{i}", None)
        granted.append((f"m{i}", r.code, "V01" if i % 4 else "V02"))
    v01 = [g for g in granted if g[2] == "V01"]
    for _, code, _ in v01[:8]:
        assert (await s.redeem("V01", code)).outcome is RedeemOutcome.REDEEMED
    for member, code, _ in v01[8:11]:
        await s.void(member, code)
    with Ledger(tmp_path / "ledger.sqlite3") as led:
        assert await archiver.archive_once(client, led) == 20 + 8 + 3
        redeemed = led.venue_redemptions(c.id, "V01")
        assert len(redeemed) == 8
        claims = tmp_path / "claims.csv"
        claims.write_text("code,redeemed_at,amount_fen\n" + "".join(
            f"{codes.display(code)},{iso(at)},10000\n"
            for code, at in list(redeemed.items())[:7]), encoding="utf-8")
        summary = reconcile.settle(led, "V01", claims, tmp_path / "out")
        assert summary["counts"]["matched"] == 7 and summary["counts"]["unclaimed"] == 1
        doc = reconcile.statement(led, tmp_path / "out")
    stats = await s.stats()
    await s.close()
    v = {x["venue_id"]: x for x in doc["venues"]}
    assert v["V01"]["issued"] == stats["issued:R1:V01"] == 15
    assert v["V01"]["redeemed"] == stats["redeemed:R1:V01"] == 8
    assert v["V01"]["void"] == stats["void:R1:V01"] == 3
    assert v["V01"]["settled"] == 7 and v["V01"]["unclaimed"] == 1
