"""CPU the ledger archiver spends per archived event (issue 19; docs/benchmarks.md).

    .venv/bin/python loadtest/archiver_bench.py [--events 20000] [--repeat 3]
        [--prefill 200000] [--baseline-ref main] [--shards 1]

Starts its own redis-server (EmbeddedRedis, the engine's settings), loads a campaign
with the engine's load_campaign, and per repeat fills the campaign's stream with N
grants (the engine's grab.lua, each with a 36-character Idempotency-Key as the app
sends, distinct members, 10 venues) and archives them; then redeems those N coupons
(the engine's redeem.lua) and archives the N redemptions. So the events are the
engine's real format, written by its real scripts. Before the first measured pass each
ledger is given --prefill grants (half redeemed), archived the same way and not
measured: a ledger's cost per event grows with what it already holds (its indexes),
and the bench's phases run on a ledger of a few hundred thousand events.

Each archive pass runs in a fresh child process, as ``coupon-engine archive`` does
(``engine.ledger.cli._archive`` under uvloop: open the client, ``archive_once``, which
also trims the stream), on the checkout under test; the child reports its own CPU
time (``time.process_time``: every thread of the process, so the SQLite work done in
``asyncio.to_thread`` is included) around that call only, imports excluded. The
parent reads the redis-server's CPU (INFO cpu) and its AOF size (INFO persistence)
around the pass too: Redis's share of reading, acknowledging and trimming, and what
the archiver's commands add to the append-only file.

Since schema v6 the archiver only appends events and ``coupons`` is derived from them
by the first reader (reconcile, settle, statement: ``Ledger.derive_coupons``). So that
the cost moved there is shown too, each repeat of a checkout that has it ends with a
derivation of that repeat's events in a fresh child (CPU per event, column "derive";
the prefilled events are derived before the first repeat, unmeasured).

With ``--baseline-ref REF`` the same passes also run on a ``git worktree`` of REF
(made in a temporary directory, removed after), old and new interleaved in every
repeat, each on its own ledger file. Printed: medians over the repeats, µs per event.
Everything it starts is stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
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

CID = "archbench"
VENUES = [f"V{i:02d}" for i in range(1, 11)]

# Run in the child, with the checkout under test first on sys.path.
CHILD = r"""
import asyncio, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import uvloop
from engine.ledger import cli
from engine.ledger.db import Ledger

async def main():
    if len(sys.argv) > 4:
        from engine.ledger import archiver
        archiver.archive_once.__kwdefaults__["batch"] = int(sys.argv[4])
    with Ledger(sys.argv[3]) as ledger:
        t0 = time.process_time()
        w0 = time.perf_counter()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        n = await cli._archive(sys.argv[2], ledger, False, None)
        t1 = time.process_time()
        w1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"new": n, "cpu_s": t1 - t0, "wall_s": w1 - w0,
                      "sys_s": r1.ru_stime - r0.ru_stime}))

uvloop.run(main())
"""

# Derive coupons from the events archived since the last derivation (schema v6 on).
DERIVE_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from engine.ledger.db import Ledger

with Ledger(sys.argv[2]) as ledger:
    if not hasattr(ledger, "derive_coupons"):
        print(json.dumps({"applied": -1, "cpu_s": 0.0}))
        raise SystemExit(0)
    t0 = time.process_time()
    n = ledger.derive_coupons()
    t1 = time.process_time()
print(json.dumps({"applied": n, "cpu_s": t1 - t0}))
"""


def redis_cpu(r: object) -> float:
    info = r.info("cpu")  # type: ignore[attr-defined]
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def archive_pass(root: Path, url: str, ledger: Path, batch: int = 0) -> dict[str, float]:
    argv = [sys.executable, "-c", CHILD, str(root), url, str(ledger)]
    out = subprocess.run(argv + ([str(batch)] if batch else []), check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def derive_pass(root: Path, ledger: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", DERIVE_CHILD, str(root), str(ledger)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    import redis

    tmp = Path(tempfile.mkdtemp(prefix="coupon-archbench-"))
    node = EmbeddedRedis(tmp / "redis")
    variants: list[tuple[str, Path]] = [("new", REPO)]
    batches = {"new": 0}
    for b in args.compare_batch:
        variants.append((f"new, batch {b}", REPO))
        batches[f"new, batch {b}"] = b
    worktree: Path | None = None
    if args.baseline_ref:
        worktree = tmp / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree),
                        args.baseline_ref], check=True, capture_output=True)
        variants.insert(0, (f"old ({args.baseline_ref})", worktree))
        batches[f"old ({args.baseline_ref})"] = 0
    node.start()
    try:
        now = datetime.now(UTC)
        # Stock for every grant of every pass, prefill included, on any one venue.
        per = (args.prefill + args.events * args.repeat) * len(variants)
        text = campaign_toml(cid=CID, venues=VENUES, campaign_quota=3, budget_fen=10**13,
                             rounds=[{"id": "R1", "opens": now - timedelta(minutes=1),
                                      "closes": now + timedelta(hours=4), "quota": 1,
                                      "stock": {v: per for v in VENUES}}])
        load_campaign_text(node.socket_path, text, shards=args.shards)

        r = redis.Redis(unix_socket_path=str(node.socket_path), decode_responses=True)
        base = Keys(CID)
        grab_sha = r.script_load(scripts.load("grab").source)
        redeem_sha = r.script_load(scripts.load("redeem").source)
        serial = 0

        def fill_grants(n: int) -> list[tuple[int, str, str]]:
            nonlocal serial
            pipe = r.pipeline(transaction=False)
            made: list[tuple[int, str, str]] = []
            pending: list[tuple[int, str, str]] = []
            for i in range(n):
                serial += 1
                member = f"m{serial:011d}"
                venue = VENUES[serial % len(VENUES)]
                code = codes.new_code()
                shard = serial % args.shards
                k = base.of_shard(shard)
                call = scripts.grab_call(k, "R1", venue, member, code, str(uuid.uuid4()),
                                         86400)
                pipe.evalsha(grab_sha, *scripts.flat(call))
                pending.append((shard, venue, code))
                if len(pipe) >= 500 or i == n - 1:
                    for rep, item in zip(pipe.execute(), pending, strict=True):
                        if int(rep[0]) != 0:
                            raise SystemExit(f"grab refused: {rep}")
                        made.append(item)
                    pending = []
            return made

        def fill_redeems(granted: list[tuple[int, str, str]]) -> None:
            pipe = r.pipeline(transaction=False)
            for i, (shard, venue, code) in enumerate(granted):
                call = scripts.redeem_call(base.of_shard(shard), venue, code)
                pipe.evalsha(redeem_sha, *scripts.flat(call))
                if len(pipe) >= 500 or i == len(granted) - 1:
                    for rep in pipe.execute():
                        if int(rep[0]) != 0:
                            raise SystemExit(f"redeem refused: {rep}")

        def aof_bytes() -> int:
            return int(r.info("persistence").get("aof_current_size", 0))

        def measured(root: Path, ledger: Path, n: int, batch: int) -> dict[str, float]:
            c0, a0 = redis_cpu(r), aof_bytes()
            res = archive_pass(root, node.url, ledger, batch)
            res["redis_s"] = redis_cpu(r) - c0
            res["aof_b"] = aof_bytes() - a0
            if res["new"] != n:
                raise SystemExit(f"archived {res['new']} new events, expected {n}")
            return res

        results: dict[str, dict[str, list[float]]] = {
            name: {"grant": [], "redeem": [], "grant_redis": [], "redeem_redis": [],
                   "grant_wall": [], "redeem_wall": [], "grant_sys": [],
                   "redeem_sys": [], "grant_aof": [], "redeem_aof": [], "derive": []}
            for name, _ in variants}
        # A first pass copies the campaign into each ledger
        # and archives --prefill grants there (half of them redeemed): what the ledger
        # already holds when the measured passes run. Every pass after it adds to it.
        def ledger_of(name: str) -> Path:
            return tmp / f"{variants.index(next(v for v in variants if v[0] == name))}.sqlite"
        for name, root in variants:
            done = 0
            while done < args.prefill:
                n = min(50_000, args.prefill - done)
                granted = fill_grants(n)
                archive_pass(root, node.url, ledger_of(name))
                fill_redeems(granted[: n // 2])
                archive_pass(root, node.url, ledger_of(name))
                done += n
            archive_pass(root, node.url, ledger_of(name))
            derive_pass(root, ledger_of(name))
        print(f"archiver_bench: {args.events} grants + {args.events} redemptions per pass, "
              f"{args.shards} shard(s), {args.repeat} repeat(s), ledgers prefilled with "
              f"{args.prefill} grants, "
              f"Redis {r.info('server')['redis_version']}")
        for rep in range(args.repeat):
            order = variants if rep % 2 == 0 else variants[::-1]
            for name, root in order:
                ledger = ledger_of(name)
                granted = fill_grants(args.events)
                g = measured(root, ledger, args.events, batches[name])
                fill_redeems(granted)
                d = measured(root, ledger, args.events, batches[name])
                res = results[name]
                for kind, m in (("grant", g), ("redeem", d)):
                    res[kind].append(m["cpu_s"] * 1e6 / args.events)
                    res[f"{kind}_redis"].append(m["redis_s"] * 1e6 / args.events)
                    res[f"{kind}_wall"].append(m["wall_s"] * 1e6 / args.events)
                    res[f"{kind}_sys"].append(m["sys_s"] * 1e6 / args.events)
                    res[f"{kind}_aof"].append(m["aof_b"] / args.events)
                dv = derive_pass(root, ledger)
                if dv["applied"] >= 0:
                    if dv["applied"] != 2 * args.events:
                        raise SystemExit(f"derived {dv['applied']} events, expected "
                                         f"{2 * args.events}")
                    res["derive"].append(dv["cpu_s"] * 1e6 / dv["applied"])
                print(f"  repeat {rep + 1} {name}: grant {res['grant'][-1]:.1f} µs, "
                      f"redeem {res['redeem'][-1]:.1f} µs (archiver CPU per event; "
                      f"Redis {res['grant_redis'][-1]:.1f} / {res['redeem_redis'][-1]:.1f}"
                      + (f"; derive {res['derive'][-1]:.1f} µs/event" if res["derive"] else "")
                      + ")", flush=True)
        r.close()
        print()
        print("| variant | archiver CPU µs/grant | µs/redemption | of which kernel "
              "µs/grant | µs/redemption | Redis µs/grant | Redis µs/redemption "
              "| wall µs/grant | wall µs/redemption | Redis AOF B/event "
              "| derive µs/event (first reader) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, _ in variants:
            m = {k: statistics.median(v) if v else float("nan")
                 for k, v in results[name].items()}
            derive = f"{m['derive']:.1f}" if results[name]["derive"] else "—"
            print(f"| {name} | {m['grant']:.1f} | {m['redeem']:.1f} | {m['grant_sys']:.1f} "
                  f"| {m['redeem_sys']:.1f} | {m['grant_redis']:.1f} "
                  f"| {m['redeem_redis']:.1f} | {m['grant_wall']:.1f} | {m['redeem_wall']:.1f} "
                  f"| {(m['grant_aof'] + m['redeem_aof']) / 2:.0f} | {derive} |")
    finally:
        node.stop()
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(worktree)], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20_000,
                   help="grants (and then redemptions) archived per pass")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prefill", type=int, default=200_000,
                   help="grants (half of them redeemed) each ledger holds before the first"
                        " measured pass")
    p.add_argument("--shards", type=int, default=1, help="stock shards of the campaign")
    p.add_argument("--compare-batch", type=int, action="append", default=[],
                   help="also run this checkout with archive_once's batch (entries per read"
                        " and entries per SQLite transaction) set to this; repeatable")
    p.add_argument("--baseline-ref", default="",
                   help="also run a git worktree of this commit, interleaved")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
