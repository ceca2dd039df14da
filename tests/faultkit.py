"""Tools for the fault tests (tests/test_faults.py).

Everything here drives the engine from the outside, as an operator or a
client would: ``coupon-engine serve`` processes, HTTP, the ``coupon-engine``
CLI, and the Redis state the engine documents (docs/keys.md). The Redis
servers are started by the tests themselves (``EmbeddedRedis`` on a temporary
directory); only those, and only processes the tests started, are ever killed,
each by its pid.

- ``Serve``: a ``coupon-engine serve`` subprocess logging to a file.
- ``grab_until_answered``: one client's grab, retried with the same
  Idempotency-Key after 503s and lost connections, as the contract tells a
  client to do; records whether the final 201 was the replay of an earlier,
  unanswered attempt ("lost answer").
- ``check_invariants``: the one checker every fault test ends with.
- ``FsyncTracer``: strace on a redis-server: the append-only file's size at
  each completed fsync, i.e. what survives a power cut.
- AOF helpers for redis 7's multi-part AOF (manifest + incr file).
- ``DelayProxy``: a TCP proxy on loopback that delays Redis's replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import redis

from engine.auth import mint_member_token
from engine.ledger import Ledger
from engine.store import keys as K
from engine.store import records
from engine.store.embedded import EmbeddedRedis

CLI = [sys.executable, "-m", "engine.cli"]
SECRET = "fault-member-secret-0123456789abcdef0123"
ADMIN = "fault-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def member_auth(member: str, *, now: float | None = None) -> dict[str, str]:
    # iat an hour back and a long life: valid for front ends whose clocks are
    # skewed by hours (PyJWT refuses an iat in its own future).
    t = time.time() - 3600 if now is None else now
    return {"Authorization": "Bearer " + mint_member_token(SECRET, member, 6 * 3600, now=t)}


# --- processes ---------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(d.name))
    return out


def descendants_of(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for c in children_of(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def listening_pids(port: int) -> set[int]:
    """Processes holding a TCP socket listening on ``port`` (the serve workers)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
                    inodes.add(parts[9])
    pids = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (d / "fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        pids.add(int(d.name))
                        break
    return pids


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def redis_pid(server: EmbeddedRedis) -> int:
    assert server.process is not None
    return server.process.pid


def engine_env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update({
        "COUPON_DATA_DIR": str(data),
        "COUPON_MEMBER_JWT_SECRET": SECRET,
        "COUPON_ADMIN_TOKEN": ADMIN,
        "COUPON_MEMBER_RATE": "10000",
        "COUPON_MEMBER_BURST": "10000",
        "COUPON_LOG_LEVEL": "WARNING",
    })
    env.update(extra)
    return env


class Serve:
    """``coupon-engine serve`` against a Redis the test started."""

    def __init__(self, tmp: Path, redis_url: str, campaign: Path | None = None, *,
                 workers: int = 1, name: str = "serve", env: dict[str, str] | None = None,
                 args: Iterable[str] = (), prefix: Iterable[str] = ()) -> None:
        self.tmp = tmp
        self.data = tmp / f"{name}-data"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.redis_url = redis_url
        self.log = tmp / f"{name}.log"
        self.env = engine_env(self.data, **(env or {}))
        cmd = [*prefix, *CLI, "serve", "--redis-url", redis_url, "--port", str(self.port),
               "--workers", str(workers), *args]
        if campaign is not None:
            cmd += ["--campaign", str(campaign)]
        # The child keeps its own descriptor of the log; ours closes at once.
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        self._known: set[int] = set()

    @property
    def ledger(self) -> Path:
        return self.data / "ledger.sqlite3"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n"
                                     + self.log.read_text(errors="replace")[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                    if b" 200 " in s.recv(64).split(b"\r\n", 1)[0]:
                        self._remember()
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("serve did not become ready:\n"
                             + self.log.read_text(errors="replace")[-3000:])

    def _remember(self) -> None:
        self._known.update(descendants_of(self.proc.pid))

    def workers(self) -> set[int]:
        return listening_pids(self.port) & set(descendants_of(self.proc.pid))

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (drain), then make sure no process it started is left."""
        self._remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self._known:
            kill_pid(pid)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL serve and every process it started (a machine crash)."""
        self._remember()
        kill_pid(self.proc.pid)
        self.proc.wait()
        for pid in self._known:
            kill_pid(pid)


def run_cli(env: dict[str, str], *args: str, timeout: float = 60.0) -> str:
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"coupon-engine {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def drain_ledger(serve: Serve) -> None:
    """What an operator does after a round: archive every event into the ledger."""
    run_cli(serve.env, "archive", "--redis-url", serve.redis_url)


# --- clients -----------------------------------------------------------------

@dataclass
class GrabLog:
    member: str
    round_id: str
    venue: str
    key: str
    status: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    failures: list[str] = field(default_factory=list)  # 503s and lost connections
    final_started_ms: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def code(self) -> str | None:
        if self.status == 201:
            return self.body["coupon"]["code"]
        return None

    @property
    def error(self) -> str | None:
        return self.body.get("error", {}).get("code") if self.status != 201 else None

    @property
    def lost_answer(self) -> bool:
        """The final 201 replays a grant made before the final attempt was sent:
        an earlier attempt was granted and its answer never reached the client."""
        if self.status != 201:
            return False
        return iso_ms(self.body["coupon"]["issued_at"]) < self.final_started_ms


def iso_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def session(limit: int = 0) -> aiohttp.ClientSession:
    # A new connection per request: a retry can land on another worker.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=True))


async def warm(http: aiohttp.ClientSession, base: str, n: int) -> int:
    """``n`` concurrent /readyz: the workers open up to that many Redis
    connections and keep them, so a burst does not wait for connection
    handshakes. Best effort (only speed depends on it); returns the 200s."""
    async def one() -> bool:
        async with http.get(f"{base}/readyz") as resp:
            return resp.status == 200
    return sum(await asyncio.gather(*[one() for _ in range(n)]))


async def post_grab(http: aiohttp.ClientSession, base: str, g: GrabLog,
                    timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    headers = {**member_auth(g.member), "Idempotency-Key": g.key}
    async with http.post(f"{base}/v1/rounds/{g.round_id}/grab", json={"venue_id": g.venue},
                         headers=headers,
                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        return resp.status, await resp.json(content_type=None)


async def grab_until_answered(http: aiohttp.ClientSession, base: str, g: GrabLog, *,
                              deadline: float, pause: float = 0.05,
                              timeout: float = 10.0,
                              retry_on: tuple[int, ...] = (503,)) -> GrabLog:
    """Grab; after a 503 (or a status in ``retry_on``) or a lost connection,
    retry with the same key until another answer or ``deadline`` (monotonic)."""
    while time.monotonic() < deadline:
        g.attempts += 1
        started = time.time()
        t0 = time.monotonic()
        try:
            status, body = await post_grab(http, base, g, timeout)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            g.latencies.append(time.monotonic() - t0)
            g.failures.append(type(exc).__name__)
            await asyncio.sleep(pause)
            continue
        g.latencies.append(time.monotonic() - t0)
        if status in retry_on:
            g.failures.append(f"{status} {body.get('error', {}).get('code')}")
            await asyncio.sleep(pause)
            continue
        g.status, g.body, g.final_started_ms = status, body, int(started * 1000)
        return g
    raise AssertionError(f"{g.member}: no answer before the deadline ({g.failures[-5:]})")


def received(logs: Iterable[GrabLog]) -> dict[str, set[str]]:
    """member -> the codes a client was handed with a 201."""
    out: dict[str, set[str]] = {}
    for g in logs:
        out.setdefault(g.member, set())
        if g.code:
            out[g.member].add(g.code.replace("-", ""))
    return out


# --- the invariant checker ---------------------------------------------------

def check_invariants(redis_url: str, ledger_path: Path | None = None,
                     got: dict[str, set[str]] | None = None, *,
                     exact: bool = False) -> list[str]:
    """Every problem found in the engine's state; [] when all invariants hold.

    - per round and venue: stock + issued - returned_open = initial, and issued
      equals the coupons that exist for that line;
    - per member: coupons per round and in total within the quotas, and the
      member's counters, code list and coupons agree (no partial grant);
    - every idempotency record names an existing coupon of its member;
    - every code a client received with a 201 exists in Redis with its member;
      with ``exact``, each member holds exactly the codes its client received
      (a client that lost an answer found it again by retrying);
    - the ledger (drained) has exactly one grant event per coupon in Redis,
      no duplicate events, and its coupons equal Redis's.
    """
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    problems: list[str] = []
    try:
        cid = r.get(K.ACTIVE)
        if cid is None:
            return ["no active campaign in Redis"]
        k = K.Keys(cid)
        camp = json.loads(r.hget(k.campaign, "doc") or "{}")
        campaign_quota = int(r.hget(k.campaign, "quota"))
        round_quota = {}
        for rid in [x["id"] for x in camp.get("rounds", [])]:
            round_quota[rid] = int(r.hget(k.round(rid), "q"))
        stock = {f: int(v) for f, v in r.hgetall(k.stock).items()}
        stats = {f: int(v) for f, v in r.hgetall(k.stats).items()}
        coupons: dict[str, dict[str, str]] = {}
        for key in r.scan_iter(match=k.coupon("*"), count=1000):
            coupons[key.rsplit(":", 1)[1]] = r.hgetall(key)
        per_line: dict[str, int] = {}
        per_member: dict[str, list[str]] = {}
        for code, rec in coupons.items():
            for f in ("round", "venue", "member", "status", "issued_at"):
                if f not in rec:
                    problems.append(f"coupon {code} is partial: no {f!r} in {rec}")
            line = f"{rec.get('round')}:{rec.get('venue')}"
            per_line[line] = per_line.get(line, 0) + 1
            per_member.setdefault(rec.get("member", "?"), []).append(code)
        for f, initial in stats.items():
            if not f.startswith("initial:"):
                continue
            line = f.split(":", 1)[1]
            issued = stats.get(f"issued:{line}", 0)
            back = stats.get(f"returned_open:{line}", 0)
            if stock.get(line, 0) + issued - back != initial:
                problems.append(f"{line}: stock {stock.get(line)} + issued {issued} - "
                                f"returned {back} != initial {initial}")
            if stock.get(line, 0) < 0:
                problems.append(f"{line}: negative stock {stock[line]}")
            if per_line.get(line, 0) != issued:
                problems.append(f"{line}: issued counter {issued} but "
                                f"{per_line.get(line, 0)} coupons exist")
        members = {key.rsplit(":", 1)[1] for key in r.scan_iter(match=k.member("*"))}
        members |= set(per_member)
        for m in sorted(members):
            mine = per_member.get(m, [])
            held = r.hgetall(k.member(m))
            listed = records.member_codes(held.pop(records.M_CODES, None))
            counters = {f: int(v) for f, v in held.items()}
            if sorted(listed) != sorted(mine):
                problems.append(f"member {m}: code list {listed} != coupons {mine}")
            if counters.get("total", 0) != len(mine):
                problems.append(f"member {m}: total {counters.get('total')} but "
                                f"holds {len(mine)}")
            if len(mine) > campaign_quota:
                problems.append(f"member {m}: {len(mine)} coupons > campaign quota")
            for rid, q in round_quota.items():
                n = sum(1 for c in mine if coupons[c].get("round") == rid)
                if n > q:
                    problems.append(f"member {m}: {n} coupons in {rid} > quota {q}")
                if counters.get(f"r:{rid}", 0) != n:
                    problems.append(f"member {m}: r:{rid} = {counters.get(f'r:{rid}')} "
                                    f"but holds {n}")
        for key in r.scan_iter(match=k.idempotency("*", "*"), count=1000):
            m = key.split(":")[3]
            fp, code = r.get(key).split("|")[:2]
            if coupons.get(code, {}).get("member") != m:
                problems.append(f"idempotency record {key} names {code}, not a coupon of {m}")
        for m, codes_ in (got or {}).items():
            for code in codes_:
                if code not in coupons:
                    problems.append(f"LOST: member {m} was handed {code}; Redis has no "
                                    "such coupon")
                elif coupons[code].get("member") != m:
                    problems.append(f"member {m} was handed {code}, which belongs to "
                                    f"{coupons[code].get('member')}")
            if exact and set(per_member.get(m, [])) != codes_:
                problems.append(f"member {m} holds {sorted(per_member.get(m, []))} but its "
                                f"client was handed {sorted(codes_)}")
        if ledger_path is not None:
            problems += _check_ledger(ledger_path, coupons)
    finally:
        r.close()
    return problems


def _check_ledger(path: Path, coupons: dict[str, dict[str, str]]) -> list[str]:
    problems = []
    if not path.exists():
        return [f"no ledger at {path}"] if coupons else []
    # coupons is derived from events when read (docs/ledger.md): bring it up to date, as
    # any of the engine's readers would, then read the file as it is.
    with Ledger(path) as led:
        led.derive_coupons()
    with contextlib.closing(sqlite3.connect(path)) as db:
        dups = db.execute("SELECT type, code, count(*) FROM events GROUP BY type, code"
                          " HAVING count(*) > 1").fetchall()
        for t, code, n in dups:
            problems.append(f"ledger: {n} {t} events for {code}")
        grants = {code: (rid, vid, m) for code, rid, vid, m in db.execute(
            "SELECT code, round_id, venue_id, member_id FROM events WHERE type = 'grant'")}
        rows = {code: (rid, vid, m, st) for code, rid, vid, m, st in db.execute(
            "SELECT code, round_id, venue_id, member_id, status FROM coupons")}
    for code, rec in coupons.items():
        want = (rec.get("round"), rec.get("venue"), rec.get("member"))
        if grants.get(code) != want:
            problems.append(f"ledger: grant of {code} is {grants.get(code)}, Redis has {want}")
        if rows.get(code) != (*want, rec.get("status")):
            problems.append(f"ledger: coupon {code} is {rows.get(code)}, Redis has "
                            f"{(*want, rec.get('status'))}")
    for code in set(grants) - set(coupons):
        problems.append(f"ledger: grant of {code} that Redis does not have")
    return problems


def assert_invariants(*args: Any, **kw: Any) -> None:
    problems = check_invariants(*args, **kw)
    assert not problems, "invariants broken:\n  " + "\n  ".join(problems[:40])


def snapshot(redis_url: str) -> dict[str, Any]:
    """Every key but streams (the archiver trims those), with its value."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    out: dict[str, Any] = {}
    try:
        for key in sorted(r.scan_iter(count=1000)):
            if key.endswith(":soldout"):
                continue  # the state pollers' monitoring record (keys.sold_out)
            kind = r.type(key)
            if kind == "hash":
                out[key] = r.hgetall(key)
            elif kind == "list":
                out[key] = r.lrange(key, 0, -1)
            elif kind == "string":
                out[key] = r.get(key)
            elif kind == "zset":
                out[key] = r.zrange(key, 0, -1, withscores=True)
    finally:
        r.close()
    return out


# --- append-only file --------------------------------------------------------

def aof_dir(server: EmbeddedRedis) -> Path:
    return server.directory / "appendonly"


def manifest(server: EmbeddedRedis) -> Path:
    found = list(aof_dir(server).glob("*.manifest"))
    assert len(found) == 1, found
    return found[0]


def incr_file(server: EmbeddedRedis) -> Path:
    """The incremental AOF the manifest names (redis 7 multi-part AOF)."""
    lines = manifest(server).read_text().splitlines()
    incr = [ln.split()[1] for ln in lines if ln.split()[-1] == "i"]
    assert incr, lines
    return aof_dir(server) / incr[-1]


def aof_commands(data: bytes) -> list[tuple[int, int, list[bytes]]]:
    """(start, end, argv) of each complete RESP command in an AOF."""
    out, pos = [], 0
    while pos < len(data):
        start = pos
        if data[pos:pos + 1] != b"*":
            raise ValueError(f"not RESP at {pos}")
        nl = data.index(b"\r\n", pos)
        n = int(data[pos + 1:nl])
        pos = nl + 2
        argv = []
        for _ in range(n):
            nl = data.index(b"\r\n", pos)
            size = int(data[pos + 1:nl])
            argv.append(data[nl + 2:nl + 2 + size])
            pos = nl + 2 + size + 2
        if pos > len(data):
            break
        out.append((start, pos, argv))
    return out


def last_grant_block(data: bytes) -> tuple[int, int, str]:
    """(start of MULTI, end of EXEC, coupon code) of the last grab in the AOF."""
    cmds = aof_commands(data)
    block_start = None
    found = None
    for start, end, argv in cmds:
        name = argv[0].upper()
        if name == b"MULTI":
            block_start, code = start, None
        elif name == b"HSET" and block_start is not None and b":coupon:" in argv[1]:
            code = argv[1].rsplit(b":", 1)[1].decode()
        elif name == b"EXEC" and block_start is not None:
            if code is not None and b"issued" in data[block_start:end]:
                found = (block_start, end, code)
            block_start = None
    assert found is not None, "no grab transaction in the AOF"
    return found


class FsyncTracer:
    """strace on a running redis-server: the size of its incremental AOF at
    each completed fsync/fdatasync, i.e. what a power cut leaves on disk.

    Offsets come from the bytes of every write() to the file: an fsync covers
    what was written before it began.
    ``delay_us`` delays every fdatasync (strace fault injection): a slow disk.
    """

    def __init__(self, server: EmbeddedRedis, out: Path, delay_us: int = 0) -> None:
        self.server = server
        self.out = out
        self.incr = incr_file(server)
        cmd = ["strace", "-f", "-y", "-s", "0", "-e", "signal=none",
               "-e", "trace=write,fsync,fdatasync", "-o", str(out)]
        if delay_us:
            cmd += ["-e", f"inject=fdatasync:delay_enter={delay_us}"]
        cmd += ["-p", str(redis_pid(server))]
        self.err = out.with_suffix(".err")
        with self.err.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 10
        pid = redis_pid(server)
        while f"Process {pid} attached" not in self.err.read_text(errors="replace"):
            assert self.proc.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.02)
        time.sleep(0.2)

    def finish(self, timeout: float = 10.0) -> None:
        """Wait for strace to end (it ends with the traced redis-server)."""
        self.proc.wait(timeout)

    def durable_offsets(self) -> list[int]:
        """Offset covered by each completed fsync of the incremental AOF, in order.

        Counted back from the file's final size (call after redis-server is
        dead): an fsync covers the file up to the final size minus every byte
        written after the fsync began.
        """
        name = self.incr.name
        line_re = re.compile(r"^(\d+) +(.*)$")
        written = 0  # bytes written to the file since tracing began
        pending: dict[str, tuple[str, int]] = {}  # tid -> (syscall, written at entry)
        done: list[int] = []
        for raw in self.out.read_text(errors="replace").splitlines():
            m = line_re.match(raw)
            if not m:
                continue
            tid, rest = m.groups()
            if rest.startswith("<..."):
                if tid not in pending:
                    continue
                call, at_entry = pending.pop(tid)
                res = rest.rsplit("=", 1)[-1].split()[0] if "=" in rest else ""
                if call == "write" and res.isdigit():
                    written += int(res)
                elif call in ("fsync", "fdatasync") and res == "0":
                    done.append(at_entry)
                continue
            sc = rest.split("(", 1)[0]
            if sc not in ("write", "fsync", "fdatasync") or f"{name}>" not in rest:
                continue
            if rest.endswith("<unfinished ...>"):
                pending[tid] = (sc, written)
                continue
            res = rest.rsplit("=", 1)[-1].split()[0]
            if sc == "write":
                if res.isdigit():
                    written += int(res)
            elif res == "0":
                done.append(written)
        final = self.incr.stat().st_size
        start = final - written  # the size when tracing began
        assert start >= 0, (final, written)
        return [start] + [start + w for w in done]

    def power_cut(self) -> tuple[int, int]:
        """Truncate the incremental AOF to its last completed fsync (or to its
        size when tracing began, if none completed since). Returns (size
        before, size after)."""
        keep = self.durable_offsets()[-1]
        before = self.incr.stat().st_size
        with self.incr.open("r+b") as f:
            f.truncate(keep)
        return before, keep


async def next_grant_written(server: EmbeddedRedis, timeout: float = 3.0) -> bool:
    """Wait until a grant's transaction is appended to the AOF after this call.
    With fdatasync held by ``FsyncTracer(delay_us=...)`` that grant is then
    written, not yet fsynced and not yet answered."""
    incr = incr_file(server)
    size = incr.stat().st_size
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with incr.open("rb") as f:
            f.seek(size)
            if b":coupon:" in f.read():
                return True
        await asyncio.sleep(0.005)
    return False


def check_aof_fix(server: EmbeddedRedis) -> subprocess.CompletedProcess[str]:
    """The documented recovery: redis-check-aof --fix on the manifest."""
    return subprocess.run(["redis-check-aof", "--fix", str(manifest(server))], input="y\n",
                          capture_output=True, text=True, timeout=60)


# --- a slow network / slow Redis ---------------------------------------------

class DelayProxy:
    """TCP proxy on 127.0.0.1 to a Redis port, delaying Redis's replies by
    ``delay`` seconds (changeable at any time); requests go through at once, so
    a slow reply is a command Redis has already executed. Runs its own event
    loop in a thread."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay = 0.0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self._writers.add(cw)
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.close()
            return
        self._writers.add(uw)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       delayed: bool) -> None:
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def send() -> None:
                while True:
                    due, data = await queue.get()
                    if not data:
                        break
                    wait = due - self._loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    dst.write(data)
                    with contextlib.suppress(OSError):
                        await dst.drain()
                with contextlib.suppress(OSError):
                    dst.close()

            sender = asyncio.create_task(send())
            try:
                while data := await src.read(65536):
                    queue.put_nowait((self._loop.time() + (self.delay if delayed else 0),
                                      data))
            except OSError:
                pass
            queue.put_nowait((0.0, b""))
            await sender

        await asyncio.gather(pump(cr, uw, False), pump(ur, cw, True),
                             return_exceptions=True)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in self._writers:
                w.transport.abort()
            # Let the pumps see their connections end before the loop stops.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(stop()))
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
