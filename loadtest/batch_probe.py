"""Would one script call deciding many grabs cost Redis less per grant? (issue 7)

    .venv/bin/python loadtest/batch_probe.py [--grants 20000] [--batches 1,8,32,64]
                                             [--repeat 3]

Starts a private redis-server (``appendfsync always``, unix socket, the engine's
safe settings), writes one open round with ample stock, and grants coupons to
fresh members in two ways, with the same number of grabs per round trip B:

- ``pipelined``: B calls of lua/grab.lua in one pipeline, as the engine's hot-path
  connection sends them when B grabs arrive in one loop turn;
- ``batch``: one call of a batch script that runs grab.lua's own text, wrapped as a
  function, once per grab, in arrival order (no second copy of the grab logic).

It prints Redis's CPU per grant (``INFO cpu``; the client's CPU is not counted) and
the grants, medians over the repeats, interleaved. Both ways must grant every grab:
the run fails otherwise. Stops the redis-server it started, by pid.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from engine import codes  # noqa: E402
from engine.store import scripts  # noqa: E402
from engine.store.embedded import EmbeddedRedis  # noqa: E402
from engine.store.keys import Keys  # noqa: E402

GRAB_KEYS = 8
GRAB_ARGV = 6
TTL = "86400"


def batch_script(grab_lua: str) -> str:
    """grab.lua as a local function of (KEYS, ARGV), applied to each group of keys and
    arguments in turn; the replies in the same order."""
    return (f"local function grab_one(KEYS, ARGV)\n{grab_lua}\nend\n"
            f"local out = {{}}\n"
            f"local n = #ARGV / {GRAB_ARGV}\n"
            f"for i = 0, n - 1 do\n"
            f"  local k, a = {{}}, {{}}\n"
            f"  for j = 1, {GRAB_KEYS} do k[j] = KEYS[i * {GRAB_KEYS} + j] end\n"
            f"  for j = 1, {GRAB_ARGV} do a[j] = ARGV[i * {GRAB_ARGV} + j] end\n"
            f"  out[i + 1] = grab_one(k, a)\n"
            f"end\n"
            f"return out\n")


def seed(r: redis.Redis, k: Keys, venues: list[str]) -> None:
    t_s, _ = r.time()
    now = t_s * 1000
    r.hset(k.campaign, "quota", 3)
    r.hset(k.round("R1"), mapping={"o": now - 60_000, "c": now + 7_200_000, "q": 1,
                                   "vf": now, "vu": now + 86_400_000})
    r.hset(k.stock, mapping={f"R1:{v}": 10**9 for v in venues})


def grab_call(k: Keys, member: str, venue: str) -> scripts.Call:
    return scripts.grab_call(k, "R1", venue, member, codes.new_code(), "", TTL)


def redis_cpu(r: redis.Redis) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def run_way(r: redis.Redis, way: str, sha: str, k: Keys, venues: list[str], grants: int,
            b: int, tag: str) -> tuple[float, int]:
    """Redis CPU (us) per grant and the grants made, for ``grants`` grabs in groups of b."""
    cpu0, granted = redis_cpu(r), 0
    for start in range(0, grants, b):
        calls = [grab_call(k, f"{tag}-{i}", venues[i % len(venues)])
                 for i in range(start, min(start + b, grants))]
        if way == "pipelined":
            pipe = r.pipeline(transaction=False)
            for keys_, argv in calls:
                pipe.evalsha(sha, len(keys_), *keys_, *argv)
            replies = pipe.execute()
        else:
            keys_ = [x for c in calls for x in c[0]]
            argv = [x for c in calls for x in c[1]]
            replies = r.evalsha(sha, len(keys_), *keys_, *argv)
        granted += sum(1 for rep in replies if int(rep[0]) == 0)
    return (redis_cpu(r) - cpu0) / grants * 1e6, granted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grants", type=int, default=20_000)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    grab_lua = (REPO / "lua" / "grab.lua").read_text("utf-8")
    tmp = Path(tempfile.mkdtemp(prefix="coupon-batch-probe-"))
    server = EmbeddedRedis(tmp / "redis")
    server.start()
    try:
        r = redis.Redis(unix_socket_path=str(server.socket_path), decode_responses=True)
        k = Keys("probe")
        venues = [f"V{i:02d}" for i in range(1, 11)]
        seed(r, k, venues)
        shas = {"pipelined": r.script_load(grab_lua),
                "batch": r.script_load(batch_script(grab_lua))}
        print(f"batch_probe: {args.grants} grants per run, appendfsync always, "
              f"x{args.repeat} interleaved; Redis CPU per grant (us), median", flush=True)
        failed = False
        rows = []
        for b in (int(x) for x in args.batches.split(",")):
            cpu: dict[str, list[float]] = {"pipelined": [], "batch": []}
            for rep in range(args.repeat):
                for way in ("pipelined", "batch"):
                    us, granted = run_way(r, way, shas[way], k, venues, args.grants, b,
                                          f"{way}{b}r{rep}")
                    if granted != args.grants:
                        print(f"  {way} B={b}: granted {granted} of {args.grants}",
                              file=sys.stderr)
                        failed = True
                    cpu[way].append(us)
            pm, bm = statistics.median(cpu["pipelined"]), statistics.median(cpu["batch"])
            rows.append((b, pm, bm))
            print(f"  B={b:3d}: pipelined {pm:6.1f}  batch {bm:6.1f}  batch/pipelined "
                  f"{bm / pm:.2f}", flush=True)
        return 1 if failed else 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
