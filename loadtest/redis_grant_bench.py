"""Redis's CPU, memory and AOF bytes per grant: grab.lua before issue 19 vs now (issue 19).

    .venv/bin/python loadtest/redis_grant_bench.py [--grants 30000] [--repeat 3]
        [--configs 64x16,2x8] [--old-rev b37270c] [--idem] [--stream-read]

For each repeat, each concurrency and each script (old first or new first, alternating),
it starts a fresh private redis-server with the engine's settings (engine/store/embedded.py:
appendfsync always, unix socket; automatic AOF rewrites off so the AOF only grows), loads a
campaign through the engine's own load_campaign (one open round, ample stock), loads the
script and runs ``redis-benchmark -c C -P P -n N -r 2000000000 EVALSHA <sha> ...`` with the
script's own KEYS/ARGV layout (its header), fresh random members and codes (each run its
own prefix, so no two runs share one). A concurrency ``CxP`` is C connections each sending
P calls per write: 64x16 is the brief's "-c 64, pipelined"; 2x8 is the engine's own shape
(one pipelined wire connection per worker, 2 workers, a loop turn's grabs per write) and
reproduces the Redis CPU per grant of loadtest/bench.py's phase 2.

Per grant (grants = the stock line's decrease; a run that grants less than 99 % fails):
Redis CPU (INFO cpu, used_cpu_sys + used_cpu_user; the client's CPU is not counted),
used_memory growth (INFO memory, after MEMORY PURGE; it includes the keyspace table's
growth, so the keys-per-grant column is shown too), AOF growth on disk, keys created.
Medians over the repeats. The old script is ``git show <old-rev>:lua/grab.lua``.

--idem also runs every grab with an Idempotency-Key (36 characters); --stream-read also
prints what reading the grant events costs Redis per event, the archiver's way
(XREADGROUP + XACK + XTRIM) and by XRANGE + XTRIM. Stops every redis-server it started.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis  # noqa: E402
from support import campaign_toml, load_campaign_text  # noqa: E402

from engine.store import scripts  # noqa: E402
from engine.store.embedded import EmbeddedRedis  # noqa: E402
from engine.store.keys import Keys  # noqa: E402

CID = "rgb"
OLD_REV = "b37270c"  # main before issue 19: 9 keys, the member's codes in a list key
Layout = Callable[[Keys, str, str, str], list[str]]


def old_layout(k: Keys, member: str, code: str, idem: str) -> list[str]:
    """grab.lua's KEYS and ARGV before issue 19 (its header): the member list is KEYS[6]."""
    keys_ = [k.campaign, k.round("R1"), k.stock, k.stats, k.member(member),
             k.member_coupons(member), k.coupon(code), k.idempotency(member, idem), k.events]
    return ["9", *keys_, "R1", "V01", member, code, idem, "86400"]


def new_layout(k: Keys, member: str, code: str, idem: str) -> list[str]:
    return [str(x) for x in scripts.flat(
        scripts.grab_call(k, "R1", "V01", member, code, idem, 86400))]


@dataclass
class Run:
    cpu_us: float
    mem_b: float
    aof_b: float
    keys: float
    rate: float


def aof_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in (directory / "appendonly").glob("*") if p.is_file())


def redis_cpu(r: redis.Redis) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def start(directory: Path) -> EmbeddedRedis:
    node = EmbeddedRedis(directory)
    node.start({"auto-aof-rewrite-percentage": "0"})
    return node


def load(node: EmbeddedRedis) -> None:
    now = datetime.now(UTC)
    text = campaign_toml(cid=CID, venues=["V01"], campaign_quota=3, budget_fen=10**12,
                         rounds=[{"id": "R1", "opens": now - timedelta(minutes=1),
                                  "closes": now + timedelta(hours=2), "quota": 1,
                                  "stock": {"V01": 10_000_000}}])
    load_campaign_text(node.socket_path, text)


def one_run(directory: Path, source: str, layout: Layout, conns: int, pipeline: int,
            grants: int, tag: str, idem: bool) -> Run:
    node = start(directory)
    try:
        load(node)
        r = redis.Redis(unix_socket_path=str(node.socket_path), decode_responses=True)
        k = Keys(CID)
        sha = r.script_load(source)
        # redis-benchmark draws each __rand_int__ on its own: the member and code in the
        # keys are not those in ARGV (only the keys decide), as in bench.py's phase 5.
        member, code = f"m{tag}-__rand_int__", f"{tag}__rand_int__"  # code: 5 + 12 chars
        key = f"{tag}-__rand_int__-0000-0000-000000" if idem else ""
        cmd = ["evalsha", sha, *layout(k, member, code, key)]
        r.execute_command("MEMORY", "PURGE")
        stock0 = int(r.hget(k.stock, "R1:V01") or 0)
        cpu0, mem0 = redis_cpu(r), int(r.info("memory")["used_memory"])
        aof0, keys0 = aof_bytes(node.directory), int(r.dbsize())
        t0 = time.monotonic()
        out = subprocess.run(["redis-benchmark", "-s", str(node.socket_path), "-c", str(conns),
                              "-n", str(grants), "-r", "2000000000", "-P", str(pipeline), "-q",
                              *cmd], capture_output=True, text=True, timeout=600)
        wall = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(f"redis-benchmark failed: {out.stdout}\n{out.stderr}")
        granted = stock0 - int(r.hget(k.stock, "R1:V01") or 0)
        if granted < 0.99 * grants:
            raise RuntimeError(f"only {granted} of {grants} calls granted")
        run = Run(cpu_us=(redis_cpu(r) - cpu0) / granted * 1e6,
                  mem_b=(int(r.info("memory")["used_memory"]) - mem0) / granted,
                  aof_b=(aof_bytes(node.directory) - aof0) / granted,
                  keys=(int(r.dbsize()) - keys0) / granted, rate=granted / wall)
        r.close()
        return run
    finally:
        node.stop()


def stream_read(directory: Path, events: int, repeat: int) -> None:
    """Redis CPU and AOF bytes per grant event read and trimmed, two ways."""
    node = start(directory)
    res: dict[str, list[tuple[float, float]]] = {"XREADGROUP+XACK+XTRIM": [],
                                                 "XRANGE+XTRIM": []}
    try:
        r = redis.Redis(unix_socket_path=str(node.socket_path), decode_responses=True)
        for i in range(repeat):
            for way in res:
                s = f"cpn:{{{CID}}}:events:{i}:{len(way)}"
                p = r.pipeline(transaction=False)
                for n in range(events):
                    p.xadd(s, {"type": "grant", "code": "ABCDEFGHJKLMNPQRS", "round": "R1",
                               "venue": "V01", "member": f"m{n:011d}",
                               "at": 1733900000000 + n, "idem": ""})
                    if len(p) >= 1000:
                        p.execute()
                p.execute()
                grouped = way.startswith("XREADGROUP")
                if grouped:
                    r.xgroup_create(s, "ledger", id="0")
                cpu0, aof0, done, last = redis_cpu(r), aof_bytes(node.directory), 0, "0-0"
                while True:
                    if grouped:
                        resp = r.xreadgroup("ledger", "archiver", {s: ">"}, count=500)
                        got = resp[0][1] if resp else []
                        if got:
                            r.xack(s, "ledger", *[eid for eid, _ in got])
                    else:
                        got = r.xrange(s, min="(" + last, count=500)
                    if not got:
                        break
                    last = got[-1][0]
                    r.xtrim(s, minid=last, approximate=False)
                    done += len(got)
                res[way].append(((redis_cpu(r) - cpu0) / done * 1e6,
                                 (aof_bytes(node.directory) - aof0) / done))
        r.close()
    finally:
        node.stop()
    print(f"\nreading the events ({events} per repeat, batches of 500, medians of {repeat}):")
    print("| way | Redis CPU µs/event | AOF B/event |")
    print("|---|---:|---:|")
    for way, rows in res.items():
        print(f"| {way} | {statistics.median(x[0] for x in rows):.1f} | "
              f"{statistics.median(x[1] for x in rows):.0f} |")


def run(args: argparse.Namespace) -> int:
    old_src = subprocess.run(["git", "-C", str(REPO), "show", f"{args.old_rev}:lua/grab.lua"],
                             capture_output=True, text=True, check=True).stdout
    new_src = (REPO / "lua" / "grab.lua").read_text("utf-8")
    variants: dict[str, tuple[str, Layout]] = {"old": (old_src, old_layout),
                                               "new": (new_src, new_layout)}
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    kinds = [False, True] if args.idem else [False]
    tmp = Path(tempfile.mkdtemp(prefix="coupon-rgb-"))
    results: dict[tuple[int, int, bool, str], list[Run]] = {}
    serial = 0
    print(f"redis_grant_bench: {args.grants} grabs per run, medians of {args.repeat}, "
          f"old = {args.old_rev}:lua/grab.lua, new = the worktree's; appendfsync always")
    try:
        for rep in range(args.repeat):
            for conns, pipeline in configs:
                for idem in kinds:
                    order = ["old", "new"] if rep % 2 == 0 else ["new", "old"]
                    for name in order:
                        serial += 1
                        src, layout = variants[name]
                        results.setdefault((conns, pipeline, idem, name), []).append(
                            one_run(tmp / f"r{serial}", src, layout, conns, pipeline,
                                    args.grants, f"{serial:05d}", idem))
        print("| -c x -P | idem | script | Redis CPU µs/grant | used_memory B/grant "
              "| AOF B/grant | keys/grant | grants/s | CPU per run |")
        print("|---|---|---|---:|---:|---:|---:|---:|---|")
        for (conns, pipeline, idem, name), rows in results.items():
            def med(f: Callable[[Run], float], rows: list[Run] = rows) -> float:
                return statistics.median(f(x) for x in rows)
            print(f"| {conns}x{pipeline} | {'yes' if idem else 'no'} | {name} | "
                  f"{med(lambda x: x.cpu_us):.1f} | {med(lambda x: x.mem_b):,.0f} | "
                  f"{med(lambda x: x.aof_b):,.0f} | {med(lambda x: x.keys):.2f} | "
                  f"{med(lambda x: x.rate):,.0f} | "
                  f"{', '.join(f'{x.cpu_us:.1f}' for x in rows)} |")
        if args.stream_read:
            stream_read(tmp / "stream", args.grants, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grants", type=int, default=30_000, help="grabs per run")
    p.add_argument("--repeat", type=int, default=3, help="runs per script and concurrency")
    p.add_argument("--configs", default="64x16,2x8",
                   help="concurrencies, CxP: C connections, P calls per write")
    p.add_argument("--old-rev", default=OLD_REV, help="git revision of the old grab.lua")
    p.add_argument("--idem", action="store_true", help="also with an Idempotency-Key")
    p.add_argument("--stream-read", action="store_true",
                   help="also the cost of reading the events (archiver's way vs XRANGE)")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.grants < 1:
        p.error("--repeat and --grants must be positive")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
