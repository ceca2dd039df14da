"""A private redis-server owned by the engine (or by a test session).

It listens only on a unix socket under its directory, keeps an append-only
file with the settings the engine's durability promise needs, and is stopped
with SHUTDOWN (which fsyncs) by whoever started it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from .connection import REQUIRED_CONFIG

log = logging.getLogger("engine.embedded")



class EmbeddedRedisError(RuntimeError):
    pass


@dataclass
class EmbeddedRedis:
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = 0  # 0: unix socket only

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path.resolve()}"

    def config_lines(self, extra: dict[str, str] | None = None) -> list[str]:
        conf = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "unixsocket": str(self.socket_path.resolve()),
            "unixsocketperm": "700",
            "dir": str(self.directory.resolve()),
            "appenddirname": "appendonly",
            "dbfilename": "dump.rdb",
            "save": '""',
            "daemonize": "no",
            "protected-mode": "yes",
            "logfile": str((self.directory / "redis.log").resolve()),
            "pidfile": str((self.directory / "redis.pid").resolve()),
            **REQUIRED_CONFIG,
            **(extra or {}),
        }
        return [f"{k} {v}" for k, v in conf.items()]

    def start(self, extra: dict[str, str] | None = None, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise EmbeddedRedisError(
                "redis-server is not installed; install it with: apt-get install redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists() and _answers(self.socket_path):
            raise EmbeddedRedisError(
                f"a redis-server already listens on {self.socket_path}; is another engine"
                " running on this data directory?")
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        conf = self.directory / "redis.conf"
        conf.write_text("\n".join(self.config_lines(extra)) + "\n")
        self.process = subprocess.Popen([exe, str(conf)], stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self.process.returncode}; see "
                    f"{self.directory / 'redis.log'}")
            if self.socket_path.exists() and _answers(self.socket_path):
                log.info("embedded redis-server pid %d on %s", self.process.pid, self.url)
                return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError("redis-server did not start in time")

    def stop(self, timeout: float = 10.0) -> None:
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        # SIGTERM makes redis-server fsync the AOF and exit cleanly.
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("redis-server pid %d did not stop; killing it", p.pid)
            p.kill()
            p.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would; for fault tests."""
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def ensure_running(directory: Path) -> Iterator[str]:
    """URL of the embedded Redis in ``directory``: the live one, or one started
    for the duration of the block (commands run while ``serve`` is down)."""
    sock = directory / "redis.sock"
    if sock.exists() and _answers(sock):
        yield f"unix://{sock.resolve()}"
        return
    r = EmbeddedRedis(directory)
    r.start()
    try:
        yield r.url
    finally:
        r.stop()


@contextlib.contextmanager
def engine_redis(settings: Settings) -> Iterator[str]:
    """The Redis URL commands act on: the configured one, or the embedded Redis of
    the data directory (the running one, or one started for the command)."""
    if settings.redis_url:
        yield settings.redis_url
        return
    if settings.cluster:
        raise EmbeddedRedisError("--redis-cluster needs --redis-url (a seed node of the cluster)")
    with ensure_running(settings.redis_dir) as url:
        yield url


@contextlib.contextmanager
def engine_redis_if_any(settings: Settings) -> Iterator[str | None]:
    """``engine_redis`` for commands that can do without Redis (reconcile, settle,
    statement): None when there is no embedded Redis data yet (rather than an
    empty server started just to find nothing) or it cannot be started."""
    if settings.redis_url or settings.cluster or settings.redis_dir.exists():
        try:
            cm = engine_redis(settings)
            url = cm.__enter__()
        except EmbeddedRedisError as exc:
            log.warning("embedded Redis unavailable: %s", exc)
        else:
            try:
                yield url
            finally:
                cm.__exit__(None, None, None)
            return
    yield None
