"""The hot path's Redis connection: one pipelined socket per worker, hiredis parsing.

redis-py spends 80-115 us of CPU per EVALSHA (pool checkout, command packing,
response callbacks). Here every command issued during one event-loop turn is
written in a single send, and replies are matched to callers strictly by
position, so a grab costs a few microseconds of Python.

Safety rules this module keeps:

- Replies are matched by the order of a FIFO of futures, never by a caller's
  identity: a cancelled caller's future stays in the FIFO and its reply is
  dropped when it arrives, so no caller ever receives another caller's reply.
- A bounded wait: if the oldest unanswered command is older than ``timeout``,
  the connection is declared dead and every pending caller fails with
  ``WireTimeout``. Their outcome is unknown to us (the script may have run),
  which is what Idempotency-Keys are for.
- Back-pressure: more than ``max_pending`` unanswered commands and new calls
  fail at once with ``WireOverloaded`` instead of queueing without bound.
- Reconnects are lazy and rate limited: after a failure, callers fail fast
  until ``reconnect_delay`` has passed, then the next call reconnects.
- Scripts are loaded on every (re)connect and the server's SHA is compared
  with ours; a ``NOSCRIPT`` reply (script cache flushed under us) is answered
  by resending that one call as EVAL, which is safe because NOSCRIPT means the
  script did not run.

Imports neither aiohttp nor redis-py; only asyncio and hiredis.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from .scripts import Script

log = logging.getLogger("engine.wire")

Arg = str | bytes | int


class WireError(Exception):
    """The store could not be reached or did not answer in time."""


class WireTimeout(WireError):
    pass


class WireOverloaded(WireError):
    pass


class ReplyError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-OOM ...``)."""

    @property
    def prefix(self) -> str:
        return str(self).split(" ", 1)[0]


@dataclass(frozen=True, slots=True)
class Address:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    # The TLS settings (CA, verification, client certificate) as redis-py applies them
    # for the same URL (``connection.tls_context``); None: the system's defaults.
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_url(cls, url: str) -> Address:
        u = urlsplit(url)
        q: dict[str, str] = {k: v[-1] for k, v in parse_qs(u.query).items()}
        user = unquote(u.username) if u.username else None
        pw = unquote(u.password) if u.password else q.get("password")
        if u.scheme == "unix":
            return cls(path=unquote(u.path), db=int(q.get("db", "0")), username=user or None,
                       password=pw)
        if u.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported redis url scheme {u.scheme!r}")
        db = int(u.path.strip("/") or q.get("db", "0"))
        return cls(host=u.hostname or "127.0.0.1", port=u.port or 6379, db=db,
                   username=user or None, password=pw, tls=u.scheme == "rediss")


class Framed(bytes):
    """An argument already framed as a RESP bulk string (see ``framed``)."""


def framed(arg: Arg) -> Framed:
    """Frame a constant argument (a fixed key, a script's SHA) once instead of per call."""
    b = arg if isinstance(arg, bytes) else str(arg).encode()
    return Framed(b"$%d\r\n%s\r\n" % (len(b), b))


_EVALSHA = framed("EVALSHA")
_ASKING = b"*1\r\n$6\r\nASKING\r\n"


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # an ASKING that failed shows up as the next reply's ASK


def _pack(args: Sequence[Arg]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if type(a) is Framed:
            out.append(a)
            continue
        b = a.encode() if type(a) is str else a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    sent_at: float
    # Kept for calls that may need resending as EVAL after NOSCRIPT.
    script: Script | None = None
    keys: Sequence[Arg] = ()
    argv: Sequence[Arg] = ()


class _Protocol(asyncio.Protocol):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ReplyError, encoding="utf-8")
        self.pending: deque[_Pending] = deque()
        self.outbox: list[bytes] = []
        self.closed = False

    def enqueue(self, cmd: bytes) -> None:
        if not self.outbox:
            # Everything the other handlers of this loop turn send goes in one write.
            asyncio.get_running_loop().call_soon(self.flush)
        self.outbox.append(cmd)

    def flush(self) -> None:
        data = b"".join(self.outbox)
        self.outbox.clear()
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not pending:
                # A reply nobody asked for: the stream is out of step; never guess.
                self.wire._fail(self, WireError("unexpected reply from redis"))
                return
            p = pending.popleft()
            if isinstance(reply, ReplyError) and p.script is not None \
                    and reply.prefix == "NOSCRIPT":
                self.wire._resend_as_eval(self, p)
                continue
            if not p.future.done():
                if isinstance(reply, ReplyError):
                    p.future.set_exception(reply)
                else:
                    p.future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.wire._fail(self, WireError(f"redis connection lost: {exc or 'closed'}"))


@dataclass
class Wire:
    """One pipelined connection to one Redis; safe to share by every task of a loop."""

    address: Address
    scripts: Sequence[Script] = ()
    timeout: float = 1.0
    max_pending: int = 10_000
    reconnect_delay: float = 0.1
    _proto: _Protocol | None = field(default=None, init=False)
    _connecting: asyncio.Future[_Protocol] | None = field(default=None, init=False)
    _retry_at: float = field(default=0.0, init=False)
    _last_error: str = field(default="", init=False)
    _watchdog: asyncio.Task[None] | None = field(default=None, init=False)
    _shas: dict[str, Framed] = field(default_factory=dict, init=False)

    @classmethod
    def from_url(cls, url: str, scripts: Sequence[Script] = (), **kw: Any) -> Wire:
        return cls(Address.from_url(url), scripts, **kw)

    # Calls

    async def call(self, *args: Arg, asking: bool = False) -> Any:
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connect()
        if asking:
            self._asking(proto)
        return await self._send(proto, _pack(args))

    async def evalsha(self, script: Script, keys: Sequence[Arg], argv: Sequence[Arg],
                      asking: bool = False) -> Any:
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connect()
        if asking:
            self._asking(proto)
        sha = self._shas.get(script.sha)
        if sha is None:
            sha = self._shas[script.sha] = framed(script.sha)
        cmd = _pack([_EVALSHA, sha, len(keys), *keys, *argv])
        return await self._send(proto, cmd, script, keys, argv)

    def _send(self, proto: _Protocol, cmd: bytes, script: Script | None = None,
              keys: Sequence[Arg] = (), argv: Sequence[Arg] = ()) -> asyncio.Future[Any]:
        if len(proto.pending) >= self.max_pending:
            raise WireOverloaded(f"{len(proto.pending)} redis calls in flight")
        fut = asyncio.get_running_loop().create_future()
        proto.pending.append(_Pending(fut, time.monotonic(), script, keys, argv))
        proto.enqueue(cmd)
        return fut

    def _asking(self, proto: _Protocol) -> None:
        """Cluster hook: ASKING right before the next command on this connection
        (``clusterwire`` follows an ASK redirection). Nothing can come between the
        two: both are queued in the same synchronous step."""
        fut = self._send(proto, _ASKING)
        fut.add_done_callback(_retrieve)

    def _resend_as_eval(self, proto: _Protocol, p: _Pending) -> None:
        assert p.script is not None
        log.warning("redis lost script %s (NOSCRIPT); resending as EVAL", p.script.name)
        # Front of the queue is wrong: replies come in send order, so append.
        cmd = _pack(["EVAL", p.script.source, len(p.keys), *p.keys, *p.argv])
        proto.pending.append(_Pending(p.future, p.sent_at))
        proto.enqueue(cmd)

    # Connection management

    async def _connect(self) -> _Protocol:
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        now = time.monotonic()
        if now < self._retry_at:
            raise WireError(f"redis unavailable ({self._last_error}); retrying shortly")
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            proto = await asyncio.wait_for(self._open(), self.timeout)
        except (TimeoutError, OSError, ReplyError, WireError) as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._retry_at = time.monotonic() + self.reconnect_delay
            log.warning("redis connect failed: %s", self._last_error)
            err = WireError(f"redis unavailable ({self._last_error})")
            self._connecting.set_exception(err)
            self._connecting.exception()  # retrieved: waiters got it via shield
            self._connecting = None
            raise err from exc
        self._proto = proto
        self._connecting.set_result(proto)
        self._connecting = None
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch(), name="redis-wire-watchdog")
        return proto

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        a = self.address
        if a.path:
            _, proto = await loop.create_unix_connection(lambda: _Protocol(self), a.path)
        else:
            ctx = (a.ssl_context or ssl.create_default_context()) if a.tls else None
            _, proto = await loop.create_connection(lambda: _Protocol(self), a.host, a.port,
                                                    ssl=ctx)
        try:
            # The whole handshake in one round trip: a slow Redis costs one delay here.
            setup: list[asyncio.Future[Any]] = []
            if a.password:
                auth = [a.username, a.password] if a.username else [a.password]
                setup.append(self._send(proto, _pack(["AUTH", *auth])))
            if a.db:
                setup.append(self._send(proto, _pack(["SELECT", a.db])))
            loads = [self._send(proto, _pack(["SCRIPT", "LOAD", s.source]))
                     for s in self.scripts]
            await asyncio.gather(*setup, *loads)
            for s, fut in zip(self.scripts, loads):
                if fut.result() != s.sha:
                    raise WireError(f"redis hashed {s.name}.lua as {fut.result()!r}, "
                                    f"expected {s.sha}")
        except BaseException:
            if proto.transport is not None:
                proto.transport.abort()
            raise
        return proto

    def _fail(self, proto: _Protocol, exc: WireError) -> None:
        if self._proto is proto:
            self._proto = None
            self._last_error = str(exc)
        proto.closed = True
        while proto.pending:
            p = proto.pending.popleft()
            if not p.future.done():
                p.future.set_exception(exc)
        if proto.transport is not None:
            proto.transport.abort()

    async def _watch(self) -> None:
        """Declare the connection dead when its oldest call waits past the timeout."""
        tick = min(0.05, self.timeout / 4)
        while True:
            await asyncio.sleep(tick)
            proto = self._proto
            if proto is None or not proto.pending:
                continue
            age = time.monotonic() - proto.pending[0].sent_at
            if age > self.timeout:
                log.warning("redis did not answer within %.2f s; dropping the connection "
                            "(%d calls pending)", self.timeout, len(proto.pending))
                self._retry_at = time.monotonic() + self.reconnect_delay
                self._fail(proto, WireTimeout(f"redis did not answer within {self.timeout} s"))

    @property
    def in_flight(self) -> int:
        proto = self._proto
        return len(proto.pending) if proto is not None else 0

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except asyncio.CancelledError:
                pass
            self._watchdog = None
        proto = self._proto
        if proto is not None:
            self._fail(proto, WireError("closed"))
