"""Connections that never finish a request are not kept (issue 14, item 3).

A real ``serve`` with small bounds (client timeout 1 s, keep-alive 4 s, a cap of 40
connections) and raw sockets that behave like the clients in the issue: sockets that
send nothing, headers that stop halfway or trickle in, kept-alive connections that
come back for a second request, and more connections than the cap. Every test runs
on both event loops the workers can run on (COUPON_EVENT_LOOP: uvloop, asyncio's own).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import campaign_toml, open_round
from servekit import CLI, Served, children, serve

TIMEOUT = 1.0
KEEPALIVE = 4.0
CAP = 40
GET = b"GET /healthz HTTP/1.1\r\nHost: engine\r\n\r\n"


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           redis_server) -> Iterator[Served]:
    loop = request.param
    tmp = tmp_path_factory.mktemp(f"conns-{loop}")
    url = redis_server.url
    # The session's own server (conftest), emptied as the redis_url fixture does.
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()
    with serve(tmp, url, campaign_toml(rounds=[open_round(url)]), workers=1,
               soft_nofile=1024,
               COUPON_CLIENT_TIMEOUT=str(TIMEOUT), COUPON_KEEPALIVE_TIMEOUT=str(KEEPALIVE),
               COUPON_MAX_CONNECTIONS=str(CAP), COUPON_EVENT_LOOP=loop) as s:
        assert f"(event loop: {loop})" in s.log_text()
        yield s


def connect(s: Served) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    return sock


def closed_after(sock: socket.socket, limit: float = 8.0) -> float:
    """Seconds until the engine closes ``sock`` (EOF or reset); fails past ``limit``."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                break
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit} s") from None
    return time.monotonic() - t0


def answer(sock: socket.socket) -> bytes:
    """One response to a GET /healthz on ``sock`` (its status line and body)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed instead of answering: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(4096)
    return head.split(b"\r\n")[0] + b" " + body


def test_a_socket_that_sends_nothing_is_closed_within_the_timeout(engine: Served) -> None:
    with connect(engine) as sock:
        took = closed_after(sock)
    assert TIMEOUT * 0.8 <= took <= TIMEOUT + 2.5, took


def test_headers_that_stop_or_trickle_are_closed_within_the_timeout(engine: Served) -> None:
    with connect(engine) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: en")
        took = closed_after(sock)
    assert TIMEOUT * 0.8 <= took <= TIMEOUT + 2.5, took
    # A byte every 0.2 s does not restart the clock: headers are due 1 s after connecting.
    with connect(engine) as sock:
        t0 = time.monotonic()
        closed = False
        for b in GET[:-4]:
            try:
                sock.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)
            if time.monotonic() - t0 > 6:
                break
        if not closed:
            closed_after(sock, 4)
        took = time.monotonic() - t0
    assert took <= TIMEOUT + 3, took


def test_kept_alive_connections_keep_working(engine: Served) -> None:
    """Idle between requests longer than the header timeout (but within keep-alive),
    a connection serves its next request; a request whose bytes come in two pieces
    within the timeout is served too; idle past keep-alive, it is closed."""
    with connect(engine) as sock:
        sock.sendall(GET)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(TIMEOUT * 2)
        sock.sendall(GET[:10])
        time.sleep(TIMEOUT / 3)
        sock.sendall(GET[10:])
        assert answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(TIMEOUT * 2)
        sock.sendall(GET)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        closed_after(sock, KEEPALIVE + 4)
        took = time.monotonic() - t0
    assert KEEPALIVE * 0.8 <= took <= KEEPALIVE + 3, took
    # The next request's headers, begun and then stopped, are due 1 s after its first
    # byte: the connection is closed then, not after the keep-alive timeout.
    with connect(engine) as sock:
        sock.sendall(GET)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(0.5)
        sock.sendall(GET[:12])
        took = closed_after(sock)
    assert took <= TIMEOUT + 2.5, took


def test_the_connection_cap_closes_the_newest(engine: Served) -> None:
    """Up to the cap every connection is served; the next one is closed without an
    answer and logged once; when one of the open ones goes, a new one is served."""
    socks = []
    try:
        for _ in range(CAP):
            sock = connect(engine)
            socks.append(sock)
            sock.sendall(GET)
            assert answer(sock).startswith(b"HTTP/1.1 200")
        for _ in range(3):
            with connect(engine) as extra:
                try:
                    extra.sendall(GET)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                closed_after(extra, 3)
        # The ones already open are still served.
        socks[0].sendall(GET)
        assert answer(socks[0]).startswith(b"HTTP/1.1 200")
        socks.pop().close()
        time.sleep(0.3)
        with connect(engine) as again:
            again.sendall(GET)
            assert answer(again).startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks:
            sock.close()
    log = engine.log_text()
    assert log.count("(COUPON_MAX_CONNECTIONS); closed") == 1, log


def test_the_open_files_limit_is_raised_to_fit_the_cap(engine: Served) -> None:
    """Started with a soft limit of 1024, each worker raises it to cap + 1024 spare."""
    workers = [p for p in children(engine.proc.pid)
               if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert workers
    for pid in workers:
        limits = Path(f"/proc/{pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        soft = int(line.split()[3])
        assert soft == CAP + 1024, line


@pytest.mark.parametrize("name,value", [
    ("COUPON_CLIENT_TIMEOUT", "soon"), ("COUPON_KEEPALIVE_TIMEOUT", "-1"),
    ("COUPON_MAX_CONNECTIONS", "0"), ("COUPON_REDIS_POOL_SIZE", "4k"),
    ("COUPON_METRICS_TOKEN", "two words")])
def test_an_unusable_limit_is_one_line_naming_it(tmp_path: Path, name: str,
                                                  value: str) -> None:
    """Every command stops with exit 2 and one line on stderr naming the variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update(COUPON_DATA_DIR=str(tmp_path), **{name: value})
    proc = subprocess.run([*CLI, "token", "admin"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr.count("\n") == 1 and name in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_the_limits_parse_on_both_sides_of_their_bounds() -> None:
    from engine.config import SettingsError, from_env
    s = from_env({"COUPON_CLIENT_TIMEOUT": "0.1", "COUPON_KEEPALIVE_TIMEOUT": "3600",
                  "COUPON_MAX_CONNECTIONS": "1", "COUPON_REDIS_POOL_SIZE": "10000",
                  "COUPON_METRICS_TOKEN": "t0k"})
    assert (s.client_timeout_s, s.keepalive_timeout_s, s.max_connections,
            s.redis_pool_size, s.metrics_token) == (0.1, 3600, 1, 10_000, "t0k")
    d = from_env({})
    assert (d.client_timeout_s, d.keepalive_timeout_s, d.max_connections,
            d.redis_pool_size, d.metrics_token) == (10.0, 75.0, 10_000, 256, None)
    for name, value in [("COUPON_CLIENT_TIMEOUT", "0.09"), ("COUPON_KEEPALIVE_TIMEOUT", "3601"),
                        ("COUPON_MAX_CONNECTIONS", "1000001"),
                        ("COUPON_REDIS_POOL_SIZE", "10001"), ("COUPON_CLIENT_TIMEOUT", "inf")]:
        with pytest.raises(SettingsError, match=name):
            from_env({name: value})
