"""The ledger: a durable SQLite copy of the event stream, and what is derived from it.

Redis is the live truth for grabs and redemptions; the ledger is the record
money is paid from. Every stream entry becomes exactly one ``events`` row
(primary key = the entry's id, qualified by its stock shard when that is not
shard 0: see ``ledger_event_id``), so delivering an entry twice is harmless.
The archiver only appends to ``events``; ``coupons`` is derived from them, in
events' order, by whoever reads it (``derive_coupons``, schema v6): the meta key
``coupons_through`` is the last events rowid applied, so every event is applied
once, and every reader of ``coupons`` derives it first, or reads inside a
snapshot that did (``read_snapshot``), so it never disagrees with ``events``.
The schema uses only portable types (TEXT, INTEGER) so a PostgreSQL backend can
mirror it table for table.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import campaign as cmp
from ..campaign import Campaign, Overrides

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id    TEXT PRIMARY KEY,          -- stream entry id; '<shard>/<id>' for shards >= 1
    campaign_id TEXT NOT NULL,
    type        TEXT NOT NULL,             -- grant | redeem | void | reverse
    code        TEXT NOT NULL,             -- canonical 17-character code
    round_id    TEXT NOT NULL,
    venue_id    TEXT NOT NULL,
    member_id   TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,          -- Redis server time of the change
    restocked   INTEGER,                   -- void only: 1 if the stock went back to an open round
    idem_key    TEXT                       -- grant only: the request's Idempotency-Key, '' = none,
                                           -- NULL = archived before grants carried it
);
CREATE INDEX IF NOT EXISTS events_venue_type ON events (venue_id, type);
-- (No index on events.code: nothing looks events up by code, coupons is keyed by it, and
-- a random-key index cost the archiver more than any other write; v4 drops it.)

CREATE TABLE IF NOT EXISTS coupons (
    code           TEXT PRIMARY KEY,
    campaign_id    TEXT NOT NULL,
    round_id       TEXT NOT NULL,
    venue_id       TEXT NOT NULL,
    member_id      TEXT NOT NULL,
    status         TEXT NOT NULL,          -- issued | redeemed | void
    issued_at_ms   INTEGER,
    redeemed_at_ms INTEGER,
    voided_at_ms   INTEGER,
    reversed_at_ms INTEGER                 -- the last time an operator reversed its redemption
);
CREATE INDEX IF NOT EXISTS coupons_venue_status ON coupons (venue_id, status);

CREATE TABLE IF NOT EXISTS audit (
    event_id    TEXT PRIMARY KEY,          -- the stream entry's id (see events.event_id)
    campaign_id TEXT NOT NULL,
    action      TEXT NOT NULL,             -- pause | resume | close | add_stock | reverse
    round_id    TEXT NOT NULL,
    venue_id    TEXT,                      -- add_stock, reverse
    code        TEXT,                      -- reverse (its events row has the same event_id)
    units       INTEGER,                   -- add_stock
    actor       TEXT NOT NULL,             -- the operator credential's name, or cli:<login>
    at_ms       INTEGER NOT NULL,          -- Redis server time of the action
    reason      TEXT NOT NULL,
    before      TEXT NOT NULL,             -- JSON: what the action changed, before ...
    after       TEXT NOT NULL              -- ... and after
);
CREATE INDEX IF NOT EXISTS audit_round ON audit (campaign_id, round_id);

CREATE TABLE IF NOT EXISTS settlements (
    code            TEXT PRIMARY KEY,      -- a code is paid at most once, ever
    campaign_id     TEXT NOT NULL,
    venue_id        TEXT NOT NULL,
    settled_at_ms   INTEGER NOT NULL,
    claims_file_sha TEXT NOT NULL,
    claims_line     INTEGER,
    amount_fen      INTEGER NOT NULL,      -- what the union pays: settlement_fen
    claimed_fen     INTEGER NOT NULL,      -- what the venue claimed
    flagged         INTEGER NOT NULL DEFAULT 0  -- 1: paid although the claimed amount differed
);
CREATE INDEX IF NOT EXISTS settlements_venue ON settlements (venue_id);

-- The archiver's position in each stream: the last entry of (campaign, stock shard) it
-- archived, written in the transaction that archived it. The next pass reads the stream
-- after it (XRANGE), so this row, not a Redis consumer group, is what makes every entry
-- land exactly once (schema v5; docs/ledger.md, "Archiver").
CREATE TABLE IF NOT EXISTS cursors (
    campaign_id TEXT NOT NULL,
    shard       INTEGER NOT NULL,
    last_ms     INTEGER NOT NULL,          -- the entry id '<ms>-<seq>', as numbers so
    last_seq    INTEGER NOT NULL,          -- that it compares in stream order
    PRIMARY KEY (campaign_id, shard)
);

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Schema v6: the last events rowid whose effect is in coupons. A ledger from before v6
-- kept coupons in step with every event it archived, so it starts at the last event.
INSERT OR IGNORE INTO meta (key, value)
    SELECT 'coupons_through', coalesce(max(rowid), 0) FROM events;
"""

# Later events never move a coupon back to 'issued'; a grant seen after its
# redeem (possible only if entries were replayed out of order) keeps the status.
_UPSERT = {
    "grant": (
        "INSERT INTO coupons (code, campaign_id, round_id, venue_id, member_id, status,"
        " issued_at_ms) VALUES (?, ?, ?, ?, ?, 'issued', ?)"
        " ON CONFLICT (code) DO UPDATE SET issued_at_ms = excluded.issued_at_ms"
    ),
    "redeem": (
        "INSERT INTO coupons (code, campaign_id, round_id, venue_id, member_id, status,"
        " redeemed_at_ms) VALUES (?, ?, ?, ?, ?, 'redeemed', ?)"
        " ON CONFLICT (code) DO UPDATE SET status = 'redeemed',"
        " redeemed_at_ms = excluded.redeemed_at_ms"
    ),
    "void": (
        "INSERT INTO coupons (code, campaign_id, round_id, venue_id, member_id, status,"
        " voided_at_ms) VALUES (?, ?, ?, ?, ?, 'void', ?)"
        " ON CONFLICT (code) DO UPDATE SET"
        " status = CASE WHEN coupons.status = 'redeemed' THEN 'redeemed' ELSE 'void' END,"
        " voided_at_ms = excluded.voided_at_ms"
    ),
    # An operator's reverse: a redeemed coupon is issued again, without its redemption
    # time (SET expressions all read the row as it was).
    "reverse": (
        "INSERT INTO coupons (code, campaign_id, round_id, venue_id, member_id, status,"
        " reversed_at_ms) VALUES (?, ?, ?, ?, ?, 'issued', ?)"
        " ON CONFLICT (code) DO UPDATE SET"
        " status = CASE WHEN coupons.status = 'redeemed' THEN 'issued' ELSE coupons.status END,"
        " redeemed_at_ms = CASE WHEN coupons.status = 'redeemed' THEN NULL"
        " ELSE coupons.redeemed_at_ms END, reversed_at_ms = excluded.reversed_at_ms"
    ),
}
# Stream entries of the operators' controls: an audit row each; a reverse is also an
# events row (it changes a coupon).
AUDIT_ACTIONS = ("pause", "resume", "close", "add_stock", "reverse")

# Only ever forward: two archivers on one ledger may commit overlapping batches in
# either order, and a cursor moved back would only re-read, never skip (still exact).
_ADVANCE_CURSOR = (
    "INSERT INTO cursors (campaign_id, shard, last_ms, last_seq) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (campaign_id, shard) DO UPDATE SET last_ms = excluded.last_ms,"
    " last_seq = excluded.last_seq WHERE (excluded.last_ms, excluded.last_seq) >"
    " (cursors.last_ms, cursors.last_seq)")

_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (event_id, campaign_id, type, code, round_id,"
    " venue_id, member_id, at_ms, restocked, idem_key) VALUES (?,?,?,?,?,?,?,?,?,?)")
_INSERT_AUDIT = (
    "INSERT OR IGNORE INTO audit (event_id, campaign_id, action, round_id, venue_id,"
    " code, units, actor, at_ms, reason, before, after) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
_THROUGH = "coupons_through"
# The page cache while deriving coupons, in KiB: the coupons' code index takes a random
# page per new coupon, and SQLite's default (2 MiB) read pages back from the OS on
# every few hundred once a campaign held some 100,000 coupons. Set for the derivation
# only, so the readers (reconcile, report) keep their memory bounds.
DERIVE_CACHE_KIB = 65536
# Events applied to coupons per chunk: bounds the rows held in memory and, outside a
# caller's transaction, how long a derivation holds the write lock at a time.
DERIVE_CHUNK = 50_000
# A read snapshot retried when the archiver committed between the derivation and it.
SNAPSHOT_TRIES = 20

# SQLite allows 999 bound parameters in old builds; stay under it.
CHUNK = 900


class LedgerError(RuntimeError):
    pass


def ledger_event_id(shard: int, stream_id: str) -> str:
    """The ledger's id of an entry of stock shard ``shard``'s stream.

    Entry ids are unique per stream only, and every shard has its own stream.
    Shard 0 keeps the bare id, so an unsharded campaign's ledger is what it
    always was; other shards' ids are '<shard>/<stream id>', e.g. '2/1700000000000-0'.
    """
    return stream_id if shard == 0 else f"{shard}/{stream_id}"


def split_event_id(event_id: str) -> tuple[int, str]:
    """(shard, stream id) of a ledger event id; the inverse of ``ledger_event_id``."""
    shard, sep, stream_id = event_id.partition("/")
    return (int(shard), stream_id) if sep else (0, event_id)


def stream_id_key(stream_id: str) -> tuple[int, int]:
    """A Redis stream id '<ms>-<seq>' as a sortable (ms, seq): '999-0' < '1000-0'."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def event_id_key(event_id: str) -> tuple[int, int, int]:
    """A ledger event id as a sortable (ms, seq, shard): '999-0' < '1000-0'.

    Within one shard this is that stream's order, which is all that ordering
    events of one coupon or one member needs (both live in one shard). Across
    shards it interleaves by the time Redis added the entries, the shard
    number only breaking ties between identical ids.
    """
    shard, stream_id = split_event_id(event_id)
    return (*stream_id_key(stream_id), shard)


@dataclass(frozen=True, slots=True)
class EventRow:
    """One ``events`` row, as restore reads it."""
    event_id: str
    type: str
    code: str
    round_id: str
    venue_id: str
    member_id: str
    at_ms: int
    restocked: int | None
    idem_key: str | None


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One operator action (``audit`` row)."""
    event_id: str
    action: str
    round_id: str
    venue_id: str | None
    code: str | None
    units: int | None
    actor: str
    at_ms: int
    reason: str
    before: dict[str, Any]
    after: dict[str, Any]


def overrides_of(audits: Iterable[AuditRow]) -> Overrides:
    """The operators' overrides of the campaign document that these actions made (as
    close.lua and add_stock.lua keep them in Redis)."""
    closed: dict[str, int] = {}
    added: dict[str, int] = {}
    for a in audits:
        if a.action == "close":
            closed[a.round_id] = min(a.at_ms, closed.get(a.round_id, a.at_ms))
        elif a.action == "add_stock" and a.venue_id and a.units:
            line = f"{a.round_id}:{a.venue_id}"
            added[line] = added.get(line, 0) + a.units
    return Overrides(closed=closed, added=added)


@dataclass(frozen=True, slots=True)
class CouponRow:
    code: str
    round_id: str
    venue_id: str
    member_id: str
    status: str
    issued_at_ms: int | None
    redeemed_at_ms: int | None
    voided_at_ms: int | None
    reversed_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    code: str
    venue_id: str
    settled_at_ms: int
    claims_file_sha: str
    claims_line: int | None
    amount_fen: int
    claimed_fen: int
    flagged: bool


class Ledger:
    """One SQLite file. Not shared across threads at the same time; the archiver
    hands writes to one worker thread at a time."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so a
        # batch is exactly one transaction and nothing is committed behind our back.
        self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before XTRIM lets Redis forget the entries.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a ledger file written by an older version up to this schema.

        v2 added ``events.idem_key`` (for ``coupon-engine restore``); older rows keep
        NULL there, meaning "not recorded". v3 added ``coupons.reversed_at_ms`` (the
        operators' reverse) and the ``audit`` table (created by SCHEMA). v4 dropped the
        index ``events_code`` (unused, and the archiver's dearest write); an older
        version opening the file creates it again, which is harmless. v5 added the
        ``cursors`` table (created by SCHEMA); a ledger without a row for a shard is
        archived from the start of what its stream holds (archiver.py). v6 derives
        ``coupons`` from ``events`` when read (meta ``coupons_through``, set by SCHEMA to
        the last event of an older file, whose coupons were kept in step).
        """
        self.db.execute("DROP INDEX IF EXISTS events_code")
        for table, column in (("events", "idem_key TEXT"),
                              ("coupons", "reversed_at_ms INTEGER")):
            cols = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column.split()[0] in cols:
                continue
            try:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            except sqlite3.OperationalError as exc:  # another process migrated first
                if "duplicate column" not in str(exc):
                    raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ---------------------------------------------------------

    def begin(self) -> None:
        # IMMEDIATE takes the write lock now, so two settles cannot both see a
        # code as unpaid and both pay it.
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    # -- events ---------------------------------------------------------------

    def insert_events(self, campaign_id: str,
                      entries: Sequence[tuple[str, Mapping[str, str]]],
                      cursor: tuple[int, str] | None = None) -> int:
        """Append stream entries in one transaction; returns how many were new.

        An entry already present (same stream id) is skipped: re-delivery after a crash
        changes nothing. Nothing else is written per event: ``coupons`` is derived from
        ``events`` when read (``derive_coupons``), so the archiver's cost is the append.
        ``cursor`` (shard, stream id): also move that shard's cursor to the id, in the
        same transaction, so the events and the position they end at commit together.
        """
        if not entries and cursor is None:
            return 0
        rows: list[tuple[object, ...]] = []
        audits: list[tuple[str, str, Mapping[str, str]]] = []
        for event_id, f in entries:
            etype = f.get("type", "")
            if etype in AUDIT_ACTIONS:
                audits.append((event_id, etype, f))
            elif etype not in _UPSERT:
                raise LedgerError(f"stream entry {event_id} has unknown type {etype!r}")
            if etype in _UPSERT:
                # Grants carry 'idem' ('' = no key); an event from before that has none.
                rows.append((event_id, campaign_id, etype, f["code"], f["round"],
                             f["venue"], f["member"], int(f["at"]),
                             int(f["restocked"]) if "restocked" in f else None,
                             f.get("idem") if etype == "grant" else None))
        self.begin()
        try:
            before = self.db.total_changes
            self.db.executemany(_INSERT_EVENT, rows)
            new = self.db.total_changes - before
            for event_id, etype, f in audits:
                added = self._insert_audit(campaign_id, event_id, etype, f, int(f["at"]))
                if etype not in _UPSERT:  # a reverse is counted by its events row
                    new += added
            self._advance(campaign_id, cursor)
            self.commit()
        except BaseException:
            self.rollback()
            raise
        return new

    def _advance(self, campaign_id: str, cursor: tuple[int, str] | None) -> None:
        if cursor is not None:
            ms, seq = stream_id_key(cursor[1])
            self.db.execute(_ADVANCE_CURSOR, (campaign_id, cursor[0], ms, seq))

    def cursor(self, campaign_id: str, shard: int) -> str | None:
        """The last stream id of the shard the archiver archived (None: it never
        recorded one, e.g. a ledger written before schema v5)."""
        row = self.db.execute("SELECT last_ms, last_seq FROM cursors WHERE campaign_id = ?"
                              " AND shard = ?", (campaign_id, shard)).fetchone()
        return None if row is None else f"{row[0]}-{row[1]}"

    # -- coupons, derived from events -------------------------------------------

    def _through(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (_THROUGH,)).fetchone()
        return int(row[0]) if row else 0

    def _last_event(self) -> int:
        return self.db.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()[0]

    def coupons_behind(self) -> int:
        """How far ``coupons`` is behind ``events``, in events rowids (0: it agrees)."""
        return self._last_event() - self._through()

    def derive_coupons(self) -> int:
        """Apply the events after ``coupons_through`` to ``coupons``, in events' order;
        returns how many. Outside a transaction it takes the write lock for one chunk of
        ``DERIVE_CHUNK`` events at a time (an archiver waits at most that long); inside
        one, the caller's must be a write transaction (``begin``) and holds them all."""
        own = not self.db.in_transaction
        if self.coupons_behind() <= 0:
            return 0  # up to date (the usual case for a lookup): no pragma, no lock
        (cache,) = self.db.execute("PRAGMA cache_size").fetchone()
        self.db.execute(f"PRAGMA cache_size=-{DERIVE_CACHE_KIB}")
        try:
            applied = 0
            if not own:
                while n := self._derive_chunk():
                    applied += n
                return applied
            while self.coupons_behind() > 0:  # a cheap read, without the write lock
                self.begin()
                try:
                    n = self._derive_chunk()
                    self.commit()
                except BaseException:
                    self.rollback()
                    raise
                if n == 0:
                    break
                applied += n
            return applied
        finally:
            self.db.execute(f"PRAGMA cache_size={cache}")

    def _derive_chunk(self) -> int:
        """One chunk of derive_coupons, inside the caller's transaction: the coupons and
        ``coupons_through`` move together."""
        rows = self.db.execute(
            "SELECT rowid, type, code, campaign_id, round_id, venue_id, member_id, at_ms"
            " FROM events WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (self._through(), DERIVE_CHUNK)).fetchall()
        if not rows:
            return 0
        # Runs of one type, in order: a coupon's events apply in stream order.
        for etype, run in itertools.groupby(rows, key=lambda r: r[1]):
            self.db.executemany(_UPSERT[etype], [r[2:] for r in run])
        self.set_meta(_THROUGH, str(rows[-1][0]))
        return len(rows)

    def read_snapshot(self) -> None:
        """BEGIN a read transaction in which ``coupons`` agrees with ``events``: derive,
        then begin, and again if the archiver committed events in between (the end
        with ``rollback``). Readers (reconcile, statement) hold the write lock only
        while deriving, one chunk at a time."""
        for _ in range(SNAPSHOT_TRIES):
            self.derive_coupons()
            self.db.execute("BEGIN")
            if self.coupons_behind() <= 0:
                return
            self.rollback()
        raise LedgerError(f"the ledger's coupons fell behind its events {SNAPSHOT_TRIES}"
                          " times in a row; is an archiver committing without pause?")

    def _fresh(self) -> None:
        """Before a read of ``coupons``: derive it, or, inside a transaction, check that
        the transaction's start did (settle's ``begin`` + ``derive_coupons``,
        ``read_snapshot``): a stale read there would be a bug, not a race."""
        if not self.db.in_transaction:
            self.derive_coupons()
        elif self.coupons_behind() > 0:
            raise LedgerError("coupons read inside a transaction that did not derive them")

    def _insert_audit(self, campaign_id: str, event_id: str, action: str,
                      f: Mapping[str, str], at: int) -> int:
        units = f.get("units")
        cur = self.db.execute(
            _INSERT_AUDIT,
            (event_id, campaign_id, action, f["round"], f.get("venue"), f.get("code"),
             int(units) if units is not None else None, f["actor"], at, f["reason"],
             f.get("before", "{}"), f.get("after", "{}")))
        return cur.rowcount

    def audit_of(self, campaign_id: str, round_id: str | None = None) -> list[AuditRow]:
        """The campaign's operator actions (of one round), in stream order."""
        sql = ("SELECT event_id, action, round_id, venue_id, code, units, actor, at_ms,"
               " reason, before, after FROM audit WHERE campaign_id = ?")
        args: tuple[str, ...] = (campaign_id,)
        if round_id is not None:
            sql += " AND round_id = ?"
            args += (round_id,)
        rows = [AuditRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                         json.loads(r[9]), json.loads(r[10]))
                for r in self.db.execute(sql, args)]
        rows.sort(key=lambda a: event_id_key(a.event_id))
        return rows

    def audit_count(self, campaign_id: str | None = None) -> int:
        if campaign_id is None:
            return self.db.execute("SELECT count(*) FROM audit").fetchone()[0]
        return self.db.execute("SELECT count(*) FROM audit WHERE campaign_id = ?",
                               (campaign_id,)).fetchone()[0]

    def event_ids(self, campaign_id: str | None = None) -> list[str]:
        if campaign_id is None:
            rows = self.db.execute("SELECT event_id FROM events")
        else:
            rows = self.db.execute("SELECT event_id FROM events WHERE campaign_id = ?",
                                   (campaign_id,))
        return [r[0] for r in rows]

    def event_count(self, campaign_id: str | None = None) -> int:
        if campaign_id is None:
            return self.db.execute("SELECT count(*) FROM events").fetchone()[0]
        return self.db.execute("SELECT count(*) FROM events WHERE campaign_id = ?",
                               (campaign_id,)).fetchone()[0]

    def events_of(self, campaign_id: str) -> list[EventRow]:
        """Every event of the campaign, in stream order (``event_id_key``)."""
        rows = [EventRow(*r) for r in self.db.execute(
            "SELECT event_id, type, code, round_id, venue_id, member_id, at_ms, restocked,"
            " idem_key FROM events WHERE campaign_id = ?", (campaign_id,))]
        rows.sort(key=lambda e: event_id_key(e.event_id))
        return rows

    def shard_positions(self, campaign_id: str) -> dict[int, tuple[str, int]]:
        """shard -> (its last archived stream id, its number of events), for the
        shards the campaign has events of. The guard (``ledger/guard.py``) compares
        them with what Redis's streams say they ever held."""
        out: dict[int, tuple[tuple[int, int], str, int]] = {}
        for (event_id,) in self.db.execute(
                "SELECT event_id FROM events WHERE campaign_id = ?", (campaign_id,)):
            shard, stream_id = split_event_id(event_id)
            ms, _, seq = stream_id.partition("-")
            key = (int(ms), int(seq or 0))
            prev = out.get(shard)
            if prev is None:
                out[shard] = (key, stream_id, 1)
            else:
                out[shard] = (max(prev[0], key), stream_id if key > prev[0] else prev[1],
                              prev[2] + 1)
        return {shard: (last, n) for shard, (_, last, n) in out.items()}

    def event_shards(self, campaign_id: str) -> int:
        """1 + the highest shard among the campaign's events (1 when it has none)."""
        row = self.db.execute(
            "SELECT max(CAST(substr(event_id, 1, instr(event_id, '/') - 1) AS INTEGER))"
            " FROM (SELECT event_id FROM events WHERE campaign_id = ?"
            " UNION SELECT event_id FROM audit WHERE campaign_id = ?)"
            " WHERE instr(event_id, '/') > 0",
            (campaign_id, campaign_id)).fetchone()
        return (row[0] or 0) + 1

    # -- campaign copy ----------------------------------------------------------

    def save_campaign(self, c: Campaign) -> None:
        """Keep the campaign document so reconciliation works with Redis down."""
        doc = cmp.to_json(c).decode()
        cur = self.db.execute("SELECT value FROM meta WHERE key = ?", (f"campaign:{c.id}",))
        row = cur.fetchone()
        active = self.db.execute("SELECT value FROM meta WHERE key = 'active_campaign'").fetchone()
        if row is not None and row[0] == doc and active is not None and active[0] == c.id:
            return
        self.begin()
        try:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                            (f"campaign:{c.id}", doc))
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES"
                            " ('active_campaign', ?)", (c.id,))
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def save_shard_count(self, campaign_id: str, shards: int) -> None:
        """Remember how many stock shards the campaign was loaded with. One shard
        is what an absent entry means, so an unsharded campaign writes nothing."""
        if shards == self.shard_count(campaign_id):
            return
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        (f"shards:{campaign_id}", str(shards)))

    def shard_count(self, campaign_id: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?",
                              (f"shards:{campaign_id}",)).fetchone()
        return int(row[0]) if row else 1

    def source_campaign(self, campaign_id: str | None = None) -> Campaign | None:
        """The campaign document as its file loaded it (what Redis's ``doc`` holds)."""
        if campaign_id is None:
            row = self.db.execute(
                "SELECT value FROM meta WHERE key = 'active_campaign'").fetchone()
            if row is None:
                return None
            campaign_id = row[0]
        row = self.db.execute("SELECT value FROM meta WHERE key = ?",
                              (f"campaign:{campaign_id}",)).fetchone()
        return cmp.from_json(row[0]) if row else None

    def campaign(self, campaign_id: str | None = None) -> Campaign | None:
        """The campaign as it ran: its document with the operators' early closes and
        added stock from the audit rows (what reconciliation, statement and report use)."""
        c = self.source_campaign(campaign_id)
        if c is None:
            return None
        return cmp.with_overrides(c, overrides_of(self.audit_of(c.id)))

    # -- lookups for reconciliation -------------------------------------------

    def _rows_by_code(self, select: str, codes: Iterable[str]) -> Iterator[tuple]:
        """Rows of ``select ... WHERE code IN (...)``, one indexed query per chunk."""
        for chunk in _chunks(list(codes), CHUNK):
            yield from self.db.execute(
                f"{select} WHERE code IN ({','.join('?' * len(chunk))})", chunk)

    def coupons_by_code(self, codes: Iterable[str]) -> dict[str, CouponRow]:
        self._fresh()
        select = ("SELECT code, round_id, venue_id, member_id, status, issued_at_ms,"
                  " redeemed_at_ms, voided_at_ms, reversed_at_ms FROM coupons")
        return {r[0]: CouponRow(*r) for r in self._rows_by_code(select, codes)}

    def settlements_by_code(self, codes: Iterable[str]) -> dict[str, Settlement]:
        select = ("SELECT code, venue_id, settled_at_ms, claims_file_sha, claims_line,"
                  " amount_fen, claimed_fen, flagged FROM settlements")
        return {r[0]: Settlement(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]))
                for r in self._rows_by_code(select, codes)}

    def venue_redemptions(self, campaign_id: str, venue_id: str) -> dict[str, int]:
        """code -> redeemed_at_ms for every coupon redeemed at the venue."""
        self._fresh()
        rows = self.db.execute(
            "SELECT code, redeemed_at_ms FROM coupons WHERE venue_id = ? AND status ="
            " 'redeemed' AND campaign_id = ?", (venue_id, campaign_id))
        return {code: at for code, at in rows}

    def settled_codes(self, campaign_id: str, venue_id: str) -> set[str]:
        rows = self.db.execute(
            "SELECT code FROM settlements WHERE venue_id = ? AND campaign_id = ?",
            (venue_id, campaign_id))
        return {r[0] for r in rows}

    def record_settlements(self, campaign_id: str, rows: Sequence[Settlement]) -> int:
        """Insert inside the caller's transaction; a code already paid is skipped."""
        new = 0
        for s in rows:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO settlements (code, campaign_id, venue_id, settled_at_ms,"
                " claims_file_sha, claims_line, amount_fen, claimed_fen, flagged)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (s.code, campaign_id, s.venue_id, s.settled_at_ms, s.claims_file_sha,
                 s.claims_line, s.amount_fen, s.claimed_fen, int(s.flagged)))
            new += cur.rowcount
        return new

    def settled_at(self, campaign_id: str) -> dict[str, int]:
        """code -> settled_at_ms of every code `settle` paid."""
        return dict(self.db.execute(
            "SELECT code, settled_at_ms FROM settlements WHERE campaign_id = ?", (campaign_id,)))

    def settlements_after(self, campaign_id: str, after_rowid: int
                          ) -> list[tuple[int, str, int]]:
        """(rowid, code, settled_at_ms) of settlements recorded after ``after_rowid``."""
        return list(self.db.execute(
            "SELECT rowid, code, settled_at_ms FROM settlements WHERE campaign_id = ? AND"
            " rowid > ? ORDER BY rowid", (campaign_id, after_rowid)))

    def meta_int(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def settled_not_redeemed(self, campaign_id: str, venue_id: str | None = None
                             ) -> list[tuple[str, str, str]]:
        """(code, venue, status) of codes paid to their venue whose redemption an operator
        reversed since and that are not redeemed again: money paid without a redemption,
        for the operator to resolve (a reverse that came in while settle ran without Redis)."""
        self._fresh()
        sql = ("SELECT s.code, s.venue_id, c.status FROM settlements s JOIN coupons c ON"
               " c.code = s.code WHERE s.campaign_id = ? AND c.status != 'redeemed'")
        args: tuple[str, ...] = (campaign_id,)
        if venue_id is not None:
            sql += " AND s.venue_id = ?"
            args += (venue_id,)
        return list(self.db.execute(sql + " ORDER BY s.code", args))

    def settlement_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM settlements").fetchone()[0]

    # -- statement ----------------------------------------------------------------

    def venue_totals(self, campaign_id: str) -> dict[str, dict[str, int]]:
        """venue -> issued / void / redeemed (from events) and settled / settled_fen."""
        out: dict[str, dict[str, int]] = {}

        def row(v: str) -> dict[str, int]:
            return out.setdefault(v, {"issued": 0, "void": 0, "redeemed": 0, "settled": 0,
                                      "settled_fen": 0, "reversed": 0,
                                      "settled_not_redeemed": 0})

        names = {"grant": "issued", "void": "void", "redeem": "redeemed", "reverse": "reversed"}
        for venue, etype, n in self.db.execute(
                "SELECT venue_id, type, count(*) FROM events WHERE campaign_id = ?"
                " GROUP BY venue_id, type", (campaign_id,)):
            row(venue)[names[etype]] = n
        for t in out.values():
            # A reversed redemption is not a redemption (contract section 5).
            t["redeemed"] -= t["reversed"]
        for _code, venue, _status in self.settled_not_redeemed(campaign_id):
            r = row(venue)
            r["settled_not_redeemed"] = r.get("settled_not_redeemed", 0) + 1
        for venue, n, fen in self.db.execute(
                "SELECT venue_id, count(*), coalesce(sum(amount_fen), 0) FROM settlements"
                " WHERE campaign_id = ? GROUP BY venue_id", (campaign_id,)):
            row(venue)["settled"] = n
            row(venue)["settled_fen"] = fen
        return out


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
