"""Redemption throughput of two checkouts of the engine, interleaved in one run.

    .venv/bin/python loadtest/ab_redeem.py OLD_CHECKOUT [NEW_CHECKOUT] [--repeat 3]

Each round starts `coupon-engine serve` (2 workers, embedded Redis, archiver on)
from one checkout, grabs coupons with wrk for a few seconds, then sends every
issued code once to `POST /v1/venue/redemptions` with wrk, and records req/s and
the CPU per answer of the workers, the archiver and Redis. Old and new alternate,
so both see the same machine; medians are printed. Stops what it started, by pid.
Used for issue 7's redemption change (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def one(checkout: Path, tmp: Path, seconds: int) -> tuple[float, dict[str, float]]:
    bench.REPO = checkout  # the engine process runs from this checkout
    engine = bench.Engine(tmp, 2)
    try:
        script = tmp / "phase.lua"
        tokens = tmp / "tokens.txt"
        bench.write_tokens(tokens, engine.member_secret, 120_000)
        codes = tmp / "codes.txt"
        bench.grant_then_codes(engine, script, tokens, 64, 8, codes)
        script.write_text(bench.WRK_REDEEM)
        cpu0 = bench.role_cpu([engine.proc.pid])
        res = bench.run_wrk("redeem", f"{engine.base}/v1/venue/redemptions", script,
                            [str(codes), "2", "0"], 64, 2, seconds)
        cpu1 = bench.role_cpu([engine.proc.pid])
        if set(res.statuses) != {"200"}:
            raise RuntimeError(f"redeem answers {res.statuses}")
        return res.rps, {k: (cpu1[k] - cpu0[k]) / res.requests * 1e6 for k in cpu1}
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path, nargs="?", default=bench.REPO)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seconds", type=int, default=4)
    args = p.parse_args(argv)
    out: dict[str, list[tuple[float, dict[str, float]]]] = {"old": [], "new": []}
    for _ in range(args.repeat):
        for name, checkout in (("old", args.old), ("new", args.new)):
            tmp = Path(tempfile.mkdtemp(prefix=f"coupon-ab-{name}-"))
            try:
                rps, cpu = one(checkout.resolve(), tmp, args.seconds)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"  {name}: {rps:,.0f} req/s, CPU us/answer " +
                  ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()), flush=True)
            out[name].append((rps, cpu))
    med = {n: statistics.median(r for r, _ in runs) for n, runs in out.items()}
    for n, runs in out.items():
        cpu = {k: statistics.median(c[k] for _, c in runs) for k in runs[0][1]}
        print(f"{n}: median {med[n]:,.0f} req/s; " +
              ", ".join(f"{k} {v:.1f} us" for k, v in cpu.items()))
    print(f"new / old: {med['new'] / med['old']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
