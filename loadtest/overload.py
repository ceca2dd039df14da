"""Goodput when a crowd connects: the refusal and grab paths at 64, 1,024 and 4,000
connections, with wrk (closed loop, ``--timeout 5s``).

    .venv/bin/python loadtest/overload.py [--connections 64,1024,4000] [--duration 8]
                                          [--repeat 3] [--workers 2] [--json FILE]
                                          [--event-loop uvloop|asyncio]

wrk keeps every connection busy with exactly one request, so the mean latency is
connections / answers per second; a server that serves its connections fairly
keeps the p99 near that mean. For each path and crowd size it prints answers/s,
goodput (answers other than 503, per second), 503s, client timeouts, p50, p99, the
mean and p99 / mean, and goodput as a share of the goodput at the smallest crowd.

Paths: ``bare`` is bench.py's ceiling app (phase 1b: aiohttp + uvloop answering a
fixed 200 to the same requests, N processes), the reference for what the machine
and aiohttp do with that crowd; ``refusal`` is a grab in a round that opens
tomorrow (409 round_not_open, new members, no Idempotency-Key: the worker answers
without Redis); ``grab`` is a grab with stock left (201, a new member per
request). Each run starts after the members of the previous one. The engine is
`coupon-engine serve --workers N` on its embedded Redis (appendfsync always), and the
ceiling app bench.py's; both are started and stopped here, by pid. ``--event-loop``
runs both on that loop (the engine through COUPON_EVENT_LOOP).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    BIG_VENUES,
    WRK_GRAB,
    Engine,
    Result,
    children_cpu,
    role_cpu,
    run_wrk,
    start_ceiling,
    table_head,
    write_tokens,
)
from support import free_port  # noqa: E402


@dataclass
class Row:
    path: str
    connections: int
    rps: float
    goodput: float
    shed: int
    timeouts: int
    errors: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    # CPU microseconds per answer: the load generator's, and the server's (workers or the
    # ceiling app): where a crowd's extra cost per answer falls.
    wrk_us: float = 0.0
    server_us: float = 0.0

    @property
    def tail(self) -> float:
        return self.p99_ms / self.mean_ms if self.mean_ms else 0.0


def raise_nofile(want: int) -> int:
    """Raise this process's descriptor limit (wrk inherits it): 4,000 connections need
    more than the usual soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, want), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def row_of(path: str, conns: int, runs: list[Result]) -> Row:
    """Medians over the runs of one cell."""
    rps = statistics.median(x.rps for x in runs)
    cpu = [x.cpu for x in runs if x.cpu]
    shed = statistics.median(x.statuses.get("503", 0) for x in runs)
    answered = [x.rps * (1 - x.statuses.get("503", 0) / max(x.requests, 1)) for x in runs]
    return Row(path, conns, rps, statistics.median(answered), int(shed),
               int(statistics.median(x.timeouts for x in runs)),
               int(statistics.median(x.errors for x in runs)),
               statistics.median(x.p50_ms for x in runs),
               statistics.median(x.p99_ms for x in runs),
               conns / rps * 1000 if rps else 0.0,
               statistics.median(c["wrk"] for c in cpu) if cpu else 0.0,
               statistics.median(c["server"] for c in cpu) if cpu else 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", default="64,1024,4000")
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=600_000)
    p.add_argument("--paths", default="bare,refusal,grab")
    p.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    crowds = [int(x) for x in args.connections.split(",")]
    paths = args.paths.split(",")
    limit = raise_nofile(max(crowds) + 1024)
    if limit < max(crowds) + 64:
        print(f"warning: descriptor limit {limit} is below {max(crowds)} connections",
              file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="coupon-overload-"))
    script = tmp / "grab.lua"
    script.write_text(WRK_GRAB)
    rows: list[Row] = []
    engine: Engine | None = None
    ceiling: list[Any] = []

    def cell(path: str, base: str, rid: str, conns: int, tokens: Path, start: int,
             pids: list[int]) -> int:
        runs = []
        for _ in range(args.repeat):
            cpu0, wrk0 = role_cpu(pids), children_cpu()
            res = run_wrk(f"{path} c{conns}", f"{base}/v1/rounds/{rid}/grab", script,
                          [str(tokens), str(args.wrk_threads), f"/v1/rounds/{rid}/grab",
                           ",".join(BIG_VENUES), str(start)],
                          conns, args.wrk_threads, args.duration)
            cpu1, wrk1 = role_cpu(pids), children_cpu()
            if res.requests:
                res.cpu = {"wrk": (wrk1 - wrk0) / res.requests * 1e6,
                           "server": (cpu1["server"] - cpu0["server"]) / res.requests * 1e6}
            start = res.next_index
            runs.append(res)
            time.sleep(1)  # let the closed connections drain between runs
        row = row_of(path, conns, runs)
        rows.append(row)
        print(f"  {path} c={conns}: {row.rps:,.0f}/s goodput {row.goodput:,.0f}/s "
              f"503s {row.shed} timeouts {row.timeouts} p99 {row.p99_ms:.0f} ms "
              f"mean {row.mean_ms:.0f} ms; CPU us/answer wrk {row.wrk_us:.1f} server "
              f"{row.server_us:.1f}", flush=True)
        return start

    try:
        print(f"overload: {args.workers} workers on {args.event_loop}, {args.wrk_threads} wrk"
              f" threads, {args.duration} s x{args.repeat} per cell", flush=True)
        # One token file for every path: the load generator's cost per request depends
        # on how many tokens it holds (docs/benchmarks.md, issue 19 fourth pass).
        member_secret = secrets.token_urlsafe(32)
        tokens = tmp / "tokens.txt"
        write_tokens(tokens, member_secret, args.tokens)
        if "bare" in paths:
            port = free_port()
            ceiling = start_ceiling(port, args.workers, args.event_loop)
            for conns in crowds:
                cell("bare", f"http://127.0.0.1:{port}", "R1", conns, tokens, 0,
                     [p.pid for p in ceiling])
            for proc in ceiling:
                if proc.pid is not None:
                    os.kill(proc.pid, signal.SIGTERM)
                proc.join(10)
            ceiling = []
        engine = Engine(tmp, args.workers, env={"COUPON_EVENT_LOOP": args.event_loop},
                        member_secret=member_secret)
        start = 0
        for path in paths:
            if path == "bare":
                continue
            rid = "R2" if path == "refusal" else "R1"
            for conns in crowds:
                start = cell(path, engine.base, rid, conns, tokens, start,
                             [engine.proc.pid])
    finally:
        for proc in ceiling:
            if proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
            proc.join(10)
        if engine is not None:
            engine.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    table_head("path", "connections", "answers/s", "goodput/s", "vs smallest", "503s",
               "timeouts", "p50 ms", "p99 ms", "mean ms", "p99/mean", "wrk us", "server us")
    for path in paths:
        base = next(r.goodput for r in rows if r.path == path)
        for r in (r for r in rows if r.path == path):
            print(f"| {r.path} | {r.connections:,} | {r.rps:,.0f} | {r.goodput:,.0f} | "
                  f"{r.goodput / base:.2f} | {r.shed} | {r.timeouts} | {r.p50_ms:.1f} | "
                  f"{r.p99_ms:.1f} | {r.mean_ms:.1f} | {r.tail:.2f} | {r.wrk_us:.1f} | "
                  f"{r.server_us:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
