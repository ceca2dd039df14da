"""The Redis records' field names, and the adapter between a record and typed values.

The Lua scripts read and write these hashes too (their headers name the
fields); everything in Python that reads or builds a coupon or round hash
goes through here, so the names have one home on this side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import campaign as cmp
from .. import codes
from ..campaign import Campaign, Overrides, Round
from ..domain import CouponState

# Coupon hash cpn:{C}:coupon:<code> (grab.lua writes it, redeem.lua and void.lua change it).
C_ROUND = "round"
C_VENUE = "venue"
C_MEMBER = "member"
C_STATUS = "status"
C_ISSUED_AT = "issued_at"
C_VALID_FROM = "valid_from"
C_VALID_UNTIL = "valid_until"
C_CLOSES_AT = "closes_at"  # the round's close: void.lua restocks only before it
C_REDEEMED_AT = "redeemed_at"
C_VOIDED_AT = "voided_at"
C_SETTLED = "settled"  # ms when `settle` paid it (mark_settled.lua); reverse.lua refuses then

# Member hash cpn:{C}:member:<M> (grab.lua writes it, in one HSET per grant): total and
# r:<R> count the coupons granted (never decremented); c holds the member's codes, newest
# first, concatenated (each canonical code is CODE_LEN characters).
M_TOTAL = "total"
M_ROUND_PREFIX = "r:"
M_CODES = "c"
CODE_LEN = codes.CODE_LEN


def member_codes(joined: str | None) -> list[str]:
    """The member hash's ``c`` field as codes, newest first."""
    s = joined or ""
    return [s[i:i + CODE_LEN] for i in range(0, len(s), CODE_LEN)]


# Round hash cpn:{C}:round:<R>: besides round_fields, the operators' pause (pause.lua,
# resume.lua): p = paused since (ms; present only while paused, grab.lua reads it),
# pa / ra = the last pause / resume (ms), kept for the dashboard.
R_PAUSED = "p"
R_PAUSED_AT = "pa"
R_RESUMED_AT = "ra"

# Campaign hash cpn:{C}:campaign: the operators' overrides of the file's document
# (close.lua, add_stock.lua) and a counter bumped by each, so that workers reload.
CLOSED_PREFIX = "closed:"   # closed:<R> -> ms, in every stock shard (void.lua reads it)
ADDED_PREFIX = "added:"     # added:<R>:<V> -> units, shard 0 only
REVISION = "rev"


def campaign_fields(c: Campaign, shard: int, shards: int) -> dict[str, str]:
    """Campaign hash cpn:{C}:campaign of stock shard ``shard``: the quota grab.lua reads
    and the fingerprint of the version loaded; shard 0 also holds the document (what
    says the campaign is loaded) and, when S > 1, the shard count (absent means 1)."""
    out = {"quota": str(c.member_campaign_quota), "fingerprint": c.fingerprint()}
    if shard == 0:
        out.update(id=c.id, doc=cmp.to_json(c).decode())
        if shards > 1:
            out["shards"] = str(shards)
    return out


def overrides_from(fields: Mapping[str, str]) -> Overrides:
    """The operators' overrides held in a shard-0 campaign hash (HGETALL)."""
    closed = {f[len(CLOSED_PREFIX):]: int(v) for f, v in fields.items()
              if f.startswith(CLOSED_PREFIX)}
    added = {f[len(ADDED_PREFIX):]: int(v) for f, v in fields.items()
             if f.startswith(ADDED_PREFIX)}
    return Overrides(closed=closed, added=added)


def override_fields(ov: Overrides, shard: int) -> dict[str, str]:
    """The campaign hash fields that hold ``ov`` in stock shard ``shard`` (restore)."""
    out = {f"{CLOSED_PREFIX}{r}": str(ms) for r, ms in ov.closed.items()}
    if shard == 0:
        out.update({f"{ADDED_PREFIX}{line}": str(n) for line, n in ov.added.items()})
    return out


def effective_campaign(fields: Mapping[str, str]) -> Campaign | None:
    """The campaign as the engine runs it, from a shard-0 campaign hash: the document
    the file loaded with the operators' overrides applied; None without a document."""
    doc = fields.get("doc")
    if not doc:
        return None
    return cmp.with_overrides(cmp.from_json(doc), overrides_from(fields))


def campaign_version(fingerprint: str | None, revision: str | None) -> str | None:
    """What workers compare to know the campaign changed: the loaded file's fingerprint
    and the count of operator changes since."""
    if not fingerprint:
        return None
    return f"{fingerprint}/{revision or 0}"


def round_fields(r: Round) -> dict[str, int]:
    """Round hash cpn:{C}:round:<R>, as grab.lua reads it (HMGET o c q vf vu)."""
    return {"o": r.opens_at_ms, "c": r.closes_at_ms, "q": r.member_round_quota,
            "vf": r.valid_from_ms, "vu": r.valid_until_ms}


def coupon_state(code: str, rec: Mapping[str, str]) -> CouponState:
    """Typed values from a real coupon hash (HGETALL, or a script's reply)."""
    redeemed = rec.get(C_REDEEMED_AT)
    return CouponState(
        code=code, round_id=rec[C_ROUND], venue_id=rec[C_VENUE], member_id=rec[C_MEMBER],
        status=rec[C_STATUS],  # type: ignore[arg-type]
        issued_at_ms=int(rec[C_ISSUED_AT]), valid_from_ms=int(rec[C_VALID_FROM]),
        valid_until_ms=int(rec[C_VALID_UNTIL]),
        redeemed_at_ms=int(redeemed) if redeemed else None)


def coupon_fields(s: CouponState, closes_at_ms: int,
                  voided_at_ms: int | None = None) -> dict[str, str]:
    """The coupon hash the scripts would have left for ``s`` (restore writes it)."""
    out = {C_ROUND: s.round_id, C_VENUE: s.venue_id, C_MEMBER: s.member_id,
           C_STATUS: s.status, C_ISSUED_AT: str(s.issued_at_ms),
           C_VALID_FROM: str(s.valid_from_ms), C_VALID_UNTIL: str(s.valid_until_ms),
           C_CLOSES_AT: str(closes_at_ms)}
    if s.redeemed_at_ms is not None:
        out[C_REDEEMED_AT] = str(s.redeemed_at_ms)
    if voided_at_ms is not None:
        out[C_VOIDED_AT] = str(voided_at_ms)
    return out


def pairs_to_dict(flat: Sequence[Any]) -> dict[str, str]:
    """HGETALL-style flat list (as a script returns it) to a dict of str."""
    def s(x: object) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)
    return {s(flat[i]): s(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def idempotency_record(round_id: str, venue_id: str, code: str, issued_at_ms: int,
                       valid_from_ms: int, valid_until_ms: int) -> str:
    """The value of cpn:{C}:idem:<M>:<key>, as grab.lua writes it:
    '<round>/<venue>|<code>|<issued_at>|<valid_from>|<valid_until>'."""
    return (f"{round_id}/{venue_id}|{code}|{issued_at_ms}|{valid_from_ms}|"
            f"{valid_until_ms}")
