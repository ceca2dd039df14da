"""Lua scripts as package data, the named outcome of each return code, and each
script's call (its KEYS and ARGV) written once.

Each script's header lists its KEYS, ARGV and return codes;
``tests/test_scripts_sync.py`` keeps these enums and those headers equal. An
unknown code is an explicit ``UnknownScriptReply``, never a guess. The
``*_call`` functions are the only places that put a script's KEYS and ARGV in
order: the store, the model test and the load tools all build calls with them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from importlib import resources
from typing import Protocol, TypeVar

# A script argument: text, bytes, a number, or a pre-framed constant (wire.Framed
# is a bytes subclass).
Arg = str | bytes | int
Call = tuple[list[Arg], list[Arg]]


class GrabOutcome(IntEnum):
    GRANTED = 0
    REPLAYED = 1
    ROUND_NOT_FOUND = 2
    VENUE_NOT_FOUND = 3
    ROUND_NOT_OPEN = 4
    ROUND_CLOSED = 5
    ROUND_QUOTA = 6
    CAMPAIGN_QUOTA = 7
    SOLD_OUT = 8
    IDEMPOTENCY_REUSED = 9
    CODE_COLLISION = 10
    BAD_ARGUMENT = 11
    ROUND_PAUSED = 12


class RedeemOutcome(IntEnum):
    REDEEMED = 0
    NOT_FOUND = 1
    WRONG_VENUE = 2
    ALREADY_REDEEMED = 3
    VOID = 4
    NOT_YET_VALID = 5
    EXPIRED = 6


class VoidOutcome(IntEnum):
    VOIDED = 0
    NOT_FOUND = 1
    ALREADY_REDEEMED = 2
    ALREADY_VOID = 3


class XferOutOutcome(IntEnum):
    MOVED = 0
    EMPTY = 1
    LINE_NOT_FOUND = 2
    BAD_ARGUMENT = 3


class XferInOutcome(IntEnum):
    CREDITED = 0
    ALREADY_CREDITED = 1
    BAD_ARGUMENT = 2


class MarkSoldOutOutcome(IntEnum):
    MARKED = 0
    NOT_LOADED = 1


class ClaimActiveOutcome(IntEnum):
    CLAIMED = 0
    HELD = 1


# The operator controls (docs/operations.md, "Operator controls").

class PauseOutcome(IntEnum):
    PAUSED = 0
    ROUND_NOT_FOUND = 1
    ROUND_NOT_OPEN = 2
    ROUND_CLOSED = 3
    ALREADY_PAUSED = 4


class ResumeOutcome(IntEnum):
    RESUMED = 0
    ROUND_NOT_FOUND = 1
    ROUND_NOT_PAUSED = 2


class CloseOutcome(IntEnum):
    CLOSED = 0
    ROUND_NOT_FOUND = 1
    ROUND_CLOSED = 2


class AddStockOutcome(IntEnum):
    ADDED = 0
    ROUND_NOT_FOUND = 1
    VENUE_NOT_FOUND = 2
    ROUND_CLOSED = 3
    OVER_BUDGET = 4
    BAD_ARGUMENT = 5


class ReverseOutcome(IntEnum):
    REVERSED = 0
    NOT_FOUND = 1
    NOT_REDEEMED = 2
    ALREADY_SETTLED = 3
    BAD_ARGUMENT = 4


class MarkSettledOutcome(IntEnum):
    DONE = 0


class RoundSyncOutcome(IntEnum):
    SYNCED = 0
    ROUND_NOT_FOUND = 1


OUTCOMES: dict[str, type[IntEnum]] = {
    "grab": GrabOutcome,
    "redeem": RedeemOutcome,
    "void": VoidOutcome,
    "xfer_out": XferOutOutcome,
    "xfer_in": XferInOutcome,
    "claim_active": ClaimActiveOutcome,
    "pause": PauseOutcome,
    "resume": ResumeOutcome,
    "close": CloseOutcome,
    "add_stock": AddStockOutcome,
    "reverse": ReverseOutcome,
    "mark_settled": MarkSettledOutcome,
    "round_sync": RoundSyncOutcome,
    "mark_sold_out": MarkSoldOutOutcome,
}


class UnknownScriptReply(RuntimeError):
    """A script answered a code its enum does not know: a deploy mismatch."""


E = TypeVar("E", bound=IntEnum)


# Each script's outcomes by return code: a dict look-up rather than an Enum call
# (0.46 -> 0.04 us), as every grab reads one.
_BY_CODE: dict[type[IntEnum], dict[int, IntEnum]] = {}


def outcome(enum: type[E], code: int) -> E:
    """The named outcome of a script's return code (``enum`` is that script's)."""
    table = _BY_CODE.get(enum)
    if table is None:
        table = _BY_CODE[enum] = {int(m): m for m in enum}
    found = table.get(code)
    if found is None:
        script = next(name for name, e in OUTCOMES.items() if e is enum)
        raise UnknownScriptReply(f"{script}.lua returned unknown code {code!r}")
    return found  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str


@cache
def load(name: str) -> Script:
    """The script ``lua/<name>.lua``, read once per process."""
    source = resources.files("engine.lua").joinpath(f"{name}.lua").read_text("utf-8")
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest())


def all_scripts() -> list[Script]:
    return [load(name) for name in OUTCOMES]


class ShardKeys(Protocol):
    """The key names a script call needs, as ``keys.Keys`` gives them (the store
    passes an object of the same shape whose fixed keys are pre-framed)."""

    @property
    def campaign(self) -> Arg: ...
    @property
    def stock(self) -> Arg: ...
    @property
    def stats(self) -> Arg: ...
    @property
    def events(self) -> Arg: ...
    @property
    def xfer_out(self) -> Arg: ...
    @property
    def xfer_in(self) -> Arg: ...
    def round(self, round_id: str) -> Arg: ...
    def member(self, member_id: str) -> Arg: ...
    def member_coupons(self, member_id: str) -> Arg: ...
    def coupon(self, code: str) -> Arg: ...
    def idempotency(self, member_id: str, key: str) -> Arg: ...
    def venue_redemptions(self, venue_id: str) -> Arg: ...


def grab_call(k: ShardKeys, round_id: str, venue_id: str, member_id: str, code: str,
              idem_key: str, ttl_s: int) -> Call:
    """grab.lua: ``idem_key`` is the request's Idempotency-Key, '' for none."""
    return ([k.campaign, k.round(round_id), k.stock, k.stats, k.member(member_id),
             k.coupon(code), k.idempotency(member_id, idem_key), k.events],
            [round_id, venue_id, member_id, code, idem_key, ttl_s])


def redeem_call(k: ShardKeys, venue_id: str, code: str) -> Call:
    return ([k.coupon(code), k.stats, k.venue_redemptions(venue_id), k.events],
            [venue_id, code])


def void_call(k: ShardKeys, member_id: str, code: str, channel: str) -> Call:
    return ([k.coupon(code), k.stock, k.stats, k.events, k.campaign],
            [member_id, code, channel])


def xfer_out_call(k: ShardKeys, line: str, transfer_id: str, to: int) -> Call:
    return [k.stock, k.xfer_out, k.stats], [line, transfer_id, to]


def xfer_in_call(k: ShardKeys, line: str, transfer_id: str, units: int, donor: int,
                 channel: str) -> Call:
    return [k.stock, k.xfer_in, k.stats], [line, transfer_id, units, donor, channel]


def pause_call(k: ShardKeys, round_id: str, actor: str, reason: str, channel: str) -> Call:
    return [k.round(round_id), k.events], [round_id, actor, reason, channel]


def resume_call(k: ShardKeys, round_id: str, actor: str, reason: str, channel: str) -> Call:
    return [k.round(round_id), k.events], [round_id, actor, reason, channel]


def close_call(k: ShardKeys, round_id: str, actor: str, reason: str, channel: str) -> Call:
    return [k.round(round_id), k.campaign, k.events], [round_id, actor, reason, channel]


def add_stock_call(k: ShardKeys, round_id: str, venue_id: str, units: int, actor: str,
                   reason: str, channel: str) -> Call:
    return ([k.round(round_id), k.campaign, k.stock, k.stats, k.events],
            [round_id, venue_id, units, actor, reason, channel])


def reverse_call(k: ShardKeys, code: str, venue_id: str, actor: str, reason: str) -> Call:
    """reverse.lua: ``venue_id`` is the coupon's venue as the caller read it."""
    return ([k.coupon(code), k.stats, k.venue_redemptions(venue_id), k.events],
            [code, venue_id, actor, reason])


def mark_settled_call(k: ShardKeys, codes_: list[str], at_ms: int,
                      only_redeemed: bool) -> Call:
    """mark_settled.lua over codes of one stock shard (``k``)."""
    return [k.coupon(c) for c in codes_], [at_ms, "1" if only_redeemed else "0"]


def round_sync_call(k: ShardKeys, round_id: str, paused: str, closed: int | None) -> Call:
    """round_sync.lua: ``paused`` is '' (not paused), '*' (paused from the shard's now)
    or the ms it was paused at; ``closed`` the early close, None for none."""
    return [k.round(round_id), k.campaign], [round_id, paused, "" if closed is None else closed]


def claim_active_call(active_key: str, campaign_id: str, stale: str) -> Call:
    return [active_key], [campaign_id, stale]


def mark_sold_out_call(k: ShardKeys, sold_out_key: str, now_ms: int,
                       lines: Sequence[str]) -> Call:
    return [k.campaign, sold_out_key], [now_ms, *lines]


def flat(call: Call) -> list[Arg]:
    """``numkeys, *KEYS, *ARGV`` as EVAL/EVALSHA take them after the script."""
    keys_, argv = call
    return [len(keys_), *keys_, *argv]
