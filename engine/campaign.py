"""Campaign files (contract section 1): parsing and validation, no storage.

``parse_campaign`` turns TOML text into a validated ``Campaign`` or raises
``CampaignError`` naming the first problem found. ``plan_update`` decides what
loading a file over an already loaded campaign may change; the store applies
the plan atomically.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

# \Z, not $: $ also matches before a final newline ("m1\n" is not an id).
ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
VENUE_KINDS = ("ski", "skating", "hot_spring", "snow_park", "scenic")


class CampaignError(ValueError):
    """A campaign file that cannot be loaded; the message names the problem."""


class Venue(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    name: str
    kind: str
    city: str


class Round(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    opens_at_ms: int
    closes_at_ms: int
    member_round_quota: int
    valid_from_ms: int
    valid_until_ms: int
    stock: dict[str, int]


class Campaign(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    name: str
    timezone: str
    budget_fen: int
    face_value_fen: int
    member_price_fen: int
    settlement_fen: int
    member_campaign_quota: int
    venues: tuple[Venue, ...]
    rounds: tuple[Round, ...]

    def venue(self, venue_id: str) -> Venue | None:
        for v in self.venues:
            if v.id == venue_id:
                return v
        return None

    def round(self, round_id: str) -> Round | None:
        for r in self.rounds:
            if r.id == round_id:
                return r
        return None

    @property
    def total_stock(self) -> int:
        return sum(sum(r.stock.values()) for r in self.rounds)

    def fingerprint(self) -> str:
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Campaign)


def to_json(c: Campaign) -> bytes:
    return _encoder.encode(c)


def from_json(data: bytes | str) -> Campaign:
    return _decoder.decode(data)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


# RFC 3339 (section 5.6): a full date, 'T' (or a space), a full time, an offset.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"(?P<offset>[Zz]|[+-][0-9]{2}:[0-9]{2})?")
_EXAMPLE = "2024-12-20T10:00:00+08:00"


def _date_time(value: Any, key: str, where: str) -> datetime:
    """A time of the file: a TOML offset date-time (``opens_at = 2024-12-20T10:00:00+08:00``)
    or an RFC 3339 string (``opens_at = "2024-12-20T10:00:00+08:00"``, as the contract's
    example writes it). Either must carry its UTC offset: a local time is refused, since
    the file's reader cannot know which zone its writer meant."""
    if isinstance(value, str):
        m = _RFC3339.fullmatch(value.strip())
        if m is None:
            raise CampaignError(f"{where}: '{key}' = {value!r} is not an RFC 3339 date-time"
                                f" (write it as {_EXAMPLE!r})")
        if m.group("offset") is None:
            raise CampaignError(f"{where}: '{key}' = {value!r} has no UTC offset"
                                f" (write it as {value.strip()!r} followed by +08:00,"
                                f" e.g. {_EXAMPLE!r})")
        try:
            return datetime.fromisoformat(value.strip().replace("z", "Z"))
        except ValueError:
            raise CampaignError(f"{where}: '{key}' = {value!r} is not a valid date-time")\
                from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise CampaignError(f"{where}: '{key}' = {value.isoformat()} has no UTC offset"
                                f" (write it with its offset, e.g. {_EXAMPLE})")
        return value
    if isinstance(value, date | time):
        raise CampaignError(f"{where}: '{key}' = {value.isoformat()} needs a date, a time"
                            f" and a UTC offset, e.g. {_EXAMPLE}")
    raise CampaignError(f"{where}: '{key}' must be a date-time with a UTC offset, e.g."
                        f" {_EXAMPLE}, got {value!r}")


def _need(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise CampaignError(f"{where}: missing '{key}'")
    value = table[key]
    # bool is an int in Python; the file must say a number.
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise CampaignError(f"{where}: '{key}' must be an integer, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise CampaignError(f"{where}: '{key}' must be a string, got {value!r}")
    if kind is datetime:
        return _date_time(value, key, where)
    return value


def _ident(value: Any, where: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise CampaignError(f"{where}: id {value!r} must be 1-64 characters of A-Za-z0-9_.-")
    return value


def _check_known_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise CampaignError(f"{where}: unknown field(s) {', '.join(unknown)}")


def read_campaign(path: Path) -> Campaign:
    """Read, parse and validate a campaign file, as Notepad, WPS or an editor saved it:
    UTF-8 with or without a byte-order mark. Anything else is refused with what it
    looks like, so the operator knows which "Save as" to choose."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CampaignError(f"cannot read {path}: {exc.strerror}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4096]:
        raise CampaignError(f"{path}: the file is UTF-16 text (Notepad's \"Unicode\");"
                            " save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise CampaignError(f"{path}: line {line} is not UTF-8 text (a GBK/ANSI file?);"
                            " save it as UTF-8") from None
    return parse_campaign(text)


def parse_campaign(text: str) -> Campaign:
    """Parse and validate a campaign file's text."""
    # Windows Notepad starts a UTF-8 file with a byte-order mark, which TOML refuses.
    text = text.removeprefix("\ufeff")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # TOML itself refuses a table defined twice, e.g. a repeated [rounds.stock] key.
        raise CampaignError(f"not valid TOML: {exc}") from None
    _check_known_keys(doc, {"campaign", "venues", "rounds"}, "file")
    head = doc.get("campaign")
    if not isinstance(head, dict):
        raise CampaignError("file: missing [campaign] table")
    _check_known_keys(
        head,
        {"id", "name", "timezone", "budget_fen", "face_value_fen", "member_price_fen",
         "settlement_fen", "member_campaign_quota"},
        "[campaign]",
    )
    cid = _ident(_need(head, "id", str, "[campaign]"), "[campaign]")
    name = _need(head, "name", str, "[campaign]")
    tzname = _need(head, "timezone", str, "[campaign]")
    try:
        ZoneInfo(tzname)
    except (ZoneInfoNotFoundError, ValueError):
        raise CampaignError(f"[campaign]: unknown timezone {tzname!r}") from None
    money = {k: _need(head, k, int, "[campaign]") for k in
             ("budget_fen", "face_value_fen", "member_price_fen", "settlement_fen")}
    for k, v in money.items():
        if v < 0 or (k != "member_price_fen" and v == 0):
            raise CampaignError(f"[campaign]: {k} must be positive, got {v}")
    if money["member_price_fen"] > money["face_value_fen"]:
        raise CampaignError("[campaign]: member_price_fen is above face_value_fen")
    if money["settlement_fen"] > money["face_value_fen"]:
        raise CampaignError("[campaign]: settlement_fen is above face_value_fen")
    quota = _need(head, "member_campaign_quota", int, "[campaign]")
    if quota < 1:
        raise CampaignError(f"[campaign]: member_campaign_quota must be at least 1, got {quota}")

    raw_venues = doc.get("venues", [])
    if not isinstance(raw_venues, list) or not raw_venues:
        raise CampaignError("file: at least one [[venues]] entry is required")
    venues: list[Venue] = []
    seen: set[str] = set()
    for i, v in enumerate(raw_venues, 1):
        where = f"[[venues]] #{i}"
        _check_known_keys(v, {"id", "name", "kind", "city"}, where)
        vid = _ident(_need(v, "id", str, where), where)
        if vid in seen:
            raise CampaignError(f"{where}: duplicate venue id {vid!r}")
        seen.add(vid)
        kind = _need(v, "kind", str, where)
        if kind not in VENUE_KINDS:
            raise CampaignError(f"{where}: kind {kind!r} is not one of {', '.join(VENUE_KINDS)}")
        venues.append(Venue(vid, _need(v, "name", str, where), kind, _need(v, "city", str, where)))

    raw_rounds = doc.get("rounds", [])
    if not isinstance(raw_rounds, list) or not raw_rounds:
        raise CampaignError("file: at least one [[rounds]] entry is required")
    venue_ids = {v.id for v in venues}
    rounds: list[Round] = []
    seen = set()
    for i, r in enumerate(raw_rounds, 1):
        where = f"[[rounds]] #{i}"
        _check_known_keys(
            r, {"id", "opens_at", "closes_at", "member_round_quota", "valid_from",
                "valid_until", "stock"}, where)
        rid = _ident(_need(r, "id", str, where), where)
        where = f"round {rid}"
        if rid in seen:
            raise CampaignError(f"{where}: duplicate round id {rid!r}")
        seen.add(rid)
        opens = _need(r, "opens_at", datetime, where)
        closes = _need(r, "closes_at", datetime, where)
        vfrom = _need(r, "valid_from", datetime, where)
        vuntil = _need(r, "valid_until", datetime, where)
        if closes <= opens:
            raise CampaignError(f"{where}: closes_at {closes} is not after opens_at {opens}")
        if vuntil <= vfrom:
            raise CampaignError(f"{where}: valid_until {vuntil} is not after valid_from {vfrom}")
        # A coupon granted just before the close must still be usable: one that expires
        # while its round still sells would take a member's yuan for nothing.
        if vuntil <= closes:
            raise CampaignError(f"{where}: valid_until {vuntil} is not after closes_at"
                                f" {closes}: its coupons would expire while the round sells them")
        rq = _need(r, "member_round_quota", int, where)
        if rq < 1:
            raise CampaignError(f"{where}: member_round_quota must be at least 1, got {rq}")
        stock = r.get("stock")
        if not isinstance(stock, dict) or not stock:
            raise CampaignError(f"{where}: missing [rounds.stock] table")
        for vid, n in stock.items():
            if vid not in venue_ids:
                raise CampaignError(f"{where}: stock for unknown venue {vid!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise CampaignError(f"{where}: stock for {vid} must be a non-negative integer")
        rounds.append(Round(rid, _ms(opens), _ms(closes), rq, _ms(vfrom), _ms(vuntil),
                            dict(stock)))

    ordered = sorted(rounds, key=lambda x: x.opens_at_ms)
    for a, b in zip(ordered, ordered[1:]):
        if b.opens_at_ms < a.closes_at_ms:
            raise CampaignError(f"round {b.id} overlaps round {a.id}")

    campaign = Campaign(cid, name, tzname, money["budget_fen"], money["face_value_fen"],
                        money["member_price_fen"], money["settlement_fen"], quota,
                        tuple(venues), tuple(rounds))
    total = campaign.total_stock * campaign.settlement_fen
    if total > campaign.budget_fen:
        raise CampaignError(
            f"total stock {campaign.total_stock} x settlement_fen {campaign.settlement_fen}"
            f" = {total} fen is over budget_fen {campaign.budget_fen}")
    return campaign


class RoundChange(msgspec.Struct, frozen=True):
    """Stock increases for one round: venue -> delta (new lines have delta = stock)."""

    round_id: str
    stock_delta: dict[str, int]


class UpdatePlan(msgspec.Struct, frozen=True):
    """What loading ``new`` over ``old`` does; empty when the file is unchanged."""

    new: Campaign
    new_rounds: tuple[str, ...]
    changed_rounds: tuple[RoundChange, ...]
    noop: bool


class Overrides(msgspec.Struct, frozen=True):
    """What operators changed in a loaded campaign, kept apart from the document the
    file loaded (docs/decisions.md, "Operator overrides"): rounds closed early
    (round -> the close, ms) and stock added to lines ('<round>:<venue>' -> units)."""

    closed: dict[str, int] = msgspec.field(default_factory=dict)
    added: dict[str, int] = msgspec.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.closed and not self.added


def with_overrides(c: Campaign, ov: Overrides) -> Campaign:
    """The campaign as the engine runs it: the file's document with the operators'
    changes applied. A round closed early closes then (one that had not opened yet
    opens and closes at that instant: it is cancelled); added stock is part of the
    line's stock."""
    if ov.empty:
        return c
    rounds = []
    for r in c.rounds:
        closes = ov.closed.get(r.id)
        if closes is not None and closes < r.closes_at_ms:
            r = msgspec.structs.replace(r, closes_at_ms=closes,
                                        opens_at_ms=min(r.opens_at_ms, closes))
        extra = {vid: ov.added[f"{r.id}:{vid}"] for vid in r.stock if f"{r.id}:{vid}" in ov.added}
        if extra:
            r = msgspec.structs.replace(
                r, stock={vid: n + extra.get(vid, 0) for vid, n in r.stock.items()})
        rounds.append(r)
    return msgspec.structs.replace(c, rounds=tuple(rounds))


def check_budget(c: Campaign) -> None:
    """Total stock (as run: additions included) x settlement within the budget."""
    total = c.total_stock * c.settlement_fen
    if total > c.budget_fen:
        raise CampaignError(
            f"total stock {c.total_stock} (operators' additions included) x settlement_fen"
            f" {c.settlement_fen} = {total} fen is over budget_fen {c.budget_fen}")


def plan_update(old: Campaign | None, new: Campaign, now_ms: int,
                overrides: Overrides | None = None) -> UpdatePlan:
    """Decide whether ``new`` may replace ``old`` at Redis time ``now_ms``.

    Allowed: new venues, new rounds, descriptive edits (names, cities, kinds,
    campaign name), a larger budget, and more stock (or new stock lines) in
    rounds that have not opened. Everything else could rewrite what members
    already hold or were promised, and is refused.

    ``old`` is the document as loaded from its file; ``overrides`` are the operators'
    changes since, which a reload keeps: a round an operator closed counts as opened
    (its document may not change), and added stock stays added (the budget check
    counts it).
    """
    ov = overrides or Overrides()
    if old is None:
        return UpdatePlan(new, tuple(r.id for r in new.rounds), (), False)
    if old == new:
        return UpdatePlan(new, (), (), True)
    check_budget(with_overrides(new, ov))
    if old.id != new.id:
        raise CampaignError(
            f"this engine holds campaign {old.id!r}; refusing to load campaign {new.id!r}")
    for f in ("timezone", "face_value_fen", "member_price_fen", "settlement_fen",
              "member_campaign_quota"):
        if getattr(old, f) != getattr(new, f):
            raise CampaignError(
                f"[campaign]: {f} cannot change once loaded ({getattr(old, f)!r} -> "
                f"{getattr(new, f)!r})")
    if new.budget_fen < old.budget_fen:
        raise CampaignError("[campaign]: budget_fen cannot be lowered once loaded")
    new_venue_ids = {v.id for v in new.venues}
    for v in old.venues:
        if v.id not in new_venue_ids:
            raise CampaignError(f"venue {v.id} cannot be removed once loaded")
    new_rounds: list[str] = []
    changes: list[RoundChange] = []
    for r in new.rounds:
        prev = old.round(r.id)
        if prev is None:
            if r.opens_at_ms <= now_ms:
                raise CampaignError(f"round {r.id}: a new round must open in the future")
            new_rounds.append(r.id)
            continue
        if r == prev:
            continue
        if prev.opens_at_ms <= now_ms:
            raise CampaignError(f"round {r.id} has opened; it cannot change")
        if r.id in ov.closed:
            raise CampaignError(f"round {r.id} was closed by an operator; it cannot change")
        for f in ("opens_at_ms", "closes_at_ms", "member_round_quota", "valid_from_ms",
                  "valid_until_ms"):
            if getattr(prev, f) != getattr(r, f):
                raise CampaignError(
                    f"round {r.id}: {f.removesuffix('_ms')} cannot change once loaded;"
                    " only stock may be raised before it opens")
        delta: dict[str, int] = {}
        for vid, n in prev.stock.items():
            m = r.stock.get(vid)
            if m is None:
                raise CampaignError(f"round {r.id}: stock line for {vid} cannot be removed")
            if m < n:
                raise CampaignError(f"round {r.id}: stock for {vid} cannot be lowered ({n} -> {m})")
            if m > n:
                delta[vid] = m - n
        for vid, m in r.stock.items():
            if vid not in prev.stock:
                delta[vid] = m
        changes.append(RoundChange(r.id, delta))
    for r in old.rounds:
        if new.round(r.id) is None:
            raise CampaignError(f"round {r.id} cannot be removed once loaded")
    return UpdatePlan(new, tuple(new_rounds), tuple(changes), False)


def shifted_for_demo(c: Campaign, now_ms: int, first_opens_in_s: int = 60) -> Campaign:
    """The sample campaign with its schedule moved so the first round opens soon.

    Gaps between rounds are shortened to keep a demo watchable: each round stays
    open for its own length capped at 30 minutes, the next opens 1 minute later,
    and coupons are valid from the round's opening for 60 days.
    """
    rounds = []
    t = now_ms + first_opens_in_s * 1000
    for r in sorted(c.rounds, key=lambda x: x.opens_at_ms):
        length = min(r.closes_at_ms - r.opens_at_ms, 30 * 60 * 1000)
        rounds.append(msgspec.structs.replace(
            r, opens_at_ms=t, closes_at_ms=t + length, valid_from_ms=t,
            valid_until_ms=t + int(timedelta(days=60).total_seconds() * 1000)))
        t += length + 60 * 1000
    return msgspec.structs.replace(c, rounds=tuple(rounds))
