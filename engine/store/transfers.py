"""Stock transfers between stock shards (docs/cluster.md, "Stock shards").

A shard that runs dry takes half of another shard's share of the line in two
journaled steps: ``xfer_out.lua`` in the donor (journals the units under a
transfer id), then ``xfer_in.lua`` in the receiver (credits each id at most
once), then the donor's journal entry is dropped. A sweeper in every worker's
poll finishes transfers a crashed worker left between the two steps.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import shards as shards_mod
from ..errors import Unavailable
from . import scripts
from .connection import guarded, wired
from .keys import Keys
from .scripts import XferInOutcome, XferOutOutcome
from .wire import Wire

log = logging.getLogger("engine.store")

# A transfer journaled in a donor shard and not credited for this long is
# finished by the sweeper (the worker that started it is presumed gone).
TRANSFER_GRACE_MS = 2000


@dataclass(frozen=True, slots=True)
class Transfer:
    """One journaled move of stock between shards (xfer_out.lua, then xfer_in.lua)."""

    id: str
    donor: int
    to: int
    line: str
    units: int


class Transfers:
    """The transfers of one worker; safe to run concurrently with other workers'."""

    def __init__(self, wire: Any, redis: Any, shard_keys: Sequence[Keys], channel: str,
                 time_ms: Callable[[], Awaitable[int]]) -> None:
        self.wire: Wire = wire
        self.redis = redis
        self.shard_keys = list(shard_keys)
        self.channel = channel
        self._time_ms = time_ms
        self._xfer_out = scripts.load("xfer_out")
        self._xfer_in = scripts.load("xfer_in")
        # Transfer ids: unique per process and start, so two workers never share one.
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid()}.{secrets.token_hex(3)}"
        # Per shard, '<round>:<venue>' -> remaining, from the last stock poll: the
        # fullest donor is asked first.
        self.by_shard: list[dict[str, int]] = [{} for _ in self.shard_keys]

    @property
    def shards(self) -> int:
        return len(self.shard_keys)

    async def take_from(self, donor: int, to: int, line: str) -> Transfer | None:
        """Step 1: journal and take half of ``donor``'s share of ``line``; None when
        the donor has none."""
        xid = f"{self._prefix}.{next(self._ids)}"
        keys_, argv = scripts.xfer_out_call(self.shard_keys[donor], line, xid, to)
        reply = await wired(self.wire.evalsha(self._xfer_out, keys_, argv))
        oc = scripts.outcome(XferOutOutcome, int(reply[0]))
        if oc is XferOutOutcome.MOVED:
            return Transfer(xid, donor, to, line, int(reply[2]))
        if oc is XferOutOutcome.BAD_ARGUMENT:
            raise RuntimeError(f"xfer_out.lua refused its arguments: {reply[2]}")
        return None

    async def credit(self, t: Transfer) -> bool:
        """Step 2: credit the receiving shard (a no-op if done before), then drop the
        donor's journal entry. True if this call credited it."""
        keys_, argv = scripts.xfer_in_call(self.shard_keys[t.to], t.line, t.id, t.units,
                                           t.donor, self.channel)
        reply = await wired(self.wire.evalsha(self._xfer_in, keys_, argv))
        oc = scripts.outcome(XferInOutcome, int(reply[0]))
        if oc is XferInOutcome.BAD_ARGUMENT:
            raise RuntimeError(f"xfer_in.lua refused transfer {t.id}: {reply[2]}")
        await wired(self.wire.call("HDEL", self.shard_keys[t.donor].xfer_out, t.id))
        return oc is XferInOutcome.CREDITED

    async def refill(self, line: str, to: int) -> int:
        """Move stock of ``line`` into shard ``to`` from the first donor that has some
        (the fullest by the last poll first); the units moved, 0 if every other shard
        is empty. A donor that fails is skipped; if none gave and one failed, the
        failure is raised (the venue is not known to be sold out)."""
        failed: Unavailable | None = None
        known = {s: self.by_shard[s].get(line, 0) for s in range(self.shards)}
        for donor in shards_mod.donors(to, self.shards, known):
            try:
                t = await self.take_from(donor, to, line)
            except Unavailable as exc:
                failed = exc
                continue
            if t is not None:
                # If this credit fails, the sweeper finishes it: the units are journaled.
                await self.credit(t)
                return t.units
        if failed is not None:
            raise failed
        return 0

    async def pending(self) -> list[tuple[Transfer, int]]:
        """Every transfer journaled in a donor and not yet dropped, with its age in ms
        (by the donor's clock against shard 0's; cluster nodes' clocks agree closely
        enough for a grace of seconds)."""
        now = await self._time_ms()
        out = []
        for donor, k in enumerate(self.shard_keys):
            raw = await guarded(self.redis.hgetall(k.xfer_out))
            for xid, rec in raw.items():
                to, line, units, at = rec.split("|")
                out.append((Transfer(xid, donor, int(to), line, int(units)), now - int(at)))
        return out

    async def sweep(self, grace_ms: int = TRANSFER_GRACE_MS) -> int:
        """Finish transfers whose worker stopped between the two steps (a crash, a
        lost reply); returns how many this call credited. Safe to run anywhere,
        any number of times, concurrently with the transfers themselves."""
        if self.shards == 1:
            return 0
        done = 0
        for t, age in await self.pending():
            if age >= grace_ms:
                if await self.credit(t):
                    log.warning("sweeper credited transfer %s: %d of %s from shard %d to %d",
                                t.id, t.units, t.line, t.donor, t.to)
                    done += 1
        return done
