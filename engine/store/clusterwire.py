"""The hot path on a Redis Cluster: one pipelined ``Wire`` per primary, routed by slot.

Same interface as ``wire.Wire`` (``call``, ``evalsha``, ``close``,
``in_flight``), so ``Store`` does not know which one it holds.

- The slot map comes from ``CLUSTER SLOTS`` (asked of any known node, seeds
  last) at first use, and again after a redirection or a connection failure.
  Concurrent refreshes share one request.
- A call is routed by the slot of its first key: CRC16 of the key, or of its
  hash tag ``{...}`` when it has one (``redis.crc.key_slot``). Every key of a
  script call must be in that slot; a call whose keys are not is refused here
  with ``CrossSlotError`` before it is sent, and a ``CROSSSLOT`` reply from the
  server is raised as is. Neither is ever retried: both mean a bug in the
  engine's keys, not a passing state of the cluster.
- ``MOVED slot host:port``: the slot lives elsewhere now. The entry is
  corrected at once, a full refresh is started, and the call is resent to the
  new owner. ``ASK slot host:port`` (a slot in migration, the key already
  moved): resent once to that node preceded by ``ASKING``, map unchanged.
  Both replies mean the command did not run, so resending cannot run a script
  twice. At most ``max_redirects`` per call.
- A connection failure or timeout fails the call with ``WireError`` (the
  engine answers 503, clients retry with their Idempotency-Key) and starts a
  refresh, in case the slot has a new primary (failover). The outcome of the
  failed call is unknown, exactly as on a single Redis.

Imports neither aiohttp nor redis-py's clients (only its CRC16).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .scripts import Script
from .wire import Address, Arg, Framed, ReplyError, Wire, WireError

log = logging.getLogger("engine.clusterwire")

SLOTS = REDIS_CLUSTER_HASH_SLOTS


class CrossSlotError(ReplyError):
    """A call whose keys live in different slots; never sent, never retried."""


def _key_bytes(key: Arg) -> bytes:
    if type(key) is Framed:
        # "$<len>\r\n<key>\r\n" -> <key>
        return bytes(key[key.index(b"\r\n") + 2:-2])
    if isinstance(key, bytes):
        return key
    return str(key).encode()


def slot_of(key: Arg) -> int:
    return key_slot(_key_bytes(key))


def _target(exc: ReplyError, default_host: str) -> tuple[int, str, int]:
    """``MOVED 3999 127.0.0.1:6381`` -> (3999, '127.0.0.1', 6381)."""
    _, slot, where = str(exc).split(" ", 2)
    host, _, port = where.strip().rpartition(":")
    return int(slot), host or default_host, int(port)


class ClusterWire:
    """Pipelined hot-path connections to every primary of a Redis Cluster."""

    def __init__(self, seeds: Sequence[Address], scripts: Sequence[Script] = (), *,
                 timeout: float = 1.0, max_pending: int = 10_000,
                 reconnect_delay: float = 0.1, max_redirects: int = 5,
                 refresh_interval: float = 0.2) -> None:
        if not seeds:
            raise ValueError("a cluster needs at least one seed node")
        self.seeds = list(seeds)
        self.scripts = tuple(scripts)
        self.timeout = timeout
        self.max_pending = max_pending
        self.reconnect_delay = reconnect_delay
        self.max_redirects = max_redirects
        self.refresh_interval = refresh_interval
        self._template = self.seeds[0]
        self._wires: dict[tuple[str, int], Wire] = {}
        self._slots: list[Wire | None] = [None] * SLOTS
        self._mapped = False
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self._framed_slots: dict[bytes, int] = {}
        # Counters, for tests and logs.
        self.redirects = 0
        self.refreshes = 0

    # Calls

    async def evalsha(self, script: Script, keys: Sequence[Arg], argv: Sequence[Arg]) -> Any:
        slot = self._slot(keys)
        return await self._routed(
            slot, lambda w, asking: w.evalsha(script, keys, argv, asking=asking))

    async def call(self, *args: Arg) -> Any:
        """A command routed by its first argument after the name (``EXISTS key``,
        ``GET key``); a one-word command (``PING``) goes to any primary."""
        slot = self._slot(args[1:2]) if len(args) > 1 else None
        return await self._routed(slot, lambda w, asking: w.call(*args, asking=asking))

    def _slot(self, keys: Sequence[Arg]) -> int:
        slots = self._framed_slots
        first = -1
        for k in keys:
            if type(k) is Framed:
                s = slots.get(k)
                if s is None:
                    s = slots[k] = slot_of(k)
            else:
                s = key_slot(k.encode() if type(k) is str else _key_bytes(k))
            if first < 0:
                first = s
            elif s != first:
                raise CrossSlotError(
                    f"CROSSSLOT keys of one call in slots {first} and {s} (refused before"
                    " sending; every key of a call must share its campaign's hash tag)")
        if first < 0:
            raise ValueError("a routed call needs a key")
        return first

    async def _routed(self, slot: int | None,
                      send: Callable[[Wire, bool], Awaitable[Any]]) -> Any:
        if not self._mapped:
            await self.refresh()
        w = self._slots[slot] if slot is not None else self._any()
        asking = False
        for _ in range(self.max_redirects + 1):
            if w is None:
                self._refresh_soon()
                raise WireError(f"cluster slot {slot} is served by no known primary")
            try:
                return await send(w, asking)
            except ReplyError as exc:
                prefix = exc.prefix
                if prefix == "MOVED":
                    s, host, port = _target(exc, w.address.host)
                    self.redirects += 1
                    log.info("slot %d moved to %s:%d; resending", s, host, port)
                    w = self._wire(host, port)
                    self._slots[s] = w
                    asking = False
                    self._refresh_soon(force=True)
                    continue
                if prefix == "ASK":
                    _, host, port = _target(exc, w.address.host)
                    self.redirects += 1
                    w = self._wire(host, port)
                    asking = True
                    continue
                raise
            except WireError:
                # The node may be gone for good (failover): learn the map again.
                self._refresh_soon()
                raise
        raise WireError(f"cluster slot {slot}: more than {self.max_redirects} redirections")

    def _any(self) -> Wire | None:
        for w in self._slots:
            if w is not None:
                return w
        return None

    # The slot map

    def _wire(self, host: str, port: int) -> Wire:
        w = self._wires.get((host, port))
        if w is None:
            addr = replace(self._template, host=host, port=port, path=None, db=0)
            w = self._wires[(host, port)] = Wire(
                addr, self.scripts, timeout=self.timeout, max_pending=self.max_pending,
                reconnect_delay=self.reconnect_delay)
        return w

    async def refresh(self) -> None:
        """Learn the slot map again; concurrent callers share one CLUSTER SLOTS."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._refreshing)

    def _refresh_soon(self, force: bool = False) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            return
        if not force and time.monotonic() - self._refreshed_at < self.refresh_interval:
            return
        task = asyncio.ensure_future(self._quiet_refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quiet_refresh(self) -> None:
        try:
            await self.refresh()
        except (WireError, ReplyError, OSError) as exc:
            log.warning("cluster slot map refresh failed: %s", exc)

    async def _refresh(self) -> None:
        self._refreshed_at = time.monotonic()
        known = [w.address for w in self._wires.values()]
        candidates: list[Address] = []
        for a in [*known, *self.seeds]:
            if all((a.host, a.port) != (c.host, c.port) for c in candidates):
                candidates.append(a)
        problems = []
        for a in candidates:
            w = self._wire(a.host, a.port)
            try:
                reply = await w.call("CLUSTER", "SLOTS")
            except (WireError, ReplyError) as exc:
                problems.append(f"{a.host}:{a.port}: {exc}")
                continue
            slots: list[Wire | None] = [None] * SLOTS
            for entry in reply:
                start, end, primary = int(entry[0]), int(entry[1]), entry[2]
                host = str(primary[0]) if primary[0] not in (None, "", "?") else a.host
                owner = self._wire(host, int(primary[1]))
                for s in range(start, end + 1):
                    slots[s] = owner
            self._slots = slots
            self._mapped = True
            self.refreshes += 1
            log.debug("cluster slot map from %s:%d: %d primaries", a.host, a.port,
                      len({id(x) for x in slots if x is not None}))
            return
        raise WireError("no cluster node answered CLUSTER SLOTS: " + "; ".join(problems))

    def owner(self, slot: int) -> Address | None:
        w = self._slots[slot]
        return w.address if w is not None else None

    @property
    def in_flight(self) -> int:
        return sum(w.in_flight for w in self._wires.values())

    async def close(self) -> None:
        for t in list(self._background):
            t.cancel()
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
        for w in list(self._wires.values()):
            await w.close()
