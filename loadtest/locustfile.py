"""Locust load test: a round opening, members grabbing, venues redeeming.

Run (see docs/loadtest.md):
    COUPON_MEMBER_JWT_SECRET=... COUPON_ADMIN_TOKEN=... COUPON_DATA_DIR=... \
    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8080 \
        --csv loadtest/reports/run --html loadtest/reports/run.html

Environment:
    COUPON_MEMBER_JWT_SECRET  secret to sign member JWTs (required)
    COUPON_ADMIN_TOKEN        operator token for the end-of-run stats check (required)
    LOCUST_VENUE_KEYS         JSON {"V01": "vk.V01...."}; else keys are made with
                              `coupon-engine token venue VID` (needs COUPON_DATA_DIR
                              or COUPON_REDIS_URL of the engine under test)
    LOCUST_ROUND              round to grab in (default: the first round not closed)
    LOCUST_PEAK_USERS         members at the peak of the spike (default 300)
    LOCUST_AFTER_OPEN         seconds to keep running after the round opens (default 15)
    LOCUST_VENUE_USERS        venue scanner users (default 5)
    LOCUST_MAX_ERROR_RATIO    allowed share of unexpected answers (default 0.01)
    LOCUST_MAX_P95_MS         allowed p95 over all requests (default 2000)
    LOCUST_RUN_TAG            prefix for member ids (default: time-based, so each run
                              uses fresh members and never meets the campaign quota)
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import mint_member_token  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECRET = os.environ.get("COUPON_MEMBER_JWT_SECRET", "")
ADMIN = os.environ.get("COUPON_ADMIN_TOKEN", "")
RUN_TAG = os.environ.get("LOCUST_RUN_TAG") or f"lt{int(time.time()) % 10**7}"
PEAK_USERS = int(os.environ.get("LOCUST_PEAK_USERS", "300"))
AFTER_OPEN_S = float(os.environ.get("LOCUST_AFTER_OPEN", "15"))
VENUE_USERS = int(os.environ.get("LOCUST_VENUE_USERS", "5"))
MAX_ERROR_RATIO = float(os.environ.get("LOCUST_MAX_ERROR_RATIO", "0.01"))
MAX_P95_MS = float(os.environ.get("LOCUST_MAX_P95_MS", "2000"))
MAX_ATTEMPTS = 6
INVARIANT = "INVARIANT"  # every broken invariant carries this word, so the exit check finds it


@dataclass
class RoundInfo:
    round_id: str = ""
    opens_at: float = 0.0  # epoch seconds
    quota: int = 1
    venues: dict[str, int] = field(default_factory=dict)  # venue -> stock


# Module-level state is per process: in a distributed run every worker has its own,
# which is fine because member ids carry the worker's pid and codes go to the
# venue users of the same worker.
ROUND = RoundInfo()
VENUE_KEYS: dict[str, str] = {}
REDEEM_QUEUE: collections.deque[tuple[str, str]] = collections.deque()
GRANTED: dict[str, int] = collections.defaultdict(int)   # member -> coupons this round
GRANTED_BY_VENUE: dict[str, int] = collections.defaultdict(int)
SEEN_CODES: set[str] = set()
REDEEMED: set[str] = set()
SOLD_OUT: set[str] = set()
MEMBER_TOKENS: dict[str, str] = {}
PROBLEMS: list[str] = []
_member_seq = 0


def _http_json(host: str, path: str, headers: dict[str, str] | None = None,
               timeout: float = 5.0) -> tuple[int, Any]:
    req = urllib.request.Request(host.rstrip("/") + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _load_round(host: str) -> None:
    wanted = os.environ.get("LOCUST_ROUND")
    status, body = _http_json(host, "/v1/rounds")
    if status != 200:
        raise RuntimeError(f"GET /v1/rounds answered {status}")
    rounds = body["rounds"]
    r = next((x for x in rounds if x["id"] == wanted), None) if wanted else \
        next((x for x in rounds if x["state"] != "closed"), None)
    if r is None:
        raise RuntimeError(f"no round {wanted or '(not closed)'} to test")
    ROUND.round_id, ROUND.opens_at = r["id"], _epoch(r["opens_at"])
    ROUND.quota = int(r["member_round_quota"])
    ROUND.venues = {v["venue_id"]: int(v["stock"]) for v in r["venues"]}


def _cli() -> list[str]:
    exe = shutil.which("coupon-engine") or str(REPO / ".venv/bin/coupon-engine")
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "engine.cli"]


def _load_venue_keys() -> None:
    given = os.environ.get("LOCUST_VENUE_KEYS")
    if given:
        VENUE_KEYS.update(json.loads(given))
        return
    # The CLI prints a key the running engine accepts when run with its environment.
    for vid in ROUND.venues:
        out = subprocess.run([*_cli(), "token", "venue", vid], cwd=REPO, capture_output=True,
                             text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"coupon-engine token venue {vid}: {out.stderr.strip()}")
        VENUE_KEYS[vid] = out.stdout.strip()


@events.test_start.add_listener
def on_test_start(environment: Environment, **_: Any) -> None:
    if not SECRET or not ADMIN:
        raise SystemExit("set COUPON_MEMBER_JWT_SECRET and COUPON_ADMIN_TOKEN")
    assert environment.host, "pass --host"
    _load_round(environment.host)
    if not isinstance(environment.runner, MasterRunner):
        _load_venue_keys()


def _error_code(resp: Any) -> str:
    try:
        return str(resp.json()["error"]["code"])
    except Exception:  # a body that is not the contract's error shape is itself unexpected
        return ""


def _retry_after(resp: Any) -> float:
    try:
        return min(float(resp.headers.get("Retry-After", "1")), 3.0)
    except ValueError:
        return 1.0


def _invariant(resp: Any, message: str) -> None:
    PROBLEMS.append(message)
    resp.failure(f"{INVARIANT}: {message}")


class MemberUser(FastHttpUser):
    """A member with the phone app: taps grab at open, retries on 429/503 with the
    same Idempotency-Key, moves to another venue when one sells out."""

    weight = 1
    wait_time = between(0.2, 0.8)

    def on_start(self) -> None:
        global _member_seq
        _member_seq += 1
        self.member_id = f"{RUN_TAG}-{os.getpid()}-{_member_seq}"
        self.token = mint_member_token(SECRET, self.member_id, 3600)
        MEMBER_TOKENS[self.member_id] = self.token
        venues = list(ROUND.venues)
        # Members favour the big venues, as they do on the real app.
        self.favourite = random.choices(venues, weights=[ROUND.venues[v] for v in venues])[0]
        self.done = False

    def _pick_venue(self) -> str | None:
        if self.favourite not in SOLD_OUT:
            return self.favourite
        left = [v for v in ROUND.venues if v not in SOLD_OUT]
        return random.choice(left) if left else None

    @task
    def tap(self) -> None:
        if self.done:
            # Satisfied or out of luck: the app sits on "my coupons" now and then.
            if random.random() < 0.1:
                self.client.get("/v1/me/coupons", headers={"Authorization": f"Bearer {self.token}"},
                                name="GET /v1/me/coupons")
            return
        venue = self._pick_venue()
        if venue is None:
            self.done = True
            return
        self._grab(venue)

    def _grab(self, venue: str) -> None:
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": uuid.uuid4().hex}
        path = f"/v1/rounds/{ROUND.round_id}/grab"
        for attempt in range(MAX_ATTEMPTS):
            name = "POST grab" if attempt == 0 else "POST grab (retry)"
            pause = 0.0
            with self.client.post(path, json={"venue_id": venue}, headers=headers, name=name,
                                  catch_response=True) as resp:
                status, code = resp.status_code, _error_code(resp)
                if status == 201:
                    self._granted(resp, venue)
                    resp.success()
                    return
                if status == 410 and code == "sold_out":
                    SOLD_OUT.add(venue)
                    resp.success()
                    return
                if status == 409 and code in ("round_quota_exceeded", "campaign_quota_exceeded"):
                    self.done = True
                    resp.success()
                    return
                if status == 410 and code == "round_closed":
                    self.done = True
                    resp.success()
                    return
                if status == 409 and code == "round_not_open":
                    # Early tap: the app counts down to opens_at, then taps again.
                    resp.success()
                    gevent.sleep(max(0.0, ROUND.opens_at - time.time()) + random.random() * 0.3)
                    return
                if status == 429:
                    resp.success()  # back-pressure by design; the retry shows the outcome
                    pause = _retry_after(resp)
                elif status == 503 or status == 0:
                    # 503 = Redis slow or down; 0 = connection error/timeout. The same key
                    # finds out whether the first attempt was granted.
                    resp.failure(f"{status} {code or resp.error}")
                    pause = _retry_after(resp) if status == 503 else 0.5
                else:
                    resp.failure(f"unexpected {status} {code}")
                    return
            gevent.sleep(pause * (0.5 + random.random()))
        # Gave up after retries: a lost grab is a failure for the member.
        self.environment.events.request.fire(
            request_type="POST", name="grab gave up", response_time=0, response_length=0,
            exception=RuntimeError("no answer after retries"), context={})

    def _granted(self, resp: Any, venue: str) -> None:
        coupon = resp.json()["coupon"]
        c = coupon["code"]
        if coupon["member_id"] != self.member_id or coupon["venue_id"] != venue:
            _invariant(resp, f"coupon {c} answered for another member or venue")
        if c in SEEN_CODES:
            # A replayed key returns the same code; a different key must never do so.
            _invariant(resp, f"code {c} granted twice")
            return
        SEEN_CODES.add(c)
        GRANTED[self.member_id] += 1
        GRANTED_BY_VENUE[venue] += 1
        if GRANTED[self.member_id] > ROUND.quota:
            _invariant(resp, f"member {self.member_id} holds {GRANTED[self.member_id]} "
                             f"coupons, round quota {ROUND.quota}")
        if GRANTED[self.member_id] >= ROUND.quota:
            self.done = True
        REDEEM_QUEUE.append((venue, c))


class VenueUser(FastHttpUser):
    """Venue scanners redeeming the codes members obtained; now and then a staff
    member scans the same code twice, which must be refused."""

    fixed_count = VENUE_USERS
    wait_time = between(0.05, 0.2)

    @task
    def scan(self) -> None:
        if not REDEEM_QUEUE:
            return
        venue, c = REDEEM_QUEUE.popleft()
        key = VENUE_KEYS.get(venue)
        if key is None:
            return
        headers = {"Authorization": f"Bearer {key}"}
        if random.random() < 0.3:
            self.client.get(f"/v1/venue/coupons/{c}", headers=headers, name="GET venue coupon")
        with self.client.post("/v1/venue/redemptions", json={"code": c}, headers=headers,
                              name="POST redemption", catch_response=True) as resp:
            status, code = resp.status_code, _error_code(resp)
            if status == 200:
                if c in REDEEMED:
                    _invariant(resp, f"code {c} redeemed twice")
                REDEEMED.add(c)
                resp.success()
            elif status == 409 and code == "coupon_not_yet_valid":
                resp.success()
            elif status in (429, 503):
                if status == 429:
                    resp.success()
                else:
                    resp.failure(f"503 {code}")
                REDEEM_QUEUE.append((venue, c))  # the scanner tries again later
                return
            else:
                resp.failure(f"unexpected {status} {code}")
                return
        if random.random() < 0.1:
            with self.client.post("/v1/venue/redemptions", json={"code": c}, headers=headers,
                                  name="POST redemption (again)", catch_response=True) as resp:
                if resp.status_code == 409 and _error_code(resp) == "already_redeemed":
                    resp.success()
                elif resp.status_code == 200:
                    _invariant(resp, f"code {c} redeemed twice")
                else:
                    resp.failure(f"unexpected {resp.status_code} {_error_code(resp)}")


class RoundOpenShape(LoadTestShape):
    """A few early birds, the crowd arriving within ~1 s of the opening, thinning
    once every venue is sold out; stops LOCUST_AFTER_OPEN seconds after the opening."""

    _sold_out_at: float | None = None
    _last_poll: float = 0.0

    def _all_sold_out(self) -> bool:
        # The master polls the public round: workers' SOLD_OUT sets are not visible here.
        now = time.time()
        if self._sold_out_at is None and now - self._last_poll >= 1.0 and self.runner:
            self._last_poll = now
            try:
                status, body = _http_json(self.runner.environment.host or "",
                                          f"/v1/rounds/{ROUND.round_id}", timeout=1.0)
                if status == 200 and sum(v["remaining"] for v in body["round"]["venues"]) == 0:
                    self._sold_out_at = now
            except (OSError, ValueError, KeyError):
                pass
        return self._sold_out_at is not None

    def tick(self) -> tuple[int, float] | None:
        if not ROUND.round_id:
            return (VENUE_USERS, 10.0)  # test_start has not filled ROUND yet
        now = time.time()
        to_open = ROUND.opens_at - now
        if to_open < -AFTER_OPEN_S:
            return None
        early = max(1, PEAK_USERS // 20)
        if to_open > 1.0:
            return (VENUE_USERS + early, float(early))
        if not self._all_sold_out() or now - (self._sold_out_at or now) < 2.0:
            return (VENUE_USERS + PEAK_USERS, float(PEAK_USERS))
        return (VENUE_USERS + max(early, PEAK_USERS // 10), float(PEAK_USERS) / 5)


def _check_stats(environment: Environment) -> list[str]:
    problems: list[str] = []
    status, body = _http_json(environment.host or "",
                              f"/v1/admin/rounds/{ROUND.round_id}/stats",
                              {"Authorization": f"Bearer {ADMIN}"})
    if status != 200:
        return [f"admin stats answered {status}"]
    for v in body["venues"]:
        vid, stock, issued = v["venue_id"], v["stock"], v["issued"]
        if issued > stock:
            problems.append(f"{vid}: issued {issued} > stock {stock}")
        if v["remaining"] < 0:
            problems.append(f"{vid}: remaining {v['remaining']} < 0")
        if stock - issued + v["returned_open"] != v["remaining"]:
            problems.append(f"{vid}: stock {stock} - issued {issued} + returned "
                            f"{v['returned_open']} != remaining {v['remaining']}")
        if v["redeemed"] > issued - v["void"]:
            problems.append(f"{vid}: redeemed {v['redeemed']} > issued - void")
        # Only a single-process run saw every grant; then the engine cannot have fewer.
        if not isinstance(environment.runner, MasterRunner) and \
                GRANTED_BY_VENUE.get(vid, 0) > issued:
            problems.append(f"{vid}: clients got {GRANTED_BY_VENUE[vid]} coupons, "
                            f"engine counts {issued}")
    return problems


def _check_members(environment: Environment, sample: int = 50) -> list[str]:
    """Each sampled member holds no more coupons of the round than its quota, and
    at least the ones this client saw granted."""
    problems: list[str] = []
    ids = random.sample(list(MEMBER_TOKENS), min(sample, len(MEMBER_TOKENS)))
    # Members who got a coupon are the interesting ones; make sure some are in.
    ids += [m for m in list(GRANTED)[:sample] if m not in ids]
    for m in ids:
        status, body = _http_json(environment.host or "", "/v1/me/coupons",
                                  {"Authorization": f"Bearer {MEMBER_TOKENS[m]}"})
        if status != 200:
            problems.append(f"GET /v1/me/coupons for {m} answered {status}")
            continue
        held = sum(1 for c in body["coupons"] if c["round_id"] == ROUND.round_id)
        if held > ROUND.quota:
            problems.append(f"member {m} holds {held} coupons of {ROUND.round_id}, quota "
                            f"{ROUND.quota}")
        if held < GRANTED.get(m, 0):
            problems.append(f"member {m} holds {held}, client saw {GRANTED[m]} granted")
    return problems


@events.test_stop.add_listener
def on_test_stop(environment: Environment, **_: Any) -> None:
    if not ROUND.round_id:
        return
    problems: list[str] = []
    if not isinstance(environment.runner, WorkerRunner):
        problems += _check_stats(environment)
    if not isinstance(environment.runner, MasterRunner):
        problems += _check_members(environment)
    for p in problems:
        PROBLEMS.append(p)
        # Fired as a failed request so that a worker's finding reaches the master.
        environment.events.request.fire(
            request_type="CHECK", name="end-of-run invariants", response_time=0,
            response_length=0, exception=RuntimeError(f"{INVARIANT}: {p}"), context={})
    print(f"end-of-run check: {len(problems)} problem(s); {sum(GRANTED.values())} coupons "
          f"granted to {len(GRANTED)} members, {len(REDEEMED)} redeemed (this process)",
          file=sys.stderr)
    for p in problems[:20]:
        print(f"  {p}", file=sys.stderr)


@events.quitting.add_listener
def on_quitting(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    total = environment.stats.total
    reasons: list[str] = []
    invariant_errors = [e for e in environment.stats.errors.values() if INVARIANT in str(e.error)]
    if invariant_errors or PROBLEMS:
        reasons.append(f"{len(invariant_errors) or len(PROBLEMS)} broken invariant(s)")
    if total.num_requests == 0:
        reasons.append("no requests were made")
    elif total.fail_ratio > MAX_ERROR_RATIO:
        reasons.append(f"unexpected answers {total.fail_ratio:.2%} > {MAX_ERROR_RATIO:.2%}")
    p95 = total.get_response_time_percentile(0.95) or 0
    if p95 > MAX_P95_MS:
        reasons.append(f"p95 {p95:.0f} ms > {MAX_P95_MS:.0f} ms")
    if reasons:
        print("LOAD TEST FAILED: " + "; ".join(reasons), file=sys.stderr)
        environment.process_exit_code = 1
    else:
        print(f"LOAD TEST PASSED: {total.num_requests} requests, unexpected "
              f"{total.fail_ratio:.2%}, p95 {p95:.0f} ms", file=sys.stderr)
        environment.process_exit_code = 0
