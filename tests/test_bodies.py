"""Bodies that arrive the way phones on mobile networks send them (issue 14, item 1):
headers and body in separate writes, a body in pieces 100 ms apart, chunked bodies
without a Content-Length. Every route that takes a body reads all of it (up to the
4096-byte limit) before decoding; over the limit is still the contract's 400, and a
body that stops arriving is answered within the client read timeout.

Raw sockets against an engine on a loopback port, each request on its own
connection (``Connection: close``), so what the engine answers is exactly what such
a client would read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

from aiohttp.test_utils import TestClient
from conftest import EngineTestServer, campaign_toml, open_round

from engine import campaign as cmp
from engine import codes
from engine.config import Settings
from engine.http.app import create_app
from engine.store import load_campaign

PAUSE = 0.1


async def send(host: str, port: int, head: bytes, pieces: Sequence[bytes],
               pause: float = PAUSE) -> tuple[int, dict]:
    """Write the headers, then each piece of the body after ``pause``; read the answer."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head)
        await writer.drain()
        for piece in pieces:
            await asyncio.sleep(pause)
            writer.write(piece)
            await writer.drain()
        data = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = data.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split(b" ")[1]), json.loads(body) if body else {}


def head(method: str, path: str, headers: dict[str, str], length: int | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: engine", "Connection: close",
             "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
    lines.append(f"Content-Length: {length}" if length is not None
                 else "Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(pieces: Sequence[bytes]) -> list[bytes]:
    """Each piece as one chunk, then the last chunk."""
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


def split(body: bytes, n: int) -> list[bytes]:
    """``body`` in ``n`` pieces (none for an empty body)."""
    step = max(1, -(-len(body) // n))
    return [body[i:i + step] for i in range(0, len(body), step)]


SHAPES = ("one write", "headers then body", "pieces", "chunked")


async def send_shaped(host: str, port: int, shape: str, method: str, path: str,
                      headers: dict[str, str], body: bytes) -> tuple[int, dict]:
    """One request sent as a phone might: in one write, headers then body, the body in
    three pieces 100 ms apart, or chunked in three chunks 100 ms apart."""
    if shape == "one write":
        return await send(host, port, head(method, path, headers, len(body)) + body, [])
    if shape == "headers then body":
        return await send(host, port, head(method, path, headers, len(body)), [body])
    if shape == "pieces":
        return await send(host, port, head(method, path, headers, len(body)), split(body, 3))
    return await send(host, port, head(method, path, headers, None), chunked(split(body, 3)))


async def shapes(host: str, port: int, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> dict[str, tuple[int, dict]]:
    """The same request sent in each of the four shapes."""
    return {s: await send_shaped(host, port, s, method, path, headers, body) for s in SHAPES}


def keyed(member: dict[str, str], key: str) -> dict[str, str]:
    return {**member, "Idempotency-Key": key}


async def test_grab_and_redemption_bodies_in_pieces_are_read_whole(make_engine,
                                                                   redis_url) -> None:
    e = await make_engine(campaign_toml(quota=5, rounds=[open_round(
        redis_url, quota=5, stock={"V01": 10, "V02": 10})]))
    host, port = e.client.server.host, e.client.server.port
    grab = b'{"venue_id": "V01"}'
    got = {name: (status, body.get("coupon", {}).get("venue_id") or body)
           for name, (status, body) in (await shapes(
               host, port, "POST", "/v1/rounds/R1/grab", e.member("m1"), grab)).items()}
    assert got == {k: (201, "V01") for k in SHAPES}, got
    mine = await (await e.client.get("/v1/me/coupons", headers=e.member("m1"))).json()
    codes_ = [c["code"] for c in mine["coupons"]]
    assert len(codes_) == 4
    # A replay with the same key, its body in pieces, is the same grant (not a 400).
    first = await send(host, port, head("POST", "/v1/rounds/R1/grab",
                                        keyed(e.member("m2"), "tap-1"), len(grab)), [grab])
    again = await send(host, port, head("POST", "/v1/rounds/R1/grab",
                                        keyed(e.member("m2"), "tap-1"), None),
                       chunked(split(grab, 4)))
    assert first[0] == 201 and again == first

    # Each shape redeems its own coupon.
    venue = await e.venue("V01")
    results = {}
    for shape, code in zip(SHAPES, codes_):
        status, body = await send_shaped(host, port, shape, "POST", "/v1/venue/redemptions",
                                         venue, json.dumps({"code": code}).encode())
        results[shape] = status, body.get("coupon", {}).get("status") or body
    assert results == {k: (200, "redeemed") for k in SHAPES}, results


async def test_an_empty_body_in_pieces_is_still_invalid(make_engine, redis_url) -> None:
    """Reading whole bodies does not make a bad one acceptable: empty and truncated
    JSON are still 400, however they arrive."""
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    host, port = e.client.server.host, e.client.server.port
    for body in (b"", b'{"venue_id": "V0'):
        for name, (status, reply) in (await shapes(
                host, port, "POST", "/v1/rounds/R1/grab", e.member("m1"), body)).items():
            assert (status, reply["error"]["code"]) == (400, "invalid_request"), (body, name)


async def test_the_limit_holds_for_bodies_in_pieces(make_engine, redis_url) -> None:
    """4096 bytes in pieces are read and decoded; 4097 are the contract's 400, with a
    Content-Length or chunked, in one piece or many."""
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    host, port = e.client.server.host, e.client.server.port
    venue = await e.venue("V01")
    code = json.dumps({"code": codes.display(codes.new_code())}).encode()
    at_limit = code[:-1] + b" " * (4096 - len(code)) + b"}"
    assert len(at_limit) == 4096
    over = at_limit[:-1] + b" }"
    for name, (status, reply) in (await shapes(
            host, port, "POST", "/v1/venue/redemptions", venue, at_limit)).items():
        # Read whole and decoded: an unknown code, not a body error.
        assert (status, reply["error"]["code"]) == (404, "coupon_not_found"), name
    for name, (status, reply) in (await shapes(
            host, port, "POST", "/v1/venue/redemptions", venue, over)).items():
        assert (status, reply["error"]["code"]) == (400, "invalid_request"), name
        assert set(reply) == {"error"} and "4096" in reply["error"]["message"], name
    grab_over = b'{"venue_id": "V01"' + b" " * 4080 + b"}"
    assert len(grab_over) > 4096
    status, reply = await send(host, port, head("POST", "/v1/rounds/R1/grab", e.member("m"),
                                                None), chunked(split(grab_over, 8)), 0.02)
    assert (status, reply["error"]["code"]) == (400, "invalid_request")
    assert (await (await e.client.get("/v1/me/coupons", headers=e.member("m"))).json()) == {
        "coupons": []}


async def test_a_body_that_stops_arriving_is_answered_within_the_read_timeout(
        make_engine, redis_url) -> None:
    """A client that promises 40 bytes and sends 10 is answered 400 once the client read
    timeout (1 s here) has passed, not held forever; nothing is granted."""
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]),
                          client_timeout_s=1.0)
    host, port = e.client.server.host, e.client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    try:
        writer.write(head("POST", "/v1/rounds/R1/grab", e.member("m1"), 40).replace(
            b"Connection: close", b"Connection: keep-alive") + b'{"venue_id"')
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        took = time.monotonic() - t0
        headers = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        length = int(headers.split("content-length: ")[1].split("\r\n")[0])
        body = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line.startswith(b"HTTP/1.1 400"), status_line
    assert body["error"]["code"] == "invalid_request" and "1 s" in body["error"]["message"]
    # What is left of that body must never be read as a next request.
    assert "connection: close" in headers
    assert 0.9 <= took < 5, took
    assert (await (await e.client.get("/v1/me/coupons", headers=e.member("m1"))).json()) == {
        "coupons": []}


async def test_demo_sign_in_body_in_pieces(redis_url, aredis, tmp_path: Path) -> None:
    """The pages' demo sign-in (development secrets only) takes a body too."""
    await load_campaign(aredis, cmp.parse_campaign(campaign_toml(rounds=[open_round(redis_url)])),
                        1)
    client = TestClient(EngineTestServer(create_app(Settings(data_dir=tmp_path / "var",
                                                       redis_url=redis_url), redis_url)))
    await client.start_server()
    try:
        host, port = client.server.host, client.server.port
        got = await shapes(host, port, "POST", "/v1/demo/sign-in", {},
                           b'{"member_id": "alice"}')
        assert {k: (s, b.get("member_id")) for k, (s, b) in got.items()} == {
            k: (200, "alice") for k in got}
    finally:
        await client.close()
