"""Alerts that reach a person: the relay's robot messages, and a rule of
dashboards/alerts.yml firing on a real Prometheus, through a real Alertmanager
(dashboards/alertmanager.yml) and `coupon-engine alert-relay`, into a local
webhook sink that answers like a WeCom group robot."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from test_dashboards import DASH, prometheus, wait_for
from test_serve import free_port

from engine.http import alert_relay

CLI = [sys.executable, "-m", "engine.cli"]
TZ = ZoneInfo("Asia/Shanghai")


def notification(n_firing: int = 2, resolved: int = 1) -> dict:
    """What Alertmanager 0.25's webhook posts (version 4), trimmed of nothing."""
    alerts = []
    for i in range(n_firing + resolved):
        firing = i < n_firing
        alerts.append({
            "status": "firing" if firing else "resolved",
            "labels": {"alertname": "CouponVenueBadCodes", "severity": "warn",
                       "venue": f"V{i + 1:02d}", "job": "coupon-engine"},
            "annotations": {"summary": f"venue V{i + 1:02d} sent 30 bad codes in 30 s",
                            "description": "More than 10 unknown codes from the venue.",
                            "runbook": "docs/operations.md#couponvenuebadcodes"},
            "startsAt": "2024-12-20T02:00:05.123Z",
            "endsAt": "0001-01-01T00:00:00Z" if firing else "2024-12-20T02:03:00Z",
            "generatorURL": "http://prom:9090/graph?g0.expr=x",
            "fingerprint": f"{i:016x}"})
    return {"receiver": "duty-robot", "status": "firing" if n_firing else "resolved",
            "alerts": alerts, "groupLabels": {"alertname": "CouponVenueBadCodes",
                                              "severity": "warn"},
            "commonLabels": {"alertname": "CouponVenueBadCodes", "severity": "warn"},
            "commonAnnotations": {}, "externalURL": "http://am:9093", "version": "4",
            "groupKey": "{}:{alertname=\"CouponVenueBadCodes\"}", "truncatedAlerts": 0}


def test_wecom_message() -> None:
    n = alert_relay.parse(json.dumps(notification()).encode())
    body = alert_relay.robot_body(n, "wecom", TZ, "https://git.example/coupon/blob/main")
    assert list(body) == ["msgtype", "markdown"] and body["msgtype"] == "markdown"
    assert list(body["markdown"]) == ["content"]
    text = body["markdown"]["content"]
    lines = text.split("\n")
    assert lines[0] == "## 🔴 [FIRING 2, resolved 1] CouponVenueBadCodes (warn)"
    assert '<font color="warning">**venue V01 sent 30 bad codes in 30 s**</font>' in lines
    assert '<font color="info">~~venue V03 sent 30 bad codes in 30 s~~</font>' in lines
    # Firing before resolved, labels other than name and severity, local times.
    assert text.index("V01") < text.index("V02") < text.index("V03")
    assert "> job=coupon-engine · venue=V01 · since 12-20 10:00:05" in lines
    assert "> job=coupon-engine · venue=V03 · since 12-20 10:00:05 · resolved 12-20 10:03:00" \
        in lines
    assert lines.count("> More than 10 unknown codes from the venue.") == 3
    assert ("> [runbook](https://git.example/coupon/blob/main/docs/operations.md"
            "#couponvenuebadcodes)") in lines
    assert lines[-1] == "[Alertmanager](http://am:9093)"
    # Without a base the relative runbook is shown as text, not as a broken link.
    plain = alert_relay.robot_body(n, "wecom", TZ)["markdown"]["content"]
    assert "> runbook: docs/operations.md#couponvenuebadcodes" in plain.split("\n")


def test_dingtalk_message_and_signature() -> None:
    n = alert_relay.parse(json.dumps(notification(0, 2)).encode())
    body = alert_relay.robot_body(n, "dingtalk", TZ)
    assert body["msgtype"] == "markdown" and list(body["markdown"]) == ["title", "text"]
    assert body["markdown"]["title"] == "✅ [RESOLVED 2] CouponVenueBadCodes (warn)"
    text = body["markdown"]["text"]
    assert "<font" not in text and "~~venue V01 sent 30 bad codes in 30 s~~" in text
    url = alert_relay.dingtalk_signed("https://oapi.dingtalk.com/robot/send?access_token=t",
                                      "SECsecret", now_ms=1734660000000)
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    want = base64.b64encode(hmac.new(b"SECsecret", b"1734660000000\nSECsecret",
                                     hashlib.sha256).digest()).decode()
    assert q == {"access_token": ["t"], "timestamp": ["1734660000000"], "sign": [want]}


def test_a_large_group_fits_the_robot_limit() -> None:
    doc = notification(200, 0)
    for a in doc["alerts"]:  # three bytes a character: the limit is in bytes
        a["annotations"]["description"] = "场馆扫码枪连续提交无效券码，请联系场馆核实。"
    n = alert_relay.parse(json.dumps(doc).encode())
    text = alert_relay.robot_body(n, "wecom", TZ)["markdown"]["content"]
    assert len(text.encode()) <= alert_relay.MAX_BYTES["wecom"]
    shown = text.count("**venue V")
    assert 5 < shown < 200
    assert f"… and {200 - shown} more" in text
    assert text.startswith("## 🔴 [FIRING 200] CouponVenueBadCodes")


class Sink:
    """A local stand-in for a group robot: records bodies, answers like WeCom."""

    def __init__(self, answer: dict | None = None, status: int = 200) -> None:
        self.bodies: list[dict] = []
        self.answer = answer if answer is not None else {"errcode": 0, "errmsg": "ok"}
        self.status = status

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.json_response(self.answer, status=self.status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/robot", self.handle)
        return app


async def _relay_client(sink_url: str) -> TestClient:
    relay = alert_relay.Relay(sink_url, "wecom", TZ)
    client = TestClient(TestServer(alert_relay.create_app(relay)))
    await client.start_server()
    return client


async def test_relay_passes_robot_refusals_back_to_alertmanager() -> None:
    for sink, status in ((Sink(), 200), (Sink({"errcode": 45009, "errmsg": "freq limit"}), 502),
                         (Sink({"errcode": 0}, status=500), 502)):
        server = TestServer(sink.app())
        await server.start_server()
        client = await _relay_client(str(server.make_url("/robot")))
        try:
            r = await client.post(alert_relay.PATH, json=notification())
            assert r.status == status, await r.text()
            assert len(sink.bodies) == 1 and sink.bodies[0]["msgtype"] == "markdown"
            # Not Alertmanager's JSON: refused, nothing sent on.
            r = await client.post(alert_relay.PATH, data=b'{"alerts": 3}')
            assert r.status == 400 and len(sink.bodies) == 1
        finally:
            await client.close()
            await server.close()
    # A robot that does not answer at all.
    client = await _relay_client(f"http://127.0.0.1:{free_port()}/robot")
    try:
        assert (await client.post(alert_relay.PATH, json=notification())).status == 502
    finally:
        await client.close()


def test_relay_command_refuses_bad_arguments(tmp_path: Path) -> None:
    for args, why in ((["--target", "ftp://x", "--format", "wecom"], "--target"),
                      (["--target", "http://x/", "--format", "wecom", "--listen", "nope"],
                       "--listen"),
                      (["--target", "http://x/", "--format", "dingtalk", "--secret-file",
                        str(tmp_path / "missing")], "--secret-file"),
                      (["--target", "http://x/", "--format", "wecom", "--timezone", "Mars/X"],
                       "--timezone")):
        p = subprocess.run([*CLI, "alert-relay", *args], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2 and why in p.stderr and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.skipif((shutil.which("prometheus") is None or shutil.which(
    "prometheus-alertmanager") is None) and not os.environ.get("CI"),
    reason="prometheus or prometheus-alertmanager is not installed")
async def test_a_firing_rule_reaches_the_robot(tmp_path: Path) -> None:
    """CouponEngineDown fires for a target nobody answers on; Alertmanager, configured
    by dashboards/alertmanager.yml, posts to the relay, which posts the robot message."""
    sink = Sink()
    server = TestServer(sink.app(), host="127.0.0.1")
    await server.start_server()
    relay_port, am_port = free_port(), free_port()
    # The shipped Alertmanager configuration, with the relay on a free port.
    am_conf = yaml.safe_load((DASH / "alertmanager.yml").read_text("utf-8"))
    for r in am_conf["receivers"]:
        for w in r["webhook_configs"]:
            w["url"] = f"http://127.0.0.1:{relay_port}{alert_relay.PATH}"
    (tmp_path / "am.yml").write_text(yaml.safe_dump(am_conf))
    procs: list[subprocess.Popen] = []
    try:
        with open(tmp_path / "relay.log", "wb") as log:
            procs.append(subprocess.Popen(
                [*CLI, "alert-relay", "--listen", f"127.0.0.1:{relay_port}", "--format",
                 "wecom", "--target", str(server.make_url("/robot"))],
                stdout=subprocess.DEVNULL, stderr=log))
        with open(tmp_path / "am.log", "wb") as log:
            procs.append(subprocess.Popen(
                ["prometheus-alertmanager", f"--config.file={tmp_path / 'am.yml'}",
                 f"--storage.path={tmp_path / 'am'}",
                 f"--web.listen-address=127.0.0.1:{am_port}",
                 "--cluster.listen-address=", "--log.level=warn"],
                stdout=subprocess.DEVNULL, stderr=log))

        def up(url: str) -> bool:
            import urllib.request
            for p in procs:
                assert p.poll() is None, (tmp_path / "relay.log").read_text() + \
                    (tmp_path / "am.log").read_text()
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        await asyncio.to_thread(wait_for, "the relay", lambda: up(
            f"http://127.0.0.1:{relay_port}/healthz"))
        await asyncio.to_thread(wait_for, "alertmanager", lambda: up(
            f"http://127.0.0.1:{am_port}/-/ready"))
        dead = f"127.0.0.1:{free_port()}"   # nothing listens there: up == 0
        t0 = time.monotonic()
        with prometheus(tmp_path, {"coupon-engine": dead}, rule_files=(DASH / "alerts.yml",),
                        alertmanager=f"127.0.0.1:{am_port}", interval="5s"):
            deadline = time.monotonic() + 60
            while not any("CouponEngineDown" in b["markdown"]["content"] for b in sink.bodies):
                assert time.monotonic() < deadline, sink.bodies
                await asyncio.sleep(0.5)
            took = time.monotonic() - t0
        msg = next(b for b in sink.bodies if "CouponEngineDown" in b["markdown"]["content"])
        assert msg["msgtype"] == "markdown" and list(msg["markdown"]) == ["content"]
        text = msg["markdown"]["content"]
        assert text.startswith("## 🔴 [FIRING 1] CouponEngineDown (page)")
        assert f"**coupon engine target {dead} is down**" in text
        assert "runbook: docs/operations.md#couponenginedown" in text
        # 5 s scrape and evaluation, `for: 10s`, 5 s group wait: well inside a minute.
        assert took < 60
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        await server.close()
