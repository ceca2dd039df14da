"""Helpers shared by the locust smoke run and the benchmark.

Kept free of engine imports so that the locustfile can run from a machine that
only has locust installed (a load generator next to a deployment).

Command line (used by ci_smoke.sh):
    python loadtest/support.py campaign OUT.toml --opens-in 8 --stock 300 --venues 5
    python loadtest/support.py free-port
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import socket
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

CST = timezone(timedelta(hours=8))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


_HEADER = _b64(b'{"alg":"HS256","typ":"JWT"}')


def mint_member_token(secret: str, member_id: str, ttl_s: int = 3600,
                      now: float | None = None) -> str:
    """HS256 JWT as the union's identity service signs it (same claims as engine.auth).

    Re-implemented with hmac because PyJWT costs ~5x more per token, which
    matters when the benchmark pre-mints 200k of them.
    """
    iat = int(time.time() if now is None else now)
    payload = _b64(json.dumps({"sub": member_id, "iat": iat, "exp": iat + ttl_s},
                              separators=(",", ":")).encode())
    signing = f"{_HEADER}.{payload}".encode()
    sig = hmac.new(secret.encode(), signing, hashlib.sha256).digest()
    return f"{_HEADER}.{payload}.{_b64(sig)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iso(dt: datetime) -> str:
    return dt.astimezone(CST).isoformat(timespec="milliseconds")


def campaign_toml(*, cid: str, venues: list[str], rounds: list[dict[str, object]],
                  campaign_quota: int = 3, budget_fen: int = 10**9) -> str:
    """A campaign file (contract section 1). Each round dict: id, opens, closes
    (datetimes), quota, stock ({venue: n}); coupons are valid from an hour before
    the round opens so that the load test can redeem them straight away."""
    out = ["[campaign]", f'id = "{cid}"', 'name = "压测活动"', 'timezone = "Asia/Shanghai"',
           f"budget_fen = {budget_fen}", "face_value_fen = 10000", "member_price_fen = 100",
           "settlement_fen = 9900", f"member_campaign_quota = {campaign_quota}", ""]
    for v in venues:
        out += ["[[venues]]", f'id = "{v}"', f'name = "场馆{v}"', 'kind = "ski"',
                'city = "吉林市"', ""]
    for r in rounds:
        opens, closes = r["opens"], r["closes"]
        assert isinstance(opens, datetime) and isinstance(closes, datetime)
        stock = r["stock"]
        assert isinstance(stock, dict)
        out += ["[[rounds]]", f'id = "{r["id"]}"', f"opens_at = {iso(opens)}",
                f"closes_at = {iso(closes)}", f"member_round_quota = {r.get('quota', 1)}",
                f"valid_from = {iso(opens - timedelta(hours=1))}",
                f"valid_until = {iso(closes + timedelta(days=30))}", "[rounds.stock]"]
        out += [f"{v} = {n}" for v, n in stock.items()]
        out.append("")
    return "\n".join(out)


def load_campaign_text(socket_path: Path, text: str, shards: int = 1) -> None:
    """Load a campaign file's text into a private redis-server (its unix socket) with
    the engine's own load_campaign, as `coupon-engine campaign load` would."""
    import asyncio

    import redis.asyncio as aioredis

    from engine.campaign import parse_campaign
    from engine.store import load_campaign

    async def go() -> None:
        c = aioredis.Redis(unix_socket_path=str(socket_path), decode_responses=True)
        try:
            await load_campaign(c, parse_campaign(text), shards=shards)
        finally:
            await c.aclose()
    asyncio.run(go())


def smoke_campaign(opens_in_s: float, stock: int, n_venues: int, round_quota: int = 1) -> str:
    """One round opening `opens_in_s` from now, `stock` coupons spread over `n_venues`."""
    venues = [f"V{i:02d}" for i in range(1, n_venues + 1)]
    per, extra = divmod(stock, n_venues)
    opens = datetime.now(UTC) + timedelta(seconds=opens_in_s)
    return campaign_toml(
        cid=f"smoke-{int(time.time())}", venues=venues,
        rounds=[{"id": "R1", "opens": opens, "closes": opens + timedelta(hours=1),
                 "quota": round_quota,
                 "stock": {v: per + (1 if i < extra else 0) for i, v in enumerate(venues)}}])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="support.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("campaign")
    c.add_argument("out", type=Path)
    c.add_argument("--opens-in", type=float, default=8.0)
    c.add_argument("--stock", type=int, default=300)
    c.add_argument("--venues", type=int, default=5)
    sub.add_parser("free-port")
    args = p.parse_args(argv)
    if args.cmd == "campaign":
        args.out.write_text(smoke_campaign(args.opens_in, args.stock, args.venues), "utf-8")
    else:
        print(free_port())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
