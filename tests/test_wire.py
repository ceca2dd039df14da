"""The hot path's pipelined Redis connection, against real redis-servers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from engine.store import scripts
from engine.store.embedded import EmbeddedRedis
from engine.store.wire import Address, ReplyError, Wire, WireError, WireOverloaded, WireTimeout


@pytest.fixture
async def wire(redis_url: str):
    w = Wire.from_url(redis_url, scripts.all_scripts(), timeout=0.5)
    yield w
    await w.close()


async def test_replies_reach_their_callers_in_a_burst(wire: Wire, aredis: aioredis.Redis) -> None:
    await aredis.mset({f"k{i}": f"v{i}" for i in range(500)})
    got = await asyncio.gather(*(wire.call("GET", f"k{i}") for i in range(500)))
    assert got == [f"v{i}" for i in range(500)]


async def test_a_cancelled_call_never_hands_its_reply_to_another(
        wire: Wire, aredis: aioredis.Redis) -> None:
    await aredis.mset({"a": "reply-for-a", "b": "reply-for-b"})
    await wire.call("PING")  # connected
    # Hold every client's commands so that A is still in flight when it is cancelled.
    await aredis.execute_command("CLIENT", "PAUSE", "300", "ALL")
    a = asyncio.ensure_future(wire.call("GET", "a"))
    await asyncio.sleep(0.05)
    a.cancel()
    b = await wire.call("GET", "b")
    assert b == "reply-for-b"
    assert a.cancelled()
    assert await wire.call("GET", "a") == "reply-for-a"


async def test_a_stalled_server_fails_calls_within_the_timeout_then_recovers(
        wire: Wire, aredis: aioredis.Redis) -> None:
    await wire.call("PING")
    await aredis.execute_command("CLIENT", "PAUSE", "1500", "ALL")
    t0 = time.monotonic()
    results = await asyncio.gather(*(wire.call("INCR", "stalled") for _ in range(50)),
                                   return_exceptions=True)
    waited = time.monotonic() - t0
    assert all(isinstance(r, WireTimeout) for r in results), results[:3]
    # The timeout (0.5 s) plus one watchdog tick, not the 1.5 s pause.
    assert waited < 1.0
    # Calls fail fast while the reconnect is backing off, then the connection comes back.
    deadline = time.monotonic() + 5
    while True:
        try:
            assert await wire.call("PING") == "PONG"
            break
        except WireError:
            assert time.monotonic() < deadline, "the wire never reconnected"
            await asyncio.sleep(0.1)


async def test_back_pressure_refuses_instead_of_queueing(redis_url: str,
                                                         aredis: aioredis.Redis) -> None:
    w = Wire.from_url(redis_url, timeout=2.0, max_pending=10)
    try:
        await w.call("PING")
        await aredis.execute_command("CLIENT", "PAUSE", "300", "ALL")
        results = await asyncio.gather(*(w.call("INCR", "bp") for _ in range(25)),
                                       return_exceptions=True)
        overloaded = [r for r in results if isinstance(r, WireOverloaded)]
        assert len(overloaded) == 15
        assert sorted(r for r in results if isinstance(r, int)) == list(range(1, 11))
    finally:
        await w.close()


async def test_scripts_are_loaded_at_connect_and_survive_a_script_flush(
        wire: Wire, aredis: aioredis.Redis) -> None:
    grab = scripts.load("grab")
    await wire.call("PING")
    assert (await aredis.script_exists(grab.sha)) == [True]
    await aredis.script_flush()
    # NOSCRIPT means the script did not run: the call is resent as EVAL, once.
    reply = await wire.evalsha(grab, ["cpn:{x}:" + n for n in "abcdefghi"],
                               ["R", "V", "m", "0" * 17, "0", "60"])
    assert reply[0] == scripts.GrabOutcome.ROUND_NOT_FOUND
    assert await aredis.dbsize() == 0


async def test_error_replies_are_raised_to_their_caller_only(wire: Wire,
                                                              aredis: aioredis.Redis) -> None:
    await aredis.set("s", "text")
    bad, good = await asyncio.gather(wire.call("INCR", "s"), wire.call("GET", "s"),
                                     return_exceptions=True)
    assert isinstance(bad, ReplyError) and bad.prefix == "ERR"
    assert good == "text"


async def test_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    srv = EmbeddedRedis(tmp_path / "r")
    srv.start()
    w = Wire.from_url(srv.url, scripts.all_scripts(), timeout=0.5, reconnect_delay=0.05)
    try:
        assert await w.call("SET", "k", "before") == "OK"
        srv.kill()
        with pytest.raises(WireError):
            await w.call("GET", "k")
        srv.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await w.call("GET", "k") == "before"  # from the append-only file
                break
            except WireError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
    finally:
        await w.close()
        srv.stop()


def test_addresses_from_urls() -> None:
    assert Address.from_url("redis://:pw@10.0.0.5:6380/2") == Address(
        host="10.0.0.5", port=6380, db=2, password="pw")
    assert Address.from_url("redis://user:p%40ss@h") == Address(
        host="h", port=6379, username="user", password="p@ss")
    assert Address.from_url("unix:///run/redis.sock?db=3") == Address(
        path="/run/redis.sock", db=3)
    assert Address.from_url("rediss://h:7000").tls
    with pytest.raises(ValueError):
        Address.from_url("http://h")


async def test_password_and_database_are_applied(tmp_path: Path) -> None:
    srv = EmbeddedRedis(tmp_path / "r")
    srv.start()
    try:
        admin = redis.Redis(unix_socket_path=str(srv.socket_path))
        admin.config_set("requirepass", "s3cret")
        w = Wire.from_url(f"unix://{srv.socket_path}?db=4&password=s3cret")
        try:
            await w.call("SET", "where", "db4")
        finally:
            await w.close()
        check = redis.Redis(unix_socket_path=str(srv.socket_path), db=4, password="s3cret")
        assert check.get("where") == b"db4"
        check.close()
        admin.close()
    finally:
        srv.stop()


async def test_asking_hook_keeps_replies_in_step(wire: Wire, aredis: aioredis.Redis) -> None:
    """The cluster hook queues ASKING right before the command; its own reply (an
    error on a non-cluster server) is consumed, never handed to a caller."""
    await aredis.mset({"a": "1", "b": "2"})
    got = await asyncio.gather(wire.call("GET", "a", asking=True), wire.call("GET", "b"),
                               wire.evalsha(scripts.load("grab"), [], [], asking=True),
                               return_exceptions=True)
    assert got[:2] == ["1", "2"]
    assert wire.in_flight == 0
    assert await wire.call("GET", "b") == "2"
