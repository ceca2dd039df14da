"""A real ``coupon-engine serve`` process for tests that drive it as clients do: on a
free loopback port, against a Redis the test owns, stopped by its pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import ADMIN, SECRET

from engine.auth import mint_member_token

CLI = [sys.executable, "-m", "engine.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None,
         timeout: float = 10) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw[:1] == b"{" else {"text": raw.decode()}
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw[:1] == b"{" else {"text": raw.decode()}


@dataclass
class Served:
    base: str
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def member(self, member_id: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + mint_member_token(SECRET, member_id, 3600)}

    admin = {"Authorization": f"Bearer {ADMIN}"}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A ``coupon-engine`` command with the same environment as this ``serve``."""
        return subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                              check=check, timeout=60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def serve_env(data: Path, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COUPON_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(COUPON_DATA_DIR=str(data), COUPON_REDIS_URL=redis_url,
               COUPON_MEMBER_JWT_SECRET=SECRET, COUPON_ADMIN_TOKEN=ADMIN,
               COUPON_ALLOW_UNSAFE_REDIS="1", COUPON_ARCHIVER="0",
               COUPON_MEMBER_RATE="1000", COUPON_MEMBER_BURST="1000", **extra)
    return env


def _soft_nofile(n: int) -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (n, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (serve's workers, archiver, redis)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@contextmanager
def serve(tmp_path: Path, redis_url: str, campaign_text: str, *, workers: int = 1,
          ready_timeout: float = 30, soft_nofile: int | None = None,
          **env_extra: str) -> Iterator[Served]:
    """``serve --workers N --campaign FILE`` until the block ends (SIGTERM, then kill);
    ``soft_nofile`` starts it with that soft open-files limit."""
    camp = tmp_path / "campaign.toml"
    camp.write_text(campaign_text, encoding="utf-8")
    data, port = tmp_path / "var", free_port()
    env = serve_env(data, redis_url, **env_extra)
    log = tmp_path / "serve.log"
    # A file, not a pipe: nobody reads the log while the test runs.
    with log.open("wb") as out:
        proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", str(workers),
                                 "--campaign", str(camp)], env=env, stderr=out,
                                preexec_fn=None if soft_nofile is None
                                else lambda: _soft_nofile(soft_nofile))
    s = Served(f"http://127.0.0.1:{port}", port, env, proc, log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            assert proc.poll() is None, s.log_text()
            try:
                if http("GET", s.base + "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "engine did not become ready\n" + s.log_text()
            time.sleep(0.1)
        # Every worker must be listening before traffic: each logs when it is.
        deadline = time.monotonic() + ready_timeout
        while s.log_text().count("listening on") < workers:
            assert time.monotonic() < deadline, "workers did not start\n" + s.log_text()
            time.sleep(0.1)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
