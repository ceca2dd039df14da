"""Where a worker's CPU goes on one path: wrk load + py-spy, summarised as text.

    .venv/bin/python loadtest/profile.py [--phase grab|not_open|sold_out|redeem]
                                         [--duration 8] [--connections 64] [--top 25]

Starts the engine with ONE worker (so one py-spy covers every request), drives
the phase with wrk, samples the worker with ``py-spy record --format raw`` and
prints the functions with the most samples on the stack (inclusive) and at the
top of the stack (self), each as a share of all samples. Needs py-spy
(``pip install py-spy``) and wrk; stops everything it started, by pid.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    BIG_VENUES,
    SOLD_OUT_VENUE,
    WRK_GRAB,
    WRK_REDEEM,
    Engine,
    grant_then_codes,
    http_json,
    run_wrk,
    write_tokens,
)
from support import mint_member_token  # noqa: E402


def worker_pid(serve_pid: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(serve_pid)], capture_output=True,
                         text=True).stdout.split()
    # serve's children: redis-server, multiprocessing's resource tracker and (the
    # archiver being off here) the one worker.
    for pid in out:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "spawn_main" in cmd:
            return int(pid)
    raise RuntimeError(f"no worker process under {serve_pid}: {out}")


def summarise(raw: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")]
        total += n
        for f in set(frames):
            inclusive[f] += n
        self_[frames[-1]] += n
    roots: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        roots[stack.split(";")[0][:60]] += int(count)
    lines = [f"{total} samples; roots: {dict(roots.most_common(4))}", "",
             "inclusive (on the stack):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self (top of the stack):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=["grab", "not_open", "sold_out", "redeem"],
                   default="grab")
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--tokens", type=int, default=50_000)
    p.add_argument("--raw", type=Path, help="also keep py-spy's raw stacks (with lines) here")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("profile: py-spy is missing (pip install py-spy)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="coupon-profile-"))
    engine = Engine(tmp, 1, env={"COUPON_ARCHIVER": "0"})
    try:
        tokens = tmp / "tokens.txt"
        write_tokens(tokens, engine.member_secret, args.tokens)
        script = tmp / "phase.lua"
        base = engine.base
        if args.phase == "redeem":
            # Codes to redeem come from a grab run first.
            codes = tmp / "codes.txt"
            grant_then_codes(engine, script, tokens, args.connections, 5, codes)
            script.write_text(WRK_REDEEM)
            url, wrk_args = f"{base}/v1/venue/redemptions", [str(codes), "2", "0"]
        else:
            script.write_text(WRK_GRAB)
            rid, venues = "R1", ",".join(BIG_VENUES)
            if args.phase == "not_open":
                rid = "R2"
            elif args.phase == "sold_out":
                venues = SOLD_OUT_VENUE
                http_json("POST", f"{base}/v1/rounds/R1/grab", {"venue_id": SOLD_OUT_VENUE},
                          {"Authorization": "Bearer "
                           + mint_member_token(engine.member_secret, "sellout", 600)})
            url = f"{base}/v1/rounds/{rid}/grab"
            wrk_args = [str(tokens), "2", f"/v1/rounds/{rid}/grab", venues, "0"]
        raw = tmp / "profile.txt"
        pid = worker_pid(engine.proc.pid)
        rec = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--format",
                                "raw", "--output", str(raw), "--duration",
                                str(args.duration), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        res = run_wrk(args.phase, url, script, wrk_args, args.connections, 2, args.duration)
        rec.wait(args.duration + 30)
        print(f"{args.phase}: {res.rps:,.0f} req/s (one worker, profiled) statuses "
              f"{res.statuses}")
        print(summarise(raw, args.top))
        if args.raw:
            shutil.copy(raw, args.raw)
    finally:
        engine.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
