"""A worker's own CPU per request, without the network: the real aiohttp protocol fed
raw HTTP bytes through an in-memory transport, timed by the thread's CPU clock.

    .venv/bin/python loadtest/inproc_probe.py [--requests 20000] [--rounds 5]
                                              [--connections 64]
                                              [--paths bare,not_open,sold_out,grant]

On a shared 2-core machine wrk runs measure the neighbours as much as the engine;
this measures only the Python work a worker does per request (HTTP parsing, the
engine's code, writing the answer), with the kernel's share (one recv and one send
per request, the same for every variant) left out, and it is repeatable to a few
per cent. Every request carries a member JWT the worker has not seen before, as in
bench.py. Paths:

- ``bare``: bench.py's ceiling app (a fixed 200 body, the request not read);
- ``not_open``: POST grab in a round that opens tomorrow (409, no Redis call);
- ``sold_out``: POST grab on a sold-out line (410, no Redis call);
- ``grant``: POST grab with stock left (201; one grab.lua call on a real Redis that
  this script starts: its wait is not CPU and is not counted).

Prints the median microseconds per request over ``--rounds`` rounds for each path
and its ratio to ``bare``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import campaign_toml  # noqa: E402

SECRET = "inproc-secret-0123456789abcdef0123456789"
ADMIN = "inproc-admin-token-0123456789"
BIG = [f"V{i:02d}" for i in range(1, 11)]


class Transport(asyncio.Transport):
    """Collects what the server writes; tells the driver when an answer is complete."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.out = bytearray()
        self.answered: asyncio.Future[None] | None = None
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data
        # A whole answer: headers and a body of its Content-Length.
        head, sep, body = bytes(self.out).partition(b"\r\n\r\n")
        if sep:
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(body) >= length and self.answered is not None and not self.answered.done():
                self.answered.set_result(None)

    def writelines(self, data: Any) -> None:
        for d in data:
            self.write(d)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080),
                "socket": None}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: Any = None, low: Any = None) -> None:
        return None

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def is_reading(self) -> bool:
        return True


def request_bytes(path: str, token: str, venue: str) -> bytes:
    body = b'{"venue_id":"' + venue.encode() + b'"}'
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def drive(server: Any, requests: list[bytes], connections: int = 1
                ) -> tuple[float, list[bytes]]:
    """Feed the requests over ``connections`` kept-alive connections at once, each
    sending its next request when its previous one is answered (a closed loop, like
    wrk): the CPU seconds of this thread per request, and the first answer's head."""
    loop = asyncio.get_running_loop()
    heads: list[bytes] = []
    per = [requests[i::connections] for i in range(connections)]

    async def one(reqs: list[bytes]) -> None:
        tr = Transport(loop)
        proto = server()
        proto.connection_made(tr)
        for req in reqs:
            tr.out.clear()
            tr.answered = loop.create_future()
            proto.data_received(req)
            await tr.answered
            if not heads:
                heads.append(bytes(tr.out).split(b"\r\n", 1)[0])
        proto.connection_lost(None)

    t0 = time.thread_time()
    await asyncio.gather(*(one(r) for r in per if r))
    dt = time.thread_time() - t0
    return dt / len(requests) * 1e6, heads


def bare_app() -> Any:
    from aiohttp import web
    body = b'{"ok":true}'

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/rounds/{round_id}/grab", hello)
    return app


async def main_async(args: argparse.Namespace) -> int:
    from aiohttp import web

    from engine import campaign as cmp
    from engine.auth import mint_member_token
    from engine.config import Settings
    from engine.http.app import create_app
    from engine.http.guard import ConnectionGuard, GuardedHandler
    from engine.http.hot import EngineRunner
    from engine.store import load_campaign
    from engine.store.connection import open_client
    from engine.store.embedded import EmbeddedRedis

    tmp = Path(tempfile.mkdtemp(prefix="coupon-inproc-"))
    redis = EmbeddedRedis(tmp / "redis")
    redis.start()
    try:
        now = datetime.now(UTC)
        text = campaign_toml(cid="probe", venues=[*BIG, "VSO"], campaign_quota=3,
                             budget_fen=10**12, rounds=[
            {"id": "R1", "opens": now - timedelta(minutes=1), "closes": now + timedelta(hours=2),
             "quota": 1, "stock": {**{v: 10_000_000 for v in BIG}, "VSO": 0}},
            {"id": "R2", "opens": now + timedelta(days=1),
             "closes": now + timedelta(days=1, hours=2), "quota": 1,
             "stock": {v: 1000 for v in BIG}}])
        client = open_client(redis.url)
        await load_campaign(client, cmp.parse_campaign(text))
        await client.aclose()
        settings = Settings(data_dir=tmp / "var", redis_url=redis.url, member_jwt_secret=SECRET,
                            admin_token=ADMIN, member_rate=1e9, member_burst=10**9,
                            archiver=False)
        engine_app = create_app(settings, redis.url)
        servers: dict[str, Any] = {}
        runners = []
        guard = ConnectionGuard()
        for name, app in (("bare", bare_app()), ("engine", engine_app)):
            make = EngineRunner if name == "engine" else web.AppRunner
            runner = make(app, access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            srv = runner.server
            assert srv is not None
            if name == "engine":
                loop = asyncio.get_running_loop()
                servers[name] = (lambda s=srv, lp=loop: GuardedHandler(
                    s, guard=guard, loop=lp, access_log=None))
            else:
                servers[name] = srv
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        if args.gc_threshold:
            gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
        paths = args.paths.split(",")
        routes = {"bare": ("bare", "/v1/rounds/R1/grab", BIG),
                  "not_open": ("engine", "/v1/rounds/R2/grab", BIG),
                  "sold_out": ("engine", "/v1/rounds/R1/grab", ["VSO"]),
                  "grant": ("engine", "/v1/rounds/R1/grab", BIG)}
        results: dict[str, list[float]] = {p: [] for p in paths}
        cycles: dict[str, list[float]] = {p: [] for p in paths}
        serial = 0
        # Warm up every path (imports, caches, the hot-path connection).
        for p in paths:
            srv_name, path, venues = routes[p]
            reqs = [request_bytes(path, mint_member_token(SECRET, f"w{serial + i}", 7200),
                                  venues[i % len(venues)]) for i in range(200)]
            serial += 200
            _, heads = await drive(servers[srv_name], reqs, args.connections)
            print(f"  {p}: {heads[0].decode()}", flush=True)
        for _ in range(args.rounds):
            for p in paths:
                srv_name, path, venues = routes[p]
                reqs = [request_bytes(path, mint_member_token(SECRET, f"m{serial + i}", 7200),
                                      venues[i % len(venues)]) for i in range(args.requests)]
                serial += args.requests
                gc.collect()
                if args.cycles:
                    # What only the collector could free: cyclic garbage per request.
                    gc.disable()
                us, _ = await drive(servers[srv_name], reqs, args.connections)
                results[p].append(us)
                if args.cycles:
                    cycles[p].append(gc.collect() / len(reqs))
                    gc.enable()
        for r in runners:
            await r.cleanup()
    finally:
        redis.stop()
    bare = statistics.median(results["bare"]) if "bare" in results else 0.0
    print()
    print("| path | worker CPU us/request (median) | min | max | vs bare |")
    print("|---|---:|---:|---:|---:|")
    for p in paths:
        xs = results[p]
        med = statistics.median(xs)
        print(f"| {p} | {med:.1f} | {min(xs):.1f} | {max(xs):.1f} | "
              f"{med / bare:.2f} |" if bare else f"| {p} | {med:.1f} | | | |")
    if args.cycles:
        print()
        print("cyclic garbage per request (objects only the collector frees): "
              + ", ".join(f"{p} {max(cycles[p]):.3f}" for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--paths", default="bare,not_open,sold_out,grant")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() after start-up, as the workers do")
    p.add_argument("--gc-threshold", default="", help="gc.set_threshold(a,b,c): 'a,b,c'")
    p.add_argument("--cycles", action="store_true",
                   help="collector off while measuring; print the cyclic garbage per request")
    p.add_argument("--connections", type=int, default=64,
                   help="connections fed at once (the wire batches a loop turn's grabs)")
    args = p.parse_args(argv)
    import uvloop
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
