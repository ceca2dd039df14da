"""The Grafana dashboard and the alert rules: every metric they name exists,
promtool accepts the rules and their unit tests, and every panel query returns
data from a real Prometheus scraping ``serve --workers 2``."""

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
from pathlib import Path

import pytest
from test_metrics import declared_names, drive_traffic, free_port, serve_workers

DASH = Path(__file__).resolve().parent.parent / "dashboards"
# Names a query may use that Prometheus itself provides.
BUILTIN = {"up", "scrape_duration_seconds"}
PROMQL_WORDS = {"sum", "by", "rate", "max", "min", "histogram_quantile", "clamp_min", "vector",
                "or", "time", "le", "without", "on", "and", "unless", "avg", "count"}


def dashboard() -> dict:
    return json.loads((DASH / "coupon-engine.json").read_text("utf-8"))


def panel_queries() -> Iterator[tuple[str, str]]:
    for p in dashboard()["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]


def alert_exprs() -> list[str]:
    """Each rule's expr: one line, or a ``|`` block (PyYAML is not a dependency)."""
    out: list[str] = []
    lines = (DASH / "alerts.yml").read_text("utf-8").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        if m.group(2) != "|":
            out.append(m.group(2))
            continue
        block = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m.group(1)):
                break
            block.append(nxt.strip())
        out.append(" ".join(block))
    return out


def metric_names(expr: str) -> set[str]:
    # Drop label matchers and ranges first: their values are not metric names.
    bare = re.sub(r"\"[^\"]*\"", " ", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
            if w not in PROMQL_WORDS and not re.fullmatch(r"e\d*", w)}


def test_every_metric_named_is_declared_by_the_engine() -> None:
    declared = declared_names() | BUILTIN
    used = set()
    for _, expr in panel_queries():
        used |= metric_names(expr)
    for expr in alert_exprs():
        used |= metric_names(expr)
    assert {"coupon_grab_requests_total", "coupon_http_request_duration_seconds_bucket",
            "coupon_stock_remaining", "coupon_ledger_lag_events"} <= used
    assert used - declared == set()


def test_dashboard_is_provisionable() -> None:
    d = dashboard()
    text = (DASH / "coupon-engine.json").read_text("utf-8")
    assert d["uid"] == "coupon-engine" and "__inputs" not in d and "${DS_" not in text
    ds = [v for v in d["templating"]["list"] if v["name"] == "datasource"]
    assert ds and ds[0]["type"] == "datasource" and ds[0]["query"] == "prometheus"
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ["Round status", "Grab traffic", "Stock by venue", "Redemptions by venue",
                    "Ledger and Redis health", "Process health"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    for f in ("provisioning/datasources/prometheus.yml",
              "provisioning/dashboards/coupon-engine.yml", "prometheus.yml"):
        assert (DASH / f).read_text("utf-8").startswith("apiVersion: 1") or f == "prometheus.yml"
    assert len(alert_exprs()) == 8


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None and not os.environ.get("CI"),
                                    reason="promtool is not installed")


@needs_promtool
def test_promtool_checks_rules_and_their_tests() -> None:
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"],
                 ["check", "config", "prometheus.yml"]):
        proc = subprocess.run(["promtool", *args], cwd=DASH, capture_output=True, text=True,
                              timeout=30)
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


@pytest.mark.skipif(shutil.which("prometheus") is None and not os.environ.get("CI"),
                    reason="prometheus is not installed")
def test_every_panel_has_data_in_a_real_prometheus(tmp_path: Path, redis_url: str) -> None:
    with serve_workers(tmp_path, redis_url) as eng:
        prom_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "coupon-engine", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [f"127.0.0.1:{eng.port}"]}]}],
        }))
        prom_log = open(tmp_path / "prometheus.log", "wb")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=prom_log)
        base = f"http://127.0.0.1:{prom_port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    if prom_query(base, 'up{job="coupon-engine"} == 1'):
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "prometheus did not scrape the engine"
                time.sleep(0.2)
            sent = drive_traffic(eng)
            want = sum(sent.values())
            deadline = time.monotonic() + 15
            while True:
                got = prom_query(base, "sum(coupon_grab_requests_total)")
                if got and float(got[0]["value"][1]) == want:
                    break
                assert time.monotonic() < deadline, f"prometheus never saw {want} grabs"
                time.sleep(0.3)
            # A couple more scrapes so that every 5 s rate window holds the traffic.
            time.sleep(2.5)
            empty = [(title, q) for title, q in panel_queries()
                     if not prom_query(base, substitute(q))]
            assert empty == []
            # The panels answer with numbers, not only with series.
            rate = prom_query(base, substitute(
                'sum(rate(coupon_grab_requests_total{round=~"$round"}[$__rate_interval]))'))
            assert float(rate[0]["value"][1]) > 0
        finally:
            prom.terminate()
            prom.wait(15)
            prom_log.close()
