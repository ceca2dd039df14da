"""What the browser tests share: a real ``coupon-engine serve`` on a free loopback port,
plain HTTP calls to it, Debian's Chromium through Playwright, the fake camera's video.

Chromium is Debian's package (``apt-get install chromium fonts-noto-cjk``, in
scripts/system-deps.sh); nothing here downloads a browser.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from test_serve import free_port

CLI = [sys.executable, "-m", "engine.cli"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
APT_LINE = "apt-get install -y --no-install-recommends chromium fonts-noto-cjk"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(method: str, url: str, body: object = None, headers: dict[str, str] | None = None,
         timeout: float = 10) -> Reply:
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers.items()), exc.read())


@dataclass
class Serve:
    """A ``coupon-engine serve`` process with its own data directory, stopped by pid."""

    root: Path
    campaign: str
    env_extra: dict[str, str] = field(default_factory=dict)
    # When the campaign's first round opens, for tests that wait for it.
    opens_at: datetime | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data(self) -> Path:
        return self.root / "var"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
        env.update(COUPON_DATA_DIR=str(self.data), COUPON_LOG_LEVEL="WARNING",
                   # The pages' own retries are under test, not the per-member limit.
                   COUPON_MEMBER_RATE="1000", COUPON_MEMBER_BURST="1000", **self.env_extra)
        return env

    def start(self) -> Serve:
        self.root.mkdir(parents=True, exist_ok=True)
        camp = self.root / "campaign.toml"
        camp.write_text(self.campaign, encoding="utf-8")
        self.port = free_port()
        with (self.root / "serve.log").open("wb") as log:
            self.proc = subprocess.Popen([*CLI, "serve", "--campaign", str(camp), "--port",
                                          str(self.port), "--workers", "1"],
                                         env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited: {self.log_tail()}"
            try:
                if call("GET", self.base + "/readyz", timeout=1).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve did not become ready: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self) -> str:
        path = self.root / "serve.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def cli(self, *args: str) -> str:
        return subprocess.run([*CLI, *args], env=self.env, check=True, capture_output=True,
                              text=True, timeout=60).stdout.strip()

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return call("GET", self.base + path, headers=headers)

    def post(self, path: str, body: object, headers: dict[str, str] | None = None) -> Reply:
        return call("POST", self.base + path, body, headers)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def write_y4m(path: Path, text: str | None, frames: int = 20) -> None:
    """A YUV4MPEG2 video for Chromium's fake camera: ``text`` as a QR code (as
    engine/qr.py makes it: micro=False) about 300 px wide on a white 640x480 frame, or a
    blank frame for None. Chromium loops the file and reopens it for each capture."""
    import segno
    from PIL import Image

    frame = Image.new("RGB", (640, 480), "white")
    if text is not None:
        buf = io.BytesIO()
        segno.make(text, error="m", micro=False).save(buf, kind="png", scale=10, border=4)
        qr = Image.open(buf).convert("RGB").resize((300, 300), Image.NEAREST)
        frame.paste(qr, (170, 90))
    y, cb, cr = frame.convert("YCbCr").split()
    data = y.tobytes() + cb.resize((320, 240)).tobytes() + cr.resize((320, 240)).tobytes()
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(b"YUV4MPEG2 W640 H480 F10:1 Ip A1:1 C420jpeg\n")
        for _ in range(frames):
            f.write(b"FRAME\n" + data)
    os.replace(tmp, path)


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(f"Debian's chromium is not installed: {APT_LINE}")
    return path


class Watch:
    """Console errors and uncaught page errors of one page: a test ends with none.

    One kind of console line is not the page's: Chromium logs "Failed to load
    resource" for every fetch answered 4xx/5xx, and the API's documented refusals
    (sold_out, quota, ...) are answers the page handles. Those are kept apart, for API
    URLs only; a page, script or style that fails to load is still an error."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        self.api_refusals: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def _console(self, m: Any) -> None:
        if m.type != "error":
            return
        url = (m.location or {}).get("url", "")
        if m.text.startswith("Failed to load resource") and "/v1/" in url:
            self.api_refusals.append(f"{url}: {m.text}")
        else:
            self.errors.append(f"console: {m.text} ({url})")

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
