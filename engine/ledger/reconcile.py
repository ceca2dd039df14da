"""Venue claims against the ledger (contract section 5), settlement and statement.

Everything here works on the ledger alone, so it runs with Redis down. The
claims file is streamed: read once for its digest and encoding, then row by row,
classified in batches (one indexed query per chunk of codes) and written to the
report as it goes. What must be remembered across the file (codes seen, codes
paid) is kept in a temporary SQLite database, so memory does not grow with the
file (docs/ledger.md, "Performance").
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from .. import codes
from ..campaign import Campaign, Venue
from ..cliargs import Progress
from .csvsafe import SafeWriter, neutralise, open_report
from .db import Ledger

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


class BadInput(ValueError):
    """Refused before anything is recorded; the CLI answers exit 2."""


class ClaimsFileError(BadInput):
    """The claims file cannot be used at all (missing, unreadable, wrong header)."""


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


# -- reading the claims file ------------------------------------------------------
#
# Venues' accountants export claims from Excel or WPS, or type them in Notepad. What
# those programs write, and what is read (docs/ledger.md, "Claims files"):
# - encoding: UTF-8 with or without a byte-order mark; else, when the whole file is
#   valid GB18030 (the superset of GBK that WPS and Excel write on Chinese Windows),
#   that; else UTF-8 with undecodable bytes replaced (they spoil only their row);
# - a workbook (.xlsx or .xls), UTF-16 text ("Unicode text") or a file whose header is
#   ';'- or tab-separated is refused, saying so and showing the header read;
# - times: yyyy-mm-dd or yyyy/m/d, 'T' or a space, h:mm or h:mm:ss (a fraction allowed),
#   an optional offset (none = the campaign's time zone); a date alone is midnight;
# - amounts: 10000, 10000.00, 10,000 (a fraction other than zero is not an amount);
# - ASCII digits only; a cell written as ="..." (Excel's way to keep text) is its text;
# - one field longer than MAX_FIELD characters spoils its row only.

MAX_FIELD = 131_072          # csv's own default, set explicitly: the row, not the file
ROW_BATCH = 4_500            # rows classified per round of ledger lookups (5 x CHUNK)
WARN_SHARE = 0.01            # more unreadable rows than this: a warning on stderr
WARN_EXAMPLES = 5

_TIME_RE = re.compile(
    r"(?P<y>[0-9]{4})(?P<sep>[-/])(?P<mo>[0-9]{1,2})(?P=sep)(?P<d>[0-9]{1,2})"
    r"(?:(?:[Tt]| +)(?P<h>[0-9]{1,2}):(?P<mi>[0-9]{2})"
    r"(?::(?P<s>[0-9]{2})(?:[.,](?P<f>[0-9]{1,9}))?)?"
    r" *(?P<tz>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?)?")
_AMOUNT_RE = re.compile(r"(?P<int>[0-9]{1,3}(?:,[0-9]{3})+|[0-9]{1,15})(?:\.(?P<frac>[0-9]{1,6}))?")


def _unwrap(text: str) -> str:
    """A cell's text without surrounding blanks, and ="..." read as its text."""
    t = text.strip()
    if len(t) >= 3 and t.startswith('="') and t.endswith('"'):
        t = t[2:-1].strip()
    return t


def _parse_time(text: str, tz: ZoneInfo) -> int | None:
    t = text.strip()
    dt: datetime | None = None
    if t.isascii():
        # The fast path (C): RFC 3339 and the other ISO 8601 forms, as before.
        try:
            dt = datetime.fromisoformat(t)
        except ValueError:
            pass
    if dt is None:
        dt = _spreadsheet_time(_unwrap(t))
        if dt is None:
            return None
    if dt.tzinfo is None:
        # Spreadsheets drop offsets; a bare local time is the campaign's time zone.
        dt = dt.replace(tzinfo=tz)
    return int(dt.timestamp() * 1000)


def _spreadsheet_time(t: str) -> datetime | None:
    """2026/12/2 1:53, 2026-12-02 01:53:07, 2026/12/2T1:53+08:00, ...: ASCII digits only."""
    m = _TIME_RE.fullmatch(t)
    if m is None:
        return None
    g = m.groupdict()
    frac = (g["f"] or "").ljust(6, "0")[:6]
    off = g["tz"]
    zone: timezone | None = None
    if off in ("Z", "z"):
        zone = UTC
    elif off is not None:
        digits = off[1:].replace(":", "")
        minutes = int(digits[:2]) * 60 + int(digits[2:4] or 0)
        if minutes >= 24 * 60:
            return None
        zone = timezone((1 if off[0] == "+" else -1) * timedelta(minutes=minutes))
    try:
        return datetime(int(g["y"]), int(g["mo"]), int(g["d"]), int(g["h"] or 0),
                        int(g["mi"] or 0), int(g["s"] or 0), int(frac), tzinfo=zone)
    except ValueError:
        return None


def _parse_amount(text: str) -> int | None:
    t = text.strip()
    if t.isdigit() and t.isascii() and len(t) <= 15:
        return int(t)  # the usual case, without a regex
    m = _AMOUNT_RE.fullmatch(_unwrap(t))
    if m is None or (m.group("frac") or "0").strip("0"):
        return None
    return int(m.group("int").replace(",", ""))


@dataclass(slots=True)
class Claim:
    line: int
    raw_code: str
    code: str | None          # canonical, None if the row is invalid
    claimed_at_ms: int | None
    amount_fen: int | None
    problem: str = ""         # why the row is invalid


@dataclass(slots=True)
class FileFacts:
    """What one pass over the file's bytes found: its digest, and how to decode it."""

    sha256: str
    size: int
    encoding: str
    errors: str = "strict"


def _looks_like(head: bytes) -> str | None:
    """What a file that is not CSV text looks like, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "an Excel/WPS workbook (.xlsx, a zip archive)"
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        return "an Excel 97-2003 workbook (.xls)"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        return "UTF-16 text (Excel's \"Unicode Text\")"
    return None


def _decodes(path: Path, encoding: str) -> bool:
    dec = codecs.getincrementaldecoder(encoding)()
    with open(path, "rb") as f:
        try:
            for block in iter(lambda: f.read(1 << 20), b""):
                dec.decode(block)
            dec.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def examine(path: Path) -> FileFacts:
    """Digest the file and choose its encoding, reading it a block at a time (the
    decoder is incremental: memory stays one block whatever the size). Files that
    are not UTF-8 are read once more, to see whether they are GB18030 throughout."""
    h = hashlib.sha256()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    utf8_ok = True
    size = 0
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ClaimsFileError(f"cannot read claims file {path}: {exc.strerror}") from None
    with f:
        head = f.read(4096)
        what = _looks_like(head)
        if what:
            raise ClaimsFileError(
                f"{path}: this is {what}, not a CSV file; in Excel or WPS choose"
                " \"Save as\" > \"CSV UTF-8 (comma delimited)\" and send that file")
        block = head
        while block:
            h.update(block)
            size += len(block)
            if utf8_ok:
                try:
                    utf8.decode(block)
                except UnicodeDecodeError:
                    utf8_ok = False
            block = f.read(1 << 20)
    if utf8_ok:
        try:
            utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            utf8_ok = False
    if utf8_ok:
        return FileFacts(h.hexdigest(), size, "utf-8-sig")
    if _decodes(path, "gb18030"):
        return FileFacts(h.hexdigest(), size, "gb18030")
    return FileFacts(h.hexdigest(), size, "utf-8-sig", "replace")


def _refuse_header(path: Path, header: list[str], missing: list[str]) -> ClaimsFileError:
    shown = ",".join(header)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    hint = ""
    joined = ",".join(header)
    lowered = joined.lower()
    if len(header) == 1 and ";" in joined and all(c in lowered for c in REQUIRED_COLUMNS):
        hint = "; it looks ';'-separated (Excel in a locale with a decimal comma): save it" \
               " with commas"
    elif len(header) == 1 and "\t" in joined:
        hint = "; it looks tab-separated (\"Text (Tab delimited)\"): save it as CSV"
    return ClaimsFileError(
        f"{path}: header lacks column(s) {', '.join(missing)} (need"
        f" {','.join(REQUIRED_COLUMNS)}); the header read is {shown!r}{hint}")


class ClaimsReader:
    """The claims of a file, in file order, one row at a time.

    The header is checked on construction (``ClaimsFileError`` before anything is
    classified). Afterwards ``rows`` counts the claims (non-blank rows) and
    ``invalid`` / ``examples`` the unreadable ones, for the warning.
    """

    def __init__(self, path: Path, tz: ZoneInfo, facts: FileFacts,
                 progress: Progress | None = None) -> None:
        self.path, self.tz, self.facts, self.progress = path, tz, facts, progress
        self.rows = 0
        self.invalid = 0
        self.examples: list[tuple[int, str]] = []
        self._raw = open(path, "rb")
        self._limit = csv.field_size_limit(MAX_FIELD)
        try:
            self._text = io.TextIOWrapper(self._raw, encoding=facts.encoding,
                                          errors=facts.errors, newline="")
            self._reader = csv.reader(self._text)
            self._columns = self._header()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._raw.close()
        csv.field_size_limit(self._limit)

    def __enter__(self) -> ClaimsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _header(self) -> tuple[int, int, int]:
        try:
            header = next(self._reader, None)
        except csv.Error as exc:
            raise ClaimsFileError(f"{self.path}: the header is not CSV ({exc})") from None
        if header is None or not any(h.strip() for h in header):
            raise ClaimsFileError(f"{self.path}: empty file, expected a header"
                                  f" {','.join(REQUIRED_COLUMNS)}")
        names = [h.strip().lower() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise _refuse_header(self.path, header, missing)
        ic, it, ia = (names.index(c) for c in REQUIRED_COLUMNS)
        return ic, it, ia

    def _invalid(self, line: int, raw: str, problem: str) -> Claim:
        self.invalid += 1
        if len(self.examples) < WARN_EXAMPLES:
            self.examples.append((line, problem))
        return Claim(line, raw, None, None, None, problem)

    def __iter__(self) -> Iterator[Claim]:
        ic, it, ia = self._columns
        width = max(ic, it, ia)
        reader = self._reader
        prev_end = reader.line_num
        n = 0
        while True:
            try:
                row = next(reader)
                error = None
            except StopIteration:
                return
            except csv.Error as exc:
                row, error = [], str(exc)
            line, prev_end = prev_end + 1, reader.line_num
            n += 1
            if self.progress is not None and n % 4096 == 0:
                self.progress.update(self._raw.tell(), self.facts.size, " bytes")
            if error is not None:
                self.rows += 1
                yield self._invalid(line, "", f"unreadable row: {error}")
                continue
            if not row or all(not c.strip() for c in row):
                continue  # blank lines are not claims
            self.rows += 1
            if len(row) <= width:
                yield self._invalid(line, row[ic] if ic < len(row) else "",
                                    "missing columns")
                continue
            raw, rt, ra = row[ic], row[it], row[ia]
            code = codes.normalize(raw)
            if code is None and '="' in raw:
                code = codes.normalize(_unwrap(raw))
            if code is None:
                yield self._invalid(line, raw, "bad code syntax or check character")
                continue
            at = _parse_time(rt, self.tz)
            if at is None:
                yield self._invalid(line, raw, f"bad redeemed_at {rt.strip()[:40]!r}")
                continue
            amount = _parse_amount(ra)
            if amount is None:
                yield self._invalid(line, raw, f"bad amount_fen {ra.strip()[:40]!r}")
                continue
            yield Claim(line, raw, code, at, amount)

    def warning(self) -> str | None:
        """The stderr warning when more than 1 % of the rows could not be read."""
        if not self.rows or self.invalid <= self.rows * WARN_SHARE:
            return None
        eg = "; ".join(f"line {n}: {why}" for n, why in self.examples)
        return (f"warning: {self.invalid} of {self.rows} rows of {self.path}"
                f" ({100 * self.invalid / self.rows:.1f}%) could not be read and are"
                f" invalid_row, e.g. {eg} (docs/ledger.md, \"Claims files\")")


# -- classification -----------------------------------------------------------------


def _venue(ledger: Ledger, venue_id: str) -> tuple[Campaign, Venue]:
    c = ledger.campaign()
    if c is None:
        raise BadInput("the ledger holds no campaign yet; load one and run archive")
    v = c.venue(venue_id)
    if v is None:
        raise BadInput(f"unknown venue {venue_id!r} in campaign {c.id}")
    return c, v


@dataclass(slots=True)
class Tally:
    """The run's counts, kept as outcomes stream past (summary.json)."""

    venue: Venue
    campaign: Campaign
    claims_sha: str
    counts: dict[str, int] = field(default_factory=lambda: {c: 0 for c in CLASSES})
    claims: int = 0
    time_skew: int = 0
    ledger_redemptions: int = 0
    warning: str | None = None
    # Codes paid to this venue whose redemption was reversed since (and not redeemed
    # again): flagged for the operator.
    settled_not_redeemed: list[str] = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        self.counts[o.cls] += 1
        self.time_skew += o.time_skew
        self.claims += o.line is not None

    def summary(self) -> dict[str, Any]:
        counts = dict(self.counts)
        return {
            "venue_id": self.venue.id,
            "claims": self.claims,
            "ledger_redemptions": self.ledger_redemptions,
            "counts": counts,
            "time_skew": self.time_skew,
            "payable_fen": (counts["matched"] + counts["amount_mismatch"])
            * self.campaign.settlement_fen,
            # Only when there are any: the contract's summary has no such key.
            **({"settled_not_redeemed": [codes.display(c) for c in self.settled_not_redeemed]}
               if self.settled_not_redeemed else {}),
        }


# What must be remembered across the file (codes seen, for duplicates and unclaimed;
# paid codes, for settle) lives in a temporary on-disk SQLite database attached to the
# ledger's connection, so memory stays a page cache whatever the file's size.
_SCRATCH = "scratch"


@contextlib.contextmanager
def _scratch(ledger: Ledger) -> Iterator[None]:
    db = ledger.db
    db.execute(f"ATTACH DATABASE '' AS {_SCRATCH}")  # '': private, deleted on close
    try:
        # Nothing in it outlives the run: no journal to keep, nothing to fsync.
        db.execute(f"PRAGMA {_SCRATCH}.journal_mode = OFF")
        db.execute(f"PRAGMA {_SCRATCH}.synchronous = OFF")
        # 8 MiB of cache (a million codes' worth of pages spill to the temp file beyond it).
        db.execute(f"PRAGMA {_SCRATCH}.cache_size = -8192")
        db.execute(f"CREATE TABLE {_SCRATCH}.seen (code TEXT PRIMARY KEY) WITHOUT ROWID")
        db.execute(f"CREATE TABLE {_SCRATCH}.paid (code TEXT PRIMARY KEY, line INTEGER,"
                   " claimed_fen INTEGER, flagged INTEGER) WITHOUT ROWID")
        yield
    finally:
        ledger.rollback()
        db.execute(f"DETACH DATABASE {_SCRATCH}")


def _seen_before(ledger: Ledger, chunk: list[str], first: bool) -> set[str]:
    if first:
        return set()  # nothing seen yet
    return {r[0] for r in ledger._rows_by_code(f"SELECT code FROM {_SCRATCH}.seen", chunk)}


def _batches(claims: Iterator[Claim], size: int) -> Iterator[list[Claim]]:
    batch: list[Claim] = []
    for c in claims:
        batch.append(c)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def classify(ledger: Ledger, venue_id: str, claims_path: Path,
             emit: Callable[[Outcome], None], progress: Progress | None = None,
             keep_paid: bool = False,
             mark: Callable[[list[str]], set[str] | None] | None = None) -> Tally:
    """Put every claim and every ledger redemption of the venue in one class, in
    order (claims in file order, then unclaimed by time), handing each to ``emit``.

    Call inside a transaction with the scratch database attached (``_scratch``), so
    all lookups see one snapshot of the ledger. With ``keep_paid`` the paid codes are
    kept in scratch.paid, for ``settle``; ``mark`` (settle, Redis reachable) marks a
    batch's codes to pay as settled in Redis before they are emitted, and those whose
    redemption Redis has reversed meanwhile are not paid (not_redeemed). The file is
    read once after its digest: memory does not grow with it.
    """
    campaign, venue = _venue(ledger, venue_id)
    tz = ZoneInfo(campaign.timezone)
    facts = examine(claims_path)
    tally = Tally(venue, campaign, facts.sha256)
    face, pay = campaign.face_value_fen, campaign.settlement_fen

    def out(o: Outcome) -> None:
        tally.add(o)
        emit(o)

    with ClaimsReader(claims_path, tz, facts, progress) as reader:
        for i, batch in enumerate(_batches(iter(reader), ROW_BATCH)):
            valid = list({c.code for c in batch if c.code is not None})
            coupons = ledger.coupons_by_code(valid)
            settled = ledger.settlements_by_code(valid)
            seen = _seen_before(ledger, valid, first=i == 0)
            decided: list[Outcome] = []
            for c in batch:
                if c.code is None:
                    decided.append(Outcome(c.line, "invalid_row", None, c.raw_code, None,
                                           None, None, 0, note=c.problem))
                    continue
                code = c.code
                coupon = coupons.get(code)
                ledger_at = (coupon.redeemed_at_ms if coupon and coupon.venue_id == venue.id
                             else None)
                o = Outcome(c.line, "", code, c.raw_code, c.claimed_at_ms, ledger_at,
                            c.amount_fen, 0)
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
                        o.note += (" (its redemption was reversed"
                                   f" {_fmt(coupon.reversed_at_ms, tz)})")
                else:
                    o.cls = "matched" if c.amount_fen == face else "amount_mismatch"
                    o.paid_fen = pay
                    if o.cls == "amount_mismatch":
                        o.note = f"claimed {c.amount_fen} fen, face value is {face} fen"
                    if (c.claimed_at_ms is not None and coupon.redeemed_at_ms is not None
                            and abs(c.claimed_at_ms - coupon.redeemed_at_ms) > TIME_SKEW_MS):
                        o.time_skew = True
                seen.add(code)
                decided.append(o)
            to_pay = [o for o in decided if o.cls in PAID and o.code]
            missed = mark([o.code for o in to_pay if o.code]) if mark and to_pay else None
            paid: list[tuple[str, int, int, int]] = []
            for o in to_pay:
                if missed and o.code in missed:
                    o.cls, o.paid_fen, o.time_skew = "not_redeemed", 0, False
                    o.note = "its redemption was reversed in Redis before it could be paid"
                elif o.code is not None and o.line is not None:
                    paid.append((o.code, o.line, o.amount_fen or 0,
                                 int(o.cls == "amount_mismatch")))
            for o in decided:
                out(o)
            ledger.db.executemany(f"INSERT OR IGNORE INTO {_SCRATCH}.seen (code) VALUES (?)",
                                  [(code,) for code in valid])
            if keep_paid:
                ledger.db.executemany(
                    f"INSERT INTO {_SCRATCH}.paid (code, line, claimed_fen, flagged)"
                    " VALUES (?, ?, ?, ?)", paid)
        tally.warning = reader.warning()

    # Redemptions paid by an earlier settle were claimed then; they are neither
    # this file's business nor unclaimed.
    open_where = ("FROM coupons WHERE venue_id = ? AND status = 'redeemed' AND campaign_id = ?"
                  " AND code NOT IN (SELECT code FROM settlements WHERE venue_id = ?"
                  " AND campaign_id = ?)")
    args = (venue.id, campaign.id, venue.id, campaign.id)
    tally.ledger_redemptions = ledger.db.execute(f"SELECT count(*) {open_where}",
                                                 args).fetchone()[0]
    tally.settled_not_redeemed = [
        code for code, _v, _s in ledger.settled_not_redeemed(campaign.id, venue.id)]
    for code, at in ledger.db.execute(
            f"SELECT code, redeemed_at_ms {open_where} AND code NOT IN"
            f" (SELECT code FROM {_SCRATCH}.seen) ORDER BY redeemed_at_ms, code", args):
        out(Outcome(None, "unclaimed", code, "", None, at, None, 0,
                    note="redeemed here but not claimed"))
    return tally


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


class _Report:
    """reconciliation.csv, one row per outcome as it is decided. The cells that carry
    outside text (the venue's claimed code and the note quoting its cells; the
    campaign file's venue id and name) are neutralised (csvsafe); the rest are the
    engine's own numbers, classes, codes and times."""

    def __init__(self, staged: _Staged, campaign: Campaign, venue: Venue) -> None:
        self.tz = ZoneInfo(campaign.timezone)
        self.venue_id, self.venue_name = neutralise(venue.id), neutralise(venue.name)
        self.f = open_report(staged.path("reconciliation.csv"))
        self.w = csv.writer(self.f)
        self.w.writerow(RECON_COLUMNS)

    def row(self, o: Outcome) -> None:
        self.w.writerow((
            "" if o.line is None else o.line, o.cls,
            codes.display(o.code) if o.code else "", neutralise(o.raw_code), self.venue_id,
            self.venue_name, _fmt(o.claimed_at_ms, self.tz), _fmt(o.ledger_at_ms, self.tz),
            "" if o.amount_fen is None else o.amount_fen, o.paid_fen,
            "time_skew" if o.time_skew else "", neutralise(o.note)))

    def close(self) -> None:
        self.f.close()


def _write_summary(staged: _Staged, summary: dict[str, Any]) -> None:
    with open(staged.path("summary.json"), "w", encoding="utf-8") as f:
        f.write(summary_json(summary) + "\n")


def _prepare_out(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create output folder {out_dir}: {exc.strerror}") from None


def _run(ledger: Ledger, venue_id: str, claims_path: Path, out_dir: Path,
         begin: Callable[[], None], record: Callable[[Tally, dict[str, Any]], None],
         end: Callable[[], None], warn: Callable[[str], None] | None,
         progress: Progress | None, settling: bool,
         mark: Callable[[list[str]], set[str] | None] | None = None) -> dict[str, Any]:
    """reconcile and settle: one transaction, one pass over the file, the report
    written as the outcomes are decided and renamed into place only once the
    transaction has ended (``end``: rolled back, or committed)."""
    _prepare_out(out_dir)
    campaign, venue = _venue(ledger, venue_id)  # refused before any file is created
    staged = _Staged(out_dir)
    try:
        with _scratch(ledger):
            begin()
            report = _Report(staged, campaign, venue)
            try:
                tally = classify(ledger, venue_id, claims_path, report.row, progress,
                                 keep_paid=settling, mark=mark)
            finally:
                report.close()
                if progress is not None:
                    progress.finish()
            summary = tally.summary()
            record(tally, summary)
            _write_summary(staged, summary)
            end()
    except BaseException:
        staged.discard()
        raise
    staged.commit()
    if tally.warning and warn is not None:
        warn(tally.warning)
    return summary


def reconcile(ledger: Ledger, venue_id: str, claims_path: Path, out_dir: Path,
              warn: Callable[[str], None] | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Classify and write the reports; the ledger is not changed. ``warn`` gets the
    warning about unreadable rows, if any, and ``progress`` the bytes read (the CLI
    prints both on stderr)."""
    # A read snapshot (coupons derived first), rolled back: nothing is recorded.
    return _run(ledger, venue_id, Path(claims_path), out_dir, ledger.read_snapshot,
                lambda tally, summary: None, ledger.rollback, warn, progress, False)


def settle(ledger: Ledger, venue_id: str, claims_path: Path, out_dir: Path,
           now_ms: int | None = None, mark: Marker | None = None,
           warn: Callable[[str], None] | None = None,
           progress: Progress | None = None) -> dict[str, Any]:
    """Reconcile and record the paid codes, all in one transaction.

    The write lock is taken before classifying, so a concurrent settle waits
    and then sees these codes as already settled (duplicate_claim).

    ``mark`` (when Redis is reachable) marks the codes to pay as settled in Redis
    before the commit, so an operator can no longer reverse their redemptions; a
    code whose redemption was reversed in Redis after the ledger last heard of it
    is not marked, and is not paid (not_redeemed). Without Redis the archiver marks
    them on its next pass (docs/ledger.md, "Reversed redemptions").
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    campaign, _ = _venue(ledger, venue_id)
    batch_mark = None if mark is None else \
        (lambda codes_: mark(campaign.id, codes_, now_ms))

    def record(tally: Tally, summary: dict[str, Any]) -> None:
        pay = tally.campaign.settlement_fen
        # A code already paid is skipped by the primary key: each code at most once.
        cur = ledger.db.execute(
            "INSERT OR IGNORE INTO settlements (code, campaign_id, venue_id, settled_at_ms,"
            " claims_file_sha, claims_line, amount_fen, claimed_fen, flagged)"
            f" SELECT code, ?, ?, ?, ?, line, ?, claimed_fen, flagged FROM {_SCRATCH}.paid"
            " ORDER BY line",
            (tally.campaign.id, tally.venue.id, now_ms, tally.claims_sha, pay))
        summary["settled_codes"] = cur.rowcount
        summary["settled_fen"] = cur.rowcount * pay
        summary["claims_sha256"] = tally.claims_sha

    def begin() -> None:
        ledger.begin()
        ledger.derive_coupons()  # under the write lock: no event can slip in before

    return _run(ledger, venue_id, Path(claims_path), out_dir, begin, record,
                ledger.commit, warn, progress, True, batch_mark)


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
    ledger.read_snapshot()
    try:
        totals = ledger.venue_totals(c.id)
        settled_not_redeemed = ledger.settled_not_redeemed(c.id)
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
               for code, venue, status in settled_not_redeemed]
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
        with open_report(staged.path("statement.csv")) as f:
            w = SafeWriter(f)
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
