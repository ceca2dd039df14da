"""What one grant costs Redis in memory and in AOF bytes (docs/capacity.md).

    .venv/bin/python loadtest/grant_cost.py [--grants 20000] [--member-len 12]

Starts its own redis-server (the engine's settings: appendfsync always, multi-part
AOF; automatic AOF rewrites off so the AOF only grows), loads a campaign through the
engine's own load_campaign, then runs the engine's grab.lua N times per variant with
distinct members (ids of --member-len characters) and fresh codes, in pipelined batches:

  plain  no Idempotency-Key (ARGV[5] = 0)
  idem   an Idempotency-Key of 36 characters (a UUID, as the app sends), kept 24 h

and reports, per grant: used_memory (INFO memory) before/after, MEMORY USAGE of one
grant's keys (member hash, member's code list, coupon hash, idempotency record), the
event stream's growth (the archiver trims what it archived, so that part is transient),
and the AOF's growth on disk. Everything it starts is stopped by pid.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import campaign_toml, load_campaign_text  # noqa: E402

from engine import codes  # noqa: E402
from engine.store import (
    scripts,  # noqa: E402
)
from engine.store.embedded import EmbeddedRedis  # noqa: E402
from engine.store.keys import Keys  # noqa: E402

CID = "cost"


def aof_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in (directory / "appendonly").glob("*") if p.is_file())


def run(args: argparse.Namespace) -> int:
    import redis

    tmp = Path(tempfile.mkdtemp(prefix="coupon-cost-"))
    node = EmbeddedRedis(tmp / "redis")
    node.start({"auto-aof-rewrite-percentage": "0"})
    try:
        now = datetime.now(UTC)
        text = campaign_toml(cid=CID, venues=["V01"], campaign_quota=3, budget_fen=10**12,
                             rounds=[{"id": "R1", "opens": now - timedelta(minutes=1),
                                      "closes": now + timedelta(hours=2), "quota": 1,
                                      "stock": {"V01": 10_000_000}}])
        load_campaign_text(node.socket_path, text)

        r = redis.Redis(unix_socket_path=str(node.socket_path), decode_responses=True)
        k = Keys(CID)
        sha = r.script_load(scripts.load("grab").source)
        print(f"grant_cost: {args.grants} grants per variant, member ids of "
              f"{args.member_len} characters, Redis {r.info('server')['redis_version']}, "
              f"appendfsync {r.config_get('appendfsync')['appendfsync']}")
        print(f"| {'variant':<6} | {'used_memory B/grant':>19} | {'keys B (MEMORY USAGE)':>21} "
              f"| {'stream B/grant':>14} | {'AOF B/grant':>11} |")
        print("|--------|---------------------|-----------------------|----------------|"
              "-------------|")
        serial = 0
        for variant in ("plain", "idem"):
            r.execute_command("MEMORY", "PURGE")
            mem0 = int(r.info("memory")["used_memory"])
            s0 = int(r.memory_usage(k.events, samples=0) or 0)
            aof0 = aof_bytes(node.directory)
            sample: list[str] = []
            pipe = r.pipeline(transaction=False)
            granted = 0
            for i in range(args.grants):
                serial += 1
                member = f"m{serial:0{args.member_len - 1}d}"
                code = codes.new_code()
                idem = str(uuid.uuid4()) if variant == "idem" else ""
                call = scripts.grab_call(k, "R1", "V01", member, code, idem, 86400)
                if i == args.grants // 2:
                    sample = [str(x) for x in call[0][4:7 if idem else 6]]
                pipe.evalsha(sha, *scripts.flat(call))
                if len(pipe) >= 500 or i == args.grants - 1:
                    granted += sum(1 for rep in pipe.execute() if int(rep[0]) == 0)
            mem1 = int(r.info("memory")["used_memory"])
            s1 = int(r.memory_usage(k.events, samples=0) or 0)
            aof1 = aof_bytes(node.directory)
            if granted != args.grants:
                print(f"only {granted} of {args.grants} granted", file=sys.stderr)
                return 1
            key_bytes = sum(int(r.memory_usage(x, samples=0) or 0) for x in sample)
            n = args.grants
            print(f"| {variant:<6} | {(mem1 - mem0) / n:>19,.0f} | {key_bytes:>21,} | "
                  f"{(s1 - s0) / n:>14,.0f} | {(aof1 - aof0) / n:>11,.0f} |")
        r.close()
    finally:
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grants", type=int, default=20_000, help="grants per variant")
    p.add_argument("--member-len", type=int, default=12, help="characters of a member id")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
