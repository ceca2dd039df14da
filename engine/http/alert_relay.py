"""``coupon-engine alert-relay``: Alertmanager's webhook in, a group robot's message out.

Alertmanager's ``webhook_configs`` post their own JSON (version 4), which the
group robots of WeCom (企业微信) and DingTalk (钉钉) do not accept: they take
``{"msgtype": "markdown", ...}``. This relay listens on loopback, turns each
notification into one markdown message and posts it to the robot's URL.

A robot that refuses the message (HTTP error, or ``errcode`` other than 0 in
its JSON answer) makes the relay answer 502, so Alertmanager retries the
notification; a malformed notification is answered 400 (a retry would not help).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
import urllib.parse
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
from aiohttp import ClientError, ClientSession, ClientTimeout, web

log = logging.getLogger("engine.alert_relay")

FORMATS = ("wecom", "dingtalk")
PATH = "/alertmanager"
# WeCom refuses markdown content over 4096 bytes; DingTalk's limit is larger, but a
# message to be read on a phone during a burst should not be longer anyway.
MAX_BYTES = {"wecom": 4096, "dingtalk": 4096}
ROBOT_TIMEOUT_S = 5.0


# Alertmanager's payload is another program's, and newer versions add fields:
# unknown fields are ignored here, unlike the engine's own API bodies.
class Alert(msgspec.Struct):
    status: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    startsAt: str = ""
    endsAt: str = ""
    generatorURL: str = ""


class Notification(msgspec.Struct):
    status: str
    alerts: list[Alert]
    groupLabels: dict[str, str] = {}
    commonLabels: dict[str, str] = {}
    externalURL: str = ""
    truncatedAlerts: int = 0


_decoder = msgspec.json.Decoder(Notification)


def parse(body: bytes) -> Notification:
    return _decoder.decode(body)


def _when(text: str, tz: ZoneInfo) -> str:
    """Alertmanager's RFC 3339 time as local wall-clock time, '' if unset."""
    if not text or text.startswith("0001-"):
        return ""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    return t.astimezone(tz).strftime("%m-%d %H:%M:%S")


def _runbook(alert: Alert, base: str | None) -> str:
    ref = alert.annotations.get("runbook") or alert.annotations.get("runbook_url") or ""
    if not ref:
        return ""
    if ref.startswith(("http://", "https://")):
        return f"[runbook]({ref})"
    if base:
        return f"[runbook]({base.rstrip('/')}/{ref.lstrip('/')})"
    return f"runbook: {ref}"


_SKIP_LABELS = {"alertname", "severity"}


def _alert_lines(a: Alert, fmt: str, tz: ZoneInfo, runbook_base: str | None) -> list[str]:
    name = a.labels.get("alertname", "alert")
    summary = a.annotations.get("summary", name)
    if a.status == "firing":
        head = (f'<font color="warning">**{summary}**</font>' if fmt == "wecom"
                else f"**{summary}**")
    else:
        head = (f'<font color="info">~~{summary}~~</font>' if fmt == "wecom"
                else f"~~{summary}~~")
    lines = [head]
    desc = a.annotations.get("description")
    if desc:
        lines.append(f"> {desc}")
    facts = [f"{k}={v}" for k, v in sorted(a.labels.items()) if k not in _SKIP_LABELS]
    since = _when(a.startsAt, tz)
    if since:
        facts.append(f"since {since}")
    ended = _when(a.endsAt, tz) if a.status == "resolved" else ""
    if ended:
        facts.append(f"resolved {ended}")
    if facts:
        lines.append("> " + " · ".join(facts))
    rb = _runbook(a, runbook_base)
    if rb:
        lines.append("> " + rb)
    return lines


def render(n: Notification, fmt: str, tz: ZoneInfo,
           runbook_base: str | None = None) -> tuple[str, str]:
    """(title, markdown text) of one notification, within the robot's size limit."""
    labels = n.groupLabels or n.commonLabels
    name = labels.get("alertname") or n.commonLabels.get("alertname") or "alerts"
    severity = labels.get("severity") or n.commonLabels.get("severity") or ""
    firing = [a for a in n.alerts if a.status == "firing"]
    resolved = [a for a in n.alerts if a.status != "firing"]
    if firing:
        state = f"FIRING {len(firing) + n.truncatedAlerts}"
        if resolved:
            state += f", resolved {len(resolved)}"
    else:
        state = f"RESOLVED {len(resolved)}"
    mark = "🔴" if firing else "✅"
    title = f"{mark} [{state}] {name}" + (f" ({severity})" if severity else "")
    out = [f"## {title}"]
    limit = MAX_BYTES[fmt]
    shown = 0
    # Firing first: during a burst that is what the reader must see.
    for a in firing + resolved:
        block = "\n".join(_alert_lines(a, fmt, tz, runbook_base))
        candidate = "\n\n".join([*out, block])
        # Room for the "and N more" line.
        if len(candidate.encode()) > limit - 80:
            break
        out.append(block)
        shown += 1
    rest = len(n.alerts) - shown + n.truncatedAlerts
    if rest:
        out.append(f"… and {rest} more")
    if n.externalURL and len("\n\n".join(out).encode()) + len(n.externalURL) + 20 < limit:
        out.append(f"[Alertmanager]({n.externalURL})")
    return title, "\n\n".join(out)


def robot_body(n: Notification, fmt: str, tz: ZoneInfo,
               runbook_base: str | None = None) -> dict[str, Any]:
    title, text = render(n, fmt, tz, runbook_base)
    if fmt == "wecom":
        return {"msgtype": "markdown", "markdown": {"content": text}}
    return {"msgtype": "markdown", "markdown": {"title": title, "text": text}}


def dingtalk_signed(url: str, secret: str, now_ms: int | None = None) -> str:
    """The robot URL with DingTalk's signature (robots set to "加签" need it):
    sign = base64(HMAC-SHA256(secret, "<timestamp>\\n<secret>"))."""
    ts = str(now_ms if now_ms is not None else int(time.time() * 1000))
    digest = hmac.new(secret.encode(), f"{ts}\n{secret}".encode(), hashlib.sha256).digest()
    sign = urllib.parse.quote_plus(base64.b64encode(digest).decode())
    return f"{url}{'&' if '?' in url else '?'}timestamp={ts}&sign={sign}"


class Relay:
    def __init__(self, target: str, fmt: str, tz: ZoneInfo, secret: str | None = None,
                 runbook_base: str | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.target, self.fmt, self.tz = target, fmt, tz
        self.secret, self.runbook_base = secret, runbook_base
        self.session: ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=ROBOT_TIMEOUT_S))

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    def url(self) -> str:
        if self.fmt == "dingtalk" and self.secret:
            return dingtalk_signed(self.target, self.secret)
        return self.target

    async def handle(self, request: web.Request) -> web.Response:
        try:
            n = parse(await request.read())
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("refused a notification that is not Alertmanager's: %s", exc)
            return web.json_response({"error": str(exc)}, status=400)
        body = robot_body(n, self.fmt, self.tz, self.runbook_base)
        assert self.session is not None
        try:
            async with self.session.post(self.url(), json=body) as resp:
                text = await resp.text()
                ok = resp.status == 200
                if ok:
                    try:
                        answer = msgspec.json.decode(text.encode() or b"{}")
                    except msgspec.DecodeError:
                        answer = {}
                    # Both robots answer 200 with {"errcode": 0, "errmsg": "ok"}; a
                    # refusal (bad key, rate limit, bad body) is a 200 with errcode != 0.
                    ok = not isinstance(answer, dict) or answer.get("errcode", 0) == 0
        except (ClientError, TimeoutError) as exc:
            log.error("robot unreachable: %s", exc)
            return web.json_response({"error": f"robot unreachable: {exc}"}, status=502)
        if not ok:
            log.error("robot refused the message: HTTP %s %s", resp.status, text[:200])
            return web.json_response({"error": "robot refused the message",
                                      "robot_status": resp.status, "robot_body": text[:500]},
                                     status=502)
        log.info("relayed %s (%d alert(s))", n.status, len(n.alerts))
        return web.json_response({"relayed": len(n.alerts)})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app(relay: Relay) -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.on_startup.append(relay.start)
    app.on_cleanup.append(relay.stop)
    app.router.add_post(PATH, relay.handle)
    app.router.add_get("/healthz", healthz)
    return app


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def run(listen: str, target: str, fmt: str, timezone: str, secret: str | None,
        runbook_base: str | None) -> None:
    host, port = parse_listen(listen)
    relay = Relay(target, fmt, ZoneInfo(timezone), secret, runbook_base)
    log.info("alert relay on http://%s:%d%s -> %s (%s)", host, port, PATH,
             urllib.parse.urlsplit(target).netloc, fmt)
    web.run_app(create_app(relay), host=host, port=port, access_log=None, print=None)
