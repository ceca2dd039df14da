"""Venue claims against the ledger (contract section 5), settlement and statement.

Everything here works on the ledger alone, so it runs with Redis down. The
claims file is read row by row; codes are then looked up in chunks with one
indexed query each, so 100,000 claims take about a second, not minutes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from .. import codes
from ..campaign import Campaign, Venue
from .db import Ledger, Settlement

CLASSES = ("matched", "unclaimed", "not_redeemed", "wrong_venue", "unknown_code",
           "duplicate_claim", "amount_mismatch", "invalid_row")
PAID = ("matched", "amount_mismatch")
TIME_SKEW_MS = 10 * 60 * 1000
REQUIRED_COLUMNS = ("code", "redeemed_at", "amount_fen")
RECON_COLUMNS = ("line", "class", "code", "claimed_code", "venue_id", "venue_name",
                 "claimed_redeemed_at", "ledger_redeemed_at", "claimed_amount_fen", "paid_fen",
                 "time_skew", "note")
STATEMENT_COLUMNS = ("venue_id", "venue_name", "kind", "city", "issued", "void", "redeemed",
                     "settled", "unclaimed", "payable_fen", "settled_fen", "outstanding_fen",
                     "reversed", "settled_not_redeemed")
# Marks codes as settled in Redis before settle pays them (reverse.lua then refuses
# them): (campaign id, codes, settled at ms) -> the codes it could not mark because their
# redemption was reversed, or None when Redis cannot be reached.
Marker = Callable[[str, list[str], int], "set[str] | None"]
_AMOUNT_RE = re.compile(r"^\d{1,15}$")


class BadInput(ValueError):
    """Refused before anything is recorded; the CLI answers exit 2."""


class ClaimsFileError(BadInput):
    """The claims file cannot be used at all (missing, unreadable, wrong header)."""


@dataclass(slots=True)
class Claim:
    line: int
    raw_code: str
    code: str | None          # canonical, None if the row is invalid
    claimed_at_ms: int | None
    amount_fen: int | None
    problem: str = ""         # why the row is invalid


@dataclass(slots=True)
class Outcome:
    line: int | None
    cls: str
    code: str | None
    raw_code: str
    claimed_at_ms: int | None
    ledger_at_ms: int | None
    amount_fen: int | None
    paid_fen: int
    time_skew: bool = False
    note: str = ""


@dataclass(slots=True)
class Result:
    venue: Venue
    campaign: Campaign
    claims_sha: str
    outcomes: list[Outcome] = field(default_factory=list)
    ledger_redemptions: int = 0
    # Codes paid to this venue whose redemption was reversed since (and not redeemed
    # again): flagged for the operator.
    settled_not_redeemed: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        counts = {c: 0 for c in CLASSES}
        skew = 0
        for o in self.outcomes:
            counts[o.cls] += 1
            skew += o.time_skew
        return {
            "venue_id": self.venue.id,
            "claims": sum(1 for o in self.outcomes if o.line is not None),
            "ledger_redemptions": self.ledger_redemptions,
            "counts": counts,
            "time_skew": skew,
            "payable_fen": (counts["matched"] + counts["amount_mismatch"])
            * self.campaign.settlement_fen,
            # Only when there are any: the contract's summary has no such key.
            **({"settled_not_redeemed": [codes.display(c) for c in self.settled_not_redeemed]}
               if self.settled_not_redeemed else {}),
        }


# -- reading the claims file ------------------------------------------------------


def _parse_time(text: str, tz: ZoneInfo) -> int | None:
    t = text.strip()
    if not t:
        return None
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        return None
    if dt.tzinfo is None:
        # Spreadsheets drop offsets; a bare local time is the campaign's time zone.
        dt = dt.replace(tzinfo=tz)
    return int(dt.timestamp() * 1000)


def read_claims(path: Path, tz: ZoneInfo) -> Iterator[Claim]:
    """Claims in file order; the header is checked before the first row is yielded."""
    try:
        # utf-8-sig drops the BOM spreadsheets write; undecodable bytes become
        # U+FFFD, which only matters if they sit in a column we read (then the
        # row is invalid) rather than refusing a whole file over a name column.
        f = open(path, newline="", encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise ClaimsFileError(f"cannot read claims file {path}: {exc.strerror}") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise ClaimsFileError(f"{path}: not a CSV file ({exc})") from None
        if header is None:
            raise ClaimsFileError(f"{path}: empty file, expected a header"
                                  f" {','.join(REQUIRED_COLUMNS)}")
        names = [h.strip().lower() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ClaimsFileError(f"{path}: header lacks column(s) {', '.join(missing)}"
                                  f" (need {','.join(REQUIRED_COLUMNS)})")
        ic, it, ia = (names.index(c) for c in REQUIRED_COLUMNS)
        width = max(ic, it, ia)
        prev_end = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise ClaimsFileError(f"{path}: line {reader.line_num}: {exc}") from None
            line, prev_end = prev_end + 1, reader.line_num
            if not row or all(not c.strip() for c in row):
                continue  # blank lines are not claims
            if len(row) <= width:
                yield Claim(line, row[ic] if ic < len(row) else "", None, None, None,
                            "missing columns")
                continue
            raw, rt, ra = row[ic], row[it], row[ia]
            code = codes.normalize(raw)
            if code is None:
                yield Claim(line, raw, None, None, None, "bad code syntax or check character")
                continue
            at = _parse_time(rt, tz)
            if at is None:
                yield Claim(line, raw, None, None, None, f"bad redeemed_at {rt.strip()!r}")
                continue
            a = ra.strip()
            if not _AMOUNT_RE.match(a):
                yield Claim(line, raw, None, None, None, f"bad amount_fen {a!r}")
                continue
            yield Claim(line, raw, code, at, int(a))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- classification -----------------------------------------------------------------


def _venue(ledger: Ledger, venue_id: str) -> tuple[Campaign, Venue]:
    c = ledger.campaign()
    if c is None:
        raise BadInput("the ledger holds no campaign yet; load one and run archive")
    v = c.venue(venue_id)
    if v is None:
        raise BadInput(f"unknown venue {venue_id!r} in campaign {c.id}")
    return c, v


def classify(ledger: Ledger, venue_id: str, claims_path: Path) -> Result:
    """Put every claim and every ledger redemption of the venue in one class.

    Call inside a transaction so all lookups see one snapshot of the ledger.
    """
    campaign, venue = _venue(ledger, venue_id)
    tz = ZoneInfo(campaign.timezone)
    claims = list(read_claims(claims_path, tz))
    result = Result(venue, campaign, file_sha256(claims_path))
    valid = {c.code for c in claims if c.code is not None}
    coupons = ledger.coupons_by_code(valid)
    settled = ledger.settlements_by_code(valid)
    redemptions = ledger.venue_redemptions(campaign.id, venue.id)
    settled_here = ledger.settled_codes(campaign.id, venue.id)
    face, pay = campaign.face_value_fen, campaign.settlement_fen

    seen: set[str] = set()
    out = result.outcomes
    for c in claims:
        if c.code is None:
            out.append(Outcome(c.line, "invalid_row", None, c.raw_code, None, None, None, 0,
                               note=c.problem))
            continue
        code = c.code
        coupon = coupons.get(code)
        ledger_at = coupon.redeemed_at_ms if coupon and coupon.venue_id == venue.id else None
        o = Outcome(c.line, "", code, c.raw_code, c.claimed_at_ms, ledger_at, c.amount_fen, 0)
        if code in seen:
            o.cls, o.note = "duplicate_claim", "claimed again in this file"
        elif code in settled:
            s = settled[code]
            o.cls = "duplicate_claim"
            o.note = (f"already settled {_fmt(s.settled_at_ms, tz)}"
                      f" (claims file sha256 {s.claims_file_sha[:12]})")
        elif coupon is None:
            o.cls = "unknown_code"
        elif coupon.venue_id != venue.id:
            o.cls, o.note = "wrong_venue", "the coupon belongs to another venue"
        elif coupon.status != "redeemed":
            o.cls, o.note = "not_redeemed", f"ledger status {coupon.status}"
            if coupon.reversed_at_ms is not None:
                o.note += f" (its redemption was reversed {_fmt(coupon.reversed_at_ms, tz)})"
        else:
            o.cls = "matched" if c.amount_fen == face else "amount_mismatch"
            o.paid_fen = pay
            if o.cls == "amount_mismatch":
                o.note = f"claimed {c.amount_fen} fen, face value is {face} fen"
            if (c.claimed_at_ms is not None and coupon.redeemed_at_ms is not None
                    and abs(c.claimed_at_ms - coupon.redeemed_at_ms) > TIME_SKEW_MS):
                o.time_skew = True
        seen.add(code)
        out.append(o)

    # Redemptions paid by an earlier settle were claimed then; they are neither
    # this file's business nor unclaimed.
    open_redemptions = {k: v for k, v in redemptions.items() if k not in settled_here}
    result.ledger_redemptions = len(open_redemptions)
    result.settled_not_redeemed = [
        code for code, _v, _s in ledger.settled_not_redeemed(campaign.id, venue.id)]
    for code, at in sorted(open_redemptions.items(), key=lambda kv: (kv[1], kv[0])):
        if code not in seen:
            out.append(Outcome(None, "unclaimed", code, "", None, at, None, 0,
                               note="redeemed here but not claimed"))
    return result


# -- output --------------------------------------------------------------------------


def _fmt(ms: int | None, tz: ZoneInfo) -> str:
    if ms is None:
        return ""
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(tz)
    return dt.isoformat(timespec="milliseconds")


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, ensure_ascii=False, indent=2)


class _Staged:
    """Output files written under a temporary name and renamed only on success,
    so a refused or failed run leaves no half-written report behind."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files: list[tuple[Path, Path]] = []

    def path(self, name: str) -> Path:
        final = self.out_dir / name
        tmp = self.out_dir / f".{name}.{os.getpid()}.tmp"
        self.files.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self.files:
            os.replace(tmp, final)

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)


def _write_outputs(result: Result, staged: _Staged, summary: dict[str, Any]) -> None:
    tz = ZoneInfo(result.campaign.timezone)
    v = result.venue
    with open(staged.path("reconciliation.csv"), "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(RECON_COLUMNS)
        for o in result.outcomes:
            w.writerow((
                "" if o.line is None else o.line, o.cls,
                codes.display(o.code) if o.code else "", o.raw_code, v.id, v.name,
                _fmt(o.claimed_at_ms, tz), _fmt(o.ledger_at_ms, tz),
                "" if o.amount_fen is None else o.amount_fen, o.paid_fen,
                "time_skew" if o.time_skew else "", o.note))
    with open(staged.path("summary.json"), "w", encoding="utf-8") as f:
        f.write(summary_json(summary) + "\n")


def _prepare_out(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create output folder {out_dir}: {exc.strerror}") from None


def reconcile(ledger: Ledger, venue_id: str, claims_path: Path,
              out_dir: Path) -> dict[str, Any]:
    """Classify and write the reports; the ledger is not changed."""
    _prepare_out(out_dir)
    ledger.db.execute("BEGIN")  # a read snapshot, rolled back: nothing is recorded
    try:
        result = classify(ledger, venue_id, Path(claims_path))
    finally:
        ledger.rollback()
    summary = result.summary()
    staged = _Staged(out_dir)
    try:
        _write_outputs(result, staged, summary)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return summary


def settle(ledger: Ledger, venue_id: str, claims_path: Path, out_dir: Path,
           now_ms: int | None = None, mark: Marker | None = None) -> dict[str, Any]:
    """Reconcile and record the paid codes, all in one transaction.

    The write lock is taken before classifying, so a concurrent settle waits
    and then sees these codes as already settled (duplicate_claim).

    ``mark`` (when Redis is reachable) marks the codes to pay as settled in Redis
    before the commit, so an operator can no longer reverse their redemptions; a
    code whose redemption was reversed in Redis after the ledger last heard of it
    is not marked, and is not paid (not_redeemed). Without Redis the archiver marks
    them on its next pass (docs/ledger.md, "Reversed redemptions").
    """
    _prepare_out(out_dir)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    staged = _Staged(out_dir)
    ledger.begin()
    try:
        result = classify(ledger, venue_id, Path(claims_path))
        pay = result.campaign.settlement_fen
        to_pay = [o for o in result.outcomes if o.cls in PAID and o.code]
        missed = mark(result.campaign.id, [o.code for o in to_pay if o.code], now_ms) \
            if mark is not None and to_pay else None
        for o in to_pay:
            if missed and o.code in missed:
                o.cls, o.paid_fen, o.time_skew = "not_redeemed", 0, False
                o.note = "its redemption was reversed in Redis before it could be paid"
        summary = result.summary()
        rows = [Settlement(o.code, result.venue.id, now_ms, result.claims_sha, o.line, pay,
                           o.amount_fen or 0, o.cls == "amount_mismatch")
                for o in result.outcomes if o.cls in PAID and o.code]
        recorded = ledger.record_settlements(result.campaign.id, rows)
        summary["settled_codes"] = recorded
        summary["settled_fen"] = recorded * pay
        summary["claims_sha256"] = result.claims_sha
        _write_outputs(result, staged, summary)
        ledger.commit()
    except BaseException:
        ledger.rollback()
        staged.discard()
        raise
    staged.commit()
    return summary


# -- statement --------------------------------------------------------------------


def statement(ledger: Ledger, out_dir: Path) -> dict[str, Any]:
    """Per-venue counts and money, and campaign totals against the budget.

    payable_fen   = redeemed x settlement_fen: what the union owes for every
                    redemption in the ledger, claimed or not.
    settled_fen   = what settle has recorded as paid.
    outstanding_fen = payable_fen - settled_fen.
    unclaimed     = redeemed - settled: redemptions not yet settled.
    """
    c = ledger.campaign()
    if c is None:
        raise BadInput("the ledger holds no campaign yet; load one and run archive")
    _prepare_out(out_dir)
    ledger.db.execute("BEGIN")
    try:
        totals = ledger.venue_totals(c.id)
    finally:
        ledger.rollback()
    pay = c.settlement_fen
    venues: list[dict[str, Any]] = []
    known = [v.id for v in c.venues]
    for vid in known + sorted(set(totals) - set(known)):
        t = totals.get(vid, {"issued": 0, "void": 0, "redeemed": 0, "settled": 0,
                             "settled_fen": 0, "reversed": 0, "settled_not_redeemed": 0})
        v = c.venue(vid)
        # Redemptions settled that still stand; a settled code whose redemption was
        # reversed is paid without one (settled_not_redeemed, flagged).
        standing = t["settled"] - t["settled_not_redeemed"]
        venues.append({
            "venue_id": vid, "venue_name": v.name if v else "", "kind": v.kind if v else "",
            "city": v.city if v else "",
            "issued": t["issued"], "void": t["void"], "redeemed": t["redeemed"],
            "settled": t["settled"], "unclaimed": t["redeemed"] - standing,
            "payable_fen": t["redeemed"] * pay, "settled_fen": t["settled_fen"],
            "outstanding_fen": t["redeemed"] * pay - t["settled_fen"],
            "reversed": t["reversed"], "settled_not_redeemed": t["settled_not_redeemed"],
        })
    sums = {k: sum(v[k] for v in venues) for k in
            ("issued", "void", "redeemed", "settled", "unclaimed", "payable_fen",
             "settled_fen", "outstanding_fen", "reversed", "settled_not_redeemed")}
    flagged = [{"code": codes.display(code), "venue_id": venue, "status": status}
               for code, venue, status in ledger.settled_not_redeemed(c.id)]
    # Every issued coupon that is not void may still be redeemed and paid.
    exposure = (sums["issued"] - sums["void"]) * pay
    doc = {
        "campaign_id": c.id, "campaign_name": c.name, "settlement_fen": pay,
        "face_value_fen": c.face_value_fen, "budget_fen": c.budget_fen,
        "venues": venues,
        # Codes paid whose redemption an operator reversed and that are not redeemed
        # again: money paid without a redemption, for the operator to resolve.
        "settled_not_redeemed": flagged,
        "totals": {**sums, "max_exposure_fen": exposure,
                   "budget_remaining_fen": c.budget_fen - sums["payable_fen"],
                   "budget_used_pct": round(100 * sums["payable_fen"] / c.budget_fen, 4)},
    }
    staged = _Staged(out_dir)
    try:
        with open(staged.path("statement.csv"), "w", newline="", encoding="utf-8-sig") as f:
            w = csv.writer(f)
            w.writerow(STATEMENT_COLUMNS)
            for row in venues:
                w.writerow([row[k] for k in STATEMENT_COLUMNS])
            w.writerow(["TOTAL", c.name, "", ""] + [sums[k] for k in STATEMENT_COLUMNS[4:]])
        with open(staged.path("statement.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return doc


def statement_text(doc: dict[str, Any]) -> str:
    """A few lines for people; the files hold the detail."""
    def yuan(fen: int) -> str:
        return f"{fen / 100:,.2f}"

    t = doc["totals"]
    lines = [f"{doc['campaign_name']} ({doc['campaign_id']})"]
    for v in doc["venues"]:
        lines.append(
            f"  {v['venue_id']:<8} {v['venue_name']}: issued {v['issued']}, void {v['void']},"
            f" redeemed {v['redeemed']}, settled {v['settled']}, payable {yuan(v['payable_fen'])}"
            f" yuan, outstanding {yuan(v['outstanding_fen'])} yuan")
    lines.append(
        f"  total: issued {t['issued']}, void {t['void']}, redeemed {t['redeemed']},"
        f" settled {t['settled']}; payable {yuan(t['payable_fen'])} of budget"
        f" {yuan(doc['budget_fen'])} yuan ({t['budget_used_pct']}%), max exposure"
        f" {yuan(t['max_exposure_fen'])} yuan")
    if t.get("reversed"):
        lines.append(f"  {t['reversed']} redemption(s) reversed by operators (not counted as"
                     " redeemed)")
    for f in doc.get("settled_not_redeemed", []):
        lines.append(f"  WARNING: {f['code']} ({f['venue_id']}) was paid but its redemption"
                     f" was reversed; it is {f['status']} now: settle it with the venue")
    return "\n".join(lines)
