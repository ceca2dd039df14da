"""Bounded client connections for a serving worker: a deadline for request headers, a
cap on open connections, and the descriptor limit raised to fit the cap.

aiohttp has no header-read timeout (its old ``slow_request_timeout`` is gone; only
``keepalive_timeout`` is left, and in aiohttp 3.14 that defaults to an hour), so a
socket that sends nothing, or stops in the middle of its headers, is held for as long
as the keep-alive timer allows; tens of thousands of them use up a worker's
descriptors. ``GuardedHandler`` is aiohttp's ``RequestHandler`` with two additions:

- **Header deadline** (``client_timeout_s``, 10 s): a connection must deliver the
  complete headers of a request within that time of connecting, or, on a kept-alive
  connection, of the first byte of its next request (hyper's rule). Otherwise it is
  closed. Between requests an idle connection keeps the keep-alive timeout (75 s),
  so clients that keep connections alive keep working.
- **Connection cap** (``max_connections`` per worker): a connection beyond it is
  closed at once, the newest first (those already open are mid-conversation), with
  one log line per ``LOG_EVERY_S`` at most, counting what was closed since.

The body of a request has its own deadline in the handlers (``handlers.read_body``).
``GuardedSite`` listens like ``web.TCPSite`` (SO_REUSEPORT, backlog) but builds a
``GuardedHandler`` for each connection.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("engine.http.guard")

LOG_EVERY_S = 10.0
# Descriptors a worker needs beside its client connections: Redis pool, wire,
# metrics files, logs.
SPARE_FDS = 1024


@dataclass(slots=True)
class ConnectionGuard:
    """The limits and the shared count of one worker's open client connections."""

    client_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 10_000
    open: int = 0
    refused: int = 0
    timed_out: int = 0
    _refused_unlogged: int = 0
    _next_log: float = field(default=0.0)

    def admit(self) -> bool:
        """Count a new connection in, unless the worker is at its cap."""
        if self.open >= self.max_connections:
            self.refused += 1
            self._refused_unlogged += 1
            now = time.monotonic()
            if now >= self._next_log:
                self._next_log = now + LOG_EVERY_S
                log.warning("%d open connections, the most this worker holds "
                            "(COUPON_MAX_CONNECTIONS); closed %d new ones since the last "
                            "report", self.open, self._refused_unlogged)
                self._refused_unlogged = 0
            return False
        self.open += 1
        return True


class GuardedHandler(RequestHandler):
    """aiohttp's request handler with a header deadline and the connection cap."""

    __slots__ = ("_guard", "_admitted", "_deadline", "_busy")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard,
                 **kwargs: Any) -> None:
        super().__init__(manager, keepalive_timeout=guard.keepalive_timeout_s, **kwargs)
        self._guard = guard
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None
        # A request's headers are in and its answer is not yet sent.
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._guard.admit():
            self.force_close()
            return
        self._admitted = True
        self._arm()  # the first request's headers are due from now

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._admitted:
            self._admitted = False
            self._guard.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count > before:
            # Complete headers (a request, or a parse error aiohttp answers 400).
            self._busy = True
            self._disarm()
        elif data and not self._busy:
            # The first bytes of a next request: its headers are due from now.
            self._arm()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            # Answered: the connection is idle (keep-alive timer) until its next bytes.
            self._busy = False

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self._loop.call_later(self._guard.client_timeout_s,
                                                   self._headers_overdue)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_overdue(self) -> None:
        self._deadline = None
        if self._busy or self._request_in_progress or self._messages:
            return
        self._guard.timed_out += 1
        self.force_close()


class GuardedSite(web.BaseSite):
    """A TCP listening site whose connections are ``GuardedHandler``s."""

    __slots__ = ("_host", "_port", "_reuse_port", "_guard")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard,
                 *, backlog: int = 4096, reuse_port: bool = True) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        guard = self._guard

        def handler() -> GuardedHandler:
            return GuardedHandler(server, guard=guard, loop=loop, access_log=None)

        self._server = await loop.create_server(
            handler, self._host, self._port, backlog=self._backlog,
            reuse_port=self._reuse_port)


def raise_fd_limit(connections: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards ``connections`` + spare, up to
    the hard limit (all an unprivileged process may do); (soft before, soft after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + SPARE_FDS
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit to %d: %s", target, exc)
            return soft, soft
    after = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if after != resource.RLIM_INFINITY and after < want:
        log.warning("open-files limit %d (hard %s) is below the %d that "
                    "COUPON_MAX_CONNECTIONS=%d needs: new clients may be refused by the "
                    "system before the cap", after, hard, want, connections)
    return soft, after
