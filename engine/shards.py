"""Stock shards: which shard a member, a code or a share of stock belongs to.

Pure functions, no I/O (docs/cluster.md, "Stock shards"). A member's quota
counters, coupon list and idempotency records live in the member's shard; a
coupon's record lives in its code's shard, and a grab draws codes until the
code's shard is the member's, so a coupon's whole life (grant, redeem, void)
is decided by one shard's scripts and written to one shard's event stream.
"""

from __future__ import annotations

import zlib

MAX_SHARDS = 64


def _bucket(text: str, shards: int) -> int:
    # CRC32 of the UTF-8 bytes: stable across processes and Python versions
    # (unlike hash()), and cheap next to a script call.
    return zlib.crc32(text.encode()) % shards if shards > 1 else 0


def member_shard(member_id: str, shards: int) -> int:
    return _bucket(member_id, shards)


def code_shard(code: str, shards: int) -> int:
    """The shard of a canonical code (codes.normalize's output)."""
    return _bucket(code, shards)


def split(n: int, shards: int) -> list[int]:
    """``n`` units over ``shards`` shards, as even as possible, the first ones
    taking the remainder; a negative ``n`` (a stock decrease) splits alike."""
    base, extra = divmod(abs(n), shards)
    sign = -1 if n < 0 else 1
    return [sign * (base + (1 if s < extra else 0)) for s in range(shards)]


def donors(me: int, shards: int, known: dict[int, int] | None = None) -> list[int]:
    """The other shards, in the order a dry shard asks them for stock: the most
    remaining first by the last poll (``known``), unknown ones after, then by
    distance from ``me`` so that dry shards spread their asks."""
    known = known or {}
    others = [s for s in range(shards) if s != me]
    return sorted(others, key=lambda s: (-known.get(s, 0), (s - me) % shards))
