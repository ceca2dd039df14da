"""The benchmark: one run that starts what it needs and measures every path with wrk.

    .venv/bin/python loadtest/bench.py [--connections 64] [--workers 2] [--duration 10]
                                       [--repeat 1] [--json loadtest/reports/bench.json]
                                       [--redis-cluster] [--stock-shards S]

Phases, all with the same wrk connections and server worker count:
  1a ceiling    a bare aiohttp+uvloop app (reuse_port, N processes), fixed JSON body, one
                static GET request repeated by wrk
  1b ceiling    the same bare app sent exactly the grab phase's requests (POST, a member
                JWT each, a JSON body, built per request by the same wrk script); ratios
                ("vs 1b") are taken against this one, since the load generator's own cost
                per request is then the same on both sides of the ratio
                (the very token file of phases 2-3b: wrk holding 600,000 tokens instead of
                20,000 costs it half as much CPU again per request, and the cores it
                shares with the server pay for the cache misses too)
  1c ceiling    1b with a file of 20,000 tokens, as 1b was before issue 19's fourth pass
                (shown for comparison with the earlier passes' ratios)
  2 grab        POST grab with stock available, a different member JWT per request
  2b grab       the same at --latency-connections (256) connections, for the p99 target
  3 sold_out    POST grab on a sold-out stock line; not_open: a round that opens tomorrow
  4 redeem      POST /v1/venue/redemptions of codes granted in phase 2, each once
  5 redis       redis-benchmark: EVALSHA of the engine's grab.lua on stock shard 0, and INCR,
                -P 1 / -P 16
  5s shards     grab.lua on ALL S stock shards at once: one redis-benchmark per shard, each
                against the primary serving that shard's slot with that shard's keys, started
                together; the sum (total calls / wall time of the slowest) and each shard's
                rate, -P 1 / -P 16, and the Redis CPU per call (INFO cpu, commandstats).
                With S = 1 it is phase 5's EVALSHA again.
Phase 5 gives every redis-benchmark run its own member and code prefix: redis-benchmark
seeds its __rand_int__ stream with time(NULL) ^ getpid(), so two runs can draw the very
same numbers and the second then only measures refusals (round_quota_exceeded).
After each engine phase the admin stats are checked (issued <= stock, stock arithmetic)
and so is every stock shard in Redis (per shard: initial - issued + returned_open -
xfer_out + xfer_in = remaining; over the shards: issued <= initial, units in flight between
shards <= those journaled); the exit status is 1 if any check fails. Every process started
here is stopped by pid.

--redis-cluster: the engine runs on a local 3-primary Redis Cluster (tests/clusterkit.py,
loopback TCP, appendfsync always) instead of its embedded Redis; phase 5 talks to the
primary that serves the campaign's slot (over TCP, as the engine does).
--redis-tcp: for comparison with it, one external redis-server (same settings) reached
over loopback TCP, as the cluster's primaries are.
--stock-shards S: the campaign is loaded with S stock shards (COUPON_STOCK_SHARDS=S for
`coupon-engine serve`); on --redis-cluster the campaign id is chosen so that its shards
are served by min(S, 3) different primaries (or give one with --campaign-id).
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import campaign_toml, free_port, mint_member_token  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from engine.store import scripts  # noqa: E402
from engine.store.keys import Keys  # noqa: E402

CID = "bench"
BIG_VENUES = [f"V{i:02d}" for i in range(1, 11)]
SOLD_OUT_VENUE = "VSO"
# Members at their quota who keep tapping in phase 3c.
QUOTA_CROWD = 5000

# Counts statuses per thread and prints one machine-readable line from done().
WRK_COMMON = r"""
threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do total[k] = (total[k] or 0) + v end
  end
  local next_idx = 0
  for _, t in ipairs(threads) do next_idx = math.max(next_idx, (t:get("idx") or 0) + 1) end
  local parts = {}
  for k, v in pairs(total) do parts[#parts + 1] = '"' .. k .. '":' .. v end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"errors":%d,"timeouts":%d,"next":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.timeout, next_idx, table.concat(parts, ",")))
end
"""

WRK_PLAIN = WRK_COMMON + r"""
function init(args) counts = {} end
"""

# args: tokens file, thread count, path, venues (comma separated), start offset
# [, "idem": each request also carries an Idempotency-Key of its own]
WRK_GRAB = WRK_COMMON + r"""
function init(args)
  keyed = args[6] == "idem"
  counts = {}
  tokens = {}
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
  nthreads = tonumber(args[2])
  path = args[3]
  bodies = {}
  for v in string.gmatch(args[4], "[^,]+") do bodies[#bodies + 1] = '{"venue_id":"' .. v .. '"}' end
  idx = tonumber(args[5]) + tid
end
function request()
  local tok = tokens[(idx % #tokens) + 1]
  local body = bodies[(math.floor(idx / nthreads) % #bodies) + 1]
  local headers = {["Authorization"] = "Bearer " .. tok, ["Content-Type"] = "application/json"}
  if keyed then headers["Idempotency-Key"] = "k" .. idx end
  idx = idx + nthreads
  return wrk.format("POST", path, headers, body)
end
"""

# args: file of "venue_key code" lines, thread count, start offset
WRK_REDEEM = WRK_COMMON + r"""
function init(args)
  counts = {}
  keys, codes = {}, {}
  for line in io.lines(args[1]) do
    local k, c = string.match(line, "^(%S+) (%S+)$")
    keys[#keys + 1] = k
    codes[#codes + 1] = c
  end
  nthreads = tonumber(args[2])
  idx = tonumber(args[3]) + tid
end
function request()
  local i = (idx % #codes) + 1
  idx = idx + nthreads
  return wrk.format("POST", "/v1/venue/redemptions", {["Authorization"] = "Bearer " .. keys[i],
                    ["Content-Type"] = "application/json"}, '{"code":"' .. codes[i] .. '"}')
end
"""


@dataclass
class Result:
    phase: str
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    next_index: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    timeouts: int = 0
    runs: int = 1
    note: str = ""
    # CPU microseconds per answer by role (wrk, server, archiver, redis) and the
    # machine's busy cores during the run: see "CPU budget" in docs/benchmarks.md.
    cpu: dict[str, float] = field(default_factory=dict)
    # Paired phases (issue 19's): each run's server CPU per answer and rate over those of
    # a 1b run just before it, medians over the runs ("x 1b paired").
    paired: dict[str, float] = field(default_factory=dict)


# --- phase 1: the ceiling app ------------------------------------------------------------

def _ceiling_worker(port: int, event_loop: str = "uvloop") -> None:
    from aiohttp import web

    body = b'{"ok":true}'

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_post("/v1/rounds/{round_id}/grab", hello)
    serve_forever(app, port, event_loop)


def serve_forever(app: Any, port: int, event_loop: str = "uvloop") -> None:
    """Serve an aiohttp app on 127.0.0.1:port (SO_REUSEPORT, as the engine's workers)
    under uvloop (or asyncio's own loop, as COUPON_EVENT_LOOP) until SIGTERM: one
    process of a ceiling or probe app."""
    import asyncio

    import uvloop
    from aiohttp import web

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=4096).start()
        await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if event_loop == "asyncio":
        asyncio.run(run())
    else:
        uvloop.run(run())


def start_ceiling(port: int, workers: int,
                  event_loop: str = "uvloop") -> list[mp.process.BaseProcess]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ceiling_worker, args=(port, event_loop), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    wait_http(f"http://127.0.0.1:{port}/")
    return procs


# --- processes and HTTP ------------------------------------------------------------------

def stop_ceiling(procs: list[mp.process.BaseProcess]) -> None:
    for p in procs:
        if p.pid is not None and p.exitcode is None:
            os.kill(p.pid, signal.SIGTERM)
        p.join(10)


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def http_json(method: str, url: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def run_wrk(phase: str, url: str, script: Path, args: list[str], connections: int,
            threads: int, duration: int) -> Result:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
           "-s", str(script), url]
    if args:
        cmd += ["--", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"^BENCH_RESULT (.*)$", out.stdout, re.M)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    return Result(phase=phase, rps=r["requests"] / (r["duration_us"] / 1e6),
                  requests=r["requests"], next_index=r["next"],
                  p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000,
                  statuses={str(k): v for k, v in r["statuses"].items()}, errors=r["errors"],
                  timeouts=r["timeouts"])


def median_result(runs: list[Result]) -> Result:
    """Median of each number over repeated runs; statuses and errors are summed."""
    statuses: dict[str, int] = {}
    for r in runs:
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    return Result(phase=runs[0].phase, rps=statistics.median(r.rps for r in runs),
                  requests=sum(r.requests for r in runs), next_index=runs[-1].next_index,
                  p50_ms=statistics.median(r.p50_ms for r in runs),
                  p99_ms=statistics.median(r.p99_ms for r in runs), statuses=statuses,
                  errors=sum(r.errors for r in runs), timeouts=sum(r.timeouts for r in runs),
                  runs=len(runs))


def spread_campaign_id(cluster: Any, shards: int, base: str = CID) -> str:
    """A campaign id whose stock shards are served by min(shards, primaries) different
    primaries (as tests/test_cluster.py's spread_campaign_id)."""
    want = min(shards, len(cluster.nodes))
    for i in range(1000):
        cid = base if i == 0 else f"{base}-sh{i}"
        if len({cluster.owner_of(Keys(cid, s).campaign).port for s in range(shards)}) == want:
            return cid
    raise RuntimeError(f"no campaign id spreads {shards} shards over {want} primaries")


class Engine:
    """`coupon-engine serve` on an embedded Redis (appendfsync always) in a temp folder."""

    def __init__(self, tmp: Path, workers: int, campaign: str | None = None,
                 env: dict[str, str] | None = None, external: Any = None,
                 cid: str = CID, shards: int = 1, member_secret: str | None = None) -> None:
        self.tmp = tmp
        self.cid = cid
        self.shards = shards
        # A LocalCluster (--redis-cluster) or an EmbeddedRedis on a port (--redis-tcp).
        self.external = external
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.member_secret = member_secret or secrets.token_urlsafe(32)
        self.admin = "adm_" + secrets.token_urlsafe(24)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
        self.env.update(COUPON_DATA_DIR=str(tmp / "var"),
                        COUPON_MEMBER_JWT_SECRET=self.member_secret,
                        COUPON_ADMIN_TOKEN=self.admin, COUPON_LOG_LEVEL="WARNING",
                        COUPON_STOCK_SHARDS=str(shards))
        if external is not None:
            self.env["COUPON_REDIS_URL"] = external.url
        self.env.update(env or {})
        now = datetime.now(UTC)
        campaign = campaign or campaign_toml(
            cid=cid, venues=[*BIG_VENUES, SOLD_OUT_VENUE], campaign_quota=3, budget_fen=10**12,
            rounds=[
                # Open now with stock that 10 s of grabbing (nor redis-benchmark) can't exhaust.
                {"id": "R1", "opens": now - timedelta(minutes=1),
                 "closes": now + timedelta(hours=2), "quota": 1,
                 "stock": {**{v: 1_000_000 for v in BIG_VENUES}, SOLD_OUT_VENUE: 1}},
                {"id": "R2", "opens": now + timedelta(days=1),
                 "closes": now + timedelta(days=1, hours=2), "quota": 1,
                 "stock": {v: 1000 for v in BIG_VENUES}},
            ])
        self.campaign_path = tmp / "campaign.toml"
        self.campaign_path.write_text(campaign, "utf-8")
        self.log = open(tmp / "engine.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--campaign", str(self.campaign_path),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)],
            cwd=REPO, env=self.env, stderr=self.log, stdout=self.log)
        try:
            wait_http(self.base + "/readyz", 60)
        except RuntimeError:
            self.stop()
            raise

    def keys(self, shard: int = 0) -> Keys:
        return Keys(self.cid, shard)

    def redis_node(self, shard: int = 0) -> dict[str, Any]:
        """Where stock shard ``shard``'s keys live: {"host", "port"} for a TCP Redis
        (a cluster primary, --redis-tcp), {"unix_socket_path"} for the embedded one."""
        if hasattr(self.external, "owner_of"):
            # Every key of a shard lives on the primary serving its slot.
            node = self.external.owner_of(self.keys(shard).campaign)
            return {"host": "127.0.0.1", "port": node.port}
        if self.external is not None:  # --redis-tcp
            return {"host": "127.0.0.1", "port": self.external.port}
        return {"unix_socket_path": str(self.tmp / "var" / "redis" / "redis.sock")}

    def redis(self, shard: int = 0) -> Any:
        import redis
        return redis.Redis(decode_responses=True, socket_timeout=30, **self.redis_node(shard))

    def shard_state(self) -> list[dict[str, Any]]:
        """Each shard's stock and stats hashes and journaled transfer units, from Redis."""
        out = []
        for s in range(self.shards):
            k = self.keys(s)
            with self.redis(s) as r:
                stock = {f: int(v) for f, v in r.hgetall(k.stock).items()}
                stats = {f: int(v) for f, v in r.hgetall(k.stats).items()}
                journal = r.hgetall(k.xfer_out)
            out.append({"stock": stock, "stats": stats,
                        "journaled": sum(int(v.split("|")[2]) for v in journal.values())})
        return out

    def check_shards(self, round_id: str = "R1") -> list[str]:
        """Per shard (exact: each script is atomic in its shard): initial - issued +
        returned_open - xfer_out + xfer_in == remaining >= 0. Over all shards: issued <=
        initial, and the units out of one shard and not yet in another are at most the
        units still journaled in the donors."""
        problems = []
        state = self.shard_state()
        lines = sorted({ln for sh in state for ln in sh["stock"] if ln.startswith(round_id + ":")})
        for line in lines:
            tot: dict[str, int] = {}
            for s, sh in enumerate(state):
                st, stats = sh["stock"], sh["stats"]
                if line not in st:
                    problems.append(f"shard {s}: no stock line {line}")
                    continue
                g = {c: stats.get(f"{c}:{line}", 0) for c in (
                    "initial", "issued", "returned_open", "xfer_out", "xfer_in", "void",
                    "redeemed")}
                for c, v in g.items():
                    tot[c] = tot.get(c, 0) + v
                want = (g["initial"] - g["issued"] + g["returned_open"] - g["xfer_out"]
                        + g["xfer_in"])
                if st[line] != want or st[line] < 0:
                    problems.append(f"shard {s} {line}: remaining {st[line]}, counters say "
                                    f"{want} ({g})")
            if not tot:
                continue
            in_flight = tot["xfer_out"] - tot["xfer_in"]
            journaled = sum(sh["journaled"] for sh in state)
            if not 0 <= in_flight <= journaled:
                problems.append(f"{line}: {in_flight} units between shards, {journaled} "
                                "journaled")
            if tot["issued"] > tot["initial"] or tot["redeemed"] > tot["issued"] - tot["void"]:
                problems.append(f"{line} over all shards: {tot}")
        return problems

    def issued_by_shard(self, line: str = "R1:V01") -> list[int]:
        out = []
        for s in range(self.shards):
            with self.redis(s) as r:
                out.append(int(r.hget(self.keys(s).stats, f"issued:{line}") or 0))
        return out

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO,
                              env=self.env, check=True, capture_output=True,
                              text=True).stdout.strip()

    def stats(self, round_id: str = "R1") -> dict[str, Any]:
        status, body = http_json("GET", f"{self.base}/v1/admin/rounds/{round_id}/stats",
                                 headers={"Authorization": f"Bearer {self.admin}"})
        if status != 200:
            raise RuntimeError(f"admin stats answered {status}: {body}")
        return body

    def check(self, round_id: str = "R1") -> list[str]:
        """The admin stats (the engine sums its stock shards) and every shard in Redis.
        Units moving between two shards are in neither for one round trip (or until the
        sweeper finishes a transfer a crashed worker left, 2 s grace): an arithmetic
        mismatch of the sums is read again for up to 5 s before it counts."""
        problems: list[str] = []
        for _ in range(11):
            problems = self._check_stats(round_id)
            if not problems or self.shards == 1:
                break
            time.sleep(0.5)
        return problems + self.check_shards(round_id)

    def _check_stats(self, round_id: str) -> list[str]:
        problems = []
        for v in self.stats(round_id)["venues"]:
            vid, stock, issued = v["venue_id"], v["stock"], v["issued"]
            if issued > stock or v["remaining"] < 0:
                problems.append(f"{round_id}:{vid} issued {issued} stock {stock} "
                                f"remaining {v['remaining']}")
            if stock - issued + v["returned_open"] != v["remaining"]:
                problems.append(f"{round_id}:{vid} stock arithmetic off: {v}")
            if v["redeemed"] > issued - v["void"]:
                problems.append(f"{round_id}:{vid} redeemed {v['redeemed']} > issued - void")
        return problems

    def issued(self, round_id: str = "R1") -> int:
        return int(self.stats(round_id)["totals"]["issued"])

    def redeemed(self, round_id: str = "R1") -> int:
        return int(self.stats(round_id)["totals"]["redeemed"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def table_head(*columns: str) -> None:
    """A blank line, then a markdown table's header: the first column left, the
    figures right-aligned."""
    print()
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) - 1))


def role_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds of ``pids`` and their descendants by role: ``redis`` (a redis-server
    the engine started), ``archiver`` (the one process run at a raised niceness) and
    ``server`` (every other: the HTTP workers, or the ceiling app)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"server": 0.0, "archiver": 0.0, "redis": 0.0}
    todo, seen = list(pids), set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            comm = Path(f"/proc/{p}/comm").read_text().strip()
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        role = ("redis" if comm == "redis-server" else
                "archiver" if int(fields[16]) > 0 else "server")
        out[role] += (int(fields[11]) + int(fields[12])) / tick
    return out


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (wrk, redis-benchmark)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of every core since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def write_tokens(path: Path, secret: str, n: int) -> None:
    tag = secrets.token_hex(3)
    with path.open("w") as f:
        for i in range(n):
            f.write(mint_member_token(secret, f"b{tag}-{i}", 7200) + "\n")


def granted_members(engine: Engine, tokens: Path, used: int, out: Path, most: int) -> int:
    """Write the tokens of the first ``used`` members that hold a coupon of R1, at
    most ``most`` of them (wrk drops what is in flight when it stops: a few used
    members got none)."""
    with tokens.open() as src:
        lines = [line for _, line in zip(range(used), src)]
    members = [json.loads(base64.urlsafe_b64decode(t.split(".")[1] + "==="))["sub"]
               for t in lines]
    k = engine.keys(0)
    held: list[Any] = []
    r = engine.redis()
    for i in range(0, len(members), 10_000):
        pipe = r.pipeline(transaction=False)
        for m in members[i:i + 10_000]:
            pipe.hget(k.member(m), "r:R1")
        held += pipe.execute()
    keep = [t for t, h in zip(lines, held) if h][:most]
    out.write_text("".join(keep))
    return len(keep)


def granted_codes(engine: Engine, out: Path) -> int:
    """Write "venue_key code" for every issued coupon of the big venues, each with a
    fresh key of its venue, read straight from Redis (every stock shard: a coupon's
    record is in its code's shard)."""
    venue_keys = {v: engine.cli("token", "venue", v) for v in BIG_VENUES}
    keys: list[str] = []
    rows: list[Any] = []
    for s in range(engine.shards):
        with engine.redis(s) as r:
            found = list(r.scan_iter(match=engine.keys(s).coupon("*"), count=10_000))
            pipe = r.pipeline(transaction=False)
            for k in found:
                pipe.hmget(k, "venue", "status")
            keys += found
            rows += pipe.execute()
    n = 0
    with out.open("w") as f:
        for k, (venue, status) in zip(keys, rows):
            if status == "issued" and venue in venue_keys:
                f.write(f"{venue_keys[venue]} {k.rsplit(':', 1)[1]}\n")
                n += 1
    return n


def grant_then_codes(engine: Engine, script: Path, tokens: Path, connections: int,
                     seconds: int, out: Path) -> int:
    """Grab in R1 at the big venues with wrk for ``seconds`` (``script`` gets the grab
    script), then write the codes issued as ``granted_codes`` does: what a redemption
    run needs when no grab phase came before it."""
    script.write_text(WRK_GRAB)
    run_wrk("seed", f"{engine.base}/v1/rounds/R1/grab", script,
            [str(tokens), "2", "/v1/rounds/R1/grab", ",".join(BIG_VENUES), "0"],
            connections, 2, seconds)
    return granted_codes(engine, out)


def redis_bench_cmd(node: dict[str, Any], cmd: list[str], pipeline: int, connections: int,
                    n: int) -> list[str]:
    where = (["-s", node["unix_socket_path"]] if "unix_socket_path" in node
             else ["-h", node["host"], "-p", str(node["port"])])
    return ["redis-benchmark", *where, "-c", str(connections), "-n", str(n),
            "-r", "1000000", "-P", str(pipeline), "--csv", *cmd]


def redis_bench(node: dict[str, Any], name: str, cmd: list[str], pipeline: int,
                connections: int, n: int) -> Result:
    out = subprocess.run(redis_bench_cmd(node, cmd, pipeline, connections, n),
                         capture_output=True, text=True, timeout=300)
    return parse_redis_bench(name, out.returncode, out.stdout, out.stderr, n)


def parse_redis_bench(name: str, returncode: int, stdout: str, stderr: str, n: int) -> Result:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if returncode != 0 or len(lines) < 2:
        raise RuntimeError(f"redis-benchmark failed: {stdout}\n{stderr}")
    header = [h.strip('"') for h in lines[0].split(",")]
    row = dict(zip(header, [v.strip('"') for v in lines[-1].split(",")]))
    return Result(phase=name, rps=float(row["rps"]), requests=n,
                  p50_ms=float(row["p50_latency_ms"]), p99_ms=float(row["p99_latency_ms"]),
                  note=f"n={n}")


def redis_bench_shards(engine: Engine, name: str, cmds: list[list[str]], pipeline: int,
                       connections: int, n: int) -> tuple[Result, list[Result]]:
    """One redis-benchmark per stock shard (cmds[s] against shard s's primary), all
    started together. The sum is the calls of all of them over the wall time from the
    first start to the last exit (so a shard that finishes early does not inflate it)."""
    # The Redis servers involved (S shards may share one), for their CPU per call.
    nodes: dict[str, int] = {}
    for s in range(len(cmds)):
        nodes.setdefault(json.dumps(engine.redis_node(s), sort_keys=True), s)
    cpu0 = {key: redis_cpu(engine, s) for key, s in nodes.items()}
    procs = []
    t0 = time.monotonic()
    for s, cmd in enumerate(cmds):
        procs.append(subprocess.Popen(
            redis_bench_cmd(engine.redis_node(s), cmd, pipeline, connections, n),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    per: list[Result] = []
    try:
        for s, proc in enumerate(procs):
            out, err = proc.communicate(timeout=300)
            per.append(parse_redis_bench(f"{name} shard {s}", proc.returncode, out, err, n))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - t0
    cpu1 = {key: redis_cpu(engine, s) for key, s in nodes.items()}
    cpu_s = sum(cpu1[key][0] - cpu0[key][0] for key in nodes)
    lua_us = sum(cpu1[key][1] - cpu0[key][1] for key in nodes)
    calls = sum(cpu1[key][2] - cpu0[key][2] for key in nodes)
    total = Result(phase=name, rps=n * len(cmds) / wall, requests=n * len(cmds),
                   p50_ms=statistics.median(r.p50_ms for r in per),
                   p99_ms=max(r.p99_ms for r in per),
                   note=f"{len(cmds)} x n={n} in {wall:.2f} s; per shard " + " / ".join(
                       f"{r.rps:,.0f}" for r in per) + f" (sum {sum(r.rps for r in per):,.0f})"
                   + f"; Redis CPU {cpu_s / max(calls, 1) * 1e6:.1f} us/call, of which "
                   f"{lua_us / max(calls, 1):.1f} in the script, {len(nodes)} server(s) "
                   f"{cpu_s / wall:.2f} cores")
    return total, per


def redis_cpu(engine: Engine, shard: int) -> tuple[float, int, int]:
    """(CPU seconds of the redis-server serving ``shard``, microseconds inside EVALSHA,
    EVALSHA calls), from INFO."""
    with engine.redis(shard) as r:
        cpu = r.info("cpu")
        ev = r.info("commandstats").get("cmdstat_evalsha", {})
    return (float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), int(ev.get("usec", 0)),
            int(ev.get("calls", 0)))


def grab_evalsha(sha: str, k: Keys, tag: str) -> list[str]:
    """redis-benchmark's command for one grab.lua call in the shard of ``k``, with the
    engine's real keys and ARGV (lua/grab.lua's header). ``tag`` (5 characters of
    [0-9A-Z]) is this run's own: redis-benchmark draws each __rand_int__ on its own (the
    member and code in the keys are not the ones in ARGV; only the keys decide) from
    random() seeded with time(NULL) ^ getpid(), which two runs seconds apart can share;
    without a per-run prefix the second run then repeats the first one's members and
    codes and is refused as round_quota_exceeded / code collision, issuing nothing."""
    assert len(tag) == 5
    m = f"rb{tag}-__rand_int__"
    call = scripts.grab_call(k, "R1", "V01", m, f"{tag}__rand_int__", "", 86400)
    return ["evalsha", sha, *map(str, scripts.flat(call))]


def grab_lua_sha() -> tuple[str, str]:
    source = (REPO / "lua" / "grab.lua").read_text("utf-8")
    import hashlib
    return hashlib.sha1(source.encode()).hexdigest(), source


# --- the run -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    for tool in ("wrk", "redis-benchmark", "redis-server"):
        if shutil.which(tool) is None and not Path(f"/usr/bin/{tool}").exists():
            print(f"bench: {tool} is missing (apt-get install -y wrk redis-server)",
                  file=sys.stderr)
            return 2
    c, w, d, reps = args.connections, args.workers, args.duration, args.repeat
    threads = args.wrk_threads
    results: list[Result] = []
    problems: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="coupon-bench-"))
    wrk_scripts = {}
    for name, text in (("plain", WRK_PLAIN), ("grab", WRK_GRAB), ("redeem", WRK_REDEEM)):
        wrk_scripts[name] = tmp / f"{name}.lua"
        wrk_scripts[name].write_text(text)

    def measured(name: str, url: str, script: str, wrk_args: list[str], conns: int,
                 pids: list[int]) -> Result:
        cpu0, wrk0, (busy0, all0) = role_cpu(pids), children_cpu(), machine_jiffies()
        res = run_wrk(name, url, wrk_scripts[script], wrk_args, conns, threads, d)
        cpu1, wrk1, (busy1, all1) = role_cpu(pids), children_cpu(), machine_jiffies()
        n = res.requests
        if n:
            cpu = {"wrk": (wrk1 - wrk0) / n * 1e6,
                   **{k: (cpu1[k] - cpu0[k]) / n * 1e6 for k in cpu1}}
            cpu["busy_cores"] = (busy1 - busy0) / max(all1 - all0, 1) * (os.cpu_count() or 1)
            res.cpu = cpu
        return res

    def phase(name: str, url: str, script: str, wrk_args: list[str],
              conns: int | None = None, paired: bool = False) -> Result:
        runs: list[Result] = []
        ratios: list[tuple[float, float]] = []
        for _ in range(reps):
            if paired and pair_with is not None:
                # The machine's speed drifts over minutes: a 1b run just before each run
                # of the phase puts both under the same noise.
                base = measured("1b paired", pair_with, "grab", pair_args, c,
                                [p.pid for p in ceiling if p.pid is not None])
            pids = [engine.proc.pid] if engine is not None else [p.pid for p in ceiling]
            runs.append(measured(name, url, script, wrk_args, conns or c,
                                 [p for p in pids if p is not None]))
            n = runs[-1].requests
            if paired and pair_with is not None and n and base.requests:
                ratios.append((runs[-1].cpu["server"] / base.cpu["server"],
                               runs[-1].rps / base.rps))
            if engine is not None and n:
                # The engine's own CPU (workers + archiver) per answer, for docs/capacity.md.
                us = runs[-1].cpu["server"] + runs[-1].cpu["archiver"]
                runs[-1].note = f"engine CPU {us:.0f} us/req"
            # The next run starts after the members (or codes) the previous one used, so
            # a repeat measures the same path rather than round_quota_exceeded.
            at = 4 if script == "grab" else len(wrk_args) - 1
            if at >= 0:
                wrk_args = [*wrk_args[:at], str(runs[-1].next_index), *wrk_args[at + 1:]]
        res = median_result(runs)
        res.note = runs[len(runs) // 2].note
        res.cpu = runs[len(runs) // 2].cpu
        if ratios:
            res.paired = {"server": statistics.median(r[0] for r in ratios),
                          "rate": statistics.median(r[1] for r in ratios)}
        print(f"  {name}: {res.rps:,.0f} req/s p50 {res.p50_ms:.2f} ms p99 {res.p99_ms:.2f} ms "
              f"statuses {res.statuses} errors {res.errors}", flush=True)
        results.append(res)
        return res

    engine: Engine | None = None
    external: Any = None
    ceiling: list[mp.process.BaseProcess] = []
    # The ceiling app stays up (idle) beside the engine for the paired 1b runs.
    pair_with: str | None = None
    pair_args: list[str] = []
    try:
        print(f"bench: {c} connections, {w} server workers, {threads} wrk threads, {d} s "
              f"per phase, x{reps}" + (", Redis Cluster" if args.redis_cluster else "")
              + f", {args.stock_shards} stock shard(s)", flush=True)
        if args.redis_cluster:
            sys.path.insert(0, str(REPO / "tests"))
            from clusterkit import LocalCluster
            external = LocalCluster(tmp / "cluster")
            external.start()
            print(f"  local Redis Cluster: 3 primaries, seed {external.url}", flush=True)
        elif args.redis_tcp:
            from engine.store.embedded import EmbeddedRedis
            external = EmbeddedRedis(tmp / "redis-tcp", port=free_port())
            external.start()
            print(f"  external redis-server on {external.url}", flush=True)
        # The engine's member tokens, minted first: 1b sends the very requests of phase 2.
        member_secret = secrets.token_urlsafe(32)
        tokens = tmp / "tokens.txt"
        t0 = time.monotonic()
        write_tokens(tokens, member_secret, args.tokens)
        print(f"  minted {args.tokens} member tokens in {time.monotonic() - t0:.1f} s",
              flush=True)
        port = free_port()
        ceiling = start_ceiling(port, w)
        try:
            phase("1a ceiling, static GET", f"http://127.0.0.1:{port}/", "plain", [])
            phase("1b ceiling, grab requests", f"http://127.0.0.1:{port}/v1/rounds/R1/grab",
                  "grab", [str(tokens), str(threads), "/v1/rounds/R1/grab",
                           ",".join(BIG_VENUES), "0"])
            ceiling_tokens = tmp / "ceiling-tokens.txt"
            write_tokens(ceiling_tokens, "ceiling-secret-0123456789abcdef0123", 20_000)
            phase("1c ceiling, 20,000 tokens", f"http://127.0.0.1:{port}/v1/rounds/R1/grab",
                  "grab", [str(ceiling_tokens), str(threads), "/v1/rounds/R1/grab",
                           ",".join(BIG_VENUES), "0"])
        finally:
            if args.no_pairs:
                stop_ceiling(ceiling)
        if not args.no_pairs:
            pair_with = f"http://127.0.0.1:{port}/v1/rounds/R1/grab"
            pair_args = [str(tokens), str(threads), "/v1/rounds/R1/grab",
                         ",".join(BIG_VENUES), "0"]

        cid = args.campaign_id or CID
        if args.redis_cluster and args.campaign_id is None:
            cid = spread_campaign_id(external, args.stock_shards)
        if args.redis_cluster:
            owners = [external.owner_of(Keys(cid, s).campaign).port
                      for s in range(args.stock_shards)]
            print(f"  campaign {cid!r}: stock shard -> primary port {owners}", flush=True)
        engine = Engine(tmp, w, external=external, cid=cid, shards=args.stock_shards,
                        member_secret=member_secret)
        grab_url = f"{engine.base}/v1/rounds/R1/grab"

        before = engine.issued()
        g = phase("2 grab (stock left)", grab_url, "grab",
                  [str(tokens), str(threads), "/v1/rounds/R1/grab", ",".join(BIG_VENUES), "0"],
                  paired=True)
        issued = engine.issued() - before
        granted = g.statuses.get("201", 0)
        g.note = f"issued {issued}, 201s {granted}; {g.note}"
        # wrk drops the requests in flight when its time is up: the engine may have
        # granted up to one per connection more than wrk saw answered.
        if not 0 <= issued - granted <= c * reps:
            problems.append(f"grab: {granted} answered 201 but {issued} issued")
        problems += engine.check()
        # The latency target is set at a bigger crowd: --latency-connections.
        before = engine.issued()
        g2 = phase(f"2b grab, {args.latency_connections} conns", grab_url, "grab",
                   [str(tokens), str(threads), "/v1/rounds/R1/grab", ",".join(BIG_VENUES),
                    str(g.next_index)], conns=args.latency_connections)
        issued = engine.issued() - before
        g2.note = f"issued {issued}, 201s {g2.statuses.get('201', 0)}; {g2.note}"
        if not 0 <= issued - g2.statuses.get("201", 0) <= args.latency_connections * reps:
            problems.append(f"grab 2b: {g2.statuses.get('201', 0)} answered 201 but {issued} "
                            "issued")
        problems += engine.check()
        g = g2  # later phases start after the members 2b used

        # Sell out the one-coupon line, then measure members hammering it.
        status, _ = http_json("POST", grab_url, {"venue_id": SOLD_OUT_VENUE},
                              {"Authorization": "Bearer " + mint_member_token(
                                  engine.member_secret, "sellout", 600)})
        if status != 201:
            problems.append(f"could not sell out {SOLD_OUT_VENUE}: {status}")
        before = engine.issued()
        # Start after the members phase 2 used: most of the crowd at a sold-out line
        # holds no coupon of the round yet.
        used = str(g.next_index)
        s = phase("3a sold out", grab_url, "grab",
                  [str(tokens), str(threads), "/v1/rounds/R1/grab", SOLD_OUT_VENUE, used],
                  paired=True)
        if engine.issued() != before or s.statuses.get("201"):
            problems.append("sold-out phase issued coupons")
        # The same crowd, each request with an Idempotency-Key: the worker still knows the
        # line is sold out, but first asks Redis whether the key was granted (a replay).
        s2 = phase("3a2 sold out, keyed", grab_url, "grab",
                   [str(tokens), str(threads), "/v1/rounds/R1/grab", SOLD_OUT_VENUE,
                    str(s.next_index), "idem"], paired=True)
        if engine.issued() != before or s2.statuses.get("201"):
            problems.append("keyed sold-out phase issued coupons")
        # Members who got their round's one coupon in phase 2 keep tapping (a few
        # thousand of them, each many times, their tokens repeating as a member's do):
        # the first tap per worker learns the quota from grab.lua, the rest are
        # answered from that.
        granted_tokens = tmp / "granted-tokens.txt"
        n_granted = granted_members(engine, tokens, int(g.next_index), granted_tokens,
                                    QUOTA_CROWD)
        before = engine.issued()
        q = phase("3c quota reached", grab_url, "grab",
                  [str(granted_tokens), str(threads), "/v1/rounds/R1/grab",
                   ",".join(BIG_VENUES), "0"], paired=True)
        q.note = f"{n_granted} members; {q.note}"
        if engine.issued() != before or q.statuses.get("201"):
            problems.append("quota phase issued coupons")
        # New members (tokens the workers have not verified yet), like 3a's.
        phase("3b not yet open", f"{engine.base}/v1/rounds/R2/grab", "grab",
              [str(tokens), str(threads), "/v1/rounds/R2/grab", ",".join(BIG_VENUES),
               str(s2.next_index)], paired=True)
        problems += engine.check() + engine.check("R2")
        if engine.issued("R2") != 0:
            problems.append("not-open phase issued coupons")

        codes_file = tmp / "codes.txt"
        n_codes = granted_codes(engine, codes_file)
        before = engine.redeemed()
        r = phase("4 redeem", f"{engine.base}/v1/venue/redemptions", "redeem",
                  [str(codes_file), str(threads), "0"])
        redeemed = engine.redeemed() - before
        r.note = f"{n_codes} codes, {redeemed} redeemed; {r.note}"
        if not 0 <= redeemed - r.statuses.get("200", 0) <= c * reps:
            problems.append(f"redeem: {r.statuses.get('200', 0)} answered 200, {redeemed} "
                            "counted")
        if redeemed > n_codes:
            problems.append(f"redeem: {redeemed} redemptions of {n_codes} codes")
        problems += engine.check()

        sha, _ = grab_lua_sha()
        runs = iter(range(1, 10_000))
        k0 = engine.keys(0)
        for pl in (1, 16):
            evalsha = grab_evalsha(sha, k0, f"9{next(runs):04d}")
            # The counter shares the campaign's hash tag: the same slot on a cluster.
            for name, cmd in (("grab.lua EVALSHA", evalsha), ("INCR", ["incr", f"{k0.tag}:ctr"])):
                before = engine.issued()
                res = redis_bench(engine.redis_node(0), f"5 redis {name} -P {pl}", cmd, pl, c,
                                  args.redis_requests)
                if cmd is evalsha:
                    # Shows the script really grants (random members rarely repeat).
                    res.note += f", issued +{engine.issued() - before}"
                print(f"  {res.phase}: {res.rps:,.0f} req/s p50 {res.p50_ms:.2f} ms "
                      f"p99 {res.p99_ms:.2f} ms", flush=True)
                results.append(res)
        problems += engine.check()

        # Every stock shard at once, each on its own primary.
        S = engine.shards
        for pl in (1, 16):
            before_s = engine.issued_by_shard()
            tag = next(runs)
            cmds = [grab_evalsha(sha, engine.keys(s), f"9{tag:04d}") for s in range(S)]
            res, per = redis_bench_shards(engine, f"5s redis grab.lua x{S} shards -P {pl}",
                                          cmds, pl, c, args.redis_requests)
            got = [a - b for a, b in zip(engine.issued_by_shard(), before_s)]
            res.note += f"; issued +{sum(got)} (" + " / ".join(map(str, got)) + ")"
            print(f"  {res.phase}: {res.rps:,.0f} calls/s ({res.note})", flush=True)
            results.append(res)
            if min(got) <= 0:
                problems.append(f"{res.phase}: a shard issued nothing: {got}")
        problems += engine.check()
    finally:
        stop_ceiling(ceiling)
        if engine is not None:
            engine.stop()
        if external is not None:
            external.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print_table(results)
    print_cpu_budget(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    if problems:
        print("CORRECTNESS CHECK FAILED:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print("correctness: issued never over stock; stock arithmetic and counts agree after "
          "every phase")
    return 0


def cpu_total(cpu: dict[str, float]) -> float:
    """CPU microseconds per answer over every process that served it."""
    return cpu["wrk"] + cpu["server"] + cpu["archiver"] + cpu["redis"]


# Issue 7's targets, as a share of the 1b ceiling.
TARGETS = {"2 grab": 0.6, "3a sold out": 0.9, "3b not yet open": 0.9, "4 redeem": 0.5}
# Issue 19's: the workers' CPU per answer at most this many times the bare app's (1b's
# server column), and the end-to-end rate at least this share of 1b's.
SERVER_TARGETS = {"2 grab": (2.0, 0.35), "3a sold out": (1.5, 0.6),
                  "3a2 sold out, keyed": (None, None), "3c quota reached": (1.5, 0.6),
                  "3b not yet open": (1.5, 0.6)}


def print_cpu_budget(results: list[Result]) -> None:
    """Where each answer's CPU went, and what issue 7's targets would allow.

    wrk, the server processes and Redis share the machine's cores, so when a phase
    keeps them busy its rate is (busy cores) / (CPU per answer). A target ratio t of
    the 1b ceiling then allows at most (1b's CPU per answer) / t in the phase, at the
    same busy cores. The floor is what any engine spends on that phase's answers: the
    load generator's cost of sending the same requests (1b's, the smaller of the two),
    the bare app's HTTP work (1b's server) and this phase's Redis work (counted when
    Redis is the engine's own child: not on --redis-cluster / --redis-tcp). A floor
    above the allowance means the target cannot be met on this machine by any
    engine, whatever it does in Python."""
    by = {r.phase: r for r in results if r.cpu}
    base = by.get("1b ceiling, grab requests")
    if base is None:
        return
    b = base.cpu
    total_b = cpu_total(b)
    print()
    print("CPU per answer, us (wrk = the load generator; server = HTTP workers or the ceiling app)")
    print(f"| {'phase':<36} | {'wrk':>6} | {'server':>6} | {'archiver':>8} | {'redis':>6} | "
          f"{'total':>6} | {'busy cores':>10} |")
    print(f"|{'-' * 38}|{'-' * 8}|{'-' * 8}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 12}|")
    for r in results:
        if not r.cpu:
            continue
        x = r.cpu
        total = cpu_total(x)
        print(f"| {r.phase:<36} | {x['wrk']:6.1f} | {x['server']:6.1f} | {x['archiver']:8.1f} | "
              f"{x['redis']:6.1f} | {total:6.1f} | {x['busy_cores']:10.2f} |")
    print()
    print("Issue 19's targets: workers' CPU per answer / 1b's server column, rate / 1b's rate;"
          " paired: the median over runs of each run against a 1b run just before it;"
          " x 1c: against the 20,000-token ceiling of the earlier passes")
    c1 = next((x for n, x in by.items() if n.startswith("1c ")), None)
    print(f"| {'phase':<36} | {'server':>6} | {'x 1b':>5} | {'paired':>6} | {'target':>6} | "
          f"{'vs 1b':>5} | {'paired':>6} | {'target':>6} | {'redis':>6} | {'x 1c':>5} |")
    print(f"|{'-' * 38}|{'-' * 8}|{'-' * 7}|{'-' * 8}|{'-' * 8}|{'-' * 7}|{'-' * 8}|{'-' * 8}|"
          f"{'-' * 8}|{'-' * 7}|")
    for prefix, (cpu_t, rate_t) in SERVER_TARGETS.items():
        r = by.get(prefix) or next((x for n, x in by.items() if n.startswith(prefix + " ")),
                                   None)
        if r is None:
            continue
        x = r.cpu
        ct = f"{cpu_t:.2f}" if cpu_t else "-"
        rt = f"{rate_t:.2f}" if rate_t else "-"
        xc = f"{x['server'] / c1.cpu['server']:5.2f}" if c1 else "    -"
        ps = f"{r.paired['server']:6.2f}" if r.paired else "     -"
        pr = f"{r.paired['rate']:6.2f}" if r.paired else "     -"
        print(f"| {r.phase:<36} | {x['server']:6.1f} | {x['server'] / b['server']:5.2f} | "
              f"{ps} | {ct:>6} | {r.rps / base.rps:5.2f} | {pr} | {rt:>6} | "
              f"{x['redis']:6.1f} | {xc} |")
    print()
    print("Issue 7's targets against the CPU they allow (us per answer, at 1b's busy cores)")
    print(f"| {'phase':<36} | {'target':>6} | {'allowed':>7} | {'measured':>8} | "
          f"{'floor':>6} | {'best ratio':>10} |")
    print(f"|{'-' * 38}|{'-' * 8}|{'-' * 9}|{'-' * 10}|{'-' * 8}|{'-' * 12}|")
    for prefix, target in TARGETS.items():
        r = next((x for n, x in by.items() if n.startswith(prefix)), None)
        if r is None:
            continue
        x = r.cpu
        total = cpu_total(x)
        floor = min(x["wrk"], b["wrk"]) + b["server"] + x["redis"]
        print(f"| {r.phase:<36} | {target:6.2f} | {total_b / target:7.1f} | {total:8.1f} | "
              f"{floor:6.1f} | {total_b / floor:10.2f} |")


def print_table(results: list[Result]) -> None:
    # Ratios against 1b: the same wrk script, so the same load-generator cost.
    ceiling = next((r.rps for r in results if r.phase.startswith("1b")), 0.0)
    print()
    print(f"| {'phase':<36} | {'req/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | "
          f"{'vs 1b':>6} | statuses / note")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 8}|------")
    for r in results:
        ratio = f"{r.rps / ceiling:.2f}" if ceiling and not r.phase.startswith("5") else ""
        extra = " ".join(f"{k}:{v}" for k, v in sorted(r.statuses.items()))
        if r.errors:
            extra += f" socket-errors:{r.errors}"
        if r.note:
            extra += f" ({r.note})"
        print(f"| {r.phase:<36} | {r.rps:>9,.0f} | {r.p50_ms:>7.2f} | {r.p99_ms:>7.2f} | "
              f"{ratio:>6} | {extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="server worker processes")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--latency-connections", type=int, default=256,
                   help="connections of the extra grab phase that measures p99")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk phase")
    p.add_argument("--repeat", type=int, default=1, help="runs per wrk phase (median)")
    p.add_argument("--tokens", type=int, default=600_000, help="member tokens to pre-mint")
    p.add_argument("--redis-requests", type=int, default=100_000)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--no-pairs", action="store_true",
                   help="no 1b run before each run of issue 19's phases (faster, noisier)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, data)")
    p.add_argument("--redis-cluster", action="store_true",
                   help="run the engine on a local 3-primary Redis Cluster")
    p.add_argument("--redis-tcp", action="store_true",
                   help="run the engine on one redis-server over loopback TCP (to compare)")
    p.add_argument("--stock-shards", type=int, default=1, metavar="S",
                   help="load the campaign with S stock shards (COUPON_STOCK_SHARDS); phase "
                        "5s runs grab.lua on all S at once")
    p.add_argument("--campaign-id", default=None,
                   help=f"the campaign id (default {CID!r}; on --redis-cluster the first of "
                        f"{CID!r}, {CID}-sh1, ... whose shards are on min(S, 3) primaries)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
