"""Worker CPU per answer on the refusal path: the bare app, a minimal refusing app and
the engine, side by side, interleaved, medians.

    .venv/bin/python loadtest/refusal_probe.py [--workers 1] [--connections 64]
                                               [--duration 5] [--pairs 3]
                                               [--variants bare,minimal,engine]

Every variant gets exactly the requests of bench.py's grab phases (POST
/v1/rounds/R2/grab, a new member JWT per request, a JSON body), from wrk, and its
server processes' CPU (user + system, from /proc) is divided by the answers:

- ``bare``: the ceiling app of bench.py (phase 1b): aiohttp + uvloop answering 200
  with a fixed body, not reading the request.
- ``minimal``: what issue 19 calls the minimal refusing handler: verify the member
  token with the engine's own verifier (never seen before), decode the body with
  msgspec, look the round up in a dict, answer a pre-encoded 409.
- ``bare20k`` (on request): ``bare`` sent from a file of 20,000 tokens instead of
  ``--tokens``: what the load generator's token table costs both sides (bench.py's 1c).
- ``engine``: ``coupon-engine serve`` answering 409 round_not_open (the round opens
  tomorrow), which needs no Redis call.

The variants run one after the other in each pair, so the machine's noise falls on
all of them alike; the table shows each variant's median and its ratio to bare.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    BIG_VENUES,
    WRK_GRAB,
    Engine,
    role_cpu,
    run_wrk,
    serve_forever,
    wait_http,
    write_tokens,
)
from support import free_port  # noqa: E402

SECRET = "probe-secret-0123456789abcdef0123456789"


def _app_worker(port: int, variant: str) -> None:
    import re

    import msgspec
    from aiohttp import web

    from engine.auth import MemberVerifier
    from engine.schemas import grab_decoder

    ok = b'{"ok":true}'
    refusal = msgspec.json.encode({"error": {
        "code": "round_not_open", "message": "the round has not opened yet",
        "opens_at": "2026-12-02T10:00:00+08:00"}})
    rounds = {"R1": 0, "R2": 1}
    verifier = MemberVerifier(SECRET, re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z"))

    async def bare(request: web.Request) -> web.Response:
        return web.Response(body=ok, content_type="application/json")

    async def minimal(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        verifier.verify(auth[7:])
        body = grab_decoder.decode(await request.read())
        if request.match_info["round_id"] in rounds and body.venue_id:
            return web.Response(body=refusal, status=409, content_type="application/json")
        return web.Response(body=ok, content_type="application/json")

    async def read_only(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ok, content_type="application/json")

    async def jwt_only(request: web.Request) -> web.Response:
        verifier.verify(request.headers.get("Authorization", "")[7:])
        return web.Response(body=ok, content_type="application/json")

    async def status_409(request: web.Request) -> web.Response:
        return web.Response(body=refusal, status=409, content_type="application/json")

    handlers = {"bare": bare, "minimal": minimal, "read": read_only, "jwt": jwt_only,
                "s409": status_409, "bare20k": bare}

    app = web.Application()
    app.router.add_post("/v1/rounds/{round_id}/grab", handlers[variant])
    app.router.add_get("/", bare)
    serve_forever(app, port)


class AppVariant:
    def __init__(self, variant: str, workers: int) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_app_worker, args=(self.port, variant), daemon=True)
                      for _ in range(workers)]
        for p in self.procs:
            p.start()
        wait_http(self.base + "/")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def stop(self) -> None:
        for p in self.procs:
            if p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
            p.join(10)


def measure(base: str, pids: list[int], script: Path, tokens: Path, start: int,
            connections: int, duration: int) -> tuple[float, float, int]:
    """(server CPU us per answer, answers/s, next token index)."""
    cpu0 = role_cpu(pids)
    res = run_wrk("probe", f"{base}/v1/rounds/R2/grab", script,
                  [str(tokens), "2", "/v1/rounds/R2/grab", ",".join(BIG_VENUES), str(start)],
                  connections, 2, duration)
    cpu1 = role_cpu(pids)
    us = (cpu1["server"] - cpu0["server"]) / max(res.requests, 1) * 1e6
    return us, res.rps, res.next_index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--variants", default="bare,minimal,engine")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="coupon-probe-"))
    script = tmp / "grab.lua"
    script.write_text(WRK_GRAB)
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    engine: Engine | None = None
    apps: dict[str, AppVariant] = {}
    try:
        if "engine" in variants:
            engine = Engine(tmp, args.workers)
        for v in variants:
            if v != "engine":
                apps[v] = AppVariant(v, args.workers)
        probe_tokens = tmp / "probe-tokens.txt"
        write_tokens(probe_tokens, SECRET, args.tokens)
        small_tokens = tmp / "small-tokens.txt"
        if "bare20k" in variants:
            write_tokens(small_tokens, SECRET, 20_000)
        engine_tokens = tmp / "engine-tokens.txt"
        if engine is not None:
            write_tokens(engine_tokens, engine.member_secret, args.tokens)
        start = {v: 0 for v in variants}
        for _ in range(args.pairs):
            for v in variants:
                if v == "engine":
                    assert engine is not None
                    pids, base, tokens = [engine.proc.pid], engine.base, engine_tokens
                else:
                    pids, base = apps[v].pids(), apps[v].base
                    tokens = small_tokens if v == "bare20k" else probe_tokens
                us, rps, start[v] = measure(base, pids, script, tokens, start[v],
                                            args.connections, args.duration)
                results[v].append((us, rps))
                print(f"  {v}: {us:.1f} us/answer, {rps:,.0f}/s", flush=True)
                time.sleep(0.5)
    finally:
        for a in apps.values():
            a.stop()
        if engine is not None:
            engine.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    bare = statistics.median(u for u, _ in results["bare"]) if "bare" in results else 0.0
    print()
    print("| variant | server CPU us/answer (median) | vs bare | answers/s (median) |")
    print("|---|---:|---:|---:|")
    for v in variants:
        us = statistics.median(u for u, _ in results[v])
        rps = statistics.median(r for _, r in results[v])
        ratio = f"{us / bare:.2f}" if bare else ""
        print(f"| {v} | {us:.1f} | {ratio} | {rps:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
