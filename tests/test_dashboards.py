"""The Grafana dashboard and the alert rules: every metric they name exists, every
panel has a unit, thresholds and a description, every rule is fast, documented and
unit-tested, promtool and amtool accept the files, every panel query returns data
from a real Prometheus scraping ``serve --workers 2`` and the Redis exporter, and
the dashboard's totals survive a restart of ``serve``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from test_metrics import declared_names, drive_traffic, free_port, serve_workers, two_rounds

DASH = Path(__file__).resolve().parent.parent / "dashboards"
DOCS = Path(__file__).resolve().parent.parent / "docs"
# Names a query may use that Prometheus itself provides.
BUILTIN = {"up", "scrape_duration_seconds"}
# prometheus-redis-exporter's metrics; the live test checks the exporter has each one used.
EXPORTER_PREFIX = "redis_"
PROMQL_WORDS = {"sum", "by", "rate", "max", "min", "histogram_quantile", "clamp_min", "vector",
                "or", "time", "le", "without", "on", "and", "unless", "avg", "count", "sort",
                "group_left", "group_right", "bool", "absent", "deriv", "increase",
                "ignoring", "offset"}
ROWS = ["Round opening", "Totals", "Grab traffic", "Stock by venue", "Redemptions by venue",
        "Ledger and engine health", "Redis", "Process health"]
MAX_FOR_S = 15
MAX_WINDOW_S = 30


def dashboard() -> dict:
    return json.loads((DASH / "coupon-engine.json").read_text("utf-8"))


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def panel_queries() -> Iterator[tuple[str, str]]:
    for p in panels():
        for t in p.get("targets", []):
            yield p["title"], t["expr"]


def annotation_queries() -> list[tuple[str, str]]:
    return [(a["name"], a["expr"]) for a in dashboard()["annotations"]["list"] if "expr" in a]


def rules() -> list[dict]:
    doc = yaml.safe_load((DASH / "alerts.yml").read_text("utf-8"))
    return [r for g in doc["groups"] for r in g["rules"]]


def alert_exprs() -> list[str]:
    return [r["expr"] for r in rules()]


def metric_names(expr: str) -> set[str]:
    # Drop label matchers and ranges first: their values are not metric names.
    bare = re.sub(r"\"[^\"]*\"", " ", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
            if w not in PROMQL_WORDS and not re.fullmatch(r"e\d*", w)}


def used_names() -> set[str]:
    used: set[str] = set()
    for _, expr in [*panel_queries(), *annotation_queries()]:
        used |= metric_names(expr)
    for expr in alert_exprs():
        used |= metric_names(expr)
    return used


def test_every_metric_named_is_declared_by_the_engine() -> None:
    declared = declared_names() | BUILTIN
    used = used_names()
    assert {"coupon_grab_requests_total", "coupon_http_request_duration_seconds_bucket",
            "coupon_stock_remaining", "coupon_ledger_lag_events", "coupon_stock_issued",
            "coupon_round_opens_at_seconds", "coupon_stock_sold_out_at_seconds",
            "coupon_process_cpu_seconds", "redis_memory_used_bytes"} <= used
    assert {n for n in used - declared if not n.startswith(EXPORTER_PREFIX)} == set()


def test_dashboard_is_provisionable() -> None:
    d = dashboard()
    text = (DASH / "coupon-engine.json").read_text("utf-8")
    assert d["uid"] == "coupon-engine" and "__inputs" not in d and "${DS_" not in text
    ds = [v for v in d["templating"]["list"] if v["name"] == "datasource"]
    assert ds and ds[0]["type"] == "datasource" and ds[0]["query"] == "prometheus"
    assert [p["title"] for p in d["panels"] if p["type"] == "row"] == ROWS
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels():
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    for a in d["annotations"]["list"]:
        if "expr" in a:
            assert a["datasource"]["uid"] == "${datasource}" and a["useValueForTime"], a["name"]
    for f in ("provisioning/datasources/prometheus.yml",
              "provisioning/dashboards/coupon-engine.yml"):
        assert (DASH / f).read_text("utf-8").startswith("apiVersion: 1")
    prom = yaml.safe_load((DASH / "prometheus.yml").read_text("utf-8"))
    assert prom["global"] == {"scrape_interval": "5s", "evaluation_interval": "5s"}
    assert {j["job_name"] for j in prom["scrape_configs"]} == {"coupon-engine", "redis"}
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]


def _is_money(expr: str) -> bool:
    return "_fen" in expr


def test_every_panel_has_a_unit_thresholds_and_a_description() -> None:
    ps = panels()
    assert len(ps) >= 35
    default = [{"color": "green", "value": None}, {"color": "red", "value": 80}]
    money_panels = 0
    for p in ps:
        title, d = p["title"], p["fieldConfig"]["defaults"]
        assert len(p.get("description", "")) >= 20, f"{title}: no description"
        unit = d.get("unit")
        assert unit, f"{title}: no unit"
        th = d.get("thresholds")
        # Explicit, so Grafana's default (red from 80) never colours a count or money.
        assert th and th["mode"] == "absolute", f"{title}: thresholds not set"
        steps = th["steps"]
        assert steps != default, f"{title}: Grafana's default thresholds"
        assert steps[0]["value"] is None, title
        values = [s["value"] for s in steps[1:]]
        assert values == sorted(values) and len(set(values)) == len(values), title
        if values and p["type"] == "timeseries":
            # A threshold nobody sees is not one: draw it.
            assert d["custom"]["thresholdsStyle"]["mode"] in ("line", "area", "line+area"), title
        exprs = [t["expr"] for t in p["targets"]]
        if any(_is_money(e) for e in exprs):
            money_panels += 1
            if unit == "currencyCNY":
                # Metrics are in fen; the panel shows yuan.
                assert all(e.replace(" ", "").endswith("/100") for e in exprs), title
            else:
                assert unit == "percentunit", f"{title}: money must be currencyCNY"
        if unit == "percentunit":
            assert (d.get("min"), d.get("max")) == (0, 1), f"{title}: ratio without min/max"
        if any(re.match(r"^(up\{|redis_up\b)", e) for e in exprs):
            opts = {k: v for m in d.get("mappings", []) if m["type"] == "value"
                    for k, v in m["options"].items()}
            assert opts.get("1", {}).get("text") == "UP" and opts["1"]["color"] == "green", title
            assert opts.get("0", {}).get("text") == "DOWN" and opts["0"]["color"] == "red", title
        if p["type"] in ("stat", "gauge", "bargauge"):
            # Totals on a stat come from what Redis holds: a counter restarts with serve.
            for e in exprs:
                for m in re.finditer(r"\b(coupon_\w+_total)\b", e):
                    assert re.search(r"(rate|increase)\(\s*" + m.group(1), e), f"{title}: {e}"
    assert money_panels >= 3
    budget = next(p for p in ps if p["title"] == "Budget")
    assert budget["fieldConfig"]["defaults"]["unit"] == "currencyCNY"
    assert len(budget["fieldConfig"]["defaults"]["thresholds"]["steps"]) == 1


def _seconds(text: str) -> float:
    total, n = 0.0, 0
    for num, unit in re.findall(r"(\d+)(ms|s|m|h)", text):
        total += int(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
        n += 1
    assert n, text
    return total


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_rule_is_fast_documented_and_unit_tested() -> None:
    ops = (DOCS / "operations.md").read_text("utf-8")
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", ops, re.M)}
    tests = yaml.safe_load((DASH / "alerts_test.yml").read_text("utf-8"))
    assert tests["evaluation_interval"] == "5s"
    # alertname -> (a test where it is silent before 1m, one where it fires by 1m30s),
    # within one group whose samples come every 5 s (the condition starts at 1m).
    silent, firing = set(), set()
    for group in tests["tests"]:
        assert group["interval"] == "5s"
        for case in group["alert_rule_test"]:
            t = _seconds(case["eval_time"])
            if not case["exp_alerts"] and t < 60:
                silent.add(case["alertname"])
            if case["exp_alerts"] and t <= 90:
                firing.add(case["alertname"])
                for e in case["exp_alerts"]:
                    assert e["exp_annotations"].get("description"), case["alertname"]
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names)) >= 18
    assert {"CouponEngineAbsent", "RedisExporterAbsent", "CouponLedgerLagGrowing",
            "CouponEventLoopLag", "CouponVenueBadCodes", "CouponScriptLatencyHigh",
            "CouponStoreUnavailable"} <= set(names)
    for r in rules():
        name = r["alert"]
        a = r["annotations"]
        assert a.get("summary") and len(a.get("description", "")) >= 30, name
        assert a.get("runbook") == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in anchors, f"{name}: no runbook section in docs/operations.md"
        assert r["labels"]["severity"] in ("page", "warn"), name
        assert _seconds(r.get("for", "0s")) <= MAX_FOR_S, f"{name}: waits too long"
        for window in re.findall(r"\[(\w+)(?::\w+)?\]", r["expr"]):
            assert _seconds(window) <= MAX_WINDOW_S, f"{name}: window {window}"
        assert name in silent and name in firing, f"{name}: no promtool unit test"
    assert "absent(up{" in " ".join(alert_exprs())


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None and not os.environ.get("CI"),
                                    reason="promtool is not installed")
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None and not os.environ.get("CI"),
    reason="prometheus is not installed")
EXPORTER = "prometheus-redis-exporter"


@needs_promtool
def test_promtool_checks_rules_and_their_tests() -> None:
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"],
                 ["check", "config", "prometheus.yml"]):
        proc = subprocess.run(["promtool", *args], cwd=DASH, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(["amtool", "check-config", "alertmanager.yml"], cwd=DASH,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def substitute(expr: str) -> str:
    """Grafana's variables, as a panel showing everything would expand them."""
    return (expr.replace("$__rate_interval", "5s").replace("${datasource}", "")
            .replace("$round", ".*").replace("$venue", ".*"))


def prom_query(base: str, expr: str) -> list[dict]:
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(what: str, check, timeout: float = 20.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@contextmanager
def prometheus(tmp_path: Path, jobs: dict[str, str], rule_files: tuple[Path, ...] = (),
               alertmanager: str | None = None, interval: str = "1s") -> Iterator[str]:
    """A real Prometheus on a free loopback port scraping ``jobs`` (name -> host:port)."""
    port = free_port()
    config: dict = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": j, "static_configs": [{"targets": [t]}]}
                           for j, t in jobs.items()],
    }
    if rule_files:
        config["rule_files"] = [str(f) for f in rule_files]
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                return resp.status == 200
        wait_for("prometheus to start", ready)
        yield base
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


@contextmanager
def redis_exporter(tmp_path: Path, redis_url: str) -> Iterator[str]:
    """prometheus-redis-exporter on a free loopback port, reading Redis over its unix
    socket (the exporter takes ``unix://`` addresses); yields host:port."""
    port = free_port()
    log = open(tmp_path / "redis_exporter.log", "wb")
    proc = subprocess.Popen([EXPORTER, "-redis.addr", redis_url, "-include-system-metrics",
                             "-web.listen-address", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "redis_exporter.log").read_text()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return "\nredis_up 1" in r.read().decode()
        wait_for("the redis exporter", up)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def scraped_names(target: str) -> set[str]:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


@needs_prometheus
@pytest.mark.skipif(shutil.which(EXPORTER) is None and not os.environ.get("CI"),
                    reason="prometheus-redis-exporter is not installed")
def test_every_panel_has_data_in_a_real_prometheus(tmp_path: Path, redis_url: str) -> None:
    with serve_workers(tmp_path, redis_url) as eng, \
            redis_exporter(tmp_path, redis_url) as exporter, \
            prometheus(tmp_path, {"coupon-engine": f"127.0.0.1:{eng.port}",
                                  "redis": exporter}) as base:
        # Every Redis metric the dashboard and the rules use is one this exporter has.
        assert {n for n in used_names() if n.startswith(EXPORTER_PREFIX)} - \
            scraped_names(exporter) == set()
        wait_for("a scrape of both targets",
                 lambda: len(prom_query(base, "up == 1")) == 2)
        sent = drive_traffic(eng)
        want = sum(sent.values())
        wait_for(f"prometheus to see {want} grabs", lambda: [
            g for g in prom_query(base, "sum(coupon_grab_requests_total)")
            if float(g["value"][1]) == want], timeout=15, every=0.3)
        wait_for("the sell-out of R1/V02", lambda: prom_query(
            base, 'coupon_stock_sold_out_at_seconds{round="R1", venue="V02"}'))
        # A couple more scrapes so that every 5 s rate window holds the traffic.
        time.sleep(2.5)
        empty = [(title, q) for title, q in [*panel_queries(), *annotation_queries()]
                 if not prom_query(base, substitute(q))]
        assert empty == []
        # The panels answer with numbers, not only with series.
        rate = prom_query(base, substitute(
            'sum(rate(coupon_grab_requests_total{round=~"$round"}[$__rate_interval]))'))
        assert float(rate[0]["value"][1]) > 0
        after = {r["metric"]["round"] + "/" + r["metric"]["venue"]: float(r["value"][1])
                 for r in prom_query(base, substitute(next(
                     q for t, q in panel_queries() if t == "Time to sell-out by venue")))}
        assert list(after) == ["R1/V02"] and 300 <= after["R1/V02"] <= 400  # opened 5 min ago
        nxt = prom_query(base, substitute(next(
            q for t, q in panel_queries() if t == "Next opening in")))
        r2 = eng.campaign.round("R2")
        assert abs(float(nxt[0]["value"][1]) - (r2.opens_at_ms / 1000 - time.time())) < 30
        # The Redis panels see the engine's Redis: AOF on, its last write fine.
        assert prom_query(base, "redis_aof_enabled == 1") and \
            prom_query(base, "redis_aof_last_write_status == 1")


def panel(title: str) -> list[tuple[str, str]]:
    """('<title>: <legend>', query) of each target of the panel titled ``title``."""
    p = next(p for p in panels() if p["title"] == title)
    return [(f"{title}: {t['legendFormat']}", substitute(t["expr"])) for t in p["targets"]]


@needs_prometheus
def test_totals_survive_a_restart_of_serve(tmp_path: Path, redis_url: str) -> None:
    """Prometheus scrapes serve, serve restarts (its counters start again at 0), and
    the dashboard's totals read the same as before the restart."""
    port, text = free_port(), two_rounds(redis_url)
    totals = panel("Coupons issued, redeemed, void") + panel("Budget")

    def read() -> dict[str, float]:
        out = {}
        for legend, q in totals:
            got = prom_query(base, q)
            out[legend] = float(got[0]["value"][1]) if got else -1.0
        return out

    with prometheus(tmp_path, {"coupon-engine": f"127.0.0.1:{port}"}) as base:
        with serve_workers(tmp_path, redis_url, port=port, text=text) as eng:
            sent = drive_traffic(eng)
            issued = sent["granted"]
            coupons, budget = "Coupons issued, redeemed, void: ", "Budget: "
            before = wait_for("the totals before the restart", lambda: (
                r := read())[coupons + "issued"] == issued and
                r[budget + "committed"] == (issued - 1) * 99 and r)
            # drive_traffic redeems 3 and voids 1; the budget panel is in yuan.
            assert (before[coupons + "redeemed"], before[coupons + "void"]) == (3, 1)
            assert (before[budget + "budget"], before[budget + "redeemed"]) == (10**7, 3 * 99)
            wait_for("the counters", lambda: float(prom_query(
                base, "sum(coupon_coupons_issued_total)")[0]["value"][1]) == issued)
        wait_for("a failed scrape while serve is down",
                 lambda: prom_query(base, 'up{job="coupon-engine"} == 0'))
        with serve_workers(tmp_path, redis_url, port=port, text=text):
            wait_for("a scrape of the restarted serve",
                     lambda: prom_query(base, 'up{job="coupon-engine"} == 1'))
            # The new processes' counters start from 0 ...
            wait_for("the counters to restart", lambda: float(prom_query(
                base, "sum(coupon_coupons_issued_total)")[0]["value"][1]) == 0)
            # ... and the totals, from Redis, do not drop.
            after = wait_for("the totals after the restart", lambda: (
                r := read())[budget + "budget"] > 0 and r)
            assert after == before, (before, after)
