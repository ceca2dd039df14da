"""Lua scripts as package data, and the named outcome of each return code.

Each script's header lists its return codes; ``tests/test_scripts_sync.py``
keeps these enums and those headers equal. An unknown code is an explicit
``UnknownScriptReply``, never a guess.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from importlib import resources


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


OUTCOMES: dict[str, type[IntEnum]] = {
    "grab": GrabOutcome,
    "redeem": RedeemOutcome,
    "void": VoidOutcome,
    "xfer_out": XferOutOutcome,
    "xfer_in": XferInOutcome,
}


class UnknownScriptReply(RuntimeError):
    """A script answered a code its enum does not know: a deploy mismatch."""


def outcome(script: str, code: int) -> IntEnum:
    enum = OUTCOMES[script]
    try:
        return enum(code)
    except ValueError:
        raise UnknownScriptReply(f"{script}.lua returned unknown code {code!r}") from None


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
