"""Prometheus metrics, declared in one place.

Label values are bounded: round and venue ids come from the loaded campaign,
outcomes from the script enums, routes from the router's canonical paths;
never a member id or a code. A round id a client made up is counted as
``round="other"``.

Hot-path updates are tallied in plain dicts and applied to the prometheus
objects by ``flush()`` (every ``FLUSH_INTERVAL_S`` and before every render):
in multiprocess mode each prometheus update takes a lock and writes an mmap,
which cost about a tenth of a sold-out request. Scrapes therefore lag by at
most one flush interval.

Under ``serve --workers N`` every worker writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (set by the serve parent before it spawns the
workers) and any worker's /metrics merges all of them. Without that variable
(tests, one in-process app) a plain registry is used.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .domain import round_state
from .store.scripts import GrabOutcome, RedeemOutcome

if TYPE_CHECKING:
    from .campaign import Campaign

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# From a quarter of a millisecond: a grab served from the worker's cache takes about that.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0)
ROUND_STATES = ("scheduled", "open", "closed")
OTHER = "other"
# Outcomes decided by the worker before any script runs (see Engine.grab).
_PRE_SCRIPT_GRAB = ("round_not_found", "venue_not_found", "round_not_open", "round_closed",
                    "sold_out")
# Script outcomes that never reach a client as such.
_INTERNAL = {"code_collision", "bad_argument"}
GRAB_OUTCOMES = tuple(dict.fromkeys(
    [*(o.name.lower() for o in GrabOutcome if o.name.lower() not in _INTERNAL),
     *_PRE_SCRIPT_GRAB]))
REDEMPTION_OUTCOMES = tuple(dict.fromkeys(
    [*(o.name.lower() for o in RedeemOutcome), "rate_limited", "malformed", "lookup",
     "lookup_not_found", "lookup_wrong_venue"]))
SCRIPTS = ("grab", "redeem", "void")

FLUSH_INTERVAL_S = 0.25
PROCESS_SAMPLE_S = 1.0
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Metrics:
    """Every metric of the engine; ``disabled()`` gives a registry nobody scrapes."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 multiproc_dir: str | None = None) -> None:
        # The metrics live in a private registry so that several apps in one test
        # process never collide; what /metrics shows is ``self.registry``.
        own = registry or CollectorRegistry(auto_describe=True)
        path = multiproc_dir if multiproc_dir is not None else os.environ.get(MULTIPROC_ENV)
        self.multiprocess = bool(path) and registry is None
        if self.multiprocess:
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry, path=path)
        else:
            self.registry = own
        r = own
        self.grab_requests = Counter(
            "coupon_grab_requests_total", "Grab requests by round and outcome",
            ["round", "outcome"], registry=r)
        self.coupons_issued = Counter(
            "coupon_coupons_issued_total", "Coupons issued", ["round", "venue"], registry=r)
        self.coupons_voided = Counter(
            "coupon_coupons_voided_total", "Coupons voided", ["round", "venue"], registry=r)
        self.coupons_redeemed = Counter(
            "coupon_coupons_redeemed_total", "Coupons redeemed", ["round", "venue"], registry=r)
        self.redemption_attempts = Counter(
            "coupon_redemption_attempts_total", "Venue lookups and redemptions by outcome",
            ["venue", "outcome"], registry=r)
        self.http_duration = Histogram(
            "coupon_http_request_duration_seconds", "HTTP request duration by route",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_in_flight = Gauge(
            "coupon_http_requests_in_flight", "HTTP requests being served",
            registry=r, multiprocess_mode="livesum")
        self.script_duration = Histogram(
            "coupon_redis_script_duration_seconds", "Redis script call duration by script",
            ["script"], buckets=LATENCY_BUCKETS, registry=r)
        self.store_unavailable = Counter(
            "coupon_store_unavailable_total", "Store calls answered 503 (Redis down or slow)",
            registry=r)
        self.stock_refills = Counter(
            "coupon_stock_refills_total",
            "Refills of a dry stock shard from the others (sharded campaigns only)",
            registry=r)
        # Polled values: every worker reads the same Redis, so the newest reading
        # of a live worker is the truth; a dead worker's last reading is not.
        self.stock_remaining = Gauge(
            "coupon_stock_remaining", "Coupons left per round and venue",
            ["round", "venue"], registry=r, multiprocess_mode="livemostrecent")
        self.stock_initial = Gauge(
            "coupon_stock_initial", "Coupons loaded per round and venue",
            ["round", "venue"], registry=r, multiprocess_mode="livemostrecent")
        self.round_state = Gauge(
            "coupon_round_state", "1 for the round's current state, else 0",
            ["round", "state"], registry=r, multiprocess_mode="livemostrecent")
        self.ledger_lag = Gauge(
            "coupon_ledger_lag_events", "Events in the Redis stream not yet in the ledger",
            registry=r, multiprocess_mode="livemostrecent")
        self.budget = Gauge(
            "coupon_budget_fen", "The campaign's settlement budget",
            registry=r, multiprocess_mode="livemostrecent")
        self.budget_committed = Gauge(
            "coupon_budget_committed_fen",
            "Settlement owed if every live coupon is redeemed: (issued - void) x settlement",
            registry=r, multiprocess_mode="livemostrecent")
        self.budget_redeemed = Gauge(
            "coupon_budget_redeemed_fen", "Settlement owed for redeemed coupons",
            registry=r, multiprocess_mode="livemostrecent")
        self.loop_lag = Gauge(
            "coupon_event_loop_lag_seconds", "How late the worker's event loop wakes up",
            registry=r, multiprocess_mode="livemax")
        self.last_poll = Gauge(
            "coupon_state_poll_timestamp_seconds", "When a worker last polled Redis",
            registry=r, multiprocess_mode="livemax")
        # Totals from Redis's stats hash (summed over shards): unlike the counters
        # above, they do not restart at 0 with ``serve``. Rates come from the counters.
        self.stock_issued = Gauge(
            "coupon_stock_issued", "Coupons issued per round and venue, as Redis counts them",
            ["round", "venue"], registry=r, multiprocess_mode="livemostrecent")
        self.stock_void = Gauge(
            "coupon_stock_void", "Coupons voided per round and venue, as Redis counts them",
            ["round", "venue"], registry=r, multiprocess_mode="livemostrecent")
        self.stock_redeemed = Gauge(
            "coupon_stock_redeemed", "Coupons redeemed per round and venue, as Redis counts them",
            ["round", "venue"], registry=r, multiprocess_mode="livemostrecent")
        self.sold_out_at = Gauge(
            "coupon_stock_sold_out_at_seconds",
            "When a poller first saw the line's stock at 0 while its round was open (epoch s)",
            ["round", "venue"], registry=r, multiprocess_mode="livemostrecent")
        self.round_opens_at = Gauge(
            "coupon_round_opens_at_seconds", "The round's opening time (epoch s)",
            ["round"], registry=r, multiprocess_mode="livemostrecent")
        self.round_closes_at = Gauge(
            "coupon_round_closes_at_seconds", "The round's closing time (epoch s)",
            ["round"], registry=r, multiprocess_mode="livemostrecent")
        # The operators' controls, from Redis (so a pause made with the CLI shows too):
        # one metric per action; the *_at_seconds gauges are the dashboard's annotations.
        self.round_paused = Gauge(
            "coupon_round_paused", "1 while an operator has the round paused, else 0",
            ["round"], registry=r, multiprocess_mode="livemostrecent")
        self.round_paused_at = Gauge(
            "coupon_round_paused_at_seconds", "When an operator last paused the round (epoch s)",
            ["round"], registry=r, multiprocess_mode="livemostrecent")
        self.round_resumed_at = Gauge(
            "coupon_round_resumed_at_seconds",
            "When an operator last resumed the round (epoch s)",
            ["round"], registry=r, multiprocess_mode="livemostrecent")
        self.round_closed_early_at = Gauge(
            "coupon_round_closed_early_at_seconds",
            "When an operator closed the round before its scheduled close (epoch s)",
            ["round"], registry=r, multiprocess_mode="livemostrecent")
        self.stock_added = Gauge(
            "coupon_stock_added", "Stock operators added per round and venue (in the stock)",
            ["round", "venue"], registry=r, multiprocess_mode="livemostrecent")
        self.stock_reversed = Gauge(
            "coupon_stock_reversed",
            "Redemptions operators reversed per round and venue (no longer redeemed)",
            ["round", "venue"], registry=r, multiprocess_mode="livemostrecent")
        self.process = ProcessGauges(r, "worker")
        self._rounds: frozenset[str] = frozenset()
        for s in SCRIPTS:
            self.script_duration.labels(s)
        # Tallies waiting for flush(): (metric, *labels) -> count, and
        # (histogram, *labels) -> [per-bucket counts..., sum].
        self._counts: dict[tuple[Any, ...], int] = {}
        self._hists: dict[tuple[Any, ...], list[float]] = {}
        self.in_flight = 0

    def count(self, metric: Counter, *labels: str) -> None:
        key = (metric, *labels)
        self._counts[key] = self._counts.get(key, 0) + 1

    def observe(self, metric: Histogram, seconds: float, *labels: str) -> None:
        key = (metric, *labels)
        row = self._hists.get(key)
        if row is None:
            row = self._hists[key] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        # Prometheus counts a value in the first bucket whose bound is >= it.
        row[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[-1] += seconds

    def flush(self) -> None:
        """Apply the tallies to the prometheus metrics (and so to the shared files)."""
        counts, self._counts = self._counts, {}
        hists, self._hists = self._hists, {}
        for (metric, *labels), n in counts.items():
            m = metric.labels(*labels) if labels else metric
            m.inc(n)
        for (metric, *labels), row in hists.items():
            child = metric.labels(*labels)
            # prometheus_client keeps one value per bucket (the +Inf bucket last) and
            # a sum; adding to them is what observe() does, once per call.
            for i, k in enumerate(row[:-1]):
                if k:
                    child._buckets[i].inc(k)
            child._sum.inc(row[-1])
        self.http_in_flight.set(self.in_flight)

    async def flush_forever(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        try:
            while True:
                await asyncio.sleep(interval_s)
                self.flush()
                self.process.sample()
        finally:
            self.flush()

    @classmethod
    def disabled(cls) -> Metrics:
        return cls(CollectorRegistry(auto_describe=True))

    def render(self) -> bytes:
        """The exposition text; blocking file reads in multiprocess mode, so call it
        from an executor (after ``flush()`` on the loop)."""
        return generate_latest(self.registry)

    def prime(self, campaign: Campaign) -> None:
        """Create every round x venue x outcome series at zero so panels are never empty."""
        self._rounds = frozenset(r.id for r in campaign.rounds)
        venues = sorted({v for r in campaign.rounds for v in r.stock})
        self.budget.set(campaign.budget_fen)
        for r in campaign.rounds:
            self.round_opens_at.labels(r.id).set(r.opens_at_ms / 1000)
            self.round_closes_at.labels(r.id).set(r.closes_at_ms / 1000)
            for o in GRAB_OUTCOMES:
                self.grab_requests.labels(r.id, o)
            for st in ROUND_STATES:
                self.round_state.labels(r.id, st)
            self.round_paused.labels(r.id)
            for v, n in r.stock.items():
                self.coupons_issued.labels(r.id, v)
                self.coupons_voided.labels(r.id, v)
                self.coupons_redeemed.labels(r.id, v)
                self.stock_initial.labels(r.id, v).set(n)
                for g in (self.stock_issued, self.stock_void, self.stock_redeemed,
                          self.stock_added, self.stock_reversed):
                    g.labels(r.id, v)
        for o in GRAB_OUTCOMES:
            self.grab_requests.labels(OTHER, o)
        for v in venues:
            for o in REDEMPTION_OUTCOMES:
                self.redemption_attempts.labels(v, o)

    def _round(self, round_id: str) -> str:
        return round_id if round_id in self._rounds else OTHER

    def grab(self, round_id: str, outcome: str) -> None:
        self.count(self.grab_requests, self._round(round_id), outcome)

    def issued(self, round_id: str, venue_id: str) -> None:
        self.count(self.coupons_issued, round_id, venue_id)

    def voided(self, round_id: str, venue_id: str) -> None:
        self.count(self.coupons_voided, round_id, venue_id)

    def redeemed(self, round_id: str, venue_id: str) -> None:
        self.count(self.coupons_redeemed, round_id, venue_id)

    def redemption(self, venue_id: str, outcome: str) -> None:
        self.count(self.redemption_attempts, venue_id, outcome)

    def count_refill(self) -> None:
        self.count(self.stock_refills)

    def http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.observe(self.http_duration, seconds, route, method, str(status))
        if status == 503:
            self.count(self.store_unavailable)

    @contextlib.contextmanager
    def script(self, name: str) -> Iterator[None]:
        """Time one store script call, failures included."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.script_took(name, time.perf_counter() - t0)

    def script_took(self, name: str, seconds: float) -> None:
        self.observe(self.script_duration, seconds, name)

    def observe_state(self, campaign: Campaign, stock: dict[str, int],
                      stats: dict[str, int], now_ms: int, ledger_lag: int,
                      sold_out: dict[str, int] | None = None) -> None:
        """Set the polled gauges from one reading of Redis; ``sold_out`` is
        '<round>:<venue>' -> ms when the line was first seen sold out."""
        issued = void = redeemed = 0
        for f, n in stats.items():
            kind = f.split(":", 1)[0]
            if kind == "issued":
                issued += n
            elif kind == "void":
                void += n
            elif kind == "redeemed":
                redeemed += n
        for r in campaign.rounds:
            state = round_state(r, now_ms)
            for st in ROUND_STATES:
                self.round_state.labels(r.id, st).set(1 if st == state else 0)
            for v in r.stock:
                line = f"{r.id}:{v}"
                self.stock_remaining.labels(r.id, v).set(stock.get(line, 0))
                self.stock_issued.labels(r.id, v).set(stats.get(f"issued:{line}", 0))
                self.stock_void.labels(r.id, v).set(stats.get(f"void:{line}", 0))
                self.stock_redeemed.labels(r.id, v).set(stats.get(f"redeemed:{line}", 0))
                self.stock_added.labels(r.id, v).set(stats.get(f"added:{line}", 0))
                self.stock_reversed.labels(r.id, v).set(stats.get(f"reversed:{line}", 0))
                at = (sold_out or {}).get(line)
                if at is not None:
                    self.sold_out_at.labels(r.id, v).set(at / 1000)
        self.budget.set(campaign.budget_fen)
        self.budget_committed.set((issued - void) * campaign.settlement_fen)
        self.budget_redeemed.set(redeemed * campaign.settlement_fen)
        self.ledger_lag.set(ledger_lag)
        self.last_poll.set(time.time())

    def observe_controls(self, rounds: dict[str, tuple[bool, int | None, int | None,
                                                         int | None]]) -> None:
        """round -> (paused now, last pause, last resume, early close), times in ms;
        a time gauge has a series only once its action happened."""
        for rid, (paused, paused_at, resumed_at, closed_at) in rounds.items():
            self.round_paused.labels(rid).set(1 if paused else 0)
            for gauge, ms in ((self.round_paused_at, paused_at),
                              (self.round_resumed_at, resumed_at),
                              (self.round_closed_early_at, closed_at)):
                if ms is not None:
                    gauge.labels(rid).set(ms / 1000)

    async def watch_loop_lag(self, interval_s: float = 0.25) -> None:
        """Sleep and measure how late the loop wakes: a blocked loop shows up here."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(interval_s)
            self.loop_lag.set(max(0.0, loop.time() - t0 - interval_s))


class ProcessGauges:
    """CPU time and resident memory of this process, labelled by role.

    prometheus_client's own process collector reads only the scraping process in
    multiprocess mode; these gauges are written by each process into its own
    file instead. ``liveall`` adds a ``pid`` label to each process's series and
    drops a process's series once the serve parent marks it dead.
    """

    def __init__(self, registry: CollectorRegistry, role: str,
                 every_s: float = PROCESS_SAMPLE_S) -> None:
        self.cpu = Gauge(
            "coupon_process_cpu_seconds", "CPU time (user + system) this process has used",
            ["role"], registry=registry, multiprocess_mode="liveall").labels(role)
        self.rss = Gauge(
            "coupon_process_resident_memory_bytes", "Resident memory of this process",
            ["role"], registry=registry, multiprocess_mode="liveall").labels(role)
        self.every_s = every_s
        self._next = 0.0
        self.sample()  # never a 0 that would read as "no memory"

    def sample(self, now: float | None = None) -> None:
        """Read /proc/self/stat, at most once per ``every_s``."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return
        self._next = now + self.every_s
        cpu, rss = read_process_stat()
        self.cpu.set(cpu)
        self.rss.set(rss)


def read_process_stat() -> tuple[float, int]:
    """(CPU seconds, resident bytes) of this process, from /proc/self/stat."""
    try:
        with open("/proc/self/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:  # no /proc (not Linux): CPU from the interpreter, memory unknown
        return time.process_time(), 0
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = raw[raw.rindex(")") + 2:].split()
    utime, stime, rss_pages = int(fields[11]), int(fields[12]), int(fields[21])
    return (utime + stime) / _CLK_TCK, rss_pages * _PAGE_SIZE


def mark_process_dead(pid: int, path: str) -> None:
    """Drop a dead worker's live gauges (in-flight, polled values) from the merge."""
    multiprocess.mark_process_dead(pid, path)
