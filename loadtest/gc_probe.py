"""The workers' collector thresholds (COUPON_GC_THRESHOLDS) side by side: engines that
differ only in that setting, all up at once, measured in turn on one path and crowd.

    .venv/bin/python loadtest/gc_probe.py [--variants 700,10,10/50000,20,10]
                                          [--path refusal|grab] [--connections 64,4000]
                                          [--duration 6] [--repeat 3] [--workers 2]

Each variant is a `coupon-engine serve --workers N` on its own embedded Redis; every
repetition runs each crowd size on every variant, the variants' order reversed on odd
repetitions (a grab run leaves its engine's archiver a few seconds of catching up, which
would otherwise fall on the same neighbour every time), with a pause between runs. The
table shows, per variant and crowd, the medians of answers/s, the workers' CPU per
answer (user + system, from /proc), client timeouts, p99 and p99 / mean (the mean of a
closed loop is connections / answers per second), and the goodput as a share of the
variant's own at the smallest crowd. Paths as overload.py's: ``refusal`` is a grab in a
round that opens tomorrow (409, no Redis), ``grab`` one with stock left (201).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from overload import raise_nofile  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="700,10,10/50000,20,10",
                   help="COUPON_GC_THRESHOLDS values, separated by /")
    p.add_argument("--path", choices=("refusal", "grab"), default="refusal")
    p.add_argument("--connections", default="64,4000")
    p.add_argument("--duration", type=int, default=6)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=900_000)
    args = p.parse_args(argv)
    variants = args.variants.split("/")
    crowds = [int(x) for x in args.connections.split(",")]
    raise_nofile(max(crowds) + 1024)
    tmp = Path(tempfile.mkdtemp(prefix="coupon-gc-probe-"))
    script = tmp / "grab.lua"
    script.write_text(bench.WRK_GRAB)
    secret = secrets.token_urlsafe(32)
    tokens = tmp / "tokens.txt"
    bench.write_tokens(tokens, secret, args.tokens)
    rid = "R2" if args.path == "refusal" else "R1"
    url_path = f"/v1/rounds/{rid}/grab"
    venues = ",".join(bench.BIG_VENUES)
    engines: dict[str, bench.Engine] = {}
    cells: dict[tuple[str, int], list[tuple[float, float, int, float]]] = {}
    try:
        for i, v in enumerate(variants):
            home = tmp / f"engine-{i}"
            home.mkdir()
            engines[v] = bench.Engine(home, args.workers, env={"COUPON_GC_THRESHOLDS": v},
                                      member_secret=secret)
        start = 0
        for rep in range(args.repeat):
            order = list(engines.items())
            if rep % 2:
                order.reverse()
            for conns in crowds:
                for v, engine in order:
                    before = bench.role_cpu([engine.proc.pid])["server"]
                    res = bench.run_wrk(v, engine.base + url_path, script,
                                  [str(tokens), "2", url_path, venues, str(start)],
                                  conns, 2, args.duration)
                    us = (bench.role_cpu([engine.proc.pid])["server"] - before) / max(
                        res.requests, 1) * 1e6
                    start = res.next_index
                    cells.setdefault((v, conns), []).append(
                        (res.rps, us, res.timeouts, res.p99_ms))
                    print(f"  run {rep + 1} {v} c={conns}: {res.rps:,.0f}/s, workers "
                          f"{us:.1f} us/answer, timeouts {res.timeouts}, p99 "
                          f"{res.p99_ms:.0f} ms, statuses {res.statuses}", flush=True)
                    time.sleep(3)
    finally:
        for engine in engines.values():
            engine.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    bench.table_head("COUPON_GC_THRESHOLDS", "connections", "answers/s", "workers us/answer",
               "timeouts", "p99 ms", "p99/mean", "goodput vs smallest")
    for v in variants:
        base = statistics.median(x[0] for x in cells[(v, crowds[0])])
        for conns in crowds:
            xs = cells[(v, conns)]
            rps = statistics.median(x[0] for x in xs)
            p99 = statistics.median(x[3] for x in xs)
            mean = conns / rps * 1000 if rps else 0.0
            print(f"| {v} | {conns:,} | {rps:,.0f} | {statistics.median(x[1] for x in xs):.1f}"
                  f" | {statistics.median(x[2] for x in xs):.0f} | {p99:.0f} | "
                  f"{p99 / mean if mean else 0:.2f} | {rps / base if base else 0:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
